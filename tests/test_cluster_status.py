"""`ingestd status --broker URL` (and INGESTD_BROKER): a cluster's nodes, their current files and heartbeats, and the
queue depth, after the folder counts (issue 11). Real redis-server, a real scanner and real worker nodes on
loopback; a node busy for good on a file (the test plug-in `hang_on`), another killed with SIGKILL (MISSING).
Redis unreachable, refused, or silent: the folders still, then one line on stderr, exit 69. Without a broker,
`status` is as before and imports neither redis nor dramatiq."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import INGESTD, ClusterProcess, wait_for

LEASE = "3"  # seconds (the tests' lease_time): a node is MISSING 9 s after its last heartbeat
FOLDERS_LINE = re.compile(r"^folders     unprocessed \d+  underprocess \d+  processed \d+  failed \d+$", re.MULTILINE)
HANG = '[[filters]]\nmatch = "*"\nprocessor = "hang_on"\n'  # a line containing HANG blocks its child for good


def status(watch: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    return subprocess.run([*INGESTD, "status", "--watch-dir", str(watch), *args], capture_output=True, text=True,
                          env={**clean, "INGESTD_LEASE_TIME": LEASE, **(env or {})}, timeout=timeout, check=False)


def drop(watch: Path, name: str, data: bytes) -> None:
    tmp = watch / "unprocessed" / f".{name}.part"
    tmp.write_bytes(data)
    os.rename(tmp, watch / "unprocessed" / name)  # as producers must: complete files appear by rename


@pytest.fixture
def watch(tmp_path: Path) -> Path:
    w = tmp_path / "w"
    for f in ("unprocessed", "underprocess", "processed", "failed"):
        (w / f).mkdir(parents=True)
    return w


@pytest.fixture
def cluster(tmp_path: Path, watch: Path, redis_server: Any) -> Iterator[Callable[..., ClusterProcess]]:
    """start("scanner") or start("node", name, processes): real processes on `watch`, all stopped afterwards."""
    try:
        import ingestd_testplugins  # noqa: F401
    except ImportError:
        pytest.skip("the test plug-ins (tests/plugins) are not installed; pip install ./tests/plugins")
    config = tmp_path / "hang.toml"
    config.write_text(HANG)
    env = {"INGESTD_LEASE_TIME": LEASE, "INGESTD_SETTLE_TIME": "0.2", "INGESTD_STOP_TIMEOUT": "1"}
    started: list[ClusterProcess] = []

    def start(role: str, name: str = "", processes: int = 1) -> ClusterProcess:
        common = ["--broker", redis_server.url, "--watch-dir", str(watch), "--config", str(config),
                  "--listen", "127.0.0.1:0", "--log-format", "json"]
        if role == "scanner":
            p = ClusterProcess("run", *common, env=env)
        else:
            p = ClusterProcess("worker", *common, "--node", name, "--processes", str(processes), env=env)
        started.append(p)
        return p.started("started" if role == "scanner" else "node_started")

    try:
        yield start
    finally:
        for p in reversed(started):
            p.stop()


def _json(watch: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    r = status(watch, "--json", *args, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_status_shows_nodes_their_files_heartbeats_and_the_queue(watch: Path, cluster: Any, redis_server: Any) -> None:
    cluster("scanner")
    nodes = {"n1": cluster("node", "n1", 2), "n2": cluster("node", "n2", 1)}
    drop(watch, "done.txt", b"one line\n")
    drop(watch, "stuck.log", b"a line\nHANG\n")  # its node's child blocks on it: a current file for good
    wait_for(lambda: (watch / "processed" / "done.txt").exists(), 30, what="done.txt processed")

    def holder() -> Any:
        doc = _json(watch, "--broker", redis_server.url)
        return next((n for n in doc["nodes"] if [c["file"] for c in n["current"]] == ["stuck.log"]), None)

    busy = wait_for(holder, 30, interval=0.3, what="a node reporting stuck.log as its current file")["node"]
    idle = "n2" if busy == "n1" else "n1"

    # Text, with --broker: after the folders, the broker, the queue, one line per node.
    r = status(watch, "--broker", redis_server.url)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    out = r.stdout
    assert FOLDERS_LINE.search(out)
    lines = out.splitlines()
    at = lines.index(next(line for line in lines if line.startswith("broker ")))
    assert at > lines.index(next(line for line in lines if line.startswith("folders "))), out
    assert lines[at] == f"broker      {redis_server.url}, a scanner is active"
    assert lines[at + 1] == "queue       1 message (queued, delayed or in a node's hands)"  # stuck.log's, in hand
    assert lines[at + 2] == "nodes       2"
    procs = {"n1": "2 processes", "n2": "1 process"}
    assert re.fullmatch(rf"  {busy}  {procs[busy]}, heartbeat \d+\.\d s ago: stuck\.log \(\d+(\.\d)? s\)",
                        lines[at + 3 + (busy == "n2")]), out
    assert re.fullmatch(rf"  {idle}  {procs[idle]}, heartbeat \d+\.\d s ago: idle", lines[at + 3 + (idle == "n2")]), out
    assert "MISSING" not in out

    # A node killed as a machine dies: MISSING once its heartbeat is older than three lease times.
    nodes[idle].kill9()
    doc = wait_for(lambda: (d := _json(watch, env={"INGESTD_BROKER": redis_server.url}))
                   and any(n["node"] == idle and n["missing"] for n in d["nodes"]) and d, 30, interval=0.5,
                   what=f"{idle} reported missing")
    # --json, the broker from INGESTD_BROKER: the fields named as in the scanner's /api/status.
    assert doc["broker"] == redis_server.url and doc["broker_error"] is None
    assert doc["scanner_active"] is True and doc["queue_messages"] == 1
    by = {n["node"]: n for n in doc["nodes"]}
    assert set(by) == {"n1", "n2"}
    assert by[idle]["missing"] is True and by[idle]["heartbeat_age"] > 3 * float(LEASE)
    assert by[busy]["missing"] is False and by[busy]["heartbeat_age"] < float(LEASE)
    assert [c["file"] for c in by[busy]["current"]] == ["stuck.log"]
    assert by[busy]["processes"] == (2 if busy == "n1" else 1) and by[busy]["pid"] == nodes[busy].proc.pid
    assert doc["counts"]["underprocess"] == 1 and doc["in_progress"] == ["stuck.log"]

    r = status(watch, env={"INGESTD_BROKER": redis_server.url})
    assert re.search(r"^nodes       2 \(1 MISSING\)$", r.stdout, re.MULTILINE), r.stdout
    assert re.search(rf"^  {idle}  {procs[idle]}, heartbeat \d+(\.\d)? s ago  MISSING: idle$", r.stdout, re.MULTILINE), r.stdout


def test_status_without_a_scanner_or_nodes_says_so(watch: Path, redis_server: Any) -> None:
    """A broker nobody uses yet: no scanner holds the lock (files would wait for ever), no node has beaten."""
    r = status(watch, "--broker", redis_server.url)
    assert r.returncode == 0, r.stderr
    assert f"broker      {redis_server.url}, NO ACTIVE SCANNER (files are not claimed)\n" in r.stdout
    assert "queue       0 messages (queued, delayed or in a node's hands)\n" in r.stdout
    assert "nodes       none (no worker node has sent a heartbeat)\n" in r.stdout
    doc = _json(watch, "--broker", redis_server.url)
    assert (doc["scanner_active"], doc["queue_messages"], doc["nodes"], doc["broker_error"]) == (False, 0, [], None)


def test_status_without_a_broker_is_unchanged_and_imports_no_cluster_code(watch: Path) -> None:
    """The single-machine status: no cluster lines or keys, and neither redis nor dramatiq imported."""
    drop(watch, "a.txt", b"x\n")
    code = ("import sys; from ingestd.cli import main; rc = main(sys.argv[1:]); "
            "print('IMPORTED', sorted(m for m in ('redis', 'dramatiq') if m in sys.modules), rc, file=sys.stderr)")
    for args in ([], ["--json"]):
        r = subprocess.run([sys.executable, "-c", code, "status", "--watch-dir", str(watch), *args], capture_output=True,
                           text=True, env={k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")},
                           check=False)
        assert r.stderr.strip() == "IMPORTED [] 0", r.stderr
        if args:
            assert not {"broker", "nodes", "queue_messages", "scanner_active", "broker_error"} & set(json.loads(r.stdout))
        else:
            assert FOLDERS_LINE.search(r.stdout)
            assert not re.search(r"^(broker|queue|nodes) ", r.stdout, re.MULTILINE), r.stdout


@pytest.fixture
def silent_listener() -> Iterator[str]:
    """A TCP port that accepts connections and never answers (a hung Redis, a firewall that swallows replies)."""
    srv = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"redis://127.0.0.1:{srv.getsockname()[1]}/0"
    stop.set()
    t.join(5)
    for c in held:
        c.close()
    srv.close()


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"  # nothing listens there once the socket is closed


@pytest.mark.parametrize("kind", ["refused", "wrong-password", "no-answer"])
def test_unreachable_broker_is_one_line_after_the_folders_and_exit_69(kind: str, watch: Path, request: Any) -> None:
    secret = "s3cr3t-pw"
    if kind == "refused":
        url, why = _closed_port(), r"Connection refused"
    elif kind == "wrong-password":
        server = request.getfixturevalue("redis_server")
        import redis

        redis.Redis.from_url(server.url).config_set("requirepass", "the-right-one")
        url, why = server.url.replace("redis://", f"redis://:{secret}@"), r"(?i)password|auth"
    else:
        url, why = request.getfixturevalue("silent_listener"), r"(?i)timeout|timed out"
    shown = re.sub(r"//[^@/]*@", "//***@", url)
    drop(watch, "waiting.txt", b"x\n")
    for args in ([], ["--json"]):
        r = status(watch, "--broker", url, *args)
        assert r.returncode == 69, (r.returncode, r.stdout, r.stderr)
        err = r.stderr.splitlines()
        assert len(err) == 1, r.stderr
        assert err[0].startswith(f"ingestd: broker: cannot read the cluster's state from {shown}: "), err
        assert re.search(why, err[0]), err
        assert "Traceback" not in r.stderr and secret not in r.stderr + r.stdout
        if args:  # the folders are still reported; the cluster's fields are null, with the reason
            doc = json.loads(r.stdout)
            assert doc["counts"]["unprocessed"] == 1 and doc["broker"] == shown
            assert doc["nodes"] is None and doc["queue_messages"] is None and re.search(why, doc["broker_error"])
        else:
            assert FOLDERS_LINE.search(r.stdout)
            assert f"broker      {shown}: unreachable (see below)\n" in r.stdout
        if kind == "no-answer":
            break  # one wait of BROKER_TIMEOUT is enough to show it


def test_a_broker_url_redis_cannot_parse_is_a_config_error(watch: Path) -> None:
    r = status(watch, "--broker", "redis://127.0.0.1:notaport/0")
    assert r.returncode == 78, (r.returncode, r.stderr)
    assert r.stderr.startswith("ingestd: broker: redis://127.0.0.1:notaport/0 is not a Redis URL") and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1


def _get(listen: str, path: str) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{listen}{path}", timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_scanner_api_status_has_the_daemon_shape_and_survives_redis_going(watch: Path, cluster: Any,
                                                                         redis_server: Any) -> None:
    """The scanner's /api/status: the daemon's fields where they mean the same, the cluster's own; Redis gone: still
    an answer (nodes unknown, health says why), and /metrics still renders (it reads the same status)."""
    scanner = cluster("scanner")
    cluster("node", "n1", 1)
    drop(watch, "bad.bin", b"\x00binary")
    (watch / "unprocessed" / "folder").mkdir()

    def settled() -> Any:
        doc = json.loads(_get(scanner.listen, "/api/status")[1])
        return doc if doc["failures"] and doc["nodes"] else None

    doc = wait_for(settled, 30, interval=0.3, what="a failure and a node in /api/status")
    assert doc["role"] == "scanner" and doc["active"] is True and doc["state"] == "running"
    assert doc["watch_dir"] == str(watch.resolve()) and doc["started_at"] <= doc["now"]
    assert doc["counts"] == {"unprocessed": 0, "underprocess": 0, "processed": 0, "failed": 1}
    assert doc["failures"][0]["name"] == "bad.bin" and "binary" in doc["failures"][0]["reason"]
    assert doc["folders_left"] == {"count": 1, "names": ["folder"], "recursive": False}
    assert doc["oldest"] == {"unprocessed": 0.0} and doc["oldest_claim_age"] is None
    assert doc["queue_messages"] == 0 and [n["node"] for n in doc["nodes"]] == ["n1"]
    assert doc["health"] == {"ok": True, "problem": None}
    code, metrics = _get(scanner.listen, "/metrics")
    assert code == 200 and b'ingestd_folder_files{folder="failed"} 1.0' in metrics

    redis_server.kill()
    doc = wait_for(lambda: (d := json.loads(_get(scanner.listen, "/api/status")[1]))["queue_messages"] is None and d,
                   30, interval=0.3, what="/api/status without Redis")
    assert doc["nodes"] == [] and doc["health"]["ok"] is False and "broker unreachable" in doc["health"]["problem"]
    assert doc["counts"]["failed"] == 1  # the folders are still read
    code, metrics = _get(scanner.listen, "/metrics")
    assert code == 200 and b"ingestd_cluster_nodes 0.0" in metrics and b"ingestd_cluster_queue_messages" not in metrics
