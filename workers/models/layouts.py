"""Checkpoint layouts: tensor names and how each rank cuts its shard out of them.

Both layouts fill the same `DecoderLM`. Every tensor's full shape is checked against the config
before any byte is loaded, then each parameter reads only its own rows or columns.

InternLM2 packs q, k and v per KV group: viewed as (kv_heads, g + 2, head_dim, hidden) with
g = heads / kv_heads, group j holds [q_{j*g} .. q_{j*g+g-1}, k_j, v_j]. A rank that owns whole
KV groups reads just their rows, as a q, k and v range per group.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import overload

import torch

from dist_runtime.config import ModelConfig
from dist_runtime.formats.int4 import Int4Weight
from workers.checkpoint import CheckpointReader, View
from workers.layers.attention import HeadShard
from workers.layers.embedding import vocab_range
from workers.layers.linear import _Linear
from workers.layers.norm import RMSNorm
from workers.models.decoder import DecoderLayer, DecoderLM
from workers.models.int4_loading import Int4Slice, int4_shapes, read_int4
from workers.models.names import LAYOUTS, Layout, fused_views

logger = logging.getLogger(__name__)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the layout needs, with its full (unsharded) shape. A 4-bit layer's
    `weight` [out, in] is replaced by its packed tensors (`int4_shapes`)."""
    shapes = _float_shapes(config)
    quant = config.weight_quant
    if quant is None:
        return shapes
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        module = name.removesuffix(".weight")
        linear = name.endswith(".weight") and len(shape) == 2 and _is_linear(config, module)
        if linear and quant.quantized(module):
            out.update(int4_shapes(quant, module, in_f=shape[1], out_f=shape[0]))
            continue
        out[name] = shape
    return out


def linear_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of every projection of the checkpoint, float, by module name (what a LoRA
    adapter may adapt)."""
    return {
        name.removesuffix(".weight"): (shape[0], shape[1])
        for name, shape in _float_shapes(config).items()
        if name.endswith(".weight")
        and len(shape) == 2
        and _is_linear(config, name.removesuffix(".weight"))
    }


def _is_linear(config: ModelConfig, module: str) -> bool:
    lay = LAYOUTS[config.architecture]
    parts = (lay.q, lay.k, lay.v, lay.wqkv, lay.o, lay.gate, lay.up, lay.down)
    return any(p is not None and module.endswith("." + p) for p in parts)


def _float_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
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
        if c.has_o_bias:
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
        if c.sandwich_norms:
            assert lay.attn_out_norm and lay.mlp_out_norm
            shapes[f"{p}{lay.attn_out_norm}.weight"] = (hidden,)
            shapes[f"{p}{lay.mlp_out_norm}.weight"] = (hidden,)
        if c.qk_norm:
            assert lay.q_norm and lay.k_norm
            shapes[f"{p}{lay.q_norm}.weight"] = (hd,)
            shapes[f"{p}{lay.k_norm}.weight"] = (hd,)
    return shapes


LANGUAGE_MODEL_PREFIXES = (
    ("language_model.model.", "model."),
    ("model.language_model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)
"""Where a multimodal checkpoint keeps its language model's tensors (transformers 4's names,
transformers 5's), and the text model's names they are read as."""


def check_checkpoint(config: ModelConfig, reader: CheckpointReader) -> None:
    """Raise CheckpointError for a missing, unreadable or mis-shaped tensor (headers only).
    A checkpoint with packed projections (Phi-3) is read through views of their parts, and a
    multimodal one (Gemma 3 4B and up) through views of its language model's tensors."""
    reader.add_views(*fused_views(config))
    if not reader.has(f"{LAYOUTS[config.architecture].embed}.weight"):
        reader.add_views(_language_model_views(reader))
    for name, shape in expected_shapes(config).items():
        reader.check_shape(name, shape)


