"""Checkpoint tensor names of each layout, and which linear layers hold 4-bit weights."""

from __future__ import annotations

from dataclasses import dataclass

from dist_runtime.config import ModelConfig, WeightQuant


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


FUSED = {"qkv": "self_attn.qkv_proj", "gate_up": "mlp.gate_up_proj"}
"""Phi-3's packed projections, by the Llama parts they hold ([q | k | v], [gate | up])."""


def fused_views(config: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """For a checkpoint with packed projections (`ModelConfig.fused_projections`), each Llama
    part as rows of its packed tensor: name -> (packed name, start, stop); empty otherwise."""
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
    views = {}
    for i in range(config.num_layers):
        p = lay.layer.format(i)
        for packed, pieces in parts.items():
            biased = config.attention_bias if packed == "qkv" else config.mlp_bias
            for suffix in ("weight", "bias") if biased else ("weight",):
                for name, start, stop in pieces:
                    source = f"{p}{FUSED[packed]}.{suffix}"
                    views[f"{p}{name}.{suffix}"] = (source, start, stop)
    return views


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
