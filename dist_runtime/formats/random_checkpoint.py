"""Tiny random-weight checkpoints written as real Hugging Face folders.

For tests, benchmarks and the README demo: a folder with `config.json`, safetensors weights
(sharded with `model.safetensors.index.json` when asked) and a byte-level BPE `tokenizer.json`,
in either the Llama layout (`LlamaForCausalLM`) or the InternLM2 layout (packed `wqkv`)::

    from dist_runtime.formats.random_checkpoint import write_random_checkpoint
    write_random_checkpoint("/tmp/tiny", architecture="internlm2", max_shard_bytes=200_000)

The Llama tensors are drawn first and the InternLM2 ones are derived from them by renaming and
packing, so both architectures written with the same seed and shapes compute the same function.

Initialisation (why not the usual std 0.02): at width 64, std 0.02 everywhere gives near-uniform
logits and a greedy decode that repeats one token. Instead every linear weight is drawn with
std 1/sqrt(in_features), which keeps each sublayer's output at unit scale (the residual stream
neither vanishes nor explodes, and attention scores q.k/sqrt(head_dim) have std about 1, so
softmax is neither uniform nor one-hot); embeddings have std 1 (unit-scale residual input);
the LM head has std 1/sqrt(hidden) so logits have std about 1 (a spread of several nats over
the vocabulary); RMSNorm weights are 1 + 0.1 * N(0, 1) so the norms are not identities; biases
have std 0.02.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "internlm2": "InternLM2ForCausalLM",
    "internlm3": "InternLM3ForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "granite": "GraniteForCausalLM",
    "glm": "GlmForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}
GRANITE_MULTIPLIERS = {
    "embedding_multiplier": 6.0,
    "residual_multiplier": 0.3,
    "attention_multiplier": 0.07,
    "logits_scaling": 4.0,
}
"""The scalars a random Granite checkpoint carries (far from 1, so a missing one shows)."""
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SPECIAL_TOKENS = ("<s>", "</s>", "<|im_start|>", "<|im_end|>")
BOS_TOKEN_ID = 0
EOS_TOKEN_ID = 1
IM_END_TOKEN_ID = 3
NUM_BYTE_TOKENS = 256
BIAS_STD = 0.02
NORM_STD = 0.1


def write_random_checkpoint(
    out_dir: str | os.PathLike[str],
    *,
    architecture: str = "llama",
    vocab_size: int = 512,
    hidden_size: int = 64,
    intermediate_size: int = 160,
    num_layers: int = 2,
    num_heads: int = 8,
    num_kv_heads: int = 4,
    head_dim: int | None = None,
    rope_theta: float = 10000.0,
    rope_scaling: dict[str, Any] | None = None,
    max_position_embeddings: int = 4096,
    tie_word_embeddings: bool = False,
    bias: bool = False,
    dtype: str = "float32",
    seed: int = 0,
    max_shard_bytes: int | None = None,
    with_tokenizer: bool = True,
    extra_special_tokens: tuple[str, ...] = (),
    partial_rotary_factor: float | None = None,
) -> Path:
    """Write a random checkpoint folder and return its path.

    `extra_special_tokens` become the tokenizer's last ids (e.g. InternLM2's agent tokens).
    `partial_rotary_factor` (phi3 and glm, whose default is 0.5): RoPE on that share of each
    head. glm has q/k/v biases always, none on o, gate/up packed and interleaved RoPE.

    `bias` adds q/k/v/o biases (Llama `attention_bias`, InternLM2 `bias`; InternLM3's q/k/v
    only, its `qkv_bias`); the MLP never has biases. `max_shard_bytes` splits the weights into
    `model-0000i-of-0000N.safetensors` files with an index, as `save_pretrained(max_shard_size=...)`
    does.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r} is not one of {sorted(ARCHITECTURES)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    config = _llama_config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bias=bias,
        dtype=dtype,
    )
    if architecture == "qwen2":  # (q/k/v biases always, none on o)
        config = _qwen2_config(config)
    elif architecture == "glm":  # (q/k/v biases always, none on o)
        config.update(
            architectures=[ARCHITECTURES["glm"]],
            model_type="glm",
            attention_bias=True,
            partial_rotary_factor=partial_rotary_factor or 0.5,
        )
    elif architecture == "qwen3":  # (an RMSNorm on each q and k head)
        config = _qwen2_config(config, qwen3=True)
    elif architecture == "gemma3":  # (head norms, output norms, GELU, two RoPE bases)
        config = _gemma3_config(config)
    elif architecture == "gemma2":  # (output norms, GELU, attention-logit soft-capping)
        config = _gemma2_config(config)
    elif architecture == "gemma":  # (Llama's layout, 1 + w norms, GELU, a scaled embedding)
        config = _gemma1_config(config)
    elif architecture == "internlm3":  # (Llama's layout; `bias` gives q/k/v biases only)
        config = {k: v for k, v in config.items() if k not in ("attention_bias", "mlp_bias")}
        config.update(
            architectures=[ARCHITECTURES["internlm3"]],
            model_type="internlm3",
            qkv_bias=bias,
            bias=False,
        )
    state_dict = random_llama_state_dict(config, seed=seed, dtype=DTYPES[dtype])
    if architecture == "internlm2":
        config = _internlm2_config(config)
        state_dict = llama_to_internlm2_state_dict(state_dict, config)
    elif architecture == "granite":  # (Llama's layout and four scalar multipliers)
        config.update(
            architectures=[ARCHITECTURES["granite"]], model_type="granite", **GRANITE_MULTIPLIERS
        )
    elif architecture == "phi3":  # (q/k/v and gate/up packed)
        config = _phi3_config(config)
        state_dict = llama_to_phi3_state_dict(state_dict)
        if partial_rotary_factor is not None:
            config["partial_rotary_factor"] = partial_rotary_factor
    elif architecture == "glm":  # (gate and up packed as Phi-3's)
        state_dict = llama_to_phi3_state_dict(state_dict, attention=False)
    if partial_rotary_factor is not None and architecture not in ("phi3", "glm"):
        raise ValueError("partial_rotary_factor is written for architectures phi3 and glm only")
    folder = write_from_state_dict(out_dir, config, state_dict, max_shard_bytes=max_shard_bytes)
    if with_tokenizer:
        write_tokenizer(
            folder,
            vocab_size,
            model_max_length=max_position_embeddings,
            extra_special_tokens=extra_special_tokens,
        )
    return folder


