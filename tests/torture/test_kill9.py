"""Catalogue: kill -9 at random moments, hundreds of times in a row, while files of mixed sizes flow.

After every kill no partial or wrong file is visible under a final name in processed/; at the end every input is
in processed/ exactly once, byte-identical to the reference (uppercase of ASCII text). Kills come from outside at
random times, and from inside (the shim) at exact points: right after a claim, mid-output (after a block of an
output was written), between publish and commit, during recovery (after an attempt was counted), after a commit.
The moments are stratified, not drawn blindly: each lane takes every point once per round of len(POINTS) kills
(in a random order), and the random kills' delays cover their range in equal slices, so a run of 100 kills
(scale 1; `make torture-long`: 1,000) reaches every point, each a number of times, and asserts it did.
"""

from __future__ import annotations

import collections
import collections.abc
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from support import DaemonProcess

from ingestd import inflight
from ingestd.names import key

from .lib import SCALE, audit_final, hidden, kill_tree, ls, make_watch, record, shim_env, start_daemon, text_blob, \
    wait_drained

KILLS = 100 * SCALE
LANES = 2  # two independent watch dirs at once: start-up is the cost, and there are two cores
SIZES = (0, 1, 700, 16 << 10, 200 << 10, 1 << 20, 2 << 20, 4 << 20)
POINTS = ("random", "random", "random", "claim", "write", "published", "commit", "recover")
DELAY = (0.2, 0.9)  # a random kill lands this many seconds after the start: during start-up, recovery, work
SLICES = 7  # DELAY cut in equal slices, each used once per SLICES random kills
POINT_WAIT = 4.0  # seconds an exact point has to be reached
IDLE = 0.5  # seconds the queue stays empty before an exact point counts as not reachable (nothing left to do)


def rounds(rng: random.Random, items: list) -> collections.abc.Iterator:
    """items over and over, each round in a new random order: every item once per round."""
    while True:
        batch = list(items)
        rng.shuffle(batch)
        yield from batch


def recovery_counts(w: Path) -> int:
    """How many files the next start's recovery will count an attempt for (Spool.recover): those in underprocess/
    a worker was on by its in-flight record, or all of them when the records cannot be trusted."""
    held = ls(w, "underprocess")
    suspects = inflight.suspects(str(w / ".ingestd"))
    return len(held) if suspects is None else sum(key(name) in suspects for name in held)


def point_reached(d: DaemonProcess, w: Path) -> bool:
    """Wait for the shim to kill the daemon at its point; False if it is still alive after POINT_WAIT, or once the
    queue has been empty for IDLE (nothing left that could reach the point: the 4 s would only be idle time)."""
    deadline = time.monotonic() + POINT_WAIT
    empty_since = None
    while d.proc.poll() is None:
        now = time.monotonic()
        if now > deadline:
            return False
        if ls(w, "unprocessed") or ls(w, "underprocess"):
            empty_since = None
        elif empty_since is None:
            empty_since = now
        elif now - empty_since > IDLE:
            return False
        time.sleep(0.02)
    return True


class Checker:
    """Re-reads only results that changed since the last check (whole-folder re-reads would be quadratic)."""

    def __init__(self, w: Path, expected: dict[str, bytes]) -> None:
        self.w, self.expected, self.seen = w, expected, {}

    def check(self) -> None:
        for name in ls(self.w, "processed"):
            st = os.stat(self.w / "processed" / name)
            sig = (st.st_ino, st.st_mtime_ns, st.st_size)
            if self.seen.get(name) == sig:
                continue
            assert name in self.expected, f"unexpected result {name!r}"
            got = (self.w / "processed" / name).read_bytes()
            assert got == self.expected[name], f"partial result visible after a kill: {name} ({len(got)} bytes)"
            self.seen[name] = sig


