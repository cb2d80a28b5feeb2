"""Which waiting files are complete: pure bookkeeping, times and stat injected (no sleeping, no file system)."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from ingestd.arrivals import LINK_GRACE, Arrivals
from ingestd.watch import Change

SETTLE = 1.0
T = 1000.0


class FakeDir:
    """What stat() sees: name -> (size, mtime_ns). A real folder would do, but times must be injected here."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[int, int]] = {}

    def __call__(self, name: str) -> tuple[int, int] | None:
        return self.files.get(name)


@pytest.fixture
def d() -> FakeDir:
    return FakeDir()


def take(a: Arrivals, n: int, now: float, stat: FakeDir) -> list[str]:
    """The names take() hands out (each comes with the time it became complete; see the tests that check it)."""
    return [name for name, _ in a.take(n, now, stat)]


def feed(a: Arrivals, now: float, *changes: tuple[str, str]) -> None:
    for kind, name in changes:
        a.change(Change(kind, name), now)


# --- files the watch saw arrive -----------------------------------------------------------------------------------
def test_writer_create_open_close(d: FakeDir) -> None:
    a = Arrivals(SETTLE)
    feed(a, T, ("create", "f"), ("open", "f"))
    assert take(a, 10, T + 0.001, d) == []
    assert take(a, 10, T + 60, d) == [], "an open writer keeps it, whatever the time"
    feed(a, T + 60, ("close", "f"))
    assert a.take(10, T + 61, d) == [("f", T + 60)]  # complete since the close, not since the take
    assert len(a) == 0 and take(a, 10, T + 62, d) == []


def test_slow_writer_pausing_between_writes_is_never_ready(d: FakeDir) -> None:
    """No stat is consulted for a tracked file: a writer idle far longer than settle_time still holds it."""
    a = Arrivals(SETTLE)
    feed(a, T, ("create", "slow"), ("open", "slow"))
    d.files["slow"] = (10, 1)  # unchanged size and mtime for ages
    for t in (T + 1, T + 5, T + 30, T + 300):
        assert take(a, 10, t, d) == []
    feed(a, T + 301, ("close", "slow"))
    assert take(a, 10, T + 301, d) == ["slow"]


def test_readers_opening_a_file_count_too(d: FakeDir) -> None:
    a = Arrivals(SETTLE)
    feed(a, T, ("create", "f"), ("open", "f"), ("open", "f"), ("close", "f"))  # writer + reader; reader closes first
    assert take(a, 10, T + 1, d) == []
    feed(a, T + 2, ("close", "f"))
    assert take(a, 10, T + 2, d) == ["f"]


def test_reopen_to_append_unreadies(d: FakeDir) -> None:
    a = Arrivals(SETTLE)
    feed(a, T, ("create", "f"), ("open", "f"), ("close", "f"))
    feed(a, T + 0.5, ("open", "f"))  # the writer comes back to append before the claim
    assert take(a, 10, T + 5, d) == []
    feed(a, T + 6, ("close", "f"))
    assert a.take(10, T + 7, d) == [("f", T + 6)]


def test_link_create_only_is_ready_after_the_grace(d: FakeDir) -> None:
    a = Arrivals(SETTLE)
    feed(a, T, ("create", "linked"))
    assert a.next_deadline() == T + LINK_GRACE
    assert take(a, 10, T, d) == []
    assert take(a, 10, T + LINK_GRACE / 2, d) == []
    assert take(a, 10, T + LINK_GRACE, d) == ["linked"]


def test_create_then_late_open_within_the_grace_waits_for_the_close(d: FakeDir) -> None:
    a = Arrivals(SETTLE)
    feed(a, T, ("create", "f"))
    feed(a, T + LINK_GRACE / 2, ("open", "f"))
    assert take(a, 10, T + 10 * LINK_GRACE, d) == []
    feed(a, T + 1, ("close", "f"))
    assert take(a, 10, T + 1, d) == ["f"]


def test_moved_in_is_ready_at_once(d: FakeDir) -> None:
    a = Arrivals(SETTLE)
    feed(a, T, ("moved_in", "renamed"))
    assert a.take(10, T, d) == [("renamed", T)]


def test_moved_in_over_an_open_earlier_file_is_a_new_file(d: FakeDir) -> None:
    a = Arrivals(SETTLE)
    feed(a, T, ("create", "f"), ("open", "f"), ("moved_in", "f"))  # rsync renamed a complete file over it
    assert take(a, 10, T, d) == ["f"]


def test_gone_forgets_waiting_and_ready_files(d: FakeDir) -> None:
    a = Arrivals(SETTLE)
    feed(a, T, ("create", "w"), ("open", "w"), ("moved_in", "r"), ("gone", "w"), ("gone", "r"))
    assert len(a) == 0
    assert take(a, 10, T + 10, d) == []


def test_close_of_an_unknown_name_is_ignored(d: FakeDir) -> None:
    a = Arrivals(SETTLE)
    feed(a, T, ("close", "stranger"))
    assert len(a) == 0 and take(a, 10, T + 10, d) == []


