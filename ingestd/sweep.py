"""Which emptied subfolders of unprocessed/ to look at, and when (recursive mode): bookkeeping only, no I/O.

A folder is removed only once the daemon emptied it: a claim took a file from it (daemon._claim), and the
removal waits until the folder has been empty and unchanged for settle_time (daemon._clean_folders looks, and
spool.prune removes). A producer's own empty folder (`mkdir batch`, a pause, then its files) is never touched.

A folder keeps that standing when it is renamed, or moved out and back in, after the daemon emptied it
(`mv big big2`, `mv big2 /tmp/x; mv /tmp/x big3`): inotify reports a move as IN_MOVED_FROM of one name and
IN_MOVED_TO of another, linked by a cookie only when both ends are watched (inotify(7)), so the sweep knows an
emptied folder by its identity for DEPARTED_TTL seconds after it moved away: inode.folder_id(), the inode
number with the birth time, since ext4 gives a freed inode number to the very next mkdir (a producer's folder
made just after an emptied one was moved out and removed had its number, and st_ino alone took it for the
emptied one). Where the file system keeps no birth time there is no identity, and a renamed emptied folder
stays there, as a folder emptied by hand does. A folder that was deleted is forgotten at once."""

from __future__ import annotations

import heapq
from typing import NamedTuple

Ident = tuple[int, int]  # (inode number, birth time ns): inode.folder_id()

DEPARTED_TTL = 300.0  # seconds an emptied folder that moved away is still known if it comes back
DEPARTED_MAX = 10_000  # at most this many remembered (the oldest forgotten first): memory stays bounded


class Due(NamedTuple):
    rel: str  # the subfolder, relative to unprocessed/
    ident: Ident | None  # which folder it was when its check was scheduled (None: not known)
    missed: bool  # this is the second look at a folder found missing


class Sweep:
    """Due checks of subfolders (relative paths, "batch/deep"), at monotonic times in seconds."""

    def __init__(self) -> None:
        self.checks: dict[str, float] = {}  # subfolder -> when to see whether it can be removed
        # The same checks as a heap of (when, subfolder), stale entries skipped: scanning the dict each turn made
        # 10,000 one-file folders take 6x the time of 10,000 files (quadratic).
        self._heap: list[tuple[float, str]] = []
        self._ident: dict[str, Ident] = {}  # subfolder with a check -> which folder it was when scheduled
        self._departed: dict[Ident, float] = {}  # emptied folders that moved away -> when (oldest first)
        self._missed: set[str] = set()  # checks that found their folder missing once and look once more

    def __len__(self) -> int:
        return len(self.checks)

    def at(self, rel: str, when: float) -> bool:
        """Look at `rel` by `when` (sooner if a check is already due sooner). Returns True when the sweep does
        not know yet which folder `rel` is: the caller then passes its identity to identify()."""
        self._missed.discard(rel)  # a claim from it, or a removal below it: it is there
        self._schedule(rel, when)
        return rel not in self._ident

    def _schedule(self, rel: str, when: float) -> None:
        if self.checks.get(rel, float("inf")) > when:
            self.checks[rel] = when
            heapq.heappush(self._heap, (when, rel))

    def identify(self, rel: str, ident: Ident) -> None:
        if rel in self.checks:
            self._ident[rel] = ident

    def next(self) -> float | None:
        """When the earliest check is due, or None."""
        heap = self._heap
        while heap and self.checks.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)  # superseded by an earlier check, or its folder is gone
        return heap[0][0] if heap else None

    def due(self, now: float) -> list[Due]:
        """The checks due by `now`, taken off."""
        out = []
        while (when := self.next()) is not None and when <= now:
            rel = heapq.heappop(self._heap)[1]
            del self.checks[rel]
            out.append(Due(rel, self._ident.pop(rel, None), rel in self._missed))
            self._missed.discard(rel)
        return out

    def missing(self, d: Due, when: float) -> None:
        """A due check found its folder gone, or another folder under its name. The event that says where it
        went (gone(), moved or not) may still be unread: look once more by `when`, keeping its identity; a
        second miss forgets it."""
        if d.missed:
            return
        self._missed.add(d.rel)
        self._schedule(d.rel, when)
        if d.ident is not None:
            self.identify(d.rel, d.ident)

    def removed(self, rel: str) -> None:
        """The daemon removed `rel` itself (it was empty): only its own check goes."""
        self._drop(rel)

    def gone(self, rel: str, now: float, moved: bool) -> None:
        """`rel` left unprocessed/ (deleted, or moved: `moved`): the checks of it and below go. Those that were
        emptied and moved are remembered by identity until `now` + DEPARTED_TTL, for returned()."""
        below = rel + "/"
        for sub in [f for f in self.checks if f == rel or f.startswith(below)]:
            ident = self._drop(sub)
            if moved and ident is not None:
                self._departed.pop(ident, None)
                self._departed[ident] = now  # re-inserted: the dict's order stays the order of departure
        self._expire(now)

    def awaited(self) -> bool:
        """True while an emptied folder that moved away may still come back (returned() can say yes)."""
        return bool(self._departed)

    def returned(self, ident: Ident, now: float) -> bool:
        """A folder came in (created, moved in, or found by a listing): True, and forgotten as departed, when
        it is one the daemon emptied and that moved away within DEPARTED_TTL. The caller schedules its check."""
        self._expire(now)
        return self._departed.pop(ident, None) is not None

    def _drop(self, rel: str) -> Ident | None:
        self.checks.pop(rel, None)
        self._missed.discard(rel)
        return self._ident.pop(rel, None)

    def _expire(self, now: float) -> None:
        departed = self._departed
        while departed:
            ident, since = next(iter(departed.items()))
            if now - since <= DEPARTED_TTL and len(departed) <= DEPARTED_MAX:
                break
            del departed[ident]
