"""Issue 12: `status`, `requeue` and /api/status stay truthful while the folders change under them, for a user
without rights, and in any clock or time zone. Real folders, real subprocesses, a real daemon, a real non-root user."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ingestd.names import key
from ingestd.spool import REASON_PREFIX, SEQ_BLOCK, SEQ_FILE, Failure, Spool
from support import INGESTD, DaemonProcess, clean_env, folder, wait_for
from torture.lib import readable_copy

NOBODY = 65534
NOW = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


def cli(*args: str, env: dict[str, str] | None = None, **kw: Any) -> subprocess.CompletedProcess[str]:
    full = clean_env()
    return subprocess.run([*INGESTD, *args], capture_output=True, text=True, env={**full, **(env or {})}, timeout=60,
                          check=False, **kw)


def watch(root: Path) -> Spool:
    spool = Spool(root)
    spool.ensure()
    return spool


def failed_file(spool: Spool, name: str, now: float, data: bytes = b"\0") -> None:
    """A real failure, recorded as the daemon records it (Spool.fail: sidecar, then the move)."""
    Path(spool.underprocess, name).write_bytes(data)
    spool.fail(name, Failure("binary content"), now)


# --- files vanish between listing and reading ----------------------------------------------------------------------
class Mover(threading.Thread):
    """A consumer taking results out of a folder as fast as it can, and putting them back (bounded in time)."""

    def __init__(self, src: Path, aside: Path, seconds: float) -> None:
        super().__init__(daemon=True)
        self.src, self.aside, self.until = src, aside, time.monotonic() + seconds
        self.stop = threading.Event()
        self.moves = 0

    def run(self) -> None:
        names = sorted(os.listdir(self.src))
        while not self.stop.is_set() and time.monotonic() < self.until:
            for n in names:
                os.rename(self.src / n, self.aside / n)
                self.moves += 1
            for n in names:
                os.rename(self.aside / n, self.src / n)


@pytest.fixture
def many_results(tmp_path: Path) -> Iterator[Spool]:
    spool = watch(tmp_path / "w")
    for i in range(3000):
        Path(spool.processed, f"r{i:05d}.txt").write_bytes(b"R\n")
    yield spool


def test_status_while_a_consumer_moves_results_out(many_results: Spool, tmp_path: Path) -> None:
    """The listed input: results move out of processed/ while `ingestd status` runs, 16 runs."""
    aside = tmp_path / "consumer"
    aside.mkdir()
    mover = Mover(Path(many_results.processed), aside, seconds=120)
    mover.start()
    try:
        for _ in range(16):
            r = cli("status", "--watch-dir", str(many_results.root))
            assert (r.returncode, r.stderr) == (0, ""), r.stderr
            r = cli("status", "--json", "--watch-dir", str(many_results.root))
            assert (r.returncode, r.stderr) == (0, ""), r.stderr
            json.loads(r.stdout)
    finally:
        mover.stop.set()
        mover.join()
    assert mover.moves > 0


class VanishingScandir:
    """os.scandir whose entries lose their file at a chosen moment: just before their stat (between the listing and
    the stat), or once the listing is done (between the listing and the open). The kernel gives the ENOENT."""

    def __init__(self, victims: set[str], when: str, act: Callable[[str], None] = os.unlink) -> None:
        self.victims, self.when, self.act, self.real = victims, when, act, os.scandir
        self.gone: list[str] = []

    def __call__(self, path: str) -> Any:
        outer = self

        class Entry:
            def __init__(self, e: os.DirEntry[str]) -> None:
                self.e, self.name, self.path = e, e.name, e.path

            def is_file(self, *, follow_symlinks: bool = True) -> bool:
                return self.e.is_file(follow_symlinks=follow_symlinks)

            def is_dir(self, *, follow_symlinks: bool = True) -> bool:
                return self.e.is_dir(follow_symlinks=follow_symlinks)

            def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
                if outer.when == "stat" and self.name in outer.victims:
                    outer.vanish(self.path)
                return self.e.stat(follow_symlinks=follow_symlinks)

        class It:
            def __enter__(self) -> Iterator[Entry]:
                with outer.real(path) as it:
                    entries = [Entry(e) for e in it]
                yield_entries = iter(entries)

                def gen() -> Iterator[Entry]:
                    yield from yield_entries
                    if outer.when == "listed":
                        for e in entries:
                            if e.name in outer.victims:
                                outer.vanish(e.path)
                return gen()

            def __exit__(self, *exc: object) -> None:
                pass

        return It()

    def vanish(self, path: str) -> None:
        if os.path.basename(path) not in self.gone:
            self.act(path)
            self.gone.append(os.path.basename(path))


def test_completions_skip_a_result_taken_between_listing_and_stat(many_results: Spool,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The kind, deterministically: every way a result can vanish under completions()."""
    later = time.time() + 100
    for n in ("r00000.txt", "r02999.txt"):
        os.utime(Path(many_results.processed, n), (later, later))
    fake = VanishingScandir({"r02999.txt"}, "stat")
    monkeypatch.setattr(os, "scandir", fake)
    got = many_results.completions(2)
    assert fake.gone == ["r02999.txt"]
    assert got[0]["file"] == "r00000.txt" and "r02999.txt" not in [c["file"] for c in got]


