"""Real inotify on a tmp folder: what writes, renames, links and deletes look like as Changes."""

from __future__ import annotations

import errno
import gc
import os
import select
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingestd.spool import SpoolError
from ingestd.watch import Change, Watch, WatchLimit


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "unprocessed"
    d.mkdir()
    return d


@pytest.fixture
def watch(folder: Path) -> Iterator[Watch]:
    """A Watch on `folder`, closed after the test."""
    w = Watch(str(folder))
    yield w
    w.close()


def drain(w: Watch, timeout: float = 1.0) -> list[Change]:
    """Everything queued, waiting for the fd like the daemon's poll() does; stops when nothing more comes."""
    out: list[Change] = []
    p = select.poll()
    p.register(w.fileno(), select.POLLIN)
    while p.poll(timeout * 1000 if not out else 50):
        out.extend(w.read())
    return out


def test_read_without_events_does_not_block(watch: Watch) -> None:
    assert list(watch.read()) == []


def test_writer_gives_create_open_close(folder: Path, watch: Watch) -> None:
    with open(folder / "f", "wb") as f:
        f.write(b"x")
    assert drain(watch) == [Change("create", "f"), Change("open", "f"), Change("close_write", "f")]


def test_reopen_to_append_gives_open_and_close_again(folder: Path, watch: Watch) -> None:
    (folder / "f").write_bytes(b"1")
    drain(watch)
    with open(folder / "f", "ab") as f:
        f.write(b"2")
    assert drain(watch) == [Change("open", "f"), Change("close_write", "f")]


def test_reader_gives_open_and_close(folder: Path, watch: Watch) -> None:
    (folder / "f").write_bytes(b"1")
    drain(watch)
    (folder / "f").read_bytes()
    assert drain(watch) == [Change("open", "f"), Change("close", "f")]


def test_rename_in_gives_moved_in_alone(folder: Path, watch: Watch, tmp_path: Path) -> None:
    src = tmp_path / "outside"
    src.write_bytes(b"x")
    os.rename(src, folder / "r")
    assert drain(watch) == [Change("moved_in", "r")]


def test_link_gives_create_alone(folder: Path, watch: Watch, tmp_path: Path) -> None:
    src = tmp_path / "outside"
    src.write_bytes(b"x")
    os.link(src, folder / "l")
    os.unlink(src)  # the SFTP way: link() then unlink() of the temp elsewhere
    assert drain(watch) == [Change("create", "l")]


def test_delete_gives_gone(folder: Path, watch: Watch) -> None:
    (folder / "d").write_bytes(b"x")
    drain(watch)
    os.unlink(folder / "d")
    assert drain(watch) == [Change("gone", "d")]


def test_rename_out_gives_gone(folder: Path, watch: Watch, tmp_path: Path) -> None:
    (folder / "m").write_bytes(b"x")
    drain(watch)
    os.rename(folder / "m", tmp_path / "claimed")  # what a claim into underprocess/ looks like
    assert drain(watch) == [Change("gone", "m")]


def test_rsync_style_dot_temp_then_rename(folder: Path, watch: Watch) -> None:
    (folder / ".f.XyZ").write_bytes(b"x")
    os.rename(folder / ".f.XyZ", folder / "f")
    assert drain(watch) == [Change("create", ".f.XyZ"), Change("open", ".f.XyZ"), Change("close_write", ".f.XyZ"),
                            Change("gone", ".f.XyZ"), Change("moved_in", "f")]


def test_symlink_gives_create_and_a_folder_gives_dir_in(folder: Path, watch: Watch, tmp_path: Path) -> None:
    """A folder is never a file to claim (issue 9): mkdir, a folder moved in, and a symlink to a folder (a file
    entry, never followed) each say what they are; a folder removed or moved out says dir_gone."""
    (folder / "s").symlink_to("/etc/passwd")
    (folder / "sub").mkdir()
    (tmp_path / "outside").mkdir()
    os.rename(tmp_path / "outside", folder / "moved")
    (folder / "dirlink").symlink_to(tmp_path)
    os.rename(folder / "moved", tmp_path / "back")
    (folder / "sub").rmdir()
    assert drain(watch) == [Change("create", "s"), Change("dir_in", "sub"), Change("dir_in", "moved"),
                            Change("create", "dirlink"), Change("dir_gone", "moved"), Change("dir_gone", "sub")]


