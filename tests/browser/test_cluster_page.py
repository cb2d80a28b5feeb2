"""The status page of a cluster's scanner (`ingestd run --broker ...`, issue 11) in a real headless Chromium: its
worker nodes, each one's current files and how long each has run, heartbeat ages, a missing node in red, the
scanner active or standby; the single-machine parts that do not apply are hidden.

Against a real redis-server, a real scanner and two real worker nodes (all started here), then against a scripted
/api/status for every field (hostile names as text, standby, the broker unreachable) and the switch back to a
single-machine answer. A screenshot is saved under the test's tmp dir, and to docs/status-page-cluster.png when
INGESTD_UPDATE_SCREENSHOT=1."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from support import ClusterProcess

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "ingestd" / "static" / "index.html"
SCREENSHOT = ROOT / "docs" / "status-page-cluster.png"
WAIT = 20_000  # ms: a scanner claims within a poll, a node takes the message, its heartbeat comes each second
LEASE = "3"  # seconds: heartbeats every second; a node is missing 9 s after its last one
HOSTILE = '<img src=x onerror="window.__xss=1">'


class Watched:
    """A page plus what went wrong in it: dialogs opened, console errors, uncaught errors; requests made."""

    def __init__(self, context: Any) -> None:
        self.page = context.new_page()
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("dialog", lambda d: (self.dialogs.append(f"{d.type}: {d.message}"), d.dismiss()))
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(f"console: {m.text}"))
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("request", lambda r: self.requests.append(r.url))


def _node_row(page: Any, name: str) -> Any:
    return page.locator(f"#nodes tbody tr[data-node='{name}']")


def test_scanner_page_shows_the_nodes_and_their_current_files(browser_context: Any, hang_config: Path,
                                                            start_daemon: Any, redis_server: Any,
                                                            tmp_path: Path) -> None:
    from playwright.sync_api import expect

    env = {"INGESTD_LEASE_TIME": LEASE, "INGESTD_STOP_TIMEOUT": "1", "INGESTD_SETTLE_TIME": "0.2"}
    scanner = start_daemon(args=["--broker", redis_server.url, "--config", str(hang_config)], env=env)
    nodes: dict[str, ClusterProcess] = {}
    try:
        for name, processes in (("n1", 2), ("n2", 1)):
            nodes[name] = ClusterProcess("worker", "--broker", redis_server.url, "--watch-dir", str(scanner.watch_dir),
                                         "--config", str(hang_config), "--listen", "127.0.0.1:0", "--node", name,
                                         "--processes", str(processes), "--log-format", "json", env=env)
        for n in nodes.values():
            n.started("node_started")

        w = Watched(browser_context)
        page = w.page
        page.goto(scanner.url)
        expect(page.locator("body")).to_have_attribute("data-conn", "live")
        expect(page.locator("#role")).to_be_visible()
        expect(page.locator("#role")).to_have_text("cluster scanner")
        expect(page.locator("#state")).to_have_text("active")
        expect(page.locator("#sec-nodes")).to_be_visible()
        for section in ("#sec-throughput", "#sec-workers", "#sec-recent"):  # a node's, not the scanner's
            expect(page.locator(section)).to_be_hidden()
        expect(page.locator("#watch-dir")).to_have_text(str(scanner.watch_dir.resolve()))
        expect(page.locator("#nodes tbody tr")).to_have_count(2, timeout=WAIT)
        for name, processes in (("n1", 2), ("n2", 1)):
            row = _node_row(page, name)
            expect(row.locator(".node")).to_have_text(name)
            expect(row.locator("td[data-label=Busy]")).to_have_text(f"0 of {processes}")
            expect(row.locator("td[data-label='Current files']")).to_have_text("idle")
            expect(row).to_contain_text(nodes[name].listen)
            expect(row.locator(".beat")).to_have_text(re.compile(r"^\d+\.\d s ago$"))
        expect(page.locator("#nodes tbody tr.missing")).to_have_count(0)
        expect(page.locator("#nodes-aside")).to_have_text("2 nodes · queue: 0 messages")

        # Done by a node, counted by the scanner from the folders; a failure with its reason.
        scanner.drop("ok.txt", b"one line\n")
        expect(page.locator("#count-processed")).to_have_text("1", timeout=WAIT)
        scanner.drop("blob.bin", b"\x7fELF\x00\x00binary\x00")
        expect(page.locator("#failures tbody tr").filter(has_text="blob.bin")).to_have_count(1, timeout=WAIT)
        expect(page.locator("#failures tbody .reason").first).to_have_text(re.compile(r"binary|NUL", re.IGNORECASE))

        # A file a node's child blocks on: shown on that node's row, with how long it has run.
        scanner.drop("stuck.log", b"a line\nHANG\n")
        current = page.locator("#nodes tbody ul.current li").filter(has=page.locator(".file", has_text="stuck.log"))
        expect(current).to_have_count(1, timeout=WAIT)
        expect(current.locator(".ran")).to_have_text(re.compile(r"^ · \d+ s$"))
        busy_row = page.locator("#nodes tbody tr").filter(has=page.locator("ul.current .file", has_text="stuck.log"))
        busy = busy_row.get_attribute("data-node")
        assert busy in nodes
        idle = "n2" if busy == "n1" else "n1"
        expect(busy_row.locator("td[data-label=Busy]")).to_have_text(f"1 of {2 if busy == 'n1' else 1}")
        expect(page.locator("#count-underprocess")).to_have_text("1")
        expect(page.locator("#oldest-underprocess")).to_have_text(re.compile(r"^oldest \d+ s$"), timeout=WAIT)
        expect(page.locator("#nodes-aside")).to_have_text("2 nodes · queue: 1 message")
        expect(current.locator(".ran")).to_have_text(re.compile(r"^ · ([3-9]|\d\d+) s$"), timeout=WAIT)  # it ticks

        # A node gone (kill -9, as a machine dies): MISSING in red once its heartbeat is three lease times old.
        nodes[idle].kill9()
        gone = _node_row(page, idle)
        expect(gone).to_have_class("missing", timeout=WAIT)
        expect(gone.locator(".missing-mark")).to_have_text("MISSING · ")
        color = gone.locator(".missing-mark").evaluate("e => getComputedStyle(e).color")
        assert color == "rgb(179, 38, 30)", f"MISSING is not red: {color}"
        expect(page.locator("#nodes-aside")).to_have_text("2 nodes, 1 missing · queue: 1 message")
        expect(_node_row(page, busy)).not_to_have_class("missing")

        shot = tmp_path / "status-page-cluster.png"
        page.screenshot(path=str(shot), full_page=True, animations="disabled")
        assert shot.stat().st_size > 10_000
        if os.environ.get("INGESTD_UPDATE_SCREENSHOT") == "1":
            shutil.copyfile(shot, SCREENSHOT)
        page.set_viewport_size({"width": 390, "height": 844})
        page.wait_for_timeout(300)
        overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, f"the page scrolls sideways on a phone by {overflow}px"

        assert w.dialogs == [] and w.errors == [], (w.dialogs, w.errors)
        foreign = [u for u in w.requests if not u.startswith(scanner.url)]
        assert foreign == [], f"the page fetched something from elsewhere: {foreign}"
    finally:
        for n in nodes.values():
            n.stop()


def _daemon_status(now: float) -> dict[str, Any]:
    """A single-machine answer (docs/api.md), no role."""
    return {"version": "0.1.0", "state": "running", "started_at": now - 60, "now": now, "watch_dir": "/srv/in",
            "counts": {"unprocessed": 0, "underprocess": 0, "processed": 3, "failed": 0},
            "oldest": {"unprocessed": 0.0, "underprocess": 0.0},
            "workers": [{"worker": 0, "file": None, "since": None, "bytes": 0, "size": 0}],
            "recent": [], "failures": [], "paused": None,
            "totals": {"processed": 3, "failed": 0, "recovered": 0, "bytes_in": 30, "bytes_out": 30},
            "throughput": {"files_per_second": 0.05, "bytes_per_second": 0.5},
            "health": {"ok": True, "problem": None}}


def _scanner_status(now: float, **over: Any) -> dict[str, Any]:
    s: dict[str, Any] = {
        "role": "scanner", "active": False, "version": "0.1.0", "state": "running", "started_at": now - 3700,
        "now": now, "watch_dir": "/srv/" + HOSTILE,
        "counts": {"unprocessed": 2, "underprocess": 1, "processed": 12, "failed": 0},
        "oldest": {"unprocessed": 0.0}, "oldest_claim_age": 75.0, "failures": [],
        "folders_left": {"count": 1, "names": ["batch" + HOSTILE], "recursive": False},
        "queue_messages": 3,
        "nodes": [
            {"node": "a" + HOSTILE, "host": "h" + HOSTILE, "pid": 41, "processes": 2, "listen": "10.0.0.5:9801",
             "current": [{"file": "f" + HOSTILE + ".log", "since": now - 75}, {"file": "g.csv", "since": now - 3}],
             "heartbeat_age": 0.4, "missing": False},
            {"node": "b", "host": "hb", "pid": 42, "processes": 1, "listen": "10.0.0.6:9801",
             "current": [{"file": "lost.txt", "since": now - 200}], "heartbeat_age": 65.0, "missing": True},
        ],
        "health": {"ok": False, "problem": "broker unreachable: " + HOSTILE},
    }
    s.update(over)
    return s


def test_scanner_fields_render_as_text_and_the_page_switches_roles(browser_context: Any) -> None:
    from playwright.sync_api import expect

    origin, now = "http://ingestd.test", 1764340100.0
    answer: dict[str, Any] = {"status": _daemon_status(now)}
    html = PAGE.read_bytes()

    def serve(route: Any) -> None:
        path = route.request.url[len(origin):].split("?")[0]
        if path == "/":
            route.fulfill(status=200, content_type="text/html; charset=utf-8", body=html)
        elif path == "/api/status":
            route.fulfill(status=200, content_type="application/json", body=json.dumps(answer["status"]))
        else:
            route.abort("connectionrefused")

    w = Watched(browser_context)
    page = w.page
    page.route(origin + "/**", serve)
    page.goto(origin + "/")

    # The single-machine page: nothing of the cluster shows.
    expect(page.locator("body")).to_have_attribute("data-conn", "live")
    expect(page.locator("#state")).to_have_text("running")
    expect(page.locator("#sec-workers")).to_be_visible()
    for hidden in ("#sec-nodes", "#role", "#broker-down"):
        expect(page.locator(hidden)).to_be_hidden()

    # A standby scanner whose broker is unreachable: every field as text.
    answer["status"] = _scanner_status(now)
    expect(page.locator("#state")).to_have_text("standby")
    expect(page.locator("#state")).to_have_attribute("data-state", "standby")
    expect(page.locator("#role")).to_be_visible()
    expect(page.locator("#broker-down")).to_be_visible()
    expect(page.locator("#broker-down-reason")).to_have_text("broker unreachable: " + HOSTILE)
    for section in ("#sec-throughput", "#sec-workers", "#sec-recent"):
        expect(page.locator(section)).to_be_hidden()
    expect(page.locator("#watch-dir")).to_have_text("/srv/" + HOSTILE)
    expect(page.locator("#oldest-underprocess")).to_have_text("oldest 1 min 15 s")
    expect(page.locator("#folders-left")).to_have_text("1 folder left as is (a cluster claims files only)")
    expect(page.locator("#nodes-aside")).to_have_text("2 nodes, 1 missing · queue: 3 messages")
    a = _node_row(page, "a" + HOSTILE.replace("'", "\\'"))
    expect(a.locator(".node")).to_have_text("a" + HOSTILE)
    expect(a).to_contain_text("h" + HOSTILE + " pid 41 · 10.0.0.5:9801")
    expect(a.locator("td[data-label=Busy]")).to_have_text("2 of 2")
    expect(a.locator("ul.current li")).to_have_text(["f" + HOSTILE + ".log · 1 min 15 s", "g.csv · 3 s"])
    expect(a.locator(".beat")).to_have_text("0.4 s ago")
    expect(a).not_to_have_class("missing")
    b = _node_row(page, "b")
    expect(b).to_have_class("missing")
    expect(b.locator(".beat")).to_have_text("MISSING · 1 min 5 s ago")
    expect(b.locator("ul.current li")).to_have_text(["lost.txt · 3 min 20 s"])
    assert page.evaluate("document.querySelectorAll('img').length") == 0
    assert page.evaluate("typeof window.__xss") == "undefined"

    # Active, the broker back, no nodes yet.
    answer["status"] = _scanner_status(now, active=True, nodes=[], queue_messages=0,
                                       health={"ok": True, "problem": None})
    expect(page.locator("#state")).to_have_text("active")
    expect(page.locator("#broker-down")).to_be_hidden()
    expect(page.locator("#nodes-empty")).to_be_visible()
    expect(page.locator("#nodes-aside")).to_have_text("queue: 0 messages")
    answer["status"] = _scanner_status(now, active=True, state="stopping", health={"ok": True, "problem": None})
    expect(page.locator("#state")).to_have_text("stopping")

    # A single-machine daemon on that address again (a port reused): the page follows.
    answer["status"] = _daemon_status(now)
    expect(page.locator("#sec-nodes")).to_be_hidden()
    expect(page.locator("#role")).to_be_hidden()
    expect(page.locator("#sec-workers")).to_be_visible()
    expect(page.locator("#state")).to_have_text("running")
    assert w.dialogs == [] and w.errors == [], (w.dialogs, w.errors)
