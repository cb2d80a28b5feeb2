"""file_exist (issue 9): an earlier result of the same name is kept aside, replaced, or fails the newcomer; never
silently lost; a redo of the same input (a crash after its publish) replaces its own result, never doubles it.

Real files on ext4 (user xattrs, birth times), ramfs (neither), real daemons, a real kill -9 at a named point."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import DaemonProcess, folder, immutable, wait_for
from torture.lib import kill_tree, metrics_ok, shim_env

from ingestd import sinks as sinks_mod
from ingestd.messages import Superseded
from ingestd.pipeline import Rejected
from ingestd.sinks import CLAIM_ATTR, Sinks, claim_of
from ingestd.spool import set_aside

ASIDE = re.compile(r"^(?P<name>.*)\.superseded-(?P<t>\d+)(-(?P<n>\d+))?$", re.DOTALL)


@pytest.fixture
def processed(tmp_path: Path) -> Path:
    p = tmp_path / "processed"
    (p / "errors").mkdir(parents=True)
    return p


def listing(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


def publish(processed: Path, name: str, outputs: dict[str, bytes], policy: str, claim: bytes | None,
            folders: tuple[str, ...] = ("", "errors")) -> Sinks:
    s = Sinks(str(processed), name, list(folders), policy, claim)
    for out, data in outputs.items():
        s.write(out, data)
    s.commit()
    return s


def asides(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file() and ASIDE.match(p.name)}


# --- the issue's input ------------------------------------------------------------------------------------------
def test_monday_then_tuesday_keeps_both_by_default(processed: Path) -> None:
    """`echo monday > report.csv`, later `echo tuesday > report.csv`: TUESDAY under the name, MONDAY kept aside."""
    publish(processed, "report.csv", {"": b"MONDAY\n"}, "keep", b"1-b1-m1")
    s = publish(processed, "report.csv", {"": b"TUESDAY\n"}, "keep", b"2-b2-m2")
    assert (processed / "report.csv").read_bytes() == b"TUESDAY\n"
    kept = asides(processed)
    assert list(kept.values()) == [b"MONDAY\n"]
    (aside,) = kept
    m = ASIDE.match(aside)
    assert m and m["name"] == "report.csv" and m["n"] is None  # sortable: NAME.superseded-<unix time>
    assert s.superseded == [Superseded("", "kept", aside)]
    assert os.getxattr(processed / "report.csv", CLAIM_ATTR) == b"2-b2-m2"


def test_many_versions_in_one_second_each_get_a_name(processed: Path) -> None:
    """The kind: the same name again and again, faster than the clock's second: every version stays."""
    for i in range(5):
        publish(processed, "r", {"": b"v%d\n" % i}, "keep", b"c%d" % i)
    assert (processed / "r").read_bytes() == b"v4\n"
    assert sorted(asides(processed).values()) == [b"v%d\n" % i for i in range(4)]


def test_replace_replaces_and_says_so(processed: Path) -> None:
    publish(processed, "report.csv", {"": b"MONDAY\n"}, "replace", b"1")
    s = publish(processed, "report.csv", {"": b"TUESDAY\n"}, "replace", b"2")
    assert listing(processed) == {"report.csv": b"TUESDAY\n"}
    assert s.superseded == [Superseded("", "replaced")]


def test_fail_publishes_nothing_and_leaves_the_earlier_result(processed: Path) -> None:
    publish(processed, "report.csv", {"": b"MONDAY\n", "errors": b"E1\n"}, "fail", b"1")
    s = Sinks(str(processed), "report.csv", ["", "errors"], "fail", b"2")
    s.write("", b"TUESDAY\n")
    s.write("errors", b"E2\n")
    with pytest.raises(Rejected) as e:
        s.commit()
    assert e.value.reason == "a result named report.csv already exists in processed/ (file_exist = fail)"
    s.abort()
    assert listing(processed) == {"report.csv": b"MONDAY\n", "errors/report.csv": b"E1\n"}
    assert not [p for p in processed.rglob(".*")], "temps left"


