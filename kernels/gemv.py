"""Decode-sized linear layers (a few rows) as a weight-streaming Triton kernel.

At decode a linear layer's cost is reading its weight once: a batch of 1-16 rows does a few
FLOPs per weight byte. The H200 decode profile (`docs/benchmarks/gpu_h200_2026-12-04.md`) has
cuBLAS reading the 7B weights at 90% of the device copy rate, some layers through split-K GEMMs
with a reduction kernel after them. This kernel is the plain alternative: one program owns
BLOCK_N output columns (BLOCK_N rows of the (N, K) weight, contiguous) and walks K in BLOCK_K
tiles, so every weight byte is read once, in order, with no split and no second pass.

With `DIST_RUNTIME_GEMV=triton` the float linear layers on CUDA run their batches of at most
`GEMV_MAX_M` rows through it (`workers/layers/linear.py`); the default (`cublas`) keeps
`F.linear`, which is also the twin the tests hold it to. `bench/kernel_bench_gemv.py` times
both on the 7B shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dist_runtime.config import gemv_choice
from kernels.flash_attn import _jit, is_interpreting
from kernels.flash_decode import _sm_count

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: only the torch reference runs
    triton = None  # type: ignore[assignment]

GEMV_MAX_M = 16
"""Most rows the kernel takes: one tl.dot row tile (a single row takes a dot-free path)."""
PROGRAMS_PER_SM = 4
"""Target programs per multiprocessor when choosing BLOCK_N."""


@_jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    HAS_BIAS: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    if BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = k0 + offs_k < K
            w = tl.load(
                w_rows + k0 + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0
            )
            x = tl.load(x_ptr + k0 + offs_k, mask=k_mask, other=0.0)
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)
    else:
        offs_m = tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = k0 + offs_k < K
            w = tl.load(
                w_rows + k0 + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0
            )
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + k0 + offs_k[None, :],
                mask=m_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            if DOT_F32:  # float32 weights (or the interpreter): full precision, not TF32
                wt = tl.trans(w.to(tl.float32))
                acc2 = tl.dot(x.to(tl.float32), wt, acc2, input_precision="ieee")
            else:
                acc2 = tl.dot(x, tl.trans(w), acc2)
        if HAS_BIAS:
            b = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            acc2 += b[None, :]
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
        tl.store(out_ptrs, acc2.to(out_ptr.dtype.element_ty), mask=mask)


def gemv_config(m: int, n: int, k: int, device: torch.device) -> dict[str, int]:
    """BLOCK_N as wide as keeps ~PROGRAMS_PER_SM programs per multiprocessor (16-128), BLOCK_K
    so a weight tile is 8-16 KB, and the row tile: 1 (no dot) or 16."""
    sms = _sm_count(device)  # a fixed count under the interpreter
    block_n = 128
    while block_n > 16 and triton.cdiv(n, block_n) < PROGRAMS_PER_SM * sms:
        block_n //= 2
    block_k = min(triton.next_power_of_2(k), max(8192 // block_n, 64))
    return dict(
        BLOCK_M=1 if m == 1 else 16,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=4,
        num_stages=1 if is_interpreting() else 4,
    )


def gemv_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """x @ weight.T (+ bias) for x (M <= GEMV_MAX_M, K) and weight (N, K) with contiguous rows,
    both in one float dtype; fp32 accumulation, output (M, N) in x's dtype. `config` overrides
    `gemv_config` (the bench sweeps it)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} do not multiply")
    m, k = x.shape
    n = weight.shape[0]
    if not 0 < m <= GEMV_MAX_M:
        raise ValueError(f"gemv takes 1-{GEMV_MAX_M} rows, got {m}; use F.linear")
    if x.dtype != weight.dtype or weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError(
            f"x ({x.dtype}, strides {x.stride()}) and weight ({weight.dtype}, strides "
            f"{weight.stride()}) need one dtype and contiguous rows"
        )
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be ({n},), got {tuple(bias.shape)}")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    cfg = config or gemv_config(m, n, k, x.device)
    _gemv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
        x,
        weight,
        weight if bias is None else bias,
        out,
        m,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        # Triton's interpreter multiplies 16-bit dot operands wrongly: it gets them in fp32.
        DOT_F32=x.dtype == torch.float32 or is_interpreting(),
        **cfg,
    )
    return out


def gemv_available(weight: torch.Tensor) -> bool:
    """Whether a float layer with this weight runs its decode-sized batches through the kernel:
    `DIST_RUNTIME_GEMV=triton`, and the weight on CUDA (or on CPU under Triton's interpreter,
    for tests). Decided once per layer, after loading."""
    if gemv_choice() != "triton" or triton is None or weight.dim() != 2:
        return False
    return (weight.is_cuda or is_interpreting()) and weight.stride(1) == 1


def gemv_fits(x: torch.Tensor) -> bool:
    """x is a batch the kernel takes: 2-D with 1 to GEMV_MAX_M rows."""
    return x.dim() == 2 and 0 < x.shape[0] <= GEMV_MAX_M


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias): the kernel for up to GEMV_MAX_M rows where `gemv_available`,
    else `F.linear`."""
    if gemv_available(weight) and gemv_fits(x):
        return gemv_triton(x, weight, bias)
    return F.linear(x, weight, bias)
