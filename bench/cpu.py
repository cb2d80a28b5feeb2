"""5. The daemon's parent process (the main loop: claims, hand-offs, commits, logging, metrics) on CPU,
in % of one core: under saturation (both workers busy: 1 KiB files dropped at once on tmpfs, where
nothing waits for the disk) and idle (the same daemon afterwards, nothing arriving). Measured from
per-thread schedstat (ns) of the parent's threads only; its workers' share is given beside it."""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

from bench.harness import (
    KIB,
    Table,
    check_alive,
    cpu_ns,
    events,
    f_pct,
    fresh,
    make_files,
    note,
    on_tmpfs,
    start_daemon,
    stop_daemon,
    text_block,
    tmpfs_dir,
    tree_pids,
    visible,
    wait_until,
    wakeups,
)


def run(work: Path, t: Table, quick: bool) -> None:
    # Idle for one rescan interval (30 s, the default) in the full run: any such window holds exactly one rescan, the
    # idle loop's only regular wake-up, and on this VM that turn costs ~60 ms of CPU (strace: every syscall and the
    # Python between them run slowly after the sleep), which a 15 s window would miss half the time.
    n, idle_s = (3000, 5.0) if quick else (10000, 30.0)
    shm = tmpfs_dir(work)
    where = "tmpfs" if on_tmpfs(shm) else "disk"
    root = fresh(shm, "cpu")
    stage = fresh(root, "stage")
    wd = root / "watch"
    payload = text_block(random.Random(17), KIB, (3, 8))
    names = make_files(stage, n, payload)
    note(f"cpu: daemon --workers 2, {n} x 1 KiB dropped at once ({where}), then idle for {idle_s:.0f} s")
    d = start_daemon(wd, 2)
    try:
        parent = d.proc.pid
        workers = [p for p in tree_pids(parent) if p != parent]
        time.sleep(0.5)
        t0, p0, w0 = time.monotonic_ns(), cpu_ns([parent]), cpu_ns(workers)
        for name in names:
            os.rename(stage / name, wd / "unprocessed" / name)

        def done() -> bool:
            check_alive(d)
            return len(events(d, "processed")) + len(events(d, "failed")) >= n

        wait_until(done, 300, f"{n} files processed", interval=0.05)
        t1, p1, w1 = time.monotonic_ns(), cpu_ns([parent]), cpu_ns(workers)
        time.sleep(1.0)  # past the last commits and the status view's refresh
        i0, ip0, k0 = time.monotonic_ns(), cpu_ns([parent]), wakeups([parent, *workers])
        time.sleep(idle_s)
        i1, ip1, k1 = time.monotonic_ns(), cpu_ns([parent]), wakeups([parent, *workers])
    finally:
        stop_daemon(d)
    if events(d, "failed") or len(visible(wd / "processed")) != n:
        raise RuntimeError("cpu: not every file was processed")
    shutil.rmtree(root)
    busy = 100 * (p1 - p0) / (t1 - t0)
    wbusy = 100 * (w1 - w0) / (t1 - t0) / max(1, len(workers))
    idle = 100 * (ip1 - ip0) / (i1 - i0)
    wakes = (k1 - k0) / ((i1 - i0) / 1e9)
    t.add("5.1", f"parent CPU, both workers saturated ({n:,} x 1 KiB, {where}, {(t1 - t0) / 1e9:.1f} s)",
          f_pct(busy), "each worker, same window", f_pct(wbusy), percent=busy, worker_percent=wbusy)
    t.add("5.2", f"parent CPU idle, {idle_s:.0f} s after the drain", f_pct(idle), percent=idle)
    t.add("5.3", "wake-ups per second idle, parent and workers, all threads", f"{wakes:.2f}/s", wakeups_per_s=wakes)
    t.target("parent CPU under saturation < 15% of a core", f_pct(busy), busy < 15)
    t.target("parent CPU idle < 0.1% of a core", f_pct(idle), idle < 0.1)
    t.target("idle wake-ups <= 0.1/s (only the main loop's timers: the 30 s rescan; nothing polls)", f"{wakes:.2f}/s", wakes <= 0.1)
