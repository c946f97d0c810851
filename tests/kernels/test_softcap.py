"""Attention-logit soft-capping (Gemma 2's `attn_logit_softcapping`): each scaled score s becomes
softcap * tanh(s / softcap) before the softmax. Checked against a float64 oracle: the paged
prefill and decode references (the tiled path, a shared cached prefix, a window), the position
reference, the native CPU decode kernel (fp32 and bf16, int8 / int4 caches, a window, a shared
prefix, splits, head_dim 256), and the Triton paged prefill and split-KV decode kernels (fp32
and bf16, int8 caches, with a window); softcap 0 leaves every result exactly as it was.

Without CUDA the kernels run in Triton's interpreter (see conftest.py), so shapes stay small.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import kernels.cpu_attention as CA
import kernels.flash_decode as FD
import kernels.paged_attention as PA
import kernels.position_attention as PO
from tests.kernels.test_attention_kernels import CPU, KV_HEADS, make_paged_batch, needs_triton
from tests.kernels.test_kv_quant import make_quant_batch
from tests.kernels.test_sliding_window import (
    _decode_args,
    _paged_args,
    _shared_prefix_batch,
    assert_matches,
    assert_same,
    paged_window_oracle,
    quant_window_oracle,
    window_attention_f64,
)

SCALE = 0.5
"""Scores of std about 4 at head_dim 64: a cap of 2 bends most of them."""
CAP = 2.0
SEQS = [(5, 37), (1, 18), (23, 23), (0, 9), (40, 61)]
DECODE = [(1, c) for c in (1, 37, 130, 16)]

pytestmark = pytest.mark.usefixtures("single_thread")  # (tests/kernels/conftest.py)


def _oracle(b, window: int = 0, softcap: float = CAP):  # type: ignore[no-untyped-def]
    return paged_window_oracle(
        b.q, b.cu_seqlens_q, b.context_lens, b.keys, b.values, SCALE, window, softcap
    )


@pytest.mark.parametrize("window", [0, 21])
def test_paged_attention_ref_softcap(window: int) -> None:
    b = make_paged_batch(SEQS, 4, 64, 16, torch.float32, CPU, seed=1)
    want_out, want_lse = _oracle(b, window)
    out, lse = PA.paged_attention_ref(
        *_paged_args(b, SCALE), return_lse=True, window=window, softcap=CAP
    )
    assert_matches(out, lse, want_out, want_lse)
    out, none = PA.paged_attention_ref(*_paged_args(b, SCALE), window=window, softcap=CAP)
    assert_matches(out, none, want_out, None)
    # The cap changes the answer (so the check above is of the cap).
    uncapped, _ = _oracle(b, window, softcap=0.0)
    assert (uncapped - want_out).abs().max() > 0.1


@pytest.mark.parametrize("window", [0, 21])
def test_long_chunk_ref_softcap_tiles(window: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past LARGE_SCORES pairs a chunk attends tile by tile, each tile capped."""
    monkeypatch.setattr(PA, "LARGE_SCORES", 256)
    monkeypatch.setattr(PA, "WINDOW_MIN_Q_TILE", 16)
    monkeypatch.setattr(PO, "Q_TILE", 16)
    monkeypatch.setattr(PO, "K_TILE", 8)
    b = make_paged_batch([(40, 100), (30, 30)], 2, 64, 16, torch.float32, CPU, seed=9)
    out, lse = PA.paged_attention_ref(
        *_paged_args(b, SCALE), return_lse=True, window=window, softcap=CAP
    )
    assert_matches(out, lse, *_oracle(b, window))


@pytest.mark.parametrize("window", [0, 5])
def test_decode_refs_softcap(window: int) -> None:
    b = make_paged_batch(DECODE, 2, 64, 16, torch.float32, CPU, seed=2)
    want_out, want_lse = _oracle(b, window)
    for return_lse in (True, False):
        got = FD.flash_decode(*_decode_args(b, SCALE), return_lse, window=window, softcap=CAP)
        assert_matches(*got, want_out, want_lse if return_lse else None)
        got = FD.flash_decode_ref(*_decode_args(b, SCALE), return_lse, window=window, softcap=CAP)
        assert_matches(*got, want_out, want_lse if return_lse else None)


