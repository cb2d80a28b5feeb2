"""Which watcher unprocessed/ gets: inotify, or the polling watcher (ingestd/polling.py), and why.

inotify reports only changes made through this kernel: a file written by another NFS, CIFS/SMB, FUSE (sshfs), ceph
or 9p client raises no event here (inotify(7), "Limitations and caveats": "Inotify reports only events that a user-
space program triggers through the filesystem API. As a result, it does not catch remote events that occur on
network filesystems"). `auto` asks the kernel which file system the folder is on (statfs(2) f_type) and polls on
the network and FUSE ones, as GNU `tail -f` does for the same reason (coreutils src/tail.c, fremote()).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from typing import NamedTuple

from ingestd.polling import Poller
from ingestd.watch import Watch

WATCHES = ("auto", "inotify", "polling")
Watcher = Watch | Poller

# statfs(2) f_type values of file systems whose files other machines (or another kernel: a VM host, a FUSE daemon
# serving a remote store) may change. Values from include/uapi/linux/magic.h and the list GNU coreutils marks
# "remote" in src/stat.c (human_fstype), which its tail uses to choose polling; 9p added (coreutils calls it local,
# but virtio-9p and WSL shares are written by the host). overlayfs, which coreutils also polls, is left to inotify:
# a container's own writes through it are seen, and polling every container's watch dir would cost for nothing.
REMOTE: dict[int, str] = {
    0x6969: "nfs",
    0x6E667364: "nfsd",
    0x517B: "smb",
    0xFF534D42: "cifs",
    0xFE534D42: "smb2",
    0x65735546: "fuse",  # every FUSE file system (sshfs, s3fs, rclone, glusterfs' client, virtiofs)
    0x65735543: "fusectl",
    0x00C36400: "ceph",
    0x01021997: "9p",
    0x5346414F: "afs",
    0x6B414653: "kafs",
    0x73757245: "coda",
    0x564C: "ncp",
    0x7461636F: "ocfs2",
    0x01161970: "gfs2",
    0x47504653: "gpfs",
    0x0BD00BD0: "lustre",
    0x19830326: "beegfs",
    0x013111A8: "ibrix",
    0xAAD7AAEA: "panfs",
    0x61636673: "acfs",
    0x7C7C6673: "prl_fs",
    0xBEEFDEAD: "snfs",
    0xBACBACBC: "vmhgfs",
    0xA501FCF5: "vxfs",
}
LOCAL_NAMES: dict[int, str] = {0xEF53: "ext4", 0x01021994: "tmpfs", 0x9123683E: "btrfs", 0x58465342: "xfs",
                               0x858458F6: "ramfs", 0x794C7630: "overlayfs", 0x2FC12FC1: "zfs", 0xF2F52010: "f2fs"}


class Choice(NamedTuple):
    kind: str  # "inotify" | "polling"
    reason: str  # one line for the started event and /api/status


class _Statfs(ctypes.Structure):
    # struct statfs begins with f_type (__fsword_t: a long on every glibc Linux ABI but s390x, where it is an
    # unsigned int; statfs(2), "The __fsword_t type"). The rest is room, never read: 256 bytes covers every ABI.
    _fields_ = [("f_type", ctypes.c_uint if platform.machine() == "s390x" else ctypes.c_long),
                ("_rest", ctypes.c_byte * 256)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def fs_magic(path: str) -> int:
    """statfs(2) f_type of the file system holding `path` (e.g. 0xEF53 for ext4, 0x6969 for NFS). Raises OSError
    (ENOENT, EACCES...) as statfs does."""
    buf = _Statfs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(buf.f_type) & 0xFFFFFFFF  # magics are 32-bit; a 32-bit long shows CIFS's 0xFF534D42 as negative


def fs_name(magic: int) -> str:
    return REMOTE.get(magic) or LOCAL_NAMES.get(magic) or f"0x{magic:x}"


def kind_for(path: str) -> str:
    """"polling" when `path` is on a network or FUSE file system (REMOTE), else "inotify". Raises OSError when
    statfs fails (no such path...)."""
    return "polling" if fs_magic(path) in REMOTE else "inotify"


def choose(setting: str, path: str) -> Choice:
    """The watcher for `path` under the `watch` setting (auto | inotify | polling), with the reason. auto polls
    where kind_for says so; a statfs that fails falls back to inotify, saying why."""
    if setting == "polling":
        return Choice("polling", "watch = polling")
    if setting == "inotify":
        return Choice("inotify", "watch = inotify")
    try:
        magic = fs_magic(path)
    except OSError as e:
        return Choice("inotify", f"auto: statfs failed ({e.strerror}); inotify")
    fs = f"{fs_name(magic)} (statfs f_type 0x{magic:x})"
    if magic in REMOTE:
        return Choice("polling", f"auto: {fs} is a network or FUSE file system: other clients' writes raise no "
                                 "inotify event")
    return Choice("inotify", f"auto: {fs} is a local file system")


def open_watch(kind: str, folder: str, poll_interval: float) -> Watcher:
    """A started watcher on `folder`: Watch (raises WatchLimit, OSError) or Poller (raises OSError)."""
    return Poller(folder, poll_interval) if kind == "polling" else Watch(folder)
