"""A real systemd (252) booted for the tests, as PID 1 of new mount, PID, UTS, IPC and network namespaces,
on a throwaway overlay of / (RELIABILITY.md, "Real systemd in tests").

Nothing reaches the host. Everything the booted system writes lands in the namespace: the overlay's upper
layer, /run, /tmp and /dev are tmpfs mounts that exist only there (so systemd-tmpfiles and journald write
there, not to the host's /tmp, /var/log or /dev); /sys and /proc/sys are read-only and the units that
would touch the kernel (sysctl, modules, binfmt...) are masked; /sys/fs/cgroup is a private tmpfs (systemd
remounts it read-only at boot, which would otherwise hit the host's), and its cgroups go into a subtree
of the test's own cgroups, removed at teardown. Its network is its own loopback (port 9800 is free).

Commands run inside through nsenter. Teardown powers the machine off and, if that does not end it,
SIGKILLs its PID 1, which takes the whole namespace (and its mounts) with it. `unshare` dies with the test
process (PR_SET_PDEATHSIG) and takes PID 1 with it (--kill-child), so even a killed pytest leaves at most
empty cgroups, which the next boot sweeps away.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import support

# Each poll here runs a command in the namespace: look ten times a second, not fifty.
wait_for = functools.partial(support.wait_for, interval=0.1)

# Runs in the new namespaces (mount, PID, UTS, IPC, network). $1: mount point for the scratch tmpfs;
# $2: a host folder shown read-only at /wheelhouse inside (pip's offline package source), or "";
# $3: the cgroup.procs files of this boot's own cgroup subtree (space-separated); $4: the cgroup
# hierarchies' mount points; $5: the repository under test. Everything the booted systemd may write lands in the namespace: the overlay's
# upper layer on a tmpfs, fresh /run, /tmp and /dev, a read-only /sys and /proc/sys, a private tmpfs on
# /sys/fs/cgroup, and its cgroups under the subtree (inside the test's own memory cgroup).
BOOT_SCRIPT = r"""
set -eu
S=$1 M=$1/merged
for procs in $3; do echo 0 > "$procs"; done
mount -t tmpfs -o mode=0755 ingestd-test "$S"
mkdir -p "$S/upper" "$S/work" "$M"
mount -t overlay overlay -o "lowerdir=/,upperdir=$S/upper,workdir=$S/work" "$M"
mount -t proc proc "$M/proc"
mount --bind "$M/proc/sys" "$M/proc/sys"
mount -o remount,bind,ro "$M/proc/sys"
if [ -e "$M/proc/sysrq-trigger" ]; then
    mount --bind "$M/proc/sysrq-trigger" "$M/proc/sysrq-trigger"
    mount -o remount,bind,ro "$M/proc/sysrq-trigger"
fi
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$M/sys"
mount -t tmpfs -o mode=0755,nosuid,nodev,noexec cgroups "$M/sys/fs/cgroup"
for h in $4; do mkdir -p "$M$h"; mount --bind "$h" "$M$h"; done
mount -t tmpfs -o mode=0755,nosuid tmpfs "$M/dev"
for n in null zero full random urandom tty; do touch "$M/dev/$n"; mount --bind "/dev/$n" "$M/dev/$n"; done
mkdir -p "$M/dev/pts" "$M/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$M/dev/pts"
ln -s pts/ptmx "$M/dev/ptmx"
ln -s /proc/self/fd "$M/dev/fd"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$M/dev/shm"
mount -t tmpfs -o mode=0755 tmpfs "$M/run"
mount -t tmpfs -o mode=1777 tmpfs "$M/tmp"
# The repository under test at its own path, even when that lies under a folder replaced above (a clone in
# /tmp): an overlay of its own, so whatever the tests build in it stays in the namespace.
mkdir -p "$S/repo-upper" "$S/repo-work" "$M$5"
mount -t overlay overlay -o "lowerdir=$5,upperdir=$S/repo-upper,workdir=$S/repo-work" "$M$5"
if [ -n "$2" ]; then
    mkdir -p "$M/wheelhouse"
    mount --bind "$2" "$M/wheelhouse"
    mount -o remount,bind,ro "$M/wheelhouse"