def _language_model_views(reader: CheckpointReader) -> dict[str, View]:
    """Each language-model tensor of a multimodal checkpoint (`LANGUAGE_MODEL_PREFIXES`) as a
    whole-tensor view under its text model's name; the others (a vision tower) are not read."""
    views = {}
    for name in reader.names():
        for old, new in LANGUAGE_MODEL_PREFIXES:
            if name.startswith(old):
                views[new + name.removeprefix(old)] = View(name, 0, reader.shape(name)[0])
    return views


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
    _copy(model.norm.weight, _norm_weight(reader.read(f"{lay.norm}.weight"), config))
    for i, layer in enumerate(model.layers):
        assert isinstance(layer, DecoderLayer)
        _load_layer(layer, lay, lay.layer.format(i), config, model.shard, reader, tp_rank, tp_size)
    finalize_linears(model)
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
    quant = config.weight_quant
    hidden, hd = config.hidden_size, config.head_dim
    if attn.qkv_proj.quantized:
        assert quant is not None
        parts = [
            read_int4(reader, quant, name, hidden, out_range=(lo, hi))
            for name, lo, hi in _qkv_out_ranges(lay, p, config, shard)
        ]
        _copy_int4(attn.qkv_proj, Int4Slice.cat_out(parts, f"{p}qkv"))
    else:
        _copy(attn.qkv_proj.weight, _read_qkv(reader, lay, p, "weight", config, shard))
    if config.attention_bias:
        _copy(attn.qkv_proj.bias, _read_qkv(reader, lay, p, "bias", config, shard))
    q_cols = (shard.q_start * hd, (shard.q_start + shard.num_q) * hd)
    # (Granite's residual multiplier, on what o_proj and down_proj add to the residual)
    m = config.residual_multiplier
    if attn.o_proj.quantized:
        assert quant is not None
        o_in = config.num_heads * hd
        o = read_int4(reader, quant, f"{p}{lay.o}", o_in, in_range=q_cols)
        _copy_int4(attn.o_proj, _times(o, m))
    else:
        _copy(attn.o_proj.weight, _times(reader.read_rows(f"{p}{lay.o}.weight", *q_cols, dim=1), m))
    if config.has_o_bias:
        _copy(attn.o_proj.bias, _times(reader.read(f"{p}{lay.o}.bias"), m))
    inter = config.intermediate_size // tp_size
    rows = (tp_rank * inter, (tp_rank + 1) * inter)
    suffixes: tuple[str, ...] = ("weight", "bias") if config.mlp_bias else ("weight",)
    if mlp.gate_up_proj.quantized:
        assert quant is not None
        suffixes = suffixes[1:]
        parts = [
            read_int4(reader, quant, f"{p}{name}", hidden, out_range=rows)
            for name in (lay.gate, lay.up)
        ]
        _copy_int4(mlp.gate_up_proj, Int4Slice.cat_out(parts, f"{p}{lay.gate}"))
    for suffix in suffixes:
        gate = reader.read_rows(f"{p}{lay.gate}.{suffix}", *rows)
        up = reader.read_rows(f"{p}{lay.up}.{suffix}", *rows)
        _copy(getattr(mlp.gate_up_proj, suffix), torch.cat([gate, up]))
    if mlp.down_proj.quantized:
        assert quant is not None
        down = read_int4(reader, quant, f"{p}{lay.down}", config.intermediate_size, in_range=rows)
        _copy_int4(mlp.down_proj, _times(down, m))
    else:
        down_w = reader.read_rows(f"{p}{lay.down}.weight", *rows, dim=1)
        _copy(mlp.down_proj.weight, _times(down_w, m))
    if config.mlp_bias:
        _copy(mlp.down_proj.bias, _times(reader.read(f"{p}{lay.down}.bias"), m))
    norms: list[tuple[RMSNorm | None, str | None]] = [
        (layer.input_norm, lay.input_norm),
        (layer.post_attn_norm, lay.post_norm),
        (layer.attn_out_norm, lay.attn_out_norm),  # (Gemma 3's output norms; None elsewhere)
        (layer.mlp_out_norm, lay.mlp_out_norm),
    ]
    for norm, name in norms:
        if norm is None or name is None:
            continue
        _copy(norm.weight, _norm_weight(reader.read(f"{p}{name}.weight"), config))
    if attn.q_norm is not None and attn.k_norm is not None:  # (replicated on every rank)
        order, scale = rotary_row_order(config), rotary_row_scale(config)
        for norm, name in ((attn.q_norm, lay.q_norm), (attn.k_norm, lay.k_norm)):
            w = _norm_weight(reader.read(f"{p}{name}.weight"), config)
            w = w if order is None else w[order]
            _copy(norm.weight, w if scale is None else w * scale.to(w.dtype))