@pytest.mark.parametrize("when", ["stat", "listed"])
def test_failures_skip_a_sidecar_requeued_while_we_look(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        when: str) -> None:
    """/api/status during a requeue: a sidecar goes between the listing and its stat, or before its open."""
    spool = watch(tmp_path / "w")
    for i in range(3):
        failed_file(spool, f"f{i}", NOW + i)
    victim = REASON_PREFIX + key("f1") + ".json"

    def requeue(sidecar: str) -> None:  # as Spool.requeue does it: the file goes first, then its sidecar
        os.rename(Path(spool.failed, "f1"), Path(spool.unprocessed, "f1"))
        os.unlink(sidecar)

    fake = VanishingScandir({victim}, when, requeue)
    monkeypatch.setattr(os, "scandir", fake)
    got = Spool(spool.root).failures(10)  # a fresh Spool: nothing cached, every sidecar is opened
    assert fake.gone == [victim]
    assert [(f["name"], f["reason"]) for f in got] == [("f2", "binary content"), ("f0", "binary content")]


def test_api_status_answers_while_400_failures_are_requeued(tmp_path: Path) -> None:
    """The listed input: `ingestd requeue` of 400 failures while /api/status is polled; every request answered,
    the daemon's log stays JSON lines."""
    spool = watch(tmp_path / "w")
    for i in range(400):
        failed_file(spool, f"bad{i:03d}.bin", time.time())
    d = DaemonProcess(spool.root, "--workers", "1", cwd=tmp_path).started(timeout=30)
    answers: list[int] = []
    errors: list[str] = []
    done = threading.Event()

    def poll() -> None:
        deadline = time.monotonic() + 120
        while not done.is_set() and time.monotonic() < deadline and len(answers) < 5000:
            try:
                code, body = d.get("/api/status")
                json.loads(body)
                answers.append(code)
            except Exception as e:  # noqa: BLE001 (any unanswered request is the failure counted)
                errors.append(repr(e))

    pollers = [threading.Thread(target=poll) for _ in range(2)]
    try:
        for t in pollers:
            t.start()
        r = cli("requeue", "--watch-dir", str(spool.root))
        assert r.returncode in (0, 1), r.stderr  # 1: a file failed again under the same name meanwhile
        wait_for(lambda: not folder(spool.root, "unprocessed") and not folder(spool.root, "underprocess"),
                 timeout=120, what="the requeued files failed again")
    finally:
        done.set()
        for t in pollers:
            t.join()
        d.stop()
    assert errors == [] and answers and set(answers) == {200}, (errors[:3], set(answers))
    for line in d.lines:
        json.loads(line)  # one JSON object a line: no traceback
    assert folder(spool.root, "failed") == sorted(f"bad{i:03d}.bin" for i in range(400))


