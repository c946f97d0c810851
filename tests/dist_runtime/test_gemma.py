"""Gemma 1, Gemma 2 and Gemma 3 text models.

Gemma 3 (`Gemma3ForCausalLM`, the `gemma3_text` checkpoints, and the language model of the
multimodal ones): RMSNorms that scale by 1 + weight, a norm on each sublayer's output, GELU's
tanh form, q / k head norms, a sqrt(hidden) embedding scale, the attention scale from
`query_pre_attn_scalar`, sliding-window layers with their own RoPE base between global ones
(which alone take rope_scaling), and the optional final-logit soft-cap. Gemma 2
(`Gemma2ForCausalLM`): the same without the head norms and the local RoPE base, with its
attention scores soft-capped (`attn_logit_softcapping`). Checked against
HF's own classes on random checkpoints, and the configs against what transformers writes and
reads. Gemma 1 (`GemmaForCausalLM`: gemma-2b / -7b, CodeGemma): Llama's layers and names with
Gemma's 1 + weight norms, GELU's tanh form and sqrt(hidden) embedding scale, no windows and no
soft-caps. (cp > 1 with windows and capped scores: tests/test_context_parallel.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_runtime import Runtime, SamplingParams
from dist_runtime.config import (
    ConfigError,
    ModelConfig,
    RuntimeConfig,
    SchedulerConfig,
)
from dist_runtime.formats.random_checkpoint import (
    GEMMA2_ATTN_SOFTCAP,
    GEMMA3_LOCAL_THETA,
    write_random_checkpoint,
)
from kernels.cpu_decoder import available
from tests.conftest import TINY_SHAPES
from tests.helpers.oracle import hf_greedy, load_hf_llama

WINDOW = 11
"""Not a multiple of the cache block (16) nor of the prefill chunk (8)."""
NEW = 6
PARAMS = SamplingParams(max_new_tokens=NEW, temperature=0.0, logprobs=5, ignore_eos=True)

GEMMA3_1B = {
    "architectures": ["Gemma3ForCausalLM"],
    "attention_bias": False,
    "attn_logit_softcapping": None,
    "bos_token_id": 2,
    "eos_token_id": [1, 106],
    "final_logit_softcapping": None,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 1152,
    "intermediate_size": 6912,
    "max_position_embeddings": 32768,
    "model_type": "gemma3_text",
    "num_attention_heads": 4,
    "num_hidden_layers": 26,
    "num_key_value_heads": 1,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": 512,
    "sliding_window_pattern": 6,
    "torch_dtype": "bfloat16",
    "vocab_size": 262144,
}
"""gemma-3-1b-it's config.json (transformers 4.50's keys)."""


def _prompt(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, TINY_SHAPES["vocab_size"], (length,), generator=gen).tolist()


def _gemma(
    tmp_path: Path,
    seed: int,
    tie: bool = False,
    version: int = 3,
    dtype: str = "float32",
    **config: Any,
) -> Path:
    """A random Gemma 3 checkpoint (layer 0 windowed to WINDOW with base GEMMA3_LOCAL_THETA,
    layer 1 global; `version` 2: Gemma 2's, soft-capped, one base; 1: Gemma 1's, no window)
    of `dtype` tensors with `config` written over its config.json."""
    shapes = dict(TINY_SHAPES, num_heads=4, num_kv_heads=2, head_dim=16)
    folder = write_random_checkpoint(
        tmp_path / f"gemma{version}-{seed}",
        architecture="gemma" if version == 1 else f"gemma{version}",
        with_tokenizer=False,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        seed=seed,
        dtype=dtype,
        **shapes,
    )
    path = folder / "config.json"
    window = {"sliding_window": WINDOW} if version > 1 else {}
    written = {**json.loads(path.read_text()), **window, **config}
    path.write_text(json.dumps(written))
    return folder


def _runtime(folder: Path, **kw: Any) -> Runtime:
    scheduler = SchedulerConfig(max_num_batched_tokens=8, max_num_seqs=4)
    return Runtime(
        model=str(folder), device="cpu", dtype="float32", session_len=128, scheduler=scheduler,
        **kw,
    )  # fmt: skip


def _matches_hf(folder: Path, prompts: list[list[int]], hf: Any = None) -> list[Any]:
    """Greedy decodes after chunked prefills (8 tokens a step, over cached keys) give HF
    generate's tokens and top-5 log-probabilities (HF's `hf`, or the folder's as HF loads it:
    its Gemma3ForCausalLM)."""
    if hf is None:
        hf = load_hf_llama(folder)
        assert type(hf).__name__ in ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")
    with _runtime(folder) as rt:
        outs = rt.generate(prompts, PARAMS)
    for out, prompt in zip(outs, prompts, strict=True):
        ids, logprobs = hf_greedy(hf, prompt, NEW)
        assert out.token_ids == ids
        assert out.logprobs is not None
        for lp, full in zip(out.logprobs, logprobs, strict=True):
            values, indices = full.topk(5)
            assert list(lp.top) == indices.tolist()
            got = torch.tensor(list(lp.top.values()))
            torch.testing.assert_close(got, values, rtol=0, atol=1e-4)
    return outs


def test_gemma3_matches_hf_past_its_window(tmp_path: Path) -> None:
    """A batch of one prompt within the window and two past it, tied embeddings."""
    folder = _gemma(tmp_path, seed=31, tie=True)
    model = ModelConfig.from_pretrained(str(folder))
    assert model.architecture == "gemma" and model.tie_word_embeddings
    assert [model.layer_window(i) for i in range(model.num_layers)] == [WINDOW, 0]
    assert model.local_rope_theta == GEMMA3_LOCAL_THETA
    _matches_hf(folder, [_prompt(7, seed=1), _prompt(30, seed=2), _prompt(45, seed=3)])


def test_gemma3_global_scaling_and_logit_softcap_match_hf(tmp_path: Path) -> None:
    """Linear rope_scaling turns the global layer only (HF's `full_attention` parameters), and
    the logits go through cap * tanh(logits / cap) (a cap of 2, well inside the logits' spread:
    no two log-probabilities differ by more than 2 * cap)."""
    folder = _gemma(
        tmp_path, seed=32, rope_scaling={"rope_type": "linear", "factor": 4.0},
        final_logit_softcapping=2.0,
    )  # fmt: skip
    model = ModelConfig.from_pretrained(str(folder))
    assert model.rope_scaling is not None and model.rope_scaling.type == "linear"
    assert model.final_logit_softcapping == 2.0
    (out,) = _matches_hf(folder, [_prompt(37, seed=4)])
    assert out.logprobs is not None
    assert all(max(lp.top.values()) - min(lp.top.values()) <= 2 * 2.0 for lp in out.logprobs)


def test_each_gemma3_part_changes_the_answer(tmp_path: Path) -> None:
    """Without the window, with the global base on every layer, or with SiLU, the same weights
    give other log-probabilities (so the HF tests check each, not a coincidence)."""
    folder = _gemma(tmp_path, seed=33)
    prompt = _prompt(40, seed=5)

    def first_top() -> dict[int, float]:
        with _runtime(folder) as rt:
            (out,) = rt.generate([prompt], PARAMS)
        assert out.logprobs is not None
        return dict(out.logprobs[0].top)

    def differs(a: dict[int, float], b: dict[int, float]) -> bool:
        return max(abs(a.get(t, -99.0) - v) for t, v in b.items()) > 1e-2

    path = folder / "config.json"
    base = json.loads(path.read_text())
    want = first_top()
    for change in (
        {"sliding_window": 4096},
        {"rope_local_base_freq": base["rope_theta"]},
        {"query_pre_attn_scalar": base["head_dim"]},
    ):
        path.write_text(json.dumps({**base, **change}))
        assert differs(first_top(), want), change


def test_gemma3_prefix_hit_and_tp_layout(tmp_path: Path) -> None:
    """A prompt served again from the prefix cache gives the same tokens and log-probabilities;
    its decode steps ran on the native CPU decoder (where the library is built), as every
    Gemma test here against HF's model does."""
    folder = _gemma(tmp_path, seed=34)
    prompt = _prompt(48, seed=6)
    with _runtime(folder) as rt:
        (first,) = rt.generate([prompt], PARAMS)
        (again,) = rt.generate([prompt], PARAMS)
        assert rt.prefix_cache_stats()["hit_tokens"] > 0
        model = rt.engine.executor.worker.runner.model  # type: ignore[union-attr]
        assert (model._native is not None and model._native[1] is not None) == available()
    assert again.token_ids == first.token_ids
    assert again.logprobs is not None and first.logprobs is not None
    for a, b in zip(again.logprobs, first.logprobs, strict=True):
        assert list(a.top) == list(b.top)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_bfloat16_norms_equal_hf_bit_for_bit(tmp_path: Path, version: int) -> None:
    """In bfloat16 every Gemma norm (the two or four of a layer, the head norms, the final one)
    gives HF's output bit for bit: its 1 + w stays float32 and scales the float32 normed
    values, one cast after, as HF's Gemma RMSNorm does."""
    from workers.distributed import Collectives, MeshCoords
    from workers.model_runner import ModelRunner

    folder = _gemma(tmp_path, seed=36, version=version, dtype="bfloat16")
    config = RuntimeConfig(model=str(folder), device="cpu", dtype="bfloat16", session_len=64)
    ours = ModelRunner(config, Collectives(MeshCoords())).model
    hf = load_hf_llama(folder, dtype=torch.bfloat16).model
    pairs: list[tuple[Any, Any]] = [(ours.norm, hf.norm)]
    layer: Any
    for layer, theirs in zip(ours.layers, hf.layers, strict=True):
        if version == 1:  # (Llama's two)
            pairs += [(layer.input_norm, theirs.input_layernorm)]
            pairs += [(layer.post_attn_norm, theirs.post_attention_layernorm)]
            continue
        pairs += [
            (layer.input_norm, theirs.input_layernorm),
            (layer.attn_out_norm, theirs.post_attention_layernorm),
            (layer.post_attn_norm, theirs.pre_feedforward_layernorm),
            (layer.mlp_out_norm, theirs.post_feedforward_layernorm),
        ]
        if version == 3:
            pairs += [(layer.attn.q_norm, theirs.self_attn.q_norm)]
            pairs += [(layer.attn.k_norm, theirs.self_attn.k_norm)]
    gen = torch.Generator().manual_seed(5)
    for mine, theirs in pairs:
        assert mine.weight.dtype == torch.float32 and theirs.weight.dtype == torch.bfloat16
        x = (3 * torch.randn(7, mine.weight.shape[0], generator=gen)).bfloat16()
        with torch.no_grad():
            got, want = mine(x)[0], theirs(x)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_gemma3_1b_config_reads_as_transformers_does() -> None:
    model = ModelConfig.from_dict(GEMMA3_1B)
    globals_ = [i for i in range(26) if model.layer_window(i) == 0]
    assert globals_ == [5, 11, 17, 23]  # (every sixth layer: sliding_window_pattern 6)
    assert model.sliding_window == 512 and model.local_rope_theta == 10000.0
    assert model.rope_theta == 1_000_000.0 and model.rope_scaling is None
    assert model.tie_word_embeddings  # (Gemma3TextConfig's default)
    assert model.attention_scale == pytest.approx(256**-0.5)
    assert model.embedding_multiplier == pytest.approx(1152**0.5)
    assert model.qk_norm and model.sandwich_norms and model.norm_weight_offset == 1.0
    assert model.hidden_act == "gelu_pytorch_tanh" and model.eos_token_ids == (1, 106)
    assert model.max_rope_len() == 32768


def test_transformers_5_gemma3_config_reads_the_same() -> None:
    """transformers 5 writes RoPE per layer type (`rope_parameters`) and `layer_types`; a 4B's
    linear x8 scaling applies to the global layers, and its 131072 positions are the scaled
    length already."""
    from transformers import Gemma3TextConfig

    old_keys: dict[str, Any] = {  # (transformers 4's, which version 5 converts)
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "rope_local_base_freq": 10_000.0,
        "rope_theta": 1_000_000.0,
    }
    hf = Gemma3TextConfig(num_hidden_layers=8, sliding_window=1024, **old_keys).to_dict()
    hf["architectures"] = ["Gemma3ForCausalLM"]
    assert set(hf["rope_parameters"]) == {"full_attention", "sliding_attention"}
    model = ModelConfig.from_dict(hf)
    assert [model.layer_window(i) for i in range(8)] == [1024] * 5 + [0] + [1024] * 2
    assert model.rope_theta == 1_000_000.0 and model.local_rope_theta == 10_000.0
    assert model.rope_scaling is not None and model.rope_scaling.factor == 8.0
    assert model.max_rope_len() == 131_072


def test_gemma3_keeps_attn_logit_softcapping_unapplied_as_hf_does() -> None:
    """Gemma3TextConfig has the key, Gemma 3's attention never reads it."""
    model = ModelConfig.from_dict({**GEMMA3_1B, "attn_logit_softcapping": 50.0})
    assert model.attn_logit_softcapping is None


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ({"hidden_activation": "silu"}, "hidden_activation"),
        ({"query_pre_attn_scalar": 0}, "query_pre_attn_scalar"),
        ({"final_logit_softcapping": "30"}, "final_logit_softcapping"),
        ({"sliding_window_pattern": 0}, "sliding_window_pattern"),
        (
            {"rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
            "sliding_attention",
        ),
    ],
)
def test_gemma3_config_refuses_what_is_not_run(change: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        ModelConfig.from_dict({**GEMMA3_1B, **change})


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights that make every part count: norms 0.1 * N(0, 1) (scales near 1), projections
    std 1 / sqrt(fan_in), embeddings std 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or p.dim() == 1:
                std = 0.1
            elif "embed" in name:
                std = 1.0
            else:
                std = p.shape[-1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def test_multimodal_gemma3_checkpoint_serves_its_language_model(tmp_path: Path) -> None:
    """A `Gemma3ForConditionalGeneration` folder (the 4B / 12B / 27B checkpoints): its
    `text_config` (only what differs from the defaults) and the language model's tensors, under
    the names transformers saves (the Hub's files' `language_model.model.`) and those it holds
    in memory (`model.language_model.`), generate HF's text-only answers; the vision tower is
    not read."""
    from safetensors.torch import load_file, save_file
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = {
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "vocab_size": 300, "max_position_embeddings": 256, "sliding_window": WINDOW,
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_local_base_freq": 100.0, "query_pre_attn_scalar": 32,
    }  # fmt: skip
    vision = {
        "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
        "num_attention_heads": 2, "image_size": 28, "patch_size": 14,
    }  # fmt: skip
    top: dict[str, Any] = {"eos_token_id": [1, 106]}  # (where the Hub's configs name it)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, **top)
    config.architectures = ["Gemma3ForConditionalGeneration"]
    hf = Gemma3ForConditionalGeneration(config).eval()
    _randomize(hf, seed=36)
    folder = tmp_path / "gemma3-mm"
    hf.save_pretrained(folder)
    model = ModelConfig.from_pretrained(str(folder))
    assert model.architecture == "gemma" and model.eos_token_ids == (1, 106)
    assert model.vocab_size == 300 and model.tie_word_embeddings
    prompts = [[t % 300 for t in _prompt(n, seed=7 + n)] for n in (9, 40)]
    (file,) = folder.glob("*.safetensors")
    tensors = load_file(file)
    assert any(name.startswith("language_model.model.") for name in tensors)
    _matches_hf(folder, prompts, hf)
    renamed = {  # (the names transformers 5 holds them under in memory)
        name.replace("language_model.model.", "model.language_model."): t
        for name, t in tensors.items()
    }
    save_file(renamed, str(file), metadata={"format": "pt"})
    _matches_hf(folder, prompts, hf)


GEMMA2_2B = {
    "architectures": ["Gemma2ForCausalLM"],
    "attention_bias": False,
    "attn_logit_softcapping": 50.0,
    "bos_token_id": 2,
    "eos_token_id": [1, 107],
    "final_logit_softcapping": 30.0,
    "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "max_position_embeddings": 8192,
    "model_type": "gemma2",
    "num_attention_heads": 8,
    "num_hidden_layers": 26,
    "num_key_value_heads": 4,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "torch_dtype": "float32",
    "vocab_size": 256000,
}
"""gemma-2-2b-it's config.json."""


def test_gemma2_matches_hf_past_its_window(tmp_path: Path) -> None:
    """Soft-capped attention scores (and logits), windowed and global layers on one base, tied
    embeddings, in a batch of one prompt within the window and two past it."""
    folder = _gemma(tmp_path, seed=41, tie=True, version=2)
    model = ModelConfig.from_pretrained(str(folder))
    assert model.architecture == "gemma" and not model.qk_norm
    assert model.attn_logit_softcapping == GEMMA2_ATTN_SOFTCAP
    assert model.final_logit_softcapping == 30.0 and model.local_rope_theta is None
    assert [model.layer_window(i) for i in range(model.num_layers)] == [WINDOW, 0]
    _matches_hf(folder, [_prompt(7, seed=11), _prompt(30, seed=12), _prompt(45, seed=13)])


def test_gemma2_attention_softcap_changes_the_answer(tmp_path: Path) -> None:
    folder = _gemma(tmp_path, seed=42, version=2)
    prompt = _prompt(40, seed=14)
    tops = []
    for cap in (GEMMA2_ATTN_SOFTCAP, None):
        path = folder / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "attn_logit_softcapping": cap}))
        with _runtime(folder) as rt:
            (out,) = rt.generate([prompt], PARAMS)
        assert out.logprobs is not None
        tops.append(dict(out.logprobs[0].top))
    capped, plain = tops
    assert max(abs(capped.get(t, -99.0) - v) for t, v in plain.items()) > 1e-2


