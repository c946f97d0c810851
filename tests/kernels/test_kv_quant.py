"""Quantized paged KV cache (quant policy 8 / 4, `kernels/kv_quant.py`).

- quantize / dequantize round trips within scale / 2, and the int4 "split halves" byte layout;
- store_kv's Triton kernel writes the same codes and params as its reference, bit for bit, and
  leaves padding slots (-1) alone;
- paged_attention and flash_decode over a quantized cache: Triton == torch reference, and both ==
  a float64 oracle over the dequantized cache (dequant-on-load is exactly attention over it).

Without CUDA the kernels run in Triton's interpreter (see conftest.py), so shapes stay small.
Code caches hold random bytes and params NaN outside the slots the sequences own, so a read of a
wrong slot shows as NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch
from torch import Tensor

import kernels.flash_decode as FD
import kernels.kv_quant as KQ
import kernels.paged_attention as PA
import kernels.store_kv as SK
from tests.kernels.test_attention_kernels import (
    KV_HEADS,
    LSE_TOL,
    OUT_TOL,
    PREFILL_SEQS,
    assert_close,
    dense_attention_f64,
    make_paged_batch,
    needs_cuda,
    needs_triton,
    poison_free_memory,
)

CPU = torch.device("cpu")
NAN = float("nan")
QUANT_LSE_TOL = {
    torch.float32: LSE_TOL[torch.float32],
    # Compiled kernels may fuse code * scale + zero into an FMA where torch rounds twice, which
    # can flip the rounding of a dequantized element: a few 1e-4 in a score (bf16).
    torch.bfloat16: (2e-3, 2e-3),
    torch.float16: (5e-4, 5e-4),
}
QUANT_OUT_TOL = {**OUT_TOL, torch.float16: (5e-3, 5e-3)}
"""OUT_TOL, and float16's: output rounding (2^-11) plus P rounded before P @ V on GPUs."""
INTERPRETER_BF16_TOL = {"out": (5e-2, 5e-2), "lse": (2e-2, 2e-2)}
"""Triton's interpreter truncates fp32 -> bf16 where torch rounds to nearest even: every
dequantized K/V element of the kernel sits up to one bf16 ulp (2^-8 relative) nearer zero than
the reference's, a bias that adds up over head_dim in a score (~1e-2 at these shapes)."""


pytestmark = pytest.mark.usefixtures("single_thread")  # (tests/kernels/conftest.py)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- quantize / dequantize ---------------------------------------------------------------------


