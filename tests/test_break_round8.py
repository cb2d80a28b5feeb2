"""Break-it round 8 (helper): what 41d06de..e0f532b changed (folder_quiet_time for emptied folders in recursive mode,
`watch_dir_created` and "does not exist" for a missing watch dir, plug-in load errors named, process --output's
kernel reasons). Real daemons, real files, real inotify, real plug-in distributions (support.plugin); no mocks.

Each test's docstring says FAULT (what it showed and the fix it needed; every one was fixed this round, and each of
these tests failed before its fix) or HELD (tried, and it held)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import (
    DaemonProcess,
    clean_env,
    cpu_used,
    daemon_group,
    plugin,
    wait_for,
    with_path,
)

INGESTD = [sys.executable, "-m", "ingestd"]
RECURSIVE = {"INGESTD_RECURSIVE": "true"}


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator:
    """Start real daemons (each in a session of its own); every one is killed with its workers at the end."""
    yield from daemon_group(tmp_path)


def _cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None,
         timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*INGESTD, *args], check=False, cwd=tmp_path, env={**clean_env(), **(env or {})},
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _tree_cpu(pid: int) -> float:
    """CPU seconds of a process and of its children it has reaped (utime, stime, cutime, cstime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


# =====================================================================================================================
# 3. Processor plug-ins
# =====================================================================================================================
WORKERS_ONLY = """
import multiprocessing, os
# Imports in the daemon (settings are checked there), fails in every worker process: a plug-in that needs what only
# the parent has (an environment, a file, a service), or the parent's cached copy of a plug-in upgraded on disk.
if multiprocessing.parent_process() is not None and os.path.exists({flag!r}):
    raise RuntimeError("cannot start in a worker")
def make():
    return str.upper
"""


def _workers_only(tmp_path: Path, flag: Path) -> dict[str, str]:
    root = plugin(tmp_path / "plug", "wplug", WORKERS_ONLY.format(flag=str(flag)), {"wup": "wplug:make"})
    return {**with_path(root), "INGESTD_MODE": "wup"}


def test_plugin_failing_in_workers_at_start_does_not_wedge_the_daemon(tmp_path: Path, daemons) -> None:
    """FAULT, fixed this round (wedge). A plug-in that imports in the daemon but raises in its worker processes (here: always in a
    worker): Pool.start() raises "worker 0 exited at start", then Daemon.shutdown() calls Web.stop(), whose
    socketserver.shutdown() waits for a serve_forever() that was never started (web.start() comes after the pool):
    the daemon hangs for ever, holding the watch dir's lock (`ingestd status` says "running"), never saying why
    (the RuntimeError is never logged), and SIGTERM does nothing (its handler only queues it). systemd: start
    timeout, SIGKILL, restart, the same again.
    Fix: Web.stop() must not call server.shutdown() unless its thread was started (or start the web thread first);
    log the start-up error; better, have the pool's start-up failure name the worker's error (the plug-in's)."""
    flag = tmp_path / "flag"
    flag.write_text("")
    d = daemons(env=_workers_only(tmp_path, flag), started=False)
    try:
        rc = d.proc.wait(timeout=8)
    except subprocess.TimeoutExpired:
        d.proc.send_signal(signal.SIGTERM)
        try:
            d.proc.wait(timeout=3)
            stopped = "SIGTERM then ended it"
        except subprocess.TimeoutExpired:
            stopped = "SIGTERM ignored too"
        pytest.fail(f"the daemon hung at start-up (worker failed to import the plug-in); {stopped}:\n"
                    + "".join(d.lines[-5:]))
    assert rc != 0
    assert "could not be loaded" in "".join(d.lines)


def _died(d: DaemonProcess) -> int:
    return d.count("worker_died")


def test_workers_dying_at_start_do_not_spin_and_are_reported(tmp_path: Path, daemons) -> None:
    """FAULT, fixed this round (spins two cores, lies to the operator). The daemon runs fine, then its plug-in cannot be imported in new
    worker processes (a `pip install -U` of the plug-in that broke it, a file or service it needs at import gone;
    here a flag file), and a `systemctl reload` restarts the workers: each new worker dies at once, is respawned at
    once, ~10 deaths a second with 2 workers: 100% of both cores of this VM in interpreter start-ups, the files
    waiting are never processed, and /healthz still answers 200 "ok".
    Fix: back off respawns of workers that die before their Ready (as RESPAWN_AFTER does for spawns that fail), and
    make health() say "no worker can start: <the worker's error>" (so the watchdog and /healthz tell)."""
    flag = tmp_path / "flag"
    d = daemons("--workers", "2", env={**_workers_only(tmp_path, flag), "INGESTD_SETTLE_TIME": "0.1"})
    u = d.watch_dir / "unprocessed"
    (u / "a.txt").write_text("a\n")
    wait_for(lambda: (d.watch_dir / "processed" / "a.txt").exists(), what="a.txt processed")
    flag.write_text("")
    d.signal(signal.SIGHUP)  # reload: the idle workers are replaced by new ones, which import the plug-in again
    wait_for(lambda: _died(d) >= 1, what="a new worker dying at start")
    (u / "b.txt").write_text("b\n")
    before, cpu0 = _died(d), _tree_cpu(d.proc.pid)
    time.sleep(3)
    deaths, cpu = _died(d) - before, _tree_cpu(d.proc.pid) - cpu0
    code = d.get("/healthz")[0]
    assert deaths <= 8 and cpu < 1.0, f"{deaths} worker deaths and {cpu:.1f} s of CPU in 3 s (respawned at once)"
    assert code != 200, "/healthz says ok while no worker can start and b.txt waits"


def _bad_import(tmp_path: Path, body: str) -> dict[str, str]:
    root = plugin(tmp_path / "plug", "badplug", body + "\ndef make():\n    return str.upper\n", {"bad": "badplug:make"})
    return with_path(root)


EXITS_AT_IMPORT = {
    "SystemExit(0)": "raise SystemExit(0)",
    "argparse at import": "import argparse\nargparse.ArgumentParser(prog='badplug').parse_args(['--nope'])",
    "BaseException": "class Stop(BaseException):\n    pass\nraise Stop('gevent-style')",
}


@pytest.mark.parametrize("body", EXITS_AT_IMPORT.values(), ids=EXITS_AT_IMPORT.keys())
def test_plugin_exiting_at_import_is_a_load_error_for_process(tmp_path: Path, body: str) -> None:
    """FAULT, fixed this round (lies to the operator). processors._factory (and options()) catch Exception only: a plug-in module that
    raises SystemExit at import (a module that parses sys.argv with argparse, a stray sys.exit()) or another
    BaseException ends `ingestd process` with the plug-in's exit code: SystemExit(0) exits 0 with no output
    written and nothing said; argparse's exits 2 ("bad command line") with the plug-in's usage; a BaseException
    is a traceback with exit 1. Promised: "processor 'bad' could not be loaded: ...", exit 78.
    Fix: catch BaseException but KeyboardInterrupt in _factory (SystemExit included) and turn it into LoadError."""
    (tmp_path / "in.txt").write_text("hello\n")
    r = _cli(tmp_path, "process", "--input", "in.txt", "--output", "out.txt", "--mode", "bad",
             env=_bad_import(tmp_path, body))
    assert r.returncode == 78 and "processor 'bad' could not be loaded" in r.stderr, (r.returncode, r.stderr[-300:])


def test_plugin_exiting_at_import_is_a_load_error_for_run(tmp_path: Path) -> None:
    """FAULT, fixed this round (the daemon ends with exit 0, silently). `ingestd run --mode bad` whose plug-in raises SystemExit(0) at
    import: exit 0, nothing said (no message, no event). systemd's Restart=on-failure does not restart a unit that
    exits 0, so the service is silently down. Expected: exit 78 naming the plug-in. Fix as above."""
    r = _cli(tmp_path, "run", "--watch-dir", "w", "--mode", "bad", "--listen", "127.0.0.1:0",
             env=_bad_import(tmp_path, "raise SystemExit(0)"))
    assert r.returncode == 78 and "could not be loaded" in r.stderr, (r.returncode, r.stderr[-300:])


def test_reload_to_a_plugin_exiting_at_import_keeps_the_daemon(tmp_path: Path, daemons) -> None:
    """FAULT, fixed this round (kills the daemon, exit 0). A running daemon, its config changed to a filter whose plug-in raises
    SystemExit(0) at import, then SIGHUP (`systemctl reload`): the SystemExit goes through _reload (it catches
    ConfigError), through the loop's boundaries (Exception only): the daemon stops ("stopped", exit 0), where
    README promises "a bad new config is logged and the old one kept" (reload_failed). Exit 0: systemd does not
    restart it. Fix: as above (LoadError); the reload could also contain BaseException but KeyboardInterrupt."""
    cfg = tmp_path / "cfg.toml"
    cfg.write_text('mode = "uppercase"\n')
    d = daemons("--config", str(cfg), env=_bad_import(tmp_path, "raise SystemExit(0)"))
    cfg.write_text('[[filters]]\nmatch = "*"\nprocessor = "bad"\n')
    d.signal(signal.SIGHUP)
    wait_for(lambda: d.event("reload_failed") or d.proc.poll() is not None, what="the reload's outcome")
    assert d.proc.poll() is None, f"the daemon ended (exit {d.proc.returncode}) on a reload"
    (d.watch_dir / "unprocessed" / "a.txt").write_text("a\n")
    wait_for(lambda: (d.watch_dir / "processed" / "a.txt").exists(), what="a.txt processed by the old routing")


def test_plugin_load_error_named_in_run_and_process(tmp_path: Path) -> None:
    """HELD. A plug-in raising KeyError / ImportError at import: `process` and `run` exit 78 with "processor 'bad'
    could not be loaded: KeyError: ..." (not "unknown processor"); run never made its watch dir before the check."""
    env = _bad_import(tmp_path, "import os\nos.environ['INGESTD_NO_SUCH_KEY_AT_ALL']")
    (tmp_path / "in.txt").write_text("x\n")
    r = _cli(tmp_path, "process", "--input", "in.txt", "--output", "out.txt", "--mode", "bad", env=env)
    assert r.returncode == 78 and "could not be loaded: KeyError" in r.stderr and "unknown" not in r.stderr, r.stderr
    r = _cli(tmp_path, "run", "--watch-dir", "w", "--mode", "bad", "--listen", "127.0.0.1:0", env=env)
    assert r.returncode == 78 and "could not be loaded: KeyError" in r.stderr, r.stderr
    assert not (tmp_path / "w").exists() and not (tmp_path / "out.txt").exists()


# =====================================================================================================================
# 1. folder_quiet_time: emptied folders of unprocessed/ (recursive mode)
# =====================================================================================================================
def _quiet(q: float, **more: str) -> dict[str, str]:
    return {**RECURSIVE, "INGESTD_SETTLE_TIME": "0.2", "INGESTD_FOLDER_QUIET_TIME": str(q), **more}


def test_producer_pausing_under_the_quiet_time_keeps_its_folder(tmp_path: Path, daemons) -> None:
    """HELD. folder_quiet_time 2 s; a producer writes five files into batch/, 1.2 s apart (each claimed within
    ~0.3 s, so batch/ is empty for ~0.9 s each time, well past settle_time): every write succeeds, every file is
    processed under batch/, and batch/ goes only ~2 s after the last claim (not sooner, and not left)."""
    d = daemons(env=_quiet(2))
    u = d.watch_dir / "unprocessed"
    (u / "batch").mkdir()
    for i in range(5):
        (u / "batch" / f"f{i}.txt").write_text(f"line {i}\n")  # raises FileNotFoundError if the folder went
        wait_for(lambda i=i: not (u / "batch" / f"f{i}.txt").exists(), what=f"f{i} claimed")
        time.sleep(1.2)
    last = time.monotonic() - 1.2
    wait_for(lambda: not (u / "batch").exists(), timeout=8, what="batch/ removed after the quiet time")
    assert time.monotonic() - last >= 1.8, "removed before folder_quiet_time"
    assert sorted(os.listdir(d.watch_dir / "processed" / "batch")) == [f"f{i}.txt" for i in range(5)]


def _emptied_batch(w: Path) -> None:
    """unprocessed/batch/a.txt dropped and processed: batch/ is a folder the daemon emptied, pending removal."""
    (w / "unprocessed" / "batch").mkdir()
    (w / "unprocessed" / "batch" / "a.txt").write_text("a\n")
    wait_for(lambda: (w / "processed" / "batch" / "a.txt").exists(), what="a.txt processed")


@pytest.mark.parametrize("how", ["SIGTERM", "kill -9"])
def test_emptied_folder_pending_across_a_restart_is_removed_after_it(tmp_path: Path, daemons, how: str) -> None:
    """HELD. An emptied folder pending removal (folder_quiet_time 3 s) when the daemon stops (SIGTERM, or kill -9):
    the next daemon removes it ~3 s after its start (its mirror processed/batch was born after it), while a
    producer's folder made during the downtime (born after the results' mirror) stays."""
    w = tmp_path / "w"
    d = daemons(env=_quiet(3))
    u = w / "unprocessed"
    _emptied_batch(w)
    if how == "SIGTERM":
        assert d.stop() == 0
    else:
        os.killpg(d.proc.pid, signal.SIGKILL)
        d.kill()
    assert (u / "batch").is_dir()
    (u / "fresh").mkdir()  # a producer's new folder, not filled yet
    d2 = daemons(env=_quiet(3))
    t0 = time.monotonic()
    wait_for(lambda: not (u / "batch").exists(), timeout=10, what="batch/ removed by the next daemon")
    assert time.monotonic() - t0 >= 2.5
    time.sleep(1)
    assert (u / "fresh").is_dir() and d2.proc.poll() is None


def test_emptied_folder_pending_across_a_restart_after_its_results_were_taken(tmp_path: Path, daemons) -> None:
    """FAULT, fixed this round (a folder left for ever; low). A downstream consumer takes the results (rm -r processed/batch: the very
    thing processed/ is for) while batch/ waits its folder_quiet_time (5 min by default: before this round 1 s, so a
    stop inside the window was unlikely); the daemon is restarted (`systemctl restart`, a deploy) in those minutes.
    The next daemon knows an emptied folder only by a mirror in underprocess/, processed/ or failed/ born after it
    (_emptied_before): none is left, so batch/ stays in unprocessed/ for ever, though the daemon emptied it. The
    same when every record of the file was routed to another output (processed/<out>/batch/: not looked at).
    Fix: keep the pending checks (rel + folder_id) in .ingestd/ (written at stop, and at each claim batch's
    fsync), and schedule them at start when the folder there still has that identity; or look at routed outputs'
    mirrors too."""
    w = tmp_path / "w"
    d = daemons(env=_quiet(2))
    u = w / "unprocessed"
    _emptied_batch(w)
    (w / "processed" / "batch" / "a.txt").unlink()  # the consumer takes its result
    (w / "processed" / "batch").rmdir()
    assert d.stop() == 0
    daemons(env=_quiet(2))
    time.sleep(4)
    assert not (u / "batch").exists(), "the folder the daemon emptied stays in unprocessed/ for ever"


def _one_file_folders(stage: Path, w: Path, n: int) -> Path:
    """n folders b0000.. of one file x.txt each, made in `stage`, then moved into w's unprocessed/ one by one, at
    once (a producer's atomic drops); returns unprocessed/."""
    for i in range(n):
        (stage / f"b{i:04d}").mkdir(parents=True)
        (stage / f"b{i:04d}" / "x.txt").write_text(f"{i}\n")
    u = w / "unprocessed"
    for i in range(n):
        (stage / f"b{i:04d}").rename(u / f"b{i:04d}")
    return u


def test_many_emptied_folders_pending_cost_no_cpu_while_idle(tmp_path: Path, daemons) -> None:
    """FAULT, fixed this round (spins a core for up to a second after a burst of completions; found here, likely not from this round).
    500 one-file folders moved in at once, all processed, underprocess/ empty, the emptied folders pending for
    folder_quiet_time (4 s): the daemon should sleep, but uses ~0.5 s of CPU in the next second. strace of that
    second: ~6,000 turns of poll(fds, 0) = 0 + statfs(watch dir), nothing else, ended by one history save (openat,
    write, fsync, rename). Cause, as read from the code: after completions the history is dirty and _timeout_ms
    adds next_history as a deadline, but the history is saved only in _publish_view, which runs when now >=
    next_view (PROGRESS_REFRESH, 1 s) or an fd is ready: with next_history before next_view the deadline is in the
    past, poll() returns at once, and the loop turns until next_view. Then the pending folders are removed (HELD).
    Fix: save the history in _housekeeping when due (not only inside _publish_view), or add next_history as a
    deadline only as max(next_history, next_view)."""
    w = tmp_path / "w"
    d = daemons(env=_quiet(4))
    n = 500
    u = _one_file_folders(tmp_path / "stage", w, n)
    wait_for(lambda: d.count("processed") >= n, timeout=60, what="every file processed")
    # the last commits' tail (mirrors of underprocess/ removed, fsyncs) done: nothing left but the pending checks
    wait_for(lambda: not os.listdir(w / "underprocess"), what="underprocess/ empty")
    assert len(os.listdir(u)) > n // 2, "the folders went before their quiet time"
    assert cpu_used(d.proc.pid, 1.0, after=0.5) < 0.1
    wait_for(lambda: not os.listdir(u), timeout=20, what="every emptied folder removed")
    assert sum(1 for _ in (w / "processed").rglob("x.txt")) == n


def test_quiet_time_zero_does_not_spin_on_a_folder_rmdir_refuses(tmp_path: Path, daemons) -> None:
    """HELD. folder_quiet_time = 0 (allowed: _seconds(0)): an emptied folder whose rmdir is refused (here a mount
    point: EBUSY) is looked at again each FOLDER_RECHECK, not every turn: the daemon sleeps."""
    d = daemons(env=_quiet(0))
    u = d.watch_dir / "unprocessed"
    (u / "m").mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "none", str(u / "m")], check=False,
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs (needs root)")
    try:
        # a file on another file system cannot be claimed (EXDEV): give the folder one of its own instead
        (u / "batch").mkdir()
        (u / "batch" / "a.txt").write_text("a\n")
        wait_for(lambda: not (u / "batch").exists(), what="batch/ removed at once (quiet time 0)")
        assert cpu_used(d.proc.pid, 1.5, after=0.3) < 0.15
    finally:
        subprocess.run(["umount", "-l", str(u / "m")], check=False)


