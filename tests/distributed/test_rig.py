"""The rig stands in for NFS clients and network partitions (DISTRIBUTED.md §2, §7): these check that it does.

On a node's sshfs mount: the server's writes are invisible to inotify (only polling finds them), RENAME_NOREPLACE is
refused with EINVAL (claims fall back to link + unlink), and inode numbers are the mount's own, not the server's
(unlike an NFS client, which shows the server's fileid: see test_exactly_once.py for what follows). On a bind
mount the inodes are the server's. Cutting a node's veth cuts it from Redis; healing it brings it back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .rig import Rig, wait_for

PROBE = str(Path(__file__).with_name("probe.py"))


def _probe(rig: Rig) -> dict[str, Any]:
    p = rig.inside("probe", [sys.executable, PROBE, "{watch}"])
    wait_for(lambda: "READY" in p.tail(5) or not p.alive(), 30, "the probe ready")
    assert p.alive(), p.tail()
    (rig.export / "unprocessed" / "from-server").write_text("written on the server")
    wait_for(lambda: not p.alive(), 30, "the probe's answer")
    lines = [ln for ln in p.tail(5).splitlines() if ln.startswith("{")]
    assert lines, p.tail()
    return json.loads(lines[-1])


def test_sshfs_mount_is_like_an_nfs_client(rig: Any) -> None:
    r = rig(transport="sshfs")
    got = _probe(r)
    assert got["exists"], "the server's file never appeared on the mount"
    assert got["inotify_server"] == [], f"inotify saw a write made on the server: {got}"
    assert "from-client" in got["inotify_own"], f"inotify on the mount is not working at all: {got}"
    assert got["renameat2_noreplace"] == "EINVAL", f"RENAME_NOREPLACE was not refused: {got}"
    server_ino = (r.export / "unprocessed" / "from-server").stat().st_ino
    # sshfs (SFTP v3 carries no inode) numbers inodes per mount and per path: a hard link gets its own number.
    # A real NFS client shows the server's fileid, the same on every client and for every link.
    assert got["ino"] != server_ino and got["ino_link"] != got["ino"], got


def test_bind_mount_keeps_the_servers_inodes(rig: Any) -> None:
    r = rig(transport="bind")
    got = _probe(r)
    server_ino = (r.export / "unprocessed" / "from-server").stat().st_ino
    assert got["ino"] == server_ino == got["ino_link"], got


def test_cut_veth_cuts_redis_and_heal_restores_it(rig: Any) -> None:
    r = rig(transport="bind", netns=1)
    net = r.nets[0]
    code = f"import socket; socket.create_connection(('{net.host_ip}', {r.redis.port}), timeout=1).close()"

    def reach() -> bool:
        return subprocess.run(["ip", "netns", "exec", net.ns, sys.executable, "-c", code], check=False,
                              capture_output=True).returncode == 0

    assert reach(), "a namespaced node cannot reach Redis on the veth"
    net.cut()
    assert not reach(), "a cut veth still reaches Redis"
    net.heal()
    assert wait_for(reach, 10, "Redis reachable again after heal")


@pytest.mark.parametrize("transport", ["bind", "sshfs"])
def test_teardown_leaves_nothing(rig: Any, transport: str) -> None:
    r = rig(transport=transport, netns=1)
    p = r.inside("sleeper", ["sleep", "600"], netns=r.nets[0])
    wait_for(lambda: any("sleep" in ln for ln in [Path(f"/proc/{p.pid}/cmdline").read_bytes().decode(errors="replace")]),
             10, "the node's command running")
    ns = r.nets[0].ns
    r.close()
    assert not p.alive()
    assert ns not in subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True).stdout
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(r.tmp) not in mounts
