"""Break-it tests for the sweep of emptied folders (commit 16ec7f7, ingestd/sweep.py): real daemons, real folders.

Lost inotify events are made deterministic: the daemon's main process is stopped (SIGSTOP) while the test fills
its kernel queue past fs.inotify.max_queued_events (lowered for the daemon's inotify instance only: the limit
is read at inotify_init, and restored at once), then does the folder operations, then continues (SIGCONT). The
daemon then reads one IN_Q_OVERFLOW and rescans.

Each test marked FAULT failed before its fix (the docstring says what it found; fixed by the commits after
16ec7f7: birth-time identity, the sweep remembering every folder that left its name, an identity taken at each
claim, a rescan soon after a check finds its folder gone, start-up checks only for folders born before their
mirror, a floor on re-checks, listings that read the watch as they go); the one still open is
xfail(strict=True) with what it needs."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import DaemonProcess, cpu_used, wait_for
from test_directories import RECURSIVE, tree
from test_folder_moves import _emptied, replace_emptied_folders

SLOW = {**RECURSIVE, "INGESTD_SETTLE_TIME": "1", "INGESTD_FOLDER_QUIET_TIME": "1"}
QUEUED = Path("/proc/sys/fs/inotify/max_queued_events")


@pytest.fixture
def start(tmp_path: Path) -> Iterator:
    procs: list[DaemonProcess] = []

    def _start(env: dict[str, str] = SLOW, watch_dir: Path | None = None, queue: int | None = None) -> DaemonProcess:
        d = DaemonProcess(watch_dir or tmp_path / "w", env=env, cwd=tmp_path, new_session=True)
        procs.append(d)
        if queue is None:
            return d.started()
        old = QUEUED.read_text()
        try:
            QUEUED.write_text(str(queue))
        except OSError as e:
            pytest.skip(f"cannot lower max_queued_events: {e}")
        try:
            return d.started()
        finally:
            QUEUED.write_text(old)

    _start.procs = procs  # type: ignore[attr-defined]
    yield _start
    for d in procs:
        if d.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(d.proc.pid, signal.SIGCONT)
            os.killpg(d.proc.pid, signal.SIGKILL)
            d.kill()


def _gone(start) -> None:
    """End the test's daemons now (a running daemon makes its removed queue folders again)."""
    for d in start.procs:
        if d.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(d.proc.pid, signal.SIGCONT)
            os.killpg(d.proc.pid, signal.SIGKILL)
            d.kill()


@contextlib.contextmanager
def _overflowed(d: DaemonProcess, noise: int = 64) -> Iterator[None]:
    """The daemon stopped; its inotify queue filled with hidden files' events first (so that what the body does is
    lost), then the body runs; then the daemon goes on and reads an overflow."""
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        u = d.watch_dir / "unprocessed"
        for i in range(noise):
            (u / f".noise{i}").write_bytes(b"")
        yield
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)


def _visible(u: Path) -> list[str]:
    return sorted(n for n in os.listdir(u) if not n.startswith("."))


def _overflows(d: DaemonProcess) -> int:
    d.refresh()
    return d.count("overflow")




def _healthy(d: DaemonProcess) -> None:
    """Alive, and no exception caught by a failure boundary."""
    assert d.proc.poll() is None
    assert not [e for e in d.events if e.get("event") == "internal_error"]


def _all_processed(d: DaemonProcess, n: int, name: str) -> None:
    """Wait (25 s) for the n results of _one_file_folders(d, n, name); the daemon healthy after."""
    p = d.watch_dir / "processed" / name
    try:
        wait_for(lambda: p.is_dir() and len(os.listdir(p)) == n, timeout=25, interval=0.5, what=f"all {n} processed")
    except AssertionError as e:
        done = len(os.listdir(p)) if p.is_dir() else 0
        raise AssertionError(f"{e}: {done} processed, {_overflows(d)} overflows") from None
    _healthy(d)


def _one_file_folders(d: DaemonProcess, n: int, name: str) -> int:
    """A tree name/f0/a .. name/f{n-1}/a made beside the watch dir and moved into unprocessed/ whole."""
    stage = d.watch_dir.parent / f"stage-{name}"
    for i in range(n):
        (stage / name / f"f{i}").mkdir(parents=True)
        (stage / name / f"f{i}" / "a").write_bytes(b"x\n")
    (stage / name).rename(d.watch_dir / "unprocessed" / name)
    return n


# --- faults: folders the daemon emptied that stay for ever ----------------------------------------------------


