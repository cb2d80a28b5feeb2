"""inotify on unprocessed/: a wake-up hint (the folder is the truth). Joins the main loop's poll() by fileno().

Events are hints, never counts to trust: the kernel merges an event identical to the last one still unread
(two IN_OPEN become one, two IN_CLOSE_NOWRITE become one; inotify(7), "the new event is merged"), and an
overflow drops them all. Whether a file is complete is asked of the kernel at the claim (ingestd/lease.py).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass

from inotify_simple import INotify, flags

from ingestd.inode import folder_id
from ingestd.pathindex import PathIndex
from ingestd.spool import SpoolError

# IN_ATTRIB: chmod/utime/chown by path after the close (shutil.copy2) must restart the quiet period.
# IN_DONT_FOLLOW with IN_ONLYDIR: a folder swapped for a symlink before its watch is added is refused (ENOTDIR),
# never followed out of the tree.
MASK = (flags.CREATE | flags.OPEN | flags.CLOSE_WRITE | flags.CLOSE_NOWRITE | flags.ATTRIB | flags.MOVED_TO
        | flags.MOVED_FROM | flags.DELETE | flags.DELETE_SELF | flags.MOVE_SELF | flags.ONLYDIR | flags.DONT_FOLLOW)


class WatchLimit(SpoolError):
    """The kernel refused an inotify instance or watch (EMFILE, ENFILE, ENOSPC, ENOMEM); the message names the
    limit to raise. A SpoolError, so `ingestd run` prints one line and exits 75 (EX_TEMPFAIL)."""


@dataclass(frozen=True, slots=True)
class Change:
    # create | open | close | close_write | attrib | moved_in | gone | overflow | lost_watch: about a file;
    # listed: a file found by the polling watcher's listing (ingestd/polling.py), history unknown;
    # dir_in (a folder created or moved in) | dir_gone (a folder removed or moved out): about a folder.
    kind: str
    name: str = ""  # relative to the watched folder: "a.txt", or "batch/a.txt" inside a watched subfolder


class Watch:
    def __init__(self, folder: str) -> None:
        """Watch `folder` (a directory). Raises WatchLimit when an inotify limit is reached (inotify_init1(2),
        inotify_add_watch(2)), OSError for anything else (ENOENT, ENOTDIR, EACCES). Subfolders are watched only
        when add() is called for them (recursive mode)."""
        self.folder = folder
        self._dirs: dict[int, str] = {}  # watch descriptor -> folder relative to `folder` ("" for itself)
        self._wds: dict[str, int] = {}
        self._index = PathIndex()  # the subfolders of _wds, by folder: drop() costs what is under `rel`, no more
        try:
            self._ino = INotify(inheritable=False)
        except OSError as e:
            raise _limit(e, folder) from None
        try:
            wd = self._ino.add_watch(folder, MASK)
        except OSError as e:
            self._ino.close()
            raise _limit(e, folder) from None
        self._dirs[wd], self._wds[""] = "", wd
        # Which folder is watched (inode, birth time): a rescan compares it with the folder now at that path, the
        # only sign left when the folder was removed and made again while an overflow dropped its IN_DELETE_SELF.
        self.ident = folder_id(folder)

    def add(self, rel: str) -> bool:
        """Watch the subfolder `rel` ("batch", "batch/deep") too. Call it before listing that folder, so a file
        created in between is seen either way (inotify(7), "Limitations and caveats": a watch is not recursive,
        and entries made before it exists raise no event). False when it is gone or not a folder (a symlink is
        never followed); raises WatchLimit when the user's watches are used up, OSError otherwise."""
        try:
            wd = self._ino.add_watch(os.path.join(self.folder, rel), MASK)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return False
            raise _limit(e, os.path.join(self.folder, rel)) from None
        old = self._dirs.get(wd)
        if old is not None and old != rel:  # the same folder under a new name (moved inside the tree)
            self._forget(old)
        self._dirs[wd], self._wds[rel] = rel, wd
        self._index.add(rel)
        return True

    def _forget(self, rel: str) -> int | None:
        """`rel` is no longer watched: its watch descriptor, if it had one."""
        self._index.discard(rel)
        return self._wds.pop(rel, None)

    def drop(self, rel: str, below: bool = True) -> None:
        """Stop watching subfolder `rel` and everything below it (it was removed or moved out). below=False: only
        `rel` (it was empty: no scan of every watch)."""
        subs = self._index.under(rel) if below and rel else [rel] if rel in self._wds else []
        for sub in subs:
            wd = self._forget(sub)
            if wd is None:
                continue
            self._dirs.pop(wd, None)
            try:
                self._ino.rm_watch(wd)
            except OSError:
                pass  # the kernel removed it already (the folder is gone: IN_IGNORED)

    def watched(self) -> set[str]:
        """Subfolders watched now (relative paths), the watched folder itself excluded."""
        return {d for d in self._wds if d}

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
                continue
            rel = self._dirs.get(ev.wd)
            if rel is None:
                continue  # a subfolder's watch already dropped (its IN_IGNORED, or events queued before drop())
            if m & (flags.IGNORED | flags.DELETE_SELF | flags.MOVE_SELF | flags.UNMOUNT):
                if not rel:
                    yield Change("lost_watch")
                elif m & flags.IGNORED:
                    # A subfolder's watch ended (removed); its parent's IN_DELETE/IN_MOVED_FROM says dir_gone. The
                    # watch is dead whatever its name maps to now (a folder made again under it has a watch of its
                    # own, added before this event was read): kept, its entry leaked once per replacement.
                    self._dirs.pop(ev.wd, None)
                    if self._wds.get(rel) == ev.wd:
                        self._forget(rel)
                continue
            if not ev.name:
                continue  # about the watched folder itself (our own listing opens it): nothing to claim
            name = f"{rel}/{ev.name}" if rel else ev.name
            if m & flags.ISDIR:
                if m & (flags.CREATE | flags.MOVED_TO):
                    yield Change("dir_in", name)
                elif m & (flags.MOVED_FROM | flags.DELETE):
                    yield Change("dir_gone", name)
            elif m & flags.CREATE:
                yield Change("create", name)
            elif m & flags.OPEN:
                yield Change("open", name)
            elif m & flags.CLOSE_WRITE:
                yield Change("close_write", name)
            elif m & flags.CLOSE_NOWRITE:
                yield Change("close", name)
            elif m & flags.ATTRIB:
                yield Change("attrib", name)
            elif m & flags.MOVED_TO:
                yield Change("moved_in", name)
            elif m & (flags.MOVED_FROM | flags.DELETE):
                yield Change("gone", name)


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
