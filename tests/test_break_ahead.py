"""Breaking the claim-ahead change of issue 10 (e77dc02, 61cbacc): files claimed ahead for busy workers.

The daemon in process, as in test_daemon_loop.py (its main loop turned by the test, an injected clock, real
workers, real inotify).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from support import HANG_ROUTING, folder
from test_daemon import start  # noqa: F401 (fixture)
from test_daemon_loop import (  # noqa: F401 (fixtures)
    SLOW_ROUTING,
    Loop,
    assert_nothing_claimed_ahead,
    events,
    loop,
)


def hung(lp: Loop) -> None:
    """Every worker blocks on a file of its own (HANG): every file dropped afterwards is claimed ahead."""
    for i in range(lp.d.s.workers):
        lp.drop(f"{i}-stuck.txt", b"HANG\n")
        lp.until(lambda n=i + 1: sum(s.on == 0 for s in lp.d.pool.busy()) >= n,  # type: ignore[misc]
                 what=f"{i + 1} workers on their file")


def unstick(lp: Loop, stall_time: float) -> None:
    """The parent finds the worker stuck and kills it; its replacement takes the files claimed ahead."""
    lp.clock.advance(stall_time + 1)


def outputs(lp: Loop, name: str) -> list[str]:
    return sorted(n for n in folder(lp.w, "processed") if n == name or n.startswith(name + ".superseded-"))


@pytest.mark.parametrize("workers", [1, 2])
def test_a_name_claimed_again_after_its_claimed_ahead_file_was_removed_by_hand_is_processed_once(
        loop, events, workers: int) -> None:  # noqa: F811
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


def test_an_unexpected_error_handing_over_files_claimed_ahead_loses_none_of_them(loop, events) -> None:  # noqa: F811
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


def test_a_worker_killed_between_batches_charges_no_attempt_to_the_batch_it_never_started(loop, events) -> None:  # noqa: F811
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


def test_files_claimed_ahead_before_a_reload_are_processed_with_the_new_routing(loop, events,  # noqa: F811
                                                                                 tmp_path: Path) -> None:
    """SIGHUP while the worker is busy and files are claimed ahead: the worker retires when it reports, so the
    early hand-off must not give it the next batch (old routing); its replacement takes them."""
    from ingestd import settings as settings_mod

    reverse = tmp_path / "reverse.toml"
    reverse.write_text('[[filters]]\nmatch = "*"\nprocessor = "reverse"\n')
    new = settings_mod.load({"watch_dir": str(tmp_path / "w"), "config": str(reverse)}, environ={}, cwd=tmp_path)
    lp = loop(config=SLOW_ROUTING, reload=lambda: new)
    d = lp.d
    lp.drop("0-busy.txt", b"abc\n" * 300)  # ~0.6 s of slow work
    lp.until(lambda: d.pool.busy(), what="the only worker busy")
    lp.drop("1-ahead.txt", b"abc\n")
    lp.until(lambda: len(d.queue) == 1, what="1-ahead.txt claimed ahead")
    d._on_signal(signal.SIGHUP, None)
    lp.until(lambda: lp.result("1-ahead.txt"), timeout=20, what="1-ahead.txt done")
    assert lp.result("0-busy.txt") == b"ABC\n" * 300
    assert lp.result("1-ahead.txt") == b"cba\n", "claimed ahead, but started after the reload"
    assert not events("internal_error")


def test_a_stop_gives_a_file_claimed_ahead_its_done_marker_back(loop, events) -> None:  # noqa: F811
    lp = loop(config=HANG_ROUTING, stall_time=60, done_marker=True)
    d = lp.d
    lp.drop("0-stuck.txt", b"HANG\n")
    lp.drop("0-stuck.txt.done", b"")
    lp.until(lambda: d.pool.busy(), what="the only worker busy")
    lp.drop("a.txt", b"a\n")
    lp.drop("a.txt.done", b"")
    lp.until(lambda: len(d.queue) == 1, what="a.txt claimed ahead")
    assert folder(lp.w, "unprocessed") == []
    d.shutdown()
    assert folder(lp.w, "unprocessed") == ["0-stuck.txt", "0-stuck.txt.done", "a.txt", "a.txt.done"]
    assert not folder(lp.w, "underprocess")


def test_a_stop_returns_a_file_claimed_ahead_from_a_folder_removed_meanwhile(loop, events) -> None:  # noqa: F811
    """Recursive mode: sub/a.txt claimed ahead empties unprocessed/sub/, which is removed after settle_time; a stop
    then gives sub/a.txt back into a folder made again."""
    lp = loop(config=HANG_ROUTING, stall_time=600, recursive=True)
    d = lp.d
    hung(lp)
    (lp.w / "unprocessed" / "sub").mkdir()
    lp.drop("sub/a.txt", b"a\n")
    lp.until(lambda: len(d.queue) == 1, what="sub/a.txt claimed ahead")
    lp.clock.advance(5)
    lp.until(lambda: not (lp.w / "unprocessed" / "sub").exists(), what="the emptied folder removed")
    d.shutdown()
    assert (lp.w / "unprocessed" / "sub" / "a.txt").read_bytes() == b"a\n"
    assert folder(lp.w, "underprocess") == []


def test_a_stop_that_cannot_return_a_file_claimed_ahead_says_so_and_the_next_start_keeps_the_order(
        loop, events) -> None:  # noqa: F811
    """a.txt claimed ahead, then a newer a.txt arrives (it waits: the name is in flight). A stop cannot give the
    older one back (never over a newer file): it stayed in underprocess/ without a word, listed by `ingestd status`
    as in progress with no daemon running. Now said; the next start processes the older first, then the newer."""
    lp = loop(config=HANG_ROUTING, stall_time=60)
    d = lp.d
    hung(lp)
    lp.drop("a.txt", b"older\n")
    lp.until(lambda: len(d.queue) == 1, what="a.txt claimed ahead")
    lp.drop("a.txt", b"newer\n")
    lp.until(lambda: (lp.w / "unprocessed" / "a.txt").exists(), what="the newer a.txt waiting")
    d.shutdown()
    assert [e.file for e in events("kept_claimed")] == ["a.txt"]
    assert folder(lp.w, "underprocess") == ["a.txt"] and "a.txt" in folder(lp.w, "unprocessed")
    os.unlink(lp.w / "unprocessed" / "0-stuck.txt")
    lp2 = loop()
    lp2.until(lambda: len(events("processed")) == 2, timeout=20, what="both a.txt processed")
    assert lp2.result("a.txt") == b"NEWER\n"
    kept = [n for n in folder(lp2.w, "processed") if n.startswith("a.txt.superseded-")]
    assert len(kept) == 1 and (lp2.w / "processed" / kept[0]).read_bytes() == b"OLDER\n"
    assert d.spool.attempts("a.txt") == 0


def test_without_trustworthy_inflight_records_nothing_is_claimed_ahead(start, tmp_path: Path) -> None:  # noqa: F811
    """.ingestd/inflight cannot be written (a full disk at start; here a folder in its place): a crash counts an
    attempt for every file in underprocess/, the safe side (docs/queue.md). Files claimed ahead were then charged
    for a crash no worker of theirs was in: with max_attempts = 1, three files no worker had opened went to
    failed/ as poison. Before claim-ahead they waited in unprocessed/, uncharged; so they must again."""
    from support import wait_for

    cfg = tmp_path / "hang.toml"
    cfg.write_text(HANG_ROUTING)
    w = tmp_path / "w"
    (w / ".ingestd" / "inflight").mkdir(parents=True)
    d = start("--config", str(cfg), "--workers", "1", env={"INGESTD_STALL_TIME": "60", "INGESTD_MAX_ATTEMPTS": "1"})
    assert d.event("io_error"), "the start says a crash will count every claimed file"
    (w / "unprocessed" / "stuck.txt").write_bytes(b"HANG\n")
    wait_for(lambda: folder(w, "underprocess") == ["stuck.txt"], what="stuck.txt claimed")
    ahead = [f"ahead-{i}.txt" for i in range(3)]
    for name in ahead:
        (w / "unprocessed" / name).write_bytes(b"ahead\n")
    wait_for(lambda: d.status()["counts"]["unprocessed"] == 3 or len(folder(w, "underprocess")) == 4,
             what="the three seen")
    time.sleep(1.0)  # turns enough for a claim ahead (settle_time 0.3 s)
    d.kill()  # SIGKILL; its worker follows it
    d2 = start("--workers", "1", env={"INGESTD_MAX_ATTEMPTS": "1"})
    wait_for(lambda: all((w / "processed" / n).exists() or (w / "failed" / n).exists() for n in ahead),
             timeout=15, what="the three done, one way or the other")
    assert folder(w, "failed") == ["stuck.txt"], "only the file a worker was on is charged"
    assert all((w / "processed" / n).read_bytes() == b"AHEAD\n" for n in ahead)
    assert d2.count("failed") == 1


def test_a_worker_that_cannot_keep_its_inflight_record_stops_claiming_ahead(loop) -> None:  # noqa: F811
    """The same safe side for one worker: a respawned worker that cannot open its record (its Ready says so) makes
    a crash count every claimed file, so from then on nothing is claimed ahead for it to be charged."""
    lp = loop(config=HANG_ROUTING, stall_time=60)
    d = lp.d
    record = lp.w / ".ingestd" / "inflight"
    record.unlink()
    record.mkdir()  # the next worker's open(O_WRONLY) fails: EISDIR
    old = d.pool.slots[0]
    old.process.kill()
    lp.until(lambda: d.pool.slots[0] is not old and d.pool.slots[0].ready, what="a new worker")
    assert not d.pool.records_ok
    hung(lp)
    assert_nothing_claimed_ahead(lp, ["0-stuck.txt"])
