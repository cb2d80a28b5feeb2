"""One regular file through a per-character plan on every core: `ingestd process`'s fast path.

A per-character plan (Routing.block_plan: uppercase, lowercase, passthrough and chains of them) maps each line
on its own, so the file can be cut at line starts into one range per process (os.fork) and each range mapped
block by block with positional reads and writes (pread, pwrite: no shared file offset, no stream buffer). The
output of a range goes to the same offsets of the output file as long as it is no longer than its input so far
(always so for ASCII, whose case mapping keeps every byte's place; Latin, Greek and Cyrillic letters mostly keep
their UTF-8 length too); from the first block that would overrun, the rest of that range goes to a spill file,
and the join moves the pieces into place (os.copy_file_range) once every process is done. The bytes are those of
the line-by-line engine (tests/test_parallel.py proves it on adversarial text).

Lines are not counted as they go by (a newline count is as slow as the upper-casing itself): the number of a
line that is too long is counted only when there is one, by reading the file up to it.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import threading
from collections.abc import Callable, Sequence

from ingestd.engine import Processor
from ingestd.lifeline import die_with_parent
from ingestd.pipeline import ASCII_TWINS, first_long, map_text

READ = 1 << 20  # bytes per pread: a block of whole lines (fits the CPU caches well enough; see bench/engine.py)
SLICE = 256 * 1024  # non-ASCII text is decoded and mapped in slices of whole lines this large (pipeline.map_text)
MIN_SPLIT = 8 << 20  # below this a second process costs more (fork, join) than it saves
MAX_WORKERS = 4


class TooLong(Exception):
    """A line has more than max_line_bytes of content; `line` is its number (1-based)."""

    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.line = line


class _LongAt(Exception):
    """A too-long line starts at byte `offset` of the input (its number is counted by the caller)."""

    def __init__(self, offset: int) -> None:
        super().__init__(offset)
        self.offset = offset


class _Range:
    """One process's share of the file (a plain class: a dataclass costs start-up time, ~0.5 ms)."""

    __slots__ = ("done", "spill", "spilled", "start", "stop")

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop  # input offsets of its first line and after its last
        self.spill = -1  # a file descriptor for what does not fit in place
        self.done = start  # output offset after what it wrote in place (from start on)
        self.spilled = 0  # bytes written to spill


def workers(size: int) -> int:
    """How many processes to map a file of `size` bytes with: one per usable core (at most MAX_WORKERS), one when
    the file is small or this process has threads (a fork copies only the calling thread: the others' locks would
    stay held in the child)."""
    if size < MIN_SPLIT or threading.active_count() > 1:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS, size // (MIN_SPLIT // 2)))


