"""A worker process: takes claimed file names from the parent, processes each, reports progress and the outcome.

Workers never move files between folders; the parent alone does (see spool.py). A worker only
reads its input in underprocess/ and publishes outputs (temp file, fsync, rename) via sinks.py.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from ingestd import errors, pipeline, routing
from ingestd.errors import Phase, Verdict
from ingestd.messages import Assign, Done, Heartbeat, Outcome, Ready, Rejected, Retry, Stage
from ingestd.sinks import Sinks

PROGRESS_EVERY = 0.25  # seconds between heartbeats while a file is held (the parent's liveness signal)


class _Link:
    """The pipe to the parent, shared by the main thread and the heartbeat thread."""

    def __init__(self, conn: Connection) -> None:
        self.conn, self.lock = conn, threading.Lock()
        self.stats: pipeline.Stats | None = None  # the file in hand, read by the heartbeat thread
        self.stage = Stage.READ
        self.wake = threading.Event()

    def send(self, msg: object) -> None:
        with self.lock:
            self.conn.send(msg)

    def heartbeats(self) -> None:
        """Every PROGRESS_EVERY seconds while a file is held: by time, not by line count, so a slow processor
        or a long fsync still shows life; a frozen process sends nothing, and the parent notices."""
        while True:
            self.wake.wait()
            time.sleep(PROGRESS_EVERY)
            stats = self.stats
            if stats is None:
                continue
            try:
                self.send(Heartbeat(stats.bytes_in, stats.lines_in, self.stage))
            except OSError:
                return


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
    link = _Link(conn)
    threading.Thread(target=link.heartbeats, name="heartbeat", daemon=True).start()
    link.send(Ready(os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if not isinstance(msg, Assign):
            return  # Stop
        link.send(process(link, msg.name, table, folders, max_line_bytes, underprocess, processed))


def process(link: _Link, name: str, table: routing.Routing, folders: list[str], max_line_bytes: int,
            underprocess: str, processed: str) -> Outcome:
    """Done | Rejected (the input's fault) | Retry (the machine's fault: the input is kept for a retry)."""
    started = time.monotonic()
    stats = pipeline.Stats()
    link.stats, link.stage = stats, Stage.READ
    link.wake.set()
    sinks = Sinks(processed, name, folders)
    try:
        with pipeline.open_input(os.path.join(underprocess, name)) as f:
            pipeline.run(f, name, table, max_line_bytes, sinks.write, stats)
        link.stage = Stage.COMMIT
        sinks.commit()
    except pipeline.Rejected as e:
        sinks.abort()
        return Rejected(e.reason, e.line, stats.bytes_in, stats.lines_in)
    except Exception as e:  # noqa: BLE001 - one table (errors.classify) decides; a worker never dies on one file
        sinks.abort()
        phase = errors.phase_of(e, Phase.READ_INPUT if isinstance(e, OSError) else Phase.PROCESS)
        reason = errors.reason(e)
        verdict = errors.classify(e, phase)
        if verdict is Verdict.REJECT:
            # The input's fault (its name cannot be published, it is too large for RLIMIT_FSIZE, a bug met on
            # this input): retrying cannot help, and would pause the whole queue.
            prefix = "cannot publish: " if phase in (Phase.WRITE_OUTPUT, Phase.PUBLISH) else ""
            return Rejected(prefix + reason, None, stats.bytes_in, stats.lines_in)
        # RETRY (full disk, read-only folder, EIO, EMFILE...) or RECREATE (an output folder vanished: the retry's
        # Sinks recreates it): not the input's fault. After a failed fsync the temp is untrustworthy (Linux
        # forgets the error), so it is dropped and the whole file redone later.
        return Retry(reason, getattr(e, "errno", None), recreate=verdict is Verdict.RECREATE)
    finally:
        link.wake.clear()
        link.stats = None
    return Done(stats.bytes_in, stats.lines_in, sinks.bytes_out, dict(sinks.lines_out), time.monotonic() - started)


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: if the parent is killed (kill -9, watchdog), its workers go too, at once."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)
