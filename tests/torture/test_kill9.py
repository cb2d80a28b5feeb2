"""Catalogue: kill -9 at random moments, hundreds of times in a row, while files of mixed sizes flow.

After every kill no partial or wrong file is visible under a final name in processed/; at the end every input is
in processed/ exactly once, byte-identical to the reference (uppercase of ASCII text). Kills come from outside at
random times, and from inside (the shim) at exact points: right after a claim, mid-output (after a block of an
output was written), between publish and commit, during recovery (after an attempt was counted), after a commit.
"""

from __future__ import annotations

import collections
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from support import DaemonProcess

from .lib import SCALE, audit_final, hidden, kill_tree, ls, make_watch, record, shim_env, start_daemon, text_blob, \
    wait_drained

KILLS = 300 * SCALE
LANES = 2  # two independent watch dirs at once: start-up is the cost, and there are two cores
SIZES = (0, 1, 700, 16 << 10, 200 << 10, 1 << 20, 2 << 20, 4 << 20)
POINTS = ("random", "random", "random", "claim", "write", "published", "commit", "recover")


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
    seq = 0
    for k in range(kills):
        for _ in range(rng.choice((1, 2, 3))):  # new arrivals each round (rename in: complete at once)
            name = f"f{lane_id}-{seq:05d}.txt"
            seq += 1
            data = text_blob(rng, rng.choice(SIZES))
            (staging / name).write_bytes(data)
            os.rename(staging / name, w / "unprocessed" / name)
            expected[name] = data.upper()
        point = rng.choice(POINTS)
        if point == "recover" and not ls(w, "underprocess"):
            point = "random"
        extra = {} if point == "random" else shim_env(root / "shim", kill={"at": point, "n": rng.randint(1, 3)})
        d = DaemonProcess(w, "--workers", str(rng.choice((1, 2))), env={**env, **extra}, cwd=root)
        if point == "random":
            time.sleep(rng.uniform(0.2, 0.9))
        else:
            try:
                d.proc.wait(timeout=4)  # the shim kills it at the point
            except Exception:
                point = "random (point not reached)"
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
