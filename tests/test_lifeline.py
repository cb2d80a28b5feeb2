"""A child that must not outlive its parent: the daemon's workers and `ingestd process`'s half-file helper
(ingestd/parallel.py) both call lifeline.die_with_parent. Real processes, a real kill -9."""

from __future__ import annotations

import os
import signal
import time

from ingestd.lifeline import die_with_parent


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, only not yet reaped


def test_a_forked_helper_dies_with_its_parent() -> None:
    rd, wr = os.pipe()
    middle = os.fork()
    if middle == 0:  # the parent under test: forks the helper as parallel.map_file does, then waits
        parent = os.getpid()
        helper = os.fork()
        if helper == 0:
            die_with_parent(parent)
            time.sleep(60)  # a long range still to map
            os._exit(0)
        os.write(wr, f"{helper}\n".encode())
        time.sleep(60)
        os._exit(0)
    os.close(wr)
    helper = int(os.read(rd, 64).decode())
    os.close(rd)
    time.sleep(0.2)  # past the helper's prctl
    assert _alive(helper)
    os.kill(middle, signal.SIGKILL)  # `ingestd process` killed mid-file
    os.waitpid(middle, 0)
    deadline = time.monotonic() + 10
    while _alive(helper) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _alive(helper), "the helper outlived its parent"


def test_a_parent_already_gone_ends_the_child_at_once() -> None:
    """prctl sends no signal for a parent that died before the call: the child must see it and exit."""
    child = os.fork()
    if child == 0:
        die_with_parent(os.getpid() + 10_000_000)  # not our parent: as if ours had died before the call
        os._exit(0)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 1
