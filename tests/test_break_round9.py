"""Break-it round 9 (helper): what 3cb6f5b..df8962c changed (workers that cannot start: StartFailed, exit 78/75,
the respawn backoff, /healthz's "no worker can start"; recursive mode's PathIndex and .ingestd/emptied; log_level,
reload's not_applied, started's settings and unknown_env). Real daemons, real files, real inotify, real plug-in
distributions (support.plugin); no mocks.

Each test's docstring says FAULT (what it showed, its severity and the fix it needed; all four were fixed this round,
and each of these tests failed before its fix) or HELD (tried, and it held)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import daemon_group, plugin, wait_for, with_path

INGESTD = [sys.executable, "-m", "ingestd"]
RECURSIVE = {"INGESTD_RECURSIVE": "true"}


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator:
    """Start real daemons (each in a session of its own); every one is killed with its workers at the end."""
    yield from daemon_group(tmp_path)


# =====================================================================================================================
# 1. Workers that cannot start
# =====================================================================================================================
# Imports in the daemon; in a worker process, while the flag file exists, does what BEHAVIOUR says.
IN_WORKERS = """
import multiprocessing, os, threading, time
if multiprocessing.parent_process() is not None and os.path.exists({flag!r}):
{behaviour}
def make():
    return str.upper
