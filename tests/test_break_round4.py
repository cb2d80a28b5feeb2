"""Breaking `ingestd process`'s signal clean-up (dc7c1e1) and the shared block mapper (10c6c63): round 4.

Each test is a fault found by a reviewer who did not write the change, in a window too narrow to hit from
outside, so the signal is sent from a monkeypatched `durable` step. The in-process call and the thread are in
tests/test_break_startup.py."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingestd import cli, durable, pipeline

SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@pytest.fixture
def default_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP at SIG_DFL, as in a fresh `ingestd process`; whatever a test leaves is put back after."""
    saved = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, signal.SIG_DFL)
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def _files(tmp_path: Path) -> tuple[Path, Path]:
    src, out = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_bytes(b"abc\nstra\xc3\x9fe\n")
    return src, out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_signal_during_the_publish_leaves_no_temp(tmp_path: Path, default_signals: None,
                                                     monkeypatch: pytest.MonkeyPatch, sig: int) -> None:
    """A signal that arrives while `ingestd process --output FILE` publishes over an earlier FILE, between the
    rename and the removal of the earlier result's hidden second name (.ingestd-tmp-PID-old-KEY, a hard link made
    so that a refused publish can put it back): that second name stayed in the folder for ever, a full copy of
    the earlier result, though process promises that a signal leaves no temp behind. Whatever the exit code,
    the folder must hold the input and one complete output, nothing else."""
    src, out = _files(tmp_path)
    out.write_bytes(b"an earlier result\n")
    real = durable.unlink_quiet

    def signal_first(path: str) -> None:
        if os.path.basename(path).startswith(".ingestd-tmp-"):
            os.kill(os.getpid(), sig)  # the signal arrives now, before the second name goes
        real(path)

    monkeypatch.setattr(durable, "unlink_quiet", signal_first)
    argv = ["process", "--input", str(src), "--output", str(out), "--mode", "uppercase"]
    try:
        code: object = cli.main(argv)
    except SystemExit as e:
        code = e.code
    assert code in (0, 128 + sig, 130)
    assert sorted(os.listdir(tmp_path)) == ["in.txt", "out.txt"]
    assert out.read_bytes() in ("ABC\nSTRASSE\n".encode(), b"an earlier result\n")


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_second_signal_while_the_temp_is_dropped_leaves_no_temp(tmp_path: Path, default_signals: None,
                                                                  monkeypatch: pytest.MonkeyPatch, second: int) -> None:
    """`kill` twice, or Ctrl-C pressed again while `ingestd process --output FILE` is already stopping: the second
    signal came while Sinks.abort was dropping the temp output, and the temp stayed (a hidden .ingestd-tmp-*
    as large as the output so far), though a signal is promised to leave none."""
    src, out = _files(tmp_path)
    real_map, real_unlink = pipeline.run_mapped, durable.unlink_quiet

    def mapped_then_term(*a: object, **kw: object) -> int:
        n = real_map(*a, **kw)  # type: ignore[arg-type]
        os.kill(os.getpid(), signal.SIGTERM)  # the first: the temp holds the output so far
        return n

    def second_signal_first(path: str) -> None:
        if os.path.basename(path).startswith(".ingestd-tmp-"):
            os.kill(os.getpid(), second)  # the second arrives while the temp is being dropped
        real_unlink(path)

    monkeypatch.setattr(pipeline, "run_mapped", mapped_then_term)
    monkeypatch.setattr(durable, "unlink_quiet", second_signal_first)
    try:
        code: object = cli.main(["process", "--input", str(src), "--output", str(out), "--mode", "uppercase"])
    except SystemExit as e:
        code = e.code
    assert code in (128 + signal.SIGTERM, 128 + second, 130)
    assert sorted(os.listdir(tmp_path)) == ["in.txt"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("path", ["mapped", "line"])
def test_a_signal_as_the_temp_is_created_leaves_no_temp(tmp_path: Path, default_signals: None,
                                                        monkeypatch: pytest.MonkeyPatch, sig: int, path: str) -> None:
    """A signal that arrives just as the temp output has been created (open(2) returned, Sinks not yet holding
    it): Sinks.abort knows only the temps it holds, and this one stayed behind (empty), on the mapped path
    (--mode uppercase) and on the line path alike."""
    src, out = _files(tmp_path)
    real = durable.create_exclusive

    def created_then_signal(path: str, mode: int = 0o644) -> int:
        fd = real(path, mode)
        os.kill(os.getpid(), sig)
        return fd

    monkeypatch.setattr(durable, "create_exclusive", created_then_signal)
    argv = ["process", "--input", str(src), "--output", str(out), "--mode", "uppercase"]
    if path == "line":
        argv.append("--explain")  # the line path: Sinks.write opens the temp at the first record
    try:
        code: object = cli.main(argv)
    except SystemExit as e:
        code = e.code
    assert code in (128 + sig, 130)
    assert sorted(os.listdir(tmp_path)) == ["in.txt"]
