"""Helpers for the observability suites: paths of the shipped files, a real prometheus server in a
subprocess (1 s scrapes and rule evaluation, the alert rules loaded) with a small API client, a real
alertmanager and a webhook receiver, and the shipped rules made fast for end-to-end tests."""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Self

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ingestd.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
ALERTS = REPO / "packaging" / "prometheus" / "ingestd-alerts.yml"
ALERTS_TEST = REPO / "packaging" / "prometheus" / "ingestd-alerts.test.yml"
EXAMPLE_CONFIG = REPO / "packaging" / "prometheus" / "prometheus.yml"
SCRAPE_SNIPPET = REPO / "packaging" / "prometheus" / "ingestd-scrape.yml"
DEBIAN_SETUP = REPO / "packaging" / "prometheus" / "debian-setup.sh"
ALERTMANAGER_CONFIG = REPO / "packaging" / "prometheus" / "alertmanager.yml"
# Debian's stock /etc/prometheus/prometheus.yml (package prometheus 2.42.0+ds-5+deb12u1), verbatim.
DEBIAN_PROMETHEUS_YML = Path(__file__).resolve().parent / "debian-prometheus.yml"
RUNBOOK = REPO / "docs" / "runbook.md"
DASHBOARD = REPO / "grafana" / "dashboards" / "ingestd.json"
GRAFANA = REPO / "grafana"


# The Debian package that brings each binary the tests run.
PACKAGES = {"prometheus": "prometheus", "promtool": "prometheus",
            "prometheus-alertmanager": "prometheus-alertmanager", "amtool": "prometheus-alertmanager"}


def need_binary(name: str) -> str:
    """The binary's path; else skip with the reason (fail under CI=true, where it must be there)."""
    path = shutil.which(name)
    if path:
        return path
    reason = (f"`{name}` is not installed: Debian's `{PACKAGES.get(name, name)}` package brings it "
              "(`sh tests/system-deps.sh` installs it as root)")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + "; CI=true, so this is a failure")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def fast_rules(for_: str = "3s", thresholds: dict[str, tuple[str, str]] | None = None) -> str:
    """The shipped rules with every `for:` set to `for_` and some thresholds lowered, for end-to-end speed.

    thresholds maps an alert name to (old text, new text) in its expr; the old text must be there, so a
    change to the shipped rules breaks the test loudly instead of silently testing something else.
    """
    doc = yaml.safe_load(ALERTS.read_text())
    thresholds = dict(thresholds or {})
    for group in doc["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = for_
            if rule.get("alert") in thresholds:
                old, new = thresholds.pop(rule["alert"])
                assert old in rule["expr"], f"{rule['alert']}: {old!r} not in its expr {rule['expr']!r}"
                rule["expr"] = rule["expr"].replace(old, new)
    assert not thresholds, f"no such alerts in {ALERTS}: {sorted(thresholds)}"
    return yaml.safe_dump(doc, sort_keys=False)


class _Server:
    """A real server binary in a subprocess on a free loopback port, ready once its /-/ready answers 200."""

    binary: str
    log: Path
    proc: subprocess.Popen[bytes] | None

    def _launch(self, argv: Callable[[int], list[str]], base_url: Callable[[], str], timeout: float) -> None:
        name = Path(self.binary).name
        for _attempt in range(3):  # a free port can be taken between our probe and the server's bind
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(argv(free_port()), stdout=log, stderr=subprocess.STDOUT,
                                             cwd=self.log.parent)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with urllib.request.urlopen(base_url() + "/-/ready", timeout=1) as r:
                        if r.status == 200:
                            return
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                time.sleep(0.1)
            self.stop()
        raise AssertionError(f"{name} did not become ready; its log:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class Prometheus(_Server):
    """A real prometheus server in a subprocess, with a tiny client for its HTTP API."""

    def __init__(self, workdir: Path, targets: list[str], rules_text: str,
                 external_labels: dict[str, str] | None = None, alertmanagers: list[str] | None = None) -> None:
        """alertmanagers: host:port of Alertmanagers to send alerts to (re-sent every second while firing)."""
        self.binary = need_binary("prometheus")
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        (workdir / "rules.yml").write_text(rules_text)
        config: dict[str, Any] = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(workdir / "rules.yml")],
            "scrape_configs": [{"job_name": "ingestd", "static_configs": [{"targets": targets}]}],
        }
        if external_labels:
            config["global"]["external_labels"] = external_labels
        if alertmanagers:
            config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": alertmanagers}]}]}
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.log = workdir / "prometheus.log"

    def start(self, timeout: float = 30.0) -> Prometheus:
        def argv(port: int) -> list[str]:
            self.url = f"http://127.0.0.1:{port}"
            return [self.binary, f"--config.file={self.workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                    "--rules.alert.resend-delay=1s", "--log.level=warn"]

        self._launch(argv, lambda: self.url, timeout)
        return self

    def api(self, path: str, **params: Any) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{url}: HTTP {e.code}: {e.read()[:500]!r}") from None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query; the result as a list of {metric, value}."""
        data = self.api("query", query=expr, **({"time": f"{at:.3f}"} if at is not None else {}))
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        data = self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step}")
        return data["result"]

    def alerts(self, name: str) -> list[dict[str, Any]]:
        return [a for a in self.api("alerts")["alerts"] if a["labels"].get("alertname") == name]

    def targets_up(self) -> dict[str, str]:
        return {t["labels"]["instance"]: t["health"] for t in self.api("targets")["activeTargets"]}


