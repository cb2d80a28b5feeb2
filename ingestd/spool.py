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
import os
import socket
import stat
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ingestd import durable, lease
from ingestd.names import STATE_DIR, TEMP_PREFIX, display, key

FOLDERS = ("unprocessed", "underprocess", "processed", "failed")
REASON_PREFIX = TEMP_PREFIX + "reason-"
TEMP_OUTPUT_PREFIX = TEMP_PREFIX + "tmp-"


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


@dataclass(frozen=True, slots=True)
class Failure:
    reason: str
    line: int | None = None
    attempts: int = 1


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.unprocessed = str(self.root / "unprocessed")
        self.underprocess = str(self.root / "underprocess")
        self.processed = str(self.root / "processed")
        self.failed = str(self.root / "failed")
        self.state = str(self.root / STATE_DIR)
        self._lock_fd: int | None = None

    # --- start-up -------------------------------------------------------------------------
    def ensure(self) -> None:
        """Create missing folders; refuse folders on different filesystems (renames would fail with EXDEV)."""
        devs: dict[int, str] = {}
        for path in (self.unprocessed, self.underprocess, self.processed, self.failed, self.state):
            try:
                os.makedirs(path, exist_ok=True)
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

    def lock(self, wait: bool = False) -> None:
        """One daemon per watch dir: an flock held for the process's life, released by the kernel on death."""
        path = os.path.join(self.state, "lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise AlreadyRunning(f"watch_dir: another ingestd is running on {self.root} ({holder})") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        except OSError:
            # Only a label for `status`; the flock is the lock. A full disk (ENOSPC) must not stop a start,
            # or a restart on a full disk could never pause and resume by itself (tests/torture/test_errors.py).
            pass
        self._lock_fd = fd

    def holder(self) -> str | None:
        """Who holds the daemon lock ("pid N on HOST"), or None when no daemon runs here."""
        path = os.path.join(self.state, "lock")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "unknown"
        finally:
            os.close(fd)
        return None

    def recover(self, max_attempts: int, now: float) -> tuple[list[str], list[str]]:
        """After a crash: drop stale temp outputs, return in-flight files to the queue, quarantine poison files.

        Files stay in underprocess/ and are processed first (no rename back, so nothing can be
        overwritten); each recovery counts as an attempt. Returns (requeued, quarantined).
        """
        for folder, _, files in os.walk(self.processed):
            for f in files:
                if f.startswith(TEMP_OUTPUT_PREFIX):
                    durable.unlink_quiet(os.path.join(folder, f))  # never published: a redo rewrites it
        for f in os.listdir(self.failed):
            if f.startswith(TEMP_OUTPUT_PREFIX):
                durable.unlink_quiet(os.path.join(self.failed, f))
        self._drop_claim_ghosts()
        requeued, quarantined = [], []
        for name in sorted(self.entries(self.underprocess)):
            attempts = self.bump_attempts(name)
            if attempts >= max_attempts:
                reason = f"poison: in progress during {attempts} crashes or restarts in a row"
                self.fail(name, Failure(reason, attempts=attempts), now)
                quarantined.append(name)
            else:
                requeued.append(name)
        return requeued, quarantined

    def _drop_claim_ghosts(self) -> None:
        """A claim is one rename, never fsynced in unprocessed/: after a power cut its old name can be back
        while the file (same inode) is also in underprocess/ or failed/. Processing that name again would
        finish the file twice (a failure would even be kept twice), so the stale name goes.
        Found by tests/torture/test_power_loss.py (restart on a disk cut mid-run)."""
        taken = {}
        for folder in (self.underprocess, self.failed):
            for name in self.entries(folder):
                try:
                    st = os.lstat(os.path.join(folder, name))
                except FileNotFoundError:
                    continue
                taken[name] = (st.st_dev, st.st_ino)
        for name in self.entries(self.unprocessed):
            try:
                st = os.lstat(os.path.join(self.unprocessed, name))
            except FileNotFoundError:
                continue
            if taken.get(name) == (st.st_dev, st.st_ino):
                # No fsync: if this unlink is lost too, the next start drops the ghost again.
                durable.unlink_quiet(os.path.join(self.unprocessed, name))

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
                # No fsync: a claim lost in a power cut leaves the file in unprocessed/, where it is redone.
                durable.rename_noreplace(src, dst)
                if v is lease.Verdict.FREE:
                    return self._confirm(held, src, dst)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.EEXIST):
                return Claim.GONE
            raise
        return Claim.CLAIMED

    def _confirm(self, held: lease.Lease, src: str, dst: str) -> Claim:
        """Still under the lease: the name moved must be the file leased, and no writer may have knocked."""
        st = os.lstat(dst)
        if (st.st_dev, st.st_ino) != (held.dev, held.ino):
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
        """Give an abandoned (not crashed) file back to the queue; never over a newer file of that name."""
        try:
            durable.rename_noreplace(os.path.join(self.underprocess, name), os.path.join(self.unprocessed, name))
        except OSError:
            return False  # a newer file of that name waits: recovery takes this one at the next start
        return True

    def remove_marker(self, marker: str) -> None:
        """A done-marker has served once its file is claimed. Not fsynced: if a crash brings it back, it can only
        vouch for a later file of the same name, which the producer would mark again anyway."""
        durable.unlink_quiet(os.path.join(self.unprocessed, marker))

    def commit(self, name: str) -> None:
        """Outputs are durable: now the input may go. This unlink is the commit point (see sync_commits)."""
        try:
            durable.unlink(os.path.join(self.underprocess, name))
        except FileNotFoundError:
            pass  # its owner deleted it meanwhile; the outputs stand
        self.clear_attempts(name)

    def sync_commits(self) -> None:
        """Make the commits (unlinks) so far durable; batched once per main-loop turn, as a lost commit is
        harmless: the file is redone, and the redo publishes identical bytes."""
        durable.fsync_dir(self.underprocess)

    def fail(self, name: str, failure: Failure, now: float, source: str | None = None) -> None:
        """Quarantine a file with a readable reason. An older failed file of the same name is kept,
        renamed NAME.superseded-<unix time> (failed inputs are user data: never overwritten)."""
        src = os.path.join(source or self.underprocess, name)
        try:
            size = os.lstat(src).st_size
        except FileNotFoundError:
            return  # gone (deleted by its owner): nothing to quarantine
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
        }
        # The reason is durable before the file moves, so a failed file always has its sidecar.
        durable.publish_bytes(self.failed, REASON_PREFIX + key(name) + ".json",
                              json.dumps(record, indent=1).encode() + b"\n", TEMP_OUTPUT_PREFIX + key(name))
        durable.rename(src, os.path.join(self.failed, name))
        durable.fsync_dir(self.failed)  # the file is in failed/ for good before it leaves its source
        durable.fsync_dir(os.path.dirname(src))
        self.clear_attempts(name)

    def _set_aside(self, name: str, now: float) -> None:
        suffix = f".superseded-{int(now)}".encode()
        raw = os.fsencode(name)[: 255 - len(suffix)]  # stay within NAME_MAX
        aside = os.fsdecode(raw + suffix)
        durable.rename_noreplace(os.path.join(self.failed, name), os.path.join(self.failed, aside))
        sidecar = os.path.join(self.failed, REASON_PREFIX + key(name) + ".json")
        if os.path.exists(sidecar):
            durable.rename(sidecar, os.path.join(self.failed, REASON_PREFIX + key(aside) + ".json"))
        durable.fsync_dir(self.failed)  # the older file is safe under its new name before the newer arrives

    def requeue(self, names: list[str] | None = None) -> tuple[list[str], list[str]]:
        """Move failed files back to unprocessed/ (never over a waiting file). Returns (moved, refused)."""
        moved, refused = [], []
        for name in self.entries(self.failed) if names is None else names:
            try:
                durable.rename_noreplace(os.path.join(self.failed, name), os.path.join(self.unprocessed, name))
            except OSError:
                refused.append(name)
                continue
            durable.unlink_quiet(os.path.join(self.failed, REASON_PREFIX + key(name) + ".json"))
            moved.append(name)
        if moved:
            durable.fsync_dir(self.unprocessed)  # requeued files durable in the queue before the sidecars go
            durable.fsync_dir(self.failed)
        return moved, refused

    # --- attempt counts (survive restarts) ---------------------------------------------------
    def _attempts_path(self, name: str) -> str:
        return os.path.join(self.state, "attempts-" + key(name))

    def attempts(self, name: str) -> int:
        """Crashes this very file (same inode) was in progress for; 0 if none."""
        try:
            with open(self._attempts_path(name), "rb") as f:
                data = json.load(f)
            ino = os.lstat(os.path.join(self.underprocess, name)).st_ino
        except (OSError, ValueError):
            return 0
        return int(data.get("attempts", 0)) if data.get("ino") == ino else 0

    def bump_attempts(self, name: str) -> int:
        n = self.attempts(name) + 1
        ino = os.lstat(os.path.join(self.underprocess, name)).st_ino
        # Durable before the redo starts: a crash during the redo must still count.
        durable.publish_bytes(self.state, "attempts-" + key(name), json.dumps({"ino": ino, "attempts": n}).encode(),
                              TEMP_OUTPUT_PREFIX + key(name))
        return n

    def clear_attempts(self, name: str) -> None:
        durable.unlink_quiet(self._attempts_path(name))

    # --- looking -----------------------------------------------------------------------------
    @staticmethod
    def entries(folder: str) -> list[str]:
        """User entries of a folder: everything but dot-names (ours, and producers' temps)."""
        with os.scandir(folder) as it:
            return [e.name for e in it if not e.name.startswith(".")]

    def counts(self) -> dict[str, int]:
        """Entries per folder; processed/ counts files only (its subfolders are routing outputs)."""
        return {f: _count(getattr(self, f), f == "processed") for f in FOLDERS}

    def failures(self, limit: int) -> list[dict[str, Any]]:
        """The most recent failures with their reasons, newest first. Only the newest `limit` sidecars
        are read (by mtime: when the failure was recorded), so status stays fast with many failed files."""
        sidecars, names = [], []
        with os.scandir(self.failed) as it:
            for e in it:
                if e.name.startswith(REASON_PREFIX):
                    sidecars.append((e.stat(follow_symlinks=False).st_mtime, e.name))
                elif not e.name.startswith("."):
                    names.append(e.name)
        sidecar_of = {REASON_PREFIX + key(n) + ".json": n for n in names}
        records = []
        for _, sidecar in heapq.nlargest(limit, (sc for sc in sidecars if sc[1] in sidecar_of)):
            try:
                with open(os.path.join(self.failed, sidecar), "rb") as f:
                    records.append(json.load(f))
            except (OSError, ValueError):
                continue  # requeued or superseded while we looked
        have = {sc for _, sc in sidecars}
        records.sort(key=lambda r: r.get("failed_at_unix", 0), reverse=True)
        records += [{"name": display(n), "reason": "unknown (no sidecar)", "failed_at_unix": 0}
                    for sc, n in sidecar_of.items() if sc not in have][: max(0, limit - len(records))]
        return records[:limit]

    def completions(self, limit: int) -> list[dict[str, Any]]:
        """The newest results in processed/ (by publish time), for `status` when no daemon runs."""
        entries = []
        with os.scandir(self.processed) as it:
            for e in it:
                if not e.name.startswith(".") and e.is_file(follow_symlinks=False):
                    entries.append((e.stat(follow_symlinks=False).st_mtime, e.name))
        entries.sort(reverse=True)
        return [{"name": display(n), "finished_at_unix": t} for t, n in entries[:limit]]


def _count(folder: str, skip_dirs: bool) -> int:
    with os.scandir(folder) as it:
        return sum(1 for e in it if not e.name.startswith(".") and not (skip_dirs and e.is_dir(follow_symlinks=False)))
