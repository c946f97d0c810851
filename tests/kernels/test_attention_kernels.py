"""Attention kernels: each Triton kernel against its torch twin, each twin against a float64 oracle.

Without CUDA the kernels run in Triton's interpreter (see conftest.py), so shapes stay small;
`-m slow` adds larger cases and, on CUDA, 64-bit offset checks over >2^31-element caches.
Caches are NaN outside the slots a sequence owns (spare blocks, block tails, table padding) and
output memory is NaN-poisoned before each kernel, so a wrong block or an unwritten row shows.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import pytest
import torch

import kernels.flash_attn as FA
import kernels.flash_decode as FD
import kernels.paged_attention as PA

try:
    import triton
except ImportError:
    triton = None

if triton is not None and not torch.cuda.is_available():
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(FA._flash_attn_kernel, InterpretedFunction):
        # Another test module imported the kernels before conftest set TRITON_INTERPRET.
        for module in (FA, PA, FD):
            importlib.reload(module)

needs_triton = pytest.mark.skipif(triton is None, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

NAN = float("nan")
CPU = torch.device("cpu")
KV_HEADS = 2
OUT_TOL = {
    # Both sides use fp32 IEEE products (the kernels pass input_precision="ieee"); only the
    # summation order differs.
    torch.float32: (1e-5, 1e-5),
    # bf16 output rounding (2^-8 relative) plus, on GPU, P rounded to bf16 before P @ V.
    torch.bfloat16: (2e-2, 2e-2),
}
"""(rtol, atol) of outputs per dtype."""
LSE_TOL = {
    torch.float32: (1e-5, 1e-5),
    # Scores of the same bf16 inputs accumulate in fp32 on both sides.
    torch.bfloat16: (1e-4, 1e-4),
}
GROUPS = [1, 4, 8]
HEAD_DIMS = [64, 128]
BLOCK_SIZES = [8, 16, 64]
"""Around the key tile (16 in the interpreter, 32-64 on CUDA): gathered per key, or one block."""
PREFILL_SEQS = [(5, 37), (1, 18), (23, 23), (0, 9), (40, 61)]
"""(q_len, context_len): cached prefix, decode token, fresh prefill, empty, several query tiles."""


pytestmark = pytest.mark.usefixtures("single_thread")  # (tests/kernels/conftest.py)


# -- inputs, oracle, checks -------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class PagedBatch:
    q: torch.Tensor
    """(tokens, q_heads, head_dim) packed queries."""
    k_cache: torch.Tensor
    """(num_blocks, block_size, kv_heads, head_dim), NaN outside the sequences' slots."""
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    """(batch, max_blocks) int32, padded with NaN blocks."""
    cu_seqlens_q: torch.Tensor
    context_lens: torch.Tensor
    keys: list[torch.Tensor]
    """Per sequence (context_len, kv_heads, head_dim): what the cache holds, densely."""
    values: list[torch.Tensor]


def make_paged_batch(
    seqs: list[tuple[int, int]],
    group: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
) -> PagedBatch:
    """Random sequences (q_len, context_len) in randomly placed cache blocks."""
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-ctx // block_size) for _, ctx in seqs]
    num_blocks = sum(needed) + 3  # spare blocks stay NaN and pad the tables
    order = torch.randperm(num_blocks, generator=gen).tolist()
    spare = order[sum(needed) :]
    shape = (num_blocks, block_size, KV_HEADS, head_dim)
    k_cache = torch.full(shape, NAN, dtype=dtype)
    v_cache = torch.full(shape, NAN, dtype=dtype)
    tables, keys, values = [], [], []
    for (_, ctx), n in zip(seqs, needed):
        table, order = order[:n], order[n:]
        k = torch.randn(ctx, KV_HEADS, head_dim, generator=gen).to(dtype)
        v = torch.randn(ctx, KV_HEADS, head_dim, generator=gen).to(dtype)
        pos = torch.arange(ctx)
        blocks = torch.tensor(table, dtype=torch.long)[pos // block_size]
        k_cache[blocks, pos % block_size] = k
        v_cache[blocks, pos % block_size] = v
        tables.append(table)
        keys.append(k.to(device))
        values.append(v.to(device))
    width = max(needed) + 1  # a spare entry past every sequence, as preallocated blocks leave
    padded = [t + [spare[i % len(spare)] for i in range(width - len(t))] for t in tables]
    q_lens = [q_len for q_len, _ in seqs]
    q = torch.randn(sum(q_lens), KV_HEADS * group, head_dim, generator=gen).to(dtype)
    return PagedBatch(
        q=q.to(device),
        k_cache=k_cache.to(device),
        v_cache=v_cache.to(device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
        cu_seqlens_q=torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], device=device),
        context_lens=torch.tensor([ctx for _, ctx in seqs], dtype=torch.int64, device=device),
        keys=keys,
        values=values,
    )


