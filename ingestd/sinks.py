"""A file's outputs: one hidden temp file per output folder, published (fsync, rename, fsync dir) on commit."""

from __future__ import annotations

import errno
import os
import stat

from ingestd import durable
from ingestd.errors import Phase, in_phase
from ingestd.names import key
from ingestd.spool import TEMP_OUTPUT_PREFIX

FLUSH_BYTES = 1 << 20


class _Out:
    __slots__ = ("buf", "fd", "lines", "size", "tail", "temp")

    def __init__(self, fd: int, temp: str) -> None:
        self.fd, self.temp, self.size, self.lines = fd, temp, 0, 0
        self.tail = b"\n"  # the last byte written so far ("\n": no unterminated line pending)
        self.buf: list[bytes] = []


class Sinks:
    """Outputs of one input file. Temp names are hidden, fixed-length (NAME_MAX-safe) and never published early.

    OSErrors from writing raise as errors.PhaseError (phase WRITE_OUTPUT or PUBLISH) for errors.classify.
    """

    def __init__(self, processed: str, name: str, folders: list[str]) -> None:
        self.processed, self.name, self.folders = processed, name, folders
        self.temp_name = f"{TEMP_OUTPUT_PREFIX}{os.getpid()}-{key(name)}"
        self.keep_name = f"{TEMP_OUTPUT_PREFIX}{os.getpid()}-old-{key(name)}"  # an earlier result, kept until commit
        self.outs: dict[str, _Out] = {}
        self.bytes_out = 0
        self.lines_out: dict[str, int] = {}

    def _dir(self, folder: str) -> str:
        return os.path.join(self.processed, folder) if folder else self.processed

    def _open(self, folder: str) -> _Out:
        temp = os.path.join(self._dir(folder), self.temp_name)
        with in_phase(Phase.WRITE_OUTPUT):
            durable.unlink_quiet(temp)  # left by an earlier attempt in this same worker process
            try:
                fd = durable.create_exclusive(temp)
            except FileNotFoundError:
                # The output folder vanished (rmdir, rm -rf processed/): recreate it rather than retry for ever
                # (errors.classify: ENOENT on an output is RECREATE).
                os.makedirs(self._dir(folder), exist_ok=True)
                fd = durable.create_exclusive(temp)
        out = self.outs[folder] = _Out(fd, temp)
        return out

    def write(self, folder: str, data: bytes) -> None:
        """Append data (one line, or a block of whole lines on the fast path) to an output."""
        out = self.outs.get(folder) or self._open(folder)
        out.buf.append(data)
        out.size += len(data)
        if out.size >= FLUSH_BYTES:
            self._flush(out)

    def _flush(self, out: _Out) -> None:
        data = b"".join(out.buf)
        with in_phase(Phase.WRITE_OUTPUT):
            durable.write_all(out.fd, data)
        # Lines are counted by their endings as they are written, whatever the shape of the writes: a block of
        # 100,000 lines from the fast path counts 100,000, not 1 (ingestd_output_lines_total).
        out.lines += data.count(b"\n")
        if data:
            out.tail = data[-1:]
        self.bytes_out += out.size
        out.buf.clear()
        out.size = 0

    def commit(self) -> None:
        """Publish every output durably, all or none: seal(sync=True), publish(), then fsync the folders."""
        self.seal(sync=True)
        with in_phase(Phase.PUBLISH):
            for path in self.publish():
                durable.fsync_dir(path)  # the renames are durable before the input may go

    def seal(self, sync: bool) -> None:
        """Write out and close every temp output; the default output always gets one, even empty. With sync each is
        fsynced; without, the caller makes a whole batch's temps durable at once (durable.syncfs, the group
        commit) before any publish(): a name must never point at data a power cut could still lose."""
        if "" in self.folders and "" not in self.outs:
            self._open("")
        with in_phase(Phase.PUBLISH):
            for out in self.outs.values():
                self._flush(out)
                if sync:
                    durable.fsync(out.fd)  # data durable before the name points at it
                os.close(out.fd)
                out.fd = -1

    def publish(self) -> list[str]:
        """Rename the sealed (durable) temps to their final names, all or none; returns the folders whose entries
        changed: the caller fsyncs each (once per batch) before the input may go. A same-named result left in an
        output folder this input did not reach is removed.

        All or none: a target that is a directory refuses before anything is renamed (IsADirectoryError); any
        other refusal midway puts back what was already renamed (earlier results restored from a kept link),
        so an input that ends in failed/ never leaves a result in processed/.
        """
        changed = []
        with in_phase(Phase.PUBLISH):
            reserved = {f.split("/", 1)[0] for f in self.folders if f}
            for folder in self.outs:
                target = os.path.join(self._dir(folder), self.name)
                # An input named like an output folder is refused before any rename: a directory stands there, or
                # (that folder removed by hand) the result would take the folder's place and block its outputs.
                if _is_dir(target) or (not folder and self.name.split("/", 1)[0] in reserved):
                    raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), target)
                if "/" in self.name:  # recursive mode: processed/batch/a.txt keeps the input's relative path
                    durable.makedirs(self._dir(folder), os.path.dirname(self.name))
            kept = self._keep_earlier()
            done: list[str] = []
            try:
                for folder, out in self.outs.items():
                    durable.rename(out.temp, os.path.join(self._dir(folder), self.name))  # atomic replace: old or new
                    done.append(folder)
            except BaseException:
                self._roll_back(done, kept)
                raise
            for folder, out in self.outs.items():
                self.lines_out[folder] = out.lines + (out.tail != b"\n")  # a last line without an ending counts
            for folder in self.folders:
                if folder not in self.outs:
                    target = os.path.join(self._dir(folder), self.name)
                    try:
                        if not _is_dir(target):  # a folder of that name is not a result of ours
                            durable.unlink(target)  # a stale result of an earlier same-named input
                    except (FileNotFoundError, NotADirectoryError):  # nothing there (or no folder to hold it)
                        continue
                changed.append(os.path.dirname(os.path.join(self._dir(folder), self.name)))
            for folder in kept:
                # Same folder as its rename: both become durable together, at the caller's fsync of the folder.
                durable.unlink_quiet(os.path.join(self._dir(folder), self.keep_name))
        return changed

    def _keep_earlier(self) -> list[str]:
        """A second name for each earlier result about to be replaced, so a refused commit can put it back."""
        kept = []
        for folder in self.outs:
            keep, target = os.path.join(self._dir(folder), self.keep_name), os.path.join(self._dir(folder), self.name)
            try:
                try:
                    durable.link(target, keep)
                except FileExistsError:
                    durable.unlink(keep)  # left by an earlier attempt of this worker
                    durable.link(target, keep)
            except (FileNotFoundError, NotADirectoryError):
                continue  # no earlier result here
            kept.append(folder)
        return kept

    def _roll_back(self, done: list[str], kept: list[str]) -> None:
        """Undo the renames already made; best effort (the input is retried or failed either way)."""
        for folder in done:
            target = os.path.join(self._dir(folder), self.name)
            try:
                if folder in kept:
                    durable.rename(os.path.join(self._dir(folder), self.keep_name), target)  # the earlier result
                else:
                    durable.unlink(target)  # no result here before this input
                # Not fsynced: only a refusal after a rename that the directory check cannot foresee gets here, and
                # a power cut right after it can bring the undone output back (known limit, docs/guarantees.md).
            except OSError:
                pass  # the original error is the one to report; a redo or requeue republishes
        for folder in kept:
            if folder not in done:
                durable.unlink_quiet(os.path.join(self._dir(folder), self.keep_name))

    def abort(self) -> None:
        """Drop every unpublished temp file; the input stays where it is."""
        for out in self.outs.values():
            if out.fd >= 0:
                os.close(out.fd)
            try:
                durable.unlink_quiet(out.temp)
            except OSError:
                pass  # EIO/EROFS: recovery or remove_temps drops it later; the first error is the one to report
        self.outs.clear()


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):  # ENOTDIR: a file stands where a folder of the path should be
        return False


def remove_temps(processed: str, folders: list[str], pid: int) -> None:
    """A worker died: its unpublished temps (as large as its input) go now, not at the next restart.
    A missing output folder (rmdir'd meanwhile) has nothing to drop; other errors are left to recovery."""
    prefix = f"{TEMP_OUTPUT_PREFIX}{pid}-"
    for folder in folders:
        path = os.path.join(processed, folder) if folder else processed
        try:
            with os.scandir(path) as it:
                for e in it:
                    if e.name.startswith(prefix):
                        durable.unlink_quiet(e.path)
        except OSError:
            continue  # ENOENT: the folder is gone, and its temps with it; EIO: start-up recovery drops them
