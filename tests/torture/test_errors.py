"""Catalogue: resources and I/O errors. Real kernel errors where the kernel gives them on demand (a tiny tmpfs for
ENOSPC of data and of inodes, a read-only bind mount for EROFS, RLIMIT_FSIZE for EFBIG, another user for EACCES);
EIO on fsync, read and write through the shim, failing the Nth call for N = 1, 2, ... until a run has no Nth call.
After each: nothing lost, the daemon alive, the state explained (log event, metric, status).
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import HANG_ROUTING, DaemonProcess, wait_for

from .lib import audit_final, children, kill_tree, ls, make_watch, metrics_ok, need_root, read_journal, readable_copy, \
    record, shim_env, start_daemon, text_blob, unavailable, wait_drained


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    """Mount points to unmount at teardown, whatever happened (innermost first)."""
    done: list[Path] = []
    try:
        yield done
    finally:
        for p in reversed(done):
            subprocess.run(["umount", "-l", str(p)], check=False)


def tmpfs(path: Path, mounts: list[Path], opts: str) -> Path:
    need_root("a tmpfs mount")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True)
    mounts.append(path)
    return path


def explained(d: DaemonProcess, words: tuple[str, ...]) -> None:
    """The log, /metrics and /api/status all say that claiming is paused, and why."""
    ev = wait_for(lambda: next((e for e in list(d.events) if e.get("event") in ("io_error", "paused")
                                and any(w in str(e.get("reason")) for w in words)), None), timeout=20,
                  what=f"an event naming {words}")
    assert ev
    m = wait_for(lambda: (s := metrics_ok(d.get("/metrics")[1])).get("ingestd_claiming_paused") == 1 and s,
                 timeout=10, what="paused gauge")
    assert m["ingestd_claiming_paused"] == 1
    # Waited for, not read once: a pause is lifted when its backoff ends and set again by the next failure.
    wait_for(lambda: (p := d.status()["paused"]) and any(w in p for w in words), timeout=10, what="/api/status paused")
    assert d.proc.poll() is None


def test_enospc_data_pauses_keeps_inputs_and_resumes_by_itself(tmp_path: Path, mounts: list[Path]) -> None:
    fs = tmpfs(tmp_path / "fs", mounts, "size=6m,mode=0755")
    w = make_watch(fs / "w")
    rng = random.Random(3)
    big = text_blob(rng, 2 << 20)
    (w / "unprocessed" / "big.txt").write_bytes(big)
    stage = fs / "stage"  # arrivals prepared now, renamed in while the disk is full (a rename needs no space)
    stage.mkdir()
    (stage / "later.txt").write_bytes(b"later\n")
    (stage / "a-dir").mkdir()
    filler = fs / "filler"
    with open(filler, "wb", buffering=0) as f:  # fill the disk to the last block: the output cannot be written
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == 28
    d = start_daemon(w, "--workers", "2", env={"INGESTD_MIN_FREE_BYTES": "0"}, cwd=tmp_path)
    try:
        explained(d, ("No space left", "ENOSPC"))
        os.rename(stage / "later.txt", w / "unprocessed" / "later.txt")  # arrives while paused: waits
        os.rename(stage / "a-dir", w / "unprocessed" / "a-dir")  # a folder: left where it is, no crash on ENOSPC
        time.sleep(2.5)
        assert d.proc.poll() is None, "the daemon died on a full disk:\n" + "".join(d.lines[-20:])
        assert (w / "unprocessed" / "a-dir").is_dir() and d.event("folder_left", folder="a-dir")  # issue 9
        os.rmdir(w / "unprocessed" / "a-dir")
        assert ls(w, "underprocess") + ls(w, "unprocessed") and not ls(w, "processed"), "input lost or partial"
        assert "big.txt" in ls(w, "underprocess") + ls(w, "unprocessed")
        filler.unlink()  # space returns: no one touches the daemon
        wait_drained(w, 2, timeout=60)
        assert d.event("resumed") or d.status()["paused"] is None
        audit_final(w, {"big.txt": big.upper(), "later.txt": b"LATER\n"})
    finally:
        d.stop()


def test_low_space_and_inodes_stop_claiming_and_resume(tmp_path: Path, mounts: list[Path]) -> None:
    fs = tmpfs(tmp_path / "fs", mounts, "size=64m,nr_inodes=400,mode=0755")
    w = make_watch(fs / "w")
    fill = fs / "fill"
    fill.mkdir()
    n = 0
    try:
        while True:  # a real ENOSPC from the kernel: no inode left
            (fill / str(n)).touch()
            n += 1
    except OSError as e:
        assert e.errno == 28
    for i in range(20):
        (fill / str(i)).unlink()  # 20 left: below the daemon's floor of 64
    (w / "unprocessed" / "x.txt").write_bytes(b"x\n")
    d = start_daemon(w, "--workers", "1", cwd=tmp_path)
    try:
        explained(d, ("inodes",))
        assert ls(w, "unprocessed") == ["x.txt"]
        shutil.rmtree(fill)
        wait_drained(w, 1, timeout=30)
        # data: below min_free_bytes (24 MiB of 64 MiB) claiming stops again, and resumes when space returns
        filler = fs / "filler"
        subprocess.run(["fallocate", "-l", "48m", str(filler)], check=True)
        (w / "unprocessed" / "y.txt").write_bytes(b"y\n")
        explained(d, ("low disk space",))
        assert ls(w, "unprocessed") == ["y.txt"]
        filler.unlink()
        wait_drained(w, 2, timeout=30)
        audit_final(w, {"x.txt": b"X\n", "y.txt": b"Y\n"})
    finally:
        d.stop()


def test_erofs_read_only_processed_keeps_inputs_and_resumes(tmp_path: Path, mounts: list[Path]) -> None:
    need_root("a read-only bind mount")
    w = make_watch(tmp_path / "w")
    p = w / "processed"
    subprocess.run(["mount", "--bind", str(p), str(p)], check=True)
    mounts.append(p)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(p)], check=True)
    d = start_daemon(w, "--workers", "1", cwd=tmp_path)
    try:
        (w / "unprocessed" / "ro.txt").write_bytes(b"read only\n")
        explained(d, ("Read-only", "EROFS"))
        assert "ro.txt" in ls(w, "underprocess")
        subprocess.run(["mount", "-o", "remount,bind,rw", str(p)], check=True)
        wait_drained(w, 1, timeout=60)
        audit_final(w, {"ro.txt": b"READ ONLY\n"})
    finally:
        d.stop()


def test_efbig_from_rlimit_fsize_fails_the_file_and_the_queue_moves_on(tmp_path: Path) -> None:
    w = make_watch(tmp_path / "w")
    rng = random.Random(5)
    big = text_blob(rng, 3 << 20)
    (w / "unprocessed" / "huge.txt").write_bytes(big)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # the daemon only (Python ignores SIGXFSZ)

    d = DaemonProcess(w, "--workers", "1", env={}, cwd=tmp_path, preexec_fn=limit).started(timeout=30)
    try:
        wait_for(lambda: ls(w, "failed") == ["huge.txt"], timeout=30, what="huge.txt failed with a reason")
        (w / "unprocessed" / "small.txt").write_bytes(b"small\n")
        wait_drained(w, 2, timeout=30)
        reason = {f["name"]: f["reason"] for f in d.status()["failures"]}["huge.txt"]
        assert "EFBIG" in reason or "too large" in reason, reason
        audit_final(w, {"small.txt": b"SMALL\n"}, {"huge.txt"})
        assert (w / "failed" / "huge.txt").read_bytes() == big  # the input is kept intact
    finally:
        d.stop()


def test_eacces_as_a_non_root_user(tmp_path: Path) -> None:
    need_root("switching to the user nobody")
    base = Path(tempfile.mkdtemp(prefix="ingestd-eacces-", dir="/tmp"))
    try:
        base.chmod(0o755)
        w = make_watch(base / "w")
        for sub in ("unprocessed", "underprocess", "failed", ".ingestd", ""):
            os.chown(w / sub, 65534, 65534)
        os.chmod(w / "processed", 0o755)  # root's: nobody cannot write results here
        secret = w / "unprocessed" / "unreadable.txt"
        secret.write_bytes(b"root only\n")
        os.chown(secret, 0, 0)
        secret.chmod(0o600)
        (w / "unprocessed" / "ok.txt").write_bytes(b"ok\n")
        os.chown(w / "unprocessed" / "ok.txt", 65534, 65534)

        def nobody() -> None:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)

        # This venv's interpreter and the clone may live where nobody cannot read (/root, a `mktemp -d` folder):
        # nobody runs the system Python 3.11 on a world-readable copy of the same code and its dependencies.
        python = shutil.which("python3.11", path="/usr/bin:/usr/local/bin")
        if python is None:
            unavailable("a python3.11 the user nobody may execute")
        env = {"HOME": str(base), "PYTHONPATH": readable_copy(base / "lib")}
        d = DaemonProcess(w, "--workers", "1", env=env, cwd=base, preexec_fn=nobody,
                          command=[python, "-m", "ingestd"]).started(30)
        try:
            explained(d, ("Permission denied", "EACCES"))
            os.chown(w / "processed", 65534, 65534)  # the admin fixes the folder: it resumes by itself
            wait_for(lambda: ls(w, "failed") == ["unreadable.txt"] and ls(w, "processed") == ["ok.txt"],
                     timeout=60, what="ok.txt processed, unreadable.txt failed")
            reason = {f["name"]: f["reason"] for f in d.status()["failures"]}["unreadable.txt"]
            assert "Permission denied" in reason, reason
            assert (w / "failed" / "unreadable.txt").read_bytes() == b"root only\n"
            audit_final(w, {"ok.txt": b"OK\n"}, {"unreadable.txt"})
        finally:
            d.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("call", ["fsync", "read", "write", "rename", "create"])
def test_eio_on_the_nth_call_through_a_files_life(tmp_path: Path, call: str) -> None:
    expected = {"a.txt": b"ALPHA\nBETA\n"}
    n = 0
    injected = 0
    while True:
        n += 1
        assert n < 60, "the life of two files should not take 60 such calls"
        root = tmp_path / f"n{n}"
        w = make_watch(root / "w")
        (w / "unprocessed" / "a.txt").write_bytes(b"alpha\nbeta\n")
        (w / "unprocessed" / "b.bin").write_bytes(b"\x00binary\n")
        journal = root / "journal"
        env = {**shim_env(root, journal=str(journal), fail={"call": call, "n": n, "errno": "EIO"}),
               "INGESTD_SETTLE_TIME": "0.05"}
        d = start_daemon(w, "--workers", "1", env=env, cwd=root)
        try:
            wait_drained(w, 2, timeout=60)
            hit = [j for j in read_journal(journal) if j["op"] == "injected"]
            assert d.proc.poll() is None, "the daemon died on EIO:\n" + "".join(d.lines[-20:])
            assert d.get("/healthz")[0] == 200
            if hit:
                injected += 1
                assert d.event("io_error") or d.event("failed"), f"EIO on {call} #{n} left no trace in the log"
        finally:
            d.stop()
        audit_final(w, expected, {"b.bin"})
        if not hit:
            break
    record(f"eio_{call}", {"calls failed in turn": injected})


# --- issue 8: one table decides what an error means; the daemon never dies on one fault --------------------------------
ROUTED = """
[[tags]]
match = "*.err"
tag = "errors"

