"""Gated product of the fused gate/up projection: SiLU (Llama, InternLM2) or GELU's tanh
approximation (Gemma 3's `gelu_pytorch_tanh`) of the gate, times up."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kernels.cpu_elementwise import (
    act_and_mul_cpu,
    native_elementwise_supported,
    silu_and_mul_cpu,
)
from kernels.dispatch import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: only the torch reference runs
    triton = None  # type: ignore[assignment]

MAX_BLOCK = 1024
"""Output columns per program."""
ACTIVATIONS = {"silu": 0, "gelu_pytorch_tanh": 1}
"""The gate activations by config name, and the kernel's code for each."""


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
    ACT: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    row = x_ptr + tok * stride_x_tok
    gate = tl.load(row + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(row + inter + offs, mask=mask, other=0.0).to(tl.float32)
    # The activation in fp32 rounded to x's dtype before the product, as F.silu(gate) * up and
    # F.gelu(gate, approximate="tanh") * up (and HF) do.
    if ACT == 0:
        act = gate / (1.0 + tl.exp(-gate))
    else:  # 0.5 x (1 + tanh(y)) = x * sigmoid(2y), y = sqrt(2 / pi) (x + 0.044715 x^3)
        y = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        act = gate / (1.0 + tl.exp(-2.0 * y))
    act = act.to(x_ptr.dtype.element_ty).to(tl.float32)
    out = act * up
    tl.store(out_ptr + tok * stride_out_tok + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(x: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """Triton twin of `silu_and_mul_ref` (and of `gelu_tanh_and_mul_ref` for act
    'gelu_pytorch_tanh').

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
        ACT=_act_code(act),
        num_warps=4,
    )
    return out


def _act_code(act: str) -> int:
    if act not in ACTIVATIONS:
        raise ValueError(f"activation {act!r} is not one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[act]


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: (tokens, 2 * inter) laid out [gate | up] -> silu(gate) * up: (tokens, inter)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: (tokens, 2 * inter) laid out [gate | up] -> gelu_tanh(gate) * up: (tokens, inter)."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if use_triton(x.device):
        return silu_and_mul_triton(x)
    if x.dim() == 2 and x.shape[1] % 2 == 0 and native_elementwise_supported(x):
        return silu_and_mul_cpu(x)
    return silu_and_mul_ref(x)


def act_and_mul(x: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """act(gate) * up of x = [gate | up], for a config's `hidden_act` (ACTIVATIONS)."""
    if act == "silu":
        return silu_and_mul(x)
    code = _act_code(act)
    if use_triton(x.device):
        return silu_and_mul_triton(x, act)
    if x.dim() == 2 and x.shape[1] % 2 == 0 and native_elementwise_supported(x):
        return act_and_mul_cpu(x, code)
    return gelu_tanh_and_mul_ref(x)
