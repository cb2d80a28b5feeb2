"""ingestd under a real systemd 252 (booted for this module): install, readiness, crash and hang recovery,
config errors and reload, warm stop, and the unit's hardening. Run as root; see conftest.py."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from support import HANG_ROUTING
from systemd_harness import Machine, Service, wait_for

REPO = Path(__file__).resolve().parents[2]
UNIT_FILE = REPO / "packaging" / "systemd" / "ingestd.service"
# A worker node of a cluster (docs/distributed.md); installed beside ingestd.service, disabled.
WORKER_UNIT_FILE = REPO / "packaging" / "systemd" / "ingestd-worker.service"
UNIT_FILES = [UNIT_FILE, WORKER_UNIT_FILE]

BASE_ENV = {"INGESTD_WORKERS": "2", "INGESTD_SETTLE_TIME": "0.2"}


def lines(name: str, n: int) -> str:
    return "".join(f"line {i} of {name}, lower case\n" for i in range(n))


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --- 1. install and start ---------------------------------------------------------------------------------
def test_make_install_layout(installed: Machine) -> None:
    m = installed
    assert m.run("getent", "passwd", "ingestd").stdout.split(":")[6].strip() == "/usr/sbin/nologin"
    m.run("test", "-x", "/opt/ingestd/bin/ingestd")
    m.run("test", "-f", "/usr/local/lib/systemd/system/ingestd.service")
    m.run("test", "-f", "/usr/local/lib/systemd/system/ingestd-worker.service")
    m.run("test", "-f", "/etc/ingestd/ingestd.env")
    # tmpfiles.d made the queue before any start, owned by the service user; the drop folder setgid.
    stat = m.run("stat", "-c", "%U:%G %a %n", *(f"/var/lib/ingestd/{f}" for f in ("unprocessed", "processed"))).stdout
    assert stat.splitlines() == ["ingestd:ingestd 2770 /var/lib/ingestd/unprocessed",
                                 "ingestd:ingestd 750 /var/lib/ingestd/processed"]
    assert m.systemctl("is-enabled", "ingestd", check=False).stdout.strip() == "disabled"
    assert m.run("systemctl", "cat", "ingestd").stdout.count("ExecStart=/opt/ingestd/bin/ingestd run") == 1
    # The worker node unit is there for a cluster's nodes to enable, never started by the install.
    assert m.systemctl("is-enabled", "ingestd-worker", check=False).stdout.strip() == "disabled"
    assert m.systemctl("is-active", "ingestd-worker", check=False).stdout.strip() == "inactive"
    assert m.run("systemctl", "cat", "ingestd-worker").stdout.count("ExecStart=/opt/ingestd/bin/ingestd worker") == 1
    # EXTRAS=distributed brought the distributed mode's libraries into the program's virtualenv.
    m.run("/opt/ingestd/bin/python", "-c", "import dramatiq, redis, ingestd.distributed.node")


def test_start_is_active_only_after_ready_and_processes_files(service: Service) -> None:
    service.reset(BASE_ENV)
    # Start without waiting and watch, from inside, the state and the HTTP port: the unit must stay
    # "activating" until READY=1, which the daemon sends only once its port (among others) is up.
    seen = service.m.py("""
import subprocess, time, urllib.request
subprocess.run(["systemctl", "start", "--no-block", "ingestd"], check=True)
states, port_up = [], None
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    state = subprocess.run(["systemctl", "show", "-P", "ActiveState", "ingestd"], capture_output=True,
                           text=True).stdout.strip()
    if not states or states[-1] != state:
        states.append(state)
    if state in ("active", "failed"):
        try:
            port_up = urllib.request.urlopen("http://127.0.0.1:9800/healthz", timeout=2).read().decode()
        except OSError as e:
            port_up = str(e)
        break
    time.sleep(0.01)
