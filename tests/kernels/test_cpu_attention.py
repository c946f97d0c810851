"""Native CPU decode kernels (`kernels/cpu_attention.py`): attention against a float64
reference over paged caches of several shapes and dtypes, with splits, shared prefixes,
poisoned unused slots, empty contexts, both block-table dtypes and sliding windows (the keys
before each window poisoned too); `flash_decode` takes it on
CPU; RoPE fused with the KV store against `rotate` + `store_kv_ref`; the model decodes with them
the tokens and logprobs the torch references give; `DIST_RUNTIME_CPU_ATTENTION=torch`, a missing
compiler and a failing build all fall back to the references."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import kernels.flash_decode as flash_decode_module
from dist_runtime.config import CPU_ATTENTION_ENV, CPU_DECODE_ENV, cpu_attention_choice
from kernels import cpu_attention, cpu_elementwise, cpu_gemm, native
from kernels.cpu_attention import (
    flash_decode_cpu,
    native_decode_supported,
    native_rope_store_supported,
    paged_decode,
    rope_store,
)
from kernels.flash_decode import flash_decode, flash_decode_ref
from kernels.kv_quant import code_dim, dequantize_kv_ref, quantize_kv_ref
from kernels.rotary import rotary_cos_sin, rotate
from kernels.store_kv import store_kv_ref
from workers.layers.rotary import inverse_frequencies

needs_native = pytest.mark.skipif(
    cpu_attention._library() is None, reason="no C compiler: the native kernel is not built"
)


Case = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _case(
    *,
    lens: list[int],
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    table_dtype: torch.dtype = torch.int32,
    seed: int = 0,
) -> Case:
    """q, caches (unused slots NaN), shuffled block tables and context lengths."""
    gen = torch.Generator().manual_seed(seed)
    per_seq = [(n + block_size - 1) // block_size for n in lens]
    num_blocks = sum(per_seq) + 3
    k = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"))
    v = torch.full_like(k, float("nan"))
    order = torch.randperm(num_blocks, generator=gen)
    width = max(per_seq)
    tables = torch.zeros(len(lens), width, dtype=table_dtype)
    used = 0
    for b, (n, blocks) in enumerate(zip(lens, per_seq)):
        ids = order[used : used + blocks]
        used += blocks
        tables[b, :blocks] = ids.to(table_dtype)
        for t in range(n):  # only a context's own slots hold numbers
            blk, slot = ids[t // block_size], t % block_size
            k[blk, slot] = torch.randn(kv_heads, head_dim, generator=gen)
            v[blk, slot] = torch.randn(kv_heads, head_dim, generator=gen)
    q = 2 * torch.randn(len(lens), q_heads, head_dim, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype), tables, torch.tensor(lens)


def _oracle(
    q, k, v, tables, lens, scale: float, window: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 attention of each sequence's query over its gathered context (GQA expanded);
    window > 0: over its last `window` keys only."""
    block_size, group = k.shape[1], q.shape[1] // k.shape[2]
    outs, lses = [], []
    for b, n in enumerate(lens.tolist()):
        ids = tables[b, : (n + block_size - 1) // block_size].long()
        start = max(0, n - window) if window else 0
        kk = k[ids].flatten(0, 1)[start:n].double().repeat_interleave(group, dim=1)  # (n, h, d)
        vv = v[ids].flatten(0, 1)[start:n].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].double(), kk) * scale
        lse = torch.logsumexp(scores, dim=-1)
        outs.append(torch.einsum("hn,nhd->hd", torch.exp(scores - lse[:, None]), vv))
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def _check(q, k, v, tables, lens, scale: float = 0.3, window: int = 0) -> None:
    out, lse = flash_decode_cpu(q, k, v, tables, lens, scale, return_lse=True, window=window)
    assert out.dtype == q.dtype and out.shape == q.shape and lse is not None
    assert lse.dtype == torch.float32
    ref_out, ref_lse = _oracle(q, k, v, tables, lens, scale, window)
    # float32 math against float64; a bfloat16 output rounds to 8 bits of mantissa.
    atol = 2e-5 if q.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-6)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "q_heads,kv_heads,head_dim",
    # GQA 3 / 4, MHA, dims that are not a power of 2, the widest dim (four 64-float slices)
    [(9, 3, 64), (8, 2, 128), (4, 4, 32), (6, 2, 80), (2, 1, 48), (4, 2, 256)],
)
def test_matches_float64_reference(
    dtype: torch.dtype, q_heads: int, kv_heads: int, head_dim: int
) -> None:
    lens = [1, 16, 17, 250, 33]  # one key, a full block, a block plus one, many blocks
    _check(
        *_case(
            lens=lens,
            q_heads=q_heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            block_size=16,
            dtype=dtype,
        )
    )


