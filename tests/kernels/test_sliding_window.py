"""Sliding-window attention (Mistral v0.1, Phi-3-mini-4k, Qwen2 with use_sliding_window).

A query at position p sees the keys at positions p - W < k <= p (HF's `sliding_window_overlay`,
W keys counting its own); window 0 is no window. Each function takes `window=` and is checked
against a float64 oracle over every sequence's dense K/V: paged prefill and decode (references
and Triton), split-KV decode, the shared-prefix decode path (which a window must not take),
position attention, and int8 / int4 caches. window=0, and a window at least every context long,
give exactly the unwindowed result.

Without CUDA the kernels run in Triton's interpreter (see conftest.py), so shapes stay small.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

import kernels.flash_decode as FD
import kernels.kv_quant as KQ
import kernels.paged_attention as PA
import kernels.position_attention as PO
from tests.kernels.test_attention_kernels import (
    CPU,
    KV_HEADS,
    LSE_TOL,
    OUT_TOL,
    PagedBatch,
    assert_close,
    make_paged_batch,
    needs_triton,
    poison_free_memory,
)
from tests.kernels.test_kv_quant import QuantBatch, make_quant_batch

try:
    import triton
except ImportError:
    triton = None

if triton is not None and not torch.cuda.is_available():
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(PO._position_attn_kernel, InterpretedFunction):
        # Another module imported the kernels before conftest set TRITON_INTERPRET.
        importlib.reload(PO)

WINDOWS = [1, 5, 21, 40]
"""One key; under a 16-slot block; not a multiple of the block size; above some contexts."""
PREFILL_SEQS = [(5, 37), (1, 18), (23, 23), (0, 9), (40, 61), (3, 12), (1, 50)]
"""(q_len, context_len): chunks over cached prefixes of several lengths, decode tokens, a fresh
prompt, an empty sequence, several query tiles, contexts shorter than the longest window."""
DECODE_CONTEXTS = [1, 37, 130, 16, 64]
INTERPRETING = triton is not None and not torch.cuda.is_available()


pytestmark = pytest.mark.usefixtures("single_thread")  # (tests/kernels/conftest.py)


# -- oracle and checks ------------------------------------------------------------------------


def window_attention_f64(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    window: int,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 oracle: key j is visible to query i iff q_pos[i] - window < k_pos[j] <= q_pos[i]
    (no lower bound for window 0); softcap > 0 takes each scaled score s to
    softcap * tanh(s / softcap). Returns out (n, q_heads, d) and lse (n, q_heads)."""
    group = q.shape[1] // k.shape[1]
    k64 = k.double().cpu().repeat_interleave(group, dim=1)
    v64 = v.double().cpu().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,mhd->hnm", q.double().cpu(), k64) * scale  # (q_heads, n, m)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    qp, kp = q_pos.cpu()[:, None], k_pos.cpu()[None, :]
    hidden = kp > qp
    if window:
        hidden |= kp <= qp - window
    scores = scores.masked_fill(hidden, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (q_heads, n)
    probs = torch.exp(scores - lse.nan_to_num(neginf=0.0)[..., None])
    return torch.einsum("hnm,mhd->nhd", probs, v64), lse.transpose(0, 1)


def paged_window_oracle(
    q: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    scale: float,
    window: int,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's queries (at the last q_len of ctx positions) over its dense K/V."""
    outs, lses = [], []
    cu = cu_seqlens_q.tolist()
    for i, ctx in enumerate(context_lens.tolist()):
        qs = q[cu[i] : cu[i + 1]]
        q_pos = torch.arange(ctx - qs.shape[0], ctx)
        out, lse = window_attention_f64(
            qs, q_pos, keys[i], values[i], torch.arange(ctx), scale, window, softcap
        )
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def batch_oracle(b: PagedBatch, scale: float, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    return paged_window_oracle(b.q, b.cu_seqlens_q, b.context_lens, b.keys, b.values, scale, window)


def quant_window_oracle(
    qb: QuantBatch, scale: float, window: int, softcap: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Over the dequantized cache (in q's dtype, as the kernels dequantize), read by slot."""
    k, v = (
        KQ.dequantize_kv_ref(c.cpu(), p.cpu(), qb.bits, qb.q.dtype).flatten(0, 1)
        for c, p in ((qb.k_cache, qb.k_params), (qb.v_cache, qb.v_params))
    )
    keys, values = [k[s] for s in qb.slots], [v[s] for s in qb.slots]
    return paged_window_oracle(
        qb.q, qb.cu_seqlens_q, qb.context_lens, keys, values, scale, window, softcap
    )


def assert_matches(
    out: torch.Tensor,
    lse: torch.Tensor | None,
    want_out: torch.Tensor,
    want_lse: torch.Tensor | None,
    dtype: torch.dtype = torch.float32,
) -> None:
    assert not out.isnan().any(), "NaN in out: an unwritten row or a read of a poisoned slot"
    assert_close(out.double().cpu(), want_out.double().cpu(), OUT_TOL[dtype])
    if want_lse is None:
        assert lse is None
        return
    assert lse is not None and lse.dtype == torch.float32
    assert_close(lse.double().cpu(), want_lse.double().cpu(), LSE_TOL[dtype])


def assert_same(
    got: tuple[torch.Tensor, torch.Tensor | None], want: tuple[torch.Tensor, torch.Tensor | None]
) -> None:
    assert torch.equal(got[0], want[0])
    assert (got[1] is None) == (want[1] is None)
    if got[1] is not None and want[1] is not None:
        assert torch.equal(got[1], want[1])


PagedArgs = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, float]
"""(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale)"""
DecodeArgs = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, float]
"""(q, k_cache, v_cache, block_tables, context_lens, scale)"""


def _paged_args(b: PagedBatch, scale: float) -> PagedArgs:
    return (b.q, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.context_lens, scale)


def _decode_args(b: PagedBatch, scale: float) -> DecodeArgs:
    return (b.q, b.k_cache, b.v_cache, b.block_tables, b.context_lens, scale)


# -- references against the oracle ------------------------------------------------------------


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("group", [1, 4])
def test_paged_attention_ref_window(group: int, window: int) -> None:
    b = make_paged_batch(PREFILL_SEQS, group, 64, 16, torch.float32, CPU, seed=window)
    want_out, want_lse = batch_oracle(b, 0.125, window)
    out, lse = PA.paged_attention_ref(*_paged_args(b, 0.125), return_lse=True, window=window)
    assert_matches(out, lse, want_out, want_lse)
    out, none = PA.paged_attention_ref(*_paged_args(b, 0.125), window=window)
    assert_matches(out, none, want_out, None)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("group", [1, 4])
def test_decode_refs_window(group: int, window: int) -> None:
    """All-decode batches take `_decode` from both references: a window masks the keys before
    it, and the gather starts at the block of the shortest context's first visible key."""
    seqs = [(1, ctx) for ctx in DECODE_CONTEXTS]
    b = make_paged_batch(seqs, group, 64, 16, torch.float32, CPU, seed=window + 1)
    want_out, want_lse = batch_oracle(b, 0.125, window)
    for return_lse in (True, False):
        out, lse = FD.flash_decode_ref(*_decode_args(b, 0.125), return_lse, window=window)
        assert_matches(out, lse, want_out, want_lse if return_lse else None)
        out, lse = PA.paged_attention_ref(*_paged_args(b, 0.125), return_lse, window=window)
        assert_matches(out, lse, want_out, want_lse if return_lse else None)


@pytest.mark.parametrize("window", [5, 21])
def test_long_chunk_ref_window_tiles(window: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past LARGE_SCORES pairs a chunk attends through the tiled position reference, which
    skips key tiles below every query's window and masks those on its edge."""
    monkeypatch.setattr(PA, "LARGE_SCORES", 256)
    monkeypatch.setattr(PA, "WINDOW_MIN_Q_TILE", 16)
    monkeypatch.setattr(PO, "K_TILE", 8)
    tile = max(window, 16)  # (a windowed chunk's query tile: the window, 16 at least)
    calls: list[int] = []
    real = PO.attend_tile

    def spy(q: torch.Tensor, k: torch.Tensor, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(k.shape[0])
        return real(q, k, *args)

    monkeypatch.setattr(PO, "attend_tile", spy)
    seqs = [(40, 100), (30, 30)]
    b = make_paged_batch(seqs, 2, 64, 16, torch.float32, CPU, seed=3)
    want_out, want_lse = batch_oracle(b, 0.125, window)
    out, lse = PA.paged_attention_ref(*_paged_args(b, 0.125), return_lse=True, window=window)
    assert_matches(out, lse, want_out, want_lse)
    # Each query tile reads exactly the keys some of its queries see.
    reach = 0
    for n, ctx in seqs:
        first = max(ctx - n - window + 1, 0)
        for t in range(ctx - n, ctx, tile):
            reach += min(t + tile, ctx) - max(t - window + 1, first)
    assert sum(calls) == reach


@pytest.mark.parametrize("kind", ["sorted", "unsorted"])
@pytest.mark.parametrize("window", [1, 7, 30, 60])
def test_position_attention_ref_window(
    window: int, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Positions in any order; query and key tiles small enough that some are skipped below
    every window, some run unmasked (sorted keys, a window wider than a query tile's span of
    about 40 positions) and some are masked on either edge."""
    monkeypatch.setattr(PO, "Q_TILE", 16)
    monkeypatch.setattr(PO, "K_TILE", 12)
    masks: list[bool] = []
    real = PO.attend_tile

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: Any, *args: Any) -> Any:
        masks.append(visible is not None)
        return real(q, k, v, visible, *args)

    monkeypatch.setattr(PO, "attend_tile", spy)
    gen = torch.Generator().manual_seed(window)
    q = torch.randn(50, 2 * KV_HEADS, 64, generator=gen)
    k, v = torch.randn(2, 90, KV_HEADS, 64, generator=gen)
    q_pos = torch.randint(0, 120, (50,), generator=gen)
    k_pos = torch.randperm(120, generator=gen)[:90]
    if kind == "sorted":
        q_pos, k_pos = q_pos.sort().values, k_pos.sort().values
    out, lse = PO.position_attention_ref(q, q_pos, k, v, k_pos, 0.125, window=window)
    want_out, want_lse = window_attention_f64(q, q_pos, k, v, k_pos, 0.125, window)
    assert_matches(out, lse, want_out, want_lse)
    blind = want_lse.isneginf()
    assert (out[blind] == 0).all(), "a row that sees no key must get out 0"
    assert any(masks)
    if (kind, window) == ("sorted", 60):
        assert not all(masks)


def _shared_prefix_batch(
    tails: list[int], block_size: int = 4, shared: int = 6
) -> tuple[torch.Tensor, ...]:
    """(q, k_cache, v_cache, block_tables, context_lens): sequences whose first `shared` blocks
    are the same cache blocks (questions on one cached document), then their own tails."""
    gen = torch.Generator().manual_seed(len(tails))
    k_cache = torch.randn(40, block_size, KV_HEADS, 16, generator=gen)
    v_cache = torch.randn(40, block_size, KV_HEADS, 16, generator=gen)
    tables, lens, free = [], [], iter(range(shared, 40))
    for tail in tails:
        own = [next(free) for _ in range(-(-tail // block_size))]
        tables.append(list(range(shared)) + own + [0] * (4 - len(own)))
        lens.append(shared * block_size + tail)
    q = torch.randn(len(tails), 3 * KV_HEADS, 16, generator=gen)
    block_tables = torch.tensor(tables, dtype=torch.int32)
    return q, k_cache, v_cache, block_tables, torch.tensor(lens, dtype=torch.int64)


def _dense(k_cache: torch.Tensor, table: torch.Tensor, ctx: int) -> torch.Tensor:
    return k_cache[table.long()].flatten(0, 1)[:ctx]


def test_shared_prefix_decode_window() -> None:
    """A batch sharing its leading blocks takes the shared-prefix path without a window; a
    window shorter than the contexts must not (the shared blocks lie outside some windows)."""
    q, k_cache, v_cache, tables, lens = _shared_prefix_batch([1, 5, 9, 2])
    args = (q, k_cache, v_cache, tables, lens, 0.25)
    block_size = k_cache.shape[1]
    keys = [_dense(k_cache, tables[i], int(c)) for i, c in enumerate(lens)]
    values = [_dense(v_cache, tables[i], int(c)) for i, c in enumerate(lens)]
    cu = torch.arange(q.shape[0] + 1)
    assert PA._decode_plan(tables, lens, block_size).shared >= PA.MIN_SHARED_BLOCKS
    for window in (3, 7, 26):  # contexts 25, 29, 33, 26: 26 is shorter than two of them
        assert PA._decode_plan(tables, lens, block_size, window).shared == 0
        want_out, want_lse = paged_window_oracle(q, cu, lens, keys, values, 0.25, window)
        out, lse = FD.flash_decode_ref(*args, return_lse=True, window=window)
        assert_matches(out, lse, want_out, want_lse)
    # A window covering every context changes nothing: the shared-prefix path, bit for bit.
    unwindowed = FD.flash_decode_ref(*args, return_lse=True)
    covering = int(lens.max())
    assert PA._decode_plan(tables, lens, block_size, covering).shared >= PA.MIN_SHARED_BLOCKS
    assert_same(FD.flash_decode_ref(*args, return_lse=True, window=covering), unwindowed)
    # Within one forward pass the plan cache keeps windows apart.
    with PA.layer_invariant_scope():
        assert_same(FD.flash_decode_ref(*args, return_lse=True), unwindowed)
        out, lse = FD.flash_decode_ref(*args, return_lse=True, window=7)
        assert_matches(out, lse, *paged_window_oracle(q, cu, lens, keys, values, 0.25, 7))
        assert_same(FD.flash_decode_ref(*args, return_lse=True), unwindowed)


def test_no_window_and_covering_windows_change_nothing() -> None:
    """window=0 and a window at least the longest context give the unwindowed result exactly."""
    b = make_paged_batch(PREFILL_SEQS, 2, 64, 16, torch.float32, CPU, seed=5)
    longest = int(b.context_lens.max())
    dec = make_paged_batch([(1, c) for c in DECODE_CONTEXTS], 2, 64, 16, torch.float32, CPU)
    gen = torch.Generator().manual_seed(5)
    q_pos, k_pos = torch.randint(0, 80, (30,), generator=gen), torch.randperm(80, generator=gen)
    k, v = torch.randn(2, 80, KV_HEADS, 64, generator=gen)
    for return_lse in (True, False):
        want = PA.paged_attention_ref(*_paged_args(b, 0.125), return_lse)
        want_dec = FD.flash_decode_ref(*_decode_args(dec, 0.125), return_lse)
        for window in (0, longest, longest + 7):
            got = PA.paged_attention_ref(*_paged_args(b, 0.125), return_lse, window=window)
            assert_same(got, want)
        for window in (0, max(DECODE_CONTEXTS), 1000):
            got = FD.flash_decode_ref(*_decode_args(dec, 0.125), return_lse, window=window)
            assert_same(got, want_dec)
    want_pos = PO.position_attention_ref(b.q[:30], q_pos, k, v, k_pos, 0.125)
    for window in (0, 80, 200):  # positions span 80: no window of 80 hides a key
        got_pos = PO.position_attention_ref(b.q[:30], q_pos, k, v, k_pos, 0.125, window=window)
        assert_same(got_pos, want_pos)


def test_negative_window_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIST_RUNTIME_KERNELS", "torch")
    b = make_paged_batch([(1, 9)], 2, 64, 16, torch.float32, CPU)
    positions = (b.q, torch.arange(8, 9), b.keys[0], b.values[0], torch.arange(9), 0.125)
    fns: list[tuple[Callable[..., object], tuple[Any, ...]]] = [
        (PA.paged_attention_ref, _paged_args(b, 0.125)),
        (PA.paged_attention, _paged_args(b, 0.125)),
        (FD.flash_decode_ref, _decode_args(b, 0.125)),
        (FD.flash_decode, _decode_args(b, 0.125)),
        (PO.position_attention_ref, positions),
        (PO.position_attention, positions),
    ]
    if triton is not None:
        fns += [
            (PA.paged_attention_triton, _paged_args(b, 0.125)),
            (FD.flash_decode_triton, _decode_args(b, 0.125)),
        ]
    for fn, args in fns:
        with pytest.raises(ValueError, match="-3"):
            fn(*args, window=-3)


# -- quantized caches -------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_cache_window(bits: int, device: torch.device) -> None:
    """int8 / int4 caches: the references and kernels attend over the dequantized window."""
    window = 21
    qb = make_quant_batch(PREFILL_SEQS, 2, 32, 16, bits, torch.float32, device, seed=bits)
    want_out, want_lse = quant_window_oracle(qb, 0.125, window)
    fns: list[Callable[..., tuple[torch.Tensor, torch.Tensor | None]]] = [PA.paged_attention_ref]
    if triton is not None:
        fns.append(PA.paged_attention_triton)
    for fn in fns:
        out, lse = fn(*qb.paged_args, 0.125, True, **qb.quant, window=window)
        assert_matches(out, lse, want_out, want_lse)

    dec = make_quant_batch(
        [(1, c) for c in DECODE_CONTEXTS], 2, 32, 16, bits, torch.float32, device, seed=bits
    )
    want_out, want_lse = quant_window_oracle(dec, 0.125, 5)
    fns = [FD.flash_decode_ref] + ([FD.flash_decode_triton] if triton is not None else [])
    for fn in fns:
        out, lse = fn(*dec.decode_args, 0.125, True, **dec.quant, window=5)
        assert_matches(out, lse, want_out, want_lse)


# -- Triton kernels ---------------------------------------------------------------------------

KERNEL_CASES = [
    (1, 16, torch.float32),  # key tiles inside one cache block: one table load per tile
    (4, 8, torch.float32),  # blocks smaller than a key tile: gathered per key
    (2, 64, torch.bfloat16),
]
"""(group, block_size, dtype); the interpreter's key tile is 16."""


def _case_id(case: tuple[int, int, torch.dtype]) -> str:
    group, block_size, dtype = case
    return f"g{group}-bs{block_size}-{str(dtype).removeprefix('torch.')}"


@needs_triton
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=_case_id)
def test_paged_attention_triton_window(
    case: tuple[int, int, torch.dtype], window: int, device: torch.device
) -> None:
    group, block_size, dtype = case
    b = make_paged_batch(PREFILL_SEQS, group, 64, block_size, dtype, device, seed=window)
    args = _paged_args(b, 0.125)
    tokens, heads, _ = b.q.shape
    poison_free_memory(device, (b.q.numel(), dtype), (tokens * heads, torch.float32))
    out, lse = PA.paged_attention_triton(*args, return_lse=True, window=window)
    if dtype == torch.float32:
        assert_matches(out, lse, *batch_oracle(b, 0.125, window))
    ref_out, ref_lse = PA.paged_attention_ref(*args, return_lse=True, window=window)
    assert_matches(out, lse, ref_out, ref_lse, dtype)


@needs_triton
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=_case_id)
def test_flash_decode_triton_window(
    case: tuple[int, int, torch.dtype],
    window: int,
    device: torch.device,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Several splits per sequence (and, for one case, two key tiles per split at least): the
    splits cut the window from the tile that holds its first key."""
    group, block_size, dtype = case
    monkeypatch.setattr(FD, "PROGRAMS_PER_SM", 8)
    if block_size == 8:
        monkeypatch.setattr(FD, "MIN_SPLIT_TILES", 2)
    seqs = [(1, ctx) for ctx in DECODE_CONTEXTS]
    b = make_paged_batch(seqs, group, 64, block_size, dtype, device, seed=window + 2)
    args = _decode_args(b, 0.125)
    out, lse = FD.flash_decode_triton(*args, return_lse=True, window=window)
    if dtype == torch.float32:
        assert_matches(out, lse, *batch_oracle(b, 0.125, window))
    ref_out, ref_lse = FD.flash_decode_ref(*args, return_lse=True, window=window)
    assert_matches(out, lse, ref_out, ref_lse, dtype)
    out_only, none = FD.flash_decode_triton(*args, window=window)
    assert_matches(out_only, none, ref_out, None, dtype)


@needs_triton
def test_split_plan_counts_the_window(device: torch.device) -> None:
    """A long session's decode plans its splits on the window (plus one key tile), not on the
    block table's width."""
    wide = FD.split_plan(1, KV_HEADS, 1 << 20, 16, device)
    assert FD.split_plan(1, KV_HEADS, 1 << 20, 16, device, window=21) == min(wide, 3)
    assert FD.split_plan(1, KV_HEADS, 20, 16, device, window=100) == 2


@needs_triton
def test_triton_covering_windows_change_nothing(device: torch.device) -> None:
    """A window at least the table's width compiles the kernels without one: the unwindowed
    result bit for bit (in the interpreter). A window covering every context but not the width
    runs the windowed kernels over every key: prefill walks the same tiles (bit for bit
    again), decode splits them otherwise (split 0 takes the first tile apart)."""
    b = make_paged_batch(PREFILL_SEQS, 2, 64, 16, torch.float32, device, seed=6)
    width = b.block_tables.shape[1] * 16
    longest = int(b.context_lens.max())
    dec = make_paged_batch([(1, c) for c in DECODE_CONTEXTS], 2, 64, 16, torch.float32, device)
    dec_width = dec.block_tables.shape[1] * 16
    want = PA.paged_attention_triton(*_paged_args(b, 0.125), True)
    want_dec = FD.flash_decode_triton(*_decode_args(dec, 0.125), True)
    for window in (longest, width):
        got = PA.paged_attention_triton(*_paged_args(b, 0.125), True, window=window)
        if INTERPRETING:
            assert_same(got, want)
        else:
            assert_matches(*got, *want)
    for window in (max(DECODE_CONTEXTS), dec_width):
        got = FD.flash_decode_triton(*_decode_args(dec, 0.125), True, window=window)
        if INTERPRETING and window == dec_width:
            assert_same(got, want_dec)
        else:
            assert_matches(*got, *want_dec)


@needs_triton
def test_masked_first_tiles_keep_precision(device: torch.device) -> None:
    """Rows whose first key tiles are all masked (below their window, or in their future) and
    whose real scores are far below 0: the running max must come from the first key they see,
    or exp2(score - 0) underflows to 0 and the row reads as blind."""
    head_dim, n, ctx = 32, 20, 48
    gen = torch.Generator().manual_seed(8)
    b = make_paged_batch([(n, ctx)], 1, head_dim, 16, torch.float32, device, seed=8)
    ones = torch.ones(head_dim, device=device)
    k_cache = torch.where(b.k_cache.isnan(), b.k_cache, ones)  # every key the same vector
    q = (-40.0 * ones).expand(n, KV_HEADS, head_dim).contiguous()  # scores -40 * 32 / sqrt(32)
    args = (q, k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.context_lens, head_dim**-0.5)
    keys = [torch.ones(ctx, KV_HEADS, head_dim)]
    want_out, want_lse = paged_window_oracle(
        q, b.cu_seqlens_q, b.context_lens, keys, b.values, head_dim**-0.5, 3
    )
    assert float(want_lse.max()) < -200
    out, lse = PA.paged_attention_triton(*args, return_lse=True, window=3)
    assert_matches(out, lse, want_out, want_lse)
    # Keys in descending positions: the first key tiles lie in the early queries' future.
    k_pos = torch.arange(ctx - 1, -1, -1)
    q_pos = torch.arange(ctx - n, ctx)
    k = torch.ones(ctx, KV_HEADS, head_dim, device=device)
    v = torch.randn(ctx, KV_HEADS, head_dim, generator=gen).to(device)
    out, lse = PO.position_attention_triton(
        q, q_pos.to(device), k, v, k_pos.to(device), head_dim**-0.5
    )
    assert_matches(out, lse, *window_attention_f64(q, q_pos, k, v, k_pos, head_dim**-0.5, 0))


# -- dispatch ---------------------------------------------------------------------------------


def test_dispatchers_pass_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """paged_attention, flash_decode and position_attention hand `window` to whichever
    implementation runs."""
    seen: list[tuple[str, int]] = []

    def spy(name: str) -> Callable[..., tuple[torch.Tensor, None]]:
        def fn(q: torch.Tensor, *args: Any, window: int = 0, **kwargs: Any) -> Any:
            seen.append((name, window))
            return q, None

        return fn

    for module, name in [
        (PA, "paged_attention_triton"),
        (PA, "paged_attention_ref"),
        (FD, "flash_decode_triton"),
        (FD, "flash_decode_cpu"),
        (FD, "flash_decode_ref"),
    ]:
        monkeypatch.setattr(module, name, spy(name))
    b = make_paged_batch([(1, 9)], 2, 64, 16, torch.float32, CPU)
    native = [True]
    monkeypatch.setattr(FD, "native_decode_supported", lambda *_: native[0])
    want = []
    for kernels in ("triton", "torch") if triton is not None else ("torch",):
        monkeypatch.setenv("DIST_RUNTIME_KERNELS", kernels)
        PA.paged_attention(*_paged_args(b, 0.125), window=7)
        for native[0] in (True, False):
            FD.flash_decode(*_decode_args(b, 0.125), window=7)
        if kernels == "triton":
            want += ["paged_attention_triton", "flash_decode_triton", "flash_decode_triton"]
        else:
            want += ["paged_attention_ref", "flash_decode_cpu", "flash_decode_ref"]
    assert seen == [(name, 7) for name in want]

    q_pos, k_pos = torch.arange(8, 9), torch.arange(9)
    args = (b.q, q_pos, b.keys[0], b.values[0], k_pos, 0.125)
    if triton is not None:  # (the kernel takes the window and a cap as they are)
        calls: list[tuple[Any, ...]] = []
        real = PO.position_attention_triton

        def spy_kernel(*a: Any) -> tuple[torch.Tensor, torch.Tensor]:
            calls.append(a)
            return real(*a)

        monkeypatch.setattr(PO, "position_attention_triton", spy_kernel)
        monkeypatch.setenv("DIST_RUNTIME_KERNELS", "triton")
        got = PO.position_attention(*args, window=4, softcap=2.0)
        assert [c[-2:] for c in calls] == [(4, 2.0)]
    monkeypatch.setenv("DIST_RUNTIME_KERNELS", "torch")
    got = PO.position_attention(*args, window=4)
    want_pos = window_attention_f64(*args, 4)
    assert_matches(*got, *want_pos)
