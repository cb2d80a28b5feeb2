"""Fixtures for the status-page tests: a real ingestd on a tmp watch dir and a free loopback port,
and Debian's Chromium driven through Playwright's Python package.

Chromium or Playwright missing: the tests fail under CI (CI=true) and skip elsewhere, with the reason.
Every process started here is stopped here (the daemon by SIGTERM then SIGKILL of its process group,
Chromium by Playwright)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("INGESTD_CHROMIUM", "/usr/bin/chromium")
# As this machine needs them: no sandbox as root, no GPU, and none of Chromium's own network chatter
# (the network is closed here; without these it retries refused connections at every start).
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
FOLDERS = ("unprocessed", "underprocess", "processed", "failed")


def _missing(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: the browser tests must run; `make test` installs Chromium as root)")
    pytest.skip(reason)


@dataclass
class Daemon:
    """One `ingestd run` subprocess; its stderr (JSON lines) is collected by a thread."""

    watch_dir: Path
    log_path: Path
    listen: str = "127.0.0.1:0"
    workers: int = 2
    args: list[str] = field(default_factory=list)  # more `ingestd run` flags (e.g. --config)
    env: dict[str, str] = field(default_factory=dict)  # INGESTD_* settings
    proc: subprocess.Popen[bytes] | None = None
    address: str = ""
    events: list[dict[str, object]] = field(default_factory=list)
    _started: threading.Event = field(default_factory=threading.Event)
    _reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.address}/"

    def start(self, timeout: float = 15.0) -> None:
        cmd = [sys.executable, "-m", "ingestd", "run", "--watch-dir", str(self.watch_dir),
               "--listen", self.listen, "--workers", str(self.workers), *self.args]
        env = {k: v for k, v in os.environ.items()
               if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET", "WATCHDOG_USEC") and not k.startswith("INGESTD_") and k != "MODE"}
        env.update(self.env)
        self._started.clear()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, env=env, cwd=self.watch_dir.parent,
                                     start_new_session=True)
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        if not self._started.wait(timeout) or not self.address:
            self.stop()
            raise AssertionError(f"ingestd did not log a started event within {timeout} s:\n{self.log()}")

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        with proc.stderr, open(self.log_path, "ab") as log:
            for raw in proc.stderr:
                log.write(raw)
                log.flush()
                line = raw.decode("utf-8", "replace").strip()
                if line.startswith("<") and ">" in line[:4]:  # a journald priority prefix
                    line = line[line.index(">") + 1:]
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(ev, dict):
                    continue
                self.events.append(ev)
                if ev.get("event") == "started":
                    self.address = str(ev["listen"])
                    self._started.set()
        self._started.set()  # exited: wake start() rather than let it wait out its timeout

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL to the whole process group (the worker processes included)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers in the group, if any
        except ProcessLookupError:
            pass
        proc.wait()
        if self._reader is not None:
            self._reader.join(5)

    def log(self) -> str:
        try:
            return self.log_path.read_text("utf-8", "replace")[-4000:]
        except OSError:
            return ""

    def drop(self, name: str, data: bytes) -> Path:
        """Put a file into unprocessed/ the way producers should: write a dot-file, then rename."""
        tmp = self.watch_dir / "unprocessed" / f".drop-{os.getpid()}-{time.monotonic_ns()}"
        tmp.write_bytes(data)
        final = self.watch_dir / "unprocessed" / name
        os.rename(tmp, final)
        return final


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """start_daemon(args=[...], env={...}) -> a started Daemon on tmp_path/watch; all stopped afterwards."""
    started: list[Daemon] = []

    def start(**kw: Any) -> Daemon:
        watch = tmp_path / "watch"
        for folder in FOLDERS:
            (watch / folder).mkdir(parents=True, exist_ok=True)
        d = Daemon(watch_dir=watch, log_path=tmp_path / f"ingestd-{len(started)}.log", **kw)
        started.append(d)
        d.start()
        return d

    try:
        yield start
    finally:
        for d in started:
            d.stop()


@pytest.fixture
def daemon(start_daemon: Callable[..., Daemon]) -> Daemon:
    return start_daemon()


@pytest.fixture
def hang_config(tmp_path: Path) -> Path:
    """Routing through the test plug-in `hang_on`: a line containing HANG blocks its worker (a busy worker
    the page can show); every other line passes through unchanged."""
    try:
        import ingestd_testplugins  # noqa: F401
    except ImportError:
        _missing("the test plug-ins (tests/plugins) are not installed; pip install ./tests/plugins")
    cfg = tmp_path / "hang.toml"
    cfg.write_text('[[filters]]\nmatch = "*"\nprocessor = "hang_on"\n')
    return cfg


@pytest.fixture(scope="module")
def _playwright() -> Iterator[object]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        _missing(f"Playwright's Python package is not installed ({e}); pip install -e '.[test]'")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        _missing(f"Chromium not found at {CHROMIUM}; apt-get install chromium (tests/system-deps.sh does, as root)")
    with sync_playwright() as p:
        yield p


@pytest.fixture
def browser_context(_playwright: object, tmp_path: Path) -> Iterator[object]:
    """A fresh Chromium with a fresh profile (--user-data-dir under tmp_path), closed after the test."""
    profile = tmp_path / "chromium-profile"
    context = _playwright.chromium.launch_persistent_context(  # type: ignore[attr-defined]
        str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
        viewport={"width": 1280, "height": 900}, locale="en-US", timezone_id="UTC",
        service_workers="block", timeout=30_000,
    )
    try:
        yield context
    finally:
        context.close()
        shutil.rmtree(profile, ignore_errors=True)
