"""Break-it review of file_exist (issue 9): where an earlier same-named result could be lost, doubled or misnamed,
or the daemon fail a file it had published. Real files and real daemons; a consumer's rm is a real unlink, made at
the one moment that matters by running it from the daemon's own look at the result (a race a test cannot win by
chance often enough)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import DaemonProcess, folder, immutable, wait_for
from torture.lib import kill_tree, metrics_ok, shim_env
from torture.powerloss import Disk
from test_file_exist import ASIDE, asides, publish as _publish

from ingestd import sinks as sinks_mod
from ingestd.sinks import Sinks, claim_of

ROUTING = ('[[filters]]\nmatch = "*"\nretag = "errors"\npattern = "ERROR"\n'
           '[[outputs]]\nmatch = "errors"\npath = "errors"\n[[outputs]]\nmatch = "*"\n')


@pytest.fixture
def processed(tmp_path: Path) -> Path:
    p = tmp_path / "processed"
    (p / "errors").mkdir(parents=True)
    return p


def publish(processed: Path, name: str, outputs: dict[str, bytes], policy: str, claim: bytes | None,
            folders: tuple[str, ...] = ("",)) -> Sinks:
    """test_file_exist's publish, with one output folder by default."""
    return _publish(processed, name, outputs, policy, claim, folders)


def visible(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file() and not p.name.startswith(".")}


# --- a consumer takes the earlier result while the daemon publishes -----------------------------------------------
@pytest.fixture
def consumer_takes_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """A consumer moves each earlier result out (mv) just after publish has looked at it, before its second name
    is made. Returns the paths it took."""
    taken: list[str] = []
    orig = sinks_mod._claim_on
    (tmp_path / "taken").mkdir()

    def look_then_taken(path: str) -> bytes | None:
        tag = orig(path)
        os.rename(path, tmp_path / "taken" / str(len(taken)))  # the consumer's mv: a real rename, at the worst moment
        taken.append(path)
        return tag

    monkeypatch.setattr(sinks_mod, "_claim_on", look_then_taken)
    return taken


@pytest.mark.parametrize(("policy", "earlier_claim"), [("keep", b"1"), ("replace", b"1"), ("keep", b"2")],
                         ids=["keep", "replace", "own-redo"])
def test_a_result_taken_between_the_look_and_its_second_name_publishes_cleanly(
        processed: Path, consumer_takes_it: list[str], policy: str, earlier_claim: bytes) -> None:
    """Found: publish raised KeyError after its renames (the earlier result had no second name), so the worker
    reported a bug on this input (classified REJECT: to failed/) while its result stood in processed/: doubled.
    The consumer took the earlier result, so nothing was superseded: no event, no counter."""
    publish(processed, "f", {"": b"old\n"}, policy, earlier_claim)
    s = publish(processed, "f", {"": b"new\n"}, policy, b"2")
    assert consumer_takes_it == [str(processed / "f")]
    assert visible(processed) == {"f": b"new\n"}
    assert s.superseded == []
    assert not [p for p in processed.iterdir() if p.name.startswith(".")], "a hidden second name stayed"


def test_results_taken_in_every_output_folder_publish_cleanly(processed: Path, consumer_takes_it: list[str]) -> None:
    """The wider kind: two output folders and a stale result in a third case (one this input does not reach)."""
    publish(processed, "f", {"": b"ok1\n", "errors": b"E1\n"}, "keep", b"1", folders=("", "errors"))
    s = publish(processed, "f", {"": b"ok2\n", "errors": b"E2\n"}, "keep", b"2", folders=("", "errors"))
    assert visible(processed) == {"f": b"ok2\n"} and visible(processed / "errors") == {"f": b"E2\n"}
    assert s.superseded == [] and len(consumer_takes_it) == 2