def test_an_emptied_folder_renamed_while_inotify_events_were_lost_is_removed(start) -> None:
    """FAULT. The rename's IN_MOVED_FROM/IN_MOVED_TO are lost in an overflow: the overflow rescan calls
    _returned(subdirs), but nothing is in the sweep's departed map (only a dir_moved_out event puts a folder
    there), so batch2 is not recognised; the pending check for "batch" then misses twice (sweep.missing) and is
    forgotten. batch2 and batch2/deep, both emptied by the daemon, stay for ever (docs/guarantees.md: an overflow
    misses nothing). Fix (daemon._rescan / sweep): before _returned(subdirs) on an overflow rescan, move every
    pending check whose folder is not (or no longer) at its name, by identity, into departed (as gone(moved=True)
    does); or let a second miss in sweep.missing() put the ident into departed and have the next rescan find it."""
    files = {"batch/a.txt": b"a\n", "batch/deep/b.txt": b"b\n"}
    d = start(queue=16)
    u = _emptied(d, files)
    with _overflowed(d):
        (u / "batch").rename(u / "batch2")
    wait_for(lambda: _overflows(d), what="the overflow read")
    wait_for(lambda: not _visible(u), timeout=8, what="batch2 and batch2/deep removed")
    _healthy(d)


def test_an_emptied_folder_replaced_and_refilled_while_events_were_lost_is_removed(start) -> None:
    """FAULT. batch (A) is emptied; while events are lost (overflow) it is rm -rf'd and a producer makes batch
    (B, often A's inode number with a new birth time) with a file. The daemon claims batch/x.txt from B, but
    Sweep.at() keeps the identity it has for "batch" (A's: at() only asks for one when none is known), so each
    check finds "another folder" (prune's expect), misses twice and is forgotten: B, emptied by the daemon, stays
    for ever. Fix (daemon._check_folder_at): at a claim, the folder the file came from is the folder to remove:
    take identity() at every claim (or compare it and re-identify when it differs), not only the first time."""
    d = start(queue=16)
    u = _emptied(d, {"batch/a.txt": b"a\n"})
    with _overflowed(d):
        shutil.rmtree(u / "batch")
        (u / "batch").mkdir()
        (u / "batch" / "x.txt").write_bytes(b"x\n")
    wait_for(lambda: _overflows(d), what="the overflow read")
    wait_for(lambda: "batch/x.txt" in tree(d.watch_dir / "processed"), what="x processed")
    wait_for(lambda: not _visible(u), timeout=8, what="batch removed")
    _healthy(d)


def test_polling_watcher_an_emptied_folder_renamed_is_removed(start) -> None:
    """FAULT. INGESTD_WATCH=polling on ext4: a rename is dir_gone + dir_in (the poller cannot tell a move from a
    deletion), and _folder_gone(moved=False) forgets the check instead of remembering its identity, so batch2
    stays for ever (README: removed under whatever name it has then, on ext4/XFS/btrfs; nothing says inotify
    only). Fix (daemon._on_watch / sweep.gone): remember the identity on dir_gone too: with the birth time
    number a deleted folder's identity never comes back, so remembering it is harmless (bounded by DEPARTED_MAX
    and the TTL); "a deleted folder is forgotten at once" is not needed for safety."""
    files = {"batch/a.txt": b"a\n", "batch/deep/b.txt": b"b\n"}
    d = start({**SLOW, "INGESTD_WATCH": "polling", "INGESTD_POLL_INTERVAL": "0.1"})
    u = _emptied(d, files)
    (u / "batch").rename(u / "batch2")
    wait_for(lambda: not _visible(u), timeout=8, what="batch2 and batch2/deep removed")
    _healthy(d)


def test_an_emptied_folder_renamed_while_the_daemon_was_down_is_removed_at_start(start) -> None:
    """Was a GAP (strict xfail). The daemon is killed (-9) between the claims and the removal check; the folder is
    renamed while it is down. At start-up only subfolders with a mirror of the SAME name in underprocess/,
    processed/ or failed/ were checked, and the departed map was not persisted: batch2 stayed for ever. Now the
    pending checks' identities are kept in .ingestd/emptied (written at the claim: the first change in a second
    is saved at once), and a listed folder whose identity matches is checked at start."""
    d = start({**RECURSIVE, "INGESTD_SETTLE_TIME": "3", "INGESTD_FOLDER_QUIET_TIME": "3"})
    u = _emptied(d, {"batch/a.txt": b"a\n"})
    os.killpg(d.proc.pid, signal.SIGKILL)
    d.kill()
    (u / "batch").rename(u / "batch2")
    d2 = start()
    wait_for(lambda: "batch/a.txt" in tree(d2.watch_dir / "processed"), what="a processed")
    wait_for(lambda: not _visible(u), timeout=6, what="batch2 removed")


