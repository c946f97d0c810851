"""Random checkpoints: layouts, sharding, tokenizer, and agreement with the HF oracle."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from dist_runtime.config import ModelConfig
from dist_runtime.formats.random_checkpoint import (
    pack_internlm2_wqkv,
    unpack_internlm2_wqkv,
    write_random_checkpoint,
)
from tests.conftest import REPO_ROOT, TINY_SHAPES
from tests.helpers.oracle import load_hf_llama

FP32_ATOL = 1e-5
"""Both layouts run the same fp32 ops on the same weights; only reordering noise is allowed."""


def _prompt(batch: int = 2, length: int = 16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, TINY_SHAPES["vocab_size"], (batch, length), generator=gen)


def _logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_hf_llama(folder)(ids).logits


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("rest", [(24,), ()], ids=["weight", "bias"])
def test_pack_unpack_round_trip(group: int, rest: tuple[int, ...]) -> None:
    kv_heads, head_dim = 2, 4
    heads = kv_heads * group
    q = torch.randn(heads * head_dim, *rest)
    k = torch.randn(kv_heads * head_dim, *rest)
    v = torch.randn(kv_heads * head_dim, *rest)
    wqkv = pack_internlm2_wqkv(q, k, v, kv_heads)
    assert wqkv.shape == ((heads + 2 * kv_heads) * head_dim, *rest)
    grouped = wqkv.view(kv_heads, group + 2, head_dim, *rest)
    for j in range(kv_heads):
        for h in range(group):
            expected_q = q.view(heads, head_dim, *rest)[j * group + h]
            assert torch.equal(grouped[j, h], expected_q)
        assert torch.equal(grouped[j, group], k.view(kv_heads, head_dim, *rest)[j])
        assert torch.equal(grouped[j, group + 1], v.view(kv_heads, head_dim, *rest)[j])
    for got, want in zip(unpack_internlm2_wqkv(wqkv, heads, kv_heads, head_dim), (q, k, v)):
        assert torch.equal(got, want)


def test_unpack_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match="does not match"):
        unpack_internlm2_wqkv(torch.zeros(40, 8), num_heads=4, num_kv_heads=2, head_dim=4)


def test_layouts_give_same_logits(tiny_llama_dir: Path, tiny_internlm2_dir: Path) -> None:
    ids = _prompt()
    torch.testing.assert_close(
        _logits(tiny_internlm2_dir, ids), _logits(tiny_llama_dir, ids), atol=FP32_ATOL, rtol=0
    )


LINEAR_ROPE = {"type": "linear", "factor": 4.0}


@pytest.mark.parametrize(
    "bias,tie,rope_scaling", [(True, False, None), (False, True, None), (False, False, LINEAR_ROPE)]
)
def test_layouts_agree_with_options(
    tmp_path: Path, bias: bool, tie: bool, rope_scaling: dict[str, Any] | None
) -> None:
    kwargs = dict(TINY_SHAPES, num_layers=1, seed=7, bias=bias, tie_word_embeddings=tie)
    kwargs.update(rope_theta=5e5, rope_scaling=rope_scaling, with_tokenizer=False)
    llama = write_random_checkpoint(tmp_path / "llama", architecture="llama", **kwargs)
    internlm2 = write_random_checkpoint(tmp_path / "internlm2", architecture="internlm2", **kwargs)
    with safe_open(str(internlm2 / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert ("model.layers.0.attention.wqkv.bias" in names) == bias
    assert ("output.weight" in names) == (not tie)
    ids = _prompt()
    torch.testing.assert_close(_logits(internlm2, ids), _logits(llama, ids), atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_internlm2_dir"])
def test_index_lists_every_tensor(fixture: str, request: pytest.FixtureRequest) -> None:
    folder: Path = request.getfixturevalue(fixture)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard_files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shard_files) >= 3
    assert not (folder / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == shard_files
    total, seen = 0, set()
    for file in shard_files:
        with safe_open(str(folder / file), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            names = f.keys()
            for name in names:
                assert index["weight_map"][name] == file
                tensor = f.get_tensor(name)
                total += tensor.numel() * tensor.element_size()
                seen.add(name)
    assert seen == set(index["weight_map"])
    assert index["metadata"]["total_size"] == total


def test_expected_tensor_names(tiny_llama_dir: Path, tiny_internlm2_dir: Path) -> None:
    llama = json.loads((tiny_llama_dir / "model.safetensors.index.json").read_text())
    internlm2 = json.loads((tiny_internlm2_dir / "model.safetensors.index.json").read_text())
    assert len(llama["weight_map"]) == 3 + 9 * TINY_SHAPES["num_layers"]
    assert len(internlm2["weight_map"]) == 3 + 7 * TINY_SHAPES["num_layers"]
    assert {
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.1.post_attention_layernorm.weight",
    } <= set(llama["weight_map"])
    assert {
        "model.tok_embeddings.weight",
        "output.weight",
        "model.layers.1.attention.wqkv.weight",
        "model.layers.1.feed_forward.w3.weight",
        "model.layers.1.ffn_norm.weight",
    } <= set(internlm2["weight_map"])


def test_tokenizer_vocab_and_round_trip(tiny_internlm2_dir: Path) -> None:
    tok = Tokenizer.from_file(str(tiny_internlm2_dir / "tokenizer.json"))
    hf = json.loads((tiny_internlm2_dir / "config.json").read_text())
    assert tok.get_vocab_size(with_added_tokens=True) == hf["vocab_size"] == 512
    assert sorted(tok.get_vocab().values()) == list(range(512))
    assert tok.token_to_id("<s>") == hf["bos_token_id"]
    assert tok.token_to_id("</s>") in hf["eos_token_id"]
    assert tok.token_to_id("<|im_end|>") in hf["eos_token_id"]
    for text in [
        "Hello, world!",
        "  leading spaces\tand\ttabs\n",
        "你好，世界",
        "emoji 🚀🧪 ok",
        "naïve café — ½",
        "",
    ]:
        ids = tok.encode(text).ids
        assert ids[0] == hf["bos_token_id"]
        assert max(ids) < hf["vocab_size"]
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_is_deterministic(tmp_path: Path, tiny_llama_dir: Path) -> None:
    folder = write_random_checkpoint(tmp_path, **dict(TINY_SHAPES, num_layers=1))
    assert (folder / "tokenizer.json").read_bytes() == (
        tiny_llama_dir / "tokenizer.json"
    ).read_bytes()


def test_model_config_parses_both(tiny_llama_dir: Path, tiny_internlm2_dir: Path) -> None:
    llama = ModelConfig.from_pretrained(tiny_llama_dir)
    internlm2 = ModelConfig.from_pretrained(tiny_internlm2_dir)
    assert (llama.architecture, internlm2.architecture) == ("llama", "internlm2")
    for cfg in (llama, internlm2):
        assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (512, 64, 160)
        assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 8, 4, 8)
        assert cfg.bos_token_id == 0 and cfg.eos_token_ids == (1, 3)
        assert not cfg.tie_word_embeddings and not cfg.attention_bias


def test_bfloat16_and_internlm2_head_dim_check(tmp_path: Path) -> None:
    folder = write_random_checkpoint(tmp_path / "bf16", dtype="bfloat16", with_tokenizer=False)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="head_dim"):
        write_random_checkpoint(tmp_path / "bad", architecture="internlm2", head_dim=16)
    with pytest.raises(ValueError, match="vocab_size"):
        write_random_checkpoint(tmp_path / "tiny-vocab", vocab_size=100)


def test_cli_writes_loadable_folder(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        "launch/make_random_checkpoint.py",
        str(out),
        "--architecture",
        "internlm2",
        "--layers",
        "1",
        "--hidden",
        "32",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--intermediate",
        "48",
        "--vocab",
        "300",
        "--shard-mb",
        "0.02",
        "--seed",
        "3",
    ]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "wrote internlm2 checkpoint" in result.stderr
    cfg = ModelConfig.from_pretrained(out)
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.vocab_size) == (
        "internlm2",
        1,
        32,
        300,
    )
    assert (out / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        logits = load_hf_llama(out)(torch.tensor([[0, 5, 7]])).logits
    assert logits.shape == (1, 3, 300) and torch.isfinite(logits).all()


def test_greedy_decode_is_not_degenerate(tiny_llama_dir: Path) -> None:
    model = load_hf_llama(tiny_llama_dir)
    with torch.no_grad():
        logits = model(_prompt(1, 16)).logits[0]
        ids = torch.tensor([[0, 42, 17, 99]])
        for _ in range(20):
            next_id = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    spread = logits.max(-1).values - logits.min(-1).values
    assert spread.min() > 1.0
    assert logits.argmax(-1).unique().numel() > 4
    assert ids[0, 4:].unique().numel() > 3
