"""A file's outputs: hidden temp files, nothing under the final name before commit, atomic re-publish."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from support import immutable

from ingestd import errors
from ingestd import sinks as sinks_mod
from ingestd.sinks import Sinks
from ingestd.spool import TEMP_OUTPUT_PREFIX


@pytest.fixture
def processed(tmp_path: Path) -> Path:
    """processed/ with two routing subfolders, as the daemon creates them at start."""
    p = tmp_path / "processed"
    (p / "errors").mkdir(parents=True)
    (p / "by" / "tag").mkdir(parents=True)
    return p


def listing(root: Path) -> dict[str, bytes]:
    """Every file under root, relative path -> content."""
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


def test_publish_default_and_routed_outputs(processed: Path) -> None:
    s = Sinks(str(processed), "in.log", ["", "errors"])
    s.write("", b"a\n")
    s.write("errors", b"E\n")
    s.write("", b"b\n")
    s.commit()
    assert listing(processed) == {"in.log": b"a\nb\n", "errors/in.log": b"E\n"}
    assert s.bytes_out == 6
    assert s.lines_out == {"": 2, "errors": 1}


def test_temp_names_hidden_and_name_max_safe_for_255_byte_name(processed: Path) -> None:
    name = "é" * 127 + "x"  # 255 bytes in UTF-8: the longest name the file system allows
    assert len(os.fsencode(name)) == 255
    s = Sinks(str(processed), name, ["", "errors"])
    s.write("", b"data\n")
    s.write("errors", b"err\n")
    temps = [p for p in processed.rglob("*") if p.is_file()]
    assert len(temps) == 2
    for t in temps:
        assert t.name.startswith(".") and t.name.startswith(TEMP_OUTPUT_PREFIX)
        assert len(os.fsencode(t.name)) <= 255
    assert temps[0].name == temps[1].name == s.temp_name  # depends on the name, not on the folder
    s.commit()
    assert listing(processed) == {name: b"data\n", f"errors/{name}": b"err\n"}


def test_temp_name_is_the_same_for_any_name_length_and_different_per_name(processed: Path) -> None:
    a, b, c = (Sinks(str(processed), n, [""]) for n in ("a", "b" * 255, "a"))
    assert len(a.temp_name) == len(b.temp_name)
    assert a.temp_name == c.temp_name and a.temp_name != b.temp_name


def test_hostile_names(processed: Path) -> None:
    for name in ["-rf", "new\nline", "<script>alert(1)", "sp ace", os.fsdecode(b"bad\xff\xfe")]:
        s = Sinks(str(processed), name, [""])
        s.write("", b"x\n")
        s.commit()
        assert (processed / name).read_bytes() == b"x\n"


def test_nothing_visible_under_final_name_before_commit(processed: Path) -> None:
    s = Sinks(str(processed), "big", ["", "errors"])
    chunk = b"z" * 4096 + b"\n"
    for _ in range(600):  # > FLUSH_BYTES: part of it is already in the temp file on disk
        s.write("", chunk)
    s.write("errors", b"e\n")
    assert (processed / s.temp_name).stat().st_size > 0, "the test should cover data already flushed"
    assert not (processed / "big").exists()
    assert not (processed / "errors" / "big").exists()
    assert all(p.name.startswith(TEMP_OUTPUT_PREFIX) for p in processed.rglob("*") if p.is_file())
    s.commit()
    assert (processed / "big").read_bytes() == chunk * 600
    assert not any(p.name.startswith(".") for p in processed.rglob("*"))


def test_default_output_gets_a_file_even_when_empty(processed: Path) -> None:
    s = Sinks(str(processed), "all-dropped", ["", "errors"])
    s.commit()
    assert listing(processed) == {"all-dropped": b""}


def test_abort_leaves_nothing(processed: Path) -> None:
    s = Sinks(str(processed), "in", ["", "errors", "by/tag"])
    for _ in range(300):
        s.write("", b"y" * 8192)
    s.write("errors", b"e\n")
    s.write("by/tag", b"t\n")
    s.abort()
    assert listing(processed) == {}
    s.abort()  # twice is harmless
    assert listing(processed) == {}


def test_abort_keeps_an_earlier_result(processed: Path) -> None:
    (processed / "in").write_bytes(b"old result\n")
    s = Sinks(str(processed), "in", [""])
    s.write("", b"new\n")
    s.abort()
    assert listing(processed) == {"in": b"old result\n"}


def test_republish_replaces_atomically(processed: Path) -> None:
    first = Sinks(str(processed), "same", [""])
    first.write("", b"version one\n")
    first.commit()
    old_ino = (processed / "same").stat().st_ino
    with open(processed / "same", "rb") as reader:  # a reader of the old result keeps it whole
        second = Sinks(str(processed), "same", [""])
        second.write("", b"version two, longer\n")
        assert (processed / "same").read_bytes() == b"version one\n"  # until commit
        second.commit()
        assert reader.read() == b"version one\n"
    assert (processed / "same").read_bytes() == b"version two, longer\n"
    assert (processed / "same").stat().st_ino != old_ino  # a new file renamed over, not rewritten in place
    assert listing(processed) == {"same": b"version two, longer\n"}


def test_stale_result_in_an_output_not_reached_is_removed(processed: Path) -> None:
    first = Sinks(str(processed), "f", ["", "errors", "by/tag"])
    first.write("", b"ok\n")
    first.write("errors", b"ERROR\n")
    first.write("by/tag", b"t\n")
    first.commit()
    second = Sinks(str(processed), "f", ["", "errors", "by/tag"])  # this version has no errors
    second.write("", b"ok again\n")
    second.commit()
    assert listing(processed) == {"f": b"ok again\n"}


def test_other_names_are_never_touched(processed: Path) -> None:
    (processed / "other").write_bytes(b"keep\n")
    (processed / "errors" / "other").write_bytes(b"keep\n")
    (processed / ".gitkeep").write_bytes(b"")
    s = Sinks(str(processed), "mine", ["", "errors"])
    s.write("", b"x\n")
    s.commit()
    assert listing(processed) == {".gitkeep": b"", "other": b"keep\n", "errors/other": b"keep\n", "mine": b"x\n"}


def test_leftover_temp_from_a_dead_worker_is_replaced(processed: Path) -> None:
    s = Sinks(str(processed), "in", [""])
    (processed / s.temp_name).write_bytes(b"half-written garbage from before a crash")
    s.write("", b"clean\n")
    s.commit()
    assert listing(processed) == {"in": b"clean\n"}


def test_failed_fsync_publishes_nothing(processed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An fsync error is final: commit raises, the final name never appears, abort cleans up."""
    (processed / "in").write_bytes(b"previous\n")
    s = Sinks(str(processed), "in", [""])
    s.write("", b"new\n")

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(OSError) as e:
        s.commit()
    assert e.value.errno == errno.EIO
    monkeypatch.undo()
    s.abort()
    assert listing(processed) == {"in": b"previous\n"}


