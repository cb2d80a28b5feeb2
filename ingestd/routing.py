"""Build and validate a Routing from the config file's [[tags]], [[filters]] and [[outputs]] tables."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from ingestd import processors
from ingestd.engine import Filter, Output, Routing, TagRule


class RoutingError(ValueError):
    """A routing table is wrong; the message names the table entry and what is allowed."""


# What re.compile raises for a pattern it cannot take: re.error (syntax), OverflowError ("a{4294967296}": the
# repetition number is too large), RecursionError (nesting too deep), MemoryError (a pattern too large to build).
REGEX_ERRORS = (re.error, OverflowError, RecursionError, MemoryError)


def from_mode(mode: str, options: dict[str, str] | None = None) -> Routing:
    """MODE=uppercase alone: one filter, that processor, on every record, to processed/. options: the mode's
    settings (pattern, replacement) as the processor's keywords; RoutingError in the settings' words when the
    mode needs one that is missing, takes none of them, or the pattern is not a regular expression."""
    options = options or {}
    wants = mode_params(mode)
    if wants is not None:
        for key in options:
            if key not in wants:
                taken = f"takes only {', '.join(sorted(wants))}" if wants else "takes no options"
                raise RoutingError(f"{key}: mode {mode} {taken}; unset {key}")
        for key, required in wants.items():
            if required and key not in options:
                raise RoutingError(f"{key}: mode {mode} needs a {key} "
                                   f"(--{key}, INGESTD_{key.upper()} or {key} = in the config)")
    try:
        return Routing(filters=(_filter("mode", {"match": "*", "processor": mode, **options}),))
    except RoutingError as e:
        where, _, why = str(e).partition(": ")
        if "invalid replacement" in why:  # raised by the redact factory as a TypeError
            where, why = "mode.replacement", why[why.index("invalid replacement"):]
        key = "mode" if where in ("mode", "mode.processor") else where.removeprefix("mode.")
        raise RoutingError(f"{key}: {why}") from None


def mode_params(mode: str) -> dict[str, bool] | None:
    """The keyword options a processor's factory takes -> whether each is required; None when unknown (no
    such processor, a plug-in that cannot be loaded: processors.make says which, or a factory taking **kwargs)."""
    return processors.options(mode)


def from_tables(doc: dict[str, Any]) -> Routing:
    tags = tuple(_tag(f"tags[{i}]", t) for i, t in enumerate(_list(doc, "tags")))
    filters = tuple(_filter(f"filters[{i}]", t) for i, t in enumerate(_list(doc, "filters")))
    outs = _list(doc, "outputs")
    outputs = tuple(_output(f"outputs[{i}]", t) for i, t in enumerate(outs)) if outs else Routing().outputs
    return Routing(tags=tags, filters=filters, outputs=outputs)


def has_tables(doc: dict[str, Any]) -> bool:
    return any(k in doc for k in ("tags", "filters", "outputs"))


def build(doc: dict[str, Any]) -> Routing:
    """From the picklable routing document workers receive: the config's tables, or {"mode": NAME}."""
    return from_tables(doc) if has_tables(doc) else from_mode(doc["mode"], doc.get("options"))


def _list(doc: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = doc.get(key, [])
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise RoutingError(f"{key}: must be an array of tables ([[{key}]])")
    return value


def _str(where: str, table: dict[str, Any], key: str, default: str | None = None) -> str:
    value = table.get(key, default)
    if not isinstance(value, str) or (value == "" and key != "path"):
        raise RoutingError(f"{where}.{key}: a non-empty string is required")
    return value


def _only(where: str, table: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise RoutingError(f"{where}: unknown key {extra[0]!r} (allowed: {', '.join(sorted(allowed))})")


def _tag(where: str, t: dict[str, Any]) -> TagRule:
    _only(where, t, {"match", "tag", "binary"})
    binary = _str(where, t, "binary", "fail")
    if binary not in ("fail", "pass"):
        raise RoutingError(f"{where}.binary: must be 'fail' or 'pass', not {binary!r}")
    return TagRule(_str(where, t, "match"), _str(where, t, "tag"), binary)


def _filter(where: str, t: dict[str, Any]) -> Filter:
    match = _str(where, t, "match", "*")
    pattern = t.get("pattern")
    if "retag" in t:
        _only(where, t, {"match", "retag", "pattern"})
        return Filter(match, "retag", retag=_str(where, t, "retag"), pattern=_regex(where, pattern))
    if "processor" not in t:  # a typo (procesor = ...) would otherwise read as an option of no processor
        raise RoutingError(f"{where}.processor: a filter needs a processor (or retag)"
                           + _did_you_mean([k for k in t if k != "match"], ("processor", "retag")))
    name = _str(where, t, "processor")
    options = {k: v for k, v in t.items() if k not in ("match", "processor")}
    try:
        proc = processors.make(name, options)
    except processors.Unknown:  # only "no such name": a plug-in's own KeyError is a load or build error below
        raise RoutingError(f"{where}.processor: unknown processor {name!r} (known: {', '.join(processors.names())})") from None
    except processors.LoadError as e:
        raise RoutingError(f"{where}.processor: {e}") from None
    except REGEX_ERRORS as e:
        raise RoutingError(f"{where}.pattern: invalid regular expression: {e or type(e).__name__}") from None
    except TypeError as e:
        # The factory's own words name a Python function ("_grep() missing 1 required positional argument"):
        # said in the config's terms where its signature tells which key is wrong.
        takes = processors.options(name)  # None: it takes any option (**kwargs), so the signature cannot tell
        unknown = sorted(set(options) - set(takes)) if takes is not None else []
        missing = sorted(k for k, required in takes.items() if required and k not in options) if takes else []
        if unknown:
            raise RoutingError(f"{where}: processor {name!r} takes no option {unknown[0]!r} (its options: "
                               f"{', '.join(sorted(takes or ())) or 'none'})"
                               + _did_you_mean(unknown[:1], [*sorted(takes or ()), "match", "processor"])) from None
        if missing:
            raise RoutingError(f"{where}: processor {name!r} needs option {missing[0]!r}") from None
        raise RoutingError(f"{where}: bad options for processor {name!r}: {e}") from None
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - a plug-in factory may raise anything, SystemExit too: a config error
        # (exit 78), never a crash, and never a daemon ended with exit 0 by a reload
        raise RoutingError(f"{where}: processor {name!r} cannot be built: {type(e).__name__}: {e}") from None
    return Filter(match, name, processor=proc, per_char=name in processors.PER_CHAR)


def _did_you_mean(given: list[str], known: Iterable[str]) -> str:
    """": did you mean 'processor' for 'procesor'?" for the first given key close to a known one (difflib), or "".
    Only on the error path: difflib is not imported at start-up."""
    import difflib

    for key in given:
        close = difflib.get_close_matches(key, list(known), n=1)
        if close:
            return f": did you mean {close[0]!r} for {key!r}?"
    return ""


def _regex(where: str, pattern: object) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    if not isinstance(pattern, str):
        raise RoutingError(f"{where}.pattern: must be a string")
    try:
        return re.compile(pattern)
    except REGEX_ERRORS as e:
        raise RoutingError(f"{where}.pattern: invalid regular expression: {e or type(e).__name__}") from None


def _output(where: str, t: dict[str, Any]) -> Output:
    _only(where, t, {"match", "path"})
    path = _str(where, t, "path", "")
    parts = path.split("/") if path else []
    if path.startswith("/") or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise RoutingError(f"{where}.path: must be a relative folder under processed/ "
                           f"without '.', '..' or hidden parts, not {path!r}")
    return Output(_str(where, t, "match", "*"), path)
