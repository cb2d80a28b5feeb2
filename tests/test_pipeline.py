"""One input through the engine: safe open (symlink, FIFO, directory), binary check, bounded line reading."""

from __future__ import annotations

import errno
import io
import os
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from ingestd import pipeline, routing
from ingestd.engine import Filter, Routing
from ingestd.pipeline import Rejected, Stats

MiB = 1 << 20


def process(path: Path, r: Routing | None = None, max_line_bytes: int = MiB, name: str | None = None
            ) -> tuple[dict[str, bytes], Stats]:
    """Run a real file through pipeline.run; returns output folder -> bytes written, and the stats."""
    r = r or routing.from_mode("uppercase")
    outs: dict[str, bytes] = {}

    def write(folder: str, data: bytes) -> None:
        outs[folder] = outs.get(folder, b"") + data

    stats = Stats()
    with pipeline.open_input(str(path)) as f:
        pipeline.run(f, name or path.name, r, max_line_bytes, write, stats)
    return outs, stats


# --- safe open ---------------------------------------------------------------------------------------------
def test_regular_file_opens_and_is_processed(tmp_path: Path) -> None:
    p = tmp_path / "in.txt"
    p.write_bytes(b"one\r\ntwo\nthree")
    outs, stats = process(p)
    assert outs == {"": b"ONE\r\nTWO\nTHREE"}
    assert (stats.bytes_in, stats.lines_in) == (14, 3)


@pytest.mark.parametrize("target", ["file", "dir", "dangling", "passwd"])
def test_symlink_is_never_followed(tmp_path: Path, target: str) -> None:
    secret = tmp_path / "secret"
    secret.write_text("do not read\n")
    (tmp_path / "d").mkdir()
    dest = {"file": secret, "dir": tmp_path / "d", "dangling": tmp_path / "nowhere", "passwd": Path("/etc/passwd")}[target]
    link = tmp_path / "link"
    link.symlink_to(dest)
    with pytest.raises(Rejected, match="symlink") as e:
        pipeline.open_input(str(link))
    assert e.value.line is None