RESULT = {"states": states, "port_up": port_up}
""")
    assert seen["states"][-1] == "active", seen
    assert "activating" in seen["states"], seen
    assert seen["port_up"] == "ok\n", f"active before the HTTP port was up (READY too early): {seen['port_up']}"
    assert service.show("Type", "NotifyAccess", "SubState") == {"Type": "notify", "NotifyAccess": "main",
                                                                "SubState": "running"}
    pid = service.main_pid()
    assert service.m.run("ps", "-o", "user=", "-p", str(pid)).stdout.strip() == "ingestd"

    files = {f"report-{i}.txt": lines(f"report-{i}", 50) for i in range(6)}
    service.drop(files)
    state = service.wait_processed(set(files), 30)
    for name, text in files.items():
        assert state["processed"][name][2] == text.upper()
    assert state["unprocessed"] == state["underprocess"] == state["failed"] == {}
    # STATUS= is kept current: systemctl status shows the daemon's one-line summary.
    status = wait_for(lambda: t if "done 6" in (t := service.status_text()) else None, 10, what="STATUS with done 6")
    line = re.search(r'^\s*Status: "(.*)"$', status, re.M)
    assert line and "running" in line[1] and "failed 0" in line[1], status
    assert service.m.run("stat", "-c", "%U %a", "/var/lib/ingestd/processed/report-0.txt").stdout.split() == \
        ["ingestd", "640"]  # UMask=0027


# --- 2. kill -9 ---------------------------------------------------------------------------------------------
def test_kill_9_restarts_and_every_file_ends_processed_once(service: Service) -> None:
    service.reset(BASE_ENV)
    service.m.systemctl("start", "ingestd")
    before, old_pid, mark = service.restarts(), service.main_pid(), service.m.mark()
    line = "the quick brown fox jumps over the lazy dog, line after line\n"
    names = [f"batch-{i:02d}.log" for i in range(24)]
    service.drop_sized(names, 1_500_000, line)
    # Kill the main process as soon as files are both done and in flight.
    in_flight = service.m.py("""
import signal, time
w = ARG["watch"]
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    done, busy = os.listdir(w + "/processed"), [n for n in os.listdir(w + "/underprocess") if not n.startswith(".")]
    if len(done) >= 2 and busy:
        os.kill(ARG["pid"], signal.SIGKILL)
        break
    time.sleep(0.002)
