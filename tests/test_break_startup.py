"""Breaking the `ingestd process` start-up change (manual.py, lazy imports in cli.py): the command line in real
subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from support import INGESTD, clean_env, wait_for


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM),
                                         (signal.SIGHUP, 128 + signal.SIGHUP)], ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_during_process_to_a_file_leaves_no_temp(tmp_path: Path, sig: int, code: int) -> None:
    """Ctrl-C (SIGINT to the foreground group), a kill (SIGTERM) or a hang-up (SIGHUP) while `ingestd process
    --output FILE` is mid-file: the shell's exit code for that signal (130, 143, 129), and the unpublished temp output
    is dropped, as on every other failure (Sinks.abort). A Ctrl-C left it behind in the output folder (a hidden
    .ingestd-tmp-* as large as the output so far); SIGTERM and SIGHUP killed the process before any clean-up."""
    p, out = _hanging_process(tmp_path)
    try:
        os.killpg(p.pid, sig)
        _, err = p.communicate(timeout=20)
    finally:
        _reap(p)
    assert p.returncode == code, err
    assert b"Traceback" not in err, err
    assert os.listdir(out) == []  # no temp left, nothing published


def test_an_ignored_hangup_stays_ignored_by_process(tmp_path: Path) -> None:
    """`nohup ingestd process ...`: SIGHUP is ignored when the command starts, and must stay so (the clean-up
    handler is installed only where a signal would have killed it)."""
    p, out = _hanging_process(tmp_path, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    try:
        os.killpg(p.pid, signal.SIGHUP)
        time.sleep(0.5)
        assert p.poll() is None, p.communicate()[1]  # still at work
        os.killpg(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=20)
    finally:
        _reap(p)
    assert p.returncode == 130, err
    assert os.listdir(out) == []


def _hanging_process(tmp_path: Path, **kw: Any) -> tuple[subprocess.Popen[bytes], Path]:
    """`ingestd process` through the `hang_on` plug-in (tests/plugins), stopped on its second line, its temp output
    already made in tmp_path/out; in a session of its own."""
    src, out = tmp_path / "in.txt", tmp_path / "out"
    src.write_bytes(b"first\nHANG here\nlast\n")
    out.mkdir()
    env = clean_env()
    p = subprocess.Popen([*INGESTD, "process", "--input", str(src), "--output", str(out / "r.txt"), "--mode",
                          "hang_on"], stderr=subprocess.PIPE, env=env, start_new_session=True, **kw)
    try:
        wait_for(lambda: os.listdir(out), timeout=20, what="the temp output of the first line")  # now hanging
    except BaseException:
        _reap(p)
        raise
    return p, out


def _reap(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


@pytest.mark.parametrize(("closed", "args", "code"), [
    ("<&-", ["--input", "-", "--output", "OUT"], 66),
    (">&-", ["--input", "IN", "--output", "-"], 73),
    (">&- 2>&-", ["--input", "IN", "--output", "-"], 73),
    ("<&- >&- 2>&-", ["--input", "IN", "--output", "OUT"], 0),
], ids=["stdin closed, --input -", "stdout closed, --output -", "stdout and stderr closed", "all closed, files given"])
def test_process_with_a_closed_standard_stream(tmp_path: Path, closed: str, args: list[str], code: int) -> None:
    """A standard stream closed by the caller (`<&-`, `>&-`, `2>&-`; Python then has None for it): a clear error
    naming the stream when the command needs it (66 for stdin, 73 for stdout), the work done when it does not.
    It was an AttributeError traceback either way."""
    src, out = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_bytes(b"a\n" * 10)
    argv = " ".join({"IN": str(src), "OUT": str(out)}.get(a, a) for a in args)
    err = tmp_path / "err.txt"
    env = clean_env()
    cmd = " ".join(INGESTD) + f" process {argv} --mode uppercase"
    # The closing runs inside a child shell; its own stderr (2>) collects what reaches it when stderr is open.
    r = subprocess.run(["sh", "-c", f"exec 2>{err}; {cmd} {closed}"], env=env, timeout=60, check=False)
    assert r.returncode == code, err.read_text()
    text = err.read_text()
    assert "Traceback" not in text, text
    if code and "2>&-" not in closed:
        assert ("stdin is closed" if code == 66 else "stdout is closed") in text, text
    if code == 0:
        assert out.read_bytes() == b"A\n" * 10


def test_process_called_in_process_gives_back_the_callers_signal_handlers(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """cli.main(["process", ...]) inside another program (a test, a script): its clean-up handlers for SIGTERM and
    SIGHUP are its own for the call only; afterwards the caller's dispositions are back. From a thread other than
    the main one (where Python cannot set handlers) it works and changes nothing."""
    import threading

    from ingestd.cli import main

    src = tmp_path / "in.txt"
    src.write_bytes(b"a\n")
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    for k in set(os.environ) - set(clean_env()):
        monkeypatch.delenv(k)
    assert main(["process", "--input", str(src), "--output", str(tmp_path / "a.txt"), "--mode", "uppercase"]) == 0
    assert {s: signal.getsignal(s) for s in before} == before
    codes: list[int | BaseException] = []

    def call() -> None:
        try:
            codes.append(main(["process", "--input", str(src), "--output", str(tmp_path / "b.txt"), "--mode",
                               "uppercase"]))
        except BaseException as e:  # noqa: BLE001 - reported below
            codes.append(e)

    t = threading.Thread(target=call)
    t.start()
    t.join(30)
    assert codes == [0]
    assert {s: signal.getsignal(s) for s in before} == before
    assert (tmp_path / "a.txt").read_bytes() == (tmp_path / "b.txt").read_bytes() == b"A\n"
