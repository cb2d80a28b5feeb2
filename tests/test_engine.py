"""The pure engine: every processor, routing tables, line endings, invalid UTF-8, explain() == route()."""

from __future__ import annotations

import random

import pytest

from ingestd import processors, routing
from ingestd.engine import DEFAULT_TAG, Filter, Output, Routing, TagRule, split_ending


def one(name: str, **options: object) -> Routing:
    """A routing with a single filter on every record, to processed/ (what MODE=name means)."""
    return Routing(filters=(Filter("*", name, processor=processors.make(name, options)),))


def route_all(r: Routing, tag: str, data: bytes) -> list[tuple[str, bytes]]:
    return list(r.run(tag, data.splitlines(keepends=True)))


# --- each processor ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "options", "line", "expected"),
    [
        ("uppercase", {}, b"Hello, World 1\n", b"HELLO, WORLD 1\n"),
        ("uppercase", {}, "straße é\n".encode(), "STRASSE É\n".encode()),
        ("lowercase", {}, b"Hello, WORLD\n", b"hello, world\n"),
        ("lowercase", {}, "ÉCOLE\n".encode(), "école\n".encode()),
        ("titlecase", {}, b"the quick brown fox\n", b"The Quick Brown Fox\n"),
        ("strip", {}, b"  \t padded \t \n", b"padded\n"),
        ("reverse", {}, b"abc def\n", b"fed cba\n"),
        ("reverse", {}, "ab→c\n".encode(), "c→ba\n".encode()),  # characters, not bytes, are reversed
        ("passthrough", {}, b"  Mixed Case \t\n", b"  Mixed Case \t\n"),
        ("redact", {"pattern": r"\d{4}-\d{4}"}, b"card 1234-5678 ok\n", b"card [REDACTED] ok\n"),
        ("redact", {"pattern": r"(\w+)@\w+", "replacement": r"\1@***"}, b"to bob@corp now\n", b"to bob@*** now\n"),
        ("redact", {"pattern": "x", "replacement": ""}, b"xaxbx\n", b"ab\n"),
        ("shout", {}, b"hi\n", b"HI!\n"),  # third-party, from the ingestd.processors entry point
        ("shout", {"suffix": "?!"}, b"hi\n", b"HI?!\n"),
    ],
)
def test_processor_transforms_line_and_keeps_ending(name: str, options: dict, line: bytes, expected: bytes) -> None:
    assert route_all(one(name, **options), DEFAULT_TAG, line) == [("", expected)]


def test_grep_keeps_only_matching_lines() -> None:
    data = b"INFO start\nERROR disk\ninfo lower\nERROR net\n"
    assert route_all(one("grep", pattern="^ERROR"), DEFAULT_TAG, data) == [("", b"ERROR disk\n"), ("", b"ERROR net\n")]


def test_grep_regex_searches_anywhere_not_just_at_start() -> None:
    assert route_all(one("grep", pattern="disk"), DEFAULT_TAG, b"ERROR disk\nok\n") == [("", b"ERROR disk\n")]


def test_drop_discards_matching_lines() -> None:
    data = b"keep 1\n# comment\nkeep 2\n  # indented comment\n"
    assert route_all(one("drop", pattern=r"^\s*#"), DEFAULT_TAG, data) == [("", b"keep 1\n"), ("", b"keep 2\n")]


def test_processors_see_text_without_line_ending() -> None:
    """strip must not eat the newline, reverse must not move it to the front."""
    seen: list[str] = []

    def spy(text: str) -> str:
        seen.append(text)
        return text

    r = Routing(filters=(Filter("*", "spy", processor=spy),))
    route_all(r, DEFAULT_TAG, b"a\nb\r\nc")
    assert seen == ["a", "b", "c"]
    assert route_all(one("reverse"), DEFAULT_TAG, b"ab\r\n") == [("", b"ba\r\n")]
    assert route_all(one("strip"), DEFAULT_TAG, b"  x  \r\n") == [("", b"x\r\n")]


def test_filters_apply_in_order() -> None:
    r = Routing(filters=(
        Filter("*", "redact", processor=processors.make("redact", {"pattern": "secret"})),
        Filter("*", "uppercase", processor=processors.make("uppercase", {})),
        Filter("*", "drop", processor=processors.make("drop", {"pattern": "DROPME"})),
    ))
    assert route_all(r, DEFAULT_TAG, b"a secret\ndropme\n") == [("", b"A [REDACTED]\n")]


