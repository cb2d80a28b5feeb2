"""The only module that writes, renames, links, unlinks or fsyncs: crash-safe file primitives.

Keeping every durability step here gives one seam for the power-loss tests.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

from ingestd.names import display

_libc = ctypes.CDLL(None, use_errno=True)
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the dirty pages, do not wait


def fsync_dir(path: str) -> None:
    """fsync a directory so the names created, renamed or removed in it survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync(fd: int) -> None:
    os.fsync(fd)


def sync_files(paths: list[str]) -> None:
    """Make the data (and size) of several files durable, one fsync each, with the writeback of all started first
    (sync_file_range(2), SYNC_FILE_RANGE_WRITE): their blocks are allocated in one go, so the first fsync's
    journal commit carries them all and the rest find their data written and their metadata committed.

    The group commit's data sync for a batch of outputs. It used to be one syncfs(2), which writes back every dirty
    page of the file system: the producers' inputs too (deleted once processed, they need never reach the disk),
    and the parent's unlink of each input then waited for that writeback (py-spy: a third of its main loop's time
    on ext4, gone with this), and any other program's dirty data as well. Raises OSError."""
    fds: list[int] = []
    try:
        for path in paths:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            fds.append(fd)
            _libc.sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), _SYNC_FILE_RANGE_WRITE)  # a hint only
        for fd in fds:
            fsync(fd)  # the durability itself: per file, as POSIX asks
    finally:
        for fd in fds:
            os.close(fd)


def read_small(path: str, limit: int = 1 << 20) -> bytes:
    """Read back one of our own small state files (sidecar, counter, history) without trusting what stands at the
    path: never follows a symlink (ELOOP), never blocks on a FIFO (O_NONBLOCK), refuses anything but a regular
    file (EINVAL), reads at most `limit` bytes. Raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        chunks, left = [], limit
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 16))):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """os.write may write less than asked (RLIMIT_FSIZE, signals): loop until all is written."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def create_exclusive(path: str, mode: int = 0o644) -> int:
    """Open a new file for writing; O_EXCL so we never write through a symlink or into someone's file."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)


def rename(src: str, dst: str) -> None:
    """Atomic replace: readers see the old file or the new one, never a mix."""
    os.rename(src, dst)


def rename_noreplace(src: str, dst: str) -> None:
    """Atomic move that refuses to overwrite (EEXIST): a claim or a recovery must never clobber a file."""
    if _libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EINVAL, errno.ENOSYS):
        raise OSError(err, os.strerror(err), src, None, dst)
    # The filesystem lacks RENAME_NOREPLACE: link() also refuses to overwrite; a crash between
    # link and unlink leaves two names of one inode, which recovery treats as the claimed copy.
    os.link(src, dst, follow_symlinks=False)
    os.unlink(src)


def link(src: str, dst: str) -> None:
    """A second name for a file (never over an existing one, EEXIST); sinks keep an old result this way."""
    os.link(src, dst, follow_symlinks=False)


def tag(fd: int, attr: str, value: bytes) -> bool:
    """Set an extended attribute on an open file (sinks: which claim produced a result). It is inode metadata, made
    durable by the same fsync as the file's data. False where the file system keeps no such attribute
    (ENOTSUP: tmpfs before Linux 6.6, mounts without user_xattr; ENOSPC/E2BIG: no room); other errors raise."""
    try:
        os.setxattr(fd, attr, value)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSPC, errno.E2BIG, errno.EPERM):
            return False
        raise
    return True


def overwrite(fd: int, data: bytes, offset: int = 0) -> None:
    """Replace a fixed-length record of a marker file in place (pwrite), with no fsync: a hint that survives
    kill -9 (the page cache does) but not a power cut, which is all its readers count on."""
    os.pwrite(fd, data, offset)


def unlink(path: str) -> None:
    os.unlink(path)


def unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def publish_bytes(directory: str, name: str, data: bytes, temp: str, sync: bool = True) -> None:
    """Write a small file durably under a temp name, then rename it into place (name appears last). sync=False: a
    hint whose loss or tearing in a power cut its reader survives (emptied.py): atomic against a crash, no fsyncs."""
    tmp_path = os.path.join(directory, temp)
    unlink_quiet(tmp_path)
    fd = create_exclusive(tmp_path)
    try:
        write_all(fd, data)
        if sync:
            fsync(fd)  # data on disk before the name points at it
    except BaseException:
        os.close(fd)
        unlink_quiet(tmp_path)  # a disk full must not leave half a file behind
        raise
    os.close(fd)
    rename(tmp_path, os.path.join(directory, name))  # readers see the old file or the new one, never half of one
    if sync:
        fsync_dir(directory)  # make the rename itself durable


def makedirs(root: str, rel: str, shown: str | None = None) -> None:
    """Make root/rel's missing folders (rel: a relative path, "a/b"); each new folder is made durable in its parent.

    Raises NotADirectoryError when a component exists and is not a folder (a file named like the folder), and any
    other OSError from mkdir(2) or fsync(2). root must exist; shown: how the error names it (default: its last
    part, "processed")."""
    path, shown = root, os.path.basename(root) if shown is None else shown
    for part in rel.split("/"):
        parent, path, shown = path, os.path.join(path, part), os.path.join(shown, part)
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                # Named for a person: which entry blocks the folder (a bare "Not a directory" named none).
                raise NotADirectoryError(errno.ENOTDIR, f"{display(shown)} is a file where a folder is needed",
                                         path) from None
            continue
        fsync_dir(parent)  # the new folder's name durable before anything is renamed into it


def rmdir_quiet(path: str) -> bool:
    """Remove an empty folder; False when it is not empty, gone, or not ours to remove (no error raised)."""
    try:
        os.rmdir(path)
    except OSError:
        return False
    return True
