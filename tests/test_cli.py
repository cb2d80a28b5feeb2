"""The command line as a user meets it: every command and its exit codes, in real subprocesses."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from support import (
    INGESTD,
    NEUTRAL_CWD,
    DaemonProcess,
    clean_env,
    folder,
    plugin,
    wait_for,
    with_path,
)
from torture.lib import readable_copy

NOBODY = 65534  # the user nobody (tests/test_lease.py)


def ingestd(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, input: bytes | None = None
            ) -> subprocess.CompletedProcess[bytes]:
    full = clean_env()
    return subprocess.run([*INGESTD, *args], capture_output=True, cwd=cwd or NEUTRAL_CWD, env={**full, **(env or {})}, input=input,
                          timeout=60)


def test_process_file_to_file_is_published_atomically(tmp_path: Path) -> None:
    src = tmp_path / "in.txt"
    src.write_bytes(b"one\r\ntwo\n\xff\xfe three")
    r = ingestd("process", "--input", str(src), "--output", str(tmp_path / "out.txt"), "--mode", "uppercase")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.txt").read_bytes() == b"ONE\r\nTWO\n\xff\xfe THREE"
    assert sorted(os.listdir(tmp_path)) == ["in.txt", "out.txt"]  # no temp left behind


# What `ingestd process` must not import: its start-up is timed against `tr` (docs/benchmarks.md, 4.1), and each of
# these costs milliseconds there (the daemon's folders and log, the worker messages, TOML without a config file).
NOT_FOR_PROCESS = ("ingestd.spool", "ingestd.log", "ingestd.messages", "ingestd.daemon", "ingestd.commands", "logging",
                   "tomllib", "socket", "json", "datetime", "inotify_simple", "prometheus_client")


@pytest.mark.parametrize("existing", [False, True], ids=["new output", "output replaced"])
def test_process_imports_only_what_it_needs(tmp_path: Path, existing: bool) -> None:
    src, out = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_bytes(b"a\n" * 1000)
    if existing:
        out.write_bytes(b"an earlier result\n")  # replaced in place: file_exist does not apply to `process`
    code = ("import sys; from ingestd.cli import main; rc = main(sys.argv[1:]); "
            "print(' '.join(sorted(sys.modules))); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "process", "--input", str(src), "--output", str(out), "--mode",
                        "uppercase"], capture_output=True, timeout=60, env=clean_env(), check=False, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == b"A\n" * 1000
    loaded = set(r.stdout.decode().split())
    assert "ingestd.manual" in loaded  # the check itself saw the command's modules
    assert not loaded & set(NOT_FOR_PROCESS), sorted(loaded & set(NOT_FOR_PROCESS))


def test_process_stdin_to_stdout_with_each_mode() -> None:
    cases = {"lowercase": b"ab c\n", "titlecase": b"Ab C\n", "reverse": b"c bA\n", "strip": b"Ab c\n",
             "passthrough": b"  Ab c  \n"}
    for mode, want in cases.items():
        text = b"  Ab c  \n" if mode in ("strip", "passthrough") else b"Ab c\n"
        r = ingestd("process", "--input", "-", "--output", "-", "--mode", mode, input=text)
        assert (r.returncode, r.stdout) == (0, want), mode


EXPLAIN = ('[[filters]]\nmatch="*"\nretag="errors"\npattern="ERR"\n[[filters]]\nmatch="default"\n'
           'processor="drop"\npattern="^#"\n[[filters]]\nmatch="default"\nprocessor="uppercase"\n'
           '[[outputs]]\nmatch="errors"\npath="errors"\n[[outputs]]\nmatch="*"\n')


# Issue 9: --explain listed filters that did nothing ("filters=[drop]" on a kept line), did not show the text a
# line becomes nor where a routed line went, wrote "1 records", and made empty folders beside --output FILE.
def test_explain_prints_the_route_of_every_line(tmp_path: Path) -> None:
    cfg = tmp_path / "r.toml"
    cfg.write_text(EXPLAIN)
    r = ingestd("process", "--input", "-", "--output", "-", "--config", str(cfg), "--explain",
                input=b"ok\nERR x\n# c\nOK\n")
    assert r.returncode == 0
    assert r.stdout == b"OK\nOK\n"
    lines = r.stderr.decode().splitlines()
    assert lines[0] == "line 1: tag=default, filters [uppercase] -> stdout: 'OK'"  # drop ran but did not act
    assert lines[1] == ("line 2: tag=errors, filters [retag->errors] -> not written (errors/ output; stdout carries "
                        "only processed/): 'ERR x'")
    assert lines[2] == "line 3: tag=default, filters [drop] -> dropped"
    assert lines[3] == "line 4: tag=default, no filter acted -> stdout: 'OK'"  # uppercase left "OK" as it was
    assert lines[4].startswith("ingestd: 1 record routed to other outputs (errors/ 1) was not written to stdout")


def test_explain_with_an_output_file_names_the_files_and_makes_no_empty_folders(tmp_path: Path) -> None:
    cfg = tmp_path / "r.toml"
    cfg.write_text(EXPLAIN)
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "in.txt").write_bytes(b"ok\nERR 1\nERR 2\n")
    r = ingestd("process", "--input", str(tmp_path / "in.txt"), "--output", str(out / "o.txt"), "--config", str(cfg),
                "--explain")
    assert r.returncode == 0, r.stderr
    assert r.stderr.decode().splitlines()[1] == f"line 2: tag=errors, filters [retag->errors] -> {out}/errors/o.txt: 'ERR 1'"
    assert (out / "errors" / "o.txt").read_bytes() == b"ERR 1\nERR 2\n"
    (tmp_path / "calm.txt").write_bytes(b"ok\n")  # no line reaches errors/: no errors/ folder
    other = tmp_path / "other"
    other.mkdir()
    r = ingestd("process", "--input", str(tmp_path / "calm.txt"), "--output", str(other / "o.txt"), "--config", str(cfg))
    assert r.returncode == 0 and sorted(os.listdir(other)) == ["o.txt"]


@pytest.mark.parametrize(("lines", "said"), [(1, "1 record routed to other outputs (errors/ 1) was"),
                                             (2, "2 records routed to other outputs (errors/ 2) were")])
def test_routed_records_on_stdout_are_counted_in_good_english(tmp_path: Path, lines: int, said: str) -> None:
    cfg = tmp_path / "r.toml"
    cfg.write_text(EXPLAIN)
    r = ingestd("process", "--input", "-", "--output", "-", "--config", str(cfg), input=b"ERR\n" * lines)
    assert r.returncode == 0 and said in r.stderr.decode()


# Issue 9: --mode grep|drop|redact could not be given a pattern on the command line ("_grep() missing 1 required
# positional argument").
@pytest.mark.parametrize(("args", "env", "out"), [
    (["--mode", "grep", "--pattern", "ERR"], {}, b"ERR 1\n"),
    (["--mode", "drop"], {"INGESTD_PATTERN": "ERR"}, b"ok\n"),
    (["--mode", "redact", "--pattern", "[0-9]", "--replacement", "#"], {}, b"ok\nERR #\n"),
])
def test_process_modes_with_a_pattern(args: list[str], env: dict[str, str], out: bytes) -> None:
    r = ingestd("process", "--input", "-", "--output", "-", *args, env=env, input=b"ok\nERR 1\n")
    assert (r.returncode, r.stdout, r.stderr) == (0, out, b"")


def test_run_with_a_mode_pattern_and_a_reload_that_changes_it(tmp_path: Path) -> None:
    """The daemon's workers get the mode's options; SIGHUP re-reads them (here from the environment file)."""
    import signal

    (tmp_path / ".env").write_text("INGESTD_PATTERN=ERR\n")
    d = DaemonProcess(tmp_path / "w", "--mode", "grep", cwd=tmp_path).started()
    try:
        u = d.watch_dir / "unprocessed"
        (u / "a.txt").write_bytes(b"ok\nERR 1\nWARN 2\n")
        wait_for(lambda: folder(d.watch_dir, "processed") == ["a.txt"])
        assert (d.watch_dir / "processed" / "a.txt").read_bytes() == b"ERR 1\n"
        (tmp_path / ".env").write_text("INGESTD_PATTERN=WARN\n")
        d.signal(signal.SIGHUP)
        wait_for(lambda: d.event("reloaded"), what="reloaded")
        (u / "b.txt").write_bytes(b"ok\nERR 1\nWARN 2\n")
        wait_for(lambda: "b.txt" in folder(d.watch_dir, "processed"))
        assert (d.watch_dir / "processed" / "b.txt").read_bytes() == b"WARN 2\n"
    finally:
        d.stop()


def test_dotenv_lines_that_are_not_read_are_said_at_start_and_at_each_reload(tmp_path: Path) -> None:
    """A new user put `recursive = true` in .env, as the daemon's own hint wrote it, then `mode=titlecase` over
    MODE=reverse: nothing was read, nothing said so, and the reload fell back to uppercase under an INFO 'routing
    reloaded'. Each such line is now a dotenv_not_read WARNING naming the form that is read, and `reloaded` says
    the mode it runs now."""
    import signal

    (tmp_path / ".env").write_text("recursive = true\nMODE=reverse\n")
    d = DaemonProcess(tmp_path / "w", cwd=tmp_path).started()
    try:
        ev = wait_for(lambda: d.event("dotenv_not_read"), what="dotenv_not_read")
        assert (ev["level"], ev["lines"], ev["use"]) == ("WARNING", ["recursive"], ["INGESTD_RECURSIVE"])
        assert ev["file"].endswith(".env")
        (tmp_path / ".env").write_text("mode=titlecase\n")
        d.signal(signal.SIGHUP)
        ev = wait_for(lambda: d.event("reloaded"), what="reloaded")
        assert ev["mode"] == "uppercase"  # MODE is gone, `mode` is not read: said, not hidden
        wait_for(lambda: d.count("dotenv_not_read") == 2, what="the second dotenv_not_read")
        assert [e["lines"] for e in d.events if e.get("event") == "dotenv_not_read"][-1] == ["mode"]
    finally:
        d.stop()


def test_process_mode_flag_beats_the_routing_config_of_dotenv(tmp_path: Path) -> None:
    (tmp_path / "r.toml").write_text('[[filters]]\nmatch = "*"\nprocessor = "reverse"\n')
    (tmp_path / ".env").write_text(f"INGESTD_CONFIG={tmp_path / 'r.toml'}\n")
    r = ingestd("process", "--input", "-", "--output", "-", cwd=tmp_path, input=b"ab\n")
    assert (r.returncode, r.stdout) == (0, b"ba\n")
    r = ingestd("process", "--input", "-", "--output", "-", "--mode", "uppercase", cwd=tmp_path, input=b"ab\n")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"AB\n", b"")


@pytest.mark.parametrize("command", ["run", "process"])
@pytest.mark.parametrize(("args", "message"), [
    (["--mode", "grep"], ("ingestd: pattern: mode grep needs a pattern (--pattern, INGESTD_PATTERN or pattern = in "
                          "the config)\n")),
    (["--mode", "redact", "--pattern", "("], "ingestd: pattern: invalid regular expression: "),
    (["--mode", "uppercase", "--pattern", "x"], "ingestd: pattern: mode uppercase takes no options"),
])
def test_mode_option_errors_exit_78_in_our_words(tmp_path: Path, command: str, args: list[str], message: str) -> None:
    where = ["--watch-dir", str(tmp_path / "w")] if command == "run" else ["--input", "-", "--output", "-"]
    r = ingestd(command, *where, *args, cwd=tmp_path, input=b"x\n")
    err = r.stderr.decode()
    assert r.returncode == 78 and err.startswith(message) and err.count("\n") == 1, err
    assert "positional" not in err and "Traceback" not in err


# Audit of issue 9: `ingestd process --output - | head -1` said "cannot write -: Broken pipe" and exited 73.
@pytest.mark.parametrize("args", [["--mode", "lowercase"],  # the block fast path
                                  ["--mode", "grep", "--pattern", "1"],  # line by line
                                  ["--mode", "grep", "--pattern", "1", "--explain"]])
def test_process_into_a_reader_that_goes_away_exits_quietly(tmp_path: Path, args: list[str]) -> None:
    src = tmp_path / "big.txt"
    src.write_bytes(b"".join(b"%d\n" % i for i in range(1, 1_000_001)))
    p = subprocess.Popen([*INGESTD, "process", "--input", str(src), "--output", "-", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    assert p.stdout.readline() == b"1\n"
    p.stdout.close()  # `| head -1`
    err = p.stderr.read()
    p.stderr.close()
    assert (p.wait(60), err if "--explain" not in args else b"") == (0, b"")
    assert b"Broken pipe" not in err and b"Traceback" not in err


def test_explain_into_a_reader_that_goes_away_still_writes_the_whole_file(tmp_path: Path) -> None:
    src = tmp_path / "big.txt"
    src.write_bytes(b"".join(b"%d\n" % i for i in range(1, 200_001)))
    p = subprocess.Popen([*INGESTD, "process", "--input", str(src), "--output", str(tmp_path / "o.txt"), "--mode",
                          "grep", "--pattern", "7", "--explain"], stderr=subprocess.PIPE)
    assert p.stderr is not None
    assert p.stderr.readline().startswith(b"line 1: ")
    p.stderr.close()  # `--explain 2>&1 | head -1`
    assert p.wait(60) == 0
    assert (tmp_path / "o.txt").read_bytes() == b"".join(b"%d\n" % i for i in range(1, 200_001) if b"7" in b"%d" % i)


def test_process_exit_codes(tmp_path: Path) -> None:
    (tmp_path / "bin").write_bytes(b"a\0b")
    assert ingestd("process", "--input", str(tmp_path / "missing"), "--output", "-").returncode == 66
    r = ingestd("process", "--input", str(tmp_path / "bin"), "--output", str(tmp_path / "o"))
    assert r.returncode == 65 and b"binary content" in r.stderr and not (tmp_path / "o").exists()
    r = ingestd("process", "--input", "-", "--output", "-", "--mode", "nope", input=b"x")
    assert r.returncode == 78 and r.stderr.startswith(b"ingestd: mode: unknown processor 'nope'")
    assert ingestd("process", "--input", "-").returncode == 2  # --output missing
    assert ingestd("process", "--input", "-", "--output", "-", "--mode", "x", "--config", "y").returncode == 2
    (tmp_path / "text").write_bytes(b"fine\n")
    r = ingestd("process", "--input", str(tmp_path / "text"), "--output", "/proc/nope/out")
    assert r.returncode == 73 and b"cannot write /proc/nope/out" in r.stderr


def test_process_refuses_an_output_in_a_folder_that_does_not_exist(tmp_path: Path) -> None:
    """Found: `--output /missing/dir/x` made /missing/dir silently (a typo became a tree of folders); cp(1) and
    the shell's `>` refuse. Routed outputs' sibling folders are still made, beside an existing main folder."""
    (tmp_path / "text").write_bytes(b"fine\n")
    r = ingestd("process", "--input", str(tmp_path / "text"), "--output", str(tmp_path / "typo" / "deep" / "out"))
    assert r.returncode == 73 and b"does not exist" in r.stderr and not (tmp_path / "typo").exists()
    r = ingestd("process", "--input", str(tmp_path / "text"), "--output", str(tmp_path / "text" / "out"))
    assert r.returncode == 73  # a file where the folder should be
    assert ingestd("process", "--input", str(tmp_path / "text"), "--output", "rel-out", cwd=tmp_path).returncode == 0
    assert (tmp_path / "rel-out").read_bytes() == b"FINE\n"  # a bare name: the current folder


def test_process_resolves_the_output_folder_as_the_kernel_does(tmp_path: Path) -> None:
    """Found by a new user: `--output missing/../out.txt` was accepted and wrote ./out.txt (abspath collapses
    "missing/.." without asking), where cp(1) and `>` refuse (no such folder). The kind: the folder is the path as
    the kernel resolves it, so "link/../out.txt" goes beside the link's target, not beside the link."""
    (tmp_path / "text").write_bytes(b"fine\n")
    r = ingestd("process", "--input", "text", "--output", "missing/../out.txt", cwd=tmp_path)
    assert r.returncode == 73 and b"its folder missing/.. does not exist" in r.stderr, r.stderr
    assert not (tmp_path / "out.txt").exists()
    (tmp_path / "real" / "deep").mkdir(parents=True)
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "link").symlink_to(tmp_path / "real" / "deep")
    r = ingestd("process", "--input", "text", "--output", "here/link/../out.txt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "real" / "out.txt").read_bytes() == b"FINE\n"  # where `cp text here/link/../out.txt` writes
    assert not (tmp_path / "here" / "out.txt").exists()


def test_a_plugin_that_fails_to_load_is_named_not_called_unknown(tmp_path: Path) -> None:
    """Found: `--mode X` where X's module raises KeyError at import said "unknown processor 'X'" (while listing X as
    known). Both commands that load a processor say it could not be loaded and why: process, and run at start
    (which makes no watch dir when its settings are refused)."""
    env = with_path(plugin(tmp_path / "plug", "keyload", "raise KeyError('endpoint')\n", {"keyfail": "keyload:factory"}))
    (tmp_path / "in.txt").write_bytes(b"hi\n")
    said = "ingestd: mode: processor 'keyfail' could not be loaded: KeyError: 'endpoint' (from --mode)\n"
    r = ingestd("process", "--mode", "keyfail", "--input", "in.txt", "--output", "-", cwd=tmp_path, env=env)
    assert (r.returncode, r.stderr.decode()) == (78, said)
    r = ingestd("run", "--watch-dir", str(tmp_path / "w"), "--mode", "keyfail", "--listen", "127.0.0.1:0", env=env)
    assert (r.returncode, r.stderr.decode()) == (78, said)
    assert not (tmp_path / "w").exists()


def test_process_says_the_kernels_reason_when_the_output_cannot_go_there(tmp_path: Path) -> None:
    """Found: `--output loop1/x`, loop1 a symlink loop (`ln -s loop1 loop1`), said "its folder loop1 does not
    exist", and `--output loop1` "a symlink to nothing". The kind: each refusal gives stat(2)'s errno in the
    kernel's words, "does not exist" for ENOENT alone; the path is named as typed. The input side too."""
    (tmp_path / "loop1").symlink_to("loop1")
    (tmp_path / "file").write_bytes(b"")
    cases = {"loop1/x": "its folder loop1: too many levels of symbolic links",
             "loop1": "too many levels of symbolic links",
             "file/x": "its folder file is not a folder",
             "file/sub/x": "its folder file/sub: a part of its path is not a folder",
             "missing/x": "its folder missing does not exist"}
    for out, why in cases.items():
        r = ingestd("process", "--input", "-", "--output", out, cwd=tmp_path, input=b"hi\n")
        said = r.stderr.decode()
        assert r.returncode == 73 and said.startswith(f"ingestd: cannot write {out}: ") and why in said.lower(), said
        assert "does not exist" not in said or out.startswith("missing"), said
    r = ingestd("process", "--input", "loop1/x", "--output", "-", cwd=tmp_path)
    assert r.returncode == 66 and b"cannot read loop1/x: Too many levels of symbolic links" in r.stderr, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["file", "loop1"]  # nothing made, no temp left


def test_process_says_permission_denied_for_an_output_folder_it_may_not_enter() -> None:
    """EACCES on the way to the output's folder is no missing folder: said as the kernel says it. As root (who may
    enter anything) the command runs as nobody, with a python and a copy of ingestd nobody may read, in a folder
    outside pytest's basetemp (closed to nobody), as tests/test_status_truth.py does."""
    root = os.geteuid() == 0
    python = shutil.which("python3.11", path="/usr/bin:/usr/local/bin") if root else sys.executable
    if python is None:
        pytest.skip("a python3.11 the user nobody may execute")
    base = Path(tempfile.mkdtemp(prefix="ingestd-eacces-", dir="/tmp"))
    locked = base / "locked"
    try:
        base.chmod(0o755)
        env = {**clean_env(), "PYTHONPATH": readable_copy(base / "lib")} if root else clean_env()
        (locked / "sub").mkdir(parents=True)
        locked.chmod(0o700 if root else 0)

        def nobody() -> None:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)

        out = locked / "sub" / "x"
        r = subprocess.run([python, "-m", "ingestd", "process", "--input", "-", "--output", str(out)], input=b"hi\n",
                           capture_output=True, env=env, cwd=NEUTRAL_CWD, preexec_fn=nobody if root else None,
                           timeout=60, check=False)
        assert r.returncode == 73, r.stderr
        assert r.stderr.decode() == f"ingestd: cannot write {out}: its folder {out.parent}: Permission denied\n"
    finally:
        locked.chmod(0o700)
        shutil.rmtree(base)