def test_fail_with_no_earlier_result_publishes(processed: Path) -> None:
    s = publish(processed, "new", {"": b"x\n"}, "fail", b"1")
    assert listing(processed) == {"new": b"x\n"} and s.superseded == []


# --- every output folder of a routing -----------------------------------------------------------------------------
def test_keep_applies_to_every_output_folder(processed: Path) -> None:
    publish(processed, "f", {"": b"OK1\n", "errors": b"ERR1\n"}, "keep", b"1")
    s = publish(processed, "f", {"": b"OK2\n", "errors": b"ERR2\n"}, "keep", b"2")
    assert (processed / "f").read_bytes() == b"OK2\n" and (processed / "errors" / "f").read_bytes() == b"ERR2\n"
    assert list(asides(processed).values()) == [b"OK1\n"]
    assert list(asides(processed / "errors").values()) == [b"ERR1\n"]
    assert sorted(x.folder for x in s.superseded) == ["", "errors"]


def test_fail_when_only_the_second_output_holds_an_earlier_result(processed: Path) -> None:
    (processed / "errors" / "f").write_bytes(b"ERR0\n")
    s = Sinks(str(processed), "f", ["", "errors"], "fail", b"2")
    s.write("", b"OK\n")
    s.write("errors", b"ERR\n")
    with pytest.raises(Rejected, match=r"already exists in processed/errors/ \(file_exist = fail\)"):
        s.commit()
    s.abort()
    assert listing(processed) == {"errors/f": b"ERR0\n"}  # nothing published in processed/ itself


# --- a stale result, in an output folder this input did not reach ------------------------------------------------
def test_stale_result_is_kept_aside(processed: Path) -> None:
    publish(processed, "f", {"": b"ok\n", "errors": b"ERROR\n"}, "keep", b"1")
    s = publish(processed, "f", {"": b"ok again\n"}, "keep", b"2")  # this version has no errors
    assert not (processed / "errors" / "f").exists()  # no result of this input there
    assert list(asides(processed / "errors").values()) == [b"ERROR\n"]
    assert Superseded("errors", "kept", next(iter(asides(processed / "errors")))) in s.superseded


def test_stale_result_is_removed_with_replace(processed: Path) -> None:
    publish(processed, "f", {"": b"ok\n", "errors": b"ERROR\n"}, "replace", b"1")
    s = publish(processed, "f", {"": b"ok again\n"}, "replace", b"2")
    assert listing(processed) == {"f": b"ok again\n"}
    assert Superseded("errors", "replaced") in s.superseded


def test_stale_result_fails_the_newcomer_with_fail(processed: Path) -> None:
    """Decided: an earlier same-named result in any output folder fails the newcomer, or its results would stand
    beside another input's as if they were one input's."""
    (processed / "errors" / "f").write_bytes(b"ERROR\n")
    s = Sinks(str(processed), "f", ["", "errors"], "fail", b"2")
    s.write("", b"ok\n")
    with pytest.raises(Rejected, match="already exists in processed/errors/"):
        s.commit()
    s.abort()
    assert listing(processed) == {"errors/f": b"ERROR\n"}


# --- a redo of the same input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["keep", "fail", "replace"])
def test_a_redo_replaces_its_own_result(processed: Path, policy: str) -> None:
    """Same claim, other bytes (a routing reloaded between the crash and the redo): recognised by the claim, not
    by the bytes; replaced, never set aside (doubled) nor failed (the input lost to failed/)."""
    publish(processed, "f", {"": b"first try\n", "errors": b"E\n"}, policy, b"7-b7-m7")
    s = publish(processed, "f", {"": b"redo\n"}, policy, b"7-b7-m7")
    assert listing(processed) == {"f": b"redo\n"}
    assert s.superseded == []


