"""inotify on unprocessed/: a wake-up hint (the folder is the truth). Joins the main loop's poll() by fileno()."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from inotify_simple import INotify, flags

MASK = (flags.CREATE | flags.OPEN | flags.CLOSE_WRITE | flags.CLOSE_NOWRITE | flags.MOVED_TO | flags.MOVED_FROM
        | flags.DELETE | flags.DELETE_SELF | flags.MOVE_SELF | flags.ONLYDIR)


@dataclass(frozen=True, slots=True)
class Change:
    kind: str  # create | open | close | moved_in | gone | overflow | lost_watch
    name: str = ""


class Watch:
    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._ino = INotify(inheritable=False)
        try:
            self._ino.add_watch(folder, MASK)
        except OSError:
            self._ino.close()
            raise

    def fileno(self) -> int:
        return self._ino.fileno()

    def close(self) -> None:
        self._ino.close()

    def read(self) -> Iterator[Change]:
        """Everything queued now, without blocking (poll() said the fd is readable)."""
        for ev in self._ino.read(timeout=0):
            m = ev.mask
            if m & flags.Q_OVERFLOW:
                yield Change("overflow")
            elif m & (flags.IGNORED | flags.DELETE_SELF | flags.MOVE_SELF | flags.UNMOUNT):
                yield Change("lost_watch")
            elif m & flags.CREATE:
                yield Change("create", ev.name)
            elif m & flags.OPEN:
                yield Change("open", ev.name)
            elif m & (flags.CLOSE_WRITE | flags.CLOSE_NOWRITE):
                yield Change("close", ev.name)
            elif m & flags.MOVED_TO:
                yield Change("moved_in", ev.name)
            elif m & (flags.MOVED_FROM | flags.DELETE):
                yield Change("gone", ev.name)
