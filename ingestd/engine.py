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
from typing import Any, cast

Processor = Callable[[str], "str | None"]  # returns the new text, or None to drop the record

DEFAULT_TAG = "default"

# A compiled filter step for Routing.route_block: (code, function, argument); see Routing._program.
Step_ = tuple[str, "Callable[..., object] | None", object]
_CALL, _RETAG = "call", "retag"
_KEEP_IF, _DROP_IF, _SUB = "keep_if", "drop_if", "sub"  # the codes processors.py gives grep, drop and redact
_REGEX_BUILTINS = frozenset({"grep", "drop", "redact"})  # built-ins cannot be shadowed by plug-ins (processors.make)


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
    _blocks: dict[tuple[str, int], tuple[tuple[Step_, ...], str | None] | None] = field(
        default_factory=dict, compare=False, repr=False)
    _programs: dict[tuple[str, int], tuple[tuple[Step_, ...], str | None]] = field(default_factory=dict, compare=False,
                                                                                  repr=False)

    def rule_for(self, name: str) -> TagRule:
        """First matching rule wins; a file no rule names gets the default tag.

        name: the file's path relative to unprocessed/ ("a.log", or "batch/a.log" with recursive = true). A glob
        without a "/" is matched against the last part only, one with a "/" against the whole relative path (as
        gitignore patterns do): `app*` tags batch/app1.log as it tags app1.log and as `ingestd process --input
        batch/app1.log` does, and `batch/*` can still name a folder's files."""
        base = name.rpartition("/")[2]
        for rule in self.tags:
            if fnmatchcase(name if "/" in rule.match else base, rule.match):
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
        out, text = self.route_text(tag, body.decode("utf-8", "surrogateescape"), start)
        if out is None:
            return None, b""
        return out, text.encode("utf-8", "surrogateescape") + end

    def route_block(self, tag: str, block: bytes) -> dict[str, str]:
        """A block of whole lines (each ends with \n but perhaps the last) -> {output folder: its text}.

        The same records as route() line by line: UTF-8 with surrogateescape decodes byte by byte (a \n byte is
        never inside a multi-byte character), so decoding the block then splitting it at \n gives each line's
        own text; a \r before a \n is the line's ending, as in split_ending. Raises AtLine(index in block,
        the processor's exception) when a processor raises.
        """
        decoded = block.decode("utf-8", "surrogateescape")
        whole = self._whole_block(tag, decoded)
        if whole is not None:
            return whole
        parts = decoded.split("\n")
        last = parts.pop()  # "" when the block ends with a newline, else a last line without one
        outs: dict[str, list[str]] = {}
        program = self._program
        first = program((tag, 0))
        i = 0
        try:
            # route_text() inlined over compiled programs: the same decisions without a call and a plan lookup per line
            for i, body in enumerate(parts):
                if body[-1:] == "\r":
                    text: str | None = body[:-1]
                    end = "\r\n"
                else:
                    text, end = body, "\n"
                steps, out = first
                k, n = 0, len(steps)
                while k < n:
                    code, fn, arg = steps[k]
                    k += 1
                    if code == _SUB:
                        text = fn(arg, text)  # type: ignore[misc,assignment]
                    elif code == _DROP_IF:
                        if fn(text):  # type: ignore[misc]
                            break
                    elif code == _KEEP_IF:
                        if not fn(text):  # type: ignore[misc]
                            break
                    elif code == _RETAG:
                        if fn is None or fn(text):
                            steps, out = program(arg)  # type: ignore[arg-type]
                            k, n = 0, len(steps)
                    else:
                        text = fn(text)  # type: ignore[misc,assignment]
                        if text is None:
                            break  # dropped
                else:
                    if out is not None:
                        got = outs.get(out)
                        if got is None:
                            got = outs[out] = []
                        got.append(text)  # type: ignore[arg-type]
                        got.append(end)
            if last:
                i = len(parts)
                out, text = self.route_text(tag, last)  # no ending: a lone \r stays in the text, as in split_ending
                if out is not None:
                    outs.setdefault(out, []).append(text)  # type: ignore[arg-type]
        except Exception as e:  # the caller classifies the processor's error (errors.classify)
            raise AtLine(i, e) from e
        return {out: "".join(texts) for out, texts in outs.items()}

    def _program(self, key: tuple[str, int]) -> tuple[tuple[Step_, ...], str | None]:
        """The filters a record tagged key[0] meets from filter key[1] on, as (code, function, argument) steps,
        and the tag's output. A retag is (_RETAG, its pattern's search or None, (new tag, the filter after it));
        the built-in grep, drop and redact are their regex calls (processors.KEEP_IF, DROP_IF, SUB: the same
        result as their lambdas, one Python call fewer); any other processor is (_CALL, processor, None).
        Cached, as _plan is."""
        prog = self._programs.get(key)
        if prog is None:
            tag, start = key
            idx, out = self._plan(tag)
            steps: list[Step_] = []
            for i in idx:
                if i < start:
                    continue
                f = self.filters[i]
                if f.retag is not None:
                    steps.append((_RETAG, f.pattern.search if f.pattern is not None else None, (f.retag, i + 1)))
                elif f.name in _REGEX_BUILTINS and hasattr(f.processor, "step"):
                    steps.append(f.processor.step)  # type: ignore[union-attr]
                else:
                    steps.append((_CALL, f.processor, None))
            prog = self._programs[key] = (tuple(steps), out)
        return prog

    def builtin_only(self, tag: str) -> bool:
        """True when every filter a record tagged `tag` can meet is a retag, a per-character processor or a
        built-in regex one (grep, drop, redact): quick per line, so route_block may take a block of lines at a
        time. A plug-in (or titlecase, strip, reverse) may be slow per line: its lines go one by one, so that
        progress (bytes and lines read) moves with every line, as the stall detector expects."""
        todo, seen = [(tag, 0)], set()
        while todo:
            key = todo.pop()
            if key in seen:
                continue
            seen.add(key)
            steps, _ = self._program(key)
            for i, (code, _, arg) in zip((i for i in self._plan(key[0])[0] if i >= key[1]), steps, strict=True):
                if code == _RETAG:
                    todo.append(arg)  # type: ignore[arg-type]
                elif code == _CALL and not self.filters[i].per_char:
                    return False
        return True

    def _whole_block(self, tag: str, text: str) -> dict[str, str] | None:
        """route_block without a Python step per line, when that is provably the same (see _block_steps): every
        line ends with \n, no \r anywhere (so a line's text is exactly what lies between two \n), and every
        filter the tag meets is block-safe. None: go line by line."""
        if not text.endswith("\n") or "\r" in text or self._block_steps((tag, 0)) is None:
            return None
        outs: dict[str, str] = {}
        try:
            self._run_block((tag, 0), text, outs)
        except _LinesChanged:
            return None
        return outs

    def _run_block(self, key: tuple[str, int], text: str, outs: dict[str, str]) -> None:
        steps, out = self._block_steps(key)  # type: ignore[misc]
        for code, op, arg in steps:
            if not text:
                return
            if code == _SUB:
                lines = text.count("\n")
                text = op(arg, text)  # type: ignore[misc,assignment]
                if text.count("\n") != lines:  # the replacement made new lines: line by line decides otherwise
                    raise _LinesChanged
            elif code == _CALL:
                text = op(text)  # type: ignore[misc,assignment]  # a per-character processor (Filter.per_char): the same on a block of lines
            else:  # _RETAG, _KEEP_IF, _DROP_IF: split the lines by whether the pattern is found in them
                hit, miss = op(text) if op is not None else (text, "")  # type: ignore[misc]
                if code == _RETAG:
                    self._run_block(arg, hit, outs)  # type: ignore[arg-type]
                    text = miss
                else:
                    text = hit if code == _KEEP_IF else miss
        if out is not None and text:
            outs[out] = text

    def _block_steps(self, key: tuple[str, int]) -> tuple[tuple[Step_, ...], str | None] | None:
        """The filters from key as block steps, or None when one is not block-safe: a processor that is not
        per-character nor a built-in regex one, a pattern that could match a \n or differ at a line's edges
        (_line_bound), a redact whose pattern can match nothing, or a retag after which both tags can reach
        the same output (their lines would have to be interleaved back in order). Cached."""
        if key in self._blocks:
            return self._blocks[key]
        self._blocks[key] = None  # until proven safe
        steps, out = self._program(key)
        block: list[Step_] = []
        for (code, op, arg), i in zip(steps, (i for i in self._plan(key[0])[0] if i >= key[1]), strict=True):
            f = self.filters[i]
            if code == _CALL:
                if not f.per_char:
                    return None
                block.append((code, op, arg))
                continue
            pattern = f.pattern if code == _RETAG else getattr(op, "__self__", None)
            if pattern is None:
                if code != _RETAG:
                    return None
                block.append((code, None, arg))
            else:
                if not _line_bound(pattern):
                    return None
                multi = re.compile(pattern.pattern, pattern.flags | re.MULTILINE)
                if code == _SUB:
                    if pattern.pattern == "" or _min_width(pattern) == 0:
                        return None  # empty matches at the edges of lines: not worth proving
                    block.append((code, multi.sub, arg))
                else:
                    block.append((code, _splitter(pattern, multi), arg))
            if code == _RETAG:
                if self._block_steps(arg) is None:  # type: ignore[arg-type]
                    return None
                later = self._reach(arg) & self._reach_after(key, len(block))  # type: ignore[arg-type]
                if later - {None}:
                    return None
        result = (tuple(block), out)
        self._blocks[key] = result
        return result

    def _reach(self, key: tuple[str, int]) -> set[str | None]:
        """Outputs a record entering at key can end in (None: dropped or no output)."""
        return self._reach_after(key, 0)

    def _reach_after(self, key: tuple[str, int], k: int) -> set[str | None]:
        steps, out = self._program(key)
        found: set[str | None] = {out, None}
        for code, _, arg in steps[k:]:
            if code == _RETAG:
                found |= self._reach(arg)  # type: ignore[arg-type]
        return found

    def route_text(self, tag: str, text: str, start: int = 0) -> tuple[str | None, str]:
        """One line's text (without its ending) -> (output folder or None if dropped, new text)."""
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
                    return None, ""
                text = new
            else:
                return out, text

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