@pytest.mark.parametrize(("args", "env", "message"), [
    (["--workers", "0"], {}, "workers: must be an integer >= 1, not '0'"),
    (["--listen", "nowhere"], {}, "listen: must be HOST:PORT"),
    ([], {"INGESTD_SETTLE_TIME": "soon"}, "settle_time: must be a number of seconds >= 0"),
    ([], {"MODE": "shouting"}, "mode: unknown processor 'shouting'"),
    (["--config", "/nonexistent.toml"], {}, "config: cannot read /nonexistent.toml"),
])
def test_bad_settings_exit_78_with_one_line(tmp_path: Path, args: list[str], env: dict[str, str], message: str) -> None:
    r = ingestd("run", "--watch-dir", str(tmp_path / "w"), *args, env=env, cwd=tmp_path)
    assert r.returncode == 78
    err = r.stderr.decode()
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_bad_command_lines_exit_2() -> None:
    assert ingestd().returncode == 2
    assert ingestd("frobnicate").returncode == 2
    assert ingestd("run", "--no-such-flag").returncode == 2
    r = ingestd("--version")
    assert r.returncode == 0 and r.stdout.startswith(b"ingestd ")


def test_dotenv_mode_is_used_and_flags_win(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("MODE=lowercase\n")
    r = ingestd("process", "--input", "-", "--output", "-", cwd=tmp_path, input=b"MiXed\n")
    assert r.stdout == b"mixed\n"
    r = ingestd("process", "--input", "-", "--output", "-", "--mode", "reverse", cwd=tmp_path, input=b"MiXed\n")
    assert r.stdout == b"deXiM\n"


def test_status_and_requeue_without_a_daemon(tmp_path: Path) -> None:
    w = tmp_path / "w"
    for sub in ("unprocessed", "underprocess", "processed", "failed"):
        (w / sub).mkdir(parents=True)
    (w / "processed" / "done.txt").write_bytes(b"X")
    (w / "underprocess" / "busy.txt").write_bytes(b"x")
    (w / "failed" / "bad.bin").write_bytes(b"\0")
    r = ingestd("status", "--watch-dir", str(w))
    out = r.stdout.decode()
    assert r.returncode == 0
    assert "daemon      not running" in out
    assert "unprocessed 0  underprocess 1  processed 1  failed 1" in out
    # Not "in progress": no daemon holds it (found by a new user: a crashed daemon's file looked like work going on).
    assert "left claimed busy.txt (no daemon is running: its next start takes them first)" in out
    assert "in progress" not in out and "done.txt" in out and "bad.bin: unknown (no sidecar)" in out
    doc = json.loads(ingestd("status", "--watch-dir", str(w), "--json").stdout)
    assert doc["counts"] == {"unprocessed": 0, "underprocess": 1, "processed": 1, "failed": 1}
    r = ingestd("requeue", "--watch-dir", str(w), "nothere")
    assert r.returncode == 1 and b"not in failed/: nothere" in r.stderr
    r = ingestd("requeue", "--watch-dir", str(w))
    assert r.returncode == 0 and b"requeued bad.bin" in r.stdout
    assert folder(w, "unprocessed") == ["bad.bin"] and folder(w, "failed") == []
    # Nothing left: said, not silence (a new user could not tell whether it had done anything).
    r = ingestd("requeue", "--watch-dir", str(w))
    assert r.returncode == 0 and r.stdout == b"nothing to requeue: failed/ holds no files\n"
    assert ingestd("status", "--watch-dir", str(tmp_path / "nope")).returncode == 78


def test_status_and_requeue_with_a_running_daemon(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path / "w", cwd=tmp_path).started()
    try:
        w = d.watch_dir
        (w / "unprocessed" / "b.bin").write_bytes(b"x\0y")
        wait_for(lambda: folder(w, "failed") == ["b.bin"])
        out = ingestd("status", "--watch-dir", str(w)).stdout.decode()
        assert f"running (pid {d.proc.pid}" in out
        assert "b.bin: binary content" in out and "attempts 1" in out
        # Requeued, it fails again: the failure is reported anew, never lost.
        assert ingestd("requeue", "--watch-dir", str(w), "b.bin").returncode == 0
        wait_for(lambda: d.count("failed") == 2)
        assert folder(w, "failed") == ["b.bin"]
    finally:
        d.stop()


def test_progress_bar_only_on_a_terminal_for_large_inputs(tmp_path: Path) -> None:
    import fcntl
    import pty
    import struct
    import termios

    big = tmp_path / "big.txt"
    big.write_bytes((b"y" * 99 + b"\n") * 100_000)  # 10 MB, above the 8 MiB threshold
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # a terminal 80 columns wide
    try:
        r = subprocess.run([*INGESTD, "process", "--input", str(big), "--output", str(tmp_path / "o")],
                           stderr=slave, stdout=subprocess.DEVNULL, timeout=60)
        os.close(slave)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
    assert r.returncode == 0
    assert b"big.txt" in seen and b"B/s" in seen  # tqdm's bar: name, bytes and rate
    piped = ingestd("process", "--input", str(big), "--output", str(tmp_path / "o2"))
    assert piped.returncode == 0 and piped.stderr == b""  # not a terminal: silent


def test_run_at_a_terminal_logs_text_and_says_where_to_look(tmp_path: Path) -> None:
    """log_format auto: text lines with logfmt values when stderr is a terminal (a real pty), plus one human line."""
    import pty
    import select
    import signal as sig
    import sys as _sys

    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    proc = subprocess.Popen([_sys.executable, "-m", "ingestd", "run", "--watch-dir", str(tmp_path / "w"),
                             "--listen", "127.0.0.1:0", "--workers", "1"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=slave, env=env, cwd=tmp_path)
    os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + 20
        while b"Ctrl-C" not in out and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                out += os.read(master, 4096)
        (tmp_path / "w" / "unprocessed" / "a b.txt").write_bytes(b"x\n")
        while b"processed" not in out.split(b"Ctrl-C", 1)[-1] and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                out += os.read(master, 4096)
    finally:
        proc.send_signal(sig.SIGTERM)
        proc.wait(20)
        os.close(master)
    text = out.decode()
    assert "status page http://127.0.0.1:" in text and "press Ctrl-C to stop" in text, text
    assert f"watching {tmp_path.resolve()}/w/unprocessed/" in text
    assert 'file="a b.txt"' in text, text
    assert "None" not in text and "{" not in text and "[" not in text, text


def test_text_log_of_an_idle_stop_has_no_empty_fields(tmp_path: Path) -> None:
    """Audit of issue 9: an idle stop logged `stopping  signal=SIGTERM in_progress="" timeout=20.0` in text."""
    d = DaemonProcess(tmp_path / "w", "--log-format", "text", cwd=tmp_path)
    try:
        wait_for(lambda: any("ingestd started" in line for line in d.lines), 20, what="started")
    finally:
        d.stop()
    stopping = [line for line in d.lines if " stopping " in line]
    assert stopping and 'in_progress=""' not in stopping[0] and "finishing current files" not in stopping[0], d.lines
    assert not [line for line in d.lines if '=""' in line or "None" in line or "[" in line], d.lines


def test_second_sigterm_is_said_as_such_never_as_a_stop_timeout(tmp_path: Path) -> None:
    """Audit of issue 9: the log of a stop names what happened: files in progress at the first SIGTERM, and the
    second SIGTERM as the reason they were returned to the queue, not "stop timeout" (nothing timed out)."""
    import signal

    from support import HANG_ROUTING

    (tmp_path / "hang.toml").write_text(HANG_ROUTING)
    d = DaemonProcess(tmp_path / "w", "--config", str(tmp_path / "hang.toml"), "--workers", "1").started()
    (d.watch_dir / "unprocessed" / "stuck.txt").write_bytes(b"HANG\n")
    wait_for(lambda: folder(d.watch_dir, "underprocess") == ["stuck.txt"], what="claim")
    out = ingestd("status", "--watch-dir", str(d.watch_dir)).stdout.decode()
    assert "in progress stuck.txt" in out and "left claimed" not in out, out  # a daemon holds it: in progress
    d.signal(signal.SIGTERM)
    wait_for(lambda: d.event("stopping"))
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0
    said = [e["message"] for e in d.events if e.get("event") in ("stopping", "abandoned")]
    assert said == ["stopping: finishing current files", "second stop signal: abandoning current files now",
                    "second stop signal: file returned to the queue"], said
    assert not [e for e in d.events if "timeout" in e.get("message", "")], d.events


def test_closing_the_terminal_stops_the_daemon_but_a_sighup_otherwise_reloads(tmp_path: Path) -> None:
    """make run in a terminal that closes: the hang-up's SIGHUP stops it (it used to reload and live on, orphaned,
    holding the watch dir). Under systemd or with no terminal, SIGHUP stays a reload (tests/test_daemon.py)."""
    import fcntl
    import pty
    import termios

    master, slave = pty.openpty()

    def controlling_tty() -> None:  # in the child, after setsid: the pty on stderr becomes its terminal
        fcntl.ioctl(2, termios.TIOCSCTTY, 0)

    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    proc = subprocess.Popen([*INGESTD, "run", "--watch-dir", str(tmp_path / "w"), "--listen", "127.0.0.1:0",
                             "--workers", "1"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave,
                            env=env, cwd=tmp_path, start_new_session=True, preexec_fn=controlling_tty)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 20
    import select

    while b"Ctrl-C" not in out and time.monotonic() < deadline:
        if select.select([master], [], [], 0.5)[0]:
            out += os.read(master, 4096)
    assert b"Ctrl-C" in out, out
    os.close(master)  # the terminal goes away: the kernel hangs it up and sends SIGHUP
    try:
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    second = subprocess.run([*INGESTD, "status", "--watch-dir", str(tmp_path / "w")], capture_output=True, text=True,
                            timeout=30)
    assert "not running" in second.stdout, second.stdout


def test_status_and_requeue_never_make_a_missing_watch_dir(tmp_path: Path) -> None:
    """`run` makes a missing watch dir (and says so); the commands that look (status) or move files back (requeue)
    must not, a typo would leave an empty tree behind: they say that it does not exist (not "no folder
    .../unprocessed", which reads as a broken watch dir), exit 78."""
    for args in (["status"], ["status", "--json"], ["requeue"], ["requeue", "x.txt"]):
        r = ingestd(*args, "--watch-dir", "typo/w", cwd=tmp_path)
        assert (r.returncode, r.stderr.decode()) == (78, "ingestd: watch_dir: typo/w does not exist\n"), args
    assert os.listdir(tmp_path) == []


def test_closed_standard_fds_get_dev_null_never_a_data_file(tmp_path: Path) -> None:
    """Found: `ingestd status 2>&-` and `ingestd run 2>&-` exited 1 with nothing said (logging needs a stderr).
    The wider kind: with fd 2 closed, the next open(2) takes number 2, so whatever writes to stderr (a worker's
    fatal error) would write into a queued file or an output. Now each closed standard fd is /dev/null, in the
    daemon and in its workers, and the commands work."""
    w = tmp_path / "w"
    for f in ("unprocessed", "underprocess", "processed", "failed"):
        (w / f).mkdir(parents=True)
    cmd = " ".join(shlex.quote(a) for a in INGESTD)
    r = subprocess.run(["sh", "-c", f"{cmd} status --watch-dir {shlex.quote(str(w))} 2>&- <&-"],
                       capture_output=True, env=clean_env(), timeout=60)
    assert r.returncode == 0 and b"daemon      not running" in r.stdout
    (tmp_path / "in.txt").write_bytes(b"a\n")
    r = subprocess.run(["sh", "-c", f"{cmd} process --input in.txt --output out.txt 2>&- <&- >&-"],
                       cwd=tmp_path, env=clean_env(), timeout=60)
    assert r.returncode == 0 and (tmp_path / "out.txt").read_bytes() == b"A\n"
    run = f"exec {cmd} run --watch-dir {shlex.quote(str(w))} --listen 127.0.0.1:0 --workers 2 2>&- <&- >&-"
    p = subprocess.Popen(["sh", "-c", run], env=clean_env(), start_new_session=True)
    try:
        (w / "unprocessed" / "f.txt").write_bytes(b"hello\n")
        wait_for(lambda: (w / "processed" / "f.txt").exists(), timeout=20, what="processed with stderr closed")
        assert (w / "processed" / "f.txt").read_bytes() == b"HELLO\n"
        pids = [p.pid, *(int(c) for c in Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split())]
        assert len(pids) >= 3  # the daemon and its two workers
        for pid in pids:
            for fd in (0, 1, 2):
                assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null", (pid, fd)
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        assert p.wait(30) == 0


def test_status_counts_as_the_running_daemon_does_whatever_its_own_settings(tmp_path: Path) -> None:
    """Found by a new user: a daemon started with INGESTD_RECURSIVE=true, and `ingestd status` from a shell without
    it said "left alone 1 folder ... (recursive is off: set recursive = true ...)" and counted 0 waiting: its own
    settings, not the daemon's. The daemon's lock label says how it counts, and status follows it."""
    d = DaemonProcess(tmp_path / "w", "--workers", "1", env={"INGESTD_RECURSIVE": "true"}).started()
    try:
        held = d.watch_dir / "unprocessed" / "held"
        held.mkdir()
        with open(held / "open.txt", "wb") as f:  # held open for writing: waits, inside its folder
            f.write(b"x\n")
            f.flush()
            # Waiting, never claimed while held (by its events or, listed, by the lease): status must count it.
            # (Not by waiting for a `busy` event: a file made after its folder's watch is not complete by its
            # events, so no claim is tried and none is logged; that made this test flaky under load.)
            doc = wait_for(lambda: (r := json.loads(ingestd("status", "--watch-dir", str(d.watch_dir),
                                                                "--json").stdout))["counts"]["unprocessed"] == 1 and r,
                           what="status counting the file in held/ as waiting")
            assert doc["folders_left"] == {"count": 0, "names": [], "recursive": True}, doc
            assert (held / "open.txt").exists()  # held open: not taken
            assert "recursive is off" not in ingestd("status", "--watch-dir", str(d.watch_dir)).stdout.decode()
    finally:
        d.stop()
    assert "recursive is off" in ingestd("status", "--watch-dir", str(d.watch_dir)).stdout.decode()  # no daemon


def test_make_run_takes_a_watch_dir_with_a_space(tmp_path: Path) -> None:
    """Found by a new user: `make run WATCH_DIR="/srv/my queue"` ended in "unrecognized arguments: queue" (the path
    was pasted unquoted into the recipe). It goes through the environment now, quoted by the shell."""
    repo = Path(__file__).resolve().parents[1]
    wd = tmp_path / "my queue"
    env = {**clean_env(), "INGESTD_LISTEN": "127.0.0.1:0", "INGESTD_LOG_FORMAT": "json"}
    p = subprocess.Popen(["make", "-s", "-C", str(repo), "run", f"WATCH_DIR={wd}"], env=env, cwd=NEUTRAL_CWD,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        lines = []
        for line in p.stderr:  # type: ignore[union-attr]
            lines.append(line)
            if '"started"' in line:
                break
        started = [json.loads(x) for x in lines if '"started"' in x]
        assert started and started[0]["watch_dir"] == str(wd), "".join(lines)[-500:]
        assert (wd / "unprocessed").is_dir()
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.communicate(timeout=30)  # reads stderr to its end and closes it


def test_text_log_flattens_a_dict_field_as_logfmt() -> None:
    """The started event's settings (a dict) in the text log: dotted logfmt keys, never a Python dict's repr."""
    import logging

    from ingestd.log import _Text

    r = logging.LogRecord("ingestd", logging.INFO, "", 0, "ingestd started", (), None)
    r.settings = {"recursive": True, "folder_quiet_time": 9.0}
    r.empty = {}
    line = _Text("%(levelname)s %(message)s").format(r)
    assert line.endswith("settings.recursive=True settings.folder_quiet_time=9.0"), line
