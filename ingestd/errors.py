"""What an error means: one table decides whether a failure is the machine's fault (retry the file later),
the input's fault (reject it to failed/ with a reason) or a vanished output folder (recreate it, then retry).

Pure: no I/O. Sources for the errno meanings: errno(3), open(2), read(2), write(2), rename(2), fsync(2),
link(2), unlink(2), mkdir(2), getrlimit(2) (RLIMIT_FSIZE, RLIMIT_NOFILE), proc(5) (fs.file-max).
"""

from __future__ import annotations

import errno
import os
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum


class Phase(StrEnum):
    """Where in a file's life an error happened; the same errno can mean different things in different phases."""

    OPEN_INPUT = "open_input"  # open(2)/fstat(2) of the claimed input in underprocess/
    READ_INPUT = "read_input"  # read(2) of the input
    PROCESS = "process"  # a processor (built-in or plug-in) running on a record
    WRITE_OUTPUT = "write_output"  # creating or writing a temp output under processed/
    PUBLISH = "publish"  # fsync + rename of the outputs into place
    CLAIM = "claim"  # unprocessed/ -> underprocess/
    COMMIT = "commit"  # unlink of the input once its outputs are durable
    FAIL = "fail"  # sidecar + move to failed/
    RECORD_ATTEMPT = "record_attempt"  # the attempt count in .ingestd/


class Verdict(StrEnum):
    RETRY = "retry"  # the machine's fault: keep the file, pause, do it again later
    REJECT = "reject"  # the input's fault: to failed/ with the reason; retrying cannot help
    RECREATE = "recreate"  # a folder we own vanished (ENOENT): recreate it (makedirs), then retry


# The machine's fault whatever the phase: resources, media, limits that an admin or time can fix.
MACHINE = frozenset({
    errno.ENOSPC,  # write(2): no space (data or inodes)
    errno.EDQUOT,  # write(2): quota exhausted
    errno.EIO,  # read(2)/write(2)/fsync(2): low-level I/O error
    errno.EMFILE,  # open(2): the process's RLIMIT_NOFILE reached
    errno.ENFILE,  # open(2): the system-wide file limit (fs.file-max) reached
    errno.ENOMEM,  # open(2) and others: kernel memory short
    errno.ENOBUFS,
    errno.EROFS,  # open(2)/rename(2): read-only filesystem (remounted ro after an error, a bind mount)
    errno.EAGAIN,
    errno.EINTR,
    errno.EBUSY,
    errno.ETXTBSY,
    errno.ESTALE,  # NFS: stale handle
    errno.EXDEV,  # rename(2): someone mounted something inside the watch dir
    errno.ENOLCK,
    errno.ETIMEDOUT,
})

# The input's fault when it concerns the input itself (its type, name, size or permissions).
INPUT = frozenset({
    errno.ELOOP,  # open(2) with O_NOFOLLOW: the entry is a symlink
    errno.EISDIR,  # open(2)/rename(2): a directory where a file is needed (or the name of an output folder)
    errno.ENOTDIR,
    errno.ENAMETOOLONG,  # the name cannot be published beside the output folder's path
    errno.EINVAL,  # rename(2) into itself, or a name the filesystem refuses
    errno.EFBIG,  # write(2): the output exceeds RLIMIT_FSIZE or the filesystem's maximum: it never fits
    errno.EOVERFLOW,
    errno.ENXIO,  # open(2) O_NONBLOCK of a FIFO with no writer, a socket
    errno.ENODEV,
    errno.EILSEQ,
})

_INPUT_PHASES = frozenset({Phase.OPEN_INPUT, Phase.READ_INPUT, Phase.PROCESS})
_OUTPUT_PHASES = frozenset({Phase.WRITE_OUTPUT, Phase.PUBLISH, Phase.FAIL, Phase.RECORD_ATTEMPT})


class PhaseError(OSError):
    """An OSError that knows the phase it happened in (see in_phase); still an OSError for every caller."""

    phase: Phase

    def __reduce__(self) -> tuple[object, ...]:  # picklable across the worker pipe, phase included
        return (_rebuild, (self.errno, self.strerror, self.filename, self.phase))


def _rebuild(err: int, strerror: str, filename: str | None, phase: Phase) -> PhaseError:
    e = PhaseError(err, strerror, filename) if filename is not None else PhaseError(err, strerror)
    e.phase = phase
    return e


@contextmanager
def in_phase(phase: Phase) -> Iterator[None]:
    """Re-raise any OSError inside as a PhaseError carrying `phase` (an existing PhaseError keeps its own)."""
    try:
        yield
    except PhaseError:
        raise
    except OSError as e:
        err = e.errno or errno.EIO
        raise _rebuild(err, e.strerror or os.strerror(err), e.filename, phase) from e


def phase_of(exc: BaseException, default: Phase) -> Phase:
    return exc.phase if isinstance(exc, PhaseError) else default


def classify(exc: BaseException, phase: Phase) -> Verdict:
    """RETRY, REJECT or RECREATE for an exception raised in `phase` (a PhaseError's own phase wins).

    OSError by errno: MACHINE -> RETRY anywhere; INPUT -> REJECT anywhere (for outputs it is this input's name or
    size that cannot be published); EACCES/EPERM -> REJECT on the input (it is unreadable), RETRY on outputs (a
    folder's permissions, fixed by an admin); ENOENT -> RECREATE on outputs and state (a folder vanished),
    REJECT on the input (it is gone: nothing to keep). Unknown errnos: RETRY (the input is kept; nothing lost).
    Other exceptions: MemoryError -> RETRY; in the input phases (a processor raising on this input, bad
    content) -> REJECT; elsewhere (our own bug while writing) -> RETRY.
    """
    phase = phase_of(exc, phase)
    if isinstance(exc, OSError):
        err = exc.errno
        if err in MACHINE:
            return Verdict.RETRY
        if err in INPUT:
            return Verdict.REJECT
        if err in (errno.EACCES, errno.EPERM):
            return Verdict.REJECT if phase in _INPUT_PHASES else Verdict.RETRY
        if err == errno.ENOENT:
            return Verdict.RECREATE if phase in _OUTPUT_PHASES else Verdict.REJECT
        return Verdict.RETRY
    if isinstance(exc, MemoryError):  # ENOMEM's twin: the machine's fault
        return Verdict.RETRY
    return Verdict.REJECT if phase in _INPUT_PHASES else Verdict.RETRY


def reason(exc: BaseException) -> str:
    """Readable reason text for sidecars and logs.

    OSError: "No space left on device (ENOSPC)". Any other exception: "ValueError: bad record (at plugin.py:12)",
    the place being the innermost frame of its traceback (where a plug-in raised), when there is one.
    """
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc} ({errno.errorcode.get(exc.errno or 0, 'error')})"
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ is not None else []
    if frames:
        last = frames[-1]
        text += f" (at {os.path.basename(last.filename)}:{last.lineno})"
    return text