class _LinesChanged(Exception):
    """A redact's replacement put a \n into a block: that block goes line by line."""


def _splitter(pattern: re.Pattern[str], multi: re.Pattern[str]) -> Callable[[str], tuple[str, str]]:
    """text -> (lines in which pattern is found, the others). A pattern `^REST` (no top-level |: the parse tree
    starts with ^) is searched as `\nREST` in "\n" + text: the same lines, but with a literal prefix, which re
    finds with a fast scan instead of trying ^ at every character."""
    if pattern.pattern.startswith("^") and not pattern.flags & re.VERBOSE:
        tree = re._parser.parse(pattern.pattern, pattern.flags)  # type: ignore[attr-defined]
        if len(tree) and str(tree[0][0]) == "AT" and str(tree[0][1]) == "AT_BEGINNING":
            nl = re.compile("\n(?:" + pattern.pattern[1:] + ")", pattern.flags | re.MULTILINE)
            return lambda text: _split_lines(nl.search, "\n" + text, 1)
    return lambda text: _split_lines(multi.search, text, 0)


def _split_lines(search: Callable[..., re.Match[str] | None], text: str, skip: int) -> tuple[str, str]:
    """(lines in which search finds a match, the others), each in order, from text[skip:]: whole lines ending
    with \n. search is a line-bound pattern compiled with re.MULTILINE, so a match lies inside one line; with
    skip=1, text starts with an extra \n and a match may start on the \n before its line."""
    hit: list[str] = []
    miss: list[str] = []
    pos, end = skip, len(text)
    while pos < end and (m := search(text, pos - skip)) is not None:
        at = m.start() + skip  # with skip=1: the \n before the line, or a character of it; either way in it
        if at >= end:
            break  # ^ or $ after the last \n: no line there
        start = text.rfind("\n", pos, at) + 1 or pos  # the start of the line the match is in
        stop = text.index("\n", at) + 1
        miss.append(text[pos:start])
        hit.append(text[start:stop])
        pos = stop
    miss.append(text[pos:])
    return "".join(hit), "".join(miss)


