"""Attempts to lose, double or wedge work in the distributed mode on one machine (issue 11's "a fresh reviewer asked
to lose or double a file could not"), against a real redis-server and real scanner and node processes. Each test
here failed before the fix named in it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from support import RedisServer
from test_cluster import LEASE, Cluster, cluster, expected, folder, scanner, wait  # noqa: F401 - fixtures

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
        scanner, cluster: Cluster) -> None:  # noqa: F811
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

    def paused(*args, **kw) -> None:
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


def test_redis_keeps_no_key_per_file_for_ever(cluster: Cluster, redis_server: RedisServer,  # noqa: F811
                                              tmp_path: Path) -> None:
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


def test_nodes_and_the_scanner_killed_again_and_again_lose_double_and_corrupt_nothing(
        cluster: Cluster, tmp_path: Path) -> None:  # noqa: F811
    """Many files (600 x INGESTD_TORTURE_SCALE), three nodes, one of them kill -9'd and started again every second,
    the scanner once; then every file has exactly one result, byte-identical to `ingestd process`, nothing is left
    in underprocess/, and no temp of any claim stays behind."""
    import os
    import random
    import signal

    scale = float(os.environ.get("INGESTD_TORTURE_SCALE", "1"))
    cluster.start("run", "scanner")
    nodes = ["n1", "n2", "n3"]
    for n in nodes:
        cluster.start("worker", n, INGESTD_MAX_ATTEMPTS="1000")  # kills are the machine's fault here
    files = {f"t{i:05d}.txt": (f"row {i} ünï\n" * (1 + i % 50)).encode() for i in range(int(600 * scale))}
    rng = random.Random(11)
    items = list(files.items())
    for j, (name, data) in enumerate(items):
        cluster.drop(name, data)
        if j % 100 == 99:
            victim = rng.choice(nodes)
            cluster.stop(victim, signal.SIGKILL)
            cluster.start("worker", victim, INGESTD_MAX_ATTEMPTS="1000")
        if j == len(items) // 2:
            cluster.stop("scanner", signal.SIGKILL)
            cluster.start("run", "scanner")
    for _ in range(4):
        time.sleep(1.0)
        victim = rng.choice(nodes)
        cluster.stop(victim, signal.SIGKILL)
        cluster.start("worker", victim, INGESTD_MAX_ATTEMPTS="1000")
    wait(lambda: len(folder(cluster, "processed")) >= len(files) and not folder(cluster, "underprocess")
         and not folder(cluster, "unprocessed"), timeout=120, what="every file finished")
    time.sleep(LEASE * 2 + 2.5)  # a late redelivery, or the scanner's temp clean-up (rescan 2 s), shows now
    assert folder(cluster, "failed") == []
    assert folder(cluster, "processed") == sorted(files)  # no .superseded- copy, no temp left
    want = {}
    for name, data in files.items():
        if data not in want:
            want[data] = expected(data, tmp_path)
        assert (cluster.watch / "processed" / name).read_bytes() == want[data], name


@pytest.mark.parametrize("file_exist", ["keep", "replace", "fail"])
def test_the_same_name_arriving_again_and_again_gets_one_result_per_arrival(
        cluster: Cluster, tmp_path: Path, file_exist: str) -> None:  # noqa: F811
    """One name, five versions, each dropped as soon as the one before was claimed (so some are redone on a node
    killed between publish and commit, and others queue behind one in flight): file_exist decides, and no
    version is lost, doubled or given another's bytes."""
    import signal

    cluster.start("run", "scanner", INGESTD_FILE_EXIST=file_exist)
    cluster.start("worker", "n1", INGESTD_FILE_EXIST=file_exist, INGESTD_TEST_CRASH_AT="publish-commit")
    cluster.start("worker", "n2", INGESTD_FILE_EXIST=file_exist)
    versions = [f"version {v}\n".encode() * (v + 1) for v in range(5)]
    for data in versions:
        wait(lambda: not (cluster.watch / "unprocessed" / "same.txt").exists(), what="the version before claimed")
        cluster.drop("same.txt", data)
        if cluster.procs["n1"].poll() is not None:
            cluster.procs.pop("n1")
            cluster.start("worker", "n1", INGESTD_FILE_EXIST=file_exist)
    wait(lambda: len(cluster.events("processed")) + len(cluster.events("failed")) >= len(versions)
         and not folder(cluster, "underprocess") and not folder(cluster, "unprocessed"), what="every version done")
    time.sleep(LEASE + 1)
    cluster.stop("n2", signal.SIGTERM)
    processed = {n: (cluster.watch / "processed" / n).read_bytes() for n in folder(cluster, "processed")}
    failed = {n: (cluster.watch / "failed" / n).read_bytes() for n in folder(cluster, "failed")
              if not n.startswith(".")}
    want = [expected(d, tmp_path) for d in versions]
    if file_exist == "keep":
        assert sorted(processed.values()) == sorted(want) and failed == {}
        assert processed["same.txt"] == want[-1]
    elif file_exist == "replace":
        assert processed == {"same.txt": want[-1]} and failed == {}
    else:
        assert processed == {"same.txt": want[0]}
        assert sorted(failed.values()) == sorted(versions[1:])