def test_shared_prefix_decode_softcap() -> None:
    """A batch over one cached prefix caps the prefix's scores and each tail's alike."""
    q, k_cache, v_cache, tables, lens = _shared_prefix_batch([1, 5, 9, 2])
    assert PA._decode_plan(tables, lens, k_cache.shape[1]).shared >= PA.MIN_SHARED_BLOCKS
    q = q * 8  # (scores well past the cap)
    keys = [k_cache[tables[i].long()].flatten(0, 1)[: int(c)] for i, c in enumerate(lens)]
    values = [v_cache[tables[i].long()].flatten(0, 1)[: int(c)] for i, c in enumerate(lens)]
    cu = torch.arange(q.shape[0] + 1)
    want = paged_window_oracle(q, cu, lens, keys, values, 0.25, 0, CAP)
    out, lse = FD.flash_decode_ref(q, k_cache, v_cache, tables, lens, 0.25, True, softcap=CAP)
    assert_matches(out, lse, *want)


def test_position_attention_ref_softcap_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Query and key tiles, masked and unmasked, each capped before its merge."""
    monkeypatch.setattr(PO, "Q_TILE", 16)
    monkeypatch.setattr(PO, "K_TILE", 12)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(50, 2 * KV_HEADS, 64, generator=gen)
    k, v = torch.randn(2, 90, KV_HEADS, 64, generator=gen)
    q_pos, k_pos = torch.randint(0, 120, (50,), generator=gen), torch.randperm(120)[:90]
    q_pos, k_pos = q_pos.sort().values, k_pos.sort().values
    for window in (0, 30):
        out, lse = PO.position_attention_ref(
            q, q_pos, k, v, k_pos, SCALE, window=window, softcap=CAP
        )
        assert_matches(out, lse, *window_attention_f64(q, q_pos, k, v, k_pos, SCALE, window, CAP))


def test_softcap_float64_inputs_match_the_oracle_to_rounding() -> None:
    """float64 in, float64 out: the references agree with the oracle to 1e-10."""
    b = make_paged_batch(SEQS, 2, 32, 16, torch.float64, CPU, seed=4)
    want_out, want_lse = _oracle(b)
    out, lse = PA.paged_attention_ref(*_paged_args(b, SCALE), return_lse=True, softcap=CAP)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-10)
    assert lse is not None
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=1e-6)


def test_softcap_zero_changes_nothing_and_bad_caps_are_refused() -> None:
    b = make_paged_batch(SEQS, 2, 64, 16, torch.float32, CPU, seed=5)
    for return_lse in (True, False):
        want = PA.paged_attention_ref(*_paged_args(b, SCALE), return_lse)
        assert_same(PA.paged_attention_ref(*_paged_args(b, SCALE), return_lse, softcap=0.0), want)
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="softcap must be 0"):
            PA.paged_attention_ref(*_paged_args(b, SCALE), softcap=bad)


# -- the native CPU decode kernel against the oracle ------------------------------------------

needs_native = pytest.mark.skipif(
    CA._library() is None, reason="the native CPU kernels are not built (no C compiler)"
)


def _no_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make a fall-back to the torch reference fail the test (the kernel must serve the call)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the reference ran where the native kernel should have")

    monkeypatch.setattr(FD, "flash_decode_ref", refuse)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 5, 50])
def test_native_decode_softcap(
    dtype: torch.dtype, window: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through `flash_decode` on CPU: the native kernel caps each score, windowed or not."""
    _no_reference(monkeypatch)
    b = make_paged_batch(DECODE, 2, 64, 16, dtype, CPU, seed=11)
    want_out, want_lse = _oracle(b, window)
    out, lse = FD.flash_decode(*_decode_args(b, SCALE), True, window=window, softcap=CAP)
    assert_matches(out, lse, want_out, want_lse, dtype)
    uncapped, _ = _oracle(b, window, softcap=0.0)
    assert (uncapped - want_out).abs().max() > 0.1