def dense_attention_f64(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 oracle: key j is visible to query i iff k_pos[j] <= q_pos[i] (or always).

    q: (n, q_heads, d); k, v: (m, kv_heads, d). Returns out (n, q_heads, d) and lse (n, q_heads).
    """
    group = q.shape[1] // k.shape[1]
    k64 = k.double().repeat_interleave(group, dim=1)  # (m, q_heads, d)
    v64 = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,mhd->hnm", q.double(), k64) * scale  # (q_heads, n, m)
    if causal:
        hidden = k_pos.to(q.device)[None, :] > q_pos.to(q.device)[:, None]  # (n, m)
        scores = scores.masked_fill(hidden, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (q_heads, n)
    probs = torch.exp(scores - lse.nan_to_num(neginf=0.0)[..., None])
    out = torch.einsum("hnm,mhd->nhd", probs, v64)
    return out, lse.transpose(0, 1)


def paged_oracle(b: PagedBatch, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    outs, lses = [], []
    cu = b.cu_seqlens_q.tolist()
    for i, ctx in enumerate(b.context_lens.tolist()):
        q = b.q[cu[i] : cu[i + 1]]
        q_pos = torch.arange(ctx - q.shape[0], ctx)
        out, lse = dense_attention_f64(q, b.keys[i], b.values[i], scale, q_pos, torch.arange(ctx))
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def poison_free_memory(device: torch.device, *sizes: tuple[int, torch.dtype]) -> None:
    """Hand NaN-filled blocks of these (numel, dtype) sizes back to the allocator.

    Allocations of the same sizes that follow (the kernel's outputs and scratch) reuse them on
    CUDA's caching allocator (and usually malloc's), so a row the kernel never writes stays NaN.
    """
    blocks = [torch.full((n,), NAN, dtype=dt, device=device) for n, dt in sizes if n]
    del blocks


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: tuple[float, float]) -> None:
    torch.testing.assert_close(actual, expected, rtol=tol[0], atol=tol[1])


def assert_attention_close(
    out: torch.Tensor,
    lse: torch.Tensor | None,
    ref_out: torch.Tensor,
    ref_lse: torch.Tensor | None,
    dtype: torch.dtype,
) -> None:
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    assert not out.isnan().any(), "NaN in out: an unwritten row or a read of a poisoned slot"
    assert_close(out.float(), ref_out.float(), OUT_TOL[dtype])
    if ref_lse is None:
        assert lse is None
        return
    assert lse is not None and lse.dtype == torch.float32 and not lse.isnan().any()
    assert_close(lse, ref_lse.float(), LSE_TOL[dtype])


def _scale(head_dim: int) -> float:
    return head_dim**-0.5


# -- references against the float64 oracle ---------------------------------------------------


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("decode", [False, True], ids=["mixed", "decode"])
def test_paged_attention_ref_matches_oracle(group: int, head_dim: int, decode: bool) -> None:
    seqs = [(1, 37), (1, 1), (1, 16)] if decode else PREFILL_SEQS
    b = make_paged_batch(seqs, group, head_dim, 16, torch.float32, CPU)
    scale = _scale(head_dim)
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.context_lens, scale)
    out, lse = PA.paged_attention_ref(*args, return_lse=True)
    ref_out, ref_lse = paged_oracle(b, scale)
    assert_attention_close(out, lse, ref_out.float(), ref_lse, torch.float32)
    out_only, none = PA.paged_attention_ref(*args)
    assert none is None
    assert_close(out_only, ref_out.float(), OUT_TOL[torch.float32])


@pytest.mark.parametrize("flash", [True, False], ids=["cpu-flash", "masked"])
def test_prefill_chunks_on_cpu_with_and_without_the_fused_op(
    flash: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CPU, chunks run through PyTorch's fused attention op without a mask (the chunk's own
    keys causal, cached keys unmasked with the query heads of a group stacked, merged by LSE);
    without that op, through SDPA with a mask or the tiled path. Both match the oracle."""
    calls: list[int] = []
    real = PA._attend_flash_cpu

    def spy(q: torch.Tensor, *args, **kwargs):
        calls.append(q.shape[0])
        return real(q, *args, **kwargs)

    monkeypatch.setattr(PA, "_attend_flash_cpu", spy)
    if not flash:
        monkeypatch.setattr(PA, "_flash_cpu", lambda: None)
    elif PA._flash_cpu() is None:
        pytest.skip("this PyTorch has no fused CPU attention op")
    # A whole prompt, a chunk over cached keys (both long enough for the fused path) and a
    # short chunk, which keeps the masked call.
    b = make_paged_batch([(300, 300), (260, 700), (5, 37)], 3, 64, 16, torch.float32, CPU)
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.context_lens, 0.125)
    out, lse = PA.paged_attention_ref(*args, return_lse=True)
    ref_out, ref_lse = paged_oracle(b, 0.125)
    assert_attention_close(out, lse, ref_out.float(), ref_lse, torch.float32)
    out_only, _ = PA.paged_attention_ref(*args)
    assert_close(out_only, ref_out.float(), OUT_TOL[torch.float32])
    # with the LSE both long chunks; without, the whole prompt takes SDPA's causal call
    assert calls == ([300, 260, 260] if flash else [])


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_flash_decode_ref_matches_oracle(group: int, head_dim: int) -> None:
    b = make_paged_batch([(1, 37), (1, 1), (1, 50)], group, head_dim, 16, torch.float32, CPU)
    scale = _scale(head_dim)
    out, lse = FD.flash_decode_ref(
        b.q, b.k_cache, b.v_cache, b.block_tables, b.context_lens, scale, return_lse=True
    )
    ref_out, ref_lse = paged_oracle(b, scale)
    assert_attention_close(out, lse, ref_out.float(), ref_lse, torch.float32)


