"""The daemon in process: its main loop turned by the test, with an injected clock, real workers, real inotify.

Signal handlers are called directly (as uvicorn's tests do); time that matters to a decision (stalls,
backoff) is moved by the test, so nothing here sleeps to make a point.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ingestd import settings as settings_mod
from ingestd.daemon import MAX_INTERNAL_ERRORS, Daemon
from support import HANG_ROUTING, folder, plugin

SLOW_ROUTING = '[[filters]]\nmatch = "*"\nprocessor = "slow"\nseconds = 0.002\n'


class Clock:
    """A monotonic clock the test moves; it also follows real time, so poll() timeouts stay sane."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


class Loop:
    def __init__(self, d: Daemon, clock: Clock) -> None:
        self.d, self.clock = d, clock
        self.w = Path(d.spool.root)

    def until(self, predicate: Callable[[], Any], timeout: float = 15.0, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            assert self.d.main_loop_once(), "the loop ended"
            if value := predicate():
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")

    def drop(self, name: str, data: bytes) -> None:
        (self.w / "unprocessed" / name).write_bytes(data)

    def result(self, name: str) -> bytes | None:
        p = self.w / "processed" / name
        return p.read_bytes() if p.exists() else None


@pytest.fixture
def events(caplog: pytest.LogCaptureFixture) -> Callable[[str], list[logging.LogRecord]]:
    caplog.set_level(logging.INFO, logger="ingestd")
    return lambda name: [r for r in caplog.records if getattr(r, "event", None) == name]


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[Callable[..., Loop]]:
    made: list[Daemon] = []

    def make(config: str | None = None, reload: Callable[[], settings_mod.Settings] | None = None,
             **flags: Any) -> Loop:
        if config is not None:
            (tmp_path / "routing.toml").write_text(config)
            flags["config"] = str(tmp_path / "routing.toml")
        s = settings_mod.load({"watch_dir": str(tmp_path / "w"), "listen": "127.0.0.1:0", "workers": 1,
                               "settle_time": 0.05, "folder_quiet_time": 0.05, **flags}, environ={}, cwd=tmp_path)
        clock = Clock()
        d = Daemon(s, reload=reload, clock=clock)
        made.append(d)
        d.startup()
        return Loop(d, clock)

    yield make
    for d in made:
        d.shutdown()
    assert not multiprocessing.active_children(), "a worker outlived its daemon"


def test_sighup_while_a_worker_is_busy_reloads_after_its_file(loop, tmp_path: Path, events) -> None:
    reverse = tmp_path / "reverse.toml"
    reverse.write_text('[[filters]]\nmatch = "*"\nprocessor = "reverse"\n')
    new = settings_mod.load({"watch_dir": str(tmp_path / "w"), "config": str(reverse)}, environ={}, cwd=tmp_path)
    lp = loop(config=SLOW_ROUTING, reload=lambda: new)
    lp.drop("busy.txt", b"abc\n" * 300)  # ~0.6 s of slow work
    lp.until(lambda: lp.d.pool.busy(), what="a busy worker")
    lp.d._on_signal(signal.SIGHUP, None)
    lp.until(lambda: lp.result("busy.txt"), what="busy.txt done")
    assert lp.result("busy.txt") == b"ABC\n" * 300, "the file in hand finishes with the routing it started with"
    assert events("reloaded")
    lp.drop("after.txt", b"abc\n")
    lp.until(lambda: lp.result("after.txt"), what="after.txt done")
    assert lp.result("after.txt") == b"cba\n", "the new routing applies to the next file"
    assert not events("internal_error") and not events("worker_died")


def test_a_worker_that_dies_before_the_hand_off_costs_the_file_nothing(loop, events) -> None:
    lp = loop()
    d = lp.d
    lp.until(lambda: d.pool.idle(), what="an idle worker")
    slot = d.pool.idle()[0]
    slot.process.kill()  # dies between the poll and the hand-off: the parent has not read its sentinel yet
    while slot.process.is_alive():
        time.sleep(0.01)
    lp.drop("x.txt", b"x\n")
    time.sleep(0.2)
    lp.clock.advance(5)  # past any grace or quiet time
    d._on_watch(lp.clock())
    d.arrivals.tick(lp.clock(), d._stat)
    d._dispatch(lp.clock())  # the send hits a dead pipe
    assert not d.pool.busy(), "nothing was handed to the dead worker"
    lp.until(lambda: lp.result("x.txt"), what="x.txt done by the replacement worker")
    assert lp.result("x.txt") == b"X\n"
    assert d.spool.attempts("x.txt") == 0 and not folder(lp.w, "failed")
    assert not events("internal_error")


def test_a_stuck_worker_is_killed_replaced_and_counted_by_the_parent(loop, events) -> None:
    lp = loop(config=HANG_ROUTING, max_attempts=1, stall_time=30)
    d = lp.d
    lp.drop("stuck.txt", b"fine\nHANG\n")
    lp.until(lambda: d.pool.busy(), what="a busy worker")
    lp.until(lambda: d.pool.busy()[0].job.bytes == 10, what="both lines read")  # heartbeats carry progress
    t0 = time.monotonic()
    lp.until(lambda: time.monotonic() - t0 > 0.6)  # heartbeats keep coming, with no progress in them
    lp.clock.advance(31)
    lp.until(lambda: events("worker_stuck"), what="worker_stuck")
    assert d.health() is None, "a stuck worker is the loop's business, not the watchdog's"
    assert any(w["stuck"] for w in d.snapshot()["workers"]), "shown on the page and in /api/status"
    lp.clock.advance(1)
    lp.until(lambda: folder(lp.w, "failed") == ["stuck.txt"], what="stuck.txt set aside")
    failure = d.spool.failures(5)[0]
    assert "stuck 1 times" in failure["reason"] and "no progress" in failure["reason"]
    lp.drop("next.txt", b"next\n")
    lp.until(lambda: lp.result("next.txt"), what="a new worker takes the next file")


def test_time_limit_kills_a_worker_that_is_busy_too_long(loop, events) -> None:
    lp = loop(config=SLOW_ROUTING, max_attempts=1, time_limit=5)
    d = lp.d
    lp.drop("long.txt", b"x\n" * 5000)  # ~10 s of slow but steady work
    lp.until(lambda: d.pool.busy(), what="a busy worker")
    lp.clock.advance(6)
    lp.until(lambda: folder(lp.w, "failed") == ["long.txt"], what="long.txt set aside")
    assert "time limit" in d.spool.failures(5)[0]["reason"]


def test_an_unexpected_exception_costs_one_file_a_retry_never_the_daemon(loop, events, monkeypatch) -> None:
    lp = loop()
    d = lp.d
    real_commit = d.spool.commit
    calls = []

    def commit_once_broken(name: str, **kw: bool) -> None:
        calls.append(name)
        if len(calls) == 1:
            raise RuntimeError("a bug in the commit path")
        real_commit(name, **kw)

    monkeypatch.setattr(d.spool, "commit", commit_once_broken)
    lp.drop("a.txt", b"a\n")
    lp.until(lambda: events("internal_error"), what="internal_error")
    err = events("internal_error")[0]
    assert "RuntimeError: a bug in the commit path" in err.error and "Traceback" in err.traceback
    assert err.file == "a.txt"
    lp.clock.advance(10)  # past the file's backoff
    lp.until(lambda: lp.result("a.txt"), what="a.txt retried and done")
    lp.until(lambda: not folder(lp.w, "underprocess"), what="a.txt committed")
    assert lp.result("a.txt") == b"A\n" and len(events("processed")) == 1


def test_a_file_that_always_breaks_the_daemon_is_set_aside(loop, events, monkeypatch) -> None:
    lp = loop()
    d = lp.d
    real_commit = d.spool.commit

    def commit(name: str, **kw: bool) -> None:
        if name == "bad.txt":
            raise KeyError("always")
        real_commit(name, **kw)

    monkeypatch.setattr(d.spool, "commit", commit)
    lp.drop("bad.txt", b"bad\n")
    for _ in range(MAX_INTERNAL_ERRORS):
        lp.until(lambda n=len(events("internal_error")): len(events("internal_error")) > n, what="an internal error")
        lp.clock.advance(60)
    lp.until(lambda: folder(lp.w, "failed") == ["bad.txt"], what="bad.txt set aside")
    assert "internal error" in d.spool.failures(5)[0]["reason"]
    lp.drop("good.txt", b"good\n")
    lp.until(lambda: lp.result("good.txt"), what="the queue goes on")


def test_a_stop_takes_an_outcome_already_sent_instead_of_redoing_the_file(loop, events) -> None:
    lp = loop()
    d = lp.d
    lp.drop("sent.txt", b"sent\n")
    slot = lp.until(lambda: d.pool.busy() and d.pool.busy()[0], what="sent.txt handed out")
    assert slot.conn.poll(10), "the worker reports"
    d.shutdown()  # the outcome sits unread in the pipe
    assert folder(lp.w, "unprocessed") == [] and folder(lp.w, "underprocess") == []
    assert lp.result("sent.txt") == b"SENT\n" and len(events("processed")) == 1
    assert not events("abandoned")


def test_the_main_loop_sleeps_when_all_workers_are_busy(loop) -> None:
    """Files waiting, every worker busy: the parent must block in poll(), not spin (issue 8, kind 5)."""
    lp = loop(config=HANG_ROUTING)
    d = lp.d
    lp.drop("stuck.txt", b"HANG\n")
    lp.until(lambda: d.pool.busy(), what="the only worker busy")
    for i in range(20):
        lp.drop(f"wait-{i}.txt", b"w\n")
    cpu0, t0, turns = time.process_time(), time.monotonic(), 0
    while time.monotonic() - t0 < 1.5:
        d.main_loop_once()
        turns += 1
    cpu = time.process_time() - cpu0
    assert cpu < 0.3, f"{cpu:.2f}s of CPU in 1.5s with all workers busy ({turns} turns)"
    assert len(d.arrivals) + len(d.queue) == 20  # waiting, or claimed ahead for the busy worker


def test_a_port_in_use_fails_the_start_and_leaves_nothing_running(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        st = settings_mod.load({"watch_dir": str(tmp_path / "w"), "listen": f"127.0.0.1:{port}", "workers": 2},
                               environ={}, cwd=tmp_path)
        d = Daemon(st)
        with pytest.raises(settings_mod.ConfigError, match="cannot listen"):
            d.run()
    assert not multiprocessing.active_children()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))
    assert os.path.isdir(tmp_path / "w" / "unprocessed")


