"""Relative paths ("batch/deep/a.txt") indexed by their folders, so that what lies under one folder is found in
time proportional to it, not to every path known. Pure bookkeeping, no I/O.

Recursive mode forgets everything under a folder that left unprocessed/ (removed, moved out): the pending removal
checks (sweep.py), the watches (watch.py, polling.py) and the waiting names (arrivals.py). Each scanned all it knew
with str.startswith, so with folder_quiet_time (300 s) keeping thousands of emptied folders pending and watched,
every folder leaving cost three full scans: quadratic (tests/test_break_round8.py)."""

from __future__ import annotations

from collections.abc import Iterable


class PathIndex:
    """A set of relative paths, each also reachable from every folder above it ("" is the top)."""

    __slots__ = ("_kids", "_members")

    def __init__(self, paths: Iterable[str] = ()) -> None:
        self._members: set[str] = set()
        self._kids: dict[str, set[str]] = {}  # folder -> its direct children that are members or hold some
        for p in paths:
            self.add(p)

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, path: object) -> bool:
        return path in self._members

    def add(self, path: str) -> None:
        if path in self._members:
            return
        self._members.add(path)
        while path:
            parent = path.rpartition("/")[0]
            kids = self._kids.setdefault(parent, set())
            if path in kids:
                break  # its ancestors already lead here
            kids.add(path)
            path = parent

    def discard(self, path: str) -> None:
        if path not in self._members:
            return
        self._members.discard(path)
        # Unlink the folders left leading nowhere, bottom up: the index never outgrows its members.
        while path and path not in self._members and not self._kids.get(path):
            self._kids.pop(path, None)
            parent = path.rpartition("/")[0]
            kids = self._kids.get(parent)
            if kids is None:
                break
            kids.discard(path)
            path = parent

    def under(self, folder: str, itself: bool = True) -> list[str]:
        """The members below `folder` (and `folder` itself if a member and `itself`), in no particular order: a
        list, so the caller may discard them as it goes."""
        out = [folder] if itself and folder in self._members else []
        stack = list(self._kids.get(folder, ()))
        while stack:
            p = stack.pop()
            if p in self._members:
                out.append(p)
            stack.extend(self._kids.get(p, ()))
        return out
