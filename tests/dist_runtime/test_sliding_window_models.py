"""Sliding-window attention (Mistral v0.1, Ministral, Phi-3-mini-4k, Qwen2's
`use_sliding_window`): each token of a windowed layer attends to the last `sliding_window`
keys, its own included, as HF's mask does (`kv_idx > q_idx - sliding_window`). Checked against
HF's own classes on random checkpoints run well past the window: chunked prefills over cached
keys, decode steps through the native CPU decoder and through the torch reference,
speculative verification, a prefix-cache hit, and blocks given back as the window passes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_runtime import Runtime, SamplingParams
from dist_runtime.config import ConfigError, ModelConfig, SchedulerConfig
from dist_runtime.engine.speculative import PromptLookup
from dist_runtime.formats.random_checkpoint import write_random_checkpoint
from tests.conftest import TINY_SHAPES
from tests.helpers.oracle import hf_greedy, load_hf_llama

WINDOW = 11
"""Not a multiple of the cache block (16) nor of the prefill chunk (8)."""
NEW = 6
PARAMS = SamplingParams(max_new_tokens=NEW, temperature=0.0, logprobs=5, ignore_eos=True)


def _prompt(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, TINY_SHAPES["vocab_size"], (length,), generator=gen).tolist()


def _windowed(
    tmp_path: Path,
    architecture: str,
    seed: int,
    num_heads: int = TINY_SHAPES["num_heads"],
    num_kv_heads: int = TINY_SHAPES["num_kv_heads"],
    **config: Any,
) -> Path:
    """A random checkpoint (head_dim 16: its decode steps run natively on CPU) with `config`
    written over its config.json."""
    shapes = dict(TINY_SHAPES, head_dim=16, max_position_embeddings=256, seed=seed)
    shapes.update(num_heads=num_heads, num_kv_heads=num_kv_heads)
    folder = write_random_checkpoint(
        tmp_path / architecture, architecture=architecture, with_tokenizer=False, **shapes
    )
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return folder


def _mistral(tmp_path: Path) -> Path:
    return _windowed(
        tmp_path, "llama", 21, architectures=["MistralForCausalLM"], model_type="mistral",
        sliding_window=WINDOW,
    )  # fmt: skip


def _hf_generate(folder: Path, prompt: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    return hf_greedy(load_hf_llama(folder), prompt, NEW)


def _matches(out: Any, want: tuple[list[int], list[torch.Tensor]]) -> None:
    ids, logprobs = want
    assert out.token_ids == ids
    assert out.logprobs is not None
    for lp, full in zip(out.logprobs, logprobs, strict=True):
        values, indices = full.topk(5)
        assert list(lp.top) == indices.tolist()
        torch.testing.assert_close(torch.tensor(list(lp.top.values())), values, rtol=0, atol=1e-4)


def _runtime(folder: Path, **kw: Any) -> Runtime:
    scheduler = SchedulerConfig(max_num_batched_tokens=8, max_num_seqs=4, **kw)
    return Runtime(
        model=str(folder), device="cpu", dtype="float32", session_len=128, scheduler=scheduler
    )


def _generate_matches_hf(folder: Path, prompts: list[list[int]]) -> None:
    """Greedy decodes after chunked prefills (8 tokens a step, over cached keys) give HF
    generate's tokens and top-5 log-probabilities; the steps ran on the native decoder."""
    with _runtime(folder) as rt:
        model = rt.engine.executor.worker.runner.model  # type: ignore[union-attr]
        outs = rt.generate(prompts, PARAMS)
        native = model._native
        assert native is not None and native[1] is not None  # (decodes ran natively)
    for out, prompt in zip(outs, prompts, strict=True):
        _matches(out, _hf_generate(folder, prompt))


def test_mistral_past_its_window_matches_hf(tmp_path: Path) -> None:
    folder = _mistral(tmp_path)
    model = ModelConfig.from_pretrained(str(folder))
    assert model.sliding_window == WINDOW and model.window_layers is None
    assert [model.layer_window(i) for i in range(model.num_layers)] == [WINDOW, WINDOW]
    # One prompt within the window, two past it by different amounts, in one batch.
    _generate_matches_hf(folder, [_prompt(7, seed=1), _prompt(30, seed=2), _prompt(45, seed=3)])