fi
# Units that would reach the host's kernel (sysctls, modules, binfmt, pstore, clock) or need real devices,
# and the timers (apt, man-db...), which have no business running during a test.
for u in systemd-sysctl.service systemd-modules-load.service systemd-binfmt.service \
         proc-sys-fs-binfmt_misc.automount proc-sys-fs-binfmt_misc.mount kmod-static-nodes.service \
         systemd-pstore.service systemd-timesyncd.service systemd-remount-fs.service systemd-random-seed.service \
         systemd-udevd.service systemd-udev-trigger.service systemd-udev-settle.service systemd-hwdb-update.service \
         systemd-tmpfiles-setup-dev.service sys-kernel-debug.mount sys-kernel-tracing.mount sys-kernel-config.mount \
         sys-fs-fuse-connections.mount dev-hugepages.mount timers.target; do
    ln -sf /dev/null "$M/etc/systemd/system/$u"
done
# pivot_root, not chroot: a chrooted process may not create user namespaces (PrivateUsers= needs one).
mkdir -p "$M/.oldroot"
cd "$M"
pivot_root . .oldroot
umount -l /.oldroot
rmdir /.oldroot
# The host's own services (databases, Prometheus, gettys) stay down: boot only to basic.target.
exec env container=other /usr/bin/systemd --system --unit=basic.target
"""

REPO = Path(__file__).resolve().parents[2]
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ENV = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0",
       "TERM": "dumb"}


class BootError(Exception):
    """systemd could not be booted here (no root, no overlayfs, no unshare...): the tests skip or fail."""


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class CgroupSubtree:
    """This boot's own cgroup in each hierarchy systemd uses, below the test's memory cgroup (so the booted
    services stay inside the memory accounting the tests run under); removed again at teardown."""

    USED = {"name=systemd", "memory", "pids", "devices", "cpu", "cpuacct", "blkio"}
    PREFIX = "ingestd-systemd-test-"  # + the test process's PID + "-" + a unique suffix

    def __init__(self, name: str) -> None:
        own: dict[frozenset[str], str] = {}
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            own[frozenset(controllers.split(","))] = path
        base = next((p for c, p in own.items() if "memory" in c), own.get(frozenset({""}), "/"))
        self.mounts: list[str] = []  # every cgroup hierarchy mounted under /sys/fs/cgroup
        self.dirs: list[Path] = []  # this boot's cgroup in each hierarchy it joins
        self.created: list[Path] = []  # folders made here (parents included), to remove at teardown
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            sep = fields.index("-")
            mountpoint, fstype, options = fields[4], fields[sep + 1], fields[sep + 3].split(",")
            if fstype not in ("cgroup", "cgroup2") or not mountpoint.startswith("/sys/fs/cgroup"):
                continue
            self.mounts.append(mountpoint)
            if fstype == "cgroup2" or self.USED & set(options):
                self.dirs.append(Path(mountpoint + base.rstrip("/")) / name)

    def create(self) -> list[str]:
        """Make the folders; returns the cgroup.procs files the boot script moves its process into."""
        self._sweep_stale()
        for d in self.dirs:
            missing = [p for p in [d, *d.parents] if not p.exists()]
            for p in reversed(missing):
                p.mkdir()
                self.created.append(p)
        return [str(d / "cgroup.procs") for d in self.dirs]

    def _sweep_stale(self) -> None:
        """Empty subtrees left by a test process that was killed (named after its PID, now gone)."""
        for d in self.dirs:
            for old in d.parent.glob(self.PREFIX + "*"):
                pid = old.name[len(self.PREFIX):].split("-", 1)[0]
                if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                    try:
                        _rmtree_cgroup(old, time.monotonic())
                    except OSError:
                        pass  # still has processes: not ours to force

    def remove(self, timeout: float = 10.0) -> None:
        """rmdir everything below and including this boot's cgroups (they empty once the namespace is gone)."""
        deadline = time.monotonic() + timeout
        for d in self.dirs:
            _rmtree_cgroup(d, deadline)
        for p in sorted(self.created, key=lambda p: len(p.parts), reverse=True):
            try:
                p.rmdir()
            except OSError:
                pass  # shared with another boot still running, or already gone


