#!/usr/bin/env python3
"""ingestd benchmarks: figures for the real daemon, each beside a baseline measured in the same run.

    .venv/bin/python bench/run.py            # a few minutes
    .venv/bin/python bench/run.py --quick    # about a minute, fewer files and repeats
    .venv/bin/python bench/run.py --only scrape,idle --dir /var/tmp

Not a test: nothing here passes or fails, except a sanity check that the work was really done
(every file processed, outputs uppercased). See docs/benchmarks.md for what each line means.

Everything runs under one temporary folder (--dir, default /tmp; it must be a real disk for the
fsync figures to mean anything) plus, for the engine's CPU-bound streaming figures, one under
/dev/shm. Every process started here is killed, and every folder removed, on the way out
(also on Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
KIB = 1024
MB = 1_000_000

# --------------------------------------------------------------------------------------------------
# Process and folder hygiene: everything started is tracked and killed at exit.
# --------------------------------------------------------------------------------------------------

_procs: list[subprocess.Popen[bytes]] = []  # each started in its own session (process group)
_forked: list[int] = []
_dirs: list[Path] = []


def spawn(cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(cmd, start_new_session=True, **kw)
    _procs.append(p)
    return p


def kill_group(p: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """Signal the process group we created for p (its workers and helpers are in it too)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, sig)


def reap(p: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGKILL whatever is left of p's group and wait for p."""
    kill_group(p)
    with contextlib.suppress(subprocess.TimeoutExpired, ChildProcessError):
        p.wait(timeout)
    if p in _procs:
        _procs.remove(p)


def cleanup() -> None:
    for p in _procs[:]:  # (reap removes from it)
        reap(p)
    for pid in _forked[:]:  # (the loop removes from it)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        _forked.remove(pid)
    for d in list(_dirs):
        shutil.rmtree(d, ignore_errors=True)
        _dirs.remove(d)


def _on_term(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment minus anything that would change the daemon's settings or talk to systemd."""
    drop = ("MODE", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "JOURNAL_STREAM")
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_") and k not in drop}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def note(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Small statistics and formatting
# --------------------------------------------------------------------------------------------------

def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


class Rep:
    """Repeated measures of one figure: median, with the range when repeated."""

    def __init__(self, values: list[float] | None = None) -> None:
        self.values = list(values or [])

    def add(self, v: float) -> None:
        self.values.append(v)

    @property
    def mid(self) -> float:
        return statistics.median(self.values)

    def fmt(self, f: Callable[[float], str]) -> str:
        if len(self.values) < 2:
            return f(self.mid)
        return f"{f(self.mid)} [{f(min(self.values))}..{f(max(self.values))}]"


def f_ms(v: float) -> str:
    return f"{v * 1e3:.1f} ms" if v >= 0.01 else f"{v * 1e3:.2f} ms"


def f_rate(v: float) -> str:
    return f"{v:,.0f} files/s"


def f_mbs(v: float) -> str:
    return f"{v:,.0f} MB/s"


def f_pct(v: float) -> str:
    return f"{v:.3f}%" if v < 1 else f"{v:.1f}%"


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, ...]] = []
        self.notes: list[str] = []

    def add(self, key: str, what: str, value: str, base_what: str = "", base_value: str = "", ratio: str = "") -> None:
        self.rows.append((key, what, value, base_what, base_value, ratio))

    def render(self) -> str:
        head = ("#", "measure (ingestd)", "value", "baseline (same run)", "baseline value", "ratio")
        rows = [head, *self.rows]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
        out = [line(head), "  ".join("-" * w for w in widths)]
        out += [line(r) for r in self.rows]
        return "\n".join(out)


def ratio(a: float, b: float, better: str) -> str:
    """a/b, with which way is better (so no reader has to guess)."""
    if b == 0:
        return "n/a"
    r = a / b
    txt = f"{r:.2f}x" if r >= 0.1 else f"{r:.3f}x"
    return f"{txt} ({better} is better)"


