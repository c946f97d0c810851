"""Write a step's new K/V into their paged-cache slots.

A slot < 0 marks a padding token (e.g. a padded CUDA-graph batch): it is skipped. Cache offsets
are computed in int64, since slot * stride passes 2^31 elements in caches of 1M tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from kernels.dispatch import use_triton

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


def store_kv_triton(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Triton twin of `store_kv_ref`; writes the caches in place.

    k, v: (tokens, kv_heads, head_dim) with a contiguous last dim, any token/head strides.
    k_cache, v_cache: (num_blocks, block_size, kv_heads, head_dim) with a contiguous last dim.
    slot_mapping: (tokens,) int64 (int32 accepted); slots < 0 are skipped.
    """
    _check_inputs(k, v, k_cache, v_cache, slot_mapping)
    tokens, kv_heads, head_dim = k.shape
    if tokens == 0:
        return
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


def _check_inputs(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(
            f"k and v must be equal (tokens, kv_heads, head_dim), got {k.shape}, {v.shape}"
        )
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(
            f"caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)} must be equal "
            f"(num_blocks, block_size, {k.shape[1]}, {k.shape[2]})"
        )
    if not (k.dtype == v.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(
            f"k, v, k_cache, v_cache dtypes differ: {k.dtype}, {v.dtype}, "
            f"{k_cache.dtype}, {v_cache.dtype}"
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
) -> None:
    """k, v: (tokens, kv_heads, head_dim); caches: (num_blocks, block_size, kv_heads, head_dim).

    slot_mapping: (tokens,) int64, slot = block_id * block_size + offset in block; tokens with a
    slot < 0 (padding) are not written.
    """
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    valid = slot_mapping >= 0  # boolean indexing syncs on CUDA; the reference is not fast
    slots = slot_mapping[valid]
    k_cache.view(num_blocks * block_size, kv_heads, head_dim)[slots] = k[valid]
    v_cache.view(num_blocks * block_size, kv_heads, head_dim)[slots] = v[valid]


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    if use_triton(k.device):
        store_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        store_kv_ref(k, v, k_cache, v_cache, slot_mapping)