def _rmtree_cgroup(top: Path, deadline: float) -> None:
    """rmdir a cgroup and its children, deepest first; cgroups may stay busy a moment after their last
    process died, so retry until `deadline`."""
    if not top.exists():
        return
    for p in sorted((Path(root) for root, _, _ in os.walk(top)), key=lambda p: len(p.parts), reverse=True):
        while True:
            try:
                p.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


class Machine:
    """One booted systemd. `run` executes a command inside; `py` runs Python inside with JSON in and out."""

    def __init__(self, workdir: Path, wheelhouse: Path | None = None) -> None:
        self.workdir = workdir
        self.wheelhouse = wheelhouse
        self.log_path = workdir / "boot.log"
        self.unshare: subprocess.Popen[bytes] | None = None
        self.pid = 0  # systemd's PID as the host sees it
        self.cgroups: CgroupSubtree | None = None
        self.failed_units = ""  # units that failed at boot, if any

    # --- life --------------------------------------------------------------------------------------
    def boot(self, timeout: float = 60.0) -> None:
        if os.geteuid() != 0:
            raise BootError("booting systemd needs root (mount, unshare)")
        for tool in ("/usr/bin/unshare", "/usr/bin/nsenter", "/usr/bin/systemd"):
            if not os.access(tool, os.X_OK):
                raise BootError(f"{tool} is missing")
        scratch = self.workdir / "scratch"
        scratch.mkdir()
        self.cgroups = CgroupSubtree(f"{CgroupSubtree.PREFIX}{os.getpid()}-{scratch.parent.name}")
        procs = self.cgroups.create()
        with self.log_path.open("wb") as log:
            self.unshare = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child",
                 "--uts", "--ipc", "--net",
                 "sh", "-c", BOOT_SCRIPT, "boot", str(scratch), str(self.wheelhouse or ""), " ".join(procs),
                 " ".join(self.cgroups.mounts), str(REPO)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=ENV,
                preexec_fn=_die_with_parent)
        try:
            self.pid = wait_for(self._find_systemd, 20, what="systemd to start in the namespace")
            state = ""
            deadline = time.monotonic() + timeout
            while state not in ("running", "degraded"):
                if time.monotonic() > deadline:
                    raise BootError(f"systemd did not finish booting in {timeout:.0f}s (state {state!r})")
                if self.unshare.poll() is not None:
                    raise BootError("the namespace ended during boot")
                state = self.run("systemctl", "is-system-running", check=False, timeout=10).stdout.strip()
                time.sleep(0.2)
            # "degraded" (some unit of the host's failed here) is fine: the tests need PID 1 and journald.
            self.failed_units = self.run("systemctl", "--failed", "--no-legend", "--plain", check=False).stdout
        except (BootError, AssertionError) as e:
            self.cleanup()
            raise BootError(f"{e}\n--- boot log ---\n{self.boot_log()}") from None

    def _find_systemd(self) -> int:
        assert self.unshare is not None
        if self.unshare.poll() is not None:
            raise BootError(f"unshare exited with {self.unshare.returncode}")
        try:
            children = Path(f"/proc/{self.unshare.pid}/task/{self.unshare.pid}/children").read_text().split()
        except OSError:
            return 0
        for pid in map(int, children):
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return pid
            except OSError:
                pass
        return 0

    def boot_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def poweroff(self, timeout: float = 30.0) -> None:
        """Always ends the namespace: a clean poweroff, else SIGKILL to its PID 1."""
        if self.unshare is None or self.unshare.poll() is not None:
            return
        if self.pid:
            self.run("systemctl", "poweroff", "--no-block", check=False, timeout=10)
            try:
                self.unshare.wait(timeout)
                return
            except subprocess.TimeoutExpired:
                pass
            try:
                os.kill(self.pid, signal.SIGKILL)  # PID 1 of the namespace: every process in it dies
            except ProcessLookupError:
                pass
        self.unshare.kill()
        self.unshare.wait(10)

    def cleanup(self) -> None:
        """After poweroff: remove this boot's cgroups from the host's hierarchies."""
        self.poweroff()
        if self.cgroups is not None:
            self.cgroups.remove()

    # --- commands inside ------------------------------------------------------------------------------
    def run(self, *argv: str, check: bool = True, timeout: float = 120.0, input: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        cmd = ["nsenter", "-t", str(self.pid), "-m", "-p", "-u", "-i", "-n", "-r", "-w", *argv]
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout, input=input,
                              env={**ENV, **(env or {})})
        if check and proc.returncode != 0:
            raise AssertionError(f"{shlex.join(argv)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def sh(self, script: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-ec", script, check=check, timeout=timeout)

    def py(self, code: str, arg: Any = None, timeout: float = 120.0) -> Any:
        """Run Python code inside (the system's python3) with `arg` as ARG; it must set RESULT (JSON)."""
        wrapper = ("import json, os, sys\nARG = json.load(sys.stdin)\nRESULT = None\n" + code
                   + "\njson.dump(RESULT, sys.stdout)\n")
        out = self.run("/usr/bin/python3", "-c", wrapper, input=json.dumps(arg), timeout=timeout).stdout
        return json.loads(out)

    # --- systemd --------------------------------------------------------------------------------------
    def systemctl(self, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", *args, check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, "--property=" + ",".join(props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def prop(self, unit: str, name: str) -> str:
        return self.show(unit, name).get(name, "")

    def mark(self) -> int:
        """Now, in the journal's terms (realtime microseconds), for journal(after=...). (A cursor would do, but
        journalctl 252 with --after-cursor plus a field match returns nothing when the cursor's entry
        does not match.)"""
        self.run("journalctl", "--sync", check=False)
        return time.time_ns() // 1000

    def journal(self, *match: str, after: int | None = None) -> str:
        """The MESSAGEs of the journal entries matching (e.g. "-u", "ingestd" or "_SYSTEMD_INVOCATION_ID=..."),
        one a line (as `journalctl -o cat`), only those after the mark `after` if given."""
        self.run("journalctl", "--sync", check=False)
        since = ["--since", f"@{after // 1_000_000}"] if after else []
        out = self.run("journalctl", "--no-pager", "-o", "json", "--output-fields=MESSAGE", *since, *match).stdout
        messages = []
        for line in out.splitlines():
            entry = json.loads(line)
            if after and int(entry["__REALTIME_TIMESTAMP"]) <= after:
                continue
            message = entry.get("MESSAGE")
            if isinstance(message, list):  # journald's form for a message that is not UTF-8
                message = bytes(message).decode("utf-8", "replace")
            messages.append(message or "")
        return "".join(m + "\n" for m in messages)

    def events(self, *match: str, after: int | None = None) -> list[dict[str, Any]]:
        """The daemon's JSON log events: its own stderr lines (SYSLOG_IDENTIFIER=ingestd) that are JSON."""
        found = []
        for line in self.journal("SYSLOG_IDENTIFIER=ingestd", *match, after=after).splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict) and "event" in doc:
                found.append(doc)
        return found