# Audit of issue 9: /api/status gave the health of the last published view, so a main loop gone silent showed
# "ok" there while /healthz said 503 "main loop silent for ...". Both now ask the same question at the same time.
@pytest.mark.parametrize("problem", [None, "main loop silent for 12.0s", "no worker is running; starting one fails: x"])
def test_api_status_health_equals_healthz(problem: str | None) -> None:
    import urllib.error
    import urllib.request

    from prometheus_client import CollectorRegistry

    from ingestd.web import Web

    published = {"health": {"ok": True, "problem": None}, "counts": {}}  # what the loop published last
    web = Web("127.0.0.1", 0, CollectorRegistry(), lambda: dict(published), lambda: problem)
    web.start()
    try:
        try:
            with urllib.request.urlopen(f"http://{web.address}/healthz", timeout=5) as r:
                code, text = r.status, r.read().decode().strip()
        except urllib.error.HTTPError as e:
            code, text = e.code, e.read().decode().strip()
            e.close()
        with urllib.request.urlopen(f"http://{web.address}/api/status", timeout=5) as r:
            health = json.load(r)["health"]
    finally:
        web.stop()
    assert (code, text) == ((200, "ok") if problem is None else (503, problem))
    assert health == {"ok": problem is None, "problem": problem}


def test_a_failing_status_answers_500_json_and_logs_one_line(capfd: pytest.CaptureFixture[str]) -> None:
    """The kind behind the API case: whatever goes wrong inside a request, a 500 in JSON and one JSON log line."""
    import urllib.error
    import urllib.request

    from prometheus_client import CollectorRegistry

    from ingestd import log
    from ingestd.web import Web

    def status() -> dict[str, Any]:
        raise FileNotFoundError(2, "No such file or directory", "/w/failed/x")

    log.setup("json")
    web = Web("127.0.0.1", 0, CollectorRegistry(), status, lambda: None)
    web.start()
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://{web.address}/api/status", timeout=5)
        assert e.value.code == 500 and json.loads(e.value.read()) == {"error": "FileNotFoundError"}
        e.value.close()
        with urllib.request.urlopen(f"http://{web.address}/healthz", timeout=5) as ok:
            assert ok.status == 200  # the server goes on
    finally:
        web.stop()
    err = capfd.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["event"] == "http_error", err
    assert "Traceback" not in err


# --- errors that tell the truth -------------------------------------------------------------------------------------
@pytest.fixture
def shipped(tmp_path: Path) -> Iterator[tuple[Spool, dict[str, str]]]:
    """A watch dir with the shipped modes (packaging/systemd/ingestd.tmpfiles.conf: 0750, owner and group the
    service's; here root and group 0), where tmp_path is not, and the environment to run ingestd as nobody."""
    if os.geteuid() != 0:
        pytest.skip("switching to the user nobody needs root")
    base = Path(tempfile.mkdtemp(prefix="ingestd-perm-", dir="/tmp"))
    try:
        base.chmod(0o755)
        spool = watch(base / "w")
        failed_file(spool, "bad.bin", NOW)
        for d in (spool.root, *(Path(getattr(spool, f)) for f in ("unprocessed", "underprocess", "processed",
                                                                   "failed"))):
            d.chmod(0o750)
        python = shutil.which("python3.11", path="/usr/bin:/usr/local/bin")
        if python is None:
            pytest.skip("a python3.11 the user nobody may execute")
        env = {"HOME": str(base), "PYTHONPATH": readable_copy(base / "lib"), "PYTHON": python}
        yield spool, env
    finally:
        shutil.rmtree(base, ignore_errors=True)


