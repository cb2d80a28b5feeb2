"""Catalogue: hostile content. Each result is byte-identical to a reference run (`ingestd process`); binary input
fails with a reason; a single 200 MB line is refused (max_line_bytes) with memory bounded; a 2 GB file (generated
and streamed, never held in memory) is processed with the worker's peak RSS measured and bounded."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from support import INGESTD, wait_for

from .lib import audit_final, children, ls, make_watch, record, start_daemon, wait_drained

CASES = {
    "nul.bin": b"text\x00more\n",
    "bad-utf8.txt": b"caf\xe9 \xff\xfe ok\n\xc3\x28 tail\n",
    "crlf.txt": b"one\r\ntwo\r\n",
    "no-final-newline.txt": b"last line",
    "empty.txt": b"",
    "mixed.txt": b"a\rb\n\tc\x0bd\n",
}
RSS_BOUND_MB = 150


def reference(tmp: Path, name: str, data: bytes) -> bytes | None:
    src = tmp / ("ref-in-" + name)
    src.write_bytes(data)
    out = subprocess.run([*INGESTD, "process", "--input", str(src), "--output", "-"], capture_output=True, timeout=60)
    return out.stdout if out.returncode == 0 else None


def test_hostile_content_matches_the_reference_run(tmp_path: Path) -> None:
    refs = {n: reference(tmp_path, n, d) for n, d in CASES.items()}
    assert refs["nul.bin"] is None  # binary: refused by the reference too
    assert refs["crlf.txt"] == b"ONE\r\nTWO\r\n" and refs["no-final-newline.txt"] == b"LAST LINE"
    assert refs["bad-utf8.txt"] == b"CAF\xe9 \xff\xfe OK\n\xc3\x28 TAIL\n"  # invalid bytes pass untouched
    w = make_watch(tmp_path / "w")
    d = start_daemon(w, cwd=tmp_path)
    try:
        for n, data in CASES.items():
            (w / "unprocessed" / n).write_bytes(data)
        wait_drained(w, len(CASES))
        reasons = {f["name"]: f["reason"] for f in d.status()["failures"]}
        assert reasons["nul.bin"].startswith("binary content")
    finally:
        d.stop()
    audit_final(w, {n: r for n, r in refs.items() if r is not None}, {"nul.bin"})


class PeakRSS:
    """Polls VmHWM (the kernel's own high-water mark) of the daemon and its workers while a file is processed."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.stop = pid, {"daemon": 0, "worker": 0}, threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _hwm(self, pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            self.peak["daemon"] = max(self.peak["daemon"], self._hwm(self.pid))
            for c in children(self.pid):
                self.peak["worker"] = max(self.peak["worker"], self._hwm(c))

    def done(self) -> dict[str, float]:
        self.stop.set()
        self.t.join()
        return {k: round(v / 2**20, 1) for k, v in self.peak.items()}


@pytest.mark.slow
def test_a_single_200mb_line_is_refused_with_bounded_memory(tmp_path: Path) -> None:
    w = make_watch(tmp_path / "w")
    d = start_daemon(w, "--workers", "1", cwd=tmp_path)
    rss = PeakRSS(d.proc.pid)
    try:
        src = tmp_path / "line.txt"
        with open(src, "wb") as f:
            block = b"abcdefghij" * ((1 << 20) // 10 + 1)
            for _ in range(200):
                f.write(block[: 1 << 20])
            f.write(b"\n")
        os.rename(src, w / "unprocessed" / "line.txt")
        wait_for(lambda: ls(w, "failed") == ["line.txt"], timeout=120, what="line.txt refused")
        reason = {f["name"]: f["reason"] for f in d.status()["failures"]}["line.txt"]
        assert "max_line_bytes" in reason
    finally:
        d.stop()
        peak = rss.done()
    assert (w / "failed" / "line.txt").stat().st_size == 200 * (1 << 20) + 1  # kept whole
    assert peak["worker"] < RSS_BOUND_MB, peak
    record("line_200mb", {"peak RSS MiB": peak})


@pytest.mark.slow
def test_a_2gb_file_streams_with_flat_memory(tmp_path: Path) -> None:
    line = b"The Quick brown fox jumps over the lazy dog, 0123456789 ok " * 17 + b"\n"  # 1004 bytes
    chunk = line * 64
    n = (2 << 30) // len(chunk) + 1
    size = n * len(chunk)
    w = make_watch(tmp_path / "w")
    src = tmp_path / "big.txt"
    with open(src, "wb") as f:
        for _ in range(n):
            f.write(chunk)
    d = start_daemon(w, "--workers", "1", env={"INGESTD_STALL_TIME": "300"}, cwd=tmp_path)
    rss = PeakRSS(d.proc.pid)
    t0 = time.monotonic()
    try:
        os.rename(src, w / "unprocessed" / "big.txt")
        wait_drained(w, 1, timeout=600)
        took = time.monotonic() - t0
    finally:
        d.stop()
        peak = rss.done()
    out = w / "processed" / "big.txt"
    assert out.stat().st_size == size
    want = chunk.upper()
    with open(out, "rb") as f:
        for _ in range(n):
            assert f.read(len(want)) == want
        assert f.read(1) == b""
    assert peak["worker"] < RSS_BOUND_MB, peak
    record("file_2gb", {"bytes": size, "seconds": round(took, 1), "peak RSS MiB": peak})
    out.unlink()
