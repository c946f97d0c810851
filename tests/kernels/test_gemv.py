"""The decode-sized linear kernel (`kernels/gemv.py`) against a float64 product and F.linear,
its argument checks, and the model's float layers running through it
(`DIST_RUNTIME_GEMV=triton`). Without CUDA the kernel runs in Triton's interpreter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kernels.gemv as G
from dist_runtime import Runtime, SamplingParams
from dist_runtime.config import CacheConfig

try:
    import triton
except ImportError:
    triton = None

needs_triton = pytest.mark.skipif(triton is None, reason="triton is not installed")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _case(m: int, n: int, k: int, dtype: torch.dtype, seed: int, bias: bool):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=gen).to(DEVICE, dtype) if bias else None
    return x, w, b


def _check(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    ref = x.double() @ w.double().T + (0 if b is None else b.double())
    assert out.dtype == x.dtype and out.shape == ref.shape
    tol = TOL[x.dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 100, 72), (3, 257, 300), (16, 64, 128)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_float64(dtype: torch.dtype, m: int, n: int, k: int, bias: bool) -> None:
    """Rows 1 (the dot-free path), 3 and 16 (one dot tile); N and K off the tile sizes."""
    x, w, b = _case(m, n, k, dtype, seed=m * n + k, bias=bias)
    _check(G.gemv_triton(x, w, b), x, w, b)


@needs_triton
@pytest.mark.parametrize("m", [1, 5])
def test_gemv_forced_tiles_walk_k_and_n(m: int) -> None:
    """Small tiles: many programs over N and several K steps, the last of each partial."""
    x, w, b = _case(m, 70, 200, torch.float32, seed=3, bias=True)
    cfg = dict(BLOCK_M=1 if m == 1 else 16, BLOCK_N=16, BLOCK_K=64, num_warps=4, num_stages=1)
    _check(G.gemv_triton(x, w, b, config=cfg), x, w, b)


@needs_triton
def test_gemv_strided_rows_of_a_wider_buffer() -> None:
    """x rows strided by a wider buffer (a slice of a fused projection) read correctly."""
    x_wide, w, _ = _case(4, 48, 96, torch.float32, seed=4, bias=False)
    x = torch.cat([x_wide, x_wide], dim=1)[:, :96]
    assert x.stride(0) == 192
    _check(G.gemv_triton(x, w), x, w, None)


@needs_triton
def test_gemv_rejects_what_it_cannot_run() -> None:
    x, w, _ = _case(2, 32, 64, torch.float32, seed=5, bias=False)
    with pytest.raises(ValueError, match="gemv takes 1-16 rows, got 17"):
        G.gemv_triton(x.repeat(9, 1)[:17], w)
    with pytest.raises(ValueError, match="need one dtype and contiguous rows"):
        G.gemv_triton(x, w.to(torch.bfloat16))
    with pytest.raises(ValueError, match="need one dtype and contiguous rows"):
        G.gemv_triton(x, w.T.contiguous().T)
    with pytest.raises(ValueError, match="do not multiply"):
        G.gemv_triton(x, w[:, :32])
    with pytest.raises(ValueError, match=r"bias must be \(32,\)"):
        G.gemv_triton(x, w, torch.zeros(31, device=DEVICE))


@needs_triton
def test_gemv_dispatch_follows_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """`cublas` (default): F.linear; `triton`: the kernel, up to 16 rows; a bad value names
    the accepted ones."""
    x, w, b = _case(2, 32, 64, torch.float32, seed=6, bias=True)
    calls: list[str] = []
    real = G.gemv_triton

    def spy(*args: object) -> torch.Tensor:
        calls.append("kernel")
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(G, "gemv_triton", spy)
    monkeypatch.delenv("DIST_RUNTIME_GEMV", raising=False)
    torch.testing.assert_close(G.gemv(x, w, b), F.linear(x, w, b))
    assert calls == [] and not G.gemv_available(w)
    monkeypatch.setenv("DIST_RUNTIME_GEMV", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1" if DEVICE.type == "cpu" else "0")
    _check(G.gemv(x, w, b), x, w, b)
    assert calls == ["kernel"]
    G.gemv(x.repeat(9, 1), w, b)  # 18 rows: F.linear
    assert calls == ["kernel"]
    monkeypatch.setenv("DIST_RUNTIME_GEMV", "fast")
    with pytest.raises(ValueError, match="'cublas', 'triton'"):
        G.gemv(x, w, b)


@needs_triton
def test_model_decodes_the_same_through_the_kernel(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With DIST_RUNTIME_GEMV=triton every float linear layer of the model (the LM head too)
    runs its decode steps through the kernel: the same greedy tokens and log-probabilities as
    F.linear (on CPU the layers keep plain weights for this: DIST_RUNTIME_CPU_GEMM=torch)."""
    monkeypatch.setenv("DIST_RUNTIME_CPU_GEMM", "torch")
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    prompts = [[5, 9, 30, 200, 7, 11], [400, 3, 8]]
    params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True, logprobs=0)
    outs, counts = {}, {}
    for choice in ("cublas", "triton"):
        monkeypatch.setenv("DIST_RUNTIME_GEMV", choice)
        calls = [0]
        real = G.gemv_triton

        def counted(*args: object, _real=real, _calls=calls) -> torch.Tensor:
            _calls[0] += 1
            return _real(*args)  # type: ignore[arg-type]

        monkeypatch.setattr("workers.layers.linear.gemv_triton", counted)
        monkeypatch.setattr("workers.layers.embedding.gemv_triton", counted)
        with Runtime(
            model=str(tiny_llama_dir),
            device=DEVICE.type,
            dtype="float32",
            session_len=64,
            cache=CacheConfig(block_size=4, num_blocks=64),
            enforce_eager=True,  # on CUDA: every step calls the layers (no graph replays)
        ) as rt:
            outs[choice] = rt.generate(prompts, params)
        counts[choice] = calls[0]
    # 6 steps (one 9-token prefill of both prompts, 5 decodes), each with 16 rows or fewer:
    # 4 linear layers a decoder layer (qkv, o, gate-up, down) x 2 layers + the LM head.
    assert counts == {"cublas": 0, "triton": 6 * (4 * 2 + 1)}
    for a, b in zip(outs["cublas"], outs["triton"], strict=True):
        assert a.token_ids == b.token_ids
        assert a.logprobs is not None and b.logprobs is not None
        assert [lp.logprob for lp in a.logprobs] == pytest.approx(
            [lp.logprob for lp in b.logprobs], abs=1e-4
        )