RESULT = busy
""", {"watch": "/var/lib/ingestd", "pid": old_pid})
    assert in_flight, "no file was in flight at the kill"

    wait_for(lambda: service.restarts() == before + 1 and service.prop("SubState") == "running", 30,
             what="systemd to restart the service")
    assert service.main_pid() != old_pid
    state = service.wait_processed(set(names), 90)
    expected = hashlib.sha256(line.upper().encode() * (1_500_000 // len(line))).hexdigest()
    assert {n: v[1] for n, v in state["processed"].items()} == {n: expected for n in names}
    assert state["unprocessed"] == state["underprocess"] == state["failed"] == {}
    assert state[".processed"] == [], "temp outputs left behind"
    events = service.m.events(after=mark)
    recovered = {e["file"] for e in events if e["event"] == "recovered"}
    assert recovered and recovered <= set(in_flight), (recovered, in_flight)
    counts = {n: sum(1 for e in events if e["event"] == "processed" and e["file"] == n) for n in names}
    assert max(counts.values()) == 1, counts


# --- 3. hung worker: the daemon's own supervision; hung main loop: the watchdog -----------------------------------
def test_a_hung_worker_is_killed_by_the_daemon_and_the_file_quarantined_without_a_restart(service: Service) -> None:
    service.reset({**BASE_ENV, "INGESTD_CONFIG": Service.CONFIG, "INGESTD_MAX_ATTEMPTS": "2",
                   "INGESTD_STALL_TIME": "2"}, dropin="[Service]\nWatchdogSec=3\n", config=HANG_ROUTING)
    service.m.systemctl("start", "ingestd")
    assert service.prop("WatchdogUSec") == "3s"
    mark, before, pid = service.m.mark(), service.restarts(), service.main_pid()
    poison = "a line\nthis one will HANG the worker\nnever reached\n"
    service.drop({"poison.txt": poison})
    others = {f"ok-{i}.txt": lines(f"ok-{i}", 20) for i in range(8)}
    service.drop(others)  # the other worker keeps the queue flowing meanwhile

    # max_attempts=2: the parent kills the stuck worker twice, then sets the file aside; systemd does nothing.
    state = wait_for(lambda: s if "poison.txt" in (s := service.folders())["failed"] else None, 60,
                     what="poison.txt in failed/")
    assert state["failed"]["poison.txt"][2] == poison
    sidecar = [n for n in state[".failed"] if n.endswith(".json")]
    assert len(sidecar) == 1
    reason = json.loads(service.m.run("cat", f"/var/lib/ingestd/failed/{sidecar[0]}").stdout)
    assert reason["name"] == "poison.txt" and "stuck 2 times" in reason["reason"] and reason["attempts"] == 2

    assert service.restarts() == before and service.main_pid() == pid, "the watchdog guards the main loop only"
    journal = service.m.journal("-u", "ingestd", after=mark)
    assert "Watchdog timeout" not in journal
    assert "in process" in journal and "ingestd_testplugins" in journal  # the stuck worker's own stack (SIGUSR1)
    stuck = [e for e in service.m.events(after=mark) if e["event"] == "worker_stuck"]
    assert len(stuck) == 2 and all("no progress" in e["reason"] for e in stuck)

    state = service.wait_processed(set(others), 30)
    assert all(state["processed"][n][2] == t.upper() for n, t in others.items())


def test_a_hung_main_loop_trips_the_watchdog_and_systemd_restarts_it(service: Service) -> None:
    service.reset(BASE_ENV, dropin="[Service]\nWatchdogSec=3\nTimeoutAbortSec=2\n")
    service.m.systemctl("start", "ingestd")
    mark, before, pid = service.m.mark(), service.restarts(), service.main_pid()
    service.m.run("kill", "-STOP", str(pid))  # the main loop stops turning: no more pings
    wait_for(lambda: service.restarts() > before and service.prop("SubState") == "running", 30,
             what="a watchdog restart", interval=0.3)
    assert service.main_pid() != pid
    assert "Watchdog timeout" in service.m.journal("-u", "ingestd", after=mark)
    service.drop({"after.txt": "after the restart\n"})
    assert service.wait_processed({"after.txt"}, 20)["processed"]["after.txt"][2] == "AFTER THE RESTART\n"


# --- 4. bad config: no restart loop; reload ----------------------------------------------------------------------
def test_broken_config_exits_78_and_is_not_restarted(service: Service) -> None:
    service.reset({**BASE_ENV, "INGESTD_CONFIG": Service.CONFIG}, config="[[filters]\nmatch = \n")
    mark = service.m.mark()
    start = service.m.systemctl("start", "ingestd", check=False)
    assert start.returncode != 0
    time.sleep(3)  # longer than RestartSec=2: a restart would have happened by now
    assert service.show("ActiveState", "Result", "ExecMainStatus", "NRestarts") == {
        "ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": "78", "NRestarts": "0"}
    logged = service.m.journal("SYSLOG_IDENTIFIER=ingestd", after=mark).splitlines()
    assert len(logged) == 1 and logged[0].startswith("ingestd: config: ") and "not valid TOML" in logged[0], logged


def test_reload_keeps_the_old_routing_on_a_bad_config_and_applies_a_good_one(service: Service) -> None:
    service.reset({**BASE_ENV, "INGESTD_CONFIG": Service.CONFIG},
                  config='[[filters]]\nmatch = "*"\nprocessor = "uppercase"\n')
    service.m.systemctl("start", "ingestd")
    pid = service.main_pid()

    mark = service.m.mark()
    service.write(Service.CONFIG, '[[filters]]\nmatch = "*"\nprocessor = "no-such-processor"\n')
    service.m.systemctl("reload", "ingestd")
    failed = service.wait_event("reload_failed", 10, after=mark)
    assert "no-such-processor" in failed["error"]
    service.drop({"after-bad.txt": "Mixed Case\n"})
    assert service.wait_processed({"after-bad.txt"}, 20)["processed"]["after-bad.txt"][2] == "MIXED CASE\n"

    mark = service.m.mark()
    service.write(Service.CONFIG, '[[filters]]\nmatch = "*"\nprocessor = "reverse"\n')
    service.m.systemctl("reload", "ingestd")
    service.wait_event("reloaded", 10, after=mark)
    service.drop({"after-good.txt": "Mixed Case\n"})
    assert service.wait_processed({"after-good.txt"}, 20)["processed"]["after-good.txt"][2] == "esaC dexiM\n"

    assert service.main_pid() == pid and service.restarts() == 0
    assert service.prop("ActiveState") == "active"


# --- 5. warm stop -------------------------------------------------------------------------------------------------
def test_stop_during_large_files_loses_nothing(service: Service) -> None:
    # The test plug-in `slow` takes 1 ms a line whatever the machine: file sizes give fixed times (a fast engine
    # once finished the "huge" file within the stop).
    service.reset({**BASE_ENV, "INGESTD_STOP_TIMEOUT": "6", "INGESTD_CONFIG": Service.CONFIG},
                  config='[[filters]]\nmatch = "*"\nprocessor = "slow"\nseconds = 0.001\n')
    service.m.systemctl("start", "ingestd")
    invocation = service.invocation()
    line = "a long stream of words to shout, one line at a time\n"
    huge, medium = 100_000 * len(line), 2_000 * len(line)
    service.drop_sized(["huge.dat"], huge, line)  # ~100 s, far longer than stop_timeout: abandoned
    service.drop_sized(["medium.dat"], medium, line)  # ~2 s: finishes within the warm stop
    # `systemctl stop` the moment both are in progress, timed from inside.
    took = service.m.py("""
