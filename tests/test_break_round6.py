"""Break-it round 6 (helper): what 54a5efe (a subfolder's IN_IGNORED always forgets its watch) and f4aaca1
(collision reasons name the blocking entry) changed. Real daemons, real folders, real inotify.

Each test states what it tried. The two faults found (a stale `gone`, a blocker named without processed/) are
fixed; their tests now pass."""

from __future__ import annotations

import collections
import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
from support import wait_for
from test_break_dirs import start  # noqa: F401 (fixture)
from test_directories import RECURSIVE, tree

from ingestd.names import display

# The 30 s safety-net rescan would hide a miss: far away, so a file found late is a file the watch missed.
NO_RESCAN = {**RECURSIVE, "INGESTD_RESCAN_INTERVAL": "3600", "INGESTD_SETTLE_TIME": "0.2",
             "INGESTD_FOLDER_QUIET_TIME": "0.2"}


def _write(path: Path, data: bytes) -> bool:
    """A producer's write; False when its folder went away under it (the daemon removed an emptied folder)."""
    try:
        with open(path, "wb") as f:
            f.write(data)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


def _results(w: Path) -> dict[str, list[str]]:
    """Basename -> every path in processed/ holding a result of that name (superseded ones included)."""
    out: dict[str, list[str]] = collections.defaultdict(list)
    for rel in tree(w / "processed"):
        base = rel.rsplit("/", 1)[-1]
        out[base.split(".superseded-")[0]].append(rel)
    return out


def _names(root: Path) -> set[str]:
    """Files under root, hidden ones left out; names only (a file claimed meanwhile is no error)."""
    return {os.path.relpath(os.path.join(r, f), root) for r, _, fs in os.walk(root) for f in fs if not f.startswith(".")}


def _check_once(d, w: Path, written: dict[str, bytes], timeout: float = 20.0) -> None:
    """Every file written is processed exactly once (one result, the right bytes), nothing failed, nothing left."""
    def done() -> bool:
        return len(_results(w)) >= len(written) and not _names(w / "unprocessed") and not _names(w / "underprocess")

    try:
        wait_for(done, timeout=timeout, interval=0.2, what="every file processed")
    except AssertionError as e:
        res = _results(w)
        missing = sorted(set(written) - set(res))
        left = _names(w / "unprocessed")
        raise AssertionError(f"{e}: {len(missing)} of {len(written)} never processed: {missing[:10]}; still in "
                             f"unprocessed/: {sorted(left)[:10]}; underprocess/: {sorted(_names(w / 'underprocess'))[:10]}"
                             ) from None
    res = _results(w)
    doubled = {k: v for k, v in res.items() if len(v) != 1}
    assert not doubled, f"results doubled: {list(doubled.items())[:5]}"
    data = {rel.rsplit("/", 1)[-1]: b for rel, b in tree(w / "processed").items()}
    bad = [k for k, b in written.items() if data.get(k) != b.upper()]
    assert not bad, f"wrong bytes: {bad[:5]}"
    assert not tree(w / "failed"), tree(w / "failed")
    names = collections.Counter(os.path.basename(ev.get("file", "")) for ev in d.events if ev.get("event") == "processed")
    assert not [n for n, c in names.items() if c > 1], "processed twice (events)"
    assert d.proc.poll() is None, "the daemon died"