# --- a hard link shared with another name's aside -----------------------------------------------------------------
def test_an_aside_of_another_name_on_the_same_inode_is_not_reused(processed: Path) -> None:
    """Found: a dedup tool (hardlink(1), rdfind -makehardlinks) links identical files; the result `a` then shares
    its inode with `b.superseded-T`, and the next `a` took that as its own interrupted aside: a's earlier version
    was kept only under b's name (and reported so), gone from a's history, lost if b's history is cleaned."""
    publish(processed, "b", {"": b"same\n"}, "keep", b"1")
    publish(processed, "b", {"": b"other\n"}, "keep", b"2")
    (b_aside,) = asides(processed)
    publish(processed, "a", {"": b"same\n"}, "keep", b"3")
    (processed / "a").unlink()
    os.link(processed / b_aside, processed / "a")  # deduplicated
    s = publish(processed, "a", {"": b"new a\n"}, "keep", b"4")
    kept = asides(processed)
    a_asides = [n for n in kept if ASIDE.match(n)["name"] == "a"]  # type: ignore[index]
    assert len(a_asides) == 1 and kept[a_asides[0]] == b"same\n"
    assert [x.aside for x in s.superseded] == a_asides


def test_a_truncated_aside_of_a_long_name_is_still_found_after_a_kill(processed: Path) -> None:
    """The fix must still reuse an interrupted attempt's aside when the name was cut to fit NAME_MAX."""
    from ingestd.spool import set_aside

    name = "x" * 255
    publish(processed, name, {"": b"one\n"}, "keep", b"1")
    first = set_aside(str(processed), name, 1_000_000_000, link=True)  # as a killed attempt left it
    publish(processed, name, {"": b"two\n"}, "keep", b"2")
    assert visible(processed) == {name: b"two\n", first: b"one\n"}


# --- results that are not plain files ----------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["keep", "replace"])
def test_a_symlink_result_is_never_followed(processed: Path, tmp_path: Path, policy: str) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"SECRET\n")
    (processed / "f").symlink_to(secret)
    publish(processed, "f", {"": b"new\n"}, policy, b"2")
    assert secret.read_bytes() == b"SECRET\n" and secret.stat().st_nlink == 1  # not hard-linked through the symlink
    assert (processed / "f").read_bytes() == b"new\n" and not (processed / "f").is_symlink()
    kept = [p for p in processed.iterdir() if ASIDE.match(p.name)]
    assert [p.is_symlink() for p in kept] == ([True] if policy == "keep" else [])


# --- real daemons -------------------------------------------------------------------------------------------------
@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    procs: list[DaemonProcess] = []
    yield procs
    for d in procs:
        if d.proc.poll() is None:
            kill_tree(d)


def _watch(tmp_path: Path) -> tuple[Path, Path]:
    w = tmp_path / "w"
    for sub in ("unprocessed", "underprocess", "processed", "failed"):
        (w / sub).mkdir(parents=True)
    cfg = tmp_path / "routing.toml"
    cfg.write_text(ROUTING)
    return w, cfg


def _superseded(d: DaemonProcess) -> dict[str, float]:
    return {k: v for k, v in metrics_ok(d.get("/metrics")[1]).items() if k.startswith("ingestd_results_superseded")}


