"""Which waiting files are complete: pure bookkeeping, times and stat injected (no sleeping, no file system)."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from ingestd.arrivals import BUSY_RETRY, BUSY_RETRY_MAX, LINK_GRACE, Arrivals
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
    return [r.name for r in a.take(n, now, stat)]


def taken(a: Arrivals, n: int, now: float, stat: FakeDir) -> list[tuple[str, float]]:
    """(name, complete_at) of what take() hands out."""
    return [(r.name, r.complete_at) for r in a.take(n, now, stat)]


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
    assert taken(a, 10, T + 61, d) == [("f", T + 60)]  # complete since the close, not since the take
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


def test_a_readers_close_hands_it_out_and_the_kernels_busy_brings_it_back(d: FakeDir) -> None:
    """Writer + reader, reader closes first: that close may be the last one (merging), so the name goes to the
    kernel's check; the lease says a writer holds it (busy) and it waits for the writer's close."""
    a = Arrivals(SETTLE)
    feed(a, T, ("create", "f"), ("open", "f"), ("open", "f"), ("close", "f"))
    [r] = a.take(10, T + 1, d)
    a.busy(r, T + 1)
    feed(a, T + 1, ("open", "f"), ("close", "f"))  # our own lease check: a read-only open and close
    assert take(a, 10, T + 1 + BUSY_RETRY / 2, d) == [], "a reader's close (ours) is no news once busy"
    feed(a, T + 1.2, ("close_write", "f"))
    assert taken(a, 10, T + 1.2, d) == [("f", T + 1.2)]


def test_reopen_to_append_unreadies(d: FakeDir) -> None:
    a = Arrivals(SETTLE)
    feed(a, T, ("create", "f"), ("open", "f"), ("close", "f"))
    feed(a, T + 0.5, ("open", "f"))  # the writer comes back to append before the claim
    assert take(a, 10, T + 5, d) == []
    feed(a, T + 6, ("close", "f"))
    assert taken(a, 10, T + 7, d) == [("f", T + 6)]


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
    assert taken(a, 10, T, d) == [("renamed", T)]


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


def test_scan_rechecks_known_files_whatever_their_counts(d: FakeDir) -> None:
    a = Arrivals(SETTLE)
    feed(a, T, ("create", "w"), ("open", "w"))
    assert take(a, 10, T + 10, d) == [], "opened and never closed, as far as the watch saw"
    a.scanned(["w"], T + 11)
    [r] = a.take(10, T + 11, d)
    assert (r.name, r.settled) == ("w", False), "the kernel's check, not the settle check (a known arrival)"
    feed(a, T + 11, ("moved_in", "m"))
    a.scanned(["m"], T + 11)
    assert take(a, 10, T + 11, d) == ["m"], "a ready file stays ready"


def test_overflow_falls_back_to_settle(d: FakeDir) -> None:
    a = Arrivals(SETTLE)
    feed(a, T, ("create", "w"), ("open", "w"), ("moved_in", "r"))
    a.change(Change("overflow"), T + 1)  # the close of w may have been lost, r's readiness is no longer trusted
    d.files["w"] = (10, 1)
    d.files["r"] = (20, 1)
    assert take(a, 10, T + 1, d) == [], "r was ready, but no longer trusted"
    assert take(a, 10, T + 1 + SETTLE - 0.01, d) == []
    assert sorted(taken(a, 10, T + 1 + SETTLE, d)) == [("r", T + 1 + SETTLE), ("w", T + 1 + SETTLE)]


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


# --- merged events: counts are hints, the kernel decides (issue 8) ------------------------------------------------
def test_merged_open_then_a_readers_close_is_checked_not_trusted(d: FakeDir) -> None:
    """Producer opens and writes; an indexer opens while that IN_OPEN is unread (merged: one IN_OPEN for two
    opens) and closes. The count says nobody holds it: the name only goes to the kernel's check, which says
    busy; the producer's second write and close then bring it back, whole."""
    a = Arrivals(SETTLE)
    feed(a, T, ("create", "x"), ("open", "x"))  # the producer's and the indexer's IN_OPEN, merged into one
    feed(a, T + 0.01, ("close", "x"))  # the indexer's IN_CLOSE_NOWRITE
    [r] = a.take(10, T + 0.02, d)
    a.busy(r, T + 0.02)
    for t in (T + 0.1, T + 0.3, T + 0.49):
        assert take(a, 10, t, d) == [], "busy: wait for the producer"
    feed(a, T + 0.5, ("close_write", "x"))
    assert taken(a, 10, T + 0.5, d) == [("x", T + 0.5)]


def test_two_opens_whose_closes_merge_are_not_stuck(d: FakeDir) -> None:
    """One process opens x twice, 0.3 s apart (two IN_OPEN, read apart), and exits: both descriptors close
    together and the two IN_CLOSE_WRITE merge into one. The count stays at 1; the close still hands it out."""
    a = Arrivals(SETTLE)
    feed(a, T, ("create", "x"), ("open", "x"))
    feed(a, T + 0.3, ("open", "x"))
    feed(a, T + 0.4, ("close_write", "x"))
    assert taken(a, 10, T + 0.4, d) == [("x", T + 0.4)]


