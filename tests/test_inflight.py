"""inflight.py: the per-worker records recovery trusts to count attempts only for files really in progress."""

from __future__ import annotations

from pathlib import Path

from ingestd import inflight
from ingestd.names import key
from ingestd.spool import Spool


def test_records_name_the_files_workers_are_on(tmp_path: Path) -> None:
    assert inflight.suspects(str(tmp_path)) is None, "no file: nothing can be trusted, count every file"
    assert inflight.prepare(str(tmp_path), 3)
    assert inflight.suspects(str(tmp_path)) == set()
    a, b = inflight.Marker(str(tmp_path), 0), inflight.Marker(str(tmp_path), 2)
    assert a.ok and b.ok
    a.mark(key("x.txt").encode())
    b.mark(key("y.txt").encode())
    assert inflight.suspects(str(tmp_path)) == {key("x.txt"), key("y.txt")}
    a.mark(inflight.IDLE)
    assert inflight.suspects(str(tmp_path)) == {key("y.txt")}


def test_a_worker_without_its_record_makes_recovery_count_every_file(tmp_path: Path) -> None:
    inflight.prepare(str(tmp_path), 2)
    inflight.set_record(str(tmp_path), 1, inflight.UNKNOWN)
    assert inflight.suspects(str(tmp_path)) is None
    (tmp_path / inflight.FILE).write_bytes(b"short")
    assert inflight.suspects(str(tmp_path)) is None, "a torn or foreign file is not trusted"


def test_recovery_counts_an_attempt_only_for_the_file_a_worker_was_on(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "w")
    spool.ensure()
    for n in ("busy.txt", "waited-1.txt", "waited-2.txt"):  # one batch: the worker was on busy.txt
        (Path(spool.underprocess) / n).write_bytes(b"x\n")
    inflight.prepare(spool.state, 1)
    inflight.Marker(spool.state, 0).mark(key("busy.txt").encode())
    requeued, quarantined = spool.recover(max_attempts=3, now=0.0)
    assert sorted(requeued) == ["busy.txt", "waited-1.txt", "waited-2.txt"] and quarantined == []
    assert spool.attempts("busy.txt") == 1
    assert spool.attempts("waited-1.txt") == spool.attempts("waited-2.txt") == 0