FLASH_CASES = [
    # (q_len, k_len, q_offset, k_offset)
    (37, 45, 20, 10),  # keys partly in the queries' future
    (16, 40, 0, 24),  # every key in the future: out 0, lse -inf under a causal mask
    (19, 24, 0, 8),  # rows 0-7 see no key, the rest see some
    (30, 50, 60, 0),  # every key in the past
    (1, 33, 32, 0),  # one token
    (0, 10, 0, 0),  # no queries
    (12, 0, 5, 0),  # no keys
]


@pytest.mark.parametrize("case", FLASH_CASES, ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_flash_attn_ref_matches_oracle(case: tuple[int, int, int, int], causal: bool) -> None:
    q_len, k_len, q_offset, k_offset = case
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(q_len, 4 * KV_HEADS, 64, generator=gen)
    k, v = torch.randn(2, k_len, KV_HEADS, 64, generator=gen)
    out, lse = FA.flash_attn_ref(q, k, v, 0.125, causal, q_offset, k_offset)
    q_pos, k_pos = torch.arange(q_len) + q_offset, torch.arange(k_len) + k_offset
    ref_out, ref_lse = dense_attention_f64(q, k, v, 0.125, q_pos, k_pos, causal)
    assert_attention_close(out, lse, ref_out.float(), ref_lse, torch.float32)


# -- Triton kernels against the references ----------------------------------------------------

KERNEL_CASES = [
    (group, head_dim, block_size, torch.float32)
    for group in GROUPS
    for head_dim in HEAD_DIMS
    for block_size in BLOCK_SIZES
] + [
    (4, 128, 16, torch.bfloat16),
    (8, 64, 64, torch.bfloat16),
    (1, 128, 8, torch.bfloat16),
]


def _case_id(case: tuple[int, int, int, torch.dtype]) -> str:
    group, head_dim, block_size, dtype = case
    return f"g{group}-d{head_dim}-bs{block_size}-{str(dtype).removeprefix('torch.')}"


@needs_triton
@pytest.mark.parametrize("case", KERNEL_CASES, ids=_case_id)
def test_paged_attention_triton_matches_ref(
    case: tuple[int, int, int, torch.dtype], device: torch.device
) -> None:
    group, head_dim, block_size, dtype = case
    b = make_paged_batch(PREFILL_SEQS, group, head_dim, block_size, dtype, device, seed=2)
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.context_lens)
    scale = _scale(head_dim)
    tokens, heads, _ = b.q.shape
    poison_free_memory(device, (b.q.numel(), dtype), (tokens * heads, torch.float32))
    out, lse = PA.paged_attention_triton(*args, scale, return_lse=True)
    ref_out, ref_lse = PA.paged_attention_ref(*args, scale, return_lse=True)
    assert_attention_close(out, lse, ref_out, ref_lse, dtype)


