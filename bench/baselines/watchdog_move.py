#!/usr/bin/env python3
"""Baseline: the event-driven script users write on the `watchdog` library (no fsync).

    watchdog_move.py WATCH_DIR

Watches WATCH_DIR/unprocessed with watchdog's Observer (inotify on Linux). A file is taken when it is
closed after writing (FileClosedEvent: the right event for files written in place; on_created would read
them half-written) or moved in; also any file already there at start. Taking a file: shutil.move it to
underprocess/, uppercase it line by line into processed/NAME, remove it. Runs until killed.
Needs `pip install watchdog` (the `bench` extra: `pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import threading

from watchdog.events import (
    DirMovedEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer


class Mover(FileSystemEventHandler):
    def __init__(self, watch_dir: str) -> None:
        self.src, self.work, self.dst = (os.path.join(watch_dir, d) for d in ("unprocessed", "underprocess",
                                                                              "processed"))
        for d in (self.src, self.work, self.dst):
            os.makedirs(d, exist_ok=True)

    def take(self, path: str) -> None:
        name = os.path.basename(path)
        if name.startswith(".") or os.path.dirname(path) != self.src:
            return
        taken = os.path.join(self.work, name)
        try:
            shutil.move(path, taken)
        except FileNotFoundError:  # taken already (a second event for the same file)
            return
        with open(taken, encoding="utf-8") as f, open(os.path.join(self.dst, name), "w", encoding="utf-8") as out:
            out.writelines(line.upper() for line in f)
        os.remove(taken)

    def on_closed(self, event: FileClosedEvent) -> None:
        if not event.is_directory:
            self.take(os.fsdecode(event.src_path))

    def on_moved(self, event: DirMovedEvent | FileMovedEvent) -> None:
        if not event.is_directory:
            self.take(os.fsdecode(event.dest_path))

    def on_any_event(self, event: FileSystemEvent) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("watch_dir")
    a = ap.parse_args()
    mover = Mover(a.watch_dir)
    observer = Observer()
    observer.schedule(mover, mover.src, recursive=False)
    observer.start()
    for name in sorted(os.listdir(mover.src)):
        mover.take(os.path.join(mover.src, name))
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