def test_open_of_an_unseen_file_needs_the_close_and_a_settle(d: FakeDir) -> None:
    """Opened, but its arrival was missed (before the watch): counted from here, and settled since history is unknown."""
    a = Arrivals(SETTLE)
    d.files["old"] = (5, 1)
    feed(a, T, ("open", "old"))
    assert take(a, 10, T + 5, d) == []
    feed(a, T + 5, ("close", "old"))
    assert take(a, 10, T + 5, d) == []
    assert take(a, 10, T + 5 + SETTLE, d) == ["old"]


# --- overflow and scans: the settle check ---------------------------------------------------------------------------
def test_scanned_files_settle(d: FakeDir) -> None:
    a = Arrivals(SETTLE)
    d.files["s"] = (100, 7)
    a.scanned(["s"], T)
    assert a.next_deadline() == T
    assert take(a, 10, T, d) == []
    assert take(a, 10, T + SETTLE - 0.01, d) == []
    assert take(a, 10, T + SETTLE, d) == ["s"]


def test_scanned_file_that_keeps_growing_waits(d: FakeDir) -> None:
    a = Arrivals(SETTLE)
    d.files["g"] = (100, 1)
    a.scanned(["g"], T)
    take(a, 10, T, d)
    d.files["g"] = (200, 2)
    assert take(a, 10, T + SETTLE, d) == [], "it changed: the settle time starts again"
    assert take(a, 10, T + 2 * SETTLE - 0.01, d) == []
    assert take(a, 10, T + 2 * SETTLE, d) == ["g"]


def test_scanned_mtime_change_alone_resets_settle(d: FakeDir) -> None:
    a = Arrivals(SETTLE)
    d.files["m"] = (100, 1)
    a.scanned(["m"], T)
    take(a, 10, T, d)
    d.files["m"] = (100, 2)  # rewritten with the same size
    assert take(a, 10, T + SETTLE, d) == []
    assert take(a, 10, T + 2 * SETTLE, d) == ["m"]


def test_scanned_file_that_vanishes_is_forgotten(d: FakeDir) -> None:
    a = Arrivals(SETTLE)
    a.scanned(["ghost"], T)
    assert take(a, 10, T + SETTLE, d) == []
    assert len(a) == 0


def test_scan_does_not_reset_known_files(d: FakeDir) -> None:
    a = Arrivals(SETTLE)
    feed(a, T, ("create", "w"), ("open", "w"))
    a.scanned(["w"], T + 1)
    d.files["w"] = (1, 1)
    assert take(a, 10, T + 10, d) == [], "still open: a scan must not turn it into a settle candidate"
    feed(a, T + 10, ("moved_in", "m"))
    a.scanned(["m"], T + 10)
    assert take(a, 10, T + 10, d) == ["m"], "a ready file stays ready"


def test_overflow_falls_back_to_settle(d: FakeDir) -> None:
    a = Arrivals(SETTLE)
    feed(a, T, ("create", "w"), ("open", "w"), ("moved_in", "r"))
    a.change(Change("overflow"), T + 1)  # the close of w may have been lost, r's readiness is no longer trusted
    d.files["w"] = (10, 1)
    d.files["r"] = (20, 1)
    assert take(a, 10, T + 1, d) == [], "r was ready, but no longer trusted"
    assert take(a, 10, T + 1 + SETTLE - 0.01, d) == []
    assert sorted(a.take(10, T + 1 + SETTLE, d)) == [("r", T + 1 + SETTLE), ("w", T + 1 + SETTLE)]


def test_overflow_then_more_writing_delays(d: FakeDir) -> None:
    a = Arrivals(SETTLE)
    feed(a, T, ("create", "w"), ("open", "w"))
    a.change(Change("overflow"), T)
    d.files["w"] = (10, 1)
    take(a, 10, T, d)
    d.files["w"] = (20, 2)
    assert take(a, 10, T + SETTLE, d) == []
    assert take(a, 10, T + 2 * SETTLE, d) == ["w"]


@pytest.fixture
def no_hang() -> Iterator[None]:
    """Turn an endless loop into a test failure: SIGALRM after 2 s raises in the test."""
    def alarm(signum: int, frame: object) -> None:
        raise TimeoutError("hung: took over 2 s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, 2.0)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("start", [63.562471636703386, 15.981998689370778, T])
def test_settle_deadline_exactly_on_time_with_rounding(d: FakeDir, start: float, no_hang: None) -> None:
    """(start + settle) - start < settle for these starts: a take exactly at the timer must neither hang nor miss."""
    a = Arrivals(SETTLE)
    d.files["s"] = (1, 1)
    a.scanned(["s"], start)
    assert take(a, 10, start, d) == []
    assert a.next_deadline() == start + SETTLE
    assert take(a, 10, start + SETTLE, d) == ["s"]


@pytest.mark.parametrize("start", [T, 12345.678, 0.1, 987654.321])
def test_link_grace_deadline_exactly_on_time(d: FakeDir, start: float, no_hang: None) -> None:
    """The grace timer fires at start + LINK_GRACE; at that instant the file must be ready, not dropped by rounding."""
    a = Arrivals(SETTLE)
    feed(a, start, ("create", "l"))
    assert take(a, 10, a.next_deadline(), d) == ["l"]  # type: ignore[arg-type]


def test_settle_time_zero(d: FakeDir) -> None:
    a = Arrivals(0.0)
    d.files["z"] = (1, 1)
    a.scanned(["z"], T)
    assert take(a, 10, T, d) == ["z"]


# --- names that are never claimed ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [".hidden", ".ingestd-tmp-1-abc", ".rsync.XyZ12", "a.tmp", "b.part", "c.swp", "d~",
                                  "e.filepart", "f.crdownload"])
