"""The folder queue: crash states before/after recover(), attempts and poison files, claim, requeue, counts, lock."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ingestd import durable
from ingestd.names import key
from ingestd.spool import (
    FOLDERS,
    REASON_PREFIX,
    TEMP_OUTPUT_PREFIX,
    AlreadyRunning,
    Claim,
    Failure,
    NotAWatchDir,
    Spool,
    SpoolError,
)

NOW = 1_700_000_000.0
K = key("a")
OUT_TEMP = f"{TEMP_OUTPUT_PREFIX}4242-{K}"  # a worker's unpublished output (sinks.py names them so)
SIDECAR = f"{REASON_PREFIX}{K}.json"


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    """A fresh watch dir with its four folders (and state dir) created by ensure()."""
    s = Spool(tmp_path / "w")
    s.ensure()
    return s


def populate(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def state(root: Path) -> dict[str, bytes]:
    """Every file of the watch dir except our private state dir: relative path -> content."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not str(p.relative_to(root)).startswith(".ingestd/")}


# --- crash states: before -> recover() -> after ---------------------------------------------------------------
CRASH_STATES = [
    # (what happened, before, after, requeued)
    ("queued, never claimed", {"unprocessed/a": b"A"}, {"unprocessed/a": b"A"}, []),
    ("killed right after the claim", {"underprocess/a": b"A"}, {"underprocess/a": b"A"}, ["a"]),
    ("killed while writing the output",
     {"underprocess/a": b"A", f"processed/{OUT_TEMP}": b"part"}, {"underprocess/a": b"A"}, ["a"]),
    ("killed while writing a routed output",
     {"underprocess/a": b"A", f"processed/errors/{OUT_TEMP}": b"part", "processed/errors/old": b"O"},
     {"underprocess/a": b"A", "processed/errors/old": b"O"}, ["a"]),
    ("killed after publishing, before the commit (redo gives identical bytes)",
     {"underprocess/a": b"A", "processed/a": b"OUT"}, {"underprocess/a": b"A", "processed/a": b"OUT"}, ["a"]),
    ("committed", {"processed/a": b"OUT"}, {"processed/a": b"OUT"}, []),
    ("killed while writing the failure sidecar",
     {"underprocess/a": b"A", f"failed/{TEMP_OUTPUT_PREFIX}{K}": b"{\"na"}, {"underprocess/a": b"A"}, ["a"]),
    ("killed after the sidecar, before the move to failed/",
     {"underprocess/a": b"A", f"failed/{SIDECAR}": b"{}"}, {"underprocess/a": b"A", f"failed/{SIDECAR}": b"{}"}, ["a"]),
    ("failed earlier", {"failed/a": b"A", f"failed/{SIDECAR}": b"{}"}, {"failed/a": b"A", f"failed/{SIDECAR}": b"{}"}, []),
    ("a newer file of the same name waits",
     {"unprocessed/a": b"NEW", "underprocess/a": b"OLD"}, {"unprocessed/a": b"NEW", "underprocess/a": b"OLD"}, ["a"]),
    ("the same name in every folder",
     {"unprocessed/a": b"1", "underprocess/a": b"2", "processed/a": b"3", "failed/a": b"4"},
     {"unprocessed/a": b"1", "underprocess/a": b"2", "processed/a": b"3", "failed/a": b"4"}, ["a"]),
    ("several in flight", {"underprocess/b": b"B", "underprocess/a": b"A"}, {"underprocess/a": b"A", "underprocess/b": b"B"},
     ["a", "b"]),
    ("dot-files that are not ours stay",
     {"unprocessed/.gitkeep": b"", "underprocess/.gitkeep": b"", "processed/.gitkeep": b"", "failed/.gitkeep": b"",
      "unprocessed/.upload.part": b"p", "processed/.user-notes": b"n"},
     {"unprocessed/.gitkeep": b"", "underprocess/.gitkeep": b"", "processed/.gitkeep": b"", "failed/.gitkeep": b"",
      "unprocessed/.upload.part": b"p", "processed/.user-notes": b"n"}, []),
    ("temp-like names outside processed/ and failed/ are user files",
     {f"unprocessed/{OUT_TEMP}": b"u"}, {f"unprocessed/{OUT_TEMP}": b"u"}, []),
]


@pytest.mark.parametrize(("what", "before", "after", "requeued"), CRASH_STATES, ids=[c[0] for c in CRASH_STATES])
def test_recover_crash_state(spool: Spool, what: str, before: dict[str, bytes], after: dict[str, bytes],
                             requeued: list[str]) -> None:
    populate(spool.root, before)
    assert spool.recover(max_attempts=3, now=NOW) == (requeued, [])
    assert state(spool.root) == after
    for name in requeued:
        assert spool.attempts(name) == 1


def test_recover_on_a_clean_watch_dir_is_a_no_op(spool: Spool) -> None:
    assert spool.recover(3, NOW) == ([], [])
    assert state(spool.root) == {}


def test_recover_twice_counts_twice_but_changes_nothing_else(spool: Spool) -> None:
    populate(spool.root, {"underprocess/a": b"A", "unprocessed/a": b"N"})
    spool.recover(5, NOW)
    spool.recover(5, NOW)
    assert spool.attempts("a") == 2
    assert state(spool.root) == {"underprocess/a": b"A", "unprocessed/a": b"N"}