# --- faults: folders removed that must stay ------------------------------------------------------------------


def test_tmpfs_a_producers_folder_made_under_an_emptied_ones_name_while_events_were_lost_stays(start) -> None:
    """FAULT (tmpfs, lost events; the pre-change name-only check had it too). On tmpfs identity() is None, so the
    check of "batch" has no identity; the emptied batch is moved out and a producer makes batch while events are
    lost: nothing drops the check, prune has no `expect`, and the producer's new, never-filled folder is removed
    one settle time after it stops changing. Fix (spool.identity): on tmpfs (statfs TMPFS_MAGIC) fall back to
    (st_dev, st_ino, 0): shmem numbers inodes from a per-mount counter and does not hand a freed number to the
    next mkdir; or drop, on an overflow rescan, every pending check that has no identity."""
    shm = Path("/dev/shm") / f"break16-{os.getpid()}-{time.monotonic_ns()}"
    shm.mkdir()
    try:
        d = start(watch_dir=shm / "w", queue=16)
        u = _emptied(d, {"batch/a.txt": b"a\n"})
        with _overflowed(d):
            (u / "batch").rename(shm / "away")
            (u / "batch").mkdir()
        wait_for(lambda: _overflows(d), what="the overflow read")
        time.sleep(3.5)  # three settle times and more
        assert (u / "batch").is_dir(), "the producer's new folder was removed"
        _healthy(d)
    finally:
        _gone(start)
        shutil.rmtree(shm, ignore_errors=True)


@pytest.mark.parametrize("fs", ["ext4", "tmpfs"])
def test_a_producers_folder_renamed_onto_an_emptied_ones_name_stays(start, tmp_path: Path, fs: str) -> None:
    """FAULT on tmpfs (no lost events needed); HELD on ext4. A producer publishes its folder by rename
    (`mkdir prod; mv -T prod batch`, or from a hidden temp) onto the name of a folder the daemon just emptied:
    rename(2) replaces the empty batch. The parent's watch says only IN_MOVED_TO batch (no IN_DELETE: the
    victim's own watch gets IN_DELETE_SELF, which watch.read() drops), so the check of "batch" stays. On ext4
    its identity no longer matches and the new folder stays; on tmpfs (no identity) the producer's folder is
    removed. Fix (watch.read): a subfolder watch's IN_DELETE_SELF (the folder itself deleted or replaced)
    yields dir_gone for its rel, so the check is dropped whatever the file system; and/or the tmpfs fallback
    identity (see the test above)."""
    root = tmp_path if fs == "ext4" else Path("/dev/shm") / f"break16-{os.getpid()}-{time.monotonic_ns()}"
    root.mkdir(exist_ok=True)
    try:
        d = start(watch_dir=root / "w")
        u = _emptied(d, {"batch/a.txt": b"a\n"})
        (u / "prod").mkdir()
        os.rename(u / "prod", u / "batch")  # replaces the emptied, empty batch
        ino = os.stat(u / "batch").st_ino
        time.sleep(3.5)  # three settle times and more
        assert (u / "batch").is_dir() and os.stat(u / "batch").st_ino == ino, "the producer's folder was removed"
        _healthy(d)
    finally:
        if fs == "tmpfs":
            _gone(start)
            shutil.rmtree(root, ignore_errors=True)


def test_a_producers_empty_folder_named_like_an_earlier_batch_survives_a_restart(start) -> None:
    """FAULT (pre-existing, not this commit's code). Yesterday's batch/ was processed and removed; its results
    stay in processed/batch/. A producer makes today's unprocessed/batch/ and has not filled it yet; the daemon
    (re)starts: the start-up rescan schedules a removal check for every subfolder with a mirror of that name in
    processed/ (or failed/), so the producer's folder, never emptied by the daemon, is removed (the producer
    then gets ENOENT). Fix (daemon._rescan, reason == "startup"): identity helps here: persist the identities
    of pending checks and check at start only those folders; or only trust an underprocess/ mirror (claims in
    flight), not processed/ and failed/, which stay for ever."""
    d = start()
    u = _emptied(d, {"batch/a.txt": b"a\n"})
    wait_for(lambda: not _visible(u), timeout=8, what="batch removed")
    assert d.stop() == 0
    (u / "batch").mkdir()  # a producer's, to be filled in a moment
    d2 = start()
    time.sleep(3.5)
    assert (u / "batch").is_dir(), "the producer's empty folder was removed at start-up"
    _healthy(d2)


