"""`ingestd run --broker ...`: the cluster's scanner (DISTRIBUTED.md §3, steps 1-4, 10, 11).

One scanner is active at a time: it holds a lock in Redis (redis-py's Lock: a key with a TTL of 2/3 of lease_time,
renewed every sixth of it); others wait as standbys and take over within a lease time of its loss. The lock only saves
work: two active scanners by accident are still safe, as a claim is a rename that refuses to overwrite, settled by
stat and inode (never by an NFS error code: a retried RENAME may report the wrong result).

The active scanner polls unprocessed/ (inotify does not see other machines' writes), claims each complete file into
underprocess/, enqueues its claim and records it. At activation and every rescan_interval it re-drives
underprocess/: every file with no live lease and no live message is sent again (a Redis restart, a crash between
claim and enqueue, a lost or dead-lettered message), and unpublished temps of claims nobody holds are removed.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Counter, ProcessCollector, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from redis.lock import Lock

from ingestd import __version__, durable
from ingestd.distributed import CLUSTER_ID, NotTheSharedFolder, crash_point, identify, queue
from ingestd.distributed.ledger import Ledger, claim_id
from ingestd.log import event
from ingestd.metrics import folder_series
from ingestd.names import DONE_SUFFIX, display, ignored
from ingestd.notify import Notifier
from ingestd.settings import ConfigError, Settings
from ingestd.spool import TEMP_OUTPUT_PREFIX, AlreadyRunning, Claim, Spool
from ingestd.web import Web, cannot_listen

REDRIVE_CHUNK = 500  # underprocess/ entries looked up in Redis per round trip
STATUS_DISK_EVERY = 1.0  # seconds: status() reads the folders at most this often (the page polls every second)...
STATUS_DISK_FACTOR = 10  # ...or this many times as long as the last reading took, whichever is longer
CLAIM_TEMP = TEMP_OUTPUT_PREFIX + "c"  # a node's temps: .ingestd-tmp-c<claim>.<delivery>-... (task.py)


class Scanner:
    def __init__(self, settings: Settings) -> None:
        assert settings.broker is not None
        if settings.recursive:
            raise ConfigError("recursive: a cluster claims the files at the top of unprocessed/ only; unset it for "
                              "`ingestd run --broker` (docs/distributed.md)")
        self.s = settings
        self.client, self.broker = queue.connect(settings.broker, settings.lease_time)
        self.ledger = Ledger(self.client, settings.lease_time)
        self.actor = queue.declare(self.broker, _never_here)
        self.spool = Spool(settings.watch_dir, settings.done_marker, tag=f"s{os.getpid()}-", seq=self.ledger.next_seq)
        # TTL 2/3 of lease_time, renewed (and tried by standbys) every 1/6: a standby takes over within 5/6 of
        # lease_time after the active scanner's last renewal, inside the lease time the docs promise.
        self.lock = Lock(self.client, self.ledger.k("scanner"), timeout=settings.lease_time * 2 / 3,
                         thread_local=False)
        self.active = False
        self.paused = False  # below min_free_bytes: no claims
        self.stop = threading.Event()
        self.started_at, self.watch_dir = time.time(), str(self.spool.root.resolve())
        self._status_lock, self._status_next = threading.Lock(), 0.0  # status(): its folder part, read at most
        self._status_cache: dict[str, Any] | None = None  # every STATUS_DISK_EVERY seconds
        self.seen: dict[str, tuple[tuple[int, int, int], float]] = {}  # name -> ((ino, size, mtime_ns), since)
        self.folders_told: set[str] = set()
        self.folders = sorted({out.path for out in settings.routing.outputs})
        self.claims = Counter("ingestd_cluster_claims", "Files claimed and enqueued by this scanner", registry=None)
        self.redriven = Counter("ingestd_cluster_redriven", "Claims in underprocess/ sent again (no live lease or "
                                "message)", registry=None)

    # --- leadership -----------------------------------------------------------------------------------------
    def _lead(self) -> None:
        """Take the scanner lock, or keep it; a standby waits. A renewal that fails ends claiming at once."""
        try:
            if self.active:
                self.lock.reacquire()  # TTL back to its full 2/3 of lease_time
                return
            if self.lock.acquire(blocking=False):
                self.active = True
                identify(self.spool.state, self.client, self.ledger.k(CLUSTER_ID))  # nodes check they see this folder
                event("scanner_active", "this scanner is active: claiming and enqueueing", token=self._token())
                self.spool.drop_claim_ghosts()  # names left twice by a link+unlink claim cut by a crash
                self._redrive()
                self.next_redrive = time.monotonic() + self.s.rescan_interval
            elif not getattr(self, "_told_standby", False):
                event("scanner_standby", "another scanner is active: this one waits as a standby")
                self._told_standby = True
        except NotTheSharedFolder:
            raise  # a configuration error: exit 78
        except Exception as e:  # noqa: BLE001 - LockError (lost), RedisError: stop claiming, try again later
            if self.active:
                event("scanner_lost_lock", "lost the scanner lock: claiming stops", logging.ERROR, error=repr(e))
            self.active = False
            self._told_standby = False

    def _token(self) -> str:
        t = self.lock.local.token
        return t.decode() if isinstance(t, bytes) else str(t)

    # --- polling and claiming -------------------------------------------------------------------------------
    def _space_low(self) -> bool:
        """Claiming pauses below min_free_bytes free on the shared folder (as on one machine); said once each way."""
        try:
            v = os.statvfs(self.spool.underprocess)
        except OSError:
            return False
        low = v.f_blocks > 0 and v.f_bavail * v.f_frsize < self.s.min_free_bytes  # f_blocks 0: no sizes (ramfs)
        if low != self.paused:
            event("paused" if low else "resumed", "claiming paused: the shared folder is below min_free_bytes free"
                  if low else "claiming resumed: free space is back", logging.WARNING if low else logging.INFO,
                  free_bytes=v.f_bavail * v.f_frsize, min_free_bytes=self.s.min_free_bytes)
            self.paused = low
        return low

    def poll(self) -> int:
        """One look at unprocessed/: claim each file that is complete. Returns the number claimed."""
        if self._space_low():
            return 0
        now = time.monotonic()
        try:
            entries = list(os.scandir(self.spool.unprocessed))
        except FileNotFoundError:
            self.spool.ensure()
            return 0
        names = {e.name for e in entries}
        claimed = 0
        for e in entries:
            if self.stop.is_set() or not self.active:
                break
            name = e.name
            if ignored(name) or (self.s.done_marker and name.endswith(DONE_SUFFIX)):
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if e.is_dir(follow_symlinks=False):
                if name not in self.folders_told:
                    event("folder_left", "a folder in unprocessed/ is left as it is (a cluster claims files only)",
                          file=display(name))
                    self.folders_told.add(name)
                continue
            if self.s.done_marker:
                if name + DONE_SUFFIX not in names:
                    continue
            else:
                sig = (st.st_ino, st.st_size, st.st_mtime_ns)
                last = self.seen.get(name)
                if last is None or last[0] != sig:
                    self.seen[name] = (sig, now)  # settling starts (again): size and mtime must hold settle_time
                    if self.s.settle_time > 0:
                        continue
                elif now - last[1] < self.s.settle_time:
                    continue
            if self._claim(name, st.st_ino):
                claimed += 1
                self.seen.pop(name, None)
                if self.s.done_marker:
                    self.spool.remove_marker(name + DONE_SUFFIX)
                crash_point("claim-enqueue")
                self._send(name, st)
        for gone in set(self.seen) - names:
            del self.seen[gone]
        return claimed

    def _claim(self, name: str, ino: int) -> bool:
        """Claim by a rename that refuses to overwrite (link + unlink where RENAME_NOREPLACE is refused). Whatever
        the rename reported, the inodes decide: an NFS client's retried request can fail although it took effect."""
        try:
            verdict = self.spool.claim(name, settled=True)
        except OSError as e:
            event("io_error", "a claim reported an error; stat decides", logging.WARNING, file=display(name),
                  reason=str(e))
            verdict = Claim.GONE
        if verdict is Claim.CLAIMED:
            return True
        if verdict is Claim.BUSY:
            return False
        dst, src = (os.path.join(f, name) for f in (self.spool.underprocess, self.spool.unprocessed))
        if _ino(dst) != ino:
            return False  # not ours: vanished, replaced, or another file of that name is in flight
        if _ino(src) == ino:
            durable.unlink_quiet(src)  # link made, unlink not (or not reported): the old name is a ghost
        return True

    def _send(self, name: str, st: os.stat_result) -> None:
        cid = claim_id(name, st)
        self._enqueue(cid, name, st)
        self.claims.inc()
        event("claimed", "file claimed and enqueued", file=display(name), claim=cid, size=st.st_size)

    def _enqueue(self, cid: str, name: str, st: os.stat_result) -> None:
        """Bind the name to its claim, then send it: a node that took the message before the binding was there
        would ack it as done elsewhere (ledger.bound), leaving the file for the next re-drive. A crash between the
        two leaves a record with no live message: the re-drive sends it."""
        self.ledger.record(cid, name, st.st_ino, st.st_size, "")
        self.ledger.requeued(cid, queue.send(self.actor, cid, name))

    # --- re-drive -------------------------------------------------------------------------------------------
    def _redrive(self) -> int:
        """Send again every underprocess/ file with no live lease and no live message; drop unheld temps."""
        try:
            entries = [e for e in os.scandir(self.spool.underprocess) if not e.name.startswith(".")]
        except FileNotFoundError:
            self.spool.ensure()
            return 0
        lost: list[tuple[str, os.stat_result, str, bytes]] = []  # no lease, and the record names no live message
        for i in range(0, len(entries), REDRIVE_CHUNK):
            chunk = []
            for e in entries[i:i + REDRIVE_CHUNK]:
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # committed meanwhile
                if not e.is_dir(follow_symlinks=False):
                    chunk.append((e.name, st, claim_id(e.name, st)))
            cids = [c for _, _, c in chunk]
            owners = self.ledger.owners(cids)
            records = self.ledger.records(cids)
            bound = self.ledger.bound([n for n, _, _ in chunk])
            messages = [r.get(b"message", b"").decode() for r in records]
            live = queue.alive(self.client, messages)
            for (name, st, cid), owner, rec, ok, held in zip(chunk, owners, records, live, bound):
                if owner is not None or (held == cid and rec.get(b"state") == b"queued" and ok):
                    continue  # in a node's hands, or waiting in the queue under its binding
                lost.append((name, st, cid, rec.get(b"state") or b"unknown"))
        sent = 0
        # A message sent again with a delay lives on under a new id (queue.carrying): found, it is the one recorded.
        moved = queue.carrying(self.client, {c for _, _, c, _ in lost}) if lost else {}
        for name, st, cid, was in lost:
            if cid in moved and self.ledger.bound([name])[0] == cid:
                self.ledger.requeued(cid, moved[cid])
                continue
            self._enqueue(cid, name, st)
            self.redriven.inc()
            event("redriven", "a claimed file had no live lease or message: sent again", file=display(name),
                  claim=cid, was=was.decode())
            sent += 1
        self._drop_temps()
        return sent

    def _drop_temps(self) -> None:
        """Unpublished temps (DISTRIBUTED.md §3 step 10) of claims no node holds, older than a lease time: their
        writer is gone (a live writer renews its lease). Never another node's in-flight temps."""
        found = []
        for folder in self.folders:
            path = os.path.join(self.spool.processed, folder) if folder else self.spool.processed
            try:
                with os.scandir(path) as it:
                    found += [e for e in it if e.name.startswith(CLAIM_TEMP)]
            except OSError:
                continue
        if not found:
            return
        cids = [e.name[len(CLAIM_TEMP):].split(".", 1)[0] for e in found]
        owners = self.ledger.owners(cids)
        old = time.time() - 2 * self.s.lease_time
        for e, owner in zip(found, owners):
            try:
                if owner is None and e.stat(follow_symlinks=False).st_mtime < old:
                    durable.unlink_quiet(e.path)  # nobody holds the claim: a redo writes its own temps
            except OSError:
                continue

    # --- status ---------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The scanner's /api/status (docs/api.md), also read at every scrape (_Live). The single-machine daemon's
        shape where a field means the same: version, state (running | stopping), started_at and now (seconds since
        the epoch), watch_dir, counts (files per folder; unprocessed/ counts what would be claimed), oldest
        ({"unprocessed": seconds since the oldest mtime there, 0 when none}), failures (Spool.failures(recent)),
        folders_left; and the cluster's own: role "scanner", active (this one holds the lock; else a standby),
        nodes (Ledger.nodes(): node, host, pid, processes, current [{file, since}], listen, heartbeat_age in
        seconds, missing), queue_messages (None while Redis cannot be reached; nodes are then []) and
        oldest_claim_age (seconds, None when no claim).

        Cheap by construction: what comes from the folders (listings, sidecars, claim records) is read again at
        most every STATUS_DISK_EVERY seconds, or STATUS_DISK_FACTOR times as long as the last reading took (a
        huge processed/ costs at most about a tenth of a core); nodes and queue depth are asked of Redis each time
        (two round trips), as they are what a page refresh is for. Never raises for Redis or folder trouble."""
        disk = self._status_disk()
        try:
            nodes, depth = self.ledger.nodes(), queue.depth(self.client)
        except redis.RedisError:
            nodes, depth = [], None
        return {"role": "scanner", "active": self.active, "version": __version__,
                "state": "stopping" if self.stop.is_set() else "running", "started_at": self.started_at,
                "now": time.time(), "watch_dir": self.watch_dir, **disk, "queue_messages": depth, "nodes": nodes}

    def _status_disk(self) -> dict[str, Any]:
        """The folder part of status(), shared by concurrent callers (one reads, the others wait for its result)."""
        with self._status_lock:
            now = time.monotonic()
            if self._status_cache is None or now >= self._status_next:
                self._status_cache = self._read_disk()
                took = time.monotonic() - now
                self._status_next = time.monotonic() + max(STATUS_DISK_EVERY, STATUS_DISK_FACTOR * took)
            return self._status_cache

    def _read_disk(self) -> dict[str, Any]:
        try:
            names, folders = Spool.split(self.spool.unprocessed)
        except OSError:
            names, folders = [], []
        # As `ingestd status` and the daemon count waiting files: never temps, nor done markers (they vouch for one).
        waiting = sum(1 for n in names if not ignored(n) and not (self.s.done_marker and n.endswith(DONE_SUFFIX)))
        counts = {"unprocessed": waiting, **{f: _count(getattr(self.spool, f)) for f in ("underprocess", "processed",
                                                                                         "failed")}}
        try:
            failures = self.spool.failures(self.s.recent)
        except OSError:
            failures = []
        # oldest: the metric IngestdOldestUnprocessedTooOld reads (by mtime). Not underprocess/: a claim waits in the
        # queue too, so its age is oldest_claim_age (IngestdClusterQueueLatency), never IngestdFileStuck's series.
        return {"counts": counts, "oldest": {"unprocessed": _oldest_age(self.spool.unprocessed)},
                "oldest_claim_age": self._oldest(), "failures": failures,
                # A cluster claims files only (recursive or not): folders in unprocessed/ stay where they are.
                "folders_left": {"count": len(folders), "names": [display(n) for n in sorted(folders)[: self.s.recent]],
                                 "recursive": False}}

    def _oldest(self) -> float | None:
        """Seconds since the oldest file now in underprocess/ was claimed (its mtime is kept by the rename, so the
        claim record's time is asked of Redis), None when none. Past REDRIVE_CHUNK files, of the first met."""
        try:
            names = [e.name for e in os.scandir(self.spool.underprocess) if not e.name.startswith(".")][:REDRIVE_CHUNK]
            cids = [c for c in self.ledger.bound(names) if c is not None]
            ats = [float(r[b"at"]) for r in self.ledger.records(cids) if b"at" in r]
        except (OSError, redis.RedisError, ValueError):
            return None
        return round(time.time() - min(ats), 3) if ats else None

    def health(self) -> str | None:
        try:
            self.client.ping()
        except redis.RedisError as e:
            return f"broker unreachable: {e}"
        return None

    # --- the loop -------------------------------------------------------------------------------------------
    def run(self) -> int:
        self.spool.ensure_at_start()
        holder = self.spool.holder()
        if holder is not None:
            # A single-machine daemon moves files here as if alone: never claim beside it (exit 75, as a second one).
            raise AlreadyRunning(f"watch_dir: a single-machine ingestd runs on {self.spool.root} ({holder}); stop it "
                                 "before starting a cluster's scanner there")
        disable_created_metrics()  # *_created series double the output and no dashboard reads them
        registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=registry)
        registry.register(self.claims)
        registry.register(self.redriven)
        registry.register(_Live(self))
        host, port = self.s.host_port
        try:
            web = Web(host, port, registry, self.status, self.health)
        except OSError as e:
            raise cannot_listen(self.s.listen, e) from None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())
        # ingestd.service's ExecReload sends SIGHUP: a scanner does not reload (restart it), but must not die of it.
        signal.signal(signal.SIGHUP, lambda *_: event("reload_refused", "SIGHUP: a scanner does not reload its "
                                                      "settings; restart it to apply changes", logging.WARNING))
        web.start()
        self._lead()  # before READY=1: a node started after the scanner finds the cluster id in place
        notifier = Notifier()
        notifier.ready()
        event("started", "ingestd scanner started", version=__version__, role="scanner", host=socket.gethostname(),
              watch_dir=str(self.spool.root.resolve()), listen=web.address, watch="polling")
        renew_every = self.s.lease_time / 6
        next_lead = time.monotonic() + renew_every
        self.next_redrive = time.monotonic() + self.s.rescan_interval
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= next_lead:
                self._lead()
                next_lead = now + renew_every
            if self.active:
                try:
                    self.poll()
                    if time.monotonic() >= self.next_redrive:
                        self.next_redrive = time.monotonic() + self.s.rescan_interval
                        self._redrive()
                except Exception as e:  # noqa: BLE001 - the failure boundary: a bad turn costs a turn, never the scanner
                    event("scan_error", "a scan failed; it is tried again", logging.ERROR, error=repr(e))
            notifier.watchdog()
            self.stop.wait(min(self.s.poll_interval, renew_every))
        notifier.stopping()
        event("stopping", "ingestd scanner stopping", active=self.active)
        if self.active:
            try:
                self.lock.release()  # the standby takes over at once, not a lease time later
            except Exception:  # noqa: BLE001 - lost already: nothing to give back
                pass
        web.stop()
        event("stopped", "ingestd scanner stopped")
        return 0


