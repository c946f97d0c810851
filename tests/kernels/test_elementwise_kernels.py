"""Elementwise kernels (rms_norm, rotary, silu_and_mul, store_kv, rotary_store, lse_merge): each
Triton kernel
against its torch twin, each twin against a float64 formula, and the dispatch between them.

Without CUDA the kernels run in Triton's interpreter (see conftest.py). Kernel outputs are fresh
tensors except store_kv's caches, which are NaN-poisoned so a stray or missing write shows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

import kernels.dispatch as dispatch
import kernels.lse_merge as LM
import kernels.rms_norm as RN
import kernels.rotary as RO
import kernels.rotary_store as RS
import kernels.silu_and_mul as SM
import kernels.store_kv as SK
from dist_runtime.config import CPU_ELEMENTWISE_ENV

try:
    import triton
except ImportError:
    triton = None


def _triton_skip_reason() -> str | None:
    if triton is None:
        return "triton is not installed"
    if torch.cuda.is_available():
        return None
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(RN._rms_norm_kernel, InterpretedFunction):
        # Reloading the kernel modules would not help: triton's own jit functions (tl.sum, ...)
        # were decorated for compilation when triton was imported.
        return (
            "triton was imported before tests/kernels/conftest.py set TRITON_INTERPRET=1; "
            "export TRITON_INTERPRET=1 or run tests/kernels on its own"
        )
    return None


TRITON_SKIP = _triton_skip_reason()
pytestmark = [
    # numpy under the interpreter warns on log(0) = -inf, which lse_merge relies on.
    pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning"),
    pytest.mark.usefixtures("single_thread"),  # (tests/kernels/conftest.py)
]
needs_triton = pytest.mark.skipif(TRITON_SKIP is not None, reason=str(TRITON_SKIP))
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

NAN = float("nan")
NEG_INF = float("-inf")
DTYPES = [torch.float32, torch.bfloat16]
TOL = {
    # Same fp32 formulas on both sides; only reduction order and the exp/cos/rsqrt
    # implementations differ, by a few ulps.
    torch.float32: (1e-5, 1e-5),
    # Two bf16 ulps (2^-7 relative each, at worst): a few-ulp fp32 difference can flip a
    # rounding, and rms_norm rounds twice (the norm, then the product with the weight).
    torch.bfloat16: (2**-6, 1e-2),
}
"""(rtol, atol) of kernel outputs per dtype, compiled on CUDA."""
INTERPRETER_BF16_TOL = (3 * 2**-7, 1e-2)
"""Triton's interpreter rounds fp32 -> bf16 toward zero where torch rounds to nearest even: one
more ulp."""
ROPE_THETA = 1e6
MAX_POSITION = 1 << 20
"""Positions up to 1M tokens: angles up to ~1e6 rad stress fp32 cos/sin range reduction."""


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Tolerances of a kernel that computed in `dtype` (the output may be wider)."""
    tol = INTERPRETER_BF16_TOL if _rounds_toward_zero(actual.device, dtype) else TOL[dtype]
    rtol, atol = tol
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def _rounds_toward_zero(device: torch.device, dtype: torch.dtype) -> bool:
    """Triton's interpreter truncates fp32 -> bf16; compiled kernels round to nearest even."""
    return device.type != "cuda" and dtype == torch.bfloat16


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Drawn on the CPU from `gen`, so CPU and CUDA runs see the same values."""
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)


def _inv_freq(head_dim: int, device: torch.device) -> torch.Tensor:
    """HF's default RoPE frequencies, as `workers.layers.rotary.inverse_frequencies`."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return (1.0 / ROPE_THETA**exponents).to(device)


