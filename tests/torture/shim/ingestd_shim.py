"""The torture suite's I/O shim around ingestd.durable (the one module that writes, renames and fsyncs).

Configured by a JSON file (path in INGESTD_SHIM), it can, in the daemon and in every spawned worker:
- journal: append one JSON line per durable operation (create, rename, link, unlink, fsync with a copy of the
  data made durable, fsync_dir) and per acknowledgement (commit, fail, attempts recorded), so a test can replay
  the life of the folders and compute what a power cut at any point would have left on disk;
- disable: turn chosen fsync call sites (``file.py:lineno`` of the caller) into no-ops, to prove each one matters;
- fail: make the Nth call of one kind (fsync, read, write, rename, create), counted across all processes, raise
  a real OSError (EIO by default);
- kill: SIGKILL the daemon at the Nth occurrence of a point (claim, write, link, published, recover, commit).
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import signal
import sys

CFG: dict = {}
_log_fd = -1


def _counter(key: str) -> int:
    """Increment and return a counter shared by every process of the run (a tiny file under flock)."""
    path = os.path.join(CFG["dir"], "count-" + key)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        n = int(os.pread(fd, 32, 0) or b"0") + 1
        os.pwrite(fd, str(n).encode().ljust(20), 0)
        return n
    finally:
        os.close(fd)


def _journal(**rec) -> None:
    if _log_fd >= 0:
        rec["pid"] = os.getpid()
        os.write(_log_fd, (json.dumps(rec) + "\n").encode())  # O_APPEND: one write, one line


def _main_pid() -> int:
    return int(os.environ["INGESTD_SHIM_MAIN"]) if os.environ.get("INGESTD_SHIM_MAIN") else os.getpid()


def _point(name: str) -> None:
    """SIGKILL the whole daemon (its workers follow by PDEATHSIG) at the configured occurrence of a point; with
    "only": "self", just the process that reaches it (a worker dying there, its daemon going on)."""
    kill = CFG.get("kill")
    if kill and kill["at"] == name and _counter("kill-" + name) == kill["n"]:
        _journal(op="killed", at=name)
        if kill.get("only") != "self":
            os.kill(_main_pid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def _maybe_fail(kind: str) -> None:
    fail = CFG.get("fail")
    if fail and fail["call"] == kind and _counter("fail-" + kind) == fail["n"]:
        _journal(op="injected", call=kind, n=fail["n"])
        code = getattr(errno, fail.get("errno", "EIO"))
        raise OSError(code, os.strerror(code))


def _site(depth: int = 2) -> str:
    f = sys._getframe(depth)  # the caller of the durable function (depth counts from here)
    return f"{os.path.basename(f.f_code.co_filename)}:{f.f_lineno}"


def _ino(path: str) -> int | None:
    try:
        return os.lstat(path).st_ino
    except OSError:
        return None


def install(cfg_path: str) -> None:
    global _log_fd
    with open(cfg_path) as f:
        CFG.update(json.load(f))
    if "INGESTD_SHIM_MAIN" not in os.environ:
        os.environ["INGESTD_SHIM_MAIN"] = str(os.getpid())  # the first process is the daemon; workers inherit
    if CFG.get("journal"):
        _log_fd = os.open(CFG["journal"], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
    from ingestd import durable, pipeline, sinks, spool

    disabled = set(CFG.get("disable", []))
    shadow = CFG.get("shadow")
    orig = {n: getattr(durable, n) for n in ("fsync", "fsync_dir", "sync_files", "write_all", "create_exclusive",
                                            "rename", "rename_noreplace", "link", "unlink", "unlink_quiet")}

    def skipped() -> bool:
        """This fsync's call site is switched off for the run: journal that, and do nothing."""
        site = _site(3)  # skipped() <- fsync/fsync_dir <- their caller
        if site not in disabled:
            return False
        _journal(op="skipped", site=site)
        return True

    def synced(ino: int, path: str) -> None:
        """Journal that ino's bytes (read from path) are durable now, with a copy of them."""
        rec: dict = {"op": "fsync", "ino": ino}
        if shadow:  # keep the bytes now durable, to rebuild the disk as a power cut would leave it
            copy = os.path.join(shadow, f"{ino}-{os.getpid()}-{_counter('shadow')}")
            with open(path, "rb") as src, open(copy, "wb") as dst:
                dst.write(src.read())
            rec["copy"] = copy
        _journal(**rec)

    def fsync(fd: int) -> None:
        if skipped():
            return
        _maybe_fail("fsync")
        orig["fsync"](fd)
        synced(os.fstat(fd).st_ino, f"/proc/self/fd/{fd}")

    def sync_files(paths: list[str]) -> None:
        """The group commit's data sync: switched off as a whole at its caller's site; otherwise the real one runs,
        whose per-file fsyncs (this module's fsync above) journal each file's bytes as durable."""
        if skipped():
            return
        orig["sync_files"](paths)

    def fsync_dir(path: str) -> None:
        if skipped():
            return
        _maybe_fail("fsync")
        _point("fsync_dir@" + _site(2).split(":")[0])  # e.g. fsync_dir@worker.py: the group commit's
        orig["fsync_dir"](path)
        _journal(op="fsync_dir", path=os.path.abspath(path))

    def write_all(fd: int, data) -> None:
        _maybe_fail("write")
        orig["write_all"](fd, data)
        _point("write")

    def create_exclusive(path: str, mode: int = 0o644) -> int:
        _maybe_fail("create")
        fd = orig["create_exclusive"](path, mode)
        ino = os.fstat(fd).st_ino
        _journal(op="create", path=os.path.abspath(path), ino=ino)
        return fd

    def rename(src: str, dst: str) -> None:
        _maybe_fail("rename")
        ino = _ino(src)
        orig["rename"](src, dst)
        _journal(op="rename", src=os.path.abspath(src), dst=os.path.abspath(dst), ino=ino)

    def rename_noreplace(src: str, dst: str) -> None:
        _maybe_fail("rename")
        ino = _ino(src)
        orig["rename_noreplace"](src, dst)
        _journal(op="rename", src=os.path.abspath(src), dst=os.path.abspath(dst), ino=ino)

    def link(src: str, dst: str) -> None:
        _maybe_fail("link")
        ino = _ino(src)
        orig["link"](src, dst)
        _journal(op="link", src=os.path.abspath(src), dst=os.path.abspath(dst), ino=ino)
        _point("link")  # file_exist: an earlier result has its second name, the new one is not yet renamed in

    def unlink(path: str) -> None:
        orig["unlink"](path)
        _journal(op="unlink", path=os.path.abspath(path))

    def unlink_quiet(path: str) -> None:
        try:
            unlink(path)
        except FileNotFoundError:
            pass

    for n, fn in (("fsync", fsync), ("fsync_dir", fsync_dir), ("sync_files", sync_files), ("write_all", write_all),
                  ("create_exclusive", create_exclusive), ("rename", rename), ("rename_noreplace", rename_noreplace),
                  ("link", link), ("unlink", unlink), ("unlink_quiet", unlink_quiet)):
        setattr(durable, n, fn)

    # Reads: the input's raw reads go through a counting layer (EIO on the Nth read).
    orig_open = pipeline.open_input

    class _Raw(io.RawIOBase):
        def __init__(self, fd: int) -> None:
            self.fd = fd

        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:
            _maybe_fail("read")
            return os.readv(self.fd, [b])

        def close(self) -> None:
            if not self.closed:
                os.close(self.fd)
            super().close()

    def open_input(path: str):
        f = orig_open(path)
        if not (CFG.get("fail") and CFG["fail"]["call"] == "read"):
            return f
        fd = os.dup(f.fileno())
        f.close()
        return io.BufferedReader(_Raw(fd), pipeline.BLOCK * 4)

    pipeline.open_input = open_input

    # Acknowledgements and kill points in the folder state machine.
    S = spool.Spool
    o_claim, o_commit, o_fail, o_bump, o_recover, o_requeue = S.claim, S.commit, S.fail, S.bump_attempts, S.recover, S.requeue
    o_sync = S.sync_commits
    committed: list[str] = []  # commits made, acknowledged once sync_commits has made them durable

    def claim(self, name, *args, **kwargs):
        ok = o_claim(self, name, *args, **kwargs)  # a Claim, truthy only when claimed
        if ok:
            _point("claim")
        return ok

    def commit(self, name, *args, **kwargs):
        _point("published")  # outputs are published and durable; the input is not yet removed
        o_commit(self, name, *args, **kwargs)
        committed.append(name)

    def sync_commits(self):
        o_sync(self)  # the daemon batches one underprocess/ fsync per main-loop turn: commits count from here
        for name in committed:
            _journal(op="ack", what="commit", name=name)
        committed.clear()
        _point("commit")

    def fail(self, name, failure, now, source=None):
        o_fail(self, name, failure, now, source)
        _journal(op="ack", what="fail", name=name)

    def bump(self, name):
        n = o_bump(self, name)
        _journal(op="ack", what="attempts", name=name, n=n)
        _point("recover")
        return n

    def recover(self, max_attempts, now):
        _point("recover-start")
        return o_recover(self, max_attempts, now)

    def requeue(self, names=None):
        moved, refused = o_requeue(self, names)
        for n in moved:
            _journal(op="ack", what="requeue", name=n)
        return moved, refused

    S.claim, S.commit, S.fail, S.bump_attempts, S.recover, S.requeue = claim, commit, fail, bump, recover, requeue
    S.sync_commits = sync_commits
    if CFG.get("kill") and CFG["kill"]["at"] == "mid-output":
        o_write = sinks.Sinks.write

        def write(self, folder, data):
            o_write(self, folder, data)
            _point("mid-output")

        sinks.Sinks.write = write
