"""Catalogue: resources and I/O errors. Real kernel errors where the kernel gives them on demand (a tiny tmpfs for
ENOSPC of data and of inodes, a read-only bind mount for EROFS, RLIMIT_FSIZE for EFBIG, another user for EACCES);
EIO on fsync, read and write through the shim, failing the Nth call for N = 1, 2, ... until a run has no Nth call.
After each: nothing lost, the daemon alive, the state explained (log event, metric, status).
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import DaemonProcess, wait_for

from .lib import audit_final, ls, make_watch, metrics_ok, need_root, read_journal, readable_copy, record, shim_env, \
    start_daemon, text_blob, unavailable, wait_drained


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
    st = d.status()
    assert st["paused"] and any(w in st["paused"] for w in words), st["paused"]
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
        os.rename(stage / "a-dir", w / "unprocessed" / "a-dir")  # fails with a reason; no crash on ENOSPC
        time.sleep(2.5)
        assert d.proc.poll() is None, "the daemon died on a full disk:\n" + "".join(d.lines[-20:])
        assert ls(w, "underprocess") + ls(w, "unprocessed") and not ls(w, "processed"), "input lost or partial"
        assert "big.txt" in ls(w, "underprocess") + ls(w, "unprocessed")
        filler.unlink()  # space returns: no one touches the daemon
        wait_drained(w, 3, timeout=60)
        assert d.event("resumed") or d.status()["paused"] is None
        audit_final(w, {"big.txt": big.upper(), "later.txt": b"LATER\n"}, {"a-dir"})
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