def as_user(env: dict[str, str], *args: str, gid: int = NOBODY) -> subprocess.CompletedProcess[str]:
    def drop() -> None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(NOBODY)

    return subprocess.run([env["PYTHON"], "-m", "ingestd", *args], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HOME": env["HOME"], "PYTHONPATH": env["PYTHONPATH"]},
                          cwd=env["HOME"], preexec_fn=drop, check=False)


def test_status_as_a_user_without_rights_names_the_folder(shipped: tuple[Spool, dict[str, str]]) -> None:
    spool, env = shipped
    r = as_user(env, "status", "--watch-dir", str(spool.root))
    assert r.returncode == 77, r.stderr
    assert r.stderr == f"ingestd: cannot read {spool.root}: Permission denied (EACCES)\n"
    assert "not an ingestd watch dir" not in r.stderr


def test_requeue_as_a_user_without_rights_does_not_say_waiting(shipped: tuple[Spool, dict[str, str]]) -> None:
    spool, env = shipped
    assert folder(spool.root, "unprocessed") == []
    r = as_user(env, "requeue", "--watch-dir", str(spool.root), "bad.bin")
    assert r.returncode == 77, r.stderr
    assert r.stderr == f"ingestd: cannot read {spool.root}: Permission denied (EACCES)\n"
    assert folder(spool.root, "failed") == ["bad.bin"]


def test_requeue_by_a_group_member_who_may_look_but_not_write(shipped: tuple[Spool, dict[str, str]]) -> None:
    """The kind beyond the listed input: the folders can be read (group), failed/ cannot be written."""
    spool, env = shipped
    os.chown(spool.failed, 0, NOBODY)
    os.chown(spool.root, 0, NOBODY)
    os.chown(spool.unprocessed, 0, NOBODY)
    Path(spool.unprocessed).chmod(0o770)  # group-writable, as shipped, so producers can drop files
    os.chown(spool.underprocess, 0, NOBODY)
    os.chown(spool.processed, 0, NOBODY)
    r = as_user(env, "status", "--watch-dir", str(spool.root))
    assert r.returncode == 0 and "bad.bin: binary content" in r.stdout, r.stderr
    r = as_user(env, "requeue", "--watch-dir", str(spool.root), "bad.bin")
    assert r.returncode == 77, r.stderr
    assert r.stderr == f"ingestd: cannot write to {spool.failed}: Permission denied (EACCES)\n"
    assert "waiting" not in r.stderr and folder(spool.root, "failed") == ["bad.bin"]


def test_requeue_says_waiting_only_when_a_file_of_that_name_waits(tmp_path: Path) -> None:
    spool = watch(tmp_path / "w")
    failed_file(spool, "a.bin", NOW)
    Path(spool.unprocessed, "a.bin").write_bytes(b"newer")
    r = cli("requeue", "--watch-dir", str(spool.root), "a.bin")
    assert r.returncode == 1
    assert r.stderr == "ingestd: not requeued (a file of that name is waiting in unprocessed/): a.bin\n"


# --- order by sequence, not by the wall clock -----------------------------------------------------------------------
def fast_clock_failures(spool: Spool) -> float:
    """Ten failures recorded while the clock was an hour fast (sidecars and their mtimes too), then, the clock
    stepped back, one new failure. Returns the real now."""
    real = time.time()
    for i in range(10):
        failed_file(spool, f"early{i}.bin", real + 3600 + i)
        sidecar = Path(spool.failed, REASON_PREFIX + key(f"early{i}.bin") + ".json")
        os.utime(sidecar, (real + 3600 + i, real + 3600 + i))
    failed_file(spool, "new.bin", real)
    return real


def test_status_shows_a_new_failure_after_the_clock_stepped_back(tmp_path: Path) -> None:
    spool = watch(tmp_path / "w")
    fast_clock_failures(spool)
    doc = json.loads(cli("status", "--json", "--watch-dir", str(spool.root)).stdout)
    assert doc["failures"][0]["name"] == "new.bin"
    assert len(doc["failures"]) == 10
    text = cli("status", "--watch-dir", str(spool.root)).stdout
    assert text.split("recent failures (UTC):\n")[1].splitlines()[0].endswith("new.bin: binary content, attempts 1")


