"""Helpers for the observability suites: paths of the shipped files, a real prometheus server in a
subprocess (1 s scrapes and rule evaluation, the alert rules loaded) with a small API client, and
the shipped rules made fast for end-to-end tests."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ingestd.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
ALERTS = REPO / "packaging" / "prometheus" / "ingestd-alerts.yml"
ALERTS_TEST = REPO / "packaging" / "prometheus" / "ingestd-alerts.test.yml"
EXAMPLE_CONFIG = REPO / "packaging" / "prometheus" / "prometheus.yml"
RUNBOOK = REPO / "docs" / "runbook.md"
DASHBOARD = REPO / "grafana" / "dashboards" / "ingestd.json"
GRAFANA = REPO / "grafana"


def need_binary(name: str) -> str:
    """The binary's path; else skip with the reason (fail under CI=true, where it must be there)."""
    path = shutil.which(name)
    if path:
        return path
    reason = (f"`{name}` is not installed: Debian's `prometheus` package brings prometheus and promtool "
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


class Prometheus:
    """A real prometheus server in a subprocess, with a tiny client for its HTTP API."""

    def __init__(self, workdir: Path, targets: list[str], rules_text: str) -> None:
        self.binary = need_binary("prometheus")
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        (workdir / "rules.yml").write_text(rules_text)
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(workdir / "rules.yml")],
            "scrape_configs": [{"job_name": "ingestd", "static_configs": [{"targets": targets}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.log = workdir / "prometheus.log"

    def start(self, timeout: float = 30.0) -> Prometheus:
        for _attempt in range(3):  # a free port can be taken between our probe and prometheus' bind
            port = free_port()
            self.url = f"http://127.0.0.1:{port}"
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(
                    [self.binary, f"--config.file={self.workdir / 'prometheus.yml'}",
                     f"--storage.tsdb.path={self.workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                     "--log.level=warn"],
                    stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                        if r.status == 200:
                            return self
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                time.sleep(0.1)
            self.stop()
        raise AssertionError(f"prometheus did not become ready; its log:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

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


def github_anchor(heading: str) -> str:
    """The fragment GitHub (and most Markdown renderers) give a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


# Series that come from Prometheus itself, not from ingestd.
PROMETHEUS_SERIES = {"up", "ALERTS", "ALERTS_FOR_STATE"}


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
    metrics.records.labels("")  # per-output children exist once a record was written
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