WATCH = "/var/lib/ingestd"
FOLDERS = ("unprocessed", "underprocess", "processed", "failed")

# Inside the machine: write files to a staging folder next to the queue, then rename them into
# unprocessed/ (atomic arrival; the same filesystem). ARG: [[name, text or null, size, line], ...]
_DROP = """
stage = os.path.join(ARG["watch"], ".incoming")
os.makedirs(stage, exist_ok=True)
for name, text, size, line in ARG["files"]:
    with open(os.path.join(stage, name), "w") as f:
        f.write(text if text is not None else line * (size // len(line)))
for name, *_ in ARG["files"]:  # all arrive at once
    os.rename(os.path.join(stage, name), os.path.join(ARG["watch"], "unprocessed", name))
"""

# Inside the machine: every visible file of each queue folder -> [size, sha256, text if small]; and
# the hidden entries (sidecars, temps) separately.
_LIST = """
import hashlib
RESULT = {}
for folder in ARG["folders"]:
    path = os.path.join(ARG["watch"], folder)
    entries = {}
    hidden = []
    for name in sorted(os.listdir(path)) if os.path.isdir(path) else []:
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            continue
        if name.startswith("."):
            hidden.append(name)
            continue
        with open(full, "rb") as f:
            data = f.read()
        entries[name] = [len(data), hashlib.sha256(data).hexdigest(),
                         data.decode("utf-8", "replace") if len(data) <= 65536 else None]
    RESULT[folder] = entries
    RESULT["." + folder] = hidden
"""