@needs_native
def test_native_decode_softcap_across_splits_at_head_dim_256(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Gemma 2's head_dim, contexts long enough to be cut into splits merged by log-sum-exp."""
    _no_reference(monkeypatch)
    monkeypatch.setattr(CA, "MIN_SPLIT_BLOCKS", 2)
    b = make_paged_batch([(1, 300), (1, 77)], 2, 256, 8, torch.float32, CPU, seed=12)
    b = dataclasses.replace(b, q=b.q * 4)  # (scores well past the cap)
    splits, _ = CA.split_plan(2, -(-300 // 8), torch.get_num_threads())
    assert splits > 1
    out, lse = FD.flash_decode(*_decode_args(b, SCALE), True, softcap=CAP)
    assert_matches(out, lse, *_oracle(b))


@needs_native
@pytest.mark.parametrize("bits", [8, 4])
def test_native_decode_softcap_over_quantized_caches(
    bits: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_reference(monkeypatch)
    qb = make_quant_batch(DECODE, 2, 64, 16, bits, torch.float32, CPU, seed=13)
    quant = {"k_params": qb.k_params, "v_params": qb.v_params, "bits": bits}
    args = (qb.q, qb.k_cache, qb.v_cache, qb.block_tables, qb.context_lens, SCALE, True)
    for window in (0, 5):
        out, lse = FD.flash_decode(*args, **quant, window=window, softcap=CAP)  # type: ignore[arg-type]
        assert_matches(out, lse, *quant_window_oracle(qb, SCALE, window, CAP))


@needs_native
def test_native_decode_softcap_over_a_shared_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    """The prefix read once for every query and each tail on its own, both capped."""
    _no_reference(monkeypatch)
    q, k_cache, v_cache, tables, lens = _shared_prefix_batch([1, 5, 9, 2])
    q = q * 8
    keys = [k_cache[tables[i].long()].flatten(0, 1)[: int(c)] for i, c in enumerate(lens)]
    values = [v_cache[tables[i].long()].flatten(0, 1)[: int(c)] for i, c in enumerate(lens)]
    want = paged_window_oracle(q, torch.arange(q.shape[0] + 1), lens, keys, values, 0.25, 0, CAP)
    out, lse = FD.flash_decode(q, k_cache, v_cache, tables, lens, 0.25, True, softcap=CAP)
    assert_matches(out, lse, *want)


@needs_native
def test_native_decode_refuses_bad_caps() -> None:
    b = make_paged_batch(DECODE, 2, 64, 16, torch.float32, CPU, seed=14)
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.context_lens, SCALE, 130)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="softcap must be 0"):
            CA.paged_decode(*args, softcap=bad)


# -- Triton against the oracle ----------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 21])
def test_paged_attention_triton_softcap(device, dtype: torch.dtype, window: int) -> None:  # type: ignore[no-untyped-def]
    b = make_paged_batch(SEQS, 4, 64, 16, dtype, device, seed=6)
    want_out, want_lse = _oracle(b, window)
    out, lse = PA.paged_attention_triton(
        *_paged_args(b, SCALE), return_lse=True, window=window, softcap=CAP
    )
    assert_matches(out, lse, want_out, want_lse, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 5])
def test_flash_decode_triton_softcap(device, dtype: torch.dtype, window: int) -> None:  # type: ignore[no-untyped-def]
    b = make_paged_batch(DECODE, 2, 64, 16, dtype, device, seed=7)
    want_out, want_lse = _oracle(b, window)
    out, lse = FD.flash_decode_triton(
        *_decode_args(b, SCALE), return_lse=True, window=window, softcap=CAP
    )
    assert_matches(out, lse, want_out, want_lse, dtype)


@needs_triton
def test_triton_softcap_over_an_int8_cache(device) -> None:  # type: ignore[no-untyped-def]
    qb = make_quant_batch(SEQS, 2, 64, 16, 8, torch.float32, device, seed=8)
    args = (qb.q, qb.k_cache, qb.v_cache, qb.block_tables, qb.cu_seqlens_q, qb.context_lens)
    quant = {"k_params": qb.k_params, "v_params": qb.v_params, "bits": 8}
    want = quant_window_oracle(qb, SCALE, 0, CAP)
    out, lse = PA.paged_attention_triton(*args, SCALE, True, **quant, softcap=CAP)  # type: ignore[arg-type]
    assert_matches(out, lse, *want)