def test_subfolders_are_watched_only_when_added_and_events_carry_the_relative_path(
        folder: Path, watch: Watch, tmp_path: Path) -> None:
    """recursive mode: add() a subfolder before listing it; its files' events name "sub/deep/f"; a folder
    swapped for a symlink is refused (never followed); drop() ends the watches below a folder."""
    (folder / "sub" / "deep").mkdir(parents=True)
    drain(watch)
    (folder / "sub" / "early.txt").write_bytes(b"x")  # before the watch: no event (the listing finds it)
    assert watch.add("sub") and watch.add("sub/deep")
    assert drain(watch) == []
    (folder / "sub" / "deep" / "f").write_bytes(b"x")
    (folder / "sub" / "inner").mkdir()
    assert drain(watch) == [Change("create", "sub/deep/f"), Change("open", "sub/deep/f"),
                            Change("close_write", "sub/deep/f"), Change("dir_in", "sub/inner")]
    (folder / "link").symlink_to(tmp_path)
    assert not watch.add("link") and not watch.add("gone")
    assert watch.watched() == {"sub", "sub/deep"}
    watch.drop("sub")
    assert watch.watched() == set()
    (folder / "sub" / "deep" / "g").write_bytes(b"x")
    assert [c for c in drain(watch) if c.name.startswith("sub/")] == []
    (folder / "sub2").mkdir()
    assert watch.add("sub2")
    os.rmdir(folder / "sub2")  # its watch ends by itself (IN_IGNORED): forgotten, no lost_watch
    assert drain(watch) == [Change("dir_in", "sub2"), Change("dir_gone", "sub2")]
    assert watch.watched() == set()


def test_a_subfolder_replaced_under_its_name_leaves_no_dead_watch_behind(folder: Path, watch: Watch) -> None:
    """A folder removed and made again under the same name gets its new watch before the old one's IN_IGNORED
    is read (the listing adds it at once). The dead watch's entry was kept for good: one leaked per replacement,
    for the life of a daemon whose producers reuse a batch folder's name."""
    for _ in range(50):
        (folder / "batch").mkdir()
        assert watch.add("batch")
        os.rmdir(folder / "batch")
    (folder / "batch").mkdir()
    assert watch.add("batch")
    drain(watch)
    assert watch.watched() == {"batch"}
    assert len(watch._dirs) == 2  # the folder itself and batch/: nothing for the 50 removed ones
    (folder / "batch" / "f").write_bytes(b"x")
    assert Change("close_write", "batch/f") in drain(watch)


def test_non_utf8_name_round_trips(folder: Path, watch: Watch) -> None:
    name = os.fsdecode(b"caf\xe9\n")
    (folder / name).write_bytes(b"")
    changes = drain(watch)
    assert changes[0] == Change("create", name)
    assert os.path.exists(os.path.join(folder, changes[0].name))


def test_folder_removed_gives_lost_watch(folder: Path, watch: Watch) -> None:
    shutil.rmtree(folder)
    assert Change("lost_watch") in drain(watch)


def test_folder_renamed_gives_lost_watch(folder: Path, watch: Watch, tmp_path: Path) -> None:
    os.rename(folder, tmp_path / "elsewhere")
    assert drain(watch) == [Change("lost_watch")]


