#!/usr/bin/env python3
"""Baseline: the naive text loop, `for line in f: out.write(line.upper())` (UTF-8, no fsync).

    naive_lines.py INPUT OUTPUT
"""

import sys

with open(sys.argv[1], encoding="utf-8", newline="") as f, \
        open(sys.argv[2], "w", encoding="utf-8", newline="") as out:
    out.writelines(line.upper() for line in f)
