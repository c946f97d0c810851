"""4-bit weight quantization of a float checkpoint into an AWQ "GEMM" Hugging Face folder.

    from dist_runtime.quantize import quantize_checkpoint
    report = quantize_checkpoint("/models/llama", "/models/llama-awq", method="awq")

**Output format.** The folder has the AWQ GEMM layout that AutoAWQ, vLLM and HF transformers
read, as does this runtime (`dist_runtime/formats/int4.py` describes the packing). Every decoder
linear
(Llama: `q_proj k_proj v_proj o_proj gate_proj up_proj down_proj`; InternLM2: `wqkv` as one
matrix, `wo w1 w3 w2`) is written as

    <name>.qweight  int32   [in, out/8]       codes, 8 output columns per word in AWQ_ORDER
    <name>.qzeros   int32   [in/group, out/8] zero points (0..15), packed the same way
    <name>.scales   float16 [in/group, out]

with `W[n, k] = (q[k, n] - zero[k/group, n]) * scale[k/group, n]`. Biases, embeddings, norms
and the LM head keep their names and their source dtype (a float32 source stays float32), or
are cast to `float_dtype`. `config.json` gains `quantization_config` (HF `AwqConfig` keys) and
`quant_config.json` (AutoAWQ's keys) is written beside it; tokenizer and other non-weight
files are copied.

**Methods.** `rtn` rounds each weight to nearest per (group of `group_size` inputs, output)
with `quantize_rtn`. `awq` (Lin et al., "AWQ: Activation-aware Weight Quantization", as in
AutoAWQ's `auto_scale` / `auto_clip`) first runs the float model on calibration text, one
decoder layer at a time, capturing the inputs of four linear groups per layer:

    group     linears            input                 1/s folded into
    qkv       q, k, v (wqkv)     input RMSNorm output  input norm weight
    o         o (wo)             attention output      v rows (only if heads == kv_heads)
    gate_up   gate, up (w1, w3)  post-attention norm   post-attention norm weight
    down      down (w2)          silu(gate) * up       up rows (w3)

For each group it tries `s = mean|x|^alpha` per input channel (alpha = 0, 0.05, .., 0.95;
normalized by sqrt(max(s) min(s))), fake-quantizes `W diag(s)` and keeps the s with the least
output error `||x (Q(W diag(s)) diag(1/s) - W)^T||^2` on the captured activations. alpha = 0 is
plain RTN, so AWQ's error is never above RTN's. The scales are folded into the op before each
group (the table), so the float network computes the same function and stays an ordinary
checkpoint; with GQA (heads != kv_heads) the v rows do not map one to one onto o's inputs, so
o is not scaled (AutoAWQ skips it too). Clipping (`clip=True`) then searches, per output row
and input group of every linear except q and k (attention scores are sensitive to clipped
outliers; AutoAWQ skips them too), a shrink of the weight range max|w| * (1 - i/20) for
i < 10 that minimizes that group's part of the output error, and clamps the weights to it.
The folded, clipped weights are then rounded with `quantize_rtn`. Each layer's input is the
float output of the layer before, so memory holds one layer plus the activations.

Errors in the report are relative: `||x dW^T||^2 / ||x W^T||^2` over the calibration tokens,
in the source network's coordinates.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dist_runtime.config import ConfigError, ModelConfig
from dist_runtime.formats.int4 import dequantize, pack_awq, quantize_rtn, unpack_awq
from dist_runtime.formats.random_checkpoint import (
    pack_internlm2_wqkv,
    unpack_internlm2_wqkv,
    write_from_state_dict,
)
from dist_runtime.progress import Phase
from workers.checkpoint import CheckpointError, CheckpointReader
from workers.layers.rotary import inverse_frequencies, model_frequencies
from workers.models.layouts import LAYOUTS, Layout, check_checkpoint
from workers.models.names import QUANT_COLUMNS, fused_views, packed_parts

logger = logging.getLogger(__name__)

METHODS = ("awq", "rtn")
W_BIT = 4
N_GRID = 20
"""Grid points of the scale search (alpha = i / N_GRID) and the clip search's step."""
MAX_SHRINK = 0.5
"""The clip search shrinks the range of a weight group by at most this fraction."""
LINEARS = ("q", "k", "v", "o", "gate", "up", "down")
"""Canonical (Llama-style) names of a layer's linears; InternLM2's wqkv is split into q/k/v."""
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q", "k", "v"),
    "o": ("o",),
    "gate_up": ("gate", "up"),
    "down": ("down",),
}
"""Linears that share one input (and so one AWQ scale)."""
NO_CLIP = ("q", "k")
FP16_MAX = 65504.0
FP16_TINY = 6.104e-05
"""Smallest normal float16: scales below it lose precision when stored."""
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
CALIBRATION_FILE = "calibration.txt"
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class QuantizeError(ValueError):
    """Input a user can fix; `key` names the parameter at fault (model, out_dir, group_size,
    w_bit, method, calib_tokens, calib_seq_len, float_dtype, device) so a front end can name
    its flag."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


@dataclass
class GroupStats:
    """One linear group of one layer (relative output errors on the calibration tokens)."""

    group: str
    """qkv, o, gate_up or down."""
    alpha: float | None
    """The chosen exponent, or None where the group is not scaled (o with GQA)."""
    rtn_error: float
    """Plain round-to-nearest of the source weights."""
    scaled_error: float
    """Rounding the AWQ-scaled weights (before clipping)."""
    final_error: float
    """Rounding what is written: scaled, folded and clipped weights."""


@dataclass
class LayerReport:
    """One decoder layer: its groups' stats (empty for rtn) and the seconds it took."""

    index: int
    groups: list[GroupStats]
    seconds: float