"""
HANG = "    time.sleep(3600)  # a plug-in waiting at import for a service, a lock, a network mount"
RAISE = "    raise RuntimeError('cannot start in a worker')"
# Fails at the worker's first start only (both imports of it: processors.options() swallows the first), then
# loads: a service not up yet at boot, EMFILE or ENOMEM for a moment.
ONCE = ("    n = int(open({flag!r}).read() or 0) + 1\n"
        "    if n >= 2:\n        os.unlink({flag!r})\n"
        "    else:\n        open({flag!r}, 'w').write(str(n))\n"
        "    raise OSError(111, 'Connection refused (the licence server at import)')")


def _plug(tmp_path: Path, flag: Path, behaviour: str) -> dict[str, str]:
    module = IN_WORKERS.format(flag=str(flag), behaviour=behaviour.format(flag=str(flag)))
    root = plugin(tmp_path / "plug", "wplug9", module, {"w9": "wplug9:make"})
    return {**with_path(root), "INGESTD_MODE": "w9", "INGESTD_SETTLE_TIME": "0.1"}


def test_reload_to_a_plugin_hanging_at_import_in_workers_is_reported(tmp_path: Path, daemons) -> None:
    """FAULT, fixed this round (wedge + lies to the operator; high). The daemon runs, then its plug-in hangs at import in new worker
    processes (waits for a service, a lock, an NFS mount; here a sleep while a flag file exists), and a reload
    replaces the idle workers: the new ones never say Ready and never die. The backoff and "no worker can start"
    (Pool._died_at_start) only see deaths, and Pool.start()'s 60 s limit applies only at daemon start, so: every
    file waits for ever, /healthz answers 200 "ok", the systemd watchdog is fed, no event is logged. The same holds
    for a worker that sent StartFailed but cannot exit (a plug-in's non-daemon thread: multiprocessing joins it).
    Fix: give a respawned worker a start limit (stall_time, say): past it, SIGUSR1 for its stack, kill it and treat
    it as a death before Ready (backoff, worker_cannot_start "did not start within Ns"), and let health() say
    "no worker can start" while files wait and no worker is Ready past that limit."""
    flag = tmp_path / "flag"
    d = daemons(env={**_plug(tmp_path, flag, HANG), "INGESTD_STALL_TIME": "2"})
    u = d.watch_dir / "unprocessed"
    (u / "a.txt").write_text("a\n")
    wait_for(lambda: (d.watch_dir / "processed" / "a.txt").exists(), what="a.txt processed")
    flag.write_text("")
    d.signal(signal.SIGHUP)  # the idle worker is replaced by one that hangs importing the plug-in
    wait_for(lambda: d.event("reloaded"), what="reloaded")
    (u / "b.txt").write_text("b\n")

    def told() -> bool:
        return d.get("/healthz")[0] != 200 or bool(d.event("worker_cannot_start"))

    with contextlib.suppress(AssertionError):
        wait_for(told, timeout=7, interval=0.2)
    assert not (d.watch_dir / "processed" / "b.txt").exists()
    assert told(), ("b.txt has waited 7 s (stall_time 2 s) for a worker that hangs at import; /healthz still says "
                    f"{d.get('/healthz')} and nothing was logged")


def test_sigterm_while_a_worker_hangs_at_start_stops_the_daemon(tmp_path: Path, daemons) -> None:
    """FAULT, fixed this round (wedge; medium). At daemon start a worker that hangs importing its plug-in holds Pool.start() in
    conn.poll(60): the SIGTERM handler only queues the signal, so `systemctl stop` (or Ctrl-C, or a deploy
    restarting the unit) waits the whole 60 s, the watch dir's lock held, then the daemon exits 75 as if the worker
    were the problem and never says it was asked to stop.
    Fix: wait for the workers' Ready with the wake pipe in the same poll (multiprocessing.connection.wait on the
    pipes and self._wake_r), and on SIGTERM/SIGINT close the pool and exit at once (0, or 75 with "stopped while
    workers were starting")."""
    flag = tmp_path / "flag"
    flag.write_text("")
    d = daemons(env=_plug(tmp_path, flag, HANG), started=False)
    time.sleep(2)  # the daemon has loaded the routing and waits for its worker's Ready
    assert d.proc.poll() is None
    d.signal(signal.SIGTERM)
    t0 = time.monotonic()
    try:
        rc = d.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail("SIGTERM ignored for 5 s while a worker hangs at import (Pool.start waits up to 60 s)")
    assert time.monotonic() - t0 < 5 and rc is not None


def test_a_worker_failing_once_at_daemon_start_is_not_a_permanent_config_error(tmp_path: Path, daemons) -> None:
    """FAULT, fixed this round (daemon stays down after a transient; medium). A plug-in whose import fails once in a worker for a
    passing reason (a service not up yet at boot, EMFILE, ENOMEM: here OSError ECONNREFUSED the first time only) ends
    `run` with exit 78, "worker 0 could not start: ...". The daemon itself had just imported the same plug-in fine,
    so this is the environment, not the configuration; but 78 is what the packaged unit's RestartPreventExitStatus=78
    never restarts: ingestd stays down after a boot-time hiccup that a restart 2 s later would not meet. Before
    this change the same start ended with an uncaught error (exit 1), which systemd restarted.
    Fix: at start, retry a worker that dies before its Ready with the same backoff (1 s, 2 s, ...) for a bounded
    time before giving up, and exit 78 only when the error repeats unchanged (else 75); or exit 75 when the error
    is an OSError/MemoryError (environmental by errors.py's own table)."""
    flag = tmp_path / "flag"
    flag.write_text("")
    d = daemons("--workers", "1", env=_plug(tmp_path, flag, ONCE), started=False)
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and d.proc.poll() is None and not d.event("started"):
        time.sleep(0.05)
    assert not flag.exists(), "the worker's import did not run"
    rc = d.proc.poll()
    assert rc != 78, ("a worker failing once at start (ECONNREFUSED at import) made `run` exit 78, which systemd "
                      "does not restart:\n" + "".join(d.lines[-3:]))
    (d.watch_dir / "unprocessed" / "a.txt").write_text("a\n")
    wait_for(lambda: (d.watch_dir / "processed" / "a.txt").exists(), timeout=8, what="a.txt processed")


def test_reload_after_fixing_the_plugin_respawns_without_waiting_out_the_backoff(tmp_path: Path, daemons) -> None:
    """FAULT, fixed this round (delays real work, and the operator's reload does nothing; low-medium). After a reload to a plug-in
    that cannot load in workers, each death doubles the slot's respawn delay (1, 2, 4 ... 60 s). The operator fixes
    the plug-in and reloads (`systemctl reload`, the documented way to apply it): Pool.reconfigure() marks the
    slots retiring but maintain() still skips a dead slot until its respawn_at, so the files keep waiting for the
    rest of the backoff (here ~4 s; up to 60 s after a minute of breakage) and /healthz goes on saying "no worker
    can start" about a plug-in already fixed.
    Fix: reconfigure() resets start_delay and respawn_at of slots whose worker is dead before Ready (a reload is the
    operator's "try now"), so their successors are spawned at the end of the reload's turn."""
    flag = tmp_path / "flag"
    d = daemons("--workers", "1", env=_plug(tmp_path, flag, RAISE))
    u = d.watch_dir / "unprocessed"
    (u / "a.txt").write_text("a\n")
    wait_for(lambda: (d.watch_dir / "processed" / "a.txt").exists(), what="a.txt processed")
    flag.write_text("")
    d.signal(signal.SIGHUP)
    (u / "b.txt").write_text("b\n")
    wait_for(lambda: d.count("worker_died") >= 3, timeout=8, what="three deaths at start (1 s, 2 s apart)")
    flag.unlink()  # the plug-in is fixed
    d.signal(signal.SIGHUP)  # and the operator reloads
    t0 = time.monotonic()
    with contextlib.suppress(AssertionError):
        wait_for(lambda: (d.watch_dir / "processed" / "b.txt").exists(), timeout=2.5)
    took = time.monotonic() - t0
    assert (d.watch_dir / "processed" / "b.txt").exists(), (
        f"b.txt still waits {took:.1f} s after the plug-in was fixed and the daemon reloaded (the backoff of 4 s "
        "goes on)")


def test_reload_storm_loses_and_doubles_nothing(tmp_path: Path, daemons) -> None:
    """HELD. 40 SIGHUPs in 2 s (a config-management loop) while 60 files arrive: each reload retires every worker
    and kills the ones still importing, yet once the storm ends every file is processed exactly once, none is left
    in unprocessed/ or underprocess/, and the daemon is healthy."""
    d = daemons(env={"INGESTD_SETTLE_TIME": "0.1"})
    u = d.watch_dir / "unprocessed"
    for i in range(40):
        (u / f"f{i:02}.txt").write_text(f"line {i}\n")
        if i < 20:
            (u / f"g{i:02}.txt").write_text(f"more {i}\n")
        d.signal(signal.SIGHUP)
        time.sleep(0.05)
    done = d.watch_dir / "processed"
    wait_for(lambda: len(list(done.iterdir())) >= 60, timeout=10, what="60 files processed")
    time.sleep(0.5)
    names = sorted(p.name for p in done.iterdir())
    assert len(names) == 60 and not list(u.iterdir())
    assert not [p for p in (d.watch_dir / "underprocess").iterdir() if not p.name.startswith(".")]
    assert (done / "f07.txt").read_text() == "LINE 7\n"
    assert d.get("/healthz")[0] == 200


def test_reload_names_only_the_settings_it_does_not_apply(tmp_path: Path, daemons) -> None:
    """HELD. A reload with nothing changed is INFO with no not_applied; one whose config raised stall_time
    and log_level names exactly those two (WARNING), not the routing it applies nor anything it merely re-read."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('mode = "uppercase"\n')
    d = daemons("--config", str(cfg))
    d.signal(signal.SIGHUP)
    ev = wait_for(lambda: d.event("reloaded"), what="reloaded")
    assert ev["level"] == "INFO" and ev.get("not_applied") is None, ev
    cfg.write_text('mode = "lowercase"\nstall_time = 9\nlog_level = "warning"\n')
    d.signal(signal.SIGHUP)
    wait_for(lambda: d.count("reloaded") >= 2, what="second reloaded")
    ev = [e for e in d.events if e.get("event") == "reloaded"][-1]
    assert ev["level"] == "WARNING" and ev["not_applied"] == ["log_level", "stall_time"], ev


# =====================================================================================================================
# 2. Recursive mode: PathIndex and .ingestd/emptied
# =====================================================================================================================
def test_pathindex_siblings_prefixes_and_odd_names() -> None:
    """HELD. "a" vs "ab" vs "a/b" vs "a b" and names ending in a space or holding undecodable bytes (surrogate
    escapes): under() finds exactly the paths below a folder, discard() leaves the index as if never added."""
    from ingestd.pathindex import PathIndex

    paths = ["a", "ab", "a/b", "a/b/c", "a/bc", "a b/x", "a ", "a\udcff/z", "b/a", "x/y/z/w"]
    idx = PathIndex(paths)
    assert sorted(idx.under("a")) == ["a", "a/b", "a/b/c", "a/bc"]
    assert sorted(idx.under("a", itself=False)) == ["a/b", "a/b/c", "a/bc"]
    assert sorted(idx.under("a/b")) == ["a/b", "a/b/c"]
    assert idx.under("x/y") == ["x/y/z/w"] and idx.under("ab") == ["ab"] and idx.under("nope") == []
    assert sorted(idx.under("")) == sorted(paths)
    for p in idx.under("a"):
        idx.discard(p)
    assert sorted(idx.under("")) == sorted(set(paths) - {"a", "a/b", "a/b/c", "a/bc"})
    for p in paths:
        idx.discard(p)
    assert len(idx) == 0 and idx._kids in ({}, {"": set()})  # nothing left leading anywhere


def _quiet(q: float) -> dict[str, str]:
    return {**RECURSIVE, "INGESTD_SETTLE_TIME": "0.1", "INGESTD_FOLDER_QUIET_TIME": str(q)}


@pytest.mark.parametrize("kind", ["fifo", "garbage", "folder", "symlink_zero", "newer_version"])
def test_damaged_emptied_file_is_read_as_nothing_kept(tmp_path: Path, daemons, kind: str) -> None:
    """HELD. .ingestd/emptied as a FIFO (no writer: an open would block), random bytes, a folder, a symlink to
    /dev/zero, or a file of a later version's format: the daemon starts at once, processes files in subfolders and
    removes the folders it emptied (a folder in the way of the save is logged and retried, never fatal)."""
    w = tmp_path / "w"
    state = w / ".ingestd"
    state.mkdir(parents=True)
    p = state / "emptied"
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "garbage":
        p.write_bytes(os.urandom(4096))
    elif kind == "folder":
        p.mkdir()
    elif kind == "symlink_zero":
        p.symlink_to("/dev/zero")
    else:
        p.write_bytes(b"ingestd-emptied-2\n" + b"\x01" * 64)
    d = daemons(env=_quiet(0.3), watch_dir=w)
    sub = w / "unprocessed" / "batch"
    sub.mkdir()
    (sub / "a.txt").write_text("a\n")
    wait_for(lambda: (w / "processed" / "batch" / "a.txt").exists(), what="batch/a.txt processed")
    wait_for(lambda: not sub.exists(), timeout=5, what="the emptied folder removed")
    assert d.proc.poll() is None


def test_kept_identity_never_removes_a_new_folder_of_the_same_name(tmp_path: Path, daemons) -> None:
    """HELD. A folder the daemon emptied is pending (quiet time 30 s) when the daemon is killed -9 (its identity
    saved within the second). While it is down the folder is renamed within unprocessed/ ("old"), and a producer
    makes a fresh, empty "batch" (a new inode, even if the number is reused: its birth time differs). The next run
    removes "old" (kept by identity, under its new name) and never the producer's fresh "batch"."""
    w = tmp_path / "w"
    d = daemons(env=_quiet(30), watch_dir=w)
    u = w / "unprocessed"
    (u / "batch").mkdir()
    (u / "batch" / "a.txt").write_text("a\n")
    wait_for(lambda: (w / "processed" / "batch" / "a.txt").exists(), what="batch/a.txt processed")
    wait_for(lambda: (w / ".ingestd" / "emptied").exists(), timeout=3, what=".ingestd/emptied saved")
    os.killpg(d.proc.pid, signal.SIGKILL)
    d.kill()
    shutil.rmtree(w / "processed" / "batch")  # a consumer took the results: only the kept identity tells
    (u / "batch").rename(u / "old")
    (u / "batch").mkdir()
    time.sleep(0.05)
    daemons(env=_quiet(0.3), watch_dir=w)
    wait_for(lambda: not (u / "old").exists(), timeout=5, what="the renamed emptied folder removed")
    time.sleep(1.0)
    assert (u / "batch").is_dir(), "the producer's fresh folder was removed"


def test_a_sighup_during_the_start_is_acted_on_once_started(tmp_path: Path, daemons) -> None:
    """HELD. A SIGHUP during the start (tests/test_break_round10.py), with a worker slow (2 s) but not stuck at import: Pool.start drained its
    wake-up byte, yet the signal waits in the daemon's list and is a reload at the first turns after the start."""
    flag = tmp_path / "flag"
    flag.write_text("")
    d = daemons(env=_plug(tmp_path, flag, "    time.sleep(2)"), started=False)
    time.sleep(0.8)  # the daemon waits for its worker's Ready
    d.signal(signal.SIGHUP)
    wait_for(lambda: d.event("started"), timeout=10, what="started")
    t0 = time.monotonic()
    wait_for(lambda: d.event("reloaded"), timeout=10, what="the reload asked for during the start")
    assert time.monotonic() - t0 < 2, "the SIGHUP queued during the start waited for a timer"
