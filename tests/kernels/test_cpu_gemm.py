"""Packed linear layers on CPU (`kernels/cpu_gemm.py`): the native panel kernel's and oneDNN's
packed weights compute F.linear (against a float64 reference), a loaded model serves every
linear layer and the LM head from them and scores as the plain `F.linear` model does, and
`DIST_RUNTIME_CPU_GEMM` chooses between them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dist_runtime.config import CPU_GEMM_ENV, RuntimeConfig
from dist_runtime.formats.random_checkpoint import write_random_checkpoint
from kernels.cpu_gemm import (
    NativeLinearWeight,
    PackedLinearWeight,
    _linear_fn,
    _onednn_runs,
    pack_cpu_weight,
)
from workers.layers.linear import _Linear
from workers.scoring import Scorer

CPU = torch.device("cpu")
needs_onednn = pytest.mark.skipif(
    not _onednn_runs(torch.float32), reason="this torch build has no oneDNN"
)
needs_native = pytest.mark.skipif(
    _linear_fn() is None, reason="no C compiler: the native kernel is not built"
)
PACKERS = [
    pytest.param(NativeLinearWeight, id="native", marks=needs_native),
    pytest.param(PackedLinearWeight, id="onednn", marks=needs_onednn),
]


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.double(), w.double(), None if b is None else b.double())


# m: one row, the tile remainders, past one 96-row block; n: whole and partial 16-col panels
@pytest.mark.parametrize("packer", PACKERS)
@pytest.mark.parametrize("m", [1, 3, 8, 17, 130])
@pytest.mark.parametrize("n,k", [(96, 64), (200, 192), (16, 576), (37, 5)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_weight_computes_linear(
    packer: type, m: int, n: int, k: int, with_bias: bool
) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    w = torch.randn(n, k, generator=gen) / k**0.5
    b = torch.randn(n, generator=gen) if with_bias else None
    x = torch.randn(m, k, generator=gen)
    got = packer(w).matmul(x, b)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    # The same rounding budget F.linear itself has against float64.
    plain_err = (F.linear(x, w, b).double() - _reference(x, w, b)).abs().max().item()
    err = (got.double() - _reference(x, w, b)).abs().max().item()
    assert err <= max(4 * plain_err, 1e-5), (err, plain_err)


@pytest.mark.parametrize("packer", PACKERS)
def test_packed_weight_takes_any_leading_shape_and_strides(packer: type) -> None:
    gen = torch.Generator().manual_seed(1)
    w, b = torch.randn(40, 64, generator=gen), torch.randn(40, generator=gen)
    packed = packer(w)
    x3 = torch.randn(2, 5, 64, generator=gen)
    torch.testing.assert_close(packed.matmul(x3, b), F.linear(x3, w, b), rtol=1e-5, atol=1e-5)
    xt = torch.randn(64, 7, generator=gen).T  # non-contiguous rows
    torch.testing.assert_close(packed.matmul(xt), F.linear(xt, w), rtol=1e-5, atol=1e-5)
    assert packed.matmul(torch.empty(0, 64)).shape == (0, 40)
    with pytest.raises(ValueError, match="input has 63 features, the weight 64"):
        packed.matmul(torch.randn(3, 63))
    with pytest.raises(ValueError, match="input is torch.float64"):
        packed.matmul(torch.randn(3, 64, dtype=torch.float64))


@pytest.mark.skipif(not _onednn_runs(torch.bfloat16), reason="no oneDNN bfloat16 on this CPU")
def test_bfloat16_packed_weight_matches_bf16_linear() -> None:
    gen = torch.Generator().manual_seed(2)
    w = (torch.randn(128, 256, generator=gen) / 16).bfloat16()
    x = torch.randn(8, 256, generator=gen).bfloat16()
    got = PackedLinearWeight(w).matmul(x)
    assert got.dtype == torch.bfloat16
    ref = _reference(x, w, None)
    assert (got.double() - ref).abs().max() <= 2 * (F.linear(x, w).double() - ref).abs().max()


def test_environment_chooses_and_bad_values_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    w = torch.randn(8, 8)
    monkeypatch.delenv(CPU_GEMM_ENV, raising=False)  # default: native, else oneDNN
    want = (
        NativeLinearWeight
        if _linear_fn()
        else PackedLinearWeight
        if _onednn_runs(w.dtype)
        else None
    )
    assert type(pack_cpu_weight(w)) is (want or type(None))
    monkeypatch.setenv(CPU_GEMM_ENV, "onednn")
    assert type(pack_cpu_weight(w)) is (PackedLinearWeight if _onednn_runs(w.dtype) else type(None))
    monkeypatch.setenv(CPU_GEMM_ENV, "torch")
    assert pack_cpu_weight(w) is None
    monkeypatch.setenv(CPU_GEMM_ENV, "mkl")
    with pytest.raises(ValueError, match="DIST_RUNTIME_CPU_GEMM='mkl' is not valid"):
        pack_cpu_weight(w)
    monkeypatch.delenv(CPU_GEMM_ENV)
    assert pack_cpu_weight(w.half()) is None  # never packed: F.linear
    assert pack_cpu_weight(torch.empty(8, 8, device="meta")) is None
    with pytest.raises(ValueError, match="takes float32, got torch.bfloat16"):
        NativeLinearWeight(w.bfloat16())


def _score(folder: Path, ids: list[int]) -> tuple[list[float], list[type | None]]:
    """NLL per token, and for each linear layer plus the head its packed type (None: F.linear)."""
    config = RuntimeConfig(model=str(folder), session_len=128, device="cpu", dtype="float32")
    scorer = Scorer(config, max_tokens=len(ids))
    try:
        model = scorer.runner.model
        linears = [m for m in model.modules() if isinstance(m, _Linear)]
        for m in linears:  # packed layers hold no plain copy
            assert (m.cpu_packed is None) == (m.weight is not None)
        packed = [m.cpu_packed for m in linears] + [model.lm_head.packed]
        return scorer.score(ids, chunk=24, decode_last=4).nll, [
            None if p is None else type(p) for p in packed
        ]
    finally:
        scorer.close()


@pytest.mark.parametrize(
    "gemm,packer",
    [
        pytest.param("native", NativeLinearWeight, marks=needs_native),
        pytest.param("onednn", PackedLinearWeight, marks=needs_onednn),
    ],
)
@pytest.mark.parametrize("arch,tied", [("llama", True), ("internlm2", False)])
def test_a_loaded_model_runs_packed_and_scores_as_f_linear(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str, tied: bool, gemm: str, packer: type
) -> None:
    folder = write_random_checkpoint(
        tmp_path / arch, architecture=arch, tie_word_embeddings=tied, bias=True, seed=5
    )
    ids = [(19 * i + 3) % 512 for i in range(60)]
    monkeypatch.setenv(CPU_GEMM_ENV, gemm)
    got, packed = _score(folder, ids)
    assert packed and all(p is packer for p in packed)
    monkeypatch.setenv(CPU_GEMM_ENV, "torch")
    want, plain = _score(folder, ids)
    assert not any(plain)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-5)