def test_recent_completions_survive_a_restart_and_recovered_files_are_marked(tmp_path: Path, loop) -> None:
    lp = loop()
    lp.drop("one.txt", b"1\n")
    lp.until(lambda: lp.d.snapshot()["recent"], what="one.txt in recent")
    lp.d.shutdown()
    (lp.w / "underprocess" / "crashed.txt").write_bytes(b"c\n")  # left in progress by a crash
    lp2 = loop()
    lp2.until(lambda: len(lp2.d.snapshot()["recent"]) == 2, what="the history and the recovered file")
    recent = lp2.d.snapshot()["recent"]
    assert [r["file"] for r in recent] == ["crashed.txt", "one.txt"]
    assert recent[0]["recovered"] is True and recent[1]["recovered"] is False
    assert recent[0]["seq"] > recent[1]["seq"], "the sequence goes on across restarts"


# --- found by the break-it review of issue 8's changes -------------------------------------------------------------
def test_a_worker_that_cannot_be_respawned_is_retried_without_wedging_the_loop(loop, events) -> None:
    """EMFILE while replacing a dead worker (a real RLIMIT_NOFILE, not a mock): no internal_error flood, no spin,
    /healthz names the cause while no worker runs, and the worker comes back once fds are free."""
    import resource

    lp = loop()
    d = lp.d
    lp.until(lambda: d.pool.idle(), what="an idle worker")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    slot = d.pool.slots[0]
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")), hard))
    try:
        slot.process.kill()
        cpu0, t0 = time.process_time(), time.monotonic()
        while time.monotonic() - t0 < 1.5:
            d.main_loop_once()
        cpu = time.process_time() - cpu0
        health = d.health()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert cpu < 0.5, f"{cpu:.2f}s of CPU in 1.5 s while the respawn failed"
    assert not events("internal_error")
    assert health is not None and "no worker is running" in health and "Too many open files" in health
    lp.drop("after.txt", b"after\n")
    lp.until(lambda: lp.result("after.txt"), what="a new worker processes after.txt")
    assert d.health() is None


