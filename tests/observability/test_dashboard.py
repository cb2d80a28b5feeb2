"""The Grafana dashboard and provisioning, statically: Grafana's dashboard model (grafana-foundation-sdk),
the rules of Grafana's dashboard linter, PromQL that parses, and provisioning files that fit together."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from grafana_foundation_sdk.cog import runtime as cog_runtime  # Grafana's generated models (test extra)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models import dashboard as gmodel
from grafana_foundation_sdk.models import prometheus as gprom

from obs_support import (BUILTINS, DASHBOARD, GRAFANA, PROMETHEUS_SERIES, REPO, cluster_series, exported_series,
                         panels, substitute)

# Grafana's panel units (the dashboard linter's list, from grafana-data's valueFormats), those we may use.
UNITS = {"none", "short", "percent", "percentunit", "bytes", "decbytes", "Bps", "binBps", "s", "ms", "dtdurations",
         "dateTimeAsIso", "dateTimeAsLocal", "dateTimeFromNow", "cps", "cpm", "ops", "reqps", "bool"}


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def targets(d: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(p, t) for p in panels(d) for t in p.get("targets", [])]


def walk(node: object, parents: tuple[object, ...] = ()) -> list[tuple[object, tuple[object, ...]]]:
    """Every PromQL node with its ancestors, outermost first."""
    found = [(node, parents)]
    for attr in ("lhs", "rhs", "expr", "param", "vector_selector"):
        child = getattr(node, attr, None)
        if isinstance(child, promql_parser.Expr):
            found += walk(child, (*parents, node))
    for arg in getattr(node, "args", None) or []:
        found += walk(arg, (*parents, node))
    return found


def parsed(expr: str) -> promql_parser.Expr:
    # The linter's way: macros become durations, template variables stay inside their quotes.
    return promql_parser.parse(substitute(expr, BUILTINS))


RATE_MAGIC = "1h2m3s"  # a range no panel uses by hand, to recognise $__rate_interval after parsing


# --- Grafana's dashboard model -----------------------------------------------------------------------
def test_dashboard_identity() -> None:
    d = load()
    assert d["id"] is None, "id is assigned by each Grafana; provisioned dashboards carry none"
    assert d["uid"] == "ingestd-overview", "a stable uid keeps links and provisioning updates working"
    assert d["title"] == "ingestd" and d["schemaVersion"] >= 36
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"


def test_dashboard_round_trips_through_grafanas_model() -> None:
    """Decoding with grafana-foundation-sdk's generated Dashboard model and encoding again keeps every
    field: a misspelt or unknown key (the model would drop it) fails here."""
    register_default_plugins()
    src = load()
    model = gmodel.Dashboard.from_json(src)
    back = json.loads(json.dumps(model, cls=JSONEncoder))
    # Fields outside the SDK's model that Grafana itself writes: the null id of a provisioned dashboard,
    # and builtIn on Grafana's own "Annotations & Alerts" entry.
    allowed = {"/id", "/annotations/list[0]/builtIn"}
    dropped: list[str] = []

    def compare(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict):
            assert isinstance(b, dict), path
            for k, v in a.items():
                if k not in b:
                    dropped.append(f"{path}/{k}")
                else:
                    compare(v, b[k], f"{path}/{k}")
        elif isinstance(a, list):
            assert isinstance(b, list) and len(a) == len(b), path
            for i, (x, y) in enumerate(zip(a, b)):
                compare(x, y, f"{path}[{i}]")
        else:
            assert a == b, f"{path}: {a!r} became {b!r}"

    compare(src, back, "")
    assert set(dropped) == allowed, f"fields unknown to Grafana's model: {sorted(set(dropped) - allowed)}"

    known_panels = set(cog_runtime.Runtime().panelcfg_variants)
    for p in model.panels or []:
        if isinstance(p, gmodel.RowPanel):
            continue
        assert p.type_val in known_panels, f"unknown panel type {p.type_val}"
        for t in p.targets or []:
            assert isinstance(t, gprom.Dataquery), f"panel {p.title}: target is not a Prometheus query"


# --- Grafana's dashboard linter rules ---------------------------------------------------------------
def variable(d: dict[str, Any], name: str) -> dict[str, Any]:
    found = [v for v in d["templating"]["list"] if v["name"] == name]
    assert found, f"no ${name} template variable"
    return found[0]


def test_template_datasource_rule() -> None:
    ds = [v for v in load()["templating"]["list"] if v["type"] == "datasource"]
    assert len(ds) == 1
    assert ds[0]["name"] == "datasource" and ds[0]["label"] == "Data source" and ds[0]["query"] == "prometheus"


@pytest.mark.parametrize("name", ["job", "instance"])
def test_template_job_instance_rules(name: str) -> None:
    v = variable(load(), name)
    assert v["type"] == "query"
    assert v["datasource"]["uid"] in ("$datasource", "${datasource}")
    assert v["label"] == name.title()
    assert v["multi"] is True and v["includeAll"] is True and v["allValue"] == ".+"
    assert v["refresh"] == 2, "reload on time range change (template-on-time-change-reload)"


def test_template_label_promql_rule() -> None:
    for v in load()["templating"]["list"]:
        if v["type"] != "query":
            continue
        m = re.fullmatch(r"(label_names|label_values|metrics|query_result)\((.+)\)", v["query"])
        assert m, f"variable {v['name']}: {v['query']!r}"
        if m.group(1) == "label_values":
            selector, _, label = m.group(2).rpartition(",")
            promql_parser.parse(selector)
            assert label.strip() == v["name"]


@pytest.mark.parametrize("panel", panels(load()), ids=lambda p: p["title"])
def test_panel_rules(panel: dict[str, Any]) -> None:
    # panel-title-description-rule
    assert panel["title"].strip() and panel["description"].strip()
    # panel-datasource-rule (and every target too)
    assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    # panel-units-rule, overrides included
    assert panel["fieldConfig"]["defaults"]["unit"] in UNITS
    for o in panel["fieldConfig"]["overrides"]:
        for prop in o["properties"]:
            if prop["id"] == "unit":
                assert prop["value"] in UNITS
    # panel-no-targets-rule
    assert panel["targets"], "a panel without queries"
    assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
    for t in panel["targets"]:
        assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


@pytest.mark.parametrize("target", [t for _, t in targets(load())], ids=lambda t: t["expr"][:60])
def test_target_rules(target: dict[str, Any]) -> None:
    expr = target["expr"]
    # target-promql-rule: parses once macros are substituted
    ast = promql_parser.parse(substitute(expr, {**BUILTINS, "__rate_interval": RATE_MAGIC}))
    for node, parents in walk(ast):
        if isinstance(node, promql_parser.VectorSelector):
            matchers = {m.name: m for m in node.matchers.matchers}
            # target-job-rule / target-instance-rule: =~"$job", =~"$instance" on every selector
            for label in ("job", "instance"):
                assert label in matchers, f"{node} lacks a {label} matcher"
                assert matchers[label].op == promql_parser.MatchOp.Re and matchers[label].value == f"${label}"
            # target-counter-agg-rule: a counter only inside rate/irate/increase
            if (node.name or "").endswith("_total"):
                assert len(parents) >= 2 and isinstance(parents[-1], promql_parser.MatrixSelector)
                assert isinstance(parents[-2], promql_parser.Call)
                assert parents[-2].func.name in ("rate", "irate", "increase"), f"{node} not aggregated"
        if isinstance(node, promql_parser.MatrixSelector) and parents and isinstance(parents[-1], promql_parser.Call):
            # target-rate-interval-rule: rate()/irate() over $__rate_interval
            if parents[-1].func.name in ("rate", "irate"):
                assert promql_parser.display_duration(node.range) == RATE_MAGIC, f"{expr}: use $__rate_interval"


def test_queries_use_only_metrics_ingestd_exports() -> None:
    known = exported_series() | PROMETHEUS_SERIES | cluster_series()
    for _, t in targets(load()):
        for node, _ in walk(parsed(t["expr"])):
            if isinstance(node, promql_parser.VectorSelector):
                assert node.name in known, f"{t['expr']}: {node.name} is not exported by ingestd"


def test_required_panels_are_there() -> None:
    exprs = "\n".join(t["expr"] for _, t in targets(load()))
    for needle in [
        "ingestd_folder_files{",                                   # folder counts over time
        "rate(ingestd_files_total{",                               # throughput
        "rate(ingestd_input_bytes_total{",
        "histogram_quantile(0.5, sum by (instance, le) (rate(ingestd_pickup_latency_seconds_bucket",
        "histogram_quantile(0.99, sum by (instance, le) (rate(ingestd_pickup_latency_seconds_bucket",
        "histogram_quantile(0.5, sum by (instance, le) (rate(ingestd_processing_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (instance, le) (rate(ingestd_processing_duration_seconds_bucket",
        "ingestd_worker_file_info{",                               # current file per worker
        "ingestd_recent_file_finished_timestamp_seconds{",         # recent completions
        'result="failed"',                                         # failures
        "ingestd_folder_oldest_file_age_seconds{",                 # oldest-file ages
        "changes(process_start_time_seconds{",                     # restarts
        "ALERTS{",                                                 # alert state
    ]:
        assert needle in exprs, needle


def test_cluster_row_shows_nodes_rate_per_instance_and_oldest_claim() -> None:
    """More than one machine (docs/distributed.md): a Cluster row, collapsed (it is empty on one machine),
    with the live nodes, files/s per instance (each worker node's share) and the oldest unfinished claim."""
    top = load()["panels"]
    rows = [p for p in top if p["type"] == "row" and p["title"] == "Cluster"]
    assert len(rows) == 1 and rows[0]["collapsed"] is True and rows[0]["panels"]
    exprs = "\n".join(t["expr"] for p in rows[0]["panels"] for t in p["targets"])
    for needle in ["ingestd_cluster_nodes{", "ingestd_cluster_queue_messages{",
                   'sum by (instance) (rate(ingestd_files_total{job=~"$job", instance=~"$instance", result="processed"}',
                   "ingestd_cluster_oldest_claim_age_seconds{", "ingestd_cluster_node_heartbeat_age_seconds{"]:
        assert needle in exprs, needle
    # Collapsed rows keep their panels' places: below every other panel, side by side, not overlapping.
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in top if p is not rows[0])
    assert rows[0]["gridPos"]["y"] == bottom
    spans = sorted((p["gridPos"]["x"], p["gridPos"]["x"] + p["gridPos"]["w"]) for p in rows[0]["panels"])
    assert all(p["gridPos"]["y"] == bottom + 1 for p in rows[0]["panels"])
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)) and spans[-1][1] <= 24


