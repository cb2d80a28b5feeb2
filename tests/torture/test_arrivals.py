"""Catalogue: arrivals. Direct write, rename in, link()+unlink() (IN_CREATE only), rsync-style dot-temp + rename,
a writer holding the file open over seconds, close-and-reopen-to-append (guaranteed with done markers only),
a 20,000-file burst that overflows the inotify queue, files deleted or replaced while queued; and completeness when
the events lie (issue 8): merged IN_OPEN / IN_CLOSE events, shutil copies that chmod after the close, writers the
watch never saw open, a close-and-reopen producer with quiet_time, and no CPU spent while every worker is busy.
None is processed early, none missed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support import HANG_ROUTING, cpu_used, wait_for

from .lib import (
    SCALE,
    audit_final,
    ls,
    make_watch,
    metrics_ok,
    record,
    start_daemon,
    wait_drained,
)


def test_every_way_of_arriving(tmp_path: Path) -> None:
    w = make_watch(tmp_path / "w")
    u = w / "unprocessed"
    d = start_daemon(w, "--workers", "2", cwd=tmp_path)
    try:
        (u / "direct.txt").write_bytes(b"direct\n")
        (tmp_path / "r").write_bytes(b"renamed\n")
        os.rename(tmp_path / "r", u / "renamed.txt")
        (tmp_path / "l").write_bytes(b"linked\n")
        os.link(tmp_path / "l", u / "linked.txt")
        os.unlink(tmp_path / "l")
        with open(u / ".rsync.tmp.XyZ12", "wb") as f:  # rsync: hidden temp, then rename to the final name
            f.write(b"rsync\n")
        time.sleep(0.5)
        assert ".rsync.tmp.XyZ12" in os.listdir(u)  # a dot-temp is never claimed
        os.rename(u / ".rsync.tmp.XyZ12", u / "rsynced.txt")
        with open(u / "slow.txt", "wb") as f:  # held open over seconds: never claimed early
            for i in range(6):
                f.write(b"part %d\n" % i)
                f.flush()
                time.sleep(0.5)
                assert "slow.txt" in ls(w, "unprocessed") and not (w / "processed" / "slow.txt").exists()
        wait_drained(w, 5)
    finally:
        d.stop()
    audit_final(w, {"direct.txt": b"DIRECT\n", "renamed.txt": b"RENAMED\n", "linked.txt": b"LINKED\n",
                    "rsynced.txt": b"RSYNC\n", "slow.txt": b"".join(b"PART %d\n" % i for i in range(6))})


def test_close_and_reopen_to_append_is_whole_with_a_done_marker(tmp_path: Path) -> None:
    """Without a marker, a file closed and reopened later may be taken at the first close (it looked complete):
    what is guaranteed is that each claimed version is processed whole. With done_marker=true, only NAME.done
    says complete, so appends after a close are kept."""
    w = make_watch(tmp_path / "w")
    d = start_daemon(w, env={"INGESTD_DONE_MARKER": "true"}, cwd=tmp_path)
    try:
        u = w / "unprocessed"
        for i in range(3):
            with open(u / "appended.txt", "ab") as f:
                f.write(b"append %d\n" % i)
            time.sleep(0.6)  # longer than the settle time
        assert ls(w, "unprocessed") == ["appended.txt"]
        (u / "appended.txt.done").write_bytes(b"")
        wait_drained(w, 1)
    finally:
        d.stop()
    audit_final(w, {"appended.txt": b"APPEND 0\nAPPEND 1\nAPPEND 2\n"})


@pytest.mark.slow
def test_burst_overflowing_inotify_deleted_and_replaced_while_queued(tmp_path: Path) -> None:
    # 20,000 files, three events each (IN_CREATE, IN_OPEN, IN_CLOSE_WRITE): 60,000 events against a queue of
    # 16,384 (fs.inotify.max_queued_events), overflowed several times over; `make torture-long`: 200,000.
    n = 20_000 * SCALE
    w = make_watch(tmp_path / "w")
    u = w / "unprocessed"
    d = start_daemon(w, "--workers", "2", env={"INGESTD_RESCAN_INTERVAL": "3600"}, cwd=tmp_path)
    expected = {}
    try:
        d.signal(signal.SIGSTOP)  # the daemon reads nothing while the burst lands: the queue must overflow
        try:
            for i in range(n):
                name = f"b{i:06d}.txt"
                fd = os.open(u / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                os.write(fd, b"burst %d\n" % i)
                os.close(fd)
                expected[name] = b"BURST %d\n" % i
            for i in range(0, 1000, 10):  # deleted while queued
                os.unlink(u / f"b{i:06d}.txt")
                del expected[f"b{i:06d}.txt"]
            for i in range(5, 1000, 10):  # replaced while queued (atomic rename over it)
                (tmp_path / "new").write_bytes(b"replaced %d\n" % i)
                os.rename(tmp_path / "new", u / f"b{i:06d}.txt")
                expected[f"b{i:06d}.txt"] = b"REPLACED %d\n" % i
        finally:
            d.signal(signal.SIGCONT)
        t0 = time.monotonic()
        wait_drained(w, len(expected), timeout=600)
        took = time.monotonic() - t0
        m = metrics_ok(d.get("/metrics")[1])
        assert m["ingestd_inotify_overflows_total"] >= 1
        assert m['ingestd_rescans_total{reason=overflow}'] >= 1
    finally:
        d.stop()
    audit_final(w, expected)
    record("burst", {"files": len(expected), "seconds to drain": round(took, 1),
                     "overflows": m["ingestd_inotify_overflows_total"]})


# --- completeness: merged inotify events, copies, writers elsewhere (issue 8) ----------------------------------------
READER = ["head", "-c", "1"]  # opens, reads, closes: an indexer, a virus scanner, `file`


def test_a_reader_opening_while_the_producer_writes_loses_nothing(tmp_path: Path) -> None:
    """The producer opens x and writes a line; another process opens x and closes it while the producer's IN_OPEN
    is still unread (the two merge into one); 0.5 s later the producer writes a second line and closes. Both
    lines, every time (this lost the second line for 16 files of 20). The daemon is stopped (SIGSTOP) for the
    instant of the two opens, so the merge happens on every file, not by luck of timing."""
    w = make_watch(tmp_path / "w")
    u = w / "unprocessed"
    d = start_daemon(w, "--workers", "2", env={"INGESTD_RESCAN_INTERVAL": "3600"}, cwd=tmp_path)
    expected, files = {}, []
    try:
        for i in range(20):
            path = u / f"x{i:02d}.txt"
            d.signal(signal.SIGSTOP)
            try:
                f = open(path, "wb")  # noqa: SIM115 - held open on purpose
                f.write(b"one %d\n" % i)
                f.flush()
                subprocess.run([*READER, str(path)], check=True, stdout=subprocess.DEVNULL)
            finally:
                d.signal(signal.SIGCONT)
            files.append(f)
        time.sleep(0.5)
        for i, f in enumerate(files):
            assert not (w / "processed" / f"x{i:02d}.txt").exists(), "claimed while its producer held it"
            f.write(b"two %d\n" % i)
            f.close()
            expected[f"x{i:02d}.txt"] = b"ONE %d\nTWO %d\n" % (i, i)
        wait_drained(w, 20, timeout=30)
        assert d.count("busy") >= 1, "the lease, not the counts, kept them"
    finally:
        for f in files:
            f.close()
        d.stop()
    audit_final(w, expected)


def test_a_file_opened_twice_and_closed_at_once_is_claimed_without_a_rescan(tmp_path: Path) -> None:
    """One process opens x twice, 0.3 s apart, writes, exits: the two IN_CLOSE_WRITE merge into one. Claimed
    at once (no rescan runs here), never stuck until a restart."""
    w = make_watch(tmp_path / "w")
    u = w / "unprocessed"
    d = start_daemon(w, env={"INGESTD_RESCAN_INTERVAL": "3600"}, cwd=tmp_path)
    script = ("import os, sys, time\na = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)\ntime.sleep(0.3)\n"
              "b = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)\nos.write(a, b'first\\n'); os.write(b, b'second\\n')\n")
    try:
        for i in range(5):
            subprocess.run([sys.executable, "-c", script, str(u / f"twice{i}.txt")], check=True)
        t0 = time.monotonic()
        wait_drained(w, 5, timeout=10)
        assert time.monotonic() - t0 < 5
    finally:
        d.stop()
    audit_final(w, {f"twice{i}.txt": b"FIRST\nSECOND\n" for i in range(5)})


@pytest.mark.parametrize("copy", [shutil.copy, shutil.copy2, shutil.copyfile])
def test_shutil_copies_into_unprocessed_never_break_the_producer(tmp_path: Path, copy: Any) -> None:
    """copy/copy2 chmod and utime the copy by path after closing it: a claim in between made the producer
    raise FileNotFoundError (copy2: 2 runs of 3). The quiet period waits for them."""
    w = make_watch(tmp_path / "w")
    u = w / "unprocessed"
    d = start_daemon(w, "--workers", "2", cwd=tmp_path)
    src = tmp_path / "src.txt"
    src.write_bytes(b"copied line\n" * 1000)
    try:
        for i in range(30):
            copy(src, u / f"c{i:02d}.txt")  # raises FileNotFoundError if claimed between close and chmod
        wait_drained(w, 30, timeout=30)
    finally:
        d.stop()
    audit_final(w, {f"c{i:02d}.txt": b"COPIED LINE\n" * 1000 for i in range(30)})


def test_a_producer_slow_to_chmod_after_the_close_is_not_broken(tmp_path: Path) -> None:
    """The kind behind shutil.copy2 on a busy machine: close, a pause (the producer descheduled), then chmod and
    utime by path. Within quiet_time the file is left alone, so the producer never gets FileNotFoundError."""
    w = make_watch(tmp_path / "w")
    u = w / "unprocessed"
    d = start_daemon(w, "--workers", "2", cwd=tmp_path)
    try:
        for i in range(10):
            path = u / f"s{i}.txt"
            path.write_bytes(b"slow %d\n" % i)
            time.sleep(0.01)
            os.chmod(path, 0o640)  # FileNotFoundError if claimed at the close
            time.sleep(0.01)
            os.utime(path, (1_000_000_000, 1_000_000_000))
        wait_drained(w, 10, timeout=30)
    finally:
        d.stop()
    audit_final(w, {f"s{i}.txt": b"SLOW %d\n" % i for i in range(10)})


def test_a_long_writer_among_readers_that_come_and_go_is_taken_whole(tmp_path: Path) -> None:
    """The kind, not the one input: a writer holds the file for 3 s while other processes open and close it
    over and over (their events merge with the writer's any way the timing falls). Never taken early."""
    w = make_watch(tmp_path / "w")
    u = w / "unprocessed"
    d = start_daemon(w, env={"INGESTD_RESCAN_INTERVAL": "1"}, cwd=tmp_path)  # rescans re-check it too
    try:
        with open(u / "long.txt", "wb") as f:
            for i in range(30):
                f.write(b"line %d\n" % i)
                f.flush()
                readers = [subprocess.Popen([*READER, str(u / "long.txt")], stdout=subprocess.DEVNULL) for _ in range(3)]
                for r in readers:
                    r.wait()
                time.sleep(0.1)
                assert ls(w, "unprocessed") == ["long.txt"], f"taken early, after line {i}"
        wait_drained(w, 1, timeout=10)
    finally:
        d.stop()
    audit_final(w, {"long.txt": b"".join(b"LINE %d\n" % i for i in range(30))})


def test_writers_the_watch_never_saw_open_are_still_waited_for(tmp_path: Path) -> None:
    """No IN_OPEN at all: a file present at start-up whose writer is idle longer than settle_time, and a file
    linked in while its writer keeps writing through its first name (its events land in another folder).
    Neither is taken until its writer closes."""
    w = make_watch(tmp_path / "w")
    u = w / "unprocessed"
    early = open(u / "early.txt", "wb")  # noqa: SIM115 - held open across the daemon's start
    early.write(b"before start\n")
    early.flush()
    d = start_daemon(w, env={"INGESTD_RESCAN_INTERVAL": "3600"}, cwd=tmp_path)
    try:
        elsewhere = open(tmp_path / "outside.txt", "wb")  # noqa: SIM115
        elsewhere.write(b"first half\n")
        elsewhere.flush()
        os.link(tmp_path / "outside.txt", u / "linked.txt")
        time.sleep(1.0)  # over settle_time (0.3 s) and the link grace: only the kernel's answer holds them
        assert ls(w, "unprocessed") == ["early.txt", "linked.txt"]
        early.write(b"after start\n")
        early.close()
        elsewhere.write(b"second half\n")
        elsewhere.close()
        wait_drained(w, 2, timeout=10)  # linked.txt: by the busy retry timer (no event here)
    finally:
        d.stop()
    audit_final(w, {"early.txt": b"BEFORE START\nAFTER START\n", "linked.txt": b"FIRST HALF\nSECOND HALF\n"})


def test_quiet_time_lets_a_close_and_reopen_producer_finish(tmp_path: Path) -> None:
    """issue 9: `for i in 1 2 3; do echo line >> unprocessed/f; sleep 1; done` with quiet_time=1.5: one file."""
    w = make_watch(tmp_path / "w")
    d = start_daemon(w, env={"INGESTD_QUIET_TIME": "1.5"}, cwd=tmp_path)
    try:
        for i in range(3):
            with open(w / "unprocessed" / "f", "ab") as f:
                f.write(b"line %d\n" % i)
            time.sleep(1)
        wait_drained(w, 1, timeout=10)
    finally:
        d.stop()
    audit_final(w, {"f": b"LINE 0\nLINE 1\nLINE 2\n"})


def test_waiting_files_with_every_worker_busy_cost_no_cpu(tmp_path: Path) -> None:
    """Every worker busy (a stuck one) and files waiting: the main loop sleeps. Due arrival timers used to be
    run only when a worker was free, so every poll() returned at once: a whole core."""
    w = make_watch(tmp_path / "w")
    cfg = tmp_path / "hang.toml"
    cfg.write_text(HANG_ROUTING)
    d = start_daemon(w, "--workers", "1", "--config", str(cfg), env={"INGESTD_STOP_TIMEOUT": "1"}, cwd=tmp_path)
    try:
        (w / "unprocessed" / "stuck.txt").write_bytes(b"HANG\n")
        wait_for(lambda: ls(w, "underprocess") == ["stuck.txt"], what="the stuck file claimed")
        for i in range(20):
            (w / "unprocessed" / f"wait{i}.txt").write_bytes(b"waiting\n")
        used = cpu_used(d.proc.pid)
        assert used < 0.2, f"the daemon used {used:.2f} s of CPU in 2 s with nothing to do"
    finally:
        d.stop()
    record("idle CPU, all workers busy, 20 waiting", f"{used:.3f} s per 2 s")