def test_emptied_folders_go_after_one_quiet_time_not_two(tmp_path: Path, daemons) -> None:
    """FAULT, fixed this round (low: emptied folders stay twice as long as said, 10 minutes by default, each holding its inotify watch
    and its place in every scan). The check is scheduled at the claim turn's start + folder_quiet_time (monotonic),
    but spool.prune measures the quiet from the folder's ctime, which the claim's rename set later in that turn
    (a turn claims up to 32 files a worker, and more ahead): at the check the folder has been quiet for a little
    less than folder_quiet_time, so it is looked at again only a whole folder_quiet_time later. 300 one-file folders
    moved in at once, folder_quiet_time 3 s: most go ~6 s after their claim. (One folder alone, claimed at the
    very start of its turn, usually goes in time.) README: "removed once it has been empty and unchanged for
    folder_quiet_time".
    Fix: when a check finds the folder empty but not yet quiet, look again when it will be (max(mtime, ctime) +
    quiet - wall time + now, at least FOLDER_RECHECK later), not a whole folder_quiet_time later; or take the
    check's time from the clock read after the claim's rename."""
    w = tmp_path / "w"
    daemons(env=_quiet(3))
    n = 300
    u = _one_file_folders(tmp_path / "stage", w, n)
    wait_for(lambda: not any((u / f"b{i:04d}" / "x.txt").exists() for i in range(n)), what="every file claimed")
    claimed = time.monotonic()
    wait_for(lambda: not os.listdir(u), timeout=15, interval=0.05, what="every emptied folder removed")
    took = time.monotonic() - claimed
    assert took < 3 + 1.5, f"the last emptied folders went {took:.1f} s after the last claim (folder_quiet_time 3 s)"