def test_api_status_shows_a_new_failure_after_the_clock_stepped_back(tmp_path: Path) -> None:
    spool = watch(tmp_path / "w")
    fast_clock_failures(spool)
    d = DaemonProcess(spool.root, cwd=tmp_path).started(timeout=30)
    try:
        failures = d.status()["failures"]
    finally:
        d.stop()
    assert failures[0]["name"] == "new.bin" and len(failures) == 10


def test_failure_seq_increases_across_restarts_crashes_and_lost_state(tmp_path: Path) -> None:
    """The kind: the order survives a restart (a new Spool), a crash mid-block, a lost state dir, and sidecars
    from before seqs existed rank below every new one whatever their time."""
    spool = watch(tmp_path / "w")
    legacy = Path(spool.failed, REASON_PREFIX + key("legacy.bin") + ".json")
    legacy.write_text(json.dumps({"name": "legacy.bin", "reason": "old", "failed_at_unix": NOW + 10**6}))
    Path(spool.failed, "legacy.bin").write_bytes(b"x")
    failed_file(spool, "a", NOW)
    failed_file(spool, "b", NOW - 7200)  # the clock stepped back two hours
    seqs = [f["seq"] for f in spool.failures(10)]
    assert seqs == [2, 1, None]
    assert json.loads(Path(spool.state, SEQ_FILE).read_bytes()) == {"reserved_to": SEQ_BLOCK}
    restarted = Spool(spool.root)  # as after a crash: the rest of the block is skipped, never reused
    failed_file(restarted, "c", NOW - 9000)
    assert [f["name"] for f in restarted.failures(10)] == ["c", "b", "a", "legacy.bin"]
    assert restarted.failures(1)[0]["seq"] == SEQ_BLOCK + 1
    shutil.rmtree(spool.state)  # state lost: seqs go on above the largest in the sidecars
    os.mkdir(spool.state)
    again = Spool(spool.root)
    failed_file(again, "d", NOW - 9999)
    assert [f["name"] for f in again.failures(2)] == ["d", "c"]


# --- times with their zone ------------------------------------------------------------------------------------------
def test_status_prints_times_in_utc_with_the_offset_in_any_tz(tmp_path: Path) -> None:
    spool = watch(tmp_path / "w")
    Path(spool.processed, "done.txt").write_bytes(b"X")
    os.utime(Path(spool.processed, "done.txt"), (NOW, NOW))
    failed_file(spool, "bad.bin", NOW + 60)
    for tz in ("Asia/Kolkata", "America/St_Johns", "UTC"):
        out = cli("status", "--watch-dir", str(spool.root), env={"TZ": tz}).stdout
        assert "  2023-11-14 22:13:20+00:00  done.txt\n" in out, out
        assert "  2023-11-14 22:14:20+00:00  bad.bin: binary content" in out, out
    sidecar = json.loads(Path(spool.failed, REASON_PREFIX + key("bad.bin") + ".json").read_bytes())
    assert sidecar["failed_at"] == "2023-11-14T22:14:20+00:00"


def test_the_page_labels_its_times_with_the_browsers_zone() -> None:
    from importlib.resources import files

    page = files("ingestd").joinpath("static/index.html").read_text()
    assert 'id="tz"' in page and "resolvedOptions().timeZone" in page and "getTimezoneOffset" in page


