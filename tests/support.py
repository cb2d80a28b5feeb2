"""Test support: run a real ingestd daemon as a subprocess on a real folder and watch its JSON log."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

INGESTD = [sys.executable, "-m", "ingestd"]

# A routing whose worker blocks forever on a line containing HANG (tests/plugins): a stuck worker.
HANG_ROUTING = """
[[filters]]
match = "*"
processor = "hang_on"

[[filters]]
match = "*"
processor = "uppercase"
"""


# Where a command under test runs unless a test says otherwise: a folder without a .env, so a developer's .env in
# the checkout (`make run` reads it) never reaches the daemons the tests and benchmarks start.
NEUTRAL_CWD = "/"


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, seconds) the process has used so far, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_used(pid: int, seconds: float = 2.0, after: float = 0.5) -> float:
    """CPU seconds the process uses over `seconds`, measured from `after` seconds from now (its last event done)."""
    time.sleep(after)
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return cpu_seconds(pid) - before


def clean_env() -> dict[str, str]:
    """This environment without ingestd's own settings (INGESTD_*, MODE): a command under test gets only its flags."""
    return {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_") and k != "MODE"}


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> Any:
    """Poll until predicate() is truthy; fail with `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


class DaemonProcess:
    """`ingestd run` in a subprocess; its stderr JSON events are collected in .events."""

    def __init__(self, watch_dir: Path, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
                 preexec_fn: Callable[[], None] | None = None, command: list[str] | None = None,
                 exact_env: bool = False, log_file: Path | None = None, new_session: bool = False) -> None:
        self.watch_dir = Path(watch_dir)
        self.args = ["run", "--watch-dir", str(watch_dir), "--listen", "127.0.0.1:0", *args]
        if exact_env:  # the benchmarks: exactly the environment given, no test defaults
            full_env = dict(env or {})
        else:
            # folder_quiet_time as short: the recursive tests see emptied folders removed in a moment, not 5 min
            full_env = {**os.environ, "INGESTD_SETTLE_TIME": "0.3", "INGESTD_FOLDER_QUIET_TIME": "0.3", **(env or {})}
        full_env.pop("NOTIFY_SOCKET", None)
        self.env = full_env
        self.events: list[dict[str, Any]] = []
        self.lines: list[str] = []
        # log_file (the benchmarks): stderr goes to this file and no thread reads it while the daemon runs
        # hot; refresh() parses what it gained since the last call into .lines and .events.
        self.log_file = Path(log_file) if log_file is not None else None
        self._log_pos = 0
        self._log_partial = b""
        stderr: Any = subprocess.PIPE
        if self.log_file is not None:
            stderr = open(self.log_file, "wb")  # noqa: SIM115 (closed below: the child holds its own copy)
        # preexec_fn (torture tests): limits or another user for the daemon only, e.g. RLIMIT_FSIZE, setuid.
        # command: another interpreter (e.g. one a non-root user may execute), default this one.
        # new_session: a process group of its own, so that os.killpg reaches the daemon and its workers.
        try:
            self.proc = subprocess.Popen([*(command or INGESTD), *self.args], stderr=stderr,
                                         stdout=subprocess.DEVNULL,
                                         preexec_fn=preexec_fn, start_new_session=new_session,
                                         env=full_env, cwd=cwd or NEUTRAL_CWD, text=True, errors="replace")
        finally:
            if self.log_file is not None:
                stderr.close()
        self._reader = threading.Thread(target=self._read, daemon=True)
        if self.log_file is None:
            self._reader.start()
        self.url = ""

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            try:
                self.events.append(json.loads(line))
            except ValueError:
                pass

    def refresh(self) -> None:
        """With log_file: parse the complete lines the log gained since the last call (no-op without)."""
        if self.log_file is None:
            return
        with open(self.log_file, "rb") as f:
            f.seek(self._log_pos)
            data = f.read()
        self._log_pos += len(data)
        data = self._log_partial + data
        cut = data.rfind(b"\n") + 1
        self._log_partial = data[cut:]
        for raw in data[:cut].splitlines(keepends=True):
            line = raw.decode(errors="replace")
            self.lines.append(line)
            try:
                self.events.append(json.loads(line))
            except ValueError:
                pass

    def started(self, timeout: float = 15.0) -> DaemonProcess:
        def ready() -> Any:
            self.refresh()
            return self.event("started") or self.proc.poll() is not None

        ev = wait_for(ready, timeout, what="started event")
        self.refresh()
        if ev is True:
            raise AssertionError(f"daemon exited {self.proc.returncode}: {''.join(self.lines)}")
        # INGESTD_WATCH=polling (tests/test_polling.py, or by hand for a whole module): make sure it is what runs.
        forced = self.env.get("INGESTD_WATCH")
        if forced in ("inotify", "polling") and "--watch" not in self.args and "watch" in ev:
            assert ev["watch"] == forced, f"INGESTD_WATCH={forced} but the daemon runs {ev['watch']}"
        self.url = "http://" + ev["listen"]
        return self

    def event(self, name: str, **match: Any) -> dict[str, Any] | None:
        for ev in list(self.events):
            if ev.get("event") == name and all(ev.get(k) == v for k, v in match.items()):
                return ev
        return None

    def count(self, name: str) -> int:
        return sum(1 for ev in list(self.events) if ev.get("event") == name)

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def status(self) -> dict[str, Any]:
        return json.loads(self.get("/api/status")[1])

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the daemon to exit by itself (after a signal the test sent)."""
        rc = self.proc.wait(timeout)
        self._close()
        return rc

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self._close()
        return rc

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._close()

    def _close(self) -> None:
        if self.log_file is not None:
            self.refresh()
            return
        self._reader.join(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def plugin(root: Path, name: str, module: str, entries: dict[str, str]) -> str:
    """A processor plug-in distribution `name` in root: its module (name.py) and a dist-info that importlib.metadata
    reads (entries: processor name -> "module:attr"), no install, no mock. Returns root, for sys.path or PYTHONPATH."""
    info = root / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (root / f"{name}.py").write_text(module)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[ingestd.processors]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()))
    return str(root)


