"""Series churn, measured: a real daemon, a file dropped at a time, a scrape after each completion, and every
distinct series counted with prometheus_client's own text parser (issue 9: 40 files made 376 new series, about
9 a file, as `ingestd_recent_file_info{slot,file}` relabelled every slot at each completion)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from support import DaemonProcess, folder, wait_for

FILES = 40
RECENT = 10  # the default: every slot full after 10 files, and each completion used to shift them all

Series = tuple[str, tuple[tuple[str, str], ...]]


def series(text: str) -> set[Series]:
    """Every series of a scrape (process_* and python_* included), as (name, sorted labels)."""
    return {(s.name, tuple(sorted(s.labels.items())))
            for family in text_string_to_metric_families(text) for s in family.samples}


def drop_and_scrape(watch_dir: Path, env: dict[str, str]) -> list[set[Series]]:
    """One scrape after start-up, then one after each of FILES files, dropped one at a time, is processed."""
    d = DaemonProcess(watch_dir, "--workers", "2", env={"INGESTD_SETTLE_TIME": "0", **env}).started()
    try:
        scrapes = [series(d.get("/metrics")[1].decode())]
        for i in range(FILES):
            name = f"file-{i:02d}.txt"
            tmp = watch_dir / "unprocessed" / f".{name}.tmp"
            tmp.write_bytes(b"a line\n" * 10)
            os.rename(tmp, tmp.with_name(name))  # the safe producer pattern: complete before it is visible
            wait_for(lambda n=name: n in folder(watch_dir, "processed"), 15, what=name)
            scrapes.append(series(d.get("/metrics")[1].decode()))
        # Each file was assigned to a worker once: no retry, no failure.
        wait_for(lambda: d.count("processed") == FILES, what="every file announced")  # logged after its commit
        assert d.count("processed") == FILES and not d.event("failed")
        return scrapes
    finally:
        d.stop()


# Series with fixed labels that first appear when something first happens, once per worker ({worker}) or per
# daemon (an output's first record, the oldest-file age of a folder): bounded, whatever the number of files.
ONCE = {"ingestd_worker_file_started_timestamp_seconds", "ingestd_worker_file_read_bytes",
        "ingestd_worker_file_size_bytes", "ingestd_output_records_total", "ingestd_folder_oldest_file_age_seconds"}


def new_sets(scrapes: list[set[Series]]) -> list[set[Series]]:
    """The series never seen before that each scrape after the first brought."""
    seen = set(scrapes[0])
    out = []
    for scrape in scrapes[1:]:
        out.append(scrape - seen)
        seen |= scrape
    return out


def new_series(scrapes: list[set[Series]]) -> list[int]:
    return [len(new) for new in new_sets(scrapes)]


def test_at_most_one_new_series_per_completed_file_and_per_assignment(tmp_path: Path) -> None:
    scrapes = drop_and_scrape(tmp_path / "w", {})
    per_file = new_series(scrapes)
    # The bound asked for: one series per completion (its recent entry) and one per worker assignment (the
    # worker's current file), FILES of each. Series that exist from the start (buckets, folders) are in the
    # first scrape; a worker's progress gauges ({worker} only) may appear once per worker (2).
    assert sum(per_file) <= 2 * FILES + 2 * 4, per_file
    # No scrape relabels the recent slots: once they are full, a file brings at most its 2 (its completion, and
    # its assignment if a scrape caught it in progress), besides the once-only series.
    per_file_own = [len({x for x in new if x[0] not in ONCE}) for new in new_sets(scrapes)]
    assert max(per_file_own[RECENT:]) <= 2, per_file_own
    # The design card's series are kept: recent completions by file name, and the result of each.
    recent = [dict(labels) for scrape in scrapes for (name, labels) in scrape
              if name == "ingestd_recent_file_finished_timestamp_seconds"]
    assert {r["file"] for r in recent} == {f"file-{i:02d}.txt" for i in range(FILES)}
    assert {r["result"] for r in recent} == {"processed"}
    assert sum(1 for name, _ in scrapes[-1] if name == "ingestd_recent_file_finished_timestamp_seconds") == RECENT


def test_file_name_labels_off_makes_no_series_per_file(tmp_path: Path) -> None:
    """metrics_file_names = false (high-volume sites): no file label anywhere, and no new series after the
    first files however many follow."""
    scrapes = drop_and_scrape(tmp_path / "w", {"INGESTD_METRICS_FILE_NAMES": "false"})
    assert not [s for scrape in scrapes for s in scrape if "file" in dict(s[1])]
    # Only fixed label sets appear: a worker's ({worker} on its file info too), a result's, the once-only ones;
    # their number is bounded by the workers (2), whatever the number of files.
    new = set().union(*new_sets(scrapes))
    assert {name for name, _ in new} <= ONCE | {"ingestd_worker_file_info",
                                               "ingestd_recent_file_finished_timestamp_seconds"}, new
    assert len(new) <= 2 * 4 + 3 + 2, sorted(new)


def test_scrapes_while_workers_are_busy_add_one_series_per_assignment(tmp_path: Path) -> None:
    """Scraped every 50 ms while two workers go through 12 slow files (the test plug-in `slow`: 2 ms a line),
    so the workers' current files are seen: each assignment adds its one ingestd_worker_file_info series."""
    watch, n = tmp_path / "w", 12
    d = DaemonProcess(watch, "--workers", "2", "--mode", "slow", env={"INGESTD_SETTLE_TIME": "0"}).started()
    try:
        scrapes = [series(d.get("/metrics")[1].decode())]
        for i in range(n):
            (watch / "unprocessed" / f".s{i:02d}.tmp").write_bytes(b"a line\n" * 100)
        for i in range(n):
            os.rename(watch / "unprocessed" / f".s{i:02d}.tmp", watch / "unprocessed" / f"s{i:02d}.txt")
        while len(folder(watch, "processed")) < n:
            scrapes.append(series(d.get("/metrics")[1].decode()))
            time.sleep(0.05)
            assert d.proc.poll() is None
        scrapes.append(series(d.get("/metrics")[1].decode()))
    finally:
        d.stop()
    busy = {labels for scrape in scrapes for (name, labels) in scrape if name == "ingestd_worker_file_info"}
    assert len(busy) >= n // 2, busy  # the scrapes did see the workers' files (about 0.2 s each)
    assert len({dict(labels)["file"] for labels in busy}) == len(busy)  # one series per assignment, no relabel
    # Per file: its assignment and its completion; once per worker: its three progress gauges ({worker}); once
    # per daemon: the first record counted for an output, the oldest-file ages of the two folders.
    assert sum(new_series(scrapes)) <= 2 * n + 3 * 2 + 3, new_series(scrapes)
