"""Which waiting files are complete: open/close counting from the watch, a settle check for the rest.

Pure bookkeeping (time and stat are passed in). A file the watch saw arrive (IN_CREATE / IN_MOVED_TO)
is complete when nobody the watch saw open it still holds it open; a link() arrival (IN_CREATE alone)
after a short grace, in case its creator's IN_OPEN is still on its way. A file whose history the watch
did not see (start-up scan, overflow) must keep its size and mtime for settle_time.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass

from ingestd.names import ignored
from ingestd.watch import Change

LINK_GRACE = 0.02  # seconds an IN_CREATE-only file waits for a possible IN_OPEN
DONE_SUFFIX = ".done"

Stat = Callable[[str], "tuple[int, int] | None"]  # name -> (size, mtime_ns), None if gone


@dataclass(slots=True)
class Entry:
    tracked: bool  # the watch saw it arrive, so its opens are counted
    seen: float  # first noticed (for queue-wait figures)
    opens: int = 0
    closed: bool = False  # a close or a rename-in has been seen since it arrived
    sig: tuple[int, int] | None = None  # settle check: last (size, mtime_ns)
    sig_since: float = 0.0
    complete_at: float | None = None


class Arrivals:
    def __init__(self, settle_time: float, done_marker: bool = False) -> None:
        self.settle_time, self.done_marker = settle_time, done_marker
        self.entries: dict[str, Entry] = {}
        self.ready: dict[str, None] = {}  # complete, in the order they completed
        self.markers: set[str] = set()
        self._timers: list[tuple[float, str]] = []

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
        if self.done_marker and name.endswith(DONE_SUFFIX):
            if c.kind in ("create", "moved_in"):
                self.markers.add(name[: -len(DONE_SUFFIX)])
                self._check(name[: -len(DONE_SUFFIX)], now)
            elif c.kind == "gone":
                self.markers.discard(name[: -len(DONE_SUFFIX)])
            return
        e = self.entries.get(name)
        if c.kind == "create":
            self.entries[name] = Entry(tracked=True, seen=now)
            self._at(now + LINK_GRACE, name)
        elif c.kind == "moved_in":
            self.entries[name] = Entry(tracked=True, seen=now, closed=True)
            self._check(name, now)
        elif c.kind == "open":
            if e is None:  # opened, but we missed its arrival: count from here, settle too
                e = self.entries[name] = Entry(tracked=False, seen=now)
            e.opens += 1
            self._unready(name, e)
        elif c.kind == "close" and e is not None:
            e.opens = max(0, e.opens - 1)
            e.closed = True
            self._check(name, now)
        elif c.kind == "gone":
            self.forget(name)

    def scanned(self, names: list[str], now: float) -> None:
        """A full scan's names: those we did not know get the settle check."""
        for name in names:
            if ignored(name):
                continue
            if self.done_marker and name.endswith(DONE_SUFFIX):
                self.markers.add(name[: -len(DONE_SUFFIX)])
                continue
            if name not in self.entries:
                self.entries[name] = Entry(tracked=False, seen=now)
                self._at(now, name)
        for base in list(self.markers):
            if base in self.entries:
                self._check(base, now)

    def forget_history(self, now: float) -> None:
        """After an inotify overflow, counted opens can no longer be trusted: settle everything."""
        for name, e in self.entries.items():
            e.tracked, e.opens, e.sig = False, 0, None
            self._unready(name, e)
            self._at(now, name)

    def forget(self, name: str) -> None:
        self.entries.pop(name, None)
        self.ready.pop(name, None)

    # --- output: what may be claimed -----------------------------------------------------------
    def take(self, n: int, now: float, stat: Stat) -> list[tuple[str, float]]:
        """Up to n complete names with the time each became complete, oldest first; they leave the bookkeeping."""
        self._run_timers(now, stat)
        out = []
        # islice, not list(self.ready)[:n]: copying every ready name on each take made a big queue drain in
        # quadratic time (tests/torture/test_arrivals.py, the 50,000-file burst).
        for name in list(itertools.islice(self.ready, n)):
            e = self.entries[name]
            self.forget(name)
            out.append((name, e.complete_at if e.complete_at is not None else now))
        return out

    def tick(self, now: float, stat: Stat) -> None:
        """Run the timers that are due, so next_deadline() moves on even when nothing is taken."""
        self._run_timers(now, stat)

    def next_deadline(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def oldest_seen(self) -> float | None:
        """When the longest-waiting file was first noticed: entries keep insertion order, so O(1)."""
        return next(iter(self.entries.values())).seen if self.entries else None

    # --- inside ----------------------------------------------------------------------------------
    def _at(self, when: float, name: str) -> None:
        heapq.heappush(self._timers, (when, name))

    def _unready(self, name: str, e: Entry) -> None:
        self.ready.pop(name, None)
        e.complete_at = None

    def _check(self, name: str, now: float, stat: Stat | None = None) -> None:
        e = self.entries.get(name)
        if e is None or e.opens or name in self.ready:
            return
        if self.done_marker and name not in self.markers:
            return
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
            if now < e.sig_since + self.settle_time:
                self._at(e.sig_since + self.settle_time, name)
                return
        elif not e.closed and now < e.seen + LINK_GRACE:
            return  # IN_CREATE alone so far; its timer comes back
        e.complete_at = now
        self.ready[name] = None

    def _run_timers(self, now: float, stat: Stat) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, name = heapq.heappop(timers)
            self._check(name, now, stat)