def test_a_condemned_worker_that_finishes_in_its_grace_is_reprieved_and_the_next_file_is_not_blamed(loop,
                                                                                                     events) -> None:
    lp = loop(config=SLOW_ROUTING, time_limit=5, max_attempts=1)
    d = lp.d
    lp.drop("a.txt", b"x\n" * 100)  # ~0.2 s of slow work
    lp.until(lambda: d.pool.busy(), what="a.txt handed out")
    lp.clock.advance(6)  # over the time limit: condemned, the kill 0.5 s later (after the stack dump)
    lp.until(lambda: lp.result("a.txt"), what="a.txt done within its grace")
    lp.drop("b.txt", b"y\n" * 100)
    lp.until(lambda: lp.result("b.txt"), what="b.txt done")
    lp.until(lambda: not folder(lp.w, "underprocess"), what="both committed")
    assert events("worker_reprieved") and not events("worker_killed")
    assert not folder(lp.w, "failed")


def test_an_expired_io_error_pause_neither_spins_nor_stays_shown(loop) -> None:
    # rescan_interval (its minimum, 1 s) bounds the idle loop's wait: with the default an idle turn waits up to
    # 30 s, and the one-second watch below lasted that long. The spin this guards is poll() returning at once.
    lp = loop(rescan_interval=1)
    d = lp.d
    d.state.back_off("Input/output error (EIO)")  # as after a failed claim: paused for 1 s
    lp.clock.advance(2)
    cpu0, t0 = time.process_time(), time.monotonic()
    while time.monotonic() - t0 < 1.0:
        d.main_loop_once()
    assert time.process_time() - cpu0 < 0.3
    assert d.state.pause is None and d.snapshot()["paused"] is None


