"""The kernel's answer to "is anyone writing this file?": real read leases on real files, real writer processes.

Spool.claim's use of it too: a claim is refused while a writer holds the file, and undone when a writer
knocks during it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import wait_for

from ingestd import durable
from ingestd.lease import Verdict, read_lease
from ingestd.spool import Claim, Spool

NOBODY = 65534
# A writer in another process: opens the file for appending (blocking while a lease is held), says so, writes.
WRITER = ("import sys, time\nf = open(sys.argv[1], 'ab')\nprint('opened', flush=True)\n"
          "f.write(sys.argv[2].encode()); f.flush()\nsys.stdin.readline()\nf.close()\n")


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "w")
    s.ensure()
    return s


def verdict(path: Path) -> Verdict:
    with read_lease(str(path)) as held:
        return held.verdict


def test_closed_file_is_free(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    assert verdict(tmp_path / "f") is Verdict.FREE


def test_open_for_writing_is_busy_then_free_once_closed(tmp_path: Path) -> None:
    path = tmp_path / "f"
    with open(path, "wb") as f:
        f.write(b"x")
        assert verdict(path) is Verdict.BUSY
    assert verdict(path) is Verdict.FREE


def test_a_writer_in_another_process_is_busy(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"")
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(path), "data"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline() == "opened\n"
        assert verdict(path) is Verdict.BUSY
    finally:
        p.communicate("\n", timeout=10)
    assert verdict(path) is Verdict.FREE


def test_readers_do_not_make_it_busy(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    with open(path, "rb"), open(path, "rb"):
        assert verdict(path) is Verdict.FREE


def test_read_write_open_is_busy(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDWR)
    try:
        assert verdict(path) is Verdict.BUSY
    finally:
        os.close(fd)


def test_gone_and_not_regular(tmp_path: Path) -> None:
    assert verdict(tmp_path / "missing") is Verdict.GONE
    (tmp_path / "link").symlink_to(tmp_path / "missing")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    for name in ("link", "fifo", "dir"):  # never followed, never blocked on (a FIFO without a writer)
        assert verdict(tmp_path / name) is Verdict.NOT_REGULAR, name


def test_a_writer_opening_during_the_lease_waits_and_is_seen(tmp_path: Path) -> None:
    """fcntl(2): the opener blocks until the lease is released; F_GETLEASE shows the break. This process is not
    killed by the break signal (SIGIO's default action would)."""
    path = tmp_path / "f"
    path.write_bytes(b"")
    with read_lease(str(path)) as held:
        assert held.verdict is Verdict.FREE and not held.writer_waiting()
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(path), "late"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        wait_for(held.writer_waiting, timeout=10, what="the writer's open to break the lease")
        time.sleep(0.2)
        assert p.poll() is None and path.read_bytes() == b"", "the writer is still blocked in open()"
    assert p.stdout is not None and p.stdout.readline() == "opened\n"
    p.communicate("\n", timeout=10)
    assert path.read_bytes() == b"late"


def as_nobody(fn: Callable[[], str]) -> str:
    """Run fn in a forked child as the user nobody; return what it returned (or the exception's repr)."""
    if os.geteuid() != 0:
        pytest.skip("switching to the user nobody needs root")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                out = fn()
            except Exception as e:  # noqa: BLE001 - the parent asserts on it
                out = repr(e)
            os.write(w, out.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder nobody may use (pytest's tmp_path is root's only)."""
    d = Path(tempfile.mkdtemp(prefix="ingestd-lease-", dir="/tmp"))
    os.chown(d, NOBODY, NOBODY)
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


def test_not_the_owner_without_cap_lease_is_unsupported(shared_dir: Path) -> None:
    (shared_dir / "roots").write_bytes(b"x")  # root's, readable by all
    (shared_dir / "own").write_bytes(b"x")
    os.chown(shared_dir / "own", NOBODY, NOBODY)
    assert as_nobody(lambda: verdict(shared_dir / "roots").value) == "unsupported"
    assert as_nobody(lambda: verdict(shared_dir / "own").value) == "free", "the owner needs no CAP_LEASE"


# --- Spool.claim -------------------------------------------------------------------------------------------------
def test_claim_of_a_file_held_open_for_writing_is_busy_and_moves_nothing(spool: Spool) -> None:
    path = Path(spool.unprocessed) / "a"
    with open(path, "wb") as f:
        f.write(b"half")
        assert spool.claim("a") is Claim.BUSY
        assert not spool.claim("a")
        assert path.exists() and not (Path(spool.underprocess) / "a").exists()
    assert spool.claim("a") is Claim.CLAIMED
    assert (Path(spool.underprocess) / "a").read_bytes() == b"half"


def test_claim_while_only_readers_hold_it(spool: Spool) -> None:
    path = Path(spool.unprocessed) / "a"
    path.write_bytes(b"x")
    with open(path, "rb"):
        assert spool.claim("a") is Claim.CLAIMED


def test_a_writer_knocking_during_the_claim_gets_the_file_back_in_the_queue(spool: Spool,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer opens the file between the lease and the rename: it blocks; the claim sees the break, puts the
    file back and says busy; the writer's bytes land in the queued file, not in one being processed."""
    path = Path(spool.unprocessed) / "a"
    path.write_bytes(b"one\n")
    real = durable.rename_noreplace
    writers: list[subprocess.Popen[str]] = []

    def knock_then_rename(src: str, dst: str) -> None:
        if not writers:  # the claim's rename: a writer arrives just before it
            writers.append(subprocess.Popen([sys.executable, "-c", WRITER, str(path), "two\n"],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
            time.sleep(0.5)  # time for it to reach open() and block on our lease
        real(src, dst)

    monkeypatch.setattr(durable, "rename_noreplace", knock_then_rename)
    assert spool.claim("a") is Claim.BUSY
    p = writers[0]
    assert p.stdout is not None and p.stdout.readline() == "opened\n"
    p.communicate("\n", timeout=10)
    assert path.read_bytes() == b"one\ntwo\n" and not (Path(spool.underprocess) / "a").exists()


def test_a_file_replaced_during_the_claim_is_not_claimed_unchecked(spool: Spool, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = Path(spool.unprocessed) / "a"
    path.write_bytes(b"old")
    real = durable.rename_noreplace

    def replace_then_rename(src: str, dst: str) -> None:
        if src == str(path) and path.read_bytes() == b"old":
            (tmp_path / "new").write_bytes(b"new")
            os.rename(tmp_path / "new", path)  # someone renames a new file over it after our lease
        real(src, dst)

    monkeypatch.setattr(durable, "rename_noreplace", replace_then_rename)
    assert spool.claim("a") is Claim.GONE
    assert path.read_bytes() == b"new", "the unchecked file is back in the queue; its arrival event brings it"


def test_claim_without_a_lease_waits_for_the_settle_check(shared_dir: Path) -> None:
    """As nobody on root's file: no lease possible, so UNSURE until the caller says it settled."""
    spool = Spool(shared_dir / "w")
    as_nobody(lambda: spool.ensure() or "")
    (Path(spool.unprocessed) / "a").write_bytes(b"x")  # root's
    assert as_nobody(lambda: spool.claim("a").value) == "unsure"
    assert (Path(spool.unprocessed) / "a").exists()
    assert as_nobody(lambda: spool.claim("a", settled=True).value) == "claimed"
    assert (Path(spool.underprocess) / "a").read_bytes() == b"x"
