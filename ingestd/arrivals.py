"""When to ask whether a waiting file is complete: the watch's events are hints, the kernel answers at the claim.

Pure bookkeeping (time and stat are passed in). The kernel merges identical unread inotify events (two IN_OPEN
become one, two IN_CLOSE_NOWRITE become one), so counted opens and closes cannot say "nobody holds it open".
They only decide when to check: a name is handed out once every open the watch saw has been followed by a
close, or on any close (it may be the last; merged events lose the others), and then only after `quiet_time`
without any event on it (chmod/utime by path after the close: shutil.copy2). The claim asks the kernel
(Spool.claim, a read lease); a busy verdict comes back through busy(): the name waits for a writer's close,
or a retry timer (doubling), or the next rescan, so a lost or merged event never leaves it stuck.

A file the watch did not see arrive (start-up scan, overflow), or one the kernel cannot vouch for (no lease:
unsure()), must also keep its size and mtime for settle_time.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from ingestd.names import DONE_SUFFIX, ignored
from ingestd.pathindex import PathIndex
from ingestd.watch import Change

LINK_GRACE = 0.02  # seconds an IN_CREATE-only file waits for a possible IN_OPEN
BUSY_RETRY = 0.5  # seconds before a file found busy is checked again without a writer's close; doubles...
BUSY_RETRY_MAX = 30.0  # ...up to this (a writer through another name, e.g. a link, closes unseen here)

Stat = Callable[[str], "tuple[int, int] | None"]  # name -> (size, mtime_ns), None if gone


class Ready(NamedTuple):
    """A name to claim now. complete_at: when it was last seen complete (its last event, or the settle check);
    settled: it passed the settle check, so it may be claimed where no lease is possible."""

    name: str
    complete_at: float
    settled: bool = False
    seen: float = 0.0  # first noticed (kept across busy() and unsure())
    retry: float = 0.0  # the busy retry interval it had (busy() doubles it)


@dataclass(slots=True)
class Entry:
    tracked: bool  # the watch saw it arrive: no settle check needed
    seen: float  # first noticed (for queue-wait figures)
    last: float  # its last event: the quiet period runs from here
    opens: int = 0  # opens not yet followed by a close, as far as the (merging) watch shows
    closed: bool = False  # a close or a rename-in has been seen since it arrived
    recheck: bool = False  # a close or a rescan asks for a check, whatever the counts say
    retry: float = 0.0  # > 0: the kernel said a writer holds it; check at retry_at or on a writer's close
    retry_at: float = 0.0
    sig: tuple[int, int] | None = None  # settle check: last (size, mtime_ns)
    sig_since: float = 0.0
    complete_at: float | None = None
    due: float | None = None  # its one pending timer


class Arrivals:
    def __init__(self, settle_time: float, done_marker: bool = False, quiet_time: float = 0.0) -> None:
        self.settle_time, self.done_marker, self.quiet_time = settle_time, done_marker, quiet_time
        # OrderedDicts, not dicts: both are FIFOs read from the front (take, oldest_seen), and a dict keeps the
        # holes its removed keys leave until it next resizes, so finding its first key walks all of them: 14 µs
        # per take draining 100,000, quadratic in the burst (measured; an OrderedDict's linked list is O(1)).
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.ready: OrderedDict[str, None] = OrderedDict()  # complete, in the order they completed
        self.markers: set[str] = set()
        self._timers: list[tuple[float, str]] = []  # (when, name); at most one live per name (Entry.due)
        # The names inside folders ("batch/a.txt") of entries and markers, by folder: forget_under() costs what is
        # under its folder (scanning every waiting name for each folder leaving was quadratic). Top-level names,
        # most of them outside recursive mode, are never under a folder and stay out.
        self._below = PathIndex()
        self._marks_below = PathIndex()

    def __len__(self) -> int:
        return len(self.entries)

    # --- input: what the watch and scans saw -------------------------------------------------
    def change(self, c: Change, now: float) -> None:
        name = c.name
        if c.kind == "overflow":
            self.forget_history(now)
            return
        if not name or ignored(name):
            return
        if c.kind == "listed":  # found by the polling watcher's listing: its history unknown, as a scan's names
            self.scanned([name], now)
            return
        if self.done_marker and name.endswith(DONE_SUFFIX):
            if c.kind in ("create", "moved_in"):
                self._mark(name[: -len(DONE_SUFFIX)])
                self._check(name[: -len(DONE_SUFFIX)], now)
            elif c.kind == "gone":
                self.markers.discard(name[: -len(DONE_SUFFIX)])
                self._marks_below.discard(name[: -len(DONE_SUFFIX)])
            return
        e = self.entries.get(name)
        if c.kind == "create":
            self._put(name, Entry(tracked=True, seen=now, last=now))
            self._check(name, now)
        elif c.kind == "moved_in":
            self._put(name, Entry(tracked=True, seen=now, last=now, closed=True))
            self._check(name, now)
        elif c.kind == "gone":
            self.forget(name)
        elif c.kind == "open":
            if e is None:  # opened, but we missed its arrival: count from here, settle too
                e = self._put(name, Entry(tracked=False, seen=now, last=now))
            e.opens += 1
            e.recheck = False  # someone holds it now; their close brings the check back
            self._touch(name, e, now)
        elif e is None:
            return  # a close or attrib of a name we do not wait for (a claimed file, a stranger)
        elif c.kind in ("close", "close_write"):
            e.opens = max(0, e.opens - 1)
            e.closed = True
            # Any close may be the last one (the others' may have been merged away): check whatever the count.
            # Once the kernel said a writer holds it, only a writer's close is news; a reader's (ours included:
            # the lease check opens it read-only) is not, or each check would schedule the next.
            if c.kind == "close_write" or not e.retry:
                e.recheck = True
            self._touch(name, e, now)
        elif c.kind == "attrib":
            self._touch(name, e, now)  # chmod/utime by path: the producer is still at it

    def scanned(self, names: list[str], now: float) -> None:
        """A full scan's names: those we did not know get the settle check; those we did are checked again
        whatever their counts say (a merged close must not leave a file waiting until a restart)."""
        for name in names:
            if ignored(name):
                continue
            if self.done_marker and name.endswith(DONE_SUFFIX):
                self._mark(name[: -len(DONE_SUFFIX)])
                continue
            e = self.entries.get(name)
            if e is None:
                self._put(name, Entry(tracked=False, seen=now, last=now))
                self._at(now, name)
            elif name not in self.ready:
                e.recheck = True
                self._check(name, now)
        for base in list(self.markers):
            if base in self.entries:
                self._check(base, now)

    def forget_history(self, now: float) -> None:
        """After an inotify overflow, nothing seen so far is trusted: settle everything."""
        for name, e in self.entries.items():
            e.tracked, e.opens, e.sig, e.retry, e.recheck = False, 0, None, 0.0, False
            self._unready(name, e)
            self._at(now, name)

    def forget(self, name: str) -> None:
        if self.entries.pop(name, None) is not None and "/" in name:
            self._below.discard(name)
        self.ready.pop(name, None)

    def forget_under(self, folder: str) -> None:
        """A folder left unprocessed/ (removed, moved out): forget every name below it ("folder/...")."""
        for name in self._below.under(folder, itself=False):
            self.forget(name)
        for base in self._marks_below.under(folder, itself=False):
            self.markers.discard(base)
            self._marks_below.discard(base)

    # --- the kernel's verdict at the claim --------------------------------------------------------
    def busy(self, r: Ready, now: float) -> None:
        """The claim found a writer holding `r.name` open: wait for a writer's close, or retry after
        BUSY_RETRY seconds, doubling with each busy verdict up to BUSY_RETRY_MAX."""
        retry = min(BUSY_RETRY_MAX, 2 * r.retry) if r.retry else BUSY_RETRY
        self._put(r.name, Entry(tracked=True, seen=r.seen, last=now, closed=True, retry=retry, retry_at=now + retry))
        self._at(now + retry, r.name)

    def unsure(self, r: Ready, now: float) -> None:
        """The claim could not ask the kernel (no lease possible): settle `r.name` first, then hand it out
        with settled=True."""
        self._put(r.name, Entry(tracked=False, seen=r.seen, last=now))
        self._at(now, r.name)

    # --- output: what may be claimed -----------------------------------------------------------
    def tick(self, now: float, stat: Stat) -> None:
        """Run the timers due by `now` (settle checks call stat). Call it every main-loop turn, workers free or
        not, so that next_deadline() is never in the past."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            when, name = heapq.heappop(timers)
            e = self.entries.get(name)
            if e is None or e.due != when:
                continue  # superseded by an earlier timer, or the name was forgotten
            e.due = None
            self._check(name, now, stat)

    def take(self, n: int, now: float, stat: Stat) -> list[Ready]:
        """Up to n names to claim now, oldest completion first; they leave the bookkeeping (busy() and
        unsure() bring one back)."""
        self.tick(now, stat)
        out = []
        # islice, not list(self.ready)[:n]: copying every ready name on each take made a big queue drain in
        # quadratic time (tests/torture/test_arrivals.py, the 50,000-file burst).
        for name in list(itertools.islice(self.ready, n)):
            e = self.entries[name]
            self.forget(name)
            out.append(Ready(name, e.complete_at if e.complete_at is not None else now, not e.tracked, e.seen,
                             e.retry))
        return out

    def next_deadline(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def oldest_seen(self) -> float | None:
        """When the longest-waiting file was first noticed: entries keep insertion order, so O(1). A file put
        back by busy() or unsure() goes to the end with its first-seen time, so this may then be younger."""
        return next(iter(self.entries.values())).seen if self.entries else None

    # --- inside ----------------------------------------------------------------------------------
    def _put(self, name: str, e: Entry) -> Entry:
        """Every entry is added here, so the folder index (_below) never misses one."""
        self.entries[name] = e
        if "/" in name:
            self._below.add(name)
        return e

    def _mark(self, base: str) -> None:
        self.markers.add(base)
        if "/" in base:
            self._marks_below.add(base)

    def _at(self, when: float, name: str) -> None:
        e = self.entries[name]
        if e.due is not None and e.due <= when:
            return  # its earlier timer re-checks and re-arms: one live timer per name, however often asked
        e.due = when
        heapq.heappush(self._timers, (when, name))

    def _touch(self, name: str, e: Entry, now: float) -> None:
        """An event on a waiting name: its quiet period starts again."""
        e.last = now
        self._unready(name, e)
        self._check(name, now)

    def _unready(self, name: str, e: Entry) -> None:
        self.ready.pop(name, None)
        e.complete_at = None

    def _check(self, name: str, now: float, stat: Stat | None = None) -> None:
        e = self.entries.get(name)
        if e is None or name in self.ready:
            return
        if self.done_marker and name not in self.markers:
            return
        if not e.recheck:
            if e.retry:
                if now < e.retry_at:
                    return  # the kernel said a writer holds it: its close or the retry timer comes back
            elif e.opens:
                return  # opened and not closed yet, as far as we saw: its close (or a rescan) comes back
        start = e.last + self.quiet_time
        if not e.tracked:
            if stat is None:
                self._at(now, name)
                return
            sig = stat(name)
            if sig is None:
                self.forget(name)
                return
            if sig != e.sig:
                e.sig, e.sig_since = sig, now
            # Compare with the very sum the timer uses: `now - since < settle` can hold by rounding when the
            # timer is due, which re-armed it at a time <= now, forever.
            start = max(start, e.sig_since + self.settle_time)
        elif not e.closed:
            start = max(start, e.seen + LINK_GRACE)  # IN_CREATE alone so far: its IN_OPEN may be on its way
        if now < start:
            self._at(start, name)
            return
        by_timer = not e.tracked or (e.retry and not e.recheck)
        e.complete_at = now if by_timer else e.last
        e.recheck = False
        self.ready[name] = None
