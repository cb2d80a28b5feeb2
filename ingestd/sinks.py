"""A file's outputs: one hidden temp file per output folder, published (fsync, rename, fsync dir) on commit.

What happens to an earlier result of the same name (file_exist) follows Apache Camel's file producer option
`fileExist` (Override, Fail, Move with moveExisting; camel.apache.org, file component): "replace" is Camel's
Override, "fail" its Fail, "keep" its Move to a unique name beside the result (the `.superseded-` scheme of
failed/, spool.set_aside). A redo of the same input (a crash after the publish, before the input left
underprocess/) is recognised by the claim identity each result carries, and replaces its own result.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import time
from dataclasses import dataclass

from ingestd import durable
from ingestd.errors import Phase, in_phase
from ingestd.inode import born
from ingestd.names import SUPERSEDED, TEMP_OUTPUT_PREFIX, display, key
from ingestd.pipeline import Rejected

FLUSH_BYTES = 1 << 20
KEEP, REPLACE, FAIL = "keep", "replace", "fail"  # file_exist: what an earlier result of the same name becomes
FILE_EXIST = (KEEP, REPLACE, FAIL)
CLAIM_ATTR = "user.ingestd.claim"  # on each result: the identity of the input that produced it (claim_of)
_OWN = "own"  # the earlier result is this very input's (a redo): replaced, never counted


@dataclass(frozen=True)
class Superseded:
    """An earlier result of the same name that a publish replaced or set aside (file_exist); the worker sends
    them to the parent in messages.Done."""
    folder: str  # output folder ("" is processed/ itself)
    action: str  # "kept" (set aside under `aside`) or "replaced" (gone: file_exist = replace)
    aside: str = ""  # the name it is kept under, in the same folder


def claim_of(path: str) -> bytes | None:
    """The identity of the input file at `path` (not followed if a symlink), as bytes:
    b"<inode>-b<birth time ns>-m<mtime ns>" from statx(2), or b"<inode>-c<ctime ns>-m<mtime ns>" where the file
    system gives no birth time (then the ctime is the one the claim rename set). None when the file cannot be
    looked at (opening it then reports why).

    The inode alone is not enough: the kernel reuses an inode number as soon as a file is gone, so a new file of
    the same name can get the number of the one committed before it; two files never hold one inode at once, and
    their birth times differ. The mtime tells apart one inode rewritten in place and linked in again (a producer
    that keeps its file and links it in each day). All three stay the same through the claim rename, a claim
    lost in a power cut and claimed again, and a redo: a redo of the same input is recognised."""
    b = born(path)
    if b is not None:
        return b"%d-b%d-m%d" % (b.ino, b.btime_ns, b.mtime_ns)
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return b"%d-c%d-m%d" % (st.st_ino, st.st_ctime_ns, st.st_mtime_ns)


class _Out:
    __slots__ = ("buf", "fd", "lines", "size", "tail", "temp")

    def __init__(self, fd: int, temp: str) -> None:
        self.fd, self.temp, self.size, self.lines = fd, temp, 0, 0
        self.tail = b"\n"  # the last byte written so far ("\n": no unterminated line pending)
        self.buf: list[bytes] = []


class Sinks:
    """Outputs of one input file. Temp names are hidden, fixed-length (NAME_MAX-safe) and never published early.

    OSErrors from writing raise as errors.PhaseError (phase WRITE_OUTPUT or PUBLISH) for errors.classify.

    file_exist (one of FILE_EXIST) says what an earlier result of the same name becomes, in every output folder
    (see publish); claim (claim_of the input) is recorded on each result so that a redo of the same input is
    recognised. `ingestd process` keeps the old default, "replace", with no claim.
    """

    def __init__(self, processed: str, name: str, folders: list[str], file_exist: str = REPLACE,
                 claim: bytes | None = None, tag: str | None = None, shown: str | None = None) -> None:
        """tag: what makes this attempt's temp names its own; by default the worker's pid (one host). A cluster
        node passes its claim and delivery ("c<claim>.<delivery>"): pids repeat across hosts (distributed/task.py).
        shown: how `processed` is named in a refusal's reason (default its last part: "processed")."""
        self.processed, self.name, self.folders = processed, name, folders
        self.shown = os.path.basename(processed) if shown is None else shown
        self.file_exist, self.claim = file_exist, claim
        self.superseded: list[Superseded] = []  # what publish did to earlier results
        self.fresh = True  # publish added an entry NAME to processed/ itself (none stood there): its count grows
        tag, k = tag or str(os.getpid()), key(name)
        self.temp_name = f"{TEMP_OUTPUT_PREFIX}{tag}-{k}"
        self.keep_name = f"{TEMP_OUTPUT_PREFIX}{tag}-old-{k}"  # an earlier result, kept until commit
        self.outs: dict[str, _Out] = {}
        self.bytes_out = 0
        self.lines_out: dict[str, int] = {}

    def _dir(self, folder: str) -> str:
        return os.path.join(self.processed, folder) if folder else self.processed

    def _open(self, folder: str) -> _Out:
        temp = os.path.join(self._dir(folder), self.temp_name)
        with in_phase(Phase.WRITE_OUTPUT):
            try:
                fd = durable.create_exclusive(temp)
            except FileExistsError:  # left by an earlier attempt in this same worker process (its abort failed)
                durable.unlink_quiet(temp)
                fd = durable.create_exclusive(temp)
            except FileNotFoundError:
                # The output folder vanished (rmdir, rm -rf processed/): recreate it rather than retry for ever
                # (errors.classify: ENOENT on an output is RECREATE).
                os.makedirs(self._dir(folder), exist_ok=True)
                fd = durable.create_exclusive(temp)
            out = self.outs[folder] = _Out(fd, temp)  # held at once: abort() drops it if tagging fails
            if self.claim is not None:
                # Before the data's fsync: the claim is durable with the result, never after it. Where the
                # file system keeps no user xattr the result goes untagged, and publish compares bytes instead.
                durable.tag(fd, CLAIM_ATTR, self.claim)
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
        fsynced; without, the caller makes a whole batch's temps durable at once (durable.sync_files, the group
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

    def temps(self) -> list[str]:
        """The temp outputs' paths (after seal(): what a group commit must make durable)."""
        return [out.temp for out in self.outs.values()]

    def sealed(self) -> dict[str, tuple[str, int, bytes]]:
        """After seal(): output folder -> (temp path, lines written, last byte), for adopt() in another process."""
        return {folder: (out.temp, out.lines, out.tail) for folder, out in self.outs.items()}

    def adopt(self, sealed: dict[str, tuple[str, int, bytes]], bytes_out: int) -> None:
        """Take over temps another process sealed (durable, closed; sealed()), so this one can publish() them: on a
        cluster node the child seals, and only the holder of the claim's lease publishes (distributed/task.py)."""
        for folder, (temp, lines, tail) in sealed.items():
            out = self.outs[folder] = _Out(-1, temp)
            out.lines, out.tail = lines, tail
        self.bytes_out = bytes_out

    def publish(self) -> list[str]:
        """Rename the sealed (durable) temps to their final names, all or none; returns the folders whose entries
        changed: the caller fsyncs each (once per batch) before the input may go.

        An earlier result of the same name, in an output this input writes or in one it did not reach (a stale
        result), is this input's own when it carries this claim (a redo after a crash: replaced, it would be
        doubled otherwise), or, carrying no claim (a file system without user xattrs), when its bytes are this
        output's; else file_exist decides: "keep" gives it a free name NAME.superseded-<unix time>[-N] in its
        folder (a link made before the rename, so the name never goes missing), "replace" renames over it (a stale
        one is removed), "fail" raises pipeline.Rejected("a result named NAME already exists in processed/...
        (file_exist = fail)") before anything is renamed: the earlier results stay as they were. Each one kept or
        replaced is listed in self.superseded.

        All or none: a target that is a directory refuses before anything is renamed (IsADirectoryError); every
        earlier result (a stale one too) gets its second name before the first rename, so a refusal there leaves
        nothing published; any other refusal midway puts back what was already renamed (earlier results restored
        from a second name) and drops the second names made, so an input that ends in failed/ never leaves a
        result in processed/ and an earlier result never stays under two names. An earlier result a consumer
        takes meanwhile is simply gone: not listed in self.superseded.
        """
        changed = []
        self.superseded = []
        with in_phase(Phase.PUBLISH):
            reserved = {f.split("/", 1)[0] for f in self.folders if f}
            earlier: dict[str, str] = {}  # folder -> what its earlier result becomes: _OWN, KEEP or REPLACE
            # No output goes to processed/ itself: it gains no entry (a same-named file there is not ours to count;
            # counting it as new made the status page's processed/ count grow by one per file until the rescan).
            self.fresh = "" in self.folders
            for folder in self.folders:
                target = os.path.join(self._dir(folder), self.name)
                st = _lstat(target)
                if not folder:
                    self.fresh = st is None
                isdir = st is not None and stat.S_ISDIR(st.st_mode)
                # An input named like an output folder is refused before any rename: a directory stands there, or
                # (that folder removed by hand) the result would take the folder's place and block its outputs.
                if folder in self.outs and (isdir or (not folder and self.name.split("/", 1)[0] in reserved)):
                    where = display(os.path.join(self.shown, folder, self.name))
                    why = f"{where} is a folder" if isdir else f"{display(self.name.split('/', 1)[0])} names an " \
                        "output folder of the routing"
                    raise IsADirectoryError(errno.EISDIR, f"{why}, so its result cannot take that name", target)
                if folder in self.outs and "/" in self.name:  # recursive mode: processed/batch/a.txt keeps its path
                    durable.makedirs(self._dir(folder), os.path.dirname(self.name), os.path.join(self.shown, folder))
                if st is not None and not isdir:  # a folder of that name is not a result of ours
                    earlier[folder] = self._judge(folder, target, st)
            now = time.time()
            seconds: dict[str, str] = {}  # folder -> the second name its earlier result has until the commit
            done: list[str] = []
            try:
                # Every second name (stale folders' too) before any rename: a refusal in any folder (EPERM, EIO,
                # ENOSPC) then comes while nothing is published, and the roll back drops the second names made.
                self._second_names(earlier, now, seconds)
                for folder, out in self.outs.items():
                    durable.rename(out.temp, os.path.join(self._dir(folder), self.name))  # atomic replace: old or new
                    done.append(folder)
            except BaseException:
                self._roll_back(done, seconds)
                raise
            for folder, out in self.outs.items():
                self.lines_out[folder] = out.lines + (out.tail != b"\n")  # a last line without an ending counts
                changed.append(os.path.dirname(os.path.join(self._dir(folder), self.name)))  # where it changed
            for folder, action in earlier.items():
                second = seconds.get(folder)
                if second is None:
                    continue  # taken by a consumer between the look and its second name: nothing superseded
                if folder not in self.outs:
                    # A stale result, in an output this input did not reach: its own name goes now, durable at the
                    # caller's fsync of its folder (a crash before it redoes the input, which finds it again).
                    durable.unlink_quiet(os.path.join(self._dir(folder), self.name))
                    changed.append(os.path.dirname(os.path.join(self._dir(folder), self.name)))  # where it changed
                if action == KEEP:
                    aside = os.path.relpath(second, self._dir(folder))  # batch/a.superseded-... in recursive mode
                    self.superseded.append(Superseded(folder, "kept", aside))
                    continue
                # Same folder as its rename (or unlink): both become durable together, at the caller's fsync of it.
                durable.unlink_quiet(second)
                if action == REPLACE:
                    self.superseded.append(Superseded(folder, "replaced"))
        return changed

    def _judge(self, folder: str, target: str, st: os.stat_result) -> str:
        """What the earlier result at target becomes: _OWN (this input's), else file_exist; raises Rejected for
        file_exist = "fail"."""
        tag = _claim_on(target)
        if tag is not None and tag == self.claim:
            return _OWN  # a redo: this input published it before a crash
        if tag is None and folder in self.outs and _same_bytes(target, st, self.outs[folder].temp):
            return _OWN  # untagged (no user xattrs here) and identical: replacing it loses nothing
        if self.file_exist == FAIL:
            where = "/".join(p for p in (os.path.basename(self.processed), folder) if p)
            raise Rejected(f"a result named {display(self.name)} already exists in {where}/ (file_exist = fail)")
        return self.file_exist

    def _second_names(self, earlier: dict[str, str], now: float, seconds: dict[str, str]) -> None:
        """A second name for each earlier result about to be replaced or removed (stale): NAME.superseded-... where
        it is kept, else a hidden one so a refused commit can put it back; added to seconds (folder -> that path)
        as each is made, so that a refusal midway can drop those already made."""
        for folder, action in earlier.items():
            d, target = self._dir(folder), os.path.join(self._dir(folder), self.name)
            try:
                if action == KEEP:
                    seconds[folder] = self._aside(d, target, now)
                    continue
                keep = os.path.join(d, self.keep_name)
                try:
                    durable.link(target, keep)
                except FileExistsError:
                    durable.unlink(keep)  # left by an earlier attempt of this worker
                    durable.link(target, keep)
                seconds[folder] = keep
            except (FileNotFoundError, NotADirectoryError):
                continue  # taken by a consumer meanwhile: nothing to keep

    def _aside(self, d: str, target: str, now: float) -> str:
        """The NAME.superseded-... link of the earlier result at target: one an interrupted attempt already made
        (a kill between that link and the rename; a second would double it), else a new one."""
        st = os.lstat(target)
        if st.st_nlink > 1:  # rare: only then can an aside of it exist
            with os.scandir(os.path.dirname(target)) as it:  # its own folder (recursive mode: processed/batch/)
                for e in it:
                    # Only an aside of this very name: a dedup tool (hardlink, rdfind) may have linked the result
                    # to another name's aside, which must not stand for this name's earlier version.
                    if _aside_of(e.name, os.path.basename(self.name)):
                        try:
                            found = e.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        if (found.st_dev, found.st_ino) == (st.st_dev, st.st_ino):
                            return e.path
        from ingestd.spool import set_aside  # here: `ingestd process` (its start-up is timed) seldom needs it

        return os.path.join(d, set_aside(d, self.name, now, link=True))

    def _roll_back(self, done: list[str], seconds: dict[str, str]) -> None:
        """Undo the renames already made; best effort (the input is retried or failed either way)."""
        for folder in done:
            target = os.path.join(self._dir(folder), self.name)
            try:
                if folder in seconds:
                    durable.rename(seconds[folder], target)  # the earlier result, under its name again
                else:
                    durable.unlink(target)  # no result here before this input
                # Not fsynced: only a refusal after a rename that the directory check cannot foresee gets here, and
                # a power cut right after it can bring the undone output back (known limit, docs/guarantees.md).
            except OSError:
                pass  # the original error is the one to report; a redo or requeue republishes
        for folder, second in seconds.items():
            if folder not in done:
                try:
                    durable.unlink_quiet(second)  # the earlier result still has its own name
                except OSError:
                    pass

    def abort(self) -> None:
        """Drop every unpublished temp file; the input stays where it is. Also this Sinks' temp name in each output
        folder it holds none in: an exception (a signal's, in `ingestd process`) just after open(2) made one left
        it unheld; the name is this attempt's own (its tag), so it is no one else's."""
        for out in self.outs.values():
            if out.fd >= 0:
                os.close(out.fd)
            try:
                durable.unlink_quiet(out.temp)
            except OSError:
                pass  # EIO/EROFS: recovery or remove_temps drops it later; the first error is the one to report
        for folder in self.folders:
            if folder not in self.outs:
                try:
                    durable.unlink_quiet(os.path.join(self._dir(folder), self.temp_name))
                except OSError:
                    pass  # as above
        self.outs.clear()


