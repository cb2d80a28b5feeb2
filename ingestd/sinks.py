"""A file's outputs: one hidden temp file per output folder, published (fsync, rename, fsync dir) on commit."""

from __future__ import annotations

import os

from ingestd import durable
from ingestd.names import key
from ingestd.spool import TEMP_OUTPUT_PREFIX

FLUSH_BYTES = 1 << 20


class _Out:
    __slots__ = ("fd", "temp", "buf", "size", "lines")

    def __init__(self, fd: int, temp: str) -> None:
        self.fd, self.temp, self.size, self.lines = fd, temp, 0, 0
        self.buf: list[bytes] = []


class Sinks:
    """Outputs of one input file. Temp names are hidden, fixed-length (NAME_MAX-safe) and never published early."""

    def __init__(self, processed: str, name: str, folders: list[str]) -> None:
        self.processed, self.name, self.folders = processed, name, folders
        self.temp_name = f"{TEMP_OUTPUT_PREFIX}{os.getpid()}-{key(name)}"
        self.outs: dict[str, _Out] = {}
        self.bytes_out = 0
        self.lines_out: dict[str, int] = {}

    def _dir(self, folder: str) -> str:
        return os.path.join(self.processed, folder) if folder else self.processed

    def _open(self, folder: str) -> _Out:
        temp = os.path.join(self._dir(folder), self.temp_name)
        durable.unlink_quiet(temp)  # left by an earlier attempt in this same worker process
        out = self.outs[folder] = _Out(durable.create_exclusive(temp), temp)
        return out

    def write(self, folder: str, data: bytes) -> None:
        out = self.outs.get(folder) or self._open(folder)
        out.buf.append(data)
        out.size += len(data)
        out.lines += 1
        if out.size >= FLUSH_BYTES:
            self._flush(out)

    def _flush(self, out: _Out) -> None:
        durable.write_all(out.fd, b"".join(out.buf))
        self.bytes_out += out.size
        out.buf.clear()
        out.size = 0

    def commit(self) -> None:
        """Publish every output durably. The default output always gets a file, even an empty one;
        a same-named result left in an output folder this input did not reach is removed."""
        if "" in self.folders and "" not in self.outs:
            self._open("")
        for out in self.outs.values():
            self._flush(out)
            durable.fsync(out.fd)  # data durable before the name points at it
            os.close(out.fd)
            out.fd = -1
        for folder, out in self.outs.items():
            durable.rename(out.temp, os.path.join(self._dir(folder), self.name))  # atomic replace: old or new, never half
            self.lines_out[folder] = out.lines
        for folder in self.folders:
            if folder not in self.outs:
                try:
                    durable.unlink(os.path.join(self._dir(folder), self.name))  # a stale result of an earlier same-named input
                except FileNotFoundError:
                    continue
            durable.fsync_dir(self._dir(folder))  # the renames are durable before the input may go

    def abort(self) -> None:
        """Drop every unpublished temp file; the input stays where it is."""
        for out in self.outs.values():
            if out.fd >= 0:
                os.close(out.fd)
            durable.unlink_quiet(out.temp)
        self.outs.clear()


def remove_temps(processed: str, folders: list[str], pid: int) -> None:
    """A worker died: its unpublished temps (as large as its input) go now, not at the next restart."""
    prefix = f"{TEMP_OUTPUT_PREFIX}{pid}-"
    for folder in folders:
        path = os.path.join(processed, folder) if folder else processed
        with os.scandir(path) as it:
            for e in it:
                if e.name.startswith(prefix):
                    durable.unlink_quiet(e.path)
