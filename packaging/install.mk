# `make install` / `make uninstall` (as root): ingestd as a systemd service. Included by the top-level
# Makefile; also works alone: `make -f packaging/install.mk install`.
#
#   PREFIX      the virtualenv the package goes into (default /opt/ingestd; the unit's ExecStart follows it)
#   DESTDIR     stage everything under this root instead of / (packaging, tests); then nothing on the
#               running system is touched: no systemd-sysusers, systemd-tmpfiles or systemctl
#   PYTHON      the interpreter the virtualenv is made from. It must be readable by the ingestd user
#               and outside /root and /home (the unit has ProtectHome=yes): a system Python such as
#               /usr/bin/python3, not a pyenv or conda one under a home directory.
#   PIP_INSTALL_FLAGS  extra pip flags, e.g. "--no-index --find-links=/srv/wheels" for an offline install
#   EXTRAS      optional features to install with it, e.g. EXTRAS=distributed for more than one machine
#               (docs/distributed.md: Dramatiq and redis-py)

# Included before the Makefile's own rules, this fragment must not become the default goal (`make`).
INGESTD_SAVED_GOAL := $(.DEFAULT_GOAL)

PYTHON ?= python3
PREFIX ?= /opt/ingestd
DESTDIR ?=
SYSCONFDIR ?= /etc
# Local (not distribution) locations, all in systemd's search paths; /etc stays the operator's for
# overrides (`systemctl edit ingestd`).
SYSTEMD_UNITDIR ?= /usr/local/lib/systemd/system
SYSUSERSDIR ?= /usr/local/lib/sysusers.d
TMPFILESDIR ?= /usr/local/lib/tmpfiles.d
PIP_INSTALL_FLAGS ?=
EXTRAS ?=

# The repository this fragment belongs to (evaluated now, while it is the last makefile read).
INGESTD_SRC := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))..)
INGESTD_PKG := $(INGESTD_SRC)/packaging/systemd
INGESTD_VENV := $(DESTDIR)$(PREFIX)
INGESTD_ENVFILE := $(DESTDIR)$(SYSCONFDIR)/ingestd/ingestd.env
# ingestd-worker.service is installed disabled: only nodes of a cluster enable it (docs/distributed.md).
INGESTD_UNITS := ingestd.service ingestd-worker.service
# systemd is PID 1 here and we install onto the live system: apply users, folders and units now.
INGESTD_LIVE = test -z "$(DESTDIR)" && test -d /run/systemd/system

.PHONY: install uninstall install-check