@dataclass
class QuantizeReport:
    method: str
    group_size: int
    zero_point: bool
    clip: bool
    calib_tokens: int
    """Calibration tokens used (0 for rtn)."""
    out_dir: str
    seconds: float = 0.0
    layers: list[LayerReport] = field(default_factory=list)

    def mean_errors(self) -> dict[str, dict[str, float]]:
        """group -> {rtn, scaled, final}: relative errors averaged over layers."""
        out: dict[str, dict[str, float]] = {}
        for name in GROUPS:
            stats = [g for layer in self.layers for g in layer.groups if g.group == name]
            if stats:
                out[name] = {
                    "rtn": sum(g.rtn_error for g in stats) / len(stats),
                    "scaled": sum(g.scaled_error for g in stats) / len(stats),
                    "final": sum(g.final_error for g in stats) / len(stats),
                }
        return out

    def summary(self) -> str:
        lines = [
            f"{self.method} w4 g{self.group_size} "
            f"{'asym' if self.zero_point else 'sym'}: {len(self.layers)} layers in "
            f"{self.seconds:.1f} s -> {self.out_dir}"
        ]
        for name, e in self.mean_errors().items():
            lines.append(
                f"  {name:8s} mean relative output error: rtn {e['rtn']:.3e}, "
                f"scaled {e['scaled']:.3e}, written {e['final']:.3e}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LayerResult:
    """What the AWQ pass computed for one layer (canonical names, float32)."""

    index: int
    source: dict[str, torch.Tensor]
    """The layer's source weights."""
    folded: dict[str, torch.Tensor]
    """Source weights with the AWQ scales folded in: the same function as `source`."""
    clipped: dict[str, torch.Tensor]
    """`folded` with the clip applied to the linears: what is rounded."""
    scales: dict[str, torch.Tensor]
    """group -> s [in] (ones where the group is not scaled)."""
    stats: list[GroupStats]


# --------------------------------------------------------------------------------------------
# Fake quantization and output error
# --------------------------------------------------------------------------------------------


def fake_quantize(weight: torch.Tensor, group_size: int, zero_point: bool = True) -> torch.Tensor:
    """`quantize_rtn` then dequantize, float32 [out, in] -> [out, in], computed in the weight's
    own orientation (same arithmetic as `quantize_rtn`, without the transposes)."""
    out_f, in_f = weight.shape
    w = weight.to(torch.float32).reshape(out_f, in_f // group_size, group_size)
    if zero_point:
        wmax = w.amax(dim=-1, keepdim=True).clamp(min=0)
        wmin = w.amin(dim=-1, keepdim=True).clamp(max=0)
        scales = ((wmax - wmin) / 15).clamp(min=1e-8)
        zeros = torch.round(-wmin / scales).clamp(0, 15)
    else:
        scales = (w.abs().amax(dim=-1, keepdim=True) * 2 / 15).clamp(min=1e-8)
        zeros = torch.full_like(scales, 8.0)
    codes = torch.round(w / scales + zeros).clamp(0, 15)
    return ((codes - zeros) * scales).reshape(out_f, in_f)


class _OutputError:
    """||x d^T||^2 for many weight differences d [out, in] on fixed activations x [n, in]:
    through the Gram matrix x^T x when that is cheaper (n > in), else directly."""

    def __init__(self, x: torch.Tensor) -> None:
        self.n, in_f = x.shape
        self.x = x
        self.gram = x.T @ x if self.n > in_f else None

    def __call__(self, d: torch.Tensor) -> float:
        if self.gram is not None:
            return float(((d @ self.gram) * d).sum())
        return float((self.x @ d.T).pow(2).sum())


def search_scale(
    weight: torch.Tensor, x: torch.Tensor, group_size: int, zero_point: bool
) -> tuple[torch.Tensor, float, float, float]:
    """AWQ's scale search for one group: weight [out, in] (the group's linears stacked), x
    [n, in] -> (s [in], alpha, relative error of RTN, relative error with s)."""
    err = _OutputError(x)
    ref = err(weight)
    x_mean = x.abs().mean(dim=0)
    best: tuple[float, float, torch.Tensor] | None = None
    rtn = math.inf
    for i in range(N_GRID):
        alpha = i / N_GRID
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        e = err(fake_quantize(weight * s, group_size, zero_point) / s - weight)
        if i == 0:
            rtn = e
        if best is None or e < best[0]:
            best = (e, alpha, s)
    assert best is not None
    denom = max(ref, 1e-30)
    return best[2], best[1], rtn / denom, best[0] / denom


def search_clip(
    weight: torch.Tensor, x: torch.Tensor, group_size: int, zero_point: bool
) -> torch.Tensor:
    """AWQ's clip search: per (output row, input group) the bound max|w| * (1 - i / N_GRID),
    i < N_GRID * MAX_SHRINK, whose rounding error of that group's partial output on x is
    least. Returns the bounds [out, in/group]."""
    out_f, in_f = weight.shape
    n_groups = in_f // group_size
    xg = x.reshape(-1, n_groups, group_size).transpose(0, 1)  # [G, n, gs]
    gram = xg.transpose(1, 2) @ xg  # [G, gs, gs]
    w = weight.reshape(out_f, n_groups, group_size)
    org_max = w.abs().amax(dim=-1, keepdim=True)
    best_max = org_max.clone()
    best_err = torch.full((out_f, n_groups, 1), math.inf, dtype=torch.float32, device=w.device)
    for i in range(int(MAX_SHRINK * N_GRID)):
        bound = org_max * (1 - i / N_GRID)
        clipped = torch.maximum(torch.minimum(w, bound), -bound)
        q = fake_quantize(clipped.reshape(out_f, in_f), group_size, zero_point)
        d = (q.reshape(out_f, n_groups, group_size) - w).transpose(0, 1)  # [G, out, gs]
        e = ((d @ gram) * d).sum(dim=-1).T[..., None]  # [out, G, 1]
        better = e < best_err
        best_err = torch.where(better, e, best_err)
        best_max = torch.where(better, bound, best_max)
    return best_max[..., 0]


def apply_clip(weight: torch.Tensor, bounds: torch.Tensor, group_size: int) -> torch.Tensor:
    """Clamp weight [out, in] to +-bounds [out, in/group] per group."""
    b = bounds.repeat_interleave(group_size, dim=1)
    return torch.maximum(torch.minimum(weight, b), -b)


def relative_error(
    approx: torch.Tensor, exact: torch.Tensor, x: torch.Tensor, reference: torch.Tensor
) -> float:
    """||x (approx - exact)^T||^2 / ||x reference^T||^2."""
    err = _OutputError(x)
    return err(approx - exact) / max(err(reference), 1e-30)


# --------------------------------------------------------------------------------------------
# Checkpoint access in canonical names
# --------------------------------------------------------------------------------------------

Getter = Callable[[str], torch.Tensor]


def state_dict_getter(config: ModelConfig, weights: Mapping[str, torch.Tensor]) -> Getter:
    """`weights[name]`, and for a checkpoint with packed projections (Phi-3) a part's float
    weight it does not hold itself as its rows of the packed one (`split_packed`)."""
    parts = split_packed(config, weights, suffixes=("weight", "bias"))

    def get(name: str) -> torch.Tensor:
        return weights[name] if name in weights else parts[name]

    return get


def split_packed(
    config: ModelConfig,
    tensors: Mapping[str, torch.Tensor],
    suffixes: tuple[str, ...] = ("weight", "bias", "qweight", "qzeros", "scales"),
) -> dict[str, torch.Tensor]:
    """`tensors` with each packed projection's (Phi-3's qkv_proj / gate_up_proj) tensors of
    these suffixes replaced by its parts' (q / k / v, gate / up): float ones by rows, AWQ's by
    output columns (qweight and qzeros hold 8 outputs per word) -- the inverse of `_packed`."""
    out = dict(tensors)
    for module, parts in packed_parts(config).items():
        for suffix in suffixes:
            packed = out.pop(f"{module}.{suffix}", None)
            if packed is None:
                continue
            per = dict(QUANT_COLUMNS["awq"]).get(suffix, 1)  # (outputs per column)
            for part, start, stop in parts:
                if suffix in ("weight", "bias"):
                    out[f"{part}.{suffix}"] = packed[start:stop]
                else:
                    out[f"{part}.{suffix}"] = packed[:, start // per : stop // per]
    return out


def _linear_names(lay: Layout) -> dict[str, str]:
    """Canonical linear -> checkpoint module name (without the layer prefix)."""
    names = {"o": lay.o, "gate": lay.gate, "up": lay.up, "down": lay.down}
    if lay.wqkv is None:
        assert lay.q and lay.k and lay.v
        names.update(q=lay.q, k=lay.k, v=lay.v)
    return names


def checkpoint_linears(config: ModelConfig) -> list[str]:
    """Module names (without the layer prefix) of the linears written as 4-bit, per layer."""
    lay = LAYOUTS[config.architecture]
    qkv = [lay.wqkv] if lay.wqkv is not None else [lay.q, lay.k, lay.v]
    return [str(n) for n in (*qkv, lay.o, lay.gate, lay.up, lay.down)]


def read_layer(config: ModelConfig, get: Getter, index: int) -> dict[str, torch.Tensor]:
    """One decoder layer as float32 tensors under canonical names: `q.weight` .. `down.weight`,
    their biases where the config has them, `input_norm.weight`, `post_norm.weight` (and
    Qwen3's / Gemma 3's `q_norm.weight`, `k_norm.weight`, Gemma's `attn_out_norm.weight`,
    `mlp_out_norm.weight`). Norm weights are as stored: Gemma's norms scale by 1 + w
    (`ModelConfig.norm_weight_offset`, which `_norm` adds)."""
    lay = LAYOUTS[config.architecture]
    p = lay.layer.format(index)
    out: dict[str, torch.Tensor] = {}
    suffixes = ("weight", "bias") if config.attention_bias else ("weight",)
    if lay.wqkv is not None:
        for suffix in suffixes:
            q, k, v = unpack_internlm2_wqkv(
                get(f"{p}{lay.wqkv}.{suffix}"),
                config.num_heads,
                config.num_kv_heads,
                config.head_dim,
            )
            out.update({f"q.{suffix}": q, f"k.{suffix}": k, f"v.{suffix}": v})
    for canon, name in _linear_names(lay).items():
        has_bias = (
            config.mlp_bias
            if canon in ("gate", "up", "down")
            else config.has_o_bias
            if canon == "o"
            else config.attention_bias
        )
        for suffix in ("weight", "bias") if has_bias else ("weight",):
            out[f"{canon}.{suffix}"] = get(f"{p}{name}.{suffix}")
    out["input_norm.weight"] = get(f"{p}{lay.input_norm}.weight")
    out["post_norm.weight"] = get(f"{p}{lay.post_norm}.weight")
    if config.qk_norm:
        out["q_norm.weight"] = get(f"{p}{lay.q_norm}.weight")
        out["k_norm.weight"] = get(f"{p}{lay.k_norm}.weight")
    if config.sandwich_norms:
        out["attn_out_norm.weight"] = get(f"{p}{lay.attn_out_norm}.weight")
        out["mlp_out_norm.weight"] = get(f"{p}{lay.mlp_out_norm}.weight")
    return {k: v.to(torch.float32) for k, v in out.items()}


def layer_to_checkpoint(
    config: ModelConfig, index: int, canon: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Inverse of `read_layer`: checkpoint names (InternLM2 q/k/v packed into wqkv)."""
    lay = LAYOUTS[config.architecture]
    p = lay.layer.format(index)
    out: dict[str, torch.Tensor] = {}
    if lay.wqkv is not None:
        for suffix in ("weight", "bias"):
            if f"q.{suffix}" in canon:
                out[f"{p}{lay.wqkv}.{suffix}"] = pack_internlm2_wqkv(
                    canon[f"q.{suffix}"], canon[f"k.{suffix}"], canon[f"v.{suffix}"],
                    config.num_kv_heads,
                )  # fmt: skip
    for c, name in _linear_names(lay).items():
        for suffix in ("weight", "bias"):
            if f"{c}.{suffix}" in canon:
                out[f"{p}{name}.{suffix}"] = canon[f"{c}.{suffix}"]
    norms: dict[str, str | None] = {
        "input_norm": lay.input_norm,
        "post_norm": lay.post_norm,
        "q_norm": lay.q_norm,
        "k_norm": lay.k_norm,
        "attn_out_norm": lay.attn_out_norm,
        "mlp_out_norm": lay.mlp_out_norm,
    }
    for n, stored in norms.items():
        if stored is not None and f"{n}.weight" in canon:
            out[f"{p}{stored}.weight"] = canon[f"{n}.weight"]
    return out


# --------------------------------------------------------------------------------------------
# A plain torch forward of the decoder (calibration and reference)
# --------------------------------------------------------------------------------------------


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def _norm(config: ModelConfig, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm with a stored weight (Gemma's scales by 1 + weight)."""
    return _rms_norm(x, weight + config.norm_weight_offset, config.rms_norm_eps)


def _linear(w: Mapping[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))


def rope_tables(
    config: ModelConfig, seq_len: int, device: torch.device | str = "cpu", local: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [seq_len, head_dim] for positions 0..seq_len-1 (linear scaling applied;
    dynamic NTK keeps the trained base within max_position_embeddings). local: the tables of
    Gemma 3's sliding-window layers (their own base, no scaling)."""
    if local:
        assert config.local_rope_theta is not None
        inv = inverse_frequencies(config.head_dim, config.local_rope_theta).to(device)
    else:
        inv = model_frequencies(config, config.rope_base(seq_len)).to(device)
    freqs = torch.arange(seq_len, dtype=torch.float32, device=device)[:, None] * inv[None]
    emb = torch.cat((freqs, freqs), dim=-1)
    factor = config.rope_attention_factor
    return emb.cos() * factor, emb.sin() * factor  # (YaRN scales the rotated q and k, as HF)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _attention(
    config: ModelConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int
) -> torch.Tensor:
    """Causal attention [batch, heads, seq, head_dim]; within the last `window` keys (0: all),
    Gemma 2's scores soft-capped. Granite's attention multiplier and Gemma's
    query_pre_attn_scalar are the softmax scale (`ModelConfig.attention_multiplier`)."""
    scale, cap = config.attention_multiplier, config.attn_logit_softcapping
    if not window and not cap:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if cap:
        scores = cap * torch.tanh(scores / cap)
    t = q.shape[2]
    i = torch.arange(t, device=q.device)
    seen = i[None, :] <= i[:, None]
    if window:
        seen &= i[None, :] > i[:, None] - window
    return torch.softmax(scores.masked_fill(~seen, float("-inf")), dim=-1) @ v


def layer_forward(
    config: ModelConfig,
    w: Mapping[str, torch.Tensor],
    h: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    capture: dict[str, torch.Tensor] | None = None,
    index: int = 0,
) -> torch.Tensor:
    """Decoder layer `index` on hidden states h [batch, seq, hidden] (float32, causal attention
    within each sequence, within the layer's sliding window if it has one); `capture` receives
    each linear group's input as [batch*seq, in]. `rope`: the model's tables (Gemma 3's
    windowed layers make their own)."""
    b, t, _ = h.shape
    hd, nh, nkv = config.head_dim, config.num_heads, config.num_kv_heads
    x = _norm(config, h, w["input_norm.weight"])
    q = _linear(w, "q", x).view(b, t, nh, hd).transpose(1, 2)
    k = _linear(w, "k", x).view(b, t, nkv, hd).transpose(1, 2)
    v = _linear(w, "v", x).view(b, t, nkv, hd).transpose(1, 2)
    if "q_norm.weight" in w:  # (Qwen3: every q and k head normed before RoPE)
        q = _norm(config, q, w["q_norm.weight"])
        k = _norm(config, k, w["k_norm.weight"])
    window = config.layer_window(index)
    if config.local_rope_theta is not None and window:
        rope = rope_tables(config, t, h.device, local=True)
    cos, sin = rope[0][:t], rope[1][:t]
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    if nkv != nh:
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.repeat_interleave(nh // nkv, dim=1)
    attn = _attention(config, q, k, v, window if window < t else 0)
    attn = attn.transpose(1, 2).reshape(b, t, nh * hd)
    # (Granite: its residual multiplier scales what each half adds; Gemma norms each half's
    # output before the add)
    m = config.residual_multiplier
    out = _linear(w, "o", attn)
    if "attn_out_norm.weight" in w:
        out = _norm(config, out, w["attn_out_norm.weight"])
    h = h + m * out
    x2 = _norm(config, h, w["post_norm.weight"])
    gate = _linear(w, "gate", x2)
    if config.hidden_act == "silu":
        act = F.silu(gate) * _linear(w, "up", x2)
    else:  # (Gemma: GELU's tanh form)
        act = F.gelu(gate, approximate="tanh") * _linear(w, "up", x2)
    if capture is not None:
        capture["qkv"] = x.reshape(b * t, -1)
        capture["o"] = attn.reshape(b * t, -1)
        capture["gate_up"] = x2.reshape(b * t, -1)
        capture["down"] = act.reshape(b * t, -1)
    out = _linear(w, "down", act)
    if "mlp_out_norm.weight" in w:
        out = _norm(config, out, w["mlp_out_norm.weight"])
    return h + m * out


def forward_logits(
    config: ModelConfig, weights: Mapping[str, torch.Tensor], input_ids: torch.Tensor
) -> torch.Tensor:
    """Logits [batch, seq, vocab] of a full state dict in checkpoint names (float32 math)."""
    lay = LAYOUTS[config.architecture]
    stored = state_dict_getter(config, weights)

    def get(name: str) -> torch.Tensor:
        return stored(name).to(torch.float32)

    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    embed = get(f"{lay.embed}.weight")
    h = embed[ids] * config.embedding_multiplier
    rope = rope_tables(config, ids.shape[1], h.device)
    for i in range(config.num_layers):
        h = layer_forward(config, read_layer(config, get, i), h, rope, index=i)
    h = _norm(config, h, get(f"{lay.norm}.weight"))
    head = embed if config.tie_word_embeddings else get(f"{lay.head}.weight")
    logits = h @ head.T / config.logits_scaling
    cap = config.final_logit_softcapping
    return cap * torch.tanh(logits / cap) if cap else logits


def mean_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> float:
    """Mean next-token negative log-likelihood (nats) of ids [batch, seq] under logits."""
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return float(-logp.gather(-1, ids[:, 1:, None]).mean())


# --------------------------------------------------------------------------------------------
# Calibration data
# --------------------------------------------------------------------------------------------


def default_calibration_text() -> str:
    """The bundled calibration text (`dist_runtime/data/calibration.txt`): plain English prose
    on varied subjects, a few thousand tokens."""
    return (
        resources.files("dist_runtime")
        .joinpath("data", CALIBRATION_FILE)
        .read_text(encoding="utf-8")
    )


def calibration_ids(
    model_dir: str | os.PathLike[str],
    text: str | None = None,
    tokens: int = 512,
    seq_len: int = 128,
) -> torch.Tensor:
    """Token ids [tokens // seq_len, seq_len] of `text` (default: the bundled text) in the
    model's tokenizer, without special tokens: windows spread evenly over the text."""
    from dist_runtime.text.tokenizer import Tokenizer, TokenizerError

    if not isinstance(tokens, int) or tokens < 1:
        raise QuantizeError(
            f"calibration tokens must be a positive integer, got {tokens!r}", "calib_tokens"
        )
    if not isinstance(seq_len, int) or seq_len < 2:
        raise QuantizeError(
            f"calibration sequence length must be an integer >= 2, got {seq_len!r}",
            "calib_seq_len",
        )
    try:
        tokenizer = Tokenizer.from_folder(model_dir)
    except TokenizerError as e:
        raise QuantizeError(str(e), "model") from e
    if tokenizer is None:
        raise QuantizeError(
            f"{model_dir} has no tokenizer (tokenizer.json or tokenizer.model), which AWQ "
            "needs to tokenize its calibration text; add the tokenizer files or use "
            "method 'rtn', which needs no calibration",
            "model",
        )
    ids = tokenizer.encode(default_calibration_text() if text is None else text, False)
    seq_len = min(seq_len, tokens)
    n_seq = tokens // seq_len
    if len(ids) < n_seq * seq_len:
        raise QuantizeError(
            f"the calibration text has {len(ids):,} tokens, fewer than the {tokens:,} asked "
            "for; use a longer text or fewer calibration tokens",
            "calib_tokens",
        )
    last = len(ids) - seq_len
    starts = [round(i * last / max(n_seq - 1, 1)) for i in range(n_seq)]
    return torch.tensor([ids[s : s + seq_len] for s in starts], dtype=torch.int64)


# --------------------------------------------------------------------------------------------
# The AWQ pass
# --------------------------------------------------------------------------------------------


def _fold(
    config: ModelConfig, w: dict[str, torch.Tensor], scales: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Multiply each group's weight columns by s and divide the op before by s."""
    out = dict(w)
    s = scales["qkv"]
    for lin in GROUPS["qkv"]:
        out[f"{lin}.weight"] = out[f"{lin}.weight"] * s
    off = config.norm_weight_offset  # (Gemma's norms scale by 1 + w: that is what s divides)
    out["input_norm.weight"] = (out["input_norm.weight"] + off) / s - off
    s = scales["gate_up"]
    for lin in GROUPS["gate_up"]:
        out[f"{lin}.weight"] = out[f"{lin}.weight"] * s
    out["post_norm.weight"] = (out["post_norm.weight"] + off) / s - off
    s = scales["down"]
    out["down.weight"] = out["down.weight"] * s
    out["up.weight"] = out["up.weight"] / s[:, None]
    if "up.bias" in out:
        out["up.bias"] = out["up.bias"] / s
    if config.num_heads == config.num_kv_heads:
        s = scales["o"]
        out["o.weight"] = out["o.weight"] * s
        out["v.weight"] = out["v.weight"] / s[:, None]
        if "v.bias" in out:
            out["v.bias"] = out["v.bias"] / s
    return out


def _row_scales(config: ModelConfig, scales: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per linear, the factor that takes a folded output row back to the source's output (the
    1/s folded into v and up rows); absent means 1."""
    rows = {"up": scales["down"]}
    if config.num_heads == config.num_kv_heads:
        rows["v"] = scales["o"]
    return rows


def _stack(w: Mapping[str, torch.Tensor], group: str, suffix: str = "weight") -> torch.Tensor:
    return torch.cat([w[f"{lin}.{suffix}"] for lin in GROUPS[group]])


def awq_layers(
    model_dir: str | os.PathLike[str],
    input_ids: torch.Tensor,
    group_size: int,
    zero_point: bool = True,
    clip: bool = True,
    device: torch.device | str = "cpu",
) -> Iterator[LayerResult]:
    """Run the AWQ search on calibration ids [batch, seq] and yield each layer's result
    (tensors on `device`). The source is read one layer at a time; each layer's input is the
    float output of the layer before."""
    config = ModelConfig.from_pretrained(model_dir)
    reader = CheckpointReader(Path(model_dir))
    reader.add_views(*fused_views(config))
    try:
        yield from _awq_layers(config, reader.read, input_ids, group_size, zero_point, clip, device)
    finally:
        reader.close()


def _awq_layers(
    config: ModelConfig,
    get: Getter,
    input_ids: torch.Tensor,
    group_size: int,
    zero_point: bool,
    clip: bool,
    device: torch.device | str,
) -> Iterator[LayerResult]:
    lay = LAYOUTS[config.architecture]

    def get_on_device(name: str) -> torch.Tensor:
        return get(name).to(device)

    h = get_on_device(f"{lay.embed}.weight")[input_ids.to(device)].to(torch.float32)
    h = h * config.embedding_multiplier
    rope = rope_tables(config, input_ids.shape[1], device)
    for i in range(config.num_layers):
        w = read_layer(config, get_on_device, i)
        result, h = awq_layer(config, i, w, h, rope, group_size, zero_point, clip)
        yield result


@torch.no_grad()
def awq_layer(
    config: ModelConfig,
    index: int,
    w: dict[str, torch.Tensor],
    h: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    group_size: int,
    zero_point: bool = True,
    clip: bool = True,
) -> tuple[LayerResult, torch.Tensor]:
    """AWQ for one layer (canonical float32 weights `w`, input hidden states h): the scale
    search, folding, clip search and error report; returns the result and the layer's output."""
    captured: dict[str, torch.Tensor] = {}
    h_next = layer_forward(config, w, h, rope, captured, index)
    foldable_o = config.num_heads == config.num_kv_heads
    scales: dict[str, torch.Tensor] = {}
    found: dict[str, tuple[float | None, float, float]] = {}
    for group in GROUPS:
        x, weight = captured[group], _stack(w, group)
        if group != "o" or foldable_o:
            s, alpha, rtn, scaled = search_scale(weight, x, group_size, zero_point)
            scales[group] = s
            found[group] = (alpha, rtn, scaled)
        else:
            scales[group] = torch.ones(weight.shape[1], device=weight.device)
            e = relative_error(fake_quantize(weight, group_size, zero_point), weight, x, weight)
            found[group] = (None, e, e)
    folded = _fold(config, w, scales)
    clipped = dict(folded)
    if clip:
        for group, lins in GROUPS.items():
            x = captured[group] / scales[group]
            for lin in lins:
                if lin not in NO_CLIP:
                    wf = folded[f"{lin}.weight"]
                    bounds = search_clip(wf, x, group_size, zero_point)
                    clipped[f"{lin}.weight"] = apply_clip(wf, bounds, group_size)
    rows = _row_scales(config, scales)
    stats = []
    for group, lins in GROUPS.items():
        diffs = []
        for lin in lins:
            wc, wf = clipped[f"{lin}.weight"], folded[f"{lin}.weight"]
            d = fake_quantize(wc, group_size, zero_point) - wf
            diffs.append(d * rows[lin][:, None] if lin in rows else d)
        x = captured[group]
        d = torch.cat(diffs)
        final = _OutputError(x / scales[group])(d) / max(_OutputError(x)(_stack(w, group)), 1e-30)
        chosen, rtn_err, scaled_err = found[group]
        stats.append(GroupStats(group, chosen, rtn_err, scaled_err, final))
        logger.debug(
            "layer %d %s: alpha %s, relative error rtn %.3e scaled %.3e written %.3e",
            index, group, chosen, rtn_err, scaled_err, final,
        )  # fmt: skip
    return LayerResult(index, w, folded, clipped, scales, stats), h_next


# --------------------------------------------------------------------------------------------
# Checks on the input
# --------------------------------------------------------------------------------------------


def _open_source(src: Path) -> tuple[ModelConfig, dict[str, Any], CheckpointReader]:
    if not src.is_dir():
        raise QuantizeError(
            f"model folder {str(src)!r} does not exist; pass a Hugging Face checkpoint folder "
            "(config.json + *.safetensors)",
            "model",
        )
    try:
        hf = json.loads((src / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        hf = None  # ModelConfig.from_pretrained says what is wrong with it
    if isinstance(hf, dict):
        quant = hf.get("quantization_config")
        if quant is not None:
            method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
            raise QuantizeError(
                f"{src} is already quantized (config.json has a quantization_config, "
                f"quant_method {method!r}); quantize the float checkpoint it came from",
                "model",
            )
        for name in ("quant_config.json", "quantize_config.json"):
            if (src / name).is_file():
                raise QuantizeError(
                    f"{src} is already quantized (it has {name}); quantize the float "
                    "checkpoint it came from",
                    "model",
                )
    try:
        config = ModelConfig.from_pretrained(src)
    except ConfigError as e:
        raise QuantizeError(str(e), "model") from e
    if not isinstance(hf, dict):
        raise QuantizeError(f"{src / 'config.json'} is not a JSON object", "model")
    try:
        reader = CheckpointReader(src)
        packed = [n for n in reader.names() if n.endswith((".qweight", ".qzeros", ".g_idx"))]
        if packed:
            raise QuantizeError(
                f"{src} holds already-quantized tensors ({packed[0]!r}, ...); quantize the "
                "float checkpoint it came from",
                "model",
            )
        check_checkpoint(config, reader)
    except CheckpointError as e:
        raise QuantizeError(str(e), "model") from e
    return config, hf, reader


def check_group_size(config: ModelConfig, group_size: int) -> None:
    """Raise QuantizeError unless group_size is a multiple of 8 that divides every linear's
    input width (and every output width is a multiple of 8, which the packing needs)."""
    if (
        not isinstance(group_size, int)
        or isinstance(group_size, bool)
        or group_size < 8
        or group_size % 8
    ):
        raise QuantizeError(
            f"group size must be a positive multiple of 8 (what 4-bit loaders and kernels "
            f"take; 128, 64 or 32 usually), got {group_size!r}",
            "group_size",
        )
    widths = {
        "hidden_size": (config.hidden_size, "q/k/v/gate/up"),
        "num_heads * head_dim": (config.num_heads * config.head_dim, "o"),
        "intermediate_size": (config.intermediate_size, "down"),
    }
    bad = [f"{name} {width}" for name, (width, _) in widths.items() if width % group_size]
    if bad:
        fits = [g for g in (256, 128, 64, 32, 16) if all(w % g == 0 for w, _ in widths.values())]
        hint = (
            f"use a group size that divides all three: {', '.join(map(str, fits))}"
            if fits
            else "this model's input widths have no common power-of-two group size"
        )
        listed = ", ".join(f"{k} {w} for {lins}" for k, (w, lins) in widths.items())
        raise QuantizeError(
            f"group size {group_size} does not divide {' or '.join(bad)} (the linears' input "
            f"widths: {listed}); {hint}",
            "group_size",
        )
    outs = {
        "num_heads * head_dim": config.num_heads * config.head_dim,
        "num_kv_heads * head_dim": config.num_kv_heads * config.head_dim,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
    }
    odd = [f"{k} {v}" for k, v in outs.items() if v % 8]
    if odd:
        raise QuantizeError(
            f"AWQ packs 8 output columns per int32, but {', '.join(odd)} is not a multiple of "
            "8; this model cannot be written in the AWQ format",
            "model",
        )


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise QuantizeError(f"device {device!r} is not a torch device ({e})", "device") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QuantizeError(f"device {device!r}: CUDA is not available here; use cpu", "device")
    if dev.type not in ("cpu", "cuda"):
        raise QuantizeError(f"device {device!r} is not supported; use cpu or cuda", "device")


def _check_out_dir(src: Path, dst: Path, force: bool) -> None:
    if dst.resolve() == src.resolve():
        raise QuantizeError(
            f"the output folder {str(dst)!r} is the model folder; write to another folder",
            "out_dir",
        )
    if dst.exists() and not dst.is_dir():
        raise QuantizeError(f"the output path {str(dst)!r} is a file, not a folder", "out_dir")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise QuantizeError(
            f"the output folder {str(dst)!r} is not empty; choose a new folder, or pass "
            "--force (force=True) to overwrite the checkpoint in it",
            "out_dir",
        )


def _is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_FILE_SUFFIXES) or name.endswith(".index.json")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def quantize_linear(
    weight: torch.Tensor, group_size: int, zero_point: bool = True
) -> dict[str, torch.Tensor]:
    """A float weight [out, in] -> AWQ GEMM tensors {qweight, qzeros, scales (float16)}."""
    codes, scales, zeros = quantize_rtn(weight.cpu(), group_size, zero_point)
    qweight, qzeros = pack_awq(codes, zeros)
    if float(scales.max()) > FP16_MAX:
        raise QuantizeError(
            f"a weight group spans {float(scales.max()) * 15:.3g}, beyond what a float16 scale "
            "holds; this checkpoint's weights cannot be stored in the AWQ format",
            "model",
        )
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales.to(torch.float16)}


def quantization_config(group_size: int, zero_point: bool) -> dict[str, Any]:
    """config.json's `quantization_config` (Hugging Face transformers' AwqConfig keys)."""
    return {
        "quant_method": "awq",
        "bits": W_BIT,
        "group_size": group_size,
        "zero_point": zero_point,
        "version": "gemm",
        "modules_to_not_convert": None,
    }


def quantize_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    method: str = "awq",
    *,
    w_bit: int = W_BIT,
    group_size: int = 128,
    zero_point: bool = True,
    calib_text: str | None = None,
    calib_tokens: int = 512,
    calib_seq_len: int = 128,
    clip: bool = True,
    force: bool = False,
    max_shard_bytes: int | None = None,
    float_dtype: str | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> QuantizeReport:
    """Quantize the float checkpoint folder `src` into an AWQ GEMM folder `dst` (see the module
    docstring); `calib_text` replaces the bundled calibration text (awq only). The tensors
    that stay float keep their source dtype, or are cast to `float_dtype` (float16 for
    servers whose AWQ kernels take only float16 activations, such as vLLM); config.json's
    `torch_dtype` follows."""
    started = time.perf_counter()
    if method not in METHODS:
        raise QuantizeError(f"method {method!r} is not one of {list(METHODS)}", "method")
    _check_device(device)
    if float_dtype is not None and float_dtype not in FLOAT_DTYPES:
        raise QuantizeError(
            f"float dtype {float_dtype!r} is not one of {sorted(FLOAT_DTYPES)}", "float_dtype"
        )
    if w_bit != W_BIT:
        raise QuantizeError(
            f"only 4-bit weights are supported (AWQ GEMM packs 8 4-bit codes per int32), got "
            f"w_bit {w_bit!r}",
            "w_bit",
        )
    src_dir, dst_dir = Path(src), Path(dst)
    config, hf, reader = _open_source(src_dir)
    try:
        if config.rotary_dim is not None or config.rope_interleaved:
            raise QuantizeError(
                f"{src_dir} turns part of each head with RoPE (partial_rotary_factor), which "
                "the calibration forward does not; serve it in float",
                "model",
            )
        check_group_size(config, group_size)
        _check_out_dir(src_dir, dst_dir, force)
        ids = None
        if method == "awq":
            ids = calibration_ids(src_dir, calib_text, calib_tokens, calib_seq_len)
        report = QuantizeReport(
            method=method,
            group_size=group_size,
            zero_point=zero_point,
            clip=clip and method == "awq",
            calib_tokens=0 if ids is None else ids.numel(),
            out_dir=str(dst_dir),
        )
        cast = None if float_dtype is None else FLOAT_DTYPES[float_dtype]
        tensors = _quantized_tensors(config, reader, src_dir, ids, report, cast, device, progress)
    finally:
        reader.close()
    if float_dtype is not None:
        hf = dict(hf, torch_dtype=float_dtype)
    _write_folder(src_dir, dst_dir, hf, tensors, group_size, zero_point, max_shard_bytes)
    report.seconds = time.perf_counter() - started
    logger.info("%s", report.summary())
    return report


def _quantized_tensors(
    config: ModelConfig,
    reader: CheckpointReader,
    src: Path,
    ids: torch.Tensor | None,
    report: QuantizeReport,
    cast: torch.dtype | None,
    device: str,
    progress: bool,
) -> dict[str, torch.Tensor]:
    """Every output tensor, in the source's tensor order; float tensors in `cast` or their
    source dtype."""
    dtypes: dict[str, torch.dtype] = {}

    def get(name: str) -> torch.Tensor:
        t = reader.read(name)
        if not t.is_floating_point():
            raise QuantizeError(
                f"tensor {name!r} in {src} has dtype {t.dtype}, not a float dtype; is the "
                "checkpoint already quantized?",
                "model",
            )
        dtypes[name] = t.dtype
        return t

    gs, zp = report.group_size, report.zero_point
    layers = None if ids is None else _awq_layers(config, get, ids, gs, zp, report.clip, device)
    produced: dict[str, dict[str, torch.Tensor]] = {}
    subnormal = 0
    desc = f"quantizing ({report.method}"
    desc += f", {report.calib_tokens} calibration tokens)" if ids is not None else ")"
    lay = LAYOUTS[config.architecture]
    with Phase(desc, "layer", total=config.num_layers, enabled=progress) as bar:
        for i in range(config.num_layers):
            layer_start = time.perf_counter()
            if layers is not None:
                result = next(layers)
                weights, stats = result.clipped, result.stats
            else:
                weights, stats = read_layer(config, get, i), []
            linears = {f"{lay.layer.format(i)}{lin}.weight" for lin in checkpoint_linears(config)}
            for name, t in layer_to_checkpoint(config, i, weights).items():
                if name in linears:
                    q = quantize_linear(t, gs, zp)
                    s16 = q["scales"]
                    subnormal += int(((s16 > 0) & (s16 < FP16_TINY)).sum())
                    module = name.removesuffix(".weight")
                    produced[name] = {f"{module}.{k}": v for k, v in q.items()}
                else:
                    produced[name] = {name: t.cpu().to(cast or dtypes[name])}
            report.layers.append(LayerReport(i, stats, time.perf_counter() - layer_start))
            bar.update_to(i + 1)
    if subnormal:
        logger.warning(
            "%d weight groups have a scale below float16's normal range (%.1e); they are "
            "stored with reduced precision",
            subnormal,
            FP16_TINY,
        )
    out: dict[str, torch.Tensor] = {}
    parts_of = {  # (Phi-3: a packed weight -> its parts', in order)
        f"{packed}.weight": [f"{part}.weight" for part, _, _ in parts]
        for packed, parts in packed_parts(config).items()
    }
    for name in reader.names():
        if name in produced:
            out.update(produced.pop(name))
        elif name in parts_of and all(p in produced for p in parts_of[name]):
            out.update(_packed(name, [produced.pop(p) for p in parts_of[name]]))
        else:
            t = reader.read(name)
            out[name] = t.to(cast) if cast is not None and t.is_floating_point() else t
    assert not produced, sorted(produced)
    return out


def _packed(name: str, parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The tensors of a packed projection (`name`, Phi-3's qkv_proj / gate_up_proj weight)
    from its parts': 4-bit tensors joined along their output columns (AWQ packs 8 outputs per
    word and each part has a multiple of 8: the words join as they are), float ones along rows.
    Each output column is quantized on its own, so this is the packed layer quantized as one."""
    module = name.removesuffix(".weight")
    out: dict[str, torch.Tensor] = {}
    for key in parts[0]:
        suffix = key.rsplit(".", 1)[1]
        tensors = [next(v for k, v in part.items() if k.endswith("." + suffix)) for part in parts]
        dim = 0 if suffix in ("weight", "bias") else 1
        out[f"{module}.{suffix}"] = torch.cat(tensors, dim=dim).contiguous()
    return out


def _write_folder(
    src: Path,
    dst: Path,
    hf: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    group_size: int,
    zero_point: bool,
    max_shard_bytes: int | None,
) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for old in dst.iterdir():
        if old.is_file() and _is_weight_file(old.name):
            old.unlink()
    for item in sorted(src.iterdir()):
        if item.name.startswith(".") or not item.is_file():
            continue
        if _is_weight_file(item.name) or item.name in ("config.json", "quant_config.json"):
            continue
        shutil.copy2(item, dst / item.name)
    config = dict(hf, quantization_config=quantization_config(group_size, zero_point))
    write_from_state_dict(dst, config, tensors, max_shard_bytes=max_shard_bytes)
    quant = {"zero_point": zero_point, "q_group_size": group_size, "w_bit": W_BIT}
    (dst / "quant_config.json").write_text(
        json.dumps(dict(quant, version="GEMM"), indent=2) + "\n", encoding="utf-8"
    )


# --------------------------------------------------------------------------------------------
# Reading back
# --------------------------------------------------------------------------------------------


def load_dequantized(folder: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """An AWQ GEMM folder as a float32 state dict in checkpoint names: every `<m>.qweight`,
    `<m>.qzeros`, `<m>.scales` triple becomes `<m>.weight` [out, in]; other tensors as they
    are stored."""
    folder = Path(folder)
    hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    group_size = int(hf["quantization_config"]["group_size"])
    reader = CheckpointReader(folder)
    try:
        raw = {name: reader.read(name) for name in reader.names()}
    finally:
        reader.close()
    out: dict[str, torch.Tensor] = {}
    for name, t in raw.items():
        module, _, suffix = name.rpartition(".")
        if suffix in ("qzeros", "scales") and f"{module}.qweight" in raw:
            continue
        if suffix != "qweight":
            out[name] = t
            continue
        codes, zeros = unpack_awq(t, raw[f"{module}.qzeros"])
        groups = torch.arange(codes.shape[0]) // group_size
        w = dequantize(codes, raw[f"{module}.scales"], zeros, groups, torch.float32)
        out[f"{module}.weight"] = w.T.contiguous()
    return out
