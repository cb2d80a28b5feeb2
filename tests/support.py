"""Test support: run a real ingestd daemon as a subprocess on a real folder and watch its JSON log."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

INGESTD = [sys.executable, "-m", "ingestd"]

# A routing whose worker blocks forever on a line containing HANG (tests/plugins): a stuck worker.
HANG_ROUTING = """
[[filters]]
match = "*"
processor = "hang_on"

[[filters]]
match = "*"
processor = "uppercase"
"""


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> Any:
    """Poll until predicate() is truthy; fail with `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


class DaemonProcess:
    """`ingestd run` in a subprocess; its stderr JSON events are collected in .events."""

    def __init__(self, watch_dir: Path, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
                 preexec_fn: Callable[[], None] | None = None, command: list[str] | None = None,
                 exact_env: bool = False, log_file: Path | None = None, new_session: bool = False) -> None:
        self.watch_dir = Path(watch_dir)
        self.args = ["run", "--watch-dir", str(watch_dir), "--listen", "127.0.0.1:0", *args]
        if exact_env:  # the benchmarks: exactly the environment given, no test defaults
            full_env = dict(env or {})
        else:
            full_env = {**os.environ, "INGESTD_SETTLE_TIME": "0.3", **(env or {})}
        full_env.pop("NOTIFY_SOCKET", None)
        self.env = full_env
        self.events: list[dict[str, Any]] = []
        self.lines: list[str] = []
        # log_file (the benchmarks): stderr goes to this file and no thread reads it while the daemon runs
        # hot; refresh() parses what it gained since the last call into .lines and .events.
        self.log_file = Path(log_file) if log_file is not None else None
        self._log_pos = 0
        self._log_partial = b""
        stderr: Any = subprocess.PIPE
        if self.log_file is not None:
            stderr = open(self.log_file, "wb")  # noqa: SIM115 (closed below: the child holds its own copy)
        # preexec_fn (torture tests): limits or another user for the daemon only, e.g. RLIMIT_FSIZE, setuid.
        # command: another interpreter (e.g. one a non-root user may execute), default this one.
        # new_session: a process group of its own, so that os.killpg reaches the daemon and its workers.
        try:
            self.proc = subprocess.Popen([*(command or INGESTD), *self.args], stderr=stderr,
                                         stdout=subprocess.DEVNULL,
                                         preexec_fn=preexec_fn, start_new_session=new_session,
                                         env=full_env, cwd=cwd, text=True, errors="replace")
        finally:
            if self.log_file is not None:
                stderr.close()
        self._reader = threading.Thread(target=self._read, daemon=True)
        if self.log_file is None:
            self._reader.start()
        self.url = ""

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            try:
                self.events.append(json.loads(line))
            except ValueError:
                pass

    def refresh(self) -> None:
        """With log_file: parse the complete lines the log gained since the last call (no-op without)."""
        if self.log_file is None:
            return
        with open(self.log_file, "rb") as f:
            f.seek(self._log_pos)
            data = f.read()
        self._log_pos += len(data)
        data = self._log_partial + data
        cut = data.rfind(b"\n") + 1
        self._log_partial = data[cut:]
        for raw in data[:cut].splitlines(keepends=True):
            line = raw.decode(errors="replace")
            self.lines.append(line)
            try:
                self.events.append(json.loads(line))
            except ValueError:
                pass

    def started(self, timeout: float = 15.0) -> DaemonProcess:
        def ready() -> Any:
            self.refresh()
            return self.event("started") or self.proc.poll() is not None

        ev = wait_for(ready, timeout, what="started event")
        self.refresh()
        if ev is True:
            raise AssertionError(f"daemon exited {self.proc.returncode}: {''.join(self.lines)}")
        # INGESTD_WATCH=polling (tests/test_polling.py, or by hand for a whole module): make sure it is what runs.
        forced = self.env.get("INGESTD_WATCH")
        if forced in ("inotify", "polling") and "--watch" not in self.args and "watch" in ev:
            assert ev["watch"] == forced, f"INGESTD_WATCH={forced} but the daemon runs {ev['watch']}"
        self.url = "http://" + ev["listen"]
        return self

    def event(self, name: str, **match: Any) -> dict[str, Any] | None:
        for ev in list(self.events):
            if ev.get("event") == name and all(ev.get(k) == v for k, v in match.items()):
                return ev
        return None

    def count(self, name: str) -> int:
        return sum(1 for ev in list(self.events) if ev.get("event") == name)

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def status(self) -> dict[str, Any]:
        return json.loads(self.get("/api/status")[1])

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the daemon to exit by itself (after a signal the test sent)."""
        rc = self.proc.wait(timeout)
        self._close()
        return rc

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self._close()
        return rc

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._close()

    def _close(self) -> None:
        if self.log_file is not None:
            self.refresh()
            return
        self._reader.join(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def folder(watch_dir: Path, name: str) -> list[str]:
    """User-visible entries of a queue folder, sorted (hidden temps and sidecars excluded)."""
    return sorted(n for n in os.listdir(watch_dir / name) if not n.startswith("."))


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[None]:
    """chattr +i on path for the block (a folder nobody, root included, may change: EPERM), then -i; skips the
    test where that cannot be done (not root, a file system without the flag)."""
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False).returncode:
        pytest.skip("chattr +i needs root and a file system with the immutable flag (ext4, xfs)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)