def test_full_disk_publishes_nothing(tmp_path: Path, tmpfs: Callable[..., Path]) -> None:
    """A real ENOSPC from a tiny tmpfs: the write or commit fails, abort leaves nothing, nothing half-published."""
    processed = tmpfs(tmp_path / "small", size="256k")
    s = Sinks(str(processed), "big", [""])
    with pytest.raises(OSError) as e:
        for _ in range(4):
            s.write("", b"w" * (sinks_mod.FLUSH_BYTES // 2))
        s.commit()
    assert e.value.errno in (errno.ENOSPC, errno.EFBIG)
    s.abort()
    assert list(processed.iterdir()) == []


# --- a vanished output folder is recreated (errors.classify: ENOENT on an output is RECREATE) -------------------
def test_a_removed_output_folder_is_recreated(processed: Path) -> None:
    """The issue's instance: `rmdir processed/errors` made every file routed there an endless I/O-error retry."""
    (processed / "errors").rmdir()
    s = Sinks(str(processed), "in", ["", "errors"])
    s.write("", b"ok\n")
    s.write("errors", b"E\n")
    s.commit()
    assert listing(processed) == {"in": b"ok\n", "errors/in": b"E\n"}


def test_processed_itself_removed_with_nested_outputs(tmp_path: Path) -> None:
    """The kind: rm -rf processed/ takes the default output and nested routing folders with it."""
    processed = tmp_path / "processed"
    s = Sinks(str(processed), "in", ["", "by/tag"])
    s.write("by/tag", b"t\n")
    s.commit()
    assert listing(processed) == {"in": b"", "by/tag/in": b"t\n"}


def test_remove_temps_with_an_output_folder_gone(processed: Path) -> None:
    """A worker death while an output folder is missing must not raise out of the daemon."""
    s = Sinks(str(processed), "in", ["", "errors"])
    s.write("", b"x\n")
    (processed / "errors").rmdir()
    sinks_mod.remove_temps(str(processed), ["", "errors"], os.getpid())
    assert [p.name for p in processed.iterdir() if p.is_file()] == []


def test_an_error_from_writing_carries_its_phase(tmp_path: Path) -> None:
    from ingestd.errors import Phase, PhaseError

    (tmp_path / "processed").write_bytes(b"a file where the folder should be")
    s = Sinks(str(tmp_path / "processed"), "in", [""])
    with pytest.raises(PhaseError) as e:
        s.write("", b"x\n")
    assert e.value.errno == errno.ENOTDIR and e.value.phase is Phase.WRITE_OUTPUT


# --- all outputs or none ------------------------------------------------------------------------------------------
def test_a_commit_refused_by_a_directory_renames_nothing(processed: Path) -> None:
    """The issue's instance: one output renamed, the next refused (EISDIR), and the input goes to failed/."""
    (processed / "errors" / "in").mkdir()  # the name is taken by a folder in the second output only
    s = Sinks(str(processed), "in", ["", "errors"])
    s.write("", b"ok\n")
    s.write("errors", b"E\n")
    with pytest.raises(OSError) as e:
        s.commit()
    assert e.value.errno == errno.EISDIR
    assert errors.reason(e.value).startswith("processed/errors/in is a folder, so its result cannot take that name")
    s.abort()
    assert listing(processed) == {}
    assert (processed / "errors" / "in").is_dir()


def test_a_refusal_by_a_name_collision_says_which_entry_blocks(processed: Path) -> None:
    """Found by a new user: an input named like an output folder of the routing, or (recursive mode) a file in
    processed/ where a folder of results must be made, failed with a bare "Is a directory (EISDIR)" or "Not a
    directory (ENOTDIR)" naming nothing. The reason now names the entry that stands in the way."""
    (processed / "errors").mkdir(exist_ok=True)
    for expect in ("processed/errors is a folder", "errors names an output folder of the routing"):
        s = Sinks(str(processed), "errors", ["", "errors"])
        s.write("", b"x\n")
        with pytest.raises(OSError) as e:
            s.commit()
        s.abort()
        assert e.value.errno == errno.EISDIR
        assert errors.reason(e.value) == f"{expect}, so its result cannot take that name (EISDIR)"
        if (processed / "errors").exists():
            (processed / "errors").rmdir()  # then removed by hand: the name is still the routing's
    assert listing(processed) == {}
    (processed / "batch").write_bytes(b"a result named batch\n")
    s = Sinks(str(processed), "batch/a.txt", [""])
    s.write("", b"x\n")
    with pytest.raises(OSError) as e:
        s.commit()
    s.abort()
    assert e.value.errno == errno.ENOTDIR
    assert errors.reason(e.value) == "processed/batch is a file where a folder is needed (ENOTDIR)"
    assert (processed / "batch").read_bytes() == b"a result named batch\n"
    # What failed/'s sidecar says: the daemon's reason adds what to do (the user saw the cause, not the remedy).
    from ingestd import pipeline, worker
    from ingestd.messages import Rejected
    outcome = worker._failure(e.value, pipeline.Stats(), errors.Phase.PUBLISH)
    assert isinstance(outcome, Rejected), outcome
    assert outcome.reason == ("cannot publish: processed/batch is a file where a folder is needed (ENOTDIR); move "
                              "that entry away (or rename the input), then `ingestd requeue` it")


def test_process_names_its_output_as_given_when_a_folder_stands_there(tmp_path: Path) -> None:
    """Found by a new user: `ingestd process --output sub` (sub a folder) said "u18/sub is a folder": the last
    part of the output's folder, not the path typed. `process` names the path as given, and no requeue hint."""
    import subprocess
    import sys
    (tmp_path / "in").write_bytes(b"x\n")
    (tmp_path / "sub").mkdir()
    for out in ("sub", str(tmp_path / "sub")):
        r = subprocess.run([sys.executable, "-m", "ingestd", "process", "--input", "in", "--output", out], check=False,
                           cwd=tmp_path, capture_output=True)
        assert r.returncode == 73
        assert r.stderr.decode() == f"ingestd: cannot write {out}: {out} is a folder, so its result cannot take " \
                                    "that name\n", r.stderr


def test_a_commit_refused_midway_puts_back_what_it_renamed(processed: Path) -> None:
    """The kind: a refusal no check can foresee (here an immutable folder: EPERM on the second rename). The
    first output, already renamed, is undone and the earlier same-named result restored byte for byte."""
    (processed / "in").write_bytes(b"earlier result\n")
    locked = processed / "errors"
    s = Sinks(str(processed), "in", ["", "errors"])
    s.write("", b"new\n")
    s.write("errors", b"E\n")  # temps exist in both folders before the folder is locked
    with immutable(locked):
        with pytest.raises(OSError) as e:
            s.commit()
        assert e.value.errno == errno.EPERM
        s.abort()
    assert (processed / "in").read_bytes() == b"earlier result\n"
    assert not (locked / "in").exists()
    assert [p.name for p in processed.iterdir() if p.name.startswith(".")] == []  # no kept link left behind


def test_the_kept_earlier_result_goes_after_a_successful_commit(processed: Path) -> None:
    (processed / "in").write_bytes(b"old\n")
    s = Sinks(str(processed), "in", [""])
    s.write("", b"new\n")
    s.commit()
    assert sorted(p.name for p in processed.iterdir() if p.is_file()) == ["in"]


# --- lines are counted, not writes ---------------------------------------------------------------------------------
def test_lines_counted_in_blocks_of_the_fast_path(tmp_path: Path) -> None:
    """The issue's instance: 100,000 lines through the block fast path counted as 2."""
    from ingestd import pipeline, routing

    src = tmp_path / "in.txt"
    src.write_bytes(b"line of text\n" * 100_000)
    processed = tmp_path / "processed"
    processed.mkdir()
    s = Sinks(str(processed), "in.txt", [""])
    with pipeline.open_input(str(src)) as f:
        pipeline.run(f, "in.txt", routing.from_mode("uppercase"), 1 << 20, s.write, pipeline.Stats())
    s.commit()
    assert s.lines_out == {"": 100_000}


@pytest.mark.parametrize(("writes", "lines"), [
    ([b"a\nb\nc"], 3), ([b"a\n", b"b"], 2), ([b"a\r\nb\r\n"], 2), ([b""], 0), ([b"\n\n"], 2), ([b"x" * 10], 1),
])
def test_line_count_of_any_write_shape(processed: Path, writes: list[bytes], lines: int) -> None:
    """The kind: a block with a last line without ending, CRLF, empty lines, a single unterminated line."""
    s = Sinks(str(processed), "in", [""])
    for w in writes:
        s.write("", w)
    s.commit()
    assert s.lines_out == {"": lines}


def test_a_temp_left_by_an_earlier_attempt_in_this_process_is_replaced_not_written_through(processed: Path,
                                                                                           tmp_path: Path) -> None:
    """An earlier attempt whose abort could not remove its temp (same pid, same name: same temp name): the new
    attempt starts a fresh file; a symlink there is removed, never followed."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me\n")
    for stale in ("file", "symlink"):
        s = Sinks(str(processed), "a.txt", [""])
        temp = processed / s.temp_name
        if stale == "file":
            temp.write_bytes(b"stale bytes from the earlier attempt, longer than the new ones\n")
        else:
            temp.symlink_to(victim)
        s.write("", b"new\n")
        s.commit()
        assert (processed / "a.txt").read_bytes() == b"new\n", stale
        assert not temp.exists() and not temp.is_symlink()
        assert victim.read_bytes() == b"keep me\n"


def test_a_temp_whose_claim_tag_fails_is_held_and_dropped_by_abort(processed: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The claim tag (fsetxattr) fails right after the temp was created (EIO): the temp is already held, so abort
    closes and removes it. It was made but not yet held, so it stayed behind, its descriptor open."""
    def broken_tag(fd: int, name: str, value: bytes) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(sinks_mod.durable, "tag", broken_tag)
    s = Sinks(str(processed), "a.txt", [""], claim=b"1-b2-m3")
    with pytest.raises(OSError):
        s.write("", b"x\n")
    fds = len(os.listdir("/proc/self/fd"))
    s.abort()
    assert listing(processed) == {}  # no temp left
    assert len(os.listdir("/proc/self/fd")) == fds - 1  # its descriptor closed too
