"""RoPE and the KV-cache store in one pass, for a float (unquantized) paged cache.

A layer's attention otherwise launches two kernels before it reads the cache: the rotary
kernel (rotated q and k written out) and the store (k and v copied to their slots). Here one
program per token computes its angles once, rotates its query heads into a new q, and writes
its rotated key heads and its value heads straight into the token's cache slot: one launch
per layer instead of two, and the rotated keys never make a round trip through memory.

`rotary_store_ref` is the twin: `rotary_ref` then `store_kv_ref`, bit for bit what the separate
kernels compute (same fp32 angle and rotation formulas; a slot < 0 is a padding token whose
k/v are not stored).
"""

from __future__ import annotations

import torch

from kernels.dispatch import use_triton
from kernels.rotary import (
    TILE_ELEMENTS,
    _check_inputs,
    _jit,
    _rotate_heads,
    _token_angles,
    rotary_ref,
)
from kernels.store_kv import store_kv_ref

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: only the torch reference runs
    triton = None  # type: ignore[assignment]


@_jit
def _copy_heads(
    x_ptr,
    out_ptr,
    num_heads,
    stride_x_head,
    stride_out_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Copy one token's head vectors; x_ptr, out_ptr point at the token's first head."""
    offs_d = tl.arange(0, BLOCK_D)
    for h0 in range(0, num_heads, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask = (offs_h < num_heads)[:, None] & (offs_d < HEAD_DIM)[None, :]
        x = tl.load(x_ptr + offs_h[:, None] * stride_x_head + offs_d[None, :], mask=mask)
        tl.store(out_ptr + offs_h[:, None] * stride_out_head + offs_d[None, :], x, mask=mask)


@_jit
def _rotary_store_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    positions_ptr,
    inv_freq_ptr,
    slot_mapping_ptr,
    q_out_ptr,
    k_cache_ptr,
    v_cache_ptr,
    q_heads,
    kv_heads,
    stride_inv_tok,
    stride_q_tok,
    stride_q_head,
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    stride_qo_tok,
    stride_qo_head,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_block,
    stride_vc_slot,
    stride_vc_head,
    HALF: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HV: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    cos, sin = _token_angles(positions_ptr, inv_freq_ptr, tok, stride_inv_tok, HALF, BLOCK_D)
    _rotate_heads(
        q_ptr + tok * stride_q_tok,
        q_out_ptr + tok * stride_qo_tok,
        q_heads,
        stride_q_head,
        stride_qo_head,
        cos,
        sin,
        HALF,
        BLOCK_D,
        BLOCK_HQ,
    )
    # Slot offsets in int64: slot * stride passes 2^31 elements in caches of 1M tokens.
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    if slot >= 0:
        block = slot // BLOCK_SIZE
        in_block = slot % BLOCK_SIZE
        _rotate_heads(
            k_ptr + tok * stride_k_tok,
            k_cache_ptr + block * stride_kc_block + in_block * stride_kc_slot,
            kv_heads,
            stride_k_head,
            stride_kc_head,
            cos,
            sin,
            HALF,
            BLOCK_D,
            BLOCK_HK,
        )
        _copy_heads(
            v_ptr + tok * stride_v_tok,
            v_cache_ptr + block * stride_vc_block + in_block * stride_vc_slot,
            kv_heads,
            stride_v_head,
            stride_vc_head,
            HEAD_DIM,
            BLOCK_DV,
            BLOCK_HV,
        )


def rotary_store_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """Triton twin of `rotary_store_ref`: returns the rotated q (new, contiguous) and writes the
    rotated k and v into the caches in place.

    q: (tokens, q_heads, head_dim), k, v: (tokens, kv_heads, head_dim), contiguous last dims,
    any token/head strides (views into a fused qkv output). positions: (tokens,) integer;
    inv_freq: (head_dim // 2,) fp32, or (tokens, head_dim // 2), a row per token. k_cache,
    v_cache: (num_blocks, block_size, kv_heads, head_dim) in k's dtype, contiguous last dims.
    slot_mapping: (tokens,) integer; slots < 0 are padding, not stored.
    """
    _check_inputs(q, k, positions, inv_freq)
    _check_cache(k, v, k_cache, v_cache, slot_mapping)
    tokens, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if tokens == 0:
        return q_out
    half = head_dim // 2
    block_d = triton.next_power_of_2(half)
    block_dv = triton.next_power_of_2(head_dim)
    max_heads = max(TILE_ELEMENTS // block_d, 1)
    _rotary_store_kernel[(tokens,)](
        q,
        k,
        v,
        positions,
        inv_freq,
        slot_mapping,
        q_out,
        k_cache,
        v_cache,
        q_heads,
        kv_heads,
        inv_freq.stride(0) if inv_freq.dim() == 2 else 0,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        q_out.stride(0),
        q_out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        HALF=half,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        BLOCK_HQ=min(triton.next_power_of_2(q_heads), max_heads),
        BLOCK_HK=min(triton.next_power_of_2(kv_heads), max_heads),
        BLOCK_HV=min(triton.next_power_of_2(kv_heads), max(TILE_ELEMENTS // block_dv, 1)),
        num_warps=4,
    )
    return q_out


def _check_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    tokens, kv_heads, head_dim = k.shape
    if v.shape != k.shape or v.dtype != k.dtype or v.stride(-1) != 1:
        raise ValueError(
            f"v must match k {tuple(k.shape)} {k.dtype} with a contiguous last dim, got "
            f"{tuple(v.shape)} {v.dtype} strides {v.stride()}"
        )
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if (
            cache.dim() != 4
            or cache.shape[2:] != (kv_heads, head_dim)
            or cache.dtype != k.dtype
            or cache.stride(-1) != 1
        ):
            raise ValueError(
                f"{name} must be (num_blocks, block_size, {kv_heads}, {head_dim}) {k.dtype} with "
                f"a contiguous last dim, got {tuple(cache.shape)} {cache.dtype}"
            )
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ"
        )
    if slot_mapping.shape != (tokens,) or slot_mapping.dtype.is_floating_point:
        raise ValueError(
            f"slot_mapping must be ({tokens},) integer, got {tuple(slot_mapping.shape)} "
            f"{slot_mapping.dtype}"
        )


def rotary_store_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """Rotate q and k (`rotary_ref`), store the rotated k and v (`store_kv_ref`); the rotated
    q."""
    q_out, k_out = rotary_ref(q, k, positions, inv_freq)
    store_kv_ref(k_out, v, k_cache, v_cache, slot_mapping)
    return q_out


def rotary_store(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    if use_triton(q.device):
        return rotary_store_triton(q, k, v, positions, inv_freq, k_cache, v_cache, slot_mapping)
    return rotary_store_ref(q, k, v, positions, inv_freq, k_cache, v_cache, slot_mapping)
