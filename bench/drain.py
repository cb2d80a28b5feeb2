"""2. Drain: 2,000 x 1 KiB files written in place (open, write, close) into unprocessed/, time until every
one is done (its output in processed/, its input gone), for the daemon and the two scripts users write
instead: bench/baselines/poll_move.py (1 s polling loop) and bench/baselines/watchdog_move.py (the
`watchdog` library). Same files, same disk, one consumer at a time, interleaved across repetitions.
The daemon's outputs are durable (fsync); the scripts' are not. The producer alone (no consumer) is timed
the same way: no drain can end before the last file is written, so it bounds what any consumer can gain
(on ext4 without a journal its creates slow down after many deletes, docs/benchmarks.md, round four).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench.harness import (
    KIB,
    Rep,
    Table,
    baseline,
    check_alive,
    f_s,
    fresh,
    note,
    reap,
    spawn,
    start_daemon,
    stop_daemon,
    text_block,
    visible,
    wait_until,
)

N = 2000
CONSUMERS = ("ingestd", "poll", "watchdog", "none")  # none: the producer alone, the floor of any drain


def drained(wd: Path, n: int) -> bool:
    """Every file done: nothing visible left in unprocessed/ or underprocess/, n results in processed/."""
    return not visible(wd / "unprocessed") and not visible(wd / "underprocess") \
        and len(visible(wd / "processed")) >= n


def produce(src: Path, payload: bytes) -> None:
    """The producer: N files written in place (open, write, close)."""
    for i in range(N):
        fd = os.open(src / f"d{i:05d}.txt", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, payload)
        os.close(fd)


def drop_and_wait(wd: Path, payload: bytes, alive: Callable[[], None], box: float) -> float:
    """Write N files in place into wd/unprocessed; seconds from the first open until drained."""
    t0 = time.perf_counter()
    produce(wd / "unprocessed", payload)

    def done() -> bool:
        alive()
        return drained(wd, N)

    wait_until(done, box, f"{N} files drained", interval=0.01)
    return time.perf_counter() - t0


def faster(base_s: float, ours_s: float) -> str:
    """How many times faster ingestd drained than a baseline (baseline seconds / ingestd seconds)."""
    return f"{base_s / ours_s:.2f}x as fast (higher is better)"


def wrong_outputs(wd: Path, payload: bytes) -> int:
    want = payload.upper()
    return sum(1 for name in visible(wd / "processed") if (wd / "processed" / name).read_bytes() != want)


def one(work: Path, who: str, payload: bytes) -> tuple[float, int]:
    """(seconds to drain, outputs that are not the uppercased input) for one consumer."""
    root = fresh(work, f"drain-{who}")
    wd = root / "watch"
    for sub in ("unprocessed", "underprocess", "processed", "failed"):
        (wd / sub).mkdir(parents=True)
    os.sync()  # nobody pays for the previous consumer's dirty pages
    if who == "none":  # no consumer: how long the writes alone take, on the same disk in the same state
        t0 = time.perf_counter()
        produce(wd / "unprocessed", payload)
        s = time.perf_counter() - t0
        shutil.rmtree(root)  # deleted, as every consumer deletes its inputs: the next one meets the same disk state
        return s, 0
    if who == "ingestd":
        d = start_daemon(wd, os.cpu_count() or 1)
        try:
            s = drop_and_wait(wd, payload, lambda: check_alive(d), 120)
        finally:
            stop_daemon(d)
    else:
        cmd = [*baseline("poll_move"), str(wd), "--period", "1.0"] if who == "poll" \
            else [*baseline("watchdog_move"), str(wd)]
        p = spawn(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        try:
            if who == "watchdog":
                assert p.stdout is not None
                if p.stdout.readline().strip() != b"ready":  # its observer is watching
                    raise RuntimeError(f"{cmd[1]} did not start (is the `bench` extra installed?)")
            else:
                time.sleep(0.2)

            def alive() -> None:
                if p.poll() is not None:
                    raise RuntimeError(f"{cmd[1]} exited {p.returncode}")

            s = drop_and_wait(wd, payload, alive, 120)
        finally:
            reap(p)
    bad = wrong_outputs(wd, payload)
    shutil.rmtree(root)
    return s, bad


def run(work: Path, t: Table, quick: bool) -> None:
    reps = 1 if quick else 3
    payload = text_block(random.Random(13), KIB, (3, 8))
    secs = {who: Rep() for who in CONSUMERS}
    bad = dict.fromkeys(CONSUMERS, 0)
    for rep in range(reps):
        order = CONSUMERS[rep % 4:] + CONSUMERS[:rep % 4]  # in turn: the disk's state after the one before
        for who in order:
            note(f"drain: {N} x 1 KiB written in place, consumer {who} (rep {rep + 1}/{reps})")
            s, b = one(work, who, payload)
            secs[who].add(s)
            bad[who] += b
    if bad["ingestd"]:
        raise RuntimeError(f"ingestd published {bad['ingestd']} wrong outputs in the drain")
    ing = secs["ingestd"]
    t.add("2.1", f"drain {N:,} x 1 KiB written in place (durable)", ing.fmt(f_s),
          "1 s polling loop, shutil.move + line upper, no fsync", secs["poll"].fmt(f_s),
          faster(secs["poll"].mid, ing.mid), seconds=ing, baseline_seconds=secs["poll"], files=N)
    t.add("2.2", "", "", "watchdog-library script (on_closed), no fsync", secs["watchdog"].fmt(f_s),
          faster(secs["watchdog"].mid, ing.mid), baseline_seconds=secs["watchdog"])
    floor = secs["none"]
    t.add("2.3", "  the producer alone, no consumer (the floor of any drain)", "",
          "watchdog script's drain / this floor: the most any consumer could gain on it", floor.fmt(f_s),
          f"{secs['watchdog'].mid / floor.mid:.2f}x", floor_seconds=floor)
    for who, key in (("poll", "2.4"), ("watchdog", "2.5")):
        if bad[who]:
            t.add(key, "", "", f"  {who}: outputs not equal to the uppercased input", f"{bad[who]} of {N * reps}",
                  wrong=bad[who])
    t.notes.append("drain (2.x): the ratio is a speed-up, baseline seconds / ingestd seconds")
    wdr, pr = secs["watchdog"].mid / ing.mid, secs["poll"].mid / ing.mid
    t.target(">= 1.5x faster than the watchdog script, drain of 2,000 x 1 KiB", f"{wdr:.2f}x", wdr >= 1.5)
    t.target(">= 0.5x the 1 s polling script, same drain", f"{pr:.2f}x", pr >= 0.5)
