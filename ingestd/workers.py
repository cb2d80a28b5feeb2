"""The worker pool: N spawned processes, each on one batch of Jobs at a time, talking to the parent over a pipe.

The pool is only changed (a worker replaced, retired or stopped) by `maintain()`, which the daemon calls
between event rounds: never while the pipes are being read.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from ingestd import inflight, worker
from ingestd.job import Job
from ingestd.log import event
from ingestd.messages import (
    Assign,
    Heartbeat,
    Ready,
    Stage,
    StartFailed,
    Stop,
    ToParent,
)
from ingestd.names import display
from ingestd.settings import ConfigError, Settings
from ingestd.spool import Spool

# spawn, not fork: the parent runs an HTTP thread, and forking a threaded process is unsafe.
_ctx = multiprocessing.get_context("spawn")
KILL_GRACE = 0.5  # seconds between asking a stuck worker for its stack (SIGUSR1) and killing it
RESPAWN_AFTER = 1.0  # seconds before a failed worker spawn is tried again
# A worker that dies before its Ready (its plug-in cannot load in a worker) would die again at once: its slot is
# respawned after START_BACKOFF seconds, doubling with each such death up to START_BACKOFF_MAX; a Ready resets it.
# Respawned at once, two such workers spun both cores of a small VM (~10 deaths a second: tests/test_break_round8.py).
START_BACKOFF = 1.0
START_BACKOFF_MAX = 60.0
START_MIN = 2.0  # seconds a worker may take to start (import) at least, whatever a tiny stall_time says
MAX_START_TRIES = 3  # at the daemon's start, a slot's workers dying before Ready with one error this often: it ends
# Seconds the parent waits for a worker's cursor lock, held by a running worker for a few microseconds per file.
# Never longer: a POSIX semaphore is not released by a holder's death (sem_overview(7)), so a worker killed or
# stopped inside it would otherwise block the parent's main loop for ever.
LOCK_WAIT = 0.01


@dataclass(slots=True, eq=False)
class Slot:
    id: int
    process: BaseProcess
    conn: Connection
    # multiprocessing Array("i", 2) with a lock: [index of the file it is on (-1 before the first), index to stop
    # before]; the parent reads it through `on`, never `cursor[i]`, which takes the lock
    cursor: Any
    batch: list[Job] = field(default_factory=list)  # what it holds, in order; empty when idle
    index: int = 0  # the batch's file it is on (from its heartbeats)
    done: set[str] = field(default_factory=set)  # names of its batch already reported (committed ahead)
    last_progress: float = 0.0  # monotonic: the last heartbeat that showed progress
    ready: bool = False  # imported and listening (a spawned interpreter takes a moment)
    dead: bool = False  # its process is gone (reported once as died)
    retire: bool = False  # restart once idle (a reload changed the routing)
    closed: bool = False  # its pipe and process handle are released (after death or stop)
    respawn_at: float = 0.0  # monotonic: a failed respawn (EMFILE...) is tried again from then
    spawned: float = 0.0  # monotonic: when its process was started (a worker not ready within stall_time is stuck)
    start_delay: float = 0.0  # the respawn backoff of this slot's deaths before Ready (carried to its successor)
    start_error: str | None = None  # why it could not start: what its StartFailed said, else how it exited
    start_news: bool = False  # that error differs from the pool's last one: the daemon logs it (once per change)
    kill_reason: str | None = None  # why the parent is killing it (stuck, over its time limit), for people
    kill_kind: str = "died"  # the same as a metric label: stalled | time_limit
    kill_at: float | None = None  # monotonic: when the SIGKILL goes (after the stack dump)

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def on(self) -> int:
        """The index in its batch of the file it is on, as the worker last wrote it (-1 before the first). Read
        without the lock (one aligned int): `cursor[0]` takes it, and a worker killed or stopped while holding
        it blocked every reader, the status page's included."""
        return int(self.cursor.get_obj()[0])

    @property
    def job(self) -> Job | None:
        """The file it is on now (None when idle)."""
        return self.batch[min(max(0, self.on), len(self.batch) - 1)] if self.batch else None


