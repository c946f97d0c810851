"""Convert a llama.cpp GGUF file into a Hugging Face checkpoint folder.

    convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "/models/smollm2")  # float32 weights

writes `config.json`, safetensors weights (one file, or shards plus
`model.safetensors.index.json`), `tokenizer.json`, `tokenizer_config.json` and
`generation_config.json` -- the folder layout `Runtime(model=...)` loads.

Weights: every tensor is dequantized to float32 (`gguf.quants.dequantize`), then cast to the
requested dtype and written straight to its place in the safetensors file, one tensor at a time,
so memory holds one tensor and never the whole model. GGUF stores shapes in ggml order
(fastest-varying first); they are reversed to PyTorch order. llama.cpp's converter permutes the
rows of `attn_q` / `attn_k` per head from Hugging Face's rotate-half RoPE layout to its
interleaved one for Llama- and Granite-architecture files (not for qwen2 or phi3, whose RoPE is
rotate-half there too); that permutation is undone exactly as transformers does when it loads a
GGUF.

With `weights="int4"` (`launch/convert.py --weights int4`), the decoder's linear layers whose
GGUF tensors are Q4_0, Q4_1 or Q4_K stay 4-bit: each 32-value block's codes are kept and its
affine map (value = a * code + b) becomes a scale a and a float zero -b / a, written in the
runtime's "gguf" layout (`qweight` int32 [in/8, out], `scales` and `zeros` float32 [in/32, out];
`quantization_config.quant_method: "gguf"`). The W4A16 kernel then reads them with no loss
beyond float rounding. A layer type that is 4-bit in some layers and not in others (Q4_K_M
files keep some `attn_v` / `ffn_down` in Q6_K) is dequantized everywhere and listed in
`modules_to_not_convert`; embeddings, the output head and Q8_0 tensors are dequantized too
(the kernel is 4-bit). Only the runtime reads this layout; `launch/quantize.py` writes AWQ
for other tools.

Tokenizer: byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`) are rebuilt as a
`tokenizers` BPE with the vocabulary, merges, control tokens as special added tokens and the
pre-tokenizer named by `tokenizer.ggml.pre` (llama.cpp's split rules, see `_pre_tokenizer`).
SentencePiece vocabularies (`"llama"`: Llama 2, Mistral, Phi-3) are written back as the
`tokenizer.model` they came from (`_sentencepiece_files`).

Everything is written to a temporary folder next to `out_dir` and renamed into place at the end,
so a failed conversion never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import struct
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "phi3", "granite", "gemma", "gemma2", "gemma3")
"""GGUF architectures converted: Llama's layout (Mistral, SmolLM, ... too) and Qwen2's (Qwen2 /
Qwen2.5 and their distills: q/k/v biases, and q/k rows never permuted, since llama.cpp's qwen2
rotates halves as HF does), and Phi-3's (Phi-3 / 3.5 / 4-mini: q/k/v and gate/up packed as
HF packs them, LongRoPE's factors as tensors, partial RoPE) and IBM Granite's (Llama's, q/k rows
permuted as Llama's, with its four scales in the metadata), and Gemma 1 / 2 / 3's (text; q/k
rows as HF has them, every norm stored as 1 + weight; Gemma 1's Llama's tensors, Gemma 2 / 3's
four norms a layer and what llama.cpp fixes by the model's size read as it does: see
`_gemma_config`)."""
"""`general.architecture` values this converter understands."""
SUPPORTED_TENSOR_TYPES = (
    "F32",
    "F16",
    "BF16",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q8_0",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
)
"""GGML tensor types that are dequantized (names of `gguf.GGMLQuantizationType`)."""
OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GEMMA_TENSORS = {
    **{k: v for k, v in _LAYER_TENSORS.items() if k != "ffn_norm"},
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
"""Gemma 2 / 3's layer tensors: a norm on each sublayer's input and output, and Gemma 3's q / k
head norms. llama.cpp's converter stores every Gemma norm weight w as 1 + w (its kernels scale
by the weight), so 1 is taken off again (`_TensorPlan.offset`), as transformers' GGUF loading
does."""
_GEMMA_HF = {
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
"""llama.cpp's 27B Gemmas (by block count): their softmax scale is 1 / sqrt(hidden / heads),
every other size's 1 / sqrt(head_dim) (HF's `query_pre_attn_scalar`, which GGUF does not
carry)."""
_GEMMA3_LOCAL_BASE = 10000.0
"""The RoPE base of Gemma 3's sliding-window layers (HF's `rope_local_base_freq`; llama.cpp
fixes it, GGUF does not carry it)."""
_GEMMA_WINDOW_EVERY = {"gemma2": 2, "gemma3": 6}
"""Every n-th layer attends to every key, the others within the window (llama.cpp's swa
pattern; HF's layer_types)."""
_PHI3_TENSORS = {
    **{k: v for k, v in _LAYER_TENSORS.items() if k not in ("ffn_gate", "ffn_up")},
    "attn_qkv": "self_attn.qkv_proj",
    "ffn_up": "mlp.gate_up_proj",
}
"""Phi-3's layer tensors: q/k/v (or attn_qkv, packed as HF's qkv_proj) and ffn_up holding HF's
gate_up_proj ([gate | up])."""
_ATTN_PROJ = ("attn_q", "attn_k", "attn_v", "attn_output")
_MLP_PROJ = ("ffn_gate", "ffn_up", "ffn_down")
_SKIPPED_TENSORS = re.compile(
    r"^(blk\.\d+\.attn_rot_embd(\.weight)?|rope_freqs\.weight|rope_factors_(long|short)\.weight)$"
)
"""Precomputed rotary frequencies some old converters stored (recomputed from the config), and
llama.cpp's Llama 3.1 frequency divisors and Phi-3's LongRoPE factors (read into config.json's
rope_scaling)."""
_LAYER_NAME = re.compile(r"^blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)$")
_GLOBAL_NAME = re.compile(r"^([a-z0-9_]+)\.(weight|bias)$")

# token_type values of `tokenizer.ggml.token_type` (llama.cpp's llama_token_type, which are
# SentencePiece's piece types).
_TOKEN_NORMAL = 1
_TOKEN_UNKNOWN = 2
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4
_TOKEN_BYTE = 6

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone")
"""llama.cpp splits off every digit (`\\p{N}`) before the GPT-2 regex for these pre-tokenizer
names; SmolLM2's own tokenizer.json does the same: Sequence[Digits(individual_digits),
ByteLevel]. (transformers 5.x's GGUF loader ignores these names and uses plain GPT-2 splitting,
which differs on whitespace runs before a digit: "a  1" -> a|Ġ|Ġ|1 there, a|ĠĠ|1 here.)"""
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe")
_GPT2_PRE = ("default", "gpt2", "gpt-2", "olmo", "mpt", "jais")
_LETTERS_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_LETTERS_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_SPLITS = {
    # Qwen2's tokenizer.json: Llama 3's rules with single digits
    "qwen2": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
    # Mistral NeMo's tekken: words split at case changes, single digits, slashes kept on symbols
    "tekken": (
        rf"[^\r\n\p{{L}}\p{{N}}]?{_LETTERS_UPPER}*{_LETTERS_LOWER}+"
        rf"|[^\r\n\p{{L}}\p{{N}}]?{_LETTERS_UPPER}+{_LETTERS_LOWER}*"
        r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
    # GPT-4o's (Llama 4's): tekken's words with contractions attached, digits in threes
    "gpt-4o": (
        rf"[^\r\n\p{{L}}\p{{N}}]?{_LETTERS_UPPER}*{_LETTERS_LOWER}+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
        rf"|[^\r\n\p{{L}}\p{{N}}]?{_LETTERS_UPPER}+{_LETTERS_LOWER}*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
        r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
}
_SPLIT_OF_PRE = {
    **{name: _LLAMA3_SPLIT for name in _LLAMA3_PRE},
    **{name: _SPLITS["qwen2"] for name in ("qwen2", "deepseek-r1-qwen", "megrez")},
    "tekken": _SPLITS["tekken"],
    **{name: _SPLITS["gpt-4o"] for name in ("gpt-4o", "llama4")},
}
"""llama.cpp's split rules per `tokenizer.ggml.pre` name that are one regex before byte-level
BPE (the names whose rules are GPT-2's, or digits then GPT-2's, are handled apart)."""


class GGUFError(ValueError):
    """A GGUF file that cannot be converted as it is (with what to do about it)."""


@dataclass(frozen=True)
class _TensorPlan:
    """One output tensor: where it comes from and how it is transformed."""

    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]
    """PyTorch-order shape of the output tensor."""
    permute_heads: int = 0
    """Undo llama.cpp's rotary row permutation over this many heads (0: no permutation)."""
    offset: float = 0.0
    """Added to the dequantized values (Gemma's norms: -1, see `_GEMMA_TENSORS`)."""


def convert_gguf(
    gguf_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    dtype: str = "float32",
    max_shard_bytes: int | None = None,
    *,
    tokenizer: bool = True,
    progress: bool = True,
    weights: str = "float",
) -> Path:
    """Convert `gguf_path` into a Hugging Face folder at `out_dir` (missing or empty) and return it.

    `dtype`: float32 (default), bfloat16 or float16 for the written weights (dequantization is
    always done in float32 first). `max_shard_bytes`: split the weights into shards of at most
    this many bytes (a larger tensor gets a shard of its own); None writes one file.
    `tokenizer=False` skips the tokenizer files (token-id prompts only). `weights="int4"` keeps
    4-bit linear layers 4-bit (module docstring). Raises `GGUFError` for files it cannot
    convert; nothing is left in `out_dir` then.
    """
    if weights not in WEIGHT_MODES:
        raise GGUFError(f"weights {weights!r} is not supported; use one of {list(WEIGHT_MODES)}")
    src = Path(gguf_path)
    out = Path(out_dir)
    if dtype not in OUTPUT_DTYPES:
        raise GGUFError(f"dtype {dtype!r} is not supported; use one of {sorted(OUTPUT_DTYPES)}")
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise GGUFError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GGUFError(
            f"output folder {out} already exists and is not empty; choose a new folder or delete it"
        )
    reader = open_gguf(src)
    meta = read_metadata(reader, src)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{src}: GGUF architecture {arch!r} is not supported; supported: "
            f"{list(SUPPORTED_ARCHITECTURES)}"
        )
    tensors = {t.name: t for t in reader.tensors}
    if weights == "int4" and arch == "phi3":
        raise GGUFError(
            f"{src}: weights='int4' (--weights int4) is not supported for phi3 GGUFs, whose "
            "q/k/v and gate/up are packed; convert with float weights"
        )
    hf_config = _llama_config(meta, tensors, src, dtype)
    plan = _plan_llama_tensors(tensors, hf_config, src)
    keep4 = _four_bit_kinds(tensors, plan) if weights == "int4" else {}
    if weights == "int4":
        float_kinds = sorted({_LAYER_TENSORS[k] for k in _LINEAR_KINDS} - set(keep4.values()))
        hf_config["quantization_config"] = {
            "quant_method": "gguf",
            "bits": 4,
            "group_size": GGUF_GROUP,
            "modules_to_not_convert": float_kinds,
        }
    tok_files = _tokenizer_files(meta, src, hf_config) if tokenizer else {}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # unlike mkdtemp, honours the umask: the folder is renamed into place
    try:
        _write_json(tmp / "config.json", hf_config)
        _write_json(tmp / "generation_config.json", _generation_config(hf_config))
        for name, content in tok_files.items():
            if isinstance(content, bytes):
                (tmp / name).write_bytes(content)
            else:
                (tmp / name).write_text(content, encoding="utf-8")
        if keep4:
            _write_int4_weights(tmp, tensors, plan, OUTPUT_DTYPES[dtype], keep4, progress)
        else:
            _write_weights(tmp, tensors, plan, OUTPUT_DTYPES[dtype], max_shard_bytes, progress)
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.debug("converted %s -> %s (%d tensors, %s)", src, out, len(plan), dtype)
    return out


def open_gguf(path: str | os.PathLike[str]) -> Any:
    """A `gguf.GGUFReader` over `path`; GGUFError when it is missing, truncated or not a GGUF."""
    from gguf import GGUFReader

    src = Path(path)
    if not src.is_file():
        raise GGUFError(f"GGUF file {src} does not exist")
    try:
        reader = GGUFReader(src)
    except Exception as e:  # the reader fails with whatever numpy/struct error it hits first
        raise GGUFError(
            f"{src} is not a readable GGUF file ({type(e).__name__}: {e}); it may be truncated "
            "or corrupt -- download it again"
        ) from e
    short = [t.name for t in reader.tensors if t.data.nbytes != t.n_bytes]
    if short:
        raise GGUFError(
            f"{src} is truncated: tensor data of {short[:3]} is incomplete; download it again"
        )
    return reader


def read_metadata(reader: Any, src: Path | str = "GGUF file") -> dict[str, Any]:
    """All key/value metadata of a GGUF reader as plain Python values."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except Exception as e:
            raise GGUFError(
                f"{src}: metadata key {key!r} cannot be read ({e}); is the file corrupt?"
            ) from e
    return meta


# ----------------------------------------------------------------------------------------------
# config.json


def _llama_config(
    meta: dict[str, Any], tensors: dict[str, Any], src: Path, dtype: str
) -> dict[str, Any]:
    arch = meta["general.architecture"]

    def get(key: str, required: bool = True) -> Any:
        full = f"{arch}.{key}"
        if full not in meta:
            if required:
                raise GGUFError(f"{src}: metadata key {full!r} is missing; is the GGUF complete?")
            return None
        return meta[full]

    def uniform(key: str, value: Any) -> int:
        if isinstance(value, list):
            if not value or len(set(value)) != 1:
                raise GGUFError(
                    f"{src}: {arch}.{key} differs between layers ({value}); per-layer shapes are "
                    "not supported"
                )
            value = value[0]
        return int(value)

    hidden = int(get("embedding_length"))
    heads = uniform("attention.head_count", get("attention.head_count"))
    kv_raw = get("attention.head_count_kv", required=False)
    kv_heads = heads if kv_raw is None else uniform("attention.head_count_kv", kv_raw)
    rope_dim = get("rope.dimension_count", required=False)
    key_len = get("attention.key_length", required=False)
    # (phi3's rope.dimension_count is the rotated width, which may be less than head_dim)
    head_dim = int(key_len or (rope_dim if arch != "phi3" else None) or hidden // heads)
    value_len = get("attention.value_length", required=False)
    if value_len is not None and int(value_len) != head_dim:
        raise GGUFError(
            f"{src}: attention.key_length {head_dim} != value_length {value_len} is not supported"
        )
    rotary = int(rope_dim or head_dim)
    if rotary != head_dim and arch != "phi3":
        raise GGUFError(
            f"{src}: partial rotary embeddings (rope.dimension_count {rope_dim} < head_dim "
            f"{head_dim}) are not supported for {arch}"
        )
    theta = _f32(get("rope.freq_base", required=False) or 10000.0)
    scaling = _rope_scaling(get, src)
    if arch in _GEMMA_HF and scaling is not None and scaling["type"] != "linear":
        raise GGUFError(
            f"{src}: {arch} with {scaling['type']} rope scaling is not a Gemma HF describes "
            "(Gemma 3 scales its global layers linearly); use the model's HF checkpoint"
        )
    if arch == "phi3" and "rope_factors_long.weight" in tensors:  # (LongRoPE)
        scaling = {
            "type": "longrope",
            "rope_type": "longrope",
            **{
                f"{kind}_factor": [
                    _f32(x) for x in np.asarray(tensors[f"rope_factors_{kind}.weight"].data).ravel()
                ]
                for kind in ("long", "short")
            },
        }
        attn_factor = get("rope.scaling.attn_factor", required=False)
        if attn_factor is not None:
            scaling["attention_factor"] = _f32(attn_factor)
    freqs = tensors.get("rope_freqs.weight")
    if freqs is not None:
        if scaling is not None:
            raise GGUFError(
                f"{src} carries both rope scaling metadata ({scaling['type']}) and a "
                "`rope_freqs` tensor; llama.cpp applies both, which no Hugging Face rope_type "
                "describes; use the model's Hugging Face checkpoint"
            )
        original = get("rope.scaling.original_context_length", required=False)
        scaling = _llama3_from_freq_factors(
            np.asarray(freqs.data, dtype=np.float64).reshape(-1), head_dim, theta, original, src
        )
    embd = tensors.get("token_embd.weight")
    vocab = get("vocab_size", required=False)
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        if tokens is not None:
            vocab = len(tokens)
        elif embd is not None:
            vocab = int(embd.shape[-1])
        else:
            raise GGUFError(f"{src}: cannot tell the vocabulary size (no vocab_size, no tokens)")
    layers = int(get("block_count"))
    attention_bias = any(f"blk.{i}.{n}.bias" in tensors for i in range(layers) for n in _ATTN_PROJ)
    mlp_bias = any(f"blk.{i}.{n}.bias" in tensors for i in range(layers) for n in _MLP_PROJ)
    if arch == "qwen2":
        biases = [f"blk.{i}.{n}.bias" for i in range(layers) for n in _ATTN_PROJ[:3]]
        missing = [b for b in biases if b not in tensors]
        odd = [
            n
            for n in tensors
            if n.endswith((".attn_output.bias", *(f".{m}.bias" for m in _MLP_PROJ)))
        ]
        if missing or odd:
            raise GGUFError(
                f"{src}: a qwen2 GGUF has biases on attn_q, attn_k and attn_v and nowhere else; "
                f"this one lacks {missing[:3]} and has {odd[:3]}; is it another architecture?"
            )

    hf_arch = {
        "qwen2": "Qwen2ForCausalLM",
        "phi3": "Phi3ForCausalLM",
        "granite": "GraniteForCausalLM",
    }.get(arch, "LlamaForCausalLM")
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": uniform("feed_forward_length", get("feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(get("context_length", required=False) or 4096),
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", required=False) or 1e-6),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "attention_bias": attention_bias,
        "mlp_bias": mlp_bias,
        "tie_word_embeddings": "output.weight" not in tensors,
        "torch_dtype": dtype,
    }
    if arch == "granite":  # (HF's names for llama.cpp's scales)
        for hf_key, key in (
            ("embedding_multiplier", "embedding_scale"),
            ("residual_multiplier", "residual_scale"),
            ("attention_multiplier", "attention.scale"),
            ("logits_scaling", "logit_scale"),
        ):
            value = get(key, required=False)
            if value is not None:
                config[hf_key] = _f32(value)
    if arch in _GEMMA_HF:
        _gemma_config(config, arch, get)
    if arch == "phi3":
        original = get("rope.scaling.original_context_length", required=False)
        if original is not None:
            config["original_max_position_embeddings"] = int(original)
        window = get("attention.sliding_window", required=False)
        config["sliding_window"] = int(window) if window else None
        if rotary != head_dim:
            config["partial_rotary_factor"] = rotary / head_dim
    for hf_key, gguf_key in (
        ("bos_token_id", "bos_token_id"),
        ("pad_token_id", "padding_token_id"),
        ("unk_token_id", "unknown_token_id"),
    ):
        if f"tokenizer.ggml.{gguf_key}" in meta:
            config[hf_key] = int(meta[f"tokenizer.ggml.{gguf_key}"])
    eos = [
        int(meta[f"tokenizer.ggml.{k}"])
        for k in ("eos_token_id", "eot_token_id", "eom_token_id")
        if f"tokenizer.ggml.{k}" in meta
    ]
    eos = list(dict.fromkeys(eos))
    if eos:
        config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    name = meta.get("general.name")
    if isinstance(name, str):
        config["_name_or_path"] = name
    return config


def _gemma_config(config: dict[str, Any], arch: str, get: Any) -> None:
    """Gemma's config.json keys beyond Llama's, in place. Gemma 1: its class and GELU (its
    softmax scale is head_dim's, no windows, no soft-caps). Gemma 2 / 3: what GGUF carries (the
    window, Gemma 2's soft-caps) and what llama.cpp fixes by architecture and size (which
    layers are windowed, Gemma 3's local RoPE base, the softmax scale: `_GEMMA_27B_LAYERS`)."""
    if arch == "gemma":
        config.update(
            architectures=[_GEMMA_HF[arch]], model_type="gemma", hidden_act="gelu_pytorch_tanh"
        )
        return
    layers, every = config["num_hidden_layers"], _GEMMA_WINDOW_EVERY[arch]
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    big = layers == _GEMMA_27B_LAYERS[arch]
    window = get("attention.sliding_window", required=False)
    config.update(
        architectures=[_GEMMA_HF[arch]],
        model_type="gemma2" if arch == "gemma2" else "gemma3_text",
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=hidden // heads if big else config["head_dim"],
        sliding_window=int(window) if window else config["max_position_embeddings"],
        layer_types=[
            "full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(layers)
        ],
    )
    del config["hidden_act"]
    if arch == "gemma2":  # (a GGUF without them: Gemma2Config's defaults, 50 and 30, apply)
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            cap = get(key, required=False)
            if cap is not None:
                config[key] = _f32(cap) if cap else None
    else:
        config["rope_local_base_freq"] = _GEMMA3_LOCAL_BASE
        config["final_logit_softcapping"] = None
        config["attn_logit_softcapping"] = None


def _f32(value: Any) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.99e-06)."""
    return float(str(np.float32(value)))


def _rope_scaling(get: Any, src: Path) -> dict[str, Any] | None:
    kind = get("rope.scaling.type", required=False)
    factor = get("rope.scaling.factor", required=False)
    legacy = get("rope.scale_linear", required=False)
    if kind is None and legacy is not None:
        kind, factor = "linear", legacy
    if kind in (None, "none") or (kind == "linear" and float(factor or 1.0) == 1.0):
        return None
    if factor is None:
        raise GGUFError(f"{src}: rope scaling {kind!r} without rope.scaling.factor")
    scaling: dict[str, Any] = {"rope_type": str(kind), "type": str(kind), "factor": float(factor)}
    original = get("rope.scaling.original_context_length", required=False)
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


FREQ_FACTOR_RTOL = 1e-5
"""How close the llama3 parameters read from a `rope_freqs` tensor must reproduce every one of
its factors (they are stored as float32: about 6e-8 apart from the values they came from)."""


def _llama3_factors(
    inv_freq: np.ndarray, factor: float, low: float, high: float, original: float
) -> np.ndarray:
    """llama.cpp's per-dimension divisors of Llama 3.1's frequency scaling (HF's `llama3`)."""
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    return np.where(
        wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, blended)
    )


def _band_edges(
    x: np.ndarray, factors: np.ndarray, factor: float, between: np.ndarray
) -> Iterable[tuple[float, float]]:
    """Candidate (low_freq_factor, high_freq_factor) for divisors `factors` at x = trained /
    wavelength: the blend s = (x - low) / (high - low) is a line; two or more blended
    divisors fix it (least squares); one fixes a point of it, so high / low is tried at Llama
    3's 4 and a few other ratios; none leaves the edges anywhere in the gap between the slow
    and fast dimensions. Each candidate is checked against every divisor by the caller."""
    smooth = (1 / factors[between] - 1 / factor) / (1 - 1 / factor)
    if between.sum() >= 2:
        slope, intercept = np.polyfit(x[between], smooth, 1)
        if slope > 0:
            yield -intercept / slope, (1 - intercept) / slope
        return
    if between.sum() == 1:
        (xm,), (sm,) = x[between], smooth
        for ratio in (4.0, 2.0, 8.0, 1.5, 16.0):
            low = xm / (1 + (ratio - 1) * sm)
            yield low, ratio * low
        return
    slow = x[factors >= factor * (1 - FREQ_FACTOR_RTOL)]
    fast = x[factors <= 1 + FREQ_FACTOR_RTOL]
    if slow.size and fast.size and fast.min() > slow.max():
        gap = fast.min() / slow.max()
        yield slow.max() * gap**0.25, slow.max() * gap**0.75


def _llama3_from_freq_factors(
    factors: np.ndarray, head_dim: int, theta: float, original: Any, src: Path
) -> dict[str, Any] | None:
    """HF's `rope_type: llama3` parameters that give llama.cpp's `rope_freqs` divisors.

    llama.cpp stores Llama 3.1's scaling as one divisor per frequency: 1 for the fast ones,
    `factor` for the slow ones, and 1 / ((1 - s) / factor + s) between, with s linear in
    original / wavelength. The blended divisors give that line (`_band_edges`), hence
    low_freq_factor and high_freq_factor for the trained length (GGUF's
    rope.scaling.original_context_length, else Llama 3's 8192: only their ratios to it
    matter); the parameters found must give back every divisor."""
    if factors.size != head_dim // 2:
        raise GGUFError(
            f"{src}: rope_freqs has {factors.size} factors, expected head_dim / 2 = {head_dim // 2}"
        )
    if not np.all(np.isfinite(factors)) or factors.min() <= 0:
        raise GGUFError(f"{src}: rope_freqs holds non-positive or non-finite factors")
    if np.allclose(factors, 1.0, rtol=0, atol=FREQ_FACTOR_RTOL):
        return None  # (all ones: no scaling)
    factor = float(factors.max())
    trained = int(original or 8192)
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    between = (factors > 1 + FREQ_FACTOR_RTOL) & (factors < factor * (1 - FREQ_FACTOR_RTOL))
    unlike = (
        f"{src}: its rope_freqs tensor is not Llama 3.1-style frequency scaling (divisors "
        f"{np.round(factors, 4).tolist()}), which is the only kind the converter reads; use the "
        "model's Hugging Face checkpoint"
    )
    x = trained * inv_freq / (2 * math.pi)  # (trained / wavelength, falling with the dimension)
    for low, high in _band_edges(x, factors, factor, between):
        for f, lo, hi in ((round(factor, 4), round(low, 4), round(high, 4)), (factor, low, high)):
            if 0 < lo < hi:
                got = _llama3_factors(inv_freq, f, lo, hi, trained)
                if np.allclose(got, factors, rtol=FREQ_FACTOR_RTOL, atol=0):
                    return {
                        "rope_type": "llama3",
                        "factor": float(f),
                        "low_freq_factor": float(lo),
                        "high_freq_factor": float(hi),
                        "original_max_position_embeddings": trained,
                    }
    raise GGUFError(unlike)


def _generation_config(config: dict[str, Any]) -> dict[str, Any]:
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {k: config[k] for k in keys if k in config}


# ----------------------------------------------------------------------------------------------
# tensors


def _plan_llama_tensors(
    tensors: dict[str, Any], config: dict[str, Any], src: Path
) -> list[_TensorPlan]:
    """Map every GGUF tensor to its HF name and shape; GGUFError for anything unexpected."""
    from gguf import GGMLQuantizationType

    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads, hd = (
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["head_dim"],
    )
    vocab, layers = config["vocab_size"], config["num_hidden_layers"]
    weight_shapes = {
        "attn_q": (heads * hd, hidden),
        "attn_k": (kv_heads * hd, hidden),
        "attn_v": (kv_heads * hd, hidden),
        "attn_output": (hidden, heads * hd),
        "ffn_gate": (inter, hidden),
        "ffn_up": (inter, hidden),
        "ffn_down": (hidden, inter),
        "attn_norm": (hidden,),
        "ffn_norm": (hidden,),
    }
    names = _LAYER_TENSORS
    # (every Gemma norm is stored as 1 + w; Gemma 1's tensors are Llama's, and Gemma 2 has no
    # head norms: a GGUF with them is another model)
    gemma = config["architectures"][0] in _GEMMA_HF.values()
    if gemma and config["model_type"] != "gemma":
        names = dict(_GEMMA_TENSORS)
        if config["model_type"] == "gemma2":
            del names["attn_q_norm"], names["attn_k_norm"]
        weight_shapes.update(
            post_attention_norm=(hidden,),
            post_ffw_norm=(hidden,),
            attn_q_norm=(hd,),
            attn_k_norm=(hd,),
        )
    if config["model_type"] == "phi3":
        names = _PHI3_TENSORS
        weight_shapes.update(
            attn_qkv=((heads + 2 * kv_heads) * hd, hidden), ffn_up=(2 * inter, hidden)
        )
    # (llama.cpp interleaves Llama's and Granite's q/k rows for its RoPE; qwen2's and phi3's it
    # leaves as HF has them)
    interleaved = config["model_type"] in ("llama", "granite")
    permute = {"attn_q": heads, "attn_k": kv_heads} if interleaved else {}

    plan: list[_TensorPlan] = []
    unknown: list[str] = []
    wrong_shape: list[str] = []
    for name, t in tensors.items():
        if _SKIPPED_TENSORS.match(name):
            continue
        try:
            type_name = GGMLQuantizationType(int(t.tensor_type)).name
        except ValueError:
            type_name = f"type id {int(t.tensor_type)}"
        if type_name not in SUPPORTED_TENSOR_TYPES:
            raise GGUFError(
                f"{src}: tensor {name!r} has type {type_name}, which this converter cannot "
                f"dequantize; supported types: {', '.join(SUPPORTED_TENSOR_TYPES)}"
            )
        shape = tuple(int(d) for d in reversed(t.shape))
        m = _LAYER_NAME.match(name)
        g = _GLOBAL_NAME.match(name)
        if m and m.group(2) in names and int(m.group(1)) < layers:
            layer, kind, suffix = int(m.group(1)), m.group(2), m.group(3)
            hf = f"model.layers.{layer}.{names[kind]}.{suffix}"
            expected = weight_shapes[kind] if suffix == "weight" else weight_shapes[kind][:1]
            heads_to_permute = permute.get(kind, 0)
        elif g and g.group(1) in _GLOBAL_TENSORS:
            kind, suffix = g.group(1), g.group(2)
            hf = f"{_GLOBAL_TENSORS[kind]}.{suffix}"
            expected = (hidden,) if kind == "output_norm" else (vocab, hidden)
            if suffix == "bias":
                unknown.append(name)
                continue
            heads_to_permute = 0
        else:
            unknown.append(name)
            continue
        if shape != expected:
            wrong_shape.append(f"{name} {list(shape)} (expected {list(expected)})")
        offset = -1.0 if gemma and kind.endswith("norm") else 0.0
        plan.append(_TensorPlan(name, hf, expected, heads_to_permute, offset))
    if unknown:
        raise GGUFError(
            f"{src}: tensors {sorted(unknown)[:8]} have no Hugging Face counterpart; this GGUF "
            f"is not a plain {config['model_type']} model"
        )
    if wrong_shape:
        raise GGUFError(f"{src}: tensor shapes do not match the metadata: {wrong_shape[:4]}")
    required = ["token_embd.weight", "output_norm.weight"]
    for i in range(layers):
        kinds = list(_LAYER_TENSORS)
        if gemma:
            kinds = list(names)
        if config["model_type"] == "phi3":  # (q/k/v packed or not; gate and up packed)
            separate = ("attn_q", "attn_k", "attn_v")
            qkv = ["attn_qkv"] if f"blk.{i}.attn_qkv.weight" in tensors else list(separate)
            kinds = qkv + [k for k in _PHI3_TENSORS if k not in (*separate, "attn_qkv")]
        required += [f"blk.{i}.{k}.weight" for k in kinds]
        if config["attention_bias"]:  # (qwen2: none on attn_output)
            qwen2 = config["model_type"] == "qwen2"
            required += [f"blk.{i}.{k}.bias" for k in _ATTN_PROJ[: 3 if qwen2 else 4]]
        if config["mlp_bias"]:
            required += [f"blk.{i}.{k}.bias" for k in _MLP_PROJ]
    missing = [n for n in required if n not in tensors]
    if missing:
        raise GGUFError(f"{src}: tensors {missing[:8]} are missing ({len(missing)} in all)")
    return plan


def _load_tensor(t: Any, item: _TensorPlan, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize one GGUF tensor to float32, undo llama.cpp's permutation, cast to `dtype`."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    try:
        arr = dequantize(t.data, GGMLQuantizationType(int(t.tensor_type)))
    except Exception as e:
        raise GGUFError(f"dequantizing tensor {t.name!r} failed ({e}); is the file corrupt?") from e
    arr = np.asarray(arr, dtype=np.float32).reshape(item.shape)
    if not arr.flags.writeable:  # a view into the read-only memory map (F32 tensors)
        arr = arr.copy()
    w = torch.from_numpy(arr)
    if item.permute_heads:
        w = reverse_rotary_permute(w, item.permute_heads)
    if item.offset:
        w = w + item.offset
    return w.to(dtype).contiguous()


WEIGHT_MODES = ("float", "int4")
GGUF_GROUP = 32
"""Values per Q4_0 / Q4_1 block and per Q4_K sub-block: one scale and zero each."""
_LINEAR_KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_FUSED = {"attn_q": "qkv", "attn_k": "qkv", "attn_v": "qkv", "ffn_gate": "gu", "ffn_up": "gu"}
FOUR_BIT_TYPES = ("Q4_0", "Q4_1", "Q4_K")


def _four_bit_kinds(tensors: dict[str, Any], plan: list[_TensorPlan]) -> dict[str, str]:
    """gguf name -> layer kind, for the linear weights that stay 4-bit: every layer's tensor
    of that kind (and of the kinds fused with it: q/k/v, gate/up) must be 4-bit."""
    from gguf import GGMLQuantizationType

    by_kind: dict[str, list[str]] = {}
    for item in plan:
        m = _LAYER_NAME.match(item.gguf_name)
        if m and m.group(2) in _LINEAR_KINDS and m.group(3) == "weight":
            by_kind.setdefault(m.group(2), []).append(item.gguf_name)

    def four_bit(kind: str) -> bool:
        names = by_kind.get(kind, [])
        return bool(names) and all(
            GGMLQuantizationType(int(tensors[n].tensor_type)).name in FOUR_BIT_TYPES for n in names
        )

    ok = {k for k in _LINEAR_KINDS if four_bit(k)}
    ok = {k for k in ok if all(j in ok for j, f in _FUSED.items() if f == _FUSED.get(k))}
    return {n: _LAYER_TENSORS[k] for k in ok for n in by_kind[k]}


def decompose_q4(t: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_0 / Q4_1 / Q4_K tensor [rows, cols] -> codes uint8 [rows, cols] and the affine map
    of every 32-value block, a and b float32 [rows, cols/32], with value = a * code + b
    (what `gguf.quants.dequantize` computes)."""
    from gguf import GGMLQuantizationType

    kind = GGMLQuantizationType(int(t.tensor_type)).name
    cols = int(t.shape[0])  # ggml order: the contiguous (input) dimension first
    raw = np.ascontiguousarray(t.data).view(np.uint8)
    if kind in ("Q4_0", "Q4_1"):
        size = 18 if kind == "Q4_0" else 20
        blocks = raw.reshape(-1, size)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)[:, 0]
        if kind == "Q4_0":
            b, qs = -8.0 * d, blocks[:, 2:]
        else:
            b, qs = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0], blocks[:, 4:]
        a = d
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=1)  # low nibbles: values 0..15
    elif kind == "Q4_K":
        from gguf.quants import Q4_K

        blocks = raw.reshape(-1, 144)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, mn = Q4_K.get_scale_min(blocks[:, 4:16].copy())
        a = (d * sc.astype(np.float32)).reshape(-1)  # 8 sub-blocks of 32 per 256
        b = -(dmin * mn.astype(np.float32)).reshape(-1)
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        codes = (qs & 0x0F).reshape(-1, 32)
    else:
        raise GGUFError(f"tensor {t.name!r} is {kind}, not one of {FOUR_BIT_TYPES}")
    rows = codes.size // cols
    return (
        torch.from_numpy(np.ascontiguousarray(codes)).reshape(rows, cols),
        torch.from_numpy(np.ascontiguousarray(a)).reshape(rows, cols // GGUF_GROUP),
        torch.from_numpy(np.ascontiguousarray(b)).reshape(rows, cols // GGUF_GROUP),
    )


def _int4_tensors(t: Any, item: _TensorPlan, base: str) -> dict[str, torch.Tensor]:
    """One 4-bit GGUF tensor in the runtime's 'gguf' layout (module docstring)."""
    from dist_runtime.formats.int4 import pack_rows

    codes, a, b = decompose_q4(t)
    codes = codes.to(torch.int32)
    # value = a*q + b = (q - z) * a with z = -b/a; a block with a == 0 holds the constant b:
    # codes 0, scale b, zero -1 (or all zero when b == 0 too).
    flat = a == 0
    zeros = torch.where(flat, torch.where(b == 0, 0.0, -1.0), -b / torch.where(flat, 1.0, a))
    scales = torch.where(flat, b, a)
    codes = torch.where(flat.repeat_interleave(GGUF_GROUP, dim=1), 0, codes)
    if item.permute_heads:
        codes, scales, zeros = (
            reverse_rotary_permute(x, item.permute_heads) for x in (codes, scales, zeros)
        )
    return {
        f"{base}.qweight": pack_rows(codes.T.contiguous()),
        f"{base}.scales": scales.T.contiguous(),
        f"{base}.zeros": zeros.T.contiguous(),
    }


def _write_int4_weights(
    folder: Path,
    tensors: dict[str, Any],
    plan: list[_TensorPlan],
    dtype: torch.dtype,
    keep4: dict[str, str],
    progress: bool,
) -> None:
    """One safetensors file: 4-bit layers in the 'gguf' layout, the rest in `dtype`."""
    from safetensors.torch import save_file

    from dist_runtime.progress import Phase

    out: dict[str, torch.Tensor] = {}
    bar = Phase("converting GGUF tensors", "tensor", total=len(plan), enabled=progress)
    try:
        for item in plan:
            t = tensors[item.gguf_name]
            if item.gguf_name in keep4:
                out.update(_int4_tensors(t, item, item.hf_name.removesuffix(".weight")))
            else:
                out[item.hf_name] = _load_tensor(t, item, dtype)
            bar.update_to(bar.n + 1)
    finally:
        bar.close()
    save_file(out, str(folder / "model.safetensors"))


def reverse_rotary_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation (rows of each head: interleaved -> rotate-half halves).

    llama.cpp writes `w.reshape(n, 2, rows // n // 2, *rest).swapaxes(1, 2)`; this is the inverse
    (transformers' `_reverse_permute_weights`). Works for weights (2-D) and biases (1-D).
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise GGUFError(f"cannot un-permute {rows} rows over {n_heads} heads")
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _write_weights(
    folder: Path,
    tensors: dict[str, Any],
    plan: list[_TensorPlan],
    dtype: torch.dtype,
    max_shard_bytes: int | None,
    progress: bool,
) -> None:
    from dist_runtime.progress import Phase

    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = [math.prod(p.shape) * itemsize for p in plan]
    shards = _split_shards(sizes, max_shard_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    bar = Phase("converting GGUF tensors", "tensor", total=len(plan), enabled=progress)
    weight_map: dict[str, str] = {}
    try:
        for file_name, indices in zip(names, shards):
            items = [plan[i] for i in indices]
            with open(folder / file_name, "wb") as f:
                writer = _SafetensorsWriter(f, [(p.hf_name, p.shape) for p in items], dtype)
                for p in items:
                    writer.write(p.hf_name, _load_tensor(tensors[p.gguf_name], p, dtype))
                    weight_map[p.hf_name] = file_name
                    bar.update_to(bar.n + 1)
                writer.finish()
    finally:
        bar.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        _write_json(folder / "model.safetensors.index.json", index)


def _split_shards(sizes: Sequence[int], max_bytes: int | None) -> list[list[int]]:
    """Consecutive groups of tensor indices of at most `max_bytes` (as `random_checkpoint`)."""
    shards: list[list[int]] = [[]]
    total = 0
    for i, size in enumerate(sizes):
        if max_bytes is not None and shards[-1] and total + size > max_bytes:
            shards.append([])
            total = 0
        shards[-1].append(i)
        total += size
    return shards


class _SafetensorsWriter:
    """Write a safetensors file tensor by tensor: the header is known up front from the shapes."""

    def __init__(
        self, f: BinaryIO, entries: Iterable[tuple[str, tuple[int, ...]]], dtype: torch.dtype
    ):
        self.f = f
        self.dtype = dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        self.order: list[tuple[str, tuple[int, ...], int]] = []
        offset = 0
        for name, shape in entries:
            nbytes = math.prod(shape) * itemsize
            header[name] = {
                "dtype": _SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self.order.append((name, shape, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        self.next = 0

    def write(self, name: str, t: torch.Tensor) -> None:
        expected_name, shape, nbytes = self.order[self.next]
        if name != expected_name or tuple(t.shape) != shape or t.dtype != self.dtype:
            raise AssertionError(f"safetensors writer expected {expected_name} {shape}, got {name}")
        data = t.contiguous().view(torch.uint8).numpy()
        assert data.nbytes == nbytes
        self.f.write(data.data)
        self.next += 1

    def finish(self) -> None:
        if self.next != len(self.order):
            raise AssertionError("safetensors writer closed before every tensor was written")


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# tokenizer


def _tokenizer_files(
    meta: dict[str, Any], src: Path, config: dict[str, Any]
) -> dict[str, str | bytes]:
    """`tokenizer.json` (byte-level BPE) or `tokenizer.model` (SentencePiece), and
    `tokenizer_config.json`, built from the GGUF vocabulary."""
    model = meta.get("tokenizer.ggml.model")
    if model is None or "tokenizer.ggml.tokens" not in meta:
        raise GGUFError(
            f"{src} has no tokenizer (no tokenizer.ggml.model / tokenizer.ggml.tokens metadata); "
            "convert the weights only with tokenizer=False (launch/convert.py --no-tokenizer) and "
            "use token-id prompts, or copy tokenizer.json from the original model"
        )
    if model == "llama":
        return _sentencepiece_files(meta, src, config)
    if model != "gpt2":
        raise GGUFError(
            f"{src}: {model!r} tokenizers in GGUF files are not supported (only byte-level BPE, "
            "'gpt2', and SentencePiece, 'llama'); convert with tokenizer=False (launch/convert.py "
            "--no-tokenizer) and copy tokenizer.json / tokenizer_config.json from the original "
            "Hugging Face model"
        )
    tok, vocab_tokens = build_byte_level_tokenizer(meta, src)

    def token(key: str) -> str | None:
        idx = _named_token(meta, key, len(vocab_tokens), src)
        return None if idx is None else vocab_tokens[idx]

    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str):
        tok_config["chat_template"] = template
    _set_post_processor(tok, tok_config)
    return {
        "tokenizer.json": tok.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(tok_config, indent=2, sort_keys=True) + "\n",
    }


def _named_token(meta: dict[str, Any], key: str, size: int, src: Path) -> int | None:
    """The id `tokenizer.ggml.{key}` names (bos_token_id...), checked against a vocabulary of
    `size`; None when the file names none."""
    idx = meta.get(f"tokenizer.ggml.{key}")
    if idx is None:
        return None
    if not 0 <= int(idx) < size:
        raise GGUFError(f"{src}: tokenizer.ggml.{key} = {idx} is outside the vocabulary")
    return int(idx)


def _sentencepiece_files(
    meta: dict[str, Any], src: Path, config: dict[str, Any]
) -> dict[str, str | bytes]:
    """A SentencePiece vocabulary ('llama': Llama 2, Mistral, Phi-3...) as the `tokenizer.model`
    it was converted from: every piece with its score and type, BPE, byte fallback when the
    vocabulary has byte pieces, the identity normalizer with llama.cpp's space prefix
    (`tokenizer.ggml.add_space_prefix`), whitespace-only pieces kept whole when the vocabulary
    has them. Control and user-defined pieces are named in tokenizer_config.json so text that
    spells them (chat templates) reads them as one token each, as llama.cpp does."""
    tokens: list[str] = [str(t) for t in meta["tokenizer.ggml.tokens"]]
    scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    types = list(meta.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens))
    if not len(scores) == len(types) == len(tokens):
        raise GGUFError(
            f"{src}: {len(tokens)} tokens but {len(scores)} scores and {len(types)} token types"
        )
    types = [_TOKEN_NORMAL if t == 0 else int(t) for t in types]  # (0: undefined)
    unknown = [i for i, t in enumerate(types) if t == _TOKEN_UNKNOWN]
    if len(unknown) != 1:
        raise GGUFError(
            f"{src}: a SentencePiece vocabulary has one unknown piece (<unk>), this one "
            f"{len(unknown)}"
        )

    def named(key: str) -> int:
        idx = _named_token(meta, key, len(tokens), src)
        return -1 if idx is None else idx

    bos, eos, pad = named("bos_token_id"), named("eos_token_id"), named("padding_token_id")
    model = sentencepiece_model(
        tokens,
        [float(x) for x in scores],
        types,
        add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
        unk_id=unknown[0],
        bos_id=bos,
        eos_id=eos,
        pad_id=pad,
    )
    added = {
        str(i): {
            "content": tokens[i],
            "special": t == _TOKEN_CONTROL,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "single_word": False,
        }
        for i, t in enumerate(types)
        if t in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED) or i == unknown[0]
    }
    tok_config: dict[str, Any] = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": tokens[bos] if bos >= 0 else None,
        "eos_token": tokens[eos] if eos >= 0 else None,
        "unk_token": tokens[unknown[0]],
        "pad_token": tokens[pad] if pad >= 0 else None,
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", True)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "added_tokens_decoder": added,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": config["max_position_embeddings"],
    }
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str):
        tok_config["chat_template"] = template
    return {
        "tokenizer.model": model,
        "tokenizer_config.json": json.dumps(tok_config, indent=2, sort_keys=True) + "\n",
    }


def sentencepiece_model(
    pieces: Sequence[str],
    scores: Sequence[float],
    types: Sequence[int],
    *,
    add_space_prefix: bool,
    unk_id: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
) -> bytes:
    """A BPE SentencePiece `ModelProto` (sentencepiece_model.proto), serialized by hand: the
    pieces (1) with piece, score and type; the trainer spec (2) with the model type, vocabulary
    size, byte fallback and the special pieces' ids and spellings; the identity normalizer (3).
    Types are SentencePiece's, which llama.cpp's token types copy (1 normal ... 6 byte)."""

    def varint(n: int) -> bytes:
        n &= (1 << 64) - 1  # (negative int32: ten bytes, as protobuf writes them)
        out = bytearray()
        while True:
            low, n = n & 0x7F, n >> 7
            out.append(low | (0x80 if n else 0))
            if not n:
                return bytes(out)

    def field(number: int, value: int | float | bool | str | bytes) -> bytes:
        if isinstance(value, (str, bytes)):
            raw = value.encode("utf-8") if isinstance(value, str) else value
            return varint(number << 3 | 2) + varint(len(raw)) + raw
        if isinstance(value, float):
            return varint(number << 3 | 5) + struct.pack("<f", value)
        return varint(number << 3) + varint(int(value))

    out = bytearray()
    for piece, score, kind in zip(pieces, scores, types, strict=True):
        out += field(1, field(1, piece) + field(2, float(score)) + field(3, kind))
    whitespace_runs = any(len(p) > 1 and set(p) == {"\u2581"} for p in pieces)
    trainer = [
        field(3, 2),  # model_type: BPE
        field(4, len(pieces)),
        field(26, whitespace_runs),  # allow_whitespace_only_pieces
        field(35, any(k == _TOKEN_BYTE for k in types)),  # byte_fallback
        field(40, unk_id),
        field(41, bos_id),
        field(42, eos_id),
        field(43, pad_id),
        field(45, pieces[unk_id]),
    ]
    for number, index in ((46, bos_id), (47, eos_id), (48, pad_id)):
        if index >= 0:
            trainer.append(field(number, pieces[index]))
    out += field(2, b"".join(trainer))
    normalizer = [field(1, "identity"), field(3, add_space_prefix), field(4, False), field(5, True)]
    out += field(3, b"".join(normalizer))
    return bytes(out)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map: the alphabet of byte-level BPE tokens."""
    visible = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(visible)
    extra = 0
    for b in range(256):
        if b not in visible:
            visible.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(visible, chars)}


def build_byte_level_tokenizer(
    meta: dict[str, Any], src: Path | str = "GGUF"
) -> tuple[Any, list[str]]:
    """A `tokenizers.Tokenizer` for a 'gpt2' GGUF vocabulary, and the tokens as spelled in it.

    Mirrors transformers' GGUF loader: tokens with characters outside the byte alphabet are
    re-spelled from their UTF-8 bytes; CONTROL tokens spelled in the alphabet become special
    added tokens, USER_DEFINED ones plain added tokens.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models

    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    raw_merges = meta.get("tokenizer.ggml.merges")
    if raw_merges is None:
        raise GGUFError(f"{src}: byte-level vocabulary without tokenizer.ggml.merges")
    if len(types) != len(tokens):
        raise GGUFError(
            f"{src}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens"
        )
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    spelled = [
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens
    ]
    vocab = {t: i for i, t in enumerate(spelled)}
    merges: list[tuple[str, str]] = []
    for m in raw_merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise GGUFError(f"{src}: malformed merge {m!r} in tokenizer.ggml.merges")
        merges.append((left, right))
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    except Exception as e:
        raise GGUFError(f"{src}: the BPE vocabulary/merges are inconsistent ({e})") from e
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    control = [
        AddedToken(t, special=True, normalized=False)
        for t, kind in zip(tokens, types)
        if kind == _TOKEN_CONTROL and set(t) <= alphabet
    ]
    if control:
        tok.add_special_tokens(control)
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, kind in zip(tokens, types)
        if kind == _TOKEN_USER_DEFINED and t in vocab
    ]
    if user:
        tok.add_tokens(user)
    return tok, spelled


def _pre_tokenizer(pre: str | None) -> Any:
    """The split rules llama.cpp applies for `tokenizer.ggml.pre`, as a tokenizers pre-tokenizer."""
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _SPLIT_OF_PRE:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_OF_PRE[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre not in (None, *_GPT2_PRE):
        logger.warning(
            "GGUF pre-tokenizer %r is not known here; using GPT-2's split rules (as transformers "
            "does), so encodings may differ slightly from llama.cpp's",
            pre,
        )
    return byte_level


def _set_post_processor(tok: Any, tok_config: dict[str, Any]) -> None:
    """BOS/EOS around `encode(..., add_special_tokens=True)` as tokenizer_config.json says."""
    from tokenizers import processors

    bos = tok_config["bos_token"] if tok_config["add_bos_token"] else None
    eos = tok_config["eos_token"] if tok_config["add_eos_token"] else None
    if bos is None and eos is None:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        return
    pre = f"{bos}:0 " if bos else ""
    post = f" {eos}:0" if eos else ""
    pair_b = (f"{bos}:1 " if bos else "") + "$B:1" + (f" {eos}:1" if eos else "")
    specials = [(t, tok.token_to_id(t)) for t in dict.fromkeys(x for x in (bos, eos) if x)]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{pre}$A:0{post}",
        pair=f"{pre}$A:0{post} {pair_b}",
        special_tokens=specials,
    )
