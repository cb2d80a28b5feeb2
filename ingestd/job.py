"""A claimed file in flight: one record that carries its own data from claim to commit (as rq's Job does)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Job:
    name: str  # its name in underprocess/
    size: int  # bytes, at claim
    claimed_at: float  # wall clock, seconds since the epoch
    complete_at: float | None = None  # monotonic: when it became complete in unprocessed/ (pickup latency)
    attempts: int = 0  # crashes or kills it was in progress for (durable in the spool; in memory if that failed)
    retries: int = 0  # environmental errors and internal errors in this run (backoff grows with them)
    not_before: float = 0.0  # monotonic: not handed out again before this (backoff)
    recovered: bool = False  # found in underprocess/ at start-up
    # While a worker holds it:
    worker: int | None = None  # the last worker it was handed to
    started: float = 0.0  # monotonic
    started_wall: float = 0.0
    bytes: int = 0  # input bytes read so far (heartbeats)
    lines: int = 0

    def begin(self, worker: int, now: float, wall: float) -> None:
        self.worker, self.started, self.started_wall = worker, now, wall
        self.bytes = self.lines = 0