def _kill_and_redo(tmp_path: Path, daemons: list[DaemonProcess], policy: str, stale: bool,
                   kill: dict[str, object]) -> DaemonProcess:
    """monday (routed to processed/ and errors/) processed; then tuesday (stale: no ERROR line, so errors/r is a
    stale result) with the daemon killed -9 at a shim point; then a restart that redoes it. Checks the folders:
    the new results, each earlier one kept exactly once (keep) or gone (replace), no hidden link, nothing failed.
    Returns the restarted daemon."""
    w, cfg = _watch(tmp_path)
    env = {"INGESTD_CONFIG": str(cfg), "INGESTD_FILE_EXIST": policy}
    d = DaemonProcess(w, env=env, cwd=tmp_path)
    daemons.append(d)
    d.started()
    (w / "unprocessed" / "r").write_bytes(b"monday\nERROR monday\n")
    wait_for(lambda: d.event("processed", file="r"), what="monday processed")
    d.stop()
    d = DaemonProcess(w, env={**env, **shim_env(tmp_path, kill=kill)}, cwd=tmp_path)
    daemons.append(d)
    d.started()
    (w / "unprocessed" / "r").write_bytes(b"tuesday\n" if stale else b"tuesday\nERROR tuesday\n")
    assert d.proc.wait(timeout=30) == -9
    kill_tree(d)
    redo = folder(w, "underprocess") == ["r"]  # else the kill came after the commit: nothing to redo
    d = DaemonProcess(w, env=env, cwd=tmp_path)
    daemons.append(d)
    d.started()
    if redo:  # the event comes after the commit is durable, when the counters are updated too
        wait_for(lambda: d.event("processed", file="r"), what="the redo")
    p = w / "processed"
    assert folder(w, "failed") == []
    assert visible(p) == {"r": b"tuesday\n", **({} if policy == "replace" else {
        next(iter(asides(p))): b"monday\n"})}
    assert visible(p / "errors") == {**({} if stale else {"r": b"ERROR tuesday\n"}), **({} if policy == "replace" else {
        next(iter(asides(p / "errors"))): b"ERROR monday\n"})}
    assert not [x for x in (*p.iterdir(), *(p / "errors").iterdir()) if x.name.startswith(".")]
    return d


@pytest.mark.parametrize("policy", ["keep", "replace"])
@pytest.mark.parametrize("n", [1, 2], ids=["after-1st-link", "after-2nd-link"])
@pytest.mark.parametrize("stale", [False, True], ids=["routed", "stale"])
def test_kill9_between_the_second_names_and_the_renames_converges(tmp_path: Path, daemons: list[DaemonProcess],
                                                                 policy: str, n: int, stale: bool) -> None:
    """kill -9 of the daemon right after the nth second name (the aside, or the hidden link replace keeps until
    the commit), before the renames: converges, and each earlier result is superseded (logged, counted) once."""
    d = _kill_and_redo(tmp_path, daemons, policy, stale, {"at": "link", "n": n})
    action = "kept" if policy == "keep" else "replaced"
    assert _superseded(d) == {f"ingestd_results_superseded_total{{action={action},output=processed}}": 1.0,
                              f"ingestd_results_superseded_total{{action={action},output=errors}}": 1.0}


@pytest.mark.parametrize("policy", ["keep", "replace"])
@pytest.mark.parametrize("at", ["fsync_dir@sinks.py:1", "fsync_dir@sinks.py:2", "published:1", "commit:1"])
@pytest.mark.parametrize("stale", [False, True], ids=["routed", "stale"])
def test_kill9_after_the_renames_converges_and_never_counts_twice(tmp_path: Path, daemons: list[DaemonProcess],
                                                                  policy: str, at: str, stale: bool) -> None:
    """kill -9 after the renames (before or after each output folder's fsync, before the input leaves, right
    after the commit): converges; the event and counter of what the killed attempt superseded may be lost (as
    the `processed` line, docs/guarantees.md), never doubled by the redo."""
    point, n = at.rsplit(":", 1)
    d = _kill_and_redo(tmp_path, daemons, policy, stale, {"at": point, "n": int(n)})
    assert all(v <= 1.0 for v in _superseded(d).values()), _superseded(d)
    assert d.count("result_superseded") == sum(_superseded(d).values())


