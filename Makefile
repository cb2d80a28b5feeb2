# ingestd: `make run` starts the daemon on ./watch_dir; `make test` runs every test.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Empty: the settings decide (INGESTD_WATCH_DIR, .env, the config file), by default ./watch_dir.
WATCH_DIR ?=

.PHONY: run test bench bench-quick torture-long clean

# `make install` / `make uninstall`: ingestd as a systemd service (see packaging/install.mk).
include packaging/install.mk

# The virtualenv is rebuilt when the project's dependencies change.
$(BIN)/ingestd: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e .
	touch $@

$(VENV)/.test-deps: $(BIN)/ingestd pyproject.toml tests/plugins/pyproject.toml
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]' ./tests/plugins
	touch $@

# The path through the environment, quoted by the shell: `make run WATCH_DIR="/srv/my queue"` split at the space.
run: export WATCH_DIR := $(WATCH_DIR)
run: $(BIN)/ingestd
	$(BIN)/ingestd run $(if $(WATCH_DIR),--watch-dir "$$WATCH_DIR")

# System packages the real-component tests use (Prometheus, Alertmanager, Chromium); installed when missing.
test: $(VENV)/.test-deps
	sh tests/system-deps.sh
	$(BIN)/python -m pytest

# The benchmarks (bench/, docs/benchmarks.md): the `bench` extra adds the peer scripts' library (watchdog).
$(VENV)/.bench-deps: $(BIN)/ingestd pyproject.toml
	$(BIN)/pip install -q --disable-pip-version-check -e '.[bench,distributed]'
	touch $@

bench: $(VENV)/.bench-deps
	$(BIN)/python -m bench $(BENCH_ARGS)

bench-quick: $(VENV)/.bench-deps
	$(BIN)/python -m bench --quick $(BENCH_ARGS)

torture-long: $(VENV)/.test-deps
	INGESTD_TORTURE_SCALE=10 $(BIN)/python -m pytest tests/torture

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
