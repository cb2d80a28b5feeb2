"""inotify on unprocessed/: a wake-up hint (the folder is the truth). Joins the main loop's poll() by fileno().

Events are hints, never counts to trust: the kernel merges an event identical to the last one still unread
(two IN_OPEN become one, two IN_CLOSE_NOWRITE become one; inotify(7), "the new event is merged"), and an
overflow drops them all. Whether a file is complete is asked of the kernel at the claim (ingestd/lease.py).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import dataclass

from inotify_simple import INotify, flags

from ingestd.spool import SpoolError

# IN_ATTRIB: chmod/utime/chown by path after the close (shutil.copy2) must restart the quiet period.
MASK = (flags.CREATE | flags.OPEN | flags.CLOSE_WRITE | flags.CLOSE_NOWRITE | flags.ATTRIB | flags.MOVED_TO
        | flags.MOVED_FROM | flags.DELETE | flags.DELETE_SELF | flags.MOVE_SELF | flags.ONLYDIR)


class WatchLimit(SpoolError):
    """The kernel refused an inotify instance or watch (EMFILE, ENFILE, ENOSPC, ENOMEM); the message names the
    limit to raise. A SpoolError, so `ingestd run` prints one line and exits 75 (EX_TEMPFAIL)."""


@dataclass(frozen=True, slots=True)
class Change:
    kind: str  # create | open | close | close_write | attrib | moved_in | gone | overflow | lost_watch
    name: str = ""


class Watch:
    def __init__(self, folder: str) -> None:
        """Watch `folder` (a directory). Raises WatchLimit when an inotify limit is reached (inotify_init1(2),
        inotify_add_watch(2)), OSError for anything else (ENOENT, ENOTDIR, EACCES)."""
        self.folder = folder
        try:
            self._ino = INotify(inheritable=False)
        except OSError as e:
            raise _limit(e, folder) from None
        try:
            self._ino.add_watch(folder, MASK)
        except OSError as e:
            self._ino.close()
            raise _limit(e, folder) from None

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
            elif m & flags.CLOSE_WRITE:
                yield Change("close_write", ev.name)
            elif m & flags.CLOSE_NOWRITE:
                yield Change("close", ev.name)
            elif m & flags.ATTRIB:
                yield Change("attrib", ev.name)
            elif m & flags.MOVED_TO:
                yield Change("moved_in", ev.name)
            elif m & (flags.MOVED_FROM | flags.DELETE):
                yield Change("gone", ev.name)


def _limit(e: OSError, folder: str) -> Exception:
    """A limit error as WatchLimit naming its sysctl; any other OSError unchanged."""
    what = f"cannot watch {folder} with inotify: {e.strerror} ({errno.errorcode.get(e.errno or 0, 'error')})"
    if e.errno == errno.EMFILE:
        return WatchLimit(f"{what}: the user's inotify instances are used up (raise the sysctl "
                          "fs.inotify.max_user_instances) or this process has too many open files (LimitNOFILE=)")
    if e.errno == errno.ENOSPC:
        return WatchLimit(f"{what}: the user's inotify watches are used up (raise the sysctl "
                          "fs.inotify.max_user_watches)")
    if e.errno in (errno.ENFILE, errno.ENOMEM):
        return WatchLimit(f"{what}: the system is out of open files or kernel memory (fs.file-max)")
    return e
