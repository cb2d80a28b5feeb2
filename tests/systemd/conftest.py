"""Fixtures for the tests under a real systemd: one booted machine per test module, ingestd installed in it
by `make install`, and a `service` reset to a known state before each test.

systemd cannot boot here (not root, no overlayfs, ...): the tests fail under CI=true and skip elsewhere,
with the reason. Every machine booted here is powered off (or its PID 1 killed) at teardown.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from systemd_harness import BootError, Machine, Service

REPO = Path(__file__).resolve().parents[2]


def unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"real-systemd tests cannot run: {reason} (CI=true: they must)", pytrace=False)
    pytest.skip(f"real-systemd tests cannot run: {reason}")


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wheels of ingestd's dependencies (its `distributed` extra's too) and its build backend, so installs inside
    the machine are offline."""
    if os.geteuid() != 0:
        unavailable("booting systemd needs root")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["distributed"]
    # redis-py needs async-timeout below Python 3.11.3 (Debian 12's python3, the one installed from in the machine);
    # resolved here by a newer interpreter, that marker would leave it out.
    deps.append("async-timeout>=4.0.3")
    out = tmp_path_factory.mktemp("wheelhouse")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "-w", str(out),
                           "setuptools>=61", "wheel", *deps], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        unavailable(f"could not fetch the dependencies' wheels: {proc.stderr.strip()[-2000:]}")
    return out


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path) -> Iterator[Machine]:
    for tool in ("unshare", "nsenter", "systemd", "make"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/bin/{tool}"):
            unavailable(f"{tool} is not installed")
    m = Machine(tmp_path_factory.mktemp("machine"), wheelhouse)
    try:
        m.boot()
    except BootError as e:
        unavailable(str(e))
    try:
        yield m
    finally:
        m.cleanup()


@pytest.fixture(scope="module")
def installed(machine: Machine) -> Machine:
    """`make install` run inside the machine, as an operator would (systemd is PID 1 there, so it also runs
    systemd-sysusers, systemd-tmpfiles and daemon-reload), with the distributed mode's extra (docs/distributed.md),
    then the test-only processors into the venv."""
    offline = "--no-index --find-links=/wheelhouse"
    machine.run("make", "-C", str(REPO), "-f", "packaging/install.mk", "install", "PYTHON=/usr/bin/python3",
                "EXTRAS=distributed", f"PIP_INSTALL_FLAGS={offline}", timeout=600)
    machine.run("/opt/ingestd/bin/pip", "install", "-q", "--disable-pip-version-check", *offline.split(),
                str(REPO / "tests" / "plugins"), timeout=600)
    return machine


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    if report.when == "call":
        item.stash[_failed] = report.failed
    return report


_failed = pytest.StashKey[bool]()


@pytest.fixture
def service(request: pytest.FixtureRequest, installed: Machine) -> Iterator[Service]:
    svc = Service(installed)
    mark = installed.mark()
    yield svc
    if request.node.stash.get(_failed, False):
        # What the unit and systemd said during the failed test, in the test's report.
        print(installed.run("journalctl", "--no-pager", "-u", Service.UNIT, "-o", "short-monotonic",
                            "--since", f"@{mark // 1_000_000}").stdout[-20000:])
    svc.m.systemctl("stop", Service.UNIT, check=False)
