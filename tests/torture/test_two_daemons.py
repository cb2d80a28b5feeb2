"""Catalogue: a second daemon on the same watch_dir. Started at the same moment, many times: exactly one serves
(the other exits 75 naming the owner), nothing lost or doubled. With --wait-lock a standby waits; when the owner
is killed -9 mid-flow, the standby takes over and finishes everything."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from support import DaemonProcess, wait_for

from .lib import SCALE, audit_final, kill_tree, ls, make_watch, record, start_daemon, text_blob, wait_drained

ROUNDS = 10 * SCALE


@pytest.mark.slow
def test_simultaneous_starts_exactly_one_serves(tmp_path: Path) -> None:
    rng = random.Random(9)
    for r in range(ROUNDS):
        w = make_watch(tmp_path / f"r{r}")
        expected = {}
        for i in range(20):
            data = text_blob(rng, rng.choice((10, 3000, 200_000)))
            (w / "unprocessed" / f"x{i}.txt").write_bytes(data)
            expected[f"x{i}.txt"] = data.upper()
        ds = [DaemonProcess(w, "--workers", "1", env={"INGESTD_SETTLE_TIME": "0.05"}, cwd=tmp_path) for _ in range(2)]
        try:
            wait_for(lambda: any(d.event("started") for d in ds) and any(d.proc.poll() is not None for d in ds),
                     timeout=30, what="one started, one refused")
            losers = [d for d in ds if d.proc.poll() is not None]
            assert len(losers) == 1 and losers[0].proc.returncode == 75
            losers[0].wait()
            assert "another ingestd is running" in "".join(losers[0].lines)
            wait_drained(w, len(expected), timeout=60)
        finally:
            for d in ds:
                d.stop()
        audit_final(w, expected)
    record("two_daemons", {"simultaneous start rounds": ROUNDS})


@pytest.mark.slow
def test_standby_with_wait_lock_takes_over_after_kill9(tmp_path: Path) -> None:
    rng = random.Random(10)
    w = make_watch(tmp_path / "w")
    owner = start_daemon(w, "--workers", "1", cwd=tmp_path)
    standby = DaemonProcess(w, "--wait-lock", "--workers", "2", cwd=tmp_path)
    try:
        expected = {}
        for i in range(40):
            data = text_blob(rng, rng.choice((100, 500_000, 2 << 20)))
            (tmp_path / "stage").write_bytes(data)
            (tmp_path / "stage").rename(w / "unprocessed" / f"y{i:02d}.txt")
            expected[f"y{i:02d}.txt"] = data.upper()
        wait_for(lambda: len(ls(w, "processed")) >= 5, timeout=30, what="the owner at work")
        assert standby.proc.poll() is None and not standby.event("started")  # waiting, not serving
        # ... and says so (found: a standby wrote nothing until it took over, like a hung start).
        wait_for(lambda: standby.event("standby"), what="the standby event")
        assert f"pid {owner.proc.pid}" in standby.event("standby")["holder"]
        kill_tree(owner)
        left = set(ls(w, "unprocessed")) | set(ls(w, "underprocess"))  # what the owner did not finish
        standby.started(timeout=30)
        wait_drained(w, len(expected), timeout=120)
        audit_final(w, expected)
        # Every file the owner left is finished, and announced, by the standby. (A file the owner committed just
        # before the kill may miss its log line: events follow durable commits, and a kill can fall between.)
        assert left <= {e["file"] for e in standby.events if e.get("event") == "processed"}
    finally:
        standby.stop()
        if owner.proc.poll() is None:
            owner.kill()