def _awkward_vectors(head_dim: int) -> torch.Tensor:
    """(8, 2, head_dim) fp32 head vectors: normal, large magnitudes, all negative, a tiny range
    around a large offset, constant ones, one outlier, integers."""
    gen = _gen(head_dim)
    x = torch.randn(8, 2, head_dim, generator=gen)
    x[1] *= 3e4
    x[2] = -x[2].abs() - 7.0
    x[3] = 1000.0 + 1e-3 * x[3]
    x[4, 0] = 2.5  # constant vectors
    x[4, 1] = -1e5
    x[5, 0, 3] = 400.0  # an outlier
    x[6] = torch.randint(-8, 8, (2, head_dim), generator=gen).float()
    return x


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("head_dim", [64, 6])
def test_round_trip_within_half_a_step(bits: int, head_dim: int) -> None:
    x = _awkward_vectors(head_dim)
    codes, params = KQ.quantize_kv_ref(x, bits)
    qmax = (1 << bits) - 1
    assert codes.dtype == torch.uint8 and codes.shape == (
        *x.shape[:-1],
        KQ.code_dim(head_dim, bits),
    )
    assert params.dtype == torch.float32 and params.shape == (*x.shape[:-1], 2)
    scale, zero = params[..., 0], params[..., 1]
    assert (scale > 0).all()
    assert torch.equal(zero, x.amin(-1))
    back = KQ.dequantize_kv_ref(codes, params, bits, torch.float64)
    err = (back - x.double()).abs()
    # fp32 rounding of x - zero and of the quotient: a few ulps of the vector's magnitude.
    eps = 4 * 2**-24 * (x.abs().double() + zero.abs().double()[..., None] + qmax * scale[..., None])
    assert (err <= scale.double()[..., None] / 2 + eps).all(), (err / scale[..., None]).max()
    unpacked = KQ.unpack_codes(codes, bits)
    assert int(unpacked.max()) <= qmax
    nonconstant = x.amax(-1) > x.amin(-1)
    # The extremes are exact: the minimum has code 0, the maximum code qmax.
    argmin, argmax = x.argmin(-1, keepdim=True), x.argmax(-1, keepdim=True)
    assert (unpacked.gather(-1, argmin) == 0).all()
    assert (unpacked.gather(-1, argmax)[nonconstant] == qmax).all()
    # Constant vectors: scale 1, codes 0, exact round trip.
    assert torch.equal(scale[4], torch.ones(2)) and (unpacked[4] == 0).all()
    assert torch.equal(back[4], x[4].double())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fake_quant_is_dequantize_of_quantize(bits: int, dtype: torch.dtype) -> None:
    x = (torch.randn(5, 2, 64, generator=_gen(1)) * 4).to(dtype)
    fake = KQ.fake_quant_kv(x, bits)
    assert fake.dtype == dtype and fake.shape == x.shape
    assert torch.equal(fake, KQ.dequantize_kv_ref(*KQ.quantize_kv_ref(x, bits), bits, dtype))
    scale = KQ.quantize_kv_ref(x, bits)[1][..., :1]
    ulp = x.float().abs() * 2.0 ** -{torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[dtype]
    assert ((fake.float() - x.float()).abs() <= scale / 2 + ulp + 1e-6).all()
    assert KQ.fake_quant_kv(x, 0) is x


def test_int4_split_halves_packing() -> None:
    """Byte j holds element j in its low nibble and element j + D/2 in its high nibble."""
    head_dim = 16
    first = torch.tensor([0, 15, 1, 14, 2, 13, 3, 12])
    second = torch.tensor([15, 0, 7, 8, 9, 6, 5, 10])
    x = torch.cat([first, second]).float()[None]  # min 0, max 15: scale 1, zero 0, code = x
    codes, params = KQ.quantize_kv_ref(x, 4)
    assert codes.shape == (1, head_dim // 2)
    assert torch.equal(params, torch.tensor([[1.0, 0.0]]))
    assert torch.equal(codes[0] & 0xF, first.to(torch.uint8))
    assert torch.equal(codes[0] >> 4, second.to(torch.uint8))
    assert codes[0, 1].item() == 0x0F and codes[0, 0].item() == 0xF0
    assert torch.equal(KQ.dequantize_kv_ref(codes, params, 4, torch.float32), x)
    # int8: one code per element, in order.
    codes8, params8 = KQ.quantize_kv_ref(x * 17, 8)  # max 255: scale 1
    assert torch.equal(params8, torch.tensor([[1.0, 0.0]]))
    assert torch.equal(codes8, (x * 17).to(torch.uint8))


def test_dequantize_formula() -> None:
    codes = torch.tensor([[0x21, 0xF0]], dtype=torch.uint8)  # int4: elements 1, 0 | 2, 15
    params = torch.tensor([[0.5, -1.0]])
    want = torch.tensor([[1, 0, 2, 15]]) * 0.5 - 1.0
    assert torch.equal(KQ.dequantize_kv_ref(codes, params, 4, torch.float32), want)
    want8 = torch.tensor([[0x21, 0xF0]]) * 0.5 - 1.0
    assert torch.equal(KQ.dequantize_kv_ref(codes, params, 8, torch.float32), want8)


def test_quantize_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="bits"):
        KQ.quantize_kv_ref(torch.randn(2, 8), 3)
    with pytest.raises(ValueError, match="even head_dim"):
        KQ.quantize_kv_ref(torch.randn(2, 7), 4)
    with pytest.raises(ValueError, match="bits"):
        KQ.fake_quant_kv(torch.randn(2, 8), 2)


# -- store_kv ----------------------------------------------------------------------------------


def _caches(
    num_blocks: int, block_size: int, kv_heads: int, head_dim: int, bits: int, dtype, device
) -> list[torch.Tensor]:
    """[k_cache, v_cache, k_params, v_params], poisoned: NaN, or random bytes and NaN params."""
    shape = (num_blocks, block_size, kv_heads)
    if bits == 0:
        return [torch.full((*shape, head_dim), NAN, dtype=dtype, device=device) for _ in range(2)]
    gen = _gen(num_blocks)
    cdim = KQ.code_dim(head_dim, bits)
    codes = [
        torch.randint(0, 256, (*shape, cdim), generator=gen, dtype=torch.uint8).to(device)
        for _ in range(2)
    ]
    return codes + [torch.full((*shape, 2), NAN, device=device) for _ in range(2)]


def _store_args(caches: list[torch.Tensor], bits: int) -> dict[str, Any]:
    if bits == 0:
        return dict(k_cache=caches[0], v_cache=caches[1])
    return dict(
        k_cache=caches[0], v_cache=caches[1], k_params=caches[2], v_params=caches[3], bits=bits
    )


@needs_triton
@pytest.mark.parametrize("bits", [0, 8, 4])
@pytest.mark.parametrize(
    "dtype, head_dim, tokens, kv_heads, block_size, num_padding",
    [
        (torch.float32, 64, 9, 2, 8, 3),
        (torch.bfloat16, 128, 6, 3, 16, 1),
        (torch.float16, 64, 1, 1, 16, 0),
    ],
)
def test_store_kv_triton_matches_ref(
    bits: int,
    dtype: torch.dtype,
    head_dim: int,
    tokens: int,
    kv_heads: int,
    block_size: int,
    num_padding: int,
    device: torch.device,
) -> None:
    gen = _gen(tokens * 7 + bits)
    # k and v are views into one fused projection (token stride 3x the head block).
    kv = (torch.randn(tokens, 3 * kv_heads, head_dim, generator=gen) * 3).to(dtype).to(device)
    k, v = kv[:, kv_heads : 2 * kv_heads], kv[:, 2 * kv_heads :]
    if tokens > 1:
        k[1, 0] = 0.75  # a constant head vector
    num_blocks = tokens // block_size + 2
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    if num_padding:
        slots[-num_padding:] = -1
    slots = slots.to(device)
    caches = _caches(num_blocks, block_size, kv_heads, head_dim, bits, dtype, device)
    ref = [c.clone() for c in caches]
    SK.store_kv_triton(k, v, slot_mapping=slots, **_store_args(caches, bits))
    SK.store_kv_ref(k, v, slot_mapping=slots, **_store_args(ref, bits))
    for got, want in zip(caches, ref):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    valid = slots >= 0
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device=device)
    untouched[slots[valid]] = False
    flat = [c.flatten(0, 1) for c in caches]
    before = [
        c.flatten(0, 1)
        for c in _caches(num_blocks, block_size, kv_heads, head_dim, bits, dtype, device)
    ]
    for got, poison in zip(flat, before):
        torch.testing.assert_close(
            got[untouched], poison[untouched], rtol=0, atol=0, equal_nan=True
        )
    if bits == 0:
        assert torch.equal(flat[0][slots[valid]], k[valid])
        return
    for x, codes, params in ((k, flat[0], flat[2]), (v, flat[1], flat[3])):
        want_codes, want_params = KQ.quantize_kv_ref(x[valid], bits)
        assert torch.equal(codes[slots[valid]], want_codes)
        assert torch.equal(params[slots[valid]], want_params)