def test_a_fifo_where_the_history_should_be_does_not_hang_the_start(tmp_path: Path, loop) -> None:
    state = tmp_path / "w" / ".ingestd"
    state.mkdir(parents=True)
    os.mkfifo(state / "recent.json")
    lp = loop()  # startup() returns: the FIFO is not opened for reading (O_NONBLOCK, regular files only)
    lp.drop("a.txt", b"a\n")
    lp.until(lambda: lp.result("a.txt"), what="a.txt processed")


def test_an_immutable_file_waits_alone_and_does_not_pause_the_queue(loop, events) -> None:
    import subprocess as sp

    lp = loop()
    evil = lp.w / "unprocessed" / "evil.txt"
    evil.write_bytes(b"evil\n")
    if sp.run(["chattr", "+i", str(evil)], capture_output=True).returncode != 0:
        evil.unlink()
        pytest.skip("chattr +i is not supported on this file system (or not root)")
    try:
        lp.until(lambda: [e for e in events("io_error") if e.file == "evil.txt"], what="the EPERM logged once")
        lp.drop("good.txt", b"good\n")
        t0 = time.monotonic()
        lp.until(lambda: lp.result("good.txt"), what="good.txt processed")
        assert time.monotonic() - t0 < 2, "the queue did not wait for the immutable file"
        assert not events("paused"), "claiming was never paused for one file"
    finally:
        sp.run(["chattr", "-i", str(evil)], check=False)
    lp.clock.advance(60)  # past its own backoff: claimed now that it can be moved
    lp.until(lambda: lp.result("evil.txt"), what="evil.txt processed once movable")


def test_a_sighup_storm_does_not_stop_the_queue(loop, tmp_path: Path) -> None:
    new = settings_mod.load({"watch_dir": str(tmp_path / "w")}, environ={}, cwd=tmp_path)
    lp = loop(reload=lambda: new, workers=2)
    for i in range(20):
        lp.drop(f"f{i}.txt", b"f\n")
    t0 = time.monotonic()
    while time.monotonic() - t0 < 2.0:
        lp.d._on_signal(signal.SIGHUP, None)
        lp.d.main_loop_once()
    lp.until(lambda: len(folder(lp.w, "processed")) == 20, timeout=20, what="all 20 processed")


