"""A worker's KV cache on CPU: zeroed, in the layout the kernels expect, and reserved rather than
written, so a cache of gigabytes neither slows a start nor holds memory before its blocks are
used."""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from workers.kv_cache import KVCache, zeros


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_zeros_is_a_zeroed_writable_tensor(dtype: torch.dtype) -> None:
    t = zeros((3, 5, 7), dtype, torch.device("cpu"))
    assert t.shape == (3, 5, 7) and t.dtype == dtype and t.is_contiguous()
    assert bool((t == 0).all())
    t[1, 2] = 3
    assert int(t.to(torch.int64).sum()) == 3 * 7
    assert zeros((0, 4), dtype, torch.device("cpu")).shape == (0, 4)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads Linux's /proc")
def test_a_large_cpu_cache_holds_memory_only_as_blocks_are_written() -> None:
    gc.collect()
    before = _resident_bytes()
    # 2 x 4 layers x 4096 blocks x 16 tokens x 8 heads x 64 dims x 4 bytes = 1 GiB
    cache = KVCache(4, 4096, 16, 8, 64, torch.float32, torch.device("cpu"))
    assert cache.nbytes == 1 << 30
    assert cache.data.data_ptr() % 4096 == 0  # page-aligned for the native kernels
    assert _resident_bytes() - before < 64 << 20
    layer = cache.layers[2]
    layer.k[17].fill_(1.0)  # one block of one layer
    assert bool((cache.data[0, 2, 17] == 1).all()) and bool((cache.data[0, 2, 16] == 0).all())
    assert bool((cache.data[1, 2, 17] == 0).all())
    assert _resident_bytes() - before < 64 << 20
    del cache, layer
    gc.collect()


def test_a_quantized_cache_has_zeroed_codes_and_params() -> None:
    cache = KVCache(2, 8, 4, 2, 16, torch.bfloat16, torch.device("cpu"), scratch=True, bits=4)
    assert cache.data.dtype == torch.uint8 and cache.data.shape == (2, 2, 9, 4, 2, 8)
    assert cache.params is not None and cache.params.shape == (2, 2, 9, 4, 2, 2)
    assert bool((cache.data == 0).all()) and bool((cache.params == 0).all())
    assert cache.scratch_block == 8


def test_cpu_kv_budget_for_a_session_within_the_nodes_memory(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny model's KV takes 512 bytes a token, so a 5,000,000-token session needs
    312,500 blocks of 8 KiB (2.38 GiB). With 4 GiB available a worker alone reserves that; two
    or four workers on the node get at most their share of 90% of it, and never less than
    1 GiB; a reservation asked for is what it is."""
    import dist_runtime.memory_planner as planner_module
    from dist_runtime.config import CacheConfig, RuntimeConfig
    from workers.distributed import Collectives, MeshCoords
    from workers.model_runner import ModelRunner

    GiB = 1 << 30

    def runner(**cache: Any) -> ModelRunner:
        config = RuntimeConfig(
            model=str(tiny_llama_dir),
            device="cpu",
            dtype="float32",
            session_len=5_000_000,
            allow_rope_extrapolation=True,
            cache=CacheConfig(**cache),
        )
        return ModelRunner(config, Collectives(MeshCoords()))

    monkeypatch.setattr(planner_module, "available_host_bytes", lambda: 4 * GiB)
    auto = runner()
    assert auto.cpu_kv_budget() == 312_500 * 8192
    assert auto.cpu_kv_budget(sharing=2) == int(4 * GiB * 0.9) // 2
    assert auto.cpu_kv_budget(sharing=4) == GiB
    assert auto.num_available_blocks(sharing=2) == int(4 * GiB * 0.9) // 2 // 8192
    assert runner(cpu_kv_cache_gb=0.25).cpu_kv_budget(sharing=4) == GiB // 4
