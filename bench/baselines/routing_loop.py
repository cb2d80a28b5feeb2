#!/usr/bin/env python3
"""Baseline: README's routing example ("Routing (tags, filters, outputs)") as a hand-written loop (no fsync).

    routing_loop.py INPUT OUT_DIR

For a file named *.log (tag `app`), line by line, in the README's filter order:
  1. lines matching `ERROR` are re-tagged `errors` (the filters after it see the new tag);
  2. `password=\\S+` becomes `password=***` on every line;
  3. lines still tagged `app` that match `^#` are dropped.
Lines tagged `errors` go to OUT_DIR/errors/NAME, the rest to OUT_DIR/NAME. Line endings are kept
(the filters see a line without its ending, as ingestd's processors do).
"""

import os
import re
import sys

ERROR = re.compile("ERROR")
SECRET = re.compile(r"password=\S+")
COMMENT = re.compile("^#")


def main() -> None:
    src, out_dir = sys.argv[1], sys.argv[2]
    name = os.path.basename(src)
    os.makedirs(os.path.join(out_dir, "errors"), exist_ok=True)
    with open(src, encoding="utf-8", newline="") as f, \
            open(os.path.join(out_dir, name), "w", encoding="utf-8", newline="") as main_out, \
            open(os.path.join(out_dir, "errors", name), "w", encoding="utf-8", newline="") as errors_out:
        for line in f:
            body = line.rstrip("\r\n")
            ending = line[len(body):]
            tag = "errors" if ERROR.search(body) else "app"
            body = SECRET.sub("password=***", body)
            if tag == "app" and COMMENT.search(body):
                continue
            (errors_out if tag == "errors" else main_out).write(body + ending)


if __name__ == "__main__":
    main()