@needs_triton
@pytest.mark.parametrize("group", [1, 8])
def test_paged_attention_triton_decode_batch_and_no_lse(group: int, device: torch.device) -> None:
    seqs = [(1, 70), (1, 1), (1, 33), (1, 16)]
    b = make_paged_batch(seqs, group, 64, 16, torch.float32, device, seed=3)
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.context_lens, 0.125)
    poison_free_memory(device, (b.q.numel(), b.q.dtype))
    out, lse = PA.paged_attention_triton(*args)
    ref_out, _ = PA.paged_attention_ref(*args)
    assert_attention_close(out, lse, ref_out, None, torch.float32)


@needs_triton
def test_paged_attention_triton_no_tokens(device: torch.device) -> None:
    b = make_paged_batch([(0, 5), (0, 20)], 4, 64, 16, torch.float32, device)
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.context_lens, 0.125)
    out, lse = PA.paged_attention_triton(*args, return_lse=True)
    assert out.shape == (0, 4 * KV_HEADS, 64) and lse is not None and lse.shape == (0, 8)


DECODE_CONTEXTS = {
    "mixed": [1, 37, 130, 16],  # a short sequence leaves most of its splits empty
    "long": [300],  # one sequence spread over many splits
}


@needs_triton
@pytest.mark.parametrize("case", KERNEL_CASES, ids=_case_id)
@pytest.mark.parametrize("contexts", list(DECODE_CONTEXTS))
def test_flash_decode_triton_matches_ref(
    case: tuple[int, int, int, torch.dtype], contexts: str, device: torch.device
) -> None:
    group, head_dim, block_size, dtype = case
    seqs = [(1, ctx) for ctx in DECODE_CONTEXTS[contexts]]
    b = make_paged_batch(seqs, group, head_dim, block_size, dtype, device, seed=4)
    _check_flash_decode(b, _scale(head_dim), dtype, device)


@needs_triton
def test_flash_decode_triton_wide_table(device: torch.device, monkeypatch) -> None:
    """A CUDA graph's block table is a session wide; the sequences' keys, not the width, are
    cut into the splits, and the result matches a table as wide as the longest sequence."""
    monkeypatch.setattr(FD, "PROGRAMS_PER_SM", 8)
    b = make_paged_batch([(1, 70), (1, 9)], 4, 64, 16, torch.float32, device, seed=6)
    wide = b.block_tables[:, -1:].expand(-1, 40)  # NaN spare blocks out to 640 keys
    tables = torch.cat([b.block_tables, wide], dim=1).contiguous()
    args = (b.q, b.k_cache, b.v_cache, tables, b.context_lens, 0.125)
    splits = FD.split_plan(2, KV_HEADS, tables.shape[1] * 16, 16, device)
    assert splits > 1 and FD.decode_config(64, torch.float32)["BLOCK_N"] < 70
    out, lse = FD.flash_decode_triton(*args, return_lse=True)
    ref_out, ref_lse = FD.flash_decode_ref(*args, return_lse=True)
    assert_attention_close(out, lse, ref_out, ref_lse, torch.float32)
    narrow, narrow_lse = FD.flash_decode_triton(*args[:3], b.block_tables, *args[4:], True)
    assert_attention_close(out, lse, narrow, narrow_lse, torch.float32)


