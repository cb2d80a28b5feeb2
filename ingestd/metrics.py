"""Prometheus metrics on a registry of our own: counters and histograms fed by the daemon,
folder counts and per-worker / recent-completion series computed at scrape time (bounded series)."""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, Info, PlatformCollector, ProcessCollector,
                               disable_created_metrics)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ingestd import __version__

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class Metrics:
    def __init__(self, snapshot: Callable[[], dict[str, Any]], file_names: bool = True) -> None:
        """file_names: False drops the `file` label (setting metrics_file_names): no series per file at all."""
        disable_created_metrics()  # *_created series double the output and no dashboard reads them
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        Info("ingestd_build", "Version of ingestd and of Python", registry=r).info(
            {"version": __version__, "python": platform.python_version()})
        self.files = Counter("ingestd_files", "Files finished, by result (processed, failed, recovered)",
                             ["result"], registry=r)
        for result in ("processed", "failed", "recovered"):
            self.files.labels(result)
        self.bytes_in = Counter("ingestd_input_bytes", "Bytes read from input files", registry=r)
        self.bytes_out = Counter("ingestd_output_bytes", "Bytes written to published outputs", registry=r)
        self.lines_in = Counter("ingestd_input_lines", "Lines read from input files", registry=r)
        self.lines_out = Counter("ingestd_output_lines", "Records written to outputs", registry=r)
        self.records = Counter("ingestd_output_records", "Records per output folder ('processed' is processed/ itself)",
                               ["output"], registry=r)
        self.superseded = Counter("ingestd_results_superseded", "Earlier results of the same name set aside "
                                  "(action kept) or replaced (file_exist = replace), per output folder",
                                  ["output", "action"], registry=r)
        self.overflows = Counter("ingestd_inotify_overflows", "inotify queue overflows (each triggers a rescan)",
                                 registry=r)
        self.rescans = Counter("ingestd_rescans", "Full rescans of unprocessed/, by reason", ["reason"], registry=r)
        for reason in ("startup", "overflow", "periodic"):
            self.rescans.labels(reason)
        self.errors = Counter("ingestd_io_errors", "Environmental errors (disk full, EIO, EROFS): the file is kept and retried",
                              registry=r)
        self.workers_lost = Counter("ingestd_workers_lost", "Worker processes lost: died by themselves, or killed by the "
                                    "daemon as stuck (no progress for stall_time) or over time_limit", ["reason"],
                                    registry=r)
        for reason in ("died", "stalled", "time_limit"):
            self.workers_lost.labels(reason)
        self.restarts_recovered = Counter("ingestd_restarts_recovered",
                                          "Start-ups that found files left in underprocess/ by a crash", registry=r)
        self.duration = Histogram("ingestd_processing_duration_seconds", "Time to process one file (claim to commit)",
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.pickup = Histogram("ingestd_pickup_latency_seconds", "From the file becoming complete to its claim",
                                buckets=LATENCY_BUCKETS, registry=r)
        self.wait = Histogram("ingestd_queue_wait_seconds", "Time files spent in unprocessed/ (arrival to claim)",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.last_success = Gauge("ingestd_last_success_timestamp_seconds", "When a file was last processed",
                                  registry=r)
        self.paused = Gauge("ingestd_claiming_paused", "1 while claiming is paused (low disk space, I/O errors)",
                            registry=r)
        self.folders_left = Gauge("ingestd_unprocessed_folders", "Folders in unprocessed/ left as they are (recursive "
                                  "is off: only files are processed)", registry=r)
        r.register(_Live(snapshot, file_names))


def folder_series(counts: dict[str, int], oldest: dict[str, float]) -> Iterator[Metric]:
    """ingestd_folder_files{folder} and ingestd_folder_oldest_file_age_seconds{folder} (seconds, by mtime): the
    daemon's, and a cluster scanner's (distributed/scanner.py) under the same names."""
    files = GaugeMetricFamily("ingestd_folder_files", "Files in each folder of the queue", labels=["folder"])
    for folder, n in counts.items():
        files.add_metric([folder], n)
    yield files
    ages = GaugeMetricFamily("ingestd_folder_oldest_file_age_seconds",
                             "Age of the oldest file waiting in unprocessed/ or in progress in underprocess/",
                             labels=["folder"])
    for folder, age in oldest.items():
        ages.add_metric([folder], age)
    yield ages


class _Live(Collector):
    """Scrape-time series from the daemon's snapshot: folders, workers, recent completions.

    Series churn is bounded (issue 9): a worker's file is one series per assignment ({worker, file}); a
    recent completion is one series for as long as it is recent ({file, result, reason}, its finish time),
    never a slot number that every completion would shift. Without file names, the recent series are keyed
    by result only: the newest finish time of each."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], file_names: bool = True) -> None:
        self.snapshot, self.file_names = snapshot, file_names

    def describe(self) -> list[Metric]:
        return []  # computed live; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot()
        yield from folder_series(s["counts"], s["oldest"])
        workers = s["workers"]
        yield GaugeMetricFamily("ingestd_workers", "Worker processes", value=len(workers))
        yield GaugeMetricFamily("ingestd_workers_busy", "Workers processing a file",
                                value=sum(1 for w in workers if w["file"] is not None))
        info = GaugeMetricFamily("ingestd_worker_file_info", "The file each busy worker is on (1 series per busy worker)",
                                 labels=["worker", "file"] if self.file_names else ["worker"])
        started = GaugeMetricFamily("ingestd_worker_file_started_timestamp_seconds", "When the busy worker started its file",
                                    labels=["worker"])
        done = GaugeMetricFamily("ingestd_worker_file_read_bytes", "Bytes of its file the busy worker has read",
                                 labels=["worker"])
        size = GaugeMetricFamily("ingestd_worker_file_size_bytes", "Size of the busy worker's file", labels=["worker"])
        for w in workers:
            if w["file"] is not None:
                wid = str(w["worker"])
                info.add_metric([wid, w["file"]] if self.file_names else [wid], 1)
                started.add_metric([wid], w["since"])
                done.add_metric([wid], w["bytes"])
                size.add_metric([wid], w["size"])
        yield from (info, started, done, size)
        keys = ["file", "result", "reason"] if self.file_names else ["result"]
        recent = GaugeMetricFamily("ingestd_recent_file_finished_timestamp_seconds",
                                   "When each recent completion finished (one series per completion while it is "
                                   "among the last `recent`)" if self.file_names else
                                   "When the newest completion of each result finished", labels=keys)
        shown: set[tuple[str, ...]] = set()
        for c in s["recent"]:  # newest first: a name finished twice with one result shows its newest time
            labels = tuple(str(c.get(k) or "") for k in keys)
            if labels not in shown:
                shown.add(labels)
                recent.add_metric(list(labels), c["finished_at"])
        yield recent