def test_a_consumer_deleting_results_as_they_come_never_fails_a_file(tmp_path: Path,
                                                                      daemons: list[DaemonProcess]) -> None:
    """The wider kind of the KeyError above, with real processes: a consumer that takes each result (rm) as soon as
    it sees it, while the same name arrives again and again. No input may end in failed/."""
    import subprocess

    w, cfg = _watch(tmp_path)
    d = DaemonProcess(w, env={"INGESTD_CONFIG": str(cfg)}, cwd=tmp_path)
    daemons.append(d)
    d.started()
    p = w / "processed"
    consumer = subprocess.Popen(["sh", "-c", f'while :; do rm -f "{p}/r" "{p}/errors/r"; done'])
    try:
        u = w / "unprocessed"
        for i in range(60):
            (u / ".next").write_bytes(b"v%d\nERROR %d\n" % (i, i))
            wait_for(lambda: not (u / "r").exists(), what="the previous claimed")
            os.rename(u / ".next", u / "r")
        wait_for(lambda: d.count("processed") + d.count("failed") == 60, timeout=60, what="all 60 finished")
    finally:
        consumer.kill()
        consumer.wait()
    assert folder(w, "failed") == [] and d.count("failed") == 0
    superseded = sum(_superseded(d).values())
    assert superseded == len(asides(p)) + len(asides(p / "errors"))


def test_a_refusal_in_a_stale_output_folder_undoes_the_publish_and_counts_once(tmp_path: Path,
                                                                               daemons: list[DaemonProcess]) -> None:
    """Found: an earlier result in an output folder this input does not reach (a stale one) was set aside after the
    renames; a refusal there (folder made immutable, EPERM; EIO) came after the new result was published and the
    earlier one set aside, so the Retry left them so and dropped their events: after the redo (which finds its
    own result and replaces it silently) monday's aside in processed/ was never logged nor counted. All or none:
    the refusal must come before any rename, and each superseded result counted once."""
    import subprocess

    w, cfg = _watch(tmp_path)
    env = {"INGESTD_CONFIG": str(cfg)}
    d = DaemonProcess(w, env=env, cwd=tmp_path)
    daemons.append(d)
    d.started()
    p = w / "processed"
    (w / "unprocessed" / "r").write_bytes(b"monday\nERROR monday\n")
    wait_for(lambda: d.event("processed", file="r"), what="monday processed")
    if subprocess.run(["chattr", "+i", str(p / "errors")], capture_output=True, check=False).returncode:
        pytest.skip("chattr +i needs root and a filesystem with the immutable flag")
    try:
        (w / "unprocessed" / "r").write_bytes(b"tuesday\n")  # no ERROR line: errors/r is stale
        wait_for(lambda: d.event("paused") or d.event("io_error"), what="the refusal")
        assert visible(p) == {"r": b"monday\n"}, "published although the stale folder refused"
    finally:
        subprocess.run(["chattr", "-i", str(p / "errors")], check=True)
    wait_for(lambda: d.count("processed") == 2, timeout=60, what="tuesday processed")
    assert folder(w, "failed") == [] and folder(w, "underprocess") == []
    assert visible(p) == {"r": b"tuesday\n", next(iter(asides(p))): b"monday\n"}
    assert visible(p / "errors") == {next(iter(asides(p / "errors"))): b"ERROR monday\n"}
    assert _superseded(d) == {"ingestd_results_superseded_total{action=kept,output=processed}": 1.0,
                              "ingestd_results_superseded_total{action=kept,output=errors}": 1.0}


def test_a_refused_second_name_drops_the_asides_already_made(processed: Path) -> None:
    """Found: the second names are made folder by folder; a refusal in the second folder (immutable, EPERM) left
    the first folder's aside behind while its earlier result kept its own name: one result under two names
    (doubled), and the input retried. All or none covers the second names too."""

    publish(processed, "f", {"": b"ok1\n", "errors": b"E1\n"}, "keep", b"1", folders=("", "errors"))
    s = Sinks(str(processed), "f", ["", "errors"], "keep", b"2")
    s.write("", b"ok2\n")
    s.write("errors", b"E2\n")
    s.seal(sync=True)
    with immutable(processed / "errors"):
        with pytest.raises(OSError) as e:
            s.publish()
        assert e.value.errno == errno.EPERM
    s.abort()
    assert visible(processed) == {"f": b"ok1\n"} and visible(processed / "errors") == {"f": b"E1\n"}


