"""Pass-KV ring attention: exact causal attention of a fresh prefill spread over the cp ranks.

Each cp rank holds some rows (tokens) of the step's sequences, at arbitrary positions (block
striped in the runtime). Queries stay put; the K/V blocks travel round the ring, so after
cp - 1 shifts every rank has seen every rank's keys. Before computing on the block it holds,
a rank starts sending that block on to the next rank, so the transfer overlaps the compute
(as `ring_flash_attn_forward` in ring-flash-attention does).

Every ring message must have the same shape on every rank, so K/V are padded to the most rows
any rank holds; the padding rows are never read, because every rank knows every rank's layout
(`RankRows`, computed identically on all ranks from the step plan) and slices the real rows
out. Partial results are merged online by log-sum-exp in fp32, which is exact, so the output
equals single-device causal attention up to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.position_attention import merge_pair, position_attention
from workers.distributed import Collectives


@dataclass(frozen=True)
class RankRows:
    """The packed rows (tokens) one cp rank holds in a step."""

    positions: torch.Tensor
    """(n,) int64 absolute position of each row, on the compute device."""
    segments: list[tuple[int, int, int]]
    """(seq_index, row_start, row_count) per sequence with rows here. A sequence's rows are
    contiguous; seq_index numbers the step's sequences the same way on every rank."""


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layouts: list[RankRows],
    comm: Collectives,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of this rank's rows over every rank's rows of the same sequence.

    q: (n, q_heads, d), k, v: (n, kv_heads, d), this rank's rows as `layouts[comm.cp_rank]`
    describes them; `layouts[j]` is cp rank j's layout (the same list on every rank). Query row
    i (sequence s, position p) sees each key row of sequence s, on any rank, at position <= p
    (and > p - window with a sliding window, window > 0); softcap > 0 caps the scaled scores
    (`position_attention_ref`). A block wholly before every query's window still travels the
    ring (every message has one shape), but costs no compute.

    Returns out (n, q_heads, d) in q's dtype and lse (n, q_heads) fp32 (fp64 for fp64 inputs);
    a row that sees no key gets out 0 and lse -inf. Collective over the cp group: every cp rank
    must call it, even one without rows.
    """
    cp, rank = comm.cp_size, comm.cp_rank
    if len(layouts) != cp:
        raise ValueError(f"need one layout per cp rank ({cp}), got {len(layouts)}")
    mine = layouts[rank]
    n, q_heads, d = q.shape
    if mine.positions.shape != (n,) or k.shape[0] != n or v.shape != k.shape:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must hold the "
            f"{mine.positions.numel()} rows of cp rank {rank}'s layout"
        )
    compute = torch.promote_types(q.dtype, torch.float32)
    out = torch.zeros(n, q_heads, d, dtype=compute, device=q.device)
    lse = torch.full((n, q_heads), float("-inf"), dtype=compute, device=q.device)

    # Every rank computes the same n_max from the same layouts, so messages match in shape.
    n_max = max(lay.positions.numel() for lay in layouts)
    if n_max == 0:  # no rank has rows: no rank enters the ring
        return out.to(q.dtype), lse
    k_blk, v_blk = _pad(k, n_max), _pad(v, n_max)
    for step in range(cp):
        owner = (rank - step) % cp  # whose K/V this rank holds at this step
        # Send on what we hold before computing on it; the last block goes nowhere.
        transfer = comm.cp_ring_shift([k_blk, v_blk]) if step + 1 < cp else None
        _attend_block(q, mine, k_blk, v_blk, layouts[owner], scale, out, lse, window, softcap)
        if transfer is not None:
            k_blk, v_blk = transfer.wait()
    return out.to(q.dtype), lse


def _pad(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x with zero rows appended up to `rows`, contiguous (the ring sends it as is)."""
    if x.shape[0] == rows:
        return x.contiguous()
    padded = x.new_zeros((rows, *x.shape[1:]))
    padded[: x.shape[0]] = x
    return padded


def _attend_block(
    q: torch.Tensor,
    mine: RankRows,
    k_blk: torch.Tensor,
    v_blk: torch.Tensor,
    theirs: RankRows,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor,
    window: int = 0,
    softcap: float = 0.0,
) -> None:
    """Fold the attention of this rank's queries over one rank's key block into (out, lse).

    Only segments of the same sequence meet; position_attention masks by position and skips
    key tiles wholly in the queries' future, so blocks from later in the sequence cost little.
    """
    keys = {seq: (start, count) for seq, start, count in theirs.segments if count}
    for seq, q0, qn in mine.segments:
        if qn == 0 or seq not in keys:
            continue
        k0, kn = keys[seq]
        o, s = position_attention(
            q[q0 : q0 + qn],
            mine.positions[q0 : q0 + qn],
            k_blk[k0 : k0 + kn],
            v_blk[k0 : k0 + kn],
            theirs.positions[k0 : k0 + kn],
            scale,
            keys_sorted=True,  # a rank's rows of one sequence are its blocks in order
            window=window,
            softcap=softcap,
        )
        rows = slice(q0, q0 + qn)
        out[rows], lse[rows] = merge_pair(out[rows], lse[rows], o, s)
