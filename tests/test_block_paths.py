"""The block paths give the bytes of the plain per-line engine, on adversarial text; and the UTF-8 byte-order mark.

The oracle is pipeline.run with `explain` (it forces the per-line path: lines(), Routing.route); the paths under
test are the per-character block path (block_plan, ASCII_TWINS) and the line-level block path (route_block).
pipeline.READ is set small so that block boundaries fall everywhere: inside a multi-byte character, inside a
\\r\\n, right before and after a newline.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingestd import pipeline, routing
from ingestd.engine import Routing
from ingestd.pipeline import BOM, Rejected, Stats

README_ROUTING = {
    "tags": [{"match": "*.log", "tag": "app"}],
    "filters": [
        {"match": "app", "retag": "errors", "pattern": "ERROR"},
        {"match": "*", "processor": "redact", "pattern": r"password=\S+", "replacement": "password=***"},
        {"match": "app", "processor": "drop", "pattern": "^#"},
    ],
    "outputs": [{"match": "errors", "path": "errors"}, {"match": "*"}],
}
ROUTINGS: dict[str, dict[str, object]] = {
    "uppercase": {"mode": "uppercase"},
    "lowercase": {"mode": "lowercase"},  # final sigma: lower() looks at the characters around a Σ
    "passthrough": {"mode": "passthrough"},
    "titlecase": {"mode": "titlecase"},
    "strip": {"mode": "strip"},  # strips a lone \r too: the line's ending must not be in its text
    "reverse": {"mode": "reverse"},
    "readme": README_ROUTING,
    # a retag whose both tags reach the same output: the lines must stay in their order
    "same-output": {"filters": [{"match": "*", "retag": "x", "pattern": "[ß#]"},
                                {"match": "x", "processor": "uppercase"},
                                {"match": "*", "processor": "grep", "pattern": "."}]},
    # a retag to a tag no output takes (its lines are dropped), after a redact that empties some lines
    "no-output": {"filters": [{"match": "*", "processor": "redact", "pattern": "a+", "replacement": ""},
                              {"match": "*", "retag": "gone", "pattern": "^$"}],
                  "outputs": [{"match": "default"}]},
    "chain": {"filters": [{"match": "*", "processor": "uppercase"}, {"match": "*", "processor": "lowercase"}]},
}

# Fragments that trouble a block path: characters that change length under upper/lower (ß, ŉ, ﬁ, İ), a final
# sigma, CR and LF alone and together, undecodable bytes, a multi-byte character cut short, a 4-byte emoji.
FRAGMENTS = [b"a", b"Z", b" ", b"#", b"ERROR", b"password=s3", "ß".encode(), "ŉ".encode(), "ﬁ".encode(),
             "İ".encode(), "Σ".encode(), "ς".encode(), "é".encode(), "😀".encode(), b"\r", b"\n", b"\r\n",
             b"\xff", b"\xe2\x82", b"\xc3", b"\xbb", BOM]


def run(path: Path, doc: dict[str, object], max_line_bytes: int, per_line: bool, name: str = "in.log"
        ) -> dict[str, bytes] | tuple[str, int | None]:
    """Output folder -> bytes, or (reason, line) when rejected."""
    outs: dict[str, bytes] = {}

    def write(folder: str, data: bytes) -> None:
        outs[folder] = outs.get(folder, b"") + data

    try:
        with pipeline.open_input(str(path)) as f:
            pipeline.run(f, name, routing.build(doc), max_line_bytes, write, Stats(),
                         explain=(lambda step: None) if per_line else None)
    except Rejected as e:
        return e.reason, e.line
    return outs


def same_both_ways(data: bytes, doc: dict[str, object], max_line_bytes: int = 1 << 20) -> dict[str, bytes] | tuple[str, int | None]:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "in.log"
        p.write_bytes(data)
        slow = run(p, doc, max_line_bytes, per_line=True)
        fast = run(p, doc, max_line_bytes, per_line=False)
    assert fast == slow
    return fast


@pytest.fixture
def small_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "READ", 7)


# --- equality: block paths against the per-line engine ------------------------------------------------------
@pytest.mark.parametrize("read", [1, 2, 3, 5, 7, 64, 1 << 20])
@pytest.mark.parametrize("name", sorted(ROUTINGS))
def test_adversarial_text_same_bytes_every_block_size(monkeypatch: pytest.MonkeyPatch, name: str, read: int) -> None:
    monkeypatch.setattr(pipeline, "READ", read)
    monkeypatch.setattr(pipeline, "SLICE", 5)
    data = b"".join([
        "straße ŉ ﬁx İstanbul ΟΔΟΣ ΣΑΣ\r\n".encode(), b"# comment\n", b"ERROR password=hunter2 x\r\n",
        b"lone\rcr\n", b"bad \xff\xfe \xe2\x82\n", b"\r\n", b"\n", "😀ß\r".encode(), b"\r\n", b"aaa\n",
        "tail without newline ß\r".encode(),
    ])
    same_both_ways(data, ROUTINGS[name])


@pytest.mark.parametrize("name", sorted(ROUTINGS))
def test_empty_file(name: str) -> None:
    assert same_both_ways(b"", ROUTINGS[name]) in ({}, {"": b""})


@pytest.mark.parametrize("name", ["uppercase", "readme", "reverse"])
@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b""])
def test_lines_at_and_one_over_max_line_bytes(small_reads: None, name: str, ending: bytes) -> None:
    limit = 10
    at = b"x" * limit + ending
    over = b"y" * (limit + 1) + ending
    assert same_both_ways(b"ok\n" + at + b"ok\n", ROUTINGS[name], limit) not in (None,)
    got = same_both_ways(b"ok\n" + over + b"ok\n", ROUTINGS[name], limit)
    assert got == (f"line longer than max_line_bytes ({limit} bytes)", 2)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from(FRAGMENTS), max_size=60), name=st.sampled_from(sorted(ROUTINGS)),
       read=st.integers(1, 40), limit=st.sampled_from([4, 9, 16, 1 << 20]), slice_=st.integers(1, 20))
def test_random_text_same_bytes(monkeypatch: pytest.MonkeyPatch, parts: list[bytes], name: str, read: int,
                                limit: int, slice_: int) -> None:
    monkeypatch.setattr(pipeline, "READ", read)
    monkeypatch.setattr(pipeline, "SLICE", slice_)  # non-ASCII blocks case-mapped in slices of whole lines
    same_both_ways(b"".join(parts), ROUTINGS[name], limit)


@pytest.mark.parametrize("fn", [str.upper, str.lower], ids=["upper", "lower"])
@pytest.mark.parametrize("size", [1, 4, 9, 30, 1 << 20])
def test_map_text_sends_ascii_slices_of_a_mixed_block_through_the_bytes_twin(fn: object, size: int) -> None:
    """Text with a few non-ASCII lines (the usual log): the slices without any are mapped as bytes (no decode,
    no encode) and the whole is the same as line by line, a final Σ, a length-changing ß, \r\n and an undecodable
    byte included."""
    lines = [b"plain ascii line\n", "ΟΔΟΣ straße ŉ\r\n".encode(), b"more ascii\r\n", b"bad \xff byte\n",
             b"ascii again\n", b"last, no newline"]
    block = b"".join(lines)
    expected = b"".join(fn(ln.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")  # type: ignore[operator]
                        for ln in lines)
    twin = pipeline.ASCII_TWINS[fn]
    seen: list[bytes] = []

    def spy(b: bytes) -> bytes:
        seen.append(b)
        return twin(b)

    assert b"".join(pipeline.map_text(block, fn, spy, size)) == expected  # type: ignore[arg-type]
    pieces = pipeline.slices(block, size)
    assert b"".join(pieces) == block
    assert seen == [p for p in pieces if p.isascii()]  # each ASCII slice, and only those, took the twin
    if size <= 30:
        assert seen  # the block is mixed, and some of its slices are pure ASCII
    assert pipeline.map_text(b"all ascii\n" * 3, fn, spy, 4) == [twin(b"all ascii\n" * 3)]  # type: ignore[arg-type]


def test_processor_error_names_the_same_line_both_ways(tmp_path: Path) -> None:
    """A processor that raises on line 3: the block path reports line 3, as the per-line path does."""
    plugin = tmp_path / "boom"
    plugin.write_bytes(b"one\ntwo\nboom\nfour\n")
    r = Routing(filters=(routing._filter("f", {"match": "*", "processor": "grep", "pattern": "."}),))
    bad = Routing(filters=(*r.filters, routing.Filter("*", "boom", processor=_boom)))
    for explain in (None, lambda step: None):
        with pipeline.open_input(str(plugin)) as f, pytest.raises(Rejected, match="processor error: ValueError: boom") as e:
            pipeline.run(f, "boom", bad, 1 << 20, lambda o, d: None, Stats(), explain=explain)
        assert e.value.line == 3


def _boom(text: str) -> str:
    if text == "boom":
        raise ValueError("boom")
    return text


# --- the UTF-8 byte-order mark (issue 9) --------------------------------------------------------------------
def test_issue_9_drop_comment_header_after_a_bom(tmp_path: Path) -> None:
    """The issue's input: a Windows export whose `#` header follows a BOM; README's `drop ^#` drops it."""
    got = same_both_ways(BOM + b"# exported by Excel\r\n2026-11-30 INFO ok\r\n", README_ROUTING)
    assert got == {"": BOM + b"2026-11-30 INFO ok\r\n"}


@pytest.mark.parametrize("read", [1, 2, 3, 4, 1 << 20])
def test_bom_with_uppercase_is_kept_and_not_processed(monkeypatch: pytest.MonkeyPatch, read: int) -> None:
    monkeypatch.setattr(pipeline, "READ", read)
    assert same_both_ways(BOM + "ab ß\ncd".encode(), ROUTINGS["uppercase"]) == {"": BOM + b"AB SS\nCD"}
    # reverse would move a BOM seen as text to the end of line 1
    assert same_both_ways(BOM + b"abc\n", ROUTINGS["reverse"]) == {"": BOM + b"cba\n"}


def test_bom_starts_each_output_that_receives_a_line() -> None:
    data = BOM + b"ERROR first\nINFO second password=x\n# note\n"
    got = same_both_ways(data, README_ROUTING)
    assert got == {"errors": BOM + b"ERROR first\n", "": BOM + b"INFO second password=***\n"}


def test_bom_when_line_1_is_dropped_still_starts_the_output() -> None:
    got = same_both_ways(BOM + b"# header\nINFO a\n", README_ROUTING)
    assert got == {"": BOM + b"INFO a\n"}


def test_output_receiving_no_line_gets_no_bom() -> None:
    assert same_both_ways(BOM + b"INFO only\n", README_ROUTING) == {"": BOM + b"INFO only\n"}  # no errors/ output
    assert same_both_ways(BOM + b"# all dropped\n", README_ROUTING) == {}


@pytest.mark.parametrize("name", ["uppercase", "readme", "passthrough"])
def test_bom_only_file_gives_empty_output(name: str) -> None:
    assert same_both_ways(BOM, ROUTINGS[name]) == {}


@pytest.mark.parametrize("partial", [BOM[:1], BOM[:2], BOM[:2] + b"#x\n"])
def test_part_of_a_bom_is_ordinary_text(partial: bytes) -> None:
    got = same_both_ways(partial, README_ROUTING)
    assert got == {"": partial}  # undecodable bytes kept as they were, and `#` is not at the start of line 1


@pytest.mark.parametrize("data", [b"a\n" + BOM + b"#x\n", b"  " + BOM + b"b\n", BOM + BOM + b"#x\n"])
def test_bom_not_at_the_start_is_untouched_text(data: bytes) -> None:
    got = same_both_ways(data, ROUTINGS["uppercase"])
    assert got == {"": data.upper() if BOM not in data[:3] else BOM + data[3:].upper()}
    assert same_both_ways(data, README_ROUTING)[""].count(BOM) == data.count(BOM)  # a BOM inside a line is text


def test_bom_with_binary_pass_is_copied_byte_for_byte(tmp_path: Path) -> None:
    data = BOM + b"\0\x01binary\n"
    p = tmp_path / "x.png"
    p.write_bytes(data)
    doc = {"tags": [{"match": "*.png", "tag": "blob", "binary": "pass"}]}
    assert run(p, doc, 1 << 20, per_line=False, name="x.png") == {"": data}


def test_process_command_keeps_the_bom_and_drops_the_header(tmp_path: Path) -> None:
    """`ingestd process` end to end, a real process: the README's routing example on the issue's input."""
    conf = tmp_path / "routing.toml"
    conf.write_text('[[tags]]\nmatch = "*.log"\ntag = "app"\n[[filters]]\nmatch = "app"\nprocessor = "drop"\n'
                    'pattern = "^#"\n[[filters]]\nmatch = "*"\nprocessor = "uppercase"\n')
    src = tmp_path / "export.log"
    src.write_bytes(BOM + b"# header\r\nrow one\r\n")
    out = tmp_path / "out" / "export.log"
    out.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-m", "ingestd", "process", "--input", str(src), "--output", str(out),
                        "--config", str(conf)], check=False, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == BOM + b"ROW ONE\r\n"


# --- which regex filters run on whole blocks (Routing._block_steps) -----------------------------------------
@pytest.mark.parametrize(("pattern", "safe"), [
    ("ERROR", True), (r"password=\S+", True), ("^#", True), ("x$", True), (r"\bword\b", True), ("(a|b)+\\1", True),
    ("[a-z0-9]+", True), (".", True),
    (r"\s", False), ("[^a]", False), ("[^ab]", False), ("(?s).", False), (r"a\Z", False), (r"\Aa", False),
    ("a(?=b)", False), ("(?<=a)b", False), ("a\nb", False), ("[\x00-\x20]", False), (r"\W", False), (r"\D", False),
])
def test_line_bound_patterns(pattern: str, safe: bool) -> None:
    """Only a pattern that cannot match a \\n nor see past a line's edges may be searched over a whole block."""
    import re

    from ingestd import engine
    assert engine._line_bound(re.compile(pattern)) is safe


