"""The shipped alert rules: promtool checks and unit tests, conventions, runbook links, metric names."""

from __future__ import annotations

import re
import subprocess
import urllib.parse
from pathlib import Path

import promql_parser
import pytest
import yaml

from obs_support import (ALERTS, ALERTS_TEST, EXAMPLE_CONFIG, PROMETHEUS_SERIES, RUNBOOK,
                         alert_rules, cluster_series, exported_series, github_anchor)


# Every runbook link: absolute under the Prometheus external label runbook_base when it is set,
# relative to the repository when it is not.
RUNBOOK_URL = "{{{{ with $externalLabels.runbook_base }}}}{{{{ . }}}}/{{{{ end }}}}docs/runbook.md#{anchor}"


def selectors(expr: str) -> list[str]:
    """Metric names of every vector selector in a PromQL expression."""
    names: list[str] = []

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names.append(node.name or "")
        for attr in ("lhs", "rhs", "expr", "param", "vector_selector"):
            child = getattr(node, attr, None)
            if isinstance(child, promql_parser.Expr):
                visit(child)
        for arg in getattr(node, "args", None) or []:
            visit(arg)

    visit(promql_parser.parse(expr))
    return names


def test_promtool_check_rules(promtool: str) -> None:
    r = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in r.stdout


def test_promtool_unit_tests_pass(promtool: str) -> None:
    r = subprocess.run([promtool, "test", "rules", ALERTS_TEST.name], capture_output=True, text=True,
                       cwd=ALERTS_TEST.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_promtool_unit_tests_really_check_annotations(promtool: str, tmp_path: Path) -> None:
    """A wrong expected description must fail: the unit tests check what operators will read."""
    (tmp_path / ALERTS.name).write_text(ALERTS.read_text())
    broken = ALERTS_TEST.read_text().replace("2 file(s) went to failed/", "3 file(s) went to failed/")
    assert broken != ALERTS_TEST.read_text()
    (tmp_path / "broken.test.yml").write_text(broken)
    r = subprocess.run([promtool, "test", "rules", "broken.test.yml"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0 and "IngestdFilesFailing" in r.stdout + r.stderr


def test_every_alert_links_to_its_runbook_section_under_runbook_base(promtool: str, tmp_path: Path) -> None:
    """The shipped unit tests rerun with the external label runbook_base set on every test group:
    each firing alert's rendered runbook_url is then the absolute <base>/docs/runbook.md#<alert>."""
    base = "http://wiki.internal:8080/ops/ingestd"  # a port and a path survive the template too
    (tmp_path / ALERTS.name).write_text(ALERTS.read_text())
    doc = yaml.safe_load(ALERTS_TEST.read_text())
    firing = 0
    for group in doc["tests"]:
        group["external_labels"] = {"runbook_base": base}
        for check in group.get("alert_rule_test", []):
            for exp in check.get("exp_alerts") or []:
                anchor = check["alertname"].lower()
                exp["exp_annotations"]["runbook_url"] = f"{base}/docs/runbook.md#{anchor}"
                firing += 1
    assert firing >= len(alert_rules())
    (tmp_path / "absolute.test.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    r = subprocess.run([promtool, "test", "rules", "absolute.test.yml"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_runbook_base_in_the_shipped_config_is_an_absolute_url_without_trailing_slash() -> None:
    base = yaml.safe_load(EXAMPLE_CONFIG.read_text())["global"]["external_labels"]["runbook_base"]
    parts = urllib.parse.urlsplit(base)
    assert parts.scheme == "https" and parts.netloc and not base.endswith("/"), base
    assert "runbook_base" in RUNBOOK.read_text(), "docs/runbook.md documents the setting"


def test_every_alert_is_unit_tested_firing_and_silent() -> None:
    doc = yaml.safe_load(ALERTS_TEST.read_text())
    assert doc["rule_files"] == [ALERTS.name]
    fires: set[str] = set()
    silent: set[str] = set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
            for exp in check.get("exp_alerts") or []:
                # Rendered annotations are part of every firing expectation.
                assert set(exp.get("exp_annotations", {})) == {"summary", "description", "runbook_url"}, check
    names = {r["alert"] for r in alert_rules()}
    assert names - fires == set(), "alerts never tested firing"
    assert names - silent == set(), "alerts never tested silent"
    assert (fires | silent) - names == set(), "tests for alerts that do not exist"


def test_required_alerts_exist() -> None:
    rules = {r["alert"]: r for r in alert_rules()}
    expr = {name: r["expr"] for name, r in rules.items()}
    assert "up{" in expr["IngestdDown"]
    assert "changes(process_start_time_seconds" in expr["IngestdCrashLooping"]
    assert 'folder="unprocessed"' in expr["IngestdBacklogGrowing"]
    assert "ingestd_folder_oldest_file_age_seconds" in expr["IngestdOldestUnprocessedTooOld"]
    assert "ingestd_files_total" in expr["IngestdStalled"]
    assert 'folder="underprocess"' in expr["IngestdFileStuck"]
    assert 'result="failed"' in expr["IngestdFilesFailing"]
    assert "ingestd_inotify_overflows_total" in expr["IngestdInotifyOverflows"]
    assert "ingestd_claiming_paused" in expr["IngestdClaimingPaused"]
    # More than one machine: a worker node missing (heartbeat or scrape), and claims waiting across nodes;
    # a worker node that is down is NodeMissing's, not IngestdDown's.
    assert "ingestd_cluster_node_heartbeat_age_seconds" in expr["IngestdNodeMissing"]
    assert "up{" in expr["IngestdNodeMissing"] and "ingestd_node_heartbeat_timestamp_seconds" in expr["IngestdNodeMissing"]
    assert "ingestd_node_heartbeat_timestamp_seconds" in expr["IngestdDown"]
    assert "ingestd_cluster_active" in expr["IngestdNodeMissing"] and "ingestd_cluster_active" in expr["IngestdClusterQueueLatency"]
    assert "ingestd_cluster_oldest_claim_age_seconds" in expr["IngestdClusterQueueLatency"]


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_conventions(rule: dict) -> None:
    assert re.fullmatch(r"Ingestd[A-Z][A-Za-z]+", rule["alert"])
    assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), "every alert has a for: duration"
    assert rule["labels"]["severity"] in ("critical", "warning")
    ann = rule["annotations"]
    assert ann["summary"] and "{{" not in ann["summary"], "summary is static (groups well in notifications)"
    assert "{{" in ann["description"] and "$labels.instance" in ann["description"]
    assert ann["runbook_url"] == RUNBOOK_URL.format(anchor=rule["alert"].lower())
    promql_parser.parse(rule["expr"])  # a second, independent PromQL parser agrees


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alerts_use_only_metrics_ingestd_exports(rule: dict) -> None:
    known = exported_series() | PROMETHEUS_SERIES | cluster_series()
    for name in selectors(rule["expr"]):
        assert name in known, f"{rule['alert']} uses {name!r}, which ingestd does not export"
        if name.startswith("ingestd_") or name.startswith("process_"):
            assert 'job="ingestd"' in rule["expr"]


def test_runbook_has_a_section_per_alert_and_nothing_else() -> None:
    text = RUNBOOK.read_text()
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    by_anchor = {github_anchor(s.splitlines()[0]): s for s in sections}
    wanted = {r["runbook_url"].split("#", 1)[1] for r in (x["annotations"] for x in alert_rules())}
    assert set(by_anchor) == wanted
    for anchor, body in by_anchor.items():
        for part in ("**Meaning.**", "**Check.**", "**Do.**"):
            assert part in body, f"runbook section {anchor} lacks {part}"
    # Links between sections resolve too.
    for link in re.findall(r"\]\(#([^)]+)\)", text):
        assert link in by_anchor, f"runbook links to missing #{link}"


def test_example_scrape_config_is_valid(promtool: str, tmp_path: Path) -> None:
    """The example prometheus.yml passes promtool once its rule file path points at the real rules."""
    doc = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    assert [Path(f).name for f in doc["rule_files"]] == [ALERTS.name]
    assert "ingestd" in [j["job_name"] for j in doc["scrape_configs"]], "the rules select job=\"ingestd\""
    doc["rule_files"] = [str(ALERTS)]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(doc))
    r = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
