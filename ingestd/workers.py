"""The worker pool: N spawned processes, each on one file at a time, talking to the parent over a pipe."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from ingestd import worker
from ingestd.names import display
from ingestd.settings import Settings
from ingestd.spool import Spool

# spawn, not fork: the parent runs an HTTP thread, and forking a threaded process is unsafe.
_ctx = multiprocessing.get_context("spawn")


@dataclass(slots=True)
class Slot:
    id: int
    process: BaseProcess
    conn: Connection
    file: str | None = None
    size: int = 0
    bytes: int = 0
    since: float = 0.0  # monotonic
    since_wall: float = 0.0
    last_progress: float = 0.0
    retire: bool = False  # restart after the current file (a reload changed the routing)
    ready: bool = False  # imported and listening (a spawned interpreter takes a moment)


class Pool:
    def __init__(self, settings: Settings, spool: Spool) -> None:
        self.s, self.spool = settings, spool
        self.slots: list[Slot] = []
        self._by_fd: dict[int, Slot] = {}

    def start(self, timeout: float = 60.0) -> None:
        """Spawn every worker and wait until each says it is ready, so READY=1 means work starts at once."""
        self.slots = [self._spawn(i) for i in range(self.s.workers)]
        self._index()
        for slot in self.slots:
            if not slot.conn.poll(timeout):
                raise RuntimeError(f"worker {slot.id} did not start within {timeout:.0f}s")
            for _ in self.receive(slot.conn.fileno()):
                pass

    def _spawn(self, wid: int) -> Slot:
        parent, child = _ctx.Pipe()
        p = _ctx.Process(target=worker.main, name=f"ingestd-worker-{wid}", daemon=True,
                         args=(child, self.s.routing_doc, self.s.max_line_bytes, self.spool.underprocess,
                               self.spool.processed))
        p.start()
        child.close()
        return Slot(wid, p, parent)

    def _index(self) -> None:
        self._by_fd = {}
        for s in self.slots:
            self._by_fd[s.conn.fileno()] = s
            self._by_fd[s.process.sentinel] = s

    def fds(self) -> list[int]:
        return list(self._by_fd)

    def receive(self, fd: int) -> Iterator[tuple[Slot, str, dict[str, Any]]]:
        """Messages from one worker; ("died", …) once when its process is gone."""
        slot = self._by_fd.get(fd)
        if slot is None:
            return
        try:
            while slot.conn.poll():
                kind, data = slot.conn.recv()
                if kind == "progress":
                    slot.bytes, slot.last_progress = data["bytes"], time.monotonic()
                elif kind == "ready":
                    slot.ready = True
                    continue
                yield slot, kind, data
        except (EOFError, OSError):
            pass
        if not slot.process.is_alive():
            slot.process.join()
            self._by_fd.pop(slot.conn.fileno(), None)
            self._by_fd.pop(slot.process.sentinel, None)
            yield slot, "died", {"exitcode": slot.process.exitcode}

    def idle(self) -> list[Slot]:
        return [s for s in self.slots if s.file is None and s.ready and s.process.sentinel in self._by_fd]

    def busy(self) -> bool:
        return any(s.file is not None for s in self.slots)

    def files(self) -> list[str]:
        return [s.file for s in self.slots if s.file is not None]

    def assign(self, slot: Slot, name: str, size: int, now: float, wall: float) -> None:
        slot.file, slot.size, slot.bytes, slot.since, slot.since_wall, slot.last_progress = name, size, 0, now, wall, now
        slot.conn.send(name)

    def release(self, slot: Slot, now: float) -> tuple[str | None, float]:
        """The worker finished (or died): returns its file and how long it took; retires it if asked."""
        name, elapsed = slot.file, now - slot.since
        slot.file, slot.bytes, slot.size = None, 0, 0
        if slot.retire and slot.process.is_alive():
            self._stop(slot)
            self.replace(slot)
        return name, elapsed

    def replace(self, slot: Slot) -> None:
        slot.conn.close()
        new = self._spawn(slot.id)
        self.slots[self.slots.index(slot)] = new
        self._index()

    def reconfigure(self, settings: Settings) -> None:
        """New routing: idle workers restart now, busy ones after their current file."""
        self.s = settings
        for slot in list(self.slots):
            if slot.file is None:
                self._stop(slot)
                self.replace(slot)
            else:
                slot.retire = True

    def stalled(self, now: float, limit: float) -> list[int]:
        return [s.id for s in self.slots if s.file is not None and now - s.last_progress > limit]

    def started_times(self) -> list[float]:
        return [s.since_wall for s in self.slots if s.file is not None]

    def view(self) -> list[dict[str, Any]]:
        return [{"worker": s.id, "file": display(s.file) if s.file is not None else None,
                 "since": s.since_wall if s.file is not None else None, "bytes": s.bytes, "size": s.size}
                for s in self.slots]

    def abandon(self) -> list[tuple[str, int | None]]:
        """Stop every worker now; returns (file, worker pid) for each file still in underprocess/."""
        left = [(s.file, s.process.pid) for s in self.slots if s.file is not None]
        for slot in self.slots:
            if slot.file is not None:
                slot.process.kill()
            self._stop(slot)
            slot.file = None
        return left

    def dump_stacks(self, ids: list[int]) -> None:
        """Ask stuck workers for their stacks (faulthandler on SIGUSR1): the watchdog's SIGABRT only
        reaches the main process, and the journal should show where the worker hangs."""
        for slot in self.slots:
            if slot.id in ids and slot.process.pid is not None and slot.process.is_alive():
                os.kill(slot.process.pid, signal.SIGUSR1)

    @staticmethod
    def _stop(slot: Slot) -> None:
        try:
            slot.conn.send(None)
        except OSError:
            pass
        slot.process.join(timeout=2)
        if slot.process.is_alive():
            slot.process.kill()
            slot.process.join()
        slot.conn.close()
