"""Checkpoint layouts: tensor names and how each rank cuts its shard out of them.

Both layouts fill the same `DecoderLM`. Every tensor's full shape is checked against the config
before any byte is loaded, then each parameter reads only its own rows or columns.

InternLM2 packs q, k and v per KV group: viewed as (kv_heads, g + 2, head_dim, hidden) with
g = heads / kv_heads, group j holds [q_{j*g} .. q_{j*g+g-1}, k_j, v_j]. A rank that owns whole
KV groups therefore reads one contiguous row range.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from dist_runtime.config import ModelConfig
from workers.checkpoint import CheckpointReader
from workers.layers.attention import HeadShard
from workers.layers.embedding import vocab_range
from workers.models.decoder import DecoderLayer, DecoderLM

logger = logging.getLogger(__name__)


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


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the layout needs, with its full (unsharded) shape."""
    lay = LAYOUTS[config.architecture]
    c = config
    hd, hidden = c.head_dim, c.hidden_size
    shapes: dict[str, tuple[int, ...]] = {
        f"{lay.embed}.weight": (c.vocab_size, hidden),
        f"{lay.norm}.weight": (hidden,),
    }
    if not c.tie_word_embeddings:
        shapes[f"{lay.head}.weight"] = (c.vocab_size, hidden)
    for i in range(c.num_layers):
        p = lay.layer.format(i)
        if lay.wqkv is not None:
            rows = (c.num_heads + 2 * c.num_kv_heads) * hd
            shapes[f"{p}{lay.wqkv}.weight"] = (rows, hidden)
            if c.attention_bias:
                shapes[f"{p}{lay.wqkv}.bias"] = (rows,)
        else:
            assert lay.q and lay.k and lay.v
            for name, heads in (
                (lay.q, c.num_heads),
                (lay.k, c.num_kv_heads),
                (lay.v, c.num_kv_heads),
            ):
                shapes[f"{p}{name}.weight"] = (heads * hd, hidden)
                if c.attention_bias:
                    shapes[f"{p}{name}.bias"] = (heads * hd,)
        shapes[f"{p}{lay.o}.weight"] = (hidden, c.num_heads * hd)
        if c.attention_bias:
            shapes[f"{p}{lay.o}.bias"] = (hidden,)
        for name in (lay.gate, lay.up):
            shapes[f"{p}{name}.weight"] = (c.intermediate_size, hidden)
            if c.mlp_bias:
                shapes[f"{p}{name}.bias"] = (c.intermediate_size,)
        shapes[f"{p}{lay.down}.weight"] = (hidden, c.intermediate_size)
        if c.mlp_bias:
            shapes[f"{p}{lay.down}.bias"] = (hidden,)
        shapes[f"{p}{lay.input_norm}.weight"] = (hidden,)
        shapes[f"{p}{lay.post_norm}.weight"] = (hidden,)
    return shapes


def check_checkpoint(config: ModelConfig, reader: CheckpointReader) -> None:
    """Raise CheckpointError for a missing, unreadable or mis-shaped tensor (headers only)."""
    for name, shape in expected_shapes(config).items():
        reader.check_shape(name, shape)


def load_weights(model: DecoderLM, reader: CheckpointReader) -> None:
    """Fill `model` with this rank's shard; peak extra memory is one tensor slice."""
    config = model.config
    check_checkpoint(config, reader)
    lay = LAYOUTS[config.architecture]
    tp_rank, tp_size = model.comm.tp_rank, model.comm.tp_size
    start, stop, _ = vocab_range(config.vocab_size, tp_rank, tp_size)
    _copy(model.embed.weight[: stop - start], reader.read_rows(f"{lay.embed}.weight", start, stop))
    if model.lm_head.weight is not None:
        _copy(
            model.lm_head.weight[: stop - start],
            reader.read_rows(f"{lay.head}.weight", start, stop),
        )
    _copy(model.norm.weight, reader.read(f"{lay.norm}.weight"))
    for i, layer in enumerate(model.layers):
        assert isinstance(layer, DecoderLayer)
        _load_layer(layer, lay, lay.layer.format(i), config, model.shard, reader, tp_rank, tp_size)
    logger.debug("tp rank %d read %.1f MiB of weights", tp_rank, reader.bytes_read / 2**20)


