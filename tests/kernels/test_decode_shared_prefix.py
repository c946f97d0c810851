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
    assert pa.shared_blocks(block_tables, context_lens, BS) == shared
    out, lse = flash_decode_ref(q, k_cache, v_cache, block_tables, context_lens, 0.25, True)
    want_o, want_l = _oracle(q, k_cache, v_cache, block_tables, context_lens, 0.25)
    torch.testing.assert_close(out.double(), want_o, rtol=0, atol=2e-6)
    assert lse is not None
    torch.testing.assert_close(lse.double(), want_l, rtol=0, atol=2e-6)


def test_no_sharing_below_the_threshold() -> None:
    tables = torch.tensor([[0, 1, 2, 9], [0, 1, 3, 8]], dtype=torch.int32)
    assert pa.shared_blocks(tables, torch.tensor([16, 16]), BS) == 2
    assert pa.shared_blocks(tables, torch.tensor([16, 5]), BS) == 1  # block 1 not full for b=1
    assert pa.shared_blocks(tables[:1], torch.tensor([16]), BS) == 0  # one sequence


def test_a_forward_pass_plans_decode_once_and_never_reuses_a_refilled_buffer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Inside `layer_invariant_scope` (one forward pass) every layer after the first reuses the
    step's decode plan; a later pass over the same tensors, refilled in place as CUDA-graph
    buffers are, plans again and attends over the new contexts."""
    gen = torch.Generator().manual_seed(7)
    k_cache = torch.randn(32, BS, 2, 16, generator=gen)
    v_cache = torch.randn(32, BS, 2, 16, generator=gen)
    q = torch.randn(3, 6, 16, generator=gen)
    tables = torch.arange(30, dtype=torch.int32).view(3, 10)
    lens = torch.tensor([9, 17, 30])
    calls: list[int] = []
    real = pa.shared_blocks

    def counted(*args: object) -> int:
        calls.append(1)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(pa, "shared_blocks", counted)
    with pa.layer_invariant_scope():
        for _ in range(4):  # four layers
            out, lse = flash_decode_ref(q, k_cache, v_cache, tables, lens, 0.25, True)
    assert len(calls) == 1
    lens.copy_(torch.tensor([5, 30, 12]))  # the same buffer, the next step's contexts
    tables.copy_(tables.flip(0))
    with pa.layer_invariant_scope():
        out, lse = flash_decode_ref(q, k_cache, v_cache, tables, lens, 0.25, True)
    assert len(calls) == 2
    want_out, want_lse = _oracle(q, k_cache, v_cache, tables, lens, 0.25)
    assert lse is not None
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)
