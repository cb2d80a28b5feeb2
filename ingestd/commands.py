"""The watch dir's one-shot commands: status and requeue (`ingestd process` is manual.py)."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import sys
from datetime import UTC, datetime
from typing import Any

from ingestd import history
from ingestd.cli import EX_IOERR, EX_NOPERM, EX_UNAVAILABLE, plural, to_devnull
from ingestd.names import DONE_SUFFIX, display, ignored, oserror
from ingestd.settings import ConfigError, Settings
from ingestd.spool import FOLDERS, RECURSIVE_NOTE, FolderError, NotAWatchDir, Spool

BROKER_TIMEOUT = 5.0  # seconds `status` waits for Redis to accept and to answer


def status(settings: Settings, as_json: bool) -> int:
    """`ingestd status`: what the folders hold, read without a daemon (or beside one). Exit 0; 77 (EX_NOPERM) or
    74 (EX_IOERR) when a folder cannot be read, naming it; ConfigError (78) when the folder is no watch dir.
    Times are printed in UTC with their offset, as the log writes them.

    With a broker (--broker or INGESTD_BROKER: a cluster, docs/distributed.md) the cluster's state in Redis follows
    the folders: the worker nodes (their files in hand, heartbeat age, MISSING past three lease times), the queue
    depth and whether a scanner holds the lock. Redis unreachable (refused, no answer within BROKER_TIMEOUT
    seconds, a password refused): the folders are still printed, then one line on stderr, exit 69
    (EX_UNAVAILABLE); a URL redis-py cannot parse, or the extra not installed: ConfigError (78)."""
    try:
        spool = _existing(settings)
        holder = spool.holder()
        if holder is not None and not settings.broker:
            # A running daemon's own setting decides what waits (its .env may differ from this shell's): its
            # folders counted as it counts them, never "set recursive = true" to a daemon that has it.
            settings = dataclasses.replace(settings, recursive=Spool.noted(holder, RECURSIVE_NOTE))
        report = _report(settings, spool)
    except FolderError as e:
        return _refused(e)
    unreachable = None
    if settings.broker:
        report |= _cluster(settings.broker, settings.lease_time)
        unreachable = report["broker_error"]
    if as_json:
        lines = [json.dumps(report, indent=1)]
    else:
        lines = _text(report)
    try:
        for line in lines:
            print(line)
        sys.stdout.flush()  # inside the try: a reader that has gone (`| head`) must not cost a traceback at exit
    except BrokenPipeError:
        # The reader took what it wanted; point stdout at /dev/null so the interpreter's final flush is quiet.
        to_devnull(sys.stdout)
    if unreachable:
        print(f"ingestd: broker: cannot read the cluster's state from {report['broker']}: {unreachable}",
              file=sys.stderr)
        return EX_UNAVAILABLE
    return 0


def _cluster(url: str, lease_time: float) -> dict[str, Any]:
    """The cluster's part of `status` (the fields named as in the scanner's /api/status): broker (the URL, its
    password hidden), scanner_active (a scanner holds the lock), queue_messages, nodes (Ledger.nodes(): node,
    host, pid, processes, current [{file, since}], listen, heartbeat_age, missing), broker_error (None, or why
    Redis could not be read: then the others are None). Raises ConfigError for a URL redis-py refuses or without
    the distributed extra."""
    try:
        import redis

        from ingestd.distributed import queue
        from ingestd.distributed.ledger import Ledger
    except ImportError:
        raise ConfigError("broker: the distributed mode needs its extra: .venv/bin/pip install -e '.[distributed]' in the ingestd checkout (docs/distributed.md)") from None
    out: dict[str, Any] = {"broker": safe_url(url), "scanner_active": None, "queue_messages": None, "nodes": None,
                           "broker_error": None}
    try:
        client = redis.Redis.from_url(url, socket_timeout=BROKER_TIMEOUT, socket_connect_timeout=BROKER_TIMEOUT)
    except ValueError as e:
        raise ConfigError(f"broker: {safe_url(url)} is not a Redis URL redis-py can use: {e}") from None
    try:
        ledger = Ledger(client, lease_time)
        out["nodes"] = ledger.nodes()
        out["queue_messages"] = queue.depth(client)
        out["scanner_active"] = bool(client.exists(ledger.k("scanner")))
    except redis.RedisError as e:
        out |= {"nodes": None, "queue_messages": None, "scanner_active": None,
                "broker_error": str(e) or type(e).__name__}
    finally:
        client.close()
    return out


def safe_url(url: str) -> str:
    """A broker URL without its password (user and password alike), for output and logs."""
    head, at, tail = url.rpartition("@")
    return head.split("//", 1)[0] + "//***@" + tail if at else url


def _report(settings: Settings, spool: Spool) -> dict[str, Any]:
    """The fields `status --json` shares with /api/status have its shape (docs/api.md): watch_dir, counts,
    recent (the daemon's entries: file, result, duration, finished_at, reason, seq), failures (sidecar records)."""
    try:
        outputs = {o.path for o in settings.routing.outputs}
        counts = spool.counts(settings.recursive, outputs)
        # Folders are never claimed: with recursive on, the files inside them wait; off, they are left as they are.
        names, folders = Spool.split(spool.unprocessed)
        if settings.recursive:
            names, folders = spool.files(spool.unprocessed), []
        counts["unprocessed"] = _waiting(settings, names)
        unmarked = _unmarked(settings, names)
        daemon = spool.holder()
        return {
            "watch_dir": _shown(spool),
            "daemon": daemon,
            "counts": counts,
            "not_counted": None if daemon is not None else _not_counted(settings, spool, counts, outputs),
            "folders_left": {"count": len(folders), "names": [display(n) for n in sorted(folders)[: settings.recent]],
                             "recursive": settings.recursive},
            "in_progress": [display(n) for n in sorted(spool.files(spool.underprocess))],
            # done_marker: what waits for its NAME.done (a new user saw only a count, and could not tell why)
            "awaiting_marker": {"count": len(unmarked), "names": [display(n) for n in unmarked[: settings.recent]]}
            if settings.done_marker else None,
            # The daemon's own history (ordered by its sequence) when it kept one, else what processed/ holds.
            # A cluster's folder (.ingestd/cluster-id): a single-machine daemon's old history would stand for ever.
            "recent": (([] if os.path.exists(os.path.join(spool.state, "cluster-id"))
                        else history.load(str(spool.root))[: settings.recent]) or spool.completions(settings.recent)),
            "failures": spool.failures(settings.recent),
        }
    except PermissionError as e:  # a folder or the state dir readable at the probe and no longer now
        raise FolderError(e.filename or str(spool.root), e) from None


def _shown(spool: Spool) -> str:
    """The watch dir's absolute path; the path as given when it has none: relative, from a working directory since
    removed (resolve() asks os.getcwd(): ENOENT), while the kernel still resolves it from there."""
    try:
        return str(spool.root.resolve())
    except OSError:
        return str(spool.root)


def _waiting(settings: Settings, names: list[str]) -> int:
    """How many of these names in unprocessed/ wait. Names the daemon never claims (dot-files, *.tmp, *.part...)
    do not, nor with done_marker the NAME.done markers themselves (they vouch for a file, they are none); the daemon
    counts the same."""
    return sum(1 for n in names if not ignored(n) and not (settings.done_marker and n.endswith(DONE_SUFFIX)))


def _unmarked(settings: Settings, names: list[str]) -> list[str]:
    """With done_marker: the waiting names of `names` (unprocessed/) without their NAME.done yet, sorted."""
    if not settings.done_marker:
        return []
    present = set(names)
    return sorted(n for n in names if not ignored(n) and not n.endswith(DONE_SUFFIX) and n + DONE_SUFFIX not in present)


def _not_counted(settings: Settings, spool: Spool, counts: dict[str, int], outputs: set[str]) -> dict[str, Any] | None:
    """No daemon runs, and `counts` were made with recursive off (this shell's settings), while the last daemon here
    ran with it on (its label stays in .ingestd/lock after it stops): what that daemon counted besides, {"processed":
    results in folders of processed/ (routed output folders this shell knows of left out), "unprocessed": files
    waiting in folders of unprocessed/, "last_daemon": its label ("pid N on HOST, recursive")}. None when nothing is
    left out, or there is no such evidence: then subfolders of processed/ are routed outputs, never counted. With a
    broker the label is not the cluster's (its scanner takes no lock here): None."""
    if settings.recursive or settings.broker:
        return None
    last = spool._label()  # the label, kept after the daemon stops (holder() gives it only while the lock is held)
    if not Spool.noted(last, RECURSIVE_NOTE):
        return None
    processed = spool.kept(True, outputs)["processed"] - counts["processed"]
    unprocessed = _waiting(settings, spool.files(spool.unprocessed)) - counts["unprocessed"]
    if processed <= 0 and unprocessed <= 0:
        return None
    return {"processed": max(0, processed), "unprocessed": max(0, unprocessed), "last_daemon": last}


def _text(report: dict[str, Any]) -> list[str]:
    out = [f"watch dir   {report['watch_dir']}",
           f"daemon      {'running (' + report['daemon'] + ')' if report['daemon'] else 'not running'}",
           "folders     " + "  ".join(f"{f} {report['counts'][f]}" for f in FOLDERS),
           *([_not_counted_line(report["not_counted"])] if report.get("not_counted") else []),
           _claimed_line(report),
           *([_marker_line(report["awaiting_marker"])] if (report.get("awaiting_marker") or {}).get("count") else []),
           *([_folders_line(report["folders_left"], "broker" in report)] if report["folders_left"]["count"] else []),
           *(_cluster_lines(report) if "broker" in report else []),
           "recent completions (UTC):" if report["recent"] else "recent completions: none"]
    out += [f"  {when(c['finished_at'])}  {c['file']}" + (f"  FAILED: {c.get('reason')}" if c.get("result") == "failed"
                                                        else "") + ("  (recovered)" if c.get("recovered") else "")
            for c in report["recent"]]
    out.append("recent failures (UTC):" if report["failures"] else "recent failures: none")
    for f in report["failures"]:
        line = f" (line {f['line']})" if f.get("line") else ""
        out.append(f"  {when(f.get('failed_at_unix'))}  {f['name']}: {f['reason']}{line}, "
                   f"attempts {f.get('attempts') or '?'}")
    return out


def _not_counted_line(left: dict[str, Any]) -> str:
    """Under the counts: what the last daemon, recursive, counted besides, why not here, and how to count it."""
    what = [f"{plural(left['processed'], 'result')} in folders of processed/" if left["processed"] else "",
            f"{plural(left['unprocessed'], 'file')} waiting in folders of unprocessed/" if left["unprocessed"] else ""]
    who = left["last_daemon"].removesuffix(", " + RECURSIVE_NOTE)
    return (f"not counted {', '.join(filter(None, what))} (recursive is off here; the last daemon, {who}, ran with "
            "it on: INGESTD_RECURSIVE=true ingestd status counts them)")


def _marker_line(waiting: dict[str, Any]) -> str:
    """done_marker: the files that wait for their marker, and what would release each."""
    n, names = waiting["count"], waiting["names"]
    return (f"no marker  {plural(n, 'file')} wait for NAME.done (done_marker is on): " + ", ".join(names)
            + (", ..." if n > len(names) else ""))


def _claimed_line(report: dict[str, Any]) -> str:
    """The files in underprocess/: in progress while a daemon (or a cluster's nodes) holds them; with no daemon
    running, left there by a crash or a stop that could not give them back, and taken first at the next start."""
    names = ", ".join(report["in_progress"]) or "none"
    if report["daemon"] or "broker" in report or not report["in_progress"]:
        return "in progress " + names
    return f"left claimed {names} (no daemon is running: its next start takes them first)"


def _cluster_lines(report: dict[str, Any]) -> list[str]:
    """broker, queue and one line per node: name, processes, heartbeat age, MISSING, its files and how long each
    has run (by this machine's clock)."""
    if report["broker_error"]:
        return [f"broker      {report['broker']}: unreachable (see below)"]
    depth = report["queue_messages"]
    out = [f"broker      {report['broker']}, "
           + ("a scanner is active" if report["scanner_active"] else "NO ACTIVE SCANNER (files are not claimed)"),
           f"queue       {plural(depth, 'message')} (queued, delayed or in a node's hands)"]
    nodes = report["nodes"]
    if not nodes:
        return [*out, "nodes       none (no worker node has sent a heartbeat)"]
    missing = sum(1 for n in nodes if n.get("missing"))
    out.append(f"nodes       {len(nodes)}" + (f" ({missing} MISSING)" if missing else ""))
    now = datetime.now(UTC).timestamp()
    width = max(len(str(n.get("node"))) for n in nodes)
    for n in nodes:
        current = [f"{c.get('file')} ({_age(now - c['since']) if isinstance(c.get('since'), (int, float)) else '?'})"
                   for c in n.get("current") or []]
        procs = n.get("processes")
        out.append(f"  {n.get('node')!s:<{width}}  {procs} process{'' if procs == 1 else 'es'}, heartbeat "
                   f"{_age(n.get('heartbeat_age'))} ago" + ("  MISSING" if n.get("missing") else "")
                   + ": " + (", ".join(current) or "idle"))
    return out


def _age(seconds: Any) -> str:
    """A short age for people: "0.4 s", "12 s", "3 min 2 s", "4 h 10 min", "2 d 3 h"; "?" when unknown."""
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return "?"
    v = max(0.0, float(seconds))
    if v < 10:
        return f"{v:.1f} s"
    s = int(v)
    if s < 3600:
        return f"{s} s" if s < 60 else f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min" if s < 86400 else f"{s // 86400} d {s % 86400 // 3600} h"


def _folders_line(left: dict[str, Any], cluster: bool = False) -> str:
    """Folders in unprocessed/ that recursive = false (or a cluster, which claims files only) leaves alone, and what
    to do about them."""
    n = left["count"]
    why = "a cluster claims files only: move the files in" if cluster else \
        "recursive is off: set INGESTD_RECURSIVE=true (or recursive = true in the config), or move the files in"
    return (f"left alone  {n} folder{'s' if n > 1 else ''} in unprocessed/ ({why}): " + ", ".join(left["names"]) + (", ..." if n > len(left["names"]) else ""))


def requeue(settings: Settings, names: list[str]) -> int:
    """`ingestd requeue [NAME...]`: move failed files back to unprocessed/. A NAME may be given as `status` prints
    it (escaped). Exit 0 when every file was moved; 1 when one was not in failed/ or a file of that name waits in
    unprocessed/; 77 (EX_NOPERM) or 74 (EX_IOERR) when a folder cannot be read or written, naming it."""
    try:
        spool = _existing(settings, writable=("unprocessed", "failed"))
        in_failed = set(spool.files(spool.failed, sidecar_dirs=True))  # "batch/a.txt" from a folder too
    except FolderError as e:
        return _refused(e)
    shown = {display(n): n for n in in_failed}
    wanted: list[str] = []
    missing: list[str] = []
    for n in names:
        real = n if n in in_failed else shown.get(n)  # as typed, or as status printed it (escapes)
        inside = sorted(f for f in in_failed if f.startswith(n.rstrip("/") + "/")) if real is None else []
        if inside:
            wanted += inside  # a folder of failed/ (recursive mode): every file in it
        elif real is None:
            missing.append(n)
        else:
            wanted.append(real)
    for n in missing:
        print(f"ingestd: not in failed/: {display(n)}", file=sys.stderr)
    moved, refused = spool.requeue(wanted if names else None)
    if not names and not moved and not refused:
        print("nothing to requeue: failed/ holds no files")  # silence read as "did it do anything?"
    for n in moved:
        print(f"requeued {display(n)}")
    trouble = 0
    for n in refused:
        if os.path.lexists(os.path.join(spool.unprocessed, n)):
            why = "a file of that name is waiting in unprocessed/"
        elif not os.path.lexists(os.path.join(spool.failed, n)):
            why = "it left failed/ meanwhile (requeued or removed by someone else)"
        else:
            why = _why_not_moved(spool, n)
            trouble = trouble or (EX_NOPERM if "EACCES" in why or "EPERM" in why else EX_IOERR)
        print(f"ingestd: not requeued ({why}): {display(n)}", file=sys.stderr)
    return trouble or (1 if missing or refused else 0)


def _why_not_moved(spool: Spool, name: str) -> str:
    """Why a rename out of failed/ failed, asked of the kernel again (Spool.requeue keeps no errno)."""
    for folder in (spool.failed, spool.unprocessed):
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"cannot write to {folder}: {oserror(PermissionError(errno.EACCES, os.strerror(errno.EACCES)))}"
    try:
        os.lstat(os.path.join(spool.failed, name))
    except OSError as e:
        return f"cannot use {os.path.join(spool.failed, name)}: {oserror(e)}"
    return "the move was refused; see the permissions of failed/ and unprocessed/"


def _existing(settings: Settings, writable: tuple[str, ...] = ()) -> Spool:
    spool = Spool(settings.watch_dir, done_marker=settings.done_marker)
    try:
        spool.probe(writable)
    except NotAWatchDir as e:
        raise ConfigError(str(e)) from None
    return spool


def _refused(e: FolderError) -> int:
    print(f"ingestd: {e}", file=sys.stderr)
    return EX_NOPERM if e.errno in (errno.EACCES, errno.EPERM) else EX_IOERR


def when(ts: float | None) -> str:
    """A time for people: UTC with its offset, to the second, as the log shows it ("2026-11-30 16:14:05+00:00");
    "?" when unknown."""
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        return "?"
    return datetime.fromtimestamp(ts, UTC).isoformat(sep=" ", timespec="seconds")
