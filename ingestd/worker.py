"""A worker process: takes claimed file names from the parent, processes each, reports progress and the outcome.

Workers never move files between folders; the parent alone does (see spool.py). A worker only
reads its input in underprocess/ and publishes outputs (temp file, fsync, rename) via sinks.py.
"""

from __future__ import annotations

import contextlib
import errno
import faulthandler
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, NoReturn

from ingestd import durable, errors, inflight, pipeline, routing
from ingestd.errors import Phase, Verdict
from ingestd.lifeline import die_with_parent
from ingestd.messages import Assign, Done, Heartbeat, Outcome, Outcomes, Ready, Rejected, Retry, Stage, StartFailed
from ingestd.names import key
from ingestd.sinks import Sinks, claim_of

COMMIT_STALE = 0.5  # seconds one file may take before the files sealed ahead of it are committed without it
PROGRESS_EVERY = 0.25  # seconds between heartbeats while a batch is held (the parent's liveness signal)


class _Link:
    """The pipe to the parent, shared by the main thread and the heartbeat thread."""

    def __init__(self, conn: Connection, marker: inflight.Marker) -> None:
        self.conn, self.lock, self.marker = conn, threading.Lock(), marker
        self.stats = pipeline.Stats()  # the file in hand, read by the heartbeat thread
        self.index = 0  # its place in the batch
        self.stage = Stage.READ
        self.wake = threading.Event()  # set while a batch is in hand
        self.group: _Group | None = None  # the batch in hand
        self.commit_due = threading.Event()  # a partial commit is due (see committer)
        self.since = 0.0  # monotonic: when the file in hand was started

    def begin(self, index: int, name: str) -> None:
        self.stats, self.index, self.stage, self.since = pipeline.Stats(), index, Stage.READ, time.monotonic()
        self.marker.mark(key(name).encode())  # before the file's first byte is read

    def end(self) -> None:
        self.wake.clear()
        self.marker.mark(inflight.IDLE)

    def send(self, msg: object) -> None:
        with self.lock:
            self.conn.send(msg)

    def heartbeats(self) -> None:
        """Every PROGRESS_EVERY seconds while a batch is held: by time, not by line count, so a slow processor
        or a long fsync still shows life; a frozen process sends nothing, and the parent notices."""
        while True:
            self.wake.wait()
            time.sleep(PROGRESS_EVERY)
            if not self.wake.is_set():
                continue
            stats, group = self.stats, self.group
            try:
                self.send(Heartbeat(stats.bytes_in, stats.lines_in, self.stage, self.index))
            except OSError:
                return
            if group is not None and group.pending() and time.monotonic() - self.since > COMMIT_STALE:
                self.commit_due.set()  # the committer thread: heartbeats go on while a slow sync runs

    def committer(self) -> None:
        """Partial group commits, off the main thread (busy with a slow file) and the heartbeat thread."""
        while True:
            self.commit_due.wait()
            self.commit_due.clear()
            group = self.group
            if group is None:
                continue
            try:
                group.flush(final=False)  # files sealed ahead of a slow one are not kept waiting for it
            except OSError:
                return


def main(conn: Connection, cursor: Any, routing_doc: dict[str, Any], max_line_bytes: int, underprocess: str,
         processed: str, state: str, slot: int, file_exist: str = "keep") -> None:
    """The worker's life. cursor: a locked shared int[2], [the index in its batch of the file it is on, the index
    it must stop before] (the parent lowers the second to take back files not started: Pool.steal). file_exist:
    what an earlier same-named result becomes (sinks.FILE_EXIST)."""
    # The parent owns signals: Ctrl-C, `timeout`, or systemd's control-group kill reach every process,
    # but only the parent decides (warm stop); a worker must not die with its file half done.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent()  # if the parent is killed (kill -9, watchdog), its workers go too, at once
    faulthandler.enable()  # a crash (SIGSEGV, SIGABRT) dumps this worker's stack
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent asks when this worker seems stuck
    try:
        table = routing.build(routing_doc)
    except BaseException as e:  # noqa: BLE001 - a plug-in may raise anything at import (SystemExit too): said, not lost
        _cannot_start(conn, e)
    folders = sorted({out.path for out in table.outputs})
    link = _Link(conn, inflight.Marker(state, slot))
    threading.Thread(target=link.heartbeats, name="heartbeat", daemon=True).start()
    threading.Thread(target=link.committer, name="committer", daemon=True).start()
    link.send(Ready(os.getpid(), link.marker.ok))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if not isinstance(msg, Assign):
            return  # Stop
        run_batch(link, cursor, msg.names, table, folders, max_line_bytes, underprocess, processed, file_exist)


