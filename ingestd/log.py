"""Logging: JSON lines on stderr (one event per line), or plain text for people at a terminal."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone

logger = logging.getLogger("ingestd")


class _JournalPriority(logging.Formatter):
    """Under journald a '<N>' prefix sets the priority (SyslogLevelPrefix=yes is the default)."""

    LEVELS = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self.LEVELS.get(record.levelno, 6)}>{self.inner.format(record)}"


class _Json(logging.Formatter):
    """One JSON object per line (python-json-logger), the formatter made at the first record: a command that logs
    nothing (`ingestd process` on a good file) does not pay for importing it, about 15 ms of its start-up."""

    def __init__(self) -> None:
        super().__init__()
        self.inner: logging.Formatter | None = None

    def format(self, record: logging.LogRecord) -> str:
        if self.inner is None:
            from pythonjsonlogger.json import JsonFormatter

            self.inner = JsonFormatter("%(levelname)s %(message)s", rename_fields={"levelname": "level"},
                                       timestamp=True, static_fields={"logger": "ingestd"}, json_ensure_ascii=True)
        return self.inner.format(record)


class _Text(logging.Formatter):
    """For people at a terminal: `time LEVEL message key=value ...` in logfmt's manner: values with spaces or
    quotes are quoted, lists are comma-joined, absent (None) fields and empty lists are left out."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 (stdlib name)
        """UTC with its offset, as the JSON log and `status` write times, whatever TZ says."""
        return datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        fields = [f"{k}={_logfmt(v)}" for k, v in _flat(record.__dict__.items())
                  if k not in _STANDARD and not k.startswith("_") and k != "event" and v is not None and v != []]
        return base + ("  " + " ".join(fields) if fields else "")


def _flat(items: Iterable[tuple[str, object]]) -> Iterator[tuple[str, object]]:
    """A dict field as dotted keys, as logfmt has no nesting: settings={"recursive": True} -> settings.recursive."""
    for k, v in items:
        if isinstance(v, dict):
            yield from ((f"{k}.{k2}", v2) for k2, v2 in v.items())
        else:
            yield k, v


def _logfmt(value: object) -> str:
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    text = str(value)
    if text and not any(c in text for c in ' "=\\') and text.isprintable():
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


def _stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM=dev:ino of the journal socket; only trust it if stderr is that socket."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return dev.isdigit() and ino.isdigit() and (st.st_dev, st.st_ino) == (int(dev), int(ino))


def say(text: str) -> None:
    """One line for a person at the terminal, in one write. A terminal that hangs up meanwhile (EIO, the
    closing of `make run`'s window) costs the line, never the daemon: its SIGHUP then stops it cleanly."""
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


def text_wanted(fmt: str) -> bool:
    """log_format auto: text when stderr is a terminal (a person runs it), JSON otherwise (journal, pipe)."""
    if fmt == "auto":
        try:
            return os.isatty(sys.stderr.fileno())
        except (OSError, ValueError, AttributeError):
            return False
    return fmt == "text"


LIBRARIES = ("dramatiq",)


def setup(fmt: str = "auto", level: int = logging.INFO) -> None:
    # Neither format shows the caller, thread or process, so records skip collecting them: the logging HOWTO's
    # "Optimization" section names these switches. findCaller alone cost ~3.5 µs of a line's ~17 (one line per
    # file is the parent's largest per-file cost, docs/benchmarks.md).
    logging._srcfile = None  # type: ignore[attr-defined]  # the documented switch has a private name
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter
    if text_wanted(fmt):
        formatter = _Text("%(asctime)s %(levelname)s %(message)s")
    else:
        formatter = _Json()
    if _stderr_is_journal():
        formatter = _JournalPriority(formatter)
    handler.setFormatter(formatter)
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    # Libraries that log on their own (Dramatiq in the distributed mode: a lost Redis connection, an actor's
    # traceback) write through the same handler, as JSON lines too; their warnings and errors only.
    for name in LIBRARIES:
        lib = logging.getLogger(name)
        lib.handlers[:] = [handler]
        lib.setLevel(logging.WARNING)
        lib.propagate = False


def event(name: str, message: str, level: int = logging.INFO, **fields: object) -> None:
    """One event per line: `event` plus fields (file names must already be escaped with names.display)."""
    logger.log(level, message, extra={"event": name, **fields})