def test_overflow_maps_to_overflow(folder: Path, watch: Watch) -> None:
    """Open/close one file until the kernel queue (max_queued_events) overflows: one overflow Change appears."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 100_000:
        pytest.skip(f"max_queued_events is {limit}: an overflow would take too long here")
    path = folder / "f"
    path.write_bytes(b"")
    for _ in range(limit // 2 + 10):  # each open+close queues two events (alternating, so never merged)
        os.close(os.open(path, os.O_RDONLY))
    changes = drain(watch)
    assert changes[-1] == Change("overflow")
    assert changes.count(Change("overflow")) == 1
    assert len(changes) >= limit


def test_watch_on_a_file_or_missing_folder_fails_without_leaking(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError):
        Watch(str(tmp_path / "file"))  # IN_ONLYDIR
    with pytest.raises(OSError):
        Watch(str(tmp_path / "missing"))
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before


def test_fileno_is_pollable_and_not_inherited(watch: Watch) -> None:
    fd = watch.fileno()
    assert fd >= 0 and not os.get_inheritable(fd)


# --- events are hints: what the kernel merges (issue 8) --------------------------------------------------------------
def test_two_unread_opens_merge_into_one(folder: Path, watch: Watch) -> None:
    """inotify(7): an event identical to the last one still unread is dropped. Two opens give one IN_OPEN."""
    (folder / "f").write_bytes(b"1")
    drain(watch)
    a = os.open(folder / "f", os.O_WRONLY)
    b = os.open(folder / "f", os.O_RDONLY)
    try:
        assert drain(watch) == [Change("open", "f")]
    finally:
        os.close(b)
        os.close(a)
    assert drain(watch) == [Change("close", "f"), Change("close_write", "f")]


def test_two_unread_reader_closes_merge_into_one(folder: Path, watch: Watch) -> None:
    (folder / "f").write_bytes(b"1")
    drain(watch)
    a = os.open(folder / "f", os.O_RDONLY)
    assert drain(watch) == [Change("open", "f")]
    b = os.open(folder / "f", os.O_RDONLY)
    assert drain(watch) == [Change("open", "f")]  # read in between: not merged
    os.close(a)
    os.close(b)
    assert drain(watch) == [Change("close", "f")], "two closes, one event: a count would stay at 1"


def test_chmod_and_utime_by_path_give_attrib(folder: Path, watch: Watch, tmp_path: Path) -> None:
    """shutil.copy2: the data, the close, then chmod and utime by path, which the quiet period waits for."""
    (tmp_path / "src").write_bytes(b"data\n")
    shutil.copy2(tmp_path / "src", folder / "c")
    changes = drain(watch)
    assert changes[:3] == [Change("create", "c"), Change("open", "c"), Change("close_write", "c")]
    assert set(changes[3:]) == {Change("attrib", "c")}


# --- inotify limits: one clear error (issue 8, kind 2) -----------------------------------------------------------------
NOBODY = 65534


def _as_nobody_without_instances(tmp_path: Path) -> tuple[int, str]:
    """In a child running as nobody, use up nobody's inotify instances (fs.inotify.max_user_instances is per
    user: nothing of root's, or of the other tests', is touched), then try a Watch. Returns (status, message)."""
    if os.geteuid() != 0:
        pytest.skip("switching to the user nobody needs root")
    folder = tmp_path / "wl"
    folder.mkdir()
    os.chmod(tmp_path, 0o755)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 3
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            from inotify_simple import INotify

            held = []
            try:
                while True:
                    held.append(INotify())
            except OSError:
                pass
            try:
                Watch(str(folder))
                os.write(w, b"no error")
                code = 1
            except WatchLimit as e:
                os.write(w, str(e).encode()[:4000])
                code = 0 if isinstance(e, SpoolError) else 2  # anything else: exit 3, a failure
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        message = f.read().decode()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), message


def test_no_inotify_instance_left_is_a_clear_watch_limit(tmp_path: Path) -> None:
    code, message = _as_nobody_without_instances(tmp_path)
    assert code == 0, message
    assert "fs.inotify.max_user_instances" in message and "EMFILE" in message, message


def test_no_inotify_watch_left_is_a_clear_watch_limit(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """max_user_watches is too big to use up in a test: only the add_watch syscall is made to fail, as the
    kernel does (ENOSPC), and the instance must not leak."""
    import inotify_simple

    def enospc(self: object, path: str, mask: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(inotify_simple.INotify, "add_watch", enospc)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(WatchLimit, match="fs.inotify.max_user_watches"):
        Watch(str(folder))
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before


def test_daemon_without_an_inotify_instance_says_so_in_one_line_and_exits_75(request: pytest.FixtureRequest) -> None:
    """`ingestd run` as nobody, started holding every inotify instance nobody may have: one line naming the
    sysctl, exit 75 (EX_TEMPFAIL: instances come back as other programs exit, so systemd's restart may work)."""
    if os.geteuid() != 0:
        pytest.skip("switching to the user nobody needs root")
    python = shutil.which("python3.11", path="/usr/bin:/usr/local/bin")
    if python is None:
        pytest.skip("no python3.11 the user nobody may execute")
    base = Path(tempfile.mkdtemp(prefix="ingestd-inotify-", dir="/tmp"))  # pytest's tmp_path is root's only
    request.addfinalizer(lambda: shutil.rmtree(base, ignore_errors=True))
    w = base / "w"
    for sub in ("unprocessed", "underprocess", "processed", "failed", ".ingestd"):
        (w / sub).mkdir(parents=True)
    for p in (base, w, *w.iterdir()):
        os.chown(p, NOBODY, NOBODY)
    from torture.lib import readable_copy  # the clone may lie where nobody cannot read (a mktemp -d folder)

    pythonpath = readable_copy(base / "lib")
    hog = ("import os, sys\nfrom inotify_simple import INotify\nheld = []\n"
           "try:\n    while True: held.append(INotify(inheritable=True))\nexcept OSError: pass\n"
           "os.execv(sys.executable, [sys.executable, '-m', 'ingestd', *sys.argv[1:]])\n")

    def nobody() -> None:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    out = subprocess.run([python, "-c", hog, "run", "--watch-dir", str(w), "--listen", "127.0.0.1:0"],
                         preexec_fn=nobody, capture_output=True, text=True, timeout=60, cwd=base, check=False,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(base),
                              "PYTHONPATH": pythonpath})
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 75, out.stderr
    assert len(lines) == 1 and "fs.inotify.max_user_instances" in lines[0], out.stderr


def test_drop_costs_what_is_under_the_folder_not_every_watch(folder: Path, watch: Watch) -> None:
    """drop(below=True) runs for every folder leaving unprocessed/: it scanned every watch (quadratic with
    thousands of emptied folders pending and watched; tests/test_break_round8.py). 6,000 watched folders, each
    dropped: CPU time only (the rm_watch calls included), no sleeps."""
    import time

    n = 6_000
    for i in range(n):
        (folder / f"b{i:05d}").mkdir()
        assert watch.add(f"b{i:05d}")
    (folder / "tree" / "deep").mkdir(parents=True)
    (folder / "treehouse").mkdir()
    for rel in ("tree", "tree/deep", "treehouse"):
        assert watch.add(rel)
    t = time.process_time()
    for i in range(n):
        watch.drop(f"b{i:05d}")
    took = time.process_time() - t
    assert took < 0.3, f"{n} folders dropped one by one took {took:.2f} s of CPU (each scanned every watch)"
    watch.drop("tree")
    assert watch.watched() == {"treehouse"}