install-check:
	@test "$$(id -u)" = 0 || { echo "install: run as root (sudo make install)" >&2; exit 1; }
	@case "$(PREFIX)" in /?*) ;; *) echo "install: PREFIX must be an absolute path, not '$(PREFIX)'" >&2; exit 1;; esac
	@base=$$($(PYTHON) -c 'import sys; print(sys.base_prefix)') || exit 1; \
	case "$$base/" in /root/*|/home/*) \
		echo "install: $(PYTHON) lives in $$base, which the service cannot read (ProtectHome=yes, user ingestd);" \
		     "use a system Python: make install PYTHON=/usr/bin/python3" >&2; exit 1;; esac; \
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "install: $(PYTHON) is older than Python 3.11" >&2; exit 1; }

install: install-check
	@echo "install: ingestd into $(INGESTD_VENV)"
	test -x $(INGESTD_VENV)/bin/python || $(PYTHON) -m venv $(INGESTD_VENV)
	@# Build from a clean copy, so that no root-owned build/ is left in the checkout.
	set -e; src=$$(mktemp -d); trap 'rm -rf "$$src"' EXIT; \
	tar -C $(INGESTD_SRC) --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
		--exclude='*.egg-info' --exclude=./watch_dir --exclude=./.hypothesis --exclude=./.pytest_cache \
		--exclude=./node_modules --exclude=./.prometheus-data -cf - . | tar -C "$$src" -xf -; \
	$(INGESTD_VENV)/bin/python -m pip install -q --disable-pip-version-check --upgrade \
		$(PIP_INSTALL_FLAGS) "$$src$(if $(EXTRAS),[$(EXTRAS)])"
ifneq ($(DESTDIR),)
	@# A virtualenv is not relocatable: point its scripts and byte-code at $(PREFIX), where it will run.
	grep -rlIF '$(INGESTD_VENV)' $(INGESTD_VENV)/bin $(INGESTD_VENV)/pyvenv.cfg | xargs -r sed -i 's|$(INGESTD_VENV)|$(PREFIX)|g'
	$(INGESTD_VENV)/bin/python -m compileall -q -f -j 0 -s '$(DESTDIR)' -p / $(INGESTD_VENV)/lib
endif
	@# The units (the daemon or cluster scanner, and the cluster's worker node), with ExecStart following PREFIX.
	install -d -m 0755 $(DESTDIR)$(SYSTEMD_UNITDIR) $(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(TMPFILESDIR)
	for unit in $(INGESTD_UNITS); do \
		sed 's|/opt/ingestd/|$(PREFIX)/|g' $(INGESTD_PKG)/$$unit > $(DESTDIR)$(SYSTEMD_UNITDIR)/$$unit && \
		chmod 0644 $(DESTDIR)$(SYSTEMD_UNITDIR)/$$unit || exit 1; done
	install -m 0644 $(INGESTD_PKG)/ingestd.sysusers.conf $(DESTDIR)$(SYSUSERSDIR)/ingestd.conf
	install -m 0644 $(INGESTD_PKG)/ingestd.tmpfiles.conf $(DESTDIR)$(TMPFILESDIR)/ingestd.conf
	install -d -m 0755 $(DESTDIR)$(SYSCONFDIR)/ingestd
	@# The operator's settings are never overwritten.
	if test -e $(INGESTD_ENVFILE); then echo "install: keeping the existing $(INGESTD_ENVFILE)"; \
	else install -m 0644 $(INGESTD_PKG)/ingestd.env $(INGESTD_ENVFILE); fi
	if $(INGESTD_LIVE); then \
		systemd-sysusers $(SYSUSERSDIR)/ingestd.conf && \
		systemd-tmpfiles --create $(TMPFILESDIR)/ingestd.conf && \
		systemctl daemon-reload && \
		systemctl try-restart $(INGESTD_UNITS); \
	else echo "install: systemd not running here (or DESTDIR set): systemd-sysusers, systemd-tmpfiles --create and systemctl daemon-reload are left to do"; fi
	@echo "install: done. Settings: $(SYSCONFDIR)/ingestd/ingestd.env; start: systemctl enable --now ingestd (a cluster worker node: ingestd-worker)"

# Leaves the operator's data (/var/lib/ingestd), the ingestd user and a changed env file in place.
uninstall:
	@test "$$(id -u)" = 0 || { echo "uninstall: run as root (sudo make uninstall)" >&2; exit 1; }
	for unit in $(INGESTD_UNITS); do \
		if $(INGESTD_LIVE) && systemctl cat $$unit >/dev/null 2>&1; then systemctl disable --now $$unit; fi; done
	rm -f $(addprefix $(DESTDIR)$(SYSTEMD_UNITDIR)/,$(INGESTD_UNITS)) $(DESTDIR)$(SYSUSERSDIR)/ingestd.conf $(DESTDIR)$(TMPFILESDIR)/ingestd.conf
	@# Only ever delete a virtualenv (never "/" by a mistyped PREFIX).
	if test -f $(INGESTD_VENV)/pyvenv.cfg; then rm -rf $(INGESTD_VENV); fi
	if cmp -s $(INGESTD_PKG)/ingestd.env $(INGESTD_ENVFILE); then rm -f $(INGESTD_ENVFILE); \
	elif test -e $(INGESTD_ENVFILE); then echo "uninstall: keeping the changed $(INGESTD_ENVFILE)"; fi
	rmdir $(DESTDIR)$(SYSCONFDIR)/ingestd 2>/dev/null || true
	if $(INGESTD_LIVE); then systemctl daemon-reload; fi
	@echo "uninstall: done. Kept: /var/lib/ingestd (data) and the ingestd user (userdel ingestd to remove it)"

.DEFAULT_GOAL := $(INGESTD_SAVED_GOAL)