def test_sweep_gone_is_not_quadratic_in_pending_folders() -> None:
    """FAULT, fixed this round (CPU: a core spun by a steady producer of small folders). Every folder leaving unprocessed/ (the daemon's
    own rmdir of an emptied folder too: its IN_DELETE comes back as dir_gone) costs three scans of everything known:
    Sweep.gone (every pending check), Watch.drop(below=True) (every watch) and Arrivals.forget_under (every waiting
    name). Cheap while emptied folders went after settle_time (1 s: a handful pending); with folder_quiet_time
    (300 s, and twice that, see above) every folder emptied in the last 5-10 minutes is pending and watched, so the
    removals are quadratic: profiled, 1,500 folders removed = 1.9 M str.startswith calls, 2.6 s of the daemon's
    CPU under the profiler (sweep.py:89, watch.py:84, arrivals.py:156); a producer making 100 one-file folders a
    second keeps ~30,000-60,000 pending, ~3 x 100 x 45,000 = 13 M startswith a second: a core. This test times
    Sweep.gone alone (no I/O): 5,000 pending folders, each then reported gone.
    Fix: index the checks, watches and waiting names by folder (a dict of children per folder, or a sorted list and
    bisect on the prefix), and skip the scans for a dir_gone of a folder the daemon itself just removed (it was
    empty: below=False, as _clean_folders already does for its own call)."""
    from ingestd.sweep import Sweep

    s = Sweep()
    n = 5_000
    for i in range(n):
        s.at(f"b{i:05d}", 1000.0 + i, (i, i))
    t = time.process_time()
    for i in range(n):
        s.gone(f"b{i:05d}", 0.0)
    took = time.process_time() - t
    assert took < 0.25, f"{n} folders gone one by one took {took:.1f} s of CPU (quadratic: each scans every check)"


