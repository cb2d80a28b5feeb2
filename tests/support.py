"""Test support: run a real ingestd daemon as a subprocess on a real folder and watch its JSON log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
                 preexec_fn: Callable[[], None] | None = None, command: list[str] | None = None) -> None:
        self.watch_dir = Path(watch_dir)
        self.args = ["run", "--watch-dir", str(watch_dir), "--listen", "127.0.0.1:0", *args]
        full_env = {**os.environ, "INGESTD_SETTLE_TIME": "0.3", **(env or {})}
        full_env.pop("NOTIFY_SOCKET", None)
        self.events: list[dict[str, Any]] = []
        self.lines: list[str] = []
        # preexec_fn (torture tests): limits or another user for the daemon only, e.g. RLIMIT_FSIZE, setuid.
        # command: another interpreter (e.g. one a non-root user may execute), default this one.
        self.proc = subprocess.Popen([*(command or INGESTD), *self.args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     preexec_fn=preexec_fn,
                                     env=full_env, cwd=cwd, text=True, errors="replace")
        self._reader = threading.Thread(target=self._read, daemon=True)
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

    def started(self, timeout: float = 15.0) -> DaemonProcess:
        ev = wait_for(lambda: self.event("started") or self.proc.poll() is not None, timeout, what="started event")
        if ev is True:
            raise AssertionError(f"daemon exited {self.proc.returncode}: {''.join(self.lines)}")
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
        self._reader.join(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def folder(watch_dir: Path, name: str) -> list[str]:
    """User-visible entries of a queue folder, sorted (hidden temps and sidecars excluded)."""
    return sorted(n for n in os.listdir(watch_dir / name) if not n.startswith("."))