@pytest.mark.parametrize("old, new", [("underprocess", "failed"), ("unprocessed", "underprocess"),
                                      ("unprocessed", "failed")])
def test_a_move_whose_old_name_came_back_after_a_power_cut_is_not_finished_twice(spool: Spool, old: str,
                                                                                  new: str) -> None:
    """The state a power cut leaves when a rename's new folder was fsynced and its old one was not: one inode,
    two names. underprocess/ + failed/ is fail() cut between its two fsyncs (CI saw a redo then keep the same
    poison file twice, once as .superseded-, in a fresh-clone run); the others are a claim's old name (never fsynced there)."""
    populate(spool.root, {f"{new}/poison.txt": b"\x00bad\n"})
    os.link(Path(spool.root) / new / "poison.txt", Path(spool.root) / old / "poison.txt")
    requeued, _ = spool.recover(3, NOW)
    assert state(spool.root) == {f"{new}/poison.txt": b"\x00bad\n"}
    assert requeued == (["poison.txt"] if new == "underprocess" else [])


def test_a_different_file_of_the_same_name_is_not_a_ghost(spool: Spool) -> None:
    """Only the same inode is a ghost: a newcomer named like a failed file is processed (and the older
    failure is kept aside when it fails too)."""
    populate(spool.root, {"failed/a": b"old", "underprocess/a": b"new", "unprocessed/b": b"B", "failed/b": b"B"})
    assert spool.recover(3, NOW) == (["a"], [])
    assert state(spool.root) == {"failed/a": b"old", "underprocess/a": b"new", "unprocessed/b": b"B",
                                 "failed/b": b"B"}


# --- attempts and poison files --------------------------------------------------------------------------------
def test_poison_file_quarantined_after_max_attempts(spool: Spool) -> None:
    populate(spool.root, {"underprocess/a": b"kills the worker\n"})
    assert spool.recover(3, NOW) == (["a"], [])
    assert spool.recover(3, NOW + 1) == (["a"], [])
    assert spool.recover(3, NOW + 2) == ([], ["a"])
    after = state(spool.root)
    assert set(after) == {"failed/a", f"failed/{SIDECAR}"} and after["failed/a"] == b"kills the worker\n"
    record = json.loads((Path(spool.failed) / SIDECAR).read_text())
    assert record["name"] == "a"
    assert record["reason"] == "poison: in progress during 3 crashes or restarts in a row"
    assert record["attempts"] == 3 and record["line"] is None and record["size"] == 17
    assert record["failed_at_unix"] == NOW + 2 and record["failed_at"] == "2023-11-14T22:13:22+00:00"
    assert spool.failures(10) == [record]
    assert not any(Path(spool.state).glob("attempts-*")), "the count goes with the file"


@pytest.mark.parametrize("max_attempts", [1, 2, 5])
def test_attempt_bound_is_the_setting(spool: Spool, max_attempts: int) -> None:
    populate(spool.root, {"underprocess/a": b"A"})
    for i in range(1, max_attempts):
        assert spool.recover(max_attempts, NOW) == (["a"], []), f"recovery {i}"
    assert spool.recover(max_attempts, NOW) == ([], ["a"])


def test_attempts_survive_a_restart(spool: Spool) -> None:
    populate(spool.root, {"underprocess/a": b"A"})
    spool.recover(3, NOW)
    spool.recover(3, NOW)
    assert Spool(spool.root).attempts("a") == 2  # a new Spool (a new daemon) reads them from disk


def test_attempts_belong_to_the_file_not_the_name(spool: Spool) -> None:
    """A new file of the same name (another inode) starts again from zero."""
    populate(spool.root, {"underprocess/a": b"A"})
    spool.recover(3, NOW)
    spool.recover(3, NOW)
    os.link(Path(spool.underprocess) / "a", Path(spool.root) / "held")  # keep the old inode alive: no reuse
    os.unlink(Path(spool.underprocess) / "a")
    populate(spool.root, {"underprocess/a": b"A2"})
    assert spool.attempts("a") == 0
    assert spool.recover(3, NOW) == (["a"], [])
    assert spool.attempts("a") == 1


def test_commit_removes_input_and_attempts(spool: Spool) -> None:
    populate(spool.root, {"underprocess/a": b"A", "processed/a": b"OUT"})
    spool.recover(3, NOW)
    spool.commit("a")
    assert state(spool.root) == {"processed/a": b"OUT"}
    assert spool.attempts("a") == 0
    assert not any(Path(spool.state).glob("attempts-*"))


def test_attempts_file_corrupt_counts_as_zero(spool: Spool) -> None:
    populate(spool.root, {"underprocess/a": b"A"})
    Path(spool._attempts_path("a")).write_text("{not json")
    assert spool.attempts("a") == 0
    assert spool.recover(3, NOW) == (["a"], [])
    assert spool.attempts("a") == 1


# --- claim ------------------------------------------------------------------------------------------------------
def test_claim_moves_the_file(spool: Spool) -> None:
    populate(spool.root, {"unprocessed/a": b"A"})
    ino = (Path(spool.unprocessed) / "a").stat().st_ino
    assert spool.claim("a") is Claim.CLAIMED
    assert state(spool.root) == {"underprocess/a": b"A"}
    assert (Path(spool.underprocess) / "a").stat().st_ino == ino


