"""The multi-node rig of the distributed tests (DISTRIBUTED.md §7): real components, one machine, loopback only.

- Redis: a real `redis-server` (AOF everysec, noeviction) on a free port, killable and restartable on the same port
  and data folder.
- The shared folder: `export/` in a tmp dir (the "server"). A loopback `sshd` (own host key, own authorized key,
  own config, `-D -e`) serves it over SFTP.
- A node: a process group in its own mount namespace (`unshare --mount --propagation private`), optionally in its
  own network namespace joined to the root namespace by a veth pair (a private /30): it mounts the shared folder
  there, then execs `ingestd worker`. Transport `sshfs` (an NFS-client stand-in: no inotify for the server's writes,
  cached attributes, RENAME_NOREPLACE refused) or `bind` (a bind mount of the export: the same inodes as the
  server, which a real NFS client shows and sshfs does not, see test_rig.py).
- Partitions: `ip link set <veth> down` cuts a namespaced node from Redis and sshd at once.

Everything started here is stopped by Rig.close(), also when a test fails: process groups killed, namespaces and
veths deleted (a mount namespace and its mounts go with its last process).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

SCALE = max(1, int(os.environ.get("INGESTD_TORTURE_SCALE", "1") or 1))
LEASE = 3.0  # lease_time of every process of the rig (seconds)
QUEUE = ("unprocessed", "underprocess", "processed", "failed")
PY = sys.executable


def unavailable(reason: str) -> None:
    """A missing component: skip with the reason, but under CI=true the test must run, so fail."""
    import pytest  # here: bench/distributed.py uses the rig without pytest installed

    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: the distributed tests must run; tests/system-deps.sh installs it)",
                    pytrace=False)
    pytest.skip(reason)


def need(*, sshfs: bool = False, netns: bool = False) -> None:
    """Skip (or fail under CI=true) without what the rig needs."""
    import importlib.util

    if importlib.util.find_spec("dramatiq") is None or importlib.util.find_spec("redis") is None:
        unavailable("dramatiq[redis] is not installed: pip install -e '.[distributed]'")
    if not shutil.which("redis-server"):
        unavailable("redis-server is not installed (Debian's redis-server package)")
    if os.geteuid() != 0:
        unavailable("the rig needs root (mount and network namespaces, sshd)")
    if not shutil.which("unshare"):
        unavailable("unshare (util-linux) is missing")
    if sshfs:
        for tool, pkg in (("sshfs", "sshfs"), (_sshd(), "openssh-server"), ("ssh-keygen", "openssh-client")):
            if not shutil.which(tool) and not os.path.exists(tool):
                unavailable(f"{tool} is not installed (Debian's {pkg} package)")
        if not os.path.exists("/dev/fuse"):
            unavailable("/dev/fuse is missing: sshfs cannot mount")
    if netns and not shutil.which("ip"):
        unavailable("ip (iproute2) is missing: no network namespaces for partitions")


def _sshd() -> str:
    return shutil.which("sshd") or "/usr/sbin/sshd"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# --- processes -------------------------------------------------------------------------------------------------
class Proc:
    """A process group started by the rig, its stdout+stderr in `log` (ingestd logs JSON lines on stderr)."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.argv, self.log = name, argv, log
        full = {**os.environ, **(env or {})}
        with open(log, "ab") as out:
            # cwd "/": no .env there (a developer's .env in the checkout must not reach the rig's processes).
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=full, start_new_session=True, cwd="/")
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """kill -9 of the whole process group (the node's sshfs and children too)."""
        self.signal_group(signal.SIGCONT)  # a stopped group is killed all the same, but wake it for a clean reap
        self.signal_group(signal.SIGKILL)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        # Children re-parented to init still hold the group: wait until the group is empty.
        deadline = time.monotonic() + 10
        while _group_alive(self.pid) and time.monotonic() < deadline:
            self.signal_group(signal.SIGKILL)
            time.sleep(0.05)

    def stop(self, timeout: float = 20) -> int | None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        return self.proc.returncode

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return []
        for line in text.splitlines():
            if not line.startswith("{"):
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            if name is None or ev.get("event") == name:
                out.append(ev)
        return out

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""


