#!/usr/bin/env python3
"""Baseline: the folder-polling script users write instead of a daemon (no fsync, no completeness check).

    poll_move.py WATCH_DIR [--period 1.0]

Every PERIOD seconds: list WATCH_DIR/unprocessed, and for each file shutil.move it to underprocess/,
uppercase it line by line into processed/NAME, and remove it. Runs until killed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("watch_dir")
    ap.add_argument("--period", type=float, default=1.0)
    a = ap.parse_args()
    src, work, dst = (os.path.join(a.watch_dir, d) for d in ("unprocessed", "underprocess", "processed"))
    for d in (src, work, dst):
        os.makedirs(d, exist_ok=True)
    while True:
        for name in sorted(os.listdir(src)):
            if name.startswith("."):
                continue
            taken = os.path.join(work, name)
            shutil.move(os.path.join(src, name), taken)
            with open(taken, encoding="utf-8") as f, open(os.path.join(dst, name), "w", encoding="utf-8") as out:
                out.writelines(line.upper() for line in f)
            os.remove(taken)
        time.sleep(a.period)


if __name__ == "__main__":
    main()
