"""End to end with a real Prometheus (1 s scrapes, the shipped rules with short `for:`) scraping real
ingestd daemons: the live scrape passes promtool, a stuck file fires IngestdFileStuck, every dashboard
query returns data, and killing a daemon makes IngestdDown pending then firing."""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from obs_support import (BUILTINS, DASHBOARD, Prometheus, children, cluster_series, exported_series, fast_rules,
                         need_binary, panels, reap, substitute)
from support import HANG_ROUTING, DaemonProcess, folder, wait_for

FOR = "3s"            # every alert's for: in the test copy of the rules
STUCK_AFTER = "3"     # IngestdFileStuck's 900 s threshold in the test copy
NORMAL_FILES = 6


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, prometheus_factory: Any) -> Iterator[SimpleNamespace]:
    """busy: an ingestd whose routing hangs on a line containing HANG (2 workers), fed normal files, a
    binary file (fails) and a HANG file (stuck); victim: a plain ingestd to kill. One Prometheus scrapes both."""
    need_binary("prometheus")
    base = tmp_path_factory.mktemp("e2e")
    config = base / "hang.toml"
    config.write_text(HANG_ROUTING)
    env = {"INGESTD_STOP_TIMEOUT": "1"}
    daemons: list[DaemonProcess] = []
    try:
        busy = DaemonProcess(base / "busy", "--workers", "2", "--config", str(config), env=env)
        daemons.append(busy)
        victim = DaemonProcess(base / "victim", "--workers", "1", env=env)
        daemons.append(victim)
        busy.started()
        victim.started()
        addr = {d: d.url.removeprefix("http://") for d in (busy, victim)}
        t0 = time.monotonic()
        prom = prometheus_factory([addr[busy], addr[victim]],
                                  fast_rules(FOR, {"IngestdFileStuck": ("> 900", f"> {STUCK_AFTER}")}))
        prometheus_start = time.monotonic() - t0
        wait_for(lambda: set(prom.targets_up().values()) == {"up"}, 20, 0.2, "both targets up")

        unprocessed = busy.watch_dir / "unprocessed"
        for i in range(NORMAL_FILES):
            (unprocessed / f"normal-{i}.txt").write_text("".join(f"line {j} of file {i}\n" for j in range(200)))
        (unprocessed / "blob.bin").write_bytes(b"\x00binary\x00")
        (unprocessed / "stuck.txt").write_text("first line\nHANG here\nlast line\n")
        wait_for(lambda: len(folder(busy.watch_dir, "processed")) == NORMAL_FILES
                 and folder(busy.watch_dir, "failed") == ["blob.bin"]
                 and folder(busy.watch_dir, "underprocess") == ["stuck.txt"], 30, 0.1, "files processed")
        yield SimpleNamespace(busy=busy, victim=victim, prom=prom, addr=addr, prometheus_start=prometheus_start)
    finally:
        for d in daemons:
            pids = children(d.proc.pid)
            d.stop(timeout=20)  # also closes its stderr pipe when the test killed it already
            reap(pids)


def test_live_scrape_passes_promtool_check_metrics(stack: SimpleNamespace) -> None:
    promtool = need_binary("promtool")
    code, body = stack.busy.get("/metrics")
    assert code == 200
    r = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True)
    assert r.returncode == 0 and not r.stdout and not r.stderr, (r.stdout + r.stderr).decode()
    # The scrape is the daemon's real state: what it processed, failed and is stuck on.
    text = body.decode()
    assert f'ingestd_folder_files{{folder="processed"}} {NORMAL_FILES}.0' in text
    assert 'ingestd_files_total{result="failed"} 1.0' in text
    assert re.search(r'ingestd_worker_file_info\{file="stuck.txt",worker="\d"\} 1.0', text)


def test_stuck_file_fires_ingestd_file_stuck(stack: SimpleNamespace) -> None:
    prom: Prometheus = stack.prom
    instance = stack.addr[stack.busy]

    def firing() -> dict[str, Any] | None:
        for a in prom.alerts("IngestdFileStuck"):
            if a["labels"]["instance"] == instance and a["state"] == "firing":
                return a
        return None

    alert = wait_for(firing, 30, 0.2, "IngestdFileStuck firing")
    assert alert["labels"]["file"] == "stuck.txt" and alert["labels"]["severity"] == "warning"
    assert "stuck.txt" in alert["annotations"]["description"]
    assert alert["annotations"]["runbook_url"] == "docs/runbook.md#ingestdfilestuck"
    # Nothing else is wrong with this daemon but the failed blob.bin: no false alarms.
    active = {a["labels"]["alertname"] for a in prom.api("alerts")["alerts"] if a["labels"].get("instance") == instance}
    assert active == {"IngestdFileStuck", "IngestdFilesFailing"}


