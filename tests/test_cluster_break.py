"""Attempts to lose, double or wedge work in the distributed mode on one machine (issue 11's "a fresh reviewer asked
to lose or double a file could not"), against a real redis-server and real scanner and node processes. Each test
here failed before the fix named in it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from support import RedisServer
from test_cluster import LEASE, Cluster, expected, folder, wait
from test_cluster import cluster, scanner  # noqa: F401 - fixtures

from ingestd.names import key


@pytest.mark.parametrize("attempts", [1, 2])
def test_a_file_whose_node_died_after_publishing_is_never_both_a_result_and_failed(
        cluster: Cluster, attempts: int) -> None:  # noqa: F811
    """A node publishes, then dies before its commit on the last attempt max_attempts allows: the redo finds it
    poison. It was set aside in failed/ while its result stayed in processed/ (a result and a failed/ entry for
    one file). Fixed: a claim that ends in failed/ first drops the results it published (those carrying its claim).
    attempts=2: the wider kind, an earlier attempt lost to a dead child, the last one to a dead node."""
    cluster.start("run", "scanner")
    env = {"INGESTD_MAX_ATTEMPTS": str(attempts)}
    if attempts == 2:
        cluster.start("worker", "n0", INGESTD_TEST_CRASH_AT="child", **env)
        cluster.drop("a.txt", b"hello\n")
        wait(lambda: len(cluster.events("child_lost")) >= 1, what="a first attempt lost to a dead child")
        cluster.stop("n0")
    cluster.start("worker", "n1", INGESTD_TEST_CRASH_AT="publish-commit", **env)
    if attempts == 1:
        cluster.drop("a.txt", b"hello\n")
    wait(lambda: cluster.procs["n1"].poll() is not None, what="the node's crash between publish and commit")
    cluster.procs.pop("n1")
    assert folder(cluster, "processed") == ["a.txt"]  # published, not committed
    cluster.start("worker", "n2", **env)
    wait(lambda: folder(cluster, "underprocess") == [], what="the claim finished after the crash")
    time.sleep(LEASE + 1)  # a late redelivery would show now
    assert folder(cluster, "failed") == sorted(["a.txt", f".ingestd-reason-{key('a.txt')}.json"])
    assert folder(cluster, "processed") == []  # never both


def test_a_message_delivered_before_its_claim_is_recorded_is_still_processed(
        scanner, cluster: Cluster) -> None:  # noqa: ANN001, F811
    """The scanner sent a claim's message, then recorded the name's binding: a node that took the message in
    between (the scanner paused there: SIGSTOP, a GC pause, a slow Redis) found no binding, acked the claim as
    done elsewhere, and the file waited in underprocess/ for the next rescan (30 s by default), or for ever with
    the re-drive broken. Fixed: the record is made before the message is sent."""
    s = scanner()
    s._lead()
    assert s.active
    cluster.start("worker", "n1")
    wait(lambda: cluster.events("node_started") != [], what="the node taking work")
    real = s.ledger.record

    def paused(*args, **kw) -> None:  # noqa: ANN002, ANN003
        time.sleep(2.0)  # the scanner paused between its two Redis steps
        real(*args, **kw)

    s.ledger.record = paused
    cluster.drop("a.txt", b"hello\n")
    deadline = time.monotonic() + 5
    while not s.poll() and time.monotonic() < deadline:
        time.sleep(0.1)
    s.ledger.record = real
    wait(lambda: folder(cluster, "processed") == ["a.txt"], timeout=10, what="the claim processed (no rescan here)")
    assert folder(cluster, "underprocess") == []


def test_redis_keeps_no_key_per_file_for_ever(cluster: Cluster, redis_server: RedisServer, tmp_path: Path) -> None:
    """Every claim bound its name in Redis (ingestd:<cluster>:name:<key>) and nothing removed it: one key per
    distinct file name for ever (names with a timestamp: unbounded growth, noeviction makes it a full Redis).
    Fixed: finishing a claim drops its name's binding when it is still the claim's. What stays without a TTL is a
    fixed set, whatever the number of files."""
    import redis

    cluster.start("run", "scanner")
    cluster.start("worker", "n1")
    files = {f"f{i:03d}.txt": f"{i}\n".encode() for i in range(40)}
    for name, data in files.items():
        cluster.drop(name, data)
    cluster.drop("bad.bin", b"\x00binary")
    wait(lambda: len(folder(cluster, "processed")) == len(files) and "bad.bin" in folder(cluster, "failed")
         and not folder(cluster, "underprocess"), what="every file finished")
    for name, data in files.items():
        assert (cluster.watch / "processed" / name).read_bytes() == expected(data, tmp_path)
    r = redis.Redis.from_url(redis_server.url)
    forever = sorted(k.decode() for k in r.scan_iter("ingestd:*") if r.ttl(k) == -1)
    assert set(forever) <= {"ingestd:default:cluster-id", "ingestd:default:failure-seq", "ingestd:default:nodes"}, \
        forever
