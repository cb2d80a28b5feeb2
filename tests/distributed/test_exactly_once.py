"""Test 1 of issue 11: a scanner and three worker nodes, 2,000 small files (rename-in; multi-line, UTF-8 BOM, CRLF,
no final newline), each processed exactly once and byte-identical to `ingestd process`; one binary file ends in
failed/ with its sidecar.

Two transports for the nodes' view of the shared folder (rig.py): `bind` (the server's inodes, as an NFS client
sees them) and `sshfs` (the NFS-client stand-in of the issue: no inotify for others' writes, RENAME_NOREPLACE
refused, and inodes numbered per mount, which nodes never rely on: ledger.claim_id).""" 

from __future__ import annotations

from typing import Any

import pytest

from .rig import BINARY, SCALE, make_inputs, reference


def _run(rig: Any, tmp_path: Any, transport: str, n: int, stall: float) -> None:
    r = rig(transport=transport)
    files = make_inputs(n)
    expected = reference(tmp_path, files)
    r.scanner()
    for i in range(3):
        r.node(f"node{i}")
    r.drop({**files, "binary.bin": BINARY})
    r.wait_drained(n + 1, stall=stall)
    r.audit(expected, failed={"binary.bin"})
    nodes = {e["node"] for e in r.events("processed")}
    assert len(nodes) >= 2, f"the work was not shared between nodes: {nodes}"
    assert r.events("failed") and r.events("failed")[0]["file"] == "binary.bin"


def test_three_nodes_on_sshfs_mounts_each_file_exactly_once(rig: Any, tmp_path: Any) -> None:
    """The issue's rig: every node on its own sshfs mount (inodes numbered per mount: nodes never rely on them)."""
    _run(rig, tmp_path, "sshfs", 2000 * SCALE, stall=45)


def test_three_nodes_on_bind_mounts(rig: Any, tmp_path: Any) -> None:
    """The server's own inode numbers, as NFS clients see them."""
    _run(rig, tmp_path, "bind", 200 * SCALE, stall=45)
