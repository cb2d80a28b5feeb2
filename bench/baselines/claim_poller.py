#!/usr/bin/env python3
"""Baseline for pickup latency: a loop that lists SRC every PERIOD seconds and claims (renames into DST)
whatever it finds, printing "NAME UNIX_TIME" per claim. Runs until killed.

    claim_poller.py SRC DST PERIOD
"""

import os
import sys
import time

src, dst, period = sys.argv[1], sys.argv[2], float(sys.argv[3])
while True:
    with os.scandir(src) as it:
        names = [e.name for e in it if not e.name.startswith(".")]
    for n in names:
        try:
            os.rename(os.path.join(src, n), os.path.join(dst, n))
        except FileNotFoundError:
            continue
        sys.stdout.write(f"{n} {time.time():.6f}\n")
    sys.stdout.flush()
    time.sleep(period)
