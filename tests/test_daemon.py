"""The daemon end to end: a real process, real folders, real inotify."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import HANG_ROUTING, INGESTD, DaemonProcess, cpu_seconds, folder, wait_for


@pytest.fixture
def start(tmp_path: Path) -> Iterator:
    procs: list[DaemonProcess] = []

    def _start(*args: str, env: dict[str, str] | None = None, watch: Path | None = None) -> DaemonProcess:
        d = DaemonProcess(watch or tmp_path / "w", *args, env=env, cwd=tmp_path)
        procs.append(d)
        return d.started()

    yield _start
    for d in procs:
        if d.proc.poll() is None:
            d.kill()


def processed(w: Path, name: str) -> bytes | None:
    p = w / "processed" / name
    return p.read_bytes() if p.exists() else None


def test_write_rename_and_link_arrivals_are_processed(start, tmp_path: Path) -> None:
    d = start("--workers", "2")
    w = d.watch_dir
    (w / "unprocessed" / "written.txt").write_bytes(b"alpha\r\nbeta")
    outside = tmp_path / "renamed.txt"
    outside.write_bytes(b"gamma\n")
    os.rename(outside, w / "unprocessed" / "renamed.txt")
    linked = tmp_path / "linked.txt"
    linked.write_bytes(b"delta\n")
    os.link(linked, w / "unprocessed" / "linked.txt")  # only IN_CREATE: no open, no close, no move
    wait_for(lambda: len(folder(w, "processed")) == 3, what="three results")
    assert processed(w, "written.txt") == b"ALPHA\r\nBETA"
    assert processed(w, "renamed.txt") == b"GAMMA\n"
    assert processed(w, "linked.txt") == b"DELTA\n"
    wait_for(lambda: not folder(w, "unprocessed") and not folder(w, "underprocess"), what="empty queue")
    # Announced after the commit point (the input's removal) is made durable: waited for, not read at once.
    wait_for(lambda: d.count("processed") == 3, what="three processed events")


def test_pickup_is_event_driven_not_polled(start) -> None:
    d = start()
    w = d.watch_dir
    t0 = time.monotonic()
    (w / "unprocessed" / "fast.txt").write_bytes(b"x\n")
    wait_for(lambda: processed(w, "fast.txt"), interval=0.002, what="result")
    assert time.monotonic() - t0 < 0.25  # the settle time is 0.3 s here: this was no settle check


def test_slow_writer_is_never_processed_early(start) -> None:
    d = start()
    w = d.watch_dir
    with open(w / "unprocessed" / "slow.txt", "wb") as f:
        for i in range(4):
            f.write(b"chunk %d\n" % i)
            f.flush()
            time.sleep(0.6)  # longer than the settle time: only open tracking keeps it waiting
            assert not folder(w, "underprocess") and processed(w, "slow.txt") is None
    wait_for(lambda: processed(w, "slow.txt"), what="result")
    assert processed(w, "slow.txt") == b"CHUNK 0\nCHUNK 1\nCHUNK 2\nCHUNK 3\n"


def test_files_present_at_start_are_settled_then_processed(tmp_path: Path, start) -> None:
    w = tmp_path / "w"
    for sub in ("unprocessed", "underprocess", "processed", "failed"):
        (w / sub).mkdir(parents=True)
    for i in range(20):
        (w / "unprocessed" / f"early-{i}.txt").write_bytes(b"e%d\n" % i)
    start()
    wait_for(lambda: len(folder(w, "processed")) == 20, what="20 results")
    assert processed(w, "early-7.txt") == b"E7\n"


def test_recovery_processes_in_flight_files_and_removes_stale_temps(tmp_path: Path, start) -> None:
    w = tmp_path / "w"
    for sub in ("unprocessed", "underprocess", "processed", "failed"):
        (w / sub).mkdir(parents=True)
    (w / "underprocess" / "crashed.txt").write_bytes(b"was in flight\n")
    (w / "processed" / ".ingestd-tmp-999-abc").write_bytes(b"half")
    d = start()
    wait_for(lambda: processed(w, "crashed.txt"), what="recovered result")
    assert processed(w, "crashed.txt") == b"WAS IN FLIGHT\n"
    assert not (w / "processed" / ".ingestd-tmp-999-abc").exists()
    assert d.event("recovered")["file"] == "crashed.txt"


def test_a_worker_crash_is_retried_then_quarantined_as_poison(tmp_path: Path, start) -> None:
    cfg = tmp_path / "crash.toml"
    cfg.write_text('[[filters]]\nmatch = "*"\nprocessor = "abort_on"\n[[filters]]\nmatch = "*"\nprocessor = "uppercase"\n')
    d = start("--config", str(cfg), "--workers", "1", env={"INGESTD_MAX_ATTEMPTS": "2"})
    w = d.watch_dir
    (w / "unprocessed" / "poison.txt").write_bytes(b"ok\nABORT here\n")
    wait_for(lambda: folder(w, "failed") == ["poison.txt"], what="poison quarantined")
    (w / "unprocessed" / "fine.txt").write_bytes(b"fine\n")
    wait_for(lambda: processed(w, "fine.txt") == b"FINE\n", what="the rest flows")
    assert d.count("worker_died") == 2
    out = subprocess.run([*INGESTD, "status", "--watch-dir", str(w)], capture_output=True, text=True)
    assert "poison.txt: poison: its worker died 2 times" in out.stdout


def test_hostile_entries_fail_with_a_reason_and_the_daemon_goes_on(start, tmp_path: Path) -> None:
    d = start()
    w = d.watch_dir
    u = w / "unprocessed"
    secret = tmp_path / "secret"
    secret.write_text("do not read\n")
    os.symlink(secret, u / "link-to-secret")
    os.symlink(tmp_path / "nowhere", u / "dangling")
    os.mkfifo(u / "pipe")
    (u / "adir").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(u / "sock"))
    (u / "blob.bin").write_bytes(b"\x7fELF\x00\x01")
    weird = os.fsdecode(b"-n\nnew\xffline <b>.txt")
    (u / weird).write_bytes(b"ok\n")
    wait_for(lambda: len(folder(w, "failed")) == 5, timeout=15, what="5 failures")
    sock.close()
    reasons = {f["name"]: f["reason"] for f in d.status()["failures"]}
    assert reasons["link-to-secret"].startswith("not a regular file: symlink")
    assert reasons["pipe"] == "not a regular file: FIFO"
    assert "adir" not in reasons and (u / "adir").is_dir()  # a folder is left where it is (issue 9)
    assert d.event("folder_left", folder="adir")
    assert reasons["sock"] == "not a regular file: socket"
    assert reasons["blob.bin"].startswith("binary content")
    assert os.readlink(w / "failed" / "link-to-secret") == str(secret)  # moved as a link, never followed
    wait_for(lambda: processed(w, weird) == b"OK\n", timeout=15, what="the weird name's result")
    # The event comes after the commit is durable, a moment after the result appears: wait for it.
    wait_for(lambda: d.event("processed", file="-n\\x0anew\\xffline <b>.txt"), timeout=15, what="its processed event")
    assert d.get("/healthz")[0] == 200


def test_same_name_again_replaces_the_result_atomically(start) -> None:
    d = start(env={"INGESTD_FILE_EXIST": "replace"})  # the default, keep, sets it aside: tests/test_file_exist.py
    w = d.watch_dir
    (w / "unprocessed" / "again.txt").write_bytes(b"first\n")
    wait_for(lambda: processed(w, "again.txt") == b"FIRST\n")
    (w / "unprocessed" / "again.txt").write_bytes(b"second\n")
    wait_for(lambda: processed(w, "again.txt") == b"SECOND\n")
    assert folder(w, "processed") == ["again.txt"]


def test_sigterm_finishes_the_current_file_then_exits_zero(start, tmp_path: Path) -> None:
    d = start("--workers", "1")
    w = d.watch_dir
    big = tmp_path / "big.txt"
    big.write_bytes(b"some line of text\n" * 3_000_000)  # ~54 MB: takes a while to process
    os.rename(big, w / "unprocessed" / "big.txt")
    wait_for(lambda: folder(w, "underprocess") == ["big.txt"], what="claim")
    d.signal(signal.SIGTERM)
    assert d.wait() == 0
    assert d.event("stopping") and d.event("stopped")
    assert (w / "processed" / "big.txt").stat().st_size == 54_000_000
    assert not folder(w, "underprocess")


def test_second_sigterm_abandons_the_file_back_to_the_queue(start, tmp_path: Path) -> None:
    cfg = tmp_path / "hang.toml"
    cfg.write_text(HANG_ROUTING)
    d = start("--config", str(cfg), "--workers", "1")
    w = d.watch_dir
    (w / "unprocessed" / "stuck.txt").write_bytes(b"HANG\n")
    wait_for(lambda: folder(w, "underprocess") == ["stuck.txt"], what="claim")
    d.signal(signal.SIGTERM)
    wait_for(lambda: d.event("stopping"))
    d.signal(signal.SIGTERM)
    assert d.wait(timeout=10) == 0
    assert folder(w, "unprocessed") == ["stuck.txt"]  # abandoned by a stop: back in the queue, not lost
    assert not folder(w, "underprocess") and not folder(w, "failed")


def test_files_claimed_ahead_survive_a_kill_9_and_no_attempt_is_counted_for_them(start, tmp_path: Path) -> None:
    """Files claimed ahead for a busy worker are in underprocess/ with no worker on them: after a crash each is
    recovered and processed once, with no attempt counted (only the file the worker was on is charged one)."""
    cfg = tmp_path / "hang.toml"
    cfg.write_text(HANG_ROUTING)
    d = start("--config", str(cfg), "--workers", "1", env={"INGESTD_STALL_TIME": "60"})
    w = d.watch_dir
    (w / "unprocessed" / "stuck.txt").write_bytes(b"HANG\n")
    wait_for(lambda: folder(w, "underprocess") == ["stuck.txt"], what="claim")
    ahead = [f"ahead-{i}.txt" for i in range(5)]
    for name in ahead:
        (w / "unprocessed" / name).write_bytes(b"%s\n" % name.encode())
    wait_for(lambda: len(folder(w, "underprocess")) == 6, what="five claimed ahead")
    d.kill()  # SIGKILL; its worker follows it (PR_SET_PDEATHSIG)
    d2 = start("--workers", "1")
    # Committed too: the outputs are published before the parent unlinks the inputs (and announces them).
    wait_for(lambda: len(folder(w, "processed")) == 6 and not folder(w, "underprocess") and d2.count("processed") == 6,
             what="every file after the restart")
    for name in ahead:
        assert processed(w, name) == name.upper().encode() + b"\n"
        assert d2.event("recovered", file=name)["attempts"] == 0, name
    assert d2.event("recovered", file="stuck.txt")["attempts"] == 1
    assert not folder(w, "underprocess") and not folder(w, "failed")


def test_a_hung_worker_is_killed_by_the_parent_and_the_file_ends_as_poison(start, tmp_path: Path) -> None:
    cfg = tmp_path / "hang.toml"
    cfg.write_text(HANG_ROUTING)
    d = start("--config", str(cfg), "--workers", "1", env={"INGESTD_STALL_TIME": "1", "INGESTD_MAX_ATTEMPTS": "2"})
    w = d.watch_dir
    (w / "unprocessed" / "stuck.txt").write_bytes(b"HANG\n")
    stuck = wait_for(lambda: d.event("worker_stuck"), timeout=10, what="worker_stuck")
    assert stuck["file"] == "stuck.txt" and "no progress" in stuck["reason"]
    # The parent, not systemd, deals with it: the main loop stays healthy throughout.
    assert d.get("/healthz") == (200, b"ok\n")
    wait_for(lambda: folder(w, "failed") == ["stuck.txt"], timeout=15, what="stuck.txt quarantined")
    assert d.count("worker_killed") == 2
    failure = d.status()["failures"][0]
    assert "stuck 2 times" in failure["reason"] and "no progress" in failure["reason"]
    (w / "unprocessed" / "next.txt").write_bytes(b"next\n")
    wait_for(lambda: processed(w, "next.txt") == b"NEXT\n", what="the queue flows on with a new worker")


def test_a_frozen_worker_is_noticed_logged_shown_and_replaced(start) -> None:
    """SIGSTOP: no heartbeat at all. Logged, shown in /api/status, killed, replaced. Frozen before it read the
    hand-off of a.txt, so a.txt is not blamed (max_attempts = 1 would have set it aside as poison)."""
    d = start("--workers", "1", env={"INGESTD_STALL_TIME": "1", "INGESTD_MAX_ATTEMPTS": "1"})
    w = d.watch_dir
    pid = wait_for(lambda: _worker_pids(d.proc.pid), what="the worker")[0]
    os.kill(pid, signal.SIGSTOP)
    (w / "unprocessed" / "a.txt").write_bytes(b"a\n")
    seen = wait_for(lambda: [x for x in d.status()["workers"] if x["stuck"]], timeout=10, what="stuck on the page")
    assert "no progress" in seen[0]["stuck"] and seen[0]["file"] == "a.txt"
    wait_for(lambda: processed(w, "a.txt") == b"A\n", timeout=15, what="a.txt processed by a new worker")
    wait_for(lambda: d.event("processed", file="a.txt"), what="its processed event")  # the log lags the disk
    assert d.event("worker_killed")["file"] is None, "it never started a.txt"
    assert not folder(w, "failed")
    assert d.get("/healthz")[0] == 200


def test_a_slow_processor_is_progress_not_a_stall(start, tmp_path: Path) -> None:
    """~5 ms per line, so whole seconds between line-count milestones: progress is reported by time."""
    cfg = tmp_path / "slow.toml"
    cfg.write_text('[[filters]]\nmatch = "*"\nprocessor = "slow"\nseconds = 0.005\n')
    d = start("--config", str(cfg), "--workers", "1", env={"INGESTD_STALL_TIME": "1"})
    w = d.watch_dir
    (w / "unprocessed" / "slow.txt").write_bytes(b"line\n" * 600)  # ~3 s of work
    wait_for(lambda: processed(w, "slow.txt") is not None, timeout=20, what="slow.txt processed")
    assert processed(w, "slow.txt") == b"LINE\n" * 600
    assert d.count("worker_stuck") == 0 and d.count("worker_killed") == 0


def _worker_pids(parent: int) -> list[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    pids = []
    for c in children:
        try:
            if "ingestd.worker" in Path(f"/proc/{c}/cmdline").read_bytes().decode(errors="replace") or \
                    "multiprocessing.spawn" in Path(f"/proc/{c}/cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(c))
        except FileNotFoundError:
            continue
    return pids


def test_a_watch_dir_that_does_not_exist_is_made_and_said(start, tmp_path: Path) -> None:
    """Found: `ingestd run --watch-dir /srv/queu` (a typo) made the whole tree silently: a daemon watching an empty
    new folder while files pile up elsewhere. Still made (a fresh install, `make run` on a fresh clone), but said: a
    WARNING event naming the watch dir and the topmost folder made, the same in `started`; an existing one, nothing."""
    w = tmp_path / "typo" / "w"
    d = start(watch=w)
    ev = d.event("watch_dir_created")
    assert ev and ev["level"] == "WARNING" and ev["watch_dir"] == str(w.resolve()), d.events
    assert ev["made"] == str(tmp_path / "typo") and d.event("started")["watch_dir_created"] == ev["made"]
    assert d.stop() == 0
    again = start(watch=w)
    assert again.count("watch_dir_created") == 0 and again.event("started")["watch_dir_created"] is None


def test_a_watch_dir_made_at_start_is_said_at_the_terminal(tmp_path: Path) -> None:
    """`make run WATCH_DIR=...` at a terminal: the text log's WARNING and the line saying where to look both say it."""
    import pty
    import select

    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    proc = subprocess.Popen([*INGESTD, "run", "--watch-dir", "new/w", "--listen", "127.0.0.1:0", "--workers", "1"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave, env=env, cwd=tmp_path)
    os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + 20
        while b"Ctrl-C" not in out and time.monotonic() < deadline and proc.poll() is None:
            if select.select([master], [], [], 0.5)[0]:
                out += os.read(master, 4096)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.decode(errors="replace")
    assert "WARNING the watch dir did not exist: made it" in text and f"made={tmp_path / 'new'}" in text, text
    assert f"new/w/unprocessed/ (made now: {tmp_path / 'new'} did not exist) - status page" in text, text


def test_second_daemon_is_refused_naming_the_first(start) -> None:
    d = start()
    out = subprocess.run([*INGESTD, "run", "--watch-dir", str(d.watch_dir), "--listen", "127.0.0.1:0"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 75
    assert f"pid {d.proc.pid}" in out.stderr and "another ingestd is running" in out.stderr
    assert d.proc.poll() is None


def test_sighup_reloads_routing_and_rejects_a_bad_config(start, tmp_path: Path) -> None:
    cfg = tmp_path / "r.toml"
    cfg.write_text('[[filters]]\nmatch = "*"\nprocessor = "uppercase"\n')
    d = start("--config", str(cfg))
    w = d.watch_dir
    cfg.write_text('[[filters]]\nmatch = "*"\nprocessor = "no-such"\n')
    d.signal(signal.SIGHUP)
    wait_for(lambda: d.event("reload_failed"))
    (w / "unprocessed" / "a.txt").write_bytes(b"Keep\n")
    wait_for(lambda: processed(w, "a.txt") == b"KEEP\n", what="old routing kept")
    cfg.write_text('[[filters]]\nmatch = "*"\nprocessor = "reverse"\n')
    d.signal(signal.SIGHUP)
    wait_for(lambda: d.event("reloaded"))
    (w / "unprocessed" / "b.txt").write_bytes(b"abc\n")
    wait_for(lambda: processed(w, "b.txt") == b"cba\n", what="new routing applied")


def test_done_marker_mode_waits_for_the_marker(start) -> None:
    d = start(env={"INGESTD_DONE_MARKER": "true"})
    w = d.watch_dir
    (w / "unprocessed" / "data.csv").write_bytes(b"a,b\n")
    time.sleep(0.8)
    assert processed(w, "data.csv") is None and folder(w, "unprocessed") == ["data.csv"]
    (w / "unprocessed" / "data.csv.done").write_bytes(b"")
    wait_for(lambda: processed(w, "data.csv") == b"A,B\n", what="processed after marker")
    wait_for(lambda: not folder(w, "unprocessed"), what="marker removed")


def test_routing_writes_tagged_records_to_their_outputs(start, tmp_path: Path) -> None:
    cfg = tmp_path / "route.toml"
    cfg.write_text("""
[[tags]]
match = "*.log"
tag = "app"
[[filters]]
match = "app"
retag = "errors"
pattern = "ERROR"
[[filters]]
match = "errors"
processor = "uppercase"
[[outputs]]
match = "errors"
path = "errors"
[[outputs]]
match = "*"
""")
    d = start("--config", str(cfg))
    w = d.watch_dir
    (w / "unprocessed" / "x.log").write_bytes(b"fine\nERROR bad\nok\n")
    wait_for(lambda: processed(w, "x.log") is not None and (w / "processed" / "errors" / "x.log").exists())
    assert processed(w, "x.log") == b"fine\nok\n"
    assert (w / "processed" / "errors" / "x.log").read_bytes() == b"ERROR BAD\n"


def test_idle_daemon_uses_almost_no_cpu_and_stays_healthy(start) -> None:
    """Idle cost is wake-ups times the cost of one; on a small VM one wake-up after a sleep costs milliseconds
    (cold caches), so the code's part is to wake rarely: only for the main loop's timers (the 30 s rescan, a
    watchdog), no thread or worker polling (the HTTP thread once woke twice a second; the loop turned every 5 s
    so that /healthz could tell idle from stuck, which it now tells from the loop waiting in poll()).
    Voluntary context switches count them."""
    d = start()
    time.sleep(0.5)
    pids = [d.proc.pid, *_children(d.proc.pid)]
    assert len(pids) >= 3, "the parent, its two workers (and multiprocessing's resource tracker)"
    before, cpu_before = _wakeups(pids), cpu_seconds(d.proc.pid)
    time.sleep(12)  # longer than /healthz's main-loop limit: an idle loop must still count as alive
    woke, used = _wakeups(pids) - before, cpu_seconds(d.proc.pid) - cpu_before
    assert woke <= 3, f"idle daemon woke {woke} times in 12 s (no timer is due: the rescan is every 30 s)"
    assert used < 0.5, f"idle daemon used {used:.3f}s CPU in 12s"
    assert d.get("/healthz") == (200, b"ok\n")


def _children(pid: int) -> list[int]:
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]


def _wakeups(pids: list[int]) -> int:
    """Voluntary context switches of every thread of these processes: one per sleep ended by a wake-up."""
    return sum(int(line.split()[1]) for pid in pids for t in Path(f"/proc/{pid}/task").iterdir()
               for line in (t / "status").read_text().splitlines() if line.startswith("voluntary_ctxt"))


@pytest.mark.parametrize("where", ["in use", "not on this host"])
def test_a_listen_address_that_cannot_be_bound_exits_at_once(tmp_path: Path, where: str) -> None:
    """The message, then an exit within seconds: no worker is left holding the process. A port in use exits 75
    (EX_TEMPFAIL: systemd restarts it, and it comes up once the port is free; found: 78 kept the unit down for
    good, RestartPreventExitStatus=78, after a port clash at boot); an address not on this host exits 78 (a
    setting to fix: no restart loop)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}" if where == "in use" else "192.0.2.1:9800"  # TEST-NET-1
        t0 = time.monotonic()
        out = subprocess.run([*INGESTD, "run", "--watch-dir", str(tmp_path / "w"), "--listen", listen],
                             capture_output=True, text=True, timeout=30)
    assert out.returncode == (75 if where == "in use" else 78), out.stderr
    assert time.monotonic() - t0 < 10
    assert f"listen: cannot listen on {listen}" in out.stderr
    # A port in use says what to do (a new user ran a second `make run`); another address needs no such hint.
    assert ("give another with --listen or INGESTD_LISTEN" in out.stderr) == (where == "in use")


def test_a_watch_dir_removed_and_made_again_is_locked_again(start, tmp_path: Path) -> None:
    """rm -rf of the whole watch dir: the daemon makes it again and locks the new directory at once, so a second
    daemon started on it afterwards is refused (it used to start beside the first, both taking files)."""
    import shutil

    d = start("--workers", "1")
    w = d.watch_dir
    before = w.stat().st_ino
    for _ in range(10):  # the daemon may make folders again while rmtree runs: retry until the old one is gone
        shutil.rmtree(w, ignore_errors=True)
        if not w.exists() or w.stat().st_ino != before:
            break
    wait_for(lambda: (w / "unprocessed").is_dir() and d.event("watch_lost"), what="the watch dir made again")
    out = wait_for(lambda: (r := subprocess.run([*INGESTD, "run", "--watch-dir", str(w), "--listen", "127.0.0.1:0"],
                                                 capture_output=True, text=True, timeout=30)).returncode == 75 and r,
                   timeout=10, what="the second daemon refused")
    assert "another ingestd is running" in out.stderr
    (w / "unprocessed" / "after.txt").write_bytes(b"after\n")
    wait_for(lambda: processed(w, "after.txt") == b"AFTER\n", what="the first daemon goes on")


def test_an_input_named_like_a_removed_output_folder_is_refused_and_the_folder_comes_back(start,
                                                                                          tmp_path: Path) -> None:
    cfg = tmp_path / "route.toml"
    cfg.write_text('[[filters]]\nmatch = "*"\nretag = "errors"\npattern = "ERROR"\n'
                   '[[outputs]]\nmatch = "errors"\npath = "errors"\n[[outputs]]\nmatch = "*"\npath = ""\n')
    d = start("--config", str(cfg), "--workers", "1")
    w = d.watch_dir
    (w / "processed" / "errors").rmdir()
    (w / "unprocessed" / "errors").write_bytes(b"hello\n")
    wait_for(lambda: folder(w, "failed") == ["errors"], what="the input named like the folder refused")
    assert not (w / "processed" / "errors").exists(), "all or none: nothing published for a failed input"
    assert "cannot publish" in d.status()["failures"][0]["reason"]
    (w / "unprocessed" / "app.log").write_bytes(b"ok\nERROR bad\n")
    wait_for(lambda: (w / "processed" / "errors" / "app.log").is_file(), what="routed output, folder made again")
    assert (w / "processed" / "errors" / "app.log").read_bytes() == b"ERROR bad\n"


def test_head_answers_like_get_without_a_body_and_the_default_output_has_a_name(start) -> None:
    """Load balancers and probes use HEAD (it answered 501); the default output's records were labelled
    output="" (no label at all to PromQL)."""
    import http.client

    d = start("--workers", "1")
    (d.watch_dir / "unprocessed" / "a.txt").write_bytes(b"one\ntwo\n")
    wait_for(lambda: d.event("processed", file="a.txt"), what="a.txt processed")
    host, port = d.url.removeprefix("http://").rsplit(":", 1)
    for path in ("/healthz", "/metrics", "/api/status", "/"):
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        conn.request("GET", path)
        get = conn.getresponse()
        get_body, get_type = get.read(), get.getheader("Content-Type")
        conn.request("HEAD", path)
        head = conn.getresponse()
        assert head.status == get.status == 200, (path, head.status)
        assert head.getheader("Content-Type") == get_type
        assert head.read() == b"" and int(head.getheader("Content-Length") or 0) > 0, path
        conn.close()
        if path == "/metrics":
            assert 'ingestd_output_records_total{output="processed"} 2.0' in get_body.decode()
            assert 'output=""' not in get_body.decode()


def test_a_watch_dir_on_a_file_system_that_reports_no_size_is_not_paused_for_ever(start, ramfs: Path) -> None:
    """ramfs says 0 blocks, 0 free: that is no size, not a full disk (the daemon paused for ever, "0 bytes
    free", with the default min_free_bytes)."""
    root = ramfs
    d = start("--workers", "1", watch=root / "w")
    (root / "w" / "unprocessed" / "a.txt").write_bytes(b"a\n")
    wait_for(lambda: processed(root / "w", "a.txt") == b"A\n", what="a.txt processed on ramfs")
    assert not d.event("paused")
    d.stop()