class Alertmanager(_Server):
    """A real alertmanager (Debian's prometheus-alertmanager) in a subprocess, on a free loopback port,
    clustering off; its configuration is the given YAML text."""

    def __init__(self, workdir: Path, config_text: str) -> None:
        self.binary = need_binary("prometheus-alertmanager")
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        (workdir / "alertmanager.yml").write_text(config_text)
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.log = workdir / "alertmanager.log"

    def start(self, timeout: float = 30.0) -> Alertmanager:
        def argv(port: int) -> list[str]:
            self.address = f"127.0.0.1:{port}"
            return [self.binary, f"--config.file={self.workdir / 'alertmanager.yml'}",
                    f"--storage.path={self.workdir / 'data'}", f"--web.listen-address={self.address}",
                    "--cluster.listen-address=", "--log.level=warn"]  # empty: no gossip port 9094

        self._launch(argv, lambda: f"http://{self.address}", timeout)
        return self


class WebhookReceiver:
    """An HTTP listener on a free loopback port that records every JSON body POSTed to it (as
    Alertmanager's webhook_configs send them), in a thread; use as a context manager."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        received = self.bodies

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                received.append({"path": self.path, **json.loads(body)})
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def alerts(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(notification, alert) for every alert of every notification received so far."""
        return [(n, a) for n in list(self.bodies) for a in n["alerts"]]


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def reap(pids: list[int], timeout: float = 10.0) -> None:
    """Workers orphaned by a kill -9 of their parent exit on their pipe's EOF; make sure none is left."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}") and _state(pid) != "Z":
            time.sleep(0.05)
        if os.path.exists(f"/proc/{pid}") and _state(pid) != "Z":
            os.kill(pid, signal.SIGKILL)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def github_anchor(heading: str) -> str:
    """The fragment GitHub (and most Markdown renderers) give a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


# Series that come from Prometheus itself, not from ingestd.
PROMETHEUS_SERIES = {"up", "ALERTS", "ALERTS_FOR_STATE"}

@functools.cache
def cluster_series() -> frozenset[str]:
    """Every sample name the distributed mode exposes (docs/distributed.md): a worker node's registry once it has
    written a heartbeat, and the scanner's scrape-time series for a status with one live node and a queue."""
    from ingestd.distributed.node import _Metrics
    from ingestd.distributed.scanner import _Live

    node = _Metrics("node-a", lambda: 1)
    node.heartbeat.labels("node-a").set(1.0)  # set after each heartbeat written to Redis
    status = {"counts": {"unprocessed": 1, "underprocess": 1, "processed": 1, "failed": 0}, "active": True,
              "oldest": {"unprocessed": 1.0},
              "queue_messages": 3, "oldest_claim_age": 2.0,
              "nodes": [{"node": "node-a", "missing": False, "heartbeat_age": 1.0}]}
    scanner = CollectorRegistry(auto_describe=True)
    scanner.register(_Live(SimpleNamespace(status=lambda: status)))  # type: ignore[arg-type]
    text = generate_latest(node.registry).decode() + generate_latest(scanner).decode()
    return frozenset(s.name for fam in text_string_to_metric_families(text) for s in fam.samples)


@functools.cache
def exported_series() -> frozenset[str]:
    """Every sample name ingestd's registry exposes, with a busy worker and a recent completion so the
    scrape-time series appear too."""
    snapshot = {
        "counts": {"unprocessed": 1, "underprocess": 1, "processed": 1, "failed": 0},
        "oldest": {"unprocessed": 1.0, "underprocess": 1.0},
        "workers": [{"worker": 0, "file": "a.txt", "since": 1.0, "bytes": 1, "size": 2}],
        "recent": [{"file": "b.txt", "result": "processed", "duration": 0.1, "finished_at": 2.0}],
    }
    metrics = Metrics(lambda: snapshot)
    metrics.records.labels("processed")  # per-output children exist once a record was written
    text = generate_latest(metrics.registry).decode()
    return frozenset(s.name for fam in text_string_to_metric_families(text) for s in fam.samples)


# Values a Grafana with Prometheus scraping every 1 s would give the built-in variables: the same
# substitution the end-to-end test makes before running each query for real.
BUILTINS = {"__rate_interval": "30s", "__interval": "15s", "__range": "5m", "__range_s": "300", "__interval_ms": "15000"}


def panels(d: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows nest their panels
    return [p for p in out if p["type"] != "row"]


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Grafana's interpolation for $var, ${var} and [[var]]; unknown variables are left alone."""
    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        return variables.get(name, m.group(0))
    return re.sub(r"\$(\w+)|\$\{(\w+)\}|\[\[(\w+)\]\]", repl, expr)