def _cannot_start(conn: Connection, e: BaseException) -> NoReturn:
    """Tell the parent why this worker cannot start (in place of Ready), then exit 1 without a traceback: the
    parent logs the error once, however often the worker is respawned (Pool backs those off)."""
    error = str(e) if isinstance(e, routing.RoutingError) else errors.reason(e)  # RoutingError names the plug-in's
    with contextlib.suppress(OSError):  # the parent may be gone already: the exit code is all it gets then
        conn.send(StartFailed(error))
    sys.exit(1)


class _Group:
    """A batch's decided outcomes and sealed files, committed as a group: by the main thread at the batch's end,
    or sooner by the heartbeat thread once the file in hand has taken COMMIT_STALE seconds (a slow or stuck file
    then holds up only itself). Commit and send happen under one lock, so the parent gets results in order."""

    def __init__(self, link: _Link, processed: str) -> None:
        self.link, self.processed, self.lock = link, processed, threading.Lock()
        self.outcomes: dict[str, Outcome] = {}
        self.sealed: list[tuple[str, Sinks, pipeline.Stats, float]] = []

    def decide(self, name: str, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes[name] = outcome

    def seal(self, item: tuple[str, Sinks, pipeline.Stats, float]) -> None:
        with self.lock:
            self.sealed.append(item)

    def pending(self) -> bool:
        """Anything a partial flush would send: sealed files, or outcomes decided without a seal (a rejection,
        a retry), which must not wait behind a stuck file either."""
        with self.lock:
            return bool(self.sealed or self.outcomes)

    def flush(self, final: bool) -> None:
        """Commit what is sealed (one data sync for all, the renames, one fsync per output folder), send every outcome
        decided so far; the final flush is sent even when empty (it ends the batch)."""
        with self.lock:
            sealed, self.sealed = self.sealed, []
            outcomes, self.outcomes = self.outcomes, {}
            outcomes.update(_group_commit(sealed, self.processed))
            if outcomes or final:
                self.link.send(Outcomes(list(outcomes.items()), final))


def run_batch(link: _Link, cursor: Any, names: tuple[str, ...], table: routing.Routing, folders: list[str],
              max_line_bytes: int, underprocess: str, processed: str, file_exist: str = "keep") -> None:
    """Each file of a batch through the engine into sealed temps, then one group commit for all of them (or for
    those sealed so far, when one file is slow): one data sync (durable.sync_files), the renames, one fsync per output
    folder; the outcomes go to the parent in Outcomes messages, the last one final. A batch of one file syncs
    its own temps (fsync), as a big file travels alone."""
    group = _Group(link, processed)
    alone = len(names) == 1
    link.group = group
    link.wake.set()
    try:
        for index, name in enumerate(names):
            with cursor.get_lock():  # the parent may have taken back the files not started yet (work stealing)
                if index >= cursor[1]:
                    break
                cursor[0] = index  # shared memory: the parent reads it even after this process is killed
            link.begin(index, name)
            path = os.path.join(underprocess, name)
            # The input's identity, recorded on each result: a redo of this same input replaces its own results.
            sinks = Sinks(processed, name, folders, file_exist, claim_of(path))
            stats, started = link.stats, time.monotonic()
            phase = Phase.PROCESS
            try:
                with pipeline.open_input(path) as f:
                    pipeline.run(f, name, table, max_line_bytes, sinks.write, stats)
                phase = Phase.PUBLISH  # the input is read: a bug from here on is ours, not the input's
                link.stage = Stage.COMMIT
                if alone:
                    _between_files(link, cursor, len(names))
                    sinks.commit()  # alone: its own fsyncs, then its renames and their folders' fsyncs
                    group.decide(name, _done(sinks, stats, started))
                    continue
                sinks.seal(sync=False)
            except Exception as e:  # noqa: BLE001 - one table (errors.classify) decides; a worker never dies on a file
                sinks.abort()
                group.decide(name, _failure(e, stats, phase))
                continue
            group.seal((name, sinks, stats, started))
        _between_files(link, cursor, len(names))
        group.flush(final=True)
    finally:
        link.group = None
        link.end()


def _between_files(link: _Link, cursor: Any, past: int) -> None:
    """The files are read; what remains is our own commit: a death now blames no file (the parent reads the
    cursor past the batch, recovery finds the record idle), as none of them caused it."""
    link.stage = Stage.COMMIT
    with cursor.get_lock():
        cursor[0] = past
    link.marker.mark(inflight.IDLE)


def _group_commit(sealed: list[tuple[str, Sinks, pipeline.Stats, float]], processed: str) -> dict[str, Outcome]:
    outcomes: dict[str, Outcome] = {}
    if not sealed:
        return outcomes
    try:
        with errors.in_phase(Phase.PUBLISH):
            # Every sealed temp of the group durable before any name points at it.
            durable.sync_files([out for _, sinks, _, _ in sealed for out in sinks.temps()])
    except Exception as e:  # noqa: BLE001 - after a failed sync no temp can be trusted: all are redone
        for name, sinks, stats, _ in sealed:
            sinks.abort()
            outcomes[name] = _failure(e, stats)
        return outcomes
    changed: dict[str, list[str]] = {}  # output folder -> names published there, for the fsync below
    for name, sinks, stats, started in sealed:
        try:
            for folder in sinks.publish():
                changed.setdefault(folder, []).append(name)
        except Exception as e:  # noqa: BLE001 - publish is all or none per file
            sinks.abort()
            # A bug in publish (not an OSError, not a file_exist refusal) is retried, never blamed on the input:
            # its renames may have been made, and failed/ would then hold an input whose result is published.
            outcomes[name] = _failure(e, stats, Phase.PUBLISH)
            continue
        outcomes[name] = _done(sinks, stats, started)
    for folder, published in changed.items():
        try:
            durable.fsync_dir(folder)  # the renames durable before any input may go: once per folder per group
        except OSError as e:
            for name in published:  # published, but not durably: the input stays, the redo republishes
                outcomes[name] = Retry(errors.reason(e), e.errno)
    return outcomes


def _done(sinks: Sinks, stats: pipeline.Stats, started: float) -> Done:
    return Done(stats.bytes_in, stats.lines_in, sinks.bytes_out, dict(sinks.lines_out), time.monotonic() - started,
                tuple(sinks.superseded), sinks.fresh)


def _failure(e: BaseException, stats: pipeline.Stats, where: Phase = Phase.PROCESS) -> Outcome:
    """Rejected (the input's fault) or Retry (the machine's fault: the input is kept), by errors.classify. where:
    the phase a non-OSError came from (PROCESS: reading and routing the input; PUBLISH: our own commit)."""
    if isinstance(e, pipeline.Rejected):
        return Rejected(e.reason, e.line, stats.bytes_in, stats.lines_in)
    phase = errors.phase_of(e, Phase.READ_INPUT if isinstance(e, OSError) else where)
    reason = errors.reason(e)
    verdict = errors.classify(e, phase)
    if verdict is Verdict.REJECT:
        # The input's fault (its name cannot be published, it is too large for RLIMIT_FSIZE, a bug met on
        # this input): retrying cannot help, and would pause the whole queue.
        prefix = "cannot publish: " if phase in (Phase.WRITE_OUTPUT, Phase.PUBLISH) else ""
        if prefix and getattr(e, "errno", None) in (errno.EISDIR, errno.ENOTDIR):  # a name collision (sinks.py)
            reason += "; move that entry away (or rename the input), then `ingestd requeue` it"
        return Rejected(prefix + reason, None, stats.bytes_in, stats.lines_in)
    # RETRY (full disk, read-only folder, EIO, EMFILE...) or RECREATE (an output folder vanished: the retry's
    # Sinks recreates it): not the input's fault. After a failed fsync the temp is untrustworthy (Linux
    # forgets the error), so it is dropped and the whole file redone later.
    return Retry(reason, getattr(e, "errno", None), recreate=verdict is Verdict.RECREATE)
