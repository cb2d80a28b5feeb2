"""Catalogue: arrivals. Direct write, rename in, link()+unlink() (IN_CREATE only), rsync-style dot-temp + rename,
a writer holding the file open over seconds, close-and-reopen-to-append (guaranteed with done markers only),
a 50,000-file burst that overflows the inotify queue, files deleted or replaced while queued.
None is processed early, none missed."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest


from .lib import SCALE, audit_final, ls, make_watch, metrics_ok, record, start_daemon, wait_drained


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
    n = 50_000 * SCALE
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
