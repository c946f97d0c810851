"""Context parallelism: one sequence's tokens and KV cache spread over the cp ranks.

Layout. Logical KV block i of a sequence (positions [i * bs, (i + 1) * bs)) lives on cp rank
i % cp, and a token is computed by the rank that stores its K/V. A step's tokens, prefill
chunks and decodes alike, are therefore split evenly (to within a block per sequence), and
the causal work of a chunk is balanced because every rank holds blocks from its whole length
(striped attention at block granularity). Weights are replicated over cp, so each rank runs
the full model on its own tokens; only attention talks across ranks.

Attention, per layer:
* Fresh prefill (no sequence of the step has cached tokens): pass-KV ring. The chunk's K/V
  blocks travel round the cp ring, overlapped with compute (`workers/ring_attention.py`).
* A chunk after a cached prefix, a follow-up question on a cached document: KV never moves.
  The step's queries are all-gathered, every rank attends them over its own KV shard, and the
  partial (out, lse) pairs go back to each query's owner (all-to-all), which merges them
  exactly by log-sum-exp.
* Decode (one new token per sequence): every cp rank computes every sequence's token (the
  weights are replicated and a decode step reads them whole anyway), only the owner of the
  token's block stores its K/V, each rank attends all the queries over its own KV shard, and
  one all-gather of the partial (out, lse) pairs per layer lets every rank merge them. The
  step's shapes depend on the batch size only, so it replays from a CUDA graph
  (`workers/cuda_graph.py`), collectives included.

Sliding windows and soft-capped scores (Mistral, Phi-3-mini, Qwen's windowed layers, Gemma
2 / 3) ride along: prefill masks by position (`position_attention`, which skips the key tiles
before every query's window), and a windowed layer's decode reads, per sequence, only the
last few local blocks its window can reach (a fixed count, so the step still replays from a
graph), masked by position (`_windowed_decode`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.flash_decode import flash_decode
from kernels.kv_quant import fake_quant_kv, select_blocks
from kernels.position_attention import merge_partials, position_attention, soft_cap
from workers.distributed import Collectives
from workers.kv_cache import LayerKV
from workers.ring_attention import RankRows, ring_attention


def block_owner(positions: torch.Tensor, block_size: int, cp_size: int) -> torch.Tensor:
    """cp rank holding the K/V of each position."""
    return torch.div(positions, block_size, rounding_mode="floor") % cp_size


def local_positions(length: int, block_size: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions < length whose K/V cp rank `cp_rank` holds, in its cache order."""
    nb = max(-(-length // block_size), cp_rank)
    starts = torch.arange(cp_rank, nb, cp_size, dtype=torch.int64) * block_size
    pos = (starts[:, None] + torch.arange(block_size, dtype=torch.int64)[None]).flatten()
    return pos[pos < length]


@dataclass(frozen=True)
class SeqKeys:
    """One sequence's keys in this rank's cache."""

    blocks: torch.Tensor
    """(local blocks,) int64 block ids, in position order."""
    positions: torch.Tensor
    """(keys,) int64 position of each local key."""


@dataclass(frozen=True)
class CPMetadata:
    """What every layer needs to attend across cp ranks in one step."""

    layouts: list[RankRows]
    """Every cp rank's rows in this step (same list on every rank)."""
    n_max: int
    """Most rows any cp rank holds: the padded length of every cp message."""
    fresh: bool
    """No sequence of the step has cached tokens: the pass-KV ring handles attention."""
    q_index: list[torch.Tensor]
    """Per sequence: its query rows in the all-gathered (cp * n_max) queries."""
    q_pos: list[torch.Tensor]
    keys: list[SeqKeys]


def build_cp_metadata(
    spans: list[tuple[int, int]],
    local_tables: list[list[int]],
    block_size: int,
    comm: Collectives,
    device: torch.device,
) -> CPMetadata:
    """spans: (start, end) positions of each sequence's tokens in this step, in plan order;
    local_tables: this rank's block ids of each sequence (its entries of the logical table)."""
    cp, rank = comm.cp_size, comm.cp_rank
    per_rank: list[list[torch.Tensor]] = [[] for _ in range(cp)]
    for start, end in spans:
        pos = torch.arange(start, end, dtype=torch.int64)
        owner = block_owner(pos, block_size, cp)
        for j in range(cp):
            per_rank[j].append(pos[owner == j])
    layouts = []
    for j in range(cp):
        segments, row = [], 0
        for b, p in enumerate(per_rank[j]):
            if p.numel():
                segments.append((b, row, p.numel()))
                row += p.numel()
        positions = torch.cat(per_rank[j]) if per_rank[j] else torch.empty(0, dtype=torch.int64)
        layouts.append(RankRows(positions=positions.to(device), segments=segments))
    n_max = max(lay.positions.numel() for lay in layouts)
    q_index, q_pos = [], []
    for b in range(len(spans)):
        idx, qp = [], []
        for j, lay in enumerate(layouts):
            for seg_b, row, count in lay.segments:
                if seg_b == b:
                    idx.append(torch.arange(j * n_max + row, j * n_max + row + count))
                    qp.append(per_rank[j][b])
        q_index.append(torch.cat(idx).to(device))
        q_pos.append(torch.cat(qp).to(device))
    keys = []
    for (_, end), table in zip(spans, local_tables):
        kp = local_positions(end, block_size, cp, rank)
        nb = -(-kp.numel() // block_size)
        keys.append(
            SeqKeys(
                blocks=torch.tensor(table[:nb], dtype=torch.int64, device=device),
                positions=kp.to(device),
            )
        )
    fresh = all(start == 0 for start, _ in spans)
    return CPMetadata(
        layouts=layouts,
        n_max=n_max,
        fresh=fresh,
        q_index=q_index,
        q_pos=q_pos,
        keys=keys,
    )


def cp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: LayerKV,
    meta: CPMetadata,
    comm: Collectives,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Exact attention of this rank's rows; k, v are this rank's new keys, already stored in
    the cache. Returns (rows, q_heads, head_dim). window > 0: a sliding window of that many
    positions; softcap > 0: the scaled scores capped (`position_attention_ref`).

    With a quantized cache every path attends to what the cache holds: a fresh chunk's ring
    passes carry its K/V quantized and dequantized again (`fake_quant_kv`, equal to reading the
    cache back) in the model dtype, so cp > 1 computes what cp = 1 computes from its cache.
    """
    k_cache, v_cache, bits = cache.k, cache.v, cache.bits
    if meta.fresh:
        if bits:
            k, v = fake_quant_kv(k, bits), fake_quant_kv(v, bits)
        out, _ = ring_attention(q, k, v, meta.layouts, comm, scale, window, softcap)
        return out
    cp, n_max = comm.cp_size, meta.n_max
    n, heads, d = q.shape
    padded = torch.zeros(n_max, heads, d, dtype=q.dtype, device=q.device)
    padded[:n] = q
    queries = comm.cp_all_gather(padded).flatten(0, 1)  # (cp * n_max, heads, d)
    part = torch.zeros_like(queries)
    part_lse = torch.full((cp * n_max, heads), float("-inf"), device=q.device)
    for idx, qp, keys in zip(meta.q_index, meta.q_pos, meta.keys):
        m = keys.positions.numel()
        if m == 0:
            continue
        kb = select_blocks(k_cache, cache.k_params, bits, keys.blocks, q.dtype)
        vb = select_blocks(v_cache, cache.v_params, bits, keys.blocks, q.dtype)
        kb, vb = kb.flatten(0, 1)[:m], vb.flatten(0, 1)[:m]
        # The shard's blocks in table order: positions ascend.
        o, s = position_attention(
            queries[idx], qp, kb, vb, keys.positions, scale, True, window, softcap
        )
        part[idx] = o
        part_lse[idx] = s.float()
    back = comm.cp_all_to_all(part.view(cp, n_max, heads, d))[:, :n]
    back_lse = comm.cp_all_to_all(part_lse.view(cp, n_max, heads))[:, :n]
    out, _ = merge_partials(back, back_lse)
    return out


def local_key_count(
    lengths: torch.Tensor, block_size: int, cp_size: int, cp_rank: int
) -> torch.Tensor:
    """How many of positions [0, length) cp rank `cp_rank` holds, per length (int64)."""
    full, rem = lengths // block_size, lengths % block_size
    # Full blocks i < full with i % cp == cp_rank, then the partial block `full` if it is ours.
    whole = torch.clamp(full - cp_rank + cp_size - 1, min=0) // cp_size
    return whole * block_size + torch.where(full % cp_size == cp_rank, rem, 0)


def _pack_lse(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """(n, heads, d + k): out with its fp32 lse appended as k elements of out's dtype, bit for
    bit (2 bf16/fp16 halves, or the value itself in fp32/fp64), so one all-gather moves both."""
    lse = lse.float()
    tail = (
        lse[..., None].to(out.dtype) if out.element_size() >= 4 else lse[..., None].view(out.dtype)
    )
    return torch.cat([out, tail], dim=-1)


def _unpack_lse(packed: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    out, tail = packed[..., :head_dim], packed[..., head_dim:]
    lse = (
        tail.float()[..., 0]
        if packed.element_size() >= 4
        else tail.contiguous().view(torch.float32)[..., 0]
    )
    return out, lse


def cp_decode_attention(
    q: torch.Tensor,
    cache: LayerKV,
    block_tables: torch.Tensor,
    local_lens: torch.Tensor,
    comm: Collectives,
    scale: float,
    positions: torch.Tensor | None = None,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Decode attention of every sequence's query over the KV shards of all cp ranks.

    q: (batch, q_heads, head_dim), the same rows on every cp rank; block_tables / local_lens:
    this rank's blocks of each sequence and how many keys they hold (0 where this rank holds
    none yet). Returns the exact attention (batch, q_heads, head_dim) on every rank.
    window > 0 (a sliding window; `positions`, each query's position, required) reads only the
    blocks it can reach (`_windowed_decode`); softcap > 0 caps the scaled scores.

    No host sync and no data-dependent shape: a CUDA graph captures it. A row with no local
    keys reads one key of its (zero-padded) table and is then given lse -inf, so it weighs
    nothing in the merge.
    """
    if window:
        if positions is None:
            raise ValueError("a windowed cp decode needs each query's position")
        out, lse = _windowed_decode(
            q, cache, block_tables, local_lens, positions, comm, scale, window, softcap
        )
    else:
        empty = local_lens == 0
        out, maybe_lse = flash_decode(
            q,
            cache.k,
            cache.v,
            block_tables,
            local_lens.clamp(min=1),
            scale,
            softcap=softcap,
            return_lse=True,
            **cache.quant_args(),  # type: ignore[arg-type]
        )
        assert maybe_lse is not None
        out = out.masked_fill(empty[:, None, None], 0.0)
        lse = maybe_lse.float().masked_fill(empty[:, None], float("-inf"))
    gathered = comm.cp_all_gather(_pack_lse(out, lse))  # (cp, batch, q_heads, d + k)
    outs, lses = _unpack_lse(gathered, q.shape[-1])
    merged, _ = merge_partials(outs, lses)
    return merged


def window_blocks(window: int, block_size: int, cp_size: int) -> int:
    """The most of one cp rank's blocks a query's window of `window` positions can reach: the
    window meets at most (window - 1) // block_size + 2 logical blocks, every cp_size-th one
    this rank's."""
    return -(-((window - 1) // block_size + 2) // cp_size)


def _windowed_decode(
    q: torch.Tensor,
    cache: LayerKV,
    block_tables: torch.Tensor,
    local_lens: torch.Tensor,
    positions: torch.Tensor,
    comm: Collectives,
    scale: float,
    window: int,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One rank's partial (out, lse fp32) of a windowed layer's decode: each query at position
    p sees its sequence's keys at positions (p - window, p]. Those lie in this rank's last
    `window_blocks` local blocks of the sequence (local block j holds logical block
    j * cp + rank), so a fixed-size gather of them, masked by position, is the whole
    attention: blocks the window has passed, which the scheduler gave back and another
    sequence may hold now, are never visible."""
    cp, rank = comm.cp_size, comm.cp_rank
    batch, q_heads, d = q.shape
    bs, kv_heads = cache.k.shape[1], cache.k.shape[2]
    span = min(window_blocks(window, bs, cp), block_tables.shape[1])  # (none past the table)
    compute = torch.promote_types(q.dtype, torch.float32)
    nb = torch.div(local_lens + bs - 1, bs, rounding_mode="floor").long()  # local blocks used
    j = nb[:, None] - span + torch.arange(span, device=q.device)[None]  # (batch, span)
    ids = block_tables.long().gather(1, j.clamp(min=0, max=block_tables.shape[1] - 1))
    k = select_blocks(cache.k, cache.k_params, cache.bits, ids.flatten(), q.dtype)
    v = select_blocks(cache.v, cache.v_params, cache.bits, ids.flatten(), q.dtype)
    k = k.view(batch, span * bs, kv_heads, d).to(compute)
    v = v.view(batch, span * bs, kv_heads, d).to(compute)
    offsets = torch.arange(bs, device=q.device)
    key_pos = ((j * cp + rank) * bs)[:, :, None] + offsets  # (batch, span, bs)
    p = positions.long()[:, None, None]
    visible = (j[:, :, None] >= 0) & (key_pos <= p) & (key_pos > p - window)
    visible = visible.view(batch, 1, 1, span * bs)
    group = q_heads // kv_heads
    qg = q.to(compute).view(batch, kv_heads, group, d)
    scores = torch.einsum("bhgd,bmhd->bhgm", qg, k)  # (batch, kv_heads, group, keys)
    scores = soft_cap(scores, softcap, scale).masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (batch, kv_heads, group); -inf: no key here
    probs = torch.exp(scores - lse.nan_to_num(neginf=0.0)[..., None])
    out = torch.einsum("bhgm,bmhd->bhgd", probs, v).reshape(batch, q_heads, d)
    return out.to(q.dtype), lse.reshape(batch, q_heads).float()
