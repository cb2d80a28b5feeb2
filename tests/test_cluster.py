"""The distributed mode's parts on one machine, against a real redis-server: leases, claims settled by inode,
the re-drive, temp clean-up, the scanner lock, and a scanner with two worker nodes end to end (hostile names,
binary input, a poison file). The multi-node rig (sshfs clients, partitions) is tests/distributed/."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import NEUTRAL_CWD, RedisServer

from ingestd.names import key
from ingestd.sinks import Sinks

LEASE = 2.0


def wait(cond: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def settings(watch: Path, url: str, **extra: object):  # noqa: ANN201 - Settings
    from ingestd.settings import load

    return load({"watch_dir": str(watch), "broker": url, "lease_time": LEASE, "settle_time": 0.2,
                 "listen": "127.0.0.1:0", **extra}, environ={}, cwd=watch.parent)


@pytest.fixture
def scanner(tmp_path: Path, redis_server: RedisServer) -> Iterator:  # noqa: ANN201
    from ingestd.distributed.scanner import Scanner

    made = []

    def make() -> Scanner:
        s = Scanner(settings(tmp_path / "w", redis_server.url))
        s.spool.ensure()
        made.append(s)
        return s

    yield make
    for s in made:
        s.client.close()


def test_temp_names_carry_the_claim_not_the_pid(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    sinks = Sinks(str(tmp_path / "p"), "a.txt", [""], tag="cabc-12.3")
    sinks.write("", b"x\n")
    sinks.seal(sync=True)
    (temp,) = [p.name for p in (tmp_path / "p").iterdir()]
    assert temp == f".ingestd-tmp-cabc-12.3-{key('a.txt')}"
    assert str(os.getpid()) not in temp
    sinks.abort()


def test_a_lease_is_changed_only_by_its_holder_and_runs_out(redis_server: RedisServer) -> None:
    import redis

    from ingestd.distributed.ledger import Ledger

    ledger = Ledger(redis.Redis.from_url(redis_server.url), lease_time=1.0)
    assert ledger.take("c1", "me")
    assert not ledger.take("c1", "you")
    assert not ledger.renew("c1", "you")
    ledger.release("c1", "you")  # not the holder: nothing happens
    assert ledger.owners(["c1"]) == [b"me"]
    assert ledger.renew("c1", "me")
    time.sleep(1.3)
    assert ledger.owners(["c1"]) == [None]  # ran out: a dead node's claim is free again
    assert ledger.take("c1", "you")
    assert ledger.bump("c1") == 1 and ledger.bump("c1") == 2
    ledger.finish("c1", "done")
    assert ledger.bump("c1") == 1  # finishing drops the count


@pytest.mark.parametrize("lie", ["moved_then_enoent", "linked_then_eexist"])
def test_a_claim_that_took_effect_though_it_reported_an_error_is_settled_by_inode(
        scanner, monkeypatch: pytest.MonkeyPatch, lie: str) -> None:
    """An NFS client's retried RENAME/LINK can fail although the first request took effect (DISTRIBUTED.md §2):
    the claim must still be recognised (stat and inode), or the file would wait in underprocess/ unsent."""
    from ingestd import durable

    s = scanner()
    src = Path(s.spool.unprocessed) / "a.txt"
    src.write_bytes(b"x\n")
    ino = src.stat().st_ino

    def lying(a: str, b: str) -> None:
        if lie == "moved_then_enoent":
            os.rename(a, b)
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", a)
        os.link(a, b)  # link made, its unlink lost with the reply
        raise FileExistsError(errno.EEXIST, "File exists", b)

    monkeypatch.setattr(durable, "rename_noreplace", lying)
    assert s._claim("a.txt", ino)
    assert not src.exists()  # a ghost name of the claimed inode is dropped
    assert (Path(s.spool.underprocess) / "a.txt").stat().st_ino == ino


def test_a_claim_lost_to_another_file_of_that_name_is_not_taken(scanner) -> None:
    s = scanner()
    (Path(s.spool.underprocess) / "a.txt").write_bytes(b"in flight\n")
    src = Path(s.spool.unprocessed) / "a.txt"
    src.write_bytes(b"new\n")
    assert not s._claim("a.txt", src.stat().st_ino)
    assert src.read_bytes() == b"new\n"


def test_the_redrive_sends_again_only_what_has_no_live_lease_or_message(scanner) -> None:
    from ingestd.distributed import queue
    from ingestd.distributed.ledger import claim_id

    s = scanner()
    s.active = True
    up = Path(s.spool.underprocess)
    for n in ("lost.txt", "leased.txt"):
        (up / n).write_bytes(b"x\n")
    leased = claim_id("leased.txt", (up / "leased.txt").stat())
    assert s.ledger.take(leased, "a-node")
    assert s._redrive() == 1  # lost.txt: no record (a crash between claim and enqueue, a Redis restart)
    assert s._redrive() == 0  # its message is queued now
    lost = claim_id("lost.txt", (up / "lost.txt").stat())
    s.client.delete(f"{queue.NAMESPACE}:{queue.QUEUE}.msgs")  # the message lost (Redis without AOF, dead-lettered)
    assert s._redrive() == 1
    assert s.ledger.records([lost])[0][b"state"] == b"queued"


def test_only_temps_of_claims_nobody_holds_are_dropped(scanner) -> None:
    s = scanner()
    p = Path(s.spool.processed)
    held, free = "aaaa-1", "bbbb-2"
    assert s.ledger.take(held, "a-node")
    old = time.time() - 10 * LEASE
    names = {f".ingestd-tmp-c{held}.1-k": old, f".ingestd-tmp-c{free}.1-k": old,
             f".ingestd-tmp-c{free}.2-k": time.time()}  # fresh: its writer may not have its lease renewed yet
    for n, t in names.items():
        (p / n).write_bytes(b"x")
        os.utime(p / n, (t, t))
    (p / ".ingestd-tmp-4242-k").write_bytes(b"x")  # a single-machine daemon's temp: not ours to judge
    s._drop_temps()
    assert sorted(x.name for x in p.iterdir()) == sorted(
        [f".ingestd-tmp-c{held}.1-k", f".ingestd-tmp-c{free}.2-k", ".ingestd-tmp-4242-k"])


def test_one_scanner_is_active_the_other_waits_and_takes_over(scanner) -> None:
    a, b = scanner(), scanner()
    a._lead()
    b._lead()
    assert a.active and not b.active
    a.lock.release()
    b._lead()
    assert b.active
    a._lead()  # its renewal fails: it stops claiming at once
    assert not a.active


# --- end to end: a scanner and two nodes, each its own process ------------------------------------------------
class Cluster:
    def __init__(self, root: Path, url: str) -> None:
        self.root, self.url, self.procs = root, url, {}
        self.logs: list = []
        self.watch = root / "w"
        self.env = {**os.environ, "INGESTD_LEASE_TIME": str(LEASE), "INGESTD_SETTLE_TIME": "0.2",
                    "INGESTD_LOG_FORMAT": "json", "INGESTD_RESCAN_INTERVAL": "2", "INGESTD_MAX_ATTEMPTS": "2"}

    def start(self, role: str, name: str, *args: str, **env: str) -> None:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - closed at close()
        self.logs.append(log)
        cmd = [sys.executable, "-m", "ingestd", role, "--broker", self.url, "--watch-dir", str(self.watch),
               "--listen", "127.0.0.1:0", *args]
        if role == "worker":
            cmd += ["--node", name, "--processes", "2"]
        self.procs[name] = subprocess.Popen(cmd, env={**self.env, **env}, stdout=log, stderr=log,
                                            start_new_session=True, cwd=NEUTRAL_CWD)

    def stop(self, name: str, sig: int = signal.SIGKILL) -> None:
        p = self.procs.pop(name)
        os.killpg(p.pid, sig)
        p.wait(30)

    def events(self, kind: str) -> list[dict]:
        out = []
        for log in self.root.glob("*.log"):
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith("{") and f'"event": "{kind}"' in line:
                    out.append(json.loads(line))
        return out

    def drop(self, name: str, data: bytes) -> None:
        tmp = self.watch / ("." + name.replace("/", "_") + ".part")
        tmp.write_bytes(data)
        os.rename(tmp, os.fsencode(self.watch / "unprocessed") + b"/" + os.fsencode(name))

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name)
        for log in self.logs:
            log.close()


@pytest.fixture
def cluster(tmp_path: Path, redis_server: RedisServer) -> Iterator[Cluster]:
    c = Cluster(tmp_path, redis_server.url)
    (c.watch / "unprocessed").mkdir(parents=True)
    yield c
    c.close()


def expected(data: bytes, tmp_path: Path) -> bytes:
    """What `ingestd process --mode uppercase` makes of data (its own entry point, in this process)."""
    from ingestd.cli import main

    src, out = tmp_path / "expected.in", tmp_path / "expected.out"
    src.write_bytes(data)
    assert main(["process", "--input", str(src), "--output", str(out), "--mode", "uppercase"]) == 0
    return out.read_bytes()


def folder(c: Cluster, name: str) -> list[str]:
    return sorted(os.listdir(c.watch / name)) if (c.watch / name).exists() else []


def test_a_scanner_and_two_nodes_finish_every_file_once_hostile_names_included(cluster: Cluster,
                                                                                tmp_path: Path) -> None:
    cluster.start("run", "scanner")
    cluster.start("worker", "n1")
    cluster.start("worker", "n2")
    wait(lambda: len(cluster.events("node_started")) == 2, what="both nodes working")  # or one may take it all
    files = {f"f{i:03d}.txt": f"line {i}\r\nzwei ß {i}\n".encode() for i in range(120)}
    hostile = {"new\nline.txt": b"a\n", "-dash.txt": b"b\n", "sp ace.txt": b"c\n", "\udcff-latin1.txt": b"d\n",
               "\ufeffbom.txt": b"\xef\xbb\xbfbom\n"}
    files.update(hostile)
    for name, data in files.items():
        cluster.drop(name, data)
    cluster.drop("blob.bin", b"\x00\x01\x02binary")
    wait(lambda: len(folder(cluster, "processed")) == len(files) and folder(cluster, "failed") == sorted(
        ["blob.bin", f".ingestd-reason-{key('blob.bin')}.json"]) and not folder(cluster, "underprocess")
        and len(cluster.events("processed")) >= len(files),  # each logged after its commit: the log lags the folders
        what="every file processed (and logged) or failed")
    for name, data in files.items():
        assert (cluster.watch / "processed" / name).read_bytes() == expected(data, tmp_path), name
    done = [e["file"] for e in cluster.events("processed")]
    assert len(done) == len(files) == len(set(done))  # each committed once, across both nodes
    assert {e["node"] for e in cluster.events("processed")} == {"n1", "n2"}
    assert folder(cluster, "unprocessed") == []
    assert not [n for n in folder(cluster, "processed") if n.startswith(".") or ".superseded-" in n]
    reason = json.loads((cluster.watch / "failed" / f".ingestd-reason-{key('blob.bin')}.json").read_text())
    assert "binary" in reason["reason"]


def test_a_file_that_kills_its_child_every_time_ends_in_failed_and_the_node_lives(cluster: Cluster) -> None:
    cluster.start("run", "scanner")
    cluster.start("worker", "n1", INGESTD_TEST_CRASH_AT="child")
    cluster.drop("poison.txt", b"boom\n")
    wait(lambda: "poison.txt" in folder(cluster, "failed"), what="the poison file in failed/")
    reason = json.loads((cluster.watch / "failed" / f".ingestd-reason-{key('poison.txt')}.json").read_text())
    assert reason["reason"].startswith("poison: delivered 2 times")
    assert len(cluster.events("child_lost")) == 2
    assert cluster.procs["n1"].poll() is None  # the node lives on
    assert folder(cluster, "underprocess") == [] and folder(cluster, "processed") == []


@pytest.mark.parametrize("step", ["publish-commit", "commit-ack"])
def test_a_node_killed_between_publish_and_commit_or_before_the_ack_leaves_one_result(
        cluster: Cluster, tmp_path: Path, step: str) -> None:
    cluster.start("run", "scanner")
    cluster.start("worker", "n1", INGESTD_TEST_CRASH_AT=step)
    cluster.drop("a.txt", b"hello\n")
    wait(lambda: cluster.procs["n1"].poll() is not None, what="the node's crash at " + step)
    cluster.procs.pop("n1")
    cluster.start("worker", "n2")
    wait(lambda: folder(cluster, "underprocess") == [] and len(cluster.events("processed")) + (
        step == "commit-ack") >= 1, what="the claim finished after the crash")
    time.sleep(LEASE + 1)  # a late redelivery would show now
    assert folder(cluster, "processed") == ["a.txt"]  # one result, no .superseded- copy
    assert (cluster.watch / "processed" / "a.txt").read_bytes() == expected(b"hello\n", tmp_path)
    assert folder(cluster, "failed") == [] and folder(cluster, "unprocessed") == []


def test_a_scanner_killed_between_claim_and_enqueue_is_redriven(cluster: Cluster) -> None:
    cluster.start("run", "scanner", INGESTD_TEST_CRASH_AT="claim-enqueue")
    cluster.start("worker", "n1")
    cluster.drop("a.txt", b"hello\n")
    wait(lambda: cluster.procs["scanner"].poll() is not None, what="the scanner's crash")
    cluster.procs.pop("scanner")
    assert folder(cluster, "underprocess") == ["a.txt"]  # claimed, never enqueued
    cluster.start("run", "scanner2")
    wait(lambda: folder(cluster, "processed") == ["a.txt"] and not folder(cluster, "underprocess"),
         what="the re-driven claim processed")
    assert [e["file"] for e in cluster.events("redriven")] == ["a.txt"]


def test_a_node_waits_for_the_shared_folder_and_refuses_another_one(cluster: Cluster, tmp_path: Path) -> None:
    """A node on an unmounted mount point must not take work (it would find no file and ack every claim as done
    elsewhere); on another cluster's folder it exits 78."""
    cluster.start("worker", "early")  # before any scanner: it waits
    cluster.drop("a.txt", b"x\n")
    wait(lambda: cluster.events("node_waiting") != [], what="the early node waiting")
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as answer:  # up (READY=1 at once: a boot order), yet not working
        urllib.request.urlopen(f"http://{cluster.events('node_waiting')[0]['listen']}/healthz", timeout=10)
    assert answer.value.code == 503 and b"no scanner has served this Redis yet" in answer.value.read()
    cluster.start("run", "scanner")
    wait(lambda: folder(cluster, "processed") == ["a.txt"], what="the early node's work once the scanner is up")
    other = tmp_path / "other"
    (other / ".ingestd").mkdir(parents=True)
    (other / ".ingestd" / "cluster-id").write_text("not-this-cluster")
    p = subprocess.run([sys.executable, "-m", "ingestd", "worker", "--broker", cluster.url, "--watch-dir", str(other),
                        "--listen", "127.0.0.1:0"], env=cluster.env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 78, p.stderr
    assert "is the right shared folder mounted here?" in p.stderr


def test_an_unreachable_broker_exits_75_so_systemd_tries_again(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    for role in ("run", "worker"):
        p = subprocess.run([sys.executable, "-m", "ingestd", role, "--broker", f"redis://127.0.0.1:{port}/0",
                            "--watch-dir", str(tmp_path / "w")], capture_output=True, text=True, timeout=60)
        assert p.returncode == 75, (role, p.stderr)
        assert p.stderr.startswith(f"ingestd: broker: cannot reach redis://127.0.0.1:{port}/0"), p.stderr


def test_two_scanners_active_by_accident_still_claim_each_file_once(scanner, tmp_path: Path) -> None:
    """The lock only saves work: two scanners polling the same folder at once (a lock lost in a partition, a
    clock jump) race for every file, and each file is still claimed into underprocess/ once and sent."""
    import threading

    from ingestd.distributed import queue

    a, b = scanner(), scanner()
    a.active = b.active = True  # both think they lead
    names = [f"f{i:04d}.txt" for i in range(400)]
    for n in names:
        (Path(a.spool.unprocessed) / n).write_bytes(b"x\n")
    a.seen = b.seen = {}
    a.s = b.s = settings(tmp_path / "w", a.s.broker, settle_time=0)  # claim at first sight
    claimed: dict[str, int] = {}

    def run(s) -> None:  # noqa: ANN001
        claimed[id(s)] = s.poll()

    threads = [threading.Thread(target=run, args=(s,)) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(os.listdir(a.spool.underprocess)) == names
    assert os.listdir(a.spool.unprocessed) == []
    # Each file sent at least once; a file both saw claimed may be sent twice (harmless: one lease, one commit).
    assert len(names) <= queue.depth(a.client) <= 2 * len(names)


def test_sigterm_lets_a_node_finish_its_file_then_exit_0(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start("run", "scanner")
    cluster.start("worker", "n1", INGESTD_STOP_TIMEOUT="60")
    big = b"abcdefghij" * 10 + b"\n"
    cluster.drop("big.txt", big * 2_000_000)  # 200 MB: a few seconds in the child
    wait(lambda: (tmp_path / "w" / "underprocess" / "big.txt").exists() and any(
        n.name.startswith(".ingestd-tmp-c") for n in (tmp_path / "w" / "processed").iterdir()),
        what="the node writing its output")
    p = cluster.procs.pop("n1")
    os.killpg(p.pid, signal.SIGTERM)
    assert p.wait(90) == 0
    assert folder(cluster, "processed") == ["big.txt"] and folder(cluster, "underprocess") == []
    assert [e["node"] for e in cluster.events("processed")] == ["n1"]  # finished by the node that was stopped


def test_redis_losing_all_its_data_mid_run_loses_and_doubles_nothing(cluster: Cluster, tmp_path: Path) -> None:
    """FLUSHALL while claims are queued and in hand (a Redis without AOF restarted): messages, leases, records and
    counts are gone; the scanner's re-drive finds the files in underprocess/ and sends them again."""
    import redis

    cluster.start("run", "scanner")
    cluster.start("worker", "n1")
    cluster.start("worker", "n2")
    wait(lambda: len(cluster.events("node_started")) == 2, what="both nodes working")  # or one may take it all
    files = {f"f{i:03d}.txt": (f"line {i}\n" * 2000).encode() for i in range(60)}
    for name, data in files.items():
        cluster.drop(name, data)
    wait(lambda: len(cluster.events("processed")) >= 5, what="some files processed")
    redis.Redis.from_url(cluster.url).flushall()
    wait(lambda: len(folder(cluster, "processed")) == len(files) and not folder(cluster, "underprocess")
         and not folder(cluster, "unprocessed"), what="every file processed after the flush")
    for name, data in files.items():
        assert (cluster.watch / "processed" / name).read_bytes() == expected(data, tmp_path), name
    assert not [n for n in folder(cluster, "processed") if ".superseded-" in n]
    assert folder(cluster, "failed") == []


def test_a_scanner_whose_mount_numbers_inodes_by_itself_refuses_to_work(cluster: Cluster) -> None:
    """The scanner names claims by inode numbers, which NFS and CephFS clients take from the server; sshfs numbers
    files per mount. A standby taking over on such a mount would re-send every claim under a new name: it must
    refuse, exit 78. (Here Redis names another inode for .ingestd/cluster-id, as such a mount would see it.)"""
    import redis

    cluster.start("run", "scanner")
    r = redis.Redis.from_url(cluster.url)
    wait(lambda: r.get("ingestd:default:cluster-id") is not None, what="the scanner's cluster id")
    ident, ino = r.get("ingestd:default:cluster-id").decode().split()
    assert int(ino) == (cluster.watch / ".ingestd" / "cluster-id").stat().st_ino
    cluster.stop("scanner")
    r.set("ingestd:default:cluster-id", f"{ident} {int(ino) + 1}")
    r.delete("ingestd:default:scanner")  # the lock of the killed scanner, not to wait for it
    p = subprocess.run([sys.executable, "-m", "ingestd", "run", "--broker", cluster.url, "--watch-dir",
                        str(cluster.watch), "--listen", "127.0.0.1:0"], env=cluster.env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 78, p.stderr
    assert "this mount numbers files by itself (sshfs" in p.stderr


@pytest.mark.parametrize("url", ["redis://:not-the-password@127.0.0.1:{port}/0", "redis://127.0.0.1:{port}/99"])
def test_a_broker_that_answers_no_exits_78_not_75(redis_server: RedisServer, tmp_path: Path, url: str) -> None:
    """A wrong password or a database Redis does not have: restarting cannot help, so not 75 (systemd retries)."""
    import redis

    url = url.format(port=redis_server.port)
    redis.Redis(port=redis_server.port).config_set("requirepass", "the-password")  # as the docs' Redis has one
    for role in ("run", "worker"):
        p = subprocess.run([sys.executable, "-m", "ingestd", role, "--broker", url, "--watch-dir",
                            str(tmp_path / "w"), "--listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=60)
        assert p.returncode == 78, (role, p.stderr)
        assert "refused" in p.stderr and "not-the-password" not in p.stderr, p.stderr


def test_a_nodes_health_says_when_redis_is_away(cluster: Cluster, redis_server: RedisServer) -> None:
    import urllib.error
    import urllib.request

    cluster.start("run", "scanner")
    cluster.start("worker", "n1")
    wait(lambda: cluster.events("node_started") != [], what="the node working")
    url = f"http://{cluster.events('node_started')[0]['listen']}/healthz"
    assert urllib.request.urlopen(url, timeout=10).status == 200
    redis_server.kill()

    def unhealthy() -> bool:
        try:
            urllib.request.urlopen(url, timeout=10)
        except urllib.error.HTTPError as e:
            return e.code == 503 and b"broker unreachable" in e.read()
        return False

    wait(unhealthy, 30, "503 from the node while Redis is away")
    redis_server.start()
    wait(lambda: urllib.request.urlopen(url, timeout=10).status == 200 if not unhealthy() else False, 30,
         "200 again once Redis is back")
