"""The one-shot commands: process (one file through the engine), status, requeue."""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from typing import Any, BinaryIO

from tqdm import tqdm

from ingestd import pipeline
from ingestd.engine import Step
from ingestd.names import display
from ingestd.settings import ConfigError, Settings
from ingestd.sinks import Sinks
from ingestd.spool import FOLDERS, Spool

EX_DATAERR, EX_NOINPUT, EX_CANTCREAT = 65, 66, 73
PROGRESS_MIN_BYTES = 8 << 20  # below this a progress bar is just noise


def process(settings: Settings, input_path: str, output_path: str, explain: bool) -> int:
    """One input through the same engine as the daemon. A file output is published atomically;
    records routed to another output go to that folder beside it, as they would under processed/."""
    table = settings.routing
    folders = sorted({o.path for o in table.outputs})
    try:
        src: BinaryIO = sys.stdin.buffer if input_path == "-" else open(input_path, "rb")  # noqa: SIM115
    except OSError as e:
        print(f"ingestd: cannot read {input_path}: {e.strerror}", file=sys.stderr)
        return EX_NOINPUT
    name = "-" if input_path == "-" else os.path.basename(input_path)
    stats = pipeline.Stats()
    size = os.fstat(src.fileno()).st_size if input_path != "-" else 0
    bar = tqdm(total=size, unit="B", unit_scale=True, file=sys.stderr, desc=name, leave=False) \
        if size >= PROGRESS_MIN_BYTES and sys.stderr.isatty() else None
    progress = (lambda done: bar.update(done - bar.n)) if bar else (lambda done: None)
    sinks = None
    if output_path != "-":
        base = os.path.dirname(os.path.abspath(output_path))
        try:
            for folder in folders:
                os.makedirs(os.path.join(base, folder), exist_ok=True)  # routed outputs beside the main one
        except OSError as e:
            print(f"ingestd: cannot write {output_path}: {e.strerror}", file=sys.stderr)
            return EX_CANTCREAT
        sinks = Sinks(base, os.path.basename(output_path), folders)
    default = "" if "" in folders else folders[0]
    out = sys.stdout.buffer
    dropped = 0

    def write(folder: str, data: bytes) -> None:
        nonlocal dropped
        if sinks is not None:
            sinks.write(folder, data)
        elif folder == default:
            out.write(data)
        else:
            dropped += 1

    n = 0

    def show(step: Step) -> None:
        nonlocal n
        n += 1
        dest = "dropped" if step.output is None else ("processed/" + step.output).rstrip("/") + "/"
        print(f"line {n}: tag={step.tag} filters=[{', '.join(step.applied)}] -> {dest}", file=sys.stderr)

    try:
        with src:
            pipeline.run(src, name, table, settings.max_line_bytes, write, stats, progress, show if explain else None)
        if sinks is not None:
            sinks.commit()
        else:
            out.flush()
    except pipeline.Rejected as e:
        if sinks is not None:
            sinks.abort()
        where = f" (line {e.line})" if e.line else ""
        print(f"ingestd: {input_path}: {e.reason}{where}", file=sys.stderr)
        return EX_DATAERR
    except OSError as e:
        if sinks is not None:
            sinks.abort()
        print(f"ingestd: cannot write {output_path}: {e.strerror}", file=sys.stderr)
        return EX_CANTCREAT
    finally:
        if bar:
            bar.close()
    if dropped:
        print(f"ingestd: {dropped} records routed to other outputs were not written to stdout", file=sys.stderr)
    return 0


def status(settings: Settings, as_json: bool) -> int:
    spool = _existing(settings)
    report: dict[str, Any] = {
        "watch_dir": str(spool.root.resolve()),
        "daemon": spool.holder(),
        "counts": spool.counts(),
        "in_progress": [display(n) for n in sorted(Spool.entries(spool.underprocess))],
        "recent": spool.completions(settings.recent),
        "failures": spool.failures(settings.recent),
    }
    if as_json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"watch dir   {report['watch_dir']}")
    print(f"daemon      {'running (' + report['daemon'] + ')' if report['daemon'] else 'not running'}")
    print("folders     " + "  ".join(f"{f} {report['counts'][f]}" for f in FOLDERS))
    print("in progress " + (", ".join(report["in_progress"]) or "none"))
    print("recent completions:" if report["recent"] else "recent completions: none")
    for c in report["recent"]:
        print(f"  {_when(c['finished_at_unix'])}  {c['name']}")
    print("recent failures:" if report["failures"] else "recent failures: none")
    for f in report["failures"]:
        line = f" (line {f['line']})" if f.get("line") else ""
        print(f"  {_when(f.get('failed_at_unix', 0))}  {f['name']}: {f['reason']}{line}, attempts {f.get('attempts', '?')}")
    return 0


def requeue(settings: Settings, names: list[str]) -> int:
    spool = _existing(settings)
    missing = [n for n in names if not os.path.lexists(os.path.join(spool.failed, n))]
    for n in missing:
        print(f"ingestd: not in failed/: {display(n)}", file=sys.stderr)
    moved, refused = spool.requeue([n for n in names if n not in missing] if names else None)
    for n in moved:
        print(f"requeued {display(n)}")
    for n in refused:
        print(f"ingestd: not requeued (a file of that name is waiting in unprocessed/): {display(n)}", file=sys.stderr)
    return 1 if missing or refused else 0


def _existing(settings: Settings) -> Spool:
    spool = Spool(settings.watch_dir)
    if not all(os.path.isdir(getattr(spool, f)) for f in FOLDERS):
        raise ConfigError(f"watch_dir: {settings.watch_dir} is not an ingestd watch dir (no {'/'.join(FOLDERS)})")
    return spool


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "?"