def with_path(root: str) -> dict[str, str]:
    """The environment entry that puts root first on a subprocess's PYTHONPATH (ahead of any already set)."""
    return {"PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}


def folder(watch_dir: Path, name: str) -> list[str]:
    """User-visible entries of a queue folder, sorted (hidden temps and sidecars excluded)."""
    return sorted(n for n in os.listdir(watch_dir / name) if not n.startswith("."))


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[None]:
    """chattr +i on path for the block (a folder nobody, root included, may change: EPERM), then -i; skips the
    test where that cannot be done (not root, a file system without the flag)."""
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False).returncode:
        pytest.skip("chattr +i needs root and a file system with the immutable flag (ext4, xfs)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


class ClusterProcess:
    """`ingestd ARGS...` of a cluster (the scanner, `run --broker ...`, or a node, `worker ...`) in a session of its
    own, so stop() also reaches a node's children; its stderr JSON events are collected in .events. Environment:
    this one without INGESTD_* and systemd's variables, plus `env`."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        full = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")
                and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM", "MODE")}
        self.proc = subprocess.Popen(INGESTD + list(args), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, env={**full, **(env or {})}, text=True,
                                     errors="replace", start_new_session=True, cwd=NEUTRAL_CWD)
        self.events: list[dict[str, Any]] = []
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.listen = ""

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            with contextlib.suppress(ValueError):
                self.events.append(json.loads(line))

    def started(self, name: str, timeout: float = 20.0) -> ClusterProcess:
        """Wait for the event `name` ("started", "node_started"); its `listen` is kept."""
        def seen() -> Any:
            return next((e for e in list(self.events) if e.get("event") == name), None) or self.proc.poll() is not None

        ev = wait_for(seen, timeout, what=f"{name} event")
        if ev is True:
            raise AssertionError(f"ingestd exited {self.proc.returncode}: {''.join(self.lines)}")
        self.listen = str(ev.get("listen", ""))
        return self

    def kill9(self) -> None:
        """SIGKILL to the process only (a node's children end with it: PR_SET_PDEATHSIG), as a crashed machine."""
        self.proc.kill()
        self.proc.wait()

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL to the whole session (children included)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


class RedisServer:
    """A real redis-server on a free loopback port, its data (AOF) in `dir`; kill() and start() again on the same
    port and data, as a Redis restart. url: redis://127.0.0.1:PORT/0."""

    def __init__(self, dir: Path) -> None:
        import socket

        self.dir = dir
        dir.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import time

        import redis

        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction",
             "--protected-mode", "no", "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=self.port, socket_connect_timeout=0.5).ping()
                return
            except redis.RedisError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start: see {self.dir / 'redis.log'}") from None
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def need_redis() -> None:
    """Skip (with a reason) without redis-server or the distributed extra; under CI=true that is a failure."""
    import importlib.util
    import shutil

    missing = [what for what, ok in (("redis-server", shutil.which("redis-server")),
                                     ("dramatiq (pip install -e '.[distributed]')", importlib.util.find_spec("dramatiq")))
               if not ok]
    if not missing:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"missing {', '.join(missing)}, and CI=true: the distributed tests must run there")
    pytest.skip(f"missing {', '.join(missing)} (tests/system-deps.sh installs redis-server as root)")



def daemon_group(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """For a fixture: yields start(*args, env=, watch_dir=, started=True) -> DaemonProcess, each daemon in a session
    of its own under tmp_path (watch dir tmp_path/w by default); at the end every one is killed with its workers
    (killpg), and its stderr pipe closed, even if it ended by itself (a start-up failure: else a ResourceWarning)."""
    procs: list[DaemonProcess] = []

    def start(*args: str, env: dict[str, str] | None = None, watch_dir: Path | None = None,
              started: bool = True) -> DaemonProcess:
        d = DaemonProcess(watch_dir or tmp_path / "w", *args, env=env, cwd=tmp_path, new_session=True)
        procs.append(d)
        return d.started() if started else d

    yield start
    for d in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(d.proc.pid, signal.SIGKILL)  # the daemon and any worker that outlived it
        d.kill()
