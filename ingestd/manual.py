"""`ingestd process`: one file through the same engine as the daemon, by hand (no watch dir, no daemon).

Imports only what that needs: it is timed against `tr` (docs/benchmarks.md), so its start-up counts."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO, cast

from ingestd import pipeline
from ingestd.cli import EX_CANTCREAT, EX_DATAERR, EX_NOINPUT, plural, to_devnull
from ingestd.engine import Step
from ingestd.settings import Settings
from ingestd.sinks import Sinks

PROGRESS_MIN_BYTES = 8 << 20  # below this a progress bar is just noise
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # held back while outputs are published or dropped


def process(settings: Settings, input_path: str, output_path: str, explain: bool) -> int:
    """One input through the same engine as the daemon. A file output is published atomically;
    records routed to another output go to that folder beside it, as they would under processed/.

    Returns the exit code (sysexits.h): 0; 65 the input rejected (binary, a line over max_line_bytes, a processor
    that raised); 66 the input unreadable (or stdin closed); 73 an output unwritable (or stdout closed). Stopped
    by Ctrl-C (KeyboardInterrupt goes on up: cli.main exits 130), SIGTERM or SIGHUP (SystemExit(143 / 129)), or
    any exception: no output is published and no temp is left (a signal during the publish takes effect once it
    is done: the output is then published whole). The caller's signal handlers are as they were once it returns
    (a program may call it: cli.main(["process", ...]), from any thread)."""
    with _exit_on_signal(signal.SIGTERM, signal.SIGHUP):
        return _process(settings, input_path, output_path, explain)


def _process(settings: Settings, input_path: str, output_path: str, explain: bool) -> int:
    table = settings.routing
    folders = sorted({o.path for o in table.outputs})
    # `<&-` / `>&-`: the interpreter gives None for a closed standard stream; say so instead of a traceback.
    if input_path == "-" and sys.stdin is None:
        print("ingestd: cannot read - (stdin is closed): give --input FILE", file=sys.stderr)
        return EX_NOINPUT
    if output_path == "-" and sys.stdout is None:
        print("ingestd: cannot write - (stdout is closed): give --output FILE", file=sys.stderr)
        return EX_CANTCREAT
    given = output_path  # as typed: what messages name
    through = False  # --output names a FIFO, a device, a socket: written through as `>` does, never replaced
    if output_path != "-" and os.path.exists(output_path) and not os.path.isdir(output_path) \
            and not os.path.isfile(output_path):
        through = True  # (links followed: /dev/stdout too) a rename over /dev/null, as root, replaced /dev/null
    elif output_path != "-" and os.path.islink(output_path):
        # As cp(1) and `>`: a symlink is written through, its target replaced (atomically, as any output); a
        # rename over the link replaced the link and left its target as it was (tests/test_break_round7.py).
        try:
            os.stat(output_path)
        except OSError as e:  # ENOENT: it points at nothing; else the kernel's reason (a loop: ELOOP)
            why = "a symlink to nothing (not written through, as cp(1) does)" if isinstance(e, FileNotFoundError) \
                else f"{e.strerror} (a symlink that cannot be followed)"
            print(f"ingestd: cannot write {given}: {why}", file=sys.stderr)
            return EX_CANTCREAT
        output_path = os.path.realpath(output_path)
    folder = os.path.dirname(output_path) or "."
    unusable = _unusable(folder) if output_path != "-" else None
    if unusable:
        # As cp(1) and a shell's `>`: a typo in the folder is an error, never a tree of folders made silently.
        print(f"ingestd: cannot write {given}: {unusable}", file=sys.stderr)
        return EX_CANTCREAT
    try:
        src: BinaryIO = pipeline.whole_head(sys.stdin.buffer) if input_path == "-" else open(input_path, "rb")  # noqa: SIM115
    except OSError as e:
        print(f"ingestd: cannot read {input_path}: {e.strerror}", file=sys.stderr)
        return EX_NOINPUT
    name = "-" if input_path == "-" else os.path.basename(input_path)
    stats = pipeline.Stats()
    size = os.fstat(src.fileno()).st_size if input_path != "-" else 0
    bar = _bar(size, name) if size >= PROGRESS_MIN_BYTES and sys.stderr is not None and sys.stderr.isatty() else None
    progress = (lambda done: bar.update(done - bar.n)) if bar else (lambda done: None)
    sinks = None
    out = cast(BinaryIO, sys.stdout and sys.stdout.buffer)  # None only with --output FILE, where it is not used
    if through:
        try:
            out = open(output_path, "wb")  # noqa: SIM115 - closed below; a FIFO blocks here until read, as with `>`
        except OSError as e:
            src.close()
            print(f"ingestd: cannot write {given}: {e.strerror}", file=sys.stderr)
            return EX_CANTCREAT
    elif output_path != "-":
        base = os.path.realpath(folder)  # where the kernel puts it: "link/.." is the link target's parent
        # Routed outputs go to folders beside the main one, made by Sinks at their first record only: no empty
        # sibling folders for outputs no line reached.
        sinks = Sinks(base, os.path.basename(output_path), folders, shown=os.path.dirname(given))
    default = "" if "" in folders else folders[0]
    tails: dict[str, bytes] = {}  # the last byte written for each output stdout does not carry

    def write(folder: str, data: bytes) -> None:
        if sinks is not None:
            sinks.write(folder, data)
        elif folder == default:
            out.write(data)
        else:
            # One write may carry a whole block of lines (the engine's block paths) or a BOM alone: count the line
            # endings in it, and at the end a last record without one (tails), so the count is the same either way.
            routed[folder] = routed.get(folder, 0) + data.count(b"\n")
            if data or folder not in tails:
                tails[folder] = data[-1:]

    n = 0
    explaining = [True]  # emptied when the reader of stderr goes away
    routed: dict[str, int] = {}  # records per output folder that stdout does not carry

    def where(folder: str) -> str:
        """Where a record for this output goes: the file it is written to, or why it is not written."""
        if sinks is not None:
            return os.path.join(os.path.dirname(output_path), folder, os.path.basename(output_path))
        return "stdout" if folder == default else f"not written ({folder}/ output; stdout carries only {default or 'processed'}/)"

    def show(step: Step) -> None:
        nonlocal n
        n += 1
        acted = f"filters [{', '.join(step.acted)}]" if step.acted else "no filter acted"
        if step.output is None:
            fate = "dropped" if step.acted and not step.acted[-1].startswith("retag->") else "dropped (no output matches)"
        else:
            fate = f"{where(step.output)}: {step.text!r}"
        if not explaining:
            return
        try:
            print(f"line {n}: tag={step.tag}, {acted} -> {fate}", file=sys.stderr)
        except BrokenPipeError:  # `--explain 2>&1 >out | head`: the reader of the explanation has gone; go on
            explaining.clear()
            to_devnull(sys.stderr)

    # A regular file into a file through per-character filters only (--mode uppercase): mapped in blocks on every
    # core (pipeline.run_mapped), the same bytes as line by line.
    fast = pipeline.mapped(src, name, table) if sinks is not None and input_path != "-" and not explain else None
    try:
        with src:
            if fast is not None and sinks is not None:
                folder, fn = fast
                pipeline.run_mapped(src, size, fn, settings.max_line_bytes, _temp_of(sinks, folder), stats, progress)
            else:
                pipeline.run(src, name, table, settings.max_line_bytes, write, stats, progress,
                             show if explain else None)
        if sinks is not None:
            # Held for the publish: a signal between its renames and the removal of an earlier result's hidden
            # second name left that name behind (a helper's finding); it takes effect once the output is published
            # whole. fsync cannot be interrupted anyway, so holding them across the data sync costs nothing.
            with _held(*STOP_SIGNALS):
                sinks.commit()
        else:
            out.flush()
    except BrokenPipeError if sinks is None else ():
        # `ingestd process --output - | head -1`: the reader took what it wanted, as with `seq | head`. Quiet, and
        # exit 0 as `status` does; stdout points at /dev/null so the interpreter's final flush is quiet too.
        to_devnull(sys.stdout)
        return 0
    except pipeline.Rejected as e:
        _abort(sinks)
        at = f" (line {e.line})" if e.line else ""
        print(f"ingestd: {input_path}: {e.reason}{at}", file=sys.stderr)
        return EX_DATAERR
    except OSError as e:
        _abort(sinks)
        print(f"ingestd: cannot write {given}: {e.strerror}", file=sys.stderr)
        return EX_CANTCREAT
    except BaseException:
        # Ctrl-C (cli.main exits 130), SIGTERM or SIGHUP (_exit_on_signal), a bug: the unpublished temp goes, as on
        # any other failure (a Ctrl-C left it behind); what raised goes on up.
        _abort(sinks)
        raise
    finally:
        if bar:
            bar.close()
        if through:
            with contextlib.suppress(OSError):  # flushed above; a reader gone meanwhile is no error, as for stdout
                out.close()
    for folder, tail in tails.items():
        routed[folder] += tail != b"\n"  # a last record without an ending (or an empty one)
    dropped = sum(routed.values())
    if dropped:
        kinds = ", ".join(f"{k}/ {v}" for k, v in sorted(routed.items()))
        print(f"ingestd: {plural(dropped, 'record')} routed to other outputs ({kinds}) "
              f"{'was' if dropped == 1 else 'were'} not written to stdout; give --output FILE to keep them "
              "in folders beside it", file=sys.stderr)
    return 0


def _unusable(folder: str) -> str | None:
    """Why `folder` cannot hold the output, in the kernel's words (stat(2)'s errno, as cp(1) says it), or None when
    it is a folder. The path as given, resolved by the kernel: abspath() collapses "missing/.." without asking
    whether it exists. "does not exist" for ENOENT alone: a symlink loop (ELOOP) or a folder this user may not
    enter (EACCES) exists, and a user told otherwise looks for a typo that is not there."""
    try:
        st = os.stat(folder)
    except FileNotFoundError:
        return f"its folder {folder} does not exist"
    except NotADirectoryError:
        return f"its folder {folder}: a part of its path is not a folder"
    except OSError as e:
        return f"its folder {folder}: {e.strerror}"
    return None if stat.S_ISDIR(st.st_mode) else f"its folder {folder} is not a folder"


@contextmanager
def _exit_on_signal(*signums: int) -> Iterator[None]:
    """For the block: each of these signals, where it would kill the process (SIG_DFL), raises SystemExit(128 +
    signum) instead, the shell's code for a death by that signal, so that `process` cleans up (its temp output) on
    the way out. One that is ignored (`nohup` ignores SIGHUP) stays ignored; outside the main thread (where Python
    cannot set handlers) nothing changes; afterwards the caller's handlers are back (cli.main called in-process)."""
    main = threading.current_thread() is threading.main_thread()
    before = {s: signal.getsignal(s) for s in signums} if main else {}
    try:
        for signum, handler in before.items():
            if handler is signal.SIG_DFL:
                signal.signal(signum, _raise_exit)
        yield
    finally:
        for signum, handler in before.items():
            if handler is signal.SIG_DFL:
                signal.signal(signum, handler)


