"""Which file each worker is on, for recovery: .ingestd/inflight, one 32-byte record per worker slot.

A worker writes the key of the file it starts (names.key) into its record, and blanks it after its batch, with a
pwrite and no fsync: the page cache survives a kill -9 of the whole daemon, which is what recovery needs to count
an attempt only for the files workers were really on, not for the rest of their batches. Whenever the records
cannot be trusted (the file is missing, a record is not a key or blank, a worker could not open it) recovery
counts every claimed file, the safe side: a poison file must never loop for ever.
"""

from __future__ import annotations

import os
import string

from ingestd import durable
from ingestd.names import TEMP_PREFIX

FILE = "inflight"
RECORD = 32  # bytes: a names.key is 32 hex characters
IDLE = b" " * RECORD
UNKNOWN = b"?" * RECORD  # this slot's worker could not keep its record: trust none


def prepare(state: str, slots: int) -> bool:
    """A fresh file of `slots` blank records (at start-up, after recovery has read the old one). False if it
    cannot be written (a full disk): then no worker can mark, and the next recovery counts every file."""
    try:
        durable.publish_bytes(state, FILE, IDLE * slots, TEMP_PREFIX + "tmp-" + FILE)
    except OSError:
        try:
            durable.unlink_quiet(os.path.join(state, FILE))  # stale records would name the wrong files: none at all
        except OSError:
            pass
        return False
    return True


def suspects(state: str) -> set[str] | None:
    """The keys of the files workers were on, or None when the records cannot be trusted (count every file)."""
    try:
        data = durable.read_small(os.path.join(state, FILE), 1 << 16)
    except OSError:
        return None
    if not data or len(data) % RECORD:
        return None
    keys = set()
    for i in range(0, len(data), RECORD):
        rec = data[i:i + RECORD]
        if rec == IDLE:
            continue
        text = rec.decode("ascii", "replace")
        if not all(c in string.hexdigits for c in text):
            return None
        keys.add(text)
    return keys


def set_record(state: str, slot: int, data: bytes) -> None:
    """The parent's write into a slot's record: IDLE once a worker's death is counted, UNKNOWN for a worker that
    could not keep its own. Best effort: an error leaves recovery on the safe side or one attempt too many."""
    try:
        fd = os.open(os.path.join(state, FILE), os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        durable.overwrite(fd, data, slot * RECORD)
    except OSError:
        pass
    finally:
        os.close(fd)


class Marker:
    """A worker's own record (it writes nothing else of ours)."""

    def __init__(self, state: str, slot: int) -> None:
        self.offset = slot * RECORD
        try:
            self.fd = os.open(os.path.join(state, FILE), os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            self.fd = -1

    @property
    def ok(self) -> bool:
        return self.fd >= 0

    def mark(self, data: bytes) -> None:
        if self.fd < 0:
            return
        try:
            durable.overwrite(self.fd, data, self.offset)
        except OSError:
            os.close(self.fd)
            self.fd = -1  # a known limit: after an EIO here this worker's record may be stale (docs/queue.md)