# Regex syntax (re._parser's parse tree, CPython 3.11+) that cannot match a \n, nor tell a line alone from the
# same line between two \n when compiled with re.MULTILINE: ^ and $ then match at the line's edges, and \b
# sees a \n beside the line where the line alone has nothing, both non-word. Not \B: on an empty line alone
# (the empty string) Python's \B never matches, but between two \n it does (CPython 3.11 docs, re: "\B ... does
# not match the empty string"), so `^\B` would keep or drop empty lines differently. Anything else (\B, \A, \Z,
# lookarounds, negated sets, \s, \D, \W, inline flags, a . under DOTALL) is refused: those lines go one by one.
_SAFE_CATEGORIES = {"CATEGORY_DIGIT", "CATEGORY_WORD", "CATEGORY_NOT_SPACE"}
_SAFE_AT = {"AT_BEGINNING", "AT_END", "AT_BOUNDARY"}


def _line_bound(pattern: re.Pattern[str]) -> bool:
    try:
        tree = re._parser.parse(pattern.pattern, pattern.flags)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - a parser that changed: not provable, so not block-safe
        return False
    return _safe_nodes(tree, bool(pattern.flags & re.DOTALL))


def _safe_nodes(nodes: Iterable[tuple[object, object]], dotall: bool) -> bool:
    for op, av in nodes:
        name = str(op)
        if name == "LITERAL":
            ok = av != 10
        elif name == "ANY":
            ok = not dotall
        elif name == "IN":
            ok = all(_safe_set_item(str(o), a) for o, a in av)  # type: ignore[attr-defined]
        elif name == "NOT_LITERAL":
            ok = av == 10
        elif name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            ok = _safe_nodes(av[2], dotall)  # type: ignore[index]
        elif name in ("SUBPATTERN", "ATOMIC_GROUP"):
            if name == "SUBPATTERN":
                _, add, remove, sub = cast(tuple[Any, int, int, Any], av)
                ok = not add and not remove and _safe_nodes(sub, dotall)
            else:
                ok = _safe_nodes(av, dotall)  # type: ignore[arg-type]
        elif name == "BRANCH":
            ok = all(_safe_nodes(alt, dotall) for alt in av[1])  # type: ignore[index]
        elif name == "AT":
            ok = str(av) in _SAFE_AT
        elif name == "CATEGORY":
            ok = str(av) in _SAFE_CATEGORIES
        elif name == "GROUPREF":
            ok = True  # the text a group matched, which holds no \n
        else:
            ok = False
        if not ok:
            return False
    return True


def _safe_set_item(name: str, av: object) -> bool:
    if name == "LITERAL":
        return av != 10
    if name == "RANGE":
        lo, hi = cast(tuple[int, int], av)
        return not lo <= 10 <= hi
    if name == "CATEGORY":
        return str(av) in _SAFE_CATEGORIES
    return False  # NEGATE, RANGE_UNI_IGNORE and the rest


def _min_width(pattern: re.Pattern[str]) -> int:
    try:
        return int(re._parser.parse(pattern.pattern, pattern.flags).getwidth()[0])  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - see _line_bound
        return 0


class AtLine(Exception):
    """A processor raised on the line at `index` (0-based) of a block given to route_block; `error` is its exception."""

    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(index, error)
        self.index, self.error = index, error


def _identity(text: str) -> str:
    return text


def split_ending(line: bytes) -> tuple[bytes, bytes]:
    """Separate a line from its ending so processors never see (or lose) it."""
    if line.endswith(b"\r\n"):
        return line[:-2], b"\r\n"
    if line.endswith(b"\n"):
        return line[:-1], b"\n"
    return line, b""