def test_a_stuck_file_holds_up_only_itself_not_the_rest_of_its_batch(loop, events) -> None:
    """Files handed out in batches: an idle worker takes back the files a stuck one has not started."""
    lp = loop(config=HANG_ROUTING, workers=2, stall_time=60)
    d = lp.d
    lp.until(lambda: len(d.pool.idle()) == 2, what="two idle workers")
    lp.drop("0-stuck.txt", b"HANG\n")
    for i in range(1, 12):
        lp.drop(f"{i}-ok.txt", b"ok\n")
    # Both: a worker publishes its outputs before the parent, told, removes the inputs (an eye on processed/ alone
    # can catch the moment between).
    lp.until(lambda: len(folder(lp.w, "processed")) == 11 and folder(lp.w, "underprocess") == ["0-stuck.txt"],
             timeout=15, what="every file but the stuck one")
    assert not events("worker_stuck"), "no kill was needed to free them"


def test_files_finished_ahead_of_a_stuck_one_are_committed_without_it(loop, events) -> None:
    """Within a batch, files already processed when a later one hangs are committed after COMMIT_STALE, not
    held until the stuck file is killed (a partial Outcomes), and each is reported exactly once."""
    lp = loop(config=HANG_ROUTING, workers=1, stall_time=60)
    d = lp.d
    lp.until(lambda: d.pool.idle(), what="an idle worker")
    for i in range(5):
        lp.drop(f"{i}-ok.txt", b"ok\n")
    lp.drop("9-stuck.txt", b"HANG\n")  # last of the batch: the five are sealed before it hangs
    lp.until(lambda: len(folder(lp.w, "processed")) == 5, timeout=15, what="the five committed ahead")
    lp.until(lambda: len(events("processed")) == 5, what="and announced")
    assert folder(lp.w, "underprocess") == ["9-stuck.txt"]
    assert sorted(e.file for e in events("processed")) == [f"{i}-ok.txt" for i in range(5)]


def test_a_rejection_decided_ahead_of_a_stuck_file_is_not_held_by_it(loop, events) -> None:
    """The CI case: [blob.bin, stuck.txt] in one batch. The rejection has no sealed output, yet it too is sent
    after COMMIT_STALE: failed/ must not wait for the stuck file to be killed."""
    lp = loop(config=HANG_ROUTING, workers=1, stall_time=60)
    d = lp.d
    lp.until(lambda: d.pool.idle(), what="an idle worker")
    lp.drop("0-blob.bin", b"\x00binary\x00")
    lp.drop("9-stuck.txt", b"HANG\n")
    lp.until(lambda: folder(lp.w, "failed") == ["0-blob.bin"], timeout=15, what="the rejection set aside")
    assert folder(lp.w, "underprocess") == ["9-stuck.txt"]


def test_every_kind_of_outcome_ahead_of_a_stuck_file_is_reported_without_it(loop, events) -> None:
    """The kind: processed, rejected and retried files decided ahead of a hang in one batch all leave
    underprocess/ while the stuck one still runs, each reported once."""
    lp = loop(config=HANG_ROUTING, workers=1, stall_time=60)
    d = lp.d
    lp.until(lambda: d.pool.idle(), what="an idle worker")
    lp.drop("0-ok.txt", b"ok\n")
    lp.drop("1-blob.bin", b"\x00binary\x00")
    lp.drop("2-ok.txt", b"ok\n")
    lp.drop("9-stuck.txt", b"HANG\n")
    lp.until(lambda: folder(lp.w, "underprocess") == ["9-stuck.txt"], timeout=15, what="all but the stuck one out")
    assert folder(lp.w, "failed") == ["1-blob.bin"]
    assert sorted(e.file for e in events("processed")) == ["0-ok.txt", "2-ok.txt"]
    assert [e.file for e in events("failed")] == ["1-blob.bin"]


def test_a_stop_abandons_only_the_files_of_a_batch_not_yet_reported(loop, events) -> None:
    lp = loop(config=HANG_ROUTING, workers=1, stall_time=60)
    d = lp.d
    lp.until(lambda: d.pool.idle(), what="an idle worker")
    for i in range(4):
        lp.drop(f"{i}-ok.txt", b"ok\n")
    lp.drop("9-stuck.txt", b"HANG\n")
    lp.until(lambda: len(events("processed")) == 4, timeout=15, what="four committed ahead of the stuck one")
    d.shutdown()
    assert [e.file for e in events("abandoned")] == ["9-stuck.txt"]
    assert folder(lp.w, "unprocessed") == ["9-stuck.txt"] and folder(lp.w, "underprocess") == []


