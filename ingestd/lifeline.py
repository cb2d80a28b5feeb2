"""A child process that must not outlive its parent (PR_SET_PDEATHSIG, prctl(2))."""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent: int | None = None) -> None:
    """SIGKILL this process the moment its parent dies (kill -9, a watchdog kill, Ctrl-C of `ingestd process`), so no
    worker or half-file helper runs on unsupervised. parent: the parent's pid, when the caller knows it (a fork);
    else a parent already gone is seen as adoption by pid 1. Exits at once (status 1) if the parent died before
    the signal was set up (prctl(2): the death signal is not sent for a parent that is already gone)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent if parent is not None else os.getppid() == 1:
        os._exit(1)
