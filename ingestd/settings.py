"""Settings: one frozen object, loaded from flags > environment > .env > TOML config > defaults."""

from __future__ import annotations

import difflib
import errno
import math
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from ingestd import routing
from ingestd.engine import Routing


class ConfigError(Exception):
    """A bad setting. The message is one line naming the setting and what is allowed (exit 78; exit 75 when
    `temporary`: the setting is right but cannot be used yet, so systemd's restart may succeed)."""

    temporary = False


@dataclass(frozen=True, slots=True)
class Settings:
    watch_dir: Path = Path("watch_dir")
    mode: str = "uppercase"
    pattern: str | None = None  # the regular expression of mode grep, drop, redact
    replacement: str | None = None  # what mode redact puts in place of a match (the processor's default if unset)
    workers: int = len(os.sched_getaffinity(0)) or 1  # the cores this process may run on (taskset, a cpuset)
    listen: str = "127.0.0.1:9800"
    config: Path | None = None
    max_attempts: int = 3  # crashes a file may be in progress for before it is quarantined
    settle_time: float = 1.0  # seconds a file of unknown history must stay unchanged before a claim
    quiet_time: float = 0.02  # seconds a name must have had no event (close, chmod, utime...) before a claim
    # recursive: seconds a subfolder the daemon emptied must stay empty and unchanged before it is removed. Not
    # settle_time: a producer pausing longer than that between two files of its folder found the folder gone
    folder_quiet_time: float = 300.0
    rescan_interval: float = 30.0  # safety-net full scan, seconds
    max_line_bytes: int = 1 << 20
    recent: int = 10  # completions kept for metrics and status
    done_marker: bool = False  # claim NAME only once NAME.done exists
    recursive: bool = False  # files inside folders of unprocessed/ are processed, their relative paths kept
    min_free_bytes: int = 16 << 20  # stop claiming below this much free space in the watch dir
    stop_timeout: float = 20.0  # warm stop: how long to let the current files finish
    wait_lock: bool = False  # another daemon holds the watch dir: wait for it to go (a standby) instead of exiting 75
    stall_time: float = 30.0  # a busy worker with no progress this long is stuck: killed, replaced, an attempt counted
    time_limit: float = 0.0  # seconds one file may take before its worker is killed (0: no limit)
    metrics_file_names: bool = True  # file-name labels on /metrics (off: no series per file, for high volume)
    log_format: str = "auto"  # json | text | auto (text when stderr is a terminal, else JSON)
    log_level: str = "info"  # debug | info | warning | error: the least severe event logged
    file_exist: str = "keep"  # an earlier same-named result: keep (set aside) | replace | fail (sinks.py)
    broker: str | None = None  # redis://HOST:PORT/DB: run is the cluster's scanner, worker a node (docs/distributed.md)
    lease_time: float = 30.0  # seconds a node's claim lease and Dramatiq heartbeat last without renewal
    node: str = ""  # a worker node's name (default: the host name)
    watch: str = "auto"  # auto | inotify | polling: how unprocessed/ is watched (auto: polling on NFS/CIFS/FUSE...)
    poll_interval: float = 1.0  # seconds between two listings of the polling watcher
    routing_doc: dict[str, Any] = field(default_factory=lambda: {"mode": "uppercase"})  # picklable, for workers

    @property
    def routing(self) -> Routing:
        return routing.build(self.routing_doc)

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)

    def changed(self) -> dict[str, Any]:
        """The settings that differ from their defaults, as JSON values (paths as text), the routing tables left out
        (`config` names their file): what the `started` event shows an operator the daemon really runs with."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "routing_doc" and f.default is not MISSING and value != f.default:
                out[f.name] = str(value) if isinstance(value, Path) else value
        return out


def unknown_env(environ: Mapping[str, str | None]) -> list[str]:
    """INGESTD_* variables (any case) that name no setting (INGESTD_RECURSIV=true), sorted: in the process
    environment ignored, as other tools may set variables of that prefix, but worth a warning (the daemon's
    unknown_setting); in .env refused (_unknown_in_dotenv)."""
    known = {f"INGESTD_{k.upper()}" for k in PARSERS} | {"INGESTD_TEST_CRASH_AT"}  # distributed/: a test's hook
    return sorted(k for k in environ if k.upper().startswith("INGESTD_") and k not in known)


def _int(minimum: int) -> Callable[[str, Any], int]:
    def parse(name: str, value: Any) -> int:
        try:
            n = int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: must be an integer >= {minimum}, not {value!r}") from None
        if isinstance(value, (bool, float)) or n < minimum:  # TOML 2.5 must not quietly become 2
            raise ConfigError(f"{name}: must be an integer >= {minimum}, not {value!r}")
        return n

    return parse


MAX_SECONDS = 365 * 86400.0  # a year: beyond it a timeout or interval is a typo, and timers overflow (inf)


def _seconds(minimum: float, strict: bool = False) -> Callable[[str, Any], float]:
    """A finite number of seconds, >= minimum (> minimum when strict), at most MAX_SECONDS. `inf` and `nan`
    are refused: stop_timeout = inf crashed on SIGTERM (int(inf)), rescan_interval = 0 spun a core."""
    bound = f"> {minimum:g}" if strict else f">= {minimum:g}"

    def parse(name: str, value: Any) -> float:
        try:
            f = float(value)
        except (TypeError, ValueError, OverflowError):
            f = math.nan
        ok = (f > minimum if strict else f >= minimum) and f <= MAX_SECONDS  # False for nan
        if isinstance(value, bool) or not ok:
            raise ConfigError(f"{name}: must be a number of seconds {bound} and <= {MAX_SECONDS:g}, not {value!r}")
        return f

    return parse


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}: must be true or false, not {value!r}")


def _listen(name: str, value: Any) -> str:
    host, sep, port = str(value).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{name}: must be HOST:PORT (e.g. 127.0.0.1:9800), not {value!r}")
    return str(value)


def _choice(*allowed: str) -> Callable[[str, Any], str]:
    def parse(name: str, value: Any) -> str:
        if value not in allowed:
            raise ConfigError(f"{name}: must be one of {', '.join(allowed)}, not {value!r}")
        return str(value)

    return parse


def _broker(name: str, value: Any) -> str | None:
    if value in (None, ""):
        return None
    text = str(value)
    if not text.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"{name}: {text!r} is not a Redis URL (redis://HOST:PORT/DB, rediss://..., unix://PATH)")
    return text


def _path(name: str, value: Any) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ConfigError(f"{name}: must be a path, not {value!r}")
    if "\0" in str(value):  # a .env or a TOML string can hold one; every system call refuses it (ValueError)
        raise ConfigError(f"{name}: a path cannot hold a NUL byte, not {value!r}")
    return Path(value)


def _mode(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name}: must be a processor name, not {value!r}")
    return value


def _text(name: str, value: Any, empty: bool = False) -> str:
    if not isinstance(value, str) or not (value or empty):
        raise ConfigError(f"{name}: must be {'a' if empty else 'a non-empty'} string, not {value!r}")
    return value


PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "watch_dir": _path,
    "mode": _mode,
    "pattern": _text,
    "replacement": lambda n, v: _text(n, v, empty=True),
    "workers": _int(1),
    "listen": _listen,
    "config": lambda n, v: _path(n, v) if v else None,
    "max_attempts": _int(1),
    "settle_time": _seconds(0),
    "quiet_time": _seconds(0),
    "folder_quiet_time": _seconds(0),
    "rescan_interval": _seconds(1),  # the safety-net scan; below a second it only burns CPU when idle
    "max_line_bytes": _int(1),
    "recent": _int(1),
    "done_marker": _bool,
    "recursive": _bool,
    "min_free_bytes": _int(0),
    "stop_timeout": _seconds(0),
    "wait_lock": _bool,
    "stall_time": _seconds(0, strict=True),  # 0 would call every busy worker stuck
    "time_limit": _seconds(0),  # 0: no limit
    "metrics_file_names": _bool,
    "log_format": _choice("auto", "json", "text"),
    "log_level": _choice("debug", "info", "warning", "error"),
    "file_exist": _choice("keep", "replace", "fail"),
    "broker": _broker,
    "lease_time": _seconds(1, strict=True),
    "node": _text,
    "watch": _choice("auto", "inotify", "polling"),
    "poll_interval": _seconds(0.05),  # below 50 ms the listing itself would be most of an idle daemon's work
}


def _from_env(env: Mapping[str, str | None], where: str = "") -> tuple[dict[str, str], dict[str, str]]:
    """INGESTD_<SETTING> for every setting; plain MODE too, as a .env for the seed project says it.
    Returns (setting -> value, setting -> the variable it came from, for error messages)."""
    found, source = {}, {}
    for k in PARSERS:
        var = f"INGESTD_{k.upper()}"
        if env.get(var):
            found[k], source[k] = env[var], var + where
    if "mode" not in found and env.get("MODE"):
        found["mode"], source["mode"] = env["MODE"], "MODE" + where  # type: ignore[assignment]
    return found, source  # type: ignore[return-value]


def _unknown_in_dotenv(values: Mapping[str, str | None], path: Path) -> None:
    """A typo in .env (INGESTD_WORKRS=3) exits 78 like a typo in the TOML config, instead of being ignored, with
    the closest names (difflib) first. Only .env: the process environment carries INGESTD_* variables of other
    tools (test shims, CI)."""
    if unknown := unknown_env(values):
        allowed = sorted(f"INGESTD_{k.upper()}" for k in PARSERS)
        # Compared without the prefix, which every name shares: else anything "matches" something.
        close = difflib.get_close_matches(unknown[0].upper().removeprefix("INGESTD_"), [k.upper() for k in PARSERS], 1)
        hint = f"did you mean INGESTD_{close[0]}? " if close else ""
        raise ConfigError(f"{unknown[0]} in {path}: unknown setting ({hint}allowed: {', '.join(allowed)})")


def unread_in_dotenv(values: Mapping[str, str | None]) -> dict[str, str]:
    """Lines of a .env that name a setting without its INGESTD_ prefix, in any case, and are so not read:
    {"recursive": "INGESTD_RECURSIVE", "mode": "MODE"}. MODE itself is read (the one plain name, `_from_env`).
    Not refused, unlike an INGESTD_ typo: plain names such as LOG_LEVEL or WORKERS are common in a .env another
    tool reads too. The daemon warns of them (dotenv_not_read) at start and at each reload; a new user who wrote
    `recursive = true` (the config file's form) saw nothing happen."""
    out = {}
    for k in values:
        name = k.lower()
        if name in PARSERS and k != "MODE":
            out[k] = "MODE" if name == "mode" else f"INGESTD_{name.upper()}"
    return out


def dotenv_unread(cwd: Path | None = None) -> tuple[Path, dict[str, str]] | None:
    """The working directory's .env and its unread lines (unread_in_dotenv), None when it has none or cannot be
    read (load() has said why already). For the daemon's warning: it reads the file again, a hint only."""
    try:
        unread = unread_in_dotenv(_read_dotenv(cwd))
    except ConfigError:
        return None
    return (_dotenv_name(cwd), unread) if unread else None


def load(
    flags: Mapping[str, Any], environ: Mapping[str, str] | None = None, cwd: Path | None = None
) -> Settings:
    """Merge every source; raise ConfigError on the first bad value."""
    environ = os.environ if environ is None else environ
    dotenv: dict[str, str] = {}
    dotenv_src: dict[str, str] = {}
    if raw := _read_dotenv(cwd):
        dotenv_path = _dotenv_name(cwd)
        _unknown_in_dotenv(raw, dotenv_path)
        dotenv, dotenv_src = _from_env(raw, f" in {dotenv_path}")
    env, env_src = _from_env(environ)
    flags = {k: v for k, v in flags.items() if v is not None}
    layers: list[Mapping[str, Any]] = [flags, env, dotenv]
    sources: list[Mapping[str, str]] = [{k: "--" + k.replace("_", "-") for k in flags}, env_src, dotenv_src]

    config = next((layer["config"] for layer in layers if layer.get("config")), None)
    if config:
        try:
            _path("config", config)
        except ConfigError as e:
            where = next(src["config"] for layer, src in zip(layers, sources) if layer.get("config"))
            raise ConfigError(f"{e} (from {where})") from None
    doc = _read_toml(Path(config)) if config else {}
    unknown = sorted(set(doc) - set(PARSERS) - {"tags", "filters", "outputs"})
    if unknown:
        allowed = ", ".join([*sorted(PARSERS), "[[tags]]", "[[filters]]", "[[outputs]]"])
        raise ConfigError(f"{config}: unknown setting {unknown[0]!r} (allowed: {allowed})")
    layers.append({k: v for k, v in doc.items() if k in PARSERS})
    sources.append({k: str(config) for k in doc if k in PARSERS})

    values: dict[str, Any] = {}
    for name, parse in PARSERS.items():
        for layer, source in zip(layers, sources, strict=True):
            if name in layer:
                try:
                    values[name] = parse(name, layer[name])
                except ConfigError as e:  # name where the value came from: INGESTD_WORKERS=abc, --workers, a file
                    raise ConfigError(f"{e} (from {source.get(name, name)})") from None
                break
    values["config"] = Path(config) if config else None
    if "mode" in flags and "config" not in flags:
        # --mode on the command line beats a config named lower down (INGESTD_CONFIG in the environment or .env):
        # flag > environment > .env, for the routing as a whole. A new user's `ingestd process --mode uppercase`
        # in a folder whose .env names a routing config was refused ("choose one") with no way to choose.
        doc = {k: v for k, v in doc.items() if k not in ("tags", "filters", "outputs")}
    values["routing_doc"] = _routing_doc(doc, values, explicit_mode=any("mode" in layer for layer in layers),
                                         where=lambda k: next((s[k] for s in sources if k in s), k))
    known = {f.name for f in fields(Settings)}
    return Settings(**{k: v for k, v in values.items() if k in known})


def _read_dotenv(cwd: Path | None) -> dict[str, str | None]:
    """The variables of the working directory's .env (`cwd`'s when given), {} when it has none. Without `cwd` the
    file is found by the relative name `.env`, never by an absolute path: a working directory deeper than PATH_MAX
    (4096 bytes) makes its absolute path ENAMETOOLONG for every call, and a removed one has none (os.getcwd raises
    ENOENT), while the kernel still resolves `.env` from it. Raises ConfigError, one line naming the errno, when the
    .env cannot be looked at or read (EACCES: a working directory or file this user may not read, e.g. after sudo -u)
    or is not UTF-8."""
    path = cwd / ".env" if cwd is not None else Path(".env")
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return {}
        # Imported here: ~5 ms of start-up when there is no .env.
        from dotenv import dotenv_values

        with open(path, encoding="utf-8") as f:  # dotenv_values(path) opens it in UTF-8 too
            return dotenv_values(stream=f)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except OSError as e:
        raise ConfigError(f".env: cannot read {_dotenv_name(cwd)}: {e.strerror} "
                          f"({errno.errorcode.get(e.errno or 0, e.errno)}); run ingestd from another folder") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f".env: {_dotenv_name(cwd)} is not UTF-8 text (byte {e.start})") from None