# --- power loss -----------------------------------------------------------------------------------------------------
def _r_results(disk: Disk) -> list[bytes]:
    """The bytes of every durable entry of processed/ that is `r` or an aside of it."""
    return [disk.data("processed", n) or b"" for n in disk.dirs["processed"]
            if n == "r" or (ASIDE.match(n) and ASIDE.match(n)["name"] == "r")]  # type: ignore[index]


def _cut_violations(disk: Disk, acks: list[dict], versions: list[bytes]) -> list[str]:
    """versions: the inputs named r in arrival order (the first already processed when the epoch began)."""
    bad = []
    results = _r_results(disk)
    queued = [disk.data(s, "r") for s in ("unprocessed", "underprocess")]
    for v in versions:
        if v.upper() not in results and v not in queued:
            bad.append(f"{v!r}: LOST (no result, not queued)")
    commits = [a for a in acks if a["name"] == "r" and a["what"] == "commit"]
    for v in versions[1:len(commits) + 1]:
        if v.upper() not in results:
            bad.append(f"{v!r}: committed, yet its result is not durable")
    return bad


def test_power_cut_at_any_point_of_a_keep_loses_no_version(tmp_path: Path) -> None:
    """The power-loss model (strict POSIX, tests/torture/powerloss.py) over file_exist = keep: monday's result in
    processed/, tuesday arriving with three other files (a group commit), wednesday alone (its own fsyncs). At
    every point where durability changed no version of r is lost, and each committed one is durable; restarted
    on a sample of those disks (no xattrs survive the copy: a redo is recognised by its identical bytes), every
    version ends exactly once."""
    import random

    from torture.lib import make_watch, read_journal, start_daemon, wait_drained
    from torture.powerloss import Epoch, materialize

    env0 = {"INGESTD_SETTLE_TIME": "0.1"}
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    w = make_watch(tmp_path / "w")
    d = start_daemon(w, env=env0, cwd=tmp_path)
    (w / "unprocessed" / "r").write_bytes(b"monday\n")
    wait_for(lambda: d.event("processed", file="r"), what="monday")
    d.stop()
    found: list[str] = []
    points_all = []
    versions = [b"monday\n", b"tuesday\n", b"wednesday\n"]
    for epoch, (arrive, names) in enumerate([(versions[1], ("a", "b", "c")), (versions[2], ())], start=1):
        for n in names:
            (w / "unprocessed" / n).write_bytes(n.encode() * 1000 + b"\n")
        (w / "unprocessed" / "r").write_bytes(arrive)
        ep = Epoch.begin(w)
        j = tmp_path / f"j{epoch}"
        d = start_daemon(w, "--workers", "2", env={**env0, **shim_env(tmp_path, journal=str(j), shadow=str(shadow))},
                         cwd=tmp_path)
        want = 1 + len(names)
        try:
            wait_for(lambda d=d, want=want: d.count("processed") == want, timeout=60, what="the epoch's files")
        finally:
            d.stop()
        points = ep.replay(read_journal(j))
        assert any(op["op"] == "link" for op in read_journal(j)), "the aside link was not journaled"
        for op, disk, acks in points:
            for v in _cut_violations(disk, acks, versions[: epoch + 1]):
                found.append(f"epoch {epoch}, cut after {op['op']} {op.get('path') or op.get('name')}: {v}")
        points_all.append((epoch, points))
    assert not found, "\n".join(found[:20])
    rng = random.Random(5)
    for epoch, points in points_all:
        for i, (_, disk, _) in enumerate(rng.sample(points, min(4, len(points)))):
            wr = tmp_path / f"cut{epoch}-{i}"
            materialize(disk, wr, w)
            d = start_daemon(wr, env=env0, cwd=tmp_path)
            try:
                wait_drained(wr, 0)
            finally:
                d.stop()
            got = sorted(_r_results(Epoch.begin(wr).end([])))
            want = sorted(v.upper() for v in versions[: epoch + 1])
            assert got == want, f"cut {epoch}-{i}: r's versions {got}, expected each of {want} once"
            assert (wr / "processed" / "r").read_bytes() == versions[epoch].upper()