# --------------------------------------------------------------------------------------------------
# The real daemon, as a subprocess; its JSON log goes to a file (read afterwards, not while it runs hot)
# --------------------------------------------------------------------------------------------------

class Daemon:
    def __init__(self, watch_dir: Path, workers: int, env: dict[str, str] | None = None, cwd: Path | None = None):
        self.watch_dir = watch_dir
        self.log_path = watch_dir.parent / f"{watch_dir.name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self._pos = 0
        self._partial = b""
        self.counts: dict[bytes, int] = {}
        cmd = [PY, "-m", "ingestd", "run", "--watch-dir", str(watch_dir), "--listen", "127.0.0.1:0",
               "--workers", str(workers), "--mode", "uppercase", "--log-format", "json"]
        self.proc = spawn(cmd, stdout=subprocess.DEVNULL, stderr=self._log, stdin=subprocess.DEVNULL,
                          env=clean_env(**(env or {})), cwd=cwd or watch_dir.parent)
        self.addr = ("", 0)

    def events(self) -> list[dict[str, Any]]:
        out = []
        with open(self.log_path, "rb") as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def tail_count(self, *names: str) -> dict[str, int]:
        """Count events by name in what the log gained since the last call (cheap: no JSON parsing)."""
        with open(self.log_path, "rb") as f:
            f.seek(self._pos)
            data = f.read()
        self._pos += len(data)
        data = self._partial + data
        cut = data.rfind(b"\n") + 1
        self._partial, data = data[cut:], data[:cut]
        for n in names:
            needle = b'"event": "' + n.encode() + b'"'
            self.counts[needle] = self.counts.get(needle, 0) + data.count(needle)
        return {n: self.counts.get(b'"event": "' + n.encode() + b'"', 0) for n in names}

    def started(self, timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.events():
                if ev.get("event") == "started":
                    host, _, port = ev["listen"].rpartition(":")
                    self.addr = (host, int(port))
                    return ev
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.02)
        raise RuntimeError("daemon did not start")

    def get(self, path: str, timeout: float = 30.0) -> tuple[float, bytes]:
        """One HTTP GET on a fresh connection (the server speaks HTTP/1.0); (seconds to the last byte, body)."""
        t0 = time.perf_counter()
        c = http.client.HTTPConnection(*self.addr, timeout=timeout)
        try:
            c.request("GET", path)
            r = c.getresponse()
            body = r.read()
            if r.status != 200:
                raise RuntimeError(f"GET {path}: {r.status}")
        finally:
            c.close()
        return time.perf_counter() - t0, body

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        reap(self.proc)
        self._log.close()


