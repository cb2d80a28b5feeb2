"""1. End-to-end durable throughput of 1 KiB files, disk and tmpfs, vs bench/baselines/durable_loop.py.

The daemon (--workers 1 and 2), ready, gets N staged files renamed into unprocessed/ at once (a
producer's atomic drop); files/s = files processed / (last `processed` event - first rename). The
baseline does the same durable syscalls per file in 1 and 2 processes over as many files. Both are
time-boxed (a loaded disk can be very slow); the rate is what matters.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

from bench.harness import (
    KIB,
    Rep,
    Table,
    baseline,
    check_alive,
    events,
    f_ms,
    f_rate,
    fresh,
    iso_ts,
    make_files,
    note,
    on_tmpfs,
    pct,
    ratio,
    start_daemon,
    stop_daemon,
    text_block,
    timed_run,
    tmpfs_dir,
    visible,
    wait_until,
)


def baseline_rate(work: Path, n: int, procs: int, payload: bytes, box: float) -> float:
    """Files/s of durable_loop.py in `procs` processes on n fresh files, for at most `box` s."""
    in_dir, out_dir = fresh(work, "base-in"), fresh(work, "base-out")
    make_files(in_dir, n, payload)
    os.sync()  # the creation's dirty pages are not this run's cost
    _, _, out = timed_run([*baseline("durable_loop"), str(in_dir), str(out_dir), "--procs", str(procs),
                           "--seconds", str(box)])
    res = json.loads(out)
    done = visible(out_dir)
    if not done or res["files"] != len(done) or (out_dir / done[0]).read_bytes() != payload.upper():
        raise RuntimeError(f"baseline loop wrong: {res}, {len(done)} outputs")
    shutil.rmtree(in_dir)
    shutil.rmtree(out_dir)
    return float(res["files"] / res["seconds"])


def daemon_rate(work: Path, n: int, workers: int, payload: bytes, box: float) -> dict[str, Any]:
    root = fresh(work, f"tp-w{workers}")
    stage = fresh(root, "stage")
    wd = root / "watch"
    names = make_files(stage, n, payload)
    os.sync()
    d = start_daemon(wd, workers)
    try:
        unprocessed = wd / "unprocessed"
        t0 = time.time()
        deadline = time.monotonic() + box
        for name in names:
            os.rename(stage / name, unprocessed / name)

        def done() -> bool:
            check_alive(d)
            return len(events(d, "processed")) + len(events(d, "failed")) >= n or time.monotonic() >= deadline

        wait_until(done, box + 60, f"{n} files processed by the daemon", interval=0.05)
    finally:
        stop_daemon(d)  # a warm stop: the files in flight finish, the rest stay queued
    processed, failed = events(d, "processed"), events(d, "failed")
    overflows = len(events(d, "overflow"))
    out = visible(wd / "processed")
    if failed or not processed or len(out) != len(processed) \
            or (wd / "processed" / processed[0]["file"]).read_bytes() != payload.upper():
        raise RuntimeError(f"daemon run wrong: {len(failed)} failed, {len(out)} outputs, {len(processed)} events")
    t_end = max(iso_ts(e["timestamp"]) for e in processed)
    shutil.rmtree(root)
    return {"rate": len(processed) / (t_end - t0), "overflows": overflows,
            "file_p50": pct([e["duration"] for e in processed], 50)}


def fsync_probe(folder: Path, n: int = 100) -> float:
    """p50 of one durable 1 KiB write (write, fsync) here and now: how loaded the disk is."""
    lat = []
    for i in range(n):
        p = folder / f".probe-{i}"
        t0 = time.perf_counter()
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, b"x" * KIB)
        os.fsync(fd)
        os.close(fd)
        lat.append(time.perf_counter() - t0)
        p.unlink()
    return pct(lat, 50)


def run(work: Path, t: Table, quick: bool) -> None:
    n, box, reps = (2000, 3.0, 1) if quick else (10000, 8.0, 3)
    payload = text_block(random.Random(7), KIB, (3, 8))
    shm = tmpfs_dir(work)
    places = [("disk", work)] + ([("tmpfs", shm)] if on_tmpfs(shm) else [])
    res: dict[tuple[str, str, int], Rep] = {}
    per_file: dict[tuple[str, int], Rep] = {}
    probes = Rep()
    overflows = 0
    for rep in range(reps):
        probes.add(fsync_probe(work))
        for where, folder in places:
            for w in (1, 2):  # interleaved, so drift in the machine's load hits both sides alike
                note(f"throughput ({where}): baseline loop, {w} process(es), up to {n} files or {box:.0f} s "
                     f"(rep {rep + 1}/{reps})")
                res.setdefault((where, "base", w), Rep()).add(baseline_rate(folder, n, w, payload, box))
                note(f"throughput ({where}): daemon --workers {w}, up to {n} files or {box:.0f} s "
                     f"(rep {rep + 1}/{reps})")
                r = daemon_rate(folder, n, w, payload, box)
                res.setdefault((where, "daemon", w), Rep()).add(r["rate"])
                per_file.setdefault((where, w), Rep()).add(r["file_p50"])
                overflows += r["overflows"]
    probes.add(fsync_probe(work))
    key = 1
    for where, _ in places:
        for w in (1, 2):
            dm, bs = res[(where, "daemon", w)], res[(where, "base", w)]
            t.add(f"1.{key}", f"end to end 1 KiB files ({where}), --workers {w}", dm.fmt(f_rate),
                  f"bare durable Python loop, {w} proc", bs.fmt(f_rate), ratio(dm.mid, bs.mid, "higher"),
                  files_per_s=dm, baseline_files_per_s=bs, files=n)
            key += 1
    for where, _ in places:
        t.add(f"1.{key}", f"  time per file in a worker p50 ({where}), --workers 1 / 2",
              f"{per_file[(where, 1)].fmt(f_ms)} / {per_file[(where, 2)].fmt(f_ms)}",
              seconds_w1=per_file[(where, 1)], seconds_w2=per_file[(where, 2)])
        key += 1
    t.add(f"1.{key}", "  disk: one 1 KiB write+fsync p50 (probes)", probes.fmt(f_ms), "expected of an SSD: 0.15-0.4 ms",
          seconds=probes)
    r2 = res[("disk", "daemon", 2)].mid / res[("disk", "base", 2)].mid
    t.target(">= 2x the bare per-file-fsync loop, durable small files, all workers (disk, 2)", f"{r2:.2f}x", r2 >= 2)
    if ("tmpfs", "daemon", 1) in res:
        r1 = res[("tmpfs", "daemon", 1)].mid / res[("tmpfs", "base", 1)].mid
        t.target(">= 0.5x the bare loop on tmpfs, 1 worker (software overhead)", f"{r1:.3f}x", r1 >= 0.5)
    if overflows:
        t.notes.append(f"throughput: {overflows} inotify overflow(s) during the drops (each costs a rescan)")
