"""ingestd/sweep.py (pure bookkeeping of emptied folders' removal checks) and inode.folder_id (which folder a path
is, across inode reuse). The daemon's side, on real folders: tests/test_folder_moves.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ingestd import sweep as sweep_mod
from ingestd.inode import folder_id
from ingestd.sweep import Due, Sweep


def test_checks_come_due_in_time_order_and_an_earlier_one_supersedes() -> None:
    s = Sweep()
    s.at("b", 5.0, None)
    s.at("a", 3.0, (10, 7))
    s.at("a", 4.0, (10, 8))  # later: the earlier time stays; the identity is the latest claim's
    s.at("b", 2.0, None)  # sooner: the later entry is stale
    assert s.next() == 2.0 and len(s) == 2
    assert s.due(1.0) == []
    assert s.due(3.5) == [Due("b", None), Due("a", (10, 8))]
    assert s.next() is None and not s


def test_a_folder_that_left_its_name_is_known_when_a_listing_meets_it_again() -> None:
    s = Sweep()
    for rel, ident in (("big", (1, 1)), ("big/d", (2, 1)), ("other", (3, 1)), ("bigger", (4, 1))):
        s.at(rel, 10.0, ident)
    s.gone("big", now=1.0)  # big and big/d, not "bigger" (a name that only starts the same)
    assert set(s.checks) == {"bigger", "other"} and s.awaited()
    assert not s.returned((2, 9), 2.0)  # the same inode number, another birth time: another folder
    assert s.returned((2, 1), 2.0) and not s.returned((2, 1), 2.0)  # once
    assert s.returned((1, 1), 2.0) and not s.awaited()
    s.removed("other")  # the daemon's own rmdir: nothing to remember
    assert set(s.checks) == {"bigger"} and not s.awaited()


def test_a_due_check_that_finds_another_folder_remembers_its_own() -> None:
    """Its move was lost in an overflow (or is not read yet): the folder is remembered, and the next listing
    that meets it (a rescan) schedules it again."""
    s = Sweep()
    s.at("m", 1.0, (5, 1))
    s.at("n", 1.0, None)
    due = s.due(1.0)
    for d in due:
        s.missing(d, 1.0)
    assert s.next() is None and s.returned((5, 1), 2.0)
    assert not s.awaited()  # "n" had no identity: nothing to remember


def test_a_departed_folder_is_forgotten_after_the_ttl_and_past_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Sweep()
    s.at("x", 1.0, (1, 1))
    s.gone("x", now=100.0)
    assert not s.returned((1, 1), 100.0 + sweep_mod.DEPARTED_TTL + 1)
    monkeypatch.setattr(sweep_mod, "DEPARTED_MAX", 3)
    for i in range(5):
        s.at(f"f{i}", 1.0, (i, 1))
        s.gone(f"f{i}", now=200.0 + i)
    assert [s.returned((i, 1), 210.0) for i in range(5)] == [False, False, True, True, True]  # oldest go


def test_folder_id_tells_a_reused_inode_number_apart(tmp_path: Path) -> None:
    """This machine's ext4 gives a freed folder's inode number to the very next mkdir, which is what made
    (st_dev, st_ino) alone unsafe; the birth time tells the two apart. A rename keeps both."""
    a = tmp_path / "a"
    a.mkdir()
    first = folder_id(str(a))
    assert first is not None, f"{tmp_path}'s file system gives no birth time (statx STATX_BTIME)"
    assert first[0] == os.stat(a).st_ino
    a.rename(tmp_path / "b")
    assert folder_id(str(tmp_path / "b")) == first
    reused = False
    for _ in range(50):
        (tmp_path / "b").rmdir()
        (tmp_path / "b").mkdir()
        now = folder_id(str(tmp_path / "b"))
        assert now is not None and now != first
        if now[0] == first[0]:
            reused = True
            break
    print("inode number reused:", reused)


def test_folder_id_is_none_for_what_is_not_a_folder(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    (tmp_path / "d").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "d")
    assert folder_id(str(tmp_path / "f")) is None
    assert folder_id(str(tmp_path / "link")) is None  # never followed
    assert folder_id(str(tmp_path / "missing")) is None
    assert folder_id(str(tmp_path / "d")) is not None


def test_gone_costs_what_is_under_the_folder_not_every_check() -> None:
    """Every folder leaving unprocessed/ (the daemon's own rmdir too) calls gone(): it scanned every pending check,
    quadratic with folder_quiet_time keeping thousands pending (tests/test_break_round8.py). 20,000 pending
    one-file folders, each then gone, with a deeper tree among them: CPU time only, no sleeps."""
    import time

    s = Sweep()
    n = 20_000
    for i in range(n):
        s.at(f"b{i:05d}", 1000.0 + i, (i, i))
    s.at("tree/x/y", 1.0, (n + 1, 1))
    s.at("tree/x", 1.0, (n + 2, 1))
    s.at("treehouse", 1.0, (n + 3, 1))  # shares a prefix, not a folder
    t = time.process_time()
    for i in range(n):
        s.gone(f"b{i:05d}", 0.0)
    took = time.process_time() - t
    assert took < 0.3, f"{n} folders gone one by one took {took:.2f} s of CPU (each scanned every check)"
    s.gone("tree", 0.0)
    assert set(s.checks) == {"treehouse"} and len(s) == 1
    assert s.returned((n + 1, 1), 0.0) and s.returned((n + 2, 1), 0.0) and not s.returned((n + 3, 1), 0.0)


def test_kept_identities_round_trip_and_a_torn_file_reads_as_none(tmp_path: Path) -> None:
    """.ingestd/emptied (ingestd/emptied.py) is a hint written with no fsync: a torn or foreign file must read as
    nothing kept (a folder then stays), never as some other identity."""
    from ingestd import emptied

    ids = [(12, 1_700_000_000_123_456_789), (2**63 + 5, -3)]
    emptied.save(str(tmp_path), ids)
    assert emptied.load(str(tmp_path)) == set(ids)
    emptied.save(str(tmp_path), [])
    assert emptied.load(str(tmp_path)) == set()
    emptied.save(str(tmp_path), ids)
    data = (tmp_path / emptied.FILE).read_bytes()
    (tmp_path / emptied.FILE).write_bytes(data[:-1])
    assert emptied.load(str(tmp_path)) == set()
    (tmp_path / emptied.FILE).write_bytes(b"junk")
    assert emptied.load(str(tmp_path)) == set()
    assert [p.name for p in tmp_path.iterdir()] == [emptied.FILE]  # no temp left behind
