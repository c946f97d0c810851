"""Native CPU residual add + RMSNorm, SiLU-and-mul and GELU-and-mul
(`kernels/cpu_elementwise.py`) against float64 references: decode and prefill row counts (the
threaded path), hidden sizes with a tail past the last eight-float vector, strided rows, no
residual, extreme and non-finite gates; the dispatchers take them for float32 CPU tensors only,
and `DIST_RUNTIME_CPU_ELEMENTWISE=torch` keeps the references."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dist_runtime.config import CPU_ELEMENTWISE_ENV
from kernels import cpu_elementwise
from kernels.cpu_elementwise import (
    act_and_mul_cpu,
    native_elementwise_supported,
    rms_norm_cpu,
    silu_and_mul_cpu,
)
from kernels.rms_norm import rms_norm, rms_norm_ref
from kernels.silu_and_mul import (
    ACTIVATIONS,
    act_and_mul,
    gelu_tanh_and_mul_ref,
    silu_and_mul,
    silu_and_mul_ref,
)
from tests.helpers.outputs import assert_same_outputs

needs_native = pytest.mark.skipif(
    cpu_elementwise._library() is None, reason="no C compiler: the native kernels are not built"
)


def _rms64(x: torch.Tensor, w: torch.Tensor, eps: float, r: torch.Tensor | None) -> tuple:
    h = x.double() + (r.double() if r is not None else 0)
    return w.double() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps), h


def _silu64(x: torch.Tensor) -> torch.Tensor:
    g, u = x.double().chunk(2, dim=-1)
    return g * torch.sigmoid(g) * u


@needs_native
@pytest.mark.parametrize("rows", [1, 8, 3000])
@pytest.mark.parametrize("hidden", [576, 13, 1000])
@pytest.mark.parametrize("with_residual", [True, False])
def test_rms_norm_matches_float64(rows: int, hidden: int, with_residual: bool) -> None:
    gen = torch.Generator().manual_seed(rows * hidden)
    x = torch.randn(rows, hidden, generator=gen) * 3
    r = torch.randn(rows, hidden, generator=gen) if with_residual else None
    w = torch.randn(hidden, generator=gen)
    out, h = rms_norm_cpu(x, w, 1e-5, r)
    want_out, want_h = _rms64(x, w, 1e-5, r)
    torch.testing.assert_close(out.double(), want_out, rtol=2e-6, atol=2e-6)
    if r is None:
        assert h is x  # as the reference: the input itself
    else:
        torch.testing.assert_close(h.double(), want_h, rtol=0, atol=1e-6)
    # The reference agrees to float rounding too.
    ref_out, _ = rms_norm_ref(x, w, 1e-5, r)
    torch.testing.assert_close(out, ref_out, rtol=2e-6, atol=2e-6)


@needs_native
def test_rms_norm_takes_strided_rows_and_leading_dims() -> None:
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(6, 200, generator=gen)
    x, r = wide[:, :96], wide[:, 100:196]  # rows 200 floats apart
    w = torch.randn(96, generator=gen)
    out, h = rms_norm(x, w, 1e-6, r)
    want_out, want_h = _rms64(x, w, 1e-6, r)
    torch.testing.assert_close(out.double(), want_out, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(h.double(), want_h, rtol=0, atol=1e-6)
    x3 = torch.randn(2, 3, 64, generator=gen)
    out3, _ = rms_norm(x3, w[:64], 1e-6)
    assert out3.shape == (2, 3, 64)
    want3 = _rms64(x3, w[:64], 1e-6, None)[0]
    torch.testing.assert_close(out3.double(), want3, rtol=2e-6, atol=2e-6)


@needs_native
@pytest.mark.parametrize(("rows", "inter"), [(1, 1536), (8, 13), (700, 1536)])
def test_silu_and_mul_matches_float64(rows: int, inter: int) -> None:
    gen = torch.Generator().manual_seed(rows + inter)
    x = torch.randn(rows, 2 * inter, generator=gen) * 8
    got = silu_and_mul_cpu(x)
    assert got.shape == (rows, inter) and got.is_contiguous()
    torch.testing.assert_close(got.double(), _silu64(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, silu_and_mul_ref(x), rtol=1e-6, atol=1e-6)


@needs_native
def test_silu_and_mul_extremes_and_strided_rows() -> None:
    gate = [100.0, -100.0, float("inf"), float("-inf"), float("nan"), 1e-30, -1e-30, 88.7, -88.7]
    x = torch.tensor([gate + [2.0] * len(gate)])
    torch.testing.assert_close(silu_and_mul_cpu(x), silu_and_mul_ref(x), equal_nan=True)
    wide = torch.randn(5, 40)
    strided = wide[:, :32]  # rows 40 floats apart
    torch.testing.assert_close(
        silu_and_mul(strided).double(), _silu64(strided), rtol=1e-6, atol=1e-6
    )


def _gelu64(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh form in float64: 0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3))) * up."""
    g, u = x.double().chunk(2, dim=-1)
    return 0.5 * g * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (g + 0.044715 * g**3))) * u