@needs_triton
@pytest.mark.parametrize("min_tiles", [2, 5])
def test_flash_decode_triton_split_floor(device: torch.device, monkeypatch, min_tiles: int) -> None:
    """A floor on the key tiles per split: a sequence spreads over fewer, longer splits, the
    programs past its keys store empty partials, and the merge still equals the reference."""
    monkeypatch.setattr(FD, "PROGRAMS_PER_SM", 8)
    monkeypatch.setattr(FD, "MIN_SPLIT_TILES", min_tiles)
    b = make_paged_batch([(1, 150), (1, 20), (1, 1)], 4, 64, 16, torch.float32, device, seed=8)
    tiles = -(-150 // FD.decode_config(64, torch.float32)["BLOCK_N"])
    splits = FD.split_plan(3, KV_HEADS, b.block_tables.shape[1] * 16, 16, device)
    assert splits * min_tiles > tiles  # the longest sequence leaves splits empty
    _check_flash_decode(b, 0.125, torch.float32, device)


@needs_triton
def test_flash_decode_triton_one_split(device: torch.device, monkeypatch) -> None:
    """With the device already full, pass 1 writes the output directly (no merge pass)."""
    monkeypatch.setattr(FD, "PROGRAMS_PER_SM", 0)
    b = make_paged_batch([(1, 90), (1, 3)], 4, 64, 16, torch.float32, device, seed=5)
    _check_flash_decode(b, 0.125, torch.float32, device)


@needs_triton
def test_flash_decode_triton_empty_batch(device: torch.device) -> None:
    q = torch.empty(0, 8, 64, device=device)
    cache = torch.zeros(4, 16, KV_HEADS, 64, device=device)
    tables = torch.zeros(0, 2, dtype=torch.int32, device=device)
    lens = torch.zeros(0, dtype=torch.int64, device=device)
    out, lse = FD.flash_decode_triton(q, cache, cache, tables, lens, 0.125, return_lse=True)
    assert out.shape == (0, 8, 64) and lse is not None and lse.shape == (0, 8)


@needs_triton
def test_split_plan_caps_the_merge_partials(monkeypatch: pytest.MonkeyPatch) -> None:
    """One KV head of one sequence on 132 SMs wants 264 splits; the merge holds at most
    MERGE_MAX_PARTIALS of (split x head_dim), so head_dim 256 takes 128 and 128 takes 256."""
    monkeypatch.setattr(FD, "_sm_count", lambda _: 132)
    cpu = torch.device("cpu")
    assert FD.split_plan(1, 1, 1 << 20, 32, cpu) == 264
    assert FD.split_plan(1, 1, 1 << 20, 32, cpu, head_dim=256) == 128
    assert FD.split_plan(1, 1, 1 << 20, 32, cpu, head_dim=128) == 256
    assert FD.split_plan(8, 8, 1 << 20, 32, cpu, head_dim=256) == 5  # (under the cap)
    assert FD.merge_warps(128, 256) * 32 * 64 >= FD.MERGE_MAX_PARTIALS // 256 * 256


def _check_flash_decode(
    b: PagedBatch, scale: float, dtype: torch.dtype, device: torch.device
) -> None:
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.context_lens, scale)
    batch, heads, head_dim = b.q.shape
    block_n = FD.decode_config(head_dim, dtype)["BLOCK_N"]
    max_ctx = b.block_tables.shape[1] * b.k_cache.shape[1]
    splits = FD.split_plan(batch, KV_HEADS, max_ctx, block_n, device, head_dim=head_dim)
    poison_free_memory(
        device,
        (b.q.numel(), dtype),
        (batch * heads, torch.float32),
        (batch * heads * splits * head_dim, torch.float32),
        (batch * heads * splits, torch.float32),
    )
    out, lse = FD.flash_decode_triton(*args, return_lse=True)
    ref_out, ref_lse = FD.flash_decode_ref(*args, return_lse=True)
    assert_attention_close(out, lse, ref_out, ref_lse, dtype)
    out_only, none = FD.flash_decode_triton(*args)
    assert_attention_close(out_only, none, ref_out, None, dtype)


FLASH_KERNEL_CASES = [
    (group, head_dim, torch.float32, case)
    for group in GROUPS
    for head_dim in HEAD_DIMS
    for case in FLASH_CASES
] + [(4, 128, torch.bfloat16, FLASH_CASES[0])]  # the masking logic is dtype-independent
"""(group, head_dim, dtype, (q_len, k_len, q_offset, k_offset))."""