class Pool:
    def __init__(self, settings: Settings, spool: Spool, clock: Callable[[], float] = time.monotonic) -> None:
        self.s, self.spool, self.clock = settings, spool, clock
        self.slots: list[Slot] = []
        self._by_fd: dict[int, Slot] = {}
        self.spawn_error: str | None = None  # the last failed respawn, until one succeeds
        self.records_ok = True  # every worker so far could keep its .ingestd/inflight record (False stays False)
        self.start_error: str | None = None  # why the last worker to die before its Ready died, until one is ready
        # Since workers could not start (the spawn of the first to die before its Ready once the daemon runs: the
        # daemon said worker_cannot_start), and how many died so, until one is ready (workers_recovered says both).
        self.failing: tuple[float, int] | None = None
        self._starting = False  # in start(): deaths there are start()'s to judge, and the daemon logs none

    def start(self, timeout: float = 60.0, wake: int | None = None,
              stopping: Callable[[], bool] = lambda: False) -> None:
        """Spawn every worker and wait until each says it is ready, so READY=1 means work starts at once.

        A worker that dies before its Ready is spawned again after the start backoff (1 s, doubling), as after the
        start: a passing failure (a service its plug-in needs, not up yet at boot; EMFILE) must not end the daemon.
        Raises ConfigError with `temporary` (exit 75: the daemon built this routing itself, so a worker that cannot
        is the environment's or the plug-in's doing, which a restart may not meet again) naming the worker's own
        error, once the same error came MAX_START_TRIES times in a row or `timeout` seconds passed; the caller then
        calls close(). Raises StartInterrupted when `stopping()` turns true: it is looked at whenever `wake` (the
        signal handlers' wake-up fd) is readable, so a SIGTERM is not held for the whole timeout."""
        self._starting = True
        try:
            self._start(timeout, wake, stopping)
        finally:
            self._starting = False

    def _start(self, timeout: float, wake: int | None, stopping: Callable[[], bool]) -> None:
        self.slots = [self._spawn(i) for i in range(self.s.workers)]
        self._index()
        deadline = self.clock() + timeout
        streak = [0] * len(self.slots)  # each slot's deaths before Ready in a row with the same error
        last: list[str | None] = [None] * len(self.slots)
        while not all(s.ready for s in self.slots):
            now = self.clock()
            if now >= deadline:
                late = next(s for s in self.slots if not s.ready)
                late.start_error = late.start_error or f"it did not start within {timeout:.0f}s"
                raise _cannot_start(late)
            for i, slot in enumerate(self.slots):
                if slot.dead and now >= slot.respawn_at:  # its backoff is over: try again
                    self.slots[i] = self._spawn(slot.id)
                    self.slots[i].start_delay = slot.start_delay  # the backoff goes on (a Ready resets it)
                    _close(slot)
                    self._index()
            starting = [s for s in self.slots if not s.ready and not s.dead]
            until = min([deadline, *(s.respawn_at for s in self.slots if s.dead)])
            objects: list[Any] = [s.conn for s in starting] + [s.process.sentinel for s in starting]
            woke = multiprocessing.connection.wait(objects + ([wake] if wake is not None else []),
                                                   max(0.0, until - now))
            if wake is not None and wake in woke:
                # Drained here: left readable (a SIGHUP, which does not stop the start), each wait returned at once
                # and the loop spun until the workers were ready. The signals themselves stay in the daemon's list.
                with contextlib.suppress(OSError):
                    while os.read(wake, 512):
                        pass
            if stopping():
                raise StartInterrupted("a stop signal came while the workers were starting")
            for i, slot in enumerate(self.slots):
                if slot.ready or slot.dead:
                    continue
                self.receive(slot.conn.fileno())  # a Ready, a StartFailed, or its death (then backed off)
                if slot.dead:
                    streak[i] = streak[i] + 1 if slot.start_error == last[i] else 1
                    last[i] = slot.start_error
                    if streak[i] >= MAX_START_TRIES:
                        raise _cannot_start(slot)

    def _spawn(self, wid: int) -> Slot:
        parent, child = _ctx.Pipe()
        # Which file of its batch the worker is on, in shared memory: still readable after a kill -9, so a death
        # blames the right file even between heartbeats.
        cursor = _ctx.Array("i", 2)
        p = _ctx.Process(target=worker.main, name=f"ingestd-worker-{wid}", daemon=True,
                         args=(child, cursor, self.s.routing_doc, self.s.max_line_bytes, self.spool.underprocess,
                               self.spool.processed, self.spool.state, wid, self.s.file_exist))
        p.start()
        child.close()
        return Slot(wid, p, parent, cursor, spawned=self.clock())

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
                    slot.ready, slot.start_delay = True, 0.0  # it starts: its successors respawn at once again
                    self.start_error = None
                    self._recovered(slot)
                    if not msg.marker_ok:  # its record would lie after a crash: make recovery count every file
                        inflight.set_record(self.spool.state, slot.id, inflight.UNKNOWN)
                        self.records_ok = False
                elif isinstance(msg, Heartbeat):
                    self._beat(slot, msg)
                elif isinstance(msg, StartFailed):
                    slot.start_error = msg.error
                else:
                    out.append((slot, msg))
        except (EOFError, OSError):
            pass  # the worker is gone; its sentinel says so below
        if not slot.process.is_alive():
            slot.process.join()
            slot.dead = True
            if not slot.ready:
                self._died_at_start(slot)
            self._index()
            out.append((slot, None))
        return out

    def _died_at_start(self, slot: Slot) -> None:
        """Dead before its Ready: its successor would most likely die the same way at once, so it is respawned
        after a backoff (START_BACKOFF, doubling); a worker that dies on a file was ready, and is replaced at once."""
        if slot.start_error is None:  # killed for not starting in time, or it said nothing: how it ended
            slot.start_error = slot.kill_reason or _exit_reason(slot.process)
        slot.start_news = slot.start_error != self.start_error  # said once per change, not once per respawn
        self.start_error = slot.start_error
        if not self._starting:  # the daemon says worker_cannot_start (its error is news: the first since a Ready)
            since, deaths = self.failing or (slot.spawned, 0)
            self.failing = (since, deaths + 1)
        slot.start_delay = min(START_BACKOFF_MAX, slot.start_delay * 2 or START_BACKOFF)
        slot.respawn_at = self.clock() + slot.start_delay

    def _recovered(self, slot: Slot) -> None:
        """A worker is ready after workers could not start (worker_cannot_start was logged): said once, INFO, with
        how long they could not (seconds from the spawn of the first that died before its Ready) and how many died
        so; the next death before a Ready starts a new count (and is said again as worker_cannot_start)."""
        if self.failing is None:
            return
        (since, deaths), self.failing = self.failing, None
        event("workers_recovered", "a worker started again after workers could not start", worker=slot.id,
              duration=round(self.clock() - since, 3), failed_starts=deaths)

    def started(self) -> int:
        """Workers alive that said Ready (a worker still importing, or one that cannot start, is not counted)."""
        return sum(1 for s in self.slots if s.ready and not s.dead)

    def _beat(self, slot: Slot, hb: Heartbeat) -> None:
        if not slot.batch or hb.index >= len(slot.batch):
            return  # a late beat from a batch already reported
        now = self.clock()
        if hb.index != slot.index:  # on to the next file of its batch: that file's clock starts
            slot.index = hb.index
            slot.batch[hb.index].started = now
            slot.last_progress = now
        job = slot.batch[hb.index]
        # Progress is input read, or a commit under way (fsyncs on a slow disk move nothing we can count).
        if hb.bytes != job.bytes or hb.lines != job.lines or hb.stage is Stage.COMMIT:
            slot.last_progress = now
        job.bytes, job.lines = hb.bytes, hb.lines

    # --- handing out and taking back ----------------------------------------------------------------
    def idle(self) -> list[Slot]:
        """Workers ready for a batch: alive, not retiring, not condemned (a kill may be on its way)."""
        return [s for s in self.slots if not s.batch and s.ready and not s.dead and not s.retire
                and s.kill_reason is None]

    def alive(self) -> int:
        return sum(1 for s in self.slots if not s.dead)

    def busy(self) -> list[Slot]:
        return [s for s in self.slots if s.batch]

    def in_flight(self) -> int:
        return sum(len(s.batch) - len(s.done) for s in self.slots)

    def assign(self, slot: Slot, jobs: list[Job], now: float, wall: float) -> bool:
        """Hand a batch to an idle worker. False if the worker died meanwhile, or its cursor lock is held (an idle
        worker holds it only if it was stopped or killed inside it: condemned, so it is replaced); nothing is
        taken then."""
        lock = slot.cursor.get_lock()
        if not lock.acquire(timeout=LOCK_WAIT):
            self.condemn(slot, "stalled", "its cursor lock stays held (stopped or killed while holding it)", now)
            return False
        try:
            # -1: no file started yet. 0 blamed the batch's first file for a death before the worker read this
            # hand-off (killed between batches), a file no worker had opened (tests/test_break_ahead.py).
            raw = slot.cursor.get_obj()
            raw[0], raw[1] = -1, len(jobs)
        finally:
            lock.release()
        try:
            slot.conn.send(Assign(tuple(j.name for j in jobs)))
        except OSError:  # BrokenPipeError: it died between the poll and this hand-off
            return False
        for job in jobs:
            job.begin(slot.id, now, wall)
        slot.batch, slot.index, slot.last_progress = list(jobs), 0, now
        return True

    def release(self, slot: Slot) -> tuple[list[Job], int]:
        """Take back its batch: (jobs not yet reported, index of the file it was on, as the worker last wrote it;
        None when the jobs reported ahead make that index meaningless for the rest)."""
        jobs, index = slot.batch, slot.on
        current = jobs[index] if 0 <= index < len(jobs) else None
        left = [j for j in jobs if j.name not in slot.done]
        slot.batch, slot.index, slot.done = [], 0, set()
        return left, (left.index(current) if current in left else len(left))

    def settle(self, slot: Slot, names: list[str]) -> list[Job]:
        """Jobs of its batch reported ahead of the rest (a partial Outcomes): marked done, returned."""
        wanted = set(names) - slot.done
        slot.done |= wanted
        return [j for j in slot.batch if j.name in wanted]

    def steal(self, slot: Slot) -> list[Job]:
        """Take back the back half of the files a busy worker has not started (all if one is left), so an idle
        worker can have them: a slow or stuck file holds up only itself, not the rest of its batch. The lock
        makes the cut exact: the worker checks it before starting each file (worker.run_batch). Nothing is taken
        while the lock stays held (LOCK_WAIT): a worker stopped inside it is found by its missing heartbeats."""
        lock = slot.cursor.get_lock()
        if not lock.acquire(timeout=LOCK_WAIT):
            return []
        try:
            raw = slot.cursor.get_obj()
            started = max(0, raw[0]) + 1  # the first file is never taken: the worker may be starting it
            rest = min(raw[1], len(slot.batch)) - started
            if rest < 1:
                return []
            cut = started + rest // 2
            raw[1] = cut
        finally:
            lock.release()
        taken, slot.batch = slot.batch[cut:], slot.batch[:cut]
        return taken

    def reconfigure(self, settings: Settings) -> None:
        """New routing: every worker restarts once idle (maintain() does it). A slot waiting out its start backoff
        is tried again at once: a reload is the operator's "try now" (the plug-in fixed), not one more wait of up
        to START_BACKOFF_MAX (tests/test_break_round9.py)."""
        self.s = settings
        for slot in self.slots:
            slot.retire = True
            if slot.dead and not slot.ready:
                slot.start_delay, slot.respawn_at = 0.0, 0.0

    def maintain(self, running: bool) -> bool:
        """Replace dead workers and restart idle retiring ones (only while running). True if the fds changed.

        The new worker is spawned before the old one is let go: a spawn that fails (EMFILE, ENOMEM) leaves the
        slot as it was, to be tried again RESPAWN_AFTER later, and never a half-released one."""
        changed = False
        now = self.clock()
        for i, slot in enumerate(self.slots):
            if slot.batch or not (slot.dead or slot.retire):
                continue
            new = None
            if running:
                if now < slot.respawn_at:
                    continue
                try:
                    new = self._spawn(slot.id)
                except Exception as e:  # noqa: BLE001 - the machine's fault (fds, memory): try again later
                    slot.respawn_at = now + RESPAWN_AFTER
                    self.spawn_error = f"{type(e).__name__}: {e}"
                    continue
                self.spawn_error = None
            if slot.retire and not slot.dead:
                self._stop(slot)
            else:
                _close(slot)
            if new is not None:
                if not slot.ready:  # a slot that has not started yet keeps its backoff (reset by a Ready)
                    new.start_delay = slot.start_delay
                self.slots[i] = new
            changed = True
        if changed:
            if not running:
                self.slots = [s for s in self.slots if not (s.dead or s.retire) or s.batch]
            self._index()
        return changed

    # --- supervision ----------------------------------------------------------------------------------
    def stalled(self, now: float, limit: float, time_limit: float) -> list[tuple[Slot, str, str]]:
        """Busy workers with no progress for `limit` seconds, or on one file longer than `time_limit` (0: none);
        and workers not ready `limit` seconds after their spawn (a plug-in hanging at import after a reload: alive,
        never ready, never dead, so nothing else noticed, and files waited for ever: tests/test_break_round9.py)."""
        out = []
        for s in self.slots:
            if s.dead or s.kill_reason is not None:
                continue
            if not s.ready and now - s.spawned > max(limit, START_MIN):
                out.append((s, "stalled", f"it did not start within {max(limit, START_MIN):g}s (stall_time)"))
                continue
            job = s.job
            if job is None:
                continue
            if now - s.last_progress > limit:
                out.append((s, "stalled", f"no progress for {now - s.last_progress:.1f}s (stall_time {limit:g}s)"))
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

    def next_respawn(self) -> float | None:
        # Retiring ones too: a restart after a reload that failed to spawn is retried then, and the idle loop has
        # no other timer for it (it waited for the rescan: tests/test_break_hotpath.py).
        times = [s.respawn_at for s in self.slots if (s.dead or s.retire) and not s.batch]
        return min(times) if times else None

    def next_kill(self) -> float | None:
        times = [s.kill_at for s in self.slots if s.kill_at is not None]
        return min(times) if times else None

    # --- looking ---------------------------------------------------------------------------------------
    def view(self, now: float) -> list[dict[str, Any]]:
        return [{"worker": s.id, "file": display(s.job.name) if s.job else None,
                 "since": s.job.started_wall if s.job else None, "bytes": s.job.bytes if s.job else 0,
                 "size": s.job.size if s.job else 0,
                 "silent_for": round(now - s.last_progress, 1) if s.job else None,
                 "batch": len(s.batch), "stuck": s.kill_reason} for s in self.slots]

    # --- ending -------------------------------------------------------------------------------------
    def abandon(self) -> list[tuple[Job, int | None]]:
        """Kill every busy worker now; returns (job, worker pid) for each job it held. Idle workers stop cleanly."""
        left = []
        for slot in self.slots:
            if slot.batch:
                left += [(job, slot.pid) for job in slot.batch if job.name not in slot.done]
                slot.process.kill()
                slot.batch = []
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
        if slot.closed:
            return
        if not slot.ready:
            slot.process.kill()  # still importing: it holds no file and would read Stop only when ready
        try:
            slot.conn.send(Stop())
        except OSError:
            pass
        slot.process.join(timeout=2)
        if slot.process.is_alive():
            slot.process.kill()
            slot.process.join()
        _close(slot)


class StartInterrupted(Exception):
    """Pool.start() gave up waiting for the workers' Ready: a stop signal came (the daemon stops, nothing started)."""


def _cannot_start(slot: Slot) -> ConfigError:
    """The error that ends the daemon's start when a worker cannot start: 75 (temporary), naming its error."""
    err = ConfigError(f"worker {slot.id} could not start: {slot.start_error or _exit_reason(slot.process)}")
    err.temporary = True  # the daemon built this routing itself: a restart, later, may meet a worker that can
    return err


def _exit_reason(process: BaseProcess) -> str:
    """How a worker that said nothing ended: "it exited at start with code 1", "it was killed at start by SIGKILL"."""
    code = process.exitcode
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"it was killed at start by {signal.Signals(-code).name}"
    return f"it exited at start with code {code}"


def _close(slot: Slot) -> None:
    """Release the pipe and the process handle, once (a second call does nothing)."""
    if slot.closed:
        return
    slot.closed = True
    slot.conn.close()
    if slot.process.exitcode is not None:
        slot.process.close()  # releases its sentinel fd