# =====================================================================================================================
# 2. A watch dir that does not exist
# =====================================================================================================================
def test_run_on_missing_dotdot_path_does_not_claim_to_make_an_existing_watch_dir(tmp_path: Path) -> None:
    """FAULT, fixed this round (low: lies to the operator, leaves a stray folder). `--watch-dir typo/../w` where w is a watch dir with
    files waiting and typo/ does not exist: `ingestd status` (the kernel's view) says "typo/../w does not exist", but
    `ingestd run` makes typo/ (os.makedirs goes through it), logs WARNING watch_dir_created "the watch dir did not
    exist: made it" and at a terminal "(made now: .../typo did not exist)", then processes w's files: the watch
    dir did exist and was not made. Fix: in ensure_at_start, when missing() is a proper ancestor reached through a
    ".." (the normalised path exists), refuse as status does (exit 78 "typo/../w does not exist"), or make the
    watch dir by its normalised path and make nothing else."""
    w = tmp_path / "w"
    for f in ("unprocessed", "underprocess", "processed", "failed"):
        (w / f).mkdir(parents=True)
    (w / "unprocessed" / "a.txt").write_text("a\n")
    r = _cli(tmp_path, "status", "--watch-dir", "typo/../w")
    assert r.returncode == 78 and "does not exist" in r.stderr
    d = DaemonProcess(Path("typo/../w"), cwd=tmp_path, env=clean_env(), new_session=True)
    try:
        ev = wait_for(lambda: d.event("started") or d.proc.poll() is not None, what="the start's outcome")
        made = d.event("watch_dir_created")
        assert ev is True or made is None, f"said the watch dir was made ({made and made['made']}) though it existed"
        assert not (tmp_path / "typo").exists(), "a stray folder typo/ was made"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(d.proc.pid, signal.SIGKILL)
        d.kill()


