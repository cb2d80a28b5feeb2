"""Command line: run | process | status | requeue. Turns flags into Settings and user errors into exit codes."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ingestd import __version__
from ingestd.settings import ConfigError, Settings, load

# sysexits.h; a bad command line exits 2 (argparse).
EX_DATAERR, EX_NOINPUT, EX_UNAVAILABLE, EX_CANTCREAT, EX_IOERR, EX_NOPERM = 65, 66, 69, 73, 74, 77
EX_TEMPFAIL, EX_CONFIG = 75, 78


def mode_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--pattern", metavar="REGEX", help="the regular expression of --mode grep, drop or redact")
    sp.add_argument("--replacement", metavar="TEXT", help="what --mode redact writes for a match (default [REDACTED])")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ingestd", description="A systemd-native file-ingestion daemon.")
    p.add_argument("--version", action="version", version=f"ingestd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser, routing: bool = True) -> None:
        sp.add_argument("--watch-dir", help="the folder holding unprocessed/ underprocess/ processed/ failed/")
        if routing:
            sp.add_argument("--mode", help="one processor for every line (e.g. uppercase)")
            sp.add_argument("--config", help="TOML file: settings and routing tables")
            mode_options(sp)

    run = sub.add_parser("run", help="run the daemon in the foreground")
    common(run)
    run.add_argument("--workers", help="worker processes (default: the number of cores)")
    run.add_argument("--listen", help="HOST:PORT for /metrics, /healthz, /api/status and / (default 127.0.0.1:9800)")
    run.add_argument("--log-format", choices=("auto", "json", "text"),
                     help="log lines as JSON or text (default auto: text on a terminal, JSON otherwise)")
    run.add_argument("--watch", choices=("auto", "inotify", "polling"),
                     help="how unprocessed/ is watched (default auto: polling on NFS, CIFS, FUSE, ceph, 9p; inotify "
                          "elsewhere)")
    run.add_argument("--wait-lock", action="store_const", const=True,
                     help="if another ingestd runs on this watch dir, wait and take over when it stops")
    run.add_argument("--broker", help="redis://HOST:PORT/DB: be the scanner of a cluster of worker nodes "
                     "(docs/distributed.md; needs ingestd[distributed])")

    wk = sub.add_parser("worker", help="a worker node of a cluster: processes the files a scanner claims")
    common(wk)
    wk.add_argument("--broker", help="redis://HOST:PORT/DB, as given to the scanner (or INGESTD_BROKER)")
    wk.add_argument("--processes", type=int, metavar="N", help="files processed at once, each in its own child "
                    "process (default: the number of cores)")
    wk.add_argument("--node", help="this node's name in status and metrics (default: the host name)")
    wk.add_argument("--listen", help="HOST:PORT for this node's /metrics and /healthz (default 127.0.0.1:9801)")
    wk.add_argument("--log-format", choices=("auto", "json", "text"),
                    help="log lines as JSON or text (default auto: text on a terminal, JSON otherwise)")

    proc = sub.add_parser("process", help="run one file through the engine")
    proc.add_argument("--input", required=True, help="input file, or - for stdin")
    proc.add_argument("--output", required=True, help="output file, or - for stdout")
    mx = proc.add_mutually_exclusive_group()
    mx.add_argument("--mode", help="one processor for every line (e.g. uppercase)")
    mx.add_argument("--config", help="TOML file with routing tables")
    mode_options(proc)
    proc.add_argument("--explain", action="store_true", help="print each line's tag and route to stderr")

    st = sub.add_parser("status", help="folder counts, files in progress, recent completions and failures")
    common(st, routing=False)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--broker", help="redis://HOST:PORT/DB: also list the cluster's worker nodes")

    rq = sub.add_parser("requeue", help="move failed files back to unprocessed/")
    common(rq, routing=False)
    rq.add_argument("names", nargs="*", metavar="NAME", help="files in failed/ (default: all)")
    return p


def main(argv: list[str] | None = None) -> int:
    _open_standard_fds()
    args = parser().parse_args(argv)  # a bad command line exits 2 here
    flags = {k: v for k, v in vars(args).items() if k in ("watch_dir", "mode", "pattern", "replacement", "config", "workers", "listen", "log_format",
                                                            "wait_lock", "broker", "node", "watch")}
    try:
        settings = load(flags)
        if args.command == "process":
            # Imported for `process` alone, and no log set up: it writes no log (its errors are one line on
            # stderr each), and its start-up is timed against `tr` (docs/benchmarks.md).
            from ingestd.manual import process

            return process(settings, args.input, args.output, args.explain)
        import logging

        from ingestd import log

        log.setup(settings.log_format, getattr(logging, settings.log_level.upper()))
        if args.command == "run":
            return _run(settings, flags)
        if args.command == "worker":
            return _worker(settings, args.processes)
        from ingestd import commands

        if args.command == "status":
            return commands.status(settings, args.json)
        return commands.requeue(settings, args.names)
    except ConfigError as e:
        print(f"ingestd: {e}", file=sys.stderr)
        return EX_TEMPFAIL if e.temporary else EX_CONFIG
    except Exception as e:
        # Imported here, as the other failures below: spool is start-up time `process` does not need.
        from ingestd.spool import AlreadyRunning, SpoolError

        if not isinstance(e, SpoolError):
            raise
        print(f"ingestd: {e}", file=sys.stderr)
        # 75: another daemon holds the watch dir, or an inotify limit is reached (instances free up as other
        # programs exit, so systemd's restart may succeed); 78: the watch dir itself is unusable.
        # 75 too: the broker unreachable at start (distributed mode: e.temporary).
        # Imported here: inotify_simple is start-up time `process` does not need.
        from ingestd.watch import WatchLimit

        temporary = isinstance(e, (AlreadyRunning, WatchLimit)) or getattr(e, "temporary", False)
        return EX_TEMPFAIL if temporary else EX_CONFIG
    except KeyboardInterrupt:
        return 130


def plural(n: int, word: str) -> str:
    """ "1 record", "2 records" (English plurals of the nouns the commands count)."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def _open_standard_fds() -> None:
    """Give a closed fd 0, 1 or 2 (`ingestd run 2>&-`) /dev/null, as OpenSSH's sanitise_stdfd() and systemd's
    services do. Left closed, the next open(2) takes its number (open(2): "the lowest-numbered file descriptor
    not currently open"), and whatever writes to stderr there (a worker's fatal error, a library's warning)
    writes into that file: a queued file or an output. sys.stdin and sys.stdout stay None, so `process` still
    says a closed stream is closed; a closed stderr gets a sys.stderr on /dev/null: logging needs one."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: this fd, or one below it was also closed
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            os.set_inheritable(fd, True)  # a standard fd: the workers get it too (os.open's are close-on-exec)
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False, errors="backslashreplace")  # noqa: SIM115 (for the process's life)


def to_devnull(stream: Any) -> None:
    """After EPIPE on a standard stream: later writes and the interpreter's final flush go to /dev/null."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