# --- the wider kind of the KeyError: any bug in publish ----------------------------------------------------------
def test_a_bug_in_publish_after_the_renames_is_retried_not_blamed_on_the_input(
        processed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception that is neither an OSError nor a file_exist refusal, raised by publish after its renames (the
    KeyError above was one): classified as the input's fault (REJECT, to failed/) while its result stood
    published: doubled. errors.classify means "our own bug while writing" to be RETRY; the worker now says the
    phase. The redo then finds its own result and converges."""
    from ingestd import pipeline, worker
    from ingestd.messages import Rejected as RejectedMsg
    from ingestd.messages import Retry

    publish(processed, "f", {"": b"monday\n"}, "keep", b"1")

    def bug(*_: object) -> None:
        raise RuntimeError("a bug after the renames")

    def sealed(claim: bytes) -> list:
        s = Sinks(str(processed), "f", [""], "keep", claim)
        s.write("", b"tuesday\n")
        s.seal(sync=False)
        return [("f", s, pipeline.Stats(), 0.0)]

    with monkeypatch.context() as m:
        m.setattr(sinks_mod, "Superseded", bug)
        out = worker._group_commit(sealed(b"2"), str(processed))["f"]
    assert not isinstance(out, RejectedMsg), f"the input would go to failed/ with its result published: {out}"
    assert isinstance(out, Retry)
    assert visible(processed)["f"] == b"tuesday\n"  # published before the bug: the redo must converge
    out = worker._group_commit(sealed(b"2"), str(processed))["f"]
    assert visible(processed) == {"f": b"tuesday\n", next(iter(asides(processed))): b"monday\n"}


# --- left open ----------------------------------------------------------------------------------------------------
@pytest.mark.xfail(strict=True, reason="a redo on a copied watch dir (backup restore, cp -a / rsync -aX to a new "
                   "disk) has a new claim (new inode and birth time) while its own result keeps the old one: "
                   "keep sets its own result aside (one input's result twice), fail would send it to failed/ "
                   "with its result published. Identical bytes are trusted only on untagged results; trusting "
                   "them on tagged ones too would let `fail` publish over another input's identical result: a "
                   "policy decision, left to the lead")
def test_a_redo_on_a_copied_watch_dir_replaces_its_own_result(tmp_path: Path) -> None:
    import subprocess

    old, new = tmp_path / "old", tmp_path / "new"
    for w in (old, new):
        (w / "underprocess").mkdir(parents=True)
        (w / "processed").mkdir()
    (old / "underprocess" / "r").write_bytes(b"tuesday\n")
    publish(old / "processed", "r", {"": b"TUESDAY\n"}, "keep", claim_of(str(old / "underprocess" / "r")))
    # killed before the commit; the watch dir is then copied to a new disk, xattrs and all
    for sub in ("underprocess", "processed"):
        subprocess.run(["cp", "-a", f"{old / sub}/.", str(new / sub)], check=True)
    publish(new / "processed", "r", {"": b"TUESDAY\n"}, "keep", claim_of(str(new / "underprocess" / "r")))
    assert visible(new / "processed") == {"r": b"TUESDAY\n"}


def test_hostile_names_arriving_again_fast_with_routing_keep_every_version_and_count_each_once(
        tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    """Passed (a probe, kept as a regression test): newline, invalid UTF-8, leading `-`, 255 bytes, multibyte cut at
    NAME_MAX, an input named like an aside; each three times, as soon as the previous left unprocessed/ (so one
    arrives while the previous is mid-commit), the middle version with no ERROR line (errors/ stale). Every
    version kept once in each folder it reached, each set aside once in the log and the counter."""
    w, cfg = _watch(tmp_path)
    d = DaemonProcess(w, env={"INGESTD_CONFIG": str(cfg)}, cwd=tmp_path)
    daemons.append(d)
    d.started()
    u, p = os.fsencode(w / "unprocessed"), os.fsencode(w / "processed")
    names = [b"-n", b"new\nline", b"bad\xff\xfe", b"y" * 255, b"\xc3\xa9" * 127 + b"z", b"x.superseded-1"]
    for rnd in range(3):
        for n in names:
            with open(u + b"/.next", "wb") as f:
                f.write(b"v%d\n" % rnd + (b"" if rnd == 1 else b"ERROR %d\n" % rnd))
            wait_for(lambda n=n: not os.path.lexists(u + b"/" + n), what="the previous claimed")
            os.rename(u + b"/.next", u + b"/" + n)
    total = 3 * len(names)
    wait_for(lambda: d.count("processed") + d.count("failed") == total, timeout=60, what="all finished")
    assert folder(w, "failed") == []
    for n in names:
        def versions(sub: bytes, n: bytes = n) -> list[bytes]:
            d_ = p + sub
            out = []
            for e in os.listdir(d_):
                if e == n or (ASIDE.match(os.fsdecode(e)) and n.startswith(os.fsencode(
                        ASIDE.match(os.fsdecode(e))["name"]))):  # type: ignore[index]
                    with open(d_ + b"/" + e, "rb") as f:
                        out.append(f.read())
            return sorted(out)
        assert versions(b"") == [b"v0\n", b"v1\n", b"v2\n"], n
        assert versions(b"/errors") == [b"ERROR 0\n", b"ERROR 2\n"], n
    assert _superseded(d) == {"ingestd_results_superseded_total{action=kept,output=processed}": 2.0 * len(names),
                              "ingestd_results_superseded_total{action=kept,output=errors}": 1.0 * len(names)}
    assert d.count("result_superseded") == 3 * len(names)


@pytest.mark.parametrize("n", [1, 2], ids=["1st-link", "2nd-link"])
@pytest.mark.parametrize("stale", [False, True], ids=["routed", "stale"])
def test_eio_on_a_second_name_is_retried_and_converges(tmp_path: Path, daemons: list[DaemonProcess], n: int,
                                                       stale: bool) -> None:
    """EIO (through the shim) on the nth link of a publish: nothing published, no second name left, the input
    kept and retried; in the end each earlier result kept once and counted once, nothing failed."""
    w, cfg = _watch(tmp_path)
    env = {"INGESTD_CONFIG": str(cfg), **shim_env(tmp_path, fail={"call": "link", "n": n, "errno": "EIO"})}
    d = DaemonProcess(w, env=env, cwd=tmp_path)
    daemons.append(d)
    d.started()
    (w / "unprocessed" / "r").write_bytes(b"monday\nERROR monday\n")
    wait_for(lambda: d.event("processed", file="r"), what="monday processed")
    (w / "unprocessed" / "r").write_bytes(b"tuesday\n" if stale else b"tuesday\nERROR tuesday\n")
    wait_for(lambda: d.count("processed") == 2, timeout=60, what="tuesday processed after the retry")
    assert d.event("io_error") or d.event("paused"), "the EIO was not met"
    p = w / "processed"
    assert folder(w, "failed") == []
    assert visible(p) == {"r": b"tuesday\n", next(iter(asides(p))): b"monday\n"}
    assert visible(p / "errors") == {**({} if stale else {"r": b"ERROR tuesday\n"}),
                                     next(iter(asides(p / "errors"))): b"ERROR monday\n"}
    assert not [x for x in (*p.iterdir(), *(p / "errors").iterdir()) if x.name.startswith(".")]
    assert _superseded(d) == {"ingestd_results_superseded_total{action=kept,output=processed}": 1.0,
                              "ingestd_results_superseded_total{action=kept,output=errors}": 1.0}