def tree_pids(root: int) -> list[int]:
    """root and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_ns(pids: list[int]) -> int:
    """Nanoseconds on CPU, all threads of these processes (schedstat: ns precision, unlike clock ticks)."""
    total = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except OSError:
                continue
    return total


def iso_ts(s: str) -> float:
    return datetime.fromisoformat(s).timestamp()


def wait_until(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s: {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------

def text_block(rng: random.Random, size: int, words_per_line: tuple[int, int] = (3, 20)) -> bytes:
    """Lower-case ASCII words in lines, exactly `size` bytes, ending with a newline."""
    vocab = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 10))) for _ in range(2000)]
    parts, n = [], 0
    while n < size:
        line = " ".join(rng.choices(vocab, k=rng.randint(*words_per_line))) + "\n"
        parts.append(line)
        n += len(line)
    data = "".join(parts).encode()[:size]
    return data[:-1] + b"\n"


def make_files(folder: Path, n: int, payload: bytes, prefix: str = "f") -> list[str]:
    names = [f"{prefix}{i:06d}.txt" for i in range(n)]
    for name in names:
        fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, payload)
        os.close(fd)
    return names


def visible(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        return [e.name for e in it if not e.name.startswith(".") and e.is_file(follow_symlinks=False)]


def fresh(parent: Path, name: str) -> Path:
    p = parent / name
    shutil.rmtree(p, ignore_errors=True)
    p.mkdir(parents=True)
    return p


# --------------------------------------------------------------------------------------------------
# 1. End-to-end throughput: the daemon vs a bare durable Python loop (time-boxed: a noisy disk can be slow)
# --------------------------------------------------------------------------------------------------

def durable_loop(in_dir: str, out_dir: str, names: list[str], deadline: float) -> None:
    """The same durable work per file as the daemon, and nothing else:
    read, uppercase, write a temp, fsync it, rename, fsync the folder, unlink the input."""
    for name in names:
        if time.monotonic() >= deadline:
            return
        src = os.path.join(in_dir, name)
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        os.close(fd)
        data = b"".join(chunks).upper()
        tmp = os.path.join(out_dir, ".tmp-" + name)
        wfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        view = memoryview(data)
        while view:
            view = view[os.write(wfd, view):]
        os.fsync(wfd)
        os.close(wfd)
        os.rename(tmp, os.path.join(out_dir, name))
        dfd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        os.fsync(dfd)
        os.close(dfd)
        os.unlink(src)


def baseline_throughput(work: Path, n: int, procs: int, payload: bytes, box: float) -> float:
    """Files/s of `procs` forked processes running durable_loop on shares of n files, for at most `box` s."""
    in_dir, out_dir = fresh(work, "base-in"), fresh(work, "base-out")
    names = make_files(in_dir, n, payload)
    os.sync()  # the creation's dirty pages are not this run's cost
    t0 = time.perf_counter()
    deadline = time.monotonic() + box
    pids = []
    for k in range(procs):
        pid = os.fork()
        if pid == 0:  # child
            code = 0
            try:
                durable_loop(str(in_dir), str(out_dir), names[k::procs], deadline)
            except BaseException:  # noqa: BLE001
                code = 1
            os._exit(code)
        _forked.append(pid)
        pids.append(pid)
    bad = 0
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        _forked.remove(pid)
        bad += os.waitstatus_to_exitcode(status) != 0
    elapsed = time.perf_counter() - t0
    done = len(visible(out_dir))
    if bad or not done:
        raise RuntimeError("baseline loop failed")
    shutil.rmtree(in_dir)
    shutil.rmtree(out_dir)
    return done / elapsed


def daemon_throughput(work: Path, n: int, workers: int, payload: bytes, box: float) -> dict[str, Any]:
    """Start the daemon, wait for READY, then rename n staged files into unprocessed/ (a producer's
    atomic drop) and time from the first rename to the last `processed` event (within `box` s)."""
    root = fresh(work, f"tp-w{workers}")
    stage = fresh(root, "stage")
    wd = root / "watch"
    names = make_files(stage, n, payload)
    os.sync()
    d = Daemon(wd, workers)
    try:
        d.started()
        unprocessed = wd / "unprocessed"
        t0 = time.time()
        deadline = time.monotonic() + box
        for name in names:
            os.rename(stage / name, unprocessed / name)

        def done() -> bool:
            c = d.tail_count("processed", "failed")
            if d.proc.poll() is not None:
                raise RuntimeError(f"daemon died: {d.log_path.read_text()[-2000:]}")
            return c["processed"] + c["failed"] >= n or time.monotonic() >= deadline

        wait_until(done, box + 60, f"{n} files processed by the daemon", interval=0.05)
        d.stop()  # a warm stop: the files in flight finish, the rest stay queued
        evs = d.events()
        processed = [e for e in evs if e.get("event") == "processed"]
        failed = [e for e in evs if e.get("event") == "failed"]
        overflows = sum(1 for e in evs if e.get("event") == "overflow")
        t_end = max(iso_ts(e["timestamp"]) for e in processed)
        out = visible(wd / "processed")
        first = wd / "processed" / processed[0]["file"]
        if failed or len(out) != len(processed) or first.read_bytes() != payload.upper():
            raise RuntimeError(f"daemon run wrong: {len(failed)} failed, {len(out)} outputs, {len(processed)} events")
        durations = [e["duration"] for e in processed]
    finally:
        d.stop()
    shutil.rmtree(root)
    return {"rate": len(processed) / (t_end - t0), "done": len(processed), "overflows": overflows,
            "file_p50": pct(durations, 50)}


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


def bench_throughput(work: Path, t: Table, quick: bool) -> None:
    n, box, reps = (2000, 3.0, 1) if quick else (10000, 8.0, 3)
    payload = text_block(random.Random(7), KIB, (3, 8))
    shm = engine_dir(work)  # tmpfs, where fsync costs nothing: the daemon's own overhead, not the disk's
    places = [("disk", work, n, box)] + ([("tmpfs", shm, n, box)] if str(shm).startswith("/dev/shm") else [])
    res: dict[tuple[str, str, int], Rep] = {}
    per_file: dict[tuple[str, int], Rep] = {}
    probes = Rep()
    overflows = 0
    for rep in range(reps):
        probes.add(fsync_probe(work))
        for where, folder, count, limit in places:
            for w in (1, 2):  # interleaved, so drift in the machine's load hits both sides alike
                note(f"throughput ({where}): baseline loop, {w} process(es), up to {count} files or {limit:.0f} s "
                     f"(rep {rep + 1}/{reps})")
                res.setdefault((where, "base", w), Rep()).add(baseline_throughput(folder, count, w, payload, limit))
                note(f"throughput ({where}): daemon --workers {w}, up to {count} files or {limit:.0f} s "
                     f"(rep {rep + 1}/{reps})")
                r = daemon_throughput(folder, count, w, payload, limit)
                res.setdefault((where, "daemon", w), Rep()).add(r["rate"])
                per_file.setdefault((where, w), Rep()).add(r["file_p50"])
                overflows += r["overflows"]
    probes.add(fsync_probe(work))
    key = 1
    for where, *_ in places:
        for w in (1, 2):
            dm, bs = res[(where, "daemon", w)], res[(where, "base", w)]
            t.add(f"1.{key}", f"end to end 1 KiB files ({where}), --workers {w}", dm.fmt(f_rate),
                  f"bare durable Python loop, {w} proc", bs.fmt(f_rate), ratio(dm.mid, bs.mid, "higher"))
            key += 1
    for where, *_ in places:
        t.add(f"1.{key}", f"  time per file in a worker p50 ({where}), --workers 1 / 2",
              f"{per_file[(where, 1)].fmt(f_ms)} / {per_file[(where, 2)].fmt(f_ms)}")
        key += 1
    t.add(f"1.{key}", "  disk: one 1 KiB write+fsync p50 (probes)", probes.fmt(f_ms), "RELIABILITY.md: 0.15-0.4 ms")
    if overflows:
        t.notes.append(f"throughput: {overflows} inotify overflow(s) during the drops (each costs a rescan)")


# --------------------------------------------------------------------------------------------------
# 2. Pickup latency: inotify daemon vs a 1 s poller
# --------------------------------------------------------------------------------------------------

CLAIM_POLLER = r"""
import os, sys, time
src, dst, period = sys.argv[1], sys.argv[2], float(sys.argv[3])
while True:
    with os.scandir(src) as it:
        names = [e.name for e in it if not e.name.startswith(".")]
    for n in names:
        try:
            os.rename(os.path.join(src, n), os.path.join(dst, n))
        except FileNotFoundError:
            continue
        sys.stdout.write(f"{n} {time.time():.6f}\n")
    sys.stdout.flush()
    time.sleep(period)