def _load_layer(
    layer: DecoderLayer,
    lay: Layout,
    p: str,
    config: ModelConfig,
    shard: HeadShard,
    reader: CheckpointReader,
    tp_rank: int,
    tp_size: int,
) -> None:
    attn, mlp = layer.attn, layer.mlp
    for suffix in ("weight", "bias") if config.attention_bias else ("weight",):
        _copy(getattr(attn.qkv_proj, suffix), _read_qkv(reader, lay, p, suffix, config, shard))
    hd = config.head_dim
    q_cols = (shard.q_start * hd, (shard.q_start + shard.num_q) * hd)
    _copy(attn.o_proj.weight, reader.read_rows(f"{p}{lay.o}.weight", *q_cols, dim=1))
    if config.attention_bias:
        _copy(attn.o_proj.bias, reader.read(f"{p}{lay.o}.bias"))
    inter = config.intermediate_size // tp_size
    rows = (tp_rank * inter, (tp_rank + 1) * inter)
    for suffix in ("weight", "bias") if config.mlp_bias else ("weight",):
        gate = reader.read_rows(f"{p}{lay.gate}.{suffix}", *rows)
        up = reader.read_rows(f"{p}{lay.up}.{suffix}", *rows)
        _copy(getattr(mlp.gate_up_proj, suffix), torch.cat([gate, up]))
    _copy(mlp.down_proj.weight, reader.read_rows(f"{p}{lay.down}.weight", *rows, dim=1))
    if config.mlp_bias:
        _copy(mlp.down_proj.bias, reader.read(f"{p}{lay.down}.bias"))
    _copy(layer.input_norm.weight, reader.read(f"{p}{lay.input_norm}.weight"))
    _copy(layer.post_attn_norm.weight, reader.read(f"{p}{lay.post_norm}.weight"))


def _read_qkv(
    reader: CheckpointReader,
    lay: Layout,
    p: str,
    suffix: str,
    config: ModelConfig,
    shard: HeadShard,
) -> torch.Tensor:
    """This rank's rows of q, k and v, concatenated as [q | k | v]."""
    hd = config.head_dim
    if lay.wqkv is None:
        assert lay.q and lay.k and lay.v
        q = reader.read_rows(
            f"{p}{lay.q}.{suffix}", shard.q_start * hd, (shard.q_start + shard.num_q) * hd
        )
        kv_rows = (shard.kv_start * hd, (shard.kv_start + shard.num_kv) * hd)
        k = reader.read_rows(f"{p}{lay.k}.{suffix}", *kv_rows)
        v = reader.read_rows(f"{p}{lay.v}.{suffix}", *kv_rows)
        return torch.cat([q, k, v])
    name = f"{p}{lay.wqkv}.{suffix}"
    g = config.q_per_kv
    group_rows = (g + 2) * hd
    if shard.num_q == shard.num_kv * g:  # whole KV groups: one contiguous read
        packed = reader.read_rows(
            name, shard.kv_start * group_rows, (shard.kv_start + shard.num_kv) * group_rows
        )
        packed = packed.view(shard.num_kv, g + 2, hd, *packed.shape[1:])
        q = packed[:, :g].reshape(shard.num_q * hd, *packed.shape[3:])
        k = packed[:, g].reshape(shard.num_kv * hd, *packed.shape[3:])
        v = packed[:, g + 1].reshape(shard.num_kv * hd, *packed.shape[3:])
        return torch.cat([q, k, v])
    # Part of one replicated KV group: this rank's query heads, then the group's k and v.
    base = shard.kv_start * group_rows
    q_off = shard.q_start - shard.kv_start * g
    q = reader.read_rows(name, base + q_off * hd, base + (q_off + shard.num_q) * hd)
    kv = reader.read_rows(name, base + g * hd, base + (g + 2) * hd)
    return torch.cat([q, kv])


def _copy(param: torch.Tensor | None, value: torch.Tensor) -> None:
    assert param is not None and param.shape == value.shape, (
        None if param is None else param.shape,
        value.shape,
    )
    param.data.copy_(value.to(param.dtype))


def init_dummy_weights(model: DecoderLM, seed: int) -> None:
    """Random weights without a checkpoint (shape-only model folders, performance work).

    Projections ~ U(-a, a) with a = 1/sqrt(fan_in) keeps activations O(1); norms stay 1.
    Generated on the model's device, so a 7B shard appears in well under a second on a GPU.
    """
    gen = torch.Generator(device=model.embed.weight.device)
    gen.manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            continue
        if param.dim() == 1:  # biases
            bound = 0.02
        elif "embed" in name:
            bound = 1.0
        else:
            bound = param.shape[-1] ** -0.5
        param.data.uniform_(-bound, bound, generator=gen)