def map_file(fd: int, size: int, fn: Processor, max_line_bytes: int, out: int, spill_dir: str, n: int = 1,
             progress: Callable[[int], None] = lambda _: None, read: int | None = None) -> int:
    """Map the first `size` bytes of the regular file open at fd through fn (a per-character processor: the same
    on a block of lines as line by line) into the file open at `out` (written from offset 0 with pwrite, then cut
    to its length); returns that length, in bytes.

    n: processes (see workers()); spill_dir: where spill files are made (O_TMPFILE: nothing left behind), the
    output's folder; progress: called with about how many input bytes are done; read: bytes per pread (default
    READ; small in tests, so that block boundaries fall everywhere).

    Raises TooLong for the first line (in file order) with more than max_line_bytes bytes of content (a CR before
    its LF not counted, as pipeline.lines does), OSError from reading or writing (the file shrinking meanwhile is
    EIO), MemoryError. Undecodable bytes pass through unchanged (UTF-8 with surrogateescape, as the engine does)."""
    read = read or READ
    ranges = _cut(fd, size, n, max_line_bytes)
    twin = ASCII_TWINS.get(fn)
    children: list[tuple[int, int]] = []  # (pid, read end of its pipe)
    try:
        for r in ranges:
            r.spill = _tmpfile(spill_dir)
        parent = os.getpid()
        for r in ranges[1:]:
            rd, wr = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: its range, its answer on the pipe, then _exit (no parent's cleanup, no atexit)
                code = 1
                try:
                    die_with_parent(parent)  # `ingestd process` killed: its half-file helper goes too
                    os.close(rd)
                    msg = _answer(functools.partial(_map_range, fd, r, fn, twin, max_line_bytes, out, read))
                    os.write(wr, msg.encode())
                    code = 0
                finally:
                    os._exit(code)
            os.close(wr)
            children.append((pid, rd))
        first = ranges[0]
        scale = size / max(1, first.stop - first.start)
        _map_range(fd, first, fn, twin, max_line_bytes, out, read, lambda done: progress(int(done * scale)))
        while children:  # in file order: the first error in the file is the one reported
            pid, rd = children.pop(0)
            _collect(pid, rd, ranges[len(ranges) - len(children) - 1])
        return _join(out, ranges)
    except _LongAt as e:
        raise TooLong(_line_at(fd, e.offset)) from None
    finally:
        for pid, rd in children:  # an error on the way: the other ranges are moot
            _reap(pid, rd, kill=True)
        for r in ranges:
            if r.spill >= 0:
                os.close(r.spill)


def _answer(work: Callable[[], tuple[int, int]]) -> str:
    """A child's range: its outcome as one line for the parent (_collect)."""
    try:
        done, spilled = work()
    except _LongAt as e:
        return f"long {e.offset}"
    except OSError as e:
        return f"os {e.errno or errno.EIO} {e.strerror or e}"
    except MemoryError:
        return "memory"
    return f"ok {done} {spilled}"


def _collect(pid: int, rd: int, r: _Range) -> None:
    """A child's outcome: its range's done and spilled, or its error raised."""
    msg = _reap(pid, rd, kill=False)
    kind, _, rest = msg.partition(" ")
    if kind == "ok":
        done, spilled = rest.split()
        r.done, r.spilled = int(done), int(spilled)
        return
    if kind == "long":
        raise _LongAt(int(rest))
    if kind == "os":
        code, _, text = rest.partition(" ")
        raise OSError(int(code), text)
    if kind == "memory":
        raise MemoryError
    raise OSError(errno.EIO, f"a worker process of ingestd process ended without an answer ({rest or msg})")


def _reap(pid: int, rd: int, kill: bool) -> str:
    if kill:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    chunks = []
    try:
        if not kill:
            while data := os.read(rd, 4096):
                chunks.append(data)
    finally:
        os.close(rd)
        _, status = os.waitpid(pid, 0)
    msg = b"".join(chunks).decode()
    if not msg:
        how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.waitstatus_to_exitcode(status)}"
        return f"died {how}"
    return msg


def _map_range(fd: int, r: _Range, fn: Processor, twin: Callable[[bytes], bytes] | None, limit: int, out: int,
               read: int, progress: Callable[[int], None] | None = None) -> tuple[int, int]:
    """Map r's lines block by block: each block's output at the output offset after the previous one's while it is
    no longer than the input read so far (so it never reaches the next range), else into r.spill from then on.
    Returns and sets (r.done, r.spilled)."""
    pos, done, spilled, spilling = r.start, r.start, 0, False
    while pos < r.stop:
        block, cut = _lines_at(fd, pos, r.stop, limit, read)
        long = first_long(block, limit, cut)
        if long is not None:
            raise _LongAt(pos + long)
        if twin is not None and block.isascii():
            pieces: Sequence[bytes | memoryview] = [memoryview(twin(block))[:cut]]  # the bytes after cut: unused
        else:
            pieces = map_text(block[:cut] if cut < len(block) else block, fn, twin, SLICE)
        pos += cut
        for piece in pieces:
            if not spilling and done + len(piece) <= pos:
                _pwrite_all(out, piece, done)
                done += len(piece)
            else:
                spilling = True
                _pwrite_all(r.spill, piece, spilled)
                spilled += len(piece)
        if progress is not None:
            progress(pos - r.start)
    r.done, r.spilled = done, spilled
    return done, spilled


def _lines_at(fd: int, pos: int, stop: int, limit: int, read: int) -> tuple[bytes, int]:
    """(bytes read at pos, how many of them are whole lines): at least one line, unless the line at pos is too
    long (_LongAt). A range's last line ends at stop."""
    got = 0
    # A block; if it holds no line end, the longest line allowed (its content, a CR and its LF), if that is more.
    for want in (min(read, stop - pos), min(limit + 2, stop - pos)):
        if want <= got:
            break
        block, got = _pread(fd, want, pos), want
        if pos + want == stop:
            return block, want
        cut = block.rfind(b"\n") + 1
        if cut:
            return block, cut
    raise _LongAt(pos)


def _pread(fd: int, n: int, pos: int) -> bytes:
    data = os.pread(fd, n, pos)
    if len(data) != n:  # the file was cut short while being read: not the file whose size was taken
        raise OSError(errno.EIO, "the input shrank while it was read")
    return data