def test_fifo_never_blocks(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result: list[BaseException | None] = []

    def attempt() -> None:
        try:
            pipeline.open_input(str(fifo))
            result.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            result.append(e)

    t = threading.Thread(target=attempt, daemon=True)
    start = time.monotonic()
    t.start()
    t.join(5)
    if t.is_alive():  # unblock the stuck open() so the thread ends, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(5)
        pytest.fail("open_input blocked on a FIFO")
    assert time.monotonic() - start < 1
    assert isinstance(result[0], Rejected) and "FIFO" in str(result[0])


def test_directory_rejected(tmp_path: Path) -> None:
    with pytest.raises(Rejected, match="not a regular file: directory"):
        pipeline.open_input(str(tmp_path))


def test_character_device_rejected() -> None:
    with pytest.raises(Rejected, match="not a regular file: character device"):
        pipeline.open_input("/dev/null")


def test_socket_rejected(tmp_path: Path) -> None:
    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        with pytest.raises(Rejected):
            pipeline.open_input(str(path))


def test_missing_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(Rejected, match="cannot open: No such file"):
        pipeline.open_input(str(tmp_path / "gone"))


def test_open_input_does_not_leak_descriptors_on_rejection(tmp_path: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(Rejected):
            pipeline.open_input(str(tmp_path))
    assert len(os.listdir("/proc/self/fd")) == before


def test_opened_file_is_close_on_exec(tmp_path: Path) -> None:
    p = tmp_path / "x"
    p.write_bytes(b"x")
    with pipeline.open_input(str(p)) as f:
        assert not os.get_inheritable(f.fileno())


# --- binary ------------------------------------------------------------------------------------------------
def test_binary_rejected(tmp_path: Path) -> None:
    p = tmp_path / "img.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(Rejected, match="^binary content"):
        process(p)


def test_nul_late_in_first_block_is_binary(tmp_path: Path) -> None:
    p = tmp_path / "late"
    p.write_bytes(b"a" * (pipeline.BLOCK - 1) + b"\x00" + b"tail\n")
    with pytest.raises(Rejected, match="^binary content"):
        process(p)


def test_binary_passes_with_a_tag_rule(tmp_path: Path) -> None:
    data = bytes(range(256)) * 3000 + b"\nlower text\n"  # > one read block, with NULs and a newline
    p = tmp_path / "blob.bin"
    p.write_bytes(data)
    r = routing.from_tables({"tags": [{"match": "*.bin", "tag": "raw", "binary": "pass"}],
                             "filters": [{"match": "*", "processor": "uppercase"}],
                             "outputs": [{"match": "raw", "path": "raw"}, {"match": "*", "path": ""}]})
    outs, stats = process(p, r)
    assert outs == {"raw": data}  # copied byte for byte: no filter touches it
    assert stats.bytes_in == len(data)
    # the same content under a name without the rule is still refused
    with pytest.raises(Rejected, match="^binary content"):
        process(p, r, name="blob.dat")


def test_binary_pass_to_no_output_writes_nothing(tmp_path: Path) -> None:
    p = tmp_path / "x.bin"
    p.write_bytes(b"\x00\x01")
    r = routing.from_tables({"tags": [{"match": "*.bin", "tag": "raw", "binary": "pass"}],
                             "outputs": [{"match": "text", "path": ""}]})
    assert process(p, r)[0] == {}


def test_pass_rule_does_not_change_text_files(tmp_path: Path) -> None:
    p = tmp_path / "t.bin"
    p.write_bytes(b"text\n")
    r = routing.from_tables({"tags": [{"match": "*.bin", "tag": "raw", "binary": "pass"}],
                             "filters": [{"match": "*", "processor": "uppercase"}]})
    assert process(p, r)[0] == {"": b"TEXT\n"}


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty"
    p.write_bytes(b"")
    outs, stats = process(p)
    assert outs == {} and (stats.bytes_in, stats.lines_in) == (0, 0)


def test_invalid_utf8_file_bytes_untouched(tmp_path: Path) -> None:
    p = tmp_path / "latin1.txt"
    p.write_bytes("café\r\n".encode("latin-1") + b"\xff\xfe end")
    assert process(p)[0] == {"": b"CAF\xe9\r\n\xff\xfe END"}


# --- long lines -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("data", "line"), [
    (b"short\n" + b"x" * 11 + b"\nafter\n", 2),
    (b"a\nb\nc\n" + b"y" * 50, 4),  # the last line, no newline
    (b"z" * 11, 1),
    (b"ok\r\n" + b"w" * 11 + b"\r\n", 2),  # CRLF: the ending does not count, the content does
    (b"v" * 10 + b"\r", 1),  # a lone CR at the very end is content (as the engine sees it)
])
def test_line_longer_than_max_rejected_with_its_number(tmp_path: Path, data: bytes, line: int) -> None:
    p = tmp_path / "long"
    p.write_bytes(data)
    with pytest.raises(Rejected) as e:
        process(p, max_line_bytes=10)
    assert e.value.line == line
    assert "max_line_bytes (10 bytes)" in e.value.reason


@pytest.mark.parametrize("data", [b"x" * 10 + b"\n", b"x" * 10, b"0123456789\n" * 3, b"x" * 10 + b"\r\n",
                                  b"0123456789\r\n" * 3 + b"end"])
def test_line_of_exactly_max_bytes_accepted(tmp_path: Path, data: bytes) -> None:
    """max_line_bytes counts the line's content; its \\n does not push it over."""
    p = tmp_path / "edge"
    p.write_bytes(data)
    assert process(p, max_line_bytes=10)[0] == {"": data.upper()}


def test_long_line_rejected_even_when_all_records_dropped(tmp_path: Path) -> None:
    p = tmp_path / "x"
    p.write_bytes(b"k" * 100 + b"\n")
    r = routing.from_tables({"filters": [{"processor": "drop", "pattern": "k"}]})
    with pytest.raises(Rejected):
        process(p, r, max_line_bytes=10)


def test_single_50mb_line_rejected_with_bounded_memory(tmp_path: Path) -> None:
    p = tmp_path / "huge"
    chunk = b"q" * MiB
    with open(p, "wb") as f:
        for _ in range(50):
            f.write(chunk)
    del chunk
    outs: list[int] = []
    stats = Stats()
    tracemalloc.start()
    try:
        with pipeline.open_input(str(p)) as f:
            with pytest.raises(Rejected) as e:
                pipeline.run(f, "huge", routing.from_mode("uppercase"), MiB, lambda o, d: outs.append(len(d)), stats)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert e.value.line == 1
    assert outs == []
    assert stats.bytes_in <= MiB + 2 + pipeline.READ, "read more than one block past the limit"
    assert peak < 8 * MiB, f"peak {peak / MiB:.1f} MiB for a 50 MiB line with a 1 MiB cap"


