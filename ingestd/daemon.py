"""The daemon's life: startup (lock, recover, watch, workers, HTTP, READY), the main loop, shutdown.

One poll() waits on everything: inotify, signals (set_wakeup_fd), worker pipes and worker deaths.
The parent alone moves files between folders; workers only read inputs and publish outputs.
"""

from __future__ import annotations

import collections
import dataclasses
import faulthandler
import logging
import os
import select
import signal
import stat
import time
from collections.abc import Callable
from typing import Any

from ingestd import __version__
from ingestd.arrivals import DONE_SUFFIX, Arrivals, Ready
from ingestd.log import event
from ingestd.metrics import Metrics
from ingestd.names import display, oserror
from ingestd.notify import Notifier
from ingestd.pipeline import kind
from ingestd.settings import ConfigError, Settings
from ingestd.sinks import remove_temps
from ingestd.spool import Claim, Failure, Spool
from ingestd.watch import Watch
from ingestd.web import Web
from ingestd.workers import Pool, Slot

MAX_BACKOFF = 30.0
HEARTBEAT = 5.0  # the idle main loop still turns this often, so /healthz can tell "idle" from "stuck"


class Daemon:
    def __init__(self, settings: Settings, reload: Callable[[], Settings] | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.s = settings
        self._reload_settings = reload
        self.clock, self.wall = clock, wall
        self.spool = Spool(settings.watch_dir)
        self.arrivals = Arrivals(settings.settle_time, settings.done_marker, settings.quiet_time)
        self.notifier = Notifier()
        self.metrics = Metrics(self.snapshot)
        self.state = "starting"
        self.started_at = wall()
        self.signals: list[int] = []
        self.retry: collections.deque[str] = collections.deque()  # claimed files to (re)do first
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=settings.recent)
        self.done_times: collections.deque[tuple[float, int]] = collections.deque()  # (when, bytes) for throughput
        # Running sum of done_times' bytes: summing the deque every loop turn was O(files in the last minute) per
        # turn, quadratic under a burst (tests/torture/test_arrivals.py: 50,000 files took over 6 minutes).
        self.done_bytes = 0
        self.totals = dict.fromkeys(("processed", "failed", "recovered", "bytes_in", "bytes_out"), 0)
        self.paused: str | None = None
        self.resume_at = 0.0
        self.backoff = 1.0
        self.stop_deadline: float | None = None
        self.heartbeat = clock()
        self.next_rescan = clock() + settings.rescan_interval
        self.next_watchdog = 0.0
        self._withheld = False
        self._unacked: list[tuple[str, dict[str, Any], float, int, bool]] = []  # commits not yet fsynced, not announced
        # Folder counts for scrapes, kept from our own bookkeeping (listing 100,000 entries per scrape took
        # ~100 ms); processed/ and failed/ are re-counted from disk at every rescan, as others may change them.
        self.kept = {"processed": 0, "failed": 0}
        self._fresh: set[str] = set()  # in-flight names with no earlier result in processed/
        self.outputs: list[str] = []  # output folders under processed/ (set with the routing)
        self.web: Web | None = None
        self.watch: Watch | None = None
        self.pool: Pool | None = None
        self._view: dict[str, Any] = {"workers": [], "recent": [], "oldest": {}}

    # --- startup -------------------------------------------------------------------------------
    def startup(self) -> None:
        faulthandler.enable()  # the watchdog's SIGABRT dumps every thread's stack into the journal
        self.spool.ensure()
        self.spool.lock(wait=self.s.wait_lock)  # --wait-lock: a standby blocks here until the owner is gone
        self._install_signals()
        self._make_output_folders()
        now = self.wall()
        requeued, quarantined = self.spool.recover(self.s.max_attempts, now)
        for name in quarantined:
            self._count_failed(name, "poison: in progress during too many crashes", 0.0)
        if requeued or quarantined:
            self.metrics.restarts_recovered.inc()
        for name in requeued:
            self.retry.append(name)
            self.metrics.files.labels("recovered").inc()
            self.totals["recovered"] += 1
            event("recovered", "recovered a file left in progress by a crash", file=display(name),
                  attempts=self.spool.attempts(name))
        # The watch goes up before the scan, so nothing arriving in between is missed.
        self.watch = Watch(self.spool.unprocessed)
        self._rescan("startup")
        self.pool = Pool(self.s, self.spool)
        self.pool.start()
        host, port = self.s.host_port
        try:
            self.web = Web(host, port, self.metrics.registry, self.status, self.health)
        except OSError as e:
            raise ConfigError(f"listen: cannot listen on {self.s.listen}: {e.strerror}") from None
        self._publish_view()  # a scrape that arrives at once must find a complete view (counts included)
        self.web.start()
        self.state = "running"
        self._publish_view()
        self.notifier.ready()
        event("started", "ingestd started", version=__version__, watch_dir=str(self.spool.root),
              listen=self.web.address, workers=self.s.workers, recovered=len(requeued), quarantined=len(quarantined),
              waiting=len(self.arrivals))

    def _install_signals(self) -> None:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_r = r
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signals.append(signum)  # handled in the main loop; the wakeup fd wakes its poll()

    # --- the main loop -----------------------------------------------------------------------------
    def run(self) -> None:
        self.startup()
        try:
            while self.main_loop_once():
                pass
        finally:
            self.shutdown()

    def main_loop_once(self) -> bool:
        """One turn: wait, handle what woke us, hand out work, ping the watchdog. False when done."""
        assert self.watch is not None and self.pool is not None
        poller = select.poll()
        poller.register(self.watch.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        for fd in self.pool.fds():
            poller.register(fd, select.POLLIN)
        ready = poller.poll(self._timeout_ms())
        now = self.clock()
        self.heartbeat = now
        for fd, _ in ready:
            if fd == self.watch.fileno():
                self._on_watch(now)
            elif fd == self._wake_r:
                self._drain_signals()
            else:
                for slot, kind, data in self.pool.receive(fd):
                    self._on_worker(slot, kind, data)
        if self._unacked:
            self._ack_commits()  # one fsync for this turn's commits, then they are announced
        if self.signals:
            self._handle_signals()
        if now >= self.next_rescan:
            self._rescan("periodic")
        # Timers run every turn, workers free or not: a due timer left unrun made every poll() return at once.
        self.arrivals.tick(now, self._stat)
        if self.state == "stopping":
            if not self.pool.busy() or (self.stop_deadline is not None and now >= self.stop_deadline):
                return False
        else:
            self._dispatch(now)
        self._watchdog(now)
        self._publish_view()
        return True

    def _timeout_ms(self) -> int:
        now = self.clock()
        deadlines = [self.next_rescan, now + HEARTBEAT]
        if (d := self.arrivals.next_deadline()) is not None:
            deadlines.append(d)
        if self.paused or self.retry:
            deadlines.append(max(self.resume_at, now + 0.05))
        if self.notifier.watchdog_interval:
            deadlines.append(self.next_watchdog)
        if self.stop_deadline is not None:
            deadlines.append(self.stop_deadline)
        if self.pool and self.pool.busy():
            deadlines.append(now + 1.0)  # refresh STATUS= and the status page with progress
        return max(0, int((min(deadlines) - now) * 1000) + 1)

    # --- arrivals ------------------------------------------------------------------------------------
    def _on_watch(self, now: float) -> None:
        assert self.watch is not None
        for c in self.watch.read():
            if c.kind == "overflow":
                self.metrics.overflows.inc()
                event("overflow", "inotify queue overflowed: rescanning", logging.WARNING)
                self.arrivals.change(c, now)
                self._rescan("overflow")
            elif c.kind == "lost_watch":
                event("watch_lost", "unprocessed/ went away: recreating it", logging.ERROR)
                self.spool.ensure()
                self.watch.close()
                self.watch = Watch(self.spool.unprocessed)
                self._rescan("overflow")
            else:
                self.arrivals.change(c, now)

    def _rescan(self, reason: str) -> None:
        self.metrics.rescans.labels(reason).inc()
        counts = self.spool.counts()
        self.kept = {"processed": counts["processed"], "failed": counts["failed"]}
        self.arrivals.scanned(Spool.entries(self.spool.unprocessed), self.clock())
        self.next_rescan = self.clock() + self.s.rescan_interval

    def _stat(self, name: str) -> tuple[int, int] | None:
        try:
            st = os.lstat(os.path.join(self.spool.unprocessed, name))
        except FileNotFoundError:
            return None
        return st.st_size, st.st_mtime_ns

    # --- handing out work ------------------------------------------------------------------------------
    def _dispatch(self, now: float) -> None:
        assert self.pool is not None
        if self.paused and now < self.resume_at:
            return
        if not self._space_ok():
            return
        for slot in self.pool.idle():
            if self.retry:
                self._start(slot, self.retry.popleft(), None, now)
                continue
            while True:  # a name that turns out busy or gone does not use up the slot
                taken = self.arrivals.take(1, now, self._stat)
                if not taken:
                    return
                if self._claim_and_start(slot, taken[0], now):
                    break
                if self.paused and now < self.resume_at:
                    return  # the claim failed with an I/O error: claiming is paused

    def _claim_and_start(self, slot: Slot, r: Ready, now: float) -> bool:
        """Claim r.name and hand it to slot; False if it was not claimed (the arrivals model knows why)."""
        name = r.name
        src = os.path.join(self.spool.unprocessed, name)
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            return False
        try:
            if not stat.S_ISREG(st.st_mode):
                self._fail(name, Failure(f"not a regular file: {kind(st.st_mode)}"), 0.0, source=self.spool.unprocessed)
                return False
            claimed = self.spool.claim(name, settled=r.settled)
        except OSError as e:
            # EIO/ENOSPC on the claim rename or on quarantining a non-file must not kill the daemon: the entry
            # stays in unprocessed/, is looked at again, and claiming pauses (tests/torture/test_errors.py, eio).
            self.arrivals.scanned([name], now)
            self._back_off(name, oserror(e), "could not claim a file; it stays queued")
            return False
        if claimed is Claim.BUSY:  # a writer still holds it open: not complete, whatever the events said
            self.arrivals.busy(r, now)
            if not r.retry:  # once per file, not at each re-check
                event("busy", "complete by its events, but a writer holds it open: waiting", file=display(name))
            return False
        if claimed is Claim.UNSURE:  # no lease possible on it here: the settle check decides instead
            self.arrivals.unsure(r, now)
            return False
        if not claimed:
            if os.path.lexists(os.path.join(self.spool.underprocess, name)):
                # The same name is still in flight: take the new one after the old one commits.
                self.arrivals.scanned([name], now)
            return False
        if self.s.done_marker:
            self.spool.remove_marker(name + DONE_SUFFIX)
        self.metrics.wait.observe(max(0.0, self.wall() - st.st_ctime))  # ctime: when it arrived (create or rename)
        self.metrics.pickup.observe(max(0.0, now - r.complete_at))
        self._start(slot, name, st.st_size, now)
        return True

    def _start(self, slot: Slot, name: str, size: int | None, now: float) -> None:
        assert self.pool is not None
        if size is None:
            try:
                size = os.lstat(os.path.join(self.spool.underprocess, name)).st_size
            except FileNotFoundError:
                return
        if not os.path.lexists(os.path.join(self.spool.processed, name)):
            self._fresh.add(name)
        self.pool.assign(slot, name, size, now, self.wall())
        event("claimed", "claimed", file=display(name), bytes=size, worker=slot.id)


    def _space_ok(self) -> bool:
        """Backpressure: below min_free_bytes (or out of inodes) claim nothing; resume by itself."""
        st = os.statvfs(self.spool.root)
        free = st.f_bavail * st.f_frsize
        low_inodes = st.f_files > 0 and st.f_favail < 64
        if free >= self.s.min_free_bytes and not low_inodes:
            if self.paused and self.paused.startswith("low disk"):
                self._unpause()
            return True
        reason = f"low disk space: {free} bytes free, min_free_bytes is {self.s.min_free_bytes}" if not low_inodes \
            else f"low disk space: {st.f_favail} inodes free"
        self._pause(reason, self.clock() + 1.0)
        return False

    def _pause(self, reason: str, until: float) -> None:
        if self.paused != reason:
            event("paused", "claiming paused", logging.WARNING, reason=reason)
        self.paused, self.resume_at = reason, until
        self.metrics.paused.set(1)

    def _unpause(self) -> None:
        if self.paused:
            event("resumed", "claiming resumed", previous=self.paused)
        self.paused, self.backoff = None, 1.0
        self.metrics.paused.set(0)

    # --- results --------------------------------------------------------------------------------------
    def _on_worker(self, slot: Slot, kind: str, data: dict[str, Any]) -> None:
        assert self.pool is not None
        if kind == "progress":
            return
        name, elapsed = self.pool.release(slot, self.clock())
        if kind == "died":
            self._fresh.discard(name or "")
            self._on_worker_death(slot, name, data)
            return
        if name is None:
            return
        try:
            if kind == "done":
                self.spool.commit(name)
                self._unacked.append((name, data, elapsed, slot.id, name in self._fresh))  # announced once durable
            elif kind == "rejected":
                self._fail(name, Failure(data["reason"], data.get("line"), self.spool.attempts(name) + 1), elapsed,
                           worker=slot.id)
            else:
                self._io_error(name, data["reason"])
        except OSError as e:
            self._io_error(name, oserror(e))
        finally:
            self._fresh.discard(name)

    def _ack_commits(self) -> None:
        """One directory fsync makes all of this turn's commits durable; only then are they logged and counted
        as processed, so a power cut can never bring back a file the log already called done."""
        try:
            self.spool.sync_commits()
        except OSError as e:  # try again next turn; the acks wait (the outputs themselves are durable)
            self._back_off(self._unacked[0][0], oserror(e), "could not make commits durable; will retry")
            return
        acks, self._unacked = self._unacked, []
        for name, data, elapsed, worker, fresh in acks:
            self._count_processed(name, data, elapsed, worker, fresh)

    def _count_processed(self, name: str, data: dict[str, Any], elapsed: float, worker: int, fresh: bool) -> None:
        m = self.metrics
        m.files.labels("processed").inc()
        m.bytes_in.inc(data["bytes_in"])
        m.bytes_out.inc(data["bytes_out"])
        m.lines_in.inc(data["lines_in"])
        for out, n in data["lines_out"].items():
            m.lines_out.inc(n)
            m.records.labels(out).inc(n)
        m.duration.observe(elapsed)
        m.last_success.set(self.wall())
        self.totals["processed"] += 1
        self.totals["bytes_in"] += data["bytes_in"]
        self.totals["bytes_out"] += data["bytes_out"]
        self.done_times.append((self.clock(), data["bytes_in"]))
        if fresh:  # a new result, not a replacement of an earlier same-named one
            self.kept["processed"] += 1
        self.done_bytes += data["bytes_in"]
        self._remember(name, "processed", elapsed, None)
        if self.paused and not self.paused.startswith("low disk"):
            self._unpause()
        event("processed", "processed", file=display(name), bytes=data["bytes_in"], lines=data["lines_in"],
              bytes_out=data["bytes_out"], duration=round(elapsed, 6), worker=worker)

    def _fail(self, name: str, failure: Failure, elapsed: float, source: str | None = None, worker: int | None = None) -> None:
        self.spool.fail(name, failure, self.wall(), source=source)
        self._count_failed(name, failure.reason, elapsed)
        event("failed", "failed", logging.WARNING, file=display(name), reason=failure.reason, line=failure.line,
              attempts=failure.attempts, duration=round(elapsed, 6), worker=worker)

    def _count_failed(self, name: str, reason: str, elapsed: float) -> None:
        self.metrics.files.labels("failed").inc()
        self.kept["failed"] += 1
        self.totals["failed"] += 1
        self._remember(name, "failed", elapsed, reason)

    def _io_error(self, name: str, reason: str) -> None:
        """Not the input's fault (disk full, read-only, EIO): keep the file claimed, pause, retry it first."""
        self.retry.appendleft(name)
        self._back_off(name, reason, "could not finish a file; it is kept and retried")

    def _back_off(self, name: str, reason: str, message: str) -> None:
        """Pause claiming for a while that doubles with each error (to MAX_BACKOFF); a success resets it."""
        self.metrics.errors.inc()
        self._pause(f"I/O error: {reason}", self.clock() + self.backoff)
        event("io_error", message, logging.ERROR, file=display(name), reason=reason, retry_in=self.backoff)
        self.backoff = min(MAX_BACKOFF, self.backoff * 2)

    def _on_worker_death(self, slot: Slot, name: str | None, data: dict[str, Any]) -> None:
        assert self.pool is not None
        event("worker_died", "a worker died", logging.ERROR, worker=slot.id, exitcode=data.get("exitcode"),
              file=display(name) if name else None)
        if slot.process.pid is not None:
            remove_temps(self.spool.processed, self.outputs, slot.process.pid)
        if name is not None and os.path.lexists(os.path.join(self.spool.underprocess, name)):
            attempts = self.spool.bump_attempts(name)
            if attempts >= self.s.max_attempts:
                self._fail(name, Failure(f"poison: its worker died {attempts} times processing it "
                                         f"(last exit code {data.get('exitcode')})", attempts=attempts), 0.0)
            else:
                self.retry.appendleft(name)
        if self.state != "stopping":
            self.pool.replace(slot)

    def _make_output_folders(self) -> None:
        """Output folders of the current routing, created; kept, as `routing` rebuilds the tables on each use."""
        self.outputs = sorted({o.path for o in self.s.routing.outputs})
        for path in self.outputs:
            os.makedirs(os.path.join(self.spool.processed, path), exist_ok=True)

    def _remember(self, name: str, result: str, duration: float, reason: str | None) -> None:
        self.recent.appendleft({"file": display(name), "result": result, "duration": round(duration, 6),
                                "finished_at": self.wall(), "reason": reason})

    # --- signals: stop and reload ----------------------------------------------------------------------
    def _drain_signals(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _handle_signals(self) -> None:
        sigs, self.signals = self.signals, []
        for sig in sigs:
            if sig == signal.SIGHUP:
                self._reload()
            elif self.state == "stopping":
                event("stopping", "second stop signal: abandoning current files now", logging.WARNING)
                self.stop_deadline = self.clock()
            else:
                self.state = "stopping"
                self.notifier.stopping()
                # Our warm stop may outlast systemd's TimeoutStopSec: ask for the time it needs.
                self.notifier.extend_timeout(self.s.stop_timeout + 5)
                self.stop_deadline = self.clock() + self.s.stop_timeout
                busy = [display(n) for n in self.pool.files()] if self.pool else []
                event("stopping", "stopping: finishing current files", signal=signal.Signals(sig).name,
                      in_progress=busy, timeout=self.s.stop_timeout)

    def _reload(self) -> None:
        if self._reload_settings is None or self.state == "stopping":
            return
        self.notifier.reloading()
        self.state = "reloading"
        try:
            new = self._reload_settings()
        except ConfigError as e:
            event("reload_failed", "new configuration rejected; keeping the old one", logging.ERROR, error=str(e))
        else:
            self.s = _replace_routing(self.s, new)
            self._make_output_folders()
            assert self.pool is not None
            self.pool.reconfigure(self.s)
            event("reloaded", "routing reloaded", config=str(self.s.config) if self.s.config else None)
        self.state = "running"
        self.notifier.ready()

    # --- health, watchdog, status --------------------------------------------------------------------------
    def health(self) -> str | None:
        """None when healthy, else why: the main loop must turn and every busy worker must make progress."""
        now = self.clock()
        limit = 2 * max(HEARTBEAT, self.notifier.watchdog_interval or 0) + 1.0
        if now - self.heartbeat > limit:
            return f"main loop silent for {now - self.heartbeat:.1f}s"
        stuck = self.pool.stalled(now, self._stall_limit()) if self.pool else []
        if stuck:
            return "no progress from worker(s) " + ", ".join(str(s) for s in stuck)
        return None

    def _stall_limit(self) -> float:
        # Workers report every 0.25 s while reading; one silent for a whole watchdog period is stuck too.
        wd = self.notifier.watchdog_interval
        return min(self.s.stall_time, 2 * wd) if wd else self.s.stall_time

    def _watchdog(self, now: float) -> None:
        interval = self.notifier.watchdog_interval
        if not interval or now < self.next_watchdog:
            return
        problem = self.health()
        if problem:
            if not self._withheld:  # once per episode: log why, and have stuck workers dump their stacks
                event("watchdog_withheld", "not pinging the watchdog", logging.ERROR, reason=problem)
                if self.pool is not None:
                    self.pool.dump_stacks(self.pool.stalled(now, self._stall_limit()))
            self._withheld = True
            self.next_watchdog = now + interval
            return
        self._withheld = False
        self.notifier.watchdog()
        self.next_watchdog = now + interval

    def _publish_view(self) -> None:
        """A fresh read-only snapshot for the HTTP thread (it never touches the live structures)."""
        assert self.pool is not None
        now, wall = self.clock(), self.wall()
        while self.done_times and now - self.done_times[0][0] > 60:
            self.done_bytes -= self.done_times.popleft()[1]
        in_flight = self.pool.started_times()
        oldest_seen = self.arrivals.oldest_seen()
        self._view = {
            "workers": self.pool.view(),
            "recent": list(self.recent),
            "oldest": {"unprocessed": max(0.0, now - oldest_seen) if oldest_seen is not None else 0.0,
                       "underprocess": max(0.0, wall - min(in_flight)) if in_flight else 0.0},
            "throughput": {"files_per_second": round(len(self.done_times) / 60, 3),
                           "bytes_per_second": round(self.done_bytes / 60, 1)},
            "counts": {"unprocessed": len(self.arrivals), "underprocess": len(self.pool.files()) + len(self.retry),
                       **self.kept},
            "totals": dict(self.totals),
            "state": self.state,
            "paused": self.paused,
        }
        busy = [w for w in self._view["workers"] if w["file"] is not None]
        current = ", ".join(f"{w['file']} {_pct(w)}" for w in busy[:2]) or "idle"
        self.notifier.status(f"{self.state}; waiting {len(self.arrivals)}; {current}; "
                             f"done {self.totals['processed']}, failed {self.totals['failed']}"
                             + (f"; PAUSED: {self.paused}" if self.paused else ""))

    def snapshot(self) -> dict[str, Any]:
        return self._view

    def status(self) -> dict[str, Any]:
        return {"version": __version__, "started_at": self.started_at, "now": self.wall(),
                "watch_dir": str(self.spool.root.resolve()), **self.snapshot(),
                "failures": self.spool.failures(self.s.recent)}

    # --- shutdown ------------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        if self._unacked:
            self._ack_commits()
        for name in self.retry:
            self.spool.unclaim(name)  # waiting for a retry (disk full...), not crashed: no attempt counted
        if self.pool is not None:
            for name, pid in self.pool.abandon():
                # Abandoned by a stop, not by a crash: back to the queue, no attempt counted.
                self.spool.unclaim(name)
                if pid is not None:
                    remove_temps(self.spool.processed, self.outputs, pid)
                event("abandoned", "stop timeout: file returned to the queue", logging.WARNING, file=display(name))
        if self.web is not None:
            self.web.stop()
        if self.watch is not None:
            self.watch.close()
        event("stopped", "ingestd stopped", processed=self.totals["processed"], failed=self.totals["failed"])


def _replace_routing(old: Settings, new: Settings) -> Settings:
    return dataclasses.replace(old, routing_doc=new.routing_doc, config=new.config)


def _pct(w: dict[str, Any]) -> str:
    return f"{100 * w['bytes'] // w['size']}%" if w["size"] else ""
