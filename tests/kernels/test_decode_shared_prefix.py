"""Decode over a batch that shares its leading KV blocks (questions on one cached document):
the reference attends over the shared prefix once and merges with each tail by LSE. It must
equal a float64 oracle over each sequence's whole context."""

from __future__ import annotations

import pytest
import torch

import kernels.paged_attention as pa
from kernels.flash_decode import flash_decode_ref

BS = 4


def _oracle(q, k_cache, v_cache, tables, lens, scale):  # type: ignore[no-untyped-def]
    outs, lses = [], []
    for b in range(q.shape[0]):
        ids = tables[b, : -(-int(lens[b]) // BS)].long()
        k = k_cache.index_select(0, ids).flatten(0, 1)[: int(lens[b])].double()
        v = v_cache.index_select(0, ids).flatten(0, 1)[: int(lens[b])].double()
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        s = torch.einsum("hd,mhd->hm", q[b].double(), k) * scale
        lse = torch.logsumexp(s, -1)
        outs.append(torch.einsum("hm,mhd->hd", torch.exp(s - lse[:, None]), v))
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("tails", [[0, 1, 5, 9], [2, 2, 2], [0, 0]])
def test_shared_prefix_decode_matches_oracle(group: int, tails: list[int]) -> None:
    gen = torch.Generator().manual_seed(len(tails) * 10 + group)
    kv_heads, d, shared = 2, 16, 6  # 6 shared blocks of 4 tokens
    k_cache = torch.randn(64, BS, kv_heads, d, generator=gen)
    v_cache = torch.randn(64, BS, kv_heads, d, generator=gen)
    k_cache[40:] = float("nan")  # never referenced
    v_cache[40:] = float("nan")
    tables, lens, free = [], [], iter(range(shared, 40))
    for tail in tails:
        own = [next(free) for _ in range(-(-tail // BS))]
        tables.append(list(range(shared)) + own + [0] * (8 - len(own)))
        lens.append(shared * BS + tail)
    block_tables = torch.tensor(tables, dtype=torch.int32)
    context_lens = torch.tensor(lens, dtype=torch.int64)
    q = torch.randn(len(tails), kv_heads * group, d, generator=gen)
    assert pa._shared_blocks(block_tables, context_lens, BS) == shared
    out, lse = flash_decode_ref(q, k_cache, v_cache, block_tables, context_lens, 0.25, True)
    want_o, want_l = _oracle(q, k_cache, v_cache, block_tables, context_lens, 0.25)
    torch.testing.assert_close(out.double(), want_o, rtol=0, atol=2e-6)
    assert lse is not None
    torch.testing.assert_close(lse.double(), want_l, rtol=0, atol=2e-6)


def test_no_sharing_below_the_threshold() -> None:
    tables = torch.tensor([[0, 1, 2, 9], [0, 1, 3, 8]], dtype=torch.int32)
    assert pa._shared_blocks(tables, torch.tensor([16, 16]), BS) == 2
    assert pa._shared_blocks(tables, torch.tensor([16, 5]), BS) == 1  # block 1 not full for b=1
    assert pa._shared_blocks(tables[:1], torch.tensor([16]), BS) == 0  # one sequence