# --- one shape; ignored names; pipes; escaped names -----------------------------------------------------------------
def test_status_json_has_the_shape_of_api_status(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path / "w", cwd=tmp_path).started(timeout=30)
    try:
        w = d.watch_dir
        (w / "unprocessed" / "ok.txt").write_bytes(b"a\n")
        (w / "unprocessed" / "bad.bin").write_bytes(b"\0")
        wait_for(lambda: folder(w, "failed") == ["bad.bin"] and folder(w, "processed") == ["ok.txt"])
        wait_for(lambda: len(d.status()["recent"]) == 2)
        api = d.status()
        # The daemon saves its history at most once a second: the CLI sees it within about that.
        doc = wait_for(lambda: len((j := json.loads(cli("status", "--json", "--watch-dir", str(w)).stdout))["recent"])
                       == 2 and j, timeout=5)
    finally:
        d.stop()
    assert doc["watch_dir"] == api["watch_dir"] and doc["counts"] == api["counts"]
    assert [set(f) for f in doc["failures"]] == [set(f) for f in api["failures"]]
    assert doc["failures"][0]["name"] == api["failures"][0]["name"] == "bad.bin"
    shape = {"file", "result", "duration", "finished_at", "reason", "seq", "recovered"}
    assert [set(r) for r in api["recent"]] == [set(r) for r in doc["recent"]] == [shape, shape]
    assert [r["seq"] for r in doc["recent"]] == [r["seq"] for r in api["recent"]], "the daemon's own order"


def test_status_does_not_count_names_the_daemon_ignores(tmp_path: Path) -> None:
    spool = watch(tmp_path / "w")
    for n in (".hidden", "x.tmp", "y.part", "real.txt"):
        Path(spool.unprocessed, n).write_bytes(b"x")
    doc = json.loads(cli("status", "--json", "--watch-dir", str(spool.root)).stdout)
    assert doc["counts"]["unprocessed"] == 1


# Audit of issue 9: with done_marker on, `status` counted each NAME.done marker as a file waiting (2 for one file),
# where the daemon counts the file alone. Checked against a real daemon's own count.
def test_status_counts_waiting_files_as_the_daemon_does_with_done_markers(tmp_path: Path) -> None:
    env = {"INGESTD_DONE_MARKER": "true"}
    d = DaemonProcess(tmp_path / "w", env=env, cwd=tmp_path).started(timeout=30)
    try:
        u = d.watch_dir / "unprocessed"
        for n in ("waits-for-its-marker.txt", "orphan.txt.done", ".hidden", "x.tmp", "y.part"):
            (u / n).write_bytes(b"x\n")
        (u / "vouched.txt").write_bytes(b"x\n")
        (u / "vouched.txt.done").touch()
        wait_for(lambda: folder(d.watch_dir, "processed") == ["vouched.txt"])
        # The page's view is published each turn: wait until it shows the claim finished too.
        api = wait_for(lambda: (s := d.status())["counts"] == {"unprocessed": 1, "underprocess": 0, "processed": 1,
                                                                 "failed": 0} and s, timeout=10)
        doc = json.loads(cli("status", "--json", "--watch-dir", str(d.watch_dir), env=env).stdout)
        text = cli("status", "--watch-dir", str(d.watch_dir), env=env).stdout
        plain = json.loads(cli("status", "--json", "--watch-dir", str(d.watch_dir)).stdout)
    finally:
        d.stop()
    assert doc["counts"] == api["counts"] and doc["counts"]["unprocessed"] == 1
    # Which file waits for its marker, by name (a new user saw only the count, and could not tell why).
    assert doc["awaiting_marker"] == {"count": 1, "names": ["waits-for-its-marker.txt"]}
    assert "no marker  1 file wait for NAME.done (done_marker is on): waits-for-its-marker.txt" in text
    assert plain["awaiting_marker"] is None and "no marker" not in cli("status", "--watch-dir", str(tmp_path / "w")).stdout


def test_status_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    spool = watch(tmp_path / "w")
    for i in range(12):
        failed_file(spool, f"f{i}", NOW + i)
    for args in ((), ("--json",)):
        r, w = os.pipe()
        os.close(r)  # the reader (`| head`) is gone before the first write
        try:
            p = subprocess.run([*INGESTD, "status", *args, "--watch-dir", str(spool.root)], stdout=w,
                               stderr=subprocess.PIPE, text=True, timeout=60, check=False)
        finally:
            os.close(w)
        assert (p.returncode, p.stderr) == (0, ""), p.stderr


