"""Checkpoint tensor names of each layout, and which linear layers hold 4-bit weights."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dist_runtime.config import ModelConfig, WeightQuant
from workers.checkpoint import View


@dataclass(frozen=True)
class Layout:
    embed: str
    layer: str
    q: str | None
    k: str | None
    v: str | None
    wqkv: str | None
    o: str
    gate: str
    up: str
    down: str
    input_norm: str
    post_norm: str
    norm: str
    head: str
    q_norm: str | None = None
    k_norm: str | None = None
    """Qwen3's per-head RMSNorms of q and k (`ModelConfig.qk_norm`)."""
    attn_out_norm: str | None = None
    mlp_out_norm: str | None = None
    """Gemma 3's norms of the attention's and the MLP's outputs (`ModelConfig.sandwich_norms`);
    its `post_norm` is the MLP's input norm."""


LAYOUTS = {
    "llama": Layout(
        embed="model.embed_tokens",
        layer="model.layers.{}.",
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        wqkv=None,
        o="self_attn.o_proj",
        gate="mlp.gate_proj",
        up="mlp.up_proj",
        down="mlp.down_proj",
        input_norm="input_layernorm",
        post_norm="post_attention_layernorm",
        norm="model.norm",
        head="lm_head",
        q_norm="self_attn.q_norm",
        k_norm="self_attn.k_norm",
    ),
    "internlm2": Layout(
        embed="model.tok_embeddings",
        layer="model.layers.{}.",
        q=None,
        k=None,
        v=None,
        wqkv="attention.wqkv",
        o="attention.wo",
        gate="feed_forward.w1",
        up="feed_forward.w3",
        down="feed_forward.w2",
        input_norm="attention_norm",
        post_norm="ffn_norm",
        norm="model.norm",
        head="output",
    ),
}


LAYOUTS["gemma"] = dataclasses.replace(
    LAYOUTS["llama"],
    post_norm="pre_feedforward_layernorm",
    attn_out_norm="post_attention_layernorm",
    mlp_out_norm="post_feedforward_layernorm",
)
"""Gemma 2's and 3's: Llama's names, the MLP's input norm and the two output norms aside."""


FUSED = {"qkv": "self_attn.qkv_proj", "gate_up": "mlp.gate_up_proj"}
QUANT_COLUMNS = {
    "awq": (("qweight", 8), ("qzeros", 8), ("scales", 1)),
    "gptq": (("qweight", 1), ("qzeros", 8), ("scales", 1)),
    "gguf": (("qweight", 1), ("zeros", 1), ("scales", 1)),
}
"""A 4-bit layer's tensors by format, with the outputs each of their columns holds."""
"""Phi-3's packed projections, by the Llama parts they hold ([q | k | v], [gate | up])."""


def fused_views(config: ModelConfig) -> tuple[dict[str, View], frozenset[str]]:
    """For a checkpoint with packed projections (`ModelConfig.fused_projections`), each Llama
    part as a slice of its packed tensor, and the views that are optional (GPTQ's g_idx,
    shared by the parts); empty otherwise.

    Float weights and biases are row slices. A 4-bit packed layer (quantized as one linear, as
    AWQ and GPTQ tools do) is cut along its outputs: AWQ's qweight and qzeros and GPTQ's qzeros
    pack 8 outputs per int32 column (a part starts and ends on a word: its sizes are multiples
    of 8), GPTQ's qweight and both scales hold one column per output."""
    views: dict[str, View] = {}
    optional: set[str] = set()
    quant = config.weight_quant
    for module, pieces in packed_parts(config).items():
        biased = config.attention_bias if module.endswith(FUSED["qkv"]) else config.mlp_bias
        four_bit = quant is not None and quant.quantized(module)
        suffixes = ("bias",) if biased else ()
        if not four_bit:
            suffixes = ("weight", *suffixes)
        for name, start, stop in pieces:
            for suffix in suffixes:
                views[f"{name}.{suffix}"] = View(f"{module}.{suffix}", start, stop)
            if not four_bit:
                continue
            assert quant is not None
            for tensor, per in QUANT_COLUMNS[quant.method]:
                views[f"{name}.{tensor}"] = View(
                    f"{module}.{tensor}", start // per, stop // per, dim=1
                )
            if quant.method == "gptq":  # (one input order for all the parts)
                views[f"{name}.g_idx"] = View(f"{module}.g_idx", 0, config.hidden_size)
                optional.add(f"{name}.g_idx")
    return views, frozenset(optional)


def packed_parts(config: ModelConfig) -> dict[str, list[tuple[str, int, int]]]:
    """A checkpoint with packed projections (Phi-3): each packed module (with its layer
    prefix) -> its Llama parts as (module, first output row, end row); empty otherwise."""
    if not config.fused_projections:
        return {}
    lay = LAYOUTS[config.architecture]
    assert lay.q and lay.k and lay.v
    hd = config.head_dim
    q, kv, inter = config.num_heads * hd, config.num_kv_heads * hd, config.intermediate_size
    parts = {
        "qkv": [(lay.q, 0, q), (lay.k, q, q + kv), (lay.v, q + kv, q + 2 * kv)],
        "gate_up": [(lay.gate, 0, inter), (lay.up, inter, 2 * inter)],
    }
    out = {}
    for i in range(config.num_layers):
        p = lay.layer.format(i)
        for packed, pieces in parts.items():
            out[f"{p}{FUSED[packed]}"] = [(f"{p}{name}", lo, hi) for name, lo, hi in pieces]
    return out


def linear_quant(config: ModelConfig, part: str) -> WeightQuant | None:
    """The 4-bit format of the linear layer `part` ('qkv', 'o', 'gate', 'down'), or None when
    it is float (a float checkpoint, or a layer the quantizer left out)."""
    quant = config.weight_quant
    if quant is None:
        return None
    lay = LAYOUTS[config.architecture]
    name = {"qkv": lay.wqkv or lay.q, "o": lay.o, "gate": lay.gate, "down": lay.down}[part]
    assert name is not None
    return quant if quant.quantized(name) else None
