"""The live status page (`/`, ingestd/static/index.html) in a real headless Chromium against a real ingestd.

Files dropped into unprocessed/ must show up on the page without a reload, every file name and reason
as literal text, failures with their reasons; the page must say when the daemon is unreachable and
recover when it answers again. A screenshot is saved under the test's tmp dir, and also to
docs/status-page.png (the README's) when INGESTD_UPDATE_SCREENSHOT=1.

`python tests/browser/test_status_page.py --csp-hash` rewrites the page's Content-Security-Policy
hash after its inline script was edited."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any


ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "ingestd" / "static" / "index.html"
SCREENSHOT = ROOT / "docs" / "status-page.png"
XSS = "<img src=x onerror=alert(1)>.txt"
LONG = "sensor-export-" + "0123456789abcdef" * 12 + ".jsonl"  # no spaces: must wrap, not widen the page
WAIT = 15_000  # ms: a file dropped until the page shows it (the daemon answers within a second or two)

SCRIPT_RE = re.compile(r"<script>(.*?)</script>", re.S)
CSP_RE = re.compile(r"script-src 'sha256-([^']*)'")


def _script_hash(html: str) -> str:
    scripts = SCRIPT_RE.findall(html)
    assert len(scripts) == 1, "the page must have exactly one inline <script> (and no external ones)"
    return base64.b64encode(hashlib.sha256(scripts[0].encode("utf-8")).digest()).decode()


# ---- static checks: no browser needed ----------------------------------------------------------------

def test_page_is_self_contained_and_never_parses_data_as_html() -> None:
    html = PAGE.read_text("utf-8")
    # Nothing fetched from elsewhere: no external scripts, styles, fonts or images (works offline).
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I), "external resource"
    assert not re.search(r"@import|url\(\s*['\"]?(https?:)?//", html, re.I), "external CSS resource"
    assert "<script src" not in html.lower()
    # Data only ever goes in as text.
    script = SCRIPT_RE.findall(html)[0]
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, f"{sink} in the page's script: insert data with textContent only"
    assert 'name="viewport"' in html, "needs a viewport meta tag to be readable on a phone"


def test_csp_hash_matches_the_inline_script() -> None:
    html = PAGE.read_text("utf-8")
    found = CSP_RE.search(html)
    assert found, "the page's Content-Security-Policy must allow its script by hash"
    assert found.group(1) == _script_hash(html), (
        "the page's script changed but its CSP hash did not (the browser would refuse to run it): "
        "run python tests/browser/test_status_page.py --csp-hash")


# ---- in Chromium, against a real daemon ----------------------------------------------------------------

class Watched:
    """A page plus what it did: dialogs opened, console errors, uncaught errors, requests made."""

    def __init__(self, context: Any) -> None:
        self.page = context.new_page()
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.navigations = 0
        self.page.on("dialog", lambda d: (self.dialogs.append(f"{d.type}: {d.message}"), d.dismiss()))
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(f"console: {m.text}"))
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("framenavigated", self._navigated)

    def _navigated(self, frame: Any) -> None:
        if frame == self.page.main_frame:
            self.navigations += 1


def _exactly(name: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(name) + "$")


def _file_cells(page: Any, table: str, name: str) -> Any:
    """The .file cells of a table whose whole text is exactly `name`."""
    return page.locator(f"#{table} tbody .file").filter(has_text=_exactly(name))


def test_page_follows_the_daemon_live(browser_context: Any, hang_config: Path, start_daemon: Any,
                                     tmp_path: Path) -> None:
    from playwright.sync_api import expect

    # Lines pass through unchanged, but a line containing HANG blocks its worker: a busy worker at the end.
    daemon = start_daemon(args=["--config", str(hang_config)], env={"INGESTD_STOP_TIMEOUT": "1"})
    w = Watched(browser_context)
    page = w.page
    page.goto(daemon.url)
    expect(page.locator("body")).to_have_attribute("data-conn", "live")
    expect(page.locator("#state")).to_have_text("running")
    expect(page.locator("#version")).to_have_text(re.compile(r"^v\d+\.\d+"))
    expect(page.locator("#count-processed")).to_have_text("0")
    expect(page.locator("#workers tbody tr")).to_have_count(daemon.workers)
    expect(page.locator("#recent-empty")).to_be_visible()
    # Anything the page sets on window survives only if it never reloads.
    page.evaluate("window.__ingestdTestMarker = 'same document'")
    navigations = w.navigations

    # Text files: the counts and the completions list change on their own.
    names = ["alpha.txt", "beta.log", "gamma.csv", LONG]
    for name in names:
        daemon.drop(name, f"first line of {name}\nsecond line\n".encode())
    expect(page.locator("#count-processed")).to_have_text(str(len(names)), timeout=WAIT)
    expect(page.locator("#recent tbody tr")).to_have_count(len(names), timeout=WAIT)
    for name in names:
        expect(_file_cells(page, "recent", name)).to_have_count(1)
    expect(page.locator("#recent tbody tr[data-result=processed]")).to_have_count(len(names))
    expect(page.locator("#count-unprocessed")).to_have_text("0")
    expect(page.locator("#recent-empty")).to_be_hidden()
    expect(page.locator("#total-processed")).to_have_text(str(len(names)))

    # A hostile name is shown as literal text: no element made of it, no script run.
    daemon.drop(XSS, b"harmless\n")
    expect(page.locator("#count-processed")).to_have_text(str(len(names) + 1), timeout=WAIT)
    cell = _file_cells(page, "recent", XSS)
    expect(cell).to_have_count(1, timeout=WAIT)
    assert cell.text_content() == XSS
    assert page.evaluate("document.querySelectorAll('img').length") == 0
    assert page.evaluate("typeof window.__xss") == "undefined"

    # A binary file fails, with its reason, in the failures table and in the completions list.
    daemon.drop("blob.bin", b"\x7fELF\x00\x00binary\x00")
    expect(page.locator("#count-failed")).to_have_text("1", timeout=WAIT)
    row = page.locator("#failures tbody tr").filter(has=page.locator(".file", has_text=_exactly("blob.bin")))
    expect(row).to_have_count(1, timeout=WAIT)
    reason = row.locator(".reason").first
    expect(reason).to_have_text(re.compile(r"binary|NUL", re.I))
    expect(page.locator("#recent tbody tr[data-result=failed]").filter(has_text="blob.bin")).to_have_count(1)
    expect(page.locator("#failures-empty")).to_be_hidden()

    # Same document all along, polling all along.
    assert page.evaluate("window.__ingestdTestMarker") == "same document", "the page reloaded"
    assert w.navigations == navigations, "the page navigated"
    polls = int(page.locator("body").get_attribute("data-polls") or 0)
    expect(page.locator("body")).not_to_have_attribute("data-polls", str(polls), timeout=5_000)

    # A worker busy on a big file: its name, a progress bar with how far it got, since when.
    stuck = "nightly-export.log"
    # ~47 MB: over a second of work before the HANG line even on a fast machine, so the worker reports
    # progress (every 0.25 s) before it blocks.
    daemon.drop(stuck, b"an ordinary line of text in a big file\n" * 1_200_000 + b"HANG\n")
    busy = page.locator("#workers tbody tr").filter(has=page.locator(".file", has_text=_exactly(stuck)))
    expect(busy).to_have_count(1, timeout=WAIT)
    expect(page.locator("#count-underprocess")).to_have_text("1")
    expect(page.locator("#workers-busy")).to_have_text(f"1 of {daemon.workers} busy")
    bar = busy.locator("[role=progressbar]")
    expect(bar).not_to_have_attribute("aria-valuenow", "0", timeout=WAIT)  # progress reported while it ran
    expect(busy.locator("time")).to_have_count(1)

    try:  # cosmetic, for the README's picture: a bar some way along rather than just started
        expect(bar).to_have_attribute("aria-valuenow", re.compile(r"^([4-9]\d|100)$"), timeout=3_000)
    except AssertionError:
        pass
    shot = tmp_path / "status-page.png"
    page.screenshot(path=str(shot), full_page=True, animations="disabled")  # the "new row" highlight done
    assert shot.stat().st_size > 10_000
    if os.environ.get("INGESTD_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, SCREENSHOT)

    # Readable on a phone: nothing wider than the screen, the long name wraps.
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(300)
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"the page scrolls sideways on a phone by {overflow}px"
    page.screenshot(path=str(tmp_path / "status-page-phone.png"), full_page=True, animations="disabled")

    assert w.dialogs == [], f"a dialog opened: {w.dialogs}"
    assert w.errors == [], f"errors in the page: {w.errors}"
    origin = daemon.url.rstrip("/")
    foreign = [u for u in w.requests if not u.startswith(origin + "/")]
    assert foreign == [], f"the page fetched something from elsewhere: {foreign}"


def test_page_says_when_the_daemon_is_unreachable_and_recovers(browser_context: Any, daemon: Any) -> None:
    from playwright.sync_api import expect

    w = Watched(browser_context)
    page = w.page
    page.goto(daemon.url)
    expect(page.locator("body")).to_have_attribute("data-conn", "live")
    expect(page.locator("#unreachable")).to_be_hidden()
    daemon.drop("before.txt", b"one\n")
    expect(page.locator("#count-processed")).to_have_text("1", timeout=WAIT)
    page.evaluate("window.__ingestdTestMarker = 'same document'")

    port = daemon.address
    daemon.stop()
    expect(page.locator("#unreachable")).to_be_visible(timeout=WAIT)
    expect(page.locator("body")).to_have_attribute("data-conn", "down")
    expect(page.locator("#conn")).to_have_text("unreachable")
    expect(page.locator("#count-processed")).to_have_text("1")  # the last known figures stay
    expect(page.locator("#state")).to_have_text("state unknown")

    daemon.listen = port  # the same address the page polls
    daemon.start()
    daemon.drop("after.txt", b"two\n")
    expect(page.locator("body")).to_have_attribute("data-conn", "live", timeout=WAIT)
    expect(page.locator("#unreachable")).to_be_hidden()
    expect(page.locator("#state")).to_have_text("running")
    expect(page.locator("#count-processed")).to_have_text("2", timeout=WAIT)
    expect(_file_cells(page, "recent", "after.txt")).to_have_count(1, timeout=WAIT)
    assert page.evaluate("window.__ingestdTestMarker") == "same document", "the page reloaded"
    assert w.dialogs == []


# ---- in Chromium, against a scripted /api/status: every field, every state ------------------------------

HOSTILE = '<img src=x onerror="window.__xss=1">'


def _status(**over: Any) -> dict[str, Any]:
    now = 1764340100.0
    s: dict[str, Any] = {
        "version": "9.9.9" + HOSTILE, "state": "running", "started_at": now - 3700, "now": now,
        "watch_dir": "/srv/" + HOSTILE,
        "counts": {"unprocessed": 123456, "underprocess": 1, "processed": 12, "failed": 1},
        "oldest": {"unprocessed": 75.0, "underprocess": 1.0},
        "workers": [{"worker": 0, "file": "big" + HOSTILE + ".log", "since": now - 5, "bytes": 1048576, "size": 4194304},
                    {"worker": 1, "file": None, "since": None, "bytes": 0, "size": 0}],
        "recent": [{"file": "a" + HOSTILE, "result": "failed", "duration": 0.0021, "finished_at": now - 1,
                    "reason": "bad " + HOSTILE}],
        "failures": [{"name": "f" + HOSTILE, "reason": "why " + HOSTILE, "line": 7, "attempts": 2,
                      "failed_at": "2026-11-28T15:00:00+00:00", "failed_at_unix": now - 60, "size": 10}],
        "totals": {"processed": 12, "failed": 1, "recovered": 0, "bytes_in": 1234, "bytes_out": 1234},
        "throughput": {"files_per_second": 0.2, "bytes_per_second": 20.5},
        "paused": None,
    }
    s.update(over)
    return s


def test_every_field_renders_as_text_in_every_state(browser_context: Any) -> None:
    from playwright.sync_api import expect

    origin = "http://ingestd.test"
    answer: dict[str, Any] = {"status": _status()}
    html = PAGE.read_bytes()

    def serve(route: Any) -> None:
        path = route.request.url[len(origin):].split("?")[0]
        if path == "/":
            route.fulfill(status=200, content_type="text/html; charset=utf-8", body=html)
        elif path == "/api/status" and answer["status"] is not None:
            route.fulfill(status=200, content_type="application/json", body=json.dumps(answer["status"]))
        else:
            route.abort("connectionrefused")

    w = Watched(browser_context)
    page = w.page
    page.route(origin + "/**", serve)
    page.goto(origin + "/")
    expect(page.locator("body")).to_have_attribute("data-conn", "live")

    expect(page.locator("#count-unprocessed")).to_have_text("123,456")
    expect(page.locator("#oldest-unprocessed")).to_have_text("oldest 1 min 15 s")
    expect(page.locator("#version")).to_have_text("v9.9.9" + HOSTILE)
    expect(page.locator("#watch-dir")).to_have_text("/srv/" + HOSTILE)
    expect(page.locator("#workers-busy")).to_have_text("1 of 2 busy")
    busy = page.locator("#workers tbody tr[data-worker='0']")
    expect(busy.locator(".file")).to_have_text("big" + HOSTILE + ".log")
    expect(busy.locator("[role=progressbar]")).to_have_attribute("aria-valuenow", "25")
    expect(busy).to_contain_text("1.0 MiB of 4.0 MiB (25%)")
    expect(page.locator("#workers tbody tr[data-worker='1']")).to_contain_text("idle")
    expect(page.locator("#recent tbody .file")).to_have_text("a" + HOSTILE)
    expect(page.locator("#recent tbody .reason")).to_have_text("bad " + HOSTILE)
    expect(page.locator("#recent tbody td[data-label=Duration]")).to_have_text("2.1 ms")
    expect(page.locator("#failures tbody .file")).to_have_text("f" + HOSTILE)
    expect(page.locator("#failures tbody .reason")).to_have_text("why " + HOSTILE)
    expect(page.locator("#failures tbody tr")).to_contain_text("line 7 · 2 attempts")
    expect(page.locator("#tp-files")).to_have_text("0.20")
    expect(page.locator("#tp-bytes")).to_have_text("21 B/s")

    # Paused, with its reason (as text), then stopping.
    answer["status"] = _status(paused="low disk space: " + HOSTILE)
    expect(page.locator("#paused")).to_be_visible()
    expect(page.locator("#paused-reason")).to_have_text("low disk space: " + HOSTILE)
    expect(page.locator("#state")).to_have_text("paused")
    answer["status"] = _status(state="stopping")
    expect(page.locator("#state")).to_have_text("stopping")
    expect(page.locator("#paused")).to_be_hidden()

    # Unreachable, then back.
    answer["status"] = None
    expect(page.locator("#unreachable")).to_be_visible()
    expect(page.locator("#unreachable-detail")).to_contain_text("connection failed")
    expect(page.locator("#state")).to_have_text("state unknown")  # not the stale "stopping"
    answer["status"] = _status(counts={"unprocessed": 0, "underprocess": 0, "processed": 13, "failed": 1})
    expect(page.locator("#unreachable")).to_be_hidden()
    expect(page.locator("#count-processed")).to_have_text("13")

    assert page.evaluate("document.querySelectorAll('img').length") == 0
    assert page.evaluate("typeof window.__xss") == "undefined"
    assert w.dialogs == []
    assert [e for e in w.errors if "ERR_" not in e and "Failed to load resource" not in e] == []


if __name__ == "__main__":
    if sys.argv[1:] != ["--csp-hash"]:
        sys.exit(f"usage: {sys.argv[0]} --csp-hash   (rewrites the CSP hash in {PAGE})")
    text = PAGE.read_text("utf-8")
    digest = _script_hash(text)
    new, n = CSP_RE.subn(f"script-src 'sha256-{digest}'", text)
    if n != 1:
        sys.exit("no script-src 'sha256-...' in the page's Content-Security-Policy")
    PAGE.write_text(new, "utf-8")
    print(f"sha256-{digest}")


def test_page_shows_folders_left_in_unprocessed(browser_context: Any, daemon: Any) -> None:
    """Issue 9: a folder in unprocessed/ is left where it is (recursive off) and the page says so, its name as
    text in the tooltip; the line goes when the folder does."""
    from playwright.sync_api import expect

    w = Watched(browser_context)
    page = w.page
    page.goto(daemon.url)
    expect(page.locator("body")).to_have_attribute("data-conn", "live")
    left = page.locator("#folders-left")
    expect(left).to_have_text("")
    folder = daemon.watch_dir / "unprocessed" / XSS.replace(".txt", "")
    folder.mkdir()
    expect(left).to_have_text("1 folder left as is (recursive is off)", timeout=WAIT)
    expect(left).to_have_attribute("title", XSS.replace(".txt", ""))
    expect(page.locator("#count-unprocessed")).to_have_text("0")
    folder.rmdir()
    expect(left).to_have_text("", timeout=WAIT)
    assert w.dialogs == [] and w.errors == []