@needs_triton
def test_store_kv_dispatch_passes_quant_args(device: torch.device, monkeypatch) -> None:
    monkeypatch.setenv("DIST_RUNTIME_KERNELS", "triton")
    k, v = torch.randn(2, 2, 2, 64, generator=_gen(3)).to(device)
    caches = _caches(2, 4, 2, 64, 4, torch.float32, device)
    ref = [c.clone() for c in caches]
    slots = torch.tensor([5, 0], device=device)
    SK.store_kv(k, v, slot_mapping=slots, **_store_args(caches, 4))
    monkeypatch.setenv("DIST_RUNTIME_KERNELS", "torch")
    SK.store_kv(k, v, slot_mapping=slots, **_store_args(ref, 4))
    for got, want in zip(caches, ref):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("fn", ["store_kv_ref", "store_kv_triton"])
def test_store_kv_rejects_mismatched_caches(fn: str) -> None:
    if fn == "store_kv_triton" and SK.triton is None:
        pytest.skip("triton is not installed")
    store = getattr(SK, fn)
    k = v = torch.randn(3, 2, 64)
    slots = torch.tensor([0, 1, 2])
    codes8 = torch.zeros(2, 4, 2, 64, dtype=torch.uint8)
    codes4 = torch.zeros(2, 4, 2, 32, dtype=torch.uint8)
    params = torch.zeros(2, 4, 2, 2)
    with pytest.raises(ValueError, match="bits must be one of"):
        store(k, v, codes8, codes8, slots, params, params, bits=2)
    with pytest.raises(ValueError, match="needs both k_params and v_params"):
        store(k, v, codes8, codes8, slots, params, None, bits=8)
    with pytest.raises(ValueError, match="bits=0"):
        store(k, v, torch.zeros(2, 4, 2, 64), torch.zeros(2, 4, 2, 64), slots, params, params)
    with pytest.raises(ValueError, match=r"uint8 \(num_blocks, block_size, kv_heads, 32\)"):
        store(k, v, codes8, codes8, slots, params, params, bits=4)  # int4 needs head_dim / 2
    with pytest.raises(ValueError, match=r"uint8 \(num_blocks, block_size, kv_heads, 64\)"):
        store(k, v, codes4, codes4, slots, params, params, bits=8)
    with pytest.raises(ValueError, match="uint8"):
        store(k, v, codes8.float(), codes8.float(), slots, params, params, bits=8)
    with pytest.raises(ValueError, match="k_params must be float32"):
        store(k, v, codes4, codes4, slots, params.double(), params, bits=4)
    with pytest.raises(ValueError, match="v_params must be float32"):
        store(k, v, codes4, codes4, slots, params, params[..., :1], bits=4)
    with pytest.raises(ValueError, match="kv heads"):
        store(k[:, :1], v[:, :1], codes4, codes4, slots, params, params, bits=4)