def test_readme_routing_runs_on_whole_blocks_and_unsafe_ones_do_not() -> None:
    r = routing.build(README_ROUTING)
    assert r._block_steps(("app", 0)) is not None  # the equality tests above do test the whole-block path
    assert r._whole_block("app", "# a\nERROR b\nc\n") == {"errors": "ERROR b\n", "": "c\n"}
    assert r._whole_block("app", "# a\r\nc\n") is None  # a \r: line by line
    assert r._whole_block("app", "c") is None  # a last line without \n: line by line
    unsafe = routing.build({"filters": [{"match": "*", "processor": "drop", "pattern": r"a\s"}]})
    assert unsafe._block_steps(("default", 0)) is None
    # both tags of a retag reach processed/: their lines would have to be put back in order, so line by line
    assert routing.build(ROUTINGS["same-output"])._block_steps(("default", 0)) is None


def test_redact_that_makes_new_lines_goes_line_by_line() -> None:
    doc = {"tags": [{"match": "*", "tag": "t"}],
           "filters": [{"match": "*", "processor": "redact", "pattern": "x", "replacement": "\n#"},
                       {"match": "*", "processor": "drop", "pattern": "^#"}]}
    assert same_both_ways(b"axb\n#c\nd\n", doc) == {"": b"a\n#b\nd\n"}


