"""The claim protocol on a worker node (DISTRIBUTED.md §3, steps 5-9): lease, count, process in a child, publish,
commit, ack. Every actor thread supervises its own child process, so a file that crashes one costs that file an
attempt, never the node.

At-least-once with idempotent redos: until the commit (the unlink of underprocess/NAME) the input is in a folder
and the scanner re-drives it; results appear only by renaming durable temps; a redo of the same input recognises
its own earlier result (the claim identity on each result, sinks.py) and replaces it, so it is never doubled.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import dramatiq

from ingestd import durable, errors
from ingestd.distributed import CLUSTER_ID, child, crash_point, queue
from ingestd.distributed.ledger import Ledger
from ingestd.errors import Phase
from ingestd.log import event
from ingestd.messages import Rejected, Retry
from ingestd.names import display
from ingestd.pipeline import Stats
from ingestd.settings import Settings
from ingestd.sinks import CLAIM_ATTR, Sinks
from ingestd.spool import Failure, Spool
from ingestd.worker import _failure

RETRY_DELAY_MS = 5000  # the machine's fault (full disk, EIO): look again this much later
DIED_DELAY_MS = 500  # a child died on the file: the redo (counted) comes soon


class ChildLost(Exception):
    """The child ended without an answer: `why` is died | lease_lost | time_limit."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class Child:
    """One child process (child.main) for one actor thread, started on first use and again after a death."""

    _ctx = multiprocessing.get_context("spawn")  # the node has threads: fork would copy their locks mid-use

    def __init__(self, args: tuple[Any, ...], stopping: threading.Event) -> None:
        self.args, self.stopping = args, stopping
        self.proc: Any = None
        self.conn: Any = None
        self.lock = threading.Lock()  # kill() comes from its actor thread and from the node's stop at once

    def _start(self) -> None:
        parent, kid = self._ctx.Pipe()
        self.proc = self._ctx.Process(target=child.main, args=(kid, *self.args), name="ingestd-child", daemon=True)
        self.proc.start()
        kid.close()
        self.conn = parent

    def run(self, job: tuple[str, str, str, bytes], lost: threading.Event, time_limit: float) -> tuple[str, Any]:
        """Hand the child one file; its answer. Raises ChildLost when it dies, the lease is lost (it is killed:
        nobody may write a claim another node now owns), time_limit (seconds, 0: none) runs out, or the node stops
        (`stopping`: a warm stop past stop_timeout gives the file back, never its fault)."""
        if self.proc is None or not self.proc.is_alive():
            self._start()
        started = time.monotonic()
        try:
            self.conn.send(job)
            while not self.conn.poll(0.2):
                if lost.is_set():
                    raise ChildLost("lease_lost")
                if time_limit and time.monotonic() - started > time_limit:
                    raise ChildLost("time_limit")
                if self.stopping.is_set():
                    raise ChildLost("stopping")
                if not self.proc.is_alive():
                    raise ChildLost("stopping" if self.stopping.is_set() else "died")
            return self.conn.recv()  # type: ignore[no-any-return]
        except (EOFError, OSError, AttributeError):  # AttributeError: the stop's kill() took the pipe meanwhile
            self.kill()
            raise ChildLost("stopping" if self.stopping.is_set() else "died") from None
        except ChildLost:
            self.kill()
            raise

    def kill(self) -> None:
        with self.lock:
            proc, conn, self.proc, self.conn = self.proc, self.conn, None, None
        if proc is not None:
            proc.kill()
            proc.join(5)
            conn.close()


