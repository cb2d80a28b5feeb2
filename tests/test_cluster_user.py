"""A new user follows README "More than one machine" and docs/distributed.md on one machine (issue 11): a real
redis-server, a scanner and worker nodes as processes on one folder. Each test is one place where the program did
not do what the docs say, or surprised a user who did what they say; each failed before its fix.

- `systemctl reload ingestd` (the unit's ExecReload: SIGHUP) killed the scanner, silently; systemd counts a death
  by SIGHUP as clean, so Restart=on-failure left the cluster without a scanner.
- A warm stop (`systemctl stop ingestd-worker`) whose file outlasts stop_timeout crashed the node with a traceback
  (exit 1: two threads killed one child) and cost the file an attempt (one machine counts none for a stop).
- `ingestd run` without --broker (a host whose env file lacks INGESTD_BROKER) on the shared folder "recovered"
  and processed the files in the nodes' hands; a scanner started on a folder a single-machine daemon holds.
- The scanner ignored min_free_bytes (the docs: claiming pauses, ingestd_claiming_paused) and `recursive`.
- A node's first heartbeat came only a third of lease_time after its start: `ingestd status` and the page showed
  no node for 10 s of a working cluster.
- A node's `/` served the single-machine page, empty ("unknown", no workers, nothing finished).
- `ingestd status --broker` listed the completions of a single-machine daemon that once ran on the folder, not
  the cluster's.
- The scanner logged nothing when it stopped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import RedisServer

LEASE = 2.0
SLOW = '[[filters]]\nmatch = "*"\nprocessor = "slow"\nseconds = 0.05\n'  # tests/plugins: 0.05 s a line


def wait(cond: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return got


class Lab:
    """The user's terminal: a shared folder, processes started with the documented commands, their JSON logs."""

    def __init__(self, root: Path, url: str) -> None:
        self.root, self.url, self.watch = root, url, root / "share"
        (self.watch / "unprocessed").mkdir(parents=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {**os.environ, "INGESTD_LEASE_TIME": str(LEASE), "INGESTD_SETTLE_TIME": "0.2",
                    "INGESTD_LOG_FORMAT": "json", "INGESTD_RESCAN_INTERVAL": "2", "INGESTD_POLL_INTERVAL": "0.2"}
        for k in [k for k in self.env if k.startswith("INGESTD_") and k not in (
                "INGESTD_LEASE_TIME", "INGESTD_SETTLE_TIME", "INGESTD_LOG_FORMAT", "INGESTD_RESCAN_INTERVAL",
                "INGESTD_POLL_INTERVAL")]:
            del self.env[k]  # the suite's own INGESTD_WATCH=polling and such must not leak in

    def start(self, name: str, *cmd: str, **env: str) -> subprocess.Popen[bytes]:
        with open(self.root / f"{name}.log", "ab") as log:
            p = subprocess.Popen([sys.executable, "-m", "ingestd", *cmd, "--watch-dir", str(self.watch),
                                  "--listen", "127.0.0.1:0"], env={**self.env, **env}, stdout=log, stderr=log,
                                 start_new_session=True)
        self.procs[name] = p
        return p

    def scanner(self, name: str = "scanner", **env: str) -> subprocess.Popen[bytes]:
        return self.start(name, "run", "--broker", self.url, **env)

    def node(self, name: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        return self.start(name, "worker", "--broker", self.url, "--node", name, "--processes", "1", *args, **env)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def events(self, name: str, kind: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log(name).splitlines()
                if line.startswith("{") and f'"event": "{kind}"' in line]

    def listen(self, name: str, kind: str) -> str:
        return str(wait(lambda: self.events(name, kind), 60, f"{name}'s {kind} event")[0]["listen"])

    def drop(self, name: str, data: bytes) -> None:
        """As the docs tell producers: write under an ignored name, then rename it in."""
        tmp = self.watch / "unprocessed" / f".{name}.part"
        tmp.write_bytes(data)
        os.rename(tmp, self.watch / "unprocessed" / name)

    def folder(self, name: str) -> list[str]:
        path = self.watch / name
        return sorted(os.listdir(path)) if path.exists() else []

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        p = self.procs.pop(name)
        p.send_signal(sig)
        return p.wait(timeout)

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(30)


@pytest.fixture
def lab(tmp_path: Path, redis_server: RedisServer) -> Iterator[Lab]:
    lab = Lab(tmp_path, redis_server.url)
    yield lab
    lab.close()


def get(address: str, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# --- stopping and reloading --------------------------------------------------------------------------------------
def test_systemctl_reload_sighup_does_not_kill_the_scanner(lab: Lab) -> None:
    """ingestd.service is the scanner (docs/distributed.md) and keeps `ExecReload=/bin/kill -HUP $MAINPID`; the
    README says the unit reloads routing on `systemctl reload`. The scanner must survive it and keep claiming."""
    p = lab.scanner()
    lab.listen("scanner", "started")
    lab.node("n1")
    lab.listen("n1", "node_started")
    p.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    assert p.poll() is None, f"SIGHUP killed the scanner (exit {p.returncode}); its log:\n{lab.log('scanner')}"
    lab.drop("after-reload.txt", b"x\n")
    wait(lambda: lab.folder("processed") == ["after-reload.txt"], what="a file claimed after the reload")


def test_the_scanner_logs_its_stop(lab: Lab) -> None:
    """The single-machine daemon logs `stopping` and `stopped`; a scanner that stops said nothing, so its journal
    could not tell a clean stop from a crash."""
    lab.scanner()
    lab.listen("scanner", "started")
    assert lab.stop("scanner") == 0
    assert lab.events("scanner", "stopped") or lab.events("scanner", "stopping"), lab.log("scanner")


def test_a_warm_stop_past_stop_timeout_exits_0_and_costs_no_attempt(lab: Lab) -> None:
    """docs/distributed.md: `systemctl stop ingestd-worker` is a warm stop: the node's current files finish, or go
    back to the queue within stop_timeout, nothing lost. A file longer than stop_timeout crashed the node
    (AttributeError in Child.kill: the stopping main thread and the actor thread killed the same child; exit 1,
    so systemd marks the unit failed) and counted an attempt, so max_attempts restarts during one long file sent
    it to failed/ as poison. On one machine a file abandoned by a stop counts no attempt (README, Recovery)."""
    config = lab.root / "slow.toml"
    config.write_text(SLOW)
    lab.scanner()
    lab.listen("scanner", "started")
    lab.node("n1", "--config", str(config), INGESTD_STOP_TIMEOUT="1")
    lab.listen("n1", "node_started")
    lab.drop("long.txt", b"line\n" * 100)  # 5 s in the child: still at it when stop_timeout (1 s) runs out
    wait(lambda: any(n.startswith(".ingestd-tmp-c") for n in lab.folder("processed")), what="n1 writing long.txt")
    rc = lab.stop("n1", timeout=60)
    log = lab.log("n1")
    assert "Traceback" not in log, log
    assert rc == 0, log
    lab.node("n2", "--config", str(config))
    wait(lambda: lab.events("n2", "processed"), 120, "long.txt finished by another node")
    (done,) = lab.events("n2", "processed")
    assert done["file"] == "long.txt"
    assert done["attempts"] == 1, "a warm stop counted an attempt: " + json.dumps(done)


# --- one folder, one mode ----------------------------------------------------------------------------------------
def test_a_single_machine_daemon_refuses_a_clusters_shared_folder(lab: Lab) -> None:
    """A host whose env file lacks INGESTD_BROKER runs `ingestd run` on the shared folder as a single-machine
    daemon: it took the files in underprocess/ (in nodes' hands) for "a file left in progress by a crash" and
    processed them beside the nodes. The folder says it is a cluster's (.ingestd/cluster-id): refuse, exit 78."""
    lab.scanner()
    lab.listen("scanner", "started")
    lab.drop("held.txt", b"in a node's hands\n")  # no node runs: the claim waits in underprocess/
    wait(lambda: lab.folder("underprocess") == ["held.txt"], what="the scanner's claim")
    solo = lab.start("solo", "run")
    try:
        rc = solo.wait(20)
    except subprocess.TimeoutExpired:
        rc = None
    assert rc == 78, f"the single-machine daemon ran on the cluster's folder (exit {rc}):\n{lab.log('solo')}"
    assert "broker" in lab.log("solo"), lab.log("solo")  # says what to do: run it with --broker
    assert lab.folder("underprocess") == ["held.txt"] and lab.folder("processed") == []


def test_a_scanner_refuses_a_folder_a_single_machine_daemon_holds(lab: Lab) -> None:
    """The other way round: a scanner on the watch dir of a running single-machine daemon claimed beside it (each
    thinks it alone moves files between the folders). As a second daemon does, it must exit 75 naming the first."""
    lab.start("solo", "run")
    lab.listen("solo", "started")
    scanner = lab.scanner()
    try:
        rc = scanner.wait(20)
    except subprocess.TimeoutExpired:
        rc = None
    assert rc == 75, f"the scanner ran beside a single-machine daemon (exit {rc}):\n{lab.log('scanner')}"
    assert "pid" in lab.log("scanner"), lab.log("scanner")


# --- settings the scanner must honour or refuse -------------------------------------------------------------------
def test_the_scanner_pauses_claiming_below_min_free_bytes(lab: Lab) -> None:
    """docs/distributed.md, When things fail: "the shared folder full: claiming pauses below min_free_bytes (logged,
    ingestd_claiming_paused), as on one machine". The scanner never looked at free space."""
    lab.scanner(INGESTD_MIN_FREE_BYTES=str(1 << 62))  # more than any disk: always "full"
    address = lab.listen("scanner", "started")
    lab.drop("a.txt", b"x\n")
    polls = time.monotonic() + 10 * 0.2 + 0.2  # ten poll intervals past settle_time
    wait(lambda: time.monotonic() > polls, what="ten polls")
    assert lab.folder("unprocessed") == ["a.txt"], "claimed although the folder is below min_free_bytes"
    _, metrics = get(address, "/metrics")
    assert b"ingestd_claiming_paused 1.0" in metrics, metrics.decode()


def test_a_scanner_given_recursive_refuses_it(lab: Lab) -> None:
    """`recursive = true` (README) processes files inside folders; a cluster claims files only (docs/api.md), and
    the scanner took the setting silently, leaving every folder where it was. A setting that cannot be honoured is
    refused, as elsewhere in ingestd: exit 78 naming it."""
    p = lab.scanner(INGESTD_RECURSIVE="true")
    try:
        rc = p.wait(20)
    except subprocess.TimeoutExpired:
        rc = None
    assert rc == 78, f"recursive taken silently (exit {rc}):\n{lab.log('scanner')}"
    assert "recursive" in lab.log("scanner")


# --- what status shows ---------------------------------------------------------------------------------------------
def test_a_node_is_listed_as_soon_as_it_has_started(lab: Lab, redis_server: RedisServer) -> None:
    """The first heartbeat came a third of lease_time after node_started (10 s by default): `ingestd status --broker`
    said "nodes none (no worker node has sent a heartbeat)" and the page showed no node, while the node worked."""
    lab.env["INGESTD_LEASE_TIME"] = "30"  # the default
    lab.scanner()
    lab.listen("scanner", "started")
    lab.node("n1")
    lab.listen("n1", "node_started")
    import redis

    r = redis.Redis.from_url(redis_server.url)
    try:
        wait(lambda: r.hexists("ingestd:default:nodes", "n1"), 5, "n1's first heartbeat, within 5 s of its start")
    finally:
        r.close()


def test_a_nodes_root_page_is_not_the_single_machine_page(lab: Lab) -> None:
    """docs/distributed.md: every node serves /metrics and /healthz; the status page is the scanner's. A node's `/`
    served the single-machine page, which drew an empty daemon ("unknown", no workers, "Nothing finished yet")
    from the node's /api/status. It must answer 404, pointing at the scanner's page."""
    lab.scanner()
    lab.listen("scanner", "started")
    lab.node("n1")
    address = lab.listen("n1", "node_started")
    code, body = get(address, "/")
    assert code == 404, body[:200]
    assert b"scanner" in body


def test_status_lists_the_clusters_completions_not_an_old_daemons(lab: Lab) -> None:
    """The docs' path: one machine first, then a cluster on the same folder ("When one machine is not enough").
    The single-machine daemon leaves .ingestd/recent.json; `ingestd status --broker` kept listing those
    completions for ever instead of the cluster's results."""
    lab.start("solo", "run")
    lab.listen("solo", "started")
    lab.drop("old.txt", b"one machine\n")
    wait(lambda: lab.folder("processed") == ["old.txt"], what="the single-machine daemon's result")
    assert lab.stop("solo") == 0
    time.sleep(1.1)  # the cluster's result gets a later mtime than old.txt
    lab.scanner()
    lab.listen("scanner", "started")
    lab.node("n1")
    lab.drop("new.txt", b"cluster\n")
    wait(lambda: lab.folder("processed") == ["new.txt", "old.txt"], what="the cluster's result")
    out = subprocess.run([sys.executable, "-m", "ingestd", "status", "--json", "--broker", lab.url, "--watch-dir",
                          str(lab.watch)], check=False, env=lab.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    recent = [r["file"] for r in json.loads(out.stdout)["recent"]]
    assert recent and recent[0] == "new.txt", recent