def _group_alive(pgid: int) -> bool:
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                kids = [int(k) for k in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# --- Redis -----------------------------------------------------------------------------------------------------
class Redis:
    """redis-server on `port`, listening on 127.0.0.1 and the root side of every veth; AOF in `dir`."""

    def __init__(self, dir: Path, binds: Iterable[str] = ("127.0.0.1",)) -> None:
        self.dir = dir
        dir.mkdir(parents=True, exist_ok=True)
        self.binds = list(binds)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, host: str = "127.0.0.1") -> str:
        return f"redis://{host}:{self.port}/0"

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", *self.binds, "--dir", str(self.dir),
             "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction",
             "--protected-mode", "no", "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 15
        while True:
            try:
                c = redis.Redis(port=self.port, socket_connect_timeout=0.5)
                c.ping()
                c.close()
                return
            except redis.RedisError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start: see {self.dir / 'redis.log'}") from None
                time.sleep(0.05)

    def client(self) -> Any:
        import redis

        return redis.Redis(port=self.port, socket_connect_timeout=2, socket_timeout=5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# --- sshd ------------------------------------------------------------------------------------------------------
class Sshd:
    """A loopback sshd serving the export over SFTP (internal-sftp), root login by our own key only."""

    def __init__(self, dir: Path, listen: Iterable[str]) -> None:
        self.dir = dir
        dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.key = dir / "client_key"
        for k in (dir / "host_key", self.key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(k)], check=True)
        auth = dir / "authorized_keys"
        shutil.copy(str(self.key) + ".pub", auth)
        auth.chmod(0o600)
        lines = [f"Port {self.port}", *(f"ListenAddress {a}" for a in listen), f"HostKey {dir / 'host_key'}",
                 f"AuthorizedKeysFile {auth}", "PermitRootLogin prohibit-password", "PasswordAuthentication no",
                 "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "PidFile none",
                 "Subsystem sftp internal-sftp", "MaxStartups 100", "MaxSessions 100", "LogLevel ERROR"]
        (dir / "sshd_config").write_text("\n".join(lines) + "\n")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation folder (Debian's unit makes it)
        self.proc = Proc("sshd", [_sshd(), "-D", "-e", "-f", str(dir / "sshd_config")], dir / "sshd.log")
        wait_for(lambda: _connectable("127.0.0.1", self.port) or not self.proc.alive(), 10, "sshd listening")
        if not self.proc.alive():
            raise RuntimeError(f"sshd did not start: {self.proc.tail()}")

    def sshfs_argv(self, host: str, export: Path, mnt: Path) -> list[str]:
        """sshfs in the foreground, options like an NFS client's: attribute and entry caches, reconnect."""
        opts = ",".join([
            f"port={self.port}", f"IdentityFile={self.key}", "StrictHostKeyChecking=no",
            "UserKnownHostsFile=/dev/null", "LogLevel=ERROR", "reconnect", "ServerAliveInterval=1",
            "ServerAliveCountMax=3", "ConnectTimeout=3", "attr_timeout=1", "entry_timeout=1",
            "dir_cache=yes", "dcache_timeout=1", "Ciphers=aes128-gcm@openssh.com", "Compression=no"])
        return ["sshfs", "-f", "-o", opts, f"root@{host}:{export}", str(mnt)]


def _connectable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


# --- network namespaces ----------------------------------------------------------------------------------------
class Netns:
    """A network namespace joined to the root one by a veth pair on a private /30: root side .1, node side .2."""

    def __init__(self, tag: str) -> None:
        self.ns = f"ingt-{tag}"
        self.veth = f"vi{tag}"[:15]
        for _ in range(50):
            sub = random.randrange(1, 250)
            third = random.randrange(0, 64) * 4
            net = f"10.{200 + sub % 50}.{sub}.{third}"
            if net not in subprocess.run(["ip", "-4", "addr"], check=False, capture_output=True, text=True).stdout:
                break
        base = net.rsplit(".", 1)[0]
        self.host_ip, self.node_ip = f"{base}.{third + 1}", f"{base}.{third + 2}"
        ip = ["ip"]
        _run([*ip, "netns", "add", self.ns])
        _run([*ip, "link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.ns])
        _run([*ip, "addr", "add", f"{self.host_ip}/30", "dev", self.veth])
        _run([*ip, "link", "set", self.veth, "up"])
        _run([*ip, "-n", self.ns, "addr", "add", f"{self.node_ip}/30", "dev", "eth0"])
        _run([*ip, "-n", self.ns, "link", "set", "eth0", "up"])
        _run([*ip, "-n", self.ns, "link", "set", "lo", "up"])

    def cut(self) -> None:
        _run(["ip", "link", "set", self.veth, "down"])

    def heal(self) -> None:
        _run(["ip", "link", "set", self.veth, "up"])

    def delete(self) -> None:
        subprocess.run(["ip", "link", "del", self.veth], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], check=False, capture_output=True)


def _run(argv: list[str]) -> None:
    r = subprocess.run(argv, check=False, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")


# --- the rig ---------------------------------------------------------------------------------------------------
class Rig:
    """The cluster of one test: Redis, the export, sshd (when a transport needs it), nodes and scanners."""

    def __init__(self, tmp: Path, *, transport: str = "bind", netns: int = 0, env: dict[str, str] | None = None,
                 mode: str = "uppercase") -> None:
        need(sshfs=transport == "sshfs", netns=netns > 0)
        self.tmp, self.transport, self.mode = tmp, transport, mode
        self.export = tmp / "export"
        for sub in QUEUE:
            (self.export / sub).mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []
        self.nets: list[Netns] = []
        self.sshd: Sshd | None = None
        self.tag = f"{os.getpid() % 10000}{random.randrange(100, 999)}"
        self.env = {"INGESTD_LEASE_TIME": str(LEASE), "INGESTD_POLL_INTERVAL": "0.2", "INGESTD_SETTLE_TIME": "0",
                    "INGESTD_RESCAN_INTERVAL": "2", "INGESTD_STOP_TIMEOUT": "5", "INGESTD_LOG_FORMAT": "json",
                    "PYTHONUNBUFFERED": "1", **(env or {})}
        self.env.pop("INGESTD_TEST_CRASH_AT", None)
        try:
            for i in range(netns):
                self.nets.append(Netns(f"{self.tag}{i}"))
            binds = ["127.0.0.1", *(n.host_ip for n in self.nets)]
            self.redis = Redis(tmp / "redis", binds)
            self.redis.start()
            if transport == "sshfs":
                self.sshd = Sshd(tmp / "sshd", binds)
        except BaseException:
            self.close()
            raise
        self.n = 0

    # --- starting processes --------------------------------------------------------------------------------
    def _mount_script(self, mnt: Path, host: str) -> str:
        if self.transport == "bind":
            return f"mount --bind {self.export} {mnt}"
        assert self.sshd is not None
        argv = self.sshd.sshfs_argv(host, self.export, mnt)
        return (" ".join(_q(a) for a in argv) + " & "
                f"i=0; while ! mountpoint -q {mnt}; do i=$((i+1)); [ $i -gt 200 ] && echo 'rig: sshfs mount failed' "
                "&& exit 1; sleep 0.05; done")

    def _start(self, role: str, name: str, ingestd_args: list[str], netns: Netns | None, mounted: bool,
               env: dict[str, str] | None) -> Proc:
        self.n += 1
        host = netns.host_ip if netns else "127.0.0.1"
        if mounted:
            mnt = self.tmp / f"mnt-{name}"
            mnt.mkdir(exist_ok=True)
            watch = mnt
            mount = self._mount_script(mnt, host) + "; "
        else:
            watch, mount = self.export, ""
        if ingestd_args and ingestd_args[0] == "--raw":
            cmd = [a.replace("{watch}", str(watch)) for a in ingestd_args[1:]]
        else:
            cmd = [PY, "-m", "ingestd", *ingestd_args, "--broker", self.redis.url(host), "--watch-dir", str(watch),
                   "--mode", self.mode]
        script = "set -e; " + mount + "exec " + " ".join(_q(a) for a in cmd)
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
        if netns:
            argv = ["ip", "netns", "exec", netns.ns, *argv]
        p = Proc(name, argv, self.tmp / f"{name}-{self.n}.log", {**self.env, **(env or {})})  # a restart logs anew
        p.role = role  # type: ignore[attr-defined]
        self.procs.append(p)
        return p

    def node(self, name: str, processes: int = 1, netns: Netns | None = None, env: dict[str, str] | None = None,
             wait: bool = True) -> Proc:
        p = self._start("node", name, ["worker", "--processes", str(processes), "--node", name,
                                        "--listen", f"127.0.0.1:{free_port()}"], netns, True, env)
        if wait:
            wait_for(lambda: p.events("node_started") or not p.alive(), 60, f"node {name} started")
            assert p.alive(), f"node {name} died at start:\n{p.tail()}"
        return p

    def scanner(self, name: str = "scanner", mounted: bool = False, env: dict[str, str] | None = None,
                wait: str | None = "scanner_active") -> Proc:
        """A scanner on the export itself (the server's view), or on its own mount (mounted=True)."""
        p = self._start("scanner", name, ["run", "--listen", f"127.0.0.1:{free_port()}"], None, mounted, env)
        if wait:
            wait_for(lambda: p.events(wait) or not p.alive(), 60, f"{name}: {wait}")
            assert p.alive(), f"{name} died at start:\n{p.tail()}"
        return p

    def inside(self, name: str, argv: list[str], netns: Netns | None = None, mounted: bool = True) -> Proc:
        """Any command in a node's place (its mount, its namespaces): `{watch}` in argv is the mounted folder."""
        return self._start("probe", name, ["--raw", *argv], netns, mounted, None)

    def holding(self, node: str) -> list[str]:
        """Claim ids whose owner lease the node holds now (lease tokens start with the node's name)."""
        c = self.redis.client()
        try:
            keys = list(c.scan_iter(match="ingestd:*:owner:*", count=1000))
            vals = c.mget(keys) if keys else []
        finally:
            c.close()
        return [k.decode().rsplit(":", 1)[1] for k, v in zip(keys, vals) if v and v.decode().startswith(node + ":")]

    def nodes(self) -> list[Proc]:
        return [p for p in self.procs if getattr(p, "role", "") == "node"]

    def children_of(self, p: Proc) -> list[int]:
        """The node's ingestd child processes (multiprocessing spawn), not sshfs."""
        return [c for c in descendants(p.pid) if "multiprocessing" in cmdline(c) and "resource_tracker" not in
                cmdline(c)]

    # --- inputs ----------------------------------------------------------------------------------------------
    def drop(self, files: dict[str, bytes]) -> None:
        """Producers on the server: each file written under a dot name, then renamed in (a complete file)."""
        up = self.export / "unprocessed"
        for name, data in files.items():
            tmp = up / f".in-{name}"
            tmp.write_bytes(data)
            os.rename(tmp, up / name)

    # --- audits ----------------------------------------------------------------------------------------------
    def listing(self, sub: str, hidden: bool = False) -> list[str]:
        return sorted(n for n in os.listdir(self.export / sub) if hidden or not n.startswith("."))

    def done(self, total: int) -> bool:
        return (not self.listing("unprocessed") and not self.listing("underprocess")
                and len(self.listing("processed")) + len(self.listing("failed")) >= total)

    def wait_drained(self, total: int, stall: float = 45.0, limit: float = 600.0) -> None:
        """Until every input is finished; fails when nothing moves for `stall` seconds (with the logs' tails)."""
        start = last_change = time.monotonic()
        last = -1
        while not self.done(total):
            now = time.monotonic()
            n = len(self.listing("processed")) + len(self.listing("failed"))
            if n != last:
                last, last_change = n, now
            if now - last_change > stall or now - start > limit:
                raise AssertionError(
                    f"stalled: {n}/{total} finished, unprocessed={len(self.listing('unprocessed'))} "
                    f"underprocess={len(self.listing('underprocess'))}\n{self.tails()}")
            time.sleep(0.2)

    def tails(self, n: int = 6) -> str:
        """The last lines of every process's log, each cut to 240 characters (for failure messages)."""
        return "\n".join(f"--- {p.name} (alive={p.alive()}):\n" + "\n".join(ln[:240] for ln in p.tail(n).splitlines())
                         for p in self.procs)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for p in self.procs for e in p.events(name)]

    def audit(self, expected: dict[str, bytes], failed: Iterable[str] = (), exact_events: bool = True) -> None:
        """Each input exactly once: processed/ byte-identical to the reference, failed/ with a sidecar, queue empty,
        no temps or superseded names left, and one `processed` event per file across all nodes' logs (at most one
        with `exact_events` off: a node killed after its commit never says so, and its redelivery only acks)."""
        failed = set(failed)
        assert self.listing("unprocessed") == [], f"left in unprocessed/: {self.listing('unprocessed')[:10]}"
        assert self.listing("underprocess") == [], f"stuck in underprocess/: {self.listing('underprocess')[:10]}"
        got = self.listing("processed")
        # Temps of a killed attempt are the scanner's to drop, once unleased for 2 lease times, at a re-drive.
        temps = lambda: [n for n in self.listing("processed", hidden=True) if n.startswith(".ingestd-tmp-")]
        try:
            wait_for(lambda: not temps(), 4 * LEASE + 10, "the temps of killed attempts dropped")
        except AssertionError:
            raise AssertionError(f"temps left: {temps()[:10]}") from None
        hidden = [n for n in self.listing("processed", hidden=True) if n.startswith(".")]
        sup = [n for n in got + hidden if ".superseded-" in n]
        assert sup == [], f"superseded results (a result written twice): {sup[:10]}"
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        assert not missing, f"lost: {len(missing)} results missing, e.g. {missing[:10]}"
        assert not extra, f"unexpected results: {extra[:10]}"
        wrong = [n for n in expected if (self.export / "processed" / n).read_bytes() != expected[n]]
        assert not wrong, f"{len(wrong)} results differ from `ingestd process`, e.g. {wrong[:5]}"
        got_failed = set(self.listing("failed"))
        assert got_failed == failed, f"failed/ holds {sorted(got_failed)[:10]}, expected {sorted(failed)}"
        sidecars = [n for n in self.listing("failed", hidden=True) if n.startswith(".ingestd-reason-")]
        assert len(sidecars) >= len(failed), f"failed files without a sidecar: {sidecars}"
        counts = Counter(e.get("file") for e in self.events("processed"))
        doubled = {f: c for f, c in counts.items() if c > 1}
        assert not doubled, f"processed more than once (events): {dict(list(doubled.items())[:10])}"
        if exact_events:
            silent = sorted(set(expected) - set(counts))
            assert not silent, f"no processed event for {len(silent)} files, e.g. {silent[:10]}"

    def close(self) -> None:
        for p in reversed(self.procs):
            p.kill()
        if self.sshd is not None:
            self.sshd.proc.kill()
        if getattr(self, "redis", None) is not None:
            self.redis.kill()
        for n in self.nets:
            n.delete()


def _q(a: str) -> str:
    import shlex

    return shlex.quote(a)


# --- inputs and the reference --------------------------------------------------------------------------------
WORDS = ["alpha", "Beta", "gamma", "déjà", "Ωmega", "straße", "zeta", "ça", "ключ", "日本"]


def make_inputs(n: int, seed: int = 11) -> dict[str, bytes]:
    """n small text files: one or many lines, some with a UTF-8 BOM, some CRLF, some without a final newline."""
    rng = random.Random(seed)
    files = {}
    for i in range(n):
        lines = rng.choice([1, 1, 2, 5, 20])
        eol = b"\r\n" if i % 5 == 0 else b"\n"
        body = eol.join(" ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 9))).encode() + f" #{i}".encode()
                        for _ in range(lines))
        if i % 3:
            body += eol
        if i % 7 == 0:
            body = b"\xef\xbb\xbf" + body
        files[f"f{i:05d}.txt"] = body
    return files


BINARY = b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8  # NUL bytes: refused as binary, set aside in failed/


def reference(tmp: Path, files: dict[str, bytes], mode: str = "uppercase") -> dict[str, bytes]:
    """What `ingestd process --input F --output OUT --mode M` gives for each file: the real CLI entry point, run
    for every file in one interpreter (a process per file would cost minutes)."""
    src, out = tmp / "ref-in", tmp / "ref-out"
    tmp.mkdir(parents=True, exist_ok=True)
    src.mkdir()
    out.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    code = ("import os, sys\nfrom ingestd.cli import main\n"
            "src, out, mode = sys.argv[1:4]\n"
            "for n in sorted(os.listdir(src)):\n"
            "    rc = main(['process', '--input', os.path.join(src, n), '--output', os.path.join(out, n), '--mode', mode])\n"
            "    assert rc == 0, (n, rc)\n")
    subprocess.run([PY, "-c", code, str(src), str(out), mode], check=True, capture_output=True,
                   env={**os.environ, "INGESTD_LOG_FORMAT": "json"})
    ref = {n: (out / n).read_bytes() for n in files}
    shutil.rmtree(src)
    shutil.rmtree(out)
    return ref