def test_a_batch_folder_replaced_under_its_name_while_written_misses_nothing(start) -> None:  # noqa: F811
    """Tried: three batch folder names reused at full speed: made, filled, then removed by the producer (rm -rf,
    what it held withdrawn), renamed inside the tree (same inode: same watch descriptor under a new name), or
    emptied by the daemon and removed by its sweep, and made again, while the daemon enters each new one; so new
    watches are added before old ones' IN_IGNORED are read (the case 54a5efe changed). With the 30 s rescan out
    of the way, every file written must be claimed from its watch's events: none missed, none twice. Held (8 s,
    about 3,000 files; 3 runs). A variant that moved the old folder's files back into the new one missed files:
    see test_a_file_moved_from_the_old_folder_into_its_replacement_is_not_forgotten."""
    d = start(env=NO_RESCAN)
    w = d.watch_dir
    u = w / "unprocessed"
    written: dict[str, bytes] = {}
    rnd = random.Random(6)
    end = time.monotonic() + 8
    i = 0
    while time.monotonic() < end:
        b = u / f"batch{i % 3}"
        b.mkdir(exist_ok=True)
        for _ in range(rnd.randint(1, 4)):
            name = f"f{i:06d}.txt"
            if _write(b / name, f"{name}\n".encode()):
                written[name] = f"{name}\n".encode()
            i += 1
        r = rnd.random()
        if r < 0.25:
            # The producer withdraws the folder with what the daemon has not claimed yet (rm -rf): those files are
            # its own doing, not counted; the name is made again at the next turn.
            try:
                gone = os.listdir(b)
            except FileNotFoundError:
                gone = []
            shutil.rmtree(b, ignore_errors=True)
            for f in gone:
                written.pop(f, None)
        elif r < 0.5:
            # Renamed inside the tree (same inode, same watch descriptor under a new name), the name made again at
            # the next turn: what was in it is processed from its new place.
            try:
                os.rename(b, u / f"moved{i}")
            except FileNotFoundError:
                pass
        if rnd.random() < 0.3:
            time.sleep(0.01)
    _check_once(d, w, written)


def test_a_folder_moved_inside_the_tree_then_removed_keeps_its_new_watch(start) -> None:  # noqa: F811
    """Tried: a folder moved inside the tree keeps its inode, so inotify_add_watch for its new name returns its
    old watch descriptor (Watch.add's `old`); then folders named like its old place are made and removed again
    (their IN_IGNORED read later), and files keep arriving in the moved one. A stray IN_IGNORED must never
    forget the moved folder's live watch. Held."""
    d = start(env=NO_RESCAN)
    w = d.watch_dir
    u = w / "unprocessed"
    written: dict[str, bytes] = {}
    n = 0

    def put(folder: Path) -> None:
        nonlocal n
        name = f"m{n:05d}.txt"
        n += 1
        assert _write(folder / name, f"{name}\n".encode())
        written[name] = f"{name}\n".encode()

    for round_ in range(30):
        a, b = u / f"a{round_}", u / "deep" / f"b{round_}"
        (u / "deep").mkdir(exist_ok=True)
        a.mkdir()
        (a / "sub").mkdir()
        (a / ".keep").write_bytes(b"")  # never claimed: the sweep never removes these folders
        (a / "sub" / ".keep").write_bytes(b"")
        put(a / "sub")
        time.sleep(0.05)  # entered and watched under its first name
        os.rename(a, b)
        a.mkdir()  # a new folder under the old name, removed at once: its IN_IGNORED
        os.rmdir(a)
        put(b / "sub")  # only the moved folder's watch (same descriptor) can see these
        put(b)
    time.sleep(0.5)
    for k in range(30):
        put(u / "deep" / f"b{k}" / "sub")
    _check_once(d, w, written)


