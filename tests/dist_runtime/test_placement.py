"""Ranks on nodes: each tp group on one node where the placement group's bundles allow, rank 0
on the driver's node (or master_addr's), and the rendezvous store where the others reach it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dist_runtime.engine.executor.ray_executor import place_ranks
from workers.distributed import is_loopback

ROOT = Path(__file__).resolve().parents[2]


def test_one_node_keeps_the_bundles_in_order() -> None:
    assert place_ranks(["a"] * 4, 2, "a") == ([0, 1, 2, 3], [])
    assert place_ranks(["a"] * 4, 4, None) == ([0, 1, 2, 3], [])


def test_interleaved_bundles_give_each_tp_group_one_node() -> None:
    nodes = ["a", "b", "a", "b"]
    assert place_ranks(nodes, 2, "a") == ([0, 2, 1, 3], [])
    assert place_ranks(nodes, 2, "b") == ([1, 3, 0, 2], [])  # rank 0 on the first node
    assert place_ranks(["a"] * 4 + ["b"] * 4, 4, "b") == ([4, 5, 6, 7, 0, 1, 2, 3], [])


def test_a_group_spans_nodes_only_when_no_node_has_room() -> None:
    # three bundles on a, one on b: one tp=2 group fits on a, the other spans a and b
    assert place_ranks(["a", "a", "a", "b"], 2, "a") == ([0, 1, 2, 3], [1])
    # the first node holds less than a group: rank 0 goes to the node with most bundles
    assert place_ranks(["a", "b", "b", "c"], 2, "a") == ([1, 2, 0, 3], [1])
    # tp=1: every rank is a group of its own, the first node's first
    assert place_ranks(["b", "a", "b"], 1, "a") == ([1, 0, 2], [])


def test_tp_must_divide_the_bundles() -> None:
    with pytest.raises(ValueError, match="3 bundles do not make tp groups of 2"):
        place_ranks(["a"] * 3, 2, "a")


def test_loopback_addresses() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost")
    assert not is_loopback("10.0.0.1") and not is_loopback("no-such-host.invalid")


@pytest.mark.slow
def test_tp_groups_on_two_nodes_and_a_lost_node_replaced() -> None:
    """A tp=2 x cp=2 runtime on a two-node Ray cluster (two raylets on this machine): each tp
    group runs on one node, rank 0 on the driver's, and the answer is the single device's.
    Then the other node is lost while the runtime is idle: once Ray counts it gone, a request
    makes the engine replace its workers, which waits for the devices (a cluster short of them
    is refused only at start) until a new node joins, and the request gets the same answer."""
    run = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "helpers" / "two_nodes.py"), "--lose-node"],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    nodes = out["nodes"]
    assert out["num_nodes"] == 2
    assert nodes[0] == nodes[1] and nodes[2] == nodes[3] and nodes[0] != nodes[2]
    assert nodes[0] == out["driver"]
    assert out["got"] == out["want"]
    assert "the rendezvous store listens there, not on master_addr 127.0.0.1" in run.stderr
    assert out["after_loss"] == out["want"] and out["restarts"] == 1
    assert "the Ray cluster has 2 CPU now, 4 needed: waiting up to 120 s" in run.stderr
