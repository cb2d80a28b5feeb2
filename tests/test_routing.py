"""Routing tables from TOML: validation messages, output paths, third-party processors by entry point."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from support import plugin

from ingestd import processors, routing
from ingestd.engine import DEFAULT_TAG
from ingestd.routing import RoutingError


def doc(text: str) -> dict:
    return tomllib.loads(text)


def error(d: dict) -> str:
    with pytest.raises(RoutingError) as e:
        routing.from_tables(d)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_worked_example_from_toml() -> None:
    r = routing.from_tables(doc("""
        [[tags]]
        match = "*.log"
        tag = "app"

        [[filters]]
        match = "app"
        retag = "errors"
        pattern = "ERROR"

        [[filters]]
        match = "*"
        processor = "redact"
        pattern = '\\d{3}-\\d{4}'
        replacement = "###"

        [[outputs]]
        match = "errors"
        path = "errors"

        [[outputs]]
        match = "*"
        path = ""
    """))
    tag = r.rule_for("web.log").tag
    assert list(r.run(tag, [b"ok 555-1234\n", b"ERROR 555-9999\n"])) == [("", b"ok ###\n"), ("errors", b"ERROR ###\n")]


def test_empty_document_means_defaults() -> None:
    r = routing.from_tables({})
    assert (r.tags, r.filters) == ((), ())
    assert r.output_for(DEFAULT_TAG) == ""


def test_build_picks_tables_or_mode() -> None:
    assert routing.build({"mode": "lowercase"}).route(DEFAULT_TAG, b"AB\n") == ("", b"ab\n")
    assert routing.build({"filters": [{"processor": "reverse"}]}).route(DEFAULT_TAG, b"ab\n") == ("", b"ba\n")
    assert routing.has_tables({"outputs": []}) and not routing.has_tables({"mode": "x"})


# --- validation messages ---------------------------------------------------------------------------------
def test_unknown_processor_names_the_entry_and_lists_known_ones() -> None:
    msg = error({"filters": [{"processor": "uppercase"}, {"processor": "upcase"}]})
    assert msg.startswith("filters[1].processor: unknown processor 'upcase'")
    assert "uppercase" in msg and "shout" in msg  # built-ins and plug-ins are offered


def test_unknown_mode_processor() -> None:
    with pytest.raises(RoutingError, match="unknown processor 'nope'"):
        routing.from_mode("nope")


@pytest.mark.parametrize("filt", [
    {"processor": "grep", "pattern": "("},
    {"processor": "drop", "pattern": "[a-"},
    {"processor": "redact", "pattern": "*x"},
    {"retag": "x", "pattern": "(?P<"},
])
def test_bad_regex(filt: dict) -> None:
    msg = error({"filters": [filt]})
    assert msg.startswith("filters[0].pattern: invalid regular expression:")


@pytest.mark.parametrize("replacement", [r"\9", "\\", r"\g<nosuch>", 5])
def test_bad_redact_replacement_is_caught_at_load_not_per_line(replacement: object) -> None:
    """A replacement the regex engine rejects must fail at start-up, not crash a worker on the first match."""
    msg = error({"filters": [{"processor": "redact", "pattern": "a", "replacement": replacement}]})
    assert msg.startswith("filters[0]") and "replacement" in msg


def test_good_redact_replacement_with_group_reference() -> None:
    r = routing.from_tables({"filters": [{"processor": "redact", "pattern": r"(\w)\w*", "replacement": r"\1."}]})
    assert r.route(DEFAULT_TAG, b"John Smith\n") == ("", b"J. S.\n")


@pytest.mark.parametrize(("filt", "expected"), [
    ({"processor": "grep"}, "filters[0]: processor 'grep' needs option 'pattern'"),
    ({"processor": "uppercase", "pattern": "x"}, ("filters[0]: processor 'uppercase' takes no option 'pattern' "
                                                 "(its options: none)")),
    ({"processor": "grep", "pattern": 5}, "filters[0]: bad options for processor 'grep'"),
    ({"processor": "grep", "pattern": "x", "colour": 1}, ("filters[0]: processor 'grep' takes no option 'colour' "
                                                         "(its options: pattern)")),
    ({"match": "*"}, "filters[0].processor: a filter needs a processor (or retag)"),
    # Found by a new user: a typo in a key was reported as the key it should have been, never named.
    ({"match": "*", "procesor": "uppercase"}, ("filters[0].processor: a filter needs a processor (or retag): did you "
                                              "mean 'processor' for 'procesor'?")),
    ({"processor": "redact", "patern": "x"}, ("filters[0]: processor 'redact' takes no option 'patern' (its options: "
                                             "pattern, replacement): did you mean 'pattern' for 'patern'?")),
    ({"processor": ""}, "filters[0].processor: a non-empty string is required"),
    ({"processor": "uppercase", "match": ""}, "filters[0].match: a non-empty string is required"),
    ({"retag": "x", "processor": "uppercase"}, "filters[0]: unknown key 'processor'"),
    ({"retag": "x", "extra": 1}, "filters[0]: unknown key 'extra'"),
    ({"retag": ""}, "filters[0].retag: a non-empty string is required"),
    ({"retag": "x", "pattern": 3}, "filters[0].pattern: must be a string"),
])
def test_filter_validation(filt: dict, expected: str) -> None:
    assert error({"filters": [filt]}).startswith(expected)


@pytest.mark.parametrize(("tag", "expected"), [
    ({"match": "*.log"}, "tags[0].tag: a non-empty string is required"),
    ({"tag": "x"}, "tags[0].match: a non-empty string is required"),
    ({"match": "*", "tag": "x", "binary": "yes"}, "tags[0].binary: must be 'fail' or 'pass'"),
    ({"match": "*", "tag": "x", "bogus": 1}, "tags[0]: unknown key 'bogus' (allowed: binary, match, tag)"),
    ({"match": "*", "tag": 7}, "tags[0].tag: a non-empty string is required"),
])
def test_tag_validation(tag: dict, expected: str) -> None:
    assert error({"tags": [tag]}).startswith(expected)


@pytest.mark.parametrize("key", ["tags", "filters", "outputs"])
@pytest.mark.parametrize("value", [{"match": "*"}, "x", [1, 2]])
def test_tables_must_be_arrays_of_tables(key: str, value: object) -> None:
    assert error({key: value}) == f"{key}: must be an array of tables ([[{key}]])"


@pytest.mark.parametrize("path", ["../x", "/abs", ".hidden", "a/../b", "a/./b", "a//b", "a/", "errors/.git", "..", "."])
def test_bad_output_paths(path: str) -> None:
    msg = error({"outputs": [{"match": "*", "path": path}]})
    assert msg.startswith("outputs[0].path: must be a relative folder under processed/")
    assert repr(path) in msg


@pytest.mark.parametrize("path", ["", "errors", "by-tag/errors", "a b", "é"])
def test_good_output_paths(path: str) -> None:
    r = routing.from_tables({"outputs": [{"match": "*", "path": path}]})
    assert r.output_for("anything") == path


def test_output_unknown_key_and_missing_path_default() -> None:
    assert error({"outputs": [{"match": "*", "folder": "x"}]}).startswith("outputs[0]: unknown key 'folder' (allowed: match, path)")
    assert routing.from_tables({"outputs": [{"match": "x"}]}).output_for("x") == ""


def test_error_names_the_right_index() -> None:
    msg = error({"outputs": [{"match": "a", "path": "a"}, {"match": "b", "path": "b"}, {"match": "c", "path": "/c"}]})
    assert msg.startswith("outputs[2].path")


# --- third-party processors (tests/plugins, installed in the venv) -----------------------------------------
def test_plugin_processor_by_entry_point_with_options() -> None:
    r = routing.from_tables({"filters": [{"processor": "shout", "suffix": "!!"}]})
    assert r.route(DEFAULT_TAG, b"hey\r\n") == ("", b"HEY!!\r\n")


def test_plugin_bad_option_is_a_routing_error() -> None:
    assert error({"filters": [{"processor": "shout", "volume": 11}]}) == \
        "filters[0]: processor 'shout' takes no option 'volume' (its options: suffix)"


def test_plugin_processors_load_without_running_their_hazards() -> None:
    """hang_on and abort_on are only dangerous on their marker line: building and ordinary lines are safe."""
    r = routing.from_tables({"filters": [{"processor": "hang_on", "marker": "ZZZ"}, {"processor": "abort_on", "marker": "QQQ"}]})
    assert r.route(DEFAULT_TAG, b"plain\n") == ("", b"plain\n")
    assert [f.name for f in r.filters] == ["hang_on", "abort_on"]


@pytest.mark.parametrize("pattern", ["a{4294967296}", "a{1,4294967296}", "x{99999999999}", "(?:" * 2000 + "a" + ")" * 2000],
                         ids=["overflow", "overflow-range", "overflow-big", "deep"])
@pytest.mark.parametrize("kind", ["grep", "drop", "redact", "retag"])
def test_a_regex_that_cannot_compile_is_a_routing_error(pattern: str, kind: str) -> None:
    """The issue's instance (a{4294967296}: OverflowError, exit 1 at start, death on SIGHUP) and its kind: any
    pattern re.compile cannot take (too-large repeat counts, nesting too deep) in any filter that takes one."""
    filt = {"retag": "x", "pattern": pattern} if kind == "retag" else {"processor": kind, "pattern": pattern}
    msg = error({"filters": [filt]})
    assert msg.startswith("filters[0].pattern: invalid regular expression:"), msg


def test_options_a_factory_takes_as_kwargs_are_not_called_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plug-in whose factory takes **options: its signature cannot say which key is wrong, so its own words stand."""
    def factory(**opts: object) -> object:
        raise TypeError(f"no such option: {sorted(opts)}")
    monkeypatch.setitem(routing.processors.BUILTIN, "anykw", factory)
    assert error({"filters": [{"processor": "anykw", "x": 1}]}) == \
        "filters[0]: bad options for processor 'anykw': no such option: ['x']"