def _pwrite_all(fd: int, data: bytes | memoryview, pos: int) -> None:
    """os.pwrite may write less than asked (RLIMIT_FSIZE, signals): loop until all is written."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, pos)
        view, pos = view[n:], pos + n


def _cut(fd: int, size: int, n: int, limit: int) -> list[_Range]:
    """n ranges of whole lines, about equal; fewer when a cut would fall in a line longer than the limit (that line
    is reported by the range holding it)."""
    starts = [0]
    for i in range(1, n):
        at = size * i // n
        if at <= starts[-1]:
            continue
        start = _next_line(fd, at - 1, min(size, at - 1 + limit + 2))  # from the byte before: is `at` a line start?
        if start is not None and starts[-1] < start < size:
            starts.append(start)
    return [_Range(a, b) for a, b in zip(starts, [*starts[1:], size], strict=True)]


def _next_line(fd: int, pos: int, stop: int) -> int | None:
    """The offset after the first LF in [pos, stop) of fd, or None; read READ bytes at a time (memory bounded
    whatever max_line_bytes is)."""
    while pos < stop:
        chunk = os.pread(fd, min(READ, stop - pos), pos)
        if not chunk:
            return None
        nl = chunk.find(b"\n")
        if nl >= 0:
            return pos + nl + 1
        pos += len(chunk)
    return None


def _join(out: int, ranges: list[_Range]) -> int:
    """Put every range's output in order from offset 0 of `out`; returns the output's length.

    A range's output is the part written in place, [start, done), then its spill. When every earlier range's
    output was exactly as long as its input, a range's in-place part is where it belongs and nothing moves: the
    ASCII case. Otherwise a part moves left (earlier outputs shrank) in chunks, or, when an earlier spill would
    overwrite a later range's in-place part, that part goes first to the front of a new spill of its own."""
    at = 0  # out holds the final output in [0, at)
    for i, r in enumerate(ranges):
        placed = r.done - r.start
        if placed:
            if at != r.start:
                _move_left(out, r.start, at, placed)  # at < r.start: spills only grow what comes before
            at += placed
        if r.spilled:
            _clear(out, ranges[i + 1:], at + r.spilled)
            _copy(r.spill, 0, out, at, r.spilled)
            at += r.spilled
    os.ftruncate(out, at)
    return at


def _clear(out: int, later: list[_Range], end: int) -> None:
    """Before [.., end) of out is written: move the in-place part of every later range that starts below `end` to
    a new spill, ahead of its own spill's bytes."""
    for r in later:
        if r.start >= end or r.done == r.start:
            continue
        fresh = _tmpfile_like(r.spill)
        placed = r.done - r.start
        _copy(out, r.start, fresh, 0, placed)
        _copy(r.spill, 0, fresh, placed, r.spilled)
        os.close(r.spill)
        r.spill, r.spilled, r.done = fresh, placed + r.spilled, r.start


def _move_left(fd: int, src: int, dst: int, n: int) -> None:
    """Move n bytes of fd from src to dst < src; front to back, so no byte is overwritten before it is read."""
    if dst >= src:
        raise AssertionError("only earlier ranges growing makes a range move right, and then it was spilled")
    done = 0
    while done < n:
        chunk = _pread(fd, min(READ, n - done), src + done)
        _pwrite_all(fd, chunk, dst + done)
        done += len(chunk)


def _copy(src: int, src_at: int, dst: int, dst_at: int, n: int) -> None:
    """n bytes from one file to another in the kernel (copy_file_range(2); a plain copy where it is refused)."""
    done = 0
    try:
        while done < n:
            k = os.copy_file_range(src, dst, n - done, src_at + done, dst_at + done)
            if k == 0:
                raise OSError(errno.EIO, "a spill file ended early")
            done += k
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
        while done < n:
            chunk = _pread(src, min(READ, n - done), src_at + done)
            _pwrite_all(dst, chunk, dst_at + done)
            done += len(chunk)


_spill_dirs: dict[int, str] = {}


def _tmpfile(folder: str) -> int:
    """An unnamed file in folder (O_TMPFILE: gone with its last descriptor, even after a crash), read-write."""
    try:
        fd = os.open(folder, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
        import tempfile

        fd, path = tempfile.mkstemp(dir=folder, prefix=".ingestd-spill-")
        os.unlink(path)
    _spill_dirs[fd] = folder
    return fd


def _tmpfile_like(fd: int) -> int:
    return _tmpfile(_spill_dirs.get(fd, "."))


def _line_at(fd: int, offset: int) -> int:
    """The number (1-based) of the line starting at `offset`: the newlines before it, plus one."""
    n, pos = 1, 0
    while pos < offset:
        chunk = os.pread(fd, min(READ, offset - pos), pos)
        if not chunk:
            break
        n += chunk.count(b"\n")
        pos += len(chunk)
    return n
