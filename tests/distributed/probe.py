"""Run inside a node's mount namespace by test_rig.py: what a node sees of the shared folder. Prints one JSON line.

argv: the mounted folder. The test writes unprocessed/from-server on the server side after READY."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import sys
import time

from inotify_simple import INotify, flags

watch = sys.argv[1]
up = os.path.join(watch, "unprocessed")
ino = INotify()
ino.add_watch(up, flags.CREATE | flags.MOVED_TO | flags.CLOSE_WRITE)
print("READY", flush=True)
deadline = time.monotonic() + 20
while not os.path.exists(os.path.join(up, "from-server")) and time.monotonic() < deadline:
    time.sleep(0.1)
seen_server = [e.name for e in ino.read(timeout=1000)]
with open(os.path.join(up, "from-client"), "w") as f:
    f.write("x")
seen_own = [e.name for e in ino.read(timeout=2000)]
libc = ctypes.CDLL(None, use_errno=True)
r = libc.renameat2(-100, os.path.join(up, "from-client").encode(), -100, os.path.join(up, "renamed").encode(), 1)
rename_errno = errno.errorcode.get(ctypes.get_errno(), "?") if r else None
os.link(os.path.join(up, "from-server"), os.path.join(up, "linked"))
print(json.dumps({
    "exists": os.path.exists(os.path.join(up, "from-server")),
    "inotify_server": seen_server, "inotify_own": seen_own, "renameat2_noreplace": rename_errno,
    "ino": os.stat(os.path.join(up, "from-server")).st_ino,
    "ino_link": os.stat(os.path.join(up, "linked")).st_ino,
}), flush=True)