def test_claim_of_a_vanished_file_is_false(spool: Spool) -> None:
    assert spool.claim("gone") is Claim.GONE


def test_claim_refuses_to_overwrite_an_in_flight_file(spool: Spool) -> None:
    populate(spool.root, {"unprocessed/a": b"NEW", "underprocess/a": b"IN FLIGHT"})
    assert spool.claim("a") is Claim.GONE
    assert state(spool.root) == {"unprocessed/a": b"NEW", "underprocess/a": b"IN FLIGHT"}


def test_claim_moves_a_symlink_itself_never_its_target(spool: Spool, tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"T")
    (Path(spool.unprocessed) / "link").symlink_to(target)
    assert spool.claim("link")
    assert (Path(spool.underprocess) / "link").is_symlink()
    assert target.read_bytes() == b"T"


def test_unclaim_gives_back_but_never_over_a_newer_file(spool: Spool) -> None:
    populate(spool.root, {"underprocess/a": b"A", "underprocess/b": b"B", "unprocessed/b": b"NEWER"})
    assert spool.unclaim("a") is True
    assert spool.unclaim("b") is False
    assert state(spool.root) == {"unprocessed/a": b"A", "underprocess/b": b"B", "unprocessed/b": b"NEWER"}


# --- fail ---------------------------------------------------------------------------------------------------------
def test_fail_moves_file_with_a_readable_sidecar(spool: Spool) -> None:
    populate(spool.root, {"underprocess/a": b"line1\nline2\n"})
    spool.fail("a", Failure("line longer than max_line_bytes (10 bytes)", line=2), NOW)
    st = state(spool.root)
    assert set(st) == {"failed/a", f"failed/{SIDECAR}"} and st["failed/a"] == b"line1\nline2\n"
    record = json.loads(st[f"failed/{SIDECAR}"])
    assert record == {"name": "a", "reason": "line longer than max_line_bytes (10 bytes)", "line": 2, "attempts": 1,
                      "failed_at": "2023-11-14T22:13:20+00:00", "failed_at_unix": NOW, "size": 12, "seq": 1}


def test_fail_from_the_queue_itself(spool: Spool) -> None:
    populate(spool.root, {"unprocessed/a": b"A"})
    spool.fail("a", Failure("not a regular file: FIFO"), NOW, source=spool.unprocessed)
    assert set(state(spool.root)) == {"failed/a", f"failed/{SIDECAR}"}


def test_fail_of_a_vanished_file_does_nothing(spool: Spool) -> None:
    spool.fail("gone", Failure("x"), NOW)
    assert state(spool.root) == {}


def test_fail_with_hostile_name(spool: Spool) -> None:
    name = os.fsdecode(b"bad\xffname\n<script>")
    populate(spool.root, {f"underprocess/{name}": b"x"})
    spool.fail(name, Failure("binary content"), NOW)
    (record,) = spool.failures(5)
    assert record["name"] == "bad\\xffname\\x0a<script>"
    assert (Path(spool.failed) / name).read_bytes() == b"x"


def test_failures_newest_first_limited_and_without_sidecar(spool: Spool) -> None:
    for i, name in enumerate(["old", "mid", "new"]):
        populate(spool.root, {f"underprocess/{name}": b"x"})
        spool.fail(name, Failure(f"reason {name}"), NOW + i)
    populate(spool.root, {"failed/orphan": b"?"})  # put there by hand
    got = spool.failures(10)
    assert [r["name"] for r in got] == ["new", "mid", "old", "orphan"]
    assert got[-1]["reason"] == "unknown (no sidecar)"
    assert [r["name"] for r in spool.failures(2)] == ["new", "mid"]


# --- requeue -------------------------------------------------------------------------------------------------------
def failed_files(spool: Spool, *names: str) -> None:
    for name in names:
        populate(spool.root, {f"underprocess/{name}": name.encode()})
        spool.fail(name, Failure("bad"), NOW)


def test_requeue_all(spool: Spool) -> None:
    failed_files(spool, "a", "b")
    assert sorted(spool.requeue()[0]) == ["a", "b"]
    assert state(spool.root) == {"unprocessed/a": b"a", "unprocessed/b": b"b"}  # sidecars gone too


def test_requeue_by_name_and_refusals(spool: Spool) -> None:
    failed_files(spool, "a", "b", "c")
    populate(spool.root, {"unprocessed/c": b"waiting"})
    moved, refused = spool.requeue(["a", "c", "nosuch", "../unprocessed/c"])
    assert moved == ["a"]
    assert refused == ["c", "nosuch", "../unprocessed/c"]
    st = state(spool.root)
    assert st["unprocessed/a"] == b"a" and st["unprocessed/c"] == b"waiting" and st["failed/c"] == b"c"
    assert st["failed/b"] == b"b"
    assert f"failed/{REASON_PREFIX}{key('c')}.json" in st  # a refused file keeps its reason
    assert f"failed/{REASON_PREFIX}{key('a')}.json" not in st


def test_requeue_nothing(spool: Spool) -> None:
    assert spool.requeue() == ([], [])


