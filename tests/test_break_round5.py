"""Break-it round 5 (helper): what 97e362f (listings read the watch as they go, Daemon._deferred) and ddfc563
(cursor lock taken with a timeout) changed. Each test here fails at 97e362f; the docstring says why and since when."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import time
from typing import Any

from support import wait_for
from test_break_sweep import start  # noqa: F401 (fixture)
from test_daemon_loop import Loop, loop  # noqa: F401 (fixture)
from test_directories import RECURSIVE

_ctx = multiprocessing.get_context("spawn")
N = 150_000  # batch folders the producer prepares; it moves them in within a few seconds


def _make_folders(root: str, seconds: float, started: Any) -> None:
    """A producer: one-file batch folders, each made in a staging folder beside unprocessed/ and moved in when
    complete (the README's way), as fast as it can, for `seconds`."""
    staging = os.path.join(os.path.dirname(root), "staging")
    os.mkdir(staging)
    n = N
    for i in range(n):
        d = os.path.join(staging, f"p{i:07d}")
        os.mkdir(d)
        with open(os.path.join(d, "f.txt"), "wb") as f:
            f.write(b"x\n")
    started.set()
    t0 = time.monotonic()
    end = t0 + seconds
    i = 0
    while time.monotonic() < end and i < n:
        os.rename(os.path.join(staging, f"p{i:07d}"), os.path.join(root, f"p{i:07d}"))
        i += 1


def test_a_fast_folder_producer_does_not_hold_the_main_loop_in_one_turn(loop) -> None:  # noqa: F811
    """FAULT (97e362f). _on_watch now loops `while self._deferred`, and each dir_in it handles lists (and so
    _enter()s) a folder; every DRAIN_EVERY (256) folders entered, _enter reads the kernel queue into the same
    deque. While a producer makes folders at least as fast as the daemon enters them (cp -r, tar x, rsync of a
    tree of one-file batches), every 256 folders entered bring >= 256 new dir_in, so the deque never empties and
    one call of main_loop_once never returns until the producer stops: no dispatch (no file claimed), no signal
    handled (SIGTERM ignored), no watchdog ping, no status page refresh (_publish_view), for the whole copy. Before
    97e362f a turn handled only what was queued at its start (at most one kernel queue, or one rescan), then
    dispatched. Fix: bound one turn's work: _on_watch handles at most the changes present when it was called
    (snapshot len(_deferred) and stop there), leaving what _enter read meanwhile for the next turn (the loop
    already runs _on_watch after housekeeping when _deferred is not empty; make _timeout_ms return 0 then).
    Measured (2 cores, ext4): 150,000 one-file folders moved in as fast as a Python loop can: one turn of
    8.8 s to 14.2 s, SIGTERM acted on after 9.5 s to 23.4 s, one batch (32) processed meanwhile; 60,000: 4.8 s (the turn lasts as long as
    the burst). At 0ce4bc8 (before 97e362f), same test: longest turn 1.8 s, SIGTERM after 3.2 s, files processed
    during the burst. A producer slower than the daemon (10,000-14,000 folders/s here) does not trigger it."""
    lp: Loop = loop(recursive=True, workers=1)
    d = lp.d
    u = str(lp.w / "unprocessed")
    started = _ctx.Event()
    seconds = 12.0
    p = _ctx.Process(target=_make_folders, args=(u, seconds, started), daemon=True)
    p.start()
    try:
        assert started.wait(120)
        t_start = time.monotonic()
        longest = 0.0
        sent = False
        stopping_after = None
        while time.monotonic() - t_start < 40:
            t0 = time.monotonic()
            if not sent and t0 - t_start > 1.0:
                d._on_signal(signal.SIGTERM, None)  # as the handler does: handled at the next turn
                sent = True
            d.main_loop_once()
            t1 = time.monotonic()
            longest = max(longest, t1 - t0)
            if sent and d.state.phase == "stopping":
                stopping_after = t1 - t_start - 1.0
                break
    finally:
        p.kill()
        p.join(10)
    made = N - len(os.listdir(str(lp.w / "staging")))
    done = sum(len(f) for _, _, f in os.walk(lp.w / "processed"))
    assert stopping_after is not None and stopping_after < 6.0 and longest < 4.0, (
        f"one turn took {longest:.1f} s; SIGTERM acted on after "
        f"{'never' if stopping_after is None else f'{stopping_after:.1f} s'} ({made} folders moved in, {done} files processed)")



def test_unprocessed_removed_and_made_again_during_an_overflow_is_watched_again(start) -> None:  # noqa: F811
    """FAULT (found by rm -rf unprocessed/ during a big tree's listing; older than 97e362f). The only sign that
    unprocessed/ itself went away is its watch's IN_DELETE_SELF/IN_IGNORED (Watch.read: lost_watch); when the
    queue has overflowed, the kernel drops them like any event (one IN_Q_OVERFLOW instead). The overflow rescan
    then finds unprocessed/ present (the producer made it again: mkdir -p), so spool.ensure() made nothing and
    watch_lost is False: no _rewatch. The daemon keeps an inotify instance whose root watch is gone: deaf for
    good, every file found only by the periodic rescan (30 s), for ever (no event, no warning; /healthz fine).
    Fails at 0ce4bc8 too. Seen by hand: 6,000 one-file folders moved in, rm -rf unprocessed/ 0.3 s later, mkdir again: late.txt after
    5 s and 35 s still in unprocessed/. Fix (daemon._rescan): compare unprocessed/'s identity (st_dev, st_ino, or
    folder_id) with the one the watch was opened on at each rescan, overflow ones at least, and _rewatch when
    it changed."""
    d = start({**RECURSIVE, "INGESTD_SETTLE_TIME": "1", "INGESTD_FOLDER_QUIET_TIME": "1"}, queue=64)
    u = d.watch_dir / "unprocessed"
    os.killpg(d.proc.pid, signal.SIGSTOP)
    try:
        for i in range(100):  # > 64 events: the queue overflows, the deletion's events after it are dropped
            (u / f"x{i}.txt").write_bytes(b"x\n")
        shutil.rmtree(u)
        u.mkdir()
    finally:
        os.killpg(d.proc.pid, signal.SIGCONT)
    wait_for(lambda: d.count("overflow") >= 1, timeout=10, what="the overflow seen")
    time.sleep(1.5)  # the overflow's rescan is over
    (u / "late.txt").write_bytes(b"late\n")
    try:
        wait_for(lambda: (d.watch_dir / "processed" / "late.txt").exists(), timeout=10, what="late.txt processed")
    except AssertionError as e:
        raise AssertionError(f"{e}: still in unprocessed/: {(u / 'late.txt').exists()}; the new unprocessed/ is "
                             "not watched (only the 30 s rescan finds files)") from None