[[filters]]
match = "*"
processor = "{processor}"

[[outputs]]
match = "errors"
path = "errors"

[[outputs]]
match = "*"
path = ""
"""


def routed(tmp_path: Path, processor: str = "uppercase") -> str:
    cfg = tmp_path / "ingestd.toml"
    cfg.write_text(ROUTED.replace("{processor}", processor))
    return str(cfg)


def alive(d: DaemonProcess) -> None:
    assert d.proc.poll() is None, "the daemon died:\n" + "".join(d.lines[-30:])
    assert d.get("/healthz")[0] == 200


def test_emfile_when_a_worker_opens_a_good_input_is_retried_not_failed(tmp_path: Path) -> None:
    """Worker open-file limit 3 (prlimit on the live worker): EMFILE is the machine's fault, the input waits in
    underprocess/ and is processed once the limit is lifted; it never goes to failed/."""
    w = make_watch(tmp_path / "w")
    d = start_daemon(w, "--workers", "1", cwd=tmp_path)
    try:
        workers = wait_for(lambda: children(d.proc.pid), what="the worker process")
        limits = {pid: resource.prlimit(pid, resource.RLIMIT_NOFILE) for pid in workers}
        for pid, (_, hard) in limits.items():
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (3, hard))
        (w / "unprocessed" / "good.txt").write_bytes(b"good\n")
        explained(d, ("Too many open files", "EMFILE"))
        assert ls(w, "failed") == [] and "good.txt" in ls(w, "underprocess")
        for pid, limit in limits.items():
            resource.prlimit(pid, resource.RLIMIT_NOFILE, limit)
        wait_drained(w, 1, timeout=60)
        audit_final(w, {"good.txt": b"GOOD\n"})
        assert not d.event("failed")
    finally:
        d.stop()


def test_a_plugin_that_raises_fails_the_file_with_its_reason_and_line(tmp_path: Path) -> None:
    """A plug-in processor raising killed its worker three times and the file ended as "poison" with no reason:
    now it goes to failed/ at once, the sidecar saying `ValueError: ...` and the line; no worker dies."""
    w = make_watch(tmp_path / "w")
    cfg = tmp_path / "ingestd.toml"
    cfg.write_text('[[filters]]\nmatch = "*"\nprocessor = "raise_on"\n\n[[filters]]\nmatch = "*"\nprocessor = "uppercase"\n')
    d = start_daemon(w, "--workers", "1", "--config", str(cfg), cwd=tmp_path)
    try:
        (w / "unprocessed" / "bad.txt").write_bytes(b"fine\nalso fine\nRAISE here\nnever reached\n")
        (w / "unprocessed" / "ok.txt").write_bytes(b"ok\n")
        wait_drained(w, 2, timeout=30)
        audit_final(w, {"ok.txt": b"OK\n"}, {"bad.txt"})
        (sidecar,) = [n for n in os.listdir(w / "failed") if n.startswith(".ingestd-reason-")]
        record_ = json.loads((w / "failed" / sidecar).read_text())
        assert record_["line"] == 3
        assert record_["reason"].startswith("processor error: ValueError: cannot handle RAISE (at __init__.py:")
        assert record_["attempts"] == 1
        assert d.count("worker_died") == 0
        alive(d)
    finally:
        d.stop()


def test_rmdir_of_an_output_folder_and_a_worker_death_meanwhile(tmp_path: Path) -> None:
    """`rmdir processed/errors` gave endless I/O-error retries, and a worker death then killed the daemon."""
    w = make_watch(tmp_path / "w")
    d = start_daemon(w, "--workers", "1", "--config", routed(tmp_path, "abort_on"), cwd=tmp_path)
    try:
        (w / "processed" / "errors").rmdir()
        (w / "unprocessed" / "a.err").write_bytes(b"an error line\n")
        wait_drained(w, 1, timeout=30)
        assert (w / "processed" / "errors" / "a.err").read_bytes() == b"an error line\n"
        assert not d.event("io_error")
        (w / "processed" / "errors" / "a.err").unlink()
        (w / "processed" / "errors").rmdir()
        (w / "unprocessed" / "crash.err").write_bytes(b"ABORT\n")  # kills its worker before any output exists
        wait_for(lambda: ls(w, "failed") == ["crash.err"], timeout=60, what="the poison file quarantined")
        assert d.count("worker_died") == 3
        alive(d)
        (w / "unprocessed" / "after.txt").write_bytes(b"after\n")
        wait_drained(w, 2, timeout=30)
        assert (w / "processed" / "after.txt").read_bytes() == b"after\n"
    finally:
        d.stop()


def test_rm_rf_failed_and_processed_under_a_running_daemon(tmp_path: Path) -> None:
    """`rm -rf failed/` (or processed/) made the daemon exit at the next rescan."""
    w = make_watch(tmp_path / "w")
    d = start_daemon(w, "--workers", "1", "--config", routed(tmp_path), env={"INGESTD_RESCAN_INTERVAL": "1"},
                     cwd=tmp_path)
    try:
        (w / "unprocessed" / "one.txt").write_bytes(b"one\n")
        (w / "unprocessed" / "one.bin").write_bytes(b"\0one\n")
        wait_drained(w, 2, timeout=30)
        shutil.rmtree(w / "failed")
        shutil.rmtree(w / "processed")
        time.sleep(2.5)  # two rescans (rescan_interval 1 s)
        alive(d)
        m = metrics_ok(d.get("/metrics")[1])
        assert m["ingestd_folder_files{folder=failed}"] == 0 and m["ingestd_folder_files{folder=processed}"] == 0, m
        (w / "unprocessed" / "two.err").write_bytes(b"two\n")
        (w / "unprocessed" / "two.bin").write_bytes(b"\0two\n")
        wait_for(lambda: (w / "failed").is_dir() and ls(w, "failed") == ["two.bin"] and not ls(w, "unprocessed")
                 and not ls(w, "underprocess"), timeout=30, what="two.bin failed into a recreated failed/")
        assert (w / "processed" / "errors" / "two.err").read_bytes() == b"TWO\n"
        alive(d)
    finally:
        d.stop()


def test_a_regex_that_cannot_compile_exits_78_and_a_reload_keeps_the_old_routing(tmp_path: Path) -> None:
    """pattern = "a{4294967296}": exit 1 at start (systemd restart-loops) and death on SIGHUP."""
    w = make_watch(tmp_path / "w")
    cfg = tmp_path / "ingestd.toml"
    bad_cfg = '[[filters]]\nmatch = "*"\nprocessor = "grep"\npattern = "a{4294967296}"\n'
    cfg.write_text(bad_cfg)
    d = start_daemon(w, "--config", str(cfg), cwd=tmp_path, wait=False)
    assert d.wait(30) == 78
    assert any("invalid regular expression" in line for line in d.lines), d.lines
    cfg.write_text('[[filters]]\nmatch = "*"\nprocessor = "uppercase"\n')
    d = start_daemon(w, "--workers", "1", "--config", str(cfg), cwd=tmp_path)
    try:
        cfg.write_text(bad_cfg)
        d.signal(signal.SIGHUP)
        wait_for(lambda: d.event("reload_failed"), timeout=10, what="reload_failed")
        assert "invalid regular expression" in d.event("reload_failed")["error"]  # type: ignore[index]
        (w / "unprocessed" / "x.txt").write_bytes(b"x\n")
        wait_drained(w, 1, timeout=30)
        audit_final(w, {"x.txt": b"X\n"})
        alive(d)
    finally:
        d.stop()


@pytest.mark.parametrize(("var", "value"), [("INGESTD_STOP_TIMEOUT", "inf"), ("INGESTD_RESCAN_INTERVAL", "0")])
def test_settings_out_of_range_exit_78_naming_the_variable(tmp_path: Path, var: str, value: str) -> None:
    """stop_timeout = inf crashed on SIGTERM; rescan_interval = 0 burned a core when idle."""
    w = make_watch(tmp_path / "w")
    d = start_daemon(w, env={var: value}, cwd=tmp_path, wait=False)
    assert d.wait(30) == 78
    assert any(var in line for line in d.lines), d.lines


def test_the_same_rejected_name_many_times_in_a_second(tmp_path: Path) -> None:
    """Three deliveries of one rejected name within a second: the third hit EEXIST and claiming paused for the
    whole queue. Five here, each kept in failed/, and the queue never pauses."""
    w = make_watch(tmp_path / "w")
    stage = tmp_path / "stage"
    stage.mkdir()
    d = start_daemon(w, "--workers", "1", cwd=tmp_path)
    try:
        for i in range(5):
            (stage / "x.bin").write_bytes(b"\0" + str(i).encode())
            os.rename(stage / "x.bin", w / "unprocessed" / "x.bin")  # a rename: complete at once, no settle time
            wait_for(lambda i=i: len(ls(w, "failed")) == i + 1 and not ls(w, "unprocessed")
                     and not ls(w, "underprocess"), timeout=20, interval=0.005, what=f"delivery {i} failed")
        kept = sorted((w / "failed" / n).read_bytes() for n in ls(w, "failed"))
        assert kept == [b"\0" + str(i).encode() for i in range(5)]
        assert not d.event("io_error") and not d.event("paused"), [e for e in d.events if e.get("event") == "io_error"]
        (w / "unprocessed" / "ok.txt").write_bytes(b"ok\n")
        wait_for(lambda: ls(w, "processed") == ["ok.txt"], timeout=20, what="the queue moves on")
        alive(d)
    finally:
        d.stop()


def test_a_full_disk_while_recording_an_attempt(tmp_path: Path, mounts: list[Path]) -> None:
    """A worker death, then a restart's recovery, on a full disk: exit 1, and every restart exit 1 again. Now the
    count is kept in memory and logged; the daemon lives, and restarts start."""
    fs = tmpfs(tmp_path / "fs", mounts, "size=8m,mode=0755")
    w = make_watch(fs / "w")
    cfg = tmp_path / "ingestd.toml"
    cfg.write_text(HANG_ROUTING)
    (fs / "stage").mkdir()
    (fs / "stage" / "hang.txt").write_bytes(b"HANG\n")
    env = {"INGESTD_MIN_FREE_BYTES": "0", "INGESTD_STOP_TIMEOUT": "1", "INGESTD_MAX_ATTEMPTS": "10"}
    d = start_daemon(w, "--workers", "1", "--config", str(cfg), env=env, cwd=tmp_path)
    try:
        with open(fs / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError as e:
                assert e.errno == 28
        os.rename(fs / "stage" / "hang.txt", w / "unprocessed" / "hang.txt")
        wait_for(lambda: ls(w, "underprocess") == ["hang.txt"], timeout=20, what="hang.txt claimed")
        (worker,) = wait_for(lambda: [p for p in children(d.proc.pid)
                                      if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()], what="the worker")
        os.kill(worker, signal.SIGKILL)  # a worker death while the disk is full
        wait_for(lambda: d.event("io_error", message="could not record an attempt on disk; counted in memory"),
                 timeout=20, what="the unrecorded attempt logged")
        time.sleep(1)
        alive(d)
        kill_tree(d)  # and a crash: hang.txt stays in underprocess/ for the next start's recovery
        for i in range(2):  # every restart on the full disk starts
            d = start_daemon(w, "--workers", "1", "--config", str(cfg), env=env, cwd=tmp_path)
            if i == 0:
                wait_for(lambda d=d: d.event("io_error", message="could not record an attempt on disk; counted in "
                                                                  "memory"), timeout=20, what="unrecorded attempt")
            # Recovery ran and the daemon lives. (The first restart cannot record its attempt; a later one may, as the
            # recovery that cannot rewrite .ingestd/inflight removes it, freeing that page of the tmpfs.)
            wait_for(lambda d=d: d.event("recovered", file="hang.txt"), timeout=20, what="recovery ran")
            alive(d)
            kill_tree(d)
        assert ls(w, "underprocess") == ["hang.txt"] and ls(w, "failed") == []
    finally:
        if d.proc.poll() is None:
            kill_tree(d)


def test_deleting_the_lock_file_does_not_let_a_second_daemon_start(tmp_path: Path) -> None:
    w = make_watch(tmp_path / "w")
    d = start_daemon(w, "--workers", "1", cwd=tmp_path)
    try:
        (w / ".ingestd" / "lock").unlink()
        second = start_daemon(w, "--workers", "1", cwd=tmp_path, wait=False)
        assert second.wait(30) == 75
        assert any("another ingestd is running" in line for line in second.lines), second.lines
        alive(d)
    finally:
        d.stop()


def test_output_lines_total_counts_lines_on_the_fast_path(tmp_path: Path) -> None:
    """ingestd_output_lines_total counted written blocks: 100,000 lines counted as 2."""
    w = make_watch(tmp_path / "w")
    d = start_daemon(w, "--workers", "1", cwd=tmp_path)
    try:
        (w / "unprocessed" / "many.txt").write_bytes(b"a line\n" * 100_000)
        wait_drained(w, 1, timeout=60)
        m = wait_for(lambda: (s := metrics_ok(d.get("/metrics")[1])).get("ingestd_output_lines_total") and s,
                     timeout=10, what="the lines counter")
        assert m["ingestd_output_lines_total"] == 100_000
        assert m["ingestd_input_lines_total"] == 100_000
    finally:
        d.stop()


def test_a_commit_refused_midway_leaves_no_result_for_a_failed_input(tmp_path: Path) -> None:
    """One output renamed, the next refused: a result stayed in processed/ for an input that went to failed/.
    The input is named like an output folder, and its first records go to that folder."""
    w = make_watch(tmp_path / "w")
    cfg = tmp_path / "ingestd.toml"
    cfg.write_text('[[filters]]\nmatch = "*"\nretag = "errors"\npattern = "ERR"\n\n'
                   '[[outputs]]\nmatch = "errors"\npath = "errors"\n\n[[outputs]]\nmatch = "*"\npath = ""\n')
    d = start_daemon(w, "--workers", "1", "--config", str(cfg), cwd=tmp_path)
    try:
        (w / "unprocessed" / "errors").write_bytes(b"ERR first\nplain\n")
        wait_for(lambda: ls(w, "failed") == ["errors"], timeout=30, what="the input failed")
        assert os.listdir(w / "processed" / "errors") == []
        assert (w / "failed" / "errors").read_bytes() == b"ERR first\nplain\n"
        alive(d)
    finally:
        d.stop()
