"""Series churn, measured: a real daemon, a file dropped at a time, a scrape after each completion, and every
distinct series counted with prometheus_client's own text parser (issue 9: 40 files made 376 new series, about
9 a file, as `ingestd_recent_file_info{slot,file}` relabelled every slot at each completion)."""

from __future__ import annotations

import os
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
        assert d.count("processed") == FILES and not d.event("failed")
        return scrapes
    finally:
        d.stop()


def new_series(scrapes: list[set[Series]]) -> list[int]:
    """How many series never seen before each scrape after the first brought."""
    seen = set(scrapes[0])
    out = []
    for scrape in scrapes[1:]:
        out.append(len(scrape - seen))
        seen |= scrape
    return out


def test_at_most_one_new_series_per_completed_file_and_per_assignment(tmp_path: Path) -> None:
    scrapes = drop_and_scrape(tmp_path / "w", {})
    per_file = new_series(scrapes)
    # The bound asked for: one series per completion (its recent entry) and one per worker assignment (the
    # worker's current file), FILES of each. Series that exist from the start (buckets, folders) are in the
    # first scrape; a worker's progress gauges ({worker} only) may appear once per worker (2).
    assert sum(per_file) <= 2 * FILES + 2 * 4, per_file
    # No scrape relabels the recent slots: once they are full, a file brings at most its 2.
    assert max(per_file[RECENT:]) <= 2, per_file
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
    per_file = new_series(scrapes)
    assert sum(per_file[5:]) == 0, per_file  # the first few bring the result and worker series, once
    assert sum(per_file) <= 8, per_file