# --- provisioning -----------------------------------------------------------------------------------
def test_provisioning_files() -> None:
    sources = [yaml.safe_load(p.read_text()) for p in sorted((GRAFANA / "provisioning" / "datasources").glob("*.yaml"))]
    assert sources, "no data source provisioning file"
    for doc in sources:
        assert doc["apiVersion"] == 1
        for ds in doc["datasources"]:
            assert ds["type"] == "prometheus" and ds["access"] == "proxy"
            assert ds["name"] and ds["uid"] and re.match(r"https?://", ds["url"])
    providers = [p for f in sorted((GRAFANA / "provisioning" / "dashboards").glob("*.yaml"))
                 for p in yaml.safe_load(f.read_text())["providers"]]
    assert len(providers) == 1 and providers[0]["type"] == "file"
    path = providers[0]["options"]["path"]

    compose = yaml.safe_load((GRAFANA / "docker-compose.yml").read_text())
    mounts: dict[str, Path] = {}
    for service in compose["services"].values():
        for vol in service.get("volumes", []):
            src, dst = vol.split(":")[:2]
            if src.startswith("."):
                host = (GRAFANA / src).resolve()
                assert host.exists(), f"docker-compose mounts {src}, which does not exist"
                mounts[dst] = host
    assert mounts[path] == DASHBOARD.parent.resolve(), "the provider's path is where the dashboards are mounted"
    assert mounts["/etc/grafana/provisioning"] == (GRAFANA / "provisioning").resolve()
    prom_config = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    for rule_file in prom_config["rule_files"]:
        assert rule_file in mounts, f"prometheus.yml loads {rule_file}, which compose does not mount"
    assert (GRAFANA / "README.md").exists() or (REPO / "docs" / "observability.md").exists()
