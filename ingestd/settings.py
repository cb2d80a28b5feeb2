"""Settings: one frozen object, loaded from flags > environment > .env > TOML config > defaults."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from ingestd import routing
from ingestd.engine import Routing


class ConfigError(Exception):
    """A bad setting. The message is one line naming the setting and what is allowed (exit 78)."""


@dataclass(frozen=True, slots=True)
class Settings:
    watch_dir: Path = Path("watch_dir")
    mode: str = "uppercase"
    workers: int = os.cpu_count() or 1
    listen: str = "127.0.0.1:9800"
    config: Path | None = None
    max_attempts: int = 3  # crashes a file may be in progress for before it is quarantined
    settle_time: float = 1.0  # seconds a file of unknown history must stay unchanged before a claim
    quiet_time: float = 0.03  # seconds a name must have had no event (close, chmod, utime...) before a claim
    rescan_interval: float = 30.0  # safety-net full scan, seconds
    max_line_bytes: int = 1 << 20
    recent: int = 10  # completions kept for metrics and status
    done_marker: bool = False  # claim NAME only once NAME.done exists
    min_free_bytes: int = 16 << 20  # stop claiming below this much free space in the watch dir
    stop_timeout: float = 20.0  # warm stop: how long to let the current files finish
    wait_lock: bool = False  # another daemon holds the watch dir: wait for it to go (a standby) instead of exiting 75
    stall_time: float = 30.0  # a busy worker silent this long is stuck (healthz 503, no watchdog ping)
    log_format: str = "json"
    routing_doc: dict[str, Any] = field(default_factory=lambda: {"mode": "uppercase"})  # picklable, for workers

    @property
    def routing(self) -> Routing:
        return routing.build(self.routing_doc)

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


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


def _float(name: str, value: Any) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        f = -1.0
    if isinstance(value, bool) or not f >= 0:
        raise ConfigError(f"{name}: must be a number of seconds >= 0, not {value!r}")
    return f


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


def _path(name: str, value: Any) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ConfigError(f"{name}: must be a path, not {value!r}")
    return Path(value)


def _mode(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name}: must be a processor name, not {value!r}")
    return value


PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "watch_dir": _path,
    "mode": _mode,
    "workers": _int(1),
    "listen": _listen,
    "config": lambda n, v: _path(n, v) if v else None,
    "max_attempts": _int(1),
    "settle_time": _float,
    "quiet_time": _float,
    "rescan_interval": _float,
    "max_line_bytes": _int(1),
    "recent": _int(1),
    "done_marker": _bool,
    "min_free_bytes": _int(0),
    "stop_timeout": _float,
    "wait_lock": _bool,
    "stall_time": _float,
    "log_format": _choice("json", "text"),
}


def _from_env(env: Mapping[str, str | None]) -> dict[str, str]:
    """INGESTD_<SETTING> for every setting; plain MODE too, as a .env for the seed project says it."""
    found = {k: env[f"INGESTD_{k.upper()}"] for k in PARSERS if env.get(f"INGESTD_{k.upper()}")}
    if "mode" not in found and env.get("MODE"):
        found["mode"] = env["MODE"]
    return found  # type: ignore[return-value]


def load(
    flags: Mapping[str, Any], environ: Mapping[str, str] | None = None, cwd: Path | None = None
) -> Settings:
    """Merge every source; raise ConfigError on the first bad value."""
    environ = os.environ if environ is None else environ
    dotenv_path = (cwd or Path.cwd()) / ".env"
    dotenv = _from_env(dotenv_values(dotenv_path)) if dotenv_path.is_file() else {}
    env = _from_env(environ)
    flags = {k: v for k, v in flags.items() if v is not None}
    layers = [flags, env, dotenv]

    config = next((layer["config"] for layer in layers if layer.get("config")), None)
    doc = _read_toml(Path(config)) if config else {}
    unknown = sorted(set(doc) - set(PARSERS) - {"tags", "filters", "outputs"})
    if unknown:
        allowed = ", ".join([*sorted(PARSERS), "[[tags]]", "[[filters]]", "[[outputs]]"])
        raise ConfigError(f"{config}: unknown setting {unknown[0]!r} (allowed: {allowed})")
    layers.append({k: v for k, v in doc.items() if k in PARSERS})

    values: dict[str, Any] = {}
    for name, parse in PARSERS.items():
        for layer in layers:
            if name in layer:
                values[name] = parse(name, layer[name])
                break
    values["config"] = Path(config) if config else None
    values["routing_doc"] = _routing_doc(doc, values, explicit_mode=any("mode" in layer for layer in layers))
    known = {f.name for f in fields(Settings)}
    return Settings(**{k: v for k, v in values.items() if k in known})


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"config: cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config: {path} is not valid TOML: {e}") from None


def _routing_doc(doc: dict[str, Any], values: dict[str, Any], explicit_mode: bool) -> dict[str, Any]:
    """Choose the routing (config tables, or MODE alone) and validate it once, here, with clear messages."""
    mode = values.get("mode", Settings().mode)
    if routing.has_tables(doc):
        if explicit_mode and "filters" in doc:
            raise ConfigError("mode: set both as mode (MODE/--mode/config) and as [[filters]] in the config; choose one")
        chosen: dict[str, Any] = {k: doc[k] for k in ("tags", "filters", "outputs") if k in doc}
        if explicit_mode:  # MODE beside [[tags]]/[[outputs]] only: the mode is the one filter, as MODE alone
            chosen["filters"] = [{"match": "*", "processor": mode}]
    else:
        chosen = {"mode": mode}
    try:
        if "mode" in chosen or explicit_mode:
            routing.from_mode(mode)
    except routing.RoutingError as e:
        raise ConfigError(f"mode: {str(e).split(': ', 1)[1]}") from None
    try:
        routing.build(chosen)
    except routing.RoutingError as e:
        raise ConfigError(f"config: {e}") from None
    return chosen