def test_a_watch_lost_while_its_folder_cannot_be_made_is_restored_within_seconds(loop, events) -> None:
    """The CI case: rm -rf still running when the daemon makes unprocessed/ again, so the first attempt fails.
    The kind: any failure to restore the watch is retried each WATCH_RETRY, not left to the 30 s rescan (or
    never: the failure once ended in the boundary with the dead watch kept)."""
    lp = loop()
    d, unprocessed = lp.d, lp.w / "unprocessed"
    lp.until(lambda: d.pool.idle(), what="an idle worker")
    unprocessed.rmdir()
    unprocessed.write_bytes(b"")  # in the way: ensure() cannot make the folder
    lp.until(lambda: events("watch_lost") and events("io_error"), what="the watch lost, and a first try failed")
    assert d.watch_lost and not events("internal_error")
    unprocessed.unlink()
    lp.clock.advance(2.5)  # past WATCH_RETRY and the claim pause of the failed try; far from rescan_interval
    lp.until(lambda: unprocessed.is_dir() and not d.watch_lost, timeout=5, what="the folder made and watched")
    lp.drop("after.txt", b"after\n")
    lp.until(lambda: lp.result("after.txt") == b"AFTER\n", timeout=5, what="a new file noticed by the new watch")
    assert len(events("watch_lost")) == 1


def test_health_calls_a_long_wait_idle_and_a_long_turn_stuck(loop) -> None:
    """The idle loop no longer turns every 5 s just to look alive (each wake-up costs a small VM milliseconds):
    /healthz counts waiting in poll() as alive however long it lasts, and a turn that hangs (or a wait past its
    own timeout) as stuck. Real poll(), real threads; only the clock is moved."""
    import threading

    lp = loop()
    d = lp.d
    lp.until(lambda: not d.pool.busy() and d.state.phase == "running", what="idle")
    turn = threading.Thread(target=d.main_loop_once)
    turn.start()
    deadline = time.monotonic() + 5
    while d.waiting_until is None and time.monotonic() < deadline:  # the thread is in poll() now
        time.sleep(0.01)
    assert d.waiting_until is not None
    lp.clock.advance(25)  # 25 s "pass" while it waits: longer than any turn may take
    assert d.health() is None, "an idle loop waiting for work must be healthy"
    lp.drop("wake.txt", b"x\n")  # an event ends the wait
    turn.join(10)
    assert not turn.is_alive() and d.waiting_until is None

    hold, entered = threading.Event(), threading.Event()
    real = d._housekeeping

    def hang(now: float) -> None:
        entered.set()
        hold.wait(10)
        real(now)

    d._housekeeping = hang  # type: ignore[method-assign]
    turn = threading.Thread(target=d.main_loop_once)
    turn.start()
    try:
        assert entered.wait(10)
        assert d.health() is None, "a turn just begun is not stuck yet"
        lp.clock.advance(12)  # the turn has now taken longer than 2 x HEARTBEAT + 1 s
        assert (d.health() or "").startswith("main loop silent for"), d.health()
    finally:
        hold.set()
        turn.join(10)
    d._housekeeping = real  # type: ignore[method-assign]