"""


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


def bench_pickup(work: Path, t: Table, quick: bool) -> None:
    seconds = 4.0 if quick else 15.0
    root = fresh(work, "pickup")
    note(f"pickup: daemon (inotify), files written one by one for {seconds:.0f} s")
    d = Daemon(root / "watch", 2)
    try:
        d.started()
        time.sleep(0.5)
        closed = write_paced(root / "watch" / "unprocessed", seconds, 11)
        wait_until(lambda: d.tail_count("claimed")["claimed"] >= len(closed), 30, "all claimed")
        claimed = {e["file"]: iso_ts(e["timestamp"]) for e in d.events() if e.get("event") == "claimed"}
        lat = [claimed[n] - c for n, c in closed.items()]
        _, metrics = d.get("/metrics")
        hcount, hq = histogram_quantiles(metrics.decode(), "ingestd_pickup_latency_seconds", (0.5, 0.99))
    finally:
        d.stop()

    note(f"pickup: baseline 1 s poller, files written one by one for {seconds:.0f} s")
    src, dst = fresh(root, "poll-in"), fresh(root, "poll-out")
    out_path = root / "poller.out"
    with open(out_path, "wb") as out:
        p = spawn([PY, "-c", CLAIM_POLLER, str(src), str(dst), "1.0"], stdout=out, stdin=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        pclosed = write_paced(src, seconds, 11)
        wait_until(lambda: len(out_path.read_text().splitlines()) >= len(pclosed), 10, "poller claims")
    finally:
        reap(p)
    ptimes = dict(line.split() for line in out_path.read_text().splitlines())
    plat = [float(ptimes[n]) - c for n, c in pclosed.items()]
    shutil.rmtree(root)

    for p_, key in ((50, "2.1"), (99, "2.2")):
        a, b = pct(lat, p_), pct(plat, p_)
        t.add(key, f"pickup close->claimed p{p_} ({len(lat)} files)", f_ms(a),
              f"1 s polling loop p{p_} ({len(plat)} files)", f_ms(b), ratio(a, b, "lower"))
    t.add("2.3", "  max close->claimed", f_ms(max(lat)), "1 s polling loop max", f_ms(max(plat)))
    t.add("2.4", "  ingestd_pickup_latency_seconds p50 / p99", f"{hq[0]} / {hq[1]}",
          "(the daemon's own histogram)", f"{hcount} observations")


# --------------------------------------------------------------------------------------------------
# 3. Engine streaming: `ingestd process` on a 200 MB file vs tr and cat; peak RSS
# --------------------------------------------------------------------------------------------------

PY_BLOCKS = r"""
import sys
with open(sys.argv[1], "rb") as f, open(sys.argv[2], "wb") as o:
    while b := f.read(1 << 20):
        o.write(b.upper())
