#!/usr/bin/env python3
"""Baseline for idle CPU: a loop that lists DIR every PERIOD seconds and does nothing else. Runs until killed.

    list_poller.py DIR PERIOD
"""

import os
import sys
import time

d, period = sys.argv[1], float(sys.argv[2])
while True:
    with os.scandir(d) as it:
        names = [e.name for e in it if not e.name.startswith(".")]
    time.sleep(period)
