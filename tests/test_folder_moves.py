"""Folders the daemon emptied, then renamed or moved out and back before their removal (recursive mode).

Found by CI: test_break_dirs' renamed-tree test left big3/d0, big3/d2 and d1moved/e0..e2 in unprocessed/ for
ever when the daemon had claimed every file under the tree's earlier names (big/, big2/): the removal check was
scheduled under the old name, found nothing there, and was dropped. Now the daemon knows an emptied folder by
its identity (inode number and birth time) across a rename (ingestd/sweep.py, ingestd/inode.py). The other
side, that nothing else is ever removed: a folder deleted after the daemon emptied it, then a producer's `mkdir` (which the file system may give
the same inode number), and a new folder made under an emptied folder's name, both stay."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from support import DaemonProcess, wait_for
from test_break_dirs import start  # noqa: F401 (fixture)
from test_directories import RECURSIVE, tree

# Settle time 1 s: a folder's removal check comes 1 s after the claim that emptied it, long enough for each test
# to rename the folder first, once it has seen the claim.
SLOW = {**RECURSIVE, "INGESTD_SETTLE_TIME": "1", "INGESTD_FOLDER_QUIET_TIME": "1"}


def _emptied(d: DaemonProcess, files: dict[str, bytes]) -> Path:
    """Move `files` (paths relative to unprocessed/) in, their folders made beside the watch dir and each moved
    in whole (so the daemon finds every file by a listing and claims them all after one settle time, in one
    turn), and wait until each is claimed: their folders' removal checks are then one settle time away. Returns
    unprocessed/."""
    u = d.watch_dir / "unprocessed"
    stage = d.watch_dir.parent / "stage"
    for rel, data in files.items():
        (stage / rel).parent.mkdir(parents=True, exist_ok=True)
        (stage / rel).write_bytes(data)
    for top in os.listdir(stage):
        (stage / top).rename(u / top)
    wait_for(lambda: not any((u / rel).exists() for rel in files), what="every file claimed")
    return u


def replace_emptied_folders(u: Path, outside: Path) -> None:
    """The emptied gone/, swapped/ and exiled/ of unprocessed/ `u`: gone/ deleted and made again (ext4 often gives
    it the freed inode number), swapped/ moved to `outside` and made again, exiled/ moved out and deleted there;
    then a producer's new producer/. Every folder left in `u` is one the daemon did not empty."""
    shutil.rmtree(u / "gone")
    (u / "gone").mkdir()
    (u / "swapped").rename(outside / "swapped-away")
    (u / "swapped").mkdir()
    (u / "exiled").rename(outside / "exiled")
    (outside / "exiled").rmdir()
    (u / "producer").mkdir()


def _processed(d: DaemonProcess, files: dict[str, bytes]) -> None:
    want = {rel: data.upper() for rel, data in files.items()}
    wait_for(lambda: tree(d.watch_dir / "processed") == want, what="each file processed once, under its path")


def test_an_emptied_folder_renamed_before_its_removal_goes_under_its_new_name(start) -> None:  # noqa: F811
    files = {"batch/a.txt": b"a\n", "batch/deep/b.txt": b"b\n"}
    d = start(env=SLOW)
    u = _emptied(d, files)
    (u / "batch").rename(u / "batch2")
    _processed(d, files)
    wait_for(lambda: not os.listdir(u), timeout=10, what="batch2 and batch2/deep removed")
    assert d.proc.poll() is None


def test_an_emptied_folder_moved_out_and_back_goes(start, tmp_path: Path) -> None:  # noqa: F811
    files = {"tree/x/a.txt": b"a\n", "tree/y/b.txt": b"b\n", "tree/y/z/c.txt": b"c\n"}
    d = start(env=SLOW)
    u = _emptied(d, files)
    (u / "tree").rename(tmp_path / "away")
    time.sleep(1.5)  # past the removal checks under the old name
    (tmp_path / "away").rename(u / "back")
    _processed(d, files)
    wait_for(lambda: not os.listdir(u), timeout=10, what="back/ and its emptied folders removed")
    assert not (tmp_path / "away").exists()


def test_an_emptied_subfolder_moved_to_the_top_goes_and_its_old_parent_stays(start) -> None:  # noqa: F811
    """outer/ was emptied by the user's mv, not by a claim: it stays, like any folder emptied by hand."""
    files = {"outer/inner/a.txt": b"a\n", "outer/inner/deeper/b.txt": b"b\n"}
    d = start(env=SLOW)
    u = _emptied(d, files)
    (u / "outer" / "inner").rename(u / "lifted")
    _processed(d, files)
    wait_for(lambda: os.listdir(u) == ["outer"], timeout=10, what="lifted/ and lifted/deeper removed")
    time.sleep(2.5)  # two settle times more
    assert os.listdir(u) == ["outer"] and not os.listdir(u / "outer")


def test_a_folder_with_files_left_is_kept_after_a_rename_until_they_are_claimed(start) -> None:  # noqa: F811
    """A renamed folder still holding a file the daemon has not claimed (one that is still being written) is not
    removed: its file is processed under the new name, then the folder goes."""
    d = start(env=SLOW)
    u = _emptied(d, {"job/a.txt": b"a\n"})
    with open(u / "job" / "late.txt", "wb") as f:  # held open: not complete, so not claimed
        f.write(b"late\n")
        (u / "job").rename(u / "job2")
        time.sleep(2.5)  # past the removal checks
        assert (u / "job2" / "late.txt").exists()
    _processed(d, {"job/a.txt": b"a\n", "job2/late.txt": b"late\n"})
    wait_for(lambda: not os.listdir(u), timeout=10, what="job2 removed once emptied")


def test_a_producers_folder_is_never_removed_after_an_emptied_one_went(start, tmp_path: Path) -> None:  # noqa: F811
    """The other side: nothing but a folder the daemon emptied is removed.
    1. An emptied folder deleted by hand (rm -rf), then a producer's mkdir: the file system often reuses the
       freed inode number, which must not pass for the emptied folder (a deletion is forgotten at once).
       Found before it landed: with (st_dev, st_ino) as the identity, case 3 removed the producer's folder.
    2. An emptied folder moved out, and a new folder made under its name before the check: another folder.
    3. Same, with the emptied folder moved away for good and its inode freed outside: the producer's new
       folder may get its number; it stays."""
    d = start(env=SLOW)
    u = _emptied(d, {"gone/a.txt": b"a\n", "swapped/b.txt": b"b\n", "exiled/c.txt": b"c\n"})
    replace_emptied_folders(u, tmp_path)
    time.sleep(3.5)  # three settle times and more: well past every check
    assert sorted(os.listdir(u)) == ["gone", "producer", "swapped"]
    (u / "gone" / "late.txt").write_bytes(b"late\n")  # the producer goes on: no ENOENT
    (u / "producer" / "p.txt").write_bytes(b"p\n")
    (u / "swapped" / "s.txt").write_bytes(b"s\n")
    wait_for(lambda: {"gone/late.txt", "producer/p.txt", "swapped/s.txt"} <= set(tree(d.watch_dir / "processed")),
             what="the producers' files processed")
    assert (tmp_path / "swapped-away").is_dir()  # never touched outside the watch dir
    assert d.proc.poll() is None