@needs_triton
@pytest.mark.parametrize("kernel_case", FLASH_KERNEL_CASES, ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_flash_attn_triton_matches_ref(
    kernel_case: tuple[int, int, torch.dtype, tuple[int, int, int, int]],
    causal: bool,
    device: torch.device,
) -> None:
    group, head_dim, dtype, case = kernel_case
    q_len, k_len, q_offset, k_offset = case
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(q_len, group * KV_HEADS, head_dim, generator=gen).to(dtype).to(device)
    kv = torch.randn(k_len, 2, KV_HEADS, head_dim, generator=gen).to(dtype).to(device)
    k, v = kv[:, 0], kv[:, 1]  # token strides twice the head block: strided but unit head_dim
    scale = _scale(head_dim)
    poison_free_memory(device, (q.numel(), dtype), (q_len * group * KV_HEADS, torch.float32))
    out, lse = FA.flash_attn_triton(q, k, v, scale, causal, q_offset, k_offset)
    ref_out, ref_lse = FA.flash_attn_ref(q, k, v, scale, causal, q_offset, k_offset)
    assert_attention_close(out, lse, ref_out, ref_lse, dtype)


def _gpu_prefill_configs() -> dict[str, dict[str, int]]:
    """The prefill tiles `attention_config` picks on an A100 and an H100 (bf16, group 4), by
    head size and cache format, as the GPU would get them."""
    configs = {}
    for arch in (80, 90):
        for head_dim in (64, 128):
            for bits in (0, 8):
                with pytest.MonkeyPatch.context() as mp:
                    mp.setattr(FA, "is_interpreting", lambda: False)
                    mp.setattr(FA, "capability", lambda device, arch=arch: arch)
                    cfg = FA.attention_config(head_dim, 4, torch.bfloat16, CPU, bits)
                configs[f"sm{arch}-d{head_dim}-kv{bits or 16}"] = cfg
    return configs


@needs_triton
@pytest.mark.parametrize("name", sorted(_gpu_prefill_configs()) if triton is not None else [])
def test_gpu_prefill_tiles_match_ref(name: str, device: torch.device, monkeypatch) -> None:
    """The tiles the GPUs run (64-256 rows, 32-64 keys over 16-slot blocks) give the reference's
    answer here too; the other tests run the interpreter's small tiles."""
    import kernels.position_attention as PO

    cfg = _gpu_prefill_configs()[name]
    for module in (FA, PA, PO):
        monkeypatch.setattr(module, "attention_config", lambda *_, c=cfg: dict(c))
    head_dim = int(name.split("-d")[1].split("-")[0])
    dtype, scale = torch.bfloat16, _scale(head_dim)
    b = make_paged_batch([(70, 90), (1, 40), (33, 33)], 4, head_dim, 16, dtype, device, seed=9)
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.context_lens)
    out, lse = PA.paged_attention_triton(*args, scale, return_lse=True)
    ref_out, ref_lse = PA.paged_attention_ref(*args, scale, return_lse=True)
    assert_attention_close(out, lse, ref_out, ref_lse, dtype)

    q, k, v = b.q[:70], b.keys[0][:90], b.values[0][:90]
    out, lse = FA.flash_attn_triton(q, k, v, scale, True, 20, 0)
    ref_out, ref_lse = FA.flash_attn_ref(q, k, v, scale, True, 20, 0)
    assert_attention_close(out, lse, ref_out, ref_lse, dtype)

    q_pos = torch.arange(20, 90, device=device)
    k_pos = torch.randperm(90, generator=torch.Generator().manual_seed(1)).to(device)
    out, lse = PO.position_attention_triton(q, q_pos, k[k_pos], v[k_pos], k_pos, scale)
    ref_out, ref_lse = PO.position_attention_ref(q, q_pos, k[k_pos], v[k_pos], k_pos, scale)
    assert_attention_close(out, lse, ref_out, ref_lse, dtype)


# -- dispatch and argument checks -------------------------------------------------------------


@needs_triton
def test_public_functions_dispatch_to_triton(device: torch.device, monkeypatch) -> None:
    monkeypatch.setenv("DIST_RUNTIME_KERNELS", "triton")
    b = make_paged_batch([(3, 20), (1, 9)], 4, 64, 16, torch.float32, device, seed=7)
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.context_lens, 0.125)
    out, _ = PA.paged_attention(*args)
    assert_close(out, PA.paged_attention_ref(*args)[0], OUT_TOL[torch.float32])
    q1 = b.q[[2, 3]]
    dec = (q1, b.k_cache, b.v_cache, b.block_tables, b.context_lens, 0.125)
    out, _ = FD.flash_decode(*dec)
    assert_close(out, FD.flash_decode_ref(*dec)[0], OUT_TOL[torch.float32])
    k, v = b.keys[0], b.values[0]
    out, lse = FA.flash_attn(b.q[:3], k, v, 0.125, True, 17, 0)
    ref_out, ref_lse = FA.flash_attn_ref(b.q[:3], k, v, 0.125, True, 17, 0)
    assert_attention_close(out, lse, ref_out, ref_lse, torch.float32)