def test_an_untagged_identical_result_counts_as_a_redo(processed: Path) -> None:
    """No claim on the earlier result (a file system without user xattrs, an older version): identical bytes are
    replaced (nothing is lost), different bytes follow the policy."""
    (processed / "f").write_bytes(b"SAME\n")
    s = publish(processed, "f", {"": b"SAME\n"}, "fail", b"2", folders=("",))
    assert listing(processed) == {"f": b"SAME\n"} and s.superseded == []
    (processed / "g").write_bytes(b"OTHER\n")
    s = publish(processed, "g", {"": b"NEW\n"}, "keep", b"3", folders=("",))
    assert (processed / "g").read_bytes() == b"NEW\n" and b"OTHER\n" in asides(processed).values()


def test_a_redo_after_a_kill_between_the_aside_link_and_the_rename_does_not_double(processed: Path) -> None:
    """The kill left the earlier result under two names (its own and NAME.superseded-...): the redo reuses that
    aside instead of making a second one."""
    publish(processed, "f", {"": b"MONDAY\n"}, "keep", b"1", folders=("",))
    first = set_aside(str(processed), "f", 1_000_000_000, link=True)  # as the killed attempt left it
    publish(processed, "f", {"": b"TUESDAY\n"}, "keep", b"2", folders=("",))
    assert listing(processed) == {"f": b"TUESDAY\n", first: b"MONDAY\n"}


def test_a_refused_commit_puts_the_earlier_result_back_and_no_aside_stays(processed: Path) -> None:
    """All or none with keep: the second folder refuses its rename (immutable); the first output's rename is
    undone, the earlier result is back under its name, and the aside link is gone."""
    publish(processed, "in", {"": b"earlier\n"}, "keep", b"1", folders=("", "errors"))
    s = Sinks(str(processed), "in", ["", "errors"], "keep", b"2")
    s.write("", b"new\n")
    s.write("errors", b"E\n")
    with immutable(processed / "errors"):
        with pytest.raises(OSError) as e:
            s.commit()
        assert e.value.errno == errno.EPERM
        s.abort()
    # (the temp in the immutable folder could not be dropped by abort; recovery drops it)
    assert {k: v for k, v in listing(processed).items() if "/." not in k} == {"in": b"earlier\n"}


# --- names that need escaping ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["new\nline", os.fsdecode(b"bad\xff\xfe.csv"), "-n", "é" * 127 + "x"])
def test_hostile_names_are_kept_aside_within_name_max(processed: Path, name: str) -> None:
    publish(processed, name, {"": b"one\n"}, "keep", b"1", folders=("",))
    publish(processed, name, {"": b"two\n"}, "keep", b"2", folders=("",))
    publish(processed, name, {"": b"three\n"}, "keep", b"3", folders=("",))
    assert (processed / name).read_bytes() == b"three\n"
    kept = asides(processed)
    assert sorted(kept.values()) == [b"one\n", b"two\n"]
    for n in kept:
        assert len(os.fsencode(n)) <= 255 and os.fsencode(n).startswith(os.fsencode(name)[:200])


def test_the_fail_reason_shows_the_name_escaped(processed: Path) -> None:
    name = os.fsdecode(b"evil\n\xff.csv")
    (processed / name).write_bytes(b"x\n")
    s = Sinks(str(processed), name, [""], "fail", b"1")
    s.write("", b"y\n")
    with pytest.raises(Rejected) as e:
        s.commit()
    s.abort()
    assert e.value.reason == "a result named evil\\x0a\\xff.csv already exists in processed/ (file_exist = fail)"


