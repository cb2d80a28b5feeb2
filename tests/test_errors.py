"""errors.classify: one table for what an error means, checked over every errno x phase, and the reason text."""

from __future__ import annotations

import errno
import os
import pickle

import pytest

from ingestd import errors
from ingestd.errors import INPUT, MACHINE, Phase, PhaseError, Verdict, classify, in_phase, reason

INPUT_PHASES = {Phase.OPEN_INPUT, Phase.READ_INPUT, Phase.PROCESS}
OUTPUT_PHASES = {Phase.WRITE_OUTPUT, Phase.PUBLISH, Phase.FAIL, Phase.RECORD_ATTEMPT}


def oserr(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def expected(code: int, phase: Phase) -> Verdict:
    """The table spelled out independently of the module, so a changed row fails here."""
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EROFS):
        return Verdict.RETRY
    if code in (errno.ELOOP, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EFBIG):
        return Verdict.REJECT
    if code in (errno.EACCES, errno.EPERM):
        return Verdict.REJECT if phase in INPUT_PHASES else Verdict.RETRY
    if code == errno.ENOENT:
        return Verdict.RECREATE if phase in OUTPUT_PHASES else Verdict.REJECT
    raise AssertionError(code)


LISTED = [errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EROFS, errno.ELOOP,
          errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EFBIG, errno.EACCES, errno.EPERM, errno.ENOENT]


@pytest.mark.parametrize("phase", list(Phase))
@pytest.mark.parametrize("code", LISTED, ids=lambda c: errno.errorcode[c])
def test_table_errno_by_phase(code: int, phase: Phase) -> None:
    assert classify(oserr(code), phase) is expected(code, phase)


@pytest.mark.parametrize("phase", list(Phase))
def test_every_errno_has_a_verdict_and_the_machine_never_rejects(phase: Phase) -> None:
    """The kind, beyond the listed inputs: no errno at all may raise, and a resource error is never the input's."""
    for code in errno.errorcode:
        assert classify(oserr(code), phase) in Verdict
    for code in MACHINE:
        assert classify(oserr(code), phase) is Verdict.RETRY
    for code in INPUT:
        assert classify(oserr(code), phase) is Verdict.REJECT
    assert not MACHINE & INPUT


def test_opening_a_good_input_with_the_file_table_full_is_a_retry() -> None:
    """The issue's instance: EMFILE/ENFILE/ENOMEM/EIO when a worker opens a good input."""
    for code in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EIO):
        assert classify(oserr(code), Phase.OPEN_INPUT) is Verdict.RETRY


def test_exceptions_that_are_not_oserrors() -> None:
    assert classify(ValueError("x"), Phase.PROCESS) is Verdict.REJECT  # a plug-in raising on this input
    assert classify(UnicodeDecodeError("utf-8", b"", 0, 1, "x"), Phase.READ_INPUT) is Verdict.REJECT
    assert classify(MemoryError(), Phase.PROCESS) is Verdict.RETRY  # the machine's, as ENOMEM
    assert classify(RuntimeError("our bug"), Phase.PUBLISH) is Verdict.RETRY  # the input is kept


def test_a_phase_error_carries_its_own_phase() -> None:
    with pytest.raises(PhaseError) as e, in_phase(Phase.WRITE_OUTPUT):
        os.open("/nonexistent-folder-ingestd/x", os.O_WRONLY | os.O_CREAT)
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOENT and e.value.phase is Phase.WRITE_OUTPUT
    assert classify(e.value, Phase.OPEN_INPUT) is Verdict.RECREATE  # its phase wins over the caller's default
    with pytest.raises(PhaseError) as outer, in_phase(Phase.PUBLISH), in_phase(Phase.WRITE_OUTPUT):
        raise oserr(errno.EIO)
    assert outer.value.phase is Phase.WRITE_OUTPUT  # the innermost phase is kept
    back = pickle.loads(pickle.dumps(e.value))
    assert (back.errno, back.phase, back.filename) == (errno.ENOENT, Phase.WRITE_OUTPUT, e.value.filename)


def test_reason_texts() -> None:
    assert reason(oserr(errno.ENOSPC)) == "No space left on device (ENOSPC)"
    try:
        raise ValueError("bad record")
    except ValueError as e:
        text = reason(e)
    assert text.startswith("ValueError: bad record (at test_errors.py:") and text.endswith(")")
    assert reason(KeyError()) == "KeyError"
    assert errors.phase_of(ValueError(), Phase.PROCESS) is Phase.PROCESS