@needs_native
@pytest.mark.parametrize("block_size", [1, 8, 32, 64])
@pytest.mark.parametrize("table_dtype", [torch.int32, torch.int64])
def test_block_sizes_and_table_dtypes(block_size: int, table_dtype: torch.dtype) -> None:
    _check(
        *_case(
            lens=[5, 70, 129],
            q_heads=4,
            kv_heads=2,
            head_dim=32,
            block_size=block_size,
            dtype=torch.float32,
            table_dtype=table_dtype,
            seed=block_size,
        )
    )


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_one_long_sequence_splits_over_threads(threads: int) -> None:
    """Batch 1: the keys split into ranges merged by LSE; any thread count gives the result."""
    assert cpu_attention.split_plan(2, 300, threads)[0] > 1
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check(
            *_case(
                lens=[4800],
                q_heads=4,
                kv_heads=2,
                head_dim=64,
                block_size=16,
                dtype=torch.float32,
                seed=threads,
            )
        )
    finally:
        torch.set_num_threads(before)


def test_split_plan() -> None:
    # 3 pairs on 2 threads: 8 items wanted, so 3 splits of 22 blocks cover 64 blocks.
    assert cpu_attention.split_plan(3, 64, 2) == (3, 22)
    # Enough pairs already: one split over every block.
    assert cpu_attention.split_plan(24, 64, 2) == (1, 64)
    # Short contexts are not cut below MIN_SPLIT_BLOCKS.
    assert cpu_attention.split_plan(1, 2 * cpu_attention.MIN_SPLIT_BLOCKS - 1, 8)[0] == 1
    assert cpu_attention.split_plan(1, 0, 2) == (1, 1)


@needs_native
def test_shared_prefix_batch() -> None:
    """Sequences sharing their first blocks (one cached document, several questions) read the
    prefix once and their own tails separately; one tail is empty (the context ends on the
    prefix's last block)."""
    bs, shared = 16, 6
    q, k, v, tables, lens = _case(
        lens=[shared * bs + 9, shared * bs + 40, shared * bs + 1],
        q_heads=6,
        kv_heads=2,
        head_dim=64,
        block_size=bs,
        dtype=torch.float32,
        seed=3,
    )
    tables[:, :shared] = tables[0, :shared]
    _check(q, k, v, tables, lens)
    # The same with one context exactly `shared` blocks long: its tail holds no key.
    lens2 = lens.clone()
    lens2[2] = shared * bs
    _check(q, k, v, tables, lens2)


