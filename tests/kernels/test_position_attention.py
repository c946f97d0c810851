"""Position attention: the reference and the Triton kernel against a float64 oracle.

Query i sees key j iff k_pos[j] <= q_pos[i]. Positions come sorted, unsorted, striped as context
parallelism lays out a sequence's blocks over ranks, or wholly after the queries (every row
blind: out 0, lse -inf). Without CUDA the kernel runs in Triton's interpreter, so its shapes stay
small; the reference's tiling is checked on longer inputs with its tiles shrunk.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import kernels.flash_attn as FA
import kernels.position_attention as PA

try:
    import triton
except ImportError:
    triton = None

if triton is not None and not torch.cuda.is_available():
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(PA._position_attn_kernel, InterpretedFunction):
        # Another module imported the kernels before conftest set TRITON_INTERPRET.
        importlib.reload(FA)
        importlib.reload(PA)

needs_triton = pytest.mark.skipif(triton is None, reason="triton is not installed")

NAN = float("nan")
KV_HEADS = 2
OUT_TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    # bf16 output rounding (2^-8 relative) plus, on GPU, P rounded to bf16 before P @ V.
    torch.bfloat16: (2e-2, 2e-2),
}
"""(rtol, atol) of outputs against the oracle (run on the same, rounded, inputs)."""
LSE_TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-4, 1e-4),
}
KINDS = ["sorted", "unsorted", "striped", "future"]
CP, STRIPE = 4, 8
"""Context-parallel ranks and tokens per striped block."""
Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""(q, q_pos, k, v, k_pos)"""


pytestmark = pytest.mark.usefixtures("single_thread")  # (tests/kernels/conftest.py)


# -- inputs, oracle, checks -------------------------------------------------------------------


def striped(rank: int, length: int) -> torch.Tensor:
    """The first `length` positions of `rank`: blocks rank, rank + CP, ... of STRIPE tokens."""
    blocks = -(-length // STRIPE)
    starts = (rank + CP * torch.arange(blocks)) * STRIPE
    return (starts[:, None] + torch.arange(STRIPE)).flatten()[:length]


def positions(kind: str, n: int, m: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_pos (n,), k_pos (m,)) int64. Random kinds tie query and key positions and leave the
    lowest queries before every key."""
    span = 2 * max(n, m) + 10
    if kind in ("sorted", "unsorted"):
        q_pos = torch.randint(0, span, (n,), generator=gen)
        k_pos = torch.randperm(span, generator=gen)[:m]
        if kind == "sorted":
            q_pos, k_pos = q_pos.sort().values, k_pos.sort().values
        return q_pos, k_pos
    if kind == "striped":
        # Rank 1's queries over the keys of ranks 2 and 0, gathered in rank order (unsorted).
        half = m // 2
        return striped(1, n), torch.cat([striped(2, half), striped(0, m - half)])
    if kind == "shard":
        # A chunk's queries gathered from every rank (rank order) over rank 0's sorted keys.
        per = -(-n // CP)
        q_pos = torch.cat([striped(r, per) for r in range(CP)])[:n]
        return q_pos, striped(0, m)
    if kind == "ring":
        # One ring step: rank CP-1's queries over rank 0's keys, both sorted.
        return striped(CP - 1, n), striped(0, m)
    if kind == "future":
        return torch.randint(0, span, (n,), generator=gen), span + torch.randperm(m, generator=gen)
    raise ValueError(kind)


def make_inputs(
    n: int,
    m: int,
    group: int,
    head_dim: int,
    dtype: torch.dtype,
    kind: str,
    seed: int,
    device: torch.device | str = "cpu",
) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, group * KV_HEADS, head_dim, generator=gen).to(dtype).to(device)
    kv = torch.randn(m, 2, KV_HEADS, head_dim, generator=gen).to(dtype).to(device)
    q_pos, k_pos = positions(kind, n, m, gen)
    # K and V interleaved per token: strided token dimension, unit head_dim stride.
    return q, q_pos.to(device), kv[:, 0], kv[:, 1], k_pos.to(device)


def oracle(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force float64 attention: out (n, q_heads, d) and lse (n, q_heads); a window hides
    keys at or before q_pos - window, a soft-cap bends the scaled scores by cap * tanh(s / cap)."""
    group = q.shape[1] // k.shape[1]
    k64 = k.double().repeat_interleave(group, dim=1)
    v64 = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,mhd->hnm", q.double(), k64) * scale  # (q_heads, n, m)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    hidden = k_pos[None, :] > q_pos[:, None]
    if window:
        hidden |= k_pos[None, :] <= q_pos[:, None] - window
    scores = scores.masked_fill(hidden, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.nan_to_num(neginf=0.0)[..., None])
    return torch.einsum("hnm,mhd->nhd", probs, v64), lse.transpose(0, 1)


def poison_free_memory(device: torch.device, *sizes: tuple[int, torch.dtype]) -> None:
    """Hand NaN-filled blocks back to the allocator, so an unwritten output row shows as NaN."""
    blocks = [torch.full((n,), NAN, dtype=dt, device=device) for n, dt in sizes if n]
    del blocks


def assert_matches_oracle(
    out: torch.Tensor,
    lse: torch.Tensor,
    inputs: Inputs,
    scale: float,
    lse_dtype: torch.dtype = torch.float32,
    window: int = 0,
    softcap: float = 0.0,
) -> None:
    q = inputs[0]
    ref_out, ref_lse = oracle(*inputs, scale, window, softcap)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:2] and lse.dtype == lse_dtype
    assert not out.isnan().any() and not lse.isnan().any()
    rtol, atol = OUT_TOL[q.dtype]
    torch.testing.assert_close(out.double().cpu(), ref_out.cpu(), rtol=rtol, atol=atol)
    rtol, atol = LSE_TOL[q.dtype]
    # assert_close compares -inf exactly: blind rows must be -inf on both sides.
    torch.testing.assert_close(lse.double().cpu(), ref_lse.cpu(), rtol=rtol, atol=atol)
    blind = ref_lse.isinf().cpu()
    assert (out.cpu()[blind] == 0).all(), "a row that sees no key must get out 0"