def test_folders_churned_during_an_overflow_miss_nothing(tmp_path: Path) -> None:
    """Tried: the same churn while the kernel queue overflows (max_queued_events lowered for the daemon's
    instance, restored at once): IN_IGNORED events dropped or not, the rescan after the overflow re-adds watches
    whose descriptors may be old ones. Then files written into every folder after the overflow must be seen by
    events (rescan_interval 3600). Held."""
    from support import DaemonProcess
    from test_break_sweep import QUEUED

    d = DaemonProcess(tmp_path / "w", env=NO_RESCAN, cwd=tmp_path, new_session=True)
    old = QUEUED.read_text()
    try:
        try:
            QUEUED.write_text("64")
        except OSError as e:
            pytest.skip(f"cannot lower max_queued_events: {e}")
        try:
            d.started()
        finally:
            QUEUED.write_text(old)
        w = d.watch_dir
        u = w / "unprocessed"
        written: dict[str, bytes] = {}
        for k in range(10):
            (u / f"c{k}").mkdir()
        time.sleep(0.5)
        os.kill(d.proc.pid, signal.SIGSTOP)
        try:
            for k in range(10):
                for r in range(5):  # replaced five times, moved around
                    shutil.rmtree(u / f"c{k}")
                    (u / f"c{k}").mkdir()
                    (u / f"c{k}" / "x").mkdir()
                os.rename(u / f"c{k}", u / f"m{k}")
                (u / f"c{k}").mkdir()
            for i in range(100):
                (u / f".noise{i}").write_bytes(b"")
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        wait_for(lambda: d.count("overflow") >= 1, what="the overflow read")
        time.sleep(1.0)
        for k in range(10):
            for rel in (f"c{k}", f"m{k}", f"m{k}/x"):
                name = f"{rel.replace('/', '_')}.txt"
                assert _write(u / rel / name, name.encode() + b"\n")
                written[name] = name.encode() + b"\n"
        _check_once(d, w, written, timeout=10)
    finally:
        if d.proc.poll() is None:
            os.kill(d.proc.pid, signal.SIGCONT)
            os.killpg(d.proc.pid, signal.SIGKILL)
            d.kill()


@pytest.mark.parametrize("away", ["outside", "inside"])
def test_a_file_moved_from_the_old_folder_into_its_replacement_is_not_forgotten(start, tmp_path: Path,  # noqa: F811
                                                                                  away: str) -> None:
    """Fixed (the daemon re-checks a `gone` for a name it knows: Daemon._still_there). Was a FAULT (pre-existing; found by the churn test above, which failed at 2b9972f too: 83 of 2,793 files left for
    the rescan). A producer takes a queued batch folder back out, makes the name again and moves the file back
    (`mv unprocessed/batch /tmp/fix; mkdir unprocessed/batch; mv /tmp/fix/f.txt unprocessed/batch/`), while the
    daemon is behind (here: stopped). The daemon then reads in one go: create batch/f.txt (old folder's watch),
    dir_gone batch, dir_in batch (the new folder is listed: f.txt found, settle check), then the old watch's
    IN_MOVED_FROM f.txt, read as `gone batch/f.txt` because the old watch descriptor still mapped to "batch" when
    read() translated it; Arrivals.change("gone") forgets batch/f.txt. Nothing else ever names it: it waits for
    the periodic rescan (30 s by default; never here: rescan_interval 3600). "inside": the old folder renamed
    inside the tree (`mv batch batch.old; mkdir batch; mv batch.old/f.txt batch/`): the same.
    Fix: translate an event's watch descriptor when the change is handled, not when read (or drop the old wd's
    mapping when its parent's IN_MOVED_FROM/IN_DELETE ISDIR is read, in Watch.read itself, so that the old
    watch's later events are skipped), or re-check the name (lstat) before a `gone` forgets a file a listing
    found."""
    d = start(env=NO_RESCAN)
    w = d.watch_dir
    u = w / "unprocessed"
    (u / "batch").mkdir()
    (u / "batch" / ".keep").write_bytes(b"")  # never claimed: the folder stays, watched
    time.sleep(0.5)
    os.killpg(d.proc.pid, signal.SIGSTOP)
    try:
        (u / "batch" / "f.txt").write_bytes(b"f\n")
        old = tmp_path / "fix" if away == "outside" else u / "batch.old"
        os.rename(u / "batch", old)
        (u / "batch").mkdir()
        os.rename(old / "f.txt", u / "batch" / "f.txt")
    finally:
        os.killpg(d.proc.pid, signal.SIGCONT)
    wait_for(lambda: (w / "processed" / "batch" / "f.txt").exists(), timeout=10,
             what="batch/f.txt processed (it waits in unprocessed/ for the 30 s rescan)")