def _llama_config(
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int | None,
    rope_theta: float,
    rope_scaling: dict[str, Any] | None,
    max_position_embeddings: int,
    tie_word_embeddings: bool,
    bias: bool,
    dtype: str,
) -> dict[str, Any]:
    if head_dim is None:
        if hidden_size % num_heads:
            raise ValueError(
                f"hidden_size {hidden_size} is not a multiple of num_heads "
                f"{num_heads}; pass head_dim explicitly"
            )
        head_dim = hidden_size // num_heads
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    return {
        "architectures": [ARCHITECTURES["llama"]],
        "model_type": "llama",
        "hidden_act": "silu",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": 1e-6,
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": tie_word_embeddings,
        "attention_bias": bias,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": [EOS_TOKEN_ID, IM_END_TOKEN_ID],
        "pad_token_id": EOS_TOKEN_ID,
        "torch_dtype": dtype,
        "use_cache": True,
    }


def _qwen2_config(llama: dict[str, Any], qwen3: bool = False) -> dict[str, Any]:
    """Qwen2 config.json keys: Llama's without the bias switches (its q/k/v always have
    biases, its o never), and its sliding window off; Qwen3's keep Llama's `attention_bias`
    (no biases) and add the q / k head norms."""
    dropped = ("mlp_bias",) if qwen3 else ("attention_bias", "mlp_bias")
    config = {k: v for k, v in llama.items() if k not in dropped}
    kind = "qwen3" if qwen3 else "qwen2"
    config.update(
        architectures=[ARCHITECTURES[kind]],
        model_type=kind,
        use_sliding_window=False,
        sliding_window=llama["max_position_embeddings"],
        max_window_layers=llama["num_hidden_layers"],
    )
    return config


GEMMA3_LOCAL_THETA = 100.0
"""The sliding-window layers' RoPE base a random Gemma 3 checkpoint carries (far from the
global base, so layers turning with the wrong one show)."""


def _gemma3_config(llama: dict[str, Any]) -> dict[str, Any]:
    """Gemma 3 text config.json keys: Llama's without the MLP bias, GELU's tanh form, the
    attention scale from `query_pre_attn_scalar` (not head_dim, so a missing one shows), and
    the first layer of every two windowed (a window of max_position_embeddings: set
    `sliding_window` lower to see it) with its own RoPE base."""
    config = {k: v for k, v in llama.items() if k not in ("mlp_bias", "hidden_act")}
    layers = llama["num_hidden_layers"]
    config.update(
        architectures=[ARCHITECTURES["gemma3"]],
        model_type="gemma3_text",
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=2 * llama["head_dim"],
        sliding_window=llama["max_position_embeddings"],
        layer_types=["full_attention" if i % 2 else "sliding_attention" for i in range(layers)],
        rope_local_base_freq=GEMMA3_LOCAL_THETA,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
    )
    return config


