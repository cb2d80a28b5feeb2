"""State: counters, pause, the published view and its rates, with injected clocks (no I/O)."""

from __future__ import annotations

from ingestd.job import Job
from ingestd.messages import Done
from ingestd.state import SERIES_EVERY, PauseKind, State


class Clock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def worker(bytes_: int, size: int, since: float | None) -> dict:
    return {"worker": 0, "file": "big.log" if since is not None else None, "since": since, "bytes": bytes_,
            "size": size, "silent_for": 0.0, "stuck": None}


def test_rates_include_files_in_progress_and_each_worker_gets_an_eta() -> None:
    mono, wall = Clock(10.0), Clock(1_000.0)
    s = State(10, mono, wall)
    s.publish([worker(0, 100_000_000, 1_000.0)], 0, None, 1, [1_000.0], None)
    mono.t, wall.t = 14.0, 1_004.0  # 4 s later the worker has read 20 MB of 100 MB, no file finished
    s.publish([worker(20_000_000, 100_000_000, 1_000.0)], 0, None, 1, [1_000.0], None)
    v = s.snapshot()
    assert v["throughput"]["files_per_second"] == 0 and v["throughput"]["bytes_per_second"] == 0
    assert v["throughput"]["read_bytes_per_second"] == 5_000_000
    w = v["workers"][0]
    assert w["rate_bytes_per_second"] == 5_000_000 and w["eta_seconds"] == 16.0


def test_the_chart_series_is_sampled_and_bounded() -> None:
    mono, wall = Clock(), Clock(5_000.0)
    s = State(10, mono, wall)
    for i in range(300):
        s.publish([], i, None, 0, [], None)
        mono.t += SERIES_EVERY
        wall.t += SERIES_EVERY
    series = s.snapshot()["series"]
    assert len(series) == 120 and series[-1]["waiting"] == 299 and series[0]["waiting"] == 180


def test_recent_is_ordered_by_a_sequence_not_the_wall_clock() -> None:
    mono, wall = Clock(), Clock(2_000_000_000.0)  # an hour fast, then stepped back
    s = State(10, mono, wall)
    s.processed(Job("a", 1, 0.0), Done(1, 1, 1), 0.1)
    wall.t -= 3600
    s.failed("b", "bad", 0.1)
    recent = list(s.recent)
    assert [r["file"] for r in recent] == ["b", "a"] and recent[0]["seq"] > recent[1]["seq"]


def test_a_success_lifts_an_io_error_pause_but_not_a_low_disk_one() -> None:
    mono, wall = Clock(), Clock()
    s = State(10, mono, wall)
    s.pause_for(PauseKind.LOW_DISK, "low disk space: 1 bytes free", 101.0)
    s.processed(Job("a", 1, 0.0), Done(1, 1, 1), 0.1)
    assert s.pause is not None and s.pause.kind is PauseKind.LOW_DISK
    s.unpause()
    assert s.back_off("EIO") == 1.0 and s.back_off("EIO") == 2.0
    s.processed(Job("b", 1, 0.0), Done(1, 1, 1), 0.1)
    assert s.pause is None and s.backoff == 1.0