def test_requeue_accepts_the_escaped_name_status_prints(tmp_path: Path) -> None:
    spool = watch(tmp_path / "w")
    name = os.fsdecode(b"bad\xffname\n.bin")
    failed_file(spool, name, NOW)
    shown = cli("status", "--watch-dir", str(spool.root)).stdout
    assert "bad\\xffname\\x0a.bin: binary content" in shown
    r = cli("requeue", "--watch-dir", str(spool.root), "bad\\xffname\\x0a.bin")
    assert r.returncode == 0, r.stderr
    assert os.listdir(spool.unprocessed) == [name] and folder(spool.root, "failed") == []
    r = cli("requeue", "--watch-dir", str(spool.root), "nope.txt")
    assert (r.returncode, r.stderr) == (1, "ingestd: not in failed/: nope.txt\n")


def test_status_without_a_daemon_says_what_the_last_recursive_daemon_counted_besides(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Found in review: a daemon with recursive = true in its own settings (a config file, the unit's environment)
    stops; `status` from a shell without that setting counts as recursive off (README: "when no daemon runs, from
    the environment and .env"), so processed/'s results in folders dropped out of the count and the files waiting in
    folders of unprocessed/ with them, with no word, while the running daemon's status had counted them. Its lock
    label ("pid N on HOST, recursive") stays after it stops: status says what was left out and how to count it, and
    the two counts add up to the recursive one. failed/ counts its folders' files either way. In process: status()
    is what `ingestd status` runs; the label is written by the daemon's own Spool.lock()."""
    from ingestd import commands
    from ingestd import settings as settings_mod

    spool = watch(tmp_path / "w")
    spool.lock(note="recursive")  # as a recursive daemon's start does; its stop leaves the label
    spool.unlock()
    Path(spool.processed, "top.txt").write_bytes(b"T")
    os.makedirs(os.path.join(spool.processed, "batch", "deep"))
    Path(spool.processed, "batch", "a.txt").write_bytes(b"A")
    Path(spool.processed, "batch", "deep", "b.txt").write_bytes(b"B")
    os.makedirs(os.path.join(spool.underprocess, "batch"))
    failed_file(spool, "batch/bad.bin", NOW)
    os.makedirs(os.path.join(spool.unprocessed, "later"))
    Path(spool.unprocessed, "later", "x.txt").write_bytes(b"x")
    Path(spool.unprocessed, "later", "x.tmp").write_bytes(b"x")  # never claimed: not waiting

    def status(as_json: bool, **env: str) -> str:
        s = settings_mod.load({"watch_dir": str(spool.root)}, environ=env, cwd=tmp_path)
        assert commands.status(s, as_json) == 0
        return capsys.readouterr().out

    doc = json.loads(status(True))
    assert doc["daemon"] is None and doc["counts"] == {"unprocessed": 0, "underprocess": 0, "processed": 1, "failed": 1}
    label = f"pid {os.getpid()} on {socket.gethostname()}"
    assert doc["not_counted"] == {"processed": 2, "unprocessed": 1, "last_daemon": label + ", recursive"}, doc
    assert (f"not counted 2 results in folders of processed/, 1 file waiting in folders of unprocessed/ (recursive "
            f"is off here; the last daemon, {label}, ran with it on: INGESTD_RECURSIVE=true ingestd status counts "
            "them)\n") in status(False)
    full = json.loads(status(True, INGESTD_RECURSIVE="true"))  # as the daemon counted them
    assert full["counts"] == {"unprocessed": 1, "underprocess": 0, "processed": 3, "failed": 1}
    assert full["not_counted"] is None and "not counted" not in status(False, INGESTD_RECURSIVE="true")
    # The last daemon was not recursive: folders of processed/ are routed outputs (processed/errors/), never counted.
    spool.lock()
    spool.unlock()
    assert json.loads(status(True))["not_counted"] is None and "not counted" not in status(False)
