"""Causal attention of packed query tokens over a paged KV cache, with GQA and optional LSE.

Query token i of sequence b sits at absolute position context_lens[b] - q_len_b + i and sees
every cached key at a position <= its own (the step's own K/V are stored before the call).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    return_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention for a batch of sequences.

    q: (tokens, q_heads, head_dim), sequences packed back to back.
    k_cache, v_cache: (num_blocks, block_size, kv_heads, head_dim).
    block_tables: (batch, max_blocks) int32/int64, padded with any valid block id.
    cu_seqlens_q: (batch + 1,) int64 prefix sums of query lengths.
    context_lens: (batch,) int64 keys per sequence, including this step's tokens.
    Returns out: (tokens, q_heads, head_dim) in q's dtype and, when asked, the log-sum-exp of
    the scaled scores: (tokens, q_heads) fp32.
    """
    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    if q_lens and all(n == 1 for n in q_lens):
        return _decode(q, k_cache, v_cache, block_tables, context_lens, scale, return_lse)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device) if return_lse else None
    starts = cu_seqlens_q.tolist()
    for b, ctx in enumerate(context_lens.tolist()):
        lo, hi = starts[b], starts[b + 1]
        if hi == lo:
            continue
        k, v = _gather(k_cache, v_cache, block_tables[b], ctx)  # (ctx, kv_heads, head_dim)
        o, s = _attend(q[lo:hi], k, v, scale, return_lse)
        out[lo:hi] = o
        if lse is not None and s is not None:
            lse[lo:hi] = s
    return out, lse


def _gather(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, ctx: int
) -> tuple[torch.Tensor, torch.Tensor]:
    block_size = k_cache.shape[1]
    ids = block_table[: (ctx + block_size - 1) // block_size].long()
    k = k_cache[ids].flatten(0, 1)[:ctx]
    v = v_cache[ids].flatten(0, 1)[:ctx]
    return k, v


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, return_lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q: (n, q_heads, d) at the last n of ctx positions; k, v: (ctx, kv_heads, d)."""
    n, q_heads, _ = q.shape
    ctx, kv_heads, _ = k.shape
    group = q_heads // kv_heads
    # Bottom-right aligned causal mask: query i sees keys j <= ctx - n + i.
    mask = torch.ones(n, ctx, dtype=torch.bool, device=q.device).tril(diagonal=ctx - n)
    if not return_lse:
        qh = q.transpose(0, 1)  # (q_heads, n, d)
        kh = k.transpose(0, 1).repeat_interleave(group, dim=0)  # (q_heads, ctx, d)
        vh = v.transpose(0, 1).repeat_interleave(group, dim=0)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
        return o.transpose(0, 1), None
    qg = q.float().view(n, kv_heads, group, -1).permute(1, 2, 0, 3)  # (kv_heads, group, n, d)
    scores = qg @ k.float().permute(1, 2, 0)[:, None] * scale  # (kv_heads, group, n, ctx)
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (kv_heads, group, n)
    probs = torch.exp(scores - lse[..., None])
    o = probs @ v.float().transpose(0, 1)[:, None]  # (kv_heads, group, n, d)
    o = o.permute(2, 0, 1, 3).reshape(n, q_heads, -1).to(q.dtype)
    return o, lse.permute(2, 0, 1).reshape(n, q_heads)


def _decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One query per sequence: gather every sequence's blocks at once and mask the tail."""
    batch, q_heads, d = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = q_heads // kv_heads
    max_blocks = int((context_lens.max().item() + block_size - 1) // block_size)
    ids = block_tables[:, :max_blocks].long()
    k = k_cache[ids].flatten(1, 2)  # (batch, keys, kv_heads, d)
    v = v_cache[ids].flatten(1, 2)
    keys = k.shape[1]
    valid = torch.arange(keys, device=q.device)[None, :] < context_lens[:, None]  # (batch, keys)
    compute = torch.float32 if (return_lse or q.dtype == torch.float32) else q.dtype
    qg = q.to(compute).view(batch, kv_heads, group, d)
    scores = qg @ k.to(compute).permute(0, 2, 3, 1) * scale  # (batch, kv_heads, group, keys)
    scores = scores.float().masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (batch, kv_heads, group)
    probs = torch.exp(scores - lse[..., None]).to(compute)
    o = probs @ v.to(compute).transpose(1, 2)  # (batch, kv_heads, group, d)
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    return paged_attention_ref(
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, return_lse
    )
