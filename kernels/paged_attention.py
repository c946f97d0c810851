"""Causal attention of packed query tokens over a paged KV cache, with GQA and optional LSE.

Query token i of sequence b sits at absolute position context_lens[b] - q_len_b + i and sees
every cached key at a position <= its own (the step's own K/V are stored before the call). With a
sliding window W > 0 (`window=`, as Mistral v0.1 or Phi-3-mini-4k) a query at position p sees
only the keys at positions p - W < k <= p; window 0 is none.

Quantized caches (bits 8 / 4, `kernels/kv_quant.py`): the caches hold uint8 codes and k_params /
v_params the fp32 (scale, zero) of every (block, slot, kv head); the kernel dequantizes each key
tile on load into q's dtype and the reference dequantizes the blocks it gathers, so both compute
attention over the dequantized cache.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from kernels.dispatch import use_triton
from kernels.flash_attn import (
    LOG2E,
    _jit,
    _online_softmax_tile,
    _online_softmax_tile_halves,
    _store_rows,
    attention_config,
    check_head_dim,
    check_window,
    is_interpreting,
)
from kernels.kv_quant import (
    _load_dequant4,
    _load_dequant8,
    check_quant_caches,
    code_dim,
    select_blocks,
)
from kernels.position_attention import (
    attend_tile,
    check_softcap,
    merge_pair,
    position_attention_ref,
    soft_cap,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: only the torch reference runs
    triton = None  # type: ignore[assignment]


@_jit
def _paged_kv_slots(
    table_ptr,
    start_n,
    offs_n,
    ctx,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_N: tl.constexpr,
):
    """(cache block, slot in block), both int64, of keys start_n + offs_n, read through a block
    table row; the block is a scalar when the key tile lies inside one cache block.

    A key tile inside one cache block costs one table load; smaller blocks gather per key.
    MASK_N: the tile may reach past ctx, whose table entries may lie past the row's end.
    """
    if BLOCK_SIZE % BLOCK_N == 0:
        block = tl.load(table_ptr + start_n // BLOCK_SIZE).to(tl.int64)
        return block, (start_n % BLOCK_SIZE + offs_n).to(tl.int64)
    else:
        keys = start_n + offs_n
        if MASK_N:
            block = tl.load(table_ptr + keys // BLOCK_SIZE, mask=keys < ctx, other=0)
        else:
            block = tl.load(table_ptr + keys // BLOCK_SIZE)
        return block.to(tl.int64), (keys % BLOCK_SIZE).to(tl.int64)


@_jit
def _paged_kv_step(
    acc,
    acc_b,
    l_i,
    m_i,
    q,
    q_b,
    k_base,
    v_base,
    kp_base,
    vp_base,
    table,
    start_n,
    offs_n,
    ctx,
    key_mask,
    keep,
    scale_log2,
    softcap_c,
    stride_kc_block,
    stride_kc_tok,
    stride_kp_block,
    stride_kp_tok,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_N: tl.constexpr,
    MASKED: tl.constexpr,
    BITS: tl.constexpr,
    DOT_F32: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """Load the key tile [start_n, start_n + BLOCK_N) of a paged cache and fold it into the
    running (acc, l, m), dequantizing codes on load for BITS 8 / 4.

    k_base, v_base: (1, TILE_D) code/element pointers of the kv head at slot 0 of block 0;
    kp_base, vp_base: scalar pointers to its (scale, zero) (unused for BITS 0).
    MASK_N: key_mask (BLOCK_N,) marks the keys to load (others read as 0); MASKED: keep (M, N)
    marks the visible (row, key) pairs. Dequantized K/V take q's dtype, as the torch reference's.
    BITS 4: q, acc hold the first half of head_dim, q_b, acc_b the second; otherwise acc_b and
    q_b are unused and acc_b comes back unchanged.
    """
    block, slot = _paged_kv_slots(table, start_n, offs_n, ctx, BLOCK_SIZE, BLOCK_N, MASK_N)
    kv = (block * stride_kc_block + slot * stride_kc_tok)[:, None]
    if BITS == 4:
        pv = block * stride_kp_block + slot * stride_kp_tok
        k_a, k_b = _load_dequant4(k_base + kv, kp_base + pv, key_mask, MASK_N)
        v_a, v_b = _load_dequant4(v_base + kv, vp_base + pv, key_mask, MASK_N)
        acc, acc_b, l_i, m_i = _online_softmax_tile_halves(
            acc,
            acc_b,
            l_i,
            m_i,
            q,
            q_b,
            k_a.to(q.dtype),
            k_b.to(q.dtype),
            v_a.to(q.dtype),
            v_b.to(q.dtype),
            keep,
            scale_log2,
            MASKED=MASKED,
            DOT_F32=DOT_F32,
            SOFTCAP=SOFTCAP,
            softcap_c=softcap_c,
        )
    else:
        if BITS == 0:
            if MASK_N:
                k = tl.load(k_base + kv, mask=key_mask[:, None], other=0.0)
                v = tl.load(v_base + kv, mask=key_mask[:, None], other=0.0)
            else:
                k = tl.load(k_base + kv)
                v = tl.load(v_base + kv)
        else:
            pv = block * stride_kp_block + slot * stride_kp_tok
            k = _load_dequant8(k_base + kv, kp_base + pv, key_mask, MASK_N).to(q.dtype)
            v = _load_dequant8(v_base + kv, vp_base + pv, key_mask, MASK_N).to(q.dtype)
        acc, l_i, m_i = _online_softmax_tile(
            acc,
            l_i,
            m_i,
            q,
            k,
            v,
            keep,
            scale_log2,
            MASKED=MASKED,
            DOT_F32=DOT_F32,
            SOFTCAP=SOFTCAP,
            softcap_c=softcap_c,
        )
    return acc, acc_b, l_i, m_i


@_jit
def _paged_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_param_ptr,
    v_param_ptr,
    out_ptr,
    lse_ptr,
    block_tables_ptr,
    cu_seqlens_q_ptr,
    context_lens_ptr,
    work_ptr,
    scale_log2,
    softcap_c,
    num_work,
    stride_q_tok,
    stride_q_head,
    stride_kc_block,
    stride_kc_tok,
    stride_kc_head,
    stride_kp_block,
    stride_kp_tok,
    stride_kp_head,
    stride_o_tok,
    stride_o_head,
    stride_lse_tok,
    stride_bt_seq,
    window,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    TILE_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STORE_LSE: tl.constexpr,
    DOT_F32: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BITS: tl.constexpr,
    WINDOW: tl.constexpr,
):
    """TILE_D: head_dim, or head_dim / 2 for BITS 4 (each row's two halves go separately).
    WINDOW: a row at position p sees only keys above p - window (window > 0); without it the
    `window` argument is never read."""
    TOKENS: tl.constexpr = BLOCK_M // GROUP
    pid = tl.program_id(0)
    kv_head = pid % NUM_KV_HEADS
    # Work items run last first: the last query tiles of a sequence have the most keys.
    work = num_work - 1 - pid // NUM_KV_HEADS
    seq = tl.load(work_ptr + 2 * work)
    m_start = tl.load(work_ptr + 2 * work + 1)
    q_lo = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_lo
    if m_start >= q_len:
        return
    ctx = tl.load(context_lens_ptr + seq)
    q_offset = ctx - q_len  # position of the sequence's first query token

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, TILE_D)
    tok = m_start + offs_m // GROUP  # (BLOCK_M,) token within the sequence
    head = kv_head * GROUP + offs_m % GROUP
    row_mask = (offs_m < TOKENS * GROUP) & (tok < q_len)
    row64 = (q_lo + tok).to(tl.int64)
    q_ptrs = q_ptr + row64[:, None] * stride_q_tok + (head * stride_q_head)[:, None]
    q = tl.load(q_ptrs + offs_d[None, :], mask=row_mask[:, None], other=0.0)
    acc = tl.zeros([BLOCK_M, TILE_D], dtype=tl.float32)
    if BITS == 4:
        q_b = tl.load(q_ptrs + TILE_D + offs_d[None, :], mask=row_mask[:, None], other=0.0)
        acc_b = tl.zeros([BLOCK_M, TILE_D], dtype=tl.float32)
    else:  # unused
        q_b = q
        acc_b = acc
    pos = q_offset + tok

    # Keys [0, lo) are seen by every row of the tile, keys [lo, hi) by some; hi <= ctx.
    lo = q_offset + m_start + 1
    hi = q_offset + tl.minimum(m_start + TOKENS, q_len)
    interior_end = (lo // BLOCK_N) * BLOCK_N
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    k_base = k_cache_ptr + kv_head * stride_kc_head + offs_d[None, :]
    v_base = v_cache_ptr + kv_head * stride_kc_head + offs_d[None, :]
    kp_base = k_param_ptr + kv_head * stride_kp_head
    vp_base = v_param_ptr + kv_head * stride_kp_head
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    if WINDOW:
        # Row p sees keys (p - window, p]: keys from lo - window on are seen by some row of the
        # tile, keys [hi - window, lo) by every row. Tiles wholly below the first are skipped,
        # tiles wholly inside the second run unmasked, the tiles on both edges are masked (and
        # load no key below the first).
        first = tl.maximum(lo - window, 0)
        full_lo = tl.cdiv(tl.maximum(hi - window, 0), BLOCK_N) * BLOCK_N
        mid = tl.minimum(full_lo, interior_end)
        span = tl.cast(window, tl.uint32)
        reach = (ctx - first).to(tl.uint32)  # keys [first, ctx) load, the others read as 0
        for start_n in range((first // BLOCK_N) * BLOCK_N, mid, BLOCK_N):
            keys = start_n + offs_n
            # 0 <= pos - key < window, as one unsigned comparison
            in_window = (pos[:, None] - keys[None, :]).to(tl.uint32) < span
            acc, acc_b, l_i, m_i = _paged_kv_step(
                acc,
                acc_b,
                l_i,
                m_i,
                q,
                q_b,
                k_base,
                v_base,
                kp_base,
                vp_base,
                table,
                start_n,
                offs_n,
                ctx,
                (keys - first).to(tl.uint32) < reach,
                in_window,
                scale_log2,
                softcap_c,
                stride_kc_block,
                stride_kc_tok,
                stride_kp_block,
                stride_kp_tok,
                BLOCK_SIZE,
                BLOCK_N,
                MASK_N=True,
                MASKED=True,
                BITS=BITS,
                DOT_F32=DOT_F32,
                SOFTCAP=SOFTCAP,
            )
        for start_n in range(mid, interior_end, BLOCK_N):
            acc, acc_b, l_i, m_i = _paged_kv_step(
                acc,
                acc_b,
                l_i,
                m_i,
                q,
                q_b,
                k_base,
                v_base,
                kp_base,
                vp_base,
                table,
                start_n,
                offs_n,
                ctx,
                None,
                None,
                scale_log2,
                softcap_c,
                stride_kc_block,
                stride_kc_tok,
                stride_kp_block,
                stride_kp_tok,
                BLOCK_SIZE,
                BLOCK_N,
                MASK_N=False,
                MASKED=False,
                BITS=BITS,
                DOT_F32=DOT_F32,
                SOFTCAP=SOFTCAP,
            )
        for start_n in range(interior_end, hi, BLOCK_N):
            keys = start_n + offs_n
            # 0 <= pos - key < window, as one unsigned comparison
            in_window = (pos[:, None] - keys[None, :]).to(tl.uint32) < span
            acc, acc_b, l_i, m_i = _paged_kv_step(
                acc,
                acc_b,
                l_i,
                m_i,
                q,
                q_b,
                k_base,
                v_base,
                kp_base,
                vp_base,
                table,
                start_n,
                offs_n,
                ctx,
                (keys - first).to(tl.uint32) < reach,
                in_window,
                scale_log2,
                softcap_c,
                stride_kc_block,
                stride_kc_tok,
                stride_kp_block,
                stride_kp_tok,
                BLOCK_SIZE,
                BLOCK_N,
                MASK_N=True,
                MASKED=True,
                BITS=BITS,
                DOT_F32=DOT_F32,
                SOFTCAP=SOFTCAP,
            )
    else:
        for start_n in range(0, interior_end, BLOCK_N):
            acc, acc_b, l_i, m_i = _paged_kv_step(
                acc,
                acc_b,
                l_i,
                m_i,
                q,
                q_b,
                k_base,
                v_base,
                kp_base,
                vp_base,
                table,
                start_n,
                offs_n,
                ctx,
                None,
                None,
                scale_log2,
                softcap_c,
                stride_kc_block,
                stride_kc_tok,
                stride_kp_block,
                stride_kp_tok,
                BLOCK_SIZE,
                BLOCK_N,
                MASK_N=False,
                MASKED=False,
                BITS=BITS,
                DOT_F32=DOT_F32,
                SOFTCAP=SOFTCAP,
            )
        for start_n in range(interior_end, hi, BLOCK_N):
            keys = start_n + offs_n
            acc, acc_b, l_i, m_i = _paged_kv_step(
                acc,
                acc_b,
                l_i,
                m_i,
                q,
                q_b,
                k_base,
                v_base,
                kp_base,
                vp_base,
                table,
                start_n,
                offs_n,
                ctx,
                keys < ctx,
                keys[None, :] <= pos[:, None],
                scale_log2,
                softcap_c,
                stride_kc_block,
                stride_kc_tok,
                stride_kp_block,
                stride_kp_tok,
                BLOCK_SIZE,
                BLOCK_N,
                MASK_N=True,
                MASKED=True,
                BITS=BITS,
                DOT_F32=DOT_F32,
                SOFTCAP=SOFTCAP,
            )

    out_ptrs = out_ptr + row64[:, None] * stride_o_tok + (head * stride_o_head)[:, None]
    lse_ptrs = lse_ptr + row64 * stride_lse_tok + head
    _store_rows(out_ptrs + offs_d[None, :], lse_ptrs, acc, l_i, m_i, row_mask, STORE_LSE)
    if BITS == 4:
        _store_rows(out_ptrs + TILE_D + offs_d[None, :], lse_ptrs, acc_b, l_i, m_i, row_mask, False)


def check_paged_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    k_params: torch.Tensor | None = None,
    v_params: torch.Tensor | None = None,
    bits: int = 0,
) -> int:
    """Check what the paged kernels assume; return the GQA group size."""
    q_heads, head_dim = q.shape[1], q.shape[2]
    check_quant_caches(k_cache, v_cache, k_params, v_params, bits, head_dim)
    if bits == 0 and (q.dtype != k_cache.dtype or q.dtype != v_cache.dtype):
        raise ValueError(
            f"q, k_cache, v_cache dtypes differ: {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the Triton attention kernels take fp16/bf16/fp32, got {q.dtype}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError(
            "k_cache and v_cache must be (num_blocks, block_size, kv_heads, head_dim) with equal "
            f"shapes and strides, got {tuple(k_cache.shape)} / {tuple(v_cache.shape)}"
        )
    if k_params is not None and v_params is not None and k_params.stride() != v_params.stride():
        raise ValueError("k_params and v_params need equal strides")
    kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != code_dim(head_dim, bits) or q_heads % kv_heads:
        raise ValueError(
            f"q {tuple(q.shape)} does not fit a cache of {tuple(k_cache.shape)} (bits={bits})"
        )
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError("q and the caches need a contiguous last (head_dim) dimension")
    if block_tables.dtype not in (torch.int32, torch.int64) or block_tables.stride(-1) != 1:
        raise ValueError(
            f"block_tables must be int32/int64 with unit row stride, got {block_tables.dtype}"
        )
    if context_lens.dtype not in (torch.int32, torch.int64) or not context_lens.is_contiguous():
        raise ValueError(f"context_lens must be contiguous int32/int64, got {context_lens.dtype}")
    check_head_dim(head_dim)
    if bits == 4 and head_dim < 32:
        raise ValueError(
            f"the Triton kernels need head_dim >= 32 for an int4 cache (two dots of head_dim / 2 "
            f">= 16), got {head_dim}; set DIST_RUNTIME_KERNELS=torch to use the reference"
        )
    return q_heads // kv_heads


def quant_kernel_args(
    k_cache: torch.Tensor,
    k_params: torch.Tensor | None,
    v_params: torch.Tensor | None,
    bits: int,
) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """(k_param_ptr, v_param_ptr, stride_block, stride_slot, stride_head) of a kernel launch;
    for bits 0 the cache stands in for the params, which the kernel never reads."""
    if bits == 0 or k_params is None or v_params is None:
        return k_cache, k_cache, 0, 0, 0
    return k_params, v_params, k_params.stride(0), k_params.stride(1), k_params.stride(2)


def _work_items(cu_seqlens_q: torch.Tensor, tokens_per_tile: int, num_tokens: int) -> torch.Tensor:
    """(num_work, 2) int32 (sequence, first query token) per query tile, built on the device.

    num_work = num_tokens // tokens_per_tile + batch bounds the true count (sum of ceil(q_len / T))
    without a host sync; the spare items start past their sequence's end and exit at once.
    """
    batch = cu_seqlens_q.numel() - 1
    q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]  # (batch,)
    tiles = (q_lens + tokens_per_tile - 1) // tokens_per_tile
    ends = torch.cumsum(tiles, 0)  # (batch,) tile index past each sequence's last
    work = torch.arange(num_tokens // tokens_per_tile + batch, device=cu_seqlens_q.device)
    seq = torch.searchsorted(ends, work, right=True).clamp_max(batch - 1)
    start = (work - (ends - tiles)[seq]) * tokens_per_tile
    return torch.stack([seq, start], dim=1).to(torch.int32)


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    return_lse: bool = False,
    k_params: torch.Tensor | None = None,
    v_params: torch.Tensor | None = None,
    bits: int = 0,
    window: int = 0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton twin of `paged_attention_ref`; same shapes and dtypes.

    Grid: one program per (query tile, kv head); a tile holds BLOCK_M // group tokens of one
    sequence times the group query heads of that kv head, so they share every K/V load. Key tiles
    wholly below the tile's first position run unmasked; tiles past its last position are skipped.
    With a sliding window, tiles wholly below every row's window are skipped too, only the tiles
    every row sees whole run unmasked, and the tiles on the window's lower edge are masked as
    the diagonal's are. A window at least the block table's width (block_size * max_blocks) hides
    no key, and the kernel compiles without it.
    No host sync: the tile map is built on the device.
    """
    group = check_paged_inputs(
        q, k_cache, v_cache, block_tables, context_lens, k_params, v_params, bits
    )
    check_window(window)
    check_softcap(softcap)
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    num_tokens, q_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(num_tokens, q_heads, dtype=torch.float32, device=q.device)
    batch = block_tables.shape[0]
    if num_tokens == 0 or batch == 0:
        return out, (lse if return_lse else None)
    cfg = attention_config(head_dim, group, q.dtype, q.device, bits)
    windowed = 0 < window < block_tables.shape[1] * block_size
    work = _work_items(cu_seqlens_q, cfg["BLOCK_M"] // group, num_tokens)
    k_p, v_p, stride_p_block, stride_p_slot, stride_p_head = quant_kernel_args(
        k_cache, k_params, v_params, bits
    )
    _paged_attention_kernel[(work.shape[0] * kv_heads,)](
        q,
        k_cache,
        v_cache,
        k_p,
        v_p,
        out,
        lse,
        block_tables,
        cu_seqlens_q.contiguous(),
        context_lens,
        work,
        scale * LOG2E,
        softcap / scale if softcap else 1.0,
        work.shape[0],
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        stride_p_block,
        stride_p_slot,
        stride_p_head,
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        block_tables.stride(0),
        window if windowed else 0,
        NUM_KV_HEADS=kv_heads,
        GROUP=group,
        TILE_D=head_dim // 2 if bits == 4 else head_dim,
        BLOCK_SIZE=block_size,
        STORE_LSE=return_lse,
        DOT_F32=q.dtype == torch.float32 or is_interpreting(),
        BITS=bits,
        WINDOW=windowed,
        SOFTCAP=softcap > 0,
        **cfg,
    )
    return out, (lse if return_lse else None)


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    return_lse: bool = False,
    k_params: torch.Tensor | None = None,
    v_params: torch.Tensor | None = None,
    bits: int = 0,
    window: int = 0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention for a batch of sequences.

    q: (tokens, q_heads, head_dim), sequences packed back to back.
    k_cache, v_cache: (num_blocks, block_size, kv_heads, head_dim) in q's dtype (bits=0), or
    uint8 codes (num_blocks, block_size, kv_heads, code_dim) for bits 8 / 4 with k_params,
    v_params float32 (num_blocks, block_size, kv_heads, 2) (`kernels/kv_quant.py`); gathered
    blocks are dequantized to q's dtype.
    block_tables: (batch, max_blocks) int32/int64, padded with any valid block id.
    cu_seqlens_q: (batch + 1,) int64 prefix sums of query lengths.
    context_lens: (batch,) int64 keys per sequence, including this step's tokens.
    window: a sliding window of that many keys (a query at p sees keys p - window < k <= p);
    0, or one at least the longest context, hides nothing and takes the unwindowed paths.
    softcap > 0: each scaled score s is softcap * tanh(s / softcap) (Gemma 2's soft-capping).
    Returns out: (tokens, q_heads, head_dim) in q's dtype and, when asked, the log-sum-exp of
    the scaled (and capped) scores: (tokens, q_heads) fp32.
    """
    check_quant_caches(k_cache, v_cache, k_params, v_params, bits, q.shape[-1])
    check_window(window)
    check_softcap(softcap)
    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    if q_lens and all(n == 1 for n in q_lens):
        return _decode(
            q,
            k_cache,
            v_cache,
            block_tables,
            context_lens,
            scale,
            return_lse,
            k_params=k_params,
            v_params=v_params,
            bits=bits,
            window=window,
            softcap=softcap,
        )
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device) if return_lse else None
    starts = cu_seqlens_q.tolist()
    contexts = context_lens.tolist()
    if window >= max(contexts, default=0):
        window = 0
    for b, ctx in enumerate(contexts):
        lo, hi = starts[b], starts[b + 1]
        if hi == lo:
            continue
        # The keys some query of the chunk sees: from its first position's window on.
        first = max(ctx - (hi - lo) - window + 1, 0) if window else 0
        k, v = _gather(
            k_cache, v_cache, block_tables[b], ctx, k_params, v_params, bits, q.dtype, first
        )  # (ctx - first, kv_heads, head_dim)
        o, s = _attend(q[lo:hi], k, v, scale, return_lse, window=window, softcap=softcap)
        out[lo:hi] = o
        if lse is not None and s is not None:
            lse[lo:hi] = s
    return out, lse


def _gather(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    ctx: int,
    k_params: torch.Tensor | None = None,
    v_params: torch.Tensor | None = None,
    bits: int = 0,
    dtype: torch.dtype | None = None,
    first: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A sequence's keys and values at positions [first, ctx): (ctx - first, kv_heads, head_dim)
    each; a quantized cache's dequantized to dtype. Blocks wholly before `first` are not read."""
    block_size = k_cache.shape[1]
    skip = first // block_size
    ids = block_table[skip : (ctx + block_size - 1) // block_size].long()
    # index_select, not fancy indexing: the latter is orders of magnitude slower on multi-thread
    # CPU for these small gathers.
    dt = dtype or k_cache.dtype
    keys = slice(first - skip * block_size, ctx - skip * block_size)
    k = select_blocks(k_cache, k_params, bits, ids, dt).flatten(0, 1)[keys]
    v = select_blocks(v_cache, v_params, bits, ids, dt).flatten(0, 1)[keys]
    return k, v


LARGE_SCORES = 1 << 24
"""Above this many query x key pairs, the reference attends tile by tile."""


def _flash_cpu() -> Any:
    """PyTorch's fused CPU attention that also returns the log-sum-exp (the op behind SDPA on
    CPU); None on a build without it."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


FLASH_CPU_DTYPES = (torch.float32, torch.bfloat16)
FLASH_CPU_MIN_QUERIES = 256
"""Shorter chunks (a question after a cached document) keep the masked SDPA call: two calls
and a merge cost more than the mask saves there (`bench/cpu_prefill_attention.py`)."""


def _attend_flash_cpu(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, return_lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`_attend` on CPU without a mask: the chunk's own keys (a square, causal as the kernel
    aligns it) and, for a chunk over cached keys, those keys unmasked, with every query head
    of a KV group stacked as rows of one head (no copy of K/V per query head); the two
    partials merged by log-sum-exp in float32. SDPA with the explicit bottom-right mask runs
    about 2x slower on the same work, and its dense mask takes n * ctx bytes."""
    op = _flash_cpu()
    n, q_heads, d = q.shape
    ctx, kv_heads, _ = k.shape
    group, cached = q_heads // kv_heads, ctx - n
    qh, kh, vh = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, heads, len, d)
    k_own, v_own = kh[:, :, cached:], vh[:, :, cached:]
    if group > 1:
        k_own, v_own = (t.repeat_interleave(group, dim=1) for t in (k_own, v_own))
    o_own, l_own = op(qh, k_own, v_own, 0.0, True, scale=scale)
    if not cached:
        out, lse = o_own, l_own
    else:
        rows = qh.reshape(1, kv_heads, group * n, d)
        o_pre, l_pre = op(rows, kh[:, :, :cached], vh[:, :, :cached], 0.0, False, scale=scale)
        out, lse = merge_pair(
            o_pre.reshape(1, q_heads, n, d).float(),
            l_pre.reshape(1, q_heads, n).float(),
            o_own.float(),
            l_own.float(),
        )
    o = out[0].transpose(0, 1).to(q.dtype)
    return o, (lse[0].transpose(0, 1).float() if return_lse else None)


def _visible(n: int, ctx: int, window: int, device: torch.device) -> torch.Tensor:
    """(n, ctx) bool, bottom-right aligned: query i sees keys j <= ctx - n + i, and with a
    window only those j > ctx - n + i - window."""
    mask = torch.ones(n, ctx, dtype=torch.bool, device=device).tril(diagonal=ctx - n)
    return mask.triu(diagonal=ctx - n - window + 1) if window else mask


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    return_lse: bool,
    window: int = 0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q: (n, q_heads, d) at the last n of ctx positions; k, v: (ctx, kv_heads, d).

    window > 0: query i (at ctx - n + i) sees only keys j > ctx - n + i - window; a window of
    ctx keys or more hides none and takes the unwindowed paths. softcap > 0 (scores capped
    before the softmax, which no fused kernel takes) takes the explicit-softmax paths."""
    n, q_heads, _ = q.shape
    ctx, kv_heads, _ = k.shape
    if window >= ctx:
        window = 0
    if (
        not window
        and not softcap
        and q.device.type == "cpu"
        and n >= FLASH_CPU_MIN_QUERIES
        and (n < ctx or return_lse)  # a whole prompt without the LSE: SDPA's causal call
        and q.dtype in FLASH_CPU_DTYPES
        and _flash_cpu() is not None
    ):
        return _attend_flash_cpu(q, k, v, scale, return_lse)
    if n * ctx > LARGE_SCORES:
        # A chunk over a long cached prefix: a dense mask would take n * ctx bytes (8 GiB for
        # 8K queries over 1M keys); tile it instead, masking only the tiles on the diagonal (and
        # on a window's lower edge, skipping those below it).
        positions = torch.arange(ctx, device=q.device)
        # (A windowed query tile as long as the window reads about twice its keys.)
        tile = max(window, WINDOW_MIN_Q_TILE) if window else None
        o, s = position_attention_ref(
            q, positions[ctx - n :], k, v, positions, scale, window=window, q_tile=tile,
            softcap=softcap,
        )  # fmt: skip
        return o, (s.float() if return_lse else None)
    group = q_heads // kv_heads
    if not return_lse and not softcap:
        # (1, heads, len, d): the 4-D form takes SDPA's fused CPU kernel, the 3-D one does not.
        qh, kh, vh = (t.transpose(0, 1)[None] for t in (q, k, v))
        if n == ctx and not window:  # no cached prefix: plain causal
            o = F.scaled_dot_product_attention(
                qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True
            )
        else:
            mask = _visible(n, ctx, window, q.device)
            o = F.scaled_dot_product_attention(
                qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True
            )
        return o[0].transpose(0, 1), None
    mask = _visible(n, ctx, window, q.device)
    compute = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(compute).view(n, kv_heads, group, -1).permute(1, 2, 0, 3)  # (kv_heads, group, n, d)
    scores = qg @ k.to(compute).permute(1, 2, 0)[:, None]  # (kv_heads, group, n, ctx)
    soft_cap(scores, softcap, scale).masked_fill_(~mask, float("-inf"))
    lse = None
    if return_lse:
        lse = torch.logsumexp(scores, dim=-1)  # (kv_heads, group, n)
        probs = scores.sub_(lse[..., None]).exp_()
    else:
        probs = torch.softmax(scores, dim=-1)
    o = probs @ v.to(compute).transpose(0, 1)[:, None]  # (kv_heads, group, n, d)
    o = o.permute(2, 0, 1, 3).reshape(n, q_heads, -1).to(q.dtype)
    return o, (None if lse is None else lse.permute(2, 0, 1).reshape(n, q_heads))


WINDOW_MIN_Q_TILE = 512
"""Fewest queries per tile of a long windowed chunk on the reference path."""

MIN_SHARED_BLOCKS = 4
"""Leading blocks a decode batch must share (prefix caching) to attend over them once."""


def shared_blocks(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int) -> int:
    """How many leading blocks every sequence's table holds in common, all of them full."""
    if block_tables.shape[0] < 2 or block_tables.shape[1] == 0:
        return 0
    full = int(context_lens.min().item()) // block_size
    same = (block_tables[:, :full] == block_tables[:1, :full]).all(dim=0)
    differs = (~same).nonzero()
    return full if differs.numel() == 0 else int(differs[0, 0].item())


class _DecodePlan(NamedTuple):
    """What a decode step's attention derives from its metadata, the same in every layer."""

    block_tables: torch.Tensor
    context_lens: torch.Tensor
    block_size: int
    keys: int
    """Longest context of the batch."""
    flat: torch.Tensor
    """Block ids to gather, (batch * blocks,), from the block holding key `start` on."""
    ids_shape: tuple[int, int]
    valid: torch.Tensor | None
    """(batch, keys - start) bool, the keys each query sees of those gathered; None when every
    context is `keys` long and no window hides a key."""
    shared: int
    """Leading blocks the batch shares (0 when a window applies)."""
    window: int
    """The window asked for (0: none); it applies when 0 < window < keys."""
    start: int
    """Position of the first gathered key, a block boundary: 0 unless a window applies, else
    the shortest context's first visible key rounded down to its block."""


_scope = threading.local()


@contextlib.contextmanager
def layer_invariant_scope() -> Iterator[None]:
    """Within it (one forward pass of a model), decode attention derives its plan from the
    step's metadata once and every layer reuses it. The same tensors may hold other values in
    a later pass (CUDA-graph buffers are refilled in place), so plans never outlive the scope;
    outside any scope nothing is kept."""
    outer = getattr(_scope, "plans", None)
    _scope.plans = []
    try:
        yield
    finally:
        _scope.plans = outer


def _decode_plan(
    block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int, window: int = 0
) -> _DecodePlan:
    """The layer-invariant part of a decode step's attention (two host syncs, the shared-
    prefix test, the gather ids, the padding and window mask), computed by the first layer of
    a step inside `layer_invariant_scope`. A hit needs the very tensors (held by the plan, so
    their ids stay unique) and the same window.

    With a window shorter than the longest context (a query at ctx - 1 sees keys from
    ctx - window on) the gather starts at the block of the shortest context's first visible
    key, and no prefix is shared: the shared blocks may lie outside some window."""
    plans: list[_DecodePlan] | None = getattr(_scope, "plans", None)
    for plan in plans or ():
        if (
            plan.block_tables is block_tables
            and plan.context_lens is context_lens
            and plan.block_size == block_size
            and plan.window == window
        ):
            return plan
    keys = int(context_lens.max().item())
    shortest = int(context_lens.min().item())
    windowed = 0 < window < keys
    start = max(shortest - window, 0) // block_size * block_size if windowed else 0
    ids = block_tables[:, start // block_size : (keys + block_size - 1) // block_size].long()
    valid = None
    if windowed:
        pos = torch.arange(start, keys, device=context_lens.device)[None, :]
        lens = context_lens[:, None]
        valid = (pos < lens) & (pos >= lens - window)
    elif shortest != keys:
        valid = torch.arange(keys, device=context_lens.device)[None, :] < context_lens[:, None]
    plan = _DecodePlan(
        block_tables,
        context_lens,
        block_size,
        keys,
        ids.flatten(),
        (ids.shape[0], ids.shape[1]),
        valid,
        0 if windowed else shared_blocks(block_tables, context_lens, block_size),
        window,
        start,
    )
    if plans is not None:
        plans.insert(0, plan)
        del plans[4:]  # a step's own plan and its shared-prefix tails' plans
    return plan


def _decode_shared_prefix(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    shared: int,
    return_lse: bool,
    k_params: torch.Tensor | None = None,
    v_params: torch.Tensor | None = None,
    bits: int = 0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode for a batch whose sequences share their first `shared` blocks (questions on one
    cached document): every query attends over the shared prefix in one pass (its K/V gathered
    once, not once per sequence), each over its own tail, and the two parts merge by LSE."""
    block_size = k_cache.shape[1]
    ids = block_tables[0, :shared].long()
    k = select_blocks(k_cache, k_params, bits, ids, q.dtype).flatten(0, 1)
    v = select_blocks(v_cache, v_params, bits, ids, q.dtype).flatten(0, 1)
    # fp32 (batch, q_heads, d), (batch, q_heads)
    out, lse = attend_tile(q, k, v, None, scale, softcap)
    rest = context_lens - shared * block_size
    tails = (rest > 0).nonzero().flatten()
    if tails.numel():
        o, s = _decode(
            q.index_select(0, tails),
            k_cache,
            v_cache,
            block_tables.index_select(0, tails)[:, shared:],
            rest.index_select(0, tails),
            scale,
            True,
            k_params=k_params,
            v_params=v_params,
            bits=bits,
            softcap=softcap,
        )
        assert s is not None
        merged_o, merged_l = merge_pair(
            out.index_select(0, tails), lse.index_select(0, tails), o, s
        )
        out = out.index_copy(0, tails, merged_o)
        lse = lse.index_copy(0, tails, merged_l)
    return out.to(q.dtype), (lse.float() if return_lse else None)


def _decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    return_lse: bool,
    k_params: torch.Tensor | None = None,
    v_params: torch.Tensor | None = None,
    bits: int = 0,
    window: int = 0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One query per sequence: gather every sequence's blocks at once and mask the tail (and,
    with a window, the keys before it; blocks before every sequence's window are not read).
    softcap > 0 caps the scaled scores (`soft_cap`), on the explicit-softmax path.

    A quantized cache's gathered blocks are dequantized to q's dtype first.
    """
    batch, q_heads, d = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    plan = _decode_plan(block_tables, context_lens, block_size, window)
    if batch > 1 and plan.shared >= MIN_SHARED_BLOCKS:
        return _decode_shared_prefix(
            q,
            k_cache,
            v_cache,
            block_tables,
            context_lens,
            scale,
            plan.shared,
            return_lse,
            k_params=k_params,
            v_params=v_params,
            bits=bits,
            softcap=softcap,
        )
    group = q_heads // kv_heads
    keys, valid = plan.keys - plan.start, plan.valid
    shape = (*plan.ids_shape, block_size, kv_heads, d)  # (batch, blocks, block_size, kv_heads, d)
    k = select_blocks(k_cache, k_params, bits, plan.flat, q.dtype)
    v = select_blocks(v_cache, v_params, bits, plan.flat, q.dtype)
    k = k.view(shape).flatten(1, 2)[:, :keys].transpose(1, 2)
    v = v.view(shape).flatten(1, 2)[:, :keys].transpose(1, 2)
    # k, v: (batch, kv_heads, keys, d)
    if valid is not None:
        # Slots past a context (or before its window) may hold anything, NaN included, and
        # 0 * NaN would leak into out (SDPA also adds its mask after the product, so K must be
        # clean too).
        pad = ~valid[:, None, :, None]
        k, v = k.masked_fill(pad, 0), v.masked_fill(pad, 0)
    if not return_lse and not softcap:
        mask = None if valid is None else valid[:, None, None, :]
        o = F.scaled_dot_product_attention(
            q[:, :, None], k, v, attn_mask=mask, scale=scale, enable_gqa=True
        )  # (batch, q_heads, 1, d)
        return o[:, :, 0], None
    qg = q.float().view(batch, kv_heads, group, d)
    # (batch, kv_heads, group, keys)
    scores = soft_cap(torch.matmul(qg, k.float().transpose(-1, -2)), softcap, scale)
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (batch, kv_heads, group)
    o = torch.matmul(torch.exp(scores - lse[..., None]), v.float())  # (batch, kv_heads, group, d)
    out = o.reshape(batch, q_heads, d).to(q.dtype)
    return out, (lse.reshape(batch, q_heads) if return_lse else None)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    return_lse: bool = False,
    k_params: torch.Tensor | None = None,
    v_params: torch.Tensor | None = None,
    bits: int = 0,
    window: int = 0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal paged attention (see `paged_attention_ref`); bits 8 / 4 read a quantized cache,
    window > 0 is a sliding window of that many keys, softcap > 0 caps the scores."""
    fn = paged_attention_triton if use_triton(q.device) else paged_attention_ref
    return fn(
        q,
        k_cache,
        v_cache,
        block_tables,
        cu_seqlens_q,
        context_lens,
        scale,
        return_lse,
        k_params=k_params,
        v_params=v_params,
        bits=bits,
        window=window,
        softcap=softcap,
    )