def test_gemma2_2b_config_reads_as_transformers_does() -> None:
    model = ModelConfig.from_dict(GEMMA2_2B)
    assert [model.layer_window(i) for i in range(4)] == [4096, 0, 4096, 0]
    assert model.attn_logit_softcapping == 50.0 and model.final_logit_softcapping == 30.0
    assert model.local_rope_theta is None and not model.qk_norm and model.sandwich_norms
    assert model.rope_theta == 10000.0 and model.max_rope_len() == 8192
    assert model.tie_word_embeddings and model.eos_token_ids == (1, 107)
    # Gemma2Config's soft-caps where the keys are absent; null turns one off.
    absent = {k: v for k, v in GEMMA2_2B.items() if not k.endswith("softcapping")}
    model = ModelConfig.from_dict(absent)
    assert (model.attn_logit_softcapping, model.final_logit_softcapping) == (50.0, 30.0)
    off = ModelConfig.from_dict({**GEMMA2_2B, "attn_logit_softcapping": None})
    assert off.attn_logit_softcapping is None


GEMMA_7B: dict[str, Any] = {
    "architectures": ["GemmaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "head_dim": 256,
    "hidden_act": "gelu",
    "hidden_size": 3072,
    "initializer_range": 0.02,
    "intermediate_size": 24576,
    "max_position_embeddings": 8192,
    "model_type": "gemma",
    "num_attention_heads": 16,
    "num_hidden_layers": 28,
    "num_key_value_heads": 16,
    "pad_token_id": 0,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "torch_dtype": "bfloat16",
    "vocab_size": 256000,
}
"""gemma-7b's config.json: no tie_word_embeddings key (GemmaConfig's default ties them) and
its first releases' `hidden_act: gelu`."""


def test_gemma1_matches_hf(tmp_path: Path) -> None:
    """Gemma 1 (tied embeddings, as every Gemma 1 checkpoint) in a batch of three prompts,
    decoded on the native CPU decoder where the library is built."""
    folder = _gemma(tmp_path, seed=43, tie=True, version=1)
    model = ModelConfig.from_pretrained(str(folder))
    assert model.architecture == "llama" and model.norm_weight_offset == 1.0
    assert model.hidden_act == "gelu_pytorch_tanh" and not model.sandwich_norms
    assert model.sliding_window is None and model.tie_word_embeddings
    _matches_hf(folder, [_prompt(7, seed=15), _prompt(30, seed=16), _prompt(45, seed=17)])


def test_gemma1_7b_config_reads_as_transformers_does() -> None:
    """Its softmax scale is 1 / sqrt(head_dim) (256, not hidden / heads = 192), its 'gelu' the
    tanh form, its embeddings tied, as GemmaConfig and HF's Gemma classes read them."""
    from transformers import GemmaConfig

    hf = GemmaConfig(**GEMMA_7B)
    model = ModelConfig.from_dict(GEMMA_7B)
    assert model.hidden_act == hf.hidden_act == "gelu_pytorch_tanh"
    assert model.tie_word_embeddings == hf.tie_word_embeddings is True
    assert model.head_dim == hf.head_dim == 256
    assert model.attention_scale == pytest.approx(256**-0.5)
    assert model.embedding_multiplier == pytest.approx(3072**0.5)
    assert model.round_embedding_multiplier and model.norm_weight_offset == 1.0
    assert not model.sandwich_norms and not model.qk_norm and model.local_rope_theta is None
    assert model.final_logit_softcapping is None and model.attn_logit_softcapping is None
    assert model.sliding_window is None and model.max_rope_len() == 8192
    assert model.eos_token_ids == (1,) and model.rope_theta == 10000.0


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ({"hidden_act": "silu"}, "hidden_act"),
    ],
)
def test_gemma1_config_refuses_what_is_not_run(change: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        ModelConfig.from_dict({**GEMMA_7B, **change})