def _scale(head_dim: int) -> float:
    return head_dim**-0.5


# -- reference ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_ref_matches_oracle(group: int, head_dim: int, kind: str) -> None:
    inputs = make_inputs(37, 90, group, head_dim, torch.float32, kind, seed=group + head_dim)
    out, lse = PA.position_attention_ref(*inputs, _scale(head_dim))
    assert_matches_oracle(out, lse, inputs, _scale(head_dim))
    if kind == "future":
        assert lse.isinf().all() and (out == 0).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
def test_ref_other_dtypes(dtype: torch.dtype, kind: str) -> None:
    """bf16 runs the fused CPU kernel in bf16; fp64 the plain-math tile with an fp64 lse."""
    inputs = make_inputs(41, 75, 2, 64, dtype, kind, seed=3)
    out, lse = PA.position_attention_ref(*inputs, 0.125)
    assert_matches_oracle(out, lse, inputs, 0.125, torch.promote_types(dtype, torch.float32))


@pytest.mark.parametrize("kind", ["sorted", "unsorted", "striped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_ref_tiling(dtype: torch.dtype, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many query and key tiles: skipped, unmasked and masked ones, merged by LSE."""
    monkeypatch.setattr(PA, "Q_TILE", 64)
    monkeypatch.setattr(PA, "K_TILE", 96)
    inputs = make_inputs(300, 700, 2, 64, dtype, kind, seed=4)
    out, lse = PA.position_attention_ref(*inputs, 0.125)
    assert_matches_oracle(out, lse, inputs, 0.125, torch.promote_types(dtype, torch.float32))


def test_ref_empty() -> None:
    for n, m in [(0, 9), (12, 0), (0, 0)]:
        inputs = make_inputs(n, m, 2, 64, torch.float32, "unsorted", seed=5)
        out, lse = PA.position_attention_ref(*inputs, 0.125)
        assert out.shape == (n, 2 * KV_HEADS, 64) and lse.shape == (n, 2 * KV_HEADS)
        assert (out == 0).all() and lse.isneginf().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merge_partials_equals_union(dtype: torch.dtype) -> None:
    """Partial results over disjoint key subsets merge into attention over their union.

    Keys go to 4 parts: one empty, one holding only keys after every query (its rows all blind),
    two random; rows that see no key at all stay out 0, lse -inf after the merge.
    """
    q, q_pos, k, v, k_pos = make_inputs(33, 80, 2, 64, dtype, "unsorted", seed=6)
    gen = torch.Generator().manual_seed(7)
    late = k_pos > q_pos.max()
    part = torch.where(late, 1, 2 + torch.randint(0, 2, (k.shape[0],), generator=gen))
    outs, lses = [], []
    for p in range(4):
        sel = part == p
        out, lse = PA.position_attention_ref(q, q_pos, k[sel], v[sel], k_pos[sel], 0.125)
        outs.append(out)
        lses.append(lse)
    assert lses[0].isneginf().all() and lses[1].isneginf().all()
    out, lse = PA.merge_partials(torch.stack(outs), torch.stack(lses))
    assert_matches_oracle(out, lse, (q, q_pos, k, v, k_pos), 0.125)


# -- Triton ---------------------------------------------------------------------------------------

TRITON_CASES = [
    (group, head_dim, torch.float32, kind, 37 + 11 * group, 90 + 3 * group + head_dim // 8)
    for group in (1, 2, 4)
    for head_dim in (64, 128)
    for kind in KINDS
] + [
    # (group, head_dim, dtype, kind, n, m)
    (4, 128, torch.bfloat16, "sorted", 37, 90),
    (1, 64, torch.bfloat16, "striped", 33, 50),
    (2, 64, torch.bfloat16, "unsorted", 20, 64),
]
"""Interpreter tiles are BLOCK_M = 32 rows (32 // group tokens) by BLOCK_N = 16 keys, so each
case has several row tiles and most a partial last key tile (m = 112 has none); sorted inputs
take the skip, unmasked and masked paths."""


def _case_id(case: tuple[int, int, torch.dtype, str, int, int]) -> str:
    group, head_dim, dtype, kind, n, m = case
    return f"g{group}-d{head_dim}-{str(dtype).removeprefix('torch.')}-{kind}-{n}x{m}"


@needs_triton
@pytest.mark.parametrize("case", TRITON_CASES, ids=_case_id)
def test_triton_matches_oracle(
    case: tuple[int, int, torch.dtype, str, int, int], device: torch.device
) -> None:
    group, head_dim, dtype, kind, n, m = case
    inputs = make_inputs(n, m, group, head_dim, dtype, kind, seed=8 + group, device=device)
    poison_free_memory(device, (n * group * KV_HEADS * head_dim, dtype))
    out, lse = PA.position_attention_triton(*inputs, _scale(head_dim))
    assert_matches_oracle(out, lse, inputs, _scale(head_dim))


SORTED_KEY_CASES = [
    (group, head_dim, torch.float32, kind, 37 + 11 * group, 90 + 3 * group + head_dim // 8)
    for group in (1, 4)
    for head_dim in (64, 128)
    for kind in ("sorted", "shard", "ring", "future")
] + [
    (4, 128, torch.bfloat16, "shard", 45, 70),
    (2, 64, torch.bfloat16, "ring", 30, 64),
]
"""Keys in non-decreasing position order, as the cp callers promise with keys_sorted=True
("future" keys are shuffled there; here they are sorted below)."""


@needs_triton
@pytest.mark.parametrize("case", SORTED_KEY_CASES, ids=_case_id)
def test_triton_sorted_keys_matches_oracle(
    case: tuple[int, int, torch.dtype, str, int, int], device: torch.device
) -> None:
    """The pipelined path (key range per query tile found up front) against the oracle."""
    group, head_dim, dtype, kind, n, m = case
    q, q_pos, k, v, k_pos = make_inputs(n, m, group, head_dim, dtype, kind, 12 + group, device)
    k_pos = k_pos.sort().values
    inputs = (q, q_pos, k, v, k_pos)
    poison_free_memory(device, (n * group * KV_HEADS * head_dim, dtype))
    out, lse = PA.position_attention_triton(*inputs, _scale(head_dim), keys_sorted=True)
    assert_matches_oracle(out, lse, inputs, _scale(head_dim))


WINDOW_CASES = [
    # (group, head_dim, dtype, kind, n, m, window, softcap, keys sorted)
    (2, 64, torch.float32, "sorted", 45, 90, 23, 0.0, True),
    (1, 64, torch.float32, "ring", 40, 64, 30, 1.5, True),
    (4, 128, torch.float32, "shard", 37, 70, 17, 0.0, True),
    (2, 64, torch.bfloat16, "sorted", 30, 64, 40, 2.0, True),
    (2, 64, torch.float32, "unsorted", 37, 90, 23, 0.0, False),
    (1, 128, torch.float32, "striped", 33, 50, 29, 1.5, False),
    (2, 64, torch.float32, "unsorted", 20, 40, 0, 1.0, False),
]
"""Windows shorter than the positions' span (tiles wholly before every row's window skipped,
straddling ones masked) and soft-caps, on the sorted (pipelined) and per-tile paths."""


@needs_triton
@pytest.mark.parametrize("case", WINDOW_CASES, ids=lambda c: f"{_case_id(c[:6])}-w{c[6]}-c{c[7]}")
def test_triton_window_and_softcap_match_the_oracle(
    case: tuple[int, int, torch.dtype, str, int, int, int, float, bool], device: torch.device
) -> None:
    group, head_dim, dtype, kind, n, m, window, softcap, ordered = case
    q, q_pos, k, v, k_pos = make_inputs(n, m, group, head_dim, dtype, kind, 14 + group, device)
    if ordered:
        k_pos = k_pos.sort().values
    inputs = (q, q_pos, k, v, k_pos)
    poison_free_memory(device, (n * group * KV_HEADS * head_dim, dtype))
    scale = _scale(head_dim)
    out, lse = PA.position_attention_triton(*inputs, scale, ordered, window, softcap)
    assert_matches_oracle(out, lse, inputs, scale, window=window, softcap=softcap)
    ref_out, ref_lse = PA.position_attention_ref(*inputs, scale, ordered, window, softcap=softcap)
    assert_matches_oracle(ref_out, ref_lse, inputs, scale, window=window, softcap=softcap)
    if window:  # (the window hides keys some row would otherwise see)
        assert bool((k_pos[None, :] <= q_pos[:, None] - window).any())


def test_ref_checks_the_sorted_keys_promise() -> None:
    q, q_pos, k, v, k_pos = make_inputs(8, 20, 2, 64, torch.float32, "unsorted", seed=13)
    with pytest.raises(ValueError, match="keys_sorted=True, but k_pos decreases"):
        PA.position_attention_ref(q, q_pos, k, v, k_pos, 0.125, keys_sorted=True)
    out, _ = PA.position_attention_ref(q, q_pos, k, v, k_pos, 0.125)
    assert torch.isfinite(out).all()


@needs_triton
def test_triton_empty(device: torch.device) -> None:
    for n, m in [(0, 9), (12, 0)]:
        inputs = make_inputs(n, m, 2, 64, torch.float32, "unsorted", seed=9, device=device)
        out, lse = PA.position_attention_triton(*inputs, 0.125)
        assert out.shape == (n, 2 * KV_HEADS, 64) and lse.shape == (n, 2 * KV_HEADS)
        assert (out == 0).all() and lse.isneginf().all()


@needs_triton
def test_triton_rejects_what_it_cannot_run(device: torch.device) -> None:
    q, q_pos, k, v, k_pos = make_inputs(4, 6, 2, 80, torch.float32, "sorted", 10, device)
    with pytest.raises(ValueError, match="head_dim"):
        PA.position_attention_triton(q, q_pos, k, v, k_pos, 0.1)
    with pytest.raises(ValueError, match="q_pos"):
        PA.position_attention_triton(q, q_pos[:3], k, v, k_pos, 0.1)


@needs_triton
def test_dispatch(device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    triton_fn = PA.position_attention_triton

    def spy(*args: object) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        return triton_fn(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(PA, "position_attention_triton", spy)
    monkeypatch.setenv("DIST_RUNTIME_KERNELS", "triton")
    inputs = make_inputs(9, 20, 2, 64, torch.float32, "unsorted", seed=11, device=device)
    out, lse = PA.position_attention(*inputs, 0.125)
    assert calls == [1]
    assert_matches_oracle(out, lse, inputs, 0.125)
    # A head_dim the kernel cannot take falls back to the reference.
    odd = make_inputs(9, 20, 2, 80, torch.float32, "unsorted", seed=11, device=device)
    out, lse = PA.position_attention(*odd, 0.125)
    assert calls == [1]
    assert_matches_oracle(out, lse, odd, 0.125)
    monkeypatch.setenv("DIST_RUNTIME_KERNELS", "torch")
    PA.position_attention(*inputs, 0.125)
    assert calls == [1]
