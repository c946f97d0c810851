"""Pieces of cp > 1 decode that need no peers: each rank's key count and the packed (out, lse)
message. `tests/test_context_parallel.py` runs the whole path over Ray against one device."""

from __future__ import annotations

import pytest
import torch

from workers.context_parallel import _pack_lse, _unpack_lse, local_key_count, local_positions


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
