"""Breaking the hot-path changes of issue 10 (d4b750a..1b11529): each test here failed on that code.

The daemon in process, as in test_daemon_loop.py (its main loop turned by the test, an injected clock, real
workers, real inotify), or a real daemon process where the end-to-end path matters.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ingestd.daemon import HEARTBEAT
from ingestd.names import key
from ingestd.spool import Spool
from ingestd.state import THROUGHPUT_WINDOW
from ingestd.workers import RESPAWN_AFTER
from support import HANG_ROUTING, folder
from test_daemon_loop import Loop, events, loop  # noqa: F401 (fixtures)


def until(lp: Loop, predicate: Callable[[], Any], what: str) -> None:
    """Loop.until, looked at before each turn: an idle turn waits for the loop's next timer (30 s and more)."""
    if not predicate():
        lp.until(predicate, what=what)


def committed(lp: Loop, name: str) -> None:
    """Turn the loop until `name` is out of underprocess/ and its commit announced (looked at before each turn:
    an idle turn waits up to the rescan)."""
    def done() -> bool:
        return not lp.d.unacked and not (lp.w / "underprocess" / name).exists()
    if not done():
        lp.until(done, what=f"{name} committed")


def sidecars(watch_dir: Path) -> list[str]:
    return sorted(f for f in os.listdir(watch_dir / ".ingestd") if f.startswith("attempts-"))


# --- Spool.commit(counted=...): a count on disk that the Job does not know of ---------------------------------

def test_a_count_kept_through_a_stop_is_cleared_when_the_file_commits_after_the_restart(loop, events) -> None:  # noqa: F811
    """A worker killed on x.txt counts an attempt on disk; a stop then gives x.txt back to unprocessed/ with that
    count kept (a stop is not a crash). After the restart x.txt is claimed afresh (Job.attempts 0, not recovered)
    and commits: commit(counted=False) left attempts-KEY behind for ever, and a later file of that name on the same
    inode (a producer that hard-links the same data in again; ext4 reuses freed inodes) started with that count:
    quarantined as poison after fewer crashes than max_attempts."""
    lp = loop(config=HANG_ROUTING, max_attempts=5, stall_time=30)
    d = lp.d
    lp.drop("x.txt", b"HANG\n")
    # On the file, not only handed it: a worker killed before it starts a batch blames no file (workers.assign).
    lp.until(lambda: d.pool.busy() and d.pool.busy()[0].on == 0, what="the worker on x.txt")
    lp.clock.advance(31)
    lp.until(lambda: events("worker_stuck"), what="worker_stuck")
    lp.clock.advance(1)
    lp.until(lambda: events("worker_killed"), what="worker_killed")
    assert d.spool.attempts("x.txt") == 1
    keep = lp.w / "keep"  # the producer's own link to the same data
    os.link(lp.w / "underprocess" / "x.txt", keep)
    d.shutdown()
    assert folder(lp.w, "unprocessed") == ["x.txt"] and sidecars(lp.w), "given back with its count"

    lp2 = loop(max_attempts=5)
    lp2.until(lambda: lp2.result("x.txt") == b"HANG\n", what="x.txt processed after the restart")
    committed(lp2, "x.txt")
    assert sidecars(lp2.w) == [], "a committed file's attempt count must go with it"

    os.link(keep, lp2.w / "unprocessed" / "x.txt")  # the same inode, under the same name, again
    lp2.until(lambda: len(events("processed")) == 2, what="the second x.txt processed")
    assert sidecars(lp2.w) == []


def test_a_count_left_by_a_crash_during_set_aside_is_cleared_when_the_requeued_file_commits(tmp_path, loop, events) -> None:  # noqa: F811
    """The wider kind: any count on disk for a name that commits goes, however the Job came to be claimed. Here
    kill -9 came between fail()'s rename into failed/ and its clear_attempts, and the user moved the file back
    by hand (mv keeps the inode)."""
    w = tmp_path / "w"
    sp = Spool(w)
    sp.ensure()
    (w / "underprocess" / "y.txt").write_bytes(b"y\n")
    assert sp.bump_attempts("y.txt") == 1 and sp.bump_attempts("y.txt") == 2
    os.rename(w / "underprocess" / "y.txt", w / "failed" / "y.txt")  # fail()'s rename; then kill -9
    os.rename(w / "failed" / "y.txt", w / "unprocessed" / "y.txt")  # the user puts it back
    assert json.loads((w / ".ingestd" / f"attempts-{key('y.txt')}").read_text())["attempts"] == 2
    lp = loop(max_attempts=3)
    lp.until(lambda: lp.result("y.txt") == b"Y\n", what="y.txt processed")
    committed(lp, "y.txt")
    assert sidecars(w) == []


