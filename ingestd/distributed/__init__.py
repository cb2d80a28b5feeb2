"""More than one machine (docs/distributed.md): a scanner claims files on the shared folder and enqueues them on
Dramatiq's Redis broker; worker nodes take the claim's lease, process in a child, publish, commit, ack.

The shared folder stays the queue of record; Redis carries claimed work, leases and attempt counts. Imported only
by `ingestd run --broker ...` and `ingestd worker` (the extra `ingestd[distributed]`).
"""

from __future__ import annotations

import os
import signal


def crash_point(step: str) -> None:
    """Test hook (tests/distributed): INGESTD_TEST_CRASH_AT=<step> kills this process with SIGKILL at that step of
    the protocol (claim-enqueue in the scanner; publish-commit, commit-ack on a node; child: a node's child on each file), as kill -9 would."""
    if os.environ.get("INGESTD_TEST_CRASH_AT") == step:
        os.kill(os.getpid(), signal.SIGKILL)
