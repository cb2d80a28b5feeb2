"""ingestd benchmarks: figures for the real daemon, each beside a baseline measured in the same run.

    .venv/bin/python -m bench                  # the full run (`make bench`), under 15 minutes
    .venv/bin/python -m bench --quick          # about a minute, fewer files and repeats
    .venv/bin/python -m bench --only drain,engine --dir /var/tmp

Not a test: nothing here passes or fails, except sanity checks that the work was really done (every
file processed, outputs identical to the baselines'). The table goes to stdout, progress to stderr, and
the results (with the machine they ran on) to bench/results/<UTC time>.json. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from datetime import datetime

from bench import (
    cpu,
    distributed,
    drain,
    engine,
    floor,
    pickup,
    scrape_idle,
    throughput,
)
from bench.harness import Table, cleanup, machine, on_term, work_dir, write_results

SECTIONS = ("throughput", "drain", "pickup", "engine", "cpu", "floor", "scrape", "idle", "distributed")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer files, no repeats: checks that it works")
    ap.add_argument("--dir", default="/var/tmp", help="where to make the temporary working folder (a real disk: "
                    "/var/tmp, which the FHS keeps across reboots, where /tmp may be tmpfs)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--waiting", type=int, default=100_000, help="files waiting for the scrape and idle figures")
    ap.add_argument("--keep", action="store_true", help="keep the working folder (for a post-mortem)")
    ap.add_argument("--no-save", action="store_true", help="do not write bench/results/*.json")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    if bad := set(only) - set(SECTIONS):
        ap.error(f"unknown section(s): {', '.join(sorted(bad))}")

    signal.signal(signal.SIGTERM, on_term)
    work = work_dir(args.dir, args.keep)
    t = Table()
    load0 = os.getloadavg()
    started = time.monotonic()
    info = machine(work)
    try:
        for s in SECTIONS:  # a fixed order, whatever --only says
            if s not in only:
                continue
            if s == "throughput":
                throughput.run(work, t, args.quick)
            elif s == "drain":
                drain.run(work, t, args.quick)
            elif s == "pickup":
                pickup.run(work, t, args.quick)
            elif s == "engine":
                engine.run(work, t, args.quick)
            elif s == "cpu":
                cpu.run(work, t, args.quick)
            elif s == "floor":
                floor.run(work, t, args.quick)
            elif s == "scrape" or (s == "idle" and "scrape" not in only):
                scrape_idle.run(work, t, args.quick, args.waiting, only)
            elif s == "distributed":
                distributed.run(work, t, args.quick)
    finally:
        cleanup()
    load1 = os.getloadavg()
    took = time.monotonic() - started
    print(f"ingestd benchmarks ({'--quick' if args.quick else 'full'}), {datetime.now():%Y-%m-%d %H:%M}, {took:.0f} s")
    print(f"machine: {info['cores']} cores ({info['cpu']}), Linux {info['kernel']}, Python {info['python']}, "
          f"work dir on {info['work_dir_fs']}; ingestd {info['ingestd_commit'][:10]}"
          f"{' (modified)' if info['ingestd_dirty'] else ''}; load average {load0[0]:.2f} at start, "
          f"{load1[0]:.2f} at end (other jobs share this machine: figures are noisy)")
    print("values: median [min..max] when repeated; ratio = ingestd / baseline unless a note says otherwise\n")
    print(t.render(judged=not args.quick))
    for n in t.notes:
        print(f"note: {n}")
    if not args.no_save:
        path = write_results(t, info, {"quick": args.quick, "sections": only, "seconds": round(took, 1),
                                       "load_average": [load0[0], load1[0]], "waiting": args.waiting})
        print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        cleanup()
        sys.exit(130)
