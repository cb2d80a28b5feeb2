"""Which file or folder a path is, across inode reuse: statx(2)'s birth time beside the inode number.

The kernel gives a freed inode number to the next file or folder made (ext4 to the very next mkdir), so the
number alone cannot tell a new file from the one gone before it; two never hold one number at once, and their
birth times differ. statx(2) is read through ctypes: os.stat has no birth time on Linux before Python 3.15's
os.statx."""

from __future__ import annotations

import ctypes
import os
import stat
from typing import NamedTuple

_statx = getattr(ctypes.CDLL(None, use_errno=True), "statx", None)  # glibc >= 2.28

AT_FDCWD, AT_SYMLINK_NOFOLLOW = -100, 0x100
STATX_TYPE, STATX_MTIME, STATX_INO, STATX_BTIME = 0x1, 0x40, 0x100, 0x800  # <linux/stat.h>


class Born(NamedTuple):
    mode: int  # st_mode's file type bits
    ino: int
    btime_ns: int  # birth time, nanoseconds since the epoch
    mtime_ns: int


def born(path: str) -> Born | None:
    """statx(2) of `path`, not followed if a symlink. None where statx is missing, fails (ENOENT...), or the file
    system keeps no birth time (NFS, older kernels' tmpfs): the caller then has no identity it can trust."""
    if _statx is None:
        return None
    buf = ctypes.create_string_buffer(256)  # struct statx
    want = STATX_TYPE | STATX_MTIME | STATX_INO | STATX_BTIME
    if _statx(AT_FDCWD, os.fsencode(path), AT_SYMLINK_NOFOLLOW, want, buf) != 0:
        return None
    raw = buf.raw  # offsets of stx_mask, stx_mode, stx_ino, stx_btime and stx_mtime in struct statx
    if int.from_bytes(raw[0:4], "little") & want != want:
        return None
    return Born(stat.S_IFMT(int.from_bytes(raw[28:30], "little")), int.from_bytes(raw[32:40], "little"),
                _ns(raw, 80), _ns(raw, 112))


def _ns(raw: bytes, at: int) -> int:
    """A struct statx_timestamp (s64 seconds, u32 nanoseconds) in nanoseconds."""
    return (int.from_bytes(raw[at:at + 8], "little", signed=True) * 1_000_000_000
            + int.from_bytes(raw[at + 8:at + 12], "little"))


def folder_id(path: str) -> tuple[int, int] | None:
    """(inode number, birth time ns) of the folder at `path` (never followed): the same folder after any rename
    within its file system, another one after the number was reused. None for anything else, or no birth time."""
    b = born(path)
    return (b.ino, b.btime_ns) if b is not None and b.mode == stat.S_IFDIR else None