def _abort(sinks: Sinks | None) -> None:
    """Drop the temp outputs with the stop signals held: a second one (Ctrl-C pressed again, `kill` twice) while
    they were removed left one behind; it takes effect once they are gone."""
    if sinks is not None:
        with _held(*STOP_SIGNALS):
            sinks.abort()


@contextmanager
def _held(*signums: int) -> Iterator[None]:
    """These signals held back (blocked, so pending) in this thread for the block, delivered as it ends
    (pthread_sigmask(2))."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signums)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _raise_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _temp_of(sinks: Sinks, folder: str) -> str:
    """The temp file of one output, created now (empty) if no record reached it yet: `process`'s mapped path
    writes it with pwrite rather than through Sinks.write, and commit() then seals and publishes it as usual.
    Sinks keeps these private; a public Sinks.temp_path(folder) is proposed to its owner (the branch's report)."""
    out = sinks.outs.get(folder) or sinks._open(folder)
    return out.temp


def _bar(size: int, name: str) -> Any:
    """A progress bar on stderr (tqdm, imported only then: it costs start-up time), without tqdm's monitor thread
    (parallel.map_file forks only a single-threaded process)."""
    from tqdm import tqdm  # type: ignore[import-untyped]

    tqdm.monitor_interval = 0
    return tqdm(total=size, unit="B", unit_scale=True, file=sys.stderr, desc=name, leave=False)