def _fused_qkv(
    gen: torch.Generator, tokens: int, q_heads: int, kv_heads: int, head_dim: int, dtype, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views into one (tokens, (q_heads + 2 kv_heads) * head_dim) projection, as Attention has."""
    q_size, kv_size = q_heads * head_dim, kv_heads * head_dim
    qkv = _randn(gen, tokens, q_size + 2 * kv_size, dtype=dtype, device=device)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    return (
        q.view(tokens, q_heads, head_dim),
        k.view(tokens, kv_heads, head_dim),
        v.view(tokens, kv_heads, head_dim),
    )


# -- rms_norm ----------------------------------------------------------------------------------


def test_rms_norm_ref_matches_formula_in_float64():
    gen = _gen(0)
    x, res = _randn(gen, 5, 96, dtype=torch.float64), _randn(gen, 5, 96, dtype=torch.float64)
    weight, eps = _randn(gen, 96, dtype=torch.float64), 1e-6
    out, res_out = RN.rms_norm_ref(x, weight, eps, res)
    s = x + res
    expected = s / torch.sqrt((s * s).sum(-1, keepdim=True) / 96 + eps) * weight
    # The reference normalizes in fp32 even for float64 input, as HF does: fp32 accuracy.
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(res_out, s, rtol=0, atol=0)
    out, res_out = RN.rms_norm_ref(x, weight, eps)
    assert res_out is x


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7, 33])
@pytest.mark.parametrize("hidden", [64, 96, 128])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_ref(device, dtype, tokens, hidden, with_residual):
    gen = _gen(tokens * hidden)
    # x is a column slice of a wider tensor: strided rows, contiguous hidden dim.
    x = _randn(gen, tokens, hidden + 32, dtype=dtype, device=device)[:, 16 : 16 + hidden]
    residual = _randn(gen, tokens, hidden, dtype=dtype, device=device) if with_residual else None
    weight = (1 + 0.1 * _randn(gen, hidden)).to(dtype=dtype, device=device)
    out, res_out = RN.rms_norm_triton(x, weight, 1e-5, residual)
    ref_out, ref_res = RN.rms_norm_ref(x, weight, 1e-5, residual)
    assert out.dtype == ref_out.dtype and out.shape == (tokens, hidden)
    _assert_close(out, ref_out, dtype)
    if with_residual and _rounds_toward_zero(device, dtype):
        _assert_close(res_out, ref_res, dtype)
    elif with_residual:
        torch.testing.assert_close(res_out, ref_res, rtol=0, atol=0)  # one rounded add each
    else:
        assert res_out is x


@needs_triton
def test_rms_norm_fp32_weight_promotes_and_keeps_leading_dims(device):
    gen = _gen(1)
    x = _randn(gen, 2, 3, 64, dtype=torch.bfloat16, device=device)
    weight = _randn(gen, 64, device=device)
    out, _ = RN.rms_norm_triton(x, weight, 1e-6)
    ref, _ = RN.rms_norm_ref(x, weight, 1e-6)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 64)
    _assert_close(out, ref, torch.bfloat16)  # fp32 output of a bf16-rounded norm


def test_rms_norm_fp32_scale_is_one_cast_after_the_weight():
    """Gemma's order: the fp32 weight scales the fp32 normed values, one cast to x's dtype
    after (the default order casts first, then multiplies in the weight's dtype)."""
    gen = _gen(2)
    x, res = _randn(gen, 6, 96, dtype=torch.bfloat16), _randn(gen, 6, 96, dtype=torch.bfloat16)
    weight = 1 + 0.1 * _randn(gen, 96)  # (1 + w, float32)
    out, res_out = RN.rms_norm_ref(x, weight, 1e-6, res, fp32_scale=True)
    s = (x + res).float()
    expected = (weight * (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6))).bfloat16()
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    assert torch.equal(res_out, x + res)
    default, _ = RN.rms_norm_ref(x, weight, 1e-6, res)
    assert default.dtype == torch.float32 and not torch.equal(default.bfloat16(), out)
    out32, _ = RN.rms_norm_ref(x.float(), weight, 1e-6, fp32_scale=True)  # (float32: one product)
    assert torch.equal(out32, RN.rms_norm_ref(x.float(), weight, 1e-6)[0])


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_fp32_scale_matches_ref(device, dtype, with_residual):
    gen = _gen(3)
    x = _randn(gen, 9, 96, dtype=dtype, device=device)
    residual = _randn(gen, 9, 96, dtype=dtype, device=device) if with_residual else None
    weight = (1 + 0.1 * _randn(gen, 96)).to(device=device)
    out, _ = RN.rms_norm_triton(x, weight, 1e-5, residual, fp32_scale=True)
    ref, _ = RN.rms_norm_ref(x, weight, 1e-5, residual, fp32_scale=True)
    assert out.dtype == dtype == ref.dtype
    _assert_close(out, ref, dtype)


# -- rotary ------------------------------------------------------------------------------------


def test_rotary_ref_is_complex_rotation_in_float64():
    """Each (i, i + half) pair is multiplied by exp(1j * position * inv_freq[i]).

    The reference rotates in fp32 (angles are fp32 by design): fp32 accuracy.
    """
    gen = _gen(2)
    tokens, head_dim = 6, 64
    q = _randn(gen, tokens, 4, head_dim, dtype=torch.float64)
    k = _randn(gen, tokens, 2, head_dim, dtype=torch.float64)
    positions = torch.randint(0, MAX_POSITION, (tokens,), generator=gen)
    inv_freq = _inv_freq(head_dim, torch.device("cpu"))
    q_out, k_out = RO.rotary_ref(q, k, positions, inv_freq)
    angle = (positions.float()[:, None] * inv_freq).double()[:, None, :]  # fp32 angles
    for x, out in ((q, q_out), (k, k_out)):
        half = head_dim // 2
        z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angle), angle)
        torch.testing.assert_close(out, torch.cat((z.real, z.imag), -1), rtol=1e-6, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("tokens", [1, 7, 33])
@pytest.mark.parametrize("kv_heads, group", [(2, 1), (1, 8), (2, 4), (3, 8)])
def test_rotary_matches_ref(device, dtype, head_dim, tokens, kv_heads, group):
    gen = _gen(tokens * head_dim + group)
    q, k, _ = _fused_qkv(gen, tokens, kv_heads * group, kv_heads, head_dim, dtype, device)
    positions = torch.randint(0, MAX_POSITION, (tokens,), generator=gen).to(device)
    positions[0] = 0
    inv_freq = _inv_freq(head_dim, device)
    q_out, k_out = RO.rotary_triton(q, k, positions, inv_freq)
    ref_q, ref_k = RO.rotary_ref(q, k, positions, inv_freq)
    assert q_out.is_contiguous() and k_out.is_contiguous()
    _assert_close(q_out, ref_q, dtype)
    _assert_close(k_out, ref_k, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_per_token_frequencies(device, dtype):
    """A row of frequencies per token (requests with their own RoPE base) rotates each token as
    the shared-frequency kernel does with that token's row."""
    gen = _gen(11)
    tokens, head_dim = 5, 64
    q, k, _ = _fused_qkv(gen, tokens, 8, 2, head_dim, dtype, device)
    positions = torch.randint(0, MAX_POSITION, (tokens,), generator=gen).to(device)
    bases = [1e4, 5e5, 1e4, 5e7, 2e6]
    inv = torch.stack([1.0 / b ** (torch.arange(0, head_dim, 2).float() / head_dim) for b in bases])
    inv = inv.to(device)
    q_out, k_out = RO.rotary_triton(q, k, positions, inv)
    ref_q, ref_k = RO.rotary_ref(q, k, positions, inv)
    _assert_close(q_out, ref_q, dtype)
    _assert_close(k_out, ref_k, dtype)
    for t in range(tokens):  # each row equals a one-token call with that token's frequencies
        one_q, one_k = RO.rotary_triton(q[t : t + 1], k[t : t + 1], positions[t : t + 1], inv[t])
        assert torch.equal(q_out[t : t + 1], one_q) and torch.equal(k_out[t : t + 1], one_k)
    with pytest.raises(ValueError, match="inv_freq must be"):
        RO.rotary_triton(q, k, positions, inv[:2])


@needs_triton
def test_rotary_leaves_inputs_untouched(device):
    gen = _gen(3)
    q, k, _ = _fused_qkv(gen, 3, 4, 2, 64, torch.float32, device)
    q_before, k_before = q.clone(), k.clone()
    RO.rotary_triton(q, k, torch.arange(3, device=device) + 5, _inv_freq(64, device))
    assert torch.equal(q, q_before) and torch.equal(k, k_before)


# -- silu_and_mul ------------------------------------------------------------------------------


def test_silu_and_mul_ref_matches_formula_in_float64():
    gen = _gen(4)
    x = 4 * _randn(gen, 5, 2 * 48, dtype=torch.float64)
    gate, up = x[:, :48], x[:, 48:]
    expected = gate / (1 + torch.exp(-gate)) * up
    torch.testing.assert_close(SM.silu_and_mul_ref(x), expected, rtol=1e-12, atol=1e-12)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, inter", [(1, 64), (7, 96), (33, 1100)])
def test_silu_and_mul_matches_ref(device, dtype, tokens, inter):
    gen = _gen(tokens + inter)
    # Rows strided by a wider buffer; |gate| up to ~16 reaches exp's tails.
    x = 4 * _randn(gen, tokens, 2 * inter + 8, dtype=dtype, device=device)[:, : 2 * inter]
    out = SM.silu_and_mul_triton(x)
    assert out.shape == (tokens, inter) and out.dtype == dtype
    _assert_close(out, SM.silu_and_mul_ref(x), dtype)


def test_gelu_tanh_and_mul_ref_matches_formula_in_float64():
    """Gemma 3's `gelu_pytorch_tanh`: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""
    gen = _gen(5)
    x = 4 * _randn(gen, 5, 2 * 48, dtype=torch.float64)
    gate, up = x[:, :48], x[:, 48:]
    inner = math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3)
    expected = 0.5 * gate * (1 + torch.tanh(inner)) * up
    torch.testing.assert_close(SM.gelu_tanh_and_mul_ref(x), expected, rtol=1e-12, atol=1e-12)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, inter", [(1, 64), (33, 1100)])
def test_gelu_tanh_and_mul_matches_ref(device, dtype, tokens, inter):
    gen = _gen(tokens + inter + 1)
    # |gate| up to ~16: tanh saturates both ways (exp over- and underflows in the kernel's form).
    x = 4 * _randn(gen, tokens, 2 * inter + 8, dtype=dtype, device=device)[:, : 2 * inter]
    out = SM.silu_and_mul_triton(x, "gelu_pytorch_tanh")
    assert out.shape == (tokens, inter) and out.dtype == dtype
    _assert_close(out, SM.gelu_tanh_and_mul_ref(x), dtype)


def test_act_and_mul_names_the_activations():
    x = torch.randn(3, 8)
    torch.testing.assert_close(SM.act_and_mul(x, "gelu_pytorch_tanh"), SM.gelu_tanh_and_mul_ref(x))
    torch.testing.assert_close(SM.act_and_mul(x), SM.silu_and_mul_ref(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="'relu' is not one of"):
        SM.act_and_mul(x, "relu")


# -- store_kv ----------------------------------------------------------------------------------


def _slots(gen: torch.Generator, tokens: int, capacity: int, num_padding: int) -> torch.Tensor:
    """Distinct slots, the last `num_padding` tokens marked padding (-1)."""
    slots = torch.randperm(capacity, generator=gen)[:tokens]
    slots[tokens - num_padding :] = -1
    return slots


def test_store_kv_ref_skips_padding_slots():
    gen = _gen(5)
    k, v = _randn(gen, 3, 2, 8), _randn(gen, 3, 2, 8)
    k_cache = torch.full((2, 4, 2, 8), NAN)
    v_cache = torch.full((2, 4, 2, 8), NAN)
    SK.store_kv_ref(k, v, k_cache, v_cache, torch.tensor([5, -1, 0]))
    flat_k, flat_v = k_cache.view(8, 2, 8), v_cache.view(8, 2, 8)
    assert torch.equal(flat_k[5], k[0]) and torch.equal(flat_k[0], k[2])
    assert torch.equal(flat_v[5], v[0]) and torch.equal(flat_v[0], v[2])
    assert flat_k[1:5].isnan().all() and flat_v[6:].isnan().all()


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(
    "tokens, kv_heads, block_size, num_padding", [(1, 1, 16, 0), (7, 2, 8, 2), (33, 8, 16, 5)]
)
def test_store_kv_matches_ref(device, dtype, head_dim, tokens, kv_heads, block_size, num_padding):
    gen = _gen(tokens * head_dim + kv_heads)
    _, k, v = _fused_qkv(gen, tokens, kv_heads, kv_heads, head_dim, dtype, device)  # v: a view
    num_blocks = tokens // block_size + 3
    slots = _slots(gen, tokens, num_blocks * block_size, num_padding).to(device)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.full(shape, NAN, dtype=dtype, device=device)
    v_cache = torch.full(shape, NAN, dtype=dtype, device=device)
    ref_k_cache, ref_v_cache = k_cache.clone(), v_cache.clone()
    SK.store_kv_triton(k, v, k_cache, v_cache, slots)
    SK.store_kv_ref(k, v, ref_k_cache, ref_v_cache, slots)
    for cache, ref in ((k_cache, ref_k_cache), (v_cache, ref_v_cache)):
        torch.testing.assert_close(cache, ref, rtol=0, atol=0, equal_nan=True)
    valid = slots >= 0
    flat_k = k_cache.view(-1, kv_heads, head_dim)
    flat_v = v_cache.view(-1, kv_heads, head_dim)
    assert torch.equal(flat_k[slots[valid]], k[valid])
    assert torch.equal(flat_v[slots[valid]], v[valid])
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool, device=device)
    untouched[slots[valid]] = False
    assert flat_k[untouched].isnan().all() and flat_v[untouched].isnan().all()


@needs_cuda
@needs_triton
def test_store_kv_int64_offsets_past_2_31_elements():
    """Slots whose element offset exceeds 2^31 (a 1M-token-scale cache, ~4.3 GB each in bf16)."""
    kv_heads, head_dim, block_size = 8, 128, 16
    per_block = block_size * kv_heads * head_dim
    num_blocks = (1 << 31) // per_block + 8
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    gen = _gen(6)
    k = _randn(gen, 3, kv_heads, head_dim, dtype=torch.bfloat16, device="cuda")
    v = _randn(gen, 3, kv_heads, head_dim, dtype=torch.bfloat16, device="cuda")
    last = num_blocks * block_size - 1
    slots = torch.tensor([last, last - block_size - 3, 5], device="cuda")
    SK.store_kv_triton(k, v, k_cache, v_cache, slots)
    assert slots[0] * kv_heads * head_dim >= 1 << 31
    assert torch.equal(k_cache.view(-1, kv_heads, head_dim)[slots], k)
    assert torch.equal(v_cache.view(-1, kv_heads, head_dim)[slots], v)


# -- rotary_store --------------------------------------------------------------------------------


def _rotary_store_case(
    gen,
    tokens,
    q_heads,
    kv_heads,
    head_dim,
    block_size,
    num_padding,
    dtype,
    device,
    per_token=False,
):
    q, k, v = _fused_qkv(gen, tokens, q_heads, kv_heads, head_dim, dtype, device)
    positions = torch.randint(0, MAX_POSITION, (tokens,), generator=gen).to(device)
    inv = _inv_freq(head_dim, device)
    if per_token:  # a row per token: requests with their own RoPE base
        bases = torch.tensor([1e4, 5e5, 5e7])[torch.arange(tokens) % 3]
        exponents = torch.arange(0, head_dim, 2).float() / head_dim
        inv = (1.0 / bases[:, None] ** exponents[None, :]).to(device)
    num_blocks = tokens // block_size + 3
    slots = _slots(gen, tokens, num_blocks * block_size, num_padding).to(device)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    caches = [torch.full(shape, NAN, dtype=dtype, device=device) for _ in range(2)]
    return q, k, v, positions, inv, caches, slots


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(
    "tokens, kv_heads, group, block_size, num_padding, per_token",
    [
        (1, 1, 8, 16, 0, False),
        (7, 2, 4, 8, 2, True),
        (33, 8, 1, 16, 5, False),
        (5, 3, 3, 4, 1, True),
    ],
)
def test_rotary_store_equals_rotary_then_store(
    device, dtype, head_dim, tokens, kv_heads, group, block_size, num_padding, per_token
):
    """The fused kernel writes exactly what the rotary kernel then the store kernel write (same
    fp32 formulas): the same q bit for bit, the same cache bytes, padding slots untouched; and
    it is as close to the torch twin as the rotary kernel is."""
    gen = _gen(tokens * head_dim + kv_heads + group)
    q, k, v, pos, inv, (kc, vc), slots = _rotary_store_case(
        gen,
        tokens,
        kv_heads * group,
        kv_heads,
        head_dim,
        block_size,
        num_padding,
        dtype,
        device,
        per_token,
    )
    q_before, k_before, v_before = q.clone(), k.clone(), v.clone()
    sep_kc, sep_vc, ref_kc, ref_vc = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    q_out = RS.rotary_store_triton(q, k, v, pos, inv, kc, vc, slots)
    sep_q, sep_k = RO.rotary_triton(q, k, pos, inv)
    SK.store_kv_triton(sep_k, v, sep_kc, sep_vc, slots)
    assert q_out.is_contiguous() and torch.equal(q_out, sep_q)
    torch.testing.assert_close(kc, sep_kc, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(vc, sep_vc, rtol=0, atol=0, equal_nan=True)
    ref_q = RS.rotary_store_ref(q, k, v, pos, inv, ref_kc, ref_vc, slots)
    _assert_close(q_out, ref_q, dtype)
    valid = slots >= 0
    flat = (-1, kv_heads, head_dim)
    _assert_close(kc.view(flat)[slots[valid]], ref_kc.view(flat)[slots[valid]], dtype)
    assert torch.equal(vc.view(flat)[slots[valid]], v[valid])
    untouched = torch.ones(kc.view(flat).shape[0], dtype=torch.bool, device=device)
    untouched[slots[valid]] = False
    assert kc.view(flat)[untouched].isnan().all() and vc.view(flat)[untouched].isnan().all()
    assert torch.equal(q, q_before) and torch.equal(k, k_before) and torch.equal(v, v_before)


def test_rotary_store_ref_is_rotation_then_store_in_float64():
    """The twin: the stored keys are the complex rotation of k by position * inv_freq, the
    stored values are v, the returned queries the rotation of q."""
    gen = _gen(13)
    tokens, head_dim, half = 4, 16, 8
    q, k, v = (_randn(gen, tokens, h, head_dim, dtype=torch.float64) for h in (4, 2, 2))
    positions = torch.tensor([0, 3, 900, 70000])
    inv = _inv_freq(head_dim, torch.device("cpu"))
    kc = torch.full((3, 4, 2, head_dim), NAN, dtype=torch.float64)
    vc = kc.clone()
    slots = torch.tensor([2, -1, 11, 4])
    q_out = RS.rotary_store_ref(q, k, v, positions, inv, kc, vc, slots)
    angle = (positions.float()[:, None] * inv).double()[:, None, :]

    def rot(x: torch.Tensor) -> torch.Tensor:
        z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angle), angle)
        return torch.cat((z.real, z.imag), -1)

    torch.testing.assert_close(q_out, rot(q), rtol=1e-6, atol=1e-6)
    flat_k, flat_v = kc.view(12, 2, head_dim), vc.view(12, 2, head_dim)
    for t, slot in ((0, 2), (2, 11), (3, 4)):
        torch.testing.assert_close(flat_k[slot], rot(k)[t], rtol=1e-6, atol=1e-6)
        assert torch.equal(flat_v[slot], v[t])
    assert flat_k[[0, 1, 3, 5, 6, 7, 8, 9, 10]].isnan().all()


@needs_triton
def test_rotary_store_rejects_mismatched_caches(device):
    gen = _gen(14)
    q, k, v, pos, inv, (kc, vc), slots = _rotary_store_case(
        gen, 3, 4, 2, 64, 4, 0, torch.float32, device
    )
    with pytest.raises(ValueError, match="k_cache must be"):
        RS.rotary_store_triton(q, k, v, pos, inv, kc[..., :32], vc, slots)
    with pytest.raises(ValueError, match="v_cache must be"):
        RS.rotary_store_triton(q, k, v, pos, inv, kc, vc.to(torch.bfloat16), slots)
    with pytest.raises(ValueError, match="slot_mapping must be"):
        RS.rotary_store_triton(q, k, v, pos, inv, kc, vc, slots[:2])
    with pytest.raises(ValueError, match="v must match k"):
        RS.rotary_store_triton(q, k, v[:, :1], pos, inv, kc, vc, slots)


# -- lse_merge ---------------------------------------------------------------------------------


def _partials(gen, tokens, heads, head_dim, dtype, device):
    """Two partials; some rows empty (lse -inf, NaN output) on one side, the first on both."""
    out_a = _randn(gen, tokens, heads, head_dim, dtype=dtype)
    out_b = _randn(gen, tokens, heads, head_dim, dtype=dtype)
    lse_a = 3 * _randn(gen, tokens, heads)
    lse_b = 3 * _randn(gen, tokens, heads)
    empty_a = torch.rand(tokens, heads, generator=gen) < 0.25
    empty_b = torch.rand(tokens, heads, generator=gen) < 0.25
    empty_a[0, 0] = empty_b[0, 0] = True
    lse_a[empty_a], lse_b[empty_b] = NEG_INF, NEG_INF
    out_a[empty_a], out_b[empty_b] = NAN, NAN
    return [t.to(device) for t in (out_a, lse_a, out_b, lse_b)]


def test_lse_merge_ref_equals_attention_over_both_key_sets_in_float64():
    gen = _gen(7)
    tokens, heads, head_dim, num_keys = 4, 3, 16, 10
    scores = 2 * _randn(gen, tokens, heads, num_keys, dtype=torch.float64)
    values = _randn(gen, num_keys, head_dim, dtype=torch.float64)
    scores[:, :, 6:] = NEG_INF  # keys 6.. masked: partial b is empty
    expected = torch.softmax(scores, -1) @ values

    def partial(s, v):
        return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)

    out_a, lse_a = partial(scores[..., :6], values[:6])
    out_b, lse_b = partial(scores[..., 6:], values[6:])
    assert out_b.isnan().all()  # 0/0 in the empty partial: the merge must ignore it
    out, lse = LM.lse_merge_ref(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), rtol=1e-12, atol=1e-12)
    out, lse = LM.lse_merge_ref(out_a, lse_a, out_a, lse_a)  # a partial merged with itself
    torch.testing.assert_close(out, out_a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, lse_a + math.log(2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("merge", ["ref", pytest.param("triton", marks=needs_triton)])
def test_lse_merge_empty_partials(device, merge):
    gen = _gen(8)
    fn = LM.lse_merge_ref if merge == "ref" else LM.lse_merge_triton
    out_a, lse_a, out_b, lse_b = _partials(gen, 9, 4, 64, torch.float32, device)
    out, lse = fn(out_a, lse_a, out_b, lse_b)
    assert not out.isnan().any() and not lse.isnan().any()
    only_a = (lse_b == NEG_INF) & (lse_a > NEG_INF)
    only_b = (lse_a == NEG_INF) & (lse_b > NEG_INF)
    both = (lse_a == NEG_INF) & (lse_b == NEG_INF)
    assert only_a.any() and only_b.any() and both.any()
    _assert_close(out[only_a], out_a[only_a], torch.float32)
    _assert_close(out[only_b], out_b[only_b], torch.float32)
    torch.testing.assert_close(lse[only_a], lse_a[only_a], rtol=0, atol=0)
    assert (out[both] == 0).all() and (lse[both] == NEG_INF).all()


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("tokens, heads", [(1, 1), (7, 8), (33, 40)])
def test_lse_merge_matches_ref(device, dtype, head_dim, tokens, heads):
    gen = _gen(tokens * heads + head_dim)
    out_a, lse_a, out_b, lse_b = _partials(gen, tokens, heads, head_dim, dtype, device)
    out_a = out_a.transpose(0, 1).contiguous().transpose(0, 1)  # head-major: other strides
    out, lse = LM.lse_merge_triton(out_a, lse_a, out_b, lse_b)
    ref_out, ref_lse = LM.lse_merge_ref(out_a, lse_a, out_b, lse_b)
    assert out.dtype == dtype and lse.dtype == torch.float32
    _assert_close(out, ref_out, dtype)
    _assert_close(lse, ref_lse, torch.float32)


# -- empty inputs ------------------------------------------------------------------------------


@needs_triton
def test_empty_inputs_return_empty_outputs_without_launching(device, monkeypatch):
    for module, kernel in (
        (RN, "_rms_norm_kernel"),
        (RO, "_rotary_kernel"),
        (SM, "_silu_and_mul_kernel"),
        (SK, "_store_kv_kernel"),
        (RS, "_rotary_store_kernel"),
        (LM, "_lse_merge_kernel"),
    ):
        monkeypatch.setattr(module, kernel, None)  # a launch would fail on None[grid]
    x = torch.empty(0, 64, device=device)
    out, res = RN.rms_norm_triton(x, torch.ones(64, device=device), 1e-6, torch.empty_like(x))
    assert out.shape == res.shape == (0, 64)
    q, k = torch.empty(0, 8, 64, device=device), torch.empty(0, 2, 64, device=device)
    q_out, k_out = RO.rotary_triton(
        q, k, torch.empty(0, dtype=torch.int64, device=device), _inv_freq(64, device)
    )
    assert q_out.shape == (0, 8, 64) and k_out.shape == (0, 2, 64)
    assert SM.silu_and_mul_triton(torch.empty(0, 192, device=device)).shape == (0, 96)
    cache = torch.full((2, 4, 2, 64), NAN, device=device)
    SK.store_kv_triton(k, k, cache, cache, torch.empty(0, dtype=torch.int64, device=device))
    assert cache.isnan().all()
    no_pos = torch.empty(0, dtype=torch.int64, device=device)
    q_out = RS.rotary_store_triton(q, k, k, no_pos, _inv_freq(64, device), cache, cache, no_pos)
    assert q_out.shape == (0, 8, 64) and cache.isnan().all()
    lse = torch.empty(0, 8, device=device)
    out, lse = LM.lse_merge_triton(q, lse, q, lse)
    assert out.shape == (0, 8, 64) and lse.shape == (0, 8)


# -- dispatch ----------------------------------------------------------------------------------


def _public_calls(device: torch.device) -> list[tuple[Any, str, Callable[[], Any]]]:
    """(module, kernel name, call of the public function) for every kernel, on tiny inputs."""
    gen = _gen(9)
    x = _randn(gen, 3, 64, device=device)
    w = torch.ones(64, device=device)
    q, k, v = _fused_qkv(gen, 3, 4, 2, 64, torch.float32, device)
    pos = torch.arange(3, device=device)
    cache = torch.zeros(2, 4, 2, 64, device=device)
    lse = torch.zeros(3, 4, device=device)
    return [
        (RN, "rms_norm", lambda: RN.rms_norm(x, w, 1e-6, x)),
        (RO, "rotary", lambda: RO.rotary(q, k, pos, _inv_freq(64, device))),
        (SM, "silu_and_mul", lambda: SM.silu_and_mul(x)),
        (SK, "store_kv", lambda: SK.store_kv(k, v, cache, cache.clone(), pos)),
        (
            RS,
            "rotary_store",
            lambda: RS.rotary_store(q, k, v, pos, _inv_freq(64, device), cache, cache.clone(), pos),
        ),
        (LM, "lse_merge", lambda: LM.lse_merge(q, lse, q, lse)),
    ]


def _spy(monkeypatch, module, name: str) -> list[str]:
    """Record which of `name`'s implementations the public function calls."""
    calls: list[str] = []
    for impl in ("ref", "triton"):
        real = getattr(module, f"{name}_{impl}")

        def wrapper(*args, _impl=impl, _real=real):
            calls.append(_impl)
            return _real(*args)

        monkeypatch.setattr(module, f"{name}_{impl}", wrapper)
    return calls


@pytest.mark.parametrize(
    "forced, expected", [(None, "ref"), ("torch", "ref"), ("triton", "triton")]
)
def test_public_functions_dispatch_on_cpu(monkeypatch, forced, expected):
    if expected == "triton" and TRITON_SKIP is not None:
        pytest.skip(TRITON_SKIP)
    if expected == "triton" and torch.cuda.is_available():
        pytest.skip("kernels compiled for CUDA cannot take CPU tensors; the interpreter is off")
    if forced is None:
        monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(dispatch.ENV_VAR, forced)
    # The float32 CPU norm and SiLU-and-mul have native kernels of their own, with their own
    # switch and tests (test_cpu_elementwise.py): off here, so the references are what is left.
    monkeypatch.setenv(CPU_ELEMENTWISE_ENV, "torch")
    for module, name, call in _public_calls(torch.device("cpu")):
        calls = _spy(monkeypatch, module, name)
        call()
        assert calls == [expected], name


@needs_cuda
@needs_triton
@pytest.mark.parametrize("forced, expected", [(None, "triton"), ("torch", "ref")])
def test_public_functions_dispatch_on_cuda(monkeypatch, forced, expected):
    if forced is None:
        monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(dispatch.ENV_VAR, forced)
    for module, name, call in _public_calls(torch.device("cuda")):
        calls = _spy(monkeypatch, module, name)
        call()
        assert calls == [expected], name


def test_use_triton_reads_the_environment(monkeypatch):
    cuda = torch.device("cuda")  # only the device type is read: no CUDA needed
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert not dispatch.use_triton(cuda)
    monkeypatch.delenv(dispatch.ENV_VAR)
    assert dispatch.use_triton(cuda) == (triton is not None)
    assert not dispatch.use_triton(torch.device("cpu"))
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=dispatch.ENV_VAR):
        dispatch.use_triton(cuda)
    with pytest.raises(ValueError, match=dispatch.ENV_VAR):
        RN.rms_norm(torch.ones(1, 8), torch.ones(8), 1e-6)