# --- faults: the daemon wedged --------------------------------------------------------------------------------


def test_a_big_tree_moved_in_while_an_emptied_folder_is_awaited_is_processed(start, tmp_path: Path) -> None:
    """FAULT (this commit; reproduces every time here). While any emptied folder is awaited (moved out in the
    last 300 s), _returned() calls identity() on every listed subfolder: an open(2) each, i.e. IN_OPEN and
    IN_CLOSE_NOWRITE on the parent's watch and on the subfolder's own watch, on top of the listing's own. A tree
    of 2,500 one-file folders then overflows the default 16,384-event queue by itself at each listing: overflow
    -> rescan (lists and opens every folder again) -> overflow ..., every ~0.3 s, and each overflow restarts
    every file's settle time (arrivals.forget_history): nothing is processed for up to DEPARTED_TTL (here 0 of
    2,500 in 25 s; the same tree without an awaited folder: all in ~5 s). Fix (daemon._returned): compare
    (st_dev, st_ino) from os.lstat() (no open, no event) with the departed identities first, and call identity()
    only for a folder whose number matches one."""
    d = start()
    u = d.watch_dir / "unprocessed"
    _emptied(d, {"batch/a.txt": b"a\n"})
    (u / "batch").rename(tmp_path / "away")  # awaited for 300 s
    n = _one_file_folders(d, 2500, "big")
    _all_processed(d, n, "big")


def test_a_tree_of_4500_folders_is_processed(start) -> None:
    """FAULT (pre-existing: a356e4d, before this commit, does the same). The same self-inflicted overflow loop
    without any awaited folder: listing ~4,100 or more watched folders makes >= 16,384 events (IN_OPEN and
    IN_CLOSE_NOWRITE of each folder on two watches), so each overflow rescan overflows again and each overflow
    restarts every settle time: 0 of 4,500 files processed, ~4 overflows a second, for ever (3,000 folders: all
    processed, no overflow). Fix (daemon._on_watch / arrivals.forget_history): rate-limit overflow rescans
    (back off while they keep overflowing) and keep a file's settle clock when its size and mtime are unchanged
    since the last listing, so the queue drains between rescans; or list with fewer events."""
    d = start()
    n = _one_file_folders(d, 4500, "big")
    _all_processed(d, n, "big")


def test_settle_time_0_a_folder_that_cannot_be_removed_does_not_spin(start) -> None:
    """FAULT (pre-existing logic, kept by this commit). settle_time = 0 is allowed (settings: _seconds(0)). An
    emptied folder whose rmdir fails (here its parent is append-only, chattr +a: EPERM; also a mount point, or a
    non-root daemon without write access to the parent) is "empty": _clean_folders re-arms its check at
    now + settle_time = now, due again at once: the main loop spins at 100% of a core for ever (3.0 s of CPU in
    3 s here). Fix (daemon._clean_folders): re-arm at max(now + settle_time, now + a floor such as 1 s), or only
    when the folder was merely not quiet yet; give up (once logged) when rmdir fails with EPERM/EACCES/EBUSY."""
    d = start({**RECURSIVE, "INGESTD_SETTLE_TIME": "0", "INGESTD_FOLDER_QUIET_TIME": "0"})
    u = d.watch_dir / "unprocessed"
    (u / "outer" / "batch").mkdir(parents=True)
    if os.system(f"chattr +a {u / 'outer'} 2>/dev/null"):
        pytest.skip("chattr +a needs root and ext4/xfs")
    try:
        (u / "outer" / "batch" / "a.txt").write_bytes(b"a\n")
        wait_for(lambda: "outer/batch/a.txt" in tree(d.watch_dir / "processed"), what="a processed")
        used = cpu_used(d.proc.pid)
        assert used < 0.5, f"the daemon used {used:.2f} s of CPU in 2 s, idle"
    finally:
        os.system(f"chattr -a {u / 'outer'}")


# --- held: behaviour confirmed --------------------------------------------------------------------------------


