"""A worker killed (or stopped) while it holds its cursor lock must never block the parent.

Each worker shares a cursor, [file it is on, index to stop before], with the parent, guarded by a
multiprocessing lock: a POSIX semaphore, which a holder's death does not release (sem_overview(7)). Found: the
parent took that lock with a blocking acquire when it handed out a batch (Pool.assign) and when it took back
unstarted files for an idle worker (Pool.steal), so a worker killed by the OOM killer, or stopped by SIGSTOP,
in the microseconds it holds the lock (once per file) blocked the daemon's main loop for ever: no claims, no
watchdog pings, no status page updates. Here the lock is held by a real process that is then killed with
SIGKILL, as the worker would be; the daemon's loop runs in process (test_daemon_loop.py), with real workers.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from support import HANG_ROUTING
from test_daemon_loop import Loop, loop  # noqa: F401 (fixture)

from ingestd.workers import KILL_GRACE, LOCK_WAIT

_ctx = multiprocessing.get_context("spawn")


def _hold(cursor: Any, held: Any) -> None:
    cursor.get_lock().acquire()
    held.set()
    time.sleep(3600)


def kill_holding(cursor: Any) -> None:
    """A process takes the cursor's lock and dies with it (SIGKILL): the lock stays taken for good."""
    held = _ctx.Event()
    p = _ctx.Process(target=_hold, args=(cursor, held), daemon=True)
    p.start()
    assert held.wait(30), "the holder did not take the lock"
    os.kill(p.pid, signal.SIGKILL)  # type: ignore[arg-type]
    p.join(10)


class Wedged(BaseException):
    """Not an Exception: the daemon's failure boundaries must not catch it."""


def stuck_with_its_lock_held(lp: Loop) -> Any:
    """A worker hung on stuck.txt (HANG_ROUTING), then its cursor lock taken by a process killed holding it."""
    pool = lp.d.pool
    assert pool is not None
    lp.drop("stuck.txt", b"HANG\n")
    lp.until(lambda: pool.busy() and pool.busy()[0].on == 0, what="a worker on its file")
    slot = pool.busy()[0]
    kill_holding(slot.cursor)
    return slot


@pytest.fixture
def deadline() -> Iterator[None]:
    """A blocked semaphore wait ends in an exception after 20 s (SIGALRM), so a wedge fails the test instead of
    hanging it: CPython runs signal handlers when sem_wait is interrupted."""

    def _alarm(signum: int, frame: Any) -> None:
        raise Wedged("the parent is blocked (20 s)")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(20)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_an_idle_worker_dead_with_its_lock_is_replaced_and_the_file_processed(loop, deadline) -> None:  # noqa: F811
    lp: Loop = loop(workers=1, stall_time=60)
    d = lp.d
    assert d.pool is not None
    slot = d.pool.slots[0]
    kill_holding(slot.cursor)
    lp.drop("a.txt", b"hello\n")
    lp.until(lambda: slot.kill_reason is not None, what="the worker condemned: its lock stays held")
    lp.clock.advance(KILL_GRACE + 0.1)
    lp.until(lambda: lp.result("a.txt"), what="a.txt processed by the replacement worker")
    assert lp.result("a.txt") == b"HELLO\n"
    assert d.pool.slots[0] is not slot


def test_taking_back_files_from_a_worker_whose_lock_is_held_gives_nothing_at_once(
        loop, deadline) -> None:  # noqa: F811
    lp: Loop = loop(config=HANG_ROUTING, workers=1, stall_time=60)
    d = lp.d
    slot = stuck_with_its_lock_held(lp)
    started = time.monotonic()
    assert d.pool.steal(slot) == []
    assert time.monotonic() - started < LOCK_WAIT + 0.5
    # The stall is found, the worker killed; its file is blamed, as for any stuck worker. The clock moves on at
    # each turn: a heartbeat still showing the file's first bytes read counts as progress once.
    lp.until(lambda: lp.clock.advance(61) or slot.dead, what="the stuck worker killed")


def test_the_other_worker_and_the_status_view_go_on_while_a_lock_stays_held(
        loop, deadline) -> None:  # noqa: F811
    """The wider kind: every reader of a worker's cursor in the parent (the file it is on, for /api/status and the
    status page; the choice of whom to take files back from) reads it without the lock."""
    lp: Loop = loop(config=HANG_ROUTING, workers=2, stall_time=60)
    d = lp.d
    stuck = stuck_with_its_lock_held(lp)
    for i in range(20):
        lp.drop(f"f{i}.txt", b"x%d\n" % i)
    lp.until(lambda: all(lp.result(f"f{i}.txt") == b"X%d\n" % i for i in range(20)), what="the rest by the other")
    d._publish_view()
    view = d.pool.view(d.clock())
    assert [w["file"] for w in view if w["worker"] == stuck.id] == ["stuck.txt"], view
