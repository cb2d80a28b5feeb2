"""A worker process: takes claimed file names from the parent, processes each, reports progress and results.

Workers never move files between folders; the parent alone does (see spool.py). A worker only
reads its input in underprocess/ and publishes outputs (temp file, fsync, rename) via sinks.py.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import time
from multiprocessing.connection import Connection
from typing import Any

from ingestd import errors, pipeline, routing
from ingestd.errors import Phase, Verdict
from ingestd.sinks import Sinks

PROGRESS_EVERY = 0.25  # seconds between progress reports (the parent's liveness signal)


def main(conn: Connection, routing_doc: dict[str, Any], max_line_bytes: int, underprocess: str, processed: str) -> None:
    # The parent owns signals: Ctrl-C, `timeout`, or systemd's control-group kill reach every process,
    # but only the parent decides (warm stop); a worker must not die with its file half done.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    _die_with_parent()
    faulthandler.enable()  # a crash (SIGSEGV, SIGABRT) dumps this worker's stack
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent asks when this worker seems stuck
    table = routing.build(routing_doc)
    folders = sorted({out.path for out in table.outputs})
    conn.send(("ready", {"pid": os.getpid()}))
    while True:
        try:
            name = conn.recv()
        except (EOFError, OSError):
            return
        if name is None:
            return
        conn.send(process(conn, name, table, folders, max_line_bytes, underprocess, processed))


def process(conn: Connection, name: str, table: routing.Routing, folders: list[str], max_line_bytes: int,
            underprocess: str, processed: str) -> tuple[str, dict[str, Any]]:
    """Returns ("done", stats) | ("rejected", reason) | ("error", reason): an error keeps the input for a retry."""
    started = time.monotonic()
    last = [started]

    def progress(done: int) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVERY:
            last[0] = now
            conn.send(("progress", {"bytes": done}))

    stats = pipeline.Stats()
    sinks = Sinks(processed, name, folders)
    try:
        with pipeline.open_input(os.path.join(underprocess, name)) as f:
            pipeline.run(f, name, table, max_line_bytes, sinks.write, stats, progress)
        sinks.commit()
    except pipeline.Rejected as e:
        sinks.abort()
        return "rejected", {"reason": e.reason, "line": e.line, "bytes_in": stats.bytes_in, "lines_in": stats.lines_in}
    except Exception as e:  # noqa: BLE001 - one table (errors.classify) decides; a worker never dies on one file
        sinks.abort()
        phase = errors.phase_of(e, Phase.READ_INPUT if isinstance(e, OSError) else Phase.PROCESS)
        reason = errors.reason(e)
        if errors.classify(e, phase) is Verdict.REJECT:
            # The input's fault (its name cannot be published, it is too large for RLIMIT_FSIZE, a bug met on
            # this input): retrying cannot help, and would pause the whole queue.
            prefix = "cannot publish: " if phase in (Phase.WRITE_OUTPUT, Phase.PUBLISH) else ""
            return "rejected", {"reason": prefix + reason, "line": None, "bytes_in": stats.bytes_in,
                                "lines_in": stats.lines_in}
        # RETRY (full disk, read-only folder, EIO, EMFILE...) or RECREATE (an output folder vanished: the retry's
        # Sinks recreates it): not the input's fault. After a failed fsync the temp is untrustworthy (Linux
        # forgets the error), so it is dropped and the whole file redone later.
        return "error", {"reason": reason, "errno": getattr(e, "errno", None)}
    return "done", {
        "bytes_in": stats.bytes_in, "lines_in": stats.lines_in, "bytes_out": sinks.bytes_out,
        "lines_out": sinks.lines_out, "duration": time.monotonic() - started,
    }


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: if the parent is killed (kill -9, watchdog), its workers go too, at once."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)
