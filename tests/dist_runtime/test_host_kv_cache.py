"""The prefix cache's host tier end to end: a document whose blocks the device cache evicted
comes back from host memory instead of being prefilled again, with the answers a run without
the tier gives (fp32 and int8 caches, a preempted sequence, tp and cp over Ray)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dist_runtime import Runtime, SamplingParams
from dist_runtime.config import CacheConfig, ConfigError, SchedulerConfig

PARAMS = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1)


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(4, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


DOC = _tokens(120, 1)
OTHERS = [_tokens(120, s) for s in (2, 3, 4)]


def _session(folder: Path, host_gb: float, **kw: Any) -> dict[str, Any]:
    """Ask about DOC, then about three other documents (their blocks push DOC's out of a
    70-block device cache, over all cp ranks), then about DOC again."""
    cache = CacheConfig(
        block_size=4,
        num_blocks=70 // kw.get("cp", 1),  # per cp rank
        host_kv_cache_gb=host_gb,
        quant_policy=kw.pop("bits", 0),
    )
    with Runtime(
        model=str(folder), device="cpu", dtype="float32", session_len=256, cache=cache, **kw
    ) as rt:
        first = rt.generate([DOC + [7]], PARAMS)[0]
        for other in OTHERS:
            rt.generate([other], PARAMS)
        computed = rt.engine.stats()["num_prompt_tokens_computed"]
        again = rt.generate([DOC + [9]], PARAMS)[0]
        stats = rt.engine.stats()
    return {
        "outs": [first, again],
        "recomputed": stats["num_prompt_tokens_computed"] - computed,
        "stats": stats,
    }


def _same(got: list[Any], want: list[Any]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        assert [x.logprob for x in g.logprobs] == pytest.approx(
            [x.logprob for x in w.logprobs], abs=1e-5
        )


@pytest.mark.parametrize("bits", [0, 8])
def test_evicted_document_comes_back_from_host(tiny_llama_dir: Path, bits: int) -> None:
    plain = _session(tiny_llama_dir, 0.0, bits=bits)
    tiered = _session(tiny_llama_dir, 0.01, bits=bits)
    _same(tiered["outs"], plain["outs"])
    assert plain["recomputed"] == len(DOC) + 1  # evicted: the whole document again
    assert tiered["recomputed"] == 1  # only the new last token
    stats = tiered["stats"]
    assert stats["prefix_cache_host_hit_tokens"] == len(DOC)
    assert stats["host_kv_saved_blocks"] > 0 and stats["host_kv_blocks"] > 0
    assert tiered["outs"][1].num_cached_tokens == len(DOC)
    assert plain["stats"]["prefix_cache_host_hit_tokens"] == 0


def test_a_preempted_sequence_resumes_from_host(tiny_llama_dir: Path) -> None:
    """A device cache too small for every sequence at once: preempted sequences' blocks are
    evicted to the host tier, and their recompute copies them back."""
    prompts = [_tokens(40, s) for s in range(10, 16)]
    params = SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True)
    outs, stats = {}, {}
    for host in (0.0, 0.01):
        cache = CacheConfig(block_size=4, num_blocks=48, host_kv_cache_gb=host)
        with Runtime(
            model=str(tiny_llama_dir),
            device="cpu",
            dtype="float32",
            session_len=128,
            cache=cache,
            scheduler=SchedulerConfig(max_num_seqs=6),
        ) as rt:
            outs[host] = [o.token_ids for o in rt.generate(prompts, params)]
            stats[host] = rt.engine.stats()
    assert outs[0.01] == outs[0.0]
    assert stats[0.0]["num_preemptions"] > 0
    assert stats[0.01]["prefix_cache_host_hit_tokens"] > 0
    assert stats[0.01]["num_prompt_tokens_computed"] < stats[0.0]["num_prompt_tokens_computed"]


def test_host_tier_needs_the_prefix_cache() -> None:
    with pytest.raises(ConfigError, match="enable_prefix_caching is false"):
        CacheConfig(host_kv_cache_gb=1.0, enable_prefix_caching=False)
    with pytest.raises(ConfigError, match="host_kv_cache_gb must be a number of GiB >= 0"):
        CacheConfig(host_kv_cache_gb=-1)


@pytest.mark.parametrize(("tp", "cp"), [(2, 1), (1, 2)])
def test_host_tier_over_ray(ray_cluster: Any, tiny_llama_dir: Path, tp: int, cp: int) -> None:
    """Each worker keeps its own heads (tp) or its own stripe of blocks (cp) in its host tier;
    the driver's moves name the cp rank whose workers copy them."""
    plain = _session(tiny_llama_dir, 0.0)
    tiered = _session(tiny_llama_dir, 0.01, tp=tp, cp=cp)
    for g, w in zip(tiered["outs"], plain["outs"], strict=True):
        assert g.token_ids == w.token_ids
    assert tiered["stats"]["prefix_cache_host_hit_tokens"] == len(DOC)
    assert tiered["recomputed"] == 1


@pytest.mark.parametrize("slots", [1, 2, 4])
def test_small_host_tiers_keep_answers_right(tiny_llama_dir: Path, slots: int) -> None:
    """A 3-block device cache and 1-4 host slots: 30 prompts over 4 shared 4-token heads evict
    and load back blocks all the time (a load whose device block's eviction would reuse the
    slot it reads skips that save); every answer and log-probability equals the run without a
    host tier."""
    import random

    heads = [_tokens(4, s) for s in range(4)]
    rng = random.Random(1)
    prompts = [heads[rng.randrange(4)] + _tokens(4, 100 + i) for i in range(30)]
    params = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True, logprobs=1)
    block_bytes = 2 * 2 * 4 * 4 * 8 * 4  # K and V, 2 layers, 4 tokens, 4 KV heads, 8 dims, fp32
    outs = {}
    for gb in (0.0, slots * block_bytes / 2**30):
        cache = CacheConfig(block_size=4, num_blocks=3, host_kv_cache_gb=gb)
        with Runtime(
            model=str(tiny_llama_dir), device="cpu", dtype="float32", session_len=16, cache=cache
        ) as rt:
            outs[gb] = [o for p in prompts for o in rt.generate([p], params)]
            stats = rt.engine.stats()
    assert stats["host_kv_blocks"] == slots
    assert stats["prefix_cache_host_hit_tokens"] > 0
    plain, tiered = outs.values()
    _same(tiered, plain)


def test_a_host_tier_larger_than_the_node_is_refused(tiny_llama_dir: Path) -> None:
    cache = CacheConfig(block_size=4, num_blocks=70, host_kv_cache_gb=1 << 20)  # a PiB
    with pytest.raises(ValueError, match="GiB of memory available; lower --host-kv-cache-gb"):
        Runtime(model=str(tiny_llama_dir), device="cpu", dtype="float32", cache=cache)
