"""Context parallelism over Ray workers gives the single-device result.

Each (tp, cp) mesh runs the same batch greedily with top-5 logprobs: prompts whose lengths are
not multiples of cp or of the (small) block size, prefill chunks forced small so every prompt
spans many chunks (the first chunk goes through the pass-KV ring, later ones attend over the
cached prefix on every rank), then 33 decode tokens. Tokens must equal the (1, 1) run and
logprobs agree to fp32 reduction noise.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_runtime import RequestOutput, Runtime, SamplingParams
from dist_runtime.config import CacheConfig, SchedulerConfig
from tests.conftest import TINY_SHAPES

VOCAB = TINY_SHAPES["vocab_size"]
BLOCK_SIZE = 4
LOGPROB_ATOL = 1e-4
PARAMS = SamplingParams(max_new_tokens=33, temperature=0.0, logprobs=5, ignore_eos=True)
MESHES = [
    (1, 2),
    (2, 2),
    (1, 3),
    # (a ring of four: the ring-attention unit tests run cp 4 at every length; -m slow)
    pytest.param(1, 4, marks=pytest.mark.slow),
]


def _prompt(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (length,), generator=gen).tolist()


PROMPTS: list[list[int]] = [_prompt(61, 1), [42], _prompt(23, 2), _prompt(6, 3)]

Run = Callable[[int, int], tuple[list[RequestOutput], Runtime | None]]


def _runtime(model: Path, tp: int, cp: int, **kw: Any) -> Runtime:
    return Runtime(
        model=str(model),
        tp=tp,
        cp=cp,
        session_len=256,
        device="cpu",
        dtype="float32",
        cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=kw.pop("num_blocks", 128)),
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8),
        **kw,
    )


@pytest.fixture(scope="module")
def run(ray_cluster: Any, tiny_llama_dir: Path) -> Run:
    cache: dict[tuple[int, int], list[RequestOutput]] = {}

    def get(tp: int, cp: int) -> tuple[list[RequestOutput], Runtime | None]:
        if (tp, cp) not in cache:
            with _runtime(tiny_llama_dir, tp, cp) as rt:
                cache[tp, cp] = rt.generate(PROMPTS, PARAMS)
        return cache[tp, cp], None

    return get


def _assert_same(got: list[RequestOutput], want: list[RequestOutput], label: str) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.token_ids == w.token_ids, f"{label}: prompt {i} tokens differ"
        assert len(g.token_ids) == PARAMS.max_new_tokens
        for a, b in zip(g.logprobs or [], w.logprobs or [], strict=True):
            assert abs(a.logprob - b.logprob) < LOGPROB_ATOL, f"{label}: prompt {i} logprobs"
            for token, lp in b.top.items():
                if token in a.top:  # near-ties may swap the 5th place
                    assert abs(a.top[token] - lp) < LOGPROB_ATOL, f"{label}: prompt {i} top-5"


@pytest.mark.parametrize(("tp", "cp"), MESHES)
def test_mesh_matches_single_device(run: Run, tp: int, cp: int) -> None:
    want, _ = run(1, 1)
    got, _ = run(tp, cp)
    _assert_same(got, want, f"tp={tp} cp={cp}")


def test_prefix_cache_and_kv_split_with_cp(ray_cluster: Any, tiny_llama_dir: Path) -> None:
    """A second request on a cached prompt prefills only its own tokens; each cp rank holds
    an even share of a sequence's KV blocks (1/cp of them, to within one block). Prompt
    log-probabilities (each chunk's rows gathered from the ranks holding them) equal cp = 1's,
    over chunks of 8 tokens that cross the ranks' blocks."""
    doc = _prompt(50, 7)
    params = SamplingParams(max_new_tokens=5, temperature=0.0, ignore_eos=True)
    scored = SamplingParams(max_new_tokens=2, temperature=0.0, prompt_logprobs=3, ignore_eos=True)
    with _runtime(tiny_llama_dir, 1, 1) as single:
        want = single.generate([doc + [9, 10, 11], doc + [12, 13]], params)
        (want_scored,) = single.generate([doc[:37]], scored)
    with _runtime(tiny_llama_dir, 1, 3, num_blocks=40) as rt:
        first = rt.generate([doc + [9, 10, 11]], params)
        before = rt.engine.scheduler.num_prompt_tokens_computed
        second = rt.generate([doc + [12, 13]], params)
        computed = rt.engine.scheduler.num_prompt_tokens_computed - before
        assert computed == len(doc) + 2 - (len(doc) // BLOCK_SIZE) * BLOCK_SIZE
        assert [o.token_ids for o in first + second] == [o.token_ids for o in want]
        (got_scored,) = rt.generate([doc[:37]], scored)
    assert got_scored.token_ids == want_scored.token_ids
    got_lp, want_lp = got_scored.prompt_logprobs, want_scored.prompt_logprobs
    assert got_lp is not None and want_lp is not None and len(got_lp) == len(want_lp) == 37
    assert got_lp[0] is None and want_lp[0] is None
    for g, w in zip(got_lp[1:], want_lp[1:], strict=True):
        assert g is not None and w is not None and g.token_id == w.token_id
        assert abs(g.logprob - w.logprob) < LOGPROB_ATOL
        assert list(g.top) == list(w.top)


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
@pytest.mark.parametrize("tokens", [1, 5, 37, 120])
def test_blocks_striped_evenly(cp: int, tokens: int) -> None:
    """Each cp pool gives a sequence 1/cp of its blocks (to within one), entry i from pool
    i % cp, and max_tokens is exactly what grow() can reach."""
    from dist_runtime.engine.block_manager import BlockManager

    bm = BlockManager(num_blocks=40, block_size=BLOCK_SIZE, cp_size=cp)
    table: list[int] = []
    bm.grow(table, tokens)
    used = [40 - free for free in bm.pool_free_blocks()]
    assert sum(used) == len(table) == -(-tokens // BLOCK_SIZE)
    assert max(used) - min(used) <= 1
    reach = bm.max_tokens(table)
    assert bm.can_grow(table, reach) and not bm.can_grow(table, reach + 1)
    bm.grow(table, reach)
    assert min(bm.pool_free_blocks()) == 0
    bm.free(table)
    assert bm.pool_free_blocks() == [40] * cp


def test_dynamic_ntk_request_base_with_cp(
    ray_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prompt past max_position_embeddings gets its own RoPE base on every cp rank, in eager
    decode steps and in (emulated) decode graphs with per-token RoPE tables."""
    from dist_runtime.formats.random_checkpoint import write_random_checkpoint

    folder = write_random_checkpoint(
        tmp_path / "dyn",
        architecture="internlm2",
        rope_scaling={"type": "dynamic", "factor": 2.0},
        max_position_embeddings=32,
        seed=6,
        with_tokenizer=False,
        **TINY_SHAPES,
    )
    prompts = [_prompt(50, 4), _prompt(20, 5)]  # one past max_pos, one within it
    outs = []
    for cp, graphs in ((1, "auto"), (2, "auto"), (2, "emulate")):
        monkeypatch.setenv("DIST_RUNTIME_DECODE_GRAPHS", graphs)
        with _runtime(folder, 1, cp) as rt:
            outs.append(rt.generate(prompts, PARAMS))
            rope_replays = [s["graph_rope_replays"] for s in rt.worker_steps()]
        assert all(n > 0 for n in rope_replays) == (graphs == "emulate"), rope_replays
    _assert_same(outs[1], outs[0], "dynamic NTK cp=2")
    _assert_same(outs[2], outs[0], "dynamic NTK cp=2, decode graphs")


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_sliding_windows_and_capped_scores_with_cp(
    ray_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str
) -> None:
    """A window of 11 on every layer (Mistral: each cp rank gives its passed blocks back as a
    sequence moves on, decode steps with static shapes as graphs have them) and on every
    second one with capped scores (Gemma 2): cp = 2 (ring chunks, chunks over the cached
    prefix, windowed decodes reading only the blocks a window reaches) gives cp = 1's tokens
    and log-probabilities, the prompts and the decodes well past the window."""
    import json

    from dist_runtime.config import ModelConfig
    from dist_runtime.formats.random_checkpoint import write_random_checkpoint

    folder = write_random_checkpoint(
        tmp_path / arch,
        architecture="llama" if arch == "mistral" else arch,
        seed=7,
        with_tokenizer=False,
        **TINY_SHAPES,
    )
    path = folder / "config.json"
    config = {**json.loads(path.read_text()), "sliding_window": 11}
    if arch == "mistral":
        config.update(architectures=["MistralForCausalLM"], model_type="mistral")
    path.write_text(json.dumps(config))
    model = ModelConfig.from_pretrained(str(folder))
    windows = [model.layer_window(i) for i in range(model.num_layers)]
    assert windows == ([11, 11] if arch == "mistral" else [11, 0])
    assert bool(model.attn_logit_softcapping) == (arch == "gemma2")
    graphs = "emulate" if arch == "mistral" else "auto"
    monkeypatch.setenv("DIST_RUNTIME_DECODE_GRAPHS", graphs)
    outs = []
    for cp in (1, 2):
        with _runtime(folder, 1, cp) as rt:
            outs.append(rt.generate(PROMPTS, PARAMS))
    _assert_same(outs[1], outs[0], f"{arch} cp=2")


def test_session_that_does_not_fit_fails_at_start_and_cp_fixes_it(
    ray_cluster: Any, tiny_llama_dir: Path
) -> None:
    """KV sized from a byte budget: 8 blocks of 16 tokens per worker hold 128 tokens, so a
    256-token session fails at start naming --cp 2, and cp=2 (half the KV per worker) runs."""
    from dist_runtime.config import ConfigError

    block_bytes = 2 * 2 * 16 * 4 * 8 * 4  # K and V, 2 layers, 16 tokens, 4 KV heads of 8, fp32
    kw: dict[str, Any] = dict(
        model=str(tiny_llama_dir),
        session_len=256,
        device="cpu",
        dtype="float32",
        cache=CacheConfig(block_size=16, cpu_kv_cache_gb=8 * block_bytes / 2**30),
    )
    with pytest.raises(ConfigError, match=r"session_len 256 does not fit.* use --cp 2"):
        Runtime(**kw)
    with Runtime(cp=2, **kw) as rt:
        assert rt.engine.blocks.capacity_tokens == 256
        assert rt.engine.executor.sharing == [2, 2]  # type: ignore[union-attr]
        (out,) = rt.generate([_prompt(200, 9)], SamplingParams(max_new_tokens=50, ignore_eos=True))
        assert len(out.token_ids) == 50
        assert all(m["kv_cache_bytes"] == 8 * block_bytes for m in rt.worker_memory())


def test_world_larger_than_the_cluster(ray_cluster: Any, tiny_llama_dir: Path) -> None:
    """tp * cp workers that the Ray cluster cannot place fail at once, naming the numbers."""
    from dist_runtime.engine.executor.base import WorkerError

    with pytest.raises(
        (WorkerError, ValueError), match=r"tp\*cp = 8 workers need 8 CPU.*lower tp/cp"
    ):
        _runtime(tiny_llama_dir, 2, 4)


def test_cp_decode_steps_replay_from_graphs(
    run: Run, ray_cluster: Any, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tp 2 x cp 2 with the decode graphs emulated (`DIST_RUNTIME_DECODE_GRAPHS=emulate`, handed
    to the Ray workers by the executor): decode steps, cp all-gather and merge included, run
    through the graphs' fixed buffers on every rank and give the single-device result. The
    one-token prompt leaves cp rank 1 without a key of its own for its first decode steps."""
    monkeypatch.setenv("DIST_RUNTIME_DECODE_GRAPHS", "emulate")
    want, _ = run(1, 1)
    with _runtime(tiny_llama_dir, 2, 2) as rt:
        got = rt.generate(PROMPTS, PARAMS)
        stats = rt.worker_steps()
    _assert_same(got, want, "tp=2 cp=2 graphs")
    assert [s["rank"] for s in stats] == [0, 1, 2, 3]
    replays = {s["graph_replays"] for s in stats}
    assert len(replays) == 1, stats  # every rank replays the same steps
    # Every decode step of the 33 tokens replays (the first token comes from a prefill), its
    # inputs (this rank's slots, key counts and blocks) staged in one copy.
    assert replays.pop() >= PARAMS.max_new_tokens - 1
    assert {s["graph_staged_replays"] for s in stats} == {s["graph_replays"] for s in stats}
