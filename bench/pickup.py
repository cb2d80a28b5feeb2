"""3. Pickup latency: files written one by one (open, write 1 KiB, close) at random 20-60 ms intervals;
latency = the daemon's `claimed` event - close(). Baseline: bench/baselines/claim_poller.py, listing a
folder every 1 s and claiming (renaming) what it finds, fed the same way."""

from __future__ import annotations

import math
import os
import random
import re
import shutil
import subprocess
import time
from pathlib import Path

from bench.harness import (
    KIB,
    Table,
    address,
    baseline,
    events,
    f_ms,
    fresh,
    http_get,
    note,
    pct,
    ratio,
    reap,
    spawn,
    start_daemon,
    stop_daemon,
    text_block,
    wait_until,
)


def write_paced(folder: Path, seconds: float, seed: int) -> dict[str, float]:
    """Write 1 KiB files one by one at random intervals (20-60 ms); returns name -> wall time of close()."""
    rng = random.Random(seed)
    payload = text_block(random.Random(3), KIB, (3, 8))
    closed: dict[str, float] = {}
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        name = f"p{i:05d}.txt"
        fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, payload)
        os.close(fd)
        closed[name] = time.time()
        i += 1
        time.sleep(rng.uniform(0.02, 0.06))
    return closed


def histogram_quantiles(text: str, metric: str, qs: tuple[float, ...]) -> tuple[int, list[str]]:
    """Upper bucket bounds holding the given quantiles of a Prometheus histogram."""
    buckets = []
    for m in re.finditer(rf'^{metric}_bucket{{le="([^"]+)"}} ([0-9.e+]+)$', text, re.MULTILINE):
        buckets.append((float(m.group(1)), float(m.group(2))))
    total = buckets[-1][1] if buckets else 0
    out = []
    for q in qs:
        le = next((b for b, c in buckets if c >= q * total), math.inf)
        out.append(f"<= {le * 1e3:g} ms" if le != math.inf else "+Inf")
    return int(total), out


def run(work: Path, t: Table, quick: bool) -> None:
    seconds = 4.0 if quick else 15.0
    root = fresh(work, "pickup")
    note(f"pickup: daemon (inotify), files written one by one for {seconds:.0f} s")
    d = start_daemon(root / "watch", 2)
    try:
        time.sleep(0.5)
        closed = write_paced(root / "watch" / "unprocessed", seconds, 11)
        wait_until(lambda: len(events(d, "processed")) >= len(closed), 30, "all processed", interval=0.05)
        claimed = {e["file"]: e["claimed_at"] for e in events(d, "processed")}  # one log line per file
        lat = [claimed[n] - c for n, c in closed.items()]
        _, metrics = http_get(address(d), "/metrics")
        hcount, hq = histogram_quantiles(metrics.decode(), "ingestd_pickup_latency_seconds", (0.5, 0.99))
    finally:
        stop_daemon(d)

    note(f"pickup: baseline 1 s poller, files written one by one for {seconds:.0f} s")
    src, dst = fresh(root, "poll-in"), fresh(root, "poll-out")
    out_path = root / "poller.out"
    with open(out_path, "wb") as out:
        p = spawn([*baseline("claim_poller"), str(src), str(dst), "1.0"], stdout=out, stdin=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        pclosed = write_paced(src, seconds, 11)
        wait_until(lambda: len(out_path.read_text().splitlines()) >= len(pclosed), 10, "poller claims")
    finally:
        reap(p)
    ptimes = dict(line.split() for line in out_path.read_text().splitlines())
    plat = [float(ptimes[n]) - c for n, c in pclosed.items()]
    shutil.rmtree(root)

    for p_, key in ((50, "3.1"), (99, "3.2")):
        a, b = pct(lat, p_), pct(plat, p_)
        t.add(key, f"pickup close->claimed p{p_} ({len(lat)} files)", f_ms(a),
              f"1 s polling loop p{p_} ({len(plat)} files)", f_ms(b), ratio(a, b, "lower"),
              seconds=a, baseline_seconds=b)
    t.add("3.3", "  max close->claimed", f_ms(max(lat)), "1 s polling loop max", f_ms(max(plat)),
          seconds=max(lat), baseline_seconds=max(plat))
    t.add("3.4", "  ingestd_pickup_latency_seconds p50 / p99", f"{hq[0]} / {hq[1]}",
          "(the daemon's own histogram)", f"{hcount} observations")
    t.target("pickup p99 < 50 ms", f_ms(pct(lat, 99)), pct(lat, 99) < 0.050)
