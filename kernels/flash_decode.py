"""Split-KV decode attention: one query token per sequence over a long paged KV cache.

A single sequence at 1M context has only kv_heads programs' worth of work per layer if each
program walks its whole context, far too few to fill the GPU's memory system. So the keys are
cut into `num_splits` contiguous ranges: pass 1 runs one program per (sequence, kv head, split)
and writes a partial (out, lse) to fp32 scratch; pass 2 merges a row's splits by LSE
(DESIGN.md section 3). With one split, pass 1 writes the final output and pass 2 is skipped.

Quantized caches (bits 8 / 4, `kernels/kv_quant.py`) are dequantized tile by tile on load, as in
`paged_attention.py`; the split plan counts programs, not bytes, so it is the same for them.

With a sliding window W (`window=`), the query at ctx - 1 sees keys [max(ctx - W, 0), ctx): the
splits cover only those, from the key tile holding the first, so a step reads about W keys
however long the sequence.
"""

from __future__ import annotations

import functools

import torch

from kernels.cpu_attention import flash_decode_cpu, native_decode_supported
from kernels.dispatch import use_triton
from kernels.flash_attn import LOG2E, _jit, _store_rows, check_window, is_interpreting
from kernels.kv_quant import check_quant_caches
from kernels.paged_attention import (
    _decode,
    _paged_kv_step,
    check_paged_inputs,
    quant_kernel_args,
)
from kernels.position_attention import check_softcap

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: only the torch reference runs
    triton = None  # type: ignore[assignment]

PROGRAMS_PER_SM = 2
"""Target split programs per multiprocessor for pass 1."""
MERGE_MAX_PARTIALS = 16 * 32 * 64
"""Most (split x head_dim) fp32 partials one merge program holds: 16 warps of 64 a thread
(`merge_warps`). More spilled: 264 splits x head_dim 256 (one KV head, batch 1 on an H100)
parked 2.5 KB a thread on sm_90 (bench/cuda_compile.py)."""
INTERPRETER_SMS = 8
"""Multiprocessors assumed off CUDA, so small interpreter shapes still use several splits."""
MIN_SPLIT_TILES = 1
"""Fewest key tiles a split program takes. The split count is planned on the host from the
block table's width (a session, in a decode graph); with a floor above 1, a sequence much
shorter than that spreads over fewer, longer splits and the programs past its keys exit at
once. 1: every split gets 1/num_splits of the sequence (`--decode-graph` in
bench/kernel_bench_attention.py times floors against it)."""


