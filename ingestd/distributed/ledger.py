"""The cluster's state in Redis: claim records, per-claim owner leases, attempt counts, node heartbeats.

Keys live under `ingestd:<cluster>:` (DISTRIBUTED.md §3). A lease is a key set with NX and a TTL and changed only by
its holder's token (compare-and-set in Lua, the pattern of redis.io's "Distributed Locks with Redis", single
instance). It saves work, it is no fence (Kleppmann 2016): every step that matters is also checked on the folder.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis

from ingestd.names import key

RECORD_TTL = 7 * 86400  # seconds a finished claim's record and an attempt count are kept
NODE_STALE = 3.0  # a node whose heartbeat is older than this many lease times is missing

_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_UNBIND = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
_UNBUMP = "local n = tonumber(redis.call('get', KEYS[1])) if n and n > 0 then return redis.call('decr', KEYS[1]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


def claim_id(name: str, st: os.stat_result) -> str:
    """C = key(name)[:16]-inode-mtime_ns, as the scanner sees the file: names a claim across nodes and Redis
    restarts (inode and mtime survive link and rename; st_dev differs per NFS client, so it is left out; the mtime
    tells apart a new file of the same name that got a reused inode number). Safe inside temp names.

    Only the scanner computes it, on its own mount. Nodes never do: some shared file systems number inodes per
    client (sshfs, CIFS with noserverino), so a node asks Redis which claim a name is bound to (bound())."""
    return f"{key(name)[:16]}-{st.st_ino}-{st.st_mtime_ns}"


class Ledger:
    """One Redis connection pool (thread-safe, redis-py) and the cluster's keys. Redis errors raise
    redis.RedisError (ConnectionError, TimeoutError...)."""

    def __init__(self, client: redis.Redis, lease_time: float, cluster: str = "default") -> None:
        self.r, self.lease_ms = client, max(1, int(lease_time * 1000))
        self.lease_time = lease_time
        self.prefix = f"ingestd:{cluster}:"
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._unbind = client.register_script(_UNBIND)
        self._unbump = client.register_script(_UNBUMP)

    def k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # --- owner leases ----------------------------------------------------------------------------------------
    def take(self, cid: str, token: str) -> bool:
        """The claim's lease for lease_time, if nobody holds it."""
        return bool(self.r.set(self.k("owner", cid), token, nx=True, px=self.lease_ms))

    def renew(self, cid: str, token: str) -> bool:
        """Extend our lease; False when it is no longer ours (expired, or taken by another node meanwhile)."""
        return bool(self._renew(keys=[self.k("owner", cid)], args=[token, self.lease_ms]))

    def release(self, cid: str, token: str) -> None:
        self._release(keys=[self.k("owner", cid)], args=[token])

    def owners(self, cids: list[str]) -> list[bytes | None]:
        """The token holding each claim's lease, or None (one round trip)."""
        return self.r.mget([self.k("owner", c) for c in cids]) if cids else []

    # --- claim records and attempts --------------------------------------------------------------------------
    def record(self, cid: str, name: str, ino: int, size: int, message: str) -> None:
        """The claim's record, and the name bound to it: underprocess/NAME is now this claim's file."""
        pipe = self.r.pipeline(transaction=True)
        pipe.set(self.k("name", key(name)), cid)
        # The name as bytes: a name that is not UTF-8 (surrogate escapes) cannot be a Redis str.
        pipe.hset(self.k("claim", cid), mapping={"name": os.fsencode(name), "ino": ino, "size": size,
                                                 "message": message, "at": time.time(), "state": "queued"})
        pipe.execute()

    def bound(self, names: list[str]) -> list[str | None]:
        """The claim each name in underprocess/ is bound to (record()), or None (Redis lost it: the re-drive binds
        it again). A claim is made only while no file of its name is in underprocess/ (a rename that refuses to
        overwrite), so the name's binding names the file there now."""
        found = self.r.mget([self.k("name", key(n)) for n in names]) if names else []
        return [v.decode() if v is not None else None for v in found]

    def records(self, cids: list[str]) -> list[dict[bytes, bytes]]:
        pipe = self.r.pipeline(transaction=False)
        for c in cids:
            pipe.hgetall(self.k("claim", c))
        return pipe.execute() if cids else []

    def requeued(self, cid: str, message: str) -> None:
        """The claim's work was sent again (a new Dramatiq message id): the re-drive checks that one."""
        self.r.hset(self.k("claim", cid), "message", message)

    def finish(self, cid: str, state: str, name: str | None = None) -> None:
        """done | failed | gone: kept RECORD_TTL for status and the re-drive, the attempt count dropped, and the
        name's binding (record()) dropped when it is still this claim's: one key per file name otherwise stayed for
        ever. (Another claim of that name keeps its own binding: compare-and-delete.)"""
        if name is not None:
            self._unbind(keys=[self.k("name", key(name))], args=[cid])
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(self.k("claim", cid), mapping={"state": state, "finished": time.time()})
        pipe.expire(self.k("claim", cid), RECORD_TTL)
        pipe.delete(self.k("attempts", cid))
        pipe.execute()

    def bump(self, cid: str) -> int:
        """Count one more delivery of this claim; returns the count (1 for the first)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.incr(self.k("attempts", cid))
        pipe.expire(self.k("attempts", cid), RECORD_TTL)
        return int(pipe.execute()[0])

    def unbump(self, cid: str) -> None:
        """A delivery that failed for the machine's reasons (full disk, a lost lease...) does not count toward poison.
        Only a count still there goes down: one dropped by finish() meanwhile is not made again (at -1, for ever)."""
        self._unbump(keys=[self.k("attempts", cid)])

    def next_seq(self) -> int:
        """The next failure sequence number, shared by every node (Spool.fail's order of failures)."""
        return int(self.r.incr(self.k("failure-seq")))

    # --- nodes -----------------------------------------------------------------------------------------------
    def beat(self, node: str, info: dict[str, Any]) -> None:
        self.r.hset(self.k("nodes"), node, json.dumps({**info, "at": time.time()}))

    def leave(self, node: str) -> None:
        self.r.hdel(self.k("nodes"), node)

    def nodes(self) -> list[dict[str, Any]]:
        """Every node that sent a heartbeat (missing ones too, marked), newest first."""
        now, out = time.time(), []
        for name, raw in self.r.hgetall(self.k("nodes")).items():
            try:
                info = json.loads(raw)
            except ValueError:
                continue
            age = now - float(info.get("at", 0))
            out.append({**info, "node": name.decode(errors="replace"), "heartbeat_age": round(age, 3),
                        # by the node's own lease time (in its heartbeat), whatever the reader's setting
                        "missing": age > NODE_STALE * float(info.get("lease_time") or self.lease_time)})
        return sorted(out, key=lambda n: n["node"])
