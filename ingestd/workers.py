"""The worker pool: N spawned processes, each on one Job at a time, talking to the parent over a pipe.

The pool is only changed (a worker replaced, retired or stopped) by `maintain()`, which the daemon calls
between event rounds: never while the pipes are being read.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from ingestd import worker
from ingestd.job import Job
from ingestd.messages import Assign, Heartbeat, Ready, Stage, Stop, ToParent
from ingestd.names import display
from ingestd.settings import Settings
from ingestd.spool import Spool

# spawn, not fork: the parent runs an HTTP thread, and forking a threaded process is unsafe.
_ctx = multiprocessing.get_context("spawn")
KILL_GRACE = 0.5  # seconds between asking a stuck worker for its stack (SIGUSR1) and killing it


@dataclass(slots=True, eq=False)
class Slot:
    id: int
    process: BaseProcess
    conn: Connection
    job: Job | None = None
    ready: bool = False  # imported and listening (a spawned interpreter takes a moment)
    dead: bool = False  # its process is gone (reported once as died)
    retire: bool = False  # restart once idle (a reload changed the routing)
    kill_reason: str | None = None  # why the parent is killing it (stuck, over its time limit), for people
    kill_kind: str = "died"  # the same as a metric label: stalled | time_limit
    kill_at: float | None = None  # monotonic: when the SIGKILL goes (after the stack dump)

    @property
    def pid(self) -> int | None:
        return self.process.pid


class Pool:
    def __init__(self, settings: Settings, spool: Spool, clock: Callable[[], float] = time.monotonic) -> None:
        self.s, self.spool, self.clock = settings, spool, clock
        self.slots: list[Slot] = []
        self._by_fd: dict[int, Slot] = {}

    def start(self, timeout: float = 60.0) -> None:
        """Spawn every worker and wait until each says it is ready, so READY=1 means work starts at once.
        Raises RuntimeError if one does not start; the caller then calls close()."""
        self.slots = [self._spawn(i) for i in range(self.s.workers)]
        self._index()
        for slot in self.slots:
            if not slot.conn.poll(timeout):
                raise RuntimeError(f"worker {slot.id} did not start within {timeout:.0f}s")
            self.receive(slot.conn.fileno())
            if not slot.ready:
                raise RuntimeError(f"worker {slot.id} exited at start (exit code {slot.process.exitcode})")

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
            if not s.dead:
                self._by_fd[s.conn.fileno()] = s
                self._by_fd[s.process.sentinel] = s

    def fds(self) -> list[int]:
        return list(self._by_fd)

    def receive(self, fd: int) -> list[tuple[Slot, ToParent | None]]:
        """Every message waiting from the worker behind fd, then (slot, None) once if its process is gone.
        Heartbeats update the slot's job here and are not returned. Returns a list: nothing changes the
        pool while its pipes are read."""
        slot = self._by_fd.get(fd)
        if slot is None or slot.dead:
            return []
        out: list[tuple[Slot, ToParent | None]] = []
        try:
            while slot.conn.poll():
                msg = slot.conn.recv()
                if isinstance(msg, Ready):
                    slot.ready = True
                elif isinstance(msg, Heartbeat):
                    self._beat(slot, msg)
                else:
                    out.append((slot, msg))
        except (EOFError, OSError):
            pass  # the worker is gone; its sentinel says so below
        if not slot.process.is_alive():
            slot.process.join()
            slot.dead = True
            self._index()
            out.append((slot, None))
        return out

    def _beat(self, slot: Slot, hb: Heartbeat) -> None:
        job = slot.job
        if job is None:
            return
        # Progress is input read, or a commit under way (fsyncs on a slow disk move nothing we can count).
        if hb.bytes != job.bytes or hb.lines != job.lines or hb.stage is Stage.COMMIT:
            job.last_progress = self.clock()
        job.bytes, job.lines = hb.bytes, hb.lines

    # --- handing out and taking back ----------------------------------------------------------------
    def idle(self) -> list[Slot]:
        return [s for s in self.slots if s.job is None and s.ready and not s.dead and not s.retire]

    def busy(self) -> list[Slot]:
        return [s for s in self.slots if s.job is not None]

    def assign(self, slot: Slot, job: Job, now: float, wall: float) -> bool:
        """Hand a job to an idle worker. False if the worker died meanwhile (the job is not taken)."""
        try:
            slot.conn.send(Assign(job.name))
        except OSError:  # BrokenPipeError: it died between the poll and this hand-off
            return False
        job.begin(slot.id, now, wall)
        slot.job = job
        return True

    def release(self, slot: Slot) -> Job | None:
        job, slot.job = slot.job, None
        return job

    def reconfigure(self, settings: Settings) -> None:
        """New routing: every worker restarts once idle (maintain() does it)."""
        self.s = settings
        for slot in self.slots:
            slot.retire = True

    def maintain(self, running: bool) -> bool:
        """Replace dead workers and restart idle retiring ones (only while running). True if the fds changed."""
        changed = False
        for i, slot in enumerate(self.slots):
            if slot.job is not None or not (slot.dead or slot.retire):
                continue
            if slot.retire and not slot.dead:
                self._stop(slot)
            else:
                _close(slot)
            if running:
                self.slots[i] = self._spawn(slot.id)
            changed = True
        if changed:
            if not running:
                self.slots = [s for s in self.slots if not (s.dead or s.retire) or s.job is not None]
            self._index()
        return changed

    # --- supervision ----------------------------------------------------------------------------------
    def stalled(self, now: float, limit: float, time_limit: float) -> list[tuple[Slot, str, str]]:
        """Busy workers with no progress for `limit` seconds, or on one file longer than `time_limit` (0: none)."""
        out = []
        for s in self.slots:
            job = s.job
            if job is None or s.dead or s.kill_reason is not None:
                continue
            if now - job.last_progress > limit:
                out.append((s, "stalled", f"no progress for {now - job.last_progress:.1f}s (stall_time {limit:g}s)"))
            elif time_limit and now - job.started > time_limit:
                out.append((s, "time_limit", f"over the time limit of {time_limit:g}s per file"))
        return out

    def condemn(self, slot: Slot, kind: str, reason: str, now: float) -> None:
        """Ask a stuck worker for its stack (faulthandler on SIGUSR1, into our stderr), kill it KILL_GRACE later."""
        slot.kill_kind, slot.kill_reason, slot.kill_at = kind, reason, now + KILL_GRACE
        if slot.pid is not None and slot.process.is_alive():
            os.kill(slot.pid, signal.SIGUSR1)  # a SIGSTOPped worker dumps nothing; it is killed all the same

    def execute(self, now: float) -> list[Slot]:
        """SIGKILL condemned workers whose grace is over; their deaths arrive through the sentinels."""
        done = []
        for s in self.slots:
            if s.kill_at is not None and now >= s.kill_at and not s.dead:
                s.kill_at = None
                s.process.kill()
                done.append(s)
        return done

    def next_kill(self) -> float | None:
        times = [s.kill_at for s in self.slots if s.kill_at is not None]
        return min(times) if times else None

    # --- looking ---------------------------------------------------------------------------------------
    def view(self, now: float) -> list[dict[str, Any]]:
        return [{"worker": s.id, "file": display(s.job.name) if s.job else None,
                 "since": s.job.started_wall if s.job else None, "bytes": s.job.bytes if s.job else 0,
                 "size": s.job.size if s.job else 0,
                 "silent_for": round(now - s.job.last_progress, 1) if s.job else None,
                 "stuck": s.kill_reason} for s in self.slots]

    # --- ending -------------------------------------------------------------------------------------
    def abandon(self) -> list[tuple[Job, int | None]]:
        """Kill every busy worker now; returns (job, worker pid) for each. Idle workers stop cleanly."""
        left = []
        for slot in self.slots:
            if slot.job is not None:
                left.append((slot.job, slot.pid))
                slot.process.kill()
                slot.job = None
        self.close()
        return left

    def close(self) -> None:
        for slot in self.slots:
            if slot.dead:
                _close(slot)
            else:
                self._stop(slot)
        self.slots, self._by_fd = [], {}

    @staticmethod
    def _stop(slot: Slot) -> None:
        try:
            slot.conn.send(Stop())
        except OSError:
            pass
        slot.process.join(timeout=2)
        if slot.process.is_alive():
            slot.process.kill()
            slot.process.join()
        _close(slot)


def _close(slot: Slot) -> None:
    slot.conn.close()
    if slot.process.exitcode is not None:
        slot.process.close()  # releases its sentinel fd