def test_every_dashboard_query_returns_data(stack: SimpleNamespace) -> None:
    """Each panel's queries, with the template variables and Grafana's macros substituted, run against
    the real Prometheus the way Grafana would run them (range or instant), and return data. Queries of the
    cluster's metrics are left out: only a cluster's scanner exports them, and this stack runs none."""
    prom: Prometheus = stack.prom
    instance = stack.addr[stack.busy]
    # The alert state panel has something to show once the stuck file's alert is active.
    wait_for(lambda: prom.query(f'ALERTS{{alertname="IngestdFileStuck", instance="{instance}"}}'), 30, 0.2,
             "the stuck-file alert in ALERTS")
    variables = {**BUILTINS, "job": "ingestd", "instance": re.escape(instance).replace("\\", "\\\\"),
                 "datasource": "prometheus"}
    dashboard = json.loads(DASHBOARD.read_text())
    end = time.time()
    empty: list[str] = []
    only_cluster = cluster_series() - exported_series()
    for panel in panels(dashboard):
        finite = False
        targets = [t for t in panel["targets"] if not any(name in t["expr"] for name in only_cluster)]
        if not targets:
            continue
        for target in targets:
            expr = substitute(target["expr"], variables)
            assert "$" not in expr, expr
            if target.get("instant"):
                result = prom.query(expr, at=end)
                values = [r["value"][1] for r in result]
            else:
                result = prom.query_range(expr, end - 60, end, 1)
                values = [v[1] for r in result for v in r["values"]]
            if not result:
                empty.append(f"{panel['title']}: {expr}")
            finite = finite or any(math.isfinite(float(v)) for v in values)
        if not finite:
            empty.append(f"{panel['title']}: only NaN/Inf values")
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_processed_counts_in_prometheus_match_the_folders(stack: SimpleNamespace) -> None:
    prom: Prometheus = stack.prom
    instance = stack.addr[stack.busy]
    got = {r["metric"]["folder"]: float(r["value"][1])
           for r in prom.query(f'ingestd_folder_files{{job="ingestd", instance="{instance}"}}')}
    assert got == {"unprocessed": 0, "underprocess": 1, "processed": NORMAL_FILES, "failed": 1}
    files = {r["metric"]["result"]: float(r["value"][1])
             for r in prom.query(f'ingestd_files_total{{job="ingestd", instance="{instance}"}}')}
    assert files == {"processed": NORMAL_FILES, "failed": 1, "recovered": 0}


def test_killed_daemon_makes_ingestd_down_pending_then_firing(stack: SimpleNamespace) -> None:
    prom: Prometheus = stack.prom
    victim = stack.addr[stack.victim]
    assert not prom.alerts("IngestdDown"), "IngestdDown while every daemon is up"
    pids = children(stack.victim.proc.pid)
    stack.victim.kill()  # kill -9: no goodbye
    killed = time.monotonic()
    states: list[tuple[str, float]] = []

    def firing() -> bool:
        for a in prom.alerts("IngestdDown"):
            assert a["labels"]["instance"] == victim, a  # the live daemon never goes down
            if not states or states[-1][0] != a["state"]:
                states.append((a["state"], round(time.monotonic() - killed, 1)))
        return bool(states) and states[-1][0] == "firing"

    wait_for(firing, 30, 0.1, "IngestdDown firing")
    assert [s for s, _ in states] == ["pending", "firing"], states
    assert states[1][1] - states[0][1] >= 2.5, f"for: {FOR} honoured: {states}"
    alert = prom.alerts("IngestdDown")[0]
    assert alert["labels"]["severity"] == "critical"
    assert victim in alert["annotations"]["description"]
    reap(pids)
    print(f"\nIngestdDown after kill -9: {states}; prometheus ready in {stack.prometheus_start:.1f}s")