@_jit
def _flash_decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_param_ptr,
    v_param_ptr,
    block_tables_ptr,
    context_lens_ptr,
    part_out_ptr,
    part_lse_ptr,
    scale_log2,
    softcap_c,
    num_splits,
    min_split_tiles,
    stride_q_seq,
    stride_q_head,
    stride_kc_block,
    stride_kc_tok,
    stride_kc_head,
    stride_kp_block,
    stride_kp_tok,
    stride_kp_head,
    stride_bt_seq,
    stride_po_seq,
    stride_po_head,
    stride_po_split,
    stride_pl_seq,
    stride_pl_head,
    stride_pl_split,
    window,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    TILE_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STORE_LSE: tl.constexpr,
    DOT_F32: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BITS: tl.constexpr,
    WINDOW: tl.constexpr,
):
    """TILE_D: head_dim, or head_dim / 2 for BITS 4 (each row's two halves go separately).
    WINDOW: the query sees only the last `window` keys (window > 0); without it the `window`
    argument is never read."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + seq)
    # Each sequence's own keys are cut into num_splits ranges of whole key tiles, so a short
    # sequence in a wide block table (a CUDA graph's, or a batch with a long neighbour) still
    # spreads its reads over every split program.
    if WINDOW:
        # Only keys [first, ctx) are in the window. Split 0 also takes the key tile holding the
        # first (aligned, so it stays inside one cache block), masked below it; the splits cut
        # the keys after that tile as they cut a whole context.
        first = tl.maximum(ctx - window, 0)
        first_tile = first // BLOCK_N * BLOCK_N
        rest = first_tile + BLOCK_N
        tiles = tl.cdiv(ctx - rest, BLOCK_N)
        split_len = tl.maximum(tl.cdiv(tiles, num_splits), min_split_tiles) * BLOCK_N
        lo = rest + split * split_len
        hi = tl.minimum(lo + split_len, ctx)
    else:
        split_len = tl.maximum(tl.cdiv(tl.cdiv(ctx, BLOCK_N), num_splits), min_split_tiles)
        split_len = split_len * BLOCK_N
        lo = split * split_len
        hi = tl.minimum(lo + split_len, ctx)  # may be <= lo: an empty split stores 0, -inf
    full_end = lo + tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N

    offs_h = tl.arange(0, BLOCK_H)  # the group's query heads, padded to a dot's 16 rows
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, TILE_D)
    head = kv_head * GROUP + offs_h
    row_mask = offs_h < GROUP
    q_ptrs = q_ptr + seq.to(tl.int64) * stride_q_seq + (head * stride_q_head)[:, None]
    q = tl.load(q_ptrs + offs_d[None, :], mask=row_mask[:, None], other=0.0)
    acc = tl.zeros([BLOCK_H, TILE_D], dtype=tl.float32)
    if BITS == 4:
        q_b = tl.load(q_ptrs + TILE_D + offs_d[None, :], mask=row_mask[:, None], other=0.0)
        acc_b = tl.zeros([BLOCK_H, TILE_D], dtype=tl.float32)
    else:  # unused
        q_b = q
        acc_b = acc

    table = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    k_base = k_cache_ptr + kv_head * stride_kc_head + offs_d[None, :]
    v_base = v_cache_ptr + kv_head * stride_kc_head + offs_d[None, :]
    kp_base = k_param_ptr + kv_head * stride_kp_head
    vp_base = v_param_ptr + kv_head * stride_kp_head
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    if WINDOW:
        keys = first_tile + offs_n  # split 0's tile holding the window's first key
        key_mask = (keys >= first) & (keys < ctx)
        if split == 0:
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
                first_tile,
                offs_n,
                ctx,
                key_mask,
                key_mask[None, :],
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
    for start_n in range(lo, full_end, BLOCK_N):
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
    if full_end < hi:  # the sequence's last, partial key tile
        key_mask = full_end + offs_n < hi
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
            full_end,
            offs_n,
            ctx,
            key_mask,
            key_mask[None, :],
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

    out_ptrs = (
        part_out_ptr
        + seq.to(tl.int64) * stride_po_seq
        + split * stride_po_split
        + (head * stride_po_head)[:, None]
    )
    lse_ptrs = part_lse_ptr + seq * stride_pl_seq + split * stride_pl_split + head * stride_pl_head
    _store_rows(out_ptrs + offs_d[None, :], lse_ptrs, acc, l_i, m_i, row_mask, STORE_LSE)
    if BITS == 4:
        _store_rows(out_ptrs + TILE_D + offs_d[None, :], lse_ptrs, acc_b, l_i, m_i, row_mask, False)


@_jit
def _flash_decode_merge_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    lse_ptr,
    num_splits,
    stride_po_seq,
    stride_po_head,
    stride_po_split,
    stride_pl_seq,
    stride_pl_head,
    stride_o_seq,
    stride_o_head,
    stride_lse_seq,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    STORE_LSE: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    split_mask = offs_s < num_splits
    lse_row = part_lse_ptr + seq * stride_pl_seq + head * stride_pl_head
    lse = tl.load(lse_row + offs_s, mask=split_mask, other=float("-inf"))  # (BLOCK_S,) natural log
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty: weights 0, out 0, lse -inf
    w = tl.math.exp2((lse - m) * 1.4426950408889634)
    denom = tl.sum(w, 0)
    out_row = part_out_ptr + seq.to(tl.int64) * stride_po_seq + head * stride_po_head
    parts = tl.load(
        out_row + offs_s[:, None] * stride_po_split + offs_d[None, :],
        mask=split_mask[:, None],
        other=0.0,
    )  # (BLOCK_S, HEAD_DIM) fp32
    out = tl.sum(w[:, None] * parts, 0) / tl.where(denom == 0.0, 1.0, denom)
    out_ptrs = out_ptr + seq.to(tl.int64) * stride_o_seq + head * stride_o_head + offs_d
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty))
    if STORE_LSE:
        total = tl.where(denom == 0.0, float("-inf"), m + tl.log(denom))
        tl.store(lse_ptr + seq * stride_lse_seq + head, total)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_config(head_dim: int, dtype: torch.dtype) -> dict[str, int]:
    """Key tile, warps and pipeline depth of pass 1.

    H100 at 128K context (bench/kernel_bench_attention.py --sweep): 64 or 128 keys with 4 warps
    and 3 stages all read ~2.65 TB/s, 0.89 of a device copy; 32 keys with 2 warps 2.15 TB/s.
    """
    if is_interpreting():
        return dict(BLOCK_N=16, num_warps=4, num_stages=1)
    if dtype == torch.float32 or head_dim > 128:
        return dict(BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_N=64, num_warps=4, num_stages=3)


def merge_warps(block_s: int, head_dim: int) -> int:
    """Warps of the merge: each thread holds at most 64 of the (splits x head_dim) fp32 partials.

    4 warps held all of them up to 64 splits x 128; 256 splits (tp 4, one sequence) took 255
    registers and spilled on sm_90 (bench/cuda_compile.py)."""
    return min(max(block_s * head_dim // (32 * 64), 4), 16)


def split_plan(
    batch: int,
    kv_heads: int,
    max_ctx: int,
    block_n: int,
    device: torch.device,
    window: int = 0,
    head_dim: int = 0,
) -> int:
    """Splits per sequence: enough (sequence, kv head, split) programs to fill the device.

    max_ctx is a host-side bound (block table width * block size), so planning needs no sync;
    it only caps the count at one key tile per split. Each program then takes
    cdiv(its sequence's key tiles, num_splits) whole tiles of its own sequence, so only a
    sequence's last key tile is partial and the work follows the real context, not the width.
    With a window (> 0) a sequence's splits cover at most window + block_n keys (the window
    from the start of its first key tile), so the plan counts those. With `head_dim` the
    merge's partials are capped at MERGE_MAX_PARTIALS (a power of two over a power-of-two
    head_dim: the merge's padded split count stays under it too).
    """
    if window:
        max_ctx = min(max_ctx, window + block_n)
    target = PROGRAMS_PER_SM * _sm_count(device)
    max_tiles = max(triton.cdiv(max_ctx, block_n), 1)
    if head_dim:
        max_tiles = min(max_tiles, max(MERGE_MAX_PARTIALS // head_dim, 1))
    return min(max(triton.cdiv(target, max(batch * kv_heads, 1)), 1), max_tiles)


def flash_decode_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    return_lse: bool = False,
    k_params: torch.Tensor | None = None,
    v_params: torch.Tensor | None = None,
    bits: int = 0,
    window: int = 0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton twin of `flash_decode_ref`; same shapes and dtypes.

    Pass 1 grid: (batch, kv_heads, num_splits); each program walks 1/num_splits of its
    sequence's keys (whole key tiles) for all `group` query heads of one kv head (rows padded
    to 16 for the dot), writing part_out (batch, q_heads, num_splits, head_dim) and part_lse
    (batch, q_heads, num_splits) fp32. With a window, split 0 also takes the key tile holding
    the window's first key, masked below it, and the splits cut the keys after that tile. A
    window at least the block table's width hides no key, and the kernel compiles without it.
    Pass 2 grid: (batch, q_heads), merging the splits by LSE.
    """
    group = check_paged_inputs(
        q, k_cache, v_cache, block_tables, context_lens, k_params, v_params, bits
    )
    check_window(window)
    check_softcap(softcap)
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    batch, q_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    if block_tables.shape[0] != batch or context_lens.shape[0] != batch:
        raise ValueError(
            f"q holds {batch} sequences but block_tables {tuple(block_tables.shape)} and "
            f"context_lens {tuple(context_lens.shape)} disagree"
        )
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(batch, q_heads, dtype=torch.float32, device=q.device)
    if batch == 0:
        return out, (lse if return_lse else None)
    cfg = decode_config(head_dim, q.dtype)
    max_ctx = block_tables.shape[1] * block_size
    windowed = 0 < window < max_ctx
    num_splits = split_plan(batch, kv_heads, max_ctx, cfg["BLOCK_N"], q.device, window, head_dim)
    if num_splits == 1:  # pass 1 writes the result: a split axis of stride 0
        part_out, part_lse = out[:, :, None], lse[:, :, None]
    else:
        part_out = torch.empty(
            batch, q_heads, num_splits, head_dim, dtype=torch.float32, device=q.device
        )
        part_lse = torch.empty(batch, q_heads, num_splits, dtype=torch.float32, device=q.device)
    k_p, v_p, stride_p_block, stride_p_slot, stride_p_head = quant_kernel_args(
        k_cache, k_params, v_params, bits
    )
    _flash_decode_split_kernel[(batch, kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        k_p,
        v_p,
        block_tables,
        context_lens,
        part_out,
        part_lse,
        scale * LOG2E,
        softcap / scale if softcap else 1.0,
        num_splits,
        MIN_SPLIT_TILES,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        stride_p_block,
        stride_p_slot,
        stride_p_head,
        block_tables.stride(0),
        part_out.stride(0),
        part_out.stride(1),
        part_out.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        part_lse.stride(2),
        window if windowed else 0,
        GROUP=group,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        TILE_D=head_dim // 2 if bits == 4 else head_dim,
        BLOCK_SIZE=block_size,
        STORE_LSE=return_lse or num_splits > 1,
        DOT_F32=q.dtype == torch.float32 or is_interpreting(),
        BITS=bits,
        WINDOW=windowed,
        SOFTCAP=softcap > 0,
        **cfg,
    )
    if num_splits > 1:
        block_s = triton.next_power_of_2(num_splits)
        _flash_decode_merge_kernel[(batch, q_heads)](
            part_out,
            part_lse,
            out,
            lse,
            num_splits,
            part_out.stride(0),
            part_out.stride(1),
            part_out.stride(2),
            part_lse.stride(0),
            part_lse.stride(1),
            out.stride(0),
            out.stride(1),
            lse.stride(0),
            HEAD_DIM=head_dim,
            BLOCK_S=block_s,
            STORE_LSE=return_lse,
            num_warps=merge_warps(block_s, head_dim),
        )
    return out, (lse if return_lse else None)


def flash_decode_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    return_lse: bool = False,
    k_params: torch.Tensor | None = None,
    v_params: torch.Tensor | None = None,
    bits: int = 0,
    window: int = 0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of one query token per sequence over its whole paged context (with a window
    W > 0, over its last W keys; softcap > 0 caps the scaled scores, `soft_cap`).

    q: (batch, q_heads, head_dim); k_cache, v_cache: (num_blocks, block_size, kv_heads, head_dim)
    in q's dtype, or for bits 8 / 4 uint8 codes (num_blocks, block_size, kv_heads, code_dim) with
    k_params, v_params float32 (num_blocks, block_size, kv_heads, 2) (`kernels/kv_quant.py`);
    block_tables: (batch, max_blocks) int32/int64; context_lens: (batch,) int64 >= 1.
    Returns out (batch, q_heads, head_dim) in q's dtype and, when asked, lse (batch, q_heads) fp32.
    """
    check_quant_caches(k_cache, v_cache, k_params, v_params, bits, q.shape[-1])
    check_window(window)
    check_softcap(softcap)
    if q.shape[0] == 0:
        lse = torch.empty(0, q.shape[1], dtype=torch.float32, device=q.device)
        return torch.empty_like(q), (lse if return_lse else None)
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


def flash_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    return_lse: bool = False,
    k_params: torch.Tensor | None = None,
    v_params: torch.Tensor | None = None,
    bits: int = 0,
    window: int = 0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split-KV decode (see `flash_decode_ref`); bits 8 / 4 read a quantized cache, window > 0
    is a sliding window of that many keys, softcap > 0 caps the scores. On CPU the native
    kernel (`kernels/cpu_attention.py`) runs where it supports the cache."""
    args = (q, k_cache, v_cache, block_tables, context_lens, scale, return_lse)
    if use_triton(q.device):
        fn = flash_decode_triton
    elif native_decode_supported(q, k_cache, bits) and q.shape[0]:
        return flash_decode_cpu(
            *args, k_params=k_params, v_params=v_params, bits=bits, window=window, softcap=softcap
        )
    else:
        fn = flash_decode_ref
    return fn(
        *args, k_params=k_params, v_params=v_params, bits=bits, window=window, softcap=softcap
    )