class _Live(Collector):
    """Scrape-time series: folder counts, nodes, queue depth, the oldest claim's age."""

    def __init__(self, scanner: Scanner) -> None:
        self.scanner = scanner

    def collect(self) -> Any:
        st = self.scanner.status()
        yield from folder_series(st["counts"], st.get("oldest", {}))
        yield GaugeMetricFamily("ingestd_claiming_paused", "1 while claiming is paused (low disk space)",
                                value=int(getattr(self.scanner, "paused", False)))
        yield GaugeMetricFamily("ingestd_cluster_active", "1 when this scanner holds the lock", value=int(st["active"]))
        live = [n for n in st["nodes"] if not n["missing"]]
        yield GaugeMetricFamily("ingestd_cluster_nodes", "Worker nodes with a recent heartbeat", value=len(live))
        if st["queue_messages"] is not None:
            yield GaugeMetricFamily("ingestd_cluster_queue_messages", "Messages queued, delayed or in nodes' hands",
                                    value=st["queue_messages"])
        yield GaugeMetricFamily("ingestd_cluster_oldest_claim_age_seconds", "Age of the oldest claim not yet finished "
                                "(0 when none)", value=st["oldest_claim_age"] or 0)
        beat = GaugeMetricFamily("ingestd_cluster_node_heartbeat_age_seconds", "Seconds since each node's heartbeat",
                                 labels=["node"])
        for n in st["nodes"]:
            beat.add_metric([n["node"]], n["heartbeat_age"])
        yield beat


def _never_here(cid: str, name: str) -> None:
    raise RuntimeError("the scanner only sends claims; worker nodes run them")


def _ino(path: str) -> int | None:
    try:
        return os.lstat(path).st_ino
    except (FileNotFoundError, NotADirectoryError):
        return None


def _oldest_age(folder: str) -> float:
    """Seconds since the oldest mtime among a folder's user files (0 when none): IngestdOldestUnprocessedTooOld
    reads it, so a scanner that claims nothing (no lock, a full share) shows as files waiting. As the daemon's,
    only what would be claimed: never a folder (a cluster leaves them, they would age for ever), nor a temp."""
    oldest = None
    try:
        with os.scandir(folder) as it:
            for e in it:
                if ignored(e.name):
                    continue
                try:
                    if e.is_dir(follow_symlinks=False):
                        continue
                    m = e.stat(follow_symlinks=False).st_mtime
                except OSError:
                    continue
                oldest = m if oldest is None else min(oldest, m)
    except OSError:
        return 0.0
    return max(0.0, time.time() - oldest) if oldest is not None else 0.0


def _count(folder: str) -> int:
    try:
        return len(Spool.split(folder)[0])
    except OSError:
        return 0


def run(settings: Settings) -> int:
    return Scanner(settings).run()
