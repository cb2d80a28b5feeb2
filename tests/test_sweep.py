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
    assert s.at("b", 5.0) and s.at("a", 3.0)  # identity not known yet: the caller asks for it
    s.identify("a", (10, 7))
    assert not s.at("a", 4.0)  # known now
    s.at("b", 2.0)  # sooner: the later entry is stale
    assert s.next() == 2.0 and len(s) == 2
    assert s.due(1.0) == []
    assert s.due(3.5) == [Due("b", None, False), Due("a", (10, 7), False)]
    assert s.next() is None and not s


def test_a_folder_moved_away_is_known_when_it_comes_back_a_deleted_one_never() -> None:
    s = Sweep()
    for rel, ident in (("big", (1, 1)), ("big/d", (2, 1)), ("other", (3, 1)), ("bigger", (4, 1))):
        s.at(rel, 10.0)
        s.identify(rel, ident)
    s.gone("big", now=1.0, moved=True)  # big and big/d, not "bigger" (a name that only starts the same)
    s.gone("other", now=1.0, moved=False)
    assert set(s.checks) == {"bigger"} and s.awaited()
    assert not s.returned((3, 1), 2.0)  # deleted: forgotten at once (its inode number may be reused)
    assert not s.returned((2, 9), 2.0)  # the same inode number, another birth time: another folder
    assert s.returned((2, 1), 2.0) and not s.returned((2, 1), 2.0)  # once
    assert s.returned((1, 1), 2.0) and not s.awaited()


def test_a_departed_folder_is_forgotten_after_the_ttl_and_past_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Sweep()
    s.at("x", 1.0)
    s.identify("x", (1, 1))
    s.gone("x", now=100.0, moved=True)
    assert not s.returned((1, 1), 100.0 + sweep_mod.DEPARTED_TTL + 1)
    monkeypatch.setattr(sweep_mod, "DEPARTED_MAX", 3)
    for i in range(5):
        s.at(f"f{i}", 1.0)
        s.identify(f"f{i}", (i, 1))
        s.gone(f"f{i}", now=200.0 + i, moved=True)
    assert [s.returned((i, 1), 210.0) for i in range(5)] == [False, False, True, True, True]  # oldest go


def test_a_missing_folder_is_looked_at_once_more_then_forgotten() -> None:
    s = Sweep()
    s.at("m", 1.0)
    s.identify("m", (5, 1))
    (d,) = s.due(1.0)
    s.missing(d, 2.0)  # its IN_MOVED_FROM may still be unread: kept, with its identity
    assert s.next() == 2.0
    (d2,) = s.due(2.0)
    assert d2 == Due("m", (5, 1), True)
    s.missing(d2, 3.0)
    assert s.next() is None  # the second miss forgets it
    s.at("m", 4.0)  # a claim from a folder of that name later: a fresh check, a miss gets its look again
    (d3,) = s.due(4.0)
    assert not d3.missed


def test_a_missing_folder_whose_move_is_read_later_is_still_known_by_identity() -> None:
    s = Sweep()
    s.at("a/b", 1.0)
    s.identify("a/b", (6, 1))
    s.missing(s.due(1.0)[0], 2.0)
    s.gone("a", now=1.5, moved=True)  # the event arrives between the two looks
    assert s.next() is None and s.returned((6, 1), 1.6)


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