# --- the claim identity ---------------------------------------------------------------------------------------------
def test_claim_is_stable_across_renames_and_differs_for_a_new_file(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.write_bytes(b"x\n")
    first = claim_of(str(a))
    assert first is not None and first.startswith(b"%d-" % a.stat().st_ino)
    a.rename(tmp_path / "b")  # the claim rename
    assert claim_of(str(tmp_path / "b")) == first
    os.link(tmp_path / "b", tmp_path / "c")
    os.unlink(tmp_path / "c")  # a claim ghost dropped by recovery changes the ctime, not the claim
    assert claim_of(str(tmp_path / "b")) == first
    os.utime(tmp_path / "b", ns=(1, 2))  # rewritten in place (or touched): another input
    assert claim_of(str(tmp_path / "b")) != first
    assert claim_of(str(tmp_path / "missing")) is None


def test_claim_differs_when_the_kernel_reuses_the_inode_number(tmp_path: Path) -> None:
    """The identity of two inputs of one name must differ even on the same inode number (ext4 hands a freed
    inode out again at once)."""
    p = tmp_path / "report.csv"
    p.write_bytes(b"monday\n")
    ino, claim = p.stat().st_ino, claim_of(str(p))
    for _ in range(200):
        p.unlink()
        p.write_bytes(b"tuesday\n")
        if p.stat().st_ino == ino:
            break
    else:
        pytest.skip("the file system did not reuse the inode number")
    assert claim_of(str(p)) != claim


def test_without_user_xattrs_or_birth_times(ramfs: Path) -> None:
    """ramfs keeps no user xattr and no birth time: the claim falls back to inode+ctime+mtime, results go
    untagged, a redo (identical bytes) is replaced, another input's result is kept aside."""
    root = ramfs
    processed = root / "processed"
    processed.mkdir()
    (root / "in").write_bytes(b"x\n")
    claim = claim_of(str(root / "in"))
    assert claim is not None and b"-c" in claim
    publish(processed, "f", {"": b"ONE\n"}, "keep", claim, folders=("",))
    with pytest.raises(OSError):
        os.getxattr(processed / "f", CLAIM_ATTR)
    publish(processed, "f", {"": b"ONE\n"}, "keep", claim, folders=("",))  # the redo
    assert listing(processed) == {"f": b"ONE\n"}
    publish(processed, "f", {"": b"TWO\n"}, "keep", b"other", folders=("",))
    assert (processed / "f").read_bytes() == b"TWO\n" and list(asides(processed).values()) == [b"ONE\n"]


def test_the_common_path_adds_no_fsync(processed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No earlier result: the group commit's path (seal without sync, publish) calls no fsync at all, and the
    alone path exactly one per output, as before."""
    calls: list[str] = []
    for fn in ("fsync", "fsync_dir", "sync_files"):
        orig = getattr(sinks_mod.durable, fn)
        monkeypatch.setattr(sinks_mod.durable, fn, lambda *a, _f=fn, _o=orig: (calls.append(_f), _o(*a))[1])
    s = Sinks(str(processed), "g", ["", "errors"], "keep", b"1")
    s.write("", b"a\n")
    s.write("errors", b"b\n")
    s.seal(sync=False)
    s.publish()
    assert calls == []
    s = Sinks(str(processed), "h", ["", "errors"], "keep", b"1")
    s.write("", b"a\n")
    s.write("errors", b"b\n")
    s.commit()
    assert sorted(calls) == ["fsync", "fsync", "fsync_dir", "fsync_dir"]


# --- the daemon: event, counter, fail, and a redo after kill -9 -------------------------------------------------
@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[DaemonProcess]]:
    procs: list[DaemonProcess] = []
    yield procs
    for d in procs:
        if d.proc.poll() is None:
            kill_tree(d)


def _superseded(d: DaemonProcess) -> dict[str, float]:
    return {k: v for k, v in metrics_ok(d.get("/metrics")[1]).items() if k.startswith("ingestd_results_superseded")}


def test_the_daemon_keeps_monday_logs_and_counts(tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    d = DaemonProcess(tmp_path / "w", cwd=tmp_path)
    daemons.append(d)
    d.started()
    u, p = d.watch_dir / "unprocessed", d.watch_dir / "processed"
    (u / "report.csv").write_bytes(b"monday\n")
    wait_for(lambda: d.event("processed", file="report.csv"), what="monday processed")
    (u / "report.csv").write_bytes(b"tuesday\n")
    wait_for(lambda: d.count("processed") == 2, what="tuesday processed")
    assert (p / "report.csv").read_bytes() == b"TUESDAY\n"
    kept = asides(p)
    assert list(kept.values()) == [b"MONDAY\n"]
    ev = d.event("result_superseded", file="report.csv")
    assert ev and ev["action"] == "kept" and ev["output"] == "processed" and ev["kept_as"] == next(iter(kept))
    assert _superseded(d) == {"ingestd_results_superseded_total{action=kept,output=processed}": 1.0}
    assert d.status()["counts"]["processed"] == 2


def test_the_daemon_fails_the_newcomer_with_fail(tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    d = DaemonProcess(tmp_path / "w", env={"INGESTD_FILE_EXIST": "fail"}, cwd=tmp_path)
    daemons.append(d)
    d.started()
    u, w = d.watch_dir / "unprocessed", d.watch_dir
    (u / "report.csv").write_bytes(b"monday\n")
    wait_for(lambda: d.event("processed", file="report.csv"), what="monday processed")
    (u / "report.csv").write_bytes(b"tuesday\n")
    wait_for(lambda: folder(w, "failed") == ["report.csv"], what="tuesday failed")
    assert (w / "processed" / "report.csv").read_bytes() == b"MONDAY\n" and folder(w, "processed") == ["report.csv"]
    assert (w / "failed" / "report.csv").read_bytes() == b"tuesday\n"
    (f,) = d.status()["failures"]
    assert f["reason"] == "a result named report.csv already exists in processed/ (file_exist = fail)"
    assert _superseded(d) == {}


@pytest.mark.parametrize("earlier", [False, True], ids=["alone", "after-monday"])
def test_a_redo_after_kill9_between_publish_and_commit_converges(tmp_path: Path, daemons: list[DaemonProcess],
                                                                 earlier: bool) -> None:
    """kill -9 of the daemon after the outputs are published and durable, before the input leaves underprocess/
    (the shim's `published` point): the restart redoes the input. It must replace its own result: exactly one
    result, no .superseded- copy of it (and monday's, if any, kept once)."""
    w = tmp_path / "w"
    for sub in ("unprocessed", "underprocess", "processed", "failed"):
        (w / sub).mkdir(parents=True)
    if earlier:
        d = DaemonProcess(w, cwd=tmp_path)
        daemons.append(d)
        d.started()
        (w / "unprocessed" / "report.csv").write_bytes(b"monday\n")
        wait_for(lambda: d.event("processed", file="report.csv"), what="monday processed")
        d.stop()
    d = DaemonProcess(w, env=shim_env(tmp_path, kill={"at": "published", "n": 1}), cwd=tmp_path)
    daemons.append(d)
    d.started()
    (w / "unprocessed" / "report.csv").write_bytes(b"tuesday\n")
    assert d.proc.wait(timeout=30) == -9  # killed at the point
    kill_tree(d)
    assert folder(w, "underprocess") == ["report.csv"], "the kill should land before the commit"
    assert (w / "processed" / "report.csv").read_bytes() == b"TUESDAY\n"  # published before the kill
    d = DaemonProcess(w, cwd=tmp_path)
    daemons.append(d)
    d.started()
    wait_for(lambda: d.event("processed", file="report.csv"), what="the redo")
    assert folder(w, "underprocess") == [] and folder(w, "failed") == []
    assert (w / "processed" / "report.csv").read_bytes() == b"TUESDAY\n"
    assert sorted(asides(w / "processed").values()) == ([b"MONDAY\n"] if earlier else [])
    assert d.count("result_superseded") == 0  # the redo replaced its own result: nothing superseded
    assert _superseded(d) == {}


# --- the setting ----------------------------------------------------------------------------------------------------
def test_the_setting_defaults_to_keep_and_refuses_other_words(tmp_path: Path) -> None:
    from ingestd.settings import ConfigError, load

    assert load({}, environ={}, cwd=tmp_path).file_exist == "keep"
    assert load({}, environ={"INGESTD_FILE_EXIST": "fail"}, cwd=tmp_path).file_exist == "fail"
    with pytest.raises(ConfigError, match=r"^file_exist: must be one of keep, replace, fail, not 'Override' \(from INGESTD_FILE_EXIST\)$"):
        load({}, environ={"INGESTD_FILE_EXIST": "Override"}, cwd=tmp_path)