@needs_native
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_cache_matches_float64_over_its_dequantized_values(
    bits: int, dtype: torch.dtype
) -> None:
    """int8 / int4 codes with a (scale, zero) per row, dequantized as they are read: the result
    is attention over the dequantized cache; `flash_decode` takes the kernel for them too."""
    q, k, v, tables, lens = _case(
        lens=[3, 40, 200],
        q_heads=6,
        kv_heads=2,
        head_dim=64,
        block_size=16,
        dtype=torch.float32,
        seed=bits,
    )
    k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)  # unused slots quantize like any row
    k_codes, k_params = quantize_kv_ref(k, bits)
    v_codes, v_params = quantize_kv_ref(v, bits)
    q = q.to(dtype)
    assert native_decode_supported(q, k_codes, bits)
    out, lse = flash_decode_cpu(
        q,
        k_codes,
        v_codes,
        tables,
        lens,
        0.3,
        True,
        k_params=k_params,
        v_params=v_params,
        bits=bits,
    )
    k_deq = dequantize_kv_ref(k_codes, k_params, bits, torch.float64)
    v_deq = dequantize_kv_ref(v_codes, v_params, bits, torch.float64)
    ref_out, ref_lse = _oracle(q, k_deq, v_deq, tables, lens, 0.3)
    atol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=0)
    assert lse is not None
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-6)
    via_dispatch, _ = flash_decode(
        q, k_codes, v_codes, tables, lens, 0.3, k_params=k_params, v_params=v_params, bits=bits
    )
    torch.testing.assert_close(via_dispatch, out)
    with pytest.raises(ValueError, match="needs both k_params and v_params"):
        paged_decode(q, k_codes, v_codes, tables, lens, 0.3, 200, bits=bits)


def _hide_before_windows(k, v, tables, lens, window: int) -> None:
    """NaN in every key and value before each sequence's window (in place), so that reading one
    shows in the result."""
    block_size = k.shape[1]
    for b, n in enumerate(lens.tolist()):
        for t in range(max(0, n - window)):
            blk, slot = tables[b, t // block_size], t % block_size
            k[blk, slot] = v[blk, slot] = float("nan")


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 1])
# one key, less than a block, not a multiple of the block size, four blocks, more than most
# contexts (250 sees 200 of them)
@pytest.mark.parametrize("window", [1, 5, 37, 64, 200])
def test_sliding_window_matches_float64_reference(
    dtype: torch.dtype, block_size: int, window: int
) -> None:
    """Each query attends to its sequence's last `window` keys; the keys before them (NaN
    here) are not read, however the window falls on the blocks."""
    q, k, v, tables, lens = _case(
        lens=[1, 16, 17, 250, 33, 100],
        q_heads=6,
        kv_heads=2,
        head_dim=64,
        block_size=block_size,
        dtype=torch.float32,
        seed=window,
    )
    _hide_before_windows(k, v, tables, lens, window)
    _check(q.to(dtype), k.to(dtype), v.to(dtype), tables, lens, window=window)


@needs_native
@pytest.mark.parametrize("threads", [1, 3])
def test_sliding_window_of_a_long_context_splits_over_threads(threads: int) -> None:
    """The splits cut the window's blocks (a window of about 60 blocks starting mid-block), not
    the whole context, so batch 1 spreads over the threads."""
    window, bs = 970, 16
    assert cpu_attention.split_plan(1, -(-(window + bs) // bs), threads)[0] > 1
    q, k, v, tables, lens = _case(
        lens=[4001, 20], q_heads=4, kv_heads=2, head_dim=64, block_size=bs, dtype=torch.float32
    )
    _hide_before_windows(k, v, tables, lens, window)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check(q, k, v, tables, lens, window=window)
    finally:
        torch.set_num_threads(before)


@needs_native
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sliding_window_over_a_quantized_cache(bits: int, dtype: torch.dtype) -> None:
    """int8 / int4 codes: the window's first block is dequantized from its first visible slot
    on, each row with its own (scale, zero)."""
    q, k, v, tables, lens = _case(
        lens=[3, 40, 200],
        q_heads=6,
        kv_heads=2,
        head_dim=64,
        block_size=16,
        dtype=torch.float32,
        seed=bits,
    )
    k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)
    k_codes, k_params = quantize_kv_ref(k, bits)
    v_codes, v_params = quantize_kv_ref(v, bits)
    k_deq = dequantize_kv_ref(k_codes, k_params, bits, torch.float64)
    v_deq = dequantize_kv_ref(v_codes, v_params, bits, torch.float64)
    q = q.to(dtype)
    atol = 2e-5 if dtype == torch.float32 else 2e-2
    for window in (7, 45):
        out, lse = flash_decode_cpu(
            q,
            k_codes,
            v_codes,
            tables,
            lens,
            0.3,
            True,
            k_params=k_params,
            v_params=v_params,
            bits=bits,
            window=window,
        )
        ref_out, ref_lse = _oracle(q, k_deq, v_deq, tables, lens, 0.3, window)
        torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=0)
        assert lse is not None
        torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-6)


