"""Is anyone writing this file? Asked of the kernel with a read lease, not guessed from inotify counts.

fcntl(2), "Leases": F_SETLEASE with F_RDLCK fails with EAGAIN while any process holds the file open for
writing (or has it mapped shared and writable). While the lease is held, a process that opens the file for
writing (or truncates it) blocks in open() until the holder lets go, and F_GETLEASE then reports the target
type (F_UNLCK) so the holder can tell that a writer is waiting. Opening for reading never breaks a read lease.

Only the file's owner may take a lease, or a process with CAP_LEASE; leases exist only on regular files and on
file systems that support them (not NFS, not with fs.leases-enable=0): otherwise the answer is UNSUPPORTED and
the caller falls back to a settle check (docs/guarantees.md, "Completeness").

Reading only: nothing here writes, renames or fsyncs (that is durable.py). Our own read-only open shows up on
an inotify watch of the folder as IN_OPEN + IN_CLOSE_NOWRITE: callers must treat those as hints, never truth.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import signal
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# Linux values (include/uapi/linux/fcntl.h); the fcntl module has them on Linux, the fallback is for type checkers.
F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)
F_GETLEASE = getattr(fcntl, "F_GETLEASE", 1025)
F_SETSIG = getattr(fcntl, "F_SETSIG", 10)
# A lease break is signalled to the holder (SIGIO by default, whose default action kills the process). SIGURG's
# default action is to ignore it, so a break can never kill a process that installed no handler.
BREAK_SIGNAL = signal.SIGURG

_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
# EACCES: neither owner nor CAP_LEASE (or not readable); EPERM likewise under some LSMs; EINVAL: no leases on this
# file system, or leases disabled (fs.leases-enable = 0); ENOLCK: out of lock memory.
_UNSUPPORTED = (errno.EACCES, errno.EPERM, errno.EINVAL, errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)


class Verdict(enum.Enum):
    FREE = "free"  # lease held: nobody has it open for writing, and nobody can open it for writing meanwhile
    BUSY = "busy"  # someone holds it open for writing (EAGAIN / EWOULDBLOCK)
    UNSUPPORTED = "unsupported"  # the kernel cannot tell us here (not owner without CAP_LEASE, no leases on this fs)
    NOT_REGULAR = "not_regular"  # a symlink, FIFO, socket, device or directory: nothing to complete
    GONE = "gone"  # no such name any more


@dataclass(slots=True)
class Lease:
    """The answer for one path; while `verdict` is FREE the read lease is held on `fd` (-1 otherwise)."""

    verdict: Verdict
    fd: int = -1
    dev: int = 0
    ino: int = 0
    size: int = -1  # the leased file's size and mtime when leased: what identifies it where inode numbers do not
    mtime_ns: int = -1

    def writer_waiting(self) -> bool:
        """True once a writer has tried to open the file since the lease was taken (it now blocks in open())."""
        if self.fd < 0:
            return False
        return fcntl.fcntl(self.fd, F_GETLEASE) != fcntl.F_RDLCK  # F_UNLCK: a break is under way (fcntl(2))


@contextmanager
def read_lease(path: str) -> Iterator[Lease]:
    """Take a read lease on `path` (never following a symlink) for the life of the block.

    Yields a Lease whose verdict is FREE (held until the block ends; dev/ino name the leased file), BUSY,
    UNSUPPORTED, NOT_REGULAR or GONE. Other OSErrors from open(), fstat() or fcntl() (EIO...) are raised.
    On exit the lease is released and the descriptor closed; a writer blocked meanwhile then proceeds.
    """
    lease = _take(path)
    try:
        yield lease
    finally:
        if lease.fd >= 0:
            try:
                fcntl.fcntl(lease.fd, F_SETLEASE, fcntl.F_UNLCK)  # let a blocked writer through at once
            finally:
                os.close(lease.fd)


def _take(path: str) -> Lease:
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except (FileNotFoundError, NotADirectoryError):  # ENOTDIR: a folder on its path is a file now (recursive mode)
        return Lease(Verdict.GONE)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO, errno.ENODEV):  # a symlink (O_NOFOLLOW), a socket, a device
            return Lease(Verdict.NOT_REGULAR)
        if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):  # someone holds a write lease on it
            return Lease(Verdict.BUSY)
        if e.errno in _UNSUPPORTED:  # unreadable to us: no lease possible
            return Lease(Verdict.UNSUPPORTED)
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return Lease(Verdict.NOT_REGULAR)
        # The break signal first, so that a break in the instant after F_SETLEASE is harmless (see BREAK_SIGNAL).
        fcntl.fcntl(fd, F_SETSIG, BREAK_SIGNAL)
        try:
            fcntl.fcntl(fd, F_SETLEASE, fcntl.F_RDLCK)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK) or e.errno in _UNSUPPORTED:
                os.close(fd)
                return Lease(Verdict.BUSY if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK) else Verdict.UNSUPPORTED)
            raise
        # F_SETLEASE made us the owner of the descriptor's signals; owner 0 means no signal is sent at all.
        fcntl.fcntl(fd, fcntl.F_SETOWN, 0)
    except BaseException:
        os.close(fd)
        raise
    return Lease(Verdict.FREE, fd, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
