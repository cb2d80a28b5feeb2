"""Breaking the claim-ahead change of issue 10 (e77dc02, 61cbacc): files claimed ahead for busy workers.

The daemon in process, as in test_daemon_loop.py (its main loop turned by the test, an injected clock, real
workers, real inotify).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from support import HANG_ROUTING, folder
from test_daemon_loop import SLOW_ROUTING, Loop, events, loop  # noqa: F401 (fixtures)


def hung(lp: Loop) -> None:
    """Every worker blocks on a file of its own (HANG): every file dropped afterwards is claimed ahead."""
    for i in range(lp.d.s.workers):
        lp.drop(f"{i}-stuck.txt", b"HANG\n")
        lp.until(lambda: sum(s.cursor[0] == 0 for s in lp.d.pool.busy()) > i, what=f"{i + 1} workers on their file")


def unstick(lp: Loop, stall_time: float) -> None:
    """The parent finds the worker stuck and kills it; its replacement takes the files claimed ahead."""
    lp.clock.advance(stall_time + 1)


def outputs(lp: Loop, name: str) -> list[str]:
    return sorted(n for n in folder(lp.w, "processed") if n == name or n.startswith(name + ".superseded-"))


@pytest.mark.parametrize("workers", [1, 2])
def test_a_name_claimed_again_after_its_claimed_ahead_file_was_removed_by_hand_is_processed_once(loop, events,
                                                                                               workers) -> None:
    """a.txt claimed ahead; someone removes it from underprocess/ by hand; a new a.txt arrives and is claimed
    (nothing of that name is in flight any more). The queue then held two jobs named a.txt, and the stale one's
    check (the name exists in underprocess/) passed on the new file: both went to the worker in one batch."""
    lp = loop(config=HANG_ROUTING, stall_time=60, max_attempts=1, workers=workers)
    d = lp.d
    hung(lp)
    lp.drop("a.txt", b"one\n")
    lp.until(lambda: len(d.queue) == 1, what="a.txt claimed ahead")
    os.unlink(lp.w / "underprocess" / "a.txt")
    lp.drop("a.txt", b"two\n")
    lp.until(lambda: (lp.w / "underprocess" / "a.txt").exists() and not d.arrivals.ready, what="the new a.txt claimed")
    assert [j.name for j in d.queue] == ["a.txt"], "one job for the one a.txt in underprocess/"
    unstick(lp, 60)
    lp.until(lambda: lp.result("a.txt") and not (lp.w / "underprocess" / "a.txt").exists() and not d.unacked,
             what="a.txt done")
    assert outputs(lp, "a.txt") == ["a.txt"], "one input, one result"
    assert lp.result("a.txt") == b"TWO\n"
    assert [e.file for e in events("processed")].count("a.txt") == 1
    # The two jobs went to the worker in one batch: both wrote the same temp name, the second publish found
    # none, and the log said an output folder was missing (none was); the file was then done a second time.
    assert not events("folders_recreated") and not events("io_error") and not events("internal_error")


def test_an_unexpected_error_handing_over_files_claimed_ahead_loses_none_of_them(loop, events) -> None:
    """The failure boundary around a dispatch: an exception in the hand-off (here Pool.assign, once) left the jobs
    it had taken from the queue in no one's hands: never processed until a restart, not returned by a stop, and
    not counted on the page (underprocess 3 files, the page said 0)."""
    lp = loop(config=HANG_ROUTING, stall_time=60, max_attempts=1)
    d = lp.d
    hung(lp)
    names = [f"{i}-ahead.txt" for i in range(3)]
    for name in names:
        lp.drop(name, b"ahead\n")
    lp.until(lambda: len(d.queue) == 3, what="three claimed ahead")
    real = d.pool.assign
    calls = []

    def assign(*args):  # type: ignore[no-untyped-def]
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("injected: the hand-off failed")
        return real(*args)

    d.pool.assign = assign  # type: ignore[method-assign]
    unstick(lp, 60)
    lp.until(lambda: calls, what="a hand-off to the replacement worker")
    assert events("internal_error"), "the boundary caught it"
    d._publish_view()
    assert d.snapshot()["counts"]["underprocess"] == len(folder(lp.w, "underprocess")), "the page counts them"
    lp.until(lambda: all(lp.result(n) for n in names), timeout=20, what="every file claimed ahead")
    assert [lp.result(n) for n in names] == [b"AHEAD\n"] * 3
    assert not folder(lp.w, "underprocess")


def test_a_worker_killed_between_batches_charges_no_attempt_to_the_batch_it_never_started(loop, events) -> None:
    """The worker reports its batch and is handed the files claimed ahead at once; it is killed (kill -9, the OOM
    killer) before it reads that hand-off. Its cursor said file 0 of the new batch from the moment of the
    hand-off, so the death blamed that file, which no worker had opened: an attempt, and with max_attempts = 1
    an innocent file set aside as poison."""
    lp = loop(config=SLOW_ROUTING, max_attempts=1)
    d = lp.d
    lp.drop("0-busy.txt", b"abc\n" * 300)  # ~0.6 s of slow work
    lp.until(lambda: d.pool.busy(), what="the only worker busy")
    names = [f"{i}-ahead.txt" for i in range(3)]
    for name in names:
        lp.drop(name, b"ahead\n")
    lp.until(lambda: len(d.queue) == 3, what="three claimed ahead")
    real = d.pool.assign
    killed: list[int] = []

    def assign(slot, jobs, *args):  # type: ignore[no-untyped-def]
        if killed:
            return real(slot, jobs, *args)
        os.kill(slot.pid, signal.SIGSTOP)  # between its batches: it has not read the hand-off
        ok = real(slot, jobs, *args)
        os.kill(slot.pid, signal.SIGKILL)
        killed.append(slot.pid)
        return ok

    d.pool.assign = assign  # type: ignore[method-assign]
    lp.until(lambda: events("worker_died"), what="the worker's death")
    lp.until(lambda: all(lp.result(n) for n in names), timeout=20, what="every file claimed ahead")
    assert not folder(lp.w, "failed")
    assert [e.file for e in events("worker_died")] == [None], "no file was blamed"
    assert all(d.spool.attempts(n) == 0 for n in names)