def _distributed() -> None:
    """The cluster's modules need the extra: say so in one line (exit 78) instead of an ImportError."""
    try:
        import dramatiq  # noqa: F401
        import redis  # noqa: F401
    except ImportError:
        raise ConfigError("broker: the distributed mode needs its extra: .venv/bin/pip install -e '.[distributed]' in the ingestd checkout (docs/distributed.md)") from None


PATH_MAX = 4096  # <linux/limits.h>, its NUL included: the longest path one system call takes


def _working_directory() -> None:
    """`run` (no broker) and `worker` spawn processes (multiprocessing's spawn), and each child first enters the
    parent's working directory by its absolute name (os.getcwd()): from one since removed (ENOENT) the parent cannot
    name it, and from one deeper than PATH_MAX the child cannot enter it (ENAMETOOLONG), so no worker could ever
    start (a traceback, or exit 75 after the start backoff with "it exited at start with code 1"). One line, 78."""
    try:
        cwd = os.getcwd()
    except OSError as e:
        raise ConfigError(f"working directory: it has no name ({e.strerror}: removed?), and worker processes start "
                          "in it by its name; run ingestd from another folder") from None
    if len(os.fsencode(cwd)) >= PATH_MAX:
        raise ConfigError(f"working directory: its path is longer than PATH_MAX ({PATH_MAX} bytes), and worker "
                          "processes start in it by that path; run ingestd from another folder")


def _worker(settings: Settings, processes: int | None) -> int:
    _working_directory()
    if not settings.broker:
        raise ConfigError("broker: `ingestd worker` needs --broker redis://HOST:PORT/DB (or INGESTD_BROKER)")
    if processes is not None and processes < 1:
        raise ConfigError(f"processes: must be at least 1, not {processes}")
    _distributed()
    from ingestd.distributed import node

    return node.run(settings, processes or settings.workers)


def _run(settings: Settings, flags: dict[str, Any]) -> int:
    if settings.broker:
        _distributed()
        from ingestd.distributed import scanner

        return scanner.run(settings)
    _working_directory()
    from ingestd.daemon import Daemon

    # SIGHUP re-reads every source the start did (same flags, current environment and files).
    Daemon(settings, reload=lambda: load(flags)).run()
    return 0