def test_plug_ins_and_other_line_processors_go_line_by_line() -> None:
    """A plug-in may take seconds per line: read line by line, so the stall detector sees lines move."""
    assert routing.build(README_ROUTING).builtin_only("app")
    assert routing.build(ROUTINGS["same-output"]).builtin_only("default")
    assert not routing.build(ROUTINGS["reverse"]).builtin_only("default")
    slow = Routing(filters=(routing._filter("f", {"match": "*", "retag": "x"}), routing.Filter("x", "boom", processor=_boom)))
    assert not slow.builtin_only("default")  # reached only through a retag: still found


def test_daemon_keeps_the_bom_and_routes_without_it(tmp_path: Path) -> None:
    """The daemon end to end (real process, real inotify): the README routing example on a BOM-prefixed log."""
    from support import DaemonProcess, wait_for

    conf = tmp_path / "routing.toml"
    conf.write_text('[[tags]]\nmatch = "*.log"\ntag = "app"\n'
                    '[[filters]]\nmatch = "app"\nretag = "errors"\npattern = "ERROR"\n'
                    '[[filters]]\nmatch = "app"\nprocessor = "drop"\npattern = "^#"\n'
                    '[[outputs]]\nmatch = "errors"\npath = "errors"\n[[outputs]]\nmatch = "*"\n')
    d = DaemonProcess(tmp_path / "w", "--config", str(conf), "--workers", "1", cwd=tmp_path).started()
    try:
        w = d.watch_dir
        (w / "unprocessed" / "export.log").write_bytes(BOM + b"# header\r\nERROR x\r\nrow\r\n")
        main, errors = w / "processed" / "export.log", w / "processed" / "errors" / "export.log"
        wait_for(lambda: main.exists() and errors.exists(), timeout=20, what="export.log processed")
        assert main.read_bytes() == BOM + b"row\r\n"
        assert errors.read_bytes() == BOM + b"ERROR x\r\n"
    finally:
        d.kill()
