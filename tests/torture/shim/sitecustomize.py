"""Test-only: when INGESTD_SHIM names a config file, wrap ingestd's I/O seam in every process (spawned workers too).

Never on the path outside tests/torture: the daemon's environment gets PYTHONPATH=<this folder> only there.
"""

import os

if os.environ.get("INGESTD_SHIM"):
    import ingestd_shim

    ingestd_shim.install(os.environ["INGESTD_SHIM"])
