"""Shared-memory tp collectives (`kernels/cpu_shm.py`): every rank of a group maps one segment.

The ranks here are threads of this process, each with its own mapping of the segment (a
library call releases the GIL, so they run at once, as processes would); a dead rank is a
short-lived subprocess that maps the segment and exits.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kernels import cpu_shm
from kernels.cpu_shm import ShmGroup

pytestmark = pytest.mark.skipif(
    not cpu_shm.available(), reason="no /dev/shm or no native library here"
)

ROOT = Path(__file__).resolve().parents[2]


def _groups(world: int, slot_bytes: int = cpu_shm.SLOT_BYTES) -> list[ShmGroup]:
    path = cpu_shm.new_segment_path("test")
    groups = [ShmGroup(path, 0, world, create=True, slot_bytes=slot_bytes)]
    groups += [
        ShmGroup(path, r, world, create=False, slot_bytes=slot_bytes) for r in range(1, world)
    ]
    groups[0].unlink()
    assert not path.exists()  # the mappings outlive the name
    return groups


def _on_every_rank(groups: list[ShmGroup], fn: Callable[[ShmGroup], Any]) -> list[Any]:
    results: list[Any] = [None] * len(groups)
    errors: list[BaseException] = []

    def run(g: ShmGroup) -> None:
        try:
            results[g.rank] = fn(g)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(g,)) for g in groups]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return results


@pytest.mark.parametrize("world", [2, 3])
def test_all_reduce_sums_in_rank_order_on_every_rank(world: int) -> None:
    groups = _groups(world, slot_bytes=4096)  # 1,024 floats a round: the larger sizes take several
    gen = torch.Generator().manual_seed(world)
    for n in (1, 7, 1024, 1025, 5000):
        inputs = [torch.randn(n, generator=gen) for _ in range(world)]
        want = inputs[0].clone()
        for x in inputs[1:]:
            want += x  # rank order, in float32: what every rank must get, bit for bit

        def reduce(g: ShmGroup, inputs: list[torch.Tensor] = inputs) -> torch.Tensor:
            x = inputs[g.rank].clone()
            g.all_reduce(x, timeout_s=30)
            return x

        for got in _on_every_rank(groups, reduce):
            assert torch.equal(got, want), n
    for g in groups:
        g.close()


def test_all_gather_of_any_dtype_in_several_rounds() -> None:
    groups = _groups(3, slot_bytes=256)
    shapes = [(2, 3), (5, 70), (4, 33)]  # the last two pass a slot's 256 bytes
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        for shape in shapes:
            inputs = [
                torch.full(shape, r + 1).to(dtype) * torch.arange(shape[-1]) for r in range(3)
            ]

            def gather(g: ShmGroup, inputs: list[torch.Tensor] = inputs) -> torch.Tensor:
                return g.all_gather(inputs[g.rank], timeout_s=30)

            for got in _on_every_rank(groups, gather):
                assert got.dtype == dtype and torch.equal(got, torch.stack(inputs))
    for g in groups:
        g.close()


def test_a_rank_that_never_comes_times_out_naming_it() -> None:
    groups = _groups(2)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"all-reduce timed out after 0\.3 s waiting for rank 1"):
        groups[0].all_reduce(torch.ones(8), timeout_s=0.3)
    assert time.monotonic() - start < 5
    for g in groups:
        g.close()


def test_a_dead_rank_fails_the_collective_at_once() -> None:
    """A rank whose process has exited is noticed long before the timeout."""
    path = cpu_shm.new_segment_path("test")
    group = ShmGroup(path, 0, 2, create=True)
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from kernels.cpu_shm import ShmGroup; ShmGroup(sys.argv[1], 1, 2, False)",
            str(path),
        ],
        cwd=ROOT,
        check=True,
        timeout=120,
    )
    group.unlink()
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"all-reduce: rank 1 of the group died"):
        group.all_reduce(torch.ones(8), timeout_s=60)
    assert time.monotonic() - start < 5
    group.close()


def test_bad_arguments() -> None:
    groups = _groups(2)
    with pytest.raises(ValueError, match=r"contiguous float32 CPU tensors, got torch\.bfloat16"):
        groups[0].all_reduce(torch.ones(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"rank 2 outside a group of 2"):
        ShmGroup(groups[0].path, 2, 2, create=False)
    for g in groups:
        g.close()
    with pytest.raises(RuntimeError, match=r"the shared-memory group is closed"):
        groups[0].all_reduce(torch.ones(4))


class _Store:
    """The TCPStore calls the negotiation makes (set, and a get that waits for the key)."""

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}
        self._cond = threading.Condition()

    def set(self, key: str, value: str) -> None:
        with self._cond:
            self._data[key] = value.encode()
            self._cond.notify_all()

    def get(self, key: str) -> bytes:
        with self._cond:
            assert self._cond.wait_for(lambda: key in self._data, timeout=30), key
            return self._data[key]


@pytest.mark.parametrize("same_machine", [True, False])
def test_a_tp_group_maps_one_segment_only_on_one_machine(
    same_machine: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`workers.distributed._tp_shared_memory`: every rank of the group agrees through the store;
    ranks on different machines keep gloo."""
    from workers import distributed
    from workers.distributed import MeshCoords

    ids = iter(["a", "a", "a"] if same_machine else ["a", "b", "a"])
    lock = threading.Lock()

    def machine_id() -> str:
        with lock:
            return next(ids)

    monkeypatch.setattr(distributed, "_machine_id", machine_id)
    store = _Store()
    coords = [MeshCoords(tp_rank=r, tp_size=3) for r in range(3)]
    groups: list[Any] = [None] * 3

    def join(rank: int) -> None:
        groups[rank] = distributed._tp_shared_memory(store, coords[rank])

    threads = [threading.Thread(target=join, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if not same_machine:
        assert groups == [None, None, None]
        return
    assert all(isinstance(g, ShmGroup) for g in groups)
    assert not groups[0].path.exists()  # unlinked once everyone had it mapped

    def reduce(g: ShmGroup) -> torch.Tensor:
        x = torch.ones(4) * g.rank
        g.all_reduce(x, timeout_s=30)
        return x

    sums = _on_every_rank(groups, reduce)
    assert all(torch.equal(s, torch.full((4,), 3.0)) for s in sums)
    for g in groups:
        g.close()
