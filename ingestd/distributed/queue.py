"""Dramatiq on its Redis broker: the one queue and actor ingestd uses, and what the re-drive asks of it.

Dramatiq acks a message only after its actor returns and gives a dead node's unacked messages back after
heartbeat_timeout (DISTRIBUTED.md §1; dramatiq/brokers/redis/dispatch.lua). No middleware: no Retries (our attempt
count decides, in Redis), no TimeLimit (a large file may take hours; our own time_limit kills only the child), no
AgeLimit. An actor that raises anyway is dead-lettered, and the scanner's re-drive sends its claim again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

from ingestd.distributed import BrokerUnreachable
from ingestd.settings import ConfigError

QUEUE = "ingestd"
ACTOR = "ingestd_claim"
NAMESPACE = "dramatiq"
# Out of a million broker commands, how many also run queue maintenance (requeueing a dead node's messages). The
# default (1,000) would leave a dead node's work for many minutes on an idle cluster; each idle consumer sends about
# one fetch a second, so a quarter brings the work back within about lease_time plus a few seconds.
MAINTENANCE_CHANCE = 250_000


def connect(url: str, lease_time: float) -> tuple[redis.Redis, RedisBroker]:
    """A Redis client (thread-safe pool) and a Dramatiq broker on it, whose heartbeat timeout is lease_time.
    Raises BrokerUnreachable when Redis cannot be reached (the first command)."""
    client = redis.Redis.from_url(url, socket_timeout=max(5.0, lease_time), socket_connect_timeout=5.0,
                                  health_check_interval=30)
    broker = RedisBroker(client=client, namespace=NAMESPACE, middleware=[], heartbeat_timeout=int(lease_time * 1000),
                         maintenance_chance=MAINTENANCE_CHANCE)
    try:
        client.ping()
    except (redis.AuthenticationError, redis.ResponseError) as e:
        # Redis answered and said no (a wrong password, a bad database): restarting cannot help, exit 78.
        raise ConfigError(f"broker: {safe_url(url)} refused: {e}") from None
    except redis.RedisError as e:
        raise BrokerUnreachable(f"broker: cannot reach {safe_url(url)}: {e}") from None
    return client, broker


def safe_url(url: str) -> str:
    """The broker URL without its password, for logs and messages."""
    head, at, tail = url.rpartition("@")
    return (head.split("//", 1)[0] + "//***@" + tail) if at else url


def declare(broker: RedisBroker, fn: Callable[[str, str], Any]) -> dramatiq.Actor:
    """The actor (claim id, name); the scanner declares it with a stand-in function, only to send."""
    return dramatiq.actor(fn, actor_name=ACTOR, queue_name=QUEUE, broker=broker)


def send(actor: dramatiq.Actor, cid: str, name: str, delay_ms: int | None = None) -> str:
    """Enqueue a claim; returns the message's Redis id (each enqueue gets a new one: no deduplication)."""
    msg = actor.send_with_options(args=(cid, name), delay=delay_ms)
    return str(msg.options["redis_message_id"])


def alive(client: redis.Redis, message_ids: list[str]) -> list[bool]:
    """Is each message still queued, delayed or in a node's hands (not acked, not dead-lettered)?"""
    pipe = client.pipeline(transaction=False)
    for mid in message_ids:
        pipe.hexists(f"{NAMESPACE}:{QUEUE}.msgs", mid)
        pipe.hexists(f"{NAMESPACE}:{QUEUE}.DQ.msgs", mid)
    found = pipe.execute() if message_ids else []
    return [bool(found[i] or found[i + 1]) for i in range(0, len(found), 2)]


def carrying(client: redis.Redis, cids: set[str]) -> dict[str, str]:
    """Claim id -> the Redis id of a message queued, delayed or in a node's hands that carries it, for the claims in
    cids. A delayed message (Node.again) is moved to the work queue at its time under a new Redis id (a copy;
    dramatiq/worker.py, handle_delayed_messages), so the id a claim's record names can be dead while its work still
    waits. Reads every message (HSCAN): the re-drive asks only when some record's id is dead."""
    found: dict[str, str] = {}
    for h in (f"{NAMESPACE}:{QUEUE}.msgs", f"{NAMESPACE}:{QUEUE}.DQ.msgs"):
        for mid, raw in client.hscan_iter(h, count=1000):
            try:
                args = dramatiq.Message.decode(raw).args
            except Exception:  # noqa: BLE001, S112 - not ours to judge: a message we cannot read carries no claim
                continue
            if args and args[0] in cids:
                found[args[0]] = mid.decode() if isinstance(mid, bytes) else str(mid)
    return found


def depth(client: redis.Redis) -> int:
    """Messages queued, delayed or in nodes' hands."""
    return int(client.hlen(f"{NAMESPACE}:{QUEUE}.msgs")) + int(client.hlen(f"{NAMESPACE}:{QUEUE}.DQ.msgs"))