GEMMA2_ATTN_SOFTCAP = 3.0
"""The attention-logit soft-cap a random Gemma 2 checkpoint carries: low enough to bend the
scores of its unit-scale projections (Gemma 2's own is 50)."""


def _gemma2_config(llama: dict[str, Any]) -> dict[str, Any]:
    """Gemma 2 config.json keys: Gemma 3's without the head norms and the local RoPE base (every
    layer turns with rope_theta), the first of every two layers windowed, and soft-caps on the
    attention scores (GEMMA2_ATTN_SOFTCAP) and the logits (30, Gemma 2's)."""
    config = _gemma3_config(llama)
    del config["rope_local_base_freq"]
    config.update(
        architectures=[ARCHITECTURES["gemma2"]],
        model_type="gemma2",
        final_logit_softcapping=30.0,
        attn_logit_softcapping=GEMMA2_ATTN_SOFTCAP,
    )
    return config


def _gemma1_config(llama: dict[str, Any]) -> dict[str, Any]:
    """Gemma 1 config.json keys (GemmaConfig): Llama's without the MLP bias, and the legacy
    `hidden_act: gelu` of its first checkpoints, which transformers reads as the tanh form."""
    config = {k: v for k, v in llama.items() if k != "mlp_bias"}
    config.update(architectures=[ARCHITECTURES["gemma"]], model_type="gemma", hidden_act="gelu")
    return config


def _phi3_config(llama: dict[str, Any]) -> dict[str, Any]:
    """Phi-3 config.json keys: Llama's without the bias switches (Phi-3 has none), the trained
    length at the top level (LongRoPE's rope_scaling names it there), no sliding window."""
    if llama["attention_bias"]:
        raise ValueError("Phi-3 has no attention biases; pass bias=False")
    dropped = ("attention_bias", "mlp_bias", "head_dim")
    config = {k: v for k, v in llama.items() if k not in dropped}
    if llama["head_dim"] * llama["num_attention_heads"] != llama["hidden_size"]:
        raise ValueError("Phi-3 requires head_dim * num_heads == hidden_size")
    scaling = llama["rope_scaling"] or {}
    config.update(
        architectures=[ARCHITECTURES["phi3"]],
        model_type="phi3",
        original_max_position_embeddings=scaling.get(
            "original_max_position_embeddings", llama["max_position_embeddings"]
        ),
        sliding_window=None,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
    )
    if scaling:
        config["rope_scaling"] = {
            k: v for k, v in scaling.items() if k != "original_max_position_embeddings"
        }
    return config


def llama_to_phi3_state_dict(
    sd: dict[str, torch.Tensor], attention: bool = True
) -> dict[str, torch.Tensor]:
    """Llama names -> Phi-3's: q, k, v rows packed into `qkv_proj` (`attention`; GLM's stay
    apart), gate and up into `gate_up_proj`, in that order; the rest as it is."""
    packs: list[tuple[str, tuple[str, ...]]] = [("gate_up_proj", ("gate_proj", "up_proj"))]
    if attention:
        packs.append(("qkv_proj", ("q_proj", "k_proj", "v_proj")))
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        pack = next((pk for pk in packs if any(f".{part}." in name for part in pk[1])), None)
        if pack is None:
            out[name] = t
        elif f".{pack[1][0]}." in name:  # (the first part: the packed tensor goes here)
            packed, parts = pack
            first = parts[0]
            rows = [sd[name.replace(first, part)] for part in parts]
            out[name.replace(first, packed)] = torch.cat(rows)
    return out


def _internlm2_config(llama: dict[str, Any]) -> dict[str, Any]:
    """InternLM2 config.json keys (the remote code has no `head_dim`: it is hidden / heads)."""
    if llama["head_dim"] * llama["num_attention_heads"] != llama["hidden_size"]:
        raise ValueError(
            f"InternLM2 requires head_dim * num_heads == hidden_size, got head_dim "
            f"{llama['head_dim']} * {llama['num_attention_heads']} != {llama['hidden_size']}"
        )
    dropped = ("head_dim", "attention_bias", "attention_dropout", "mlp_bias")
    config = {k: v for k, v in llama.items() if k not in dropped}
    config.update(
        architectures=[ARCHITECTURES["internlm2"]],
        model_type="internlm2",
        bias=llama["attention_bias"],
    )
    return config


