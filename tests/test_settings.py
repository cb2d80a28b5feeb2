"""Settings: flag > environment (INGESTD_*, plain MODE) > .env in cwd > TOML config > defaults; ConfigError on bad values."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ingestd.engine import DEFAULT_TAG
from ingestd.settings import ConfigError, Settings, load


@pytest.fixture
def cwd(tmp_path: Path) -> Path:
    """An empty working directory: no .env unless a test writes one."""
    d = tmp_path / "cwd"
    d.mkdir()
    return d


def toml(dirpath: Path, text: str) -> str:
    path = dirpath / "ingestd.toml"
    path.write_text(text)
    return str(path)


def bad(flags: dict[str, Any], cwd: Path, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as e:
        load(flags, environ=environ or {}, cwd=cwd)
    msg = str(e.value)
    assert "\n" not in msg and msg, "a ConfigError is one line"
    return msg


def test_defaults(cwd: Path) -> None:
    s = load({}, environ={}, cwd=cwd)
    assert s == Settings(routing_doc={"mode": "uppercase"})
    assert (s.watch_dir, s.mode, s.listen, s.config, s.max_attempts) == (Path("watch_dir"), "uppercase", "127.0.0.1:9800", None, 3)
    assert s.workers >= 1 and s.max_line_bytes == 1 << 20 and s.log_format == "auto"
    assert s.routing.route(DEFAULT_TAG, b"a\n") == ("", b"A\n")


def test_settings_are_frozen(cwd: Path) -> None:
    s = load({}, environ={}, cwd=cwd)
    with pytest.raises(AttributeError):
        s.workers = 9  # type: ignore[misc]


def test_none_flags_are_unset(cwd: Path) -> None:
    """argparse gives None for flags not on the command line: they must not hide lower layers."""
    s = load({"workers": None, "mode": None}, environ={"INGESTD_WORKERS": "3"}, cwd=cwd)
    assert (s.workers, s.mode) == (3, "uppercase")


# --- precedence -----------------------------------------------------------------------------------------
LAYERS = ["flag", "env", "dotenv", "toml"]


@pytest.mark.parametrize("top", LAYERS + ["default"])
def test_precedence_for_each_layer(top: str, cwd: Path, tmp_path: Path) -> None:
    """Each layer present from `top` down: the topmost wins, for several settings at once."""
    present = LAYERS[LAYERS.index(top):] if top != "default" else []
    values = {"flag": ("5", "lowercase", "h1:1"), "env": ("4", "reverse", "h2:2"),
              "dotenv": ("3", "titlecase", "h3:3"), "toml": ("2", "strip", "h4:4")}
    flags: dict[str, Any] = {}
    environ: dict[str, str] = {}
    if "toml" in present:
        w, m, l = values["toml"]
        flags_config = toml(tmp_path, f'workers = {w}\nmode = "{m}"\nlisten = "{l}"\n')
        environ["INGESTD_CONFIG"] = flags_config
    if "dotenv" in present:
        w, m, l = values["dotenv"]
        (cwd / ".env").write_text(f"INGESTD_WORKERS={w}\nMODE={m}\nINGESTD_LISTEN={l}\n")
    if "env" in present:
        w, m, l = values["env"]
        environ |= {"INGESTD_WORKERS": w, "INGESTD_MODE": m, "INGESTD_LISTEN": l}
    if "flag" in present:
        w, m, l = values["flag"]
        flags = {"workers": int(w), "mode": m, "listen": l}
    s = load(flags, environ=environ, cwd=cwd)
    if top == "default":
        assert (s.mode, s.listen) == ("uppercase", "127.0.0.1:9800")
        return
    w, m, l = values[top]
    assert (s.workers, s.mode, s.listen) == (int(w), m, l)
    assert s.routing_doc == {"mode": m}


def test_layers_merge_per_setting(cwd: Path, tmp_path: Path) -> None:
    """Precedence is per setting: each comes from the highest layer that sets it."""
    config = toml(tmp_path, "workers = 2\nsettle_time = 0.5\nrecent = 7\nmax_attempts = 9\n")
    (cwd / ".env").write_text(f"INGESTD_CONFIG={config}\nINGESTD_RECENT=8\nINGESTD_MAX_ATTEMPTS=4\n")
    s = load({"max_attempts": 5}, environ={"INGESTD_SETTLE_TIME": "0.25"}, cwd=cwd)
    assert (s.workers, s.settle_time, s.recent, s.max_attempts) == (2, 0.25, 8, 5)
    assert s.config == Path(config)


def test_plain_mode_env_and_ingestd_mode_wins_within_a_layer(cwd: Path) -> None:
    assert load({}, environ={"MODE": "lowercase"}, cwd=cwd).mode == "lowercase"
    assert load({}, environ={"MODE": "lowercase", "INGESTD_MODE": "reverse"}, cwd=cwd).mode == "reverse"
    (cwd / ".env").write_text("INGESTD_MODE=titlecase\n")
    assert load({}, environ={"MODE": "lowercase"}, cwd=cwd).mode == "lowercase"  # env (even plain MODE) > .env


def test_dotenv_mode_as_the_seed_project_writes_it(cwd: Path) -> None:
    (cwd / ".env").write_text("# the seed project's .env\nMODE=lowercase\n")
    s = load({}, environ={}, cwd=cwd)
    assert s.mode == "lowercase"
    assert s.routing.route(DEFAULT_TAG, b"AB\n") == ("", b"ab\n")


def test_dotenv_only_from_the_given_cwd(cwd: Path, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("MODE=lowercase\n")  # the parent's .env is not ours
    assert load({}, environ={}, cwd=cwd).mode == "uppercase"


def test_dotenv_is_not_exported_to_the_environment(cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INGESTD_RECENT", raising=False)
    (cwd / ".env").write_text("INGESTD_RECENT=4\n")
    assert load({}, environ={}, cwd=cwd).recent == 4
    import os
    assert "INGESTD_RECENT" not in os.environ


def test_empty_environment_value_counts_as_unset(cwd: Path) -> None:
    assert load({}, environ={"INGESTD_WORKERS": "", "MODE": ""}, cwd=cwd).mode == "uppercase"


def test_config_path_from_flag_beats_env(cwd: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text("recent = 2\n")
    b.write_text("recent = 3\n")
    s = load({"config": str(a)}, environ={"INGESTD_CONFIG": str(b)}, cwd=cwd)
    assert (s.config, s.recent) == (a, 2)


def test_all_settings_from_environment(cwd: Path) -> None:
    env = {"INGESTD_WATCH_DIR": "/srv/in", "INGESTD_WORKERS": "2", "INGESTD_LISTEN": "[::1]:9900",
           "INGESTD_MAX_ATTEMPTS": "5", "INGESTD_SETTLE_TIME": "0", "INGESTD_RESCAN_INTERVAL": "2.5",
           "INGESTD_MAX_LINE_BYTES": "100", "INGESTD_RECENT": "3", "INGESTD_DONE_MARKER": "yes",
           "INGESTD_MIN_FREE_BYTES": "0", "INGESTD_STOP_TIMEOUT": "1.5", "INGESTD_LOG_FORMAT": "text"}
    s = load({}, environ=env, cwd=cwd)
    assert s.watch_dir == Path("/srv/in") and s.workers == 2 and s.host_port == ("::1", 9900)
    assert (s.max_attempts, s.settle_time, s.rescan_interval, s.max_line_bytes) == (5, 0.0, 2.5, 100)
    assert (s.recent, s.done_marker, s.min_free_bytes, s.stop_timeout, s.log_format) == (3, True, 0, 1.5, "text")


@pytest.mark.parametrize(("text", "expected"), [("1", True), ("true", True), ("On", True), ("0", False), ("no", False), ("OFF", False)])
def test_boolean_spellings(text: str, expected: bool, cwd: Path) -> None:
    assert load({}, environ={"INGESTD_DONE_MARKER": text}, cwd=cwd).done_marker is expected


def test_toml_native_types(cwd: Path, tmp_path: Path) -> None:
    config = toml(tmp_path, 'watch_dir = "/data/w"\ndone_marker = true\nsettle_time = 2\nlog_format = "text"\n')
    s = load({"config": config}, environ={}, cwd=cwd)
    assert (s.watch_dir, s.done_marker, s.settle_time, s.log_format) == (Path("/data/w"), True, 2.0, "text")


def test_quiet_time_default_and_sources(cwd: Path, tmp_path: Path) -> None:
    assert load({}, environ={}, cwd=cwd).quiet_time == 0.02  # pickup p99 stays well under 100 ms
    assert load({}, environ={"INGESTD_QUIET_TIME": "1.5"}, cwd=cwd).quiet_time == 1.5
    assert load({"config": toml(tmp_path, "quiet_time = 0\n")}, environ={}, cwd=cwd).quiet_time == 0.0


# --- bad values: one line naming the setting -------------------------------------------------------------------
BAD_VALUES = [
    ("workers", "0"), ("workers", "abc"), ("workers", "-2"), ("workers", "1.5"),
    ("listen", "9800"), ("listen", "host:"), ("listen", ":9800"), ("listen", "h:99999"), ("listen", "h:port"),
    ("max_attempts", "0"), ("settle_time", "-1"), ("settle_time", "soon"), ("settle_time", "nan"),
    ("quiet_time", "-0.1"), ("quiet_time", "later"),
    ("rescan_interval", "x"), ("max_line_bytes", "0"), ("recent", "0"), ("done_marker", "maybe"),
    ("min_free_bytes", "-1"), ("stop_timeout", "-5"), ("stall_time", "-1"), ("log_format", "xml"), ("mode", "nope"),
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_bad_value_from_environment(name: str, value: str, cwd: Path) -> None:
    msg = bad({}, cwd, environ={f"INGESTD_{name.upper()}": value})
    assert msg.startswith(f"{name}: ")
    if name != "mode":
        assert repr(value) in msg


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_bad_value_from_flag_and_dotenv(name: str, value: str, cwd: Path) -> None:
    assert bad({name: value}, cwd).startswith(f"{name}: ")
    (cwd / ".env").write_text(f"INGESTD_{name.upper()}={value}\n")
    assert bad({}, cwd).startswith(f"{name}: ")


@pytest.mark.parametrize(("line", "name"), [
    ("workers = true", "workers"), ("workers = 2.5", "workers"), ("workers = 0", "workers"), ('workers = "many"', "workers"),
    ("settle_time = false", "settle_time"), ("settle_time = -0.5", "settle_time"), ("done_marker = 2", "done_marker"),
    ("log_format = 1", "log_format"), ("mode = 5", "mode"), ('mode = ""', "mode"), ("listen = 9800", "listen"),
    ("watch_dir = 5", "watch_dir"), ('watch_dir = ""', "watch_dir"), ("watch_dir = [1]", "watch_dir"),
    ("max_line_bytes = -1", "max_line_bytes"), ("rescan_interval = [1]", "rescan_interval"),
])
def test_bad_value_from_toml(line: str, name: str, cwd: Path, tmp_path: Path) -> None:
    """Values of the wrong TOML type must be a ConfigError too, never a traceback."""
    assert bad({"config": toml(tmp_path, line + "\n")}, cwd).startswith(f"{name}: ")


def test_bad_flag_watch_dir(cwd: Path) -> None:
    assert bad({"watch_dir": ""}, cwd).startswith("watch_dir: ")


def test_unknown_mode_lists_processors(cwd: Path) -> None:
    msg = bad({"mode": "upcase"}, cwd)
    assert msg.startswith("mode: unknown processor 'upcase'") and "uppercase" in msg and "shout" in msg


# Issue 9: `MODE=grep` could not be given a pattern and failed with "_grep() missing 1 required positional argument".
def test_mode_needing_options_is_a_clear_error(cwd: Path) -> None:
    msg = bad({}, cwd, environ={"MODE": "grep"})
    assert msg == "pattern: mode grep needs a pattern (--pattern, INGESTD_PATTERN or pattern = in the config)"


@pytest.mark.parametrize("mode", ["grep", "drop", "redact"])
def test_every_mode_with_a_required_option_names_it(cwd: Path, mode: str) -> None:
    msg = bad({"mode": mode}, cwd)
    assert msg.startswith(f"pattern: mode {mode} needs a pattern") and "positional" not in msg


def test_mode_pattern_from_each_source(cwd: Path, tmp_path: Path) -> None:
    keep = [b"an ERROR here\n", b"fine\n"]

    def kept(s: Settings) -> list[bytes]:
        return [data for line in keep if (data := s.routing.route(DEFAULT_TAG, line)[1])]

    assert kept(load({"mode": "grep", "pattern": "ERROR"}, environ={}, cwd=cwd)) == [b"an ERROR here\n"]
    assert kept(load({}, environ={"MODE": "drop", "INGESTD_PATTERN": "ERROR"}, cwd=cwd)) == [b"fine\n"]
    (cwd / ".env").write_text("MODE=grep\nINGESTD_PATTERN=fine\n")
    assert kept(load({}, environ={}, cwd=cwd)) == [b"fine\n"]
    config = toml(tmp_path, 'mode = "redact"\npattern = "E.*R"\nreplacement = "<x>"\n')
    s = load({"config": config}, environ={}, cwd=tmp_path)
    assert s.routing.route(DEFAULT_TAG, b"an ERROR here\n") == ("", b"an <x> here\n")
    assert load({"mode": "redact", "pattern": "E"}, environ={}, cwd=tmp_path).routing.route(
        DEFAULT_TAG, b"E1\n") == ("", b"[REDACTED]1\n")  # the processor's own default replacement


@pytest.mark.parametrize("pattern", ["[", "(", "a{4294967296}", "*x"])
def test_bad_mode_pattern_names_the_setting_and_its_source(cwd: Path, pattern: str) -> None:
    msg = bad({"mode": "grep", "pattern": pattern}, cwd)
    assert msg.startswith("pattern: invalid regular expression: ") and msg.endswith("(from --pattern)")
    msg = bad({}, cwd, environ={"MODE": "drop", "INGESTD_PATTERN": pattern})
    assert msg.startswith("pattern: invalid regular expression: ") and msg.endswith("(from INGESTD_PATTERN)")


def test_bad_replacement_names_the_setting(cwd: Path) -> None:
    msg = bad({"mode": "redact", "pattern": "a", "replacement": "\\9"}, cwd)
    assert msg.startswith("replacement: invalid replacement") and msg.endswith("(from --replacement)")


@pytest.mark.parametrize(("mode", "flags", "key"), [
    ("uppercase", {"pattern": "x"}, "pattern"),  # the reported case: a mode that takes no options
    ("passthrough", {"replacement": "y"}, "replacement"),
    ("shout", {"pattern": "x"}, "pattern"),  # a plug-in's factory without options
    ("grep", {"pattern": "x", "replacement": "y"}, "replacement"),  # an option of another mode
])
def test_options_a_mode_does_not_take_are_refused(cwd: Path, mode: str, flags: dict[str, str], key: str) -> None:
    msg = bad({"mode": mode, **flags}, cwd)
    assert msg.startswith(f"{key}: mode {mode} takes ") and msg.endswith(f"(from --{key})")


def test_mode_options_beside_config_filters_are_refused(cwd: Path, tmp_path: Path) -> None:
    config = toml(tmp_path, '[[filters]]\nprocessor = "lowercase"\n')
    assert bad({"config": config, "pattern": "x"}, cwd).startswith("pattern: belongs to mode, and the config has")


# Issue 9: a config with [[tags]]/[[outputs]] and no [[filters]] passed every line through unchanged, though
# README said MODE applies "when the config has no [[filters]]". The mode (set or default) is its one filter.
@pytest.mark.parametrize("tables", [
    '[[tags]]\nmatch = "*.log"\ntag = "app"\n',
    '[[outputs]]\nmatch = "*"\npath = "all"\n',
    '[[tags]]\nmatch = "*.log"\ntag = "app"\n[[outputs]]\nmatch = "app"\npath = "app"\n[[outputs]]\nmatch = "*"\n',
])
def test_default_mode_applies_to_tables_without_filters(cwd: Path, tmp_path: Path, tables: str) -> None:
    s = load({"config": toml(tmp_path, tables)}, environ={}, cwd=cwd)
    table = s.routing
    for name in ("x.log", "y.txt"):
        tag = table.rule_for(name).tag
        assert table.route(tag, b"hello\n")[1] == b"HELLO\n"  # the default mode, uppercase
    s = load({"config": toml(tmp_path, tables), "mode": "grep", "pattern": "keep"}, environ={}, cwd=cwd)
    assert s.routing.route("app", b"drop me\n")[0] is None and s.routing.route("app", b"keep\n")[1] == b"keep\n"


def test_config_filters_still_replace_the_mode(cwd: Path, tmp_path: Path) -> None:
    s = load({"config": toml(tmp_path, '[[tags]]\nmatch = "*"\ntag = "t"\n[[filters]]\nmatch = "other"\n'
                                      'processor = "lowercase"\n')}, environ={}, cwd=cwd)
    assert s.routing.route("t", b"Hello\n") == ("", b"Hello\n")  # filters given: no mode added


def test_plugin_mode(cwd: Path) -> None:
    assert load({"mode": "shout"}, environ={}, cwd=cwd).routing.route(DEFAULT_TAG, b"a\n") == ("", b"A!\n")


def test_unknown_toml_setting(cwd: Path, tmp_path: Path) -> None:
    config = toml(tmp_path, "workers = 2\nwokers = 3\n")
    msg = bad({"config": config}, cwd)
    assert msg.startswith(f"{config}: unknown setting 'wokers'") and "workers" in msg


def test_unknown_toml_section(cwd: Path, tmp_path: Path) -> None:
    assert "unknown setting 'server'" in bad({"config": toml(tmp_path, "[server]\nport = 1\n")}, cwd)


def test_invalid_toml(cwd: Path, tmp_path: Path) -> None:
    config = toml(tmp_path, "workers = = 2\n")
    assert bad({"config": config}, cwd).startswith(f"config: {config} is not valid TOML")


def test_missing_config_file(cwd: Path, tmp_path: Path) -> None:
    msg = bad({}, cwd, environ={"INGESTD_CONFIG": str(tmp_path / "nope.toml")})
    assert msg.startswith("config: cannot read") and "nope.toml" in msg and "No such file" in msg


def test_config_is_a_directory(cwd: Path, tmp_path: Path) -> None:
    assert bad({"config": str(tmp_path)}, cwd).startswith("config: cannot read")


def test_bad_routing_table_in_config(cwd: Path, tmp_path: Path) -> None:
    config = toml(tmp_path, '[[outputs]]\nmatch = "*"\npath = "../escape"\n')
    assert bad({"config": config}, cwd).startswith("config: outputs[0].path: must be a relative folder")
    config = toml(tmp_path, '[[filters]]\nprocessor = "grep"\npattern = "("\n')
    assert bad({"config": config}, cwd).startswith("config: filters[0].pattern: invalid regular expression")


# --- mode and routing tables ------------------------------------------------------------------------------------
FILTERS = '[[filters]]\nmatch = "*"\nprocessor = "reverse"\n'


def test_config_tables_become_the_routing(cwd: Path, tmp_path: Path) -> None:
    s = load({"config": toml(tmp_path, FILTERS)}, environ={}, cwd=cwd)
    assert s.routing_doc == {"filters": [{"match": "*", "processor": "reverse"}]}
    assert s.routing.route(DEFAULT_TAG, b"ab\n") == ("", b"ba\n")
    assert s.mode == "uppercase"  # the default mode does not conflict with tables


@pytest.mark.parametrize("where", ["flag", "env", "plain-env", "dotenv", "toml"])
def test_mode_and_filters_conflict(where: str, cwd: Path, tmp_path: Path) -> None:
    flags: dict[str, Any] = {}
    environ: dict[str, str] = {}
    text = FILTERS
    if where == "flag":
        flags["mode"] = "lowercase"
    elif where == "env":
        environ["INGESTD_MODE"] = "lowercase"
    elif where == "plain-env":
        environ["MODE"] = "lowercase"
    elif where == "dotenv":
        (cwd / ".env").write_text("MODE=lowercase\n")
    else:
        text = 'mode = "lowercase"\n' + FILTERS
    flags["config"] = toml(tmp_path, text)
    msg = bad(flags, cwd, environ)
    assert msg.startswith("mode: ") and "[[filters]]" in msg and "choose one" in msg


def test_mode_with_outputs_but_no_filters_is_not_ignored(cwd: Path, tmp_path: Path) -> None:
    """MODE beside [[tags]]/[[outputs]] alone: the mode is the one filter, as MODE alone would be."""
    config = toml(tmp_path, '[[tags]]\nmatch = "*.log"\ntag = "logs"\n\n[[outputs]]\nmatch = "logs"\npath = "logs"\n'
                            '\n[[outputs]]\nmatch = "*"\npath = ""\n')
    r = load({"config": config}, environ={"MODE": "lowercase"}, cwd=cwd).routing
    assert list(r.run(r.rule_for("a.log").tag, [b"AB\n"])) == [("logs", b"ab\n")]
    assert list(r.run(r.rule_for("a.txt").tag, [b"AB\n"])) == [("", b"ab\n")]
    # and a bad mode there is still reported as the mode
    assert bad({"config": config, "mode": "nope"}, cwd).startswith("mode: unknown processor 'nope'")


def test_tables_without_filters_and_without_mode_get_the_default_mode(cwd: Path, tmp_path: Path) -> None:
    config = toml(tmp_path, '[[outputs]]\nmatch = "*"\npath = "out"\n')
    r = load({"config": config}, environ={}, cwd=cwd).routing
    assert r.route(DEFAULT_TAG, b"Ab\n") == ("out", b"AB\n")  # was ("out", b"Ab\n"): the mode silently off


def test_routing_doc_is_plain_data_for_workers(cwd: Path, tmp_path: Path) -> None:
    import pickle
    s = load({"config": toml(tmp_path, FILTERS)}, environ={}, cwd=cwd)
    assert pickle.loads(pickle.dumps(s.routing_doc)) == s.routing_doc


@pytest.mark.parametrize(("listen", "expected"), [("127.0.0.1:9800", ("127.0.0.1", 9800)), ("[::1]:80", ("::1", 80)),
                                                  ("localhost:0", ("localhost", 0))])
def test_host_port(listen: str, expected: tuple[str, int], cwd: Path) -> None:
    assert load({"listen": listen}, environ={}, cwd=cwd).host_port == expected


# --- ranges: finite, positive where it matters (issue 8) ----------------------------------------------------------
@pytest.mark.parametrize(("name", "value"), [
    ("stop_timeout", "inf"), ("stop_timeout", "-inf"), ("stop_timeout", "1e400"), ("settle_time", "inf"),
    ("stall_time", "inf"), ("stall_time", "0"), ("rescan_interval", "0"), ("rescan_interval", "0.01"),
    ("rescan_interval", "inf"), ("rescan_interval", "nan"), ("stop_timeout", "1e12"), ("folder_quiet_time", "-1"),
    ("folder_quiet_time", "inf"),
])
def test_seconds_must_be_finite_and_in_range(name: str, value: str, cwd: Path) -> None:
    """The issue's instances (stop_timeout = inf crashed on SIGTERM, rescan_interval = 0 burned a core) and the
    kind: every duration, from every source, TOML floats included."""
    msg = bad({}, cwd, environ={f"INGESTD_{name.upper()}": value})
    assert msg.startswith(f"{name}: must be a number of seconds") and f"INGESTD_{name.upper()}" in msg, msg
    assert bad({name: value}, cwd).startswith(f"{name}: ")


@pytest.mark.parametrize("line", ["stop_timeout = inf", "rescan_interval = 0", "stall_time = nan", "settle_time = -inf",
                                  "rescan_interval = 0.5"])
def test_seconds_out_of_range_in_toml(line: str, cwd: Path, tmp_path: Path) -> None:
    name = line.split(" ")[0]
    msg = bad({"config": toml(tmp_path, line + "\n")}, cwd)
    assert msg.startswith(f"{name}: ") and "ingestd.toml" in msg, msg


def test_folder_quiet_time_is_its_own_setting(cwd: Path, tmp_path: Path) -> None:
    """5 minutes by default, whatever settle_time is: a producer pausing between two files of its folder keeps it."""
    assert load({}, environ={"INGESTD_SETTLE_TIME": "0.1"}, cwd=cwd).folder_quiet_time == 300.0
    s = load({"config": toml(tmp_path, "folder_quiet_time = 86400\n")}, environ={}, cwd=cwd)
    assert (s.folder_quiet_time, s.settle_time) == (86400.0, 1.0)


def test_sane_seconds_accepted(cwd: Path) -> None:
    s = load({}, environ={"INGESTD_RESCAN_INTERVAL": "1", "INGESTD_STOP_TIMEOUT": "0", "INGESTD_STALL_TIME": "0.5",
                          "INGESTD_SETTLE_TIME": "0"}, cwd=cwd)
    assert (s.rescan_interval, s.stop_timeout, s.stall_time, s.settle_time) == (1.0, 0.0, 0.5, 0.0)


def test_a_regex_that_cannot_compile_is_a_config_error(cwd: Path, tmp_path: Path) -> None:
    """a{4294967296} raised OverflowError: exit 1 at start (systemd restart-loops), death on SIGHUP."""
    config = toml(tmp_path, '[[filters]]\nmatch = "*"\nprocessor = "grep"\npattern = "a{4294967296}"\n')
    assert bad({"config": config}, cwd).startswith("config: filters[0].pattern: invalid regular expression")


# --- .env typos and where a bad value came from (issue 9) ---------------------------------------------------------
def test_unknown_ingestd_variable_in_dotenv_is_refused(cwd: Path) -> None:
    (cwd / ".env").write_text("INGESTD_WORKRS=3\n")
    msg = bad({}, cwd)
    assert msg.startswith("INGESTD_WORKRS in ") and ".env: unknown setting" in msg and "INGESTD_WORKERS" in msg


def test_a_typo_in_dotenv_names_the_closest_setting(cwd: Path) -> None:
    (cwd / ".env").write_text("INGESTD_WORKER=3\n")
    assert "(did you mean INGESTD_WORKERS? allowed: " in bad({}, cwd)
    (cwd / ".env").write_text("INGESTD_XYZZY=3\n")
    assert "did you mean" not in bad({}, cwd)  # nothing close: the list alone


def test_dotenv_lines_naming_a_setting_without_its_prefix_are_found_not_refused(cwd: Path) -> None:
    """A new user wrote `recursive = true` in .env (the config file's form, which the daemon's own hint printed):
    not read, and nothing said so. Not refused either, as plain LOG_LEVEL or WORKERS may be another tool's: the
    daemon warns (dotenv_not_read, tests/test_cli.py). Exactly MODE is read; `mode`, `Mode` are not."""
    from ingestd.settings import dotenv_unread, unread_in_dotenv

    (cwd / ".env").write_text("recursive = true\nRECURSIVE=true\nmode=titlecase\nMode=x\nMODE=reverse\n"
                              "LOG_LEVEL=debug\nPATH_EXTRA=x\nINGESTD_WORKERS=3\n")
    s = load({}, environ={}, cwd=cwd)
    assert (s.recursive, s.mode, s.workers, s.log_level) == (False, "reverse", 3, "info")
    found = dotenv_unread(cwd)
    assert found is not None and found[0] == cwd / ".env"
    assert found[1] == {"recursive": "INGESTD_RECURSIVE", "RECURSIVE": "INGESTD_RECURSIVE", "mode": "MODE",
                        "Mode": "MODE", "LOG_LEVEL": "INGESTD_LOG_LEVEL"}
    assert unread_in_dotenv({"MODE": "x", "INGESTD_MODE": "y", "OTHER": "z"}) == {}
    (cwd / ".env").write_text("MODE=reverse\n")
    assert dotenv_unread(cwd) is None


@pytest.mark.parametrize("where", ["env", "dotenv"])
def test_a_mode_flag_beats_a_config_named_lower_down(where: str, cwd: Path, tmp_path: Path) -> None:
    """flag > environment > .env for the routing as a whole: `ingestd process --mode uppercase` in a folder whose
    .env names a routing config was refused ("choose one") with no way to choose (a new user)."""
    config = toml(tmp_path, 'workers = 3\n' + FILTERS)
    environ = {"INGESTD_CONFIG": config} if where == "env" else {}
    if where == "dotenv":
        (cwd / ".env").write_text(f"INGESTD_CONFIG={config}\n")
    s = load({"mode": "lowercase"}, environ=environ, cwd=cwd)
    assert s.routing_doc == {"mode": "lowercase"}
    assert s.workers == 3  # the config's other settings still apply
    assert load({}, environ=environ, cwd=cwd).routing_doc == {"filters": [{"match": "*", "processor": "reverse"}]}


def test_mode_and_filters_conflict_names_where_each_came_from(cwd: Path, tmp_path: Path) -> None:
    config = toml(tmp_path, FILTERS)
    (cwd / ".env").write_text(f"INGESTD_CONFIG={config}\n")
    msg = bad({}, cwd, {"INGESTD_MODE": "lowercase"})
    assert msg.startswith("mode: set both as mode (from INGESTD_MODE) and as [[filters]] in the config (from "
                          "INGESTD_CONFIG in "), msg
    assert msg.endswith(".env); choose one")


def test_other_variables_in_dotenv_are_left_alone(cwd: Path) -> None:
    (cwd / ".env").write_text("MODE=lowercase\nPATH_EXTRA=x\nINGESTD_WORKERS=3\n")
    s = load({}, environ={}, cwd=cwd)
    assert (s.workers, s.routing_doc) == (3, {"mode": "lowercase"})


@pytest.mark.parametrize(("where", "expected"), [
    ("env", "(from INGESTD_WORKERS)"), ("dotenv", "(from INGESTD_WORKERS in "), ("flag", "(from --workers)"),
    ("toml", "(from "),
])
def test_every_error_names_where_the_value_came_from(where: str, expected: str, cwd: Path, tmp_path: Path) -> None:
    """INGESTD_WORKERS=abc said only `workers: must be ...`: now the variable, flag or file is named too."""
    if where == "env":
        msg = bad({}, cwd, environ={"INGESTD_WORKERS": "abc"})
    elif where == "dotenv":
        (cwd / ".env").write_text("INGESTD_WORKERS=abc\n")
        msg = bad({}, cwd)
    elif where == "flag":
        msg = bad({"workers": "abc"}, cwd)
    else:
        msg = bad({"config": toml(tmp_path, 'workers = "abc"\n')}, cwd)
        assert "ingestd.toml" in msg
    assert msg.startswith("workers: must be an integer >= 1, not 'abc' ") and expected in msg, msg


def test_default_workers_are_the_cores_this_process_may_use() -> None:
    """Found by a new user's question: the default was os.cpu_count(), the machine's cores, so a daemon confined
    to one core (taskset, a container's cpuset) ran as many workers as the host has, all on that core."""
    import subprocess
    import sys
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from ingestd.settings import Settings; print(Settings().workers)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "1"


def test_log_level_is_a_setting(cwd: Path) -> None:
    """Found by a new user: the README named events "at DEBUG" (folder_removed, claimed) with no way to see them."""
    assert load({}, environ={}, cwd=cwd).log_level == "info"
    assert load({}, environ={"INGESTD_LOG_LEVEL": "debug"}, cwd=cwd).log_level == "debug"
    assert bad({}, cwd, environ={"INGESTD_LOG_LEVEL": "loud"}).startswith("log_level: ")


def test_changed_settings_and_unknown_variables_are_told(cwd: Path) -> None:
    """Found by a new user: INGESTD_RECURSIV=true started a daemon without recursive and without a word, and nothing
    in `started` said what it ran with. changed() is what `started` shows; unknown_env() what it warns about."""
    from ingestd.settings import unknown_env

    s = load({}, environ={"INGESTD_RECURSIVE": "true", "INGESTD_FOLDER_QUIET_TIME": "9"}, cwd=cwd)
    assert s.changed() == {"recursive": True, "folder_quiet_time": 9.0}
    assert load({"watch_dir": "/srv/q"}, environ={}, cwd=cwd).changed() == {"watch_dir": "/srv/q"}
    assert unknown_env({"INGESTD_RECURSIV": "true", "INGESTD_WORKERS": "2", "PATH": "/bin"}) == ["INGESTD_RECURSIV"]


# --- a working directory deeper than PATH_MAX --------------------------------------------------------------------
@contextlib.contextmanager
def deep_cwd(root: Path) -> Iterator[None]:
    """The working directory inside a chain of folders under root whose absolute path passes PATH_MAX (4096 bytes),
    made and entered by relative steps (no path to it fits in one system call), left again by an fd on return."""
    back = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.chdir(root)
        for _ in range(21):  # 21 * 201 bytes > 4096
            os.mkdir("d" * 200)
            os.chdir("d" * 200)
        yield
    finally:
        os.fchdir(back)
        os.close(back)


def test_a_working_directory_deeper_than_path_max_still_finds_its_dotenv(tmp_path: Path) -> None:
    """Found: `ingestd status` (every command) from such a folder died in a traceback, OSError ENAMETOOLONG: the .env
    was looked for by its absolute path. The kernel still resolves `.env` from there: it is read."""
    with deep_cwd(tmp_path):
        assert load({}, environ={}).mode == "uppercase"  # no .env: the defaults
        Path(".env").write_text("MODE=lowercase\n")
        assert load({}, environ={}).mode == "lowercase"


def test_a_dotenv_that_is_not_utf8_is_one_line(cwd: Path) -> None:
    """Found beside the above: it raised UnicodeDecodeError, a traceback."""
    (cwd / ".env").write_bytes(b"MODE=lower\xffcase\n")
    assert bad({}, cwd) == f".env: {cwd}/.env is not UTF-8 text (byte 10)"


def test_a_working_directory_this_user_cannot_search_is_one_line(tmp_path: Path) -> None:
    """Its .env cannot be looked at (EACCES, e.g. `sudo -u` from a home folder): a ConfigError naming it, not an
    OSError's traceback. Run as the user nobody in a child, as root passes every permission check."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a child as the user nobody")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    code = ("import os; from ingestd.settings import ConfigError, load\n"  # imported first: the interpreter may be under /root
            "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
            "try: load({}, environ={})\n"
            "except ConfigError as e: print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], check=False, cwd=private, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and not r.stderr, r.stderr
    assert r.stdout == f".env: cannot read {private}/.env: Permission denied (EACCES); run ingestd from another folder\n"