# --- Done.fresh: the processed/ count between rescans -----------------------------------------------------------

ONLY_ROUTED = '[[outputs]]\nmatch = "*"\npath = "all"\n'
BOTH = ('[[filters]]\nmatch = "*"\nretag = "errors"\npattern = "ERR"\n\n'
        '[[outputs]]\nmatch = "errors"\npath = "errors"\n\n[[outputs]]\nmatch = "*"\npath = ""\n')


def counted_as_on_disk(lp: Loop) -> tuple[int, int]:
    d = lp.d
    return d.state.kept["processed"], d.spool.counts(d.s.recursive, d.outputs)["processed"]


@pytest.mark.parametrize("config, flags, earlier", [
    (None, {}, False),
    (None, {}, True),  # file_exist = keep: the earlier one stays as NAME.superseded-...
    (None, {"file_exist": "replace"}, True),
    (ONLY_ROUTED, {}, False),  # no default output: processed/ itself gains nothing
    (ONLY_ROUTED, {}, True),  # ... and a same-named file standing in processed/ is not a result of this routing
    (BOTH, {}, False),
    (None, {"recursive": True}, False),
    (ONLY_ROUTED, {"recursive": True}, False),
], ids=["default", "keep", "replace", "routed", "routed-earlier", "both", "recursive", "recursive-routed"])
def test_the_processed_count_between_rescans_is_what_a_rescan_finds(loop, config, flags, earlier) -> None:  # noqa: F811
    """The status page and ingestd_folder_files{folder="processed"} count processed/ from each commit's
    Done.fresh until the next rescan (30 s) counts it again from disk. With no default output (every record
    routed to processed/all/) each file was counted as a new entry of processed/ itself, which gains none."""
    lp = loop(config=config, **flags)
    names = ["a.txt", "b.txt"]
    if flags.get("recursive"):
        (lp.w / "unprocessed" / "batch").mkdir()
        names = ["batch/a.txt", "batch/b.txt"]
    if earlier:
        (lp.w / "processed" / "a.txt").write_bytes(b"an earlier result\n")
        lp.d._rescan("test")  # the count starts from the disk
    assert counted_as_on_disk(lp)[0] == counted_as_on_disk(lp)[1]
    for name in names:
        lp.drop(name, b"ok\nERR x\n")
    lp.until(lambda: lp.d.state.totals["processed"] == len(names), what="both processed")
    assert counted_as_on_disk(lp)[0] == counted_as_on_disk(lp)[1]


# --- the idle loop's long wait (IDLE_TURN) and what it shows -----------------------------------------------------

def view_age_limit_ms() -> int:
    return int(HEARTBEAT * 1000) + 1


def test_after_a_burst_the_idle_loop_still_refreshes_the_throughput_it_shows(loop) -> None:  # noqa: F811
    """The page, /api/status and the metrics read a view the loop publishes. After the last file the throughput
    (a 60 s window) falls as each completion leaves the window; the idle loop woke every 5 s and showed that, and
    since IDLE_TURN only at the next rescan, or IDLE_TURN (60 s) with a longer rescan_interval: "2 files/s" stayed
    shown for a minute of nothing. The loop's own choice of wait is the observable (a real minute is no test)."""
    lp = loop(rescan_interval=300)
    d = lp.d
    lp.drop("a.txt", b"a\n")
    lp.until(lambda: d.state.totals["processed"] == 1, what="a.txt processed")
    until(lp, lambda: not d.pool.busy() and not d.unacked and not d.state.history_dirty, what="idle")
    assert d.snapshot()["throughput"]["files_per_second"] > 0
    lp.clock.advance(THROUGHPUT_WINDOW - 2)  # a.txt leaves the window in 2 s
    assert d._timeout_ms() <= view_age_limit_ms(), "the loop wakes when the throughput it shows changes"
    lp.clock.advance(3)
    lp.until(lambda: True)  # one turn
    assert d.snapshot()["throughput"]["files_per_second"] == 0
    assert d._timeout_ms() > view_age_limit_ms(), "truly idle (nothing waits, nothing done lately): the long wait"


