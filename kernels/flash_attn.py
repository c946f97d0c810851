"""Flash attention forward with log-sum-exp over contiguous K/V, for ring-attention steps.

Query i sits at absolute position q_offset + i and key j at k_offset + j; with `causal` a query
sees the keys at positions <= its own. A query that sees no key (possible in a ring step whose K/V
block lies wholly in its future) gets out 0 and lse -inf, so merging by LSE ignores it.

The kernel stacks the `group` query heads of one KV head into the rows of a tile (row r is token
r // group, head r % group), so those heads share every K/V load. Its online-softmax step,
`_online_softmax_tile`, is shared with the paged kernels in `paged_attention.py` and
`flash_decode.py`.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from kernels.dispatch import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: only the torch references run
    triton = None  # type: ignore[assignment]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def _jit(fn: Any) -> Any:
    return triton.jit(fn) if triton is not None else fn


def is_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@_jit
def _softmax_step(
    qk, l_i, m_i, keep, scale_log2, MASKED: tl.constexpr, SOFTCAP: tl.constexpr, softcap_c
):
    """Online-softmax bookkeeping for a tile of raw scores qk (M, N) fp32: returns the tile's
    probabilities p (M, N) relative to the new running max, the rescale factor alpha (M,) of the
    old accumulator, and the new (l, m); m is in log2 units of the scaled scores.

    A row that has seen no key yet keeps m = -inf (and l = 0), so the first tile that shows it a
    key sets its max from that key's score, however negative.

    SOFTCAP: each scaled score s becomes cap * tanh(s / cap) (Gemma 2), computed on the raw
    scores as c * tanh(qk / c) with softcap_c = cap / scale, before the mask (tanh(-inf) would
    unmask); tanh(x) = 1 - 2 / (e^2x + 1) saturates at +-1 either way."""
    if SOFTCAP:
        qk = softcap_c * (1.0 - 2.0 / (tl.exp(2.0 * qk / softcap_c) + 1.0))
    if MASKED:
        qk = tl.where(keep, qk, float("-inf"))
    # scale > 0, so max(qk) * scale == max(qk * scale); the subtraction below fuses into an FMA.
    m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
    if MASKED:
        # A row with no key so far subtracts 0 instead of -inf: p = 0 and alpha = 0, no NaN.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk * scale_log2 - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
    else:
        p = tl.math.exp2(qk * scale_log2 - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, l_i, m_new


@_jit
def _online_softmax_tile(
    acc,
    l_i,
    m_i,
    q,
    k,
    v,
    keep,
    scale_log2,
    MASKED: tl.constexpr,
    DOT_F32: tl.constexpr,
    SOFTCAP: tl.constexpr = False,
    softcap_c=1.0,
):
    """Fold one key tile into the running (acc, l, m); m is in log2 units of the scaled scores.

    q: (M, D), k, v: (N, D), keep: (M, N) visibility (only read when MASKED), acc: (M, D) fp32.
    Unmasked tiles assume every row sees every key, so m stays finite and needs no guard.
    DOT_F32 runs both products in fp32 IEEE: fp32 inputs (no tf32 rounding) and the interpreter
    (numpy has no bf16 matmul).
    """
    if DOT_F32:
        qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))  # (M, N) fp32
    p, alpha, l_i, m_new = _softmax_step(qk, l_i, m_i, keep, scale_log2, MASKED, SOFTCAP, softcap_c)
    if DOT_F32:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@_jit
def _online_softmax_tile_halves(
    acc_a,
    acc_b,
    l_i,
    m_i,
    q_a,
    q_b,
    k_a,
    k_b,
    v_a,
    v_b,
    keep,
    scale_log2,
    MASKED: tl.constexpr,
    DOT_F32: tl.constexpr,
    SOFTCAP: tl.constexpr = False,
    softcap_c=1.0,
):
    """`_online_softmax_tile` with head_dim split in two halves (int4 caches pack element j and
    j + D/2 in one byte): q . k = q_a . k_a + q_b . k_b, and P @ V lands in two half-width
    accumulators. q_*: (M, D/2), k_*, v_*: (N, D/2), acc_*: (M, D/2) fp32."""
    if DOT_F32:
        qk = tl.dot(q_a.to(tl.float32), tl.trans(k_a.to(tl.float32)), input_precision="ieee")
        qk = tl.dot(q_b.to(tl.float32), tl.trans(k_b.to(tl.float32)), qk, input_precision="ieee")
    else:
        qk = tl.dot(q_a, tl.trans(k_a))
        qk = tl.dot(q_b, tl.trans(k_b), qk)
    p, alpha, l_i, m_new = _softmax_step(qk, l_i, m_i, keep, scale_log2, MASKED, SOFTCAP, softcap_c)
    if DOT_F32:
        acc_a = acc_a * alpha[:, None] + tl.dot(p, v_a.to(tl.float32), input_precision="ieee")
        acc_b = acc_b * alpha[:, None] + tl.dot(p, v_b.to(tl.float32), input_precision="ieee")
    else:
        acc_a = tl.dot(p.to(v_a.dtype), v_a, acc_a * alpha[:, None])
        acc_b = tl.dot(p.to(v_b.dtype), v_b, acc_b * alpha[:, None])
    return acc_a, acc_b, l_i, m_new


@_jit
def _store_rows(
    out_ptrs,
    lse_ptrs,
    acc,
    l_i,
    m_i,
    row_mask,
    STORE_LSE: tl.constexpr,
):
    """Normalize and store a tile's rows; rows that saw no key get out 0 and lse -inf."""
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    tl.store(out_ptrs, out.to(out_ptrs.dtype.element_ty), mask=row_mask[:, None])
    if STORE_LSE:
        log_l = tl.math.log2(tl.where(empty, 1.0, l_i))
        lse = tl.where(empty, float("-inf"), (m_i + log_l) * 0.6931471805599453)
        tl.store(lse_ptrs, lse, mask=row_mask)


