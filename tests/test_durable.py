"""durable.py's group-commit data sync (sync_files), on real files."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from ingestd import durable


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_sync_files_fsyncs_each_file_and_closes_every_fd(tmp_path: Path, monkeypatch) -> None:
    paths = []
    for i in range(40):
        p = tmp_path / f"t{i}"
        p.write_bytes(b"%d\n" % i)
        paths.append(str(p))
    seen: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:  # the real fsync, recording which file
        real(fd)
        seen.append(os.fstat(fd).st_ino)

    monkeypatch.setattr(durable, "fsync", fsync)
    before = _open_fds()
    durable.sync_files(paths)
    assert sorted(seen) == sorted(os.stat(p).st_ino for p in paths), "one fsync per file"
    assert _open_fds() == before


@pytest.mark.parametrize("where", [0, 5, 19])
def test_a_failed_fsync_raises_and_leaks_no_fd(tmp_path: Path, where: int) -> None:
    """procfs has no fsync (EINVAL): one such file among real ones; the error is raised, every fd closed."""
    paths = []
    for i in range(20):
        p = tmp_path / f"t{i}"
        p.write_bytes(b"x\n")
        paths.append(str(p))
    paths[where] = "/proc/self/status"
    before = _open_fds()
    with pytest.raises(OSError) as e:
        durable.sync_files(paths)
    assert e.value.errno == errno.EINVAL
    assert _open_fds() == before

