"""W4A16 GEMM (`kernels/w4a16.py`): the Triton kernel and its torch twin, each against a float64
oracle that dequantizes the original codes itself.

Weights come from AWQ-packed tensors (pack_awq -> unpack_awq), GPTQ-packed tensors with an
act-order g_idx (arbitrary group per row) or without (desc_act false, the plain grouping), and
straight from codes for an N that is not a multiple of 8. Shapes: odd M across the decode
(split-K) and prefill configs, N not a power of two, K a multiple of the group but not a power
of two. Without CUDA the kernel runs in Triton's interpreter (see conftest.py): shapes stay small.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import kernels.dispatch as dispatch
import kernels.w4a16 as W
from dist_runtime.formats.int4 import (
    Int4Weight,
    pack_awq,
    pack_gptq,
    unpack_awq,
    unpack_gptq,
)

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

    if not isinstance(W._w4a16_kernel, InterpretedFunction):
        return (
            "triton was imported before tests/kernels/conftest.py set TRITON_INTERPRET=1; "
            "export TRITON_INTERPRET=1 or run tests/kernels on its own"
        )
    return None


TRITON_SKIP = _triton_skip_reason()
needs_triton = pytest.mark.skipif(TRITON_SKIP is not None, reason=str(TRITON_SKIP))

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {
    # fp32 IEEE products on both sides (the kernel passes input_precision="ieee"); the
    # dequantized weight is the exact product rounded once; only summation order differs.
    torch.float32: (1e-5, 1e-5),
    # Output rounding (2^-9, or 2^-8 where the interpreter truncates) plus, compiled, the
    # dequantized tile rounded to the activation dtype before the tensor-core product.
    torch.bfloat16: (2**-7, 2**-6),
    torch.float16: (2**-10, 2**-8),
}
"""(rtol, atol as a fraction of the reference's RMS) per activation dtype."""
M_DECODE = [1, 3, 17, 33]
M_PREFILL = [67, 130]
SHAPES = [(40, 192, 64), (104, 384, 128), (200, 384, 64), (24, 96, 32), (16, 64, 16)]
"""(N, K, group_size): a tile takes groups of 64 / 32 / 16 in runs of that many rows."""
FORMATS = ["awq", "gptq_act_order", "gptq", "runtime"]


pytestmark = pytest.mark.usefixtures("single_thread")  # (tests/kernels/conftest.py)


# -- inputs, oracle, checks -------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    weight: Int4Weight
    w64: torch.Tensor
    """float64 [K, N]: (codes - zeros[g]) * scales[g] from the original codes."""


def make_case(fmt: str, n: int, k: int, group: int, device: torch.device, seed: int = 0) -> Case:
    gen = torch.Generator().manual_seed(seed)
    groups = k // group
    codes = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    # GPTQ stores zero - 1 in a nibble, so its zeros are 1..15 (a zero of 0 reads back as 16).
    low = 1 if fmt.startswith("gptq") else 0
    zeros = torch.randint(low, 16, (groups, n), generator=gen).to(torch.float32)
    scales = torch.rand(groups, n, generator=gen) * 0.02 + 0.005
    row_group = torch.arange(k) // group
    if fmt == "awq":
        scales = scales.half()
        q, qz = pack_awq(codes, zeros)
        unpacked, unpacked_zeros = unpack_awq(q, qz)
        weight = Int4Weight.from_codes(unpacked, scales, unpacked_zeros, group)
    elif fmt in ("gptq", "gptq_act_order"):
        scales = scales.half()
        g_idx = row_group.to(torch.int32)
        if fmt == "gptq_act_order":
            perm = torch.randperm(k, generator=gen)
            g_idx = (torch.argsort(perm) // group).to(torch.int32)
            row_group = g_idx.to(torch.int64)
        q, qz = pack_gptq(codes, zeros)
        unpacked, unpacked_zeros = unpack_gptq(q, qz)
        weight = Int4Weight.from_codes(unpacked, scales, unpacked_zeros, group, g_idx)
        assert (weight.g_idx is not None) == (fmt == "gptq_act_order")
    elif fmt == "runtime":
        weight = Int4Weight.from_codes(codes, scales, zeros, group)
    else:
        raise AssertionError(fmt)
    w64 = (codes.double() - zeros.double()[row_group]) * scales.double()[row_group]
    weight = Int4Weight(
        qweight=weight.qweight.to(device),
        scales=weight.scales.to(device),
        zeros=weight.zeros.to(device),
        group_size=weight.group_size,
        g_idx=None if weight.g_idx is None else weight.g_idx.to(device),
    )
    return Case(weight, w64)


def reference(x: torch.Tensor, case: Case, bias: torch.Tensor | None) -> torch.Tensor:
    out = x.cpu().double() @ case.w64
    return out if bias is None else out + bias.cpu().double()


def assert_matches(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    rtol, atol = TOL[dtype]
    scale = ref.pow(2).mean().sqrt().item()
    err = (out.cpu().double() - ref).abs()
    allowed = rtol * ref.abs() + atol * scale
    worst = (err - allowed).argmax()
    assert (err <= allowed).all(), (
        f"{int((err > allowed).sum())} of {err.numel()} outside tolerance; worst at "
        f"{divmod(int(worst), ref.shape[-1])}: {err.flatten()[worst]:.3g} > "
        f"{allowed.flatten()[worst]:.3g}"
    )


def inputs(
    m: int, k: int, n: int, dtype: torch.dtype, with_bias: bool, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype).to(device)
    bias = (torch.randn(n, generator=gen) * 0.5).to(dtype).to(device) if with_bias else None
    return x, bias


IMPLS: dict[str, Callable[..., torch.Tensor]] = {
    "triton": W.w4a16_matmul_triton,
    "torch": W.w4a16_matmul_torch,
}


def _impl(name: str) -> Callable[..., torch.Tensor]:
    if name == "triton" and TRITON_SKIP is not None:
        pytest.skip(TRITON_SKIP)
    return IMPLS[name]


class LaunchSpy:
    """Stands in for `_w4a16_kernel`: records each launch's grid and constexprs, then runs it."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.launches: list[tuple[tuple[int, ...], dict[str, Any]]] = []

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., Any]:
        def launch(*args: Any, **kwargs: Any) -> Any:
            self.launches.append((grid, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch


# -- both implementations against the float64 oracle ------------------------------------------


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_matches_float64_reference(impl, fmt, dtype, with_bias, device):
    fn = _impl(impl)
    shapes = [(36, 128, 64)] if fmt == "runtime" else SHAPES  # runtime: N not a multiple of 8
    for i, (n, k, group) in enumerate(shapes):
        case = make_case(fmt, n, k, group, device, seed=i)
        ms = M_DECODE + M_PREFILL if i == 0 else M_DECODE[::3] + M_PREFILL[:1]
        for m in ms:
            x, bias = inputs(m, k, n, dtype, with_bias, device, seed=100 * i + m)
            out = fn(x, case.weight, bias)
            assert_matches(out, reference(x, case, bias), dtype)


@needs_triton
def test_decode_splits_k_and_prefill_does_not(device, monkeypatch):
    """M = 1 and 33 take the decode config with split K (partials summed, bias added after),
    M = 67 and 130 the prefill configs; all equal the oracle."""
    spy = LaunchSpy(W._w4a16_kernel)
    monkeypatch.setattr(W, "_w4a16_kernel", spy)
    n, k, group = 40, 384, 128
    case = make_case("runtime", n, k, group, device)
    sms = W._num_sms(device)
    for m, decode in ((1, True), (33, True), (67, False), (130, False)):
        x, bias = inputs(m, k, n, torch.float32, True, device, seed=m)
        config = W.pick_config(m, n, k, group, sms)
        out = W.w4a16_matmul_triton(x, case.weight, bias)
        assert_matches(out, reference(x, case, bias), torch.float32)
        grid, kwargs = spy.launches[-1]
        assert kwargs["BLOCK_M"] == config.block_m and kwargs["BLOCK_K"] == config.block_k
        if decode:
            assert config.block_m <= 64 and config.split_k > 1
            assert grid[2] > 1 and not kwargs["HAS_BIAS"]
        else:
            assert config.block_m == (64 if m <= 128 else 128) and config.split_k == 1
            assert grid[2] == 1 and kwargs["HAS_BIAS"]
        assert kwargs["TILE_IN_GROUP"] and not kwargs["HAS_G_IDX"]
    assert len(spy.launches) == 4


def test_pick_config_heuristic():
    # Decode on a 132-SM GPU: InternLM2.5-7B's o_proj at M=1 splits K until its 32 column
    # tiles make about two programs an SM; gate_up's 224 take 2 splits.
    o = W.pick_config(1, 4096, 4096, 128, 132)
    assert (o.block_m, o.block_n, o.block_k) == (16, 128, 128) and o.split_k == 9
    assert 4096 // o.block_n * o.split_k >= 2 * 132
    assert W.pick_config(1, 28672, 4096, 128, 132).split_k == 2
    wide = W.pick_config(64, 4096, 4096, 128, 132)
    assert (wide.block_m, wide.block_n) == (64, 64)
    # Tiles that gather scales per row (a g_idx, or groups under 16) stay 64 columns wide.
    assert W.pick_config(1, 4096, 4096, 128, 132, act_order=True).block_n == 64
    assert W.pick_config(1, 4096, 4096, 8, 132).block_n == 64
    assert W.pick_config(1, 4096, 4096, 32, 132).block_n == 128
    # Prefill: no split; BLOCK_K follows the group so a tile reads one scale row.
    big = W.pick_config(4096, 4096, 4096, 128, 132)
    assert (big.block_m, big.block_n, big.block_k, big.split_k) == (128, 128, 64, 1)
    assert W.pick_config(4096, 4096, 4096, 32, 132).block_k == 32  # prefill: one run a tile
    assert W.pick_config(100, 4096, 4096, 128, 132).block_m == 64
    # Smaller groups keep the full tile (runs of 16 or 32 rows; a group of 96 runs of 32).
    assert W.pick_config(1, 4096, 4096, 16, 132).block_k == 128
    assert W.pick_config(1, 4096, 4032, 96, 132).block_k == 128
    # Never more splits than K tiles.
    assert W.pick_config(1, 64, 256, 128, 132).split_k == 2
    with pytest.raises(ValueError, match="power of two"):
        W.W4A16Config(16, 48, 64)


@needs_triton
@pytest.mark.parametrize(
    "config",
    [
        W.W4A16Config(16, 16, 128, split_k=1),  # BLOCK_K > group: per-row gather without g_idx
        W.W4A16Config(32, 32, 64, split_k=2),  # uneven splits: 2 K tiles, then 1
        W.W4A16Config(16, 64, 64, split_k=64),  # more splits asked than K tiles
        W.W4A16Config(64, 16, 16, split_k=2),
    ],
    ids=str,
)
@pytest.mark.parametrize("fmt", ["awq", "gptq_act_order"])
def test_forced_configs(config, fmt, device):
    n, k, group = 40, 192, 64
    case = make_case(fmt, n, k, group, device, seed=3)
    for m, dtype in ((5, torch.float32), (70, torch.bfloat16)):
        x, bias = inputs(m, k, n, dtype, True, device, seed=m)
        out = W.w4a16_matmul_triton(x, case.weight, bias, config=config)
        assert_matches(out, reference(x, case, bias), dtype)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_strided_and_batched_activations(impl, device):
    fn = _impl(impl)
    n, k, group = 40, 192, 64
    case = make_case("gptq_act_order", n, k, group, device, seed=5)
    gen = torch.Generator().manual_seed(5)
    wide = torch.randn(7, 2 * k, generator=gen).to(device)
    x = wide[:, ::2]  # stride 2 along K
    assert not x.is_contiguous()
    assert_matches(fn(x, case.weight), reference(x, case, None), torch.float32)
    xt = torch.randn(k, 6, generator=gen).to(device).T  # column-major rows
    assert_matches(fn(xt, case.weight), reference(xt, case, None), torch.float32)
    x3 = torch.randn(2, 3, k, generator=gen).to(device)
    out = fn(x3, case.weight)
    assert out.shape == (2, 3, n)
    assert_matches(out.reshape(6, n), reference(x3.reshape(6, k), case, None), torch.float32)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_empty_rows(impl, device, monkeypatch):
    fn = _impl(impl)
    monkeypatch.setattr(W, "_w4a16_kernel", None)  # a launch would fail on None[grid]
    case = make_case("runtime", 40, 128, 64, device)
    out = fn(torch.empty(0, 128, device=device), case.weight)
    assert out.shape == (0, 40) and out.dtype == torch.float32


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_bad_shapes_raise(impl, device):
    fn = _impl(impl)
    case = make_case("runtime", 40, 192, 64, device)
    with pytest.raises(ValueError, match=r"\(3, 100\).*K = 192"):
        fn(torch.randn(3, 100, device=device), case.weight)
    with pytest.raises(ValueError, match=r"\(3, 96\).*K = 192"):
        fn(torch.randn(3, 96, device=device), case.weight)
    with pytest.raises(ValueError, match=r"bias \(41,\)"):
        fn(torch.randn(3, 192, device=device), case.weight, torch.zeros(41, device=device))
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        fn(torch.randn(3, 192, device=device).double(), case.weight)
    # K = 96 is a multiple of 8 but not of the group of 64.
    odd = Int4Weight(
        qweight=torch.zeros(12, 40, dtype=torch.int32, device=device),
        scales=torch.ones(2, 40, device=device),
        zeros=torch.zeros(2, 40, device=device),
        group_size=64,
    )
    with pytest.raises(ValueError, match=r"K = 96 must be a multiple of 8 and of group_size 64"):
        fn(torch.randn(3, 96, device=device), odd)
    with pytest.raises(ValueError, match="group_size 64"):
        W.dequantized_weight(odd)
    short = Int4Weight(
        qweight=case.weight.qweight,
        scales=case.weight.scales[:2],
        zeros=case.weight.zeros[:2],
        group_size=64,
    )
    with pytest.raises(ValueError, match=r"scales \(2, 40\).*3 rows"):
        fn(torch.randn(3, 192, device=device), short)


# -- the CPU serving path and dispatch --------------------------------------------------------


@pytest.mark.parametrize("fmt", ["awq", "gptq_act_order", "runtime"])
def test_dequantized_weight_is_the_float_weight(fmt, device, monkeypatch):
    n, k, group = (36, 128, 64) if fmt == "runtime" else (104, 384, 128)
    monkeypatch.setattr(W, "DEQUANT_ELEMENTS", 5 * k)  # CPU: 5 rows a step, the last one short
    case = make_case(fmt, n, k, group, device, seed=7)
    w = W.dequantized_weight(case.weight)
    assert w.shape == (n, k) and w.dtype == torch.float32 and w.is_contiguous()
    # (code - zero) is a small integer and the scale a float: one rounding, exact in fp32.
    assert torch.equal(w.cpu(), case.w64.T.float())
    assert torch.equal(W.dequantized_weight(case.weight, torch.bfloat16), w.to(torch.bfloat16))
    x, bias = inputs(9, k, n, torch.float32, True, device, seed=7)
    assert_matches(F.linear(x, w, bias), reference(x, case, bias), torch.float32)


@pytest.mark.parametrize(
    "forced, expected", [(None, "torch"), ("torch", "torch"), ("triton", "triton")]
)
def test_dispatch_on_cpu(forced, expected, monkeypatch):
    if expected == "triton":
        if TRITON_SKIP is not None:
            pytest.skip(TRITON_SKIP)
        if torch.cuda.is_available():
            pytest.skip("the kernel compiled for CUDA cannot take CPU tensors")
    if forced is None:
        monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(dispatch.ENV_VAR, forced)
    calls: list[str] = []
    for name, real in IMPLS.items():

        def spy(*args: Any, _name: str = name, _real: Any = real) -> torch.Tensor:
            calls.append(_name)
            return _real(*args)

        monkeypatch.setattr(W, f"w4a16_matmul_{name}", spy)
    case = make_case("runtime", 40, 128, 64, torch.device("cpu"))
    x, bias = inputs(2, 128, 40, torch.float32, True, torch.device("cpu"), seed=1)
    assert_matches(W.w4a16_matmul(x, case.weight, bias), reference(x, case, bias), torch.float32)
    assert calls == [expected]


@pytest.mark.skipif(not torch.cuda.is_available() or triton is None, reason="needs CUDA + triton")
def test_dispatch_on_cuda_runs_triton(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    spy = LaunchSpy(W._w4a16_kernel)
    monkeypatch.setattr(W, "_w4a16_kernel", spy)
    case = make_case("awq", 40, 128, 64, torch.device("cuda"))
    x, _ = inputs(2, 128, 40, torch.float16, False, torch.device("cuda"), seed=1)
    assert_matches(W.w4a16_matmul(x, case.weight), reference(x, case, None), torch.float16)
    assert len(spy.launches) == 1


@pytest.mark.parametrize(("n", "k", "group"), [(960, 576, 32), (112, 384, 64), (208, 384, 128)])
@pytest.mark.parametrize("m", [1, 3, 37])
def test_cpu_int4_matmul_matches_float64(n: int, k: int, group: int, m: int) -> None:
    """PyTorch's CPU int4 matmul on the repacked codes (bf16 activations and output; the
    per-group offset (8 - zero) * scale is rounded to bf16): within bf16 rounding of float64."""
    from dist_runtime.formats.int4 import quantize_rtn
    from kernels.w4a16 import CpuInt4Weight

    gen = torch.Generator().manual_seed(n + k + m)
    w = torch.randn(n, k, generator=gen) * 0.05
    codes, scales, zeros = quantize_rtn(w, group)
    weight = Int4Weight.from_codes(codes, scales, zeros, group)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    bias = torch.randn(n, generator=gen).to(torch.bfloat16)
    want = x.double() @ weight.dequantize(torch.float64).T + bias.double()
    got = CpuInt4Weight(weight).matmul(x, bias)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    err = (got.double() - want).abs().max() / want.abs().max()
    assert err < 2**-6, float(err)


def test_cpu_int4_refuses_what_it_cannot_serve() -> None:
    from dist_runtime.formats.int4 import quantize_rtn
    from kernels.w4a16 import CpuInt4Weight, cpu_int4_supported

    codes, scales, zeros = quantize_rtn(torch.randn(64, 192), 32)
    act_order = torch.randperm(192) // 32
    weight = Int4Weight.from_codes(codes, scales, zeros, 32, g_idx=act_order)
    assert not cpu_int4_supported(weight, torch.bfloat16)
    plain = Int4Weight.from_codes(codes, scales, zeros, 32)
    assert cpu_int4_supported(plain, torch.bfloat16)
    assert not cpu_int4_supported(plain, torch.float32)
    narrow = Int4Weight.from_codes(codes[:, :40], scales[:, :40], zeros[:, :40], 32)
    assert not cpu_int4_supported(narrow, torch.bfloat16)  # the op packs 16 outputs at a time
    with pytest.raises(ValueError, match="g_idx set"):
        CpuInt4Weight(weight)
