"""Online KV-cache quantization (LMDeploy's `--quant-policy 4/8`): per token and KV head,
asymmetric int8 / int4 codes with an fp32 (scale, zero) pair.

Layout of a quantized paged cache (bits 8 or 4), for k and v alike:
- codes: uint8 (num_blocks, block_size, kv_heads, head_dim) for bits=8;
  uint8 (num_blocks, block_size, kv_heads, head_dim // 2) for bits=4, "split halves" packing: byte
  j holds element j in its low nibble and element j + head_dim / 2 in its high nibble, so a kernel
  computes q . k as q[:D/2] . k_lo + q[D/2:] . k_hi and P @ V into two half-width accumulators,
  without interleaving.
- params: float32 (num_blocks, block_size, kv_heads, 2); [..., 0] = scale, [..., 1] = zero.

A head vector x (head_dim values, in fp32) quantizes as zero = min(x),
scale = (max(x) - min(x)) / (2^bits - 1) (1 for a constant vector, whose codes are then 0 and
dequantize to x exactly), code = clamp(floor((x - zero) / scale + 0.5), 0, 2^bits - 1), i.e.
round half up; it dequantizes as code * scale + zero, within scale / 2 of x (plus fp32
rounding). The Triton store kernel uses the same fp32 operations (IEEE division included), so its
codes and params equal `quantize_kv_ref`'s bit for bit.

Unquantized caches (bits=0) keep the model dtype and carry no params.
"""

from __future__ import annotations

import torch

from kernels.flash_attn import _jit

try:
    import triton  # noqa: F401
    import triton.language as tl
except ImportError:  # CPU-only installs: only the torch references run
    triton = None  # type: ignore[assignment]

QUANT_BITS = (0, 4, 8)
"""Valid `bits`: 0 (no quantization, model dtype), 8 (uint8 codes), 4 (two codes per byte)."""


def check_bits(bits: int) -> None:
    if bits not in QUANT_BITS:
        raise ValueError(f"KV cache bits must be one of {QUANT_BITS} (quant policy), got {bits!r}")


def code_dim(head_dim: int, bits: int) -> int:
    """Last dimension of a cache of `bits` for head vectors of head_dim elements."""
    check_bits(bits)
    if bits == 4:
        if head_dim % 2:
            raise ValueError(f"int4 KV quantization needs an even head_dim, got {head_dim}")
        return head_dim // 2
    return head_dim


def quantize_kv_ref(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (..., head_dim) float. Returns codes uint8 (..., code_dim(head_dim, bits)) and params
    float32 (..., 2) = (scale, zero), one pair per head vector."""
    if bits not in (4, 8):
        raise ValueError(f"quantize_kv_ref takes bits 4 or 8, got {bits!r}")
    if not x.is_floating_point():
        raise ValueError(f"quantize_kv_ref takes a float tensor, got {x.dtype}")
    head_dim = x.shape[-1]
    code_dim(head_dim, bits)
    if head_dim == 0:
        raise ValueError("quantize_kv_ref needs head_dim >= 1")
    qmax = float((1 << bits) - 1)
    xf = x.float()
    zero = xf.amin(dim=-1)
    scale = (xf.amax(dim=-1) - zero) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    y = (xf - zero[..., None]) / scale[..., None]
    codes = torch.floor(y + 0.5).clamp_(0.0, qmax).to(torch.uint8)
    if bits == 4:
        half = head_dim // 2
        codes = codes[..., :half] | (codes[..., half:] << 4)
    return codes, torch.stack([scale, zero], dim=-1)


def unpack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (..., code_dim) -> one uint8 code per element (..., head_dim)."""
    if bits == 4:
        return torch.cat([codes & 0xF, codes >> 4], dim=-1)
    return codes


def dequantize_kv_ref(
    codes: torch.Tensor, params: torch.Tensor, bits: int, dtype: torch.dtype
) -> torch.Tensor:
    """codes uint8 (..., code_dim), params float32 (..., 2) -> (..., head_dim) in `dtype`.

    Math in fp32 (fp64 for dtype float64): code * scale + zero, then cast.
    """
    if bits not in (4, 8):
        raise ValueError(f"dequantize_kv_ref takes bits 4 or 8, got {bits!r}")
    if codes.dtype != torch.uint8 or params.shape != (*codes.shape[:-1], 2):
        raise ValueError(
            f"codes must be uint8 (..., code_dim) and params (..., 2), got {codes.dtype} "
            f"{tuple(codes.shape)} and {tuple(params.shape)}"
        )
    compute = torch.promote_types(dtype, torch.float32)
    p = params.to(compute)
    scale, zero = p[..., 0:1], p[..., 1:2]
    if bits == 8:
        return torch.addcmul(zero, codes.to(compute), scale).to(dtype)
    # int4: each nibble half straight into its half of the output (no unpacked copy)
    half = codes.shape[-1]
    x = torch.empty((*codes.shape[:-1], 2 * half), dtype=compute, device=codes.device)
    torch.addcmul(zero, (codes & 0xF).to(compute), scale, out=x[..., :half])
    torch.addcmul(zero, (codes >> 4).to(compute), scale, out=x[..., half:])
    return x.to(dtype)


def fake_quant_kv(x: torch.Tensor, bits: int) -> torch.Tensor:
    """What a cache of `bits` holds for x: dequantize(quantize(x)) in x's dtype; x for bits=0."""
    check_bits(bits)
    if bits == 0:
        return x
    codes, params = quantize_kv_ref(x, bits)
    return dequantize_kv_ref(codes, params, bits, x.dtype)


def check_quant_caches(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_params: torch.Tensor | None,
    v_params: torch.Tensor | None,
    bits: int,
    head_dim: int,
) -> None:
    """Check a pair of paged caches (and params) against `bits` and the model's head_dim."""
    check_bits(bits)
    if bits == 0:
        if k_params is not None or v_params is not None:
            raise ValueError("k_params / v_params are given but bits=0 (an unquantized cache)")
        return
    if k_params is None or v_params is None:
        raise ValueError(f"bits={bits} needs both k_params and v_params")
    want_dim = code_dim(head_dim, bits)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dtype != torch.uint8 or cache.dim() != 4 or cache.shape[3] != want_dim:
            raise ValueError(
                f"{name} for bits={bits} must be uint8 (num_blocks, block_size, kv_heads, "
                f"{want_dim}) (head_dim {head_dim}), got {cache.dtype} {tuple(cache.shape)}"
            )
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape"
        )
    want = (*k_cache.shape[:3], 2)
    for name, params in (("k_params", k_params), ("v_params", v_params)):
        if params.dtype != torch.float32 or tuple(params.shape) != want:
            raise ValueError(
                f"{name} must be float32 {want} (scale, zero per cache slot and head), got "
                f"{params.dtype} {tuple(params.shape)}"
            )
        if params.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dim (scale, zero adjacent)")
        if params.device != k_cache.device:
            raise ValueError(f"{name} is on {params.device}, the caches on {k_cache.device}")


