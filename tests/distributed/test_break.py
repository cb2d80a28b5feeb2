"""Attempts to lose, double or wedge work across nodes (issue 11: "a fresh reviewer asked to lose or double a file
across nodes could not"), on the rig: a node whose shared folder disappears from under it mid-run."""

from __future__ import annotations

import subprocess
import time
from typing import Any

from .rig import make_inputs, reference, wait_for
from .test_crashes import _big


def test_a_node_whose_mount_disappears_mid_run_loses_and_acks_nothing(rig: Any, tmp_path: Any) -> None:
    """umount -l of a node's mount while it holds claims: it now sees an empty folder where the share was. It must
    not ack the claims it is sent as done elsewhere (no file there), nor publish anything: the other node finishes
    every file, once, and the node without a mount stays up."""
    r = rig()
    files = {**_big(3, 4 << 20), **make_inputs(100)}
    expected = reference(tmp_path, files)
    r.scanner()
    lost = r.node("lost", processes=2)
    r.node("node1")
    r.drop(files)
    wait_for(lambda: len(lost.events("processed")) >= 5 and r.holding("lost"), 60, "the node at work")
    mnt = r.tmp / "mnt-lost"
    subprocess.run(["nsenter", "-t", str(lost.pid), "-m", "umount", "-l", str(mnt)], check=True)
    done_then = len(lost.events("processed"))
    r.wait_drained(len(files), stall=60)
    time.sleep(2)
    r.audit(expected, exact_events=False)
    assert lost.alive(), f"the node without its mount died:\n{lost.tail()}"
    assert lost.events("task_error"), "the node without its mount was never sent a claim (nothing was tried)"
    # At most the files it had in hand as the mount went (their renames may still land through open handles).
    assert len(lost.events("processed")) - done_then <= 4, lost.tail()