# -- attention over a quantized cache ----------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class QuantBatch:
    q: torch.Tensor
    k_cache: torch.Tensor
    """uint8 codes, random bytes outside the sequences' slots."""
    v_cache: torch.Tensor
    k_params: torch.Tensor
    """float32 (scale, zero), NaN outside the sequences' slots."""
    v_params: torch.Tensor
    bits: int
    block_tables: torch.Tensor
    cu_seqlens_q: torch.Tensor
    context_lens: torch.Tensor
    slots: list[torch.Tensor]
    """Per sequence, the cache slot of each position."""

    @property
    def quant(self) -> dict[str, Any]:
        return dict(k_params=self.k_params, v_params=self.v_params, bits=self.bits)

    @property
    def paged_args(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens)."""
        return (
            self.q,
            self.k_cache,
            self.v_cache,
            self.block_tables,
            self.cu_seqlens_q,
            self.context_lens,
        )

    @property
    def decode_args(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(q, k_cache, v_cache, block_tables, context_lens)."""
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.context_lens)


def make_quant_batch(
    seqs: list[tuple[int, int]],
    group: int,
    head_dim: int,
    block_size: int,
    bits: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
) -> QuantBatch:
    """`make_paged_batch`'s sequences, block tables and queries, their K/V quantized into a fresh
    poisoned cache by `store_kv_ref`."""
    b = make_paged_batch(seqs, group, head_dim, block_size, dtype, CPU, seed)
    num_blocks = b.k_cache.shape[0]
    caches = _caches(num_blocks, block_size, KV_HEADS, head_dim, bits, dtype, CPU)
    slots = []
    for i, (k, v) in enumerate(zip(b.keys, b.values)):
        pos = torch.arange(k.shape[0])
        s = b.block_tables[i].long()[pos // block_size] * block_size + pos % block_size
        SK.store_kv_ref(k, v, slot_mapping=s, **_store_args(caches, bits))
        slots.append(s)
    k_cache, v_cache, k_params, v_params = (c.to(device) for c in caches)
    return QuantBatch(
        q=b.q.to(device),
        k_cache=k_cache,
        v_cache=v_cache,
        k_params=k_params,
        v_params=v_params,
        bits=bits,
        block_tables=b.block_tables.to(device),
        cu_seqlens_q=b.cu_seqlens_q.to(device),
        context_lens=b.context_lens.to(device),
        slots=slots,
    )


def quant_oracle(qb: QuantBatch, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 attention over the dequantized cache (dequantized to q's dtype, then widened:
    the kernels dequantize into q's dtype)."""
    deq = [
        KQ.dequantize_kv_ref(c.cpu(), p.cpu(), qb.bits, qb.q.dtype).double().flatten(0, 1)
        for c, p in ((qb.k_cache, qb.k_params), (qb.v_cache, qb.v_params))
    ]
    outs, lses = [], []
    cu = qb.cu_seqlens_q.tolist()
    for i, ctx in enumerate(qb.context_lens.tolist()):
        q = qb.q[cu[i] : cu[i + 1]].cpu()
        keys, values = deq[0][qb.slots[i]], deq[1][qb.slots[i]]
        q_pos = torch.arange(ctx - q.shape[0], ctx)
        out, lse = dense_attention_f64(q, keys, values, scale, q_pos, torch.arange(ctx))
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def assert_quant_close(
    out: torch.Tensor,
    lse: torch.Tensor | None,
    ref_out: torch.Tensor,
    ref_lse: torch.Tensor | None,
    dtype: torch.dtype,
) -> None:
    assert not out.isnan().any(), "NaN in out: an unwritten row or a read of a poisoned slot"
    out_tol, lse_tol = QUANT_OUT_TOL[dtype], QUANT_LSE_TOL[dtype]
    if dtype == torch.bfloat16 and out.device.type != "cuda":
        out_tol, lse_tol = INTERPRETER_BF16_TOL["out"], INTERPRETER_BF16_TOL["lse"]
    assert_close(out.cpu().double(), ref_out.cpu().double(), out_tol)
    if ref_lse is None:
        assert lse is None
        return
    assert lse is not None and lse.dtype == torch.float32 and not lse.isnan().any()
    assert_close(lse.cpu().double(), ref_lse.cpu().double(), lse_tol)


def _check_paged(qb: QuantBatch, scale: float, dtype: torch.dtype, device: torch.device) -> None:
    tokens, heads, _ = qb.q.shape
    poison_free_memory(device, (qb.q.numel(), dtype), (tokens * heads, torch.float32))
    out, lse = PA.paged_attention_triton(*qb.paged_args, scale, True, **qb.quant)
    assert out.dtype == dtype and out.shape == qb.q.shape
    ref_out, ref_lse = PA.paged_attention_ref(*qb.paged_args, scale, True, **qb.quant)
    assert_quant_close(out, lse, ref_out, ref_lse, dtype)
    want_out, want_lse = quant_oracle(qb, scale)
    assert_quant_close(out, lse, want_out, want_lse, dtype)
    assert_quant_close(ref_out, ref_lse, want_out, want_lse, dtype)
    out_only, none = PA.paged_attention_triton(*qb.paged_args, scale, **qb.quant)
    assert_quant_close(out_only, none, want_out, None, dtype)


PAGED_CASES = [
    # (bits, group, head_dim, block_size, dtype)
    (8, 2, 64, 16, torch.float32),
    (4, 2, 64, 8, torch.float32),
    (8, 4, 128, 8, torch.float32),
    (4, 2, 128, 16, torch.float32),
    (4, 2, 64, 16, torch.bfloat16),
    # float16 queries dequantize into float16
    (4, 4, 128, 16, torch.float16),
    (8, 2, 64, 16, torch.float16),
]


def _paged_id(case: tuple) -> str:
    bits, group, head_dim, block_size, dtype = case
    return f"int{bits}-g{group}-d{head_dim}-bs{block_size}-{str(dtype).removeprefix('torch.')}"


@needs_triton
@pytest.mark.parametrize("case", PAGED_CASES, ids=_paged_id)
def test_paged_attention_quant_prefill(case: tuple, device: torch.device) -> None:
    """Prefill with cached prefixes, a decode token, a fresh prompt, an empty sequence and
    several query tiles in one batch (PREFILL_SEQS)."""
    bits, group, head_dim, block_size, dtype = case
    qb = make_quant_batch(PREFILL_SEQS, group, head_dim, block_size, bits, dtype, device, seed=2)
    _check_paged(qb, head_dim**-0.5, dtype, device)


DECODE_CASES = [
    # (bits, group, head_dim, block_size, dtype, contexts)
    (8, 2, 64, 16, torch.float32, [1, 37, 130, 16]),  # short ones leave most splits empty
    (4, 2, 64, 16, torch.float32, [300]),  # one sequence over many splits
    (4, 4, 128, 8, torch.float32, [1, 37, 130, 16]),
    (8, 2, 128, 16, torch.bfloat16, [200, 5]),
    (4, 2, 64, 16, torch.bfloat16, [200, 5]),
    (4, 4, 128, 8, torch.float16, [37, 130]),
]


def _decode_id(case: tuple) -> str:
    *head, contexts = case
    return f"{_paged_id(tuple(head))}-ctx{max(contexts)}x{len(contexts)}"


@needs_triton
@pytest.mark.parametrize("case", DECODE_CASES, ids=_decode_id)
def test_flash_decode_quant(case: tuple, device: torch.device) -> None:
    bits, group, head_dim, block_size, dtype, contexts = case
    seqs = [(1, ctx) for ctx in contexts]
    qb = make_quant_batch(seqs, group, head_dim, block_size, bits, dtype, device, seed=4)
    _check_decode(qb, head_dim**-0.5, dtype, device, min_splits=2)


def _check_decode(
    qb: QuantBatch, scale: float, dtype: torch.dtype, device: torch.device, min_splits: int
) -> None:
    batch, heads, head_dim = qb.q.shape
    block_n = FD.decode_config(head_dim, dtype)["BLOCK_N"]
    max_ctx = qb.block_tables.shape[1] * qb.k_cache.shape[1]
    splits = FD.split_plan(batch, KV_HEADS, max_ctx, block_n, device)
    assert splits >= min_splits
    if min_splits > 1:
        assert max(qb.context_lens.tolist()) > block_n, "no context spans several splits"
    poison_free_memory(
        device,
        (qb.q.numel(), dtype),
        (batch * heads, torch.float32),
        (batch * heads * splits * head_dim, torch.float32),
        (batch * heads * splits, torch.float32),
    )
    out, lse = FD.flash_decode_triton(*qb.decode_args, scale, True, **qb.quant)
    ref_out, ref_lse = FD.flash_decode_ref(*qb.decode_args, scale, True, **qb.quant)
    assert_quant_close(out, lse, ref_out, ref_lse, dtype)
    want_out, want_lse = quant_oracle(qb, scale)
    assert_quant_close(out, lse, want_out, want_lse, dtype)
    assert_quant_close(ref_out, ref_lse, want_out, want_lse, dtype)
    out_only, none = FD.flash_decode_triton(*qb.decode_args, scale, **qb.quant)
    assert_quant_close(out_only, none, want_out, None, dtype)
    # paged_attention takes decode batches too (its reference has a decode fast path).
    pa_out, pa_lse = PA.paged_attention_ref(*qb.paged_args, scale, True, **qb.quant)
    assert_quant_close(pa_out, pa_lse, want_out, want_lse, dtype)


@needs_triton
@pytest.mark.parametrize("bits", [8, 4])
def test_flash_decode_quant_one_split(bits: int, device: torch.device, monkeypatch) -> None:
    """With the device already full, pass 1 writes the output directly (no merge pass)."""
    monkeypatch.setattr(FD, "PROGRAMS_PER_SM", 0)
    qb = make_quant_batch([(1, 90), (1, 3)], 2, 64, 16, bits, torch.float32, device, seed=5)
    _check_decode(qb, 0.125, torch.float32, device, min_splits=1)


@needs_triton
@pytest.mark.parametrize("bits", [8, 4])
def test_decode_quant_shared_prefix(bits: int, device: torch.device) -> None:
    """A decode batch sharing its first blocks takes the reference's shared-prefix path (the
    prefix's blocks gathered and dequantized once); small blocks make the kernels gather per key."""
    block_size, shared = 4, 6
    tails = [0, 1, 5, 9]
    seqs = [(1, shared * block_size + t) for t in tails]
    qb = make_quant_batch(seqs, 2, 64, block_size, bits, torch.float32, device, seed=6)
    # Point every table's first `shared` entries at the first sequence's blocks, then rewrite
    # the slots (and cache contents) of the others to match.
    tables = qb.block_tables.cpu().clone()
    tables[1:, :shared] = tables[0, :shared]
    slots = []
    for i, ctx in enumerate(qb.context_lens.tolist()):
        pos = torch.arange(ctx)
        slots.append(tables[i].long()[pos // block_size] * block_size + pos % block_size)
    qb = replace(qb, block_tables=tables.to(device), slots=slots)
    assert (
        PA.shared_blocks(tables, qb.context_lens.cpu(), block_size)
        == shared
        >= (PA.MIN_SHARED_BLOCKS)
    )
    _check_decode(qb, 0.125, torch.float32, device, min_splits=1)


@needs_triton
def test_public_functions_dispatch_quant(device: torch.device, monkeypatch) -> None:
    qb = make_quant_batch([(3, 20), (1, 9)], 2, 64, 16, 4, torch.float32, device, seed=7)
    results = {}
    for choice in ("triton", "torch"):
        monkeypatch.setenv("DIST_RUNTIME_KERNELS", choice)
        pa = PA.paged_attention(*qb.paged_args, 0.125, return_lse=True, **qb.quant)
        q1 = qb.q[[2, 3]]
        dec = (q1, qb.k_cache, qb.v_cache, qb.block_tables, qb.context_lens, 0.125)
        fd = FD.flash_decode(*dec, return_lse=True, **qb.quant)
        results[choice] = (pa, fd)
    for got, want in zip(results["triton"], results["torch"]):
        assert_quant_close(*got, *want, torch.float32)


@needs_triton
def test_attention_rejects_bad_quant_args(device: torch.device) -> None:
    qb = make_quant_batch([(2, 5)], 2, 64, 16, 8, torch.float32, device)
    args = (*qb.paged_args, 0.125)
    dec = (*qb.decode_args, 0.125)
    cases: list[tuple[Callable[..., Any], tuple[Any, ...]]] = [
        (PA.paged_attention_triton, args),
        (PA.paged_attention_ref, args),
        (FD.flash_decode_triton, dec),
        (FD.flash_decode_ref, dec),
    ]
    for fn, a in cases:
        with pytest.raises(ValueError, match="needs both k_params and v_params"):
            fn(*a, bits=8)
        with pytest.raises(ValueError, match=r"kv_heads, 32\)"):
            fn(*a, k_params=qb.k_params, v_params=qb.v_params, bits=4)
        with pytest.raises(ValueError, match="bits=0"):
            fn(*a, k_params=qb.k_params, v_params=qb.v_params)
        with pytest.raises(ValueError, match="k_params must be float32"):
            fn(*a, k_params=qb.k_params.double(), v_params=qb.v_params, bits=8)
    # int4 splits head_dim in two dots of head_dim / 2, which need 16 columns.
    q16 = torch.randn(1, 2, 16, device=device)
    codes = torch.zeros(2, 16, 1, 8, dtype=torch.uint8, device=device)
    params = torch.zeros(2, 16, 1, 2, device=device)
    table = torch.zeros(1, 1, dtype=torch.int32, device=device)
    lens = torch.ones(1, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="head_dim >= 32"):
        FD.flash_decode_triton(q16, codes, codes, table, lens, 0.25, False, params, params, 4)
    out, _ = FD.flash_decode_ref(q16, codes, codes, table, lens, 0.25, False, params, params, 4)
    assert out.shape == q16.shape  # the reference takes any even head_dim


# -- 64-bit offsets ----------------------------------------------------------------------------


def _check_high_blocks(num_blocks: int, device: torch.device) -> None:
    """store_kv, paged_attention and flash_decode on the highest block ids of a cache of
    num_blocks blocks (int8, 16 slots, 2 kv heads, head_dim 128): past 2^31 code elements when
    num_blocks > 2^31 / 4096."""
    block_size, head_dim, bits, n_blocks = 16, 128, 8, 8
    shape = (num_blocks, block_size, KV_HEADS)
    k_cache = torch.empty((*shape, head_dim), dtype=torch.uint8, device=device)
    v_cache = torch.empty_like(k_cache)
    k_params = torch.full((*shape, 2), NAN, device=device)
    v_params = torch.full_like(k_params, NAN)
    ctx = n_blocks * block_size - 5
    blocks = torch.arange(num_blocks - n_blocks, num_blocks, device=device).flip(0)
    pos = torch.arange(ctx, device=device)
    slots = blocks[pos // block_size] * block_size + pos % block_size
    gen = _gen(9)
    k, v = (torch.randn(2, ctx, KV_HEADS, head_dim, generator=gen) * 2).bfloat16().to(device)
    quant: dict[str, Any] = dict(k_params=k_params, v_params=v_params, bits=bits)
    SK.store_kv_triton(k, v, k_cache, v_cache, slots, **quant)
    want_codes, want_params = KQ.quantize_kv_ref(k, bits)
    assert torch.equal(k_cache.flatten(0, 1)[slots], want_codes)
    assert torch.equal(k_params.flatten(0, 1)[slots], want_params)
    tables = blocks.to(torch.int32)[None]
    lens = torch.tensor([ctx], device=device)
    q = torch.randn(21, 2 * KV_HEADS, head_dim, generator=gen).bfloat16().to(device)
    cu = torch.tensor([0, 21], device=device)
    args = (q, k_cache, v_cache, tables, cu, lens, 0.088)
    assert_quant_close(
        *PA.paged_attention_triton(*args, True, **quant),
        *PA.paged_attention_ref(*args, True, **quant),
        torch.bfloat16,
    )
    dec = (q[:1], k_cache, v_cache, tables, lens, 0.088)
    assert_quant_close(
        *FD.flash_decode_triton(*dec, True, **quant),
        *FD.flash_decode_ref(*dec, True, **quant),
        torch.bfloat16,
    )


@needs_triton
def test_high_block_ids_small_cache(device: torch.device) -> None:
    """The offset test's logic on a small cache, so it runs everywhere."""
    _check_high_blocks(12, device)


@needs_cuda
@needs_triton
@pytest.mark.slow
def test_quant_offsets_past_int32() -> None:
    """Code offsets past 2^31 elements (2 GiB uint8 per cache), as in 1M-token caches."""
    per_block = 16 * KV_HEADS * 128
    _check_high_blocks((1 << 31) // per_block + 16, torch.device("cuda"))
