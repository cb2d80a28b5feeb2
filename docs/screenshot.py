"""Take docs/status-page.png from a clean demo folder: `.venv/bin/python docs/screenshot.py [DEMO_DIR]`.

Starts `ingestd run` on DEMO_DIR/watch_dir (default /tmp/ingestd-demo: a path that reads well in the picture,
emptied first and removed after), feeds it a few files (one binary, to show a failure, and a large log still in progress), and
takes the picture of the live page with headless Chromium (`chromium --headless --screenshot`). Not part of
`make test`: it writes into the repository. Needs Chromium (`apt-get install chromium`, or INGESTD_CHROMIUM).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "status-page.png"
CHROMIUM = os.environ.get("INGESTD_CHROMIUM") or shutil.which("chromium") or "chromium"
INGESTD = [str(Path(sys.executable).with_name("ingestd"))]
# A config of its own: logs are redacted line by line (the slower path), so the large one is seen in progress.
ROUTING = '[[tags]]\nmatch = "*.log"\ntag = "app"\n\n[[filters]]\nmatch = "app"\nprocessor = "redact"\n' \
          'pattern = "password=\\\\S+"\n\n[[filters]]\nmatch = "*"\nprocessor = "uppercase"\n'
SMALL = {"orders-2026-11-30.csv": b"id,item,qty\n1,apple,3\n2,pear,5\n", "sensor-17.jsonl": b'{"t": 21.5}\n' * 20,
         "access.log": b"GET / 200\nGET /login password=hunter2 302\n" * 10, "README.txt": b"hello world\n"}


def wait(what: str, test: Callable[[], Any], timeout: float = 30.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (value := test()) is not None and value is not False:
            return value
        time.sleep(0.05)
    raise SystemExit(f"screenshot: timed out waiting for {what}")


def main() -> int:
    demo = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/ingestd-demo")
    shutil.rmtree(demo, ignore_errors=True)
    (demo / "watch_dir").mkdir(parents=True)
    (demo / "ingestd.toml").write_text(ROUTING)
    watch = demo / "watch_dir"
    log = (demo / "ingestd.log").open("w")
    daemon = subprocess.Popen([*INGESTD, "run", "--watch-dir", str(watch), "--config", str(demo / "ingestd.toml"),
                               "--listen", "127.0.0.1:0", "--workers", "2", "--log-format", "json"],
                              stderr=log, cwd=demo, env={**os.environ, "INGESTD_SETTLE_TIME": "0"})
    try:
        def started() -> str | None:
            for line in (demo / "ingestd.log").read_text().splitlines():
                event = json.loads(line)
                if event.get("event") == "started":
                    return "http://" + event["listen"]
            if daemon.poll() is not None:
                raise SystemExit(f"screenshot: ingestd exited {daemon.returncode}; see {demo / 'ingestd.log'}")
            return None

        url = wait("the daemon to start", started)

        def status() -> Any:
            with urllib.request.urlopen(url + "/api/status", timeout=5) as r:
                return json.load(r)

        def drop(name: str, data: bytes) -> None:
            tmp = watch / "unprocessed" / f".{name}.tmp"
            tmp.write_bytes(data)
            os.rename(tmp, watch / "unprocessed" / name)  # complete before it is visible (README)

        for name, data in SMALL.items():
            drop(name, data)
            time.sleep(0.3)  # distinct finish times in the table
        drop("blob.bin", b"\0binary\0data\n")
        wait("the small files", lambda: status()["counts"]["processed"] >= len(SMALL) and status()["counts"]["failed"])
        drop("nightly-export.log", b"2026-11-30T02:00:00Z job=export user=etl password=s3cret rows=1000\n" * 1_500_000)
        wait("the large log in progress", lambda: any(w["file"] and w["bytes"] > 20 << 20 for w in status()["workers"]))
        subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=1280,1060", "--virtual-time-budget=1500", f"--screenshot={OUT}", url + "/"],
                       check=True, capture_output=True, timeout=120)
        print(f"wrote {OUT} from the demo folder {watch}")
        return 0
    finally:
        daemon.terminate()
        daemon.wait(60)
        log.close()
        shutil.rmtree(demo, ignore_errors=True)  # the large log is 96 MiB twice over


if __name__ == "__main__":
    sys.exit(main())