def test_files_are_claimed_ahead_for_a_busy_worker_and_handed_over_before_its_results_are_announced(loop,
                                                                                                     events) -> None:
    """Every worker busy: its next batch is claimed now (at most MAX_BATCH files), and when it reports, it gets
    that batch in the same turn, before the parent acks and logs the batch it finished (the two overlap)."""
    from ingestd.daemon import MAX_BATCH

    lp = loop(config=SLOW_ROUTING)
    d = lp.d
    lp.drop("0-busy.txt", b"abc\n" * 300)  # ~0.6 s of slow work
    lp.until(lambda: d.pool.busy(), what="the only worker busy")
    names = [f"{i:02d}-next.txt" for i in range(MAX_BATCH + 5)]
    for name in names:
        lp.drop(name, b"next\n")
    lp.until(lambda: len(d.queue) == MAX_BATCH, what="a batch claimed ahead")
    assert len(folder(lp.w, "underprocess")) == MAX_BATCH + 1, "no more than one batch ahead of the worker"
    assert len(d.arrivals) == 5 and lp.result("0-busy.txt") is None
    seen: list[list[str]] = []

    class Spy(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if getattr(record, "event", None) == "processed" and record.file == "0-busy.txt":
                seen.append([j.name for s in d.pool.busy() for j in s.batch])

    spy = Spy()
    logging.getLogger("ingestd").addHandler(spy)
    try:
        lp.until(lambda: seen, what="0-busy.txt announced")
    finally:
        logging.getLogger("ingestd").removeHandler(spy)
    assert seen[0] == names[:MAX_BATCH], "the worker had its next batch before the last one was announced"
    lp.until(lambda: len(folder(lp.w, "processed")) == len(names) + 1, timeout=20, what="every file")
    assert not folder(lp.w, "underprocess") and not d.queue and not events("internal_error")


def test_a_stop_returns_the_files_claimed_ahead_to_the_queue_uncounted(loop, events) -> None:
    lp = loop(config=HANG_ROUTING, stall_time=60)
    d = lp.d
    lp.drop("0-stuck.txt", b"HANG\n")
    lp.until(lambda: d.pool.busy(), what="the only worker busy")
    for i in range(5):
        lp.drop(f"{i}-ahead.txt", b"ahead\n")
    lp.until(lambda: len(d.queue) == 5, what="five claimed ahead")
    d.shutdown()
    assert folder(lp.w, "unprocessed") == ["0-ahead.txt", "0-stuck.txt", "1-ahead.txt", "2-ahead.txt",
                                           "3-ahead.txt", "4-ahead.txt"]
    assert not folder(lp.w, "underprocess") and not folder(lp.w, "processed")
    assert [e.file for e in events("abandoned")] == ["0-stuck.txt"], "only the file a worker held was abandoned"
    assert all(d.spool.attempts(f"{i}-ahead.txt") == 0 for i in range(5))


def test_claiming_ahead_stops_while_claiming_is_paused(loop, events) -> None:
    """A pause (an I/O error's backoff, low disk space) claims nothing, ahead or not."""
    from ingestd.state import PauseKind

    lp = loop(config=HANG_ROUTING, stall_time=60)
    d = lp.d
    lp.drop("0-stuck.txt", b"HANG\n")
    lp.until(lambda: d.pool.busy(), what="the only worker busy")
    d.state.pause_for(PauseKind.LOW_DISK, "low disk space: test", lp.clock() + 3600)
    assert_nothing_claimed_ahead(lp, ["0-stuck.txt"])


def assert_nothing_claimed_ahead(lp: Loop, held: list[str]) -> None:
    """Three files dropped while every worker is busy with `held`: complete, yet after five turns still unclaimed."""
    d = lp.d
    for i in range(3):
        lp.drop(f"{i}-wait.txt", b"w\n")
    lp.until(lambda: len(d.arrivals.ready) == 3, what="three complete arrivals")
    for _ in range(5):
        d.main_loop_once()
    assert not d.queue and folder(lp.w, "underprocess") == held


def test_files_claimed_ahead_behind_a_stuck_worker_age_in_the_underprocess_gauge(loop) -> None:
    """A file claimed ahead is in underprocess/: its age since the claim shows in the oldest-file gauge (the
    stuck-work alert's input), as it showed in unprocessed/'s before it was claimed ahead."""
    lp = loop(config=HANG_ROUTING, stall_time=60)
    d = lp.d
    lp.drop("0-stuck.txt", b"HANG\n")
    lp.until(lambda: d.pool.busy(), what="the only worker busy")
    lp.drop("1-ahead.txt", b"ahead\n")
    lp.until(lambda: d.queue, what="one claimed ahead")
    d.pool.busy()[0].job.started_wall = time.time()  # the stuck file as if just started: the queued one is older
    d.queue[0].claimed_at = time.time() - 600
    d._publish_view()
    assert d.state.snapshot()["oldest"]["underprocess"] >= 600


def test_a_reload_says_which_changed_settings_it_did_not_apply(loop, tmp_path: Path, events) -> None:
    """Found by a new user: folder_quiet_time raised in the config, `systemctl reload`, "routing reloaded", and the
    old value went on without a word. A reload applies the routing; any other setting that changed is named
    (not_applied, a WARNING), so the operator knows to restart."""
    new = settings_mod.load({"watch_dir": str(tmp_path / "w"), "listen": "127.0.0.1:0", "workers": 1,
                             "settle_time": 0.05, "folder_quiet_time": 99, "mode": "lowercase"}, environ={},
                            cwd=tmp_path)
    lp = loop(reload=lambda: new)
    lp.d._on_signal(signal.SIGHUP, None)
    lp.until(lambda: events("reloaded"), what="the reload")
    (said,) = events("reloaded")
    assert said.levelno == logging.WARNING and said.not_applied == ["folder_quiet_time"], said.__dict__
    assert lp.d.s.folder_quiet_time == 0.05 and lp.d.s.routing_doc == {"mode": "lowercase"}
    same = lp.d.s
    lp.d._reload_settings = lambda: same
    lp.d._on_signal(signal.SIGHUP, None)
    lp.until(lambda: len(events("reloaded")) == 2, what="a second reload")
    assert events("reloaded")[1].levelno == logging.INFO and events("reloaded")[1].not_applied is None


# Imports in the daemon (this process); in a worker process, while the flag file exists, raises at import: a service
# the plug-in needs at import down for a while (tests/test_break_round9.py makes the same with a subprocess daemon).
FAILS_IN_WORKERS = """
import multiprocessing, os
if multiprocessing.parent_process() is not None and os.path.exists({flag!r}):
    raise OSError(111, 'Connection refused (a licence server the plug-in asks at import)')
def make():
    return str.upper
"""


def test_workers_starting_again_after_they_could_not_is_said_once_and_healthz_clears(
        loop, tmp_path: Path, events, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found in review: after worker_cannot_start (ERROR; /healthz "no worker can start: ..."), nothing said when
    workers worked again: an operator reading the log could not tell whether the outage was over, nor how long it
    lasted. One workers_recovered (INFO) at the first Ready since, with how long they could not start and how many
    died so; /healthz is ok again. The backoff (1 s, then 2 s) is skipped by moving the daemon's clock."""
    flag = tmp_path / "flag"
    root = plugin(tmp_path / "plug", "recplug", FAILS_IN_WORKERS.format(flag=str(flag)), {"rec": "recplug:make"})
    monkeypatch.syspath_prepend(root)  # the spawned workers get this sys.path too
    lp = loop(mode="rec")
    d = lp.d
    d._reload_settings = lambda: d.s
    lp.until(lambda: d.pool.idle(), what="an idle worker")
    flag.write_text("")
    d._on_signal(signal.SIGHUP, None)  # the idle worker is replaced by one that cannot import the plug-in
    lp.drop("b.txt", b"b\n")
    lp.until(lambda: events("worker_cannot_start"), what="worker_cannot_start")
    lp.clock.advance(1.0)  # the first backoff: a second worker dies the same way
    lp.until(lambda: len(events("worker_died")) == 2, what="a second death at start")
    # Asked now, b.txt waiting: one more turn would wait out the real 2 s backoff and spawn the next worker.
    assert d.health() == ("no worker can start: mode: processor 'rec' could not be loaded: ConnectionRefusedError: "
                          "[Errno 111] Connection refused (a licence server the plug-in asks at import)")
    assert not events("workers_recovered")
    flag.unlink()  # the service is back
    lp.clock.advance(2.0)
    lp.until(lambda: lp.result("b.txt"), what="b.txt processed by a worker that started")
    (said,) = events("workers_recovered")
    assert said.levelno == logging.INFO and said.worker == 0 and said.failed_starts == 2, said.__dict__
    assert 3.0 <= said.duration < 10.0, said.duration  # the 3 s of backoff skipped, and the real time taken
    assert d.health() is None
    assert len(events("worker_cannot_start")) == 1 and len(events("workers_recovered")) == 1
    assert not events("internal_error")