def test_builtin_names_cannot_be_shadowed_and_plugins_are_listed() -> None:
    names = processors.names()
    assert {"uppercase", "lowercase", "titlecase", "strip", "reverse", "passthrough", "grep", "drop", "redact"} <= set(names)
    assert {"shout", "hang_on", "abort_on"} <= set(names)
    assert names == sorted(names)
    with pytest.raises(KeyError):
        processors.make("no-such-processor", {})


# --- line endings ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"ab\ncd\n", b"AB\nCD\n"),
        (b"ab\r\ncd\r\n", b"AB\r\nCD\r\n"),
        (b"ab\ncd", b"AB\nCD"),  # no newline at the end: none added
        (b"ab\r\ncd\nef", b"AB\r\nCD\nEF"),  # mixed endings each kept
        (b"\n\n", b"\n\n"),  # empty lines
        (b"", b""),
        (b"a\rb\n", b"A\rB\n"),  # a lone CR inside a line is content, not an ending
    ],
)
def test_line_endings_preserved(data: bytes, expected: bytes) -> None:
    out = route_all(one("uppercase"), DEFAULT_TAG, data)
    assert b"".join(d for _, d in out) == expected


def test_split_ending() -> None:
    assert split_ending(b"x\r\n") == (b"x", b"\r\n")
    assert split_ending(b"x\n") == (b"x", b"\n")
    assert split_ending(b"x") == (b"x", b"")
    assert split_ending(b"x\r") == (b"x\r", b"")
    assert split_ending(b"\r\n") == (b"", b"\r\n")


# --- invalid UTF-8 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["uppercase", "lowercase", "titlecase", "strip", "passthrough"])
def test_invalid_utf8_bytes_pass_through_untouched(name: str) -> None:
    bad = b"\xff\xfe\xc3(\x80\xed\xa0\x80"  # lone bytes, a broken 2-byte sequence, an encoded surrogate
    data = b"caf\xe9 " + bad + b" ok\n"
    (out, result), = route_all(one(name), DEFAULT_TAG, data)
    assert bad in result
    expected_text = {"uppercase": b"CAF\xe9 ", "lowercase": b"caf\xe9 ", "titlecase": b"Caf\xe9 "}.get(name, b"caf\xe9 ")
    assert result.startswith(expected_text)
    assert result.endswith(b"\n")


def test_invalid_utf8_with_redact_and_grep() -> None:
    data = b"id=42 \xff\xfe tail\nnothing \x80 here\n"
    r = Routing(filters=(
        Filter("*", "grep", processor=processors.make("grep", {"pattern": r"id=\d+"})),
        Filter("*", "redact", processor=processors.make("redact", {"pattern": r"\d+"})),
    ))
    assert route_all(r, DEFAULT_TAG, data) == [("", b"id=[REDACTED] \xff\xfe tail\n")]


def test_no_filters_copies_bytes_exactly() -> None:
    data = b"\xff\x00 raw\r\nline two"
    assert b"".join(d for _, d in route_all(Routing(), DEFAULT_TAG, data)) == data


# --- routing tables -----------------------------------------------------------------------------------
def table(**doc: object) -> Routing:
    return routing.from_tables(doc)


def test_tag_rules_first_match_wins_and_default_tag() -> None:
    r = table(tags=[{"match": "*.log", "tag": "logs"}, {"match": "app*.log", "tag": "never"}, {"match": "*.csv", "tag": "csv"}])
    assert r.rule_for("app.log").tag == "logs"
    assert r.rule_for("x.csv").tag == "csv"
    assert r.rule_for("README").tag == DEFAULT_TAG
    assert r.rule_for("X.LOG").tag == DEFAULT_TAG  # globs are case-sensitive, like the file system


def test_tag_rule_binary_default_is_fail() -> None:
    r = table(tags=[{"match": "*.bin", "tag": "raw", "binary": "pass"}, {"match": "*", "tag": "text"}])
    assert r.rule_for("a.bin") == TagRule("*.bin", "raw", "pass")
    assert r.rule_for("a.txt").binary == "fail"
    assert Routing().rule_for("anything").binary == "fail"


