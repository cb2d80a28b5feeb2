"""A model of what a power cut leaves on disk, replayed from the shim's journal.

Strict POSIX durability, the worst case a file system may give:
- a file's bytes survive only as of its last fsync (never fsynced: empty after the cut);
- a directory's entries survive only as of that directory's last fsync; a rename is two independent changes
  (the new name in one directory, the old name's removal in the other), each durable only with its directory.
Everything on disk when the epoch began (the test ran sync()) is durable.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ingestd.names import key

DIRS = ("unprocessed", "underprocess", "processed", "failed", ".ingestd")


@dataclass
class Disk:
    """Durable directories (name -> inode) and durable file contents (inode -> bytes) after a cut."""

    dirs: dict[str, dict[str, tuple]]  # folder -> name -> file key (its last item is the real inode number)
    content: dict[tuple, bytes]

    def data(self, sub: str, name: str) -> bytes | None:
        ino = self.dirs[sub].get(name)
        return None if ino is None else self.content.get(ino, b"")


@dataclass
class Epoch:
    root: Path
    live: dict[str, dict[str, int]] = field(default_factory=dict)
    base_content: dict[int, bytes] = field(default_factory=dict)

    @classmethod
    def begin(cls, root: Path) -> Epoch:
        """Snapshot the (synced) watch dir: all of it is durable."""
        os.sync()
        e = cls(root)
        for sub in DIRS:
            e.live[sub] = {}
            for n in os.listdir(root / sub):
                st = os.lstat(root / sub / n)
                e.live[sub][n] = st.st_ino
                if os.path.isfile(root / sub / n):
                    e.base_content[st.st_ino] = (root / sub / n).read_bytes()
        return e

    def _where(self, path: str) -> tuple[str, str] | None:
        d, n = os.path.split(path)
        rel = os.path.relpath(d, self.root)
        return (rel, n) if rel in DIRS else None

    def replay(self, journal: list[dict[str, Any]]) -> list[tuple[dict[str, Any], Disk, list[dict[str, Any]]]]:
        """For every point where durability or an acknowledgement changed: (op, disk after a cut there, acks so far)."""
        # Inode numbers are reused at once after an unlink, so each file gets a key of its own:
        # ("b", ino) for files there at the start, ("n", seq, ino) for each file created since.
        live = {k: {n: ("b", i) for n, i in v.items()} for k, v in self.live.items()}
        durable = {k: dict(v) for k, v in live.items()}
        current: dict[int, tuple] = {i: ("b", i) for v in self.live.values() for i in v.values()}
        synced: dict[tuple, str] = {}  # file key -> copy of its bytes as of its last fsync
        acks: list[dict[str, Any]] = []
        points = []
        for op in journal:
            kind = op["op"]
            if kind == "create":
                current[op["ino"]] = ("n", len(current), op["ino"])
                if w := self._where(op["path"]):
                    live[w[0]][w[1]] = current[op["ino"]]
            elif kind == "rename":
                s, d = self._where(op["src"]), self._where(op["dst"])
                ino = live[s[0]].pop(s[1], None) if s else None
                ino = ino or current.get(op["ino"], ("b", op["ino"]))
                if d:
                    live[d[0]][d[1]] = ino
            elif kind == "link":  # a second name (file_exist's aside); the first stays
                s, d = self._where(op["src"]), self._where(op["dst"])
                ino = (live[s[0]].get(s[1]) if s else None) or current.get(op["ino"], ("b", op["ino"]))
                if d:
                    live[d[0]][d[1]] = ino
            elif kind == "unlink":
                if w := self._where(op["path"]):
                    live[w[0]].pop(w[1], None)
            elif kind == "fsync":
                synced[current.get(op["ino"], ("b", op["ino"]))] = op["copy"]
            elif kind == "fsync_dir":
                if w := self._where(os.path.join(op["path"], "x")):
                    durable[w[0]] = dict(live[w[0]])
            elif kind == "ack":
                acks.append(op)
            else:
                continue
            if kind in ("fsync", "fsync_dir", "ack"):
                points.append((op, self._disk(durable, synced), list(acks)))
        return points

    def _disk(self, durable: dict[str, dict[str, tuple]], synced: dict[tuple, str]) -> Disk:
        content: dict[tuple, bytes] = {("b", i): c for i, c in self.base_content.items()}
        for ino, copy in synced.items():
            content[ino] = Path(copy).read_bytes()
        dirs = {k: dict(v) for k, v in durable.items()}
        # an inode created in this epoch and never fsynced has no bytes after the cut
        for names in dirs.values():
            for ino in names.values():
                content.setdefault(ino, b"")
        return Disk(dirs, content)

    def end(self, journal: list[dict[str, Any]]) -> Disk:
        pts = self.replay(journal)
        if pts:
            return pts[-1][1]
        return self._disk({k: {n: ("b", i) for n, i in v.items()} for k, v in self.live.items()}, {})


def materialize(disk: Disk, root: Path, source: Path) -> None:
    """Write the disk a power cut left as a fresh watch dir (directories of the source stay directories)."""
    first: dict[tuple, Path] = {}  # one file under two durable names (a half-durable rename) stays one inode
    for sub in DIRS:
        (root / sub).mkdir(parents=True, exist_ok=True)
        for name, ino in disk.dirs[sub].items():
            if (source / sub / name).is_dir() and not (source / sub / name).is_symlink():
                (root / sub / name).mkdir(exist_ok=True)
                continue
            if ino in first:
                os.link(first[ino], root / sub / name)
                continue
            (root / sub / name).write_bytes(disk.content.get(ino, b""))
            first[ino] = root / sub / name
    # A real cut keeps inode numbers; this copy cannot, so attempt counts (keyed by the input's inode) are
    # translated to the new inodes. Without this every count would silently reset.
    new_ino = {ino[-1]: os.lstat(root / "underprocess" / n).st_ino for n, ino in disk.dirs["underprocess"].items()}
    for name in os.listdir(root / ".ingestd"):
        if name.startswith("attempts-"):
            try:
                rec = json.loads((root / ".ingestd" / name).read_bytes())
                rec["ino"] = new_ino.get(rec["ino"], rec["ino"])
            except (ValueError, KeyError, TypeError):
                continue
            (root / ".ingestd" / name).write_text(json.dumps(rec))


def violations(disk: Disk, acks: list[dict[str, Any]], inputs: dict[str, bytes],
               expected: dict[str, bytes | None]) -> list[str]:
    """What a power cut at this point would have broken. expected[name] is the result, None if it must fail."""
    bad = []

    def sidecar_ok(name: str) -> bool:
        raw = disk.data("failed", ".ingestd-reason-" + key(name) + ".json")
        try:
            return bool(raw) and bool(json.loads(raw).get("reason"))
        except ValueError:
            return False

    for name, want in expected.items():
        queued = [s for s in ("unprocessed", "underprocess") if disk.data(s, name) == inputs[name]]
        out = disk.data("processed", name)
        if out is not None and out != want:
            bad.append(f"{name}: half-written or wrong result ({len(out)} bytes) under its final name")
        done = out is not None and out == want
        failed = disk.data("failed", name) is not None and sidecar_ok(name)
        if disk.data("failed", name) is not None and not sidecar_ok(name):
            bad.append(f"{name}: in failed/ without a durable reason")
        if not (queued or done or failed):
            bad.append(f"{name}: LOST (not queued, not processed, not failed)")
    last: dict[str, dict[str, Any]] = {}
    attempts: dict[str, int] = {}
    for a in acks:
        last[a["name"]] = a
        if a["what"] == "attempts":
            attempts[a["name"]] = a["n"]
        elif a["what"] in ("commit", "fail"):
            attempts.pop(a["name"], None)
    for name, a in last.items():
        what = a["what"]
        if what == "commit":
            if disk.data("underprocess", name) is not None:
                bad.append(f"{name}: committed, yet back in underprocess/")
            if disk.data("processed", name) != expected.get(name):
                bad.append(f"{name}: committed, yet its result is not durable")
        elif what == "fail":
            if disk.data("underprocess", name) is not None:
                bad.append(f"{name}: failed, yet back in underprocess/")
            if disk.data("failed", name) is None or not sidecar_ok(name):
                bad.append(f"{name}: failed, yet not durably in failed/ with its reason")
        elif what == "requeue":
            if disk.data("unprocessed", name) is None:
                bad.append(f"{name}: requeued, yet not durably in unprocessed/")
            if disk.data("failed", name) is not None:
                bad.append(f"{name}: requeued, yet still in failed/")
    for name, n in attempts.items():
        if disk.data("underprocess", name) is None:
            continue
        raw = disk.data(".ingestd", "attempts-" + key(name))
        try:
            got = json.loads(raw)["attempts"] if raw else 0
        except ValueError:
            got = 0
        if got < n:
            bad.append(f"{name}: attempt {n} was counted, yet a cut leaves {got}")
    return bad


def copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, symlinks=True)
