"""The pure engine: tag a file by its name, pass each line through the filters, pick its output.

No file system, no clock: lines in, (output, bytes) out. Routing works in the manner of
Fluent Bit: a tag per file, filters matched by tag glob (which may transform, drop or re-tag
a record), and the first output whose glob matches the record's final tag receives it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

Processor = Callable[[str], "str | None"]  # returns the new text, or None to drop the record

DEFAULT_TAG = "default"


@dataclass(frozen=True, slots=True)
class TagRule:
    match: str  # glob on the file name
    tag: str
    binary: str = "fail"  # "fail": binary files go to failed/; "pass": copied byte for byte


@dataclass(frozen=True, slots=True)
class Filter:
    match: str  # glob on the record's tag
    name: str  # processor name, or "retag"
    processor: Processor | None = None
    retag: str | None = None
    pattern: re.Pattern[str] | None = None  # for retag: only records matching it get the new tag
    per_char: bool = False  # maps text character by character (upper, lower, identity): a whole block of
    #                         lines through it gives the same bytes as line by line, much faster


@dataclass(frozen=True, slots=True)
class Output:
    match: str  # glob on the record's tag
    path: str  # folder under processed/; "" is processed/ itself


@dataclass(frozen=True, slots=True)
class Step:
    """One line's journey, for `ingestd process --explain`."""

    tag: str
    applied: tuple[str, ...]
    output: str | None  # None: dropped by a filter or matched no output
    acted: tuple[str, ...] = ()  # the filters of `applied` that changed, dropped or re-tagged the line
    text: str | None = None  # what the line became (without its ending); None when dropped


@dataclass(frozen=True)
class Routing:
    tags: tuple[TagRule, ...] = ()
    filters: tuple[Filter, ...] = ()
    outputs: tuple[Output, ...] = (Output("*", ""),)
    _cache: dict[str, tuple[tuple[int, ...], str | None]] = field(default_factory=dict, compare=False, repr=False)

    def rule_for(self, name: str) -> TagRule:
        """First matching rule wins; a file no rule names gets the default tag."""
        for rule in self.tags:
            if fnmatchcase(name, rule.match):
                return rule
        return TagRule("*", DEFAULT_TAG)

    def output_for(self, tag: str) -> str | None:
        for out in self.outputs:
            if fnmatchcase(tag, out.match):
                return out.path
        return None

    def _plan(self, tag: str) -> tuple[tuple[int, ...], str | None]:
        """Filters that apply to a tag, and its output; cached, since tags are few and lines many."""
        plan = self._cache.get(tag)
        if plan is None:
            idx = tuple(i for i, f in enumerate(self.filters) if fnmatchcase(tag, f.match))
            plan = self._cache[tag] = (idx, self.output_for(tag))
        return plan

    def block_plan(self, tag: str) -> tuple[str, Processor] | None:
        """When every filter for this tag is per-character and none re-tags, whole blocks of lines can be
        transformed at once: returns (output, function), else None (then records go line by line)."""
        idx, out = self._plan(tag)
        funcs = [self.filters[i].processor for i in idx]
        if out is None or not all(self.filters[i].per_char for i in idx):
            return None
        if not funcs:
            return out, _identity
        if len(funcs) == 1:
            return out, funcs[0]  # type: ignore[return-value]

        def chain(text: str) -> str:
            for fn in funcs:
                text = fn(text)  # type: ignore[misc,assignment]
            return text

        return out, chain

    def route(self, tag: str, line: bytes, start: int = 0) -> tuple[str | None, bytes]:
        """One line (with its ending) -> (output folder or None if dropped, new bytes)."""
        body, end = split_ending(line)
        text = body.decode("utf-8", "surrogateescape")
        filters = self.filters
        while True:
            idx, out = self._plan(tag)
            for i in idx:
                if i < start:
                    continue
                f = filters[i]
                if f.retag is not None:
                    if f.pattern is None or f.pattern.search(text):
                        tag, start = f.retag, i + 1
                        break  # a new tag: the filters after this one, matched against it
                    continue
                new = f.processor(text)  # type: ignore[misc]
                if new is None:
                    return None, b""
                text = new
            else:
                if out is None:
                    return None, b""
                return out, text.encode("utf-8", "surrogateescape") + end

    def explain(self, tag: str, line: bytes) -> Step:
        """The same decisions as route(), spelled out."""
        body, _ = split_ending(line)
        text = body.decode("utf-8", "surrogateescape")
        applied: list[str] = []
        acted: list[str] = []
        for f in self.filters:
            if not fnmatchcase(tag, f.match):
                continue
            if f.retag is not None:
                if f.pattern is None or f.pattern.search(text):
                    applied.append(f"retag->{f.retag}")
                    acted.append(applied[-1])
                    tag = f.retag
                continue
            new = f.processor(text)  # type: ignore[misc]
            applied.append(f.name)
            if new != text:
                acted.append(f.name)
            if new is None:
                return Step(tag, tuple(applied), None, tuple(acted))
            text = new
        out = self.output_for(tag)
        return Step(tag, tuple(applied), out, tuple(acted), text if out is not None else None)

    def run(self, tag: str, lines: Iterable[bytes], explain: Callable[[Step], None] | None = None
            ) -> Iterator[tuple[str, bytes]]:
        """Stream a file's lines through the routing; dropped records yield nothing.
        With explain, each line's Step is reported first (for `ingestd process --explain`)."""
        if explain is not None:
            for line in lines:
                explain(self.explain(tag, line))
                out, data = self.route(tag, line)
                if out is not None:
                    yield out, data
            return
        if not self.filters:  # no filter can change a record: skip decoding
            out = self.output_for(tag)
            if out is not None:
                for line in lines:
                    yield out, line
            return
        route = self.route
        for line in lines:
            out, data = route(tag, line)
            if out is not None:
                yield out, data


def _identity(text: str) -> str:
    return text


def split_ending(line: bytes) -> tuple[bytes, bytes]:
    """Separate a line from its ending so processors never see (or lose) it."""
    if line.endswith(b"\r\n"):
        return line[:-2], b"\r\n"
    if line.endswith(b"\n"):
        return line[:-1], b"\n"
    return line, b""