@_jit
def _flash_attn_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    q_len,
    k_len,
    q_offset,
    k_offset,
    scale_log2,
    num_q_blocks,
    stride_q_tok,
    stride_q_head,
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    stride_o_tok,
    stride_o_head,
    stride_lse_tok,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    TOKENS: tl.constexpr = BLOCK_M // GROUP
    pid = tl.program_id(0)
    kv_head = pid % NUM_KV_HEADS
    # Last query blocks first: under a causal mask they have the most keys.
    m_start = (num_q_blocks - 1 - pid // NUM_KV_HEADS) * TOKENS

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    tok = m_start + offs_m // GROUP  # (BLOCK_M,)
    head = kv_head * GROUP + offs_m % GROUP
    row_mask = (offs_m < TOKENS * GROUP) & (tok < q_len)
    tok64 = tok.to(tl.int64)
    q_ptrs = (
        q_ptr + tok64[:, None] * stride_q_tok + (head * stride_q_head)[:, None] + offs_d[None, :]
    )
    q = tl.load(q_ptrs, mask=row_mask[:, None], other=0.0)

    # Keys [0, lo) are seen by every row of the tile, keys [lo, hi) by some.
    if CAUSAL:
        first_pos = q_offset + m_start
        last_pos = q_offset + tl.minimum(m_start + TOKENS, q_len) - 1
        lo = tl.minimum(tl.maximum(first_pos - k_offset + 1, 0), k_len)
        hi = tl.minimum(tl.maximum(last_pos - k_offset + 1, 0), k_len)
    else:
        lo = k_len
        hi = k_len
    interior_end = (lo // BLOCK_N) * BLOCK_N
    pos = q_offset + tok  # (BLOCK_M,)

    k_base = k_ptr + kv_head * stride_k_head + offs_d[None, :]
    v_base = v_ptr + kv_head * stride_v_head + offs_d[None, :]
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for start_n in range(0, interior_end, BLOCK_N):
        keys = (start_n + offs_n).to(tl.int64)
        k = tl.load(k_base + keys[:, None] * stride_k_tok)
        v = tl.load(v_base + keys[:, None] * stride_v_tok)
        acc, l_i, m_i = _online_softmax_tile(
            acc, l_i, m_i, q, k, v, None, scale_log2, MASKED=False, DOT_F32=DOT_F32
        )
    for start_n in range(interior_end, hi, BLOCK_N):
        keys = start_n + offs_n
        key_mask = keys < k_len
        keep = key_mask[None, :]
        if CAUSAL:
            keep = keep & ((k_offset + keys)[None, :] <= pos[:, None])
        keys64 = keys.to(tl.int64)
        k = tl.load(k_base + keys64[:, None] * stride_k_tok, mask=key_mask[:, None], other=0.0)
        v = tl.load(v_base + keys64[:, None] * stride_v_tok, mask=key_mask[:, None], other=0.0)
        acc, l_i, m_i = _online_softmax_tile(
            acc, l_i, m_i, q, k, v, keep, scale_log2, MASKED=True, DOT_F32=DOT_F32
        )

    out_ptrs = out_ptr + tok64[:, None] * stride_o_tok + (head * stride_o_head)[:, None]
    lse_ptrs = lse_ptr + tok64 * stride_lse_tok + head
    _store_rows(out_ptrs + offs_d[None, :], lse_ptrs, acc, l_i, m_i, row_mask, STORE_LSE=True)


@functools.cache
def capability(device: torch.device) -> int:
    """The CUDA device's compute capability as one number (80 = sm_80); 90 off CUDA, whose
    configs are then the ones measured on an H100."""
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def attention_config(
    head_dim: int, group: int, dtype: torch.dtype, device: torch.device, bits: int = 0
) -> dict[str, int]:
    """Tile rows (tokens x group heads), key tile, warps and pipeline depth for prefill tiles.

    Small tiles in the interpreter keep the tests fast. H100 (bench/kernel_bench_attention.py
    --sweep, bf16 d128, 16K causal, block_size 16): 256 x 64 with 16 warps 420-431 TFLOP/s,
    128 x 128 / 8 warps 376-390, 128 x 64 / 4 warps 369-374, 128 x 64 / 8 warps 310.

    Off sm_90 (A100, Ada's 99 KB of shared memory, and Blackwell, where the H100's tile
    spilled 0.6-9 KB a thread on sm_100) each head size takes the largest tile that spills no
    registers on sm_80 (`bench/cuda_compile.py --sweep-prefill`: at d128
    the 256 x 64 tile spilled 0.6 KB a thread over bf16 caches and 14.8 KB over int8 ones; at
    d64 128 x 64 with 4 warps spilled 0.9 KB over int8): d128 128 x 32 with 8 warps (64 x 64
    over an int8 cache, whose dequantization holds more registers), d64 128 x 64 with 8 warps
    (128 x 32 over int8).

    head_dim 256 (Gemma 2 / 3), on every card: 64 x 32 with 8 warps, which spills at most 12 B
    a thread on sm_80 and none on sm_90 over every cache format, windowed too; with 4 warps it
    parked 0.3-1 KB a thread over int8 / int4 caches on sm_80 (`--sweep-prefill`,
    docs/benchmarks/cuda_compile_gemma_2026-12-06.md).
    """
    rows = max(16, triton.next_power_of_2(group))
    if is_interpreting():
        return dict(BLOCK_M=max(rows, 32), BLOCK_N=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=max(rows, 64), BLOCK_N=32, num_warps=4, num_stages=2)
    if head_dim > 128:  # (d256: Gemma's)
        return dict(BLOCK_M=max(rows, 64), BLOCK_N=32, num_warps=8, num_stages=2)
    if capability(device) != 90:
        if head_dim == 128 and bits == 8:
            return dict(BLOCK_M=max(rows, 64), BLOCK_N=64, num_warps=8, num_stages=3)
        if head_dim == 128 or bits == 8:
            return dict(BLOCK_M=max(rows, 128), BLOCK_N=32, num_warps=8, num_stages=3)
        return dict(BLOCK_M=max(rows, 128), BLOCK_N=64, num_warps=8, num_stages=3)
    if head_dim == 128:
        return dict(BLOCK_M=max(rows, 256), BLOCK_N=64, num_warps=16, num_stages=3)
    return dict(BLOCK_M=max(rows, 128), BLOCK_N=64, num_warps=4, num_stages=3)


def check_head_dim(head_dim: int) -> None:
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(
            f"the Triton attention kernels need a power-of-two head_dim in [16, 256], got "
            f"{head_dim}; set DIST_RUNTIME_KERNELS=torch to use the reference"
        )


def check_window(window: int) -> None:
    """A sliding window is a key count: 0 (none) or positive."""
    if window < 0:
        raise ValueError(f"the attention window must be 0 (none) or positive, got {window}")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """Check dtypes, head counts and unit last-dim strides; return the GQA group size."""
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
    ):
        raise ValueError(
            f"q, k, v must share one of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if k.shape[-2:] != v.shape[-2:] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"head shapes disagree: q {tuple(q.shape)}, k/v {tuple(k.shape)}")
    q_heads, kv_heads = q.shape[-2], k.shape[-2]
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k and v need a contiguous last (head_dim) dimension")
    check_head_dim(q.shape[-1])
    return q_heads // kv_heads


def flash_attn_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool,
    q_offset: int = 0,
    k_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `flash_attn_ref`.

    q: (q_len, q_heads, head_dim); k, v: (k_len, kv_heads, head_dim), same dtype, unit stride in
    head_dim (other strides free). Returns out (q_len, q_heads, head_dim) in q's dtype and lse
    (q_len, q_heads) fp32.
    Grid: one program per (query tile of BLOCK_M // group tokens, kv head).
    """
    group = check_qkv(q, k, v)
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    q_len, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(q_len, q_heads, dtype=torch.float32, device=q.device)
    if q_len == 0:
        return out, lse
    cfg = attention_config(head_dim, group, q.dtype, q.device)
    num_q_blocks = triton.cdiv(q_len, cfg["BLOCK_M"] // group)
    _flash_attn_kernel[(num_q_blocks * kv_heads,)](
        q,
        k,
        v,
        out,
        lse,
        q_len,
        k.shape[0],
        q_offset,
        k_offset,
        scale * LOG2E,
        num_q_blocks,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        NUM_KV_HEADS=kv_heads,
        GROUP=group,
        HEAD_DIM=head_dim,
        CAUSAL=causal,
        DOT_F32=q.dtype == torch.float32 or is_interpreting(),
        **cfg,
    )
    return out, lse


def flash_attn_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool,
    q_offset: int = 0,
    k_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over contiguous k, v in fp32; returns (out in q's dtype, lse fp32).

    q: (q_len, q_heads, head_dim); k, v: (k_len, kv_heads, head_dim).
    """
    q_len, q_heads, head_dim = q.shape
    k_len, kv_heads, _ = k.shape
    group = q_heads // kv_heads
    qg = q.float().view(q_len, kv_heads, group, head_dim).permute(1, 2, 0, 3)  # (kvh, g, q, d)
    scores = qg @ k.float().permute(1, 2, 0)[:, None] * scale  # (kv_heads, group, q_len, k_len)
    if causal:
        q_pos = torch.arange(q_len, device=q.device) + q_offset
        k_pos = torch.arange(k_len, device=q.device) + k_offset
        scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (kv_heads, group, q_len)
    probs = torch.exp(scores - lse.nan_to_num(neginf=0.0)[..., None])
    o = probs @ v.float().transpose(0, 1)[:, None]  # (kv_heads, group, q_len, head_dim)
    out = o.permute(2, 0, 1, 3).reshape(q_len, q_heads, head_dim).to(q.dtype)
    return out, lse.permute(2, 0, 1).reshape(q_len, q_heads)


def flash_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool,
    q_offset: int = 0,
    k_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(q.device):
        return flash_attn_triton(q, k, v, scale, causal, q_offset, k_offset)
    return flash_attn_ref(q, k, v, scale, causal, q_offset, k_offset)