def _norm_weight(w: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """An RMSNorm weight as the runtime multiplies by it: Gemma's stored w scales by 1 + w
    (`ModelConfig.norm_weight_offset`), added in float32 and kept so (`fp32_norm_scale`)."""
    offset = config.norm_weight_offset
    return w if offset == 0.0 else w.float() + offset


def rotary_row_order(config: ModelConfig) -> torch.Tensor | None:
    """With partial RoPE (`ModelConfig.rotary_dim` r of head_dim d), the checkpoint dimension
    each q / k head row takes here; None with full RoPE.

    HF turns pairs (i, i + r/2) for i < r/2 (GLM's interleaved RoPE: (2i, 2i + 1)) and passes
    dimensions r.. through; the runtime turns rotate-half pairs (j, j + d/2) at frequency j.
    So the turned pairs go to j = i (rows i and i + d/2) and the passed-through dimensions fill
    the pairs j >= r/2, whose frequency is 0 (`model_frequencies`): the same permutation of q
    and k keeps every q.k. None when the checkpoint's pairs are already the runtime's."""
    d, r = config.head_dim, config.rope_dim
    if r == d and not config.rope_interleaved:
        return None
    half, rest = d // 2, (d - r) // 2
    order = torch.empty(d, dtype=torch.int64)
    if config.rope_interleaved:  # (GLM: pairs (2i, 2i + 1) -> (i, i + d/2))
        order[: r // 2] = torch.arange(0, r, 2)
        order[half : half + r // 2] = torch.arange(1, r, 2)
    else:
        order[: r // 2] = torch.arange(r // 2)
        order[half : half + r // 2] = torch.arange(r // 2, r)
    order[r // 2 : half] = torch.arange(r, r + rest)
    order[half + r // 2 :] = torch.arange(r + rest, d)
    return order


def rotary_row_scale(config: ModelConfig) -> torch.Tensor | None:
    """With partial RoPE and an attention factor (YaRN's, LongRoPE's), the factor on each q / k
    head row (in `rotary_row_order`) that HF applies to the turned dimensions alone; None
    otherwise (full RoPE folds it into the softmax scale, `ModelConfig.attention_scale`)."""
    factor = config.rope_attention_factor
    if config.rotary_dim is None or factor == 1.0:
        return None
    half, turned = config.head_dim // 2, config.rotary_dim // 2
    scale = torch.ones(config.head_dim)
    scale[:turned] = factor
    scale[half : half + turned] = factor
    return scale


def qk_projection_rows(config: ModelConfig) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(`rotary_row_order`, the scale on q / k projection rows): what the loader does to the
    q / k rows of the projection's weight and bias, and of a LoRA adapter's B. The scale is
    None with Qwen3's head norms, which come after the projection (it goes on them instead)."""
    return rotary_row_order(config), None if config.qk_norm else rotary_row_scale(config)


def reorder_heads(
    rows: torch.Tensor, order: torch.Tensor, head_dim: int, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Each head's rows (of a weight or bias) in `order`, times `scale` per row."""
    heads = rows.view(-1, head_dim, *rows.shape[1:])[:, order]
    if scale is not None:
        heads = heads * scale.to(heads.dtype).view(1, head_dim, *([1] * (rows.dim() - 1)))
    return heads.reshape(rows.shape)


def _read_qkv(
    reader: CheckpointReader,
    lay: Layout,
    p: str,
    suffix: str,
    config: ModelConfig,
    shard: HeadShard,
) -> torch.Tensor:
    """This rank's rows of q, k and v, concatenated as [q | k | v] (q's and k's heads in
    `rotary_row_order` with partial RoPE)."""
    ranges = _qkv_out_ranges(lay, p, config, shard)
    parts = [reader.read_rows(f"{name}.{suffix}", lo, hi) for name, lo, hi in ranges]
    order, scale = qk_projection_rows(config)
    if order is not None:
        assert lay.wqkv is None and len(parts) == 3  # (q, k, v ranges: the llama layout)
        parts[:2] = [reorder_heads(t, order, config.head_dim, scale) for t in parts[:2]]
    return torch.cat(parts)


def _qkv_out_ranges(
    lay: Layout, p: str, config: ModelConfig, shard: HeadShard
) -> list[tuple[str, int, int]]:
    """This rank's output rows of q, k and v as (layer name, start, stop), in [q | k | v]
    order (InternLM2 with whole KV groups: a q, k and v range per group)."""
    hd = config.head_dim
    if lay.wqkv is None:
        assert lay.q and lay.k and lay.v
        kv = (shard.kv_start * hd, (shard.kv_start + shard.num_kv) * hd)
        return [
            (f"{p}{lay.q}", shard.q_start * hd, (shard.q_start + shard.num_q) * hd),
            (f"{p}{lay.k}", *kv),
            (f"{p}{lay.v}", *kv),
        ]
    name, g = f"{p}{lay.wqkv}", config.q_per_kv
    group_rows = (g + 2) * hd
    if shard.num_q == shard.num_kv * g:  # whole KV groups
        groups = range(shard.kv_start, shard.kv_start + shard.num_kv)
        q = [(name, j * group_rows, j * group_rows + g * hd) for j in groups]
        k = [(name, j * group_rows + g * hd, j * group_rows + (g + 1) * hd) for j in groups]
        v = [(name, j * group_rows + (g + 1) * hd, (j + 1) * group_rows) for j in groups]
        return q + k + v
    base = shard.kv_start * group_rows
    q_off = shard.q_start - shard.kv_start * g
    return [
        (name, base + q_off * hd, base + (q_off + shard.num_q) * hd),
        (name, base + g * hd, base + (g + 1) * hd),
        (name, base + (g + 1) * hd, base + (g + 2) * hd),
    ]


@overload
def _times(t: torch.Tensor, m: float) -> torch.Tensor: ...
@overload
def _times(t: Int4Slice, m: float) -> Int4Slice: ...
def _times(t: torch.Tensor | Int4Slice, m: float) -> torch.Tensor | Int4Slice:
    """A weight, bias or 4-bit slice (its scales) times m, computed in float32 (m == 1: as is)."""
    if m == 1.0:
        return t
    if isinstance(t, Int4Slice):
        return dataclasses.replace(t, scales=t.scales * m)
    return (t.float() * m).to(t.dtype)


def _copy_int4(linear: _Linear, part: Int4Slice) -> None:
    """Fill a 4-bit layer's buffers from codes / scales / zeros in the runtime layout."""
    assert linear.qweight is not None and linear.scales is not None and linear.zeros is not None
    w = Int4Weight.from_codes(part.codes, part.scales, part.zeros, linear.group_size, part.g_idx)
    _copy(linear.qweight, w.qweight)
    _copy(linear.scales, w.scales)
    _copy(linear.zeros, w.zeros)
    if linear.g_idx is not None:
        if w.g_idx is None:
            linear.g_idx = None  # positional groups after all: the kernel's faster path
        else:
            _copy(linear.g_idx, w.g_idx)


def finalize_linears(model: DecoderLM) -> None:
    """Let every linear layer and the LM head prepare for its device once the weights are in
    (4-bit repacking or dequantizing, packing float weights on CPU)."""
    for module in model.modules():
        if isinstance(module, _Linear):
            module.finalize()
    model.lm_head.finalize()
    model.drop_native_decoder()


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
    for module in model.modules():
        if isinstance(module, _Linear) and module.qweight is not None:
            # Codes uniform in 0..15 around zero 8, scaled to about the float bound.
            assert module.scales is not None and module.zeros is not None
            module.qweight.random_(-(2**31), 2**31 - 1, generator=gen)
            in_f = module.qweight.shape[0] * 8
            module.scales.fill_(in_f**-0.5 / 8)
            module.zeros.fill_(8.0)
            if module.g_idx is not None:
                module.g_idx.copy_(
                    torch.arange(in_f, device=module.g_idx.device) // module.group_size
                )
    finalize_linears(model)