@needs_triton
def test_launchers_reject_what_the_kernels_cannot_run(device: torch.device) -> None:
    q = torch.randn(4, 8, 80, device=device)
    kv = torch.randn(6, 2, 80, device=device)
    with pytest.raises(ValueError, match="head_dim"):
        FA.flash_attn_triton(q, kv, kv, 0.1, True)
    with pytest.raises(ValueError, match="dtype|fp16"):
        FA.flash_attn_triton(q[..., :64].contiguous(), kv[..., :64].half(), kv[..., :64], 0.1, True)
    b = make_paged_batch([(2, 5)], 4, 64, 16, torch.float32, device)
    with pytest.raises(ValueError, match="k_cache and v_cache"):
        PA.paged_attention_triton(
            b.q, b.k_cache, b.v_cache[:, :8], b.block_tables, b.cu_seqlens_q, b.context_lens, 0.1
        )


# -- larger and CUDA-only cases ---------------------------------------------------------------


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_larger_shapes(dtype: torch.dtype, device: torch.device) -> None:
    seqs = [(300, 1000), (129, 129), (1, 777), (64, 200)]
    b = make_paged_batch(seqs, 8, 128, 16, dtype, device, seed=8)
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.cu_seqlens_q, b.context_lens, 0.088)
    poison_free_memory(device, (b.q.numel(), dtype), (b.q.shape[0] * 16, torch.float32))
    out, lse = PA.paged_attention_triton(*args, return_lse=True)
    assert_attention_close(out, lse, *PA.paged_attention_ref(*args, return_lse=True), dtype)
    ref_out, ref_lse = paged_oracle(b, 0.088)
    assert_close(out.double(), ref_out, OUT_TOL[dtype])
    dec = make_paged_batch([(1, 2000), (1, 37)], 8, 128, 16, dtype, device, seed=9)
    _check_flash_decode(dec, 0.088, dtype, device)


@needs_cuda
@pytest.mark.slow
def test_offsets_past_int32() -> None:
    """Block ids whose element offset exceeds 2^31, as in 1M-token caches."""
    device = torch.device("cuda")
    block_size, head_dim = 16, 128
    per_block = block_size * KV_HEADS * head_dim
    num_blocks = (1 << 31) // per_block + 64  # 2^31 + elements: 4 GiB per bf16 cache
    k_cache = torch.randn(num_blocks, block_size, KV_HEADS, head_dim, device=device).bfloat16()
    v_cache = torch.randn_like(k_cache)
    ctx = 40 * block_size - 5
    blocks = torch.arange(num_blocks - 40, num_blocks, dtype=torch.int32, device=device)
    tables = blocks.flip(0)[None]  # (1, 40), the highest ids
    lens = torch.tensor([ctx], device=device)
    q = torch.randn(37, 4 * KV_HEADS, head_dim, device=device).bfloat16()
    cu = torch.tensor([0, 37], device=device)
    args = (q, k_cache, v_cache, tables, cu, lens, 0.088)
    assert_attention_close(
        *PA.paged_attention_triton(*args, return_lse=True),
        *PA.paged_attention_ref(*args, return_lse=True),
        torch.bfloat16,
    )
    dec = (q[:1], k_cache, v_cache, tables, lens, 0.088)
    assert_attention_close(
        *FD.flash_decode_triton(*dec, return_lse=True),
        *FD.flash_decode_ref(*dec, return_lse=True),
        torch.bfloat16,
    )
    # Contiguous flash attention: keys strided so that the last lies past element 2^31.
    stride_tok = ((1 << 31) // 29 + 1) // 8 * 8 + 8
    k = k_cache.view(-1).as_strided((30, KV_HEADS, head_dim), (stride_tok, head_dim, 1))
    v = v_cache.view(-1).as_strided((30, KV_HEADS, head_dim), (stride_tok, head_dim, 1), 64)
    assert_attention_close(
        *FA.flash_attn_triton(q, k, v, 0.088, True, 10, 0),
        *FA.flash_attn_ref(q, k, v, 0.088, True, 10, 0),
        torch.bfloat16,
    )