def test_status_and_requeue_never_make_a_missing_watch_dir(tmp_path: Path) -> None:
    """HELD. status, status --json and requeue (all, or by name) on a missing watch dir, or one below a missing
    parent: exit 78 "does not exist", nothing made."""
    for args in (["status"], ["status", "--json"], ["requeue"], ["requeue", "x.txt"]):
        for wd in ("nope", "a/b/c"):
            r = _cli(tmp_path, *args, "--watch-dir", wd)
            assert r.returncode == 78 and f"{wd} does not exist" in r.stderr, (args, wd, r.stderr)
    assert os.listdir(tmp_path) == []


def test_two_daemons_racing_to_make_the_watch_dir(tmp_path: Path) -> None:
    """HELD. Two `ingestd run` on the same missing watch dir (below a missing parent) at once: the tree is made once,
    exactly one serves, the other exits 75 naming it; a file dropped then is processed once."""
    w = tmp_path / "new" / "w"
    a = DaemonProcess(w, cwd=tmp_path, env={"INGESTD_SETTLE_TIME": "0.2"}, new_session=True)
    b = DaemonProcess(w, cwd=tmp_path, env={"INGESTD_SETTLE_TIME": "0.2"}, new_session=True)
    try:
        wait_for(lambda: sum(1 for x in (a, b) if x.event("started") or x.proc.poll() is not None) == 2,
                 what="both starts' outcomes")
        serving = [x for x in (a, b) if x.proc.poll() is None]
        loser = [x for x in (a, b) if x.proc.poll() is not None]
        assert len(serving) == 1 and len(loser) == 1 and loser[0].proc.returncode == 75, [x.proc.poll() for x in (a, b)]
        (w / "unprocessed" / "a.txt").write_text("a\n")
        wait_for(lambda: (w / "processed" / "a.txt").exists(), what="a.txt processed")
        assert os.listdir(w / "processed") == ["a.txt"]
    finally:
        for x in (a, b):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(x.proc.pid, signal.SIGKILL)
            x.kill()


