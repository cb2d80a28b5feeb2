"""Folders dropped into unprocessed/ (issue 9): a real daemon, real inotify, real `cp -r`, real kill -9.

Default: a folder is never claimed or moved (cp -r must never be broken), logged once, counted, shown.
recursive = true: the files inside, at any depth, are processed once complete, their relative paths kept under
processed/ and failed/; emptied folders are removed once quiet; a crash loses and doubles nothing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import HANG_ROUTING, INGESTD, DaemonProcess, folder, wait_for

RECURSIVE = {"INGESTD_RECURSIVE": "true"}


@pytest.fixture
def start(tmp_path: Path) -> Iterator:
    procs: list[DaemonProcess] = []

    def _start(*args: str, env: dict[str, str] | None = None, new_session: bool = False) -> DaemonProcess:
        d = DaemonProcess(tmp_path / "w", *args, env=env, cwd=tmp_path, new_session=new_session)
        procs.append(d)
        return d.started()

    yield _start
    for d in procs:
        if d.proc.poll() is None:
            if d.proc.pid and os.getpgid(d.proc.pid) == d.proc.pid:
                os.killpg(d.proc.pid, signal.SIGKILL)
            d.kill()


def tree(root: Path, hidden: bool = False) -> dict[str, bytes]:
    """Every entry under root that is not a folder (at any depth) -> its bytes (a symlink: b"-> " + its target,
    never followed; a FIFO or socket: b"<special>"); hidden names (sidecars, temps) left out unless `hidden`."""
    out: dict[str, bytes] = {}
    stack = [Path(root)]
    while stack:
        here = stack.pop()
        for e in os.scandir(here):
            if e.name.startswith(".") and not hidden:
                continue
            p = Path(e.path)
            rel = str(p.relative_to(root))
            if e.is_symlink():
                out[rel] = b"-> " + os.fsencode(os.readlink(p))
            elif e.is_dir():
                stack.append(p)
            elif e.is_file():
                out[rel] = p.read_bytes()
            else:
                out[rel] = b"<special>"
    return out


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=False)


def subfolders(root: Path) -> list[str]:
    return sorted(str(Path(p).relative_to(root)) for p, _, _ in os.walk(root) if Path(p) != root
                  and not any(part.startswith(".") for part in Path(p).relative_to(root).parts))


def make_batch(src: Path, files: int = 300, depth: bool = True) -> dict[str, bytes]:
    """A folder `batch` of many small files (and nested folders); returns relative path -> content."""
    made = {}
    for i in range(files):
        rel = f"batch/f{i:03d}.txt" if not depth or i % 3 else f"batch/sub{i % 2}/deep/f{i:03d}.txt"
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        data = f"line {i}\nsecond {i}\n".encode()
        (src / rel).write_bytes(data)
        made[rel] = data
    return made


# ---- default: folders are left where they are ----------------------------------------------------------

def test_cp_r_into_unprocessed_is_never_broken_and_the_folder_is_left_alone(start, tmp_path: Path) -> None:
    """The issue's input: `cp -r batch/ unprocessed/` while the daemon runs. Before: the folder went to failed/
    ~20 ms after mkdir, cp exited 1 and failed/batch held a fraction of the files."""
    d = start(env={"INGESTD_RESCAN_INTERVAL": "1"})
    w = d.watch_dir
    src = tmp_path / "src"
    made = make_batch(src)
    (w / "unprocessed" / "loose.txt").write_bytes(b"loose\n")  # a file beside it is processed as usual
    cp = run("cp", "-r", str(src / "batch"), str(w / "unprocessed"))
    assert cp.returncode == 0, cp.stderr
    wait_for(lambda: d.event("folder_left", folder="batch"), what="folder_left event")
    wait_for(lambda: (w / "processed" / "loose.txt").exists(), what="the loose file processed")
    time.sleep(2.5)  # two periodic rescans (rescan_interval 1 s) and several settle times (0.3 s)
    assert tree(w / "unprocessed") == made  # every file in place, whole
    assert not folder(w, "failed") and not folder(w, "underprocess")
    assert folder(w, "processed") == ["loose.txt"]
    assert d.count("folder_left") == 1  # one event per folder, not one per rescan
    assert "recursive" in d.event("folder_left")["message"]  # it says what to do
    st = d.status()
    assert st["folders_left"] == {"count": 1, "names": ["batch"], "recursive": False}
    assert st["counts"]["unprocessed"] == 0  # a folder is not a waiting file
    assert not st["failures"]
    assert "ingestd_unprocessed_folders 1.0" in d.get("/metrics")[1].decode()
    cli = run(*INGESTD, "status", "--watch-dir", str(w), "--json")
    assert json.loads(cli.stdout)["folders_left"]["names"] == ["batch"]
    text = run(*INGESTD, "status", "--watch-dir", str(w)).stdout
    assert "left alone  1 folder in unprocessed/ (recursive is off" in text and text.rstrip().count("batch") >= 1


def test_folders_made_any_way_are_left_alone_and_counted(start, tmp_path: Path) -> None:
    """The wider kind: a folder present at start, one made then filled slowly, one moved in whole, an empty one,
    a folder replacing a file of the same name; all stay, each logged once; one removed by hand is uncounted."""
    w = tmp_path / "w"
    for sub in ("unprocessed", "underprocess", "processed", "failed"):
        (w / sub).mkdir(parents=True)
    (w / "unprocessed" / "early").mkdir()
    (w / "unprocessed" / "early" / "a.txt").write_bytes(b"a\n")
    d = start()
    wait_for(lambda: d.event("folder_left", folder="early"), what="early logged")
    (w / "unprocessed" / "slow").mkdir()
    with open(w / "unprocessed" / "slow" / "s.txt", "wb") as f:
        for i in range(3):
            f.write(b"part %d\n" % i)
            f.flush()
            time.sleep(0.2)
    outside = tmp_path / "moved"
    outside.mkdir()
    (outside / "m.txt").write_bytes(b"m\n")
    os.rename(outside, w / "unprocessed" / "moved")
    (w / "unprocessed" / "empty").mkdir()
    (w / "unprocessed" / "x").write_bytes(b"first\n")
    wait_for(lambda: (w / "processed" / "x").exists(), what="x processed")
    (w / "unprocessed" / "x").mkdir()  # the same name, now a folder
    names = ["early", "empty", "moved", "slow", "x"]
    wait_for(lambda: d.status()["folders_left"]["count"] == 5, what="five folders counted")
    time.sleep(1.0)
    assert sorted(os.listdir(w / "unprocessed")) == names
    assert (w / "unprocessed" / "slow" / "s.txt").read_bytes() == b"part 0\npart 1\npart 2\n"
    assert not folder(w, "failed") and not folder(w, "underprocess")
    assert sorted(ev["folder"] for ev in d.events if ev.get("event") == "folder_left") == names
    (w / "unprocessed" / "empty").rmdir()
    wait_for(lambda: d.status()["folders_left"]["count"] == 4, what="a removed folder is uncounted")
    assert "ingestd_unprocessed_folders 4.0" in d.get("/metrics")[1].decode()


def test_other_non_regular_entries_are_still_failed_with_their_reason(start, tmp_path: Path) -> None:
    """Not a folder, not a file: a FIFO, a socket and a symlink to a folder still go to failed/ (never followed)."""
    d = start()
    w = d.watch_dir
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "secret.txt").write_bytes(b"secret\n")
    os.mkfifo(w / "unprocessed" / "pipe")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(w / "unprocessed" / "sock"))
    os.symlink(target, w / "unprocessed" / "link")
    wait_for(lambda: folder(w, "failed") == ["link", "pipe", "sock"], what="three set aside")
    sock.close()
    reasons = {f["name"]: f["reason"] for f in d.status()["failures"]}
    assert reasons == {"link": "not a regular file: symlink (never followed)", "pipe": "not a regular file: FIFO",
                       "sock": "not a regular file: socket"}
    assert (target / "secret.txt").read_bytes() == b"secret\n" and not folder(w, "processed")
    assert d.status()["folders_left"]["count"] == 0


# ---- recursive = true ------------------------------------------------------------------------------------

def test_recursive_cp_r_processes_every_file_with_its_relative_path(start, tmp_path: Path) -> None:
    d = start("--workers", "2", env=RECURSIVE)
    w = d.watch_dir
    src = tmp_path / "src"
    made = make_batch(src)
    (src / "batch" / "sub0" / "bin.dat").write_bytes(b"binary\x00data")  # rejected: failed/ keeps its path
    (src / "batch" / ".hidden").mkdir()
    (src / "batch" / ".hidden" / "h.txt").write_bytes(b"hidden\n")  # a hidden folder is never entered
    cp = run("cp", "-r", str(src / "batch"), str(w / "unprocessed"))
    assert cp.returncode == 0, cp.stderr
    wait_for(lambda: len(tree(w / "processed")) == len(made), timeout=30, what="every file processed")
    assert tree(w / "processed") == {rel: data.upper() for rel, data in made.items()}
    wait_for(lambda: tree(w / "failed") == {"batch/sub0/bin.dat": b"binary\x00data"}, what="bin.dat set aside")
    failure = d.status()["failures"][0]
    assert failure["name"] == "batch/sub0/bin.dat" and failure["reason"].startswith("binary content")
    # Emptied folders go once quiet; the hidden one (and so batch/) stays with its file; no claim folder is left.
    wait_for(lambda: subfolders(w / "unprocessed") == ["batch"], what="emptied folders removed")
    assert tree(w / "unprocessed", hidden=True) == {"batch/.hidden/h.txt": b"hidden\n"}
    wait_for(lambda: not subfolders(w / "underprocess"), what="no folder left in underprocess/")
    assert d.status()["folders_left"] == {"count": 0, "names": [], "recursive": True}
    wait_for(lambda: d.count("processed") == len(made), what="every result announced")  # after its commit
    # requeue a folder of failed/: its files go back to their folder in unprocessed/, and fail again there.
    rq = run(*INGESTD, "requeue", "--watch-dir", str(w), "batch")
    assert rq.returncode == 0 and "requeued batch/sub0/bin.dat" in rq.stdout, rq.stderr
    wait_for(lambda: d.count("failed") == 2, what="failed again after the requeue")
    assert tree(w / "failed") == {"batch/sub0/bin.dat": b"binary\x00data"}


def test_recursive_folder_made_then_filled_slowly_and_nested_later(start, tmp_path: Path) -> None:
    """A folder created empty, a pause, then files written slowly (the writer holds each open past settle_time)
    and a nested folder made later: nothing is taken early, nothing is left, the folder is removed at the end."""
    d = start(env=RECURSIVE)
    w = d.watch_dir
    box = w / "unprocessed" / "box"
    box.mkdir()
    time.sleep(0.1)  # cp's order: the folder first; it must still be there for the first file
    with open(box / "slow.txt", "wb") as f:
        for i in range(4):
            f.write(b"chunk %d\n" % i)
            f.flush()
            time.sleep(0.4)  # longer than settle_time (0.3 s): only the open writer keeps it waiting
            assert not tree(w / "underprocess") and not tree(w / "processed")
    (box / "inner" / "deeper").mkdir(parents=True)
    (box / "inner" / "deeper" / "d.txt").write_bytes(b"deep\n")
    (box / "inner" / "late.txt").write_bytes(b"late\n")
    expected = {"box/slow.txt": b"CHUNK 0\nCHUNK 1\nCHUNK 2\nCHUNK 3\n", "box/inner/deeper/d.txt": b"DEEP\n",
                "box/inner/late.txt": b"LATE\n"}
    wait_for(lambda: tree(w / "processed") == expected, what="three results with their paths")
    wait_for(lambda: not os.listdir(w / "unprocessed"), what="box/ removed once empty and quiet")
    assert not os.listdir(w / "underprocess") and not folder(w, "failed")
    # An empty folder copied in is removed too; a new folder of the same name later works as the first.
    (w / "unprocessed" / "box").mkdir()
    (w / "unprocessed" / "box" / "again.txt").write_bytes(b"again\n")
    wait_for(lambda: tree(w / "processed").get("box/again.txt") == b"AGAIN\n", what="a second life for box/")
    wait_for(lambda: not os.listdir(w / "unprocessed"), what="box/ removed again")


def test_recursive_hostile_names_and_symlinks_inside_folders(start, tmp_path: Path) -> None:
    """Inside folders as at the top: newlines and invalid UTF-8 are processed and shown escaped; a symlink to a
    folder fails as a symlink and is never followed, a FIFO fails without blocking; dot-names and temp names are
    left alone."""
    d = start(env=RECURSIVE)
    w = d.watch_dir
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "secret.txt").write_bytes(b"secret\n")
    up = os.fsencode(w / "unprocessed")
    os.mkdir(up + b"/odd\nfolder")
    os.mkdir(up + b"/odd\nfolder/\xff\xfe")
    with open(up + b"/odd\nfolder/\xff\xfe/na\nme\xff.txt", "wb") as f:
        f.write(b"weird\n")
    os.mkdir(up + b"/plain")
    os.symlink(target, up + b"/plain/link")
    os.mkfifo(up + b"/plain/pipe")  # nobody writes it: never blocked on
    with open(up + b"/plain/..dots", "wb") as f:
        f.write(b"dots\n")
    with open(up + b"/plain/x.part", "wb") as f:
        f.write(b"part\n")
    pr = os.fsencode(w / "processed")
    wait_for(lambda: os.path.exists(pr + b"/odd\nfolder/\xff\xfe/na\nme\xff.txt"), what="the hostile name processed")
    with open(pr + b"/odd\nfolder/\xff\xfe/na\nme\xff.txt", "rb") as f:
        assert f.read() == b"WEIRD\n"
    wait_for(lambda: tree(w / "failed") == {"plain/link": b"-> " + os.fsencode(target), "plain/pipe": b"<special>"},
             what="the symlink and the FIFO set aside")
    assert (target / "secret.txt").read_bytes() == b"secret\n"
    shown = "odd\\x0afolder/\\xff\\xfe/na\\x0ame\\xff.txt"  # escaped in the log, as at the top
    wait_for(lambda: d.event("processed", file=shown), what=f"processed event for {shown}")
    reasons = {f["name"]: f["reason"] for f in d.status()["failures"]}
    assert reasons == {"plain/link": "not a regular file: symlink (never followed)",
                       "plain/pipe": "not a regular file: FIFO"}
    time.sleep(0.8)
    assert sorted(os.listdir(w / "unprocessed" / "plain")) == ["..dots", "x.part"]  # never touched


def test_recursive_kill_9_mid_run_then_restart_every_file_exactly_once(start, tmp_path: Path) -> None:
    """kill -9 (daemon and workers) with files claimed into mirrored folders of underprocess/ and others still
    waiting in nested folders; the restart recovers each with its relative path: all there, once, none left."""
    cfg = tmp_path / "hang.toml"
    cfg.write_text(HANG_ROUTING)
    d = start("--config", str(cfg), "--workers", "1", env={**RECURSIVE, "INGESTD_STALL_TIME": "60"},
              new_session=True)
    w = d.watch_dir
    src = tmp_path / "src"
    made = make_batch(src, files=120)
    (src / "batch" / "sub1" / "deep" / "hang.txt").write_bytes(b"HANG here\n")  # its worker blocks on it
    made["batch/sub1/deep/hang.txt"] = b"HANG here\n"
    assert run("cp", "-r", str(src / "batch"), str(w / "unprocessed")).returncode == 0
    wait_for(lambda: d.status()["workers"][0].get("file") == "batch/sub1/deep/hang.txt", timeout=20,
             what="the worker stuck on hang.txt")
    in_flight = tree(w / "underprocess")
    assert "batch/sub1/deep/hang.txt" in in_flight
    os.killpg(d.proc.pid, signal.SIGKILL)  # the daemon and its workers, at once
    d.wait()
    first = {ev["file"] for ev in d.events if ev.get("event") == "processed"}
    left = tree(w / "unprocessed")
    assert len(left) + len(in_flight) + len(tree(w / "processed")) >= len(made)
    d2 = start("--workers", "2", env=RECURSIVE)  # without the hanging processor: uppercase
    wait_for(lambda: len(tree(w / "processed")) == len(made), timeout=30, what="every file processed")
    assert tree(w / "processed") == {rel: data.upper() for rel, data in made.items()}
    assert d2.count("recovered") >= 1 and d2.event("recovered", file="batch/sub1/deep/hang.txt")
    wait_for(lambda: not subfolders(w / "unprocessed") and not subfolders(w / "underprocess"),
             what="no folder left behind")
    assert not tree(w / "unprocessed") and not tree(w / "underprocess") and not tree(w / "failed")
    # Exactly once: a file announced as processed before the kill is never processed again, and none twice after.
    second = [ev["file"] for ev in d2.events if ev.get("event") == "processed"]
    assert len(second) == len(set(second)) and not first & set(second)
    assert first | set(second) == set(made)