def test_a_plugin_factory_that_raises_anything_is_a_routing_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plug-in factory raising ValueError (not TypeError) must be a config error too, not a crash."""
    msg = error({"filters": [{"processor": "raise_on", "marker": "x", "nosuch": 1}]})
    assert msg == "filters[0]: processor 'raise_on' takes no option 'nosuch' (its options: marker)", msg
    monkeypatch.setitem(routing.processors.BUILTIN, "broken", lambda: int("not a number"))
    msg = error({"filters": [{"processor": "broken"}]})
    assert msg.startswith("filters[0]: processor 'broken' cannot be built: ValueError:"), msg


def test_a_plugin_raising_keyerror_is_not_an_unknown_processor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found: a plug-in whose module raised KeyError at import (a missing setting) was reported as an unknown
    processor: processors.make's KeyError for "no such name" caught the plug-in's own. The kind: "unknown" is only a
    name no built-in and no entry point has; any error of a plug-in, KeyError included, at its load or from its
    factory, is named as its own. Real plug-in distributions on sys.path, loaded by importlib.metadata."""
    monkeypatch.syspath_prepend(plugin(tmp_path / "a", "keyload", "raise KeyError('endpoint')\n",
                                       {"keyfail": "keyload:factory"}))
    monkeypatch.syspath_prepend(plugin(tmp_path / "b", "keybuild", "def factory():\n    return {}['endpoint']\n",
                                       {"keybuild": "keybuild:factory"}))
    assert error({"filters": [{"processor": "keyfail"}]}) == \
        "filters[0].processor: processor 'keyfail' could not be loaded: KeyError: 'endpoint'"
    with pytest.raises(RoutingError) as e:
        routing.from_mode("keyfail")
    assert str(e.value) == "mode: processor 'keyfail' could not be loaded: KeyError: 'endpoint'"
    with pytest.raises(processors.LoadError) as load:
        processors.make("keyfail", {})
    assert isinstance(load.value.__cause__, KeyError)  # the plug-in's own error, for a traceback if one is wanted
    assert error({"filters": [{"processor": "keybuild"}]}) == \
        "filters[0]: processor 'keybuild' cannot be built: KeyError: 'endpoint'"
    assert error({"filters": [{"processor": "keyfial"}]}).startswith("filters[0].processor: unknown processor 'keyfial'")
    with pytest.raises(KeyError):  # Unknown is still a KeyError for callers of make()
        processors.make("keyfial", {})


def test_a_plugin_exiting_in_its_factory_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kind of break-it round 8's SystemExit at import (tests/test_break_round8.py), in the other place a plug-in
    runs at validation: its factory. SystemExit (a sys.exit() or argparse in it) or another BaseException is a
    config error naming it, never an exit of `run` with the plug-in's code (0: systemd would not restart it)."""
    monkeypatch.syspath_prepend(plugin(tmp_path / "a", "exitbuild", "def factory():\n    raise SystemExit(0)\n",
                                       {"exitbuild": "exitbuild:factory"}))
    assert error({"filters": [{"processor": "exitbuild"}]}) == \
        "filters[0]: processor 'exitbuild' cannot be built: SystemExit: 0"