import subprocess, time
deadline = time.monotonic() + 20
while set(os.listdir("/var/lib/ingestd/underprocess")) != {"huge.dat", "medium.dat"}:
    assert time.monotonic() < deadline, "not both in progress"
    time.sleep(0.005)
started = time.monotonic()
subprocess.run(["systemctl", "stop", "ingestd"], check=True)
RESULT = time.monotonic() - started
""")
    assert took < 30, f"stop took {took:.1f}s, TimeoutStopSec is 30"
    assert service.show("ActiveState", "Result") == {"ActiveState": "inactive", "Result": "success"}

    state = service.folders()
    n = medium // len(line)
    assert state["processed"] == {"medium.dat": [n * len(line), sha(line.upper() * n), None]}
    m = huge // len(line)
    assert state["unprocessed"] == {"huge.dat": [m * len(line), sha(line * m), None]}  # whole, back in the queue
    assert state["underprocess"] == {}

    # The journal of this run: every line the daemon wrote is JSON, with stopping, abandoned, stopped.
    own = service.m.journal("SYSLOG_IDENTIFIER=ingestd", f"_SYSTEMD_INVOCATION_ID={invocation}").splitlines()
    events = [json.loads(line) for line in own]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "started" and kinds[-1] == "stopped", kinds
    stopping = events[kinds.index("stopping")]
    assert stopping["signal"] == "SIGTERM" and sorted(stopping["in_progress"]) == ["huge.dat", "medium.dat"]
    assert kinds.index("stopping") < kinds.index("processed") < kinds.index("abandoned")
    assert events[kinds.index("abandoned")]["file"] == "huge.dat"

    # The abandoned file's worker was killed mid-write: its temp output is removed at once, not left to
    # the next start's recovery.
    assert not state[".processed"], state[".processed"]


# --- 6. more than one machine: the scanner (ingestd.service with a broker) and a worker node, as shipped ------
SHARED = "/srv/ingestd"  # the worker unit's default watch dir: the shared mount point (here a plain folder)

_DROP_SHARED = """
for name, text in ARG["files"].items():
    tmp = os.path.join(ARG["watch"], "unprocessed", "." + name + ".part")
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, os.path.join(ARG["watch"], "unprocessed", name))  # as docs/distributed.md tells producers
"""


def test_a_scanner_and_a_worker_node_as_installed_units_process_files_and_stop_warm(service: Service) -> None:
    """docs/distributed.md's deployment on one machine: a Redis, ingestd.service with INGESTD_BROKER and the
    drop-in the docs give, ingestd-worker.service untouched. The node's unit becomes active only on READY=1
    (Type=notify), runs as ingestd in its sandbox, processes what the scanner claims, and stops warm."""
    m = service.m
    worker = "ingestd-worker.service"
    service.reset({"INGESTD_BROKER": "redis://127.0.0.1:6399/0", "INGESTD_WATCH_DIR": SHARED,
                   "INGESTD_LEASE_TIME": "3", "INGESTD_WORKERS": "2"},
                  dropin=f"[Unit]\nRequiresMountsFor={SHARED}\n\n[Service]\nReadWritePaths={SHARED}\n")
    m.systemctl("stop", worker, check=False)
    m.systemctl("reset-failed", worker, check=False)
    m.run("rm", "-rf", SHARED)
    m.sh(f"install -d -o ingestd -g ingestd -m 0750 {SHARED} {SHARED}/underprocess {SHARED}/processed {SHARED}/failed"
         f" && install -d -o ingestd -g ingestd -m 2770 {SHARED}/unprocessed")
    m.run("systemd-run", "--unit=test-redis", "--collect", "/usr/bin/redis-server", "--port", "6399",
          "--bind", "127.0.0.1", "--save", "", "--appendonly", "no")
    try:
        wait_for(lambda: m.run("redis-cli", "-p", "6399", "ping", check=False).stdout.strip() == "PONG", 20,
                 what="redis-server up")
        mark = m.mark()
        m.systemctl("start", "ingestd")  # the scanner: returns once it is ready
        m.systemctl("start", worker)  # returns only once the node sent READY=1
        assert m.show(worker, "Type", "NotifyAccess", "ActiveState", "SubState", "Result") == {
            "Type": "notify", "NotifyAccess": "main", "ActiveState": "active", "SubState": "running",
            "Result": "success"}
        pid = int(m.prop(worker, "MainPID"))
        assert m.run("ps", "-o", "user=", "-p", str(pid)).stdout.strip() == "ingestd"
        health = m.py("import urllib.request\n"
                      "RESULT = urllib.request.urlopen('http://127.0.0.1:9801/healthz', timeout=5).read().decode()")
        assert health.strip() == "ok", health  # the node's own port (the unit's default listen)

        files = {f"report-{i}.txt": lines(f"report-{i}", 40) for i in range(8)}
        m.py(_DROP_SHARED, {"watch": SHARED, "files": files})

        def done() -> dict[str, Any] | None:
            state = m.py(LIST_FOLDERS, {"watch": SHARED})
            return state if set(files) <= set(state["processed"]) and not state["unprocessed"] \
                and not state["underprocess"] else None

        state = wait_for(done, 60, what="the node's results in processed/", interval=0.3)
        assert {n: state["processed"][n] for n in files} == {n: t.upper() for n, t in files.items()}
        assert state["failed"] == {}
        # Each file processed once, by the node (the scanner processes none), logged under the unit's own name.
        node_events = [json.loads(line) for line in m.journal("SYSLOG_IDENTIFIER=ingestd-worker", after=mark)
                       .splitlines() if line.startswith("{")]
        processed = sorted(e["file"] for e in node_events if e.get("event") == "processed")
        assert processed == sorted(files), processed
        assert not [e for e in m.events(after=mark) if e["event"] == "processed"], "the scanner processed a file"

        m.systemctl("stop", worker)  # a warm stop: exit 0 within TimeoutStopSec
        assert m.show(worker, "ActiveState", "Result") == {"ActiveState": "inactive", "Result": "success"}
        assert any(e.get("event") == "node_stopping" for e in
                   (json.loads(line) for line in m.journal("SYSLOG_IDENTIFIER=ingestd-worker", after=mark)
                    .splitlines() if line.startswith("{")))
    finally:
        m.systemctl("stop", worker, check=False)
        m.systemctl("stop", "ingestd", check=False)
        m.systemctl("stop", "test-redis", check=False)


# Inside the machine: {folder: {name: text}} of the shared folder's visible files.
LIST_FOLDERS = """
RESULT = {}
for folder in ("unprocessed", "underprocess", "processed", "failed"):
    path = os.path.join(ARG["watch"], folder)
    RESULT[folder] = {n: open(os.path.join(path, n), errors="replace").read() for n in sorted(os.listdir(path))
                      if not n.startswith(".") and os.path.isfile(os.path.join(path, n))}