# --- counts and completions ----------------------------------------------------------------------------------------
def test_counts(spool: Spool) -> None:
    populate(spool.root, {"unprocessed/a": b"", "unprocessed/b": b"", "unprocessed/.gitkeep": b"", "unprocessed/.x.part": b"",
                          "underprocess/c": b"", "processed/c": b"", "processed/errors/c": b"",
                          f"processed/{OUT_TEMP}": b"", "failed/d": b"", f"failed/{REASON_PREFIX}x.json": b""})
    assert spool.counts() == {"unprocessed": 2, "underprocess": 1, "processed": 1, "failed": 1}
    assert list(spool.counts()) == list(FOLDERS)


def test_completions_newest_first(spool: Spool) -> None:
    for i, name in enumerate(["one", "two", "three"]):
        populate(spool.root, {f"processed/{name}": b""})
        os.utime(Path(spool.processed) / name, (NOW + i, NOW + i))
    (Path(spool.processed) / "errors").mkdir()
    got = spool.completions(2)
    # The shape of the daemon's `recent` entries (one shape for `status --json` and /api/status).
    assert got == [{"file": "three", "result": "processed", "duration": None, "finished_at": NOW + 2, "reason": None,
                    "seq": None, "recovered": False},
                   {"file": "two", "result": "processed", "duration": None, "finished_at": NOW + 1, "reason": None,
                    "seq": None, "recovered": False}]


# --- ensure ----------------------------------------------------------------------------------------------------------
def test_ensure_creates_missing_folders_and_keeps_existing_files(tmp_path: Path) -> None:
    root = tmp_path / "new"
    populate(root, {"unprocessed/a": b"A"})
    Spool(root).ensure()
    assert all((root / f).is_dir() for f in FOLDERS)
    assert (root / "unprocessed" / "a").read_bytes() == b"A"


def test_ensure_refuses_a_file_where_a_folder_should_be(tmp_path: Path) -> None:
    root = tmp_path / "w"
    populate(root, {"failed": b"not a folder"})
    with pytest.raises(SpoolError, match="^watch_dir: .*failed"):
        Spool(root).ensure()


@pytest.mark.parametrize("folder", ["processed", "failed", "underprocess"])
def test_ensure_refuses_folders_on_different_filesystems(tmp_path: Path, tmpfs: Callable[..., Path], folder: str) -> None:
    root = tmp_path / "w"
    Spool(root).ensure()
    tmpfs(root / folder)
    with pytest.raises(SpoolError) as e:
        Spool(root).ensure()
    msg = str(e.value)
    assert msg.startswith("watch_dir: folders are on different filesystems") and "\n" not in msg
    assert folder in msg


def test_ensure_accepts_a_watch_dir_wholly_on_another_filesystem(tmp_path: Path, tmpfs: Callable[..., Path]) -> None:
    root = tmpfs(tmp_path / "w")
    Spool(root).ensure()
    assert all((root / f).is_dir() for f in FOLDERS)


# --- lock --------------------------------------------------------------------------------------------------------------
def release(s: Spool) -> None:
    if s._lock_fd is not None:
        os.close(s._lock_fd)
        s._lock_fd = None


def test_second_lock_raises_naming_the_holder(spool: Spool) -> None:
    spool.lock()
    try:
        assert Spool(spool.root).holder() == f"pid {os.getpid()} on {socket.gethostname()}"
        with pytest.raises(AlreadyRunning) as e:
            Spool(spool.root).lock()
        assert f"pid {os.getpid()}" in str(e.value) and str(spool.root) in str(e.value)
    finally:
        release(spool)
    other = Spool(spool.root)
    other.lock()  # released: the next daemon may start
    release(other)
    assert Spool(spool.root).holder() is None


