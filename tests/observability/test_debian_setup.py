"""packaging/prometheus/debian-setup.sh, the documented way to add ingestd to Debian's Prometheus 2.42
(which cannot include scrape jobs from another file): run on a copy of Debian's stock prometheus.yml,
then loaded by a real Prometheus; run again it changes nothing; on a file it cannot edit safely it
changes nothing and says why."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from obs_support import ALERTS, DEBIAN_PROMETHEUS_YML, DEBIAN_SETUP, Prometheus, alert_rules, need_binary
from support import wait_for

BASE = "https://docs.example.com/ingestd"


def setup(confdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    need_binary("promtool")  # the script checks its result with it
    return subprocess.run(["sh", str(DEBIAN_SETUP), *args], env={"CONFDIR": str(confdir), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True)


@pytest.fixture
def debian(tmp_path: Path) -> Path:
    """A CONFDIR holding Debian's stock prometheus.yml."""
    (tmp_path / "prometheus.yml").write_text(DEBIAN_PROMETHEUS_YML.read_text())
    return tmp_path


def test_adds_rules_job_and_runbook_base_to_debians_stock_config(debian: Path) -> None:
    r = setup(debian, BASE + "/")  # a trailing slash is dropped
    assert r.returncode == 0, r.stdout + r.stderr
    config = debian / "prometheus.yml"
    doc = yaml.safe_load(config.read_text())
    assert doc["rule_files"] == [str(debian / "ingestd-alerts.yml")]
    assert (debian / "ingestd-alerts.yml").read_text() == ALERTS.read_text()
    assert doc["global"]["external_labels"] == {"monitor": "example", "runbook_base": BASE}
    jobs = {j["job_name"]: j for j in doc["scrape_configs"]}
    assert set(jobs) == {"prometheus", "node", "ingestd"}
    assert jobs["ingestd"]["static_configs"] == [{"targets": ["127.0.0.1:9800"]}]
    assert doc["alerting"] == {"alertmanagers": [{"static_configs": [{"targets": ["localhost:9093"]}]}]}
    # The operator's file is edited, not rewritten: every line of it is still there, in order.
    stock = DEBIAN_PROMETHEUS_YML.read_text().splitlines()
    lines = iter(config.read_text().splitlines())
    assert all(line in lines for line in stock)
    assert (debian / "prometheus.yml.before-ingestd").read_text() == DEBIAN_PROMETHEUS_YML.read_text()
    assert sorted(p.name for p in debian.iterdir()) == ["ingestd-alerts.yml", "prometheus.yml",
                                                        "prometheus.yml.before-ingestd"]


def test_the_result_loads_in_a_real_prometheus(debian: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    assert setup(debian, BASE).returncode == 0
    prometheus = Prometheus(tmp_path_factory.mktemp("prometheus"), [], "groups: []\n")
    (prometheus.workdir / "prometheus.yml").write_text((debian / "prometheus.yml").read_text())
    prometheus.start()
    try:
        def loaded() -> dict[str, Any] | None:
            groups = {g["name"]: g for g in prometheus.api("rules")["groups"]}
            return groups.get("ingestd")
        group = wait_for(loaded, 10, 0.1, "the ingestd rule group loaded")
        assert {r["name"] for r in group["rules"]} == {r["alert"] for r in alert_rules()}
        def jobs() -> dict[str, str]:
            return {t["labels"]["job"]: t["scrapeUrl"] for t in prometheus.api("targets")["activeTargets"]}
        wait_for(lambda: "ingestd" in jobs(), 10, 0.1, "the ingestd scrape job active")
        assert jobs()["ingestd"] == "http://127.0.0.1:9800/metrics"
        loaded_config = yaml.safe_load(prometheus.api("status/config")["yaml"])
        assert loaded_config["global"]["external_labels"]["runbook_base"] == BASE
    finally:
        prometheus.stop()


def test_running_it_again_changes_nothing(debian: Path) -> None:
    assert setup(debian, BASE).returncode == 0
    once = (debian / "prometheus.yml").read_bytes()
    r = setup(debian, "https://elsewhere.example.com")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (debian / "prometheus.yml").read_bytes() == once
    assert (debian / "prometheus.yml.before-ingestd").read_text() == DEBIAN_PROMETHEUS_YML.read_text()


def test_a_minimal_config_without_global_or_rule_files_gets_both(tmp_path: Path) -> None:
    """Lists written without indentation, no global: and no rule_files: sections."""
    (tmp_path / "prometheus.yml").write_text(
        "scrape_configs:\n- job_name: node\n  static_configs:\n  - targets: ['localhost:9100']\n")
    r = setup(tmp_path, BASE)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = yaml.safe_load((tmp_path / "prometheus.yml").read_text())
    assert [j["job_name"] for j in doc["scrape_configs"]] == ["node", "ingestd"]
    assert doc["rule_files"] == [str(tmp_path / "ingestd-alerts.yml")]
    assert doc["global"] == {"external_labels": {"runbook_base": BASE}}


@pytest.mark.parametrize("text, why", [
    (("scrape_configs:\n  - job_name: node\n    static_configs:\n      - targets: ['localhost:9100']\n"
      "rule_files:\n  - other.yml\n"), "scrape_configs: is not the last section"),
    (("global:\n  external_labels: {monitor: a}\nscrape_configs:\n  - job_name: node\n"
      "    static_configs:\n      - targets: ['localhost:9100']\n"), "external_labels: is written inline"),
    ("global:\n  scrape_interval: fortnightly\nscrape_configs:\n", "promtool rejects"),
], ids=["job-not-last", "inline-labels", "invalid"])
def test_a_config_it_cannot_edit_safely_is_left_untouched(tmp_path: Path, text: str, why: str) -> None:
    (tmp_path / "prometheus.yml").write_text(text)
    r = setup(tmp_path, BASE)
    assert r.returncode != 0 and why in r.stderr and "by hand" in r.stderr, r.stderr
    assert (tmp_path / "prometheus.yml").read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ingestd-alerts.yml", "prometheus.yml"]


def test_without_a_runbook_base_it_says_how_to_call_it(debian: Path) -> None:
    r = setup(debian)
    assert r.returncode != 0 and "usage: debian-setup.sh RUNBOOK_BASE" in r.stderr
    assert (debian / "prometheus.yml").read_text() == DEBIAN_PROMETHEUS_YML.read_text()