def random_llama_state_dict(
    config: dict[str, Any], *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random weights for a Llama-layout config dict, in `LlamaForCausalLM.state_dict()` order.

    Tensors are drawn in float32 from one seeded generator, then cast to `dtype`.
    """
    gen = torch.Generator().manual_seed(seed)
    hidden = config["hidden_size"]
    out = {"model.embed_tokens.weight": _normal(gen, (config["vocab_size"], hidden), 1.0)}
    for i in range(config["num_hidden_layers"]):
        out.update(_random_layer(gen, config, f"model.layers.{i}."))
    out["model.norm.weight"] = _norm(gen, hidden, _gemma(config))
    if not config["tie_word_embeddings"]:
        out["lm_head.weight"] = _linear(gen, config["vocab_size"], hidden)
    return {name: t.to(dtype) for name, t in out.items()}


def _random_layer(
    gen: torch.Generator, config: dict[str, Any], prefix: str
) -> dict[str, torch.Tensor]:
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    q_rows = config["num_attention_heads"] * config["head_dim"]
    kv_rows = config["num_key_value_heads"] * config["head_dim"]
    out: dict[str, torch.Tensor] = {}
    attn = (
        ("q", q_rows, hidden),
        ("k", kv_rows, hidden),
        ("v", kv_rows, hidden),
        ("o", hidden, q_rows),
    )
    qkv_bias_only = config.get("model_type") in ("qwen2", "glm") or (
        config.get("model_type") == "internlm3" and config.get("qkv_bias")
    )
    for name, rows, cols in attn:
        out[f"{prefix}self_attn.{name}_proj.weight"] = _linear(gen, rows, cols)
        if name != "o" if qkv_bias_only else config.get("attention_bias"):
            out[f"{prefix}self_attn.{name}_proj.bias"] = _normal(gen, (rows,), BIAS_STD)
    gemma = _gemma(config)
    sandwich = config.get("model_type") in ("gemma3_text", "gemma2")
    if config.get("model_type") in ("qwen3", "gemma3_text"):
        for name in ("q_norm", "k_norm"):
            out[f"{prefix}self_attn.{name}.weight"] = _norm(gen, config["head_dim"], gemma)
    for name, rows, cols in (
        ("gate", inter, hidden),
        ("up", inter, hidden),
        ("down", hidden, inter),
    ):
        out[f"{prefix}mlp.{name}_proj.weight"] = _linear(gen, rows, cols)
    out[f"{prefix}input_layernorm.weight"] = _norm(gen, hidden, gemma)
    out[f"{prefix}post_attention_layernorm.weight"] = _norm(gen, hidden, gemma)
    if sandwich:  # (the MLP's input norm and its output norm)
        out[f"{prefix}pre_feedforward_layernorm.weight"] = _norm(gen, hidden, gemma)
        out[f"{prefix}post_feedforward_layernorm.weight"] = _norm(gen, hidden, gemma)
    return out


def _gemma(config: dict[str, Any]) -> bool:
    """A Gemma config: its norm weights are stored as the scale minus 1."""
    return config.get("model_type") in ("gemma", "gemma3_text", "gemma2")


def _normal(gen: torch.Generator, shape: tuple[int, ...], std: float) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std


def _linear(gen: torch.Generator, rows: int, cols: int) -> torch.Tensor:
    return _normal(gen, (rows, cols), 1.0 / math.sqrt(cols))


def _norm(gen: torch.Generator, width: int, offset: bool = False) -> torch.Tensor:
    """An RMSNorm weight near 1; `offset`: Gemma's, stored as the scale minus 1."""
    return (0.0 if offset else 1.0) + _normal(gen, (width,), NORM_STD)


def llama_to_internlm2_state_dict(
    llama: dict[str, torch.Tensor], config: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Rename Llama tensors to InternLM2 names and pack q/k/v into `wqkv`."""
    kv_heads = config["num_key_value_heads"]
    out = {"model.tok_embeddings.weight": llama["model.embed_tokens.weight"]}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        kinds = [k for k in ("weight", "bias") if f"{p}self_attn.q_proj.{k}" in llama]
        for kind in kinds:
            q, k, v = (llama[f"{p}self_attn.{n}_proj.{kind}"] for n in "qkv")
            out[f"{p}attention.wqkv.{kind}"] = pack_internlm2_wqkv(q, k, v, kv_heads)
        for kind in kinds:
            out[f"{p}attention.wo.{kind}"] = llama[f"{p}self_attn.o_proj.{kind}"]
        for w, proj in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
            out[f"{p}feed_forward.{w}.weight"] = llama[f"{p}mlp.{proj}_proj.weight"]
        out[f"{p}attention_norm.weight"] = llama[f"{p}input_layernorm.weight"]
        out[f"{p}ffn_norm.weight"] = llama[f"{p}post_attention_layernorm.weight"]
    out["model.norm.weight"] = llama["model.norm.weight"]
    if "lm_head.weight" in llama:
        out["output.weight"] = llama["lm_head.weight"]
    return out


def pack_internlm2_wqkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_kv_heads: int
) -> torch.Tensor:
    """Pack q/k/v projection weights (or biases) into InternLM2's `wqkv`.

    q: (num_heads * head_dim, *rest), k and v: (num_kv_heads * head_dim, *rest), where rest is
    (hidden,) for weights and () for biases. Rows are grouped per KV head j as
    [q_{j*g} .. q_{j*g+g-1}, k_j, v_j] with g = num_heads // num_kv_heads, i.e. the result
    viewed as (num_kv_heads, g + 2, head_dim, *rest), as in HF `modeling_internlm2.py`.
    """
    if k.shape != v.shape or k.shape[0] % num_kv_heads or q.shape[0] % k.shape[0]:
        raise ValueError(
            f"cannot pack q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)} with {num_kv_heads} KV heads"
        )
    head_dim = k.shape[0] // num_kv_heads
    group = q.shape[0] // k.shape[0]
    rest = tuple(q.shape[1:])
    blocks = (
        q.reshape(num_kv_heads, group, head_dim, *rest),
        k.reshape(num_kv_heads, 1, head_dim, *rest),
        v.reshape(num_kv_heads, 1, head_dim, *rest),
    )
    return torch.cat(blocks, dim=1).reshape(-1, *rest)  # (kv_heads * (g + 2) * head_dim, *rest)


def unpack_internlm2_wqkv(
    wqkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split InternLM2's packed `wqkv` weight or bias into (q, k, v); inverse of the packer."""
    group = num_heads // num_kv_heads
    if num_heads % num_kv_heads or wqkv.shape[0] != num_kv_heads * (group + 2) * head_dim:
        raise ValueError(
            f"wqkv {tuple(wqkv.shape)} does not match {num_heads} heads, "
            f"{num_kv_heads} KV heads, head_dim {head_dim}"
        )
    rest = tuple(wqkv.shape[1:])
    grouped = wqkv.reshape(num_kv_heads, group + 2, head_dim, *rest)
    q = grouped[:, :group].reshape(num_heads * head_dim, *rest)
    k = grouped[:, group].reshape(num_kv_heads * head_dim, *rest)
    v = grouped[:, group + 1].reshape(num_kv_heads * head_dim, *rest)
    return q, k, v


def write_from_state_dict(
    out_dir: str | os.PathLike[str],
    config_dict: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    max_shard_bytes: int | None = None,
) -> Path:
    """Write `config.json` and safetensors weights as `save_pretrained` lays them out.

    Without `max_shard_bytes`, or when everything fits in one shard, one `model.safetensors`;
    otherwise tensors are split in order into `model-0000i-of-0000N.safetensors` (a tensor
    larger than the limit gets a shard of its own) plus `model.safetensors.index.json`.
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "config.json", config_dict)
    tensors = {name: t.detach().contiguous() for name, t in state_dict.items()}
    shards = _split_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards, start=1):
        file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(
            {n: tensors[n] for n in names}, str(folder / file_name), metadata={"format": "pt"}
        )
        weight_map.update(dict.fromkeys(names, file_name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_json(folder / "model.safetensors.index.json", index)
    return folder


def _split_shards(tensors: dict[str, torch.Tensor], max_bytes: int | None) -> list[list[str]]:
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_bytes}")
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_bytes is not None and shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_tokenizer(
    out_dir: str | os.PathLike[str],
    vocab_size: int,
    *,
    model_max_length: int = 4096,
    extra_special_tokens: tuple[str, ...] = (),
) -> Path:
    """Train a byte-level BPE with exactly `vocab_size` entries; write tokenizer files.

    Ids 0-3 are `<s>`, `</s>`, `<|im_start|>`, `<|im_end|>`, then the 256 byte tokens, then
    merges learned on the built-in corpus. When the corpus runs out of merges before
    `vocab_size`, the rest is filled with `<|reserved_i|>` special tokens;
    `extra_special_tokens` take the last ids. Like Llama's
    `tokenizer.json`, encoding adds `<s>` in front (pass `add_special_tokens=False` to skip).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    minimum = len(SPECIAL_TOKENS) + NUM_BYTE_TOKENS + len(extra_special_tokens)
    if vocab_size < minimum:
        raise ValueError(
            f"a byte-level tokenizer needs vocab_size >= {minimum}, got "
            f"{vocab_size}; raise vocab_size or pass with_tokenizer=False"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(extra_special_tokens),
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    missing = vocab_size - len(extra_special_tokens) - tok.get_vocab_size(with_added_tokens=True)
    if missing > 0:
        logger.info(
            "tokenizer corpus gave %d fewer merges than needed; adding reserved tokens", missing
        )
        tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    tok.add_special_tokens(list(extra_special_tokens))
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    bos = SPECIAL_TOKENS[BOS_TOKEN_ID]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, BOS_TOKEN_ID)]
    )
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    _write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": bos,
            "eos_token": SPECIAL_TOKENS[EOS_TOKEN_ID],
            "pad_token": SPECIAL_TOKENS[EOS_TOKEN_ID],
            "add_bos_token": True,
            "add_eos_token": False,
            "model_max_length": model_max_length,
        },
    )
    return folder