def test_a_fifo_a_symlink_and_a_folder_in_unprocessed_neither_wedge_nor_vanish(cluster: Cluster) -> None:  # noqa: F811
    """A FIFO would block a reader for ever, a symlink must never be followed: both end in failed/ with a reason;
    a folder is left where it is; a good file behind them is processed."""
    import os

    cluster.start("run", "scanner")
    cluster.start("worker", "n1", INGESTD_TIME_LIMIT="0")
    up = cluster.watch / "unprocessed"
    os.mkfifo(up / "pipe")
    (tmp_outside := cluster.root / "secret").write_bytes(b"secret\n")
    os.symlink(tmp_outside, up / "link.txt")
    (up / "dir").mkdir()
    cluster.drop("good.txt", b"ok\n")
    # Their `failed` events too: each is logged after its move into failed/, so the log may lag the folder.
    wait(lambda: folder(cluster, "processed") == ["good.txt"] and {"pipe", "link.txt"} <= set(folder(cluster, "failed"))
         and not folder(cluster, "underprocess") and len(cluster.events("failed")) >= 2, timeout=30,
         what="the FIFO and the symlink failed and logged, the file done")
    reasons = [e["reason"] for e in cluster.events("failed")]
    assert any("symlink" in r for r in reasons) and any("fifo" in r.lower() or "pipe" in r.lower() for r in reasons), \
        reasons
    assert (up / "dir").is_dir() and tmp_outside.read_bytes() == b"secret\n"


def test_a_claim_sent_again_with_a_delay_is_not_sent_a_third_time_by_the_redrive(scanner) -> None:  # noqa: F811
    """A node sends a claim again with a delay (its child died, the disk was full, another node held it). Dramatiq
    parks it in the delay queue, and at its time moves it to the work queue under a new Redis id (a copy; the
    parked one is acked). The record named the parked id: each re-drive then found it dead and sent the claim once
    more, while it waited its turn, so a claim retried for a full disk gained one more circulating message at every
    rescan for as long as the outage lasted. Here a real Dramatiq worker (one thread, kept busy) moves the message."""
    import threading

    import dramatiq

    from ingestd.distributed import queue
    from ingestd.distributed.ledger import claim_id

    s = scanner()
    s.active = True
    up = Path(s.spool.underprocess)
    (up / "a.txt").write_bytes(b"x\n")
    cid = claim_id("a.txt", (up / "a.txt").stat())
    assert s._redrive() == 1
    _, broker = queue.connect(s.s.broker, s.s.lease_time)
    busy, release, seen = threading.Event(), threading.Event(), []

    def node(c: str, name: str) -> None:  # a busy node: its one thread holds the first message it gets
        seen.append(c)
        busy.set()
        release.wait(30)

    queue.declare(broker, node)
    worker = dramatiq.Worker(broker, queues={queue.QUEUE}, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        busy.wait(10)
        assert seen == [cid]
        # What Node.again does for a lost child: the claim sent again, half a second later, and recorded.
        s.ledger.requeued(cid, queue.send(s.actor, cid, "a.txt", 500))
        wait(lambda: s.client.hlen(f"{queue.NAMESPACE}:{queue.QUEUE}.DQ.msgs") == 0, timeout=10,
             what="the delayed message moved to the work queue")
        assert seen == [cid]  # the moved message waits for the busy thread (prefetched: in the node's hands)
        assert s._redrive() == 0  # it still carries the claim: nothing to send
    finally:
        release.set()
        worker.stop()
        broker.close()


def test_a_redis_stall_past_the_lease_does_not_count_toward_poison(cluster: Cluster,  # noqa: F811
                                                                  redis_server: RedisServer, tmp_path: Path) -> None:
    """Redis stalls (SIGSTOP: a fork for a snapshot on a big dataset, a swapping host) longer than lease_time
    while a node works on a file (here its child is held too, as a slow disk would): the node's lease runs out and
    its child is killed. That is the machine's fault, as a full disk is: it must not count toward max_attempts, or
    a good file ends in failed/ as poison after max_attempts stalls (here one)."""
    import os
    import signal

    cluster.start("run", "scanner")
    cluster.start("worker", "n1", INGESTD_MAX_ATTEMPTS="1")
    data = b"some line of text\n" * 200_000
    cluster.drop("a.txt", data)
    node = cluster.procs["n1"]

    def child() -> int | None:
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read()
                except OSError:
                    continue
                if ppid == node.pid and b"multiprocessing" in cmd and b"resource_tracker" not in cmd:
                    return int(pid)
        return None

    wait(lambda: (cluster.watch / "underprocess" / "a.txt").exists() and child() is not None, what="the child")
    kid = child()
    assert kid is not None
    os.kill(kid, signal.SIGSTOP)  # its file in hand, as on a slow disk
    assert redis_server.proc is not None
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    time.sleep(LEASE * 4)  # past lease_time and the node's Redis socket timeout (5 s): its lease is lost
    os.kill(redis_server.proc.pid, signal.SIGCONT)
    wait(lambda: cluster.events("child_lost") != [], timeout=30, what="the child killed for the lost lease")
    wait(lambda: not folder(cluster, "underprocess"), timeout=30, what="the file finished")
    assert folder(cluster, "failed") == []
    assert folder(cluster, "processed") == ["a.txt"]
    assert (cluster.watch / "processed" / "a.txt").read_bytes() == expected(data, tmp_path)
