"""Break-it round 7 (helper): what 748f1cb..c11c69d changed (a `gone` confirmed by lstat, the lock label's
recursive note, process --output resolved with realpath, routing's option messages). Real processes, real files.

Faults found, all fixed since (their tests failed before the fixes and pass now):
- process --output onto a FIFO, a device node or a symlink replaces that entry with a regular file (as root,
  `--output /dev/null` replaced the system's /dev/null); cp(1) and a shell's `>` write through it.
- a plug-in factory whose signature cannot be inspected (its __signature__ raises) -> traceback, exit 1, not 78.
- a plug-in whose module raises TypeError at import -> the new option lookup imports it again inside the handler:
  traceback, exit 1 (before this change: 'bad options ...', exit 78)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import NEUTRAL_CWD, clean_env, plugin, wait_for, with_path
from test_break_dirs import start  # noqa: F401 (fixture)

INGESTD = [sys.executable, "-m", "ingestd"]


def _process(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*INGESTD, "process", *args], check=False, cwd=tmp_path, env={**clean_env(), **(env or {})},
                          capture_output=True, text=True, timeout=60)


# --- process --output: odd outputs (item 4) --------------------------------------------------------------------
@pytest.mark.parametrize("out", ["d/", ".", "..", "d/.", "d/..", "loop1/x", "gone/../out.txt"])
def test_odd_outputs_refused_without_traceback_or_leftovers(tmp_path: Path, out: str) -> None:
    """Tried: trailing slash, '.', '..', a symlink loop, a missing folder then '..': each refused (73), nothing
    written, no temp left."""
    (tmp_path / "in.txt").write_bytes(b"hello\n")
    (tmp_path / "d").mkdir()
    (tmp_path / "loop1").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop1")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    r = _process(tmp_path, "--input", "in.txt", "--output", out)
    assert r.returncode == 73 and "Traceback" not in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_output_to_a_fifo_is_not_replaced(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_bytes(b"hello\n")
    os.mkfifo(tmp_path / "p")
    reader = subprocess.Popen(["cat", str(tmp_path / "p")], stdout=subprocess.PIPE)
    try:
        r = _process(tmp_path, "--input", "in.txt", "--output", "p")
        assert stat.S_ISFIFO(os.lstat(tmp_path / "p").st_mode), f"the FIFO became a regular file (exit {r.returncode})"
        assert reader.communicate(timeout=10)[0] == b"HELLO\n"
    finally:
        reader.kill()  # blocked in open() on the FIFO's inode when nothing wrote to it
        reader.wait()
        reader.stdout.close()  # type: ignore[union-attr]


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_output_to_a_device_node_is_not_replaced(tmp_path: Path) -> None:
    """Never against /dev itself: a copy of /dev/null's node (c 1 3) in tmp_path shows the same."""
    (tmp_path / "in.txt").write_bytes(b"hello\n")
    os.mknod(tmp_path / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    r = _process(tmp_path, "--input", "in.txt", "--output", "null")
    assert stat.S_ISCHR(os.lstat(tmp_path / "null").st_mode), f"the device node became a regular file " \
                                                              f"(exit {r.returncode}: {r.stderr})"


def test_output_to_a_symlink_writes_its_target(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_bytes(b"hello\n")
    (tmp_path / "t.txt").write_bytes(b"old\n")
    (tmp_path / "lnk").symlink_to("t.txt")
    r = _process(tmp_path, "--input", "in.txt", "--output", "lnk")
    assert r.returncode in (0, 73), r.stderr
    if r.returncode == 0:
        assert (tmp_path / "lnk").is_symlink() and (tmp_path / "t.txt").read_bytes() == b"HELLO\n"


# --- routing: hostile plug-ins (item 5) --------------------------------------------------------------------------
PLUGIN = '''
import os

class _NoSignature:
    @property
    def __signature__(self):
        raise RuntimeError("no signature for you")

    def __call__(self, **options):
        raise TypeError("refused")

nosig = _NoSignature()
importfail = (1 + "x") if os.environ.get("BADPLUG_BOOM") else None
'''


def _plugin(tmp_path: Path, module: str, entries: dict[str, str]) -> dict[str, str]:
    """A plug-in distribution on PYTHONPATH (its dist-info read by importlib.metadata): no install, no mock."""
    return with_path(plugin(tmp_path / "plug", "badplug", module, entries))


def test_factory_whose_signature_raises_is_a_config_error(tmp_path: Path) -> None:
    env = _plugin(tmp_path, PLUGIN, {"nosig": "badplug:nosig"})
    (tmp_path / "in.txt").write_bytes(b"hi\n")
    (tmp_path / "c.toml").write_text('[[filters]]\nprocessor = "nosig"\nx = 1\n')
    r = _process(tmp_path, "--config", "c.toml", "--input", "in.txt", "--output", "-", env=env)
    assert r.returncode == 78 and "Traceback" not in r.stderr, r.stderr[-600:]


def test_plugin_raising_typeerror_at_import_is_a_config_error(tmp_path: Path) -> None:
    env = _plugin(tmp_path, PLUGIN, {"importfail": "badplug:importfail"})
    (tmp_path / "in.txt").write_bytes(b"hi\n")
    (tmp_path / "c.toml").write_text('[[filters]]\nprocessor = "importfail"\n')
    r = _process(tmp_path, "--config", "c.toml", "--input", "in.txt", "--output", "-",
                 env={**env, "BADPLUG_BOOM": "1"})
    assert r.returncode == 78 and "Traceback" not in r.stderr, r.stderr[-600:]


# --- a `gone` confirmed by lstat (item 1) ------------------------------------------------------------------------
FAST = {"INGESTD_RESCAN_INTERVAL": "3600", "INGESTD_SETTLE_TIME": "0.3", "INGESTD_WORKERS": "1"}


def _known_then_stopped(d, path: Path, data: bytes):
    """A file held open for writing (the lease says busy, so the arrivals model knows its name), then the daemon
    stopped (SIGSTOP): what happens next is read by it in one go when it is continued. Returns the open file."""
    f = open(path, "wb")  # noqa: SIM115 - the caller closes it
    f.write(data)
    f.flush()
    time.sleep(0.5)
    os.kill(d.proc.pid, signal.SIGSTOP)
    return f


@pytest.mark.parametrize("watch", ["inotify", "polling"])
def test_delete_and_recreate_while_daemon_stopped_is_claimed_once_and_whole(start, tmp_path: Path,  # noqa: F811
                                                                             watch: str) -> None:
    """Tried: a producer that deletes a waiting file and re-creates the same name, writing it slowly (held open
    across a pause), while the daemon is SIGSTOPped so the `gone` is read with the new file already there. The
    new file must not be claimed before its writer closes, and must be processed once, whole."""
    d = start(*(["--watch", "polling"] if watch == "polling" else []), env=FAST)
    w = tmp_path / "w"
    u = w / "unprocessed"
    # A first file held open: it waits (the kernel's lease says busy), so its name is known to the arrivals model.
    f = _known_then_stopped(d, u / "x.txt", b"first\n")
    try:
        f.close()
        os.unlink(u / "x.txt")
        g = open(u / "x.txt", "wb")  # noqa: SIM115
        g.write(b"second part one\n")
        g.flush()
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    time.sleep(1.5)  # settle time passes several times over; the writer still holds it
    assert (u / "x.txt").exists(), "claimed while its writer held it open"
    g.write(b"second part two\n")
    g.close()
    out = w / "processed" / "x.txt"
    wait_for(out.exists, 15, what="x.txt processed")
    time.sleep(1.0)
    assert out.read_bytes() == b"SECOND PART ONE\nSECOND PART TWO\n"
    assert [p.name for p in (w / "processed").iterdir() if p.name.startswith("x")] == ["x.txt"]
    assert not any((w / "failed").iterdir())


def test_flapping_name_does_not_spin_or_double(start, tmp_path: Path) -> None:  # noqa: F811
    """Tried: one name deleted and re-made 2,000 times while the daemon is stopped (every `gone` then finds the
    name there), then left alone: processed once, its last content, and the daemon lives."""
    d = start(env=FAST)
    w = tmp_path / "w"
    u = w / "unprocessed"
    held = _known_then_stopped(d, u / "f.txt", b"0\n")  # known to the model (busy) before the flapping
    try:
        held.close()
        for i in range(2000):
            os.unlink(u / "f.txt")
            (u / "f.txt").write_bytes(f"{i}\n".encode())
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    out = w / "processed" / "f.txt"
    wait_for(out.exists, 15, what="f.txt processed")
    time.sleep(1.0)
    assert out.read_bytes() == b"1999\n"
    assert d.proc.poll() is None
    assert not (u / "f.txt").exists() and not any((w / "failed").iterdir())


def test_status_with_a_binary_lock_label_does_not_crash(start, tmp_path: Path) -> None:  # noqa: F811
    """Tried: .ingestd/lock overwritten with binary garbage (and a huge file) under a running recursive daemon:
    status runs (exit 0) and counts without the note."""
    start(env={**FAST, "INGESTD_RECURSIVE": "true"})
    lock = tmp_path / "w" / ".ingestd" / "lock"
    assert lock.read_text().endswith(", recursive")
    lock.write_bytes(os.urandom(4096) + b", recursive" + b"\xff" * (1 << 20))
    r = subprocess.run([*INGESTD, "status", "--watch-dir", str(tmp_path / "w")], check=False, cwd=NEUTRAL_CWD, env=clean_env(),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
