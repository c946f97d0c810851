"""Pieces of cp > 1 decode that need no peers: each rank's key count, the packed (out, lse)
message, and the attention itself (with a window and capped scores too).
`tests/test_context_parallel.py` runs the whole path over Ray against one device."""

from __future__ import annotations

from typing import cast

import pytest
import torch

from workers.context_parallel import (
    _pack_lse,
    _unpack_lse,
    cp_decode_attention,
    local_key_count,
    local_positions,
)
from workers.distributed import Collectives
from workers.kv_cache import LayerKV


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_local_key_count_matches_the_positions_a_rank_holds(cp: int, block_size: int) -> None:
    lengths = torch.arange(0, 5 * block_size * cp + 3)
    for rank in range(cp):
        got = local_key_count(lengths, block_size, cp, rank)
        want = [local_positions(int(n), block_size, cp, rank).numel() for n in lengths]
        assert got.tolist() == want


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_lse_rides_with_the_output_bit_for_bit(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(3, 4, 8, generator=gen).to(dtype)
    lse = torch.randn(3, 4, generator=gen) * 50
    lse[0, 1] = float("-inf")
    packed = _pack_lse(out, lse)
    assert packed.dtype == dtype and packed.shape[:2] == (3, 4)
    # The all-gather stacks the ranks' messages in a new leading dim.
    o, s = _unpack_lse(torch.stack([packed, packed]), 8)
    assert torch.equal(o[1], out)
    assert torch.equal(s[0], lse) and s.dtype == torch.float32


class _Peer:
    """cp_all_gather for one rank of a cp = 2 group simulated in one process: `other` is the
    other rank's message, recorded beforehand from its `sent` (without one, this rank's own
    message stands in for it)."""

    cp_size = 2

    def __init__(self, rank: int, other: torch.Tensor | None = None):
        self.cp_rank, self.other = rank, other
        self.sent: torch.Tensor | None = None

    def cp_all_gather(self, x: torch.Tensor) -> torch.Tensor:
        self.sent = x.clone()
        other = x if self.other is None else self.other
        return torch.stack([x, other] if self.cp_rank == 0 else [other, x])


def _sharded_cache(
    lengths: list[int], kv_heads: int, d: int, block_size: int, dtype: torch.dtype, dev: str
) -> tuple[list[LayerKV], list[torch.Tensor], list[torch.Tensor], list[tuple]]:
    """Two cp ranks' caches holding sequences of `lengths` (logical block i on rank i % 2),
    each rank's zero-padded block tables and key counts, and every sequence's full K/V."""
    gen = torch.Generator().manual_seed(3)
    caches = [torch.zeros(2, 16, block_size, kv_heads, d, dtype=dtype, device=dev) for _ in "ab"]
    free = [1, 1]  # block 0 stays unused: the padding of the tables points there
    tables: list[list[list[int]]] = [[], []]
    full = []
    for n in lengths:
        k = torch.randn(n, kv_heads, d, generator=gen, dtype=torch.float64)
        v = torch.randn(n, kv_heads, d, generator=gen, dtype=torch.float64)
        full.append((k, v))
        own: list[list[int]] = [[], []]
        for i in range(-(-n // block_size)):
            rank = i % 2
            block, free[rank] = free[rank], free[rank] + 1
            own[rank].append(block)
            rows = slice(i * block_size, min(n, (i + 1) * block_size))
            caches[rank][0, block, : rows.stop - rows.start] = k[rows].to(dtype)
            caches[rank][1, block, : rows.stop - rows.start] = v[rows].to(dtype)
        for rank in (0, 1):
            tables[rank].append(own[rank])
    padded = []
    for rank in (0, 1):
        width = max(1, *(len(t) for t in tables[rank]))
        rows_ = [t + [0] * (width - len(t)) for t in tables[rank]]
        padded.append(torch.tensor(rows_, dtype=torch.int32, device=dev))
    counts = [
        local_key_count(torch.tensor(lengths), block_size, 2, rank).to(dev) for rank in (0, 1)
    ]
    layers = [LayerKV(k=c[0], v=c[1]) for c in caches]
    return layers, padded, counts, full


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
        ),
    ],
)
def test_cp_decode_attention_merges_both_shards(device: str) -> None:
    """Each rank's result equals attention over the whole sequence (float64 oracle), including
    sequences rank 1 holds no key of yet; on CUDA the rank-0 call also replays from a CUDA
    graph, its all-gather and merge included."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    lengths, q_heads, kv_heads, d, bs = [1, 4, 5, 9, 17, 40], 4, 2, 16, 4
    layers, tables, counts, full = _sharded_cache(lengths, kv_heads, d, bs, dtype, device)
    gen = torch.Generator().manual_seed(4)
    q64 = torch.randn(len(lengths), q_heads, d, generator=gen, dtype=torch.float64)
    q, scale = q64.to(dtype).to(device), d**-0.5
    assert counts[1].tolist() == [0, 0, 1, 4, 8, 20]

    def attend(rank: int, peer: _Peer, query: torch.Tensor = q) -> torch.Tensor:
        comm = cast(Collectives, peer)
        return cp_decode_attention(query, layers[rank], tables[rank], counts[rank], comm, scale)

    record = [_Peer(rank) for rank in (0, 1)]
    for rank in (0, 1):
        attend(rank, record[rank])
    got = [attend(rank, _Peer(rank, record[1 - rank].sent)) for rank in (0, 1)]
    group = q_heads // kv_heads

    def oracle(b: int) -> torch.Tensor:  # float64 over the values the caches hold
        k, v = (x.to(dtype).double().repeat_interleave(group, 1) for x in full[b])
        p = torch.softmax(torch.einsum("hd,khd->hk", q[b].double().cpu(), k) * scale, -1)
        return torch.einsum("hk,khd->hd", p, v)

    want = torch.stack([oracle(b) for b in range(len(lengths))])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for out in got:
        torch.testing.assert_close(out.double().cpu(), want, atol=tol, rtol=tol)
    if device == "cuda":
        peer = _Peer(0, record[1].sent)
        static_q = torch.zeros_like(q)
        attend(0, peer, static_q)  # warm-up outside the graph (Triton compiles)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graphed = attend(0, peer, static_q)
        static_q.copy_(q)  # the replay reads the query buffer as it is now
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(graphed, got[0])


@pytest.mark.parametrize(
    ("window", "softcap"),
    [(0, 2.0), (5, 0.0), (9, 2.0), (100, 0.0)],
    ids=["cap", "window-5", "window-9-cap", "window-past-the-table"],
)
def test_windowed_and_capped_cp_decode_matches_the_oracle(window: int, softcap: float) -> None:
    """A sliding window (each query at p sees positions (p - window, p]) and capped scores over
    both shards equal a float64 oracle over the visible keys alone, while the blocks the
    window has passed hold another sequence's (large) values, as they may once the scheduler
    gave them back; rows whose window holds none of a rank's keys merge to the same result."""
    from kernels.position_attention import soft_cap

    lengths, q_heads, kv_heads, d, bs = [1, 4, 5, 9, 17, 40], 4, 2, 16, 4
    layers, tables, counts, full = _sharded_cache(lengths, kv_heads, d, bs, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(5)
    for b, n in enumerate(lengths):
        passed = (n - window) // bs if window else 0  # whole blocks before the window
        for i in range(max(passed, 0)):
            block = int(tables[i % 2][b, i // 2])
            noise = 1e3 * torch.randn(2, bs, kv_heads, d, generator=gen)
            layers[i % 2].k[block], layers[i % 2].v[block] = noise[0], noise[1]
    q64 = torch.randn(len(lengths), q_heads, d, generator=gen, dtype=torch.float64)
    q, scale = q64.float(), d**-0.5
    positions = torch.tensor(lengths) - 1

    def attend(rank: int, peer: _Peer) -> torch.Tensor:
        comm = cast(Collectives, peer)
        return cp_decode_attention(
            q, layers[rank], tables[rank], counts[rank], comm, scale, positions, window, softcap
        )

    record = [_Peer(rank) for rank in (0, 1)]
    for rank in (0, 1):
        attend(rank, record[rank])
    got = [attend(rank, _Peer(rank, record[1 - rank].sent)) for rank in (0, 1)]
    group = q_heads // kv_heads

    def oracle(b: int) -> torch.Tensor:
        n = lengths[b]
        first = max(0, n - window) if window else 0
        k, v = (x[first:n].float().double().repeat_interleave(group, 1) for x in full[b])
        scores = soft_cap(torch.einsum("hd,khd->hk", q[b].double(), k), softcap, scale)
        return torch.einsum("hk,khd->hd", torch.softmax(scores, -1), v)

    want = torch.stack([oracle(b) for b in range(len(lengths))])
    for out in got:
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