"""


def vm_hwm_kib(pid: int, argv: list[str]) -> int:
    """Peak resident memory of the program running as pid, once it runs argv (VmHWM starts afresh at exec;
    before the exec, the child would show the bench's own memory)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if f.read().split(b"\0")[:-1] != [os.fsencode(a) for a in argv]:
                return 0
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def timed_run(cmd: list[str], stdin: Path | None = None, stdout: Path | None = None,
              env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS in KiB) of one command. Not wait4's ru_maxrss: a child's counts the memory
    of the (big) bench process it was forked from. VmHWM is sampled every 5 ms by a thread instead."""
    with contextlib.ExitStack() as st:
        fin = st.enter_context(open(stdin, "rb")) if stdin else subprocess.DEVNULL
        fout = st.enter_context(open(stdout, "wb")) if stdout else subprocess.DEVNULL
        errf = st.enter_context(tempfile.TemporaryFile())
        t0 = time.perf_counter()
        p = spawn(cmd, stdin=fin, stdout=fout, stderr=errf, env=env, cwd=cwd)
        peak = [0]
        finished = threading.Event()

        def sample() -> None:
            while not finished.is_set():
                peak[0] = max(peak[0], vm_hwm_kib(p.pid, cmd))
                finished.wait(0.005)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        p.wait()
        elapsed = time.perf_counter() - t0
        finished.set()
        th.join()
        _procs.remove(p)
        errf.seek(0)
        err = errf.read()
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited {p.returncode}: {err.decode(errors='replace')[-500:]}")
    return elapsed, peak[0]


def same_file(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def engine_dir(base: Path) -> Path:
    """Engine figures are about CPU, not the disk: use tmpfs (/dev/shm) when there is one with room."""
    shm = Path("/dev/shm")
    try:
        st = os.statvfs(shm)
        if st.f_bavail * st.f_frsize > 1_500 * MB and os.access(shm, os.W_OK):
            d = Path(tempfile.mkdtemp(prefix="ingestd-bench-", dir=shm))
            _dirs.append(d)
            return d
    except OSError:
        pass
    return fresh(base, "engine")


def bench_engine(work: Path, t: Table, quick: bool) -> None:
    size = 200 * MB
    reps = 1 if quick else 3
    d = engine_dir(work)
    src = d / "big.txt"
    note(f"engine: writing a {size // MB} MB text file in {d}")
    rng = random.Random(5)
    blocks = [text_block(rng, 1 << 20) for _ in range(8)]
    with open(src, "wb") as f:
        n = 0
        while n < size:
            b = blocks[(n >> 20) % len(blocks)][: size - n]
            f.write(b)
            n += len(b)
    nlines = sum(b.count(b"\n") for b in blocks) * size / (8 << 20)
    timed_run(["cat", str(src)])  # warm the page cache
    env = clean_env()
    runs: dict[str, Rep] = {k: Rep() for k in ("ingestd", "tr", "cat", "py")}
    rss: dict[str, int] = {}
    identical = True
    ingestd = [PY, "-m", "ingestd", "process", "--input", str(src), "--output", str(d / "out-ingestd.txt"),
               "--mode", "uppercase"]
    for rep in range(reps):
        note(f"engine: ingestd process / tr / cat / python blocks on {size // MB} MB (rep {rep + 1}/{reps})")
        for key, cmd, stdin, stdout in (
            ("ingestd", ingestd, None, None),
            ("tr", ["tr", "a-z", "A-Z"], src, d / "out-tr.txt"),
            ("cat", ["cat"], src, d / "out-cat.txt"),
            ("py", [PY, "-c", PY_BLOCKS, str(src), str(d / "out-py.txt")], None, None),
        ):
            s, r = timed_run(cmd, stdin=stdin, stdout=stdout, env=env if key == "ingestd" else None, cwd=d)
            runs[key].add(size / s / MB)
            rss[key] = max(rss.get(key, 0), r)
        if rep == 0:
            identical = same_file(d / "out-ingestd.txt", d / "out-tr.txt")
        for f in d.glob("out-*"):
            f.unlink()
    s_start, _ = timed_run([PY, "-m", "ingestd", "process", "--input", "/dev/null", "--output", "-",
                            "--mode", "uppercase"], env=env, cwd=d)
    src.unlink()
    if not identical:
        raise RuntimeError("ingestd process output differs from tr a-z A-Z")
    ing = runs["ingestd"]
    where = "tmpfs" if str(d).startswith("/dev/shm") else "disk"
    t.add("3.1", f"ingestd process --mode uppercase, {size // MB} MB ({where})", ing.fmt(f_mbs),
          "tr a-z A-Z", runs["tr"].fmt(f_mbs), ratio(ing.mid, runs["tr"].mid, "higher"))
    t.add("3.2", "", "", "cat", runs["cat"].fmt(f_mbs), ratio(ing.mid, runs["cat"].mid, "higher"))
    t.add("3.3", "", "", "python, 1 MiB blocks, bytes.upper", runs["py"].fmt(f_mbs),
          ratio(ing.mid, runs["py"].mid, "higher"))
    t.add("3.4", "  peak RSS (VmHWM) of that run", f"{rss['ingestd'] / 1024:.1f} MiB",
          "tr / cat / python blocks", f"{rss['tr'] / 1024:.1f} / {rss['cat'] / 1024:.1f} / {rss['py'] / 1024:.1f} MiB")
    t.add("3.5", "  of which interpreter start-up", f"{s_start * 1e3:.0f} ms",
          "input", f"~{nlines / 1e6:.1f} M lines, avg {size / nlines:.0f} B")


# --------------------------------------------------------------------------------------------------
# 4. /metrics scrape latency, empty queue vs 100,000 files waiting; 5. idle CPU, inotify vs polling
# --------------------------------------------------------------------------------------------------

POLLER = r"""
import os, sys, time
d, period = sys.argv[1], float(sys.argv[2])
while True:
    with os.scandir(d) as it:
        names = [e.name for e in it if not e.name.startswith(".")]
    time.sleep(period)
"""


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


def scrape_interleaved(daemons: list[Daemon], n: int, path: str = "/metrics") -> list[tuple[list[float], int]]:
    """n GETs of path on each daemon, alternating between them so machine noise hits all alike."""
    for d in daemons:
        d.get(path)  # warm up
    out: list[tuple[list[float], int]] = [([], 0) for _ in daemons]
    for _ in range(n):
        for i, d in enumerate(daemons):
            s, body = d.get(path)
            out[i][0].append(s)
            out[i] = (out[i][0], len(body))
            time.sleep(0.005)
    return out


def idle_cpu(roots: list[int], seconds: float) -> list[float]:
    """% of one core used by each process tree (a daemon with its workers, or a poller), all measured
    over the same window so machine noise hits them alike."""
    trees = [tree_pids(r) for r in roots]
    t0, before = time.monotonic_ns(), [cpu_ns(p) for p in trees]
    time.sleep(seconds)
    t1, after = time.monotonic_ns(), [cpu_ns(p) for p in trees]
    return [100 * (a - b) / (t1 - t0) for a, b in zip(after, before)]


def bench_scrape_idle(work: Path, t: Table, quick: bool, waiting: int, only: list[str]) -> None:
    """4. /metrics with an empty queue vs `waiting` files waiting; 5. idle CPU of both vs 0.1 s pollers.
    The waiting files stay waiting honestly: done-marker mode, and none of them has its NAME.done."""
    do_scrape, do_idle = "scrape" in only, "idle" in only
    n = 60 if quick else 300
    idle_s = 10.0 if quick else 30.0
    root = fresh(work, "scrape")
    started: list[Daemon] = []
    try:
        note("scrape/idle: daemon on an empty queue (2 workers)")
        empty = Daemon(fresh(root, "empty") / "watch", 2)
        started.append(empty)
        empty.started()
        full_wd = root / "full" / "watch"
        (full_wd / "unprocessed").mkdir(parents=True)
        note(f"scrape/idle: {waiting:,} files in unprocessed/ of a done-marker daemon (2 workers)")
        link_files(full_wd / "unprocessed", waiting, "w")
        full = Daemon(full_wd, 2, {"INGESTD_DONE_MARKER": "true"})
        started.append(full)
        ev = full.started()
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
            p1 = spawn([PY, "-c", POLLER, str(pe), "0.1"], stdin=subprocess.DEVNULL)
            p2 = spawn([PY, "-c", POLLER, str(pf), "0.1"], stdin=subprocess.DEVNULL)
            time.sleep(1.0)  # past the pollers' start-up
            cpu = idle_cpu([empty.proc.pid, full.proc.pid, p1.pid, p2.pid], idle_s)
            reap(p1)
            reap(p2)
    finally:
        for d in started:
            d.stop()
    if do_scrape:
        # What every scrape calls, alone, in this process: a listing of each folder.
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
        d = Daemon(full_wd, 1)
        try:
            d.started()
            time.sleep(0.5)
            (p_lat, _), = scrape_interleaved([d], n // 2)
        finally:
            d.stop()
    shutil.rmtree(root)

    if do_scrape:
        for p_, key in ((50, "4.1"), (99, "4.2")):
            a_, b_ = pct(f_lat, p_), pct(e_lat, p_)
            t.add(key, f"/metrics p{p_}, {waiting:,} waiting ({n} scrapes)", f_ms(a_),
                  f"/metrics p{p_}, empty queue ({n} scrapes)", f_ms(b_), ratio(a_, b_, "lower"))
        verdict = "MEETS" if pct(f_lat, 99) < 0.050 else "MISSES"
        t.add("4.3", f"  target: p99 < 50 ms with {waiting:,} waiting", f"{verdict} ({f_ms(pct(f_lat, 99))})",
              "max, empty queue / waiting", f"{f_ms(max(e_lat))} / {f_ms(max(f_lat))}")
        t.add("4.4", "", "", "response size, empty queue / waiting", f"{e_size:,} / {f_size:,} B")
        t.add("4.5", f"/api/status p50 / p99, {waiting:,} waiting",
              f"{f_ms(pct(s_lat, 50))} / {f_ms(pct(s_lat, 99))}")
        t.add("4.6", f"  Spool.counts() alone (what each rescan runs), {waiting:,} waiting", counts_t.fmt(f_ms))
        if not quick:
            t.add("4.7", f"/metrics p50 / p99, empty queue, {waiting:,} in processed/",
                  f"{f_ms(pct(p_lat, 50))} / {f_ms(pct(p_lat, 99))}")
    if do_idle:
        t.add("5.1", f"idle CPU over {idle_s:.0f} s, empty queue (daemon + workers)", f_pct(cpu[0]),
              "0.1 s polling loop, empty folder", f_pct(cpu[2]), ratio(cpu[0], cpu[2], "lower"))
        t.add("5.2", f"idle CPU over {idle_s:.0f} s, {waiting:,} waiting", f_pct(cpu[1]),
              f"0.1 s polling loop, {waiting:,} files", f_pct(cpu[3]), ratio(cpu[1], cpu[3], "lower"))


# --------------------------------------------------------------------------------------------------

SECTIONS = ("throughput", "pickup", "engine", "scrape", "idle")


def fs_type(path: Path) -> str:
    best, kind = "", "?"
    with open("/proc/mounts") as f:
        for line in f:
            _, mnt, typ, *_ = line.split()
            inside = str(path).startswith(mnt.rstrip("/") + "/") or str(path) == mnt
            if inside and len(mnt) > len(best):
                best, kind = mnt, typ
    return kind


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="about a minute: fewer files, no repeats")
    ap.add_argument("--dir", default="/tmp", help="where to make the temporary working folder (a real disk)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--waiting", type=int, default=100_000, help="files waiting for the scrape figures")
    ap.add_argument("--keep", action="store_true", help="keep the working folder (for a post-mortem)")
    args = ap.parse_args()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    if bad := set(only) - set(SECTIONS):
        ap.error(f"unknown section(s): {', '.join(sorted(bad))}")

    signal.signal(signal.SIGTERM, _on_term)
    work = Path(tempfile.mkdtemp(prefix="ingestd-bench-", dir=args.dir))
    if not args.keep:
        _dirs.append(work)
    t = Table()
    load0 = os.getloadavg()
    started = time.monotonic()
    try:
        for s in SECTIONS:  # a fixed order, whatever --only says
            if s not in only:
                continue
            if s == "throughput":
                bench_throughput(work, t, args.quick)
            elif s == "pickup":
                bench_pickup(work, t, args.quick)
            elif s == "engine":
                bench_engine(work, t, args.quick)
            elif s == "scrape" or (s == "idle" and "scrape" not in only):
                bench_scrape_idle(work, t, args.quick, args.waiting, only)
    finally:
        cleanup()
    load1 = os.getloadavg()
    t.rows.sort(key=lambda r: [int(x) for x in r[0].split(".")])
    print(f"ingestd benchmarks ({'--quick' if args.quick else 'full'}), {datetime.now():%Y-%m-%d %H:%M}, "
          f"{time.monotonic() - started:.0f} s")
    print(f"machine: {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}, "
          f"work dir on {fs_type(work)}; load average {load0[0]:.2f} at start, {load1[0]:.2f} at end "
          f"(other jobs share this machine: figures are noisy)")
    print("values: median [min..max] when repeated; ratio = ingestd / baseline\n")
    print(t.render())
    for n in t.notes:
        print(f"note: {n}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        cleanup()
        sys.exit(130)
