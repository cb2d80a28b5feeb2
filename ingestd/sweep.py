"""Which emptied subfolders of unprocessed/ to look at, and when (recursive mode): bookkeeping only, no I/O.

A folder is removed only once the daemon emptied it: a claim took a file from it (daemon._claim), and the
removal waits until the folder has been empty and unchanged for folder_quiet_time (daemon._clean_folders looks, and
spool.prune removes). A producer's own empty folder (`mkdir batch`, a pause, then its files) is never touched.

A folder keeps that standing when it is renamed, or moved out and back in, after the daemon emptied it
(`mv big big2`, `mv big2 /tmp/x; mv /tmp/x big3`): inotify reports a move as IN_MOVED_FROM of one name and
IN_MOVED_TO of another, linked by a cookie only when both ends are watched (inotify(7)); the polling watcher
sees a folder gone and another come; an overflow loses both. So the sweep knows an emptied folder by its
identity, inode.folder_id(): the inode number with the birth time, since ext4 gives a freed inode number to the
very next mkdir (a producer's folder made just after an emptied one was moved out and removed had its number,
and st_ino alone took it for the emptied one). A folder that left its name is remembered for DEPARTED_TTL
seconds; any listing that meets it again (the folder's arrival, a rescan) schedules its check. Where the file
system keeps no birth time there is no identity, and a renamed emptied folder stays there, as a folder emptied
by hand does."""

from __future__ import annotations

import heapq
from typing import NamedTuple

from ingestd.pathindex import PathIndex

Ident = tuple[int, int]  # (inode number, birth time ns): inode.folder_id()

DEPARTED_TTL = 300.0  # seconds an emptied folder that moved away is still known if it comes back
DEPARTED_MAX = 10_000  # at most this many remembered (the oldest forgotten first): memory stays bounded


class Due(NamedTuple):
    rel: str  # the subfolder, relative to unprocessed/
    ident: Ident | None  # which folder it was at its last claim (None: not known)


class Sweep:
    """Due checks of subfolders (relative paths, "batch/deep"), at monotonic times in seconds."""

    def __init__(self) -> None:
        self.checks: dict[str, float] = {}  # subfolder -> when to see whether it can be removed
        # The same checks as a heap of (when, subfolder), stale entries skipped: scanning the dict each turn made
        # 10,000 one-file folders take 6x the time of 10,000 files (quadratic).
        self._heap: list[tuple[float, str]] = []
        self._ident: dict[str, Ident] = {}  # subfolder with a check -> which folder it was at its last claim
        self._departed: dict[Ident, float] = {}  # emptied folders no longer at their name -> since (oldest first)
        self._index = PathIndex()  # the keys of checks, by folder: gone() costs what is under its folder, no more
        self.changed = 0  # counts changes of the identities kept (idents()): the daemon saves them when it moved

    def __len__(self) -> int:
        return len(self.checks)

    def at(self, rel: str, when: float, ident: Ident | None) -> None:
        """Look at `rel` by `when` (sooner if a check is already due sooner). `ident`: which folder `rel` is now
        (the one a claim just took a file from: a folder replaced under the same name is the new one)."""
        if self.checks.get(rel, float("inf")) > when:
            self.checks[rel] = when
            self._index.add(rel)
            heapq.heappush(self._heap, (when, rel))
        if ident is not None and self._ident.get(rel) != ident:
            self._ident[rel] = ident
            self.changed += 1

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
            self._index.discard(rel)
            out.append(Due(rel, self._ident.pop(rel, None)))
        if out:
            self.changed += 1  # a check put back by at() counts again
        return out

    def missing(self, d: Due, now: float) -> None:
        """A due check found its folder gone, or another folder under its name (moved away, and the events that
        said so lost in an overflow, or not read yet): remembered by identity, for returned()."""
        if d.ident is not None:
            self._depart(d.ident, now)

    def removed(self, rel: str) -> None:
        """The daemon removed `rel` itself (it was empty): only its own check goes."""
        self.checks.pop(rel, None)
        self._index.discard(rel)
        if self._ident.pop(rel, None) is not None:
            self.changed += 1

    def gone(self, rel: str, now: float) -> None:
        """`rel` left unprocessed/ (moved away, or deleted: inotify and the polling watcher cannot always tell):
        the checks of it and below go, their folders remembered by identity for returned(). Remembering a deleted
        one is harmless: no other folder is ever born with its inode number and birth time."""
        for sub in self._index.under(rel):
            self.checks.pop(sub)
            self._index.discard(sub)
            ident = self._ident.pop(sub, None)
            if ident is not None:
                self._depart(ident, now)

    def idents(self) -> list[Ident]:
        """Every folder the daemon emptied that is still pending: checked, or departed. Kept on disk across a
        restart (daemon._keep_folders), so the next run knows them whatever their name then."""
        return [*self._ident.values(), *self._departed]

    def awaited(self) -> bool:
        """True while an emptied folder that moved away may still come back (returned() can say yes)."""
        return bool(self._departed)

    def returned(self, ident: Ident, now: float) -> bool:
        """A folder came in (created, moved in, or found by a listing): True, and forgotten as departed, when
        it is one the daemon emptied and that left its name within DEPARTED_TTL. The caller schedules its check."""
        self._expire(now)
        if self._departed.pop(ident, None) is None:
            return False
        self.changed += 1
        return True

    def _depart(self, ident: Ident, now: float) -> None:
        self._departed.pop(ident, None)
        self._departed[ident] = now  # re-inserted: the dict's order stays the order of departure
        self.changed += 1
        self._expire(now)

    def _expire(self, now: float) -> None:
        departed = self._departed
        while departed:
            ident, since = next(iter(departed.items()))
            if now - since <= DEPARTED_TTL and len(departed) <= DEPARTED_MAX:
                break
            del departed[ident]
            self.changed += 1