class Leases:
    """Renews every lease this node holds, every third of lease_time, in one thread. A lease not renewed in time
    (taken over, or Redis unreachable for a lease time) sets its `lost` event: its child is killed."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.held: dict[str, tuple[str, threading.Event, float]] = {}  # claim -> (token, lost, last renewed)
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def hold(self, cid: str, token: str) -> threading.Event:
        lost = threading.Event()
        with self.lock:
            self.held[cid] = (token, lost, time.monotonic())
        return lost

    def drop(self, cid: str) -> None:
        with self.lock:
            self.held.pop(cid, None)

    def run(self) -> None:
        while not self.stop.wait(self.ledger.lease_time / 3):
            with self.lock:
                held = list(self.held.items())
            for cid, (token, lost, renewed) in held:
                try:
                    ok = self.ledger.renew(cid, token)
                except Exception:  # noqa: BLE001 - Redis away: the lease runs on until lease_time is over
                    ok = time.monotonic() - renewed < self.ledger.lease_time
                    if ok:
                        continue
                if not ok:
                    lost.set()
                    continue
                with self.lock:
                    if cid in self.held:
                        self.held[cid] = (token, lost, time.monotonic())


class Node:
    """What each actor thread runs for one message (claim id, name). Counters go to `count(result, **fields)`."""

    def __init__(self, settings: Settings, ledger: Ledger, spool: Spool, name: str,
                 count: Callable[..., None]) -> None:
        self.s, self.ledger, self.spool, self.name, self.count = settings, ledger, spool, name, count
        table = settings.routing
        self.folders = sorted({out.path for out in table.outputs})
        self.leases = Leases(ledger)
        self.actor: dramatiq.Actor | None = None
        self.current: dict[int, dict[str, Any]] = {}  # thread id -> {"file", "since"}: for status and heartbeats
        self.children: list[Child] = []
        self.stopping = threading.Event()
        self._local = threading.local()

    def _child(self) -> Child:
        c = getattr(self._local, "child", None)
        if c is None:
            c = self._local.child = Child((self.s.routing_doc, self.s.max_line_bytes, self.spool.processed,
                                           self.s.file_exist), self.stopping)
            self.children.append(c)
        return c

    def again(self, cid: str, name: str, delay_ms: int) -> None:
        """Send the claim again, later; the record notes the new message, which the re-drive then checks."""
        assert self.actor is not None
        self.ledger.requeued(cid, queue.send(self.actor, cid, name, delay_ms))

    def handle(self, cid: str, name: str) -> None:
        """The actor. Returns (and Dramatiq acks) once the claim is committed, failed, found done, or sent again."""
        delivery = uuid.uuid4().hex[:12]
        token = f"{self.name}:{os.getpid()}:{delivery}"
        if not self.ledger.take(cid, token):
            # Another live node holds it (a redelivery while it runs): look again after a lease time.
            self.again(cid, name, self.ledger.lease_ms)
            return
        lost = self.leases.hold(cid, token)
        me = threading.get_ident()
        self.current[me] = {"file": display(name), "since": time.time()}
        try:
            self._claimed(cid, name, token, lost, f"c{cid}.{delivery}")
        except Exception as e:  # noqa: BLE001 - the failure boundary: one claim's trouble never stops the node
            event("task_error", "unexpected error on a claim; it is sent again", logging.ERROR, file=display(name),
                  claim=cid, error=repr(e))
            self.again(cid, name, RETRY_DELAY_MS)
        finally:
            self.current.pop(me, None)
            self.leases.drop(cid)
            self.ledger.release(cid, token)

    def _claimed(self, cid: str, name: str, token: str, lost: threading.Event, tag: str) -> None:
        """tag names this delivery's temps: unique per delivery, never per attempt count, which a Redis that lost
        its data starts again at 1 while an earlier holder may still be writing (its temps must not be ours)."""
        path = os.path.join(self.spool.underprocess, name)
        # Is underprocess/NAME this claim's file? Redis says which claim the name is bound to (never this node's
        # inode numbers, which some shared file systems number per client: ledger.claim_id).
        if not os.path.lexists(path) or self.ledger.bound([name])[0] != cid:
            if not os.path.exists(os.path.join(self.spool.state, CLUSTER_ID)):
                # The shared folder itself is gone from here (unmounted): nothing may be acked as done elsewhere.
                raise RuntimeError("the shared folder is not there: is it still mounted?")
            # Committed or failed already (a redelivery, a duplicate send): only ack. Another file of that name
            # now has its own claim.
            self.ledger.finish(cid, "gone", name)
            return
        attempts = self.ledger.bump(cid)  # before the work: a node dying on it still counts
        if attempts > self.s.max_attempts:
            reason = (f"poison: delivered {attempts - 1} times without finishing (a node or its child died on it, "
                      "or it ran past time_limit)")
            self._fail(cid, name, Failure(reason, attempts=attempts - 1), token)
            return
        try:
            # Results carry the claim id: a redo of this claim on any node recognises them as its own (sinks.py).
            kind, payload = self._child().run((path, name, tag, cid.encode()), lost, self.s.time_limit)
        except ChildLost as e:
            if e.why in ("lease_lost", "stopping"):
                # Renewals stopped (Redis unreachable, this node stalled), or the node's warm stop ran out: the
                # machine's doing, never the file's (a child working on a file does not stop renewals), so not an
                # attempt toward poison.
                self.ledger.unbump(cid)
            event("child_lost", "a child ended without finishing its file; the file is sent again",
                  logging.WARNING, file=display(name), claim=cid, why=e.why, attempts=attempts)
            self.again(cid, name, DIED_DELAY_MS)
            return
        if kind == "outcome":
            self._outcome(cid, name, payload, token, attempts)
            return
        sealed, bytes_out, bytes_in, lines_in, seconds, claim = payload
        sinks = Sinks(self.spool.processed, name, self.folders, self.s.file_exist, claim, tag)
        sinks.adopt(sealed, bytes_out)
        # Step 7: only the lease holder publishes, and only for the very input it leased.
        if not self._still_ours(cid, token, path, lost):
            sinks.abort()
            self.again(cid, name, self.ledger.lease_ms)
            return
        try:
            for folder in sorted(set(sinks.publish())):
                durable.fsync_dir(folder)  # the renames durable before the input may go
        except Exception as e:  # noqa: BLE001 - publish is all or none; errors.classify decides
            sinks.abort()
            self._outcome(cid, name, _failure(e, Stats(bytes_in, lines_in), Phase.PUBLISH), token, attempts)
            return
        crash_point("publish-commit")
        # Step 8: re-confirm the lease, then the commit point.
        if not self._still_ours(cid, token, path, lost):
            self.again(cid, name, self.ledger.lease_ms)  # published (durably): the owner's redo replaces its own
            return
        try:
            self.spool.commit(name)  # unlink(underprocess/NAME): the commit point
        except OSError:
            if os.path.lexists(path):
                raise  # truly not removed: the failure boundary sends the claim again
            # An NFS client's retried REMOVE can report an error although the first one took effect: stat decides.
        durable.fsync_dir(os.path.dirname(path))  # the commit durable before the ack: a lost ack only redelivers
        # Said at once after the commit point, before any Redis bookkeeping, which a partition may refuse.
        self.count("processed", bytes_in=bytes_in, bytes_out=bytes_out, seconds=seconds)
        for sup in sinks.superseded:  # file_exist: said after the commit, as on a single machine (state.py)
            event("result_superseded", f"an earlier result of the same name was {sup.action}"
                  + (" aside" if sup.aside else ""), logging.WARNING if sup.action == "replaced" else logging.INFO,
                  file=display(name), output=sup.folder or "processed", action=sup.action,
                  kept_as=display(sup.aside) if sup.aside else None, node=self.name)
        event("processed", "file processed", file=display(name), claim=cid, node=self.name, bytes_in=bytes_in,
              lines_in=lines_in, bytes_out=bytes_out, duration=round(seconds, 6), attempts=attempts,
              superseded=len(sinks.superseded))
        try:
            self.ledger.finish(cid, "done", name)
        except Exception as e:  # noqa: BLE001 - committed: a delivery of it again finds the input gone and only acks
            event("broker_error", "a committed file's record could not be closed in Redis", logging.WARNING,
                  file=display(name), claim=cid, error=repr(e))
        crash_point("commit-ack")

    def _still_ours(self, cid: str, token: str, path: str, lost: threading.Event) -> bool:
        """The lease is still ours (so nobody else commits or fails this claim) and its file is still there."""
        return not lost.is_set() and self.ledger.renew(cid, token) and os.path.lexists(path)

    def _outcome(self, cid: str, name: str, outcome: Rejected | Retry, token: str, attempts: int) -> None:
        if isinstance(outcome, Rejected):
            self._fail(cid, name, Failure(outcome.reason, outcome.line, attempts), token)
            return
        self.ledger.unbump(cid)  # the machine's fault, not the file's: not an attempt
        event("io_error", "could not process a file for the machine's reasons; it is retried", logging.ERROR,
              file=display(name), claim=cid, reason=outcome.reason)
        self.again(cid, name, RETRY_DELAY_MS)

    def _fail(self, cid: str, name: str, failure: Failure, token: str) -> None:
        """Step 9: the sidecar, then the file into failed/ (Spool.fail); only while the lease is ours."""
        if not self.ledger.renew(cid, token):
            self.again(cid, name, self.ledger.lease_ms)
            return
        try:
            self._drop_own_results(name, cid)
            self.spool.fail(name, failure, time.time())
        except OSError as e:
            event("io_error", "could not move a failed file to failed/; it is retried", logging.ERROR,
                  file=display(name), reason=errors.reason(e))
            self.again(cid, name, RETRY_DELAY_MS)
            return
        self.ledger.finish(cid, "failed", name)
        self.count("failed")
        event("failed", "file failed", logging.WARNING, file=display(name), claim=cid, node=self.name,
              reason=failure.reason, line=failure.line, attempts=failure.attempts)

    def _drop_own_results(self, name: str, cid: str) -> None:
        """Results an earlier delivery of this claim published before its node died short of the commit (they carry
        the claim id, Sinks): a claim that ends in failed/ (poison, after that death) must leave none behind, or the
        file would be both a result and a failed/ entry. Raises OSError (the caller sends the claim again)."""
        for folder in self.folders:
            target = os.path.join(self.spool.processed, folder, name) if folder else os.path.join(
                self.spool.processed, name)
            try:
                mine = os.getxattr(target, CLAIM_ATTR, follow_symlinks=False) == cid.encode()
            except OSError:  # none there (ENOENT), untagged (ENODATA), no user xattrs here
                continue
            if mine:
                durable.unlink_quiet(target)
                durable.fsync_dir(os.path.dirname(target))  # gone for good before the input is set aside

    def close(self) -> None:
        self.stopping.set()  # actor threads give their files back (not an attempt) as their children go
        for c in self.children:
            c.kill()
        self.leases.stop.set()

