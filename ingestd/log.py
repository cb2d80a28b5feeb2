"""Logging: JSON lines on stderr (one event per line), or plain text for people at a terminal."""

from __future__ import annotations

import logging
import os
import sys

from pythonjsonlogger.json import JsonFormatter

logger = logging.getLogger("ingestd")


class _JournalPriority(logging.Formatter):
    """Under journald a '<N>' prefix sets the priority (SyslogLevelPrefix=yes is the default)."""

    LEVELS = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self.LEVELS.get(record.levelno, 6)}>{self.inner.format(record)}"


class _Text(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extra = {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}
        return base + ("  " + " ".join(f"{k}={v}" for k, v in extra.items()) if extra else "")


_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


def _stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM=dev:ino of the journal socket; only trust it if stderr is that socket."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return dev.isdigit() and ino.isdigit() and (st.st_dev, st.st_ino) == (int(dev), int(ino))


def setup(fmt: str = "json", level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter
    if fmt == "text":
        formatter = _Text("%(asctime)s %(levelname)s %(message)s")
    else:
        formatter = JsonFormatter(
            "%(levelname)s %(message)s", rename_fields={"levelname": "level"}, timestamp=True,
            static_fields={"logger": "ingestd"}, json_ensure_ascii=True,
        )
    if _stderr_is_journal():
        formatter = _JournalPriority(formatter)
    handler.setFormatter(formatter)
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


def event(name: str, message: str, level: int = logging.INFO, **fields: object) -> None:
    """One event per line: `event` plus fields (file names must already be escaped with names.display)."""
    logger.log(level, message, extra={"event": name, **fields})
