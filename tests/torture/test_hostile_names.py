"""Catalogue: hostile names and entries. Names with newline, invalid UTF-8, leading '-', HTML, 255 bytes, spaces,
and a name colliding with an earlier result are processed; symlinks (to a secret file, to a folder, dangling),
a directory, a FIFO and a socket fail with a reason and are never followed, read or blocked on. Logs stay one JSON
object a line, /metrics parses, /api/status and `ingestd status` stay valid. (Unreadable files: test_errors.py,
as a non-root user.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

from support import INGESTD, wait_for

from .lib import audit_final, cli_status, ls, make_watch, metrics_ok, start_daemon

NAMES = [
    os.fsdecode(b"new\nline.txt"), os.fsdecode(b"bad-\xff\xfe-utf8.txt"), "-n", "--help", "<script>alert(1)<\\script>.html",
    "x" * 251 + ".txt", "  spaced name  .txt", "tab\tname", "quote\"'.txt", "back\\slash", "\u00e9t\u00e9.txt",
    os.fsdecode("\u202eevil.txt".encode()),
]


def test_hostile_names_and_entries(tmp_path: Path) -> None:
    w = make_watch(tmp_path / "w")
    u = w / "unprocessed"
    secret = tmp_path / "secret"
    secret.write_text("never read\n")
    os.chmod(secret, 0o600)
    d = start_daemon(w, "--workers", "2", cwd=tmp_path)
    try:
        expected = {}
        for i, name in enumerate(NAMES):
            (u / name).write_bytes(b"line %d\n" % i)
            expected[name] = b"LINE %d\n" % i
        assert len(os.fsencode(NAMES[5])) == 255
        wait_for(lambda: len(ls(w, "processed")) == len(NAMES), timeout=30, what="hostile names processed")
        (u / "-n").write_bytes(b"again\n")  # collides with an earlier result: replaced as a whole, the earlier kept
        wait_for(lambda: (w / "processed" / "-n").read_bytes() == b"AGAIN\n", timeout=30)
        (aside,) = [n for n in ls(w, "processed") if n.startswith("-n.superseded-")]  # file_exist = keep
        expected[aside], expected["-n"] = expected["-n"], b"AGAIN\n"
        os.symlink(secret, u / "to-secret")
        os.symlink(tmp_path, u / "to-folder")
        os.symlink(tmp_path / "nowhere", u / "dangling")
        (u / "a-dir").mkdir()
        os.mkfifo(u / "fifo")  # nobody ever writes it: opening it for reading must not block
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(u / "sock"))
        bad = {"to-secret", "to-folder", "dangling", "fifo", "sock"}  # a-dir: a folder is left where it is (issue 9)
        wait_for(lambda: set(ls(w, "failed")) == bad, timeout=30, what="entries failed")
        assert (u / "a-dir").is_dir() and d.event("folder_left", folder="a-dir")
        sock.close()
        reasons = {f["name"]: f["reason"] for f in d.status()["failures"]}
        assert all(reasons[n].startswith("not a regular file") for n in bad), reasons
        assert os.readlink(w / "failed" / "to-secret") == str(secret) and secret.read_text() == "never read\n"
        assert not any(b"never read" in (w / "processed" / n).read_bytes() for n in ls(w, "processed"))
        # everything stays valid with these names in it
        assert d.get("/healthz")[0] == 200
        metrics_ok(d.get("/metrics")[1])
        status = d.status()
        json.dumps(status)
        code, page = d.get("/")
        assert code == 200 and b"<script>alert(1)<\\\\script>" not in page
        cli = cli_status(w)
        assert cli["counts"]["failed"] == len(bad) and cli["counts"]["processed"] == len(NAMES) + 1  # + the aside
        text = subprocess.run([*INGESTD, "status", "--watch-dir", str(w)], capture_output=True, text=True, timeout=60)
        assert text.returncode == 0 and "\nline.txt" not in text.stdout  # the newline is escaped, not printed
    finally:
        d.stop()
    for line in d.lines:
        json.loads(line)  # every log line is one JSON object, whatever the names
    os.rmdir(u / "a-dir")
    audit_final(w, expected, bad)
    assert not [n for n in os.listdir(w / "processed") if n.startswith(".")], "temp names left or overflowed"