def test_filters_apply_only_to_matching_tag_globs() -> None:
    r = table(
        tags=[{"match": "*.log", "tag": "app.log"}, {"match": "*.csv", "tag": "data.csv"}],
        filters=[{"match": "app.*", "processor": "uppercase"}, {"match": "*.csv", "processor": "reverse"}],
    )
    assert route_all(r, r.rule_for("x.log").tag, b"ab\n") == [("", b"AB\n")]
    assert route_all(r, r.rule_for("x.csv").tag, b"ab\n") == [("", b"ba\n")]
    assert route_all(r, r.rule_for("x.txt").tag, b"ab\n") == [("", b"ab\n")]


def test_retag_without_pattern_retags_every_record() -> None:
    r = table(
        filters=[{"match": "default", "retag": "moved"}, {"match": "default", "processor": "uppercase"},
                 {"match": "moved", "processor": "reverse"}],
        outputs=[{"match": "moved", "path": "moved"}, {"match": "*", "path": ""}],
    )
    # after the retag, filters for the old tag no longer apply; those for the new tag do
    assert route_all(r, DEFAULT_TAG, b"ab\ncd\n") == [("moved", b"ba\n"), ("moved", b"dc\n")]


def test_retag_with_pattern_routes_matching_records_only() -> None:
    r = table(
        filters=[{"match": "*", "retag": "errors", "pattern": "ERROR"}, {"match": "errors", "processor": "uppercase"}],
        outputs=[{"match": "errors", "path": "errors"}, {"match": "*", "path": ""}],
    )
    out = route_all(r, DEFAULT_TAG, b"ok 1\nERROR bad\nok 2\n")
    assert out == [("", b"ok 1\n"), ("errors", b"ERROR BAD\n"), ("", b"ok 2\n")]


def test_retag_only_affects_later_filters() -> None:
    """A filter before the retag that matches the new tag must not run again after it."""
    r = table(filters=[{"match": "*", "processor": "redact", "pattern": "a", "replacement": "aa"},
                       {"match": "*", "retag": "b"},
                       {"match": "b", "processor": "uppercase"}])
    assert route_all(r, DEFAULT_TAG, b"a\n") == [("", b"AA\n")]


def test_chained_retags() -> None:
    r = table(filters=[{"match": "default", "retag": "one"}, {"match": "one", "retag": "two"},
                       {"match": "two", "processor": "uppercase"}, {"match": "one", "processor": "reverse"}],
              outputs=[{"match": "two", "path": "final"}])
    assert route_all(r, DEFAULT_TAG, b"ab\n") == [("final", b"AB\n")]
    assert r.explain(DEFAULT_TAG, b"ab\n").applied == ("retag->one", "retag->two", "uppercase")


def test_outputs_first_match_wins() -> None:
    r = table(outputs=[{"match": "err*", "path": "errors"}, {"match": "errors", "path": "never"}, {"match": "*", "path": ""}])
    assert r.output_for("errors") == "errors"
    assert r.output_for("default") == ""
    assert route_all(r, "errors", b"x\n") == [("errors", b"x\n")]


def test_unmatched_records_are_dropped() -> None:
    r = table(filters=[{"match": "*", "retag": "errors", "pattern": "ERR"}, {"match": "*", "processor": "passthrough"}],
              outputs=[{"match": "errors", "path": "errors"}])
    assert route_all(r, DEFAULT_TAG, b"fine\nERR x\nfine\n") == [("errors", b"ERR x\n")]
    # without filters (the fast path) an unmatched tag yields nothing either
    assert route_all(table(outputs=[{"match": "logs", "path": "logs"}]), DEFAULT_TAG, b"a\nb\n") == []


def test_default_outputs_send_everything_to_processed() -> None:
    assert Routing().outputs == (Output("*", ""),)
    assert table(tags=[{"match": "*", "tag": "x"}]).output_for("x") == ""


def test_mode_routing_is_one_filter_on_everything() -> None:
    r = routing.from_mode("uppercase")
    assert [(f.match, f.name) for f in r.filters] == [("*", "uppercase")]
    assert route_all(r, "any-tag", b"a\n") == [("", b"A\n")]


def test_routing_cache_does_not_leak_between_tags() -> None:
    r = table(filters=[{"match": "a", "processor": "uppercase"}])
    assert route_all(r, "a", b"x\n") == [("", b"X\n")]
    assert route_all(r, "b", b"x\n") == [("", b"x\n")]
    assert route_all(r, "a", b"y\n") == [("", b"Y\n")]