def test_lock_held_by_another_process_and_released_when_it_dies(spool: Spool) -> None:
    code = ("import sys; from ingestd.spool import Spool; s = Spool(sys.argv[1]); s.lock(); "
            "print('locked', flush=True); sys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", code, str(spool.root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"locked\n"
        with pytest.raises(AlreadyRunning, match=f"pid {child.pid} on "):
            Spool(spool.root).lock()
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(10)
        child.stdout.close()  # type: ignore[union-attr]
    s = Spool(spool.root)
    s.lock()
    release(s)


def test_holder_without_a_lock_file(spool: Spool) -> None:
    assert spool.holder() is None


# --- claim where renameat2(RENAME_NOREPLACE) is unsupported (link + unlink fallback) ------------------------------------
class _NoRenameat2:
    """Stands in for libc: renameat2 fails with EINVAL, as on a filesystem without RENAME_NOREPLACE."""

    @staticmethod
    def renameat2(*args: object) -> int:
        ctypes.set_errno(errno.EINVAL)
        return -1


def test_claim_fallback_moves_and_never_overwrites(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(durable, "_libc", _NoRenameat2)
    populate(spool.root, {"unprocessed/a": b"A", "unprocessed/b": b"NEW", "underprocess/b": b"IN FLIGHT"})
    assert spool.claim("a") is Claim.CLAIMED
    assert spool.claim("b") is Claim.GONE
    assert spool.claim("gone") is Claim.GONE
    assert state(spool.root) == {"underprocess/a": b"A", "unprocessed/b": b"NEW", "underprocess/b": b"IN FLIGHT"}
    assert (Path(spool.underprocess) / "a").stat().st_nlink == 1


def test_requeue_fallback_never_overwrites(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    failed_files(spool, "a")
    populate(spool.root, {"unprocessed/a": b"waiting"})
    monkeypatch.setattr(durable, "_libc", _NoRenameat2)
    assert spool.requeue() == ([], ["a"])
    assert state(spool.root)["unprocessed/a"] == b"waiting" and state(spool.root)["failed/a"] == b"a"


# --- never die on one fault (issue 8, kind 2) ----------------------------------------------------------------------
def test_the_same_name_failed_three_times_in_one_second(spool: Spool) -> None:
    """The issue's instance: the third move to failed/ hit EEXIST (NAME.superseded-<seconds> was taken)."""
    for i in range(3):
        populate(spool.root, {"underprocess/a": f"v{i}".encode()})
        spool.fail("a", Failure(f"bad {i}"), NOW + i / 10)
    st = state(spool.root)
    assert {k: v for k, v in st.items() if not k.startswith(f"failed/{REASON_PREFIX}")} == {
        "failed/a": b"v2", f"failed/a.superseded-{int(NOW)}": b"v0", f"failed/a.superseded-{int(NOW)}-2": b"v1"}
    reasons = {json.loads(v)["reason"] for k, v in st.items() if k.startswith(f"failed/{REASON_PREFIX}")}
    assert reasons == {"bad 0", "bad 1", "bad 2"}  # every file keeps its own sidecar


def test_a_name_failed_many_times_in_a_second_beside_a_users_look_alike(spool: Spool) -> None:
    """The kind: any number of repeats in one second, a 255-byte name, and a user's file already holding a
    candidate name; never EEXIST, nothing overwritten, every version kept."""
    name = "n" * 255
    suffix = f".superseded-{int(NOW)}-3"
    users = name[: 255 - len(suffix)] + suffix
    populate(spool.root, {f"failed/{users}": b"user's own"})
    for i in range(6):
        populate(spool.root, {f"underprocess/{name}": f"v{i}".encode()})
        spool.fail(name, Failure("bad"), NOW)
    kept = {k: v for k, v in state(spool.root).items() if not k.startswith(f"failed/{REASON_PREFIX}")}
    assert kept[f"failed/{users}"] == b"user's own"
    assert sorted(kept.values()) == sorted([b"user's own", *(f"v{i}".encode() for i in range(6))])
    assert all(len(os.fsencode(k.split("/", 1)[1])) <= 255 for k in kept)


def test_fail_after_rm_rf_failed(spool: Spool) -> None:
    """`rm -rf failed/` under a running daemon: the next failure recreates it; counts() does not raise meanwhile."""
    failed_files(spool, "old")
    shutil.rmtree(spool.failed)
    assert spool.counts()["failed"] == 0
    populate(spool.root, {"underprocess/a": b"A"})
    spool.fail("a", Failure("bad"), NOW)
    assert set(state(spool.root)) == {"failed/a", f"failed/{SIDECAR}"}


def test_counts_and_ensure_with_every_folder_gone(spool: Spool) -> None:
    for f in ("processed", "failed", "underprocess", "unprocessed"):
        shutil.rmtree(Path(spool.root) / f)
    assert spool.counts() == dict.fromkeys(FOLDERS, 0)
    made = spool.ensure()
    assert sorted(Path(m).name for m in made) == sorted(["processed", "failed", "underprocess", "unprocessed"])
    assert spool.ensure() == []  # nothing missing: nothing made


def _fill(path: Path) -> None:
    """Fill the filesystem holding `path` to the last block (a real ENOSPC for any write of data)."""
    with open(path / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 512)


def test_bump_attempts_on_a_full_disk_counts_in_memory(tmp_path: Path, tmpfs: Callable[..., Path]) -> None:
    """The issue's instance (a worker death on a full disk): the count cannot be written, yet it counts."""
    root = tmpfs(tmp_path / "w", size="1m")
    s = Spool(root)
    s.ensure()
    populate(root, {"underprocess/a": b"A"})
    _fill(root)
    assert [s.bump_attempts("a") for _ in range(3)] == [1, 2, 3]
    assert s.attempts("a") == 3
    assert not any(n.startswith("attempts-") for n in os.listdir(s.state))
    (root / "filler").unlink()
    assert s.bump_attempts("a") == 4  # space is back: written, and the disk count continues from memory
    assert Spool(root).attempts("a") == 4


def test_recover_on_a_full_disk_neither_raises_nor_loses(tmp_path: Path, tmpfs: Callable[..., Path]) -> None:
    """The issue's instance (start-up recovery on a full disk exited 1, and every restart again), with a poison
    file that cannot be quarantined (its sidecar cannot be written): it stays, to be quarantined later."""
    root = tmpfs(tmp_path / "w", size="1m")
    s = Spool(root)
    s.ensure()
    populate(root, {"underprocess/a": b"A", "underprocess/p": b"P"})
    for _ in range(2):
        s.bump_attempts("p")
    _fill(root)
    requeued, quarantined = Spool(root).recover(max_attempts=3, now=NOW)
    assert (requeued, quarantined) == (["a"], [])
    assert sorted(os.listdir(s.underprocess)) == ["a", "p"]
    (root / "filler").unlink()
    assert Spool(root).recover(max_attempts=3, now=NOW) == (["a"], ["p"])


def test_bump_attempts_after_the_state_dir_was_removed(spool: Spool) -> None:
    populate(spool.root, {"underprocess/a": b"A"})
    shutil.rmtree(spool.state)
    assert spool.bump_attempts("a") == 1
    assert Spool(spool.root).attempts("a") == 1  # recreated and written


# --- done_marker: a file given back to the queue gets its marker back ------------------------------------------------
def test_requeue_restores_the_done_marker(tmp_path: Path) -> None:
    s = Spool(tmp_path / "w", done_marker=True)
    s.ensure()
    failed_files(s, "a", "b")
    assert sorted(s.requeue()[0]) == ["a", "b"]
    assert state(s.root) == {"unprocessed/a": b"a", "unprocessed/a.done": b"", "unprocessed/b": b"b",
                             "unprocessed/b.done": b""}


def test_unclaim_restores_the_done_marker_but_a_refusal_adds_none(tmp_path: Path) -> None:
    s = Spool(tmp_path / "w", done_marker=True)
    s.ensure()
    populate(s.root, {"underprocess/a": b"A", "underprocess/b": b"OLD", "unprocessed/b": b"NEW"})
    assert s.unclaim("a") is True
    assert s.unclaim("b") is False
    assert state(s.root) == {"unprocessed/a": b"A", "unprocessed/a.done": b"", "underprocess/b": b"OLD",
                             "unprocessed/b": b"NEW"}


def test_without_done_marker_no_marker_is_made(spool: Spool) -> None:
    failed_files(spool, "a")
    spool.requeue()
    assert state(spool.root) == {"unprocessed/a": b"a"}


# --- a lock that cannot be swapped underneath ------------------------------------------------------------------------
@pytest.mark.parametrize("swap", ["delete the lock file", "replace the lock file", "rm -rf .ingestd"])
def test_a_second_lock_is_refused_after_the_lock_file_is_swapped(spool: Spool, swap: str) -> None:
    spool.lock()
    try:
        lock = Path(spool.state) / "lock"
        if swap == "delete the lock file":
            lock.unlink()
        elif swap == "replace the lock file":
            (Path(spool.state) / "new").write_text("x")
            os.rename(Path(spool.state) / "new", lock)
        else:
            shutil.rmtree(spool.state)
            Path(spool.state).mkdir()
        with pytest.raises(AlreadyRunning):
            Spool(spool.root).lock()
        assert Spool(spool.root).holder() is not None
    finally:
        release(spool)
    other = Spool(spool.root)
    other.lock()
    release(other)


# --- folders inside the queue (recursive mode, issue 9): relative paths through every folder -------------------
def folders_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir())


def test_a_file_in_folders_keeps_its_relative_path_through_claim_commit_and_fail(spool: Spool) -> None:
    root = Path(spool.root)
    populate(root, {"unprocessed/batch/sub/a": b"A", "unprocessed/batch/b": b"B"})
    assert spool.claim("batch/sub/a", settled=True) is Claim.CLAIMED
    assert spool.claim("batch/b", settled=True) is Claim.CLAIMED
    assert state(root) == {"underprocess/batch/sub/a": b"A", "underprocess/batch/b": b"B"}
    assert spool.counts()["underprocess"] == 2  # files, not folders
    spool.commit("batch/sub/a")
    spool.sync_commits()  # the unlink's own folder fsynced, then the emptied mirrored folder removed
    assert folders_under(root / "underprocess") == ["batch"]
    spool.fail("batch/b", Failure("bad"), NOW)
    assert state(root) == {"failed/batch/b": b"B"} | {f"failed/{REASON_PREFIX}{key('batch/b')}.json":
                                                     (root / "failed" / f"{REASON_PREFIX}{key('batch/b')}.json").read_bytes()}
    assert folders_under(root / "underprocess") == []  # its last file left: the mirrored folder went too
    assert [f["name"] for f in spool.failures(10)] == ["batch/b"] and spool.failures(10)[0]["reason"] == "bad"
    assert spool.counts()["failed"] == 1
    assert spool.requeue() == (["batch/b"], [])
    assert state(root) == {"unprocessed/batch/b": b"B"} and folders_under(root / "failed") == []


def test_a_folder_of_failures_set_aside_for_a_file_of_its_name_is_said(spool: Spool,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Found by a new user: failed/batch/ (a folder of failures, recursive mode) was renamed
    batch.superseded-<time> for a failing file named batch, without a word (processed/'s set-asides are logged)."""
    caplog.set_level(logging.INFO, logger="ingestd")
    populate(spool.root, {"underprocess/batch/c.txt": b"c"})
    spool.fail("batch/c.txt", Failure("bad c"), NOW)
    populate(spool.root, {"underprocess/batch": b"b"})
    spool.fail("batch", Failure("bad b"), NOW)
    said = [r for r in caplog.records if getattr(r, "event", None) == "failure_set_aside"]
    assert [(r.file, r.kept_as, r.files) for r in said] == [("batch", f"batch.superseded-{int(NOW)}", 1)]
    assert {f["name"]: f["reason"] for f in spool.failures(10)} == {
        "batch": "bad b", f"batch.superseded-{int(NOW)}/c.txt": "bad c"}


def test_the_same_relative_path_failed_twice_is_set_aside_in_its_folder(spool: Spool) -> None:
    root = Path(spool.root)
    for content in (b"1", b"2"):
        populate(root, {"underprocess/batch/x": content})
        spool.fail("batch/x", Failure("bad"), NOW)
    assert sorted(os.listdir(root / "failed" / "batch")) == ["x", f"x.superseded-{int(NOW)}"]
    assert (root / "failed" / "batch" / "x").read_bytes() == b"2"
    assert {f["name"] for f in spool.failures(10)} == {"batch/x", f"batch/x.superseded-{int(NOW)}"}


def test_unclaim_remakes_the_source_folder_and_removes_the_mirrored_one(spool: Spool) -> None:
    root = Path(spool.root)
    populate(root, {"underprocess/gone/deep/a": b"A"})  # its folder in unprocessed/ was cleaned up meanwhile
    assert spool.unclaim("gone/deep/a")
    assert state(root) == {"unprocessed/gone/deep/a": b"A"} and folders_under(root / "underprocess") == []


RECURSIVE_CRASH_STATES = [
    ("killed right after a claim into mirrored folders", {"underprocess/batch/deep/a": b"A", "unprocessed/batch/b": b"B"},
     {"underprocess/batch/deep/a": b"A", "unprocessed/batch/b": b"B"}, ["batch/deep/a"]),
    ("several in flight in different folders", {"underprocess/x/a": b"1", "underprocess/y/z/a": b"2", "underprocess/a": b"3"},
     {"underprocess/x/a": b"1", "underprocess/y/z/a": b"2", "underprocess/a": b"3"}, ["a", "x/a", "y/z/a"]),
    ("killed after a routed output in a mirrored folder was written",
     {"underprocess/batch/a": b"A", f"processed/errors/{OUT_TEMP}": b"part", "processed/batch/old": b"O"},
     {"underprocess/batch/a": b"A", "processed/batch/old": b"O"}, ["batch/a"]),
    ("failed earlier in a folder", {"failed/batch/a": b"A", f"failed/{REASON_PREFIX}{key('batch/a')}.json": b"{}"},
     {"failed/batch/a": b"A", f"failed/{REASON_PREFIX}{key('batch/a')}.json": b"{}"}, []),
]


@pytest.mark.parametrize(("what", "before", "after", "requeued"), RECURSIVE_CRASH_STATES,
                         ids=[c[0] for c in RECURSIVE_CRASH_STATES])
def test_recover_finds_every_file_in_mirrored_folders(spool: Spool, what: str, before: dict[str, bytes],
                                                      after: dict[str, bytes], requeued: list[str]) -> None:
    populate(spool.root, before)
    (Path(spool.root) / "underprocess" / "empty" / "left").mkdir(parents=True)  # a kill between mkdir and rename
    assert spool.recover(max_attempts=3, now=NOW) == (requeued, [])
    assert state(spool.root) == after
    assert "empty" not in os.listdir(Path(spool.root) / "underprocess")  # empty claim folders are removed
    for name in requeued:
        assert spool.attempts(name) == 1


def test_a_claim_ghost_in_a_folder_is_dropped(spool: Spool) -> None:
    """One inode under unprocessed/batch/p and underprocess/batch/p (a power cut kept both names): one redo."""
    populate(spool.root, {"underprocess/batch/p": b"P"})
    (Path(spool.root) / "unprocessed" / "batch").mkdir()
    os.link(Path(spool.root) / "underprocess" / "batch" / "p", Path(spool.root) / "unprocessed" / "batch" / "p")
    assert spool.recover(3, NOW) == (["batch/p"], [])
    assert state(spool.root) == {"underprocess/batch/p": b"P"}


def test_prune_removes_only_empty_quiet_visible_folders(spool: Spool) -> None:
    root = Path(spool.root)
    populate(root, {"unprocessed/full/a": b"A", "unprocessed/.hidden/x": b""})
    for rel in ("empty/deeper", "fresh", ".hidden/empty"):
        (root / "unprocessed" / rel).mkdir(parents=True)
    up = spool.unprocessed
    mtime = (root / "unprocessed" / "fresh").stat().st_mtime
    # Just made: a producer between its mkdir and its first file keeps its folder.
    assert spool.prune(up, ["fresh", "empty/deeper", "empty"], quiet=5.0, now=mtime + 1) == []
    removed = spool.prune(up, ["full", "fresh", "empty", "empty/deeper", ".hidden", ".hidden/empty"], quiet=5.0,
                          now=mtime + 10)
    assert removed == ["empty/deeper", "fresh", "empty"]  # deepest first, so the parent empties in the same call
    assert sorted(os.listdir(root / "unprocessed")) == [".hidden", "full"]


def test_a_folder_failed_whole_by_an_older_version_stays_one_entry(spool: Spool) -> None:
    """Before issue 9 a folder in unprocessed/ went to failed/ whole, with a sidecar of its own: it is still shown
    as one failure and requeued whole."""
    root = Path(spool.root)
    populate(root, {"failed/batch/a": b"A", f"failed/{REASON_PREFIX}{key('batch')}.json":
                    json.dumps({"name": "batch", "reason": "not a regular file: directory", "seq": 1}).encode()})
    assert [(f["name"], f["reason"]) for f in spool.failures(10)] == [("batch", "not a regular file: directory")]
    assert spool.counts()["failed"] == 1
    assert spool.requeue() == (["batch"], [])
    assert state(root) == {"unprocessed/batch/a": b"A"}


def test_a_file_named_like_its_folder_in_flight_makes_the_claim_wait(spool: Spool) -> None:
    """"batch" (a file) is in underprocess/ while "batch/a" arrives: the claim says GONE (taken after "batch"
    commits), never raises (which would pause all claiming)."""
    populate(spool.root, {"underprocess/batch": b"F", "unprocessed/batch/a": b"A"})
    assert spool.claim("batch/a", settled=True) is Claim.GONE
    assert state(spool.root) == {"underprocess/batch": b"F", "unprocessed/batch/a": b"A"}
    spool.commit("batch")
    assert spool.claim("batch/a", settled=True) is Claim.CLAIMED


# --- kept(): the rescan's result counts, processed/ listed only when it may have changed -----------------------------
def test_kept_follows_every_change_to_processed(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Results arriving and consumers removing them, right after a listing (processed/'s ctime is then too recent to
    prove nothing changed since: listed again), even with its mtime set back (utime cannot set ctime back); once
    nothing touched it for longer than the racy margin, an unchanged processed/ is not listed again."""
    import ingestd.spool as spool_mod

    listings = []
    real = spool_mod._count
    monkeypatch.setattr(spool_mod, "_count", lambda folder, skip: listings.append(folder) or real(folder, skip))
    p = Path(spool.processed)
    assert spool.kept() == {"processed": 0, "failed": 0}
    (p / "a").write_bytes(b"A\n")
    assert spool.kept()["processed"] == 1
    before = os.stat(p)
    (p / "b").write_bytes(b"B\n")
    os.utime(p, ns=(before.st_atime_ns, before.st_mtime_ns))  # its mtime as it was: the ctime still moved
    assert spool.kept()["processed"] == 2, "a change hidden by utime was missed"
    (p / "errors").mkdir()  # a routing output folder is not a result
    (p / ".ingestd-tmp-1-x").write_bytes(b"")  # nor a worker's temp
    assert spool.kept()["processed"] == 2
    (p / "a").unlink()  # a consumer takes one
    assert spool.kept()["processed"] == 1
    time.sleep(spool_mod.RACY_NS / 1e9 + 0.2)  # nothing touches it for longer than the racy margin
    assert spool.kept()["processed"] == 1  # listed once more (the last listing was racy), now trusted
    listings.clear()
    assert spool.kept()["processed"] == 1 and spool.kept()["processed"] == 1
    assert listings == [], "an unchanged processed/ was listed again"
    (p / "c").write_bytes(b"C\n")  # its mtime and ctime move: listed again
    assert spool.kept()["processed"] == 2 and listings == [spool.processed]


def test_kept_agrees_with_counts_for_a_processed_folder_made_again(spool: Spool) -> None:
    """rm -rf processed/ and a new one (ext4 may give it the same inode): never the old count."""
    p = Path(spool.processed)
    for i in range(5):
        (p / f"r{i}").write_bytes(b"x")
    assert spool.kept()["processed"] == 5
    st = os.stat(p)
    shutil.rmtree(p)
    p.mkdir()
    (p / "only").write_bytes(b"x")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old mtime (and maybe the old inode)
    assert spool.kept()["processed"] == 1 == spool.counts()["processed"]
    shutil.rmtree(p)
    assert spool.kept()["processed"] == 0


def test_queue_folders_made_in_a_folder_holding_other_things_are_said(tmp_path: Path, caplog) -> None:
    """Found by a new user: `run --watch-dir $HOME` made the four queue folders in a home folder without a word (the
    watch_dir_created warning is only for a path that did not exist). A folder holding other things gets them with
    a queue_folders_created WARNING; an empty one (a fresh StateDirectory) and a watch dir silently."""
    import logging

    caplog.set_level(logging.INFO, logger="ingestd")
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine\n")
    Spool(home).ensure_at_start()
    said = [r for r in caplog.records if getattr(r, "event", None) == "queue_folders_created"]
    assert len(said) == 1 and said[0].levelno == logging.WARNING and said[0].holding == 1
    assert sorted(said[0].made) == [".ingestd", "failed", "processed", "underprocess", "unprocessed"]
    caplog.clear()
    Spool(home).ensure_at_start()  # a watch dir now: nothing to say
    empty = tmp_path / "state"
    empty.mkdir()
    Spool(empty).ensure_at_start()
    assert not [r for r in caplog.records if getattr(r, "event", None) in ("queue_folders_created",
                                                                           "watch_dir_created")]


def test_a_watch_dir_path_through_a_missing_folder_and_dotdot_is_refused(tmp_path: Path, monkeypatch) -> None:
    """`typo/../w`: the kernel resolves it to nothing (status says it does not exist); run made typo/ and said the
    watch dir was made, then watched w (break-it round 8). Refused as status refuses it, and nothing is made."""
    (tmp_path / "w").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NotAWatchDir, match="does not exist"):
        Spool(Path("typo/../w")).ensure_at_start()
    with pytest.raises(NotAWatchDir, match="does not exist"):
        Spool(Path("typo/../new")).ensure_at_start()
    assert sorted(os.listdir(tmp_path)) == ["w"] and not os.listdir(tmp_path / "w")
    Spool(Path("fresh/w")).ensure_at_start()  # a plain missing path is still made
    assert (tmp_path / "fresh" / "w" / "unprocessed").is_dir()
