"""The floor: what one file costs the daemon's parent process at least, step by step, next to the bare loop.

Each step is one the parent must take per file for a guarantee or a feature the brief asks for (the kernel's
completeness check, the claim rename, the commit unlink, one JSON log line, the metrics, the hand-off to a
worker, the watch's events), timed alone in a tight loop on the same folder: nothing else runs. Their sum is
the least the parent can spend per file; issue 10's tmpfs target (0.5x the bare loop) leaves it twice the bare loop's time per file.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from pathlib import Path

from bench.harness import Table, fresh, note, tmpfs_dir

N = 5_000


def _per_file(step: Callable[[int], None], n: int) -> float:
    """Microseconds per call of step(i) for i in range(n), best of three."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(n):
            step(i)
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e6


def _echo(conn: multiprocessing.connection.Connection) -> None:  # type: ignore[name-defined]
    while True:
        msg = conn.recv()
        if msg is None:
            return
        conn.send(("done", msg))


def _events(src: Path, watched: Path, names: list[str]) -> float:
    """Microseconds per file to read and parse the three inotify events each claimed file raises on the watched
    folder (its arrival's IN_MOVED_TO, the read lease's IN_OPEN, the claim's IN_MOVED_FROM; the lease's close
    comes after the rename, on the unwatched folder), best of three. The files of `src` are moved through the new
    folder `watched` and back, untimed, 1,000 at a time (below the kernel's default queue of 16,384 events); only
    ingestd.watch.Watch.read() is timed."""
    from ingestd.watch import Watch

    chunk, best = 1_000, float("inf")
    watched.mkdir()
    watch = Watch(str(watched))
    try:
        for _ in range(3):
            took = 0.0
            for at in range(0, len(names), chunk):
                for name in names[at:at + chunk]:
                    a, b = os.path.join(src, name), os.path.join(watched, name)
                    os.rename(a, b)  # IN_MOVED_TO: it arrives
                    fd = os.open(b, os.O_RDONLY)  # IN_OPEN: the lease's open
                    os.rename(b, a)  # IN_MOVED_FROM: the claim
                    os.close(fd)
                t0 = time.perf_counter()
                got = sum(1 for _ in watch.read())
                took += time.perf_counter() - t0
                if got != 3 * len(names[at:at + chunk]):
                    raise RuntimeError(f"floor: {got} events read for {len(names[at:at + chunk])} files, not 3 each")
            best = min(best, took)
    finally:
        watch.close()
    return best / len(names) * 1e6


def run(work: Path, t: Table, quick: bool) -> dict[str, float]:
    from ingestd import durable, lease
    from ingestd.log import event, setup
    from ingestd.metrics import Metrics

    n = 1_000 if quick else N
    base = fresh(tmpfs_dir(work, need=64 << 20), "floor")
    src, dst, out = base / "in", base / "under", base / "out"
    for d in (src, dst, out):
        d.mkdir()
    payload = b"x" * 1023 + b"\n"
    names = [f"f{i:06d}" for i in range(n)]

    def fill() -> None:
        for name in names:
            (src / name).write_bytes(payload)

    def bare(i: int) -> None:  # bench/baselines/durable_loop.py's body (fsync is a no-op on tmpfs)
        p = os.path.join(src, names[i])
        fd = os.open(p, os.O_RDONLY)
        data = os.read(fd, 1 << 16).upper()
        os.close(fd)
        tmp = os.path.join(out, ".t" + names[i])
        wfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(wfd, data)
        os.fsync(wfd)
        os.close(wfd)
        os.rename(tmp, os.path.join(out, names[i]))
        dfd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)
        os.close(dfd)
        os.unlink(p)

    figures: dict[str, float] = {}
    best = float("inf")  # bare() consumes its inputs: a fresh fill before each of three timed rounds
    for _ in range(3):
        fill()
        for f in out.iterdir():
            f.unlink()
        t0 = time.perf_counter()
        for i in range(n):
            bare(i)
        best = min(best, time.perf_counter() - t0)
    figures["bare loop (whole durable work of a file)"] = best / n * 1e6

    fill()

    def check(i: int) -> None:
        with lease.read_lease(os.path.join(src, names[i])) as held:
            held.verdict  # noqa: B018 - the kernel's answer is the work

    figures["completeness check (read lease)"] = _per_file(check, n)

    def claim(i: int) -> None:
        a, b = os.path.join(src, names[i]), os.path.join(dst, names[i])
        durable.rename_noreplace(a, b)
        os.lstat(b)
        durable.rename(b, a)  # back, so the next round finds it (counted: halve below)

    figures["claim (rename, lstat; a rename back, halved)"] = _per_file(claim, n) / 2

    stream = io.StringIO()  # formatting alone: the journal's socket or a terminal costs more on top
    setup("json")
    for h in (*logging.getLogger().handlers, *logging.getLogger("ingestd").handlers):
        if isinstance(h, logging.StreamHandler):
            h.setStream(stream)  # type: ignore[arg-type]

    def log_line(i: int) -> None:
        event("processed", "file processed", file=names[i], bytes_in=1024, lines_in=1, bytes_out=1024,
              duration=0.000321, worker=1)
        if stream.tell() > 1 << 22:
            stream.seek(0)
            stream.truncate()

    figures["one JSON log line"] = _per_file(log_line, n)
    m = Metrics(lambda: {})

    def metrics(i: int) -> None:
        m.files.labels("processed").inc()
        m.bytes_in.inc(1024)
        m.bytes_out.inc(1024)
        m.lines_in.inc(1)
        m.lines_out.inc(1)
        m.records.labels("processed").inc(1)
        m.duration.observe(0.0003)
        m.last_success.set(1.0)

    figures["metrics of a file"] = _per_file(metrics, n)
    parent, child = multiprocessing.Pipe()
    p = multiprocessing.get_context("fork").Process(target=_echo, args=(child,), daemon=True)
    p.start()
    batch = 64

    def hand_off(i: int) -> None:
        if i % batch == 0:
            parent.send(("assign", names[i:i + batch]))
            parent.recv()

    figures[f"hand-off to a worker and back (batches of {batch})"] = _per_file(hand_off, n)
    parent.send(None)
    p.join()

    def commit(i: int) -> None:
        a = os.path.join(dst, names[i])
        os.link(os.path.join(src, names[i]), a)
        durable.unlink(a)  # the commit: unlink(underprocess/NAME)

    figures["commit (unlink; a link to make it, halved)"] = _per_file(commit, n) / 2
    figures["the watch's 3 events of a file, read and parsed"] = _events(src, base / "watched", names)
    bare_us = figures.pop("bare loop (whole durable work of a file)")
    floor = sum(figures.values())
    for j, (k, v) in enumerate(figures.items(), 1):
        t.add(f"9.{j}", f"floor: {k}", f"{v:.1f} us/file", us_per_file=v)
    t.add("9.9", "floor: the parent's least per file (sum of the steps above)", f"{floor:.1f} us/file",
          "bare durable loop on tmpfs, x2 (the 0.5x target's budget)", f"{2 * bare_us:.1f} us/file",
          f"{floor / (2 * bare_us):.2f}x the budget", floor_us=floor, bare_us=bare_us)
    note(f"floor: {floor:.1f} us/file of parent work vs a budget of {2 * bare_us:.1f} us/file")
    return figures