@needs_native
def test_sliding_window_over_a_shared_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch sharing six leading blocks: a window shorter than the longest context attends
    each sequence's own window in one call (no shared-prefix rows); one at least that long
    hides nothing, so the prefix is read once as without a window."""
    bs, shared = 16, 6
    q, k, v, tables, lens = _case(
        lens=[shared * bs + 9, shared * bs + 40, shared * bs + 1],
        q_heads=6,
        kv_heads=2,
        head_dim=64,
        block_size=bs,
        dtype=torch.float32,
        seed=3,
    )
    tables[:, :shared] = tables[0, :shared]
    rows: list[int] = []
    plain_decode = cpu_attention.paged_decode

    def counting(*args, **kwargs):
        rows.append(kwargs.get("rows", args[7] if len(args) > 7 else 1))
        return plain_decode(*args, **kwargs)

    monkeypatch.setattr(cpu_attention, "paged_decode", counting)
    _check(q, k, v, tables, lens, window=50)  # into the prefix for two of them
    assert rows == [1]
    rows.clear()
    _check(q, k, v, tables, lens, window=int(lens.max()))
    assert sorted(rows) == [1, 3]


@needs_native
def test_window_zero_or_beyond_every_context_changes_nothing() -> None:
    q, k, v, tables, lens = _case(
        lens=[1, 70, 129], q_heads=4, kv_heads=2, head_dim=32, block_size=16, dtype=torch.float32
    )
    plain = flash_decode_cpu(q, k, v, tables, lens, 0.3, return_lse=True)
    for window in (0, 129, 1000):
        got = flash_decode_cpu(q, k, v, tables, lens, 0.3, return_lse=True, window=window)
        assert torch.equal(got[0], plain[0]) and got[1] is not None and plain[1] is not None
        assert torch.equal(got[1], plain[1])
    assert not torch.equal(flash_decode_cpu(q, k, v, tables, lens, 0.3, window=128)[0], plain[0])


@needs_native
def test_sliding_window_refusals() -> None:
    """Rows sharing one table (a shared prefix's queries) sit at different positions, so the
    kernel refuses a window for them (its code 4); a negative window is named."""
    q, k, v, tables, lens = _case(
        lens=[40], q_heads=4, kv_heads=2, head_dim=32, block_size=16, dtype=torch.float32
    )
    rows = q.repeat(2, 1, 1)
    paged_decode(rows, k, v, tables, lens, 0.5, 40, rows=2)
    with pytest.raises(ValueError, match=r"sliding window \(8\) needs one query row"):
        paged_decode(rows, k, v, tables, lens, 0.5, 40, rows=2, window=8)
    with pytest.raises(ValueError, match="got -1"):
        paged_decode(q, k, v, tables, lens, 0.5, 40, window=-1)
    with pytest.raises(ValueError, match="got -3"):
        flash_decode_cpu(q, k, v, tables, lens, 0.5, window=-3)


@needs_native
def test_empty_context_gives_zero_and_minus_infinity() -> None:
    q, k, v, tables, _ = _case(
        lens=[20, 20], q_heads=2, kv_heads=1, head_dim=16, block_size=16, dtype=torch.float32
    )
    out, lse = paged_decode(q, k, v, tables, torch.tensor([0, 20]), 0.5, 20)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf"))
    assert torch.isfinite(out[1]).all() and torch.isfinite(lse[1]).all()


@needs_native
def test_rejects_mismatched_inputs() -> None:
    q, k, v, tables, lens = _case(
        lens=[20], q_heads=4, kv_heads=2, head_dim=32, block_size=16, dtype=torch.float32
    )
    with pytest.raises(ValueError, match="disagree"):
        paged_decode(q[:, :2].repeat(2, 1, 1), k, v, tables, lens, 0.5, 20)
    with pytest.raises(ValueError, match="does not fit"):
        paged_decode(q[:, :3], k, v, tables, lens, 0.5, 20)
    with pytest.raises(ValueError, match="scale must be positive"):
        flash_decode_cpu(q, k, v, tables, lens, 0.0)


@needs_native
def test_flash_decode_takes_the_native_kernel_where_it_applies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []

    def counting(*args, **kwargs):
        calls.append(1)
        return flash_decode_cpu(*args, **kwargs)

    monkeypatch.setattr(flash_decode_module, "flash_decode_cpu", counting)
    q, k, v, tables, lens = _case(
        lens=[40, 7], q_heads=4, kv_heads=2, head_dim=32, block_size=16, dtype=torch.float32
    )
    out, _ = flash_decode(q, k, v, tables, lens, 0.5)
    assert calls == [1]
    want, _ = flash_decode_ref(q, k, v, tables, lens, 0.5)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=0)
    # head_dim not a multiple of 16, float16: the reference.
    q8, k8, v8, t8, l8 = _case(
        lens=[9], q_heads=2, kv_heads=1, head_dim=8, block_size=16, dtype=torch.float32
    )
    assert not native_decode_supported(q8, k8, 0)
    flash_decode(q8, k8, v8, t8, l8, 0.5)
    assert not native_decode_supported(q.half(), k.half(), 0)
    assert calls == [1]
    monkeypatch.setenv(CPU_ATTENTION_ENV, "torch")
    assert not native_decode_supported(q, k, 0)
    flash_decode(q, k, v, tables, lens, 0.5)
    assert calls == [1]


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_token", [False, True])
def test_rope_store_matches_rotate_and_store(dtype: torch.dtype, per_token: bool) -> None:
    """q, k as views into a fused qkv row (the attention layer's layout), one padding slot."""
    gen = torch.Generator().manual_seed(7)
    tokens, q_heads, kv_heads, d, block_size = 6, 6, 2, 64, 16
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * d, generator=gen).to(dtype)
    q, k, v = qkv.split([q_heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q, k, v = (t.view(tokens, -1, d) for t in (q, k, v))
    positions = torch.tensor([0, 1, 17, 300, 4095, 70000])
    if per_token:  # requests with their own RoPE base
        inv = torch.stack([inverse_frequencies(d, 10000.0 * (1 + i)) for i in range(tokens)])
        cos, sin = rotary_cos_sin(positions, inv)
    else:
        cos, sin = rotary_cos_sin(positions, inverse_frequencies(d, 1e6))
    want_q, want_k = rotate(q, cos, sin), rotate(k, cos, sin)
    slots = torch.tensor([5, 16, -1, 31, 40, 0])
    k_cache = torch.full((4, block_size, kv_heads, d), 7.0, dtype=dtype)
    v_cache = torch.full_like(k_cache, 7.0)
    want_kc, want_vc = k_cache.clone(), v_cache.clone()
    store_kv_ref(want_k, v, want_kc, want_vc, slots)
    assert native_rope_store_supported(q, k_cache, 0)
    rope_store(q, k, v, cos, sin, k_cache, v_cache, slots)
    # bfloat16: one rounding of an fp32 result that may differ by an ulp (FMA contraction).
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(q, want_q, atol=tol, rtol=tol)
    torch.testing.assert_close(k, want_k, atol=tol, rtol=tol)
    torch.testing.assert_close(k_cache, want_kc, atol=tol, rtol=tol)
    torch.testing.assert_close(v_cache, want_vc, atol=0, rtol=0)
    assert not native_rope_store_supported(q, k_cache.to(torch.float16), 0)
    with pytest.raises(ValueError, match="disagree"):
        rope_store(q, k, v, cos[:3], sin[:3], k_cache, v_cache, slots)


@needs_native
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_store_quantizes_as_the_reference_does(bits: int, dtype: torch.dtype) -> None:
    """An int8 / int4 cache: the codes and (scale, zero) of the rotated k and of v equal
    store_kv_ref's bit for bit; a constant head vector (scale 1) and a padding slot included."""
    gen = torch.Generator().manual_seed(11)
    tokens, q_heads, kv_heads, d, block_size = 6, 6, 2, 64, 16
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * d, generator=gen) * 3
    qkv[3, (q_heads + kv_heads) * d : (q_heads + kv_heads + 1) * d] = 0.75  # a constant v head
    qkv = qkv.to(dtype)
    q, k, v = qkv.split([q_heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q, k, v = (t.view(tokens, -1, d) for t in (q, k, v))
    cos, sin = rotary_cos_sin(torch.tensor([0, 1, 17, 300, 4095, 9]), inverse_frequencies(d, 1e4))
    want_q, want_k, v_before = rotate(q, cos, sin), rotate(k, cos, sin), v.clone()
    slots = torch.tensor([5, 16, -1, 31, 40, 0])
    shape = (4, block_size, kv_heads, code_dim(d, bits))
    kc, vc = (torch.full(shape, 3, dtype=torch.uint8) for _ in range(2))
    kp, vp = (torch.full((*shape[:3], 2), 7.0) for _ in range(2))
    want = [t.clone() for t in (kc, vc, kp, vp)]
    assert native_rope_store_supported(q, kc, bits)
    rope_store(q, k, v, cos, sin, kc, vc, slots, kp, vp, bits=bits)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(q, want_q, atol=tol, rtol=tol)
    torch.testing.assert_close(k, want_k, atol=tol, rtol=tol)
    assert torch.equal(v, v_before)
    # The reference stores the rotated k as it now is (the kernel's rounding of the rotation,
    # within an ulp of the reference's, is checked above).
    store_kv_ref(k, v, want[0], want[1], slots, want[2], want[3], bits=bits)
    for got, expected in zip((kc, vc, kp, vp), want, strict=True):
        assert torch.equal(got, expected)
    assert torch.equal(vp[1, 15, 0], torch.tensor([1.0, 0.75]))  # token 3 (slot 31), v head 0
    with pytest.raises(ValueError, match="needs both"):
        rope_store(q, k, v, cos, sin, kc, vc, slots, kp, None, bits=bits)


def test_environment_switch_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CPU_ATTENTION_ENV, raising=False)
    assert cpu_attention_choice() == "native"
    monkeypatch.setenv(CPU_ATTENTION_ENV, " Torch ")
    assert cpu_attention_choice() == "torch"
    monkeypatch.setenv(CPU_ATTENTION_ENV, "fast")
    with pytest.raises(ValueError, match="DIST_RUNTIME_CPU_ATTENTION='fast' is not valid"):
        cpu_attention_choice()


@pytest.fixture
def fresh_library() -> Iterator[None]:
    """Let a test build (or fail to build) the library anew; the next user rebuilds it."""
    caches = (
        native.library,
        cpu_attention._library,
        cpu_elementwise._library,
        cpu_gemm._linear_fn,
    )
    for fn in caches:
        fn.cache_clear()
    yield
    for fn in caches:
        fn.cache_clear()


def test_no_compiler_falls_back_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, fresh_library: None, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(native, "compiler", lambda: None)
    with caplog.at_level(logging.WARNING, logger="kernels.native"):
        assert cpu_attention._library() is None
    assert "no C compiler found" in caplog.text
    assert not isinstance(cpu_gemm.pack_cpu_weight(torch.randn(8, 8)), cpu_gemm.NativeLinearWeight)
    assert not cpu_elementwise.native_elementwise_supported(torch.randn(2, 8))
    q, k, v, tables, lens = _case(
        lens=[30], q_heads=4, kv_heads=2, head_dim=32, block_size=16, dtype=torch.float32
    )
    assert not native_decode_supported(q, k, 0)
    out, _ = flash_decode(q, k, v, tables, lens, 0.5)
    assert torch.isfinite(out).all()


def test_failing_build_falls_back_with_the_compiler_error(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fresh_library: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    script = tmp_path / "broken-cc"
    script.write_text("#!/bin/sh\necho 'broken-cc: cannot compile' >&2\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setenv("CC", str(script))
    monkeypatch.setenv("DIST_RUNTIME_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="kernels.native"):
        assert cpu_attention._library() is None
    assert "broken-cc: cannot compile" in caplog.text
    assert not list((tmp_path / "cache" / "native").glob("*.so"))  # nothing half-written


@needs_native
def test_a_compiler_without_openmp_builds_a_one_thread_kernel(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fresh_library: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real = native.compiler()
    script = tmp_path / "no-openmp-cc"
    script.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do [ "$a" = -fopenmp ] && { echo "no -fopenmp here" >&2; exit 1; }; done\n'
        f'exec {real} "$@"\n'
    )
    script.chmod(0o755)
    monkeypatch.setenv("CC", str(script))
    monkeypatch.setenv("DIST_RUNTIME_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="kernels.native"):
        assert cpu_attention._library() is not None
    assert "has no OpenMP" in caplog.text
    w, x = torch.randn(40, 24), torch.randn(7, 24)
    linear = cpu_gemm.NativeLinearWeight(w)  # the panel kernel on one thread
    torch.testing.assert_close(linear.matmul(x), x @ w.T, rtol=1e-5, atol=1e-5)
    _check(
        *_case(
            lens=[300, 5], q_heads=4, kv_heads=2, head_dim=32, block_size=16, dtype=torch.float32
        )
    )


@needs_native
def test_build_lands_in_the_cache_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_library: None
) -> None:
    monkeypatch.setenv("DIST_RUNTIME_CACHE", str(tmp_path))
    assert cpu_attention._library() is not None
    built = list((tmp_path / "native").iterdir())
    assert len(built) == 1 and built[0].name.startswith("cpu_kernels-")


@needs_native
def test_the_model_decodes_as_with_the_torch_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Greedy tokens and logprobs are the same with the native kernel and the reference, for a
    batch over a cached shared prefix (the shared-prefix path) and a batch without one."""
    from dist_runtime import Runtime, SamplingParams
    from dist_runtime.formats.random_checkpoint import write_random_checkpoint

    folder = write_random_checkpoint(
        tmp_path / "ckpt",
        architecture="llama",
        vocab_size=320,
        hidden_size=128,
        intermediate_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        seed=11,
    )
    rows: list[int] = []
    plain_decode = cpu_attention.paged_decode

    def counting(*args, **kwargs):
        rows.append(kwargs.get("rows", args[7] if len(args) > 7 else 1))
        return plain_decode(*args, **kwargs)

    monkeypatch.setattr(cpu_attention, "paged_decode", counting)
    # Layer by layer, so that the attention runs through the wrapper counted above (the native
    # decoder calls the same kernel from C: tests/workers/test_native_decoder.py).
    monkeypatch.setenv(CPU_DECODE_ENV, "layers")
    doc = [(7 * i + 1) % 250 for i in range(100)]  # 6 full blocks
    batches = [[doc + [3, 4], doc + [9]], [[5, 6, 7] * 12, [1, 2] * 20]]
    params = SamplingParams(max_new_tokens=12, temperature=0.0, logprobs=3, ignore_eos=True)
    with Runtime(model=str(folder), tp=1, device="cpu", dtype="float32", session_len=512) as rt:
        rt.generate([doc], SamplingParams(max_new_tokens=1))  # the prefix cache now holds doc
        native = [out for batch in batches for out in rt.generate(batch, params)]
        assert any(r == 2 for r in rows), "the shared-prefix path did not run"
        assert any(r == 1 for r in rows)
        monkeypatch.setenv(CPU_ATTENTION_ENV, "torch")
        before = len(rows)
        reference = [out for batch in batches for out in rt.generate(batch, params)]
        assert len(rows) == before
    for a, b in zip(native, reference, strict=True):
        assert a.token_ids == b.token_ids
        assert a.logprobs is not None and b.logprobs is not None
        got = torch.tensor([lp.logprob for lp in a.logprobs])
        want = torch.tensor([lp.logprob for lp in b.logprobs])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
