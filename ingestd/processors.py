"""The processor registry: built-in line processors and third-party ones from entry points.

A processor factory takes the filter's options as keywords and returns a function
text -> new text (or None to drop the record). Third parties register factories in the
`ingestd.processors` entry-point group.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ingestd.engine import Processor

Factory = Callable[..., Processor]
GROUP = "ingestd.processors"


class Unknown(KeyError):
    """No built-in and no installed plug-in (entry point) of that name. Ours alone: a plug-in's own KeyError
    (raised at its import, or by its factory) is never taken for it."""


class LoadError(Exception):
    """A plug-in of that name is installed but could not be loaded (its import or its entry point raised). The
    message names the plug-in's error: "processor 'x' could not be loaded: KeyError: 'setting'"; __cause__ is it."""


def _simple(fn: Processor) -> Factory:
    def factory() -> Processor:
        return fn

    return factory


def _grep(pattern: str) -> Processor:
    search = re.compile(pattern).search
    return _regex_step(lambda text: text if search(text) else None, KEEP_IF, search)


def _drop(pattern: str) -> Processor:
    search = re.compile(pattern).search
    return _regex_step(lambda text: None if search(text) else text, DROP_IF, search)


# What a regex processor does, for engine.Routing.route_block, which calls the regex itself instead of the lambda
# (one Python call fewer per line): the same result by construction.
KEEP_IF, DROP_IF, SUB = "keep_if", "drop_if", "sub"


def _regex_step(fn: Processor, kind: str, op: Callable[..., object], arg: str | None = None) -> Processor:
    fn.step = (kind, op, arg)  # type: ignore[attr-defined]
    return fn


def _redact(pattern: str, replacement: str = "[REDACTED]") -> Processor:
    sub = re.compile(pattern).sub
    try:
        sub(replacement, "")  # parses the replacement now: a bad one fails at start-up, not on a worker's first match
    except (re.error, IndexError, TypeError) as e:
        raise TypeError(f"invalid replacement {replacement!r}: {e}") from None
    return _regex_step(lambda text: sub(replacement, text), SUB, sub, replacement)


BUILTIN: dict[str, Factory] = {
    "uppercase": _simple(str.upper),
    "lowercase": _simple(str.lower),
    "titlecase": _simple(str.title),
    "strip": _simple(str.strip),
    "reverse": _simple(lambda text: text[::-1]),
    "passthrough": _simple(lambda text: text),
    "grep": _grep,
    "drop": _drop,
    "redact": _redact,
}


# Processors that map text character by character (no line-level logic): safe on whole blocks of lines.
PER_CHAR = frozenset({"uppercase", "lowercase", "passthrough"})


def names() -> list[str]:
    """Every processor name a filter may use: built-ins and installed plug-ins."""
    # Imported here: ~10 ms of start-up that a built-in processor does not need.
    from importlib.metadata import entry_points

    return sorted({*BUILTIN, *(ep.name for ep in entry_points(group=GROUP))})


def options(name: str) -> dict[str, bool] | None:
    """The options processor `name`'s factory takes (by its signature), each mapped to whether it is required;
    None when it takes any (**kwargs) or cannot be found. For error messages only (it loads a plug-in)."""
    import inspect

    try:  # a plug-in may raise anything on import or from its signature: then the caller's own words stand
        params = list(inspect.signature(_factory(name)).parameters.values())
    except Exception:  # noqa: BLE001 - for an error message only: never a second error (tests/test_break_round7.py)
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name: p.default is p.empty for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def make(name: str, options: dict[str, object]) -> Processor:
    """Build one processor; Unknown (a KeyError) for an unknown name, LoadError for a plug-in that cannot be loaded,
    TypeError/re.error for bad options, anything else a plug-in's factory raises.

    A built-in cannot be shadowed by a plug-in of the same name.
    """
    return _factory(name)(**options)


def _factory(name: str) -> Factory:
    """The built-in of that name, else the installed plug-in's (its entry point loaded); Unknown if neither,
    LoadError if the plug-in's import or entry point raises."""
    factory = BUILTIN.get(name)
    if factory is None:
        from importlib.metadata import entry_points

        found = entry_points(group=GROUP, name=name)
        if not found:
            raise Unknown(name)
        try:
            factory = next(iter(found)).load()
        except KeyboardInterrupt:
            raise  # Ctrl-C during the import is the person's, not the plug-in's
        except BaseException as e:
            # too (argparse or sys.exit() at import): it ended `run` with exit 0, which systemd does not restart
            raise LoadError(f"processor {name!r} could not be loaded: {type(e).__name__}: {e}") from e
    return factory
