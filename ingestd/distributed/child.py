"""A node's child process: one file at a time through the engine into sealed, durable temps. It renames nothing:
only the holder of the claim's lease publishes (DISTRIBUTED.md §3, step 6). A file that crashes the child costs
that file an attempt, never the node."""

from __future__ import annotations

import faulthandler
import signal
import time
from multiprocessing.connection import Connection
from typing import Any

from ingestd import pipeline, routing
from ingestd.distributed import crash_point
from ingestd.errors import Phase
from ingestd.sinks import Sinks
from ingestd.lifeline import die_with_parent
from ingestd.worker import _failure

Sealed = tuple[dict[str, tuple[str, int, bytes]], int, int, int, float, bytes | None]  # see main


def main(conn: Connection, routing_doc: dict[str, Any], max_line_bytes: int, processed: str, file_exist: str) -> None:
    """Receives (path, name, tag, claim); answers ("sealed", (sealed temps, bytes_out, bytes_in, lines_in, seconds, claim))
    or ("outcome", messages.Rejected | messages.Retry). EOF on conn ends it."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # the node decides its warm stop; a child never dies mid-file for it
    die_with_parent()
    faulthandler.enable()
    table = routing.build(routing_doc)
    folders = sorted({out.path for out in table.outputs})
    while True:
        try:
            path, name, tag, claim = conn.recv()
        except (EOFError, OSError):
            return
        crash_point("child")  # test hook: a file that kills its child every time (poison)
        sinks = Sinks(processed, name, folders, file_exist, claim, tag)
        stats, started, phase = pipeline.Stats(), time.monotonic(), Phase.PROCESS
        try:
            with pipeline.open_input(path) as f:
                pipeline.run(f, name, table, max_line_bytes, sinks.write, stats)
            phase = Phase.PUBLISH
            sinks.seal(sync=True)  # each temp fsynced: durable before the lease holder may give it its name
        except Exception as e:  # noqa: BLE001 - errors.classify decides (via worker._failure); the child lives on
            sinks.abort()
            conn.send(("outcome", _failure(e, stats, phase)))
            continue
        conn.send(("sealed", (sinks.sealed(), sinks.bytes_out, stats.bytes_in, stats.lines_in,
                              time.monotonic() - started, claim)))

