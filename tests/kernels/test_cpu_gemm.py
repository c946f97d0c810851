"""oneDNN linear layers on CPU (`kernels/cpu_gemm.py`): the reordered weight computes F.linear
(against a float64 reference), a loaded model serves every linear layer and the LM head from it
and scores as the plain `F.linear` model does, and `DIST_RUNTIME_CPU_GEMM=torch` turns it off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dist_runtime.config import CPU_GEMM_ENV, RuntimeConfig
from dist_runtime.formats.random_checkpoint import write_random_checkpoint
from kernels.cpu_gemm import PackedLinearWeight, onednn_linear_supported
from workers.layers.linear import _Linear
from workers.scoring import Scorer

CPU = torch.device("cpu")
needs_onednn = pytest.mark.skipif(
    not onednn_linear_supported(CPU, torch.float32), reason="this torch build has no oneDNN"
)


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.double(), w.double(), None if b is None else b.double())


@needs_onednn
@pytest.mark.parametrize("m", [1, 3, 8, 17, 130])
@pytest.mark.parametrize("n,k", [(96, 64), (200, 192), (16, 576)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_weight_computes_linear(m: int, n: int, k: int, with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    w = torch.randn(n, k, generator=gen) / k**0.5
    b = torch.randn(n, generator=gen) if with_bias else None
    x = torch.randn(m, k, generator=gen)
    got = PackedLinearWeight(w).matmul(x, b)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    # The same rounding budget F.linear itself has against float64.
    plain_err = (F.linear(x, w, b).double() - _reference(x, w, b)).abs().max().item()
    err = (got.double() - _reference(x, w, b)).abs().max().item()
    assert err <= max(4 * plain_err, 1e-5), (err, plain_err)


@needs_onednn
def test_packed_weight_takes_any_leading_shape_and_strides() -> None:
    gen = torch.Generator().manual_seed(1)
    w, b = torch.randn(40, 64, generator=gen), torch.randn(40, generator=gen)
    packed = PackedLinearWeight(w)
    x3 = torch.randn(2, 5, 64, generator=gen)
    torch.testing.assert_close(packed.matmul(x3, b), F.linear(x3, w, b), rtol=1e-5, atol=1e-5)
    xt = torch.randn(64, 7, generator=gen).T  # non-contiguous rows
    torch.testing.assert_close(packed.matmul(xt), F.linear(xt, w), rtol=1e-5, atol=1e-5)
    assert packed.matmul(torch.empty(0, 64)).shape == (0, 40)
    with pytest.raises(ValueError, match="input has 63 features, the weight 64"):
        packed.matmul(torch.randn(3, 63))
    with pytest.raises(ValueError, match="input is torch.float64"):
        packed.matmul(torch.randn(3, 64, dtype=torch.float64))


@pytest.mark.skipif(
    not onednn_linear_supported(CPU, torch.bfloat16), reason="no oneDNN bfloat16 on this CPU"
)
def test_bfloat16_packed_weight_matches_bf16_linear() -> None:
    gen = torch.Generator().manual_seed(2)
    w = (torch.randn(128, 256, generator=gen) / 16).bfloat16()
    x = torch.randn(8, 256, generator=gen).bfloat16()
    got = PackedLinearWeight(w).matmul(x)
    assert got.dtype == torch.bfloat16
    ref = _reference(x, w, None)
    assert (got.double() - ref).abs().max() <= 2 * (F.linear(x, w).double() - ref).abs().max()


def test_environment_chooses_and_bad_values_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CPU_GEMM_ENV, "torch")
    assert not onednn_linear_supported(CPU, torch.float32)
    monkeypatch.setenv(CPU_GEMM_ENV, "mkl")
    with pytest.raises(ValueError, match="DIST_RUNTIME_CPU_GEMM='mkl' is not valid"):
        onednn_linear_supported(CPU, torch.float32)
    monkeypatch.delenv(CPU_GEMM_ENV)
    assert not onednn_linear_supported(CPU, torch.float16)  # never packed: F.linear
    assert not onednn_linear_supported(torch.device("meta"), torch.float32)


def _score(folder: Path, ids: list[int]) -> tuple[list[float], list[bool]]:
    """NLL per token, and for each linear layer plus the head whether it runs from oneDNN."""
    config = RuntimeConfig(model=str(folder), session_len=128, device="cpu", dtype="float32")
    scorer = Scorer(config, max_tokens=len(ids))
    try:
        model = scorer.runner.model
        linears = [m for m in model.modules() if isinstance(m, _Linear)]
        for m in linears:  # packed layers hold no plain copy
            assert (m.cpu_packed is None) == (m.weight is not None)
        packed = [m.cpu_packed is not None for m in linears] + [model.lm_head.packed is not None]
        return scorer.score(ids, chunk=24, decode_last=4).nll, packed
    finally:
        scorer.close()


@needs_onednn
@pytest.mark.parametrize("arch,tied", [("llama", True), ("internlm2", False)])
def test_a_loaded_model_runs_from_onednn_and_scores_as_f_linear(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str, tied: bool
) -> None:
    folder = write_random_checkpoint(
        tmp_path / arch, architecture=arch, tie_word_embeddings=tied, bias=True, seed=5
    )
    ids = [(19 * i + 3) % 512 for i in range(60)]
    got, packed = _score(folder, ids)
    assert packed and all(packed)
    monkeypatch.setenv(CPU_GEMM_ENV, "torch")
    want, plain = _score(folder, ids)
    assert not any(plain)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-5)
