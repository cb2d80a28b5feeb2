"""More than one machine (docs/distributed.md): a scanner claims files on the shared folder and enqueues them on
Dramatiq's Redis broker; worker nodes take the claim's lease, process in a child, publish, commit, ack.

The shared folder stays the queue of record; Redis carries claimed work, leases and attempt counts. Imported only
by `ingestd run --broker ...` and `ingestd worker` (the extra `ingestd[distributed]`).
"""

from __future__ import annotations

import os
import signal
import uuid

from ingestd import durable
from ingestd.spool import TEMP_OUTPUT_PREFIX, SpoolError

CLUSTER_ID = "cluster-id"  # .ingestd/cluster-id on the shared folder, and ingestd:<cluster>:cluster-id in Redis


class BrokerUnreachable(SpoolError):
    """Redis cannot be reached at start: exit 75 (EX_TEMPFAIL), so systemd's Restart= tries again."""

    temporary = True


class NotTheSharedFolder(SpoolError):
    """A node's watch_dir is not the folder the scanner serves (not mounted, another folder): exit 78."""


def identify(state_dir: str, client: object, key: str) -> str:
    """The scanner's side: the shared folder's cluster id (.ingestd/cluster-id, made once), also set in Redis with
    that file's inode number ("<id> <inode>"), so that nodes can check they see the same folder, numbered the
    same way (claim ids are built on inode numbers). Raises NotTheSharedFolder when Redis names another folder."""
    path = os.path.join(state_dir, CLUSTER_ID)
    try:
        ident = durable.read_small(path, 64).decode().strip()
    except FileNotFoundError:
        ident = ""
    if not ident:
        ident = uuid.uuid4().hex
        # Durable before Redis names it: a node must never be told of an id the folder could lose.
        durable.publish_bytes(state_dir, CLUSTER_ID, ident.encode(), TEMP_OUTPUT_PREFIX + CLUSTER_ID + f"-{os.getpid()}")
    value = f"{ident} {os.lstat(path).st_ino}"
    known = client.set(key, value, nx=True, get=True)  # type: ignore[attr-defined]
    if known is not None and known.decode().split()[0] != ident:
        raise NotTheSharedFolder(f"watch_dir: Redis already serves another shared folder (cluster id "
                                 f"{known.decode().split()[0]}, this folder's is {ident}): one Redis database per "
                                 "shared folder")
    if known is not None and known.decode() != value:
        raise NotTheSharedFolder(_NUMBERING.format(path=path))
    return ident


_NUMBERING = ("watch_dir: {path} has another inode number here than where the cluster first saw it: this mount "
              "numbers files by itself (sshfs without -o use_ino, some FUSE file systems), and claims are named "
              "by inode numbers: mount it so that inode numbers are the server's (NFS and CephFS do)")


def check_folder(state_dir: str, client: object, key: str) -> str | None:
    """A node's side, at start: its watch_dir must be the scanner's shared folder (mounted, the same one). A node on
    an unmounted mount point would otherwise find no file of any claim and ack them all as done elsewhere.
    Returns why to wait (no scanner yet, the folder not readable yet: a boot order), None when it is the one;
    raises NotTheSharedFolder when it is another folder."""
    known = client.get(key)  # type: ignore[attr-defined]
    if known is None:
        return "no scanner has served this Redis yet (`ingestd run --broker ...` on the shared folder)"
    path = os.path.join(state_dir, CLUSTER_ID)
    try:
        ident = durable.read_small(path, 64).decode().strip()
        ino = os.lstat(path).st_ino
    except OSError as e:
        return f"{path} cannot be read ({e.strerror}): is the shared folder mounted here?"
    want, _, want_ino = known.decode().partition(" ")
    if ident != want:
        raise NotTheSharedFolder(f"watch_dir: this folder's cluster id ({ident}) is not the scanner's "
                                 f"({want}): is the right shared folder mounted here?")
    if str(ino) != want_ino:
        raise NotTheSharedFolder(_NUMBERING.format(path=path))
    return None


def crash_point(step: str) -> None:
    """Test hook (tests/distributed): INGESTD_TEST_CRASH_AT=<step> kills this process with SIGKILL at that step of
    the protocol (claim-enqueue in the scanner; publish-commit, commit-ack on a node; child: a node's child on each file), as kill -9 would."""
    if os.environ.get("INGESTD_TEST_CRASH_AT") == step:
        os.kill(os.getpid(), signal.SIGKILL)
