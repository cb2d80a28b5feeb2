"""Test 2 of issue 11: kill -9 of a node's child, of a whole node, and of a process at each step of the claim
protocol (INGESTD_TEST_CRASH_AT=claim-enqueue in the scanner; publish-commit and commit-ack on a node: the process
SIGKILLs itself there, ingestd/distributed/__init__.py). After restarts: nothing lost, nothing doubled, nothing stuck
in underprocess/, results byte-identical to `ingestd process`."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest

from .rig import LEASE, SCALE, make_inputs, reference, wait_for


def _big(n: int, size: int, seed: int = 5) -> dict[str, bytes]:
    """n text files of about `size` bytes: a child spends long enough on each to be killed mid-file."""
    rng = random.Random(seed)
    words = [b"alpha", b"Beta", b"gamma", b"d\xc3\xa9j\xc3\xa0", b"Zeta"]
    out = {}
    for i in range(n):
        line = b" ".join(rng.choice(words) for _ in range(15)) + (b"\r\n" if i % 2 else b"\n")
        out[f"big{i:03d}.txt"] = (line * (size // len(line) + 1))[:size]
    return out


def test_kill_a_nodes_child_mid_file(rig: Any, tmp_path: Any) -> None:
    r = rig()
    files = {**_big(10 * SCALE, 8 << 20), **make_inputs(50)}
    expected = reference(tmp_path, files)
    r.scanner()
    node = r.node("node0")
    r.drop(files)
    kills = 0
    deadline = time.monotonic() + 120
    while kills < 2 and time.monotonic() < deadline and not r.done(len(files)):
        kids = r.children_of(node)
        if kids and r.listing("underprocess"):
            import os
            import signal

            os.kill(kids[0], signal.SIGKILL)
            kills += 1
            time.sleep(0.7)
        time.sleep(0.05)
    assert kills, "never found a child at work to kill"
    r.wait_drained(len(files))
    assert node.alive(), "the node died with its child"
    assert r.events("child_lost"), "no child was lost mid-file (the kills came between files?)"
    r.audit(expected)


def test_kill_a_whole_node_then_restart_it(rig: Any, tmp_path: Any) -> None:
    r = rig()
    files = {**_big(6 * SCALE, 4 << 20), **make_inputs(600 * SCALE)}
    expected = reference(tmp_path, files)
    r.scanner()
    victim = r.node("node0", processes=2)
    r.node("node1")
    r.drop(files)
    wait_for(lambda: len(victim.events("processed")) >= 20, 60, "node0 at work")
    victim.kill()  # the whole process group: the node, its children, nothing says goodbye
    time.sleep(LEASE)
    r.node("node0", processes=2)
    r.wait_drained(len(files))
    r.audit(expected, exact_events=False)  # a file committed just before the kill is never announced


@pytest.mark.parametrize("step", ["publish-commit", "commit-ack"])
def test_node_killed_at_a_protocol_step(rig: Any, tmp_path: Any, step: str) -> None:
    r = rig()
    files = make_inputs(100 * SCALE)
    expected = reference(tmp_path, files)
    r.scanner()
    crasher = r.node("node0", env={"INGESTD_TEST_CRASH_AT": step})
    r.drop(files)
    wait_for(lambda: not crasher.alive(), 60, f"node0 killing itself at {step}")
    crasher.kill()  # the rest of its group (children) too
    if step == "publish-commit":
        # Published but not committed: the input is still claimed, its result already there.
        inflight = r.listing("underprocess")
        assert inflight, "the crash left nothing in underprocess/"
    r.node("node1")
    r.node("node0")  # restarted, without the hook
    r.wait_drained(len(files))
    r.audit(expected, exact_events=(step == "publish-commit"))
    if step == "commit-ack":
        silent = set(files) - {e["file"] for e in r.events("processed")}
        assert len(silent) <= 1, f"more than the crashed claim went unannounced: {sorted(silent)[:10]}"


def test_scanner_killed_between_claim_and_enqueue(rig: Any, tmp_path: Any) -> None:
    r = rig()
    files = make_inputs(100 * SCALE)
    expected = reference(tmp_path, files)
    crasher = r.scanner(env={"INGESTD_TEST_CRASH_AT": "claim-enqueue"})
    r.node("node0")
    r.node("node1")
    r.drop(files)
    wait_for(lambda: not crasher.alive(), 60, "the scanner killing itself at claim-enqueue")
    crasher.kill()
    stranded = r.listing("underprocess")
    assert len(stranded) == 1, f"one claim without a message expected in underprocess/, found {stranded}"
    time.sleep(2 * LEASE)
    assert r.listing("underprocess") == stranded, "the stranded claim moved with no scanner running"
    s2 = r.scanner("scanner2")
    r.wait_drained(len(files))
    r.audit(expected)
    assert any(e["file"] == stranded[0] for e in s2.events("redriven")), "the stranded claim was not re-driven"


def test_scanner_killed_mid_run_and_restarted(rig: Any, tmp_path: Any) -> None:
    r = rig()
    files = make_inputs(1000 * SCALE)
    expected = reference(tmp_path, files)
    s = r.scanner()
    r.node("node0")
    r.node("node1")
    r.drop(files)
    wait_for(lambda: len(s.events("claimed")) >= 100, 60, "100 claims")
    s.kill()
    r.scanner("scanner2")
    r.wait_drained(len(files))
    r.audit(expected)


def test_same_names_again_with_a_node_killed_between_publish_and_commit(rig: Any, tmp_path: Any) -> None:
    """Re-arrivals: the same 100 names again with new content (file_exist=keep). Each name ends with the second
    result, the first set aside exactly once (NAME.superseded-...), even for the claim whose node died between
    publish and commit: its redo recognises its own published result and does not set it aside again."""
    r = rig()
    first = make_inputs(100 * SCALE, seed=1)
    second = {n: b"again " + b for n, b in make_inputs(100 * SCALE, seed=2).items()}
    ref1, ref2 = reference(tmp_path / "r1", first), reference(tmp_path / "r2", second)
    r.scanner()
    r.node("node1")
    r.drop(first)
    r.wait_drained(len(first))
    r.audit(ref1)
    r.nodes()[0].stop()
    crasher = r.node("node0", env={"INGESTD_TEST_CRASH_AT": "publish-commit"})
    r.drop(second)
    wait_for(lambda: not crasher.alive(), 60, "node0 killing itself at publish-commit")
    crasher.kill()
    r.node("node2")
    r.wait_drained(2 * len(first), stall=45)  # 100 results + 100 set aside
    assert r.listing("underprocess") == [] and r.listing("unprocessed") == []
    names = r.listing("processed")
    aside = [n for n in names if ".superseded-" in n]
    for name in second:
        got = (r.export / "processed" / name).read_bytes()
        assert got == ref2[name], f"{name}: not the second arrival's result"
        kept = [n for n in aside if n.startswith(name + ".superseded-")]
        assert len(kept) == 1, f"{name}: earlier result set aside {len(kept)} times: {kept}"
        assert (r.export / "processed" / kept[0]).read_bytes() == ref1[name], f"{name}: the kept one is not the first"
    assert len(names) == 2 * len(second), f"unexpected results: {sorted(set(names) - set(second) - set(aside))[:10]}"