def test_the_window_changes_the_answer(tmp_path: Path) -> None:
    """The same weights without their window give other log-probabilities past it (so the
    test above checks the window, not attention over every key)."""
    folder = _mistral(tmp_path)
    prompt = _prompt(40, seed=4)
    with _runtime(folder) as rt:
        (windowed,) = rt.generate([prompt], PARAMS)
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "sliding_window": None}))
    with _runtime(folder) as rt:
        (full,) = rt.generate([prompt], PARAMS)
    assert windowed.logprobs is not None and full.logprobs is not None
    first_w, first_f = windowed.logprobs[0].top, full.logprobs[0].top
    assert max(abs(first_w.get(t, -99.0) - v) for t, v in first_f.items()) > 1e-2


def test_qwen2_windows_only_the_layers_from_max_window_layers(tmp_path: Path) -> None:
    """Qwen2's `use_sliding_window` windows layers max_window_layers and up (HF's
    `layer_types`); layer 0 here attends to every key, layer 1 within the window."""
    folder = _windowed(
        tmp_path, "qwen2", 22, use_sliding_window=True, sliding_window=WINDOW,
        max_window_layers=1,
    )  # fmt: skip
    model = ModelConfig.from_pretrained(str(folder))
    assert model.window_layers == (False, True)
    assert [model.layer_window(i) for i in range(model.num_layers)] == [0, WINDOW]
    _generate_matches_hf(folder, [_prompt(33, seed=5)])


def test_ministral_windows_the_layers_its_layer_types_name(tmp_path: Path) -> None:
    """Ministral reads `layer_types` (layer 0 full, layer 1 windowed here); Mistral's class
    ignores them and windows every layer, as HF's does."""
    kinds = ["full_attention", "sliding_attention"]
    folder = _windowed(
        tmp_path, "llama", 25, architectures=["MinistralForCausalLM"], model_type="ministral",
        sliding_window=WINDOW, layer_types=kinds,
    )  # fmt: skip
    model = ModelConfig.from_pretrained(str(folder))
    assert [model.layer_window(i) for i in range(model.num_layers)] == [0, WINDOW]
    _generate_matches_hf(folder, [_prompt(31, seed=8)])
    path = folder / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    assert ModelConfig.from_pretrained(str(folder)).window_layers is None


def test_phi3_window_matches_hf(tmp_path: Path) -> None:
    """Phi-3-mini-4k's config has a window (2047) under its trained length."""
    folder = _windowed(tmp_path, "phi3", 23, sliding_window=WINDOW, num_heads=4, num_kv_heads=2)
    assert ModelConfig.from_pretrained(str(folder)).sliding_window == WINDOW
    _generate_matches_hf(folder, [_prompt(29, seed=6)])


def test_reference_decode_prefix_hits_and_speculation_keep_the_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The torch reference decode (DIST_RUNTIME_CPU_ATTENTION=torch), a prompt served from the
    prefix cache, and speculative decoding (several query tokens per verify step) all give
    HF's greedy answer past the window."""
    folder = _mistral(tmp_path)
    prompt = _prompt(36, seed=7)
    want = _hf_generate(folder, prompt)
    with _runtime(folder) as rt:
        _matches(rt.generate([prompt], PARAMS)[0], want)
        _matches(rt.generate([prompt], PARAMS)[0], want)  # (its blocks now cached)
        assert rt.prefix_cache_stats()["hit_tokens"] >= 32
    monkeypatch.setattr(PromptLookup, "row_share", lambda self, batch: 0.0)  # (full drafts)
    with _runtime(folder, num_speculative_tokens=3) as rt:
        # The predicted answer is drafted whole: each verify step's queries attend together.
        params = SamplingParams(
            max_new_tokens=NEW, temperature=0.0, ignore_eos=True, prediction=tuple(want[0])
        )
        (out,) = rt.generate([prompt], params)
        assert out.token_ids == want[0]
        assert rt.engine.stats()["num_accepted_tokens"] >= 3  # (a whole draft of 3)
    monkeypatch.setenv("DIST_RUNTIME_CPU_ATTENTION", "torch")
    with _runtime(folder) as rt:
        _matches(rt.generate([prompt], PARAMS)[0], want)


