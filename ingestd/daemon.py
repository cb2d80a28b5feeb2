"""The daemon's life: startup (lock, recover, watch, HTTP, workers, READY), the main loop, shutdown.

One persistent poll() waits on everything: inotify, signals (set_wakeup_fd), worker pipes and worker deaths.
Each event is handled inside a failure boundary (as Mailman's runner handles each message): an unexpected
exception costs the file it concerns a retry with backoff, never the daemon. The parent alone moves files
between folders; workers only read inputs and publish outputs.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import faulthandler
import logging
import os
import select
import signal
import stat
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from ingestd import __version__, emptied, history, inflight, log
from ingestd.arrivals import Arrivals, Ready
from ingestd.inode import born, folder_id
from ingestd.job import Job
from ingestd.log import event
from ingestd.messages import Done, Outcome, Outcomes, Rejected, Retry, ToParent
from ingestd.names import DONE_SUFFIX, display, hidden_path, oserror
from ingestd.notify import Notifier
from ingestd.pipeline import kind
from ingestd.settings import ConfigError, Settings, dotenv_unread, unknown_env
from ingestd.sinks import remove_temps
from ingestd.spool import (
    RECURSIVE_NOTE,
    AlreadyRunning,
    Claim,
    Failure,
    NotAWatchDir,
    Spool,
    SpoolError,
)
from ingestd.state import THROUGHPUT_WINDOW, PauseKind, State
from ingestd.sweep import Sweep
from ingestd.watch import Change, WatchLimit
from ingestd.watchmode import Choice, Watcher, choose, open_watch
from ingestd.web import Web, cannot_listen
from ingestd.workers import Pool, Slot, StartInterrupted

HEARTBEAT = 5.0  # seconds a main-loop turn may take (outside its wait) before /healthz calls the loop stuck
IDLE_TURN = 60.0  # the idle loop's longest wait: a loop waiting in poll() is alive, so it wakes only for its timers
WATCH_RETRY = 1.0  # seconds between attempts to make and watch unprocessed/ again after its watch was lost
PROGRESS_REFRESH = 1.0  # seconds between STATUS=/page refreshes while workers are busy
HISTORY_EVERY = 1.0  # seconds: the recent history is saved at most this often (one small fsynced file)
MAX_INTERNAL_ERRORS = 3  # unexpected exceptions one file may cause before it is set aside in failed/
# Folders a listing enters between two reads of the watch (recursive mode). Listing a folder opens it: an IN_OPEN
# and an IN_CLOSE_NOWRITE on its own watch and on its parent's, so ~4,100 watched folders filled the kernel's
# queue (fs.inotify.max_queued_events, 16,384) by themselves, and each overflow's rescan overflowed again:
# nothing was claimed (tests/test_break_sweep.py). Read as it goes, the listing's own events (dropped at once by
# Watch.read) never pile up; the others wait, in order, in Daemon._deferred.
DRAIN_EVERY = 256
FOLDER_RECHECK = 1.0  # seconds at least between two looks at an emptied folder that is still there
QUIET_SLACK = 0.05  # seconds past a folder's quiet time its re-check comes (clock rounding), at least
RELOADED = ("routing_doc", "config", "mode", "pattern", "replacement")  # what SIGHUP applies (the routing)
MAX_BATCH = 32  # files handed to one worker at once, committed as one group (one data sync for all)
BATCH_BYTES = 4 << 20  # a batch stops growing past this many input bytes: big files travel alone


class Daemon:
    def __init__(self, settings: Settings, reload: Callable[[], Settings] | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.s = settings
        self._reload_settings = reload
        self.clock, self.wall = clock, wall
        self.spool = Spool(settings.watch_dir, done_marker=settings.done_marker)
        self.arrivals = Arrivals(settings.settle_time, settings.done_marker, settings.quiet_time)
        self.notifier = Notifier()
        self.state = State(settings.recent, clock, wall, settings.metrics_file_names)
        self.metrics = self.state.metrics
        self.signals: list[int] = []
        self.queue: collections.deque[Job] = collections.deque()  # claimed jobs waiting for a worker
        self.unacked: list[tuple[Job, Done, float]] = []  # commits not yet fsynced, so not yet announced
        self.outputs: list[str] = []  # output folders under processed/ (set with the routing)
        self.stop_deadline: float | None = None
        self.abandon_reason = "stop timeout"
        self.heartbeat = clock()  # monotonic: the main loop's last turn
        self.waiting_until: float | None = None  # monotonic: while the loop waits in poll(), when that wait ends
        self.next_rescan = clock() + settings.rescan_interval
        self.next_watchdog = 0.0
        self.next_view = 0.0
        self.next_history = 0.0
        self._withheld = False
        self.web: Web | None = None
        self.watch: Watcher | None = None
        self.created: str | None = None  # the topmost folder of the watch dir's path made at start-up
        self.watch_choice = Choice("inotify", "not started")  # inotify or polling, and why (watchmode.choose)
        self.watch_lost = False  # unprocessed/'s watch is dead and not yet replaced: rescans come every second
        self.folders_left: set[str] = set()  # default mode: folders in unprocessed/, left as they are (logged once)
        self.sweep = Sweep()  # recursive mode: the emptied subfolders to look at, and when
        self._folders_kept = (0, float("-inf"))  # sweep.changed last saved to .ingestd/emptied, and when (monotonic)
        self._watch_refused = False  # a subfolder's watch was refused (said once)
        self._deferred: collections.deque[Change] = collections.deque()  # read during a listing, not yet handled
        self._entered = 0  # folders entered by listings (DRAIN_EVERY)
        self.pool: Pool | None = None
        self.poller = select.poll()
        self._polled: set[int] = set()
        self._wake_r = self._wake_w = -1
        self._old_handlers: dict[int, Any] = {}
        self._backed_off = False  # this worker message already paused claiming once
        self._on_tty = log.text_wanted("auto")  # stderr is a terminal: a SIGHUP may be its hang-up
        self._records_ok = True  # .ingestd/inflight was written at start: a crash charges only the files worked on

    # --- startup -------------------------------------------------------------------------------
    def startup(self) -> None:
        """Raises ConfigError/SpoolError/RuntimeError on a start-up failure; the caller then runs shutdown()."""
        faulthandler.enable()  # the watchdog's SIGABRT dumps every thread's stack into the journal
        self.created = self.spool.ensure_at_start()  # the watch dir's topmost folder made now, if any (said)
        if os.path.exists(os.path.join(self.spool.state, "cluster-id")):
            # A cluster's shared folder: its underprocess/ files are in worker nodes' hands, not left by a crash.
            raise NotAWatchDir(f"watch_dir: {self.spool.root} is a cluster's shared folder (.ingestd/cluster-id): run "
                               "`ingestd run --broker redis://...` as its scanner (docs/distributed.md), not a "
                               "single-machine daemon")
        # --wait-lock: a standby blocks here until the owner is gone. The note tells `status` how this daemon counts.
        self.spool.lock(wait=self.s.wait_lock, note=RECURSIVE_NOTE if self.s.recursive else "")
        self._install_signals()
        self._make_output_folders()
        self.state.restore(history.load(str(self.spool.root)))
        self._recover()
        self._records_ok = inflight.prepare(self.spool.state, self.s.workers)  # after recovery read the old ones
        if not self._records_ok:
            event("io_error", "cannot write .ingestd/inflight: a crash will count an attempt for every claimed file",
                  logging.WARNING)
        # The watch goes up before the scan, so nothing arriving in between is missed. Polling where inotify cannot
        # see other machines' writes (NFS, CIFS, FUSE...: ingestd/watchmode.py), decided once, here.
        self.watch_choice = choose(self.s.watch, self.spool.unprocessed)
        self.watch = self._open_watch()
        self._rescan("startup")
        host, port = self.s.host_port
        try:  # bound before the workers start: a port in use fails fast, with nothing to clean up
            self.web = Web(host, port, self.metrics.registry, self.status, self.health)
        except OSError as e:
            raise cannot_listen(self.s.listen, e) from None
        self.pool = Pool(self.s, self.spool, self.clock)
        # A stop signal while the workers start (a plug-in hanging at import) is acted on at once, not in 60 s.
        self.pool.start(wake=self._wake_r,
                        stopping=lambda: any(s in (signal.SIGTERM, signal.SIGINT) for s in self.signals))
        self._sync_poller()
        self._publish_view()  # a scrape that arrives at once must find a complete view (counts included)
        self.web.start()
        self.state.phase = "running"
        self._publish_view()
        self.notifier.ready()
        event("started", "ingestd started", version=__version__, watch_dir=str(self.spool.root.resolve()),
              listen=self.web.address, workers=self.s.workers, recovered=len(self.queue),
              waiting=len(self.arrivals), watch=self.watch_choice.kind, watch_reason=self.watch_choice.reason,
              poll_interval=self.s.poll_interval if self.watch_choice.kind == "polling" else None,
              watch_dir_created=self.created,
              # What it runs with beyond the defaults (a new user could not tell whether recursive was on)
              settings={k: v for k, v in self.s.changed().items() if k not in ("watch_dir", "listen", "workers")},
              unknown_env=unknown_env(os.environ) or None)
        if unknown := unknown_env(os.environ):
            event("unknown_setting", "INGESTD_ variables that name no setting are ignored (a typo?)", logging.WARNING,
                  variables=unknown)
        self._warn_unread_dotenv()
        if log.text_wanted("auto"):  # a person at a terminal (make run): one line saying where to look
            made = f" (made now: {self.created} did not exist)" if self.created else ""
            log.say(f"ingestd is watching {self.spool.root.resolve()}/unprocessed/{made} - status page "
                    f"http://{self.web.address}/ - press Ctrl-C to stop")

    def _warn_unread_dotenv(self) -> None:
        """.env lines that name a setting in another form than INGESTD_NAME (or MODE) are not read: said, with the
        form that is (`recursive = true` there is the config file's form: a new user saw nothing happen)."""
        if (found := dotenv_unread()) is not None:
            path, unread = found
            event("dotenv_not_read", "these .env lines name settings but are not read: in .env a setting is "
                  "INGESTD_<NAME>=value (MODE also works)", logging.WARNING, file=str(path), lines=sorted(unread),
                  use=[unread[k] for k in sorted(unread)])

    def _recover(self) -> None:
        requeued, quarantined = self.spool.recover(self.s.max_attempts, self.wall())
        for name in quarantined:
            self._count_failed(name, "poison: in progress during too many crashes", 0.0, None, recovered=True)
        if requeued or quarantined:
            self.metrics.restarts_recovered.inc()
        for name in requeued:
            job = self._job_in_flight(name, recovered=True)
            if job is None:
                continue
            self.queue.append(job)
            self.state.recovered()
            event("recovered", "recovered a file left in progress by a crash", file=display(name),
                  attempts=job.attempts)

    def _job_in_flight(self, name: str, recovered: bool = False) -> Job | None:
        try:
            st = os.lstat(os.path.join(self.spool.underprocess, name))
        except FileNotFoundError:
            return None
        return Job(name, st.st_size, self.wall(), attempts=self.spool.attempts(name), recovered=recovered)

    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signals.append(signum)  # handled in the main loop; the wakeup fd wakes its poll()

    # --- the main loop -----------------------------------------------------------------------------
    def run(self) -> None:
        try:
            try:
                self.startup()
            except StartInterrupted:
                self.state.phase = "stopping"  # a stop asked for during the start: stopped, as asked (exit 0)
                return
            while self.main_loop_once():
                pass
        finally:
            self.shutdown()

    def main_loop_once(self) -> bool:
        """One turn: wait, handle what woke us, hand out work, ping the watchdog. False when done."""
        assert self.watch is not None and self.pool is not None
        timeout = self._timeout_ms()
        self.waiting_until = self.clock() + timeout / 1000  # /healthz: waiting for work is alive, not stuck
        ready = self.poller.poll(timeout)
        now = self.clock()
        self.heartbeat = now
        self.waiting_until = None
        watched = False
        for fd, _ in ready:
            if fd == self.watch.fileno():
                watched = True
                with self._boundary("watch"):
                    self._on_watch(now)
            elif fd == self._wake_r:
                self._drain_signals()
            else:
                for slot, msg in self.pool.receive(fd):
                    with self._boundary("worker message"):  # each file's outcome has a boundary of its own
                        self._on_worker(slot, msg)
        if self._deferred and not watched:  # read by a listing: no longer in the kernel's queue, poll() cannot say
            with self._boundary("watch"):
                self._on_watch(now)
        if self.queue and not self.signals and self.state.phase == "running":
            with self._boundary("dispatch"):
                # A worker that just reported takes its next batch from the files claimed ahead at once: it does
                # not wait for this turn's acks, log lines and claims (the parent and the workers overlap).
                self._dispatch(now, claim=False)
        with self._boundary("housekeeping"):
            self._housekeeping(now)
        if self.state.phase == "stopping":
            if not self.pool.busy() or (self.stop_deadline is not None and now >= self.stop_deadline):
                return False
        else:
            with self._boundary("dispatch"):
                self._dispatch(now)
        self._watchdog(now)
        if now >= self.next_view or ready:
            self._publish_view()
        return True

    def _housekeeping(self, now: float) -> None:
        assert self.pool is not None
        if self.unacked:
            self._ack_commits()  # one fsync for this turn's commits, then they are announced
        if self.signals:
            self._handle_signals()
        self._supervise(now)
        try:
            self.pool.maintain(running=self.state.phase != "stopping")
        finally:
            self._sync_poller()  # whatever maintain got to: a closed fd must never stay in the poller
        self.arrivals.tick(now, self._stat)  # due settle/grace timers run now, not only when a worker is free
        if self.state.history_dirty and now >= self.next_history:
            # Here, every turn, not in _publish_view (once a second): _timeout_ms wakes the loop for this deadline,
            # and a save left to the view made each turn until then a poll(0) spin (tests/test_break_round8.py).
            self._save_history()
            self.next_history = now + HISTORY_EVERY
        if self.sweep:
            self._clean_folders(now)
        if now >= self.next_rescan:
            self._rescan("periodic")

    def _boundary(self, what: str, job: Job | None = None) -> _Boundary:
        """The failure boundary: an unexpected exception is logged with its traceback; the job it concerns
        (if any) is retried with backoff, or set aside after MAX_INTERNAL_ERRORS; the loop goes on."""
        return _Boundary(self, what, job)

    def _contain(self, what: str, job: Job | None, e: Exception) -> None:
        """What the boundary does with an exception it caught."""
        self.metrics.errors.inc()
        event("internal_error", f"unexpected error in {what}", logging.ERROR,
              error=f"{type(e).__name__}: {e}", traceback="".join(traceback.format_exception(e)),
              file=display(job.name) if job else None)
        if job is not None:
            self._retry_later(job, f"internal error: {type(e).__name__}: {e}")

    def _retry_later(self, job: Job, reason: str) -> None:
        """An internal error on this job: again after a backoff, or set aside after MAX_INTERNAL_ERRORS."""
        job.retries += 1
        if job.retries >= MAX_INTERNAL_ERRORS:
            with self._boundary("setting a file aside"):
                self._fail(job, Failure(f"{reason} ({job.retries} times)", attempts=job.retries), 0.0)
            return
        job.not_before = self.clock() + min(30.0, 2.0 ** job.retries)
        if job not in self.queue:
            self.queue.append(job)

    def _timeout_ms(self) -> int:
        assert self.pool is not None
        now = self.clock()
        if self._deferred:
            return 0  # changes read by a listing wait in memory: the next turn handles them
        deadlines = [self.next_rescan, now + IDLE_TURN]
        if (d := self.arrivals.next_deadline()) is not None:
            deadlines.append(d)
        if (when := self.sweep.next()) is not None:
            deadlines.append(when)
        if self.pool.idle() and self.state.phase == "running":
            if self.state.pause is not None and self.state.pause.until > now:
                deadlines.append(self.state.pause.until)
            elif self.queue:
                deadlines.append(max(now, min(j.not_before for j in self.queue)))
        if (r := self.pool.next_respawn()) is not None:
            deadlines.append(max(now + 0.05, r))
        if self.notifier.watchdog_interval:
            deadlines.append(self.next_watchdog)
        if self.state.history_dirty:
            deadlines.append(self.next_history)
        if self.stop_deadline is not None:
            deadlines.append(self.stop_deadline)
        if (k := self.pool.next_kill()) is not None:
            deadlines.append(k)
        if self.pool.busy():
            deadlines.append(now + PROGRESS_REFRESH)  # refresh STATUS=, the page, and look for stuck workers
        else:
            # The view changes with time while the loop is idle: a waiting file ages (the oldest-file gauge, an
            # alert's input), and the throughput falls as each completion leaves its window. Shown at most
            # HEARTBEAT late, as the idle loop once did; nothing waiting and nothing done for a minute: it stands
            # still, and the loop sleeps for IDLE_TURN (tests/test_break_hotpath.py).
            if len(self.arrivals):
                deadlines.append(now + HEARTBEAT)
            elif self.state.done_times:
                deadlines.append(max(now + HEARTBEAT, self.state.done_times[0][0] + THROUGHPUT_WINDOW))
        return max(0, int((min(deadlines) - now) * 1000) + 1)

    def _sync_poller(self) -> None:
        """The poller lives as long as the daemon; only the worker fds that changed are (un)registered."""
        assert self.watch is not None and self.pool is not None
        want = {self.watch.fileno(), self._wake_r, *self.pool.fds()}
        for fd in self._polled - want:
            self.poller.unregister(fd)
        for fd in want - self._polled:
            self.poller.register(fd, select.POLLIN)
        self._polled = want

    # --- arrivals ------------------------------------------------------------------------------------
    def _on_watch(self, now: float) -> None:
        """Handle what the watch says, and what listings read from it before (_deferred), in order. What the
        listings done here read waits for the next turn: a producer moving folders in faster than they are
        listed held one turn for the whole burst (no claims, signals or watchdog pings in between)."""
        assert self.watch is not None
        self._deferred.extend(self.watch.read())
        for _ in range(len(self._deferred)):
            c = self._deferred.popleft()
            if c.kind == "overflow":
                self.metrics.overflows.inc()
                event("overflow", "inotify queue overflowed: rescanning", logging.WARNING)
                self.arrivals.change(c, now)
                self._rescan("overflow")
            elif c.kind == "lost_watch":
                if not self.watch_lost:
                    event("watch_lost", "unprocessed/ went away: recreating it", logging.ERROR)
                self.watch_lost = True
                self._rescan("overflow")  # makes the folder again and watches it; retried each second until it can
                self._deferred.clear()  # read from the dead watch: the rescan has looked at the folder itself
                return
            elif c.kind == "dir_in":
                self._folder_in(c.name, now)
            elif c.kind == "dir_gone":
                self._folder_gone(c.name, now)
            elif c.kind == "gone" and self._still_there(c.name):
                # An event is a hint: the file it calls gone left a folder since replaced under the same name,
                # and a file of that name is in the new one (moved there: tests/test_break_round6.py). Forgotten,
                # it waited for the next rescan; seen afresh, as a listing would see it.
                self.arrivals.forget(c.name)
                self.arrivals.scanned([c.name], now)
            else:
                self.arrivals.change(c, now)

    def _still_there(self, name: str) -> bool:
        """A name the arrivals model knows (a file, or a done marker) that unprocessed/ still holds. Names the
        model already let go (our own claims' IN_MOVED_FROM: take() forgot them) cost no lstat."""
        known = name in self.arrivals.entries or (
            self.s.done_marker and name.endswith(DONE_SUFFIX) and name[: -len(DONE_SUFFIX)] in self.arrivals.markers)
        return known and os.path.lexists(os.path.join(self.spool.unprocessed, name))

    # --- folders inside unprocessed/ (issue 9) -------------------------------------------------------
    def _folder_in(self, rel: str, now: float) -> None:
        """A folder appeared in unprocessed/ (mkdir, cp -r, mv in). Default: left as it is, said once. Recursive:
        watched, then listed (the watch first, so a file made in between is seen either way), its files waiting
        like any others."""
        if hidden_path(rel):
            return  # a producer's hidden temp folder: never entered, like dot-files
        if not self.s.recursive:
            if "/" not in rel:
                self._note_folders({*self.folders_left, rel})
            return
        # No removal check here: a folder is removed only once the daemon emptied it (a claim from it, see
        # _claim); a producer's `mkdir batch`, then a pause past the quiet time before its first file, had its
        # folder removed under it (ENOENT: tests/test_break_dirs.py).
        files, subdirs = self.spool.files(self.spool.unprocessed, dirs=True, enter=self._enter, root=rel)
        self.arrivals.scanned(files, now)
        self._returned([rel, *subdirs], now)

    def _returned(self, folders: list[str], now: float) -> None:
        """Folders the daemon emptied that moved away and are back, under any name (`mv big big2`; out and in
        again): checked for removal like any emptied folder. A stat each, only while one is awaited."""
        for rel in folders:
            if not self.sweep.awaited():
                return
            ident = folder_id(os.path.join(self.spool.unprocessed, rel))
            if ident is not None and self.sweep.returned(ident, now):
                self._check_folder_at(rel, now + self.s.folder_quiet_time)

    def _folder_gone(self, rel: str, now: float, empty: bool = False) -> None:
        """A folder left unprocessed/: removed, or moved away. empty: we removed it (rmdir), so nothing was below
        it: no scan of every watch, waiting name and check for its subfolders (that made many one-file folders
        quadratic)."""
        if rel in self.folders_left:
            self._note_folders(self.folders_left - {rel})
        if self.watch is not None:
            self.watch.drop(rel, below=not empty)
        if empty:
            self.sweep.removed(rel)
            return
        self.sweep.gone(rel, now)
        self.arrivals.forget_under(rel)

    def _enter(self, rel: str) -> bool:
        """Watch a subfolder before it is listed (recursive mode). A watch the kernel refuses (the user's inotify
        watches used up) is said once and the folder is still listed: the periodic rescan finds what it misses."""
        assert self.watch is not None
        self._entered += 1
        if self._entered % DRAIN_EVERY == 0:
            self._deferred.extend(self.watch.read())  # handled after the listing (_on_watch), in order
        try:
            return self.watch.add(rel)
        except (WatchLimit, OSError) as e:
            if not self._watch_refused:
                event("io_error", "cannot watch a folder in unprocessed/; its files are found by the rescans",
                      logging.ERROR, folder=display(rel), reason=str(e), rescan_interval=self.s.rescan_interval)
                self._watch_refused = True
            return True

    def _note_folders(self, found: set[str]) -> None:
        """Default mode: the folders now in unprocessed/. Each new one is logged once (not at every rescan)."""
        for rel in sorted(found - self.folders_left):
            event("folder_left", "a folder in unprocessed/ is left as it is: only files are processed there (set "
                  "INGESTD_RECURSIVE=true, or recursive = true in the config, to process the files inside it, or "
                  "move the files themselves into unprocessed/)",
                  logging.WARNING, folder=display(rel))
        self.folders_left = found  # replaced, never changed in place: status() reads it from HTTP threads
        self.metrics.folders_left.set(len(found))

    def _check_folder_at(self, rel: str, when: float) -> None:
        """Look at the subfolder `rel` by `when` (monotonic): removed then if empty and quiet. Its identity is
        taken now (a statx; at each claim from it: a folder replaced under its name is the one emptied now), so
        a rename after that still finds it."""
        if rel:
            self.sweep.at(rel, when, folder_id(os.path.join(self.spool.unprocessed, rel)))
            self._keep_folders(self.clock())

    def _keep_folders(self, now: float, force: bool = False) -> None:
        """Keep the pending folders' identities in .ingestd/emptied (ingestd/emptied.py) for the next run, when they
        changed: at most once each FOLDER_RECHECK, or now at shutdown (force). A hint: a lost update only leaves a
        folder the daemon emptied in unprocessed/, never removes a producer's, so no fsync and no more often."""
        changed, at = self._folders_kept
        if self.sweep.changed == changed or (not force and now < at + FOLDER_RECHECK):
            return  # nothing new (a daemon that never got its lock never writes), or saved within the second
        try:
            emptied.save(self.spool.state, self.sweep.idents())
        except OSError as e:
            event("io_error", "cannot keep the emptied folders for the next start", logging.DEBUG, reason=oserror(e))
            changed = -1  # retried in a second
        else:
            changed = self.sweep.changed
        self._folders_kept = (changed, now)

    def _clean_folders(self, now: float) -> None:
        """Recursive mode: remove subfolders of unprocessed/ the daemon emptied (only claims schedule a check)
        once empty and quiet (folder_quiet_time without a change); then their parents. A check whose folder is gone,
        or is another folder now (moved away, a new one made under its name), never removes what is there."""
        self._keep_folders(now)  # each turn while any is pending: the changes the last save held back (rate)
        due = self.sweep.due(now)
        if not due:
            return
        wall = self.wall()  # one clock for prune's verdict and the re-check below: two reads split a folder's fate
        removed = self.spool.prune(self.spool.unprocessed, [d.rel for d in due], quiet=self.s.folder_quiet_time,
                                   now=wall, expect={d.rel: d.ident for d in due if d.ident})
        for d in due:
            if d.rel in removed:
                event("folder_removed", "an emptied folder of unprocessed/ was removed", logging.DEBUG,
                      folder=display(d.rel))
                self._folder_gone(d.rel, now, empty=True)
                parent = os.path.dirname(d.rel)
                if parent:
                    self._check_folder_at(parent, now + self.s.folder_quiet_time)
                continue
            path = os.path.join(self.spool.unprocessed, d.rel)
            ident = folder_id(path)
            if not os.path.isdir(path) or (d.ident is not None and ident != d.ident):
                # Moved away, its events lost in an overflow or not read yet: remembered, and a rescan soon (not
                # in 30 s) lists the tree, where it may be under its new name.
                self.sweep.missing(d, now)
                self.next_rescan = min(self.next_rescan, now + FOLDER_RECHECK)
            elif self._empty(d.rel):
                # Empty but changed lately: look again when it will have been quiet for folder_quiet_time (prune's
                # own measure, its mtime/ctime: the claim's rename set them after this check was scheduled, and
                # waiting a whole quiet time more kept folders twice as long), and no later: a FOLDER_RECHECK floor
                # here added a second to most. Already quiet by prune's clock, so rmdir refused (EPERM: an
                # append-only parent; EBUSY: a mount point): a whole quiet time, never sooner than FOLDER_RECHECK
                # (with a quiet time of 0 this spun a core).
                wait = max(self.s.folder_quiet_time, FOLDER_RECHECK)
                try:
                    st = os.lstat(path)
                except OSError:
                    pass  # gone meanwhile: the next look says so
                else:
                    left = max(st.st_mtime, st.st_ctime) + self.s.folder_quiet_time - wall
                    wait = max(left, QUIET_SLACK) if left > 0 else wait
                self.sweep.at(d.rel, now + wait, ident)

    def _empty(self, rel: str) -> bool:
        try:
            with os.scandir(os.path.join(self.spool.unprocessed, rel)) as it:
                return next(it, None) is None
        except OSError:
            return False

    def _open_watch(self) -> Watcher:
        return open_watch(self.watch_choice.kind, self.spool.unprocessed, self.s.poll_interval)

    def _watch_replaced(self) -> bool:
        """unprocessed/ is now another folder than the one the inotify watch was opened on (removed and made again
        while an overflow dropped the watch's own IN_DELETE_SELF: deaf for good, every file left to the 30 s
        rescan; tests/test_break_round5.py)."""
        ident = getattr(self.watch, "ident", None)  # the polling watcher lists by path: never stale
        return ident is not None and folder_id(self.spool.unprocessed) not in (None, ident)

    def _rewatch(self) -> None:
        assert self.watch is not None
        old = self.watch
        self.watch = self._open_watch()  # the new one first: a failure keeps the old
        self._polled.discard(old.fileno())
        self.poller.unregister(old.fileno())
        old.close()
        self._sync_poller()

    def _rescan(self, reason: str) -> None:
        # First: a failing rescan must not repeat each turn. A lost watch is retried each second (the folder may
        # be removed again while it is made: rm -rf still running), not after the 30 s safety net.
        self.next_rescan = self.clock() + (WATCH_RETRY if self.watch_lost else self.s.rescan_interval)
        self.metrics.rescans.labels(reason).inc()
        try:
            made = self.spool.ensure()  # a folder removed by hand (rm -rf failed/) comes back
            self._make_output_folders(self.outputs)
            self.spool.check_lock()  # a watch dir made again is locked again; AlreadyRunning ends this daemon
            known = self.watch_lost or self.spool.unprocessed in made
            if known or self._watch_replaced():  # a new folder under the old name: the old watch sees nothing
                if not known:
                    event("watch_lost", "unprocessed/ was removed and made again while events were lost: "
                          "watching the new one", logging.ERROR)
                self._rewatch()
                self.watch_lost = False
        except AlreadyRunning:
            raise
        except (SpoolError, OSError) as e:
            self._back_off(None, str(e), "a queue folder cannot be made; claiming waits")
            return
        if made:
            event("folders_recreated", "queue folders were missing and are made again", logging.WARNING,
                  folders=made)
        self.state.kept = self.spool.kept(self.s.recursive, self.outputs)  # results in folders count (recursive)
        now = self.clock()
        if self.s.recursive:
            # Each subfolder watched before it is listed (inotify(7): watches are not recursive).
            # Folders emptied by hand or copied in empty stay: only the daemon's claims schedule a removal, and at
            # start-up the folders a run before this one emptied (a mirror in underprocess/, processed/ or failed/
            # made after the folder itself says so; a crash or stop came before their removal).
            files, subdirs = self.spool.files(self.spool.unprocessed, dirs=True, enter=self._enter)
            self.arrivals.scanned(files, now)
            self._returned(subdirs, now)  # a folder moved back while events overflowed
            if reason == "startup":
                # The identities the last run kept (.ingestd/emptied): its emptied folders under any name now.
                kept = emptied.load(self.spool.state)
                for rel in subdirs:
                    path = os.path.join(self.spool.unprocessed, rel)
                    if (kept and folder_id(path) in kept) or self._emptied_before(rel):
                        self._check_folder_at(rel, now + self.s.folder_quiet_time)
        else:
            files, folders = Spool.split(self.spool.unprocessed)
            self.arrivals.scanned(files, now)
            self._note_folders(set(folders))

    def _emptied_before(self, rel: str) -> bool:
        """At start-up: did a run before this one empty the subfolder `rel` of unprocessed/ (a crash or stop came
        before its removal)? Yes when a mirror of it in underprocess/, processed/ or failed/ was made after the
        folder itself (birth times): the daemon made the mirror for files it took from this very folder. A
        producer's new folder named like an earlier batch, whose results are still in processed/, was born after
        their mirror: never removed (it was, once). No birth time: not known, kept."""
        src = born(os.path.join(self.spool.unprocessed, rel))
        if src is None:
            return False
        for folder in (self.spool.underprocess, self.spool.processed, self.spool.failed):
            mirror = born(os.path.join(folder, rel))
            # >=: both made within one tick of the file system's clock (a script, a test) have equal birth times.
            if mirror is not None and stat.S_ISDIR(mirror.mode) and mirror.btime_ns >= src.btime_ns:
                return True
        return False

    def _stat(self, name: str) -> tuple[int, int] | None:
        try:
            st = os.lstat(os.path.join(self.spool.unprocessed, name))
        except (FileNotFoundError, NotADirectoryError):  # ENOTDIR: its folder became a file (mv batch away; a file)
            return None
        return st.st_size, st.st_mtime_ns

    # --- handing out work ------------------------------------------------------------------------------
    def _dispatch(self, now: float, claim: bool = True) -> None:
        """Hand a batch to each idle worker: jobs already claimed first, then (if `claim`) newly claimed files;
        then, while every worker is busy, claim their next batches ahead (_claim_ahead)."""
        assert self.pool is not None
        idle = self.pool.idle()
        pause = self.state.pause
        if pause is not None and pause.kind is PauseKind.IO_ERROR and now >= pause.until:
            self.state.unpause()  # the backoff is over: try again (a new error pauses longer)
        ahead = claim and not idle and bool(self.arrivals.ready) and bool(self.pool.busy())
        if not (idle or ahead) or self.state.paused(now) or not self._space_ok(now):
            return
        if idle and not self.queue and not self.arrivals.ready:
            self._steal(len(idle))
        for slot in idle:
            # A batch each, so that many small files share one group commit; one file when few wait.
            waiting = len(self.queue) + len(self.arrivals.ready)
            target = max(1, min(MAX_BATCH, -(-waiting // len(idle))))
            batch: list[Job] = []
            size = 0
            while len(batch) < target and size < BATCH_BYTES:
                job = self._next_job(now, claim)
                if job is None:
                    break
                batch.append(job)
                size += job.size
            if not batch:
                break
            assigned = False
            try:
                assigned = self.pool.assign(slot, batch, now, self.wall())
            finally:
                # Not handed over (the worker died in between: its death is handled next turn; or a bug, which the
                # boundary reports): back to the queue, or the batch stayed in underprocess/ in no one's hands.
                if not assigned:
                    for job in reversed(batch):
                        job.not_before = now
                        self.queue.appendleft(job)
            if not assigned:
                continue
            for job in batch if log.logger.isEnabledFor(logging.DEBUG) else ():
                # DEBUG: one log line per file (processed or failed, which carry claimed_at); 28% of the parent's
                # time under load was spent formatting log lines (py-spy, docs/benchmarks.md).
                event("claimed", "claimed", logging.DEBUG, file=display(job.name), bytes=job.size, worker=slot.id,
                      attempts=job.attempts or None, recovered=job.recovered or None)
        if claim:
            self._claim_ahead(now)

    def _claim_ahead(self, now: float) -> None:
        """Every worker busy: claim the next batch of each now (up to MAX_BATCH files, BATCH_BYTES bytes a worker),
        into the queue, so that a worker reporting its batch gets the next one in the same turn. Without it, one
        worker on tmpfs waited for the parent's acks, log lines and claims after each batch: the two ran in series
        (docs/benchmarks.md). A file claimed ahead is in underprocess/ as any claimed file is: a crash recovers it
        (no attempt counted, no worker was on it), a stop returns it to unprocessed/."""
        assert self.pool is not None
        if not (self._records_ok and self.pool.records_ok):
            return  # a crash would charge every claimed file an attempt: files no worker holds wait unclaimed
        busy = len(self.pool.busy())
        if not busy or self.pool.idle() or not self.arrivals.ready or self.state.paused(now):
            return
        files, size = len(self.queue), sum(j.size for j in self.queue)
        while files < busy * MAX_BATCH and size < busy * BATCH_BYTES:
            job = self._claim_next(now)
            if job is None:
                return
            self.queue.append(job)
            files, size = files + 1, size + job.size

    def _steal(self, idle: int) -> None:
        """Nothing waits and workers are idle: take back unstarted files from the fullest busy batches."""
        assert self.pool is not None
        for _ in range(idle):
            busy = self.pool.busy()
            if not busy:
                return
            victim = max(busy, key=lambda s: len(s.batch) - s.on)
            taken = self.pool.steal(victim)
            if not taken:
                return
            for job in reversed(taken):
                self._requeue(job)

    def _next_job(self, now: float, claim: bool = True) -> Job | None:
        """A claimed job whose backoff is over, else (if `claim`) a newly claimed file, else None."""
        while (job := next((j for j in self.queue if j.not_before <= now), None)) is not None:
            self.queue.remove(job)
            if os.path.lexists(os.path.join(self.spool.underprocess, job.name)):
                return job  # else it was committed or removed meanwhile: nothing left to do
        return self._claim_next(now) if claim else None

    def _claim_next(self, now: float) -> Job | None:
        """The next complete arrival, claimed: a Job, or None when none can be claimed now."""
        while taken := self.arrivals.take(1, now, self._stat):  # a busy or gone name does not use up the slot
            with self._boundary("claim"):
                claimed = self._claim(taken[0], now)
                if claimed is not None:
                    self._drop_stale(claimed.name)
                    return claimed
            if self.state.paused(now):
                return None  # the claim failed with an I/O error: claiming is paused
        return None

    def _drop_stale(self, name: str) -> None:
        """NAME was just claimed, so no file of that name was in underprocess/: a queued job of that name (claimed
        ahead or waiting for a retry, its file removed by hand) is stale. Kept, its check (the name exists) passed
        on the new file, and both went to one worker, which redid the file (tests/test_break_ahead.py)."""
        for job in [j for j in self.queue if j.name == name] if self.queue else ():
            self.queue.remove(job)

    def _claim(self, r: Ready, now: float) -> Job | None:
        """Claim r.name: a Job, or None if it was not claimed (the arrivals model is told why)."""
        name = r.name
        src = os.path.join(self.spool.unprocessed, name)
        try:
            st = os.lstat(src)
        except (FileNotFoundError, NotADirectoryError):  # gone, or its folder is a file now: its events say what is
            return None
        if stat.S_ISDIR(st.st_mode):
            # A folder where a file was (removed and made again under the same name): never claimed or moved.
            self._folder_in(name, now)
            return None
        try:
            if not stat.S_ISREG(st.st_mode):
                self.spool.fail(name, Failure(f"not a regular file: {kind(st.st_mode)}"), self.wall(),
                                source=self.spool.unprocessed)
                self._count_failed(name, f"not a regular file: {kind(st.st_mode)}", 0.0, None)
                return None
            claimed = self.spool.claim(name, settled=r.settled)
        except OSError as e:
            if e.errno == errno.ENAMETOOLONG and "/" in name:
                # Its path fits under unprocessed/ but not under underprocess/ (one byte longer) or a mirrored
                # folder there: it can never be claimed, and waited for ever. failed/ is shorter: set it aside.
                reason = ("path too long to claim: underprocess/ plus its path passes PATH_MAX (4096 bytes); "
                          "shorten its folders and requeue it")
                try:
                    self.spool.fail(name, Failure(reason), self.wall(), source=self.spool.unprocessed)
                except OSError:
                    pass  # it stays queued and is retried below
                else:
                    self._count_failed(name, reason, 0.0, None)
                    return None
            if e.errno in (errno.EPERM, errno.ENAMETOOLONG):
                # This entry's own doing (an immutable or append-only file: chattr +i/+a; a path deeper than
                # PATH_MAX inside folders that failed/ cannot take either): it waits and is looked at again with a
                # backoff of its own; the rest of the queue flows on.
                if not r.retry:
                    event("io_error", "cannot claim this file; it stays queued and is retried", logging.ERROR,
                          file=display(name), reason=oserror(e))
                self.arrivals.busy(r, now)
                return None
            # EIO/ENOSPC on the claim rename or on quarantining a non-file must not kill the daemon: the entry
            # stays in unprocessed/, is looked at again, and claiming pauses (tests/torture/test_errors.py, eio).
            self.arrivals.scanned([name], now)
            self._back_off(name, oserror(e), "could not claim a file; it stays queued")
            return None
        if claimed is Claim.BUSY:  # a writer still holds it open: not complete, whatever the events said
            self.arrivals.busy(r, now)
            if not r.retry:  # once per file, not at each re-check
                event("busy", "complete by its events, but a writer holds it open: waiting", file=display(name))
            return None
        if claimed is Claim.UNSURE:  # no lease possible on it here: the settle check decides instead
            self.arrivals.unsure(r, now)
            return None
        if not claimed:
            if os.path.lexists(os.path.join(self.spool.underprocess, name)) or (
                    "/" in name and os.path.lexists(src)):
                # The same name is still in flight (or a file named like its folder: "batch" beside "batch/a"):
                # take the new one after the old one commits.
                self.arrivals.scanned([name], now)
            return None
        job = Job(name, st.st_size, self.wall(), complete_at=r.complete_at)  # from here on it must not be lost
        if "/" in name:  # its folder may be empty now: removed once quiet
            self._check_folder_at(os.path.dirname(name), now + self.s.folder_quiet_time)
        with self._boundary("after a claim"):
            if self.s.done_marker:
                self.spool.remove_marker(name + DONE_SUFFIX)
            self.metrics.wait.observe(max(0.0, self.wall() - st.st_ctime))  # ctime: when it arrived
            self.metrics.pickup.observe(max(0.0, now - r.complete_at))
        return job

    def _space_ok(self, now: float) -> bool:
        """Backpressure: below min_free_bytes (or out of inodes) claim nothing; resume by itself."""
        st = os.statvfs(self.spool.root)
        if st.f_blocks == 0:  # no size reported (ramfs, some FUSE): "0 free" means unknown, never "full"
            return True
        free = st.f_bavail * st.f_frsize
        low_inodes = st.f_files > 0 and st.f_favail < 64
        pause = self.state.pause
        if free >= self.s.min_free_bytes and not low_inodes:
            if pause is not None and pause.kind is PauseKind.LOW_DISK:
                self.state.unpause()
            return True
        reason = f"low disk space: {free} bytes free, min_free_bytes is {self.s.min_free_bytes}" if not low_inodes \
            else f"low disk space: {st.f_favail} inodes free"
        self.state.pause_for(PauseKind.LOW_DISK, reason, now + 1.0)
        return False

    def _back_off(self, name: str | None, reason: str, message: str) -> None:
        """The machine's fault: pause claiming for a while that doubles with each error; a success resets it."""
        wait = self.state.back_off(reason)
        event("io_error", message, logging.ERROR, file=display(name) if name is not None else None, reason=reason,
              retry_in=wait)

    # --- results --------------------------------------------------------------------------------------
    def _on_worker(self, slot: Slot, msg: ToParent | None) -> None:
        assert self.pool is not None
        self._backed_off = False
        if msg is None:
            self._on_worker_death(slot)
            return
        if not isinstance(msg, Outcomes):
            return
        if not msg.final:  # files committed ahead of a slow one: the worker keeps the rest of its batch
            self._take_outcomes(slot.id, msg, self.pool.settle(slot, [n for n, _ in msg.results]))
            return
        if slot.kill_reason is not None and slot.kill_at is not None:  # it finished within its grace: no kill
            event("worker_reprieved", "a worker thought stuck finished its batch: not killed", logging.WARNING,
                  worker=slot.id, reason=slot.kill_reason)
            slot.kill_reason, slot.kill_at, slot.kill_kind = None, None, "died"
        for job in self._take_outcomes(slot.id, msg, self.pool.release(slot)[0]):
            self._requeue(job)  # not reached (taken back meanwhile, or the batch ended early): redo it

    def _take_outcomes(self, worker: int, msg: Outcomes, jobs: list[Job]) -> list[Job]:
        """Each reported file in its own failure boundary; returns the jobs of `jobs` no outcome named."""
        pending = {job.name: job for job in jobs}
        for name, outcome in msg.results:
            if (job := pending.pop(name, None)) is not None:
                with self._boundary("a file's outcome", job):
                    self._on_outcome(job, outcome, worker)
        return list(pending.values())

    def _requeue(self, job: Job) -> None:
        job.not_before = 0.0
        self.queue.appendleft(job)

    def _on_outcome(self, job: Job, msg: Outcome, worker: int) -> None:
        elapsed = msg.duration if isinstance(msg, Done) else self.clock() - job.started
        try:
            if isinstance(msg, Done):
                self.spool.commit(job.name, counted=job.attempts > 0 or job.recovered)
                self.unacked.append((job, msg, elapsed))  # announced once durable
            elif isinstance(msg, Rejected):
                self._fail(job, Failure(msg.reason, msg.line, job.attempts + 1), elapsed, worker=worker)
            elif isinstance(msg, Retry) and msg.recreate and job.retries < 3:
                job.retries += 1  # an output folder vanished: made again, retried at once, without a pause
                self._make_output_folders(self.outputs)
                event("folders_recreated", "an output folder was missing and is made again", logging.WARNING,
                      file=display(job.name), reason=msg.reason)
                self._requeue(job)
            elif isinstance(msg, Retry):
                self._io_error(job, msg.reason)
        except OSError as e:
            self._io_error(job, oserror(e))

    def _ack_commits(self) -> None:
        """One directory fsync makes all of this turn's commits durable; only then are they logged and counted
        as processed, so a power cut can never bring back a file the log already called done."""
        try:
            self.spool.sync_commits()
        except OSError as e:  # try again next turn; the acks wait (the outputs themselves are durable)
            self._back_off(self.unacked[0][0].name, oserror(e), "could not make commits durable; will retry")
            return
        acks, self.unacked = self.unacked, []
        with self._boundary("counting commits"):  # bookkeeping only: the commits themselves are durable
            self.state.processed_many(acks)
        for job, done, elapsed in acks:
            with self._boundary("announcing a commit"):
                self._announce(job, done, elapsed)

    def _announce(self, job: Job, done: Done, elapsed: float) -> None:
        event("processed", "processed", file=display(job.name), bytes=done.bytes_in, lines=done.lines_in,
              bytes_out=done.bytes_out, duration=round(elapsed, 6), worker=job.worker,
              claimed_at=round(job.claimed_at, 6), recovered=job.recovered or None)

    def _fail(self, job: Job, failure: Failure, elapsed: float, worker: int | None = None) -> None:
        self.spool.fail(job.name, failure, self.wall())
        self._count_failed(job.name, failure.reason, elapsed, worker, failure, job.recovered)

    def _count_failed(self, name: str, reason: str, elapsed: float, worker: int | None,
                      failure: Failure | None = None, recovered: bool = False) -> None:
        self.state.failed(name, reason, elapsed, recovered)
        event("failed", "failed", logging.WARNING, file=display(name), reason=reason,
              line=failure.line if failure else None, attempts=failure.attempts if failure else 1,
              duration=round(elapsed, 6), worker=worker)

    def _io_error(self, job: Job, reason: str) -> None:
        """Not the input's fault (disk full, read-only, EIO): keep the file claimed, pause, retry it first. The
        pause doubles once per message from a worker, not once per file of its batch (one full disk, one step)."""
        job.not_before = 0.0
        self.queue.appendleft(job)
        if self._backed_off:
            return
        self._backed_off = True
        self._back_off(job.name, reason, "could not finish a file; it is kept and retried")

    def _on_worker_death(self, slot: Slot) -> None:
        """The file it was on is blamed (an attempt); the rest of its batch is redone without one."""
        assert self.pool is not None
        jobs, index = self.pool.release(slot)
        job = jobs[index] if index < len(jobs) else None
        for other in jobs:
            if other is not job and os.path.lexists(os.path.join(self.spool.underprocess, other.name)):
                self._requeue(other)
        code = slot.process.exitcode
        why = slot.kill_reason
        self.metrics.workers_lost.labels(slot.kill_kind).inc()
        if not slot.ready:  # it never started: no file to blame; respawned after a backoff (Pool._died_at_start)
            if slot.start_news:  # its error once per change, not once per respawn
                event("worker_cannot_start", "a worker cannot start; retrying with a backoff", logging.ERROR,
                      worker=slot.id, error=slot.start_error)
            event("worker_died", "a worker died at start" if not why else "a worker that did not start was killed",
                  logging.ERROR, worker=slot.id, exitcode=code, retry_in=slot.start_delay, reason=why)
        elif why:
            event("worker_killed", "killed a stuck worker", logging.ERROR, worker=slot.id, reason=why,
                  file=display(job.name) if job else None)
        else:
            event("worker_died", "a worker died", logging.ERROR, worker=slot.id, exitcode=code,
                  file=display(job.name) if job else None)
        if slot.pid is not None:
            remove_temps(self.spool.processed, self.outputs, slot.pid)
        if job is None or not os.path.lexists(os.path.join(self.spool.underprocess, job.name)):
            return
        try:
            job.attempts = self.spool.bump_attempts(job.name)  # durable: a crash loop still ends in failed/
        except OSError as e:
            job.attempts += 1  # a full disk cannot record it: count in memory, keep going
            event("io_error", "could not record an attempt; counting it in memory", logging.ERROR,
                  file=display(job.name), reason=oserror(e))
        inflight.set_record(self.spool.state, slot.id, inflight.IDLE)  # counted here: a recovery must not again
        if job.attempts >= self.s.max_attempts:
            what = (f"its worker was stuck {job.attempts} times processing it ({why})" if why else
                    f"its worker died {job.attempts} times processing it (last exit code {code})")
            try:
                self._fail(job, Failure(f"poison: {what}", attempts=job.attempts), 0.0)
            except OSError as e:  # a full disk cannot take it into failed/ now: kept, retried after a pause
                self._io_error(job, oserror(e))
        else:
            self._requeue(job)

    def _supervise(self, now: float) -> None:
        """The parent notices stuck workers itself: no progress for stall_time, or over time_limit; it logs,
        shows, kills and replaces them (the death counts an attempt). The watchdog guards the main loop."""
        assert self.pool is not None
        for slot, what, reason in self.pool.stalled(now, self.s.stall_time, self.s.time_limit):
            event("worker_stuck", "a worker is stuck: dumping its stack, then killing it", logging.ERROR,
                  worker=slot.id, reason=reason, file=display(slot.job.name) if slot.job else None)
            self.pool.condemn(slot, what, reason, now)
        self.pool.execute(now)

    def _make_output_folders(self, outputs: list[str] | None = None) -> None:
        """Output folders of the current routing (rebuilt from it unless given), created again if removed."""
        self.outputs = outputs if outputs is not None else sorted({o.path for o in self.s.routing.outputs})
        for path in self.outputs:
            os.makedirs(os.path.join(self.spool.processed, path), exist_ok=True)

    # --- signals: stop and reload ----------------------------------------------------------------------
    def _drain_signals(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _handle_signals(self) -> None:
        assert self.pool is not None
        sigs, self.signals = self.signals, []
        for sig in sigs:
            if sig == signal.SIGHUP and self._terminal_hung_up():
                sig = signal.SIGTERM  # the terminal of `make run` closed: a hang-up, not a reload request
            if sig == signal.SIGHUP:
                self._reload()
            elif self.state.phase == "stopping":
                event("stopping", "second stop signal: abandoning current files now", logging.WARNING)
                self.stop_deadline = self.clock()
                self.abandon_reason = "second stop signal"
            else:
                self.state.phase = "stopping"
                self.notifier.stopping()
                # Our warm stop may outlast systemd's TimeoutStopSec: ask for the time it needs.
                self.notifier.extend_timeout(self.s.stop_timeout + 5)
                self.stop_deadline = self.clock() + self.s.stop_timeout
                busy = [display(j.name) for s in self.pool.busy() for j in s.batch if j.name not in s.done]
                event("stopping", "stopping: finishing current files" if busy else "stopping",
                      signal=signal.Signals(sig).name, in_progress=busy, timeout=self.s.stop_timeout)

    def _terminal_hung_up(self) -> bool:
        """SIGHUP means "reload" (systemctl reload), except when the terminal we run in went away (tty(4): after a
        hang-up, ioctls on the old descriptor fail with EIO); then it means what it always meant: stop."""
        if not self._on_tty:
            return False
        try:
            os.tcgetpgrp(sys.stderr.fileno())
        except OSError as e:
            return e.errno == errno.EIO
        except ValueError:
            return False
        return False

    def _reload(self) -> None:
        if self._reload_settings is None or self.state.phase == "stopping":
            return
        self.notifier.reloading()
        self.state.phase = "reloading"
        try:
            new = self._reload_settings()
        except ConfigError as e:
            event("reload_failed", "new configuration rejected; keeping the old one", logging.ERROR, error=str(e))
        else:
            self.s = dataclasses.replace(self.s, routing_doc=new.routing_doc, config=new.config)
            try:
                self._make_output_folders()
            except OSError as e:  # the workers recreate a missing folder when they publish; say it, go on
                event("io_error", "could not create the new output folders", logging.ERROR, reason=oserror(e))
            assert self.pool is not None
            self.pool.reconfigure(self.s)  # idle workers restart at the end of this turn, busy ones when done
            # A reload applies the routing alone: every other setting changed is said, not silently left as it was
            # (a new user raised folder_quiet_time, reloaded, and the old value went on).
            ignored = sorted(f.name for f in dataclasses.fields(self.s)
                             if f.name not in RELOADED and getattr(new, f.name) != getattr(self.s, f.name))
            event("reloaded", "routing reloaded" + ("; restart to apply the other settings changed" if ignored else ""),
                  logging.WARNING if ignored else logging.INFO,
                  config=str(self.s.config) if self.s.config else None, mode=self.s.routing_doc.get("mode"),
                  not_applied=ignored or None)
            self._warn_unread_dotenv()
        self.state.phase = "running"
        self.notifier.ready()

    # --- health, watchdog, status --------------------------------------------------------------------------
    def health(self) -> str | None:
        """None when healthy, else why: the main loop must turn (stuck workers are the loop's own business), at
        least one worker must be alive (if none can be started, a restart by systemd is the way out), and while files
        wait, one must have started (said Ready)."""
        now = self.clock()
        limit = 2 * max(HEARTBEAT, self.notifier.watchdog_interval or 0) + 1.0
        waiting = self.waiting_until
        # Waiting in poll() is idle, however long; a turn that takes too long, or a wait that overran its own
        # timeout (poll() returns by then), is stuck. Idle, the loop so wakes only for its timers (rescan,
        # watchdog): each wake-up costs milliseconds of a small VM's CPU (docs/benchmarks.md, 5.2).
        if now - (waiting if waiting is not None else self.heartbeat) > limit:
            return f"main loop silent for {now - self.heartbeat:.1f}s"
        if self.pool is not None and self.pool.slots and not self.pool.alive() and self.pool.spawn_error:
            return f"no worker is running; starting one fails: {self.pool.spawn_error}"
        # Files wait and every worker dies before its Ready (a plug-in that no longer loads in a new worker):
        # nothing will be processed until someone acts, so the watchdog and /healthz must say so.
        if (self.pool is not None and self.pool.start_error and not self.pool.started()
                and (self.queue or len(self.arrivals))):
            return f"no worker can start: {self.pool.start_error}"
        return None

    def _watchdog(self, now: float) -> None:
        interval = self.notifier.watchdog_interval
        if not interval or now < self.next_watchdog:
            return
        problem = self.health()
        if problem:
            if not self._withheld:
                event("watchdog_withheld", "not pinging the watchdog", logging.ERROR, reason=problem)
            self._withheld = True
        else:
            self._withheld = False
            self.notifier.watchdog()
        self.next_watchdog = now + interval

    def _publish_view(self) -> None:
        assert self.pool is not None
        now = self.clock()
        busy = self.pool.busy()
        self.state.publish(self.pool.view(now), len(self.arrivals), self.arrivals.oldest_seen(),
                           self.pool.in_flight() + len(self.queue) + len(self.unacked),
                           # claimed files not in a worker's hands (claimed ahead, waiting for a retry) age too
                           [s.job.started_wall for s in busy if s.job] + [j.claimed_at for j in self.queue],
                           self.health())
        self.notifier.status(self.state.status_line())
        self.next_view = now + PROGRESS_REFRESH

    def _save_history(self) -> None:
        """The page's recent history survives a restart (best effort: losing it loses no data)."""
        self.state.history_dirty = False
        try:
            history.save(str(self.spool.root), list(self.state.recent))
        except OSError as e:
            event("io_error", "could not save the recent history", logging.WARNING, reason=oserror(e))

    def snapshot(self) -> dict[str, Any]:
        return self.state.snapshot()

    def status(self) -> dict[str, Any]:
        return {"version": __version__, "started_at": self.state.started_at, "now": self.wall(),
                "watch_dir": str(self.spool.root.resolve()), **self.snapshot(),
                "failures": self.spool.failures(self.s.recent), "folders_left": self._folders_view(),
                "watch": {"kind": self.watch_choice.kind, "reason": self.watch_choice.reason,
                          "poll_interval": self.s.poll_interval if self.watch_choice.kind == "polling" else None}}

    def _folders_view(self) -> dict[str, Any]:
        """Folders left in unprocessed/ (default mode): how many, and the first `recent` names (escaped)."""
        names = sorted(self.folders_left)
        return {"count": len(names), "names": [display(n) for n in names[: self.s.recent]],
                "recursive": self.s.recursive}

    # --- shutdown ------------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stops whatever startup got to; safe after a partial start. Files not finished go back to the queue."""
        if self.pool is not None:
            for slot in self.pool.busy():  # an outcome already sent is taken, not redone after the restart
                for s, msg in self.pool.receive(slot.conn.fileno()):
                    with self._boundary("worker message at stop"):
                        self._on_worker(s, msg)
        if self.unacked:
            self._ack_commits()
        if self.state.history_dirty:
            self._save_history()
        for job in self.queue:
            self._unclaim(job)  # waiting for a retry (disk full...), not crashed: no attempt counted
        if self.pool is not None:
            for job, pid in self.pool.abandon():
                # Abandoned by a stop, not by a crash: back to the queue, no attempt counted.
                self._unclaim(job)
                if pid is not None:
                    remove_temps(self.spool.processed, self.outputs, pid)
                event("abandoned", f"{self.abandon_reason}: file returned to the queue", logging.WARNING,
                      file=display(job.name))
            inflight.prepare(self.spool.state, self.s.workers)  # a stop, not a crash: no attempt for anyone
        if self.web is not None:
            self.web.stop()
        if self.watch is not None:
            self.watch.close()
        self._keep_folders(self.clock(), force=True)  # the pending emptied folders, for the next start
        self._restore_signals()
        self.spool.unlock()
        if self.state.phase != "starting":
            event("stopped", "ingestd stopped", processed=self.state.totals["processed"],
                  failed=self.state.totals["failed"])

    def _unclaim(self, job: Job) -> None:
        try:
            returned = self.spool.unclaim(job.name)
        except OSError as e:  # it stays in underprocess/; recovery takes it at the next start
            event("io_error", "could not return a file to the queue", logging.ERROR, file=display(job.name),
                  reason=oserror(e))
            return
        if not returned:
            # Refused (a newer file of that name waits in unprocessed/, or the move failed): it stays in
            # underprocess/, where `ingestd status` lists it as in progress with no daemon running; say why.
            event("kept_claimed", "file left in underprocess/ (a newer file of that name waits in unprocessed/, or "
                  "it could not be moved back); the next start processes it first", logging.WARNING,
                  file=display(job.name))

    def _restore_signals(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers = {}
        if self._wake_w >= 0:
            signal.set_wakeup_fd(-1)
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1


class _Boundary:
    """Daemon._boundary as a plain context manager: entered several times per file, and a generator-based
    one (contextlib.contextmanager) cost ~1.5 µs each time, about 6% of the parent's time under load."""

    __slots__ = ("daemon", "job", "what")

    def __init__(self, daemon: Daemon, what: str, job: Job | None) -> None:
        self.daemon, self.what, self.job = daemon, what, job

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, e: BaseException | None, tb: object) -> bool:
        if e is None or not isinstance(e, Exception) or isinstance(e, AlreadyRunning):
            return False  # AlreadyRunning: another daemon owns the watch dir now; this one must stop, not retry
        self.daemon._contain(self.what, self.job, e)
        return True  # the loop goes on
