"""Write a step's new K/V into their paged-cache slots, quantizing them for an int8/int4 cache.

A slot < 0 marks a padding token (e.g. a padded CUDA-graph batch): it is skipped. Cache offsets
are computed in int64, since slot * stride passes 2^31 elements in caches of 1M tokens.
With bits 8 or 4 each (token, kv head) vector is quantized on the fly (`kernels/kv_quant.py`):
codes go to the uint8 caches, (scale, zero) to k_params / v_params at the same slot.
"""

from __future__ import annotations

from typing import Any

import torch

from kernels.dispatch import use_triton
from kernels.kv_quant import _quant_codes, _row_scale, check_quant_caches, quantize_kv_ref

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: only the torch reference runs
    triton = None  # type: ignore[assignment]


def _jit(fn: Any) -> Any:
    return triton.jit(fn) if triton is not None else fn


@_jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    kv_heads,
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_block,
    stride_vc_slot,
    stride_vc_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    if slot >= 0:
        block = slot // BLOCK_SIZE
        in_block = slot % BLOCK_SIZE
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h < kv_heads)[:, None] & (offs_d < HEAD_DIM)[None, :]
        tile = offs_d[None, :]
        k = tl.load(k_ptr + tok * stride_k_tok + offs_h[:, None] * stride_k_head + tile, mask=mask)
        v = tl.load(v_ptr + tok * stride_v_tok + offs_h[:, None] * stride_v_head + tile, mask=mask)
        kc = k_cache_ptr + block * stride_kc_block + in_block * stride_kc_slot
        vc = v_cache_ptr + block * stride_vc_block + in_block * stride_vc_slot
        tl.store(kc + offs_h[:, None] * stride_kc_head + tile, k, mask=mask)
        tl.store(vc + offs_h[:, None] * stride_vc_head + tile, v, mask=mask)


@_jit
def _quantize_heads(
    x_base,
    stride_x_head,
    code_base,
    stride_c_head,
    param_base,
    stride_p_head,
    kv_heads,
    CODE_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BITS: tl.constexpr,
    QMAX: tl.constexpr,
):
    """Quantize one token's kv_heads head vectors and store codes and (scale, zero).

    int8: codes (BLOCK_H, CODE_D = head_dim). int4: the two halves of each vector load as two
    (BLOCK_H, CODE_D = head_dim / 2) tiles, whose codes share a byte (low nibble: first half).
    """
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_h < kv_heads
    mask = rows[:, None] & (offs_d < CODE_D)[None, :]
    x_ptrs = x_base + offs_h[:, None] * stride_x_head + offs_d[None, :]
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    lo = tl.min(tl.where(mask, x, float("inf")), 1)
    hi = tl.max(tl.where(mask, x, float("-inf")), 1)
    if BITS == 4:
        x_hi = tl.load(x_ptrs + CODE_D, mask=mask, other=0.0).to(tl.float32)
        lo = tl.minimum(lo, tl.min(tl.where(mask, x_hi, float("inf")), 1))
        hi = tl.maximum(hi, tl.max(tl.where(mask, x_hi, float("-inf")), 1))
    lo = tl.where(rows, lo, 0.0)  # padding rows: finite, never stored
    hi = tl.where(rows, hi, 0.0)
    scale = _row_scale(lo, hi, QMAX)
    codes = _quant_codes(x, lo, scale, QMAX)
    if BITS == 4:
        codes = codes | (_quant_codes(x_hi, lo, scale, QMAX) << 4).to(tl.uint8)
    tl.store(code_base + offs_h[:, None] * stride_c_head + offs_d[None, :], codes, mask=mask)
    p_ptrs = param_base + offs_h * stride_p_head
    tl.store(p_ptrs, scale, mask=rows)
    tl.store(p_ptrs + 1, lo, mask=rows)


@_jit
def _store_kv_quant_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_param_ptr,
    v_param_ptr,
    slot_mapping_ptr,
    kv_heads,
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_block,
    stride_vc_slot,
    stride_vc_head,
    stride_kp_block,
    stride_kp_slot,
    stride_kp_head,
    stride_vp_block,
    stride_vp_slot,
    stride_vp_head,
    CODE_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BITS: tl.constexpr,
    QMAX: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    if slot >= 0:
        block = slot // BLOCK_SIZE
        in_block = slot % BLOCK_SIZE
        _quantize_heads(
            k_ptr + tok * stride_k_tok,
            stride_k_head,
            k_cache_ptr + block * stride_kc_block + in_block * stride_kc_slot,
            stride_kc_head,
            k_param_ptr + block * stride_kp_block + in_block * stride_kp_slot,
            stride_kp_head,
            kv_heads,
            CODE_D,
            BLOCK_H,
            BLOCK_D,
            BITS,
            QMAX,
        )
        _quantize_heads(
            v_ptr + tok * stride_v_tok,
            stride_v_head,
            v_cache_ptr + block * stride_vc_block + in_block * stride_vc_slot,
            stride_vc_head,
            v_param_ptr + block * stride_vp_block + in_block * stride_vp_slot,
            stride_vp_head,
            kv_heads,
            CODE_D,
            BLOCK_H,
            BLOCK_D,
            BITS,
            QMAX,
        )


