"""Shared helpers of the torture suite: scale, skip-or-fail, inputs with known results, the shim, audits, figures."""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from support import DaemonProcess, wait_for

SCALE = max(1, int(os.environ.get("INGESTD_TORTURE_SCALE", "1") or 1))
SHIM_DIR = Path(__file__).resolve().parent / "shim"
FIGURES = Path(os.environ.get("INGESTD_TORTURE_FIGURES", f"/tmp/ingestd-torture-figures-scale{SCALE}.json"))
QUEUE = ("unprocessed", "underprocess", "processed", "failed")


def unavailable(reason: str) -> None:
    """A missing component: skip with the reason, but under CI=true the test must run, so fail."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: this test must run)", pytrace=False)
    pytest.skip(reason)


def need_root(what: str) -> None:
    if os.geteuid() != 0:
        unavailable(f"{what} needs root")


def record(key: str, value: Any) -> None:
    """Keep a measured figure for docs/guarantees.md (one JSON file per scale, merged across tests)."""
    data = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    data[key] = value
    FIGURES.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def readable_copy(dest: Path) -> str:
    """Copy ingestd and its run-time dependencies (not the test extras) under dest, world-readable, for a daemon
    run as another user: the clone itself may lie in a folder only root can read (/root, a `mktemp -d`).
    Returns the PYTHONPATH to give that daemon. Sources: the installed distributions' RECORD files
    (importlib.metadata), so nothing is fetched or built."""
    import ingestd

    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(Path(ingestd.__file__).parent, dest / "ingestd", ignore=shutil.ignore_patterns("__pycache__"))
    todo, seen = ["ingestd"], set()
    while todo:
        dist = importlib.metadata.distribution(todo.pop())
        name = canonicalize_name(dist.metadata["Name"])
        if name in seen:
            continue
        seen.add(name)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):  # this platform's, no test extras
                todo.append(req.name)
        if name == "ingestd":
            continue  # an editable install: its code is the package copied above
        for f in dist.files or []:
            src = Path(str(f.locate()))
            if f.parts[0] == ".." or "__pycache__" in f.parts or not src.is_file():
                continue  # console scripts outside site-packages, bytecode
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    for d, _, files in os.walk(dest):
        os.chmod(d, 0o755)
        for fname in files:
            os.chmod(os.path.join(d, fname), 0o644)
    return str(dest)


def make_watch(root: Path) -> Path:
    for sub in (*QUEUE, ".ingestd"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return root


def text_blob(rng: random.Random, size: int) -> bytes:
    """ASCII lines (mixed case, so uppercase changes them) of about `size` bytes; the reference is .upper()."""
    words = [b"alpha", b"Beta", b"gamma", b"delta", b"Epsilon", b"zeta", b"eta", b"theta", b"iota", b"kappa"]
    line = b" ".join(rng.choice(words) for _ in range(12)) + b"\n"
    reps = max(1, size // len(line))
    return (line * reps)[:size] if size else b""


def ls(w: Path, sub: str) -> list[str]:
    return sorted(n for n in os.listdir(w / sub) if not n.startswith("."))


def hidden(w: Path, sub: str) -> list[str]:
    return sorted(n for n in os.listdir(w / sub) if n.startswith("."))


def shim_env(tmp: Path, **cfg: Any) -> dict[str, str]:
    """Environment that installs the I/O shim in the daemon and its workers (see shim/ingestd_shim.py)."""
    d = tmp / f"shim-{time.monotonic_ns()}"
    d.mkdir(parents=True)
    cfg.setdefault("dir", str(d))
    path = d / "cfg.json"
    path.write_text(json.dumps(cfg))
    return {"PYTHONPATH": str(SHIM_DIR), "INGESTD_SHIM": str(path)}


def read_journal(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a line cut by the kill
    return out


def audit_processed(w: Path, expected: dict[str, bytes]) -> None:
    """Nothing half-written: every user-visible result in processed/ is complete and correct."""
    for name in ls(w, "processed"):
        if (w / "processed" / name).is_dir():
            continue
        assert name in expected, f"unexpected result {name!r}"
        got = (w / "processed" / name).read_bytes()
        assert got == expected[name], f"partial or wrong result {name!r}: {len(got)} bytes, want {len(expected[name])}"


def audit_final(w: Path, expected: dict[str, bytes], failed: set[str] | frozenset[str] = frozenset()) -> None:
    """At the end: each input exactly once in processed/ (byte-identical) or failed/ (with a reason), queue empty."""
    assert ls(w, "unprocessed") == [] and ls(w, "underprocess") == [], "inputs left in the queue"
    assert [n for n in hidden(w, "processed") if n.startswith(".ingestd-tmp-")] == [], "temp files left"
    audit_processed(w, expected)
    got_failed = set(ls(w, "failed"))
    assert got_failed == set(failed), f"failed/ holds {sorted(got_failed)}, expected {sorted(failed)}"
    assert set(ls(w, "processed")) | got_failed == set(expected) | set(failed)
    assert not set(ls(w, "processed")) & got_failed, "a file is both processed and failed"
    for name in got_failed:
        sidecar = [n for n in hidden(w, "failed") if n.startswith(".ingestd-reason-")]
        assert sidecar, f"{name} failed without a reason"


def start_daemon(w: Path, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
                 wait: bool = True) -> DaemonProcess:
    d = DaemonProcess(w, *args, env=env, cwd=cwd or w.parent)
    if not wait:
        return d
    try:
        return d.started(timeout=30)
    except BaseException:
        kill_tree(d)  # a daemon that did not start is not left running, nor its stderr pipe open
        raise


def wait_drained(w: Path, total: int, timeout: float = 60.0) -> None:
    wait_for(lambda: not ls(w, "unprocessed") and not ls(w, "underprocess")
             and len(ls(w, "processed")) + len(ls(w, "failed")) >= total, timeout=timeout, interval=0.05,
             what=f"{total} inputs finished")


def kill_tree(d: DaemonProcess) -> None:
    """kill -9 the daemon; its workers follow at once (PR_SET_PDEATHSIG). Waits until they are gone too."""
    kids = children(d.proc.pid)
    try:
        if d.proc.poll() is None:
            d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
    finally:
        d._close()  # the stderr pipe is closed whatever happened, or it is left to the GC (ResourceWarning)
    for pid in kids:
        wait_for(functools.partial(_gone, pid), timeout=10, what=f"worker {pid} gone")


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _gone(pid: int) -> bool:
    return not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        st = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return st.rsplit(")", 1)[1].split()[0] != "Z"


def metrics_ok(body: bytes) -> dict[str, float]:
    """/metrics must parse as Prometheus text; returns the unlabelled and labelled samples by full name."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for fam in text_string_to_metric_families(body.decode("utf-8")):
        for s in fam.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
            samples[key] = s.value
    return samples


def cli_status(w: Path) -> dict[str, Any]:
    out = subprocess.run([*__import__("support").INGESTD, "status", "--json", "--watch-dir", str(w)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)