# =====================================================================================================================
# 4. process --output: a folder that goes away
# =====================================================================================================================
def test_process_output_folder_removed_while_writing(tmp_path: Path) -> None:
    """HELD. `ingestd process --input - --output out/r.txt` reading from a pipe; out/ is removed (rm -rf, the temp
    with it) while it runs: exit 73 naming the output and the kernel's reason, no traceback, nothing made again, no
    temp left anywhere."""
    (tmp_path / "out").mkdir()
    p = subprocess.Popen([*INGESTD, "process", "--input", "-", "--output", "out/r.txt"], cwd=tmp_path,
                         env=clean_env(), stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdin is not None
        p.stdin.write("one\n" * 1_000_000)  # past the head the binary check reads first, and the write buffers
        p.stdin.flush()
        wait_for(lambda: os.listdir(tmp_path / "out"), what="the temp output made")
        subprocess.run(["rm", "-rf", str(tmp_path / "out")], check=True)
        p.stdin.write("two\n")
        p.stdin.close()
        rc = p.wait(timeout=20)
        err = p.stderr.read() if p.stderr else ""
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        if p.stderr is not None:
            p.stderr.close()
    assert rc == 73 and "cannot write out/r.txt" in err and "Traceback" not in err, (rc, err)
    assert os.listdir(tmp_path) == []