class Service:
    """The installed ingestd unit in a booted Machine: configure, start, drop files, look at the queue."""

    UNIT = "ingestd.service"
    ENV_FILE = "/etc/ingestd/ingestd.env"
    DROPIN = "/etc/systemd/system/ingestd.service.d/50-test.conf"
    CONFIG = "/etc/ingestd/routing.toml"

    def __init__(self, machine: Machine) -> None:
        self.m = machine

    def reset(self, env: dict[str, str], dropin: str | None = None, config: str | None = None) -> None:
        """Stopped, start limit reset, empty watch dir, this env file, drop-in and routing config."""
        self.m.systemctl("stop", self.UNIT, check=False)
        self.m.systemctl("reset-failed", self.UNIT, check=False)
        self.m.run("rm", "-rf", *(f"{WATCH}/{f}" for f in (*FOLDERS, ".ingestd", ".incoming")))
        self.write(self.ENV_FILE, "".join(f"{k}={v}\n" for k, v in env.items()))
        if dropin is None:
            self.m.run("rm", "-f", self.DROPIN)
        else:
            self.write(self.DROPIN, dropin)
        if config is None:
            self.m.run("rm", "-f", self.CONFIG)
        else:
            self.write(self.CONFIG, config)
        self.m.systemctl("daemon-reload")

    def write(self, path: str, text: str) -> None:
        self.m.sh(f"mkdir -p {shlex.quote(os.path.dirname(path))}")
        self.m.run("sh", "-c", 'cat > "$1.tmp" && mv "$1.tmp" "$1"', "sh", path, input=text)

    def show(self, *props: str) -> dict[str, str]:
        return self.m.show(self.UNIT, *props)

    def prop(self, name: str) -> str:
        return self.m.prop(self.UNIT, name)

    def main_pid(self) -> int:
        return int(self.prop("MainPID") or 0)

    def restarts(self) -> int:
        return int(self.prop("NRestarts") or 0)

    def invocation(self) -> str:
        return self.prop("InvocationID")

    def status_text(self) -> str:
        return self.m.systemctl("status", self.UNIT, "--lines=0", check=False).stdout

    def drop(self, files: dict[str, str]) -> None:
        """Small text files, by name."""
        self.m.py(_DROP, {"watch": WATCH, "files": [[n, t, 0, ""] for n, t in files.items()]})

    def drop_sized(self, names: list[str], size: int, line: str) -> None:
        """Files of about `size` bytes made of `line` repeated (generated inside, nothing copied in)."""
        self.m.py(_DROP, {"watch": WATCH, "files": [[name, None, size, line] for name in names]})

    def folders(self, *folders: str) -> dict[str, Any]:
        """{folder: {name: [size, sha256, text or None]}, ".folder": [hidden names]}."""
        return self.m.py(_LIST, {"watch": WATCH, "folders": list(folders or FOLDERS)})

    def wait_processed(self, names: set[str], timeout: float) -> dict[str, Any]:
        """Until each name has its result in processed/ and its input has left: the outputs are published
        before the input is removed (the commit point), so a result alone does not mean finished."""
        def done() -> dict[str, Any] | None:
            state = self.folders()
            left = names & (set(state["unprocessed"]) | set(state["underprocess"]))
            return state if names <= set(state["processed"]) and not left else None

        return wait_for(done, timeout, what=f"{len(names)} files in processed/", interval=0.3)

    def wait_event(self, name: str, timeout: float, after: int | None = None, **fields: Any) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            for ev in self.m.events(after=after):
                if ev["event"] == name and all(ev.get(k) == v for k, v in fields.items()):
                    return ev
            return None

        return wait_for(find, timeout, what=f"event {name} {fields or ''}", interval=0.3)
