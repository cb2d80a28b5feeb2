"""The polling watcher: unprocessed/ listed every poll_interval, for file systems inotify cannot watch.

inotify never hears of a file another NFS/CIFS/FUSE client wrote (ingestd/watchmode.py). Poller has Watch's
interface (fileno, read, add, drop, watched, close), so the main loop polls and reads it exactly as it does inotify.
A thread lists each watched folder (name -> inode, size, mtime, ctime), compares with the listing before, and
queues what changed as Changes, waking the loop through an eventfd:

    a name not seen before                                 -> listed   (its history is unknown: settle it)
    a file whose size, mtime, ctime or inode changed       -> attrib + listed   (settling starts again)
    a name gone                                            -> gone
    a folder appearing / disappearing                      -> dir_in / dir_gone
    a file becoming a folder under the same name, or back  -> gone + dir_in, dir_gone + listed
    unprocessed/ itself gone or replaced                   -> lost_watch

Names, not inode numbers, say which entry is which: FUSE file systems built on libfuse's high-level API (sshfs)
number inodes themselves, a hard link gets a new number and a forgotten node a new one on its next lookup; a
changed number only asks for a check. A folder replaced under its name is the same folder to the daemon: its
listing shows the old files gone and the new ones listed.

The first listing of a folder reports every file in it as listed: the daemon also lists a folder when it starts
watching it, and a name reported twice only asks for one more check, while one never reported would wait for the
30 s rescan. Nothing ever overflows: the queue is a deque, not a kernel buffer. Idle cost: one listing (and one
lstat per entry) per folder per poll_interval, and one wake-up of this thread; the main loop is woken only when
something changed.

Whether a file is complete is never decided here: "listed" files are untracked (ingestd/arrivals.py), so their
size and mtime must stay unchanged for settle_time before the claim, and the claim still asks the kernel for a
lease. Producers on other machines should rename files in or use done markers (docs/guarantees.md).
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import stat
import threading
from collections.abc import Iterator

from ingestd.log import event
from ingestd.pathindex import PathIndex
from ingestd.watch import Change

Sig = tuple[int, int, int, int]  # (inode, size, mtime_ns, ctime_ns); a folder: (inode, -1, 0, 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_GONE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ESTALE)  # ESTALE: an NFS folder replaced on the server


class Poller:
    def __init__(self, folder: str, interval: float = 1.0) -> None:
        """Poll `folder` (a directory) every `interval` seconds (> 0) from a thread started here; the first listing
        comes one interval after construction (the daemon lists the folder itself meanwhile). Raises OSError when
        `folder` cannot be opened as a directory (ENOENT, ENOTDIR, EACCES). Subfolders are listed only once add()
        is called for them (recursive mode)."""
        if not interval > 0:
            raise ValueError(f"poll interval must be > 0 seconds, not {interval!r}")
        self.folder, self.interval = folder, interval
        # Held open for the Poller's life: the kernel keeps the inode (a FUSE file system cannot renumber it), and
        # each round compares the folder at the path with it: a new folder under the same name is a lost watch, as
        # with inotify (IN_DELETE_SELF), and the daemon makes a new Poller.
        self._root_fd = os.open(folder, _DIR_FLAGS)
        st = os.fstat(self._root_fd)
        self._root = (st.st_dev, st.st_ino)
        self._lock = threading.Lock()  # guards _dirs, _gen, _closed and the eventfd against close()
        self._dirs: dict[str, int] = {"": 0}  # watched folder (relative, "" itself) -> generation of its add()
        self._gen = 0
        self._index = PathIndex()  # the subfolders of _dirs, by folder: drop() costs what is under `rel`, no more
        # Folders dropped since the last round: their parent's next listing reports them as new if they are there
        # (the daemon removed an emptied folder and a producer made it again, maybe with the same inode number).
        self._forgotten: set[str] = set()
        self._queue: collections.deque[tuple[str, int, Change]] = collections.deque()  # (folder, generation, change)
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._closed = False
        self._stop = threading.Event()
        # Only the thread touches these: the last listing of each folder, and the generation it was made under.
        self._seen: dict[str, tuple[int, dict[str, Sig]]] = {}
        self._failing: str | None = None  # the last listing error, said once until a listing succeeds
        self.rounds = 0  # listings of the whole tree done (tests wait on it)
        self._thread = threading.Thread(target=self._run, name="ingestd-poll", daemon=True)
        self._thread.start()

    # --- Watch's interface (the main thread) ---------------------------------------------------------------
    def fileno(self) -> int:
        return self._fd

    def read(self) -> Iterator[Change]:
        """Everything queued now, without blocking. A change about a folder dropped (or dropped and added again)
        since it was listed is skipped, as Watch skips events of a removed watch; checked as each is taken, so
        drop()/add() called while iterating apply to the rest."""
        try:
            os.eventfd_read(self._fd)  # reset the counter first: changes queued after this wake the loop again
        except BlockingIOError:
            pass
        while True:
            try:
                rel, gen, change = self._queue.popleft()
            except IndexError:
                return
            with self._lock:
                current = self._dirs.get(rel)
            if current == gen:
                yield change

    def add(self, rel: str) -> bool:
        """List the subfolder `rel` ("batch", "batch/deep") too, from the next round on; its first listing reports
        every file in it. False when it is gone or not a folder (a symlink is never followed); OSError (EACCES...)
        otherwise. Adding a folder already watched changes nothing."""
        try:
            st = os.lstat(os.path.join(self.folder, rel))
        except OSError as e:
            if e.errno in _GONE:
                return False
            raise
        if not stat.S_ISDIR(st.st_mode):
            return False
        with self._lock:
            if rel not in self._dirs:
                self._gen += 1
                self._dirs[rel] = self._gen
                if rel:
                    self._index.add(rel)
        return True

    def drop(self, rel: str, below: bool = True) -> None:
        """Stop listing subfolder `rel` and (below=True) every watched folder under it."""
        with self._lock:
            self._forgotten.add(rel)
            for sub in self._index.under(rel) if below and rel else [rel] if rel in self._dirs else []:
                if sub:
                    del self._dirs[sub]
                    self._index.discard(sub)
                    self._forgotten.add(sub)

    def watched(self) -> set[str]:
        """Subfolders listed now (relative paths), the watched folder itself excluded."""
        with self._lock:
            return {d for d in self._dirs if d}

    def close(self) -> None:
        """Stop the thread and close the eventfd. A listing under way (a slow network folder) is not waited for:
        the thread sees the flag and writes nothing more."""
        self._stop.set()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self._fd)
        self._thread.join(timeout=1.0)
        if not self._thread.is_alive():  # else the thread may still list it; the kernel closes it at exit
            os.close(self._root_fd)

    # --- the thread ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self._round():
                    return  # the watched folder is gone: lost_watch said; the daemon makes a new Poller
            except Exception as e:  # noqa: BLE001 (a thread must not die silently: the loop would never hear again)
                self._fail(f"{type(e).__name__}: {e}")

    def _round(self) -> bool:
        """List every watched folder once (parents before children) and queue the differences. False once the
        watched folder itself is gone or replaced."""
        with self._lock:
            dirs = sorted(self._dirs.items())
            forgotten, self._forgotten = self._forgotten, set()
        out: list[tuple[str, int, Change]] = []
        failed = False
        for rel, gen in dirs:
            try:
                now = self._list(rel)
            except OSError as e:
                if rel == "" and e.errno in _GONE:
                    self._emit([("", 0, Change("lost_watch"))])
                    return False
                if rel and e.errno in _GONE:
                    continue  # a subfolder removed: its parent's listing says dir_gone
                self._fail(f"cannot list {os.path.join(self.folder, rel)}: {e.strerror}")
                failed = True
                continue
            if now is None:  # unprocessed/ is another folder now (removed and made again)
                self._emit([("", 0, Change("lost_watch"))])
                return False
            old = self._seen.get(rel)
            before = old[1] if old is not None and old[0] == gen else None
            if before is not None and forgotten:
                before = {n: sig for n, sig in before.items() if (f"{rel}/{n}" if rel else n) not in forgotten}
            self._diff(rel, gen, before, now, out)
            self._seen[rel] = (gen, now)
        for rel in set(self._seen) - {rel for rel, _ in dirs}:
            del self._seen[rel]  # dropped
        self._emit(out)
        self.rounds += 1
        if not failed:
            self._failing = None
        return True

    def _list(self, rel: str) -> dict[str, Sig] | None:
        """name -> Sig for each entry of folder `rel`; None if `rel` is the root and it is not the folder watched
        at the start. An entry gone between the listing and its lstat is left out (the next round sees it)."""
        fd = os.open(os.path.join(self.folder, rel) if rel else self.folder, _DIR_FLAGS)
        try:
            if not rel:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != self._root:
                    return None
            found: dict[str, Sig] = {}
            with os.scandir(fd) as it:
                for entry in it:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            found[entry.name] = (0, -1, 0, 0)  # a folder is known by its name (see above)
                        else:
                            s = entry.stat(follow_symlinks=False)
                            found[entry.name] = (s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns)
                    except FileNotFoundError:
                        continue
            return found
        finally:
            os.close(fd)

    def _diff(self, rel: str, gen: int, old: dict[str, Sig] | None, now: dict[str, Sig],
              out: list[tuple[str, int, Change]]) -> None:
        """Append the changes from listing `old` (None: never listed) to `now` of folder `rel`. Costs what the two
        listings hold: never a copy of every watched folder (one per folder listed was quadratic in them, each round)."""

        def path(name: str) -> str:
            return f"{rel}/{name}" if rel else name

        def appeared(name: str, sig: Sig) -> None:
            if sig[1] >= 0:
                out.append((rel, gen, Change("listed", path(name))))
            elif old is not None or path(name) not in known:  # a first listing: folders watched are known
                out.append((rel, gen, Change("dir_in", path(name))))

        def vanished(name: str, sig: Sig) -> None:
            out.append((rel, gen, Change("gone" if sig[1] >= 0 else "dir_gone", path(name))))

        if old is None:
            with self._lock:  # the subfolders of this listing watched now (the main thread adds and drops)
                known = {path(n) for n, sig in now.items() if sig[1] < 0 and path(n) in self._dirs}
            for name, sig in now.items():
                appeared(name, sig)
            return
        for name, sig in old.items():
            if name not in now:
                vanished(name, sig)
        for name, sig in now.items():
            was = old.get(name)
            if was is None:
                appeared(name, sig)
            elif (was[1] < 0) != (sig[1] < 0):  # a file became a folder under the same name, or back
                vanished(name, was)
                appeared(name, sig)
            elif was != sig:
                # Changed, or another file under the same name. attrib restarts a waiting file's quiet period; listed
                # brings back one the daemon had already taken off its list (a new file of the same name).
                out.append((rel, gen, Change("attrib", path(name))))
                out.append((rel, gen, Change("listed", path(name))))

    def _emit(self, changes: list[tuple[str, int, Change]]) -> None:
        if not changes:
            return
        with self._lock:
            if self._closed:
                return
            self._queue.extend(changes)
            os.eventfd_write(self._fd, 1)  # wakes the main loop's poll()

    def _fail(self, why: str) -> None:
        if self._failing != why:  # once per kind of failure, not once a round
            event("io_error", "the polling watcher cannot list a folder; it tries again each round", logging.ERROR,
                  folder=self.folder, reason=why)
        self._failing = why