def test_blocks_the_window_has_passed_go_back_to_the_pool(tmp_path: Path) -> None:
    """With every layer windowed, a sequence gives back the blocks its window has passed: three
    requests of 70 tokens each run at once in a cache of 12 blocks of 4 (48 tokens), which
    would refuse each of them otherwise, and each gives HF's greedy answer (EOS off on both
    sides); every block is free at the end.
    Qwen2 with one full-attention layer keeps every block, so there the request is refused."""
    folder = _mistral(tmp_path)
    prompts = [_prompt(30, seed=10 + i) for i in range(3)]
    params = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    cache = {"num_blocks": 12, "block_size": 4, "enable_prefix_caching": False}
    scheduler = SchedulerConfig(max_num_batched_tokens=8, max_num_seqs=4)
    with Runtime(
        model=str(folder), device="cpu", dtype="float32", session_len=128, cache=cache,
        scheduler=scheduler,
    ) as rt:  # fmt: skip
        outs = rt.generate(prompts, params)
        assert rt.engine.stats()["num_free_blocks"] == 12
    hf = load_hf_llama(folder)
    for out, prompt in zip(outs, prompts, strict=True):
        with torch.no_grad():
            gen = hf.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, 30, dtype=torch.long),
                max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0,
            )  # fmt: skip
        assert out.token_ids == gen[0, 30:].tolist()
    qwen = _windowed(
        tmp_path, "qwen2", 24, use_sliding_window=True, sliding_window=WINDOW,
        max_window_layers=1,
    )  # fmt: skip
    refused = pytest.raises(ValueError, match="needs 70 tokens of KV cache but the cache holds 48")
    with Runtime(
        model=str(qwen), device="cpu", dtype="float32", session_len=128, cache=cache,
        scheduler=scheduler,
    ) as rt, refused:  # fmt: skip
        rt.generate(prompts[:1], params)


def test_a_cached_prefix_longer_than_the_cache_is_found_again(tmp_path: Path) -> None:
    """Prompts of 15 blocks in a device cache of 14, with a host tier: each prompt's prefix is
    found again (from the host tier) though it could never be held whole, since a matched
    prefix keeps only its window's blocks; every answer is HF's greedy one."""
    folder = _mistral(tmp_path)
    prompts = [_prompt(60, seed=s) for s in (31, 32, 33)]
    want = []
    hf = load_hf_llama(folder)
    for p in prompts:
        with torch.no_grad():
            gen = hf.generate(
                torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0,
            )  # fmt: skip
        want.append(gen[0, len(p) :].tolist())
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    cache = {"num_blocks": 14, "block_size": 4, "host_kv_cache_gb": 0.001}
    scheduler = SchedulerConfig(max_num_batched_tokens=8, max_num_seqs=4)
    with Runtime(
        model=str(folder), device="cpu", dtype="float32", session_len=128, cache=cache,
        scheduler=scheduler,
    ) as rt:  # fmt: skip
        for _ in range(2):
            for p, w in zip(prompts, want, strict=True):
                assert rt.generate([p], params)[0].token_ids == w
        assert rt.engine.stats()["prefix_cache_host_hit_tokens"] > 0
        assert [o.token_ids for o in rt.generate(prompts, params)] == want


def test_windowed_config_errors(tmp_path: Path) -> None:
    folder = _mistral(tmp_path)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    kinds = ["full_attention", "chunked"]
    ministral = {"architectures": ["MinistralForCausalLM"], "model_type": "ministral"}
    path.write_text(json.dumps({**config, **ministral, "layer_types": kinds}))
    with pytest.raises(ConfigError, match="layer_types must list one of"):
        ModelConfig.from_pretrained(str(folder))
    path.write_text(json.dumps({**config, "sliding_window": 0}))
    with pytest.raises(ConfigError, match="sliding_window must be a positive integer"):
        ModelConfig.from_pretrained(str(folder))
    # Mistral's default window where the config names none; Llama's classes ignore the key.
    del config["sliding_window"]
    path.write_text(json.dumps(config))
    assert ModelConfig.from_pretrained(str(folder)).sliding_window == 4096
    path.write_text(
        json.dumps({**config, "architectures": ["LlamaForCausalLM"], "sliding_window": 4})
    )
    assert ModelConfig.from_pretrained(str(folder)).sliding_window is None