def test_merged_reader_closes_on_a_renamed_in_file(d: FakeDir) -> None:
    """Two readers of a renamed-in file, opened apart, closed together: two IN_CLOSE_NOWRITE become one."""
    a = Arrivals(SETTLE)
    feed(a, T, ("moved_in", "r"), ("open", "r"))
    feed(a, T + 0.1, ("open", "r"))
    assert take(a, 10, T + 0.1, d) == []
    feed(a, T + 0.2, ("close", "r"))
    assert take(a, 10, T + 0.2, d) == ["r"]


def test_an_in_open_lost_entirely_still_ends_in_the_kernels_check(d: FakeDir) -> None:
    """Linked in while its writer keeps writing through its other name: IN_CREATE alone, no open or close here
    ever. After the grace it goes to the kernel (busy), then the retry timer, doubling, brings it back."""
    a = Arrivals(SETTLE)
    feed(a, T, ("create", "l"))
    now, retry = T + LINK_GRACE, 0.0
    for _ in range(8):
        [r] = a.take(10, now, d)
        assert r.name == "l"
        a.busy(r, now)
        retry = min(BUSY_RETRY_MAX, 2 * retry) if retry else BUSY_RETRY
        assert a.next_deadline() == now + retry
        assert take(a, 10, now + retry * 0.99, d) == []
        now += retry
    assert retry == BUSY_RETRY_MAX, "the retry interval is capped"
    assert take(a, 10, now, d) == ["l"], "then free: claimed at the next retry"


def test_busy_then_a_rescan_checks_at_once(d: FakeDir) -> None:
    a = Arrivals(SETTLE)
    feed(a, T, ("moved_in", "f"))
    [r] = a.take(10, T, d)
    a.busy(r, T)
    a.scanned(["f"], T + 0.1)
    assert take(a, 10, T + 0.1, d) == ["f"]


def test_busy_keeps_first_seen_and_gone_forgets_it(d: FakeDir) -> None:
    a = Arrivals(SETTLE)
    feed(a, T, ("moved_in", "f"))
    [r] = a.take(10, T + 1, d)
    a.busy(r, T + 1)
    assert a.oldest_seen() == T and len(a) == 1
    feed(a, T + 2, ("gone", "f"))
    assert len(a) == 0 and take(a, 10, T + 100, d) == []


def test_overflow_turns_a_busy_file_into_a_settle_candidate(d: FakeDir) -> None:
    a = Arrivals(SETTLE)
    feed(a, T, ("moved_in", "f"))
    [r] = a.take(10, T, d)
    a.busy(r, T)
    a.change(Change("overflow"), T + 0.1)
    d.files["f"] = (1, 1)
    assert take(a, 10, T + 0.1, d) == []
    [r] = a.take(10, T + 0.1 + SETTLE, d)
    assert (r.name, r.settled) == ("f", True)


# --- the quiet period (quiet_time) ---------------------------------------------------------------------------------
Q = 0.03


def test_quiet_period_after_the_close_waits_for_chmod_and_utime(d: FakeDir) -> None:
    """shutil.copy2: close, then chmod and utime by path. Each IN_ATTRIB starts the quiet period again."""
    a = Arrivals(SETTLE, quiet_time=Q)
    feed(a, T, ("create", "c"), ("open", "c"))
    feed(a, T + 0.001, ("close_write", "c"))
    feed(a, T + 0.002, ("attrib", "c"))
    feed(a, T + 0.003, ("attrib", "c"))
    assert take(a, 10, T + 0.001 + Q, d) == []
    assert taken(a, 10, T + 0.003 + Q, d) == [("c", T + 0.003)], "complete since its last event"


def test_an_event_on_a_ready_name_unreadies_it(d: FakeDir) -> None:
    a = Arrivals(SETTLE, quiet_time=Q)
    feed(a, T, ("moved_in", "m"))
    a.tick(T + Q, d)  # ready now, but not taken (no worker free)
    feed(a, T + Q + 0.001, ("attrib", "m"))
    assert take(a, 10, T + Q + 0.002, d) == []
    assert take(a, 10, T + 2 * Q + 0.001, d) == ["m"]


def test_quiet_period_applies_to_renamed_in_and_linked_files(d: FakeDir) -> None:
    a = Arrivals(SETTLE, quiet_time=Q)
    feed(a, T, ("moved_in", "r"), ("create", "l"))
    assert take(a, 10, T + Q / 2, d) == []
    assert sorted(take(a, 10, T + max(Q, LINK_GRACE), d)) == ["l", "r"]


def test_quiet_period_delays_scanned_files_no_further_than_their_settle(d: FakeDir) -> None:
    a = Arrivals(SETTLE, quiet_time=Q)
    d.files["s"] = (1, 1)
    a.scanned(["s"], T)
    assert take(a, 10, T, d) == []  # first look: size and mtime noted
    assert take(a, 10, T + SETTLE, d) == ["s"]


