"""InternLM3 (`InternLM3ForCausalLM`, internlm3-8b-instruct): Llama's layers and tensor names, its
q/k/v biases switched by `qkv_bias` and its o / MLP biases by `bias`, dynamic NTK RoPE.

Its classes are remote code (Llama's with those two switches), so the oracle is the
transformers class with the same biases (`tests/helpers/oracle.py`): Llama's without any,
Qwen2's with q/k/v biases alone, Llama's with attention and MLP biases for both switches set.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_runtime import Runtime, SamplingParams
from dist_runtime.config import ModelConfig
from dist_runtime.formats.random_checkpoint import write_from_state_dict, write_random_checkpoint
from tests.conftest import TINY_SHAPES
from tests.helpers.oracle import hf_greedy, load_hf_llama
from workers.checkpoint import CheckpointReader

MAX_POS = 32
INTERNLM3_8B: dict[str, Any] = {
    "architectures": ["InternLM3ForCausalLM"],
    "bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 10240,
    "max_position_embeddings": 32768,
    "model_type": "internlm3",
    "num_attention_heads": 32,
    "num_hidden_layers": 48,
    "num_key_value_heads": 2,
    "pad_token_id": 2,
    "qkv_bias": False,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 6.0, "rope_type": "dynamic"},
    "rope_theta": 50000000,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 128512,
}
"""internlm3-8b-instruct's config.json (its keys that this runtime reads)."""


def _prompt(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, TINY_SHAPES["vocab_size"], (length,), generator=gen).tolist()


def _internlm3(tmp_path: Path, qkv_bias: bool, bias: bool) -> Path:
    """A random InternLM3 folder with dynamic NTK past MAX_POS; with `bias` its o and MLP
    weights get biases too (the random writer gives the MLP none, so they are added here)."""
    folder = write_random_checkpoint(
        tmp_path / f"internlm3-{qkv_bias}-{bias}",
        architecture="internlm3",
        bias=qkv_bias,
        rope_scaling={"rope_type": "dynamic", "factor": 6.0},
        max_position_embeddings=MAX_POS,
        with_tokenizer=False,
        seed=12,
        **TINY_SHAPES,
    )
    config = json.loads((folder / "config.json").read_text())
    assert config["qkv_bias"] is qkv_bias and config["bias"] is False
    if not bias:
        return folder
    reader = CheckpointReader(folder)
    weights = {name: reader.read(name) for name in reader.names()}
    reader.close()
    gen = torch.Generator().manual_seed(13)
    biased = ("o_proj.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight")
    for name in [n for n in weights if n.endswith(biased)]:
        rows = weights[name].shape[0]
        weights[name.replace(".weight", ".bias")] = 0.1 * torch.randn(rows, generator=gen)
    for f in folder.glob("model*.safetensors*"):
        f.unlink()
    return write_from_state_dict(folder, {**config, "bias": True}, weights)


@pytest.mark.parametrize(
    ("qkv_bias", "bias"),
    [(False, False), (True, False), (True, True)],
    ids=["no-biases", "qkv-biases", "all-biases"],
)
def test_internlm3_matches_hf(tmp_path: Path, qkv_bias: bool, bias: bool) -> None:
    """Greedy decodes within the trained length give HF generate's tokens and top-5
    log-probabilities, and a prompt past it (dynamic NTK, one base for the request) HF's
    first-token log-probabilities."""
    folder = _internlm3(tmp_path, qkv_bias, bias)
    model = ModelConfig.from_pretrained(str(folder))
    assert model.architecture == "llama" and model.attention_bias == qkv_bias
    assert model.has_o_bias == bias and model.mlp_bias == bias
    hf = load_hf_llama(folder)
    short, long = _prompt(20, seed=21), _prompt(50, seed=22)
    params = SamplingParams(max_new_tokens=6, temperature=0.0, logprobs=5, ignore_eos=True)
    with Runtime(model=str(folder), device="cpu", dtype="float32", session_len=128) as rt:
        outs = rt.generate([short, long], params)
    want, logprobs = hf_greedy(hf, short, 6)
    assert outs[0].token_ids == want
    assert outs[0].logprobs is not None
    for lp, full in zip(outs[0].logprobs, logprobs, strict=True):
        values, indices = full.topk(5)
        assert list(lp.top) == indices.tolist()
        torch.testing.assert_close(torch.tensor(list(lp.top.values())), values, rtol=0, atol=1e-4)
    with torch.no_grad():  # (HF's dynamic NTK takes its base from this forward's length)
        logits = hf(torch.tensor([long])).logits[0, -1].float()
    values, indices = torch.log_softmax(logits, dim=-1).topk(5)
    first = outs[1].logprobs[0] if outs[1].logprobs else None
    assert first is not None and list(first.top) == indices.tolist()
    torch.testing.assert_close(torch.tensor(list(first.top.values())), values, rtol=0, atol=1e-4)
    assert model.rope_base(len(long)) > model.rope_theta  # (the long prompt took its own base)


def test_internlm3_8b_config_reads_as_its_code_does() -> None:
    model = ModelConfig.from_dict(INTERNLM3_8B)
    assert (model.num_heads, model.num_kv_heads, model.head_dim) == (32, 2, 128)
    assert not model.attention_bias and not model.has_o_bias and not model.mlp_bias
    assert model.rope_scaling is not None and model.rope_scaling.type == "dynamic"
    assert model.rope_scaling.factor == 6.0 and model.rope_theta == 50_000_000
    assert not model.tie_word_embeddings and model.eos_token_ids == (2,)
    biased = ModelConfig.from_dict({**INTERNLM3_8B, "bias": True})
    assert not biased.attention_bias and biased.has_o_bias and biased.mlp_bias
    qkv = ModelConfig.from_dict({**INTERNLM3_8B, "qkv_bias": True})
    assert qkv.attention_bias and not qkv.has_o_bias and not qkv.mlp_bias
