"""File names: which entries are ours to ignore, how to show any name safely, stable keys for sidecars."""

from __future__ import annotations

import errno
import hashlib
import os

TEMP_PREFIX = ".ingestd-"  # our own temp outputs and sidecars; never a user's file
STATE_DIR = ".ingestd"  # per-watch-dir state (lock, attempt counts), hidden
DONE_SUFFIX = ".done"  # done_marker: NAME.done vouches that NAME is complete
TEMP_OUTPUT_PREFIX = TEMP_PREFIX + "tmp-"  # a temp output or sidecar, before its rename publishes it
SUPERSEDED = ".superseded-"  # NAME.superseded-<unix time>[-N]: an earlier version kept aside (spool.set_aside)


def ignored(name: str) -> bool:
    """Dot-files (ours, rsync's and editors' temps) and common temp suffixes are never claimed. A relative path
    ("batch/a.txt", recursive mode) is judged by its last component; the walk never enters hidden folders."""
    base = name.rpartition("/")[2]
    return base.startswith(".") or base.endswith((".tmp", ".part", ".swp", "~", ".filepart", ".crdownload"))


def hidden_path(rel: str) -> bool:
    """True when any component of a relative path is hidden (".x"): such folders are never entered or removed."""
    return any(part.startswith(".") for part in rel.split("/"))


def display(name: str) -> str:
    """Printable text for logs and pages: undecodable bytes and control characters become escapes."""
    raw = os.fsencode(name)
    text = raw.decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text  # the usual name: one C-level check instead of one per character
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(c: str) -> str:
    o = ord(c)
    if o < 0x100:
        return f"\\x{o:02x}"
    return f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def key(name: str) -> str:
    """A fixed-length key for a name, so sidecar and temp names never exceed NAME_MAX (255 bytes)."""
    return hashlib.sha256(os.fsencode(name)).hexdigest()[:32]


def oserror(e: OSError) -> str:
    """An OSError as a reason people and tests can read: "No space left on device (ENOSPC)"."""
    return f"{e.strerror or e} ({errno.errorcode.get(e.errno or 0, 'error')})"
