"""Breaking the `ingestd process` start-up change (manual.py, lazy imports in cli.py): the command line in real
subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from support import INGESTD, wait_for


def test_ctrl_c_during_process_to_a_file_exits_130_and_leaves_no_temp(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the foreground group) while `ingestd process --output FILE` is mid-file: exit 130, as
    cli.main promises, and the unpublished temp output is dropped, as on every other failure (Sinks.abort);
    it was left behind in the output folder (a hidden .ingestd-tmp-* as large as the output so far)."""
    src, out = tmp_path / "in.txt", tmp_path / "out"
    src.write_bytes(b"first\nHANG here\nlast\n")
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_") and k != "MODE"}
    p = subprocess.Popen([*INGESTD, "process", "--input", str(src), "--output", str(out / "r.txt"), "--mode",
                          "hang_on"], stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        wait_for(lambda: os.listdir(out), timeout=20, what="the temp output of the first line")  # now hanging
        os.killpg(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 130, err
    assert b"Traceback" not in err, err
    assert os.listdir(out) == []  # no temp left, nothing published