def test_a_file_waiting_for_its_marker_ages_on_the_page_while_the_loop_is_idle(loop) -> None:  # noqa: F811
    """The wider kind: anything waiting without a timer of its own (done_marker: a file whose NAME.done has not
    come) ages in the view (ingestd_folder_oldest_file_age_seconds{folder="unprocessed"}, an alert's input),
    which froze between rescans."""
    lp = loop(done_marker=True)
    d = lp.d
    lp.drop("a.txt", b"a\n")
    until(lp, lambda: len(d.arrivals) == 1 and d.arrivals.next_deadline() is None, what="a.txt waits for a.txt.done")
    until(lp, lambda: not d.state.history_dirty, what="idle")
    assert d._timeout_ms() <= view_age_limit_ms()


def test_the_idle_loop_pings_the_watchdog_within_watchdog_usec(loop, monkeypatch, tmp_path) -> None:  # noqa: F811
    """The loop no longer wakes every 5 s: its watchdog timer alone must wake it. A real NOTIFY_SOCKET (a datagram
    socket of the test), WATCHDOG_USEC = 2 s: every gap between two pings of an idle loop stays under it (the
    daemon aims at half of it, so the margin is a second)."""
    import itertools
    import socket
    import time

    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    lp = None
    try:
        lp = loop()
        pings: list[float] = []
        end = time.monotonic() + 5
        while time.monotonic() < end:
            assert lp.d.main_loop_once()
            while True:
                try:
                    msg = sock.recv(4096)
                except BlockingIOError:
                    break
                if msg == b"WATCHDOG=1":
                    pings.append(time.monotonic())
        assert len(pings) >= 3, pings
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) < 2.0, gaps
    finally:
        sock.close()
        if lp is not None and lp.d.notifier._n is not None and lp.d.notifier._n.socket is not None:
            lp.d.notifier._n.socket.close()  # sdnotify's own socket: the daemon keeps it for its life


# --- the failure boundary as a plain class (_Boundary) ---------------------------------------------------------

def _broken_helper(kind: str) -> None:
    """Raises the kind asked for, from a frame of its own (the traceback must name it)."""
    if kind == "chained":
        try:
            {}["missing"]
        except KeyError as e:
            raise RuntimeError("wrapped") from e
    if kind == "group":
        raise ExceptionGroup("several", [ValueError("one"), TypeError("two")])
    if kind == "recursion":
        def down(n: int) -> int:
            return down(n + 1) + 1
        down(0)
    raise {"stop": StopIteration("stop"), "memory": MemoryError("pretend"),
           "unicode": UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")}[kind]


@pytest.mark.parametrize("kind", ["chained", "group", "recursion", "stop", "memory", "unicode"])
def test_every_kind_of_exception_costs_one_file_a_retry_with_its_whole_traceback(loop, events, monkeypatch, kind) -> None:  # noqa: F811
    lp = loop()
    d = lp.d
    real_commit = d.spool.commit
    calls: list[str] = []

    def commit_once_broken(name: str, **kw: bool) -> None:
        calls.append(name)
        if len(calls) == 1:
            _broken_helper(kind)
        real_commit(name, **kw)

    monkeypatch.setattr(d.spool, "commit", commit_once_broken)
    lp.drop("a.txt", b"a\n")
    lp.until(lambda: events("internal_error"), what="internal_error")
    err = events("internal_error")[0]
    assert err.file == "a.txt"
    tb = err.traceback
    assert "_broken_helper" in tb and "commit_once_broken" in tb and "_on_outcome" in tb, tb
    if kind == "chained":
        assert "KeyError: 'missing'" in tb and "direct cause" in tb and "RuntimeError: wrapped" in tb
    if kind == "group":
        assert "ValueError: one" in tb and "TypeError: two" in tb
    lp.clock.advance(10)  # past the file's backoff
    lp.until(lambda: lp.result("a.txt") == b"A\n", what="a.txt retried and done")
    committed(lp, "a.txt")
    assert len(events("processed")) == 1 and len(events("internal_error")) == 1 and d.metrics.errors._value.get() == 1


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), SystemExit(3), GeneratorExit()])
def test_what_is_not_an_exception_passes_the_boundary(loop, events, exc) -> None:  # noqa: F811
    lp = loop()
    with pytest.raises(type(exc)), lp.d._boundary("test"):
        raise exc
    assert not events("internal_error")


