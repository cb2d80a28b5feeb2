"""systemd notify protocol (via sdnotify): READY, STATUS, WATCHDOG, STOPPING, RELOADING. A no-op outside systemd."""

from __future__ import annotations

import os
import time

import sdnotify


class Notifier:
    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._n = sdnotify.SystemdNotifier() if self.enabled else None
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        ours = not pid or pid == str(os.getpid())
        # systemd expects a ping at least every WATCHDOG_USEC; we ping at half of it.
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and ours and self.enabled else None
        self._status = ""

    def _send(self, msg: str) -> None:
        # sdnotify encodes Latin-1 and swallows errors: a character outside it drops the whole datagram.
        if self._n is not None:
            self._n.notify(msg.encode("ascii", "backslashreplace").decode("ascii"))

    def ready(self) -> None:
        self._send("READY=1")

    def reloading(self) -> None:
        self._send(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def extend_timeout(self, seconds: float) -> None:
        self._send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")  # alone in its datagram, so a bad STATUS can never take it down

    def status(self, text: str) -> None:
        """One line; only sent when it changed. Names reach here already escaped (names.display)."""
        line = " ".join(text.split())[:200]
        if line != self._status:
            self._status = line
            self._send(f"STATUS={line}")
