#!/usr/bin/env python3
"""Baseline: Python's ceiling without per-line work: bytes.upper() on 1 MiB blocks (no fsync).

    py_blocks.py INPUT OUTPUT
"""

import sys

with open(sys.argv[1], "rb") as f, open(sys.argv[2], "wb") as o:
    while b := f.read(1 << 20):
        o.write(b.upper())