GELU = ACTIVATIONS["gelu_pytorch_tanh"]


@needs_native
@pytest.mark.parametrize(("rows", "inter"), [(1, 1536), (8, 13), (700, 1536)])
def test_gelu_tanh_and_mul_matches_float64(rows: int, inter: int) -> None:
    gen = torch.Generator().manual_seed(rows + inter)
    x = torch.randn(rows, 2 * inter, generator=gen) * 4
    got = act_and_mul_cpu(x, GELU)
    assert got.shape == (rows, inter) and got.is_contiguous()
    torch.testing.assert_close(got.double(), _gelu64(x), rtol=1e-6, atol=1e-6)
    # torch's float32 tanh form loses the far left tail (1 + tanh rounds to 0) and some bits
    # where 1 + tanh cancels; the sigmoid form keeps them, so the two agree to 1e-5.
    torch.testing.assert_close(got, gelu_tanh_and_mul_ref(x), rtol=1e-5, atol=1e-5)
    # SiLU through the same entry point is SiLU-and-mul bit for bit.
    assert torch.equal(act_and_mul_cpu(x, ACTIVATIONS["silu"]), silu_and_mul_cpu(x))


@needs_native
def test_gelu_tanh_and_mul_extremes_and_the_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gates whose cube overflows (the tanh saturates, no NaN from inf - inf), tiny and
    non-finite ones, as the reference; `act_and_mul` takes float32 CPU rows natively."""
    gate = [100.0, -100.0, 1e20, -1e20, float("inf"), float("-inf"), float("nan"), 1e-30, -3.0]
    x = torch.tensor([gate + [2.0] * len(gate)])
    torch.testing.assert_close(
        act_and_mul_cpu(x, GELU), gelu_tanh_and_mul_ref(x), equal_nan=True, rtol=1e-6, atol=1e-6
    )
    calls: list[int] = []

    def spy(x: torch.Tensor, act: int) -> torch.Tensor:
        calls.append(act)
        return act_and_mul_cpu(x, act)

    monkeypatch.setattr("kernels.silu_and_mul.act_and_mul_cpu", spy)
    y = torch.randn(4, 40)
    torch.testing.assert_close(
        act_and_mul(y[:, :32], "gelu_pytorch_tanh").double(),
        _gelu64(y[:, :32]),
        rtol=1e-6,
        atol=1e-6,
    )
    act_and_mul(y.bfloat16(), "gelu_pytorch_tanh")  # bfloat16: the reference
    assert calls == [GELU]


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record each call the dispatchers make to the native kernels."""
    calls: list[str] = []

    def norm(*args: Any) -> Any:
        calls.append("norm")
        return rms_norm_cpu(*args)

    def silu(x: torch.Tensor) -> torch.Tensor:
        calls.append("silu")
        return silu_and_mul_cpu(x)

    monkeypatch.setattr("kernels.rms_norm.rms_norm_cpu", norm)
    monkeypatch.setattr("kernels.silu_and_mul.silu_and_mul_cpu", silu)
    return calls


@needs_native
def test_dispatch_takes_float32_cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy(monkeypatch)
    x, w = torch.randn(4, 32), torch.randn(32)
    rms_norm(x, w, 1e-5, x.clone())
    silu_and_mul(x)
    assert calls == ["norm", "silu"]
    rms_norm(x.bfloat16(), w.bfloat16(), 1e-5)  # bfloat16: the reference
    silu_and_mul(x.bfloat16())
    assert calls == ["norm", "silu"]
    monkeypatch.setenv(CPU_ELEMENTWISE_ENV, "torch")
    assert not native_elementwise_supported(x)
    out, _ = rms_norm(x, w, 1e-5)
    assert calls == ["norm", "silu"]
    assert torch.equal(out, rms_norm_ref(x, w, 1e-5)[0])
    monkeypatch.setenv(CPU_ELEMENTWISE_ENV, "fast")
    with pytest.raises(ValueError, match="DIST_RUNTIME_CPU_ELEMENTWISE='fast' is not valid"):
        native_elementwise_supported(x)


@needs_native
def test_the_model_generates_as_with_the_references(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Greedy tokens and logprobs of a float32 CPU model are the same with the native kernels
    (which the model's layers do call) and with the torch references."""
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
        seed=5,
    )
    calls = _spy(monkeypatch)
    prompts = [[(7 * i + 1) % 250 for i in range(60)], [5, 6, 7] * 9]
    params = SamplingParams(max_new_tokens=10, temperature=0.0, logprobs=2, ignore_eos=True)
    with Runtime(model=str(folder), tp=1, device="cpu", dtype="float32", session_len=256) as rt:
        native = rt.generate(prompts, params)
        assert "norm" in calls and "silu" in calls
        monkeypatch.setenv(CPU_ELEMENTWISE_ENV, "torch")
        before = len(calls)
        reference = rt.generate(prompts, params)
        assert len(calls) == before
    assert_same_outputs(native, reference, atol=1e-4)