def store_kv_triton(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_params: torch.Tensor | None = None,
    v_params: torch.Tensor | None = None,
    bits: int = 0,
) -> None:
    """Triton twin of `store_kv_ref`; writes the caches (and params) in place.

    k, v: (tokens, kv_heads, head_dim) with a contiguous last dim, any token/head strides.
    k_cache, v_cache: (num_blocks, block_size, kv_heads, head_dim) in k's dtype for bits=0;
    uint8 codes (num_blocks, block_size, kv_heads, code_dim) for bits 8/4, with k_params,
    v_params float32 (num_blocks, block_size, kv_heads, 2); contiguous last dims.
    slot_mapping: (tokens,) int64 (int32 accepted); slots < 0 are skipped.
    """
    _check_inputs(k, v, k_cache, v_cache, slot_mapping, k_params, v_params, bits)
    tokens, kv_heads, head_dim = k.shape
    if tokens == 0:
        return
    if bits == 0:
        _store_kv_kernel[(tokens,)](
            k,
            v,
            k_cache,
            v_cache,
            slot_mapping,
            kv_heads,
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            v_cache.stride(0),
            v_cache.stride(1),
            v_cache.stride(2),
            HEAD_DIM=head_dim,
            BLOCK_SIZE=k_cache.shape[1],
            BLOCK_H=triton.next_power_of_2(kv_heads),
            BLOCK_D=triton.next_power_of_2(head_dim),
            num_warps=4,
        )
        return
    assert k_params is not None and v_params is not None
    cdim = k_cache.shape[3]
    _store_kv_quant_kernel[(tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        k_params,
        v_params,
        slot_mapping,
        kv_heads,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        k_params.stride(0),
        k_params.stride(1),
        k_params.stride(2),
        v_params.stride(0),
        v_params.stride(1),
        v_params.stride(2),
        CODE_D=cdim,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(kv_heads),
        BLOCK_D=triton.next_power_of_2(cdim),
        BITS=bits,
        QMAX=float((1 << bits) - 1),
        num_warps=4,
    )


def _check_inputs(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_params: torch.Tensor | None = None,
    v_params: torch.Tensor | None = None,
    bits: int = 0,
) -> None:
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(
            f"k and v must be equal (tokens, kv_heads, head_dim), got {k.shape}, {v.shape}"
        )
    _, kv_heads, head_dim = k.shape
    check_quant_caches(k_cache, v_cache, k_params, v_params, bits, head_dim)
    if bits == 0:
        if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[2:] != k.shape[1:]:
            raise ValueError(
                f"caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)} must be equal "
                f"(num_blocks, block_size, {kv_heads}, {head_dim})"
            )
        if not (k.dtype == v.dtype == k_cache.dtype == v_cache.dtype):
            raise ValueError(
                f"k, v, k_cache, v_cache dtypes differ: {k.dtype}, {v.dtype}, "
                f"{k_cache.dtype}, {v_cache.dtype}"
            )
    else:
        if k_cache.shape[2] != kv_heads:
            raise ValueError(
                f"caches {tuple(k_cache.shape)} hold {k_cache.shape[2]} kv heads, k {kv_heads}"
            )
        if k.dtype != v.dtype or k.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(
                f"k and v must share fp16/bf16/fp32 to quantize, got {k.dtype}, {v.dtype}"
            )
    if any(t.stride(-1) != 1 for t in (k, v, k_cache, v_cache)):
        raise ValueError("k, v and the caches need a contiguous last dim")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"slot_mapping must be ({k.shape[0]},) int64, got {tuple(slot_mapping.shape)} "
            f"{slot_mapping.dtype}"
        )


def store_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_params: torch.Tensor | None = None,
    v_params: torch.Tensor | None = None,
    bits: int = 0,
) -> None:
    """k, v: (tokens, kv_heads, head_dim); caches: (num_blocks, block_size, kv_heads, head_dim).

    slot_mapping: (tokens,) int64, slot = block_id * block_size + offset in block; tokens with a
    slot < 0 (padding) are not written.
    bits 8/4: the caches hold uint8 codes (num_blocks, block_size, kv_heads, code_dim) and
    k_params / v_params float32 (num_blocks, block_size, kv_heads, 2) get (scale, zero) of each
    (token, head) at its slot (`kernels.kv_quant.quantize_kv_ref`).
    """
    if bits != 0:
        _check_inputs(k, v, k_cache, v_cache, slot_mapping, k_params, v_params, bits)
    elif k_params is not None or v_params is not None:
        raise ValueError("k_params / v_params are given but bits=0 (an unquantized cache)")
    num_blocks, block_size, kv_heads, cdim = k_cache.shape
    valid = slot_mapping >= 0  # boolean indexing syncs on CUDA; the reference is not fast
    slots = slot_mapping[valid]
    if bits == 0:
        k_cache.view(num_blocks * block_size, kv_heads, cdim)[slots] = k[valid]
        v_cache.view(num_blocks * block_size, kv_heads, cdim)[slots] = v[valid]
        return
    assert k_params is not None and v_params is not None
    for x, cache, params in ((k, k_cache, k_params), (v, v_cache, v_params)):
        codes, p = quantize_kv_ref(x[valid], bits)
        cache.view(num_blocks * block_size, kv_heads, cdim)[slots] = codes
        params.view(num_blocks * block_size, kv_heads, 2)[slots] = p


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_params: torch.Tensor | None = None,
    v_params: torch.Tensor | None = None,
    bits: int = 0,
) -> None:
    """Write k, v at their slots; bits 8/4 quantize them into uint8 caches + fp32 params."""
    if use_triton(k.device):
        store_kv_triton(k, v, k_cache, v_cache, slot_mapping, k_params, v_params, bits)
    else:
        store_kv_ref(k, v, k_cache, v_cache, slot_mapping, k_params, v_params, bits)