# --- explain() agrees with route() -------------------------------------------------------------------------
EXPLAIN_ROUTING = {
    "tags": [{"match": "*.log", "tag": "app"}],
    "filters": [
        {"match": "app", "processor": "drop", "pattern": "^DEBUG"},
        {"match": "app", "retag": "app.err", "pattern": "ERROR"},
        {"match": "app.err", "processor": "redact", "pattern": r"\d+"},
        {"match": "app*", "processor": "uppercase"},
        {"match": "default", "processor": "grep", "pattern": "keep"},
        {"match": "*", "retag": "lost", "pattern": "^lose"},
    ],
    "outputs": [{"match": "app.err", "path": "errors"}, {"match": "app", "path": "app"}, {"match": "default", "path": ""}],
}
EXPLAIN_LINES = [b"DEBUG x\n", b"ERROR 42 y\r\n", b"info\n", b"keep me\n", b"drop me\n", b"lose keep\n",
                 b"lose it\n", b"\xff bad keep\n", b"no newline"]


@pytest.mark.parametrize("tag", ["app", "default", "other"])
@pytest.mark.parametrize("line", EXPLAIN_LINES)
def test_explain_agrees_with_route(tag: str, line: bytes) -> None:
    r = routing.from_tables(EXPLAIN_ROUTING)
    out, data = r.route(tag, line)
    step = r.explain(tag, line)
    assert step.output == out
    if out is None:
        assert data == b""


def test_explain_spells_out_the_journey() -> None:
    r = routing.from_tables(EXPLAIN_ROUTING)
    step = r.explain("app", b"ERROR 42 y\n")
    assert (step.tag, step.applied, step.output) == ("app.err", ("drop", "retag->app.err", "redact", "uppercase"), "errors")
    step = r.explain("app", b"DEBUG 1\n")
    assert (step.tag, step.applied, step.output) == ("app", ("drop",), None)
    step = r.explain("default", b"lose keep\n")
    assert (step.tag, step.applied, step.output) == ("lost", ("grep", "retag->lost"), None)  # no output matches "lost"


def test_run_with_explain_reports_every_line_and_same_output() -> None:
    r = routing.from_tables(EXPLAIN_ROUTING)
    steps = []
    explained = list(r.run("app", EXPLAIN_LINES, explain=steps.append))
    assert len(steps) == len(EXPLAIN_LINES)
    assert explained == list(r.run("app", EXPLAIN_LINES))
    assert [s.output for s in steps if s.output is not None] == [o for o, _ in explained]


def test_processor_dropping_with_none_stops_later_filters() -> None:
    calls: list[str] = []

    def later(text: str) -> str:
        calls.append(text)
        return text

    r = Routing(filters=(Filter("*", "drop", processor=processors.make("drop", {"pattern": "x"})),
                         Filter("*", "later", processor=later)))
    assert r.route(DEFAULT_TAG, b"x\n") == (None, b"")
    assert calls == []


def test_explain_agrees_with_route_on_random_tables() -> None:
    """A seeded sweep: random filters (processors, drops, retags with and without patterns) and outputs."""
    rng = random.Random(20240601)
    tags = ["default", "a", "b", "a.x", "b.y"]
    globs = ["*", "a*", "b*", "a", "default", "*.x", "?.y", "[ab]"]
    kinds = [("processor", "uppercase"), ("processor", "reverse"), ("processor", "strip"),
             ("processor", "drop", "Z"), ("processor", "grep", "[a-m]"), ("processor", "redact", "[0-9]"),
             ("retag",), ("retag", "q")]
    lines = [b"abc 1\n", b"Zed\r\n", b"  q9 \n", b"xyz", b"\xffq\n", b"\n"]
    for _ in range(300):
        filters = []
        for _ in range(rng.randint(0, 6)):
            kind = rng.choice(kinds)
            entry: dict[str, object] = {"match": rng.choice(globs)}
            if kind[0] == "retag":
                entry["retag"] = rng.choice(tags)
                if len(kind) > 1:
                    entry["pattern"] = kind[1]
            else:
                entry["processor"] = kind[1]
                if len(kind) > 2:
                    entry["pattern"] = kind[2]
            filters.append(entry)
        outputs = [{"match": rng.choice(globs), "path": rng.choice(["", "o1", "o2"])} for _ in range(rng.randint(1, 3))]
        r = routing.from_tables({"filters": filters, "outputs": outputs})
        for tag in tags:
            for line in lines:
                out, data = r.route(tag, line)
                assert r.explain(tag, line).output == out, (filters, outputs, tag, line)
                assert (data == b"") if out is None else data.endswith(split_ending(line)[1])
