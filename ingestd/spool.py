"""The folder queue: claim, commit, fail, recover, requeue and count. State is which folder holds a file.

unprocessed/ -> underprocess/ (claim: one atomic rename) -> outputs published -> input removed (commit).
A file that cannot be processed moves to failed/ beside a sidecar that says why.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import heapq
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ingestd import durable, errors, inflight, lease
from ingestd.errors import Phase
from ingestd.inode import folder_id
from ingestd.log import event
from ingestd.names import DONE_SUFFIX, STATE_DIR, SUPERSEDED, TEMP_OUTPUT_PREFIX, TEMP_PREFIX, display, key, oserror

FOLDERS = ("unprocessed", "underprocess", "processed", "failed")
RACY_NS = 2_000_000_000  # a folder modified this close to a listing may have changed unseen in the same tick (FAT: 2 s)
REASON_PREFIX = TEMP_PREFIX + "reason-"
SEQ_FILE = "failure-seq"  # in .ingestd/: {"reserved_to": N}, every failure seq handed out so far is <= N
SEQ_BLOCK = 1024  # failure seqs reserved per durable write of SEQ_FILE
NO_SIDECAR = "unknown (no sidecar)"
RECURSIVE_NOTE = "recursive"  # the lock label's note of a daemon that takes folders (status counts as it does)
ATTEMPTS = "attempts-"  # in .ingestd/: attempts-KEY, {"ino": N, "attempts": N} (bump_attempts)


class Claim(enum.Enum):
    """What Spool.claim did. Truthy only for CLAIMED (so `if spool.claim(name):` reads as before)."""

    CLAIMED = "claimed"
    GONE = "gone"  # vanished, replaced meanwhile, or a file of that name is still in flight
    BUSY = "busy"  # a writer holds it open: not complete
    UNSURE = "unsure"  # no lease possible here: settle it, then claim with settled=True

    def __bool__(self) -> bool:
        return self is Claim.CLAIMED


class SpoolError(Exception):
    """The watch dir cannot be used (message says why); the daemon refuses to start."""


class AlreadyRunning(SpoolError):
    pass


class NotAWatchDir(SpoolError):
    """A folder of the watch dir is missing or is not a directory."""


class FolderError(SpoolError):
    """A folder of the watch dir (or one on the way to it) cannot be used: `.path` says which, `.errno` why
    (e.g. errno.EACCES). The message names both: "cannot read /srv/w/failed: Permission denied (EACCES)"."""

    def __init__(self, path: str, err: OSError, doing: str = "read") -> None:
        self.path, self.errno = path, err.errno
        super().__init__(f"cannot {doing} {path}: {oserror(err)}")


@dataclass(frozen=True, slots=True)
class Failure:
    reason: str
    line: int | None = None
    attempts: int = 1


class Spool:
    """done_marker: the daemon claims NAME only once NAME.done exists, so a file given back to the queue
    (requeue, unclaim) gets its marker back, or it would never be claimed again."""

    def __init__(self, root: Path, done_marker: bool = False, tag: str = "",
                 seq: Callable[[], int] | None = None) -> None:
        """tag: makes this process's temp names its own where several hosts share the watch dir (a cluster node's
        name and pid); seq: where failure sequence numbers come from when .ingestd/failure-seq is shared by several
        hosts (Redis, distributed/ledger.py); by default that file."""
        self.root = Path(root)
        self.tag, self._seq_source = tag, seq
        self.done_marker = done_marker
        self.unprocessed = str(self.root / "unprocessed")
        self.underprocess = str(self.root / "underprocess")
        self.processed = str(self.root / "processed")
        self.failed = str(self.root / "failed")
        self.state = str(self.root / STATE_DIR)
        self._lock_fd: int | None = None
        self._note = ""  # the lock label's note (lock), kept for check_lock
        self._seq = self._seq_limit = 0  # failure seqs: the last handed out, the end of the reserved block
        # failures(): sidecar name -> ((inode, mtime_ns, ctime_ns, size), record); replaced whole, never mutated,
        # so HTTP threads can share it without a lock.
        self._sidecars: dict[str, tuple[tuple[int, int, int, int], dict[str, Any]]] = {}
        # kept(): processed/'s last listing: ((inode, mtime_ns, ctime_ns), wall time of the listing in ns, entries)
        self._processed_seen: tuple[tuple[int, int, int], int, int] | None = None
        # Attempts that could not be written (full disk): name -> (inode, count), so a worker dying again and
        # again on a full disk still ends in quarantine instead of a crash of the daemon (see bump_attempts).
        self._unrecorded: dict[str, tuple[int, int]] = {}
        # Keys of the attempt counts on disk at start-up (recover): a count kept through a stop (unclaim) or left
        # by a crash inside fail() belongs to a file a later claim makes a Job of with attempts 0; commit must
        # still clear it, or a later file of that name on the same inode inherits it (tests/test_break_hotpath.py).
        self._stale: set[str] | None = set()
        # Folders under underprocess/ where commits unlinked a file since the last sync_commits (recursive mode).
        self._committed_in: set[str] = set()

    # --- start-up -------------------------------------------------------------------------
    def missing(self) -> str | None:
        """The topmost folder on the watch dir's path that does not exist: the first one ensure() makes (the watch
        dir itself, or a parent of it); None when the watch dir exists. The path as given, made absolute but not
        normalised: os.makedirs makes "missing/../w" by way of "missing", so that is the one named."""
        path = os.path.join(os.getcwd(), self.root)
        if os.path.lexists(path):
            return None
        while (parent := os.path.dirname(path)) != path and not os.path.lexists(parent):
            path = parent
        return path

    def ensure_at_start(self) -> str | None:
        """ensure() at start-up, said in a WARNING event (`watch_dir_created`) when the watch dir did not exist: it is
        made, as a fresh install and `make run` on a fresh clone want, but a typo in the path makes one too, and the
        daemon then watches an empty new tree while files pile up elsewhere. Likewise `queue_folders_created` when
        an existing folder holding other things (a home folder given by mistake) gets the queue folders; an empty
        one (a fresh StateDirectory) gets them silently. Returns the topmost folder made (see missing()), or None.
        Raises NotAWatchDir for a path that reaches a missing folder before a "..": the kernel resolves it to
        nothing (`status` says it does not exist), and makedirs would make that stray folder and go on to an
        existing watch dir; else as ensure() does."""
        created = self.missing()
        if created and ".." in os.path.relpath(os.path.join(os.getcwd(), self.root), created).split(os.sep):
            raise NotAWatchDir(f"watch_dir: {self.root} does not exist (its folder {created} does not)")
        fresh = not created and not os.path.isdir(self.unprocessed)
        try:
            others = [e for e in Spool.entries(str(self.root)) if e not in FOLDERS] if fresh else []
        except OSError:
            others = []  # not a folder, not readable: ensure() below says so
        made = self.ensure()
        if created:
            event("watch_dir_created", "the watch dir did not exist: made it (a typo in the path? files dropped "
                  "elsewhere are not seen)", logging.WARNING, watch_dir=str(self.root.resolve()), made=created)
        elif fresh and others and made:
            event("queue_folders_created", "the watch dir held other things but no queue folders: made them (the "
                  "wrong folder?)", logging.WARNING, watch_dir=str(self.root.resolve()),
                  made=[os.path.basename(m) for m in made], holding=len(others))
        return created

    def ensure(self) -> list[str]:
        """Create missing folders; refuse folders on different filesystems (renames would fail with EXDEV).

        Returns the folders it had to (re)create. Safe to call again while running (e.g. at each rescan, after
        someone ran `rm -rf failed/`); raises SpoolError when a folder cannot be made or used.
        """
        devs: dict[int, str] = {}
        made = []
        for path in (self.unprocessed, self.underprocess, self.processed, self.failed, self.state):
            try:
                if not os.path.isdir(path):
                    os.makedirs(path, exist_ok=True)
                    made.append(path)
                st = os.stat(path)
            except OSError as e:
                raise SpoolError(f"watch_dir: cannot use {path}: {e.strerror}") from None
            if not stat.S_ISDIR(st.st_mode):
                raise SpoolError(f"watch_dir: {path} is not a directory")
            devs.setdefault(st.st_dev, path)
        if len(devs) > 1:
            raise SpoolError(
                "watch_dir: folders are on different filesystems (" + ", ".join(devs.values())
                + "); a claim must be one atomic rename, so all must share one filesystem"
            )
        return made

    def lock(self, wait: bool = False, note: str = "") -> None:
        """One daemon per watch dir: an flock(2) on the watch dir itself, held for the process's life and released
        by the kernel on death. The directory, not a file in it: a lock file can be deleted and recreated under a
        running daemon, and a second daemon would then lock the new file and start beside it.
        .ingestd/lock only carries the holder's label ("pid N on HOST", then ", NOTE": RECURSIVE_NOTE when it
        takes folders) for `status` and the refusal message."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._label() or "unknown"
            if not wait:
                os.close(fd)
                raise AlreadyRunning(f"watch_dir: another ingestd is running on {self.root} ({holder})") from None
            # --wait-lock: said once, so a standby is not mistaken for a hung start.
            event("standby", "another ingestd holds the watch dir: waiting to take over when it ends",
                  watch_dir=self.root, holder=holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            label = os.open(os.path.join(self.state, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            try:
                os.ftruncate(label, 0)
                # ", " in the host name written as ",": only the note may end the label with ", NOTE" (noted()), or
                # a host named "box, recursive" made every daemon there recursive to `status`.
                host = socket.gethostname().replace(", ", ",")
                os.pwrite(label, f"pid {os.getpid()} on {host}{', ' + note if note else ''}".encode(), 0)
            finally:
                os.close(label)
        except OSError:
            # Only a label for `status`; the flock is the lock. A full disk (ENOSPC) must not stop a start,
            # or a restart on a full disk could never pause and resume by itself (tests/torture/test_errors.py).
            pass
        self._lock_fd, self._note = fd, note

    def check_lock(self) -> None:
        """After the watch dir was removed and made again (rm -rf; ensure() remakes it), the flock is on a directory
        that is gone and the new one is unlocked: lock the new one, or give way. Raises AlreadyRunning when another
        daemon holds it (it started on the new directory in between)."""
        if self._lock_fd is None:
            return
        try:
            st = os.stat(self.root)
        except FileNotFoundError:
            return  # gone right now: ensure() makes it, the next check locks it
        held = os.fstat(self._lock_fd)
        if (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino):
            return
        old, self._lock_fd = self._lock_fd, None
        try:
            self.lock(wait=False, note=self._note)
        finally:
            os.close(old)

    def unlock(self) -> None:
        """Release the daemon lock (at the end of shutdown; the kernel does it anyway when the process dies)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _label(self) -> str | None:
        try:
            return durable.read_small(os.path.join(self.state, "lock"), 512).decode("utf-8", "replace").strip() or None
        except OSError:
            return None

    def holder(self) -> str | None:
        """Who holds the daemon lock ("pid N on HOST"), or None when no daemon runs here."""
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return self._label() or "unknown"
        finally:
            os.close(fd)
        return None

    @staticmethod
    def noted(holder: str | None, note: str) -> bool:
        """Whether a holder's label (holder()) carries `note`, as lock() writes it (", NOTE" at its end)."""
        return holder is not None and holder.endswith(", " + note)

    def recover(self, max_attempts: int, now: float) -> tuple[list[str], list[str]]:
        """After a crash: drop stale temp outputs, return in-flight files to the queue, quarantine poison files.

        Files stay in underprocess/ and are processed first (no rename back, so nothing can be
        overwritten). A recovery counts an attempt for the files a worker was on when the daemon died (its
        in-flight record, see inflight.py), not for the rest of a batch that only waited; when the records
        cannot be trusted (none, or a worker without one; files left by hand) every file counts, the safe side.
        Returns (requeued, quarantined).
        """
        suspects = inflight.suspects(self.state)
        for folder, _, files in os.walk(self.processed):
            for f in files:
                if f.startswith(TEMP_OUTPUT_PREFIX):
                    durable.unlink_quiet(os.path.join(folder, f))  # never published: a redo rewrites it
        for f in os.listdir(self.failed):
            if f.startswith(TEMP_OUTPUT_PREFIX):
                durable.unlink_quiet(os.path.join(self.failed, f))
        self.drop_claim_ghosts()
        requeued, quarantined = [], []
        for name in sorted(self.files(self.underprocess)):  # relative paths, mirrored folders included
            if suspects is not None and key(name) not in suspects:
                requeued.append(name)  # it waited in a batch: the crash was not its doing
                continue
            attempts = self.bump_attempts(name)
            if attempts >= max_attempts:
                reason = f"poison: in progress during {attempts} crashes or restarts in a row"
                try:
                    self.fail(name, Failure(reason, attempts=attempts), now)
                except OSError as e:
                    # A full disk must not make every restart exit 1: the file stays in underprocess/, is not
                    # processed now, and the next start quarantines it (its count is only ever higher).
                    event("io_error", "could not quarantine a poison file; it stays in underprocess/",
                          logging.ERROR, file=display(name), reason=errors.reason(e))
                    continue
                quarantined.append(name)
            else:
                requeued.append(name)
        self.prune(self.underprocess, self.files(self.underprocess, dirs=True)[1])  # claim folders left empty
        try:
            self._stale = {f[len(ATTEMPTS):] for f in os.listdir(self.state) if f.startswith(ATTEMPTS)}
        except FileNotFoundError:
            pass  # a new watch dir (ensure() makes .ingestd/): no count anywhere
        except OSError:
            self._stale = None  # not known: every commit clears (one unlink each), the safe side
        return requeued, quarantined


    def drop_claim_ghosts(self) -> None:
        """A move between queue folders is one rename, and a power cut can keep its new name while losing the
        removal of its old one (each folder is made durable by its own fsync): the file (same inode) is then under
        both names. Processing the old name again would finish the file twice (a failure would even be kept twice,
        the first as .superseded-), so the stale name goes: a claim's old name in unprocessed/ (the claim is never
        fsynced there), and a set-aside's old name in underprocess/ (fail() was cut between its two fsyncs).
        Found by tests/torture/test_power_loss.py (restart on a disk cut mid-run)."""
        failed = self._inodes(self.failed)
        self._drop_same(self.underprocess, failed)
        self._drop_same(self.unprocessed, {**failed, **self._inodes(self.underprocess)})

    def _inodes(self, folder: str) -> dict[str, int]:
        """name -> inode. The inode alone: the folders share one file system (ensure), and st_dev differs per NFS
        client for the very same file (DISTRIBUTED.md §2)."""
        found = {}
        for name in self.files(folder):
            try:
                st = os.lstat(os.path.join(folder, name))
            except FileNotFoundError:
                continue
            found[name] = st.st_ino
        return found

    def _drop_same(self, folder: str, taken: dict[str, int]) -> None:
        """Unlink each entry of folder that is the very file (inode) of the same name in `taken`."""
        for name, ino in self._inodes(folder).items():
            if taken.get(name) == ino:
                # No fsync: if this unlink is lost too, the next start drops the ghost again.
                durable.unlink_quiet(os.path.join(folder, name))

    # --- the life of a file ----------------------------------------------------------------
    def claim(self, name: str, settled: bool = False) -> Claim:
        """Move a complete file into underprocess/, holding a read lease across the rename (ingestd/lease.py).

        CLAIMED: moved. GONE: it vanished or was replaced meanwhile, or a file of that name is in flight.
        BUSY: someone holds it open for writing (or tried to open it for writing during the claim): not moved.
        UNSURE: the kernel cannot tell (no lease: not the owner and no CAP_LEASE, or no leases on this file
        system) and `settled` is False: not moved; settle it first (its size and mtime unchanged for
        settle_time), then claim again with settled=True, which moves it. Symlinks and other non-files are moved
        as they are (the caller fails them). OSError (EIO...) is raised.
        """
        src, dst = os.path.join(self.unprocessed, name), os.path.join(self.underprocess, name)
        try:
            with lease.read_lease(src) as held:
                v = held.verdict
                if v is lease.Verdict.GONE:
                    return Claim.GONE
                if v is lease.Verdict.BUSY:
                    return Claim.BUSY
                if v is lease.Verdict.UNSUPPORTED and not settled:
                    return Claim.UNSURE
                if "/" in name:
                    # recursive mode: underprocess/ mirrors the file's folders, so its relative path survives a
                    # crash as it is (recovery walks underprocess/); made durable before the rename (makedirs).
                    # Only now, right before the rename: a mirror made for a claim that then did not happen
                    # (busy, unsure) stayed empty, and a top-level file of the folder's name could never be
                    # claimed (EEXIST) until a restart (tests/test_break_dirs.py).
                    try:
                        durable.makedirs(self.underprocess, os.path.dirname(name))
                    except NotADirectoryError:
                        return Claim.GONE  # a file named like its folder is in flight: after that one commits
                # No fsync: a claim lost in a power cut leaves the file in unprocessed/, where it is redone.
                durable.rename_noreplace(src, dst)
                if v is lease.Verdict.FREE:
                    verdict = self._confirm(held, src, dst)
                    if verdict is not Claim.CLAIMED:
                        self._prune_up(self.underprocess, name)  # given back: its mirror goes if now empty
                    return verdict
        except OSError as e:
            if "/" in name:
                self._prune_up(self.underprocess, name)  # the rename did not happen: no empty mirror left
            if e.errno in (errno.ENOENT, errno.EEXIST, errno.ENOTDIR):  # ENOTDIR: its folder became a file meanwhile
                return Claim.GONE
            raise
        return Claim.CLAIMED

    def _confirm(self, held: lease.Lease, src: str, dst: str) -> Claim:
        """Still under the lease: the name moved must be the file leased, and no writer may have knocked."""
        st = os.lstat(dst)
        if (st.st_dev, st.st_ino) != (held.dev, held.ino) and not _renumbered(held, st):
            # Replaced between our open and the rename: that file was never checked. Its arrival event brings
            # it back; the name it had goes back now (never over a newer one).
            return Claim.GONE if self._give_back(dst, src) else Claim.CLAIMED
        if held.writer_waiting():
            # A writer opened it during the claim and will write once we let go: give it back before it does.
            return Claim.BUSY if self._give_back(dst, src) else Claim.CLAIMED
        return Claim.CLAIMED

    @staticmethod
    def _give_back(dst: str, src: str) -> bool:
        try:
            durable.rename_noreplace(dst, src)  # No fsync: either way the file is in the queue after a power cut.
        except OSError:
            return False  # a newer file of that name arrived meanwhile: keep this one claimed
        return True

    def unclaim(self, name: str) -> bool:
        """Give an abandoned (not crashed) file back to the queue; never over a newer file of that name.
        With done_marker, NAME.done comes back with it (it was removed at the claim)."""
        try:
            if "/" in name:
                durable.makedirs(self.unprocessed, os.path.dirname(name))  # its folder may have been cleaned up
            durable.rename_noreplace(os.path.join(self.underprocess, name), os.path.join(self.unprocessed, name))
        except OSError:
            return False  # a newer file of that name waits: recovery takes this one at the next start
        self._prune_up(self.underprocess, name)
        self._restore_marker(name)
        return True

    def _restore_marker(self, name: str) -> None:
        """Put NAME.done back beside a file returned to unprocessed/ (done_marker on): the file is whole, and
        without its marker it would wait for ever. Best effort: a failure is logged, the file is kept."""
        if not self.done_marker:
            return
        marker = name + DONE_SUFFIX
        try:
            # After the file: the marker must never vouch for a file that is not there yet.
            durable.publish_bytes(self.unprocessed, marker, b"", TEMP_OUTPUT_PREFIX + "done-" + key(name))
        except OSError as e:
            event("io_error", "could not restore a done marker; the file waits for it", logging.ERROR,
                  file=display(name), reason=errors.reason(e))

    def remove_marker(self, marker: str) -> None:
        """A done-marker has served once its file is claimed. Not fsynced: if a crash brings it back, it can only
        vouch for a later file of the same name, which the producer would mark again anyway."""
        durable.unlink_quiet(os.path.join(self.unprocessed, marker))

    def commit(self, name: str, counted: bool = True) -> None:
        """Outputs are durable: now the input may go. This unlink is the commit point (see sync_commits).
        counted: an attempt may have been recorded for it (bump_attempts); False skips looking for its record."""
        try:
            durable.unlink(os.path.join(self.underprocess, name))
        except FileNotFoundError:
            pass  # its owner deleted it meanwhile; the outputs stand
        if "/" in name:
            self._committed_in.add(os.path.dirname(name))
        if counted or name in self._unrecorded or self._stale is None or (self._stale and key(name) in self._stale):
            self.clear_attempts(name)

    def sync_commits(self) -> None:
        """Make the commits (unlinks) so far durable; batched once per main-loop turn, as a lost commit is
        harmless: the file is redone, and the redo publishes identical bytes. Mirrored folders under
        underprocess/ (recursive mode) are each fsynced, then removed when empty."""
        durable.fsync_dir(self.underprocess)
        folders, self._committed_in = self._committed_in, set()
        try:
            self._sync_folders(self.underprocess, folders)  # the unlinks in mirrored folders durable: committed
        except BaseException:
            self._committed_in |= folders  # not durable yet: fsynced again next turn
            raise
        for rel in folders:
            self._prune_up(self.underprocess, rel + "/-")

    @staticmethod
    def _sync_folders(root: str, folders: set[str] | list[str]) -> None:
        """fsync each subfolder of root named (recursive mode's mirrored folders); one gone already is skipped."""
        for rel in sorted(folders):
            try:
                durable.fsync_dir(os.path.join(root, rel))  # the entries changed in it durable before we go on
            except FileNotFoundError:
                continue  # removed with its last file already (an earlier prune)

    def fail(self, name: str, failure: Failure, now: float, source: str | None = None) -> None:
        """Quarantine a file with a readable reason. An older failed file of the same name is kept,
        renamed NAME.superseded-<unix time> (failed inputs are user data: never overwritten)."""
        src = os.path.join(source or self.underprocess, name)
        try:
            size = os.lstat(src).st_size
        except FileNotFoundError:
            return  # gone (deleted by its owner): nothing to quarantine
        if not os.path.isdir(self.failed):
            # `rm -rf failed/` under a running daemon: ENOENT on failed/ is RECREATE (errors.classify, Phase.FAIL).
            os.makedirs(self.failed, exist_ok=True)
        if "/" in name:
            try:
                durable.makedirs(self.failed, os.path.dirname(name))  # failed/batch/a.txt keeps its relative path
            except NotADirectoryError:
                # An earlier failed file is named like a folder on the way (failed/batch, a file): set it aside
                # like any earlier failed file, then make the folder. Raising here paused claiming for the whole
                # queue again and again (tests/test_break_dirs.py).
                self._clear_way(os.path.dirname(name), now)
                durable.makedirs(self.failed, os.path.dirname(name))
        if os.path.lexists(os.path.join(self.failed, name)):
            self._set_aside(name, now)
        record = {
            "name": display(name),
            "reason": failure.reason,
            "line": failure.line,
            "attempts": failure.attempts,
            "failed_at": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
            "failed_at_unix": now,
            "size": size,
            # the order of failures; failed_at is shown, never trusted for order
            "seq": self._seq_source() if self._seq_source else self._next_seq(),
        }
        # The reason is durable before the file moves, so a failed file always has its sidecar.
        durable.publish_bytes(self.failed, REASON_PREFIX + key(name) + ".json",
                              json.dumps(record, indent=1).encode() + b"\n", TEMP_OUTPUT_PREFIX + self.tag + key(name))
        durable.rename(src, os.path.join(self.failed, name))
        durable.fsync_dir(os.path.dirname(os.path.join(self.failed, name)))  # in failed/ for good before it leaves
        durable.fsync_dir(os.path.dirname(src))
        if source is None:
            self._prune_up(self.underprocess, name)
        self.clear_attempts(name)

    def _clear_way(self, folder: str, now: float) -> None:
        """Set aside (set_aside) each failed file that sits where a folder of `folder` ("a/b") must be."""
        parts = folder.split("/")
        for i in range(1, len(parts) + 1):
            rel = "/".join(parts[:i])
            path = os.path.join(self.failed, rel)
            if os.path.lexists(path) and not stat.S_ISDIR(os.lstat(path).st_mode):
                self._set_aside(rel, now)
                return  # the folders below it did not exist either

    def _next_seq(self) -> int:
        """The next failure sequence number (an int >= 1): increasing across restarts, crashes and clock steps.

        Numbers are reserved in blocks of SEQ_BLOCK by one durable write of .ingestd/failure-seq, so a failure
        costs no extra fsync but once per block; a crash skips the rest of its block (gaps, never a repeat).
        Without that file (a watch dir from before seqs, or state removed by hand) the block starts above the
        largest seq in failed/'s sidecars, read once. Raises OSError when the reservation cannot be written."""
        if self._seq >= self._seq_limit:
            start = max(self._seq, self._reserved_seq())
            # Durable before any number of the block is used: after a crash, numbers go on above the block.
            durable.publish_bytes(self.state, SEQ_FILE, json.dumps({"reserved_to": start + SEQ_BLOCK}).encode(),
                                  TEMP_OUTPUT_PREFIX + SEQ_FILE)
            self._seq, self._seq_limit = start, start + SEQ_BLOCK
        self._seq += 1
        return self._seq

    def _reserved_seq(self) -> int:
        try:
            return int(json.loads(durable.read_small(os.path.join(self.state, SEQ_FILE)))["reserved_to"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # missing or unreadable: the sidecars themselves say how far seqs went
        return max((r["seq"] or 0 for r in self._read_sidecars(set(self._listing(self.failed)[0])).values()), default=0)

    def _set_aside(self, name: str, now: float) -> None:
        """Rename the older failed file to a name that is free (set_aside); its sidecar follows it."""
        aside = set_aside(self.failed, name, now)
        folder = os.path.dirname(name)  # recursive mode: failed/batch/a.txt is set aside in failed/batch/
        moved = [""]
        if os.path.isdir(os.path.join(self.failed, aside)):
            # A folder of failed files (recursive mode) set aside for a file of its name: each file's sidecar (at the
            # top, by relative path) follows it, or their reasons read "unknown (no sidecar)".
            moved = ["/" + rel for rel in self.files(os.path.join(self.failed, aside))]
        for rel in moved:
            sidecar = os.path.join(self.failed, REASON_PREFIX + key(name + rel) + ".json")
            if os.path.exists(sidecar):
                durable.rename(sidecar, os.path.join(self.failed, REASON_PREFIX + key(aside + rel) + ".json"))
        durable.fsync_dir(self.failed)  # the older file is safe under its new name before the newer arrives
        if folder:
            durable.fsync_dir(os.path.join(self.failed, folder))  # likewise its new name in its own folder
        # Said, as processed/'s result_superseded is: a requeue of the earlier one now goes by its new name.
        event("failure_set_aside", "an earlier failure of this name was set aside", logging.INFO,
              file=display(name), kept_as=display(aside), files=len(moved) if moved != [""] else None)

    def requeue(self, names: list[str] | None = None) -> tuple[list[str], list[str]]:
        """Move failed files back to unprocessed/ (never over a waiting file). Returns (moved, refused)."""
        moved, refused = [], []
        for name in self.files(self.failed, sidecar_dirs=True) if names is None else names:
            try:
                if "/" in name:  # a file from a folder (recursive mode) goes back to that folder
                    durable.makedirs(self.unprocessed, os.path.dirname(name))
                durable.rename_noreplace(os.path.join(self.failed, name), os.path.join(self.unprocessed, name))
            except OSError:
                refused.append(name)
                continue
            durable.unlink_quiet(os.path.join(self.failed, REASON_PREFIX + key(name) + ".json"))
            moved.append(name)
        if moved:
            folders = sorted({os.path.dirname(n) for n in moved})
            for rel in folders:
                durable.fsync_dir(os.path.join(self.unprocessed, rel))  # requeued durable before the sidecars go
            durable.fsync_dir(self.failed)
            self._sync_folders(self.failed, [rel for rel in folders if rel])  # and gone from failed/ for good
            for rel in folders:
                if rel:
                    self._prune_up(self.failed, rel + "/-")
        for name in moved:
            self._restore_marker(name)  # done_marker: without NAME.done a requeued file is never claimed
        return moved, refused

    # --- attempt counts (survive restarts) ---------------------------------------------------
    def _attempts_path(self, name: str) -> str:
        return os.path.join(self.state, ATTEMPTS + key(name))

    def attempts(self, name: str) -> int:
        """Crashes this very file (same inode) was in progress for; 0 if none. Counts that could not be written
        (full disk) are remembered by this process and count too."""
        try:
            ino = os.lstat(os.path.join(self.underprocess, name)).st_ino
        except OSError:
            return 0
        kept = self._unrecorded.get(name)
        in_memory = kept[1] if kept is not None and kept[0] == ino else 0
        try:
            data = json.loads(durable.read_small(self._attempts_path(name)))
        except (OSError, ValueError):
            return in_memory
        on_disk = int(data.get("attempts", 0)) if data.get("ino") == ino else 0
        return max(on_disk, in_memory)

    def bump_attempts(self, name: str) -> int:
        """Count one more crash (or start-up recovery) for a file in underprocess/; returns the new count.

        Never raises for the disk: when the count cannot be made durable (ENOSPC, EIO, EROFS, a vanished
        .ingestd/), it is kept in this process's memory and logged (io_error), so the daemon neither exits nor
        forgets the worker deaths of this run; only a restart on that same full disk can forget it, which
        at worst redoes a poison file once more per restart. A file gone meanwhile counts 1 (nothing to keep).
        """
        n = self.attempts(name) + 1
        try:
            ino = os.lstat(os.path.join(self.underprocess, name)).st_ino
        except FileNotFoundError:
            return n
        try:
            # Durable before the redo starts: a crash during the redo must still count.
            durable.publish_bytes(self.state, ATTEMPTS + key(name), json.dumps({"ino": ino, "attempts": n}).encode(),
                                  TEMP_OUTPUT_PREFIX + key(name))
        except OSError as e:
            if errors.classify(e, Phase.RECORD_ATTEMPT) is errors.Verdict.RECREATE:
                try:
                    os.makedirs(self.state, exist_ok=True)  # .ingestd/ removed under us: make it, write again
                    durable.publish_bytes(self.state, ATTEMPTS + key(name),
                                          json.dumps({"ino": ino, "attempts": n}).encode(), TEMP_OUTPUT_PREFIX + key(name))
                    self._unrecorded.pop(name, None)
                    return n
                except OSError as again:
                    e = again
            self._unrecorded[name] = (ino, n)
            event("io_error", "could not record an attempt on disk; counted in memory", logging.ERROR,
                  file=display(name), attempts=n, reason=errors.reason(e))
            return n
        self._unrecorded.pop(name, None)
        return n

    def clear_attempts(self, name: str) -> None:
        self._unrecorded.pop(name, None)
        k = key(name)
        if self._stale:
            self._stale.discard(k)
        durable.unlink_quiet(os.path.join(self.state, ATTEMPTS + k))

    # --- looking -----------------------------------------------------------------------------
    @staticmethod
    def entries(folder: str) -> list[str]:
        """User entries of a folder: everything but dot-names (ours, and producers' temps)."""
        with os.scandir(folder) as it:
            return [e.name for e in it if not e.name.startswith(".")]

    @staticmethod
    def split(folder: str) -> tuple[list[str], list[str]]:
        """User entries of a folder as (non-folders, folders). A symlink to a folder is a non-folder (never
        followed); an entry that vanishes while we look is left out."""
        names: list[str] = []
        dirs: list[str] = []
        with os.scandir(folder) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                try:
                    (dirs if e.is_dir(follow_symlinks=False) else names).append(e.name)
                except OSError:
                    continue
        return names, dirs

    def files(self, folder: str, dirs: bool = False, sidecar_dirs: bool = False,
              enter: Callable[[str], bool] | None = None, root: str = "") -> Any:
        """Every user entry that is not a folder, at any depth, as relative paths ("a.txt", "batch/deep/b.txt"),
        in the order met. Hidden names and folders are skipped, symlinks never followed, a folder gone meanwhile is
        skipped, and so is a subfolder that cannot be listed (ENAMETOOLONG past PATH_MAX, EACCES). enter(rel) is called before a subfolder is listed (False: skip it; the watch adds itself there, so
        a file made during the listing is seen either way). sidecar_dirs (failed/): a folder with a sidecar of its
        own was set aside whole (older versions failed folders) and is an entry itself. With dirs=True returns
        (files, subfolders), subfolders parents first. root: start in that subfolder (its paths still relative to
        folder; it is entered, and listed among the subfolders)."""
        found: list[str] = []
        subdirs: list[str] = []
        stack = [root]
        while stack:
            rel = stack.pop()
            if rel and enter is not None and not enter(rel):
                continue
            try:
                names, subs = self.split(os.path.join(folder, rel) if rel else folder)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError:
                if not rel:
                    raise  # the queue folder itself: the caller's error (EACCES on unprocessed/...)
                # A subfolder that cannot be listed (deeper than PATH_MAX: ENAMETOOLONG; EACCES, ELOOP): its files
                # cannot be claimed either; skipping it keeps the rest of the listing (it stopped every rescan).
                continue
            found += [f"{rel}/{n}" if rel else n for n in names]
            for d in subs:
                sub = f"{rel}/{d}" if rel else d
                if sidecar_dirs and os.path.lexists(os.path.join(self.failed, REASON_PREFIX + key(sub) + ".json")):
                    found.append(sub)
                    continue
                subdirs.append(sub)
                stack.append(sub)
        return (found, subdirs) if dirs else found

    def prune(self, root: str, folders: list[str], quiet: float = 0.0, now: float | None = None,
              expect: dict[str, tuple[int, int]] | None = None) -> list[str]:
        """Remove the empty ones of `folders` (relative to root), deepest first; returns those removed. With
        quiet > 0 a folder must also be unchanged (mtime and ctime) for `quiet` seconds of wall time by `now`, so
        a producer between its mkdir and its first file (cp -r) keeps it, and, where `expect` gives a folder's
        inode.folder_id(), still be that folder (not another made under its name since). rmdir(2) itself refuses a
        folder that is not empty (a file arriving meanwhile), so nothing is ever lost here. Hidden folders are
        never touched."""
        removed = []
        for rel in sorted(folders, key=lambda r: r.count("/"), reverse=True):
            if not rel or any(p.startswith(".") for p in rel.split("/")):
                continue
            path = os.path.join(root, rel)
            if quiet > 0:
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if not stat.S_ISDIR(st.st_mode) or (now or 0) - max(st.st_mtime, st.st_ctime) < quiet:
                    continue
                if expect and rel in expect and folder_id(path) != expect[rel]:
                    continue
            if root == self.unprocessed and os.path.isdir(os.path.join(self.underprocess, rel)):
                # Claims from this folder are durable before their old folder's removal can be.
                durable.fsync_dir(os.path.join(self.underprocess, rel))
            if durable.rmdir_quiet(path):
                removed.append(rel)
        return removed

    def _prune_up(self, root: str, name: str) -> None:
        """After `name` left root (a mirrored folder of underprocess/ or failed/): remove its folders that are now
        empty, innermost first. Not fsynced: an empty folder coming back after a crash is removed at recovery."""
        rel = os.path.dirname(name)
        while rel and durable.rmdir_quiet(os.path.join(root, rel)):
            rel = os.path.dirname(rel)

    def probe(self, writable: tuple[str, ...] = ()) -> None:
        """Check that the four folders can be listed, and the folders named in `writable` (of FOLDERS) changed,
        by whoever runs this (access(2) for writing). Raises NotAWatchDir if a folder is missing or not a
        directory, FolderError naming the folder that denies it (the watch dir itself, or a parent, when it is
        that one) and the errno otherwise."""
        for f in FOLDERS:
            path = getattr(self, f)
            try:
                with os.scandir(path):
                    pass
            except (FileNotFoundError, NotADirectoryError):
                if not os.path.lexists(self.root):  # a typo in the path, most likely: never made here (only by run)
                    raise NotAWatchDir(f"watch_dir: {self.root} does not exist") from None
                raise NotAWatchDir(f"watch_dir: {self.root} is not an ingestd watch dir "
                                   f"(no folder {path}; it needs {'/'.join(FOLDERS)})") from None
            except OSError as e:
                raise FolderError(_blocking(path), e) from None
            needs = os.R_OK | os.X_OK | (os.W_OK if f in writable else 0)
            if not os.access(path, needs):
                raise FolderError(path, PermissionError(errno.EACCES, os.strerror(errno.EACCES)),
                                  "write to" if f in writable and os.access(path, os.R_OK | os.X_OK) else "read")

    def counts(self, recursive: bool = False, outputs: Iterable[str] = ()) -> dict[str, int]:
        """Entries per folder; processed/ counts files only (its subfolders are routing outputs). recursive: the
        results of files from folders (processed/batch/a.txt) count too, at any depth, except inside the routing
        output folders named in `outputs` (paths under processed/, e.g. "errors"): those are still not counted."""
        # Each folder listed once; mirrored folders (recursive mode) hold files: count those, not the folders.
        kept = self.kept(recursive, outputs)
        return {"unprocessed": _count(self.unprocessed, False), "underprocess": len(self.files(self.underprocess)),
                "processed": kept["processed"], "failed": kept["failed"]}

    def kept(self, recursive: bool = False, outputs: Iterable[str] = ()) -> dict[str, int]:
        """The results the queue keeps, {"processed": n, "failed": n}, counted as counts() does; what each rescan
        re-seeds the daemon's folder counts from. processed/ grows until consumers empty it, and listing it each
        rescan made the idle daemon's one regular wake-up cost ~150 ms with 10,000 results on this VM: it is
        listed again only when its entries may have changed, i.e. when its (inode, mtime, ctime) differ from the
        last listing's, or its ctime is too close to that listing to rule out a change within the same clock tick
        (git's "racily clean" rule). Recursive mode lists every time: a subfolder's entries do not touch it."""
        return {"processed": self._processed_count(recursive, outputs),
                "failed": len(self.files(self.failed, sidecar_dirs=True))}

    def _processed_count(self, recursive: bool, outputs: Iterable[str]) -> int:
        if recursive:
            routed = set(outputs)
            return len(self.files(self.processed, enter=lambda rel: rel not in routed))
        try:
            st = os.stat(self.processed)
        except FileNotFoundError:
            return 0
        listed = time.time_ns()
        sig = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)  # ctime too: utime(2) can set mtime back, never ctime
        cached = self._processed_seen
        if cached is not None and cached[0] == sig and st.st_ctime_ns < cached[1] - RACY_NS:
            return cached[2]
        n = _count(self.processed, True)
        self._processed_seen = (sig, listed, n)
        return n

    def failures(self, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` failures, newest first: the sidecar records written by fail() (name, reason, line,
        attempts, failed_at: ISO 8601 in UTC, failed_at_unix: seconds, size: bytes, seq).

        Ordered by `seq`, the order the daemon recorded them, never by a clock: failures recorded while the wall
        clock was fast cannot hide later ones. Sidecars from before seqs existed (no `seq`) rank below the rest,
        by failed_at_unix. Files in failed/ without a sidecar (put there by hand) follow with reason
        "unknown (no sidecar)" and null fields. An entry that vanishes while we look (requeued, superseded) is
        skipped; a sidecar we may not read shows why. Raises OSError only when failed/ itself cannot be listed.
        Each sidecar is read once per Spool and kept while its (inode, mtime, ctime, size) stay: the daemon's
        /api/status lists and stats failed/ but reads only new sidecars; a one-shot `status` reads each once."""
        sidecars, names = self._listing(self.failed)
        present = {REASON_PREFIX + key(n) + ".json": n for n in names}
        read = self._read_sidecars({sc: sidecars[sc] for sc in present if sc in sidecars})
        # The name is the file's as it is now in failed/ (a superseded file's sidecar still names the original).
        records = heapq.nlargest(limit, ({**rec, "name": display(present[sc])} for sc, rec in read.items()), key=_order)
        orphans = sorted(display(n) for sc, n in present.items()
                         if sc not in sidecars and os.path.lexists(os.path.join(self.failed, n)))  # still there?
        records += [{"name": n, "reason": NO_SIDECAR, "line": None, "attempts": None, "failed_at": None,
                     "failed_at_unix": None, "size": None, "seq": None} for n in orphans[: max(0, limit - len(records))]]
        return records[:limit]

    def _listing(self, folder: str) -> tuple[dict[str, tuple[int, int, int, int]], list[str]]:
        """Sidecars of a folder with their stamps (inode, mtime_ns, ctime_ns, size), and its user entries."""
        sidecars = {}
        with os.scandir(folder) as it:
            for e in it:
                if e.name.startswith(REASON_PREFIX):
                    try:
                        st = e.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # requeued or superseded between the listing and the stat
                    sidecars[e.name] = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
        # Files in folders (recursive mode: failed/batch/a.txt) have their sidecar at the top, by relative path.
        return sidecars, self.files(folder, sidecar_dirs=folder == self.failed)

    def _read_sidecars(self, wanted: dict[str, tuple[int, int, int, int]] | set[str]) -> dict[str, dict[str, Any]]:
        """Sidecar name -> a copy of its record with every field of fail()'s (missing ones None). Given stamps,
        records are cached; given a set, read afresh. Vanished or unparsable sidecars are left out."""
        old = self._sidecars if isinstance(wanted, dict) else {}
        new: dict[str, tuple[tuple[int, int, int, int], dict[str, Any]]] = {}
        out = {}
        for sc in wanted:
            stamp = wanted[sc] if isinstance(wanted, dict) else (0, 0, 0, 0)
            hit = old.get(sc)
            if hit is not None and hit[0] == stamp:
                rec = hit[1]
            else:
                try:
                    rec = json.loads(durable.read_small(os.path.join(self.failed, sc)))
                except FileNotFoundError:
                    continue  # requeued or superseded while we looked
                except PermissionError as e:
                    rec = {"reason": f"sidecar unreadable: {oserror(e)}"}
                except (OSError, ValueError):
                    continue  # torn or foreign: not a record of ours
                if not isinstance(rec, dict):
                    continue
            new[sc] = (stamp, rec)
            out[sc] = {"name": None, "reason": None, "line": None, "attempts": None, "failed_at": None,
                       "failed_at_unix": None, "size": None, **rec, "seq": _seq_of(rec)}
        if isinstance(wanted, dict):
            self._sidecars = new  # one assignment: readers see the old cache or the new one
        return out

    def completions(self, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` results in processed/, newest first, in the shape of the daemon's `recent` entries:
        {file, result: "processed", duration: None, finished_at: seconds since the epoch, reason: None, seq: None,
        recovered: False}.

        For `status` without a daemon. Files carry no sequence, so the order is their modification time, the
        kernel's wall clock at publish: after a clock step back, results published before the step can show as
        newer (the daemon's /api/status `recent` is ordered by its own sequence instead). Results that vanish
        while we look (taken by a consumer) are skipped."""
        entries = []
        with os.scandir(self.processed) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                try:
                    if not e.is_file(follow_symlinks=False):
                        continue  # routing output folders, symlinks
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # moved out by a consumer between the listing and the stat
                entries.append((st.st_mtime_ns, e.name, st.st_mtime))
        return [{"file": display(n), "result": "processed", "duration": None, "finished_at": t, "reason": None,
                 "seq": None, "recovered": False} for _, n, t in heapq.nlargest(limit, entries)]


def set_aside(folder: str, name: str, now: float, link: bool = False) -> str:
    """Give the entry `name` of `folder` a free name NAME.superseded-<unix time>, then -2, -3... within the same
    second (the same name may arrive many times a second), cut to stay within NAME_MAX; returns that name. Renamed,
    or with link=True given it as a second name (the entry keeps its own). Never EEXIST; not fsynced (the caller's
    fsync of `folder` makes it durable). Used for failed/ (Spool.fail) and processed/ (sinks.py, file_exist). A
    relative `name` ("batch/a.txt") gets its aside beside it ("batch/a.txt.superseded-..."), returned as such."""
    n = 1
    sub, _, base = name.rpartition("/")  # a relative path (recursive mode): the aside stays in its folder
    while True:
        suffix = f"{SUPERSEDED}{int(now)}{f'-{n}' if n > 1 else ''}".encode()
        aside = os.fsdecode(os.fsencode(base)[: 255 - len(suffix)] + suffix)  # stay within NAME_MAX
        aside = f"{sub}/{aside}" if sub else aside
        try:
            (durable.link if link else durable.rename_noreplace)(os.path.join(folder, name), os.path.join(folder, aside))
        except FileExistsError:
            n += 1  # taken (an earlier one this second, or a user's file): the next number
            continue
        return aside


def _renumbered(held: lease.Lease, st: os.stat_result) -> bool:
    """Is st (the claimed name) the leased file under another inode number? A FUSE file system on libfuse's
    high-level API (sshfs) numbers inodes per path, and the claim's link + unlink fallback (no RENAME_NOREPLACE
    there) gives the new name a new number. Then the leased file, unchanged since it was leased (its own
    descriptor says so), and the claimed name must agree on size and mtime (nanoseconds where the file system
    keeps them): a replacement in the instant between the lease and the rename that also matches both is a file
    identical in all the daemon reads before the content."""
    now = os.fstat(held.fd)
    return (now.st_size, now.st_mtime_ns) == (held.size, held.mtime_ns) == (st.st_size, st.st_mtime_ns)


def _seq_of(record: dict[str, Any]) -> int | None:
    seq = record.get("seq")
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


def _order(record: dict[str, Any]) -> tuple[int, float]:
    """Newest first by seq; records without one (older versions) below all others, by their time."""
    seq = record["seq"]
    if seq is not None:
        return (1, seq)
    t = record.get("failed_at_unix")
    return (0, t if isinstance(t, (int, float)) else 0)


def _blocking(path: str) -> str:
    """The first folder on the way to `path` that whoever runs this may not search, else `path` itself."""
    p = os.path.abspath(path)
    parents = []
    while True:
        parent = os.path.dirname(p)
        if parent == p:
            break
        parents.append(parent)
        p = parent
    for d in reversed(parents):
        if not os.access(d, os.X_OK):
            return d
    return path


def _count(folder: str, skip_dirs: bool) -> int:
    """Entries of a folder; one that vanishes while we look is not counted (is_dir() ignores
    ENOENT); a folder that is gone (rm -rf failed/) holds 0, until ensure() makes it again."""
    try:
        with os.scandir(folder) as it:
            return sum(1 for e in it if not e.name.startswith(".") and not (skip_dirs and e.is_dir(follow_symlinks=False)))
    except FileNotFoundError:
        return 0