def select_blocks(
    cache: torch.Tensor,
    params: torch.Tensor | None,
    bits: int,
    ids: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """cache.index_select(0, ids), dequantized to `dtype` for a quantized cache:
    (len(ids), block_size, kv_heads, head_dim)."""
    blocks = cache.index_select(0, ids)
    if bits == 0:
        return blocks
    assert params is not None
    return dequantize_kv_ref(blocks, params.index_select(0, ids), bits, dtype)


# -- Triton helpers ---------------------------------------------------------------------------


@_jit
def _quant_codes(x, zero, scale, QMAX: tl.constexpr):
    """fp32 rows x (R, C) with per-row zero, scale (R,) -> uint8 codes, as `quantize_kv_ref`."""
    y = tl.math.div_rn(x - zero[:, None], scale[:, None])
    code = tl.floor(y + 0.5)
    code = tl.minimum(tl.maximum(code, 0.0), QMAX)
    return code.to(tl.uint8)


@_jit
def _row_scale(lo, hi, QMAX: tl.constexpr):
    """Per-row scale from min and max: (hi - lo) / QMAX, 1 where that is 0."""
    scale = tl.math.div_rn(hi - lo, tl.full(lo.shape, QMAX, tl.float32))
    return tl.where(scale == 0.0, 1.0, scale)


@_jit
def _load_params(p_ptrs, key_mask, MASKED: tl.constexpr):
    """(scale, zero) per key; masked keys get 0, 0 (so their dequantized values are 0)."""
    if MASKED:
        scale = tl.load(p_ptrs, mask=key_mask, other=0.0)
        zero = tl.load(p_ptrs + 1, mask=key_mask, other=0.0)
    else:
        scale = tl.load(p_ptrs)
        zero = tl.load(p_ptrs + 1)
    return scale, zero


@_jit
def _load_dequant8(code_ptrs, p_ptrs, key_mask, MASKED: tl.constexpr):
    """int8 tile: code_ptrs (N, D) uint8, p_ptrs (N,) -> fp32 (N, D) code * scale + zero."""
    if MASKED:
        codes = tl.load(code_ptrs, mask=key_mask[:, None], other=0)
    else:
        codes = tl.load(code_ptrs)
    scale, zero = _load_params(p_ptrs, key_mask, MASKED)
    return codes.to(tl.float32) * scale[:, None] + zero[:, None]


@_jit
def _load_dequant4(code_ptrs, p_ptrs, key_mask, MASKED: tl.constexpr):
    """int4 tile: code_ptrs (N, D/2) packed bytes, p_ptrs (N,) -> fp32 halves (N, D/2) each:
    elements [0, D/2) from the low nibbles, [D/2, D) from the high ones."""
    if MASKED:
        packed = tl.load(code_ptrs, mask=key_mask[:, None], other=0)
    else:
        packed = tl.load(code_ptrs)
    scale, zero = _load_params(p_ptrs, key_mask, MASKED)
    lo = (packed & 15).to(tl.float32) * scale[:, None] + zero[:, None]
    hi = (packed >> 4).to(tl.float32) * scale[:, None] + zero[:, None]
    return lo, hi