def test_already_running_passes_the_boundary_and_ends_the_loop(loop, events, monkeypatch) -> None:  # noqa: F811
    """Another daemon took the watch dir (made again under us): the periodic rescan's check_lock raises, and the
    loop must end, not retry it as one file's internal error."""
    from ingestd.spool import AlreadyRunning

    lp = loop()
    d = lp.d

    def taken() -> None:
        raise AlreadyRunning("another ingestd (pid 1) owns this watch dir")

    monkeypatch.setattr(d.spool, "check_lock", taken)
    lp.clock.advance(d.s.rescan_interval + 1)
    with pytest.raises(AlreadyRunning):
        d.main_loop_once()
    assert not events("internal_error")


def test_a_worker_that_cannot_be_restarted_after_a_reload_is_retried_on_time(loop, events, tmp_path) -> None:  # noqa: F811
    """A reload restarts every idle worker; EMFILE on the new one (a real RLIMIT_NOFILE) leaves the old one retiring
    (alive, never handed work) with a retry RESPAWN_AFTER later. No timer of the loop's stood for that retry: the
    idle turn every 5 s hid it, and since IDLE_TURN the files waited for the next rescan (30 s) or IDLE_TURN."""
    import resource

    from ingestd import settings as settings_mod

    lp = loop(reload=lambda: settings_mod.load({"watch_dir": str(tmp_path / "w")}, environ={}, cwd=tmp_path))
    d = lp.d
    until(lp, lambda: d.pool.idle(), what="an idle worker")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")), hard))
    try:
        d._on_signal(signal.SIGHUP, None)
        lp.until(lambda: events("reloaded"), what="reloaded")
        assert d.pool.spawn_error and not d.pool.idle(), "the restart failed: no worker takes files"
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert d._timeout_ms() <= RESPAWN_AFTER * 1000 + 1, "the loop wakes to try the restart again"
    lp.drop("a.txt", b"a\n")
    t0 = time.monotonic()
    lp.until(lambda: lp.result("a.txt") == b"A\n", timeout=10, what="a.txt processed by the restarted worker")
    assert time.monotonic() - t0 < 10, "waited for the rescan, not for RESPAWN_AFTER"
    assert not events("internal_error")


# --- names.display's fast path -----------------------------------------------------------------------------------

def _display_per_character(name: str) -> str:
    """display() before its fast path: every character looked at."""
    from ingestd.names import _escape

    text = os.fsencode(name).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def test_display_fast_path_escapes_exactly_what_the_per_character_rule_does() -> None:
    """Every code point below U+3000 and a sample above, alone and inside a printable name, plus undecodable
    bytes (surrogateescape): the same text as the per-character rule, and never a control character."""
    from ingestd.names import display

    points = [*range(0x3000), *range(0x3000, 0x110000, 97)]
    names = []
    for cp in points:
        if 0xD800 <= cp <= 0xDFFF:
            continue  # not in a str from the file system, except as surrogateescape below
        c = chr(cp)
        names += [c, f"report-{c}.txt"]
    names += [os.fsdecode(b"bad-\xff\xfe.txt"), os.fsdecode(b"\xc3"), "line\nbreak", "tab\there", "\x1b[31mred"]
    for name in names:
        shown = display(name)
        assert shown == _display_per_character(name), repr(name)
        assert shown.isprintable(), repr(name)