def test_appending_producer_with_quiet_time_is_taken_after_its_last_append(d: FakeDir) -> None:
    """`for i in 1 2 3; do echo line >> f; sleep 1; done` with quiet_time=1.5: one claim, after the last."""
    a = Arrivals(SETTLE, quiet_time=1.5)
    for i in range(3):
        feed(a, T + i, ("open", "f") if i else ("create", "f"), *([("open", "f")] if not i else []),
             ("close_write", "f"))
        assert take(a, 10, T + i + 0.99, d) == []
    assert take(a, 10, T + 2 + 1.5, d) == ["f"]


# --- the kernel could not tell: settle, then claim ---------------------------------------------------------------
def test_unsure_settles_then_hands_out_settled(d: FakeDir) -> None:
    a = Arrivals(SETTLE, quiet_time=Q)
    feed(a, T, ("moved_in", "u"))
    [r] = a.take(10, T + Q, d)
    assert not r.settled
    a.unsure(r, T + Q)
    d.files["u"] = (5, 1)
    assert take(a, 10, T + Q, d) == []
    d.files["u"] = (6, 2)  # still being written (we could not see by whom)
    assert take(a, 10, T + Q + SETTLE, d) == []
    [r] = a.take(10, T + Q + 2 * SETTLE, d)
    assert (r.name, r.settled, r.seen) == ("u", True, T)


# --- timers: run every turn, one per name (issue 8, kind 5) ----------------------------------------------------------
def test_tick_leaves_no_deadline_in_the_past(d: FakeDir) -> None:
    """No worker free, so nothing is taken: after tick() the next deadline is still in the future (or none),
    else the main loop's poll() returns at once, forever (a whole core)."""
    a = Arrivals(SETTLE, quiet_time=Q)
    for i in range(100):
        d.files[f"s{i}"] = (1, 1)
    a.scanned([f"s{i}" for i in range(100)], T)
    feed(a, T, ("create", "c"), ("open", "c"), ("close_write", "c"), ("create", "l"))
    now = T
    while now < T + 3 * SETTLE:
        a.tick(now, d)
        deadline = a.next_deadline()
        assert deadline is None or deadline > now
        now = deadline if deadline is not None else now + 0.5
    assert len(a.ready) == 102 and a.next_deadline() is None


@pytest.mark.parametrize("marker", [True, False])
def test_rescans_never_pile_up_timers(d: FakeDir, marker: bool) -> None:
    """1,000 waiting files over 50 rescans used to push 51,000 timers (done_marker); one per name now."""
    a = Arrivals(SETTLE, done_marker=marker)
    names = [f"f{i}" for i in range(1000)]
    for n in names:
        d.files[n] = (1, 1)
    listing = names + ([n + ".done" for n in names[:500]] if marker else [])
    for k in range(50):
        a.scanned(listing, T + k)
        assert len(a._timers) <= len(names)


def test_one_timer_per_name_under_a_stream_of_events(d: FakeDir) -> None:
    a = Arrivals(SETTLE, quiet_time=Q)
    feed(a, T, ("create", "f"))
    for i in range(1000):
        feed(a, T + i * 0.001, ("attrib", "f"))
    assert len(a._timers) <= 2
    assert take(a, 10, T + 0.999 + Q, d) == ["f"]


def test_relative_paths_are_names_like_any_other_and_a_folder_leaving_forgets_them(d: FakeDir) -> None:
    """recursive mode: "batch/a.txt" waits like "a.txt"; temp and dot names are judged by their last component;
    a folder removed or moved out (dir_gone) forgets every name below it, and only those."""
    a = Arrivals(SETTLE)
    for name in ("batch/a.txt", "batch/deep/b.txt", "batch/.c.txt", "batch/d.part", "batchx/e.txt"):
        a.change(Change("moved_in", name), T)
    assert sorted(a.entries) == ["batch/a.txt", "batch/deep/b.txt", "batchx/e.txt"]
    a.forget_under("batch/deep")
    assert sorted(a.entries) == ["batch/a.txt", "batchx/e.txt"]
    a.forget_under("batch")
    assert take(a, 10, T + 1, d) == ["batchx/e.txt"]


def test_forget_under_costs_what_is_under_the_folder_not_every_waiting_name(d: FakeDir) -> None:
    """forget_under() runs for every folder leaving unprocessed/: it scanned every waiting name (quadratic with
    thousands of folders pending and full ones waiting; tests/test_break_round8.py). 20,000 waiting names in
    20,000 folders, each folder then gone: CPU time only, no sleeps."""
    import time

    a = Arrivals(SETTLE, done_marker=True)
    n = 20_000
    for i in range(n):
        feed(a, T, ("create", f"b{i:05d}/x.txt"), ("create", f"b{i:05d}/y.txt.done"))
    feed(a, T, ("create", "top.txt"), ("create", "bee/x.txt"), ("create", "b00000x/z.txt"))
    t = time.process_time()
    for i in range(n):
        a.forget_under(f"b{i:05d}")
    took = time.process_time() - t
    assert took < 0.3, f"{n} folders forgotten one by one took {took:.2f} s of CPU (each scanned every name)"
    assert set(a.entries) == {"top.txt", "bee/x.txt", "b00000x/z.txt"} and not a.markers
