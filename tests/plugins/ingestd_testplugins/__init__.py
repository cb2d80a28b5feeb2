"""Test-only ingestd processors: real code paths that hang or crash a worker on a marker line."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable


def hang_on(marker: str = "HANG") -> Callable[[str], str | None]:
    """Blocks forever on a line containing the marker: a stuck worker, for the watchdog tests."""

    def process(text: str) -> str:
        if marker in text:
            threading.Event().wait()
        return text

    return process


def abort_on(marker: str = "ABORT") -> Callable[[str], str | None]:
    """Kills its worker with SIGABRT on a line containing the marker: a crashing worker."""

    def process(text: str) -> str:
        if marker in text:
            os.abort()
        return text

    return process


def slow(seconds: float = 0.002) -> Callable[[str], str | None]:
    """Upper-cases, taking `seconds` per line: a slow but steady processor (progress is by time, not lines)."""

    def process(text: str) -> str:
        time.sleep(seconds)
        return text.upper()

    return process


def shout(suffix: str = "!") -> Callable[[str], str | None]:
    """A well-behaved third-party processor, to prove the entry-point group works."""
    return lambda text: text.upper() + suffix


def raise_on(marker: str = "RAISE") -> Callable[[str], str | None]:
    """Raises ValueError on a line containing the marker: a buggy plug-in, whose exception is the input's
    (or the plug-in's) fault, to be recorded in the sidecar, never a worker crash."""

    def process(text: str) -> str:
        if marker in text:
            raise ValueError(f"cannot handle {marker}")
        return text

    return process