HOSTILE = [
    os.fsdecode(b"-n\nrm \xff\x1b[31m"),  # option-like, a newline, a non-UTF-8 byte, an escape sequence
    os.fsdecode(b"-" + b"\xe9" * 254),  # 255 bytes, none of them UTF-8
]


def _sidecars(w: Path) -> list[dict]:
    out = []
    for root, _, files in os.walk(w / "failed"):
        out += [json.loads(Path(root, f).read_bytes()) for f in files if f.startswith(".ingestd") and f.endswith(".json")]
    return out


@pytest.mark.parametrize("bad", HOSTILE, ids=["newline-escape-ff", "255-bytes-latin1"])
def test_a_collision_reason_with_a_hostile_name_is_escaped_and_fails_the_file_once(start, bad: str) -> None:  # noqa: F811
    """Tried (f4aaca1): both refusals naming the blocking entry, with names carrying a newline, an escape
    sequence, non-UTF-8 bytes, a leading '-', 255 bytes: processed/BAD a file (an earlier top-level input) and
    BAD/q.txt arriving (ENOTDIR from durable.makedirs); processed/BAD2 a folder (BAD2/q.txt processed first) and
    a top-level BAD2 arriving (EISDIR from Sinks.publish). Each newcomer goes to failed/ once with its path,
    a sidecar whose reason names the blocker escaped (names.display: no raw control byte, valid JSON), the
    status page says the same, the queue flows on, nothing is lost. Held."""
    d = start(env={**RECURSIVE, "INGESTD_SETTLE_TIME": "0.2", "INGESTD_FOLDER_QUIET_TIME": "0.2"})
    w = d.watch_dir
    u = w / "unprocessed"
    raw = os.fsencode(bad)
    bad2 = os.fsdecode(raw[:-1] + b"2")
    # ENOTDIR: a result file where the folder of results is needed.
    (u / bad).write_bytes(b"top\n")
    wait_for(lambda: (w / "processed" / bad).is_file(), what="the top-level file processed")
    (u / bad).mkdir()
    (u / bad / "q.txt").write_bytes(b"inside\n")
    wait_for(lambda: (w / "failed" / bad / "q.txt").is_file(), what="BAD/q.txt failed with its path")
    # EISDIR: a folder of results where the result file would go.
    (u / bad2).mkdir()
    (u / bad2 / "q.txt").write_bytes(b"inside2\n")
    wait_for(lambda: (w / "processed" / bad2 / "q.txt").is_file(), what="BAD2/q.txt processed")
    (w / "staging").write_bytes(b"top2\n")
    wait_for(lambda: not (u / bad2).exists(), what="BAD2/ removed once emptied")
    os.rename(w / "staging", u / bad2)
    wait_for(lambda: (w / "failed" / bad2).is_file(), what="the top-level BAD2 failed")
    (u / "later.txt").write_bytes(b"later\n")
    wait_for(lambda: (w / "processed" / "later.txt").exists(), what="the queue flows on")

    cars = {c["name"]: c for c in _sidecars(w)}
    shown, shown2 = display(bad), display(bad2)
    assert set(cars) == {f"{shown}/q.txt", shown2}, cars.keys()
    r1, r2 = cars[f"{shown}/q.txt"]["reason"], cars[shown2]["reason"]
    assert f"processed/{shown} is a file where a folder is needed (ENOTDIR)" in r1, r1
    assert f"processed/{shown2} is a folder, so its result cannot take that name (EISDIR)" in r2, r2
    for r in (r1, r2):
        assert r.isprintable() and "\n" not in r and "\x1b" not in r, r
    assert {c["attempts"] for c in cars.values()} <= {0, 1}, cars
    status = {f["name"]: f["reason"] for f in d.status()["failures"]}
    assert status[f"{shown}/q.txt"] == r1 and status[shown2] == r2
    for ev in d.events:
        for v in ev.values():
            assert not isinstance(v, str) or v.isprintable(), ev
    # Nothing lost: the earlier results and both failed inputs, their bytes as they were.
    assert (w / "processed" / bad).read_bytes() == b"TOP\n"
    assert (w / "processed" / bad2 / "q.txt").read_bytes() == b"INSIDE2\n"
    assert (w / "failed" / bad / "q.txt").read_bytes() == b"inside\n"
    assert (w / "failed" / bad2).read_bytes() == b"top2\n"
    assert d.count("failed") == 2 and not d.event("claiming_paused") and d.proc.poll() is None


