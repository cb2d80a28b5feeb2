"""The daemon's counters, recent completions, pause and published status view, apart from the loop
(as uvicorn keeps ServerState apart from Server). Metrics are fed here; the HTTP thread only reads `snapshot()`."""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ingestd.job import Job
from ingestd.log import event
from ingestd.messages import Done
from ingestd.metrics import Metrics
from ingestd.names import display

MAX_BACKOFF = 30.0  # seconds: the longest claiming pauses after repeated environmental errors
THROUGHPUT_WINDOW = 60.0  # seconds
DEFAULT_OUTPUT = "processed"  # the output label of processed/ itself (routing outputs: their folder's path)
READ_WINDOW = 10.0  # seconds: the read rate shown includes files still in progress
SERIES_EVERY = 5.0  # seconds between samples of the page's chart
SERIES_KEEP = 120  # samples: 10 minutes


class PauseKind(StrEnum):
    LOW_DISK = "low disk"  # lifted by the free-space check itself
    IO_ERROR = "I/O error"  # lifted after a backoff, or by the next success


@dataclass(frozen=True, slots=True)
class Pause:
    kind: PauseKind
    text: str  # for people: the log, STATUS=, /api/status "paused"
    until: float  # monotonic


class State:
    def __init__(self, recent: int, clock: Callable[[], float], wall: Callable[[], float],
                 file_names: bool = True) -> None:
        self.clock, self.wall = clock, wall
        self.metrics = Metrics(self.snapshot, file_names)
        self.phase = "starting"  # starting | running | reloading | stopping
        self.started_at = wall()
        self.totals = dict.fromkeys(("processed", "failed", "recovered", "bytes_in", "bytes_out"), 0)
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=recent)
        self.seq = 0  # orders completions: a sequence, not the wall clock, which can step back
        self.done_times: collections.deque[tuple[float, int]] = collections.deque()  # (monotonic, bytes)
        # A running sum: summing the window each turn was quadratic under a burst (tests/torture/test_arrivals.py).
        self.done_bytes = 0
        # Folder counts for scrapes from our own bookkeeping (listing 100,000 entries per scrape took ~100 ms);
        # processed/ and failed/ are re-counted from disk at every rescan, as others may change them.
        self.kept = {"processed": 0, "failed": 0}
        self.pause: Pause | None = None
        self.backoff = 1.0
        self._view: dict[str, Any] = {"workers": [], "recent": [], "oldest": {}, "counts": {}}
        self.history_dirty = False  # recent changed since it was last saved
        self.read_samples: collections.deque[tuple[float, int]] = collections.deque()  # (monotonic, bytes read)
        self.series: collections.deque[dict[str, float]] = collections.deque(maxlen=SERIES_KEEP)
        self.next_sample = 0.0

    def restore(self, saved: list[dict[str, Any]]) -> None:
        """Recent completions from before a restart, newest first; the sequence goes on from theirs."""
        self.recent.extend(saved[: self.recent.maxlen])
        self.seq = max((r["seq"] for r in saved), default=0)

    # --- results ------------------------------------------------------------------------------
    def processed(self, job: Job, done: Done, elapsed: float) -> None:
        self.processed_many([(job, done, elapsed)])

    def processed_many(self, items: list[tuple[Job, Done, float]]) -> None:
        """Files committed in one turn, as (job, outcome, seconds in the worker). Per file what must be per file
        (the histogram, the recent list, superseded results); the counters once for the turn: a metric update
        takes a lock, and ten of them per file were a tenth of the parent's time under load."""
        m = self.metrics
        wall, now = self.wall(), self.clock()
        bytes_in = bytes_out = lines_in = 0
        lines_out: dict[str, int] = {}
        for job, done, elapsed in items:
            bytes_in += done.bytes_in
            bytes_out += done.bytes_out
            lines_in += done.lines_in
            for out, n in done.lines_out.items():
                lines_out[out] = lines_out.get(out, 0) + n
            for sup in done.superseded:  # file_exist: after the durable commit, as the processed line
                m.superseded.labels(sup.folder or DEFAULT_OUTPUT, sup.action).inc()
                event("result_superseded", f"an earlier result of the same name was {sup.action}"
                      + (" aside" if sup.aside else ""), logging.WARNING if sup.action == "replaced" else logging.INFO,
                      file=display(job.name), output=sup.folder or DEFAULT_OUTPUT,
                      action=sup.action, kept_as=display(sup.aside) if sup.aside else None)
                if sup.aside and not sup.folder:
                    self.kept["processed"] += 1  # the earlier result stays, under its new name
            m.duration.observe(elapsed)
            self.done_times.append((now, done.bytes_in))
            if done.fresh:  # a new result, not a replacement of an earlier same-named one
                self.kept["processed"] += 1
            self._remember(job.name, "processed", elapsed, None, job.recovered, wall)
        if not items:
            return
        m.files.labels("processed").inc(len(items))
        m.bytes_in.inc(bytes_in)
        m.bytes_out.inc(bytes_out)
        m.lines_in.inc(lines_in)
        for out, n in lines_out.items():
            m.lines_out.inc(n)
            m.records.labels(out or DEFAULT_OUTPUT).inc(n)  # "" would read as no label in PromQL
        m.last_success.set(wall)
        self.totals["processed"] += len(items)
        self.totals["bytes_in"] += bytes_in
        self.totals["bytes_out"] += bytes_out
        self.done_bytes += bytes_in
        if self.pause is not None and self.pause.kind is PauseKind.IO_ERROR:
            self.unpause()  # the machine works again
        self.backoff = 1.0

    def failed(self, name: str, reason: str, elapsed: float, recovered: bool = False) -> None:
        self.metrics.files.labels("failed").inc()
        self.kept["failed"] += 1
        self.totals["failed"] += 1
        self._remember(name, "failed", elapsed, reason, recovered)

    def recovered(self) -> None:
        self.metrics.files.labels("recovered").inc()
        self.totals["recovered"] += 1

    def _remember(self, name: str, result: str, duration: float, reason: str | None, recovered: bool,
                  wall: float | None = None) -> None:
        self.seq += 1
        self.history_dirty = True
        self.recent.appendleft({"seq": self.seq, "file": display(name), "result": result,
                                "duration": round(duration, 6), "finished_at": wall or self.wall(), "reason": reason,
                                "recovered": recovered})

    # --- pausing ---------------------------------------------------------------------------------
    def pause_for(self, kind: PauseKind, text: str, until: float) -> None:
        # Once per episode and kind: a low-disk reason names the free bytes, which change at every check.
        if self.pause is None or self.pause.kind is not kind or (kind is PauseKind.IO_ERROR and self.pause.text != text):
            event("paused", "claiming paused", logging.WARNING, reason=text)
        self.pause = Pause(kind, text, until)
        self.metrics.paused.set(1)

    def back_off(self, reason: str) -> float:
        """An environmental error: pause claiming for a while that doubles (to MAX_BACKOFF); returns it."""
        wait = self.backoff
        self.metrics.errors.inc()
        self.pause_for(PauseKind.IO_ERROR, f"I/O error: {reason}", self.clock() + wait)
        self.backoff = min(MAX_BACKOFF, self.backoff * 2)
        return wait

    def unpause(self) -> None:
        if self.pause is not None:
            event("resumed", "claiming resumed", previous=self.pause.text)
        self.pause = None
        self.metrics.paused.set(0)

    def paused(self, now: float) -> bool:
        return self.pause is not None and now < self.pause.until

    # --- the view ----------------------------------------------------------------------------------
    def publish(self, workers: list[dict[str, Any]], waiting: int, oldest_seen: float | None, in_flight: int,
                started: list[float], health: str | None) -> None:
        """A fresh read-only snapshot for the HTTP thread (it never touches the live structures).

        workers: Pool.view() rows; each gets its read rate (bytes/s) and an ETA (s) here."""
        now, wall = self.clock(), self.wall()
        while self.done_times and now - self.done_times[0][0] > THROUGHPUT_WINDOW:
            self.done_bytes -= self.done_times.popleft()[1]
        for w in workers:
            elapsed = max(1e-3, wall - w["since"]) if w["since"] is not None else 0.0
            rate = w["bytes"] / elapsed if elapsed else 0.0
            w["rate_bytes_per_second"] = round(rate, 1)
            w["eta_seconds"] = round((w["size"] - w["bytes"]) / rate, 1) if rate > 0 and w["size"] >= w["bytes"] else None
        # Bytes read, finished files and files in progress alike: two busy workers on big files show their pace.
        read = self.totals["bytes_in"] + sum(w["bytes"] for w in workers)
        self.read_samples.append((now, read))
        while len(self.read_samples) > 2 and now - self.read_samples[0][0] > READ_WINDOW:
            self.read_samples.popleft()
        t0, r0 = self.read_samples[0]
        read_rate = max(0.0, (read - r0) / (now - t0)) if now > t0 else 0.0
        files_rate = len(self.done_times) / THROUGHPUT_WINDOW
        if now >= self.next_sample:
            self.next_sample = now + SERIES_EVERY
            self.series.append({"t": round(wall, 3), "read_bytes_per_second": round(read_rate, 1),
                                "files_per_second": round(files_rate, 3), "waiting": waiting,
                                "in_progress": in_flight})
        self._view = {
            "workers": workers,
            "recent": list(self.recent),
            "oldest": {"unprocessed": max(0.0, now - oldest_seen) if oldest_seen is not None else 0.0,
                       "underprocess": max(0.0, wall - min(started)) if started else 0.0},
            "throughput": {"files_per_second": round(files_rate, 3),
                           "bytes_per_second": round(self.done_bytes / THROUGHPUT_WINDOW, 1),
                           "read_bytes_per_second": round(read_rate, 1)},
            "series": list(self.series),
            "counts": {"unprocessed": waiting, "underprocess": in_flight, **self.kept},
            "totals": dict(self.totals),
            "state": self.phase,
            "paused": self.pause.text if self.pause else None,
            "health": {"ok": health is None, "problem": health},
        }

    def snapshot(self) -> dict[str, Any]:
        return self._view

    def status_line(self) -> str:
        """One short line for systemd's STATUS=."""
        v = self._view
        busy = [w for w in v["workers"] if w["file"] is not None]
        current = ", ".join(f"{w['file']} {_pct(w)}".rstrip() for w in busy[:2]) or "idle"
        return (f"{self.phase}; waiting {v['counts'].get('unprocessed', 0)}; {current}; "
                f"done {self.totals['processed']}, failed {self.totals['failed']}"
                + (f"; PAUSED: {self.pause.text}" if self.pause else ""))


def _pct(w: dict[str, Any]) -> str:
    return f"{100 * w['bytes'] // w['size']}%" if w["size"] else ""