def test_ignored_names(d: FakeDir, name: str) -> None:
    a = Arrivals(SETTLE)
    feed(a, T, ("create", name), ("open", name), ("close", name), ("moved_in", name))
    a.scanned([name], T)
    assert len(a) == 0
    assert take(a, 10, T + 10, d) == []


def test_rsync_temp_then_rename(d: FakeDir) -> None:
    a = Arrivals(SETTLE)
    feed(a, T, ("create", ".data.csv.Ab12"), ("open", ".data.csv.Ab12"), ("close", ".data.csv.Ab12"),
         ("gone", ".data.csv.Ab12"), ("moved_in", "data.csv"))
    assert take(a, 10, T, d) == ["data.csv"]


# --- done markers --------------------------------------------------------------------------------------------------
def test_done_marker_required(d: FakeDir) -> None:
    a = Arrivals(SETTLE, done_marker=True)
    feed(a, T, ("create", "f"), ("open", "f"), ("close", "f"))
    assert take(a, 10, T + 10, d) == [], "complete, but its producer has not said so"
    feed(a, T + 11, ("create", "f.done"))
    assert take(a, 10, T + 11, d) == ["f"]
    assert take(a, 10, T + 12, d) == [], "the marker itself is never claimed"


def test_done_marker_before_the_file(d: FakeDir) -> None:
    a = Arrivals(SETTLE, done_marker=True)
    feed(a, T, ("moved_in", "f.done"))
    assert take(a, 10, T, d) == []
    feed(a, T + 1, ("create", "f"), ("open", "f"))
    assert take(a, 10, T + 2, d) == [], "still open"
    feed(a, T + 3, ("close", "f"))
    assert take(a, 10, T + 3, d) == ["f"]


def test_done_marker_on_scanned_files(d: FakeDir) -> None:
    a = Arrivals(SETTLE, done_marker=True)
    d.files.update({"a": (1, 1), "b": (1, 1), "a.done": (0, 1)})
    a.scanned(["a", "a.done", "b"], T)
    assert take(a, 10, T, d) == []
    assert take(a, 10, T + SETTLE, d) == ["a"]
    assert take(a, 10, T + 100, d) == []


def test_done_marker_removed_before_the_file_completes(d: FakeDir) -> None:
    a = Arrivals(SETTLE, done_marker=True)
    feed(a, T, ("create", "f.done"), ("gone", "f.done"), ("create", "f"), ("open", "f"), ("close", "f"))
    assert take(a, 10, T + 10, d) == []


def test_done_suffix_is_an_ordinary_name_without_the_option(d: FakeDir) -> None:
    a = Arrivals(SETTLE)
    feed(a, T, ("moved_in", "report.done"))
    assert take(a, 10, T, d) == ["report.done"]


# --- take: order, limit, figures ------------------------------------------------------------------------------------
def test_take_oldest_completion_first_and_limit(d: FakeDir) -> None:
    a = Arrivals(SETTLE)
    feed(a, T, ("create", "late"), ("open", "late"))
    feed(a, T + 1, ("moved_in", "first"))
    feed(a, T + 2, ("moved_in", "second"))
    feed(a, T + 3, ("close", "late"))
    assert take(a, 2, T + 3, d) == ["first", "second"]
    assert take(a, 2, T + 3, d) == ["late"]


def test_oldest_seen_and_len(d: FakeDir) -> None:
    a = Arrivals(SETTLE)
    assert a.oldest_seen() is None and a.next_deadline() is None
    feed(a, T + 1, ("create", "b"))
    feed(a, T + 5, ("moved_in", "a"))
    a.scanned(["c"], T + 9)
    assert len(a) == 3
    assert a.oldest_seen() == T + 1
    d.files["c"] = (1, 1)
    assert take(a, 1, T + 9, d) == ["a"]  # the only ready one leaves
    feed(a, T + 9, ("gone", "b"))
    assert a.oldest_seen() == T + 9


def test_a_name_that_returns_after_gone_is_a_new_arrival(d: FakeDir) -> None:
    a = Arrivals(SETTLE)
    feed(a, T, ("create", "f"), ("gone", "f"))
    feed(a, T + LINK_GRACE * 0.9, ("create", "f"), ("open", "f"))
    assert take(a, 10, T + 1, d) == [], "the old create's timer must not make the new, open file ready"
    feed(a, T + 2, ("close", "f"))
    assert take(a, 10, T + 2, d) == ["f"]