def _dotenv_name(cwd: Path | None) -> Path:
    """The .env's path for messages: absolute when the working directory has a name (os.getcwd), else `.env`."""
    if cwd is not None:
        return cwd / ".env"
    try:
        return Path(os.getcwd(), ".env")
    except OSError:  # ENOENT: the working directory was removed
        return Path(".env")


def _read_toml(path: Path) -> dict[str, Any]:
    import tomllib  # here, not at the top: only a config file needs it, and `ingestd process`'s start-up counts

    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"config: cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config: {path} is not valid TOML: {e}") from None


def _routing_doc(doc: dict[str, Any], values: dict[str, Any], explicit_mode: bool,
                 where: Callable[[str], str]) -> dict[str, Any]:
    """Choose the routing (config tables, or MODE alone) and validate it once, here, with clear messages.
    A config without [[filters]] gets MODE (set or default) as its one filter, as MODE alone does: routing
    files with [[tags]]/[[outputs]] does not silently turn the mode off (README "Configuration")."""
    mode = values.get("mode", Settings().mode)
    options = {k: values[k] for k in ("pattern", "replacement") if values.get(k) is not None}
    if routing.has_tables(doc):
        if explicit_mode and "filters" in doc:
            raise ConfigError(f"mode: set both as mode (from {where('mode')}) and as [[filters]] in the config (from "
                              f"{where('config')}); choose one")
        if options and "filters" in doc:
            key = next(iter(options))
            raise ConfigError(f"{key}: belongs to mode, and the config has [[filters]]; give it in the filter's "
                              f"table (from {where(key)})")
        chosen: dict[str, Any] = {k: doc[k] for k in ("tags", "filters", "outputs") if k in doc}
        if "filters" not in doc:  # [[tags]]/[[outputs]] only: the mode is the one filter, as MODE alone
            chosen["filters"] = [{"match": "*", "processor": mode, **options}]
    else:
        chosen = {"mode": mode, "options": options} if options else {"mode": mode}
    if "filters" not in doc:
        try:
            routing.from_mode(mode, options)
        except routing.RoutingError as e:
            key, _, why = str(e).partition(": ")
            src = where(key) if key in options or key == "mode" else None
            raise ConfigError(f"{key}: {why}" + (f" (from {src})" if src and src != key else "")) from None
    try:
        routing.build(chosen)
    except routing.RoutingError as e:
        raise ConfigError(f"config: {e}") from None
    return chosen
