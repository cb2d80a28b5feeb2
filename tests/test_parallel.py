"""`ingestd process`'s mapped path (parallel.map_file: pread, one block at a time, on several processes, pwrite,
spill files and the join) gives the bytes of the per-line engine, and rejects the same line, on adversarial text.

The oracle is pipeline.run with `explain` (it forces the per-line path: lines(), Routing.route). parallel.READ and
SLICE are set small so that block, slice and range boundaries fall everywhere: inside a multi-byte character,
inside a \\r\\n, right before and after a newline; the texts mix characters whose UTF-8 grows (ŉ -> ʼN, ǰ -> J̌) and
shrinks (ı -> I, ſ -> S) under upper/lower, so that every spill and join case is met.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingestd import parallel, pipeline, routing
from ingestd.pipeline import Rejected, Stats

ROUTINGS: dict[str, dict[str, object]] = {
    "uppercase": {"mode": "uppercase"},
    "lowercase": {"mode": "lowercase"},  # final sigma: lower() looks at the characters around a Σ
    "passthrough": {"mode": "passthrough"},
    "chain": {"filters": [{"match": "*", "processor": "uppercase"}, {"match": "*", "processor": "lowercase"}]},
    "to-a-folder": {"filters": [{"match": "*", "processor": "uppercase"}], "outputs": [{"match": "*", "path": "up"}]},
}

# Characters that change their UTF-8 length under upper or lower (ß, ŉ, ǰ, ΐ, ﬁ, İ, ı, ſ, ẞ), a final sigma, CR
# and LF alone and together, undecodable bytes and a multi-byte character cut short, CJK and a 4-byte emoji.
FRAGMENTS = [b"a", b"Z", b" ", b"xyz", "ß".encode(), "ŉ".encode(), "ǰ".encode(), "ΐ".encode(), "ﬁ".encode(),
             "İ".encode(), "ı".encode(), "ſ".encode(), "ẞ".encode(), "Σ".encode(), "ς".encode(), "é".encode(),
             "漢".encode(), "😀".encode(), b"\r", b"\n", b"\n", b"\r\n", b"\xff", b"\xe2\x82", b"\xc3", b"\xbb"]
TOO_LONG = "line longer than max_line_bytes ({} bytes)"


def per_line(path: Path, doc: dict[str, object], limit: int) -> dict[str, bytes] | tuple[str, int | None]:
    """The oracle: output folder -> bytes, or (reason, line) when rejected."""
    outs: dict[str, bytes] = {}

    def write(folder: str, data: bytes) -> None:
        outs[folder] = outs.get(folder, b"") + data

    try:
        with pipeline.open_input(str(path)) as f:
            pipeline.run(f, path.name, routing.build(doc), limit, write, Stats(), explain=lambda step: None)
    except Rejected as e:
        return e.reason, e.line
    if not outs:
        outs[routing.build(doc).output_for("default") or ""] = b""
    return outs


def mapped(path: Path, doc: dict[str, object], limit: int, workers: int) -> dict[str, bytes] | tuple[str, int | None]:
    """The path under test, as `ingestd process` takes it."""
    out = path.parent / "out"
    out.write_bytes(b"stale bytes, longer than some outputs" * 3)  # written over and cut to length
    with pipeline.open_input(str(path)) as f:
        plan = pipeline.mapped(f, path.name, routing.build(doc))
        assert plan is not None
        folder, fn = plan
        try:
            n = pipeline.run_mapped(f, path.stat().st_size, fn, limit, str(out), Stats(), workers=workers)
        except Rejected as e:
            return e.reason, e.line
    data = out.read_bytes()
    assert n == len(data)
    return {folder: data}


def same_both_ways(data: bytes, doc: dict[str, object], limit: int = 1 << 20, workers: int = 2
                   ) -> dict[str, bytes] | tuple[str, int | None]:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "in.log"
        p.write_bytes(data)
        slow = per_line(p, doc, limit)
        fast = mapped(p, doc, limit, workers)
        assert os.listdir(d) == ["in.log", "out"] or sorted(os.listdir(d)) == ["in.log", "out"], "a spill file was left"
    assert fast == slow
    return fast


@pytest.fixture
def small(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "READ", 7)
    monkeypatch.setattr(parallel, "SLICE", 5)


ADVERSARIAL = b"".join([
    "straße ŉ ǰ ﬁx İstanbul ΟΔΟΣ ΣΑΣ ıſ\r\n".encode(), b"# comment\n", b"lone\rcr\n", b"bad \xff\xfe \xe2\x82\n",
    b"\r\n", b"\n", "😀ß\r".encode(), b"\r\n", b"aaa\n", "ŉŉŉŉŉŉ\n".encode(), "ıııııı\n".encode(),
    "tail without newline ß\r".encode(),
])


# --- equality -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("read", [1, 2, 3, 5, 7, 64, 1 << 20])
@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(ROUTINGS))
def test_adversarial_text_same_bytes(monkeypatch: pytest.MonkeyPatch, name: str, workers: int, read: int) -> None:
    monkeypatch.setattr(parallel, "READ", read)
    monkeypatch.setattr(parallel, "SLICE", 5)
    same_both_ways(ADVERSARIAL, ROUTINGS[name], workers=workers)


@pytest.mark.parametrize("workers", [2, 3])
@pytest.mark.parametrize(("first", "second"), [
    ("ŉ", "ı"),  # the first range grows: its spill would overwrite the second's bytes in place, moved away first
    ("ı", "ŉ"),  # the first shrinks: the second's in-place part moves left, then its spill
    ("ı", "ı"), ("ŉ", "ŉ"), ("a", "ŉ"), ("ŉ", "a"), ("ı", "a"), ("a", "ı"),
])
def test_every_join_case(small: None, first: str, second: str, workers: int) -> None:
    """Text whose UTF-8 grows or shrinks in one range, another, or both: the pieces are put back in order."""
    half = (f"ab {first}{first} cd\n" * 40).encode()
    other = (f"ef {second} gh{second}\n" * 40).encode()
    for doc in (ROUTINGS["uppercase"], ROUTINGS["lowercase"]):
        same_both_ways(half + other + half, doc, workers=workers)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from(FRAGMENTS), max_size=80), name=st.sampled_from(sorted(ROUTINGS)),
       read=st.integers(1, 40), limit=st.sampled_from([4, 9, 16, 1 << 20]), slice_=st.integers(1, 20),
       workers=st.integers(1, 3))
def test_random_text_same_bytes(monkeypatch: pytest.MonkeyPatch, parts: list[bytes], name: str, read: int,
                                limit: int, slice_: int, workers: int) -> None:
    monkeypatch.setattr(parallel, "READ", read)
    monkeypatch.setattr(parallel, "SLICE", slice_)
    same_both_ways(b"".join(parts), ROUTINGS[name], limit, workers)


@pytest.mark.parametrize("name", sorted(ROUTINGS))
def test_empty_file(name: str) -> None:
    same_both_ways(b"", ROUTINGS[name])


# --- long lines ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b""])
def test_lines_at_and_one_over_max_line_bytes(small: None, ending: bytes, workers: int) -> None:
    limit = 10
    ok = b"ok\n" * 20
    after = ok if ending else b""  # no ending: the last line
    assert isinstance(same_both_ways(ok + b"x" * limit + ending + after, ROUTINGS["uppercase"], limit, workers), dict)
    got = same_both_ways(ok + b"y" * (limit + 1) + ending + after, ROUTINGS["uppercase"], limit, workers)
    assert got == (TOO_LONG.format(limit), 21)


@pytest.mark.parametrize("workers", [2, 3])
def test_the_first_long_line_in_the_file_is_reported(small: None, workers: int) -> None:
    """Each range meets a line too long: the one earliest in the file is named, whichever process ends first."""
    limit = 10
    body = b"".join(b"line %d\n" % i for i in range(300))
    data = body[:50] + b"z" * 30 + b"\n" + body + b"w" * 40 + b"\n" + body
    assert same_both_ways(data, ROUTINGS["uppercase"], limit, workers) == (TOO_LONG.format(limit), 8)
    data = body + body + b"w" * 40 + b"\n" + body  # only in a later range
    assert same_both_ways(data, ROUTINGS["uppercase"], limit, workers) == (TOO_LONG.format(limit), 601)


def test_a_line_longer_than_a_read_within_the_limit_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "READ", 4)
    same_both_ways(b"ab\n" + b"c" * 30 + b"\nd\n" + b"e" * 30, ROUTINGS["uppercase"], limit=30)


def test_first_long_agrees_with_the_line_reader() -> None:
    for block, limit, expect in [(b"", 1, None), (b"abc", 3, None), (b"abcd", 3, 0), (b"ab\r\n", 2, None),
                                 (b"ab\r", 2, 0), (b"a\nbcde\nf", 3, 2), (b"a\nb\r\nccc\r\nddd\r", 3, 10)]:
        assert pipeline.first_long(block, limit) == expect, (block, limit)


# --- processes ----------------------------------------------------------------------------------------------
def test_one_process_when_threads_run() -> None:
    """A fork copies only the calling thread: with another thread alive (a daemon's heartbeat) no fork."""
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert parallel.workers(1 << 30) == 1
    finally:
        stop.set()
        t.join()
    assert parallel.workers(parallel.MIN_SPLIT - 1) == 1
    assert parallel.workers(1 << 30) == min(len(os.sched_getaffinity(0)), parallel.MAX_WORKERS)


def test_a_child_that_dies_is_an_error_not_a_short_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker process killed midway: OSError (the command says it cannot write), never a truncated result."""
    src = tmp_path / "in"
    src.write_bytes(b"abc\n" * 1000)
    real = parallel._map_range

    def dies_in_child(fd: int, r: parallel._Range, *args: object, **kw: object) -> tuple[int, int]:
        if r.start:
            os.kill(os.getpid(), 9)
        return real(fd, r, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(parallel, "_map_range", dies_in_child)
    out = tmp_path / "out"
    out.touch()
    with open(src, "rb") as f, pytest.raises(OSError, match="ended without an answer"):
        pipeline.run_mapped(f, src.stat().st_size, str.upper, 1 << 20, str(out), Stats(), workers=2)


INGESTD = [sys.executable, "-m", "ingestd"]


def test_process_command_big_file_same_bytes_and_long_line_number(tmp_path: Path) -> None:
    """`ingestd process` on a file big enough for several processes: the per-line bytes, and a too-long line in the
    second half rejected with its number, nothing published, no temp or spill left."""
    unit = "mixed ŉ ı straße ΣΑΣ 漢 😀 \xff?\r\n".encode("utf-8", "surrogateescape").replace(b"\xc3\xbf", b"\xff")
    data = unit * ((parallel.MIN_SPLIT * 2) // len(unit))
    src = tmp_path / "big.txt"
    src.write_bytes(data)
    out = tmp_path / "out" / "big.txt"
    out.parent.mkdir()
    r = subprocess.run([*INGESTD, "process", "--input", str(src), "--output", str(out), "--mode", "uppercase"],
                       check=False, capture_output=True, env={**os.environ, "INGESTD_MAX_LINE_BYTES": "100"})
    assert r.returncode == 0, r.stderr
    r_ = routing.build(ROUTINGS["uppercase"])
    expect = b"".join(r_.route("default", line)[1] for line in data.splitlines(keepends=True))  # Routing.route per line
    assert expect == out.read_bytes()
    lines = data.count(b"\n")
    src.write_bytes(data + b"L" * 101 + b"\n" + data)
    out.unlink()
    r = subprocess.run([*INGESTD, "process", "--input", str(src), "--output", str(out), "--mode", "uppercase"],
                       check=False, capture_output=True, env={**os.environ, "INGESTD_MAX_LINE_BYTES": "100"})
    assert r.returncode == 65
    assert f"line longer than max_line_bytes (100 bytes) (line {lines + 1})".encode() in r.stderr
    assert os.listdir(out.parent) == []


def test_memory_stays_bounded_whatever_max_line_bytes(tmp_path: Path) -> None:
    """A huge max_line_bytes must not make the cut between ranges, or a block, read the file whole: 20 MiB of
    short lines under a 1 TiB limit, two processes; the parent's Python memory stays within a few blocks."""
    import tracemalloc

    src = tmp_path / "in"
    src.write_bytes(b"0123456789abcdef\n" * (20 * (1 << 20) // 17))
    out = tmp_path / "out"
    out.touch()
    tracemalloc.start()
    try:
        with open(src, "rb") as f:
            pipeline.run_mapped(f, src.stat().st_size, str.upper, 1 << 40, str(out), Stats(), workers=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.read_bytes() == src.read_bytes().upper()
    assert peak < 8 * parallel.READ, f"peak {peak / (1 << 20):.1f} MiB"
