"""6. /metrics scrape latency, empty queue vs `waiting` files waiting (done-marker mode, so they stay
waiting honestly); 7. idle CPU of those two daemons (with their workers) beside two 0.1 s listing loops
(bench/baselines/list_poller.py), one on an empty folder, one on as many files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import (
    REPO,
    DaemonProcess,
    Rep,
    Table,
    address,
    baseline,
    cpu_ns,
    f_ms,
    f_pct,
    fresh,
    http_get,
    note,
    pct,
    ratio,
    reap,
    spawn,
    start_daemon,
    stop_daemon,
    tree_pids,
    visible,
)


def link_files(folder: Path, n: int, prefix: str) -> None:
    """n directory entries, fast: hard links to a few small files (a listing costs the same per entry;
    ext4 allows 65,000 links per inode)."""
    src = folder.parent / f".{prefix}-src"
    for i in range(n):
        if i % 50_000 == 0:
            src.unlink(missing_ok=True)
            src.write_bytes(b"waiting\n")
        os.link(src, folder / f"{prefix}{i:06d}.txt")
    src.unlink(missing_ok=True)


def scrape_interleaved(daemons: list[DaemonProcess], n: int, path: str = "/metrics") -> list[tuple[list[float], int]]:
    """n GETs of path on each daemon, alternating between them so machine noise hits all alike."""
    addrs = [address(d) for d in daemons]
    for a in addrs:
        http_get(a, path)  # warm up
    lat: list[list[float]] = [[] for _ in daemons]
    size = [0 for _ in daemons]
    for _ in range(n):
        for i, a in enumerate(addrs):
            s, body = http_get(a, path)
            lat[i].append(s)
            size[i] = len(body)
            time.sleep(0.005)
    return list(zip(lat, size))


def idle_cpu(roots: list[int], seconds: float) -> list[float]:
    """% of one core used by each process tree over the same window."""
    trees = [tree_pids(r) for r in roots]
    t0, before = time.monotonic_ns(), [cpu_ns(p) for p in trees]
    time.sleep(seconds)
    t1, after = time.monotonic_ns(), [cpu_ns(p) for p in trees]
    return [100 * (a - b) / (t1 - t0) for a, b in zip(after, before)]


def run(work: Path, t: Table, quick: bool, waiting: int, only: list[str]) -> None:
    do_scrape, do_idle = "scrape" in only, "idle" in only
    n = 60 if quick else 300
    idle_s = 10.0 if quick else 30.0
    root = fresh(work, "scrape")
    started: list[DaemonProcess] = []
    try:
        note("scrape/idle: daemon on an empty queue (2 workers)")
        empty = start_daemon(fresh(root, "empty") / "watch", 2)
        started.append(empty)
        full_wd = root / "full" / "watch"
        (full_wd / "unprocessed").mkdir(parents=True)
        note(f"scrape/idle: {waiting:,} files in unprocessed/ of a done-marker daemon (2 workers)")
        link_files(full_wd / "unprocessed", waiting, "w")
        full = start_daemon(full_wd, 2, env={"INGESTD_DONE_MARKER": "true"})
        started.append(full)
        ev = full.event("started") or {}
        if ev.get("waiting") != waiting:
            raise RuntimeError(f"daemon sees {ev.get('waiting')} waiting, expected {waiting}")
        time.sleep(1.0)  # the first turns of the main loop go through the start-up scan's entries
        if do_scrape:
            note(f"scrape: {n} scrapes of /metrics on each, alternating; {n // 3} of /api/status")
            (e_lat, e_size), (f_lat, f_size) = scrape_interleaved([empty, full], n)
            (s_lat, _), = scrape_interleaved([full], n // 3, "/api/status")
            if len(visible(full_wd / "unprocessed")) != waiting:
                raise RuntimeError("files were claimed in done-marker mode")
        if do_idle:
            # The pollers get folders of their own: listing the daemon's unprocessed/ would wake it
            # (IN_OPEN / IN_CLOSE_NOWRITE on the folder itself), ten times a second.
            pe, pf = fresh(root, "poll-empty"), fresh(root, "poll-full")
            link_files(pf, waiting, "p")
            note(f"idle: both daemons and two 0.1 s pollers (empty folder, {waiting:,} files), "
                 f"side by side for {idle_s:.0f} s")
            p1 = spawn([*baseline("list_poller"), str(pe), "0.1"], stdin=subprocess.DEVNULL)
            p2 = spawn([*baseline("list_poller"), str(pf), "0.1"], stdin=subprocess.DEVNULL)
            time.sleep(1.0)  # past the pollers' start-up
            cpu = idle_cpu([empty.proc.pid, full.proc.pid, p1.pid, p2.pid], idle_s)
            reap(p1)
            reap(p2)
    finally:
        for d in started:
            stop_daemon(d)
    if do_scrape:
        # What each rescan runs, alone, in this process: a listing of each folder.
        sys.path.insert(0, str(REPO))
        from ingestd.spool import Spool

        sp = Spool(full_wd)
        counts_t = Rep()
        for _ in range(5):
            t0 = time.perf_counter()
            sp.counts()
            counts_t.add(time.perf_counter() - t0)
    if do_scrape and not quick:
        note(f"scrape: a daemon with an empty queue but {waiting:,} results left in processed/")
        for name in os.listdir(full_wd / "unprocessed"):
            os.rename(full_wd / "unprocessed" / name, full_wd / "processed" / name)
        d = start_daemon(full_wd, 1)
        try:
            time.sleep(0.5)
            (p_lat, _), = scrape_interleaved([d], n // 2)
        finally:
            stop_daemon(d)
    shutil.rmtree(root)

    if do_scrape:
        for p_, key in ((50, "6.1"), (99, "6.2")):
            a_, b_ = pct(f_lat, p_), pct(e_lat, p_)
            t.add(key, f"/metrics p{p_}, {waiting:,} waiting ({n} scrapes)", f_ms(a_),
                  f"/metrics p{p_}, empty queue ({n} scrapes)", f_ms(b_), ratio(a_, b_, "lower"),
                  seconds=a_, baseline_seconds=b_)
        t.add("6.3", "  max, empty queue / waiting", f"{f_ms(max(e_lat))} / {f_ms(max(f_lat))}",
              "response size, empty queue / waiting", f"{e_size:,} / {f_size:,} B")
        t.add("6.4", f"/api/status p50 / p99, {waiting:,} waiting",
              f"{f_ms(pct(s_lat, 50))} / {f_ms(pct(s_lat, 99))}", p50=pct(s_lat, 50), p99=pct(s_lat, 99))
        t.add("6.5", f"  Spool.counts() alone (what each rescan runs), {waiting:,} waiting", counts_t.fmt(f_ms),
              seconds=counts_t)
        if not quick:
            t.add("6.6", f"/metrics p50 / p99, empty queue, {waiting:,} in processed/",
                  f"{f_ms(pct(p_lat, 50))} / {f_ms(pct(p_lat, 99))}", p50=pct(p_lat, 50), p99=pct(p_lat, 99))
        t.target(f"/metrics p99 < 50 ms with {waiting:,} waiting", f_ms(pct(f_lat, 99)), pct(f_lat, 99) < 0.050)
    if do_idle:
        t.add("7.1", f"idle CPU over {idle_s:.0f} s, empty queue (daemon + workers)", f_pct(cpu[0]),
              "0.1 s polling loop, empty folder", f_pct(cpu[2]), ratio(cpu[0], cpu[2], "lower"),
              percent=cpu[0], baseline_percent=cpu[2])
        t.add("7.2", f"idle CPU over {idle_s:.0f} s, {waiting:,} waiting", f_pct(cpu[1]),
              f"0.1 s polling loop, {waiting:,} files", f_pct(cpu[3]), ratio(cpu[1], cpu[3], "lower"),
              percent=cpu[1], baseline_percent=cpu[3])

