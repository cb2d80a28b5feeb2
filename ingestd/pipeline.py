"""One input stream through the engine: safe open, binary check, bounded line reading, outputs."""

from __future__ import annotations

import errno
import io
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

from ingestd import errors
from ingestd.engine import AtLine, Processor, Routing, Step
from ingestd.errors import Phase, Verdict

BLOCK = 64 * 1024  # the first block decides "binary" (a NUL byte), as grep and git do
BOM = b"\xef\xbb\xbf"  # UTF-8's byte-order mark (Unicode 15, section 23.8): stripped from line 1, kept in outputs


class Rejected(Exception):
    """The input cannot be processed; the message is the reason kept beside it in failed/."""

    def __init__(self, reason: str, line: int | None = None) -> None:
        super().__init__(reason)
        self.reason, self.line = reason, line


@dataclass(slots=True)
class Stats:
    bytes_in: int = 0
    lines_in: int = 0


def open_input(path: str) -> BinaryIO:
    """Never follow a symlink (ELOOP), never block on a FIFO (O_NONBLOCK), only read regular files.

    Raises Rejected when the input itself is at fault (symlink, not a regular file, unreadable: errors.classify
    says REJECT), and the OSError itself when the machine is (EMFILE, ENFILE, ENOMEM, EIO...: RETRY), so a
    good input is never sent to failed/ for a full file table (open(2)).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if errors.classify(e, Phase.OPEN_INPUT) is not Verdict.REJECT:
            raise
        if e.errno == errno.ELOOP:  # the entry is a symlink
            raise Rejected("not a regular file: symlink (never followed)") from None
        raise Rejected(f"cannot open: {e.strerror}") from None
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise  # fstat(2) fails only for the machine's reasons (EIO, ENOMEM): retry
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise Rejected(f"not a regular file: {kind(st.st_mode)}")
    return os.fdopen(fd, "rb", buffering=BLOCK * 4)


def whole_head(f: BinaryIO) -> BinaryIO:
    """f, such that f.peek() shows its first BLOCK bytes (or all of it, when shorter) as a regular file's does.

    run() decides "binary" and "starts with a BOM" from f.peek(); on a pipe (`ingestd process --input -`), peek
    returns only what the writer has written so far (one read(2)), perhaps 1 byte of a BOM, or the text before a
    NUL byte, and the same bytes would be judged otherwise than from a file. Reads until BLOCK bytes or the end
    (BufferedReader.read(n) loops on short reads), then serves those bytes before the rest of f.
    """
    head = f.read(BLOCK)
    return io.BufferedReader(_Rejoined(head, f), buffer_size=BLOCK * 4)  # type: ignore[return-value]


class _Rejoined(io.RawIOBase):
    """A raw stream: `head`, then the rest of `f` (see whole_head). Closing it leaves f open."""

    def __init__(self, head: bytes, f: BinaryIO) -> None:
        super().__init__()
        self._head, self._f = memoryview(head), f

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if len(self._head):
            n = min(len(b), len(self._head))
            b[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._f.read1(len(b)) if hasattr(self._f, "read1") else self._f.read(len(b))
        b[:len(data)] = data
        return len(data)


def kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symlink (never followed)"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "unknown type"


Progress = Callable[[int], None]  # called with bytes read so far, every few thousand lines

TICK = 4096


def lines(f: BinaryIO, max_line_bytes: int, stats: Stats, progress: Progress) -> Iterator[bytes]:
    """Lines with their endings; memory is bounded by max_line_bytes whatever the file."""
    readline = f.readline
    limit = max_line_bytes + 2  # the content and its ending, \n or \r\n: the ending does not count
    n = stats.lines_in
    while line := readline(limit):
        n += 1
        stats.bytes_in += len(line)
        stats.lines_in = n  # every line: a processor that raises on this line is reported with its number
        if len(line) > max_line_bytes and len(line) - line.endswith(b"\n") - line.endswith(b"\r\n") > max_line_bytes:
            raise Rejected(f"line longer than max_line_bytes ({max_line_bytes} bytes)", line=n)
        if not n % TICK:
            progress(stats.bytes_in)
        yield line


# Block reads; a block only needs a line-length check above max_line_bytes. As large as sinks.FLUSH_BYTES, so a
# block is written out as it is rather than first joined with others (one copy fewer).
READ = 1024 * 1024

# On a pure-ASCII block (bytes.isascii, one C loop) these str methods give the same bytes as their bytes twins,
# which change only a-z / A-Z (Python docs, bytes.upper: "ASCII characters ... converted"), skipping the decode
# and the encode. Any other byte sends the block through str, whose case rules cover all of Unicode.
ASCII_TWINS: dict[object, Callable[[bytes], bytes]] = {str.upper: bytes.upper, str.lower: bytes.lower}


def blocks(f: BinaryIO, max_line_bytes: int, stats: Stats, progress: Progress) -> Iterator[bytes]:
    """Whole lines in blocks (each ends at a newline, but the last), with the same line-length limit."""
    carry = b""
    while chunk := f.read(READ):
        stats.bytes_in += len(chunk)
        cut = chunk.rfind(b"\n") + 1
        if not cut:  # no line ends in this chunk: keep gathering, within the limit
            carry += chunk
            if len(carry) > max_line_bytes + 1:
                raise Rejected(f"line longer than max_line_bytes ({max_line_bytes} bytes)", line=stats.lines_in + 1)
            continue
        block, carry = carry + chunk[:cut], chunk[cut:]
        _check_lines(block, max_line_bytes, stats)
        stats.lines_in += block.count(b"\n")
        progress(stats.bytes_in)
        yield block
    if carry:
        _check_lines(carry, max_line_bytes, stats)
        stats.lines_in += 1
        yield carry


SLICE = 256 * 1024  # non-ASCII text is case-mapped in slices of whole lines this large: faster than 1 MiB here


def map_text(block: bytes, fn: Processor, twin: Callable[[bytes], bytes] | None, size: int) -> list[bytes]:
    """fn, a per-character processor (engine.Routing.block_plan), on the UTF-8 text of block (whole lines): the
    same bytes as line by line, in pieces to write in order. A pure-ASCII block goes whole through twin, fn's bytes
    twin (ASCII_TWINS) if it has one: no decode, no encode. Any other block is cut into slices of whole lines of
    about `size` bytes (decoded text kept within the CPU caches); a slice that is pure ASCII still goes through
    twin (text with a few non-ASCII characters), the others are decoded (surrogateescape: undecodable bytes pass
    through unchanged), mapped and encoded. Whatever fn raises is raised."""
    if twin is not None and block.isascii():
        return [twin(block)]
    return [twin(p) if twin is not None and p.isascii()
            else fn(p.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")  # type: ignore[union-attr]
            for p in slices(block, size)]


def slices(block: bytes, size: int) -> list[bytes]:
    """block cut after a newline about every `size` bytes (whole lines: lower() looks around a Σ within its line)."""
    if len(block) <= size:
        return [block]
    out, start, n = [], 0, len(block)
    while start < n:
        cut = block.rfind(b"\n", start, start + size) + 1 or block.find(b"\n", start + size) + 1 or n
        out.append(block[start:cut])
        start = cut
    return out


def _check_lines(block: bytes, max_line_bytes: int, stats: Stats) -> None:
    """Rejected if a line of block has more than max_line_bytes of content (a CR before its LF not counted)."""
    at = first_long(block, max_line_bytes)
    if at is not None:
        raise Rejected(f"line longer than max_line_bytes ({max_line_bytes} bytes)",
                       line=stats.lines_in + block.count(b"\n", 0, at) + 1)


def first_long(block: bytes, limit: int, end: int | None = None) -> int | None:
    """The offset in block[:end] of the first line with more than `limit` bytes of content (its ending, LF or CR LF,
    not counted; a CR counts when no LF follows it), or None. Jumps from line to line by the window, not by the
    line: one memrchr per `limit` bytes when every line is short."""
    n = len(block) if end is None else end
    start = 0
    while n - start > limit:
        nl = block.rfind(b"\n", start, min(n, start + limit + 2))  # the content, a CR, and the LF
        if nl < 0 or nl - start > limit:  # perhaps one line too long: look at each line from here
            return _first_long_each(block, start, n, limit)
        start = nl + 1  # every line between start and nl is within the limit
    return None


def _first_long_each(block: bytes, start: int, n: int, limit: int) -> int | None:
    while start < n:
        nl = block.find(b"\n", start, n)
        if nl < 0:
            return start if n - start > limit else None
        if nl - start - (nl > start and block[nl - 1] == 13) > limit:
            return start
        start = nl + 1
    return None


def run(
    f: BinaryIO,
    name: str,
    routing: Routing,
    max_line_bytes: int,
    write: Callable[[str, bytes], None],
    stats: Stats,
    progress: Progress = lambda _: None,
    explain: Callable[[Step], None] | None = None,
) -> None:
    """Route every line of f to write(output_folder, bytes).

    Raises Rejected for binary or over-long input, and for a processor (built-in or plug-in) that raises on
    this input: the reason is "processor error: TYPE: MESSAGE (at FILE:LINE)", the line the input's line number
    (None on the block fast path). OSError passes through for the caller to classify (errors.classify).
    """
    rule = routing.rule_for(name)
    head = f.peek(BLOCK)[:BLOCK] if hasattr(f, "peek") else b""
    if b"\0" in head:
        if rule.binary != "pass":
            raise Rejected("binary content (a NUL byte in the first 64 KiB)")
        out = routing.output_for(rule.tag)
        while block := f.read(BLOCK * 16):
            stats.bytes_in += len(block)
            progress(stats.bytes_in)
            if out is not None:
                write(out, block)
        return
    if head.startswith(BOM):
        f.read(len(BOM))  # patterns and processors never see it: line 1 starts after it
        stats.bytes_in += len(BOM)
        write = _bom_first(write)
    if explain is not None or not routing.builtin_only(rule.tag):  # line by line (a plug-in may be slow per line)
        with _processor_errors(stats, per_line=True):
            for out, data in routing.run(rule.tag, lines(f, max_line_bytes, stats, progress), explain):
                write(out, data)
        return
    plan = routing.block_plan(rule.tag)
    if plan is not None:  # fast path: per-character processors on whole blocks of lines
        out, fn = plan
        twin = ASCII_TWINS.get(fn)
        with _processor_errors(stats, per_line=False):
            for block in blocks(f, max_line_bytes, stats, progress):
                for piece in map_text(block, fn, twin, SLICE):
                    write(out, piece)
        return
    # Built-in line-level filters (retag, grep, drop, redact): each line routed on its own, or the block searched
    # whole where provably the same, read, decoded and written a block at a time (Routing.route_block).
    tag = rule.tag
    with _processor_errors(stats, per_line=True):
        for block in blocks(f, max_line_bytes, stats, progress):
            try:
                routed = routing.route_block(tag, block)
            except AtLine as e:
                stats.lines_in -= block.count(b"\n") + (not block.endswith(b"\n")) - e.index - 1
                raise e.error from None
            for out, text in routed.items():
                write(out, text.encode("utf-8", "surrogateescape"))


def mapped(f: BinaryIO, name: str, routing: Routing) -> tuple[str, Processor] | None:
    """(output folder, per-character function) when the regular file f can go through parallel.map_file with the
    same result as run(): no NUL byte in its first BLOCK bytes (not binary), no BOM (run() keeps line 1's BOM out
    of its length), and every filter its tag meets per-character (Routing.block_plan); else None."""
    rule = routing.rule_for(name)
    head = os.pread(f.fileno(), BLOCK, 0)
    if b"\0" in head or head.startswith(BOM) or not routing.builtin_only(rule.tag):
        return None
    return routing.block_plan(rule.tag)


def run_mapped(f: BinaryIO, size: int, fn: Processor, max_line_bytes: int, out_path: str, stats: Stats,
               progress: Progress = lambda _: None, workers: int | None = None) -> int:
    """The first `size` bytes of the regular file f through fn (see mapped()) into the file at out_path (written
    over from offset 0, cut to its length): parallel.map_file on parallel.workers(size) processes unless told.
    Returns the output's length in bytes; sets stats.bytes_in (lines are not counted: see parallel).

    Raises Rejected for a line longer than max_line_bytes, with its number, as run() does; OSError as run() does."""
    from ingestd import parallel

    n = parallel.workers(size) if workers is None else workers
    out = os.open(out_path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)  # read too: the join may move bytes in it
    try:
        length = parallel.map_file(f.fileno(), size, fn, max_line_bytes, out, os.path.dirname(out_path) or ".", n,
                                   progress)
    except parallel.TooLong as e:
        raise Rejected(f"line longer than max_line_bytes ({max_line_bytes} bytes)", line=e.line) from None
    finally:
        os.close(out)
    stats.bytes_in = size
    return length


def _bom_first(write: Callable[[str, bytes], None]) -> Callable[[str, bytes], None]:
    """write(), but each output starts with the input's BOM before its first bytes: an output that receives any
    line is still UTF-8 with a BOM, whichever lines went elsewhere or were dropped; one that receives none stays
    empty."""
    started: set[str] = set()

    def write_bom_first(out: str, data: bytes) -> None:
        if out not in started:
            started.add(out)
            write(out, BOM)
        write(out, data)

    return write_bom_first


@contextmanager
def _processor_errors(stats: Stats, per_line: bool) -> Iterator[None]:
    """A processor that raises is this input's (or the plug-in's) fault, not a reason to crash a worker:
    Rejected with the exception and the line, kept in the sidecar (errors.classify, Phase.PROCESS)."""
    try:
        yield
    except (Rejected, OSError):
        raise
    except Exception as e:
        if errors.classify(e, Phase.PROCESS) is not Verdict.REJECT:
            raise  # MemoryError: the machine's fault, the file is retried
        raise Rejected(f"processor error: {errors.reason(e)}", line=stats.lines_in if per_line else None) from e