def test_a_folder_named_like_a_file_in_flight_waits_without_spinning_and_loses_nothing(start, tmp_path: Path) -> None:  # noqa: F811
    """Tried: underprocess/ mirror collision: a top-level `batch` in flight (a slow processor: about 3 s) while
    batch/a.txt arrives: its claim's durable.makedirs(underprocess, "batch") meets the file (ENOTDIR, now with
    the new message) and says GONE; the daemon must re-try it after `batch` commits, without spinning a core
    meanwhile, and then processed/batch (a file) blocks processed/batch/ (ENOTDIR): batch/a.txt must end in
    failed/ with its reason, once, never lost. Held."""
    cfg = tmp_path / "slow.toml"
    cfg.write_text('[[filters]]\nmatch = "*"\nprocessor = "slow"\nseconds = 0.01\n')
    d = start("--config", str(cfg), "--workers", "2", env={**RECURSIVE, "INGESTD_SETTLE_TIME": "0.2",
                                                             "INGESTD_FOLDER_QUIET_TIME": "0.2",
                                                             "INGESTD_RESCAN_INTERVAL": "3600"})
    w = d.watch_dir
    u = w / "unprocessed"
    (u / "batch").write_bytes(b"line\n" * 300)
    wait_for(lambda: (w / "underprocess" / "batch").is_file(), what="batch claimed")
    (w / "staging").mkdir()
    (w / "staging" / "a.txt").write_bytes(b"a\n")
    os.rename(w / "staging", u / "batch")
    from support import cpu_used
    used = cpu_used(d.proc.pid, seconds=1.5, after=0.3)
    assert (w / "underprocess" / "batch").is_file(), "batch finished too soon for the check"
    assert used < 0.5, f"the daemon used {used:.2f} s of CPU in 1.5 s while batch/a.txt waited"
    wait_for(lambda: (w / "processed" / "batch").is_file(), timeout=20, what="batch processed")
    wait_for(lambda: (w / "failed" / "batch" / "a.txt").is_file(), timeout=10,
             what="batch/a.txt failed (processed/batch is a file)")
    (reason,) = [c["reason"] for c in _sidecars(w)]
    assert "processed/batch is a file where a folder is needed (ENOTDIR)" in reason, reason
    assert (w / "failed" / "batch" / "a.txt").read_bytes() == b"a\n"
    assert not _names(u)


def test_a_blocker_inside_an_output_folder_is_named_with_processed(tmp_path: Path) -> None:
    """Tried: the ENOTDIR reason when the blocking file is inside an output folder of the routing (recursive
    mode, input batch/a.txt, outputs "" and "errors", processed/errors/batch a file). Real folders, the real
    Sinks; what failed/'s sidecar would carry. The refusal itself is right (nothing published, the blocker kept)."""
    from ingestd import errors
    from ingestd.sinks import Sinks

    p = tmp_path / "processed"
    (p / "errors").mkdir(parents=True)
    (p / "errors" / "batch").write_bytes(b"a result named batch\n")
    s = Sinks(str(p), "batch/a.txt", ["", "errors"])
    s.write("", b"x\n")
    s.write("errors", b"y\n")
    with pytest.raises(OSError) as e:
        s.commit()
    s.abort()
    assert (p / "errors" / "batch").read_bytes() == b"a result named batch\n"
    assert not (p / "batch" / "a.txt").exists()
    assert errors.reason(e.value) == "processed/errors/batch is a file where a folder is needed (ENOTDIR)"
