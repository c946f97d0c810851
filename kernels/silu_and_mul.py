"""SiLU-gated product of the fused gate/up projection."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kernels.cpu_elementwise import native_elementwise_supported, silu_and_mul_cpu
from kernels.dispatch import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: only the torch reference runs
    triton = None  # type: ignore[assignment]

MAX_BLOCK = 1024
"""Output columns per program."""


def _jit(fn: Any) -> Any:
    return triton.jit(fn) if triton is not None else fn


@_jit
def _silu_and_mul_kernel(
    x_ptr,
    out_ptr,
    inter,
    stride_x_tok,
    stride_out_tok,
    BLOCK: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    row = x_ptr + tok * stride_x_tok
    gate = tl.load(row + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(row + inter + offs, mask=mask, other=0.0).to(tl.float32)
    # SiLU in fp32 rounded to x's dtype before the product, as F.silu(gate) * up (and HF) do.
    act = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty).to(tl.float32)
    out = act * up
    tl.store(out_ptr + tok * stride_out_tok + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """Triton twin of `silu_and_mul_ref`.

    x: (tokens, 2 * inter) [gate | up] with a contiguous last dim (rows may be strided).
    Returns (tokens, inter) contiguous in x's dtype.
    """
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"x must be (tokens, 2 * inter), got {tuple(x.shape)}")
    if x.stride(1) != 1:
        raise ValueError(f"x needs a contiguous last dim, got strides {x.stride()}")
    tokens, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty(tokens, inter, dtype=x.dtype, device=x.device)
    if tokens == 0 or inter == 0:
        return out
    block = min(triton.next_power_of_2(inter), MAX_BLOCK)
    _silu_and_mul_kernel[(tokens, triton.cdiv(inter, block))](
        x,
        out,
        inter,
        x.stride(0),
        out.stride(0),
        BLOCK=block,
        num_warps=4,
    )
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: (tokens, 2 * inter) laid out [gate | up] -> silu(gate) * up: (tokens, inter)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if use_triton(x.device):
        return silu_and_mul_triton(x)
    if x.dim() == 2 and x.shape[1] % 2 == 0 and native_elementwise_supported(x):
        return silu_and_mul_cpu(x)
    return silu_and_mul_ref(x)