_CORPUS = """\
The river ran quietly past the old mill, where the miller kept a small garden of beans,
onions and tall yellow sunflowers. Every morning he walked to the water, filled two buckets,
and carried them back along the narrow path between the stones.

A distributed runtime splits a large language model across several devices. Each worker holds
a shard of the weights and a slice of the key and value cache; the workers exchange partial
results after every layer, and the driver schedules requests so that no device sits idle.

She opened the window and listened to the rain. The street below was empty except for a cat
that sat under a parked car, watching the puddles grow. Somewhere a radio was playing an old
song about the sea, the wind, and a ship that never came home.

To bake bread, mix flour, water, salt and yeast into a soft dough. Knead it for ten minutes,
let it rise for an hour in a warm place, shape it into a loaf, and bake it at two hundred
degrees until the crust is brown and the bottom sounds hollow when you tap it.

Questions about long documents need long context: the model must read thousands of pages,
remember where each fact was written, and answer in a few words. Attention over a million
tokens is expensive, so the cache is paged, shared between requests, and spread over the ring.

In the winter the mountain village was quiet. Children built snowmen in the square, old men
played cards in the cafe, and the baker sold warm rolls before sunrise to the workers who
drove down the valley to the factory by the lake.
"""

_SUBJECTS = (
    "the model",
    "a worker",
    "the scheduler",
    "my neighbour",
    "the teacher",
    "a student",
    "the old dog",
    "our team",
    "the driver",
    "each rank",
    "the kernel",
    "a farmer",
)
_VERBS = (
    "reads",
    "writes",
    "computes",
    "sends",
    "receives",
    "schedules",
    "remembers",
    "forgets",
    "measures",
    "builds",
    "answers",
    "explains",
    "finds",
    "loads",
)
_OBJECTS = (
    "the document",
    "a long prompt",
    "every token",
    "the cache blocks",
    "the weights",
    "a short answer",
    "the results",
    "three questions",
    "the garden",
    "the letters",
    "a new plan",
    "the numbers",
    "the shards",
    "warm bread",
)
_ENDINGS = (
    "before noon.",
    "after the rain.",
    "on every device.",
    "in two seconds.",
    "without a sound.",
    "for the next request.",
    "at the end of the day.",
    "again and again.",
    "with great care.",
    "in the right order.",
)


def _training_corpus(num_generated: int = 400) -> list[str]:
    """Built-in English paragraphs plus seeded template sentences (deterministic)."""
    rng = random.Random(0)
    lines = [p.replace("\n", " ") for p in _CORPUS.split("\n\n")]
    for i in range(num_generated):
        words = (
            rng.choice(_SUBJECTS),
            rng.choice(_VERBS),
            rng.choice(_OBJECTS),
            rng.choice(_ENDINGS),
        )
        lines.append(f"{' '.join(words).capitalize()} Step {i}: {rng.randint(0, 99999)}.")
    return lines
