#!/usr/bin/env python3
"""Baseline: the daemon's durable work per file, and nothing else, in a bare Python loop.

    durable_loop.py IN_DIR OUT_DIR [--procs N] [--seconds S]

Per file of IN_DIR (sorted; shared out round-robin between N forked processes): read it, uppercase it,
write a temp file in OUT_DIR, fsync it, rename it into place, fsync OUT_DIR, unlink the input.
Stops after S seconds (time-boxed: a loaded disk can be slow). Prints one JSON line:
{"files": done, "seconds": elapsed}, timed from before the first fork to the last child's exit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def durable_loop(in_dir: str, out_dir: str, names: list[str], deadline: float) -> None:
    for name in names:
        if time.monotonic() >= deadline:
            return
        src = os.path.join(in_dir, name)
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        os.close(fd)
        data = b"".join(chunks).upper()
        tmp = os.path.join(out_dir, ".tmp-" + name)
        wfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        view = memoryview(data)
        while view:
            view = view[os.write(wfd, view):]
        os.fsync(wfd)  # the output's data is on disk before its name is
        os.close(wfd)
        os.rename(tmp, os.path.join(out_dir, name))
        dfd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        os.fsync(dfd)  # the rename is on disk before the input goes
        os.close(dfd)
        os.unlink(src)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("in_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--procs", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=1e9)
    a = ap.parse_args()
    names = sorted(n for n in os.listdir(a.in_dir) if not n.startswith("."))
    t0 = time.perf_counter()
    deadline = time.monotonic() + a.seconds
    pids = []
    for k in range(a.procs):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                durable_loop(a.in_dir, a.out_dir, names[k::a.procs], deadline)
            except BaseException:  # noqa: BLE001  (reported through the exit code)
                code = 1
            os._exit(code)
        pids.append(pid)
    bad = 0
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        bad += os.waitstatus_to_exitcode(status) != 0
    elapsed = time.perf_counter() - t0
    done = sum(1 for n in os.listdir(a.out_dir) if not n.startswith("."))
    print(json.dumps({"files": done, "seconds": elapsed}))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