def test_renames_read_late_swaps_chains_and_a_deep_tree_all_go_and_a_producers_folder_stays(start, tmp_path) -> None:
    """HELD. While the daemon is stopped (its events read late, when the names they carry are long gone): a<->b
    swapped through tmp inside unprocessed/, a chain c->d->e, a tree renamed, a subfolder lifted out of it, the
    tree moved out and back under a third name; and a producer's mkdir p. Every emptied folder goes, p stays."""
    files = {"a/x/1.txt": b"1\n", "b/2.txt": b"2\n", "c/3.txt": b"3\n", "t/d0/e0/4.txt": b"4\n",
             "t/d1/5.txt": b"5\n"}
    d = start()
    u = _emptied(d, files)
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        (u / "a").rename(u / "tmp")
        (u / "b").rename(u / "a")
        (u / "tmp").rename(u / "b")
        (u / "c").rename(u / "d")
        (u / "d").rename(u / "e")
        (u / "t").rename(u / "t2")
        (u / "t2" / "d1").rename(u / "d1moved")
        (u / "t2").rename(tmp_path / "t3")
        (tmp_path / "t3").rename(u / "t4")
        (u / "p").mkdir()
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    wait_for(lambda: _visible(u) == ["p"], timeout=10, what="every emptied folder removed, p kept")
    time.sleep(2.5)
    assert _visible(u) == ["p"]
    assert {k: v.lower() for k, v in tree(d.watch_dir / "processed").items()} == files
    _healthy(d)


def test_ext4_lost_events_never_cost_a_producers_folder(start, tmp_path) -> None:
    """HELD (the identity's job). While events are lost: an emptied folder rm -rf'd and made again (the freed
    inode number, a new birth time), one moved out and made again, one moved out and deleted outside, and a
    producer's mkdir: every new folder stays."""
    d = start(queue=16)
    u = _emptied(d, {"gone/a.txt": b"a\n", "swapped/b.txt": b"b\n", "exiled/c.txt": b"c\n"})
    with _overflowed(d):
        replace_emptied_folders(u, tmp_path)
    wait_for(lambda: _overflows(d), what="the overflow read")
    time.sleep(3.5)
    assert _visible(u) == ["gone", "producer", "swapped"]
    assert (tmp_path / "swapped-away").is_dir()
    _healthy(d)


def test_polling_a_producers_folder_made_under_an_emptied_ones_name_stays(start, tmp_path) -> None:
    """HELD. Polling watcher (2 s): emptied folders rm -rf'd or moved out and made again between two listings
    (the poller sees no change at all: a folder is known by its name): the identity keeps both."""
    d = start({**SLOW, "INGESTD_WATCH": "polling", "INGESTD_POLL_INTERVAL": "2"})
    u = _emptied(d, {"gone/a.txt": b"a\n", "swapped/b.txt": b"b\n"})
    shutil.rmtree(u / "gone")
    (u / "gone").mkdir()
    (u / "swapped").rename(tmp_path / "swapped-away")
    (u / "swapped").mkdir()
    time.sleep(4.5)
    assert _visible(u) == ["gone", "swapped"]
    assert (tmp_path / "swapped-away").is_dir()
    _healthy(d)


def test_symlinks_in_place_of_emptied_folders_are_not_followed(start, tmp_path) -> None:
    """HELD. An emptied folder moved out and a symlink to it put under its name; another deleted and replaced by
    a symlink to an empty folder outside: nothing outside is removed, the daemon lives."""
    d = start()
    u = _emptied(d, {"batch/a.txt": b"a\n", "other/b.txt": b"b\n"})
    (u / "batch").rename(tmp_path / "outside")
    (u / "batch").symlink_to(tmp_path / "outside")
    shutil.rmtree(u / "other")
    (tmp_path / "empty").mkdir()
    (u / "other").symlink_to(tmp_path / "empty")
    time.sleep(3.5)
    assert (tmp_path / "outside").is_dir() and (tmp_path / "empty").is_dir()
    _healthy(d)


def test_an_emptied_folder_moved_out_and_back_below_a_producers_folder_goes(start, tmp_path) -> None:
    """HELD. Moved out, then back in one level down (inside a producer's fresh folder): found by identity, removed."""
    d = start()
    u = _emptied(d, {"batch/a.txt": b"a\n"})
    (u / "batch").rename(tmp_path / "x")
    (u / "prod").mkdir()
    (tmp_path / "x").rename(u / "prod" / "x")
    wait_for(lambda: not (u / "prod" / "x").exists(), timeout=8, what="prod/x removed")
    _healthy(d)
