"""The alert path end to end, every component real: an ingestd daemon killed with kill -9, a Prometheus
scraping it every second and evaluating the shipped rules (short `for:`) with the shipped `runbook_base`,
an Alertmanager running the shipped alertmanager.yml (only its timings shortened and its webhook pointed
at the test), and an HTTP listener in the test as the webhook receiver. Also: the shipped
alertmanager.yml passes amtool and routes every ingestd alert to the webhook."""

from __future__ import annotations

import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from obs_support import (ALERTMANAGER_CONFIG, EXAMPLE_CONFIG, Alertmanager, Prometheus, WebhookReceiver,
                         alert_rules, children, fast_rules, need_binary, reap)
from support import DaemonProcess, wait_for

FOR = "3s"             # every alert's for: in the test copy of the rules
NOTIFIED_WITHIN = 25   # seconds from kill -9 to the webhook: 1 s scrapes, for: 3s, group_wait 1s, slack


def runbook_base() -> str:
    """The one setting behind absolute runbook links, as the shipped prometheus.yml sets it."""
    base = yaml.safe_load(EXAMPLE_CONFIG.read_text())["global"]["external_labels"]["runbook_base"]
    assert isinstance(base, str)
    return base


def webhook_url(config: dict[str, Any], receiver: str) -> str:
    [hook] = next(r for r in config["receivers"] if r["name"] == receiver)["webhook_configs"]
    url = hook["url"]
    assert isinstance(url, str)
    return url


def test_shipped_alertmanager_config_passes_amtool(amtool: str) -> None:
    r = subprocess.run([amtool, "check-config", str(ALERTMANAGER_CONFIG)], capture_output=True, text=True)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_shipped_route_sends_every_ingestd_alert_to_the_webhook(amtool: str, rule: dict[str, Any]) -> None:
    """The labels an alert reaches Alertmanager with: its rule's labels, job="ingestd", and the
    external labels of the shipped prometheus.yml."""
    labels = {"alertname": rule["alert"], "job": "ingestd", "instance": "host-a:9800", **rule["labels"],
              "runbook_base": runbook_base()}
    r = subprocess.run([amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER_CONFIG}",
                        *(f"{k}={v}" for k, v in labels.items())], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split() == ["ingestd-webhook"]


def test_other_jobs_alerts_do_not_reach_the_ingestd_webhook(amtool: str) -> None:
    r = subprocess.run([amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER_CONFIG}",
                        "alertname=NodeDown", "job=node", "severity=critical"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split() == ["default"]


def test_killed_daemon_notifies_ingestd_down_with_an_absolute_runbook_url(tmp_path: Path) -> None:
    need_binary("prometheus")
    need_binary("prometheus-alertmanager")
    base = runbook_base()
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    shipped_url = urllib.parse.urlsplit(webhook_url(config, "ingestd-webhook"))
    # Only what a test cannot wait for changes: the timings, and where the webhook points.
    config["route"].update(group_wait="1s", group_interval="1s")
    with WebhookReceiver() as hook:
        [hook_config] = next(r for r in config["receivers"] if r["name"] == "ingestd-webhook")["webhook_configs"]
        hook_config["url"] = hook.url + shipped_url.path
        daemon = DaemonProcess(tmp_path / "watch", "--workers", "1", env={"INGESTD_STOP_TIMEOUT": "1"})
        alertmanager = Alertmanager(tmp_path / "alertmanager", yaml.safe_dump(config))
        prometheus: Prometheus | None = None
        pids: list[int] = []
        try:
            daemon.started()
            instance = daemon.url.removeprefix("http://")
            alertmanager.start()
            prometheus = Prometheus(tmp_path / "prometheus", [instance], fast_rules(FOR),
                                    external_labels={"runbook_base": base},
                                    alertmanagers=[alertmanager.address]).start()
            wait_for(lambda: prometheus is not None and prometheus.targets_up() == {instance: "up"}, 20, 0.2,
                     "the daemon scraped")
            # Before the first scrape no up{job="ingestd"} exists, which IngestdDown reports too (without
            # an instance) if the scrape is slow: let that settle, the test is about the killed daemon.
            wait_for(lambda: prometheus is not None and not prometheus.alerts("IngestdDown"), 20, 0.2,
                     "no IngestdDown while the daemon is up")
            pids = children(daemon.proc.pid)
            daemon.kill()  # kill -9: no goodbye
            killed = time.monotonic()

            def notified() -> tuple[dict[str, Any], dict[str, Any]] | None:
                for notification, alert in hook.alerts():
                    if (alert["labels"]["alertname"] == "IngestdDown" and alert["status"] == "firing"
                            and alert["labels"].get("instance") == instance):
                        return notification, alert
                return None

            notification, alert = wait_for(notified, NOTIFIED_WITHIN, 0.1, "IngestdDown at the webhook")
            elapsed = time.monotonic() - killed
        finally:
            daemon.stop(timeout=20)
            reap(pids)
            if prometheus is not None:
                prometheus.stop()
            alertmanager.stop()

    assert notification["path"] == shipped_url.path and notification["receiver"] == "ingestd-webhook"
    assert notification["status"] == "firing"
    assert alert["labels"] == {"alertname": "IngestdDown", "job": "ingestd", "instance": instance,
                               "severity": "critical", "runbook_base": base}
    url = alert["annotations"]["runbook_url"]
    assert url == f"{base}/docs/runbook.md#ingestddown"
    parts = urllib.parse.urlsplit(url)
    assert parts.scheme in ("http", "https") and parts.netloc, f"runbook_url is not absolute: {url}"
    assert instance in alert["annotations"]["description"]
    # The daemon was idle and healthy until the kill: IngestdDown is the only alert anyone was sent.
    print(f"\nIngestdDown at the webhook {elapsed:.1f}s after kill -9")
