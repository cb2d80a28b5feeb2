"""Real inotify on a tmp folder: what writes, renames, links and deletes look like as Changes."""

from __future__ import annotations

import gc
import os
import select
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingestd.watch import Change, Watch


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
    assert drain(watch) == [Change("create", "f"), Change("open", "f"), Change("close", "f")]


def test_reopen_to_append_gives_open_and_close_again(folder: Path, watch: Watch) -> None:
    (folder / "f").write_bytes(b"1")
    drain(watch)
    with open(folder / "f", "ab") as f:
        f.write(b"2")
    assert drain(watch) == [Change("open", "f"), Change("close", "f")]


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
    assert drain(watch) == [Change("create", ".f.XyZ"), Change("open", ".f.XyZ"), Change("close", ".f.XyZ"),
                            Change("gone", ".f.XyZ"), Change("moved_in", "f")]


def test_symlink_and_mkdir_give_create(folder: Path, watch: Watch) -> None:
    (folder / "s").symlink_to("/etc/passwd")
    (folder / "sub").mkdir()
    assert drain(watch) == [Change("create", "s"), Change("create", "sub")]


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