def lane(root: Path, lane_id: int, kills: int, stats: collections.Counter, lock: threading.Lock) -> None:
    rng = random.Random(1000 + lane_id)
    w = make_watch(root / f"lane{lane_id}")
    staging = root / f"staging{lane_id}"
    staging.mkdir()
    expected: dict[str, bytes] = {}
    checker = Checker(w, expected)
    env = {"INGESTD_MAX_ATTEMPTS": "100000", "INGESTD_SETTLE_TIME": "0.2"}
    seq = owed = 0
    points = rounds(rng, list(POINTS))
    delays = rounds(rng, list(range(SLICES)))
    for k in range(kills):
        for _ in range(rng.choice((1, 2, 3))):  # new arrivals each round (rename in: complete at once)
            name = f"f{lane_id}-{seq:05d}.txt"
            seq += 1
            data = text_blob(rng, rng.choice(SIZES))
            (staging / name).write_bytes(data)
            os.rename(staging / name, w / "unprocessed" / name)
            expected[name] = data.upper()
        point = next(points)
        n = rng.randint(1, 3)
        if point == "recover" or (point == "random" and owed):
            # The recovery point is reached only when the last kill left a file a worker was on: it is owed until
            # such a start comes (in place of a random kill), and n is at most the attempts recovery will count.
            counted = recovery_counts(w)
            owed += point == "recover"
            if counted:
                point, n = "recover", rng.randint(1, min(3, counted))
            else:
                point = "random"
        extra = {} if point == "random" else shim_env(root / "shim", kill={"at": point, "n": n})
        d = DaemonProcess(w, "--workers", str(rng.choice((1, 2))), env={**env, **extra}, cwd=root)
        if point == "random":
            lo, hi = DELAY
            time.sleep(lo + (hi - lo) * (next(delays) + rng.random()) / SLICES)
        elif not point_reached(d, w):  # the shim kills it at the point
            point = "random (point not reached)"
        elif point == "recover":
            owed -= 1
        kill_tree(d)
        mid = bool(ls(w, "underprocess"))
        temps = [n for n in hidden(w, "processed") if n.startswith(".ingestd-tmp-")]
        checker.check()  # no partial file under a final name, whatever the moment
        with lock:
            stats["kills"] += 1
            stats[f"kills at {point}"] += 1
            stats["mid-file"] += mid
            stats["mid-output (temp output present)"] += bool(temps)
    d = start_daemon(w, "--workers", "2", env=env)
    try:
        wait_drained(w, len(expected), timeout=120)
    finally:
        d.stop()
    audit_final(w, expected)
    with lock:
        stats["files"] += len(expected)
        stats["bytes"] += sum(len(v) for v in expected.values())


@pytest.mark.slow
def test_kill9_loop_loses_doubles_and_tears_nothing(tmp_path: Path) -> None:
    stats: collections.Counter = collections.Counter()
    lock = threading.Lock()
    (tmp_path / "shim").mkdir()
    t0 = time.monotonic()
    with ThreadPoolExecutor(LANES) as pool:
        futures = [pool.submit(lane, tmp_path, i, KILLS // LANES + (i < KILLS % LANES), stats, lock)
                   for i in range(LANES)]
        for f in futures:
            f.result()
    assert stats["kills"] >= KILLS
    assert stats["mid-file"] > 0
    missed = [p for p in dict.fromkeys(POINTS) if not stats[f"kills at {p}"]]
    assert not missed, f"no kill landed at {missed}: {dict(stats)}"
    record("kill9", {**stats, "seconds": round(time.monotonic() - t0, 1)})


def test_a_worker_killed_during_its_group_commit_blames_no_file(tmp_path: Path) -> None:
    """The kill lands in the worker's fsync of processed/ after a batch's renames: the batch is redone, nothing
    counted as an attempt (max_attempts=1 would set the blamed file aside), nothing doubled, all correct."""
    from .lib import ls, make_watch, shim_env, start_daemon, wait_drained

    w = make_watch(tmp_path / "w")
    data = {f"f{i:02d}.txt": f"line {i}\n".encode() * 50 for i in range(20)}
    for n, d in data.items():
        (w / "unprocessed" / n).write_bytes(d)  # all there at start: they go out in batches
    env = {"INGESTD_MAX_ATTEMPTS": "1", "INGESTD_SETTLE_TIME": "0.1",
           **shim_env(tmp_path, kill={"at": "fsync_dir@worker.py", "n": 1, "only": "self"})}
    d = start_daemon(w, "--workers", "1", env=env, cwd=tmp_path)
    try:
        wait_drained(w, len(data), timeout=60)
        assert d.count("worker_died") == 1, "the kill happened"
    finally:
        d.stop()
    assert ls(w, "failed") == [], "a death during the commit is no file's fault"
    assert {n: (w / "processed" / n).read_bytes() for n in ls(w, "processed")} == {n: v.upper() for n, v in data.items()}
    names = [e["file"] for e in d.events if e.get("event") == "processed"]
    assert sorted(names) == sorted(data), "each announced exactly once"