def _aside_of(entry: str, name: str) -> bool:
    """Is `entry` a name set_aside gives `name`: NAME.superseded-<unix time>[-N], NAME cut to fit NAME_MAX?"""
    raw, mark = os.fsencode(entry), SUPERSEDED.encode()
    head, sep, tail = raw.rpartition(mark)
    if not sep or not head or re.fullmatch(rb"[0-9]+(-[0-9]+)?", tail) is None:
        return False
    full = os.fsencode(name)
    return head == full or (len(raw) == 255 and len(head) < len(full) and full.startswith(head))


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # ENOTDIR: a file stands where a folder of the path should be
        return None


def _claim_on(path: str) -> bytes | None:
    """The claim recorded on a result, or None: none recorded (an older version, a file put there by hand, a
    file system without user xattrs), or a symlink (never followed)."""
    try:
        return os.getxattr(path, CLAIM_ATTR, follow_symlinks=False)
    except OSError:  # ENODATA, ENOTSUP, EPERM (symlinks hold no user xattrs)
        return None


def _same_bytes(path: str, st: os.stat_result, temp: str) -> bool:
    """Is the regular file at path byte for byte the temp? Read only when their sizes match (rare path)."""
    try:
        if not stat.S_ISREG(st.st_mode) or os.stat(temp).st_size != st.st_size:
            return False
        with open(path, "rb", opener=_nofollow) as a, open(temp, "rb") as b:
            while True:
                x, y = a.read(1 << 20), b.read(1 << 20)
                if x != y:
                    return False
                if not x:
                    return True
    except OSError:
        return False


def _nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK)


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