"""


# --- 6. the unit itself -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("unit", UNIT_FILES, ids=lambda p: p.name)
def test_security_exposure_is_at_most_2(unit: Path) -> None:
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=20", "--no-pager",
                           str(unit)], capture_output=True, text=True)
    found = re.search(rf"Overall exposure level for {re.escape(unit.name)}: (\d+\.\d+) (\w+)", proc.stdout)
    assert found, proc.stdout[-2000:] + proc.stderr
    assert float(found[1]) <= 2.0 and found[2] == "OK", found[0]
    assert proc.returncode == 0, proc.stderr


def unit_directives(path: Path) -> dict[tuple[str, str], list[str]]:
    """(section, key) -> values in file order (a key may repeat), from a unit file; comments skipped."""
    found: dict[tuple[str, str], list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault((section, key.strip()), []).append(value.strip())
    return found


# What the worker node unit may set otherwise than ingestd.service, and why.
WORKER_DIFFERS = {
    ("Unit", "Description"): "its own name",
    ("Unit", "After"): "network-online.target: the broker is on another host",
    ("Unit", "Wants"): "network-online.target",
    ("Unit", "RequiresMountsFor"): "the shared watch dir is a network mount",
    ("Service", "ExecStart"): "`ingestd worker`, checked below",
    ("Service", "ExecReload"): "a node reads its routing at start only",
    ("Service", "Environment"): "the shared watch dir and its own metrics port",
    ("Service", "StateDirectory"): "the queue is on the shared mount, which systemd must not chown",
    ("Service", "StateDirectoryMode"): "no StateDirectory",
    ("Service", "ReadWritePaths"): "the shared watch dir instead, checked below",
    ("Service", "CapabilityBoundingSet"): "none at all: a node never claims, so needs no read lease",
    ("Service", "AmbientCapabilities"): "no capability",
    ("Service", "SyslogIdentifier"): "its own journal name",
}


def test_the_worker_unit_is_hardened_and_run_as_ingestd_service() -> None:
    """Every directive of ingestd.service (hardening, restart, watchdog, stop) holds for the worker node unit
    too, with the same values, but for the listed differences; and those differ the way they should."""
    daemon, worker = unit_directives(UNIT_FILE), unit_directives(WORKER_UNIT_FILE)
    for key, values in daemon.items():
        if key not in WORKER_DIFFERS:
            assert worker.get(key) == values, f"{key}: the worker unit has {worker.get(key)}, ingestd.service {values}"
    for key in worker.keys() - daemon.keys():
        assert key in WORKER_DIFFERS, f"{key} is only in the worker unit: say why in WORKER_DIFFERS"

    # The same installed program, as a node.
    (run,) = daemon["Service", "ExecStart"]
    assert worker["Service", "ExecStart"] == [run.removesuffix(" run") + " worker"]
    assert worker["Service", "CapabilityBoundingSet"] == [""] and ("Service", "AmbientCapabilities") not in worker
    # The watch dir it is told to use is the one it may write, and is mounted before it starts.
    env = dict(e.split("=", 1) for e in worker["Service", "Environment"])
    assert worker["Service", "ReadWritePaths"] == [env["INGESTD_WATCH_DIR"]]
    assert worker["Unit", "RequiresMountsFor"] == [env["INGESTD_WATCH_DIR"]]
    # Its metrics port does not collide with a scanner's on the same host.
    from ingestd.settings import Settings

    assert env["INGESTD_LISTEN"] != Settings().listen
    # The warm stop (stop_timeout) fits inside systemd's stop timeout, with room for the hand-back.
    assert float(worker["Service", "TimeoutStopSec"][0]) > Settings().stop_timeout
    assert worker["Service", "KillMode"] == ["mixed"] and worker["Service", "Restart"] == ["on-failure"]


@pytest.mark.parametrize("unit", UNIT_FILES, ids=lambda p: p.name)
def test_systemd_analyze_verify_prints_nothing(installed: Machine, unit: Path) -> None:
    proc = installed.run("systemd-analyze", "verify", f"/usr/local/lib/systemd/system/{unit.name}", check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_make_install_destdir_stages_a_relocatable_install(wheelhouse: Path, tmp_path: Path) -> None:
    """Packaging: everything under DESTDIR, pointing at PREFIX, and nothing run on this system."""
    stage = tmp_path / "stage"
    proc = subprocess.run(["make", "-C", str(REPO), "-f", "packaging/install.mk", "install", f"DESTDIR={stage}",
                           "PREFIX=/opt/ingestd-alt", "PYTHON=/usr/bin/python3",
                           f"PIP_INSTALL_FLAGS=--no-index --find-links={wheelhouse}"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "systemd-sysusers, systemd-tmpfiles --create and systemctl daemon-reload are left to do" in proc.stdout
    venv = stage / "opt/ingestd-alt"
    assert (venv / "bin/ingestd").read_text().splitlines()[0] == "#!/opt/ingestd-alt/bin/python"
    leftovers = subprocess.run(["grep", "-rlF", str(stage), str(venv / "bin"), str(venv / "pyvenv.cfg")],
                               capture_output=True, text=True).stdout
    assert leftovers == "", f"the staging path leaked into: {leftovers}"
    unit = (stage / "usr/local/lib/systemd/system/ingestd.service").read_text()
    assert "ExecStart=/opt/ingestd-alt/bin/ingestd run" in unit and "/opt/ingestd/" not in unit
    worker = (stage / "usr/local/lib/systemd/system/ingestd-worker.service").read_text()
    assert "ExecStart=/opt/ingestd-alt/bin/ingestd worker" in worker and "/opt/ingestd/" not in worker
    for path in ("usr/local/lib/sysusers.d/ingestd.conf", "usr/local/lib/tmpfiles.d/ingestd.conf",
                 "etc/ingestd/ingestd.env"):
        assert (stage / path).is_file(), path
    # The staged venv works: the package and its data file (the status page) are installed.
    check = "from importlib.resources import files; import ingestd.cli; print(files('ingestd').joinpath('static/index.html').is_file())"
    assert subprocess.run([str(venv / "bin/python"), "-c", check], capture_output=True, text=True).stdout == "True\n"


def test_example_env_file_documents_every_setting() -> None:
    from ingestd.settings import PARSERS

    text = (REPO / "packaging" / "systemd" / "ingestd.env").read_text()
    documented = set(re.findall(r"^#INGESTD_([A-Z_]+)=", text, re.M))
    assert documented == {name.upper() for name in PARSERS}
    assert not re.search(r"^[^#\s]", text, re.M), "the shipped example must set nothing (all defaults)"


# --- make uninstall (last: it removes what the other tests use) --------------------------------------------------------
def test_make_uninstall_removes_the_install_and_keeps_data_and_settings(service: Service) -> None:
    service.reset(BASE_ENV)  # an env file changed from the shipped example
    service.m.systemctl("enable", "--now", "ingestd")
    service.drop({"keep.txt": "keep me\n"})
    service.wait_processed({"keep.txt"}, 20)
    service.m.run("make", "-C", str(REPO), "-f", "packaging/install.mk", "uninstall")
    assert service.m.systemctl("cat", "ingestd", check=False).returncode != 0
    assert service.m.systemctl("cat", "ingestd-worker", check=False).returncode != 0
    for path in ("/opt/ingestd", "/usr/local/lib/sysusers.d/ingestd.conf", "/usr/local/lib/tmpfiles.d/ingestd.conf"):
        assert service.m.run("test", "-e", path, check=False).returncode != 0, path
    assert service.m.run("test", "-L", "/etc/systemd/system/multi-user.target.wants/ingestd.service",
                         check=False).returncode != 0
    assert service.m.run("cat", "/etc/ingestd/ingestd.env").stdout == "".join(f"{k}={v}\n" for k, v in BASE_ENV.items())
    assert service.m.run("cat", "/var/lib/ingestd/processed/keep.txt").stdout == "KEEP ME\n"