def test_many_lines_stream_with_bounded_memory(tmp_path: Path) -> None:
    """A 32 MiB file of short lines: memory stays a small constant (a few 1 MiB blocks: the read, its upper-cased
    copy, the carry), far under its size."""
    p = tmp_path / "many"
    line = b"abcdefghij" * 10 + b"\n"
    with open(p, "wb") as f:
        f.write(line * (32 * MiB // len(line)))
    total = [0]
    tracemalloc.start()
    try:
        with pipeline.open_input(str(p)) as f:
            pipeline.run(f, "many", routing.from_mode("uppercase"), MiB, lambda o, d: total.__setitem__(0, total[0] + len(d)),
                         Stats())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total[0] == p.stat().st_size
    assert peak < 6 * MiB, f"peak {peak / MiB:.1f} MiB"


def test_progress_called_with_bytes_read(tmp_path: Path) -> None:
    p = tmp_path / "p"
    p.write_bytes(b"1234567\n" * (pipeline.TICK * 2 + 1))
    ticks: list[int] = []
    with pipeline.open_input(str(p)) as f:
        pipeline.run(f, "p", routing.from_mode("reverse"), MiB, lambda o, d: None, Stats(), ticks.append)
    assert ticks == [pipeline.TICK * 8, pipeline.TICK * 16]  # line by line: every TICK lines


def test_block_path_reports_progress_per_block_and_matches_the_line_path(tmp_path: Path) -> None:
    p = tmp_path / "p"
    p.write_bytes("line \xe9 \xff\r\n".encode("latin-1") * 400_000 + b"no newline at end")  # ~4.6 MiB
    ticks: list[int] = []
    fast: list[bytes] = []
    with pipeline.open_input(str(p)) as f:
        pipeline.run(f, "p", routing.from_mode("uppercase"), MiB, lambda o, d: fast.append(d), Stats(), ticks.append)
    assert ticks == sorted(ticks) and len(ticks) >= 4 and ticks[-1] <= p.stat().st_size
    slow: list[bytes] = []  # the same routing forced line by line (explain disables the block path)
    with pipeline.open_input(str(p)) as f:
        pipeline.run(f, "p", routing.from_mode("uppercase"), MiB, lambda o, d: slow.append(d), Stats(),
                     explain=lambda step: None)
    assert b"".join(fast) == b"".join(slow) == p.read_bytes().upper()


def test_lines_reads_from_any_binary_stream() -> None:
    stats = Stats()
    got = list(pipeline.lines(io.BytesIO(b"a\nbb\r\nccc"), 10, stats, lambda _: None))
    assert got == [b"a\n", b"bb\r\n", b"ccc"]
    assert (stats.bytes_in, stats.lines_in) == (9, 3)


# --- what an error means (errors.classify) ----------------------------------------------------------------
def _open_with_nofile_limit(path: Path, code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh process whose open-file limit is 3: stdin, stdout and stderr hold descriptors
    0-2, so the kernel refuses any new one with EMFILE (getrlimit(2), RLIMIT_NOFILE), as for the issue's worker."""
    script = ("import resource, sys\nfrom ingestd import pipeline\n"
              "resource.setrlimit(resource.RLIMIT_NOFILE, (3, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n" + code)
    return subprocess.run([sys.executable, "-c", script, str(path)], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=60, check=False)


def test_open_with_no_descriptor_left_is_not_a_rejection(tmp_path: Path) -> None:
    """EMFILE on a good input is the machine's fault: the OSError is raised (retry), never Rejected (failed/)."""
    p = tmp_path / "good.txt"
    p.write_bytes(b"fine\n")
    r = _open_with_nofile_limit(p, (
        "try:\n"
        "    pipeline.open_input(sys.argv[1])\n"
        "except pipeline.Rejected as e:\n"
        "    print('rejected', e.reason)\n"
        "except OSError as e:\n"
        "    print('oserror', e.errno)\n"
        "else:\n"
        "    print('opened')\n"))
    assert r.stdout.split() == ["oserror", str(errno.EMFILE)], r.stdout + r.stderr


class Boom(Exception):
    pass


def _raising_routing(at: str) -> Routing:
    def proc(text: str) -> str:
        if at in text:
            raise Boom(f"cannot handle {text!r}")
        return text.upper()

    return Routing(filters=(Filter("*", "boom", processor=proc),))


def test_a_processor_that_raises_rejects_the_input_with_the_reason_and_its_line(tmp_path: Path) -> None:
    p = tmp_path / "in.txt"
    p.write_bytes(b"a\nb\nbad\nc\n")
    with pytest.raises(Rejected) as e:
        process(p, _raising_routing("bad"))
    assert e.value.line == 3
    assert e.value.reason.startswith("processor error: Boom: cannot handle 'bad' (at test_pipeline.py:")


def test_a_processor_that_raises_on_a_late_line_reports_that_line(tmp_path: Path) -> None:
    """Line numbers are exact beyond the progress tick (every 4096 lines), not only for the first lines."""
    p = tmp_path / "in.txt"
    p.write_bytes(b"x\n" * 10_000 + b"bad\n" + b"y\n" * 10)
    with pytest.raises(Rejected) as e:
        process(p, _raising_routing("bad"))
    assert e.value.line == 10_001


def test_a_memory_error_in_a_processor_is_not_a_rejection(tmp_path: Path) -> None:
    def proc(text: str) -> str:
        raise MemoryError

    p = tmp_path / "in.txt"
    p.write_bytes(b"a\n")
    with pytest.raises(MemoryError):
        process(p, Routing(filters=(Filter("*", "oom", processor=proc),)))


# --- the block fast path equals the per-line path, on adversarial text (issue 10) --------------------------------
from hypothesis import given, settings as hsettings, strategies as hst  # noqa: E402

# Characters whose case mapping changes their length or depends on context, CR/LF, NUL-free controls, multi-byte
# UTF-8 of every width, and raw bytes that are not UTF-8 at all (they must pass through untouched).
_TRICKY = ["ß", "ŉ", "ǰ", "ﬁ", "ΐ", "İ", "ı", "Σ", "ς", "ǅ", "ῼ", "a", "Z", "é", "ж", "中", "😀", "\r\n", "\n", "\r",
           " ", "\t", "x" * 50]


def _blob() -> hst.SearchStrategy[bytes]:
    piece = hst.one_of(hst.sampled_from(_TRICKY).map(lambda s: s.encode()),
                       hst.binary(min_size=1, max_size=3).filter(lambda b: b"\0" not in b))
    return hst.lists(piece, max_size=400).map(b"".join)


def _per_line(data: bytes, fn) -> bytes:  # the reference: each line on its own, as the slow path does
    out = []
    bom = data.startswith(pipeline.BOM)  # issue 9: a leading BOM is not line 1's text, and starts a non-empty output
    if bom:
        data = data[len(pipeline.BOM):]
        out.append(pipeline.BOM if data else b"")
    for line in io.BytesIO(data).readlines():
        body, end = (line[:-2], line[-2:]) if line.endswith(b"\r\n") else \
            ((line[:-1], line[-1:]) if line.endswith(b"\n") else (line, b""))
        out.append(fn(body.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape") + end)
    return b"".join(out)


@hsettings(max_examples=300, deadline=None)
@given(data=_blob(), read=hst.integers(min_value=1, max_value=64), mode=hst.sampled_from(["uppercase", "lowercase"]))
def test_block_fast_path_equals_the_per_line_path(data: bytes, read: int, mode: str) -> None:
    """Blocks decoded and case-mapped whole (or as ASCII bytes) give exactly the per-line result, whatever the
    text and wherever a read cuts it (tiny reads put block boundaries inside multi-byte characters)."""
    table = routing.from_mode(mode)
    fn = {"uppercase": str.upper, "lowercase": str.lower}[mode]
    assert table.block_plan(table.rule_for("x").tag) is not None, "the fast path is the one under test"
    old = pipeline.READ
    pipeline.READ = read
    try:
        got: list[bytes] = []
        pipeline.run(io.BufferedReader(io.BytesIO(data)), "x", table, 1 << 20, lambda out, b: got.append(b), Stats())
    finally:
        pipeline.READ = old
    assert b"".join(got) == _per_line(data, fn)


def test_ascii_blocks_skip_the_decode_and_still_match_str_upper() -> None:
    text = ("".join(chr(c) for c in range(1, 128) if c != 10) + "\n") * 100
    table = routing.from_mode("uppercase")
    got: list[bytes] = []
    pipeline.run(io.BufferedReader(io.BytesIO(text.encode())), "x", table, 1 << 20, lambda o, b: got.append(b), Stats())
    assert b"".join(got) == text.upper().encode()
    assert pipeline.ASCII_TWINS[str.upper] is bytes.upper
