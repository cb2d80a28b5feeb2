"""The emptied folders of unprocessed/ still pending removal, kept across a restart: .ingestd/emptied (recursive).

Each is kept by identity (inode.folder_id: inode number and birth time), never by name: at start-up a listed
subfolder whose identity is kept is the very folder a run before this one emptied, under whatever name it has now
(renamed while the daemon was down) and whether or not its results are still in processed/ (a consumer took
them). The start-up sweep then checks it after folder_quiet_time, like any emptied folder.

A hint, not a record: written at most once a second while it changes, and at shutdown, replaced by a rename
with no fsync. A lost or torn update only means a folder the daemon emptied stays in unprocessed/ (as one emptied
by hand does); it can never name a producer's folder, since no other folder is born with that inode number and
birth time. So it needs no durability, and a damaged file reads as nothing kept."""

from __future__ import annotations

import os
import struct

from ingestd import durable
from ingestd.names import TEMP_PREFIX

FILE = "emptied"
MAGIC = b"ingestd-emptied-1\n"  # a file of another shape (or version) reads as nothing kept
LIMIT = 64 << 20  # bytes read at most: 4 M folders of 16 bytes each

Ident = tuple[int, int]


def save(state: str, idents: list[Ident]) -> None:
    """Replace the kept identities (in `state`, the .ingestd/ folder). Raises OSError."""
    n = len(idents)
    data = MAGIC + struct.pack(f"<Q{n}Q{n}q", n, *(i for i, _ in idents), *(b for _, b in idents))
    durable.publish_bytes(state, FILE, data, TEMP_PREFIX + "tmp-" + FILE, sync=False)  # a hint: no fsync (above)


def load(state: str) -> set[Ident]:
    """The kept identities; an empty set if none, or unreadable, or damaged (torn by a power cut: no fsync)."""
    try:
        data = durable.read_small(os.path.join(state, FILE), LIMIT)
    except OSError:
        return set()
    body = data[len(MAGIC):]
    if not data.startswith(MAGIC) or len(body) < 8:
        return set()
    (n,) = struct.unpack_from("<Q", body)
    if len(body) != 8 + 16 * n:
        return set()
    values = struct.unpack_from(f"<{n}Q{n}q", body, 8)
    return set(zip(values[:n], values[n:], strict=True))
