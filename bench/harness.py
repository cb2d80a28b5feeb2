"""What every scenario shares: process and folder hygiene, the daemon (tests/support.py's DaemonProcess),
timing and CPU helpers, test data, the table and the JSON results.

Every process started here is in a process group of its own and killed on the way out (cleanup());
every folder made with work_dir()/tmpfs_dir() is removed then too.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import platform
import random
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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BASELINES = Path(__file__).resolve().parent / "baselines"
RESULTS = Path(__file__).resolve().parent / "results"
PY = sys.executable
KIB = 1024
MB = 1_000_000

sys.path.insert(0, str(REPO / "tests"))
from support import DaemonProcess

# --------------------------------------------------------------------------------------------------
# Process and folder hygiene
# --------------------------------------------------------------------------------------------------

_procs: list[subprocess.Popen[Any]] = []
_daemons: list[DaemonProcess] = []
_dirs: list[Path] = []


def spawn(cmd: list[str], **kw: Any) -> subprocess.Popen[Any]:
    """Popen in a new session (its own process group), tracked for cleanup()."""
    p: subprocess.Popen[Any] = subprocess.Popen(cmd, start_new_session=True, **kw)
    _procs.append(p)
    return p


def reap(p: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGKILL p's whole process group and wait for p."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired, ChildProcessError):
        p.wait(timeout)
    if p in _procs:
        _procs.remove(p)


def cleanup() -> None:
    """Kill everything started and remove every folder made; safe to call twice."""
    for d in _daemons[:]:
        stop_daemon(d, timeout=5.0)
    for p in _procs[:]:
        reap(p)
    for folder in _dirs[:]:
        shutil.rmtree(folder, ignore_errors=True)
        _dirs.remove(folder)


def on_term(signum: int, frame: object) -> None:
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


def fresh(parent: Path, name: str) -> Path:
    p = parent / name
    shutil.rmtree(p, ignore_errors=True)
    p.mkdir(parents=True)
    return p


def work_dir(parent: str, keep: bool) -> Path:
    d = Path(tempfile.mkdtemp(prefix="ingestd-bench-", dir=parent))
    if not keep:
        _dirs.append(d)
    return d


_shm: list[Path] = []


def tmpfs_dir(fallback: Path, need: int = 1_500 * MB) -> Path:
    """A folder on tmpfs (/dev/shm) when there is one with `need` bytes free, else `fallback`/shm.
    CPU-bound figures run there, so that the disk is not what they measure. Made once per run."""
    if _shm:
        return _shm[0]
    shm = Path("/dev/shm")
    d: Path | None = None
    with contextlib.suppress(OSError):
        st = os.statvfs(shm)
        if st.f_bavail * st.f_frsize > need and os.access(shm, os.W_OK):
            d = Path(tempfile.mkdtemp(prefix="ingestd-bench-", dir=shm))
            _dirs.append(d)
    _shm.append(d or fresh(fallback, "no-tmpfs"))
    return _shm[0]


def on_tmpfs(p: Path) -> bool:
    return fs_type(p).split()[0] == "tmpfs"


# --------------------------------------------------------------------------------------------------
# The daemon: tests/support.py's DaemonProcess with a clean environment and a log file
# --------------------------------------------------------------------------------------------------

def start_daemon(watch_dir: Path, workers: int, *args: str, env: dict[str, str] | None = None,
                 timeout: float = 120.0) -> DaemonProcess:
    """`ingestd run --workers N --mode uppercase --log-format json` on watch_dir, ready (its `started` event
    seen). Its JSON log goes to <watch_dir>.log, read with .refresh() (not while it runs hot)."""
    watch_dir.mkdir(parents=True, exist_ok=True)
    d = DaemonProcess(watch_dir, "--workers", str(workers), "--log-format", "json",
                      *(args or ("--mode", "uppercase")),
                      env=clean_env(**(env or {})), exact_env=True, cwd=watch_dir.parent,
                      log_file=watch_dir.parent / f"{watch_dir.name}.log", new_session=True)
    _daemons.append(d)
    try:
        d.started(timeout)
    except AssertionError as e:
        stop_daemon(d)
        raise RuntimeError(str(e)) from None
    return d


def stop_daemon(d: DaemonProcess, timeout: float = 30.0) -> None:
    """SIGTERM (a warm stop: files in flight finish), then SIGKILL of its group whatever is left."""
    with contextlib.suppress(subprocess.TimeoutExpired, AssertionError, OSError):
        if d.proc.poll() is None:
            d.stop(timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(d.proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired, ChildProcessError):
        d.proc.wait(10)
    d.refresh()
    if d in _daemons:
        _daemons.remove(d)


def address(d: DaemonProcess) -> tuple[str, int]:
    host, _, port = d.url.removeprefix("http://").rpartition(":")
    return host, int(port)


def http_get(addr: tuple[str, int], path: str, timeout: float = 30.0) -> tuple[float, bytes]:
    """One GET on a fresh connection (the server speaks HTTP/1.0): (seconds to the last byte, body)."""
    t0 = time.perf_counter()
    c = http.client.HTTPConnection(*addr, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
        if r.status != 200:
            raise RuntimeError(f"GET {path}: {r.status}")
    finally:
        c.close()
    return time.perf_counter() - t0, body


def events(d: DaemonProcess, name: str) -> list[dict[str, Any]]:
    d.refresh()
    return [e for e in d.events if e.get("event") == name]


def check_alive(d: DaemonProcess) -> None:
    if d.proc.poll() is not None:
        d.refresh()
        raise RuntimeError(f"daemon exited {d.proc.returncode}: {''.join(d.lines)[-2000:]}")


def iso_ts(s: str) -> float:
    return datetime.fromisoformat(s).timestamp()


# --------------------------------------------------------------------------------------------------
# Waiting, CPU and memory
# --------------------------------------------------------------------------------------------------

def wait_until(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s: {what}")
        time.sleep(interval)


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


def _per_thread(pids: list[int], file: str, parse: Callable[[str], int]) -> int:
    """parse(/proc/PID/task/TID/<file>) summed over every thread of these processes (gone ones count 0)."""
    total = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/{file}") as f:
                    total += parse(f.read())
            except OSError:
                continue
    return total


def wakeups(pids: list[int]) -> int:
    """Voluntary context switches, all threads of these processes: each is one sleep ended by a wake-up (a
    timer or an event). Idle cost is wake-ups times the cost of one, which on a small VM is milliseconds of
    cold caches, so this is the figure the code controls."""
    return _per_thread(pids, "status", lambda text: sum(int(line.split()[1]) for line in text.splitlines()
                                                         if line.startswith("voluntary_ctxt")))


def cpu_ns(pids: list[int]) -> int:
    """Nanoseconds on CPU, all threads of these processes (schedstat: ns precision, unlike clock ticks)."""
    return _per_thread(pids, "schedstat", lambda text: int(text.split()[0]))


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
              env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[float, int, bytes]:
    """(wall seconds, peak RSS in KiB, stdout if not sent to a file) of one command that must exit 0.
    Peak RSS is VmHWM sampled every 5 ms by a thread (wait4's ru_maxrss would count the bench's memory)."""
    with contextlib.ExitStack() as st:
        fin: Any = st.enter_context(open(stdin, "rb")) if stdin else subprocess.DEVNULL
        fout: Any = st.enter_context(open(stdout, "wb")) if stdout else st.enter_context(tempfile.TemporaryFile())
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
        out = b""
        if not stdout:
            fout.seek(0)
            out = fout.read()
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited {p.returncode}: {err.decode(errors='replace')[-500:]}")
    return elapsed, peak[0], out


def baseline(name: str) -> list[str]:
    """argv prefix running bench/baselines/<name>.py with this interpreter."""
    return [PY, str(BASELINES / f"{name}.py")]


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


def write_big(path: Path, size: int, blocks: list[bytes]) -> None:
    """A file of `size` bytes made of whole blocks (each ending in a newline), the last one cut at a line end."""
    with open(path, "wb") as f:
        n, i = 0, 0
        while n < size:
            b = blocks[i % len(blocks)]
            if n + len(b) > size:
                b = b[: b.rfind(b"\n", 0, size - n) + 1] or b[: size - n]
            f.write(b)
            n += len(b)
            i += 1
            if not b:
                break


def make_files(folder: Path, n: int, payload: bytes, prefix: str = "f") -> list[str]:
    """n files written in place (open, write, close), named <prefix>000000.txt..."""
    names = [f"{prefix}{i:06d}.txt" for i in range(n)]
    for name in names:
        fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, payload)
        os.close(fd)
    return names


def visible(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        return [e.name for e in it if not e.name.startswith(".") and e.is_file(follow_symlinks=False)]


def same_file(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


# --------------------------------------------------------------------------------------------------
# Statistics, formatting, the table and the JSON results
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


def f_s(v: float) -> str:
    return f"{v:.2f} s"


def f_rate(v: float) -> str:
    return f"{v:,.0f} files/s"


def f_mbs(v: float) -> str:
    return f"{v:,.1f} MB/s" if v < 20 else f"{v:,.0f} MB/s"


def f_pct(v: float) -> str:
    return f"{v:.3f}%" if v < 1 else f"{v:.1f}%"


def ratio(a: float, b: float, better: str) -> str:
    """a/b, with which way is better (so no reader has to guess)."""
    if b == 0:
        return "n/a"
    r = a / b
    txt = f"{r:.2f}x" if r >= 0.1 else f"{r:.3f}x"
    return f"{txt} ({better} is better)"


def num(v: Rep | float | str | None) -> Any:
    if isinstance(v, Rep):
        return {"median": v.mid, "min": min(v.values), "max": max(v.values), "values": v.values}
    return v


@dataclass
class Target:
    what: str      # the target as issue 10 states it
    measured: str  # the figure that decides it, as printed
    met: bool


@dataclass
class Table:
    rows: list[tuple[str, ...]] = field(default_factory=list)
    data: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)

    def add(self, key: str, what: str, value: str, base_what: str = "", base_value: str = "", ratio_txt: str = "",
            **raw: Rep | float | str | None) -> None:
        """One printed row; raw: the numbers behind it (SI units: seconds, bytes, files/s, MB/s), for the JSON."""
        self.rows.append((key, what, value, base_what, base_value, ratio_txt))
        self.data.append({"key": key, "measure": what.strip(), "value": value, "baseline": base_what,
                          "baseline_value": base_value, "ratio": ratio_txt,
                          "raw": {k: num(v) for k, v in raw.items()}})

    def target(self, what: str, measured: str, met: bool) -> None:
        self.targets.append(Target(what, measured, met))

    def render(self, judged: bool = True) -> str:
        """The table, then the targets: each MEETS or MISSES when judged, else (a --quick run: too few files, no
        repeats) only the figure, never a verdict a reader would take for one (found by a new user)."""
        head = ("#", "measure (ingestd)", "value", "baseline (same run)", "baseline value", "ratio")
        rows = [head, *sorted(self.rows, key=lambda r: [int(x) for x in r[0].split(".")])]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]

        def line(r: tuple[str, ...]) -> str:
            return "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()

        out = [line(head), "  ".join("-" * w for w in widths)]
        out += [line(r) for r in rows[1:]]
        if self.targets:
            out += ["", "targets (issue 10):" if judged else "targets (issue 10), not judged in a --quick run:"]
            w = max(len(t.what) for t in self.targets)
            out += [f"  {('MEETS ' if t.met else 'MISSES') if judged else '-     '}  {t.what.ljust(w)}  {t.measured}"
                    for t in self.targets]
        return "\n".join(out)


def fs_type(path: Path) -> str:
    """The file system under path, as the header prints it: "ext4 (no journal)", "tmpfs (not a disk)", "xfs"."""
    best, kind, dev = "", "?", ""
    with open("/proc/mounts") as f:
        for line in f:
            src, mnt, typ, *_ = line.split()
            inside = str(path).startswith(mnt.rstrip("/") + "/") or str(path) == mnt
            if inside and len(mnt) > len(best):
                best, kind, dev = mnt, typ, src
    if kind in ("ext3", "ext4"):
        # jbd2 lists each journal it runs as /proc/fs/jbd2/<device>-<journal inode>: none there, no journal
        # (docs/benchmarks.md, round five: the disk rows differ in kind between the two).
        journaled = any(n.startswith(os.path.basename(dev) + "-") for n in os.listdir("/proc/fs/jbd2")) \
            if os.path.isdir("/proc/fs/jbd2") else None
        kind += {True: " (journal)", False: " (no journal)", None: ""}[journaled]
    elif kind in ("tmpfs", "ramfs"):
        kind += " (not a disk: the disk rows measure memory)"
    return kind


def machine(work: Path) -> dict[str, Any]:
    """What the figures were measured on: kernel, CPU, cores, memory, the work folder's filesystem, Python,
    and which ingestd (git commit, and whether the tree had changes)."""
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    commit, dirty = "?", False
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "ingestd"],
                                    capture_output=True, text=True, check=True).stdout.strip())
    return {"kernel": platform.release(), "cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem,
            "work_dir": str(work), "work_dir_fs": fs_type(work), "python": platform.python_version(),
            "ingestd_commit": commit, "ingestd_dirty": dirty}


def write_results(table: Table, info: dict[str, Any], meta: dict[str, Any]) -> Path:
    """bench/results/<UTC timestamp>.json: machine, run options, every row with its raw numbers, targets."""
    RESULTS.mkdir(exist_ok=True)
    now = datetime.now(UTC)
    path = RESULTS / f"{now:%Y%m%dT%H%M%SZ}.json"
    doc = {"time": now.isoformat(timespec="seconds"), "machine": info, **meta,
           "rows": sorted(table.data, key=lambda r: [int(x) for x in r["key"].split(".")]),
           "targets": [t.__dict__ for t in table.targets], "notes": table.notes}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path
