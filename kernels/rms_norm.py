"""RMSNorm with an optional fused residual add.

One program per row (token) holds the whole hidden vector, so the mean of squares is a single
fp32 reduction and the residual sum is written out in the same pass.
"""

from __future__ import annotations

from typing import Any

import torch

from kernels.cpu_elementwise import native_elementwise_supported, rms_norm_cpu
from kernels.dispatch import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: only the torch reference runs
    triton = None  # type: ignore[assignment]


def _jit(fn: Any) -> Any:
    return triton.jit(fn) if triton is not None else fn


@_jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    hidden,
    eps,
    stride_x_row,
    stride_res_row,
    stride_out_row,
    stride_resout_row,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    FP32_SCALE: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x_row + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_res_row + offs, mask=mask, other=0.0)
        # Rounded to x's dtype before the norm, like the reference's `x + residual`.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_resout_row + offs, x, mask=mask)
    h = x.to(tl.float32)
    h = h * tl.rsqrt(tl.sum(h * h, axis=0) / hidden + eps)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if FP32_SCALE:  # (HF's Gemma order: the weight's product in fp32, one cast after)
        out = w * h
    else:  # HF's Llama order: normalize in fp32, cast to x's dtype, then multiply by the weight.
        out = w * h.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_out_row + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    fp32_scale: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `rms_norm_ref`.

    x, residual: (..., hidden) with a contiguous last dim (rows may be strided); weight:
    (hidden,). Returns out (..., hidden) contiguous, in the promoted dtype of weight and x (x's
    with fp32_scale), and x + residual (contiguous, x's dtype) or x itself without a residual.
    """
    hidden = x.shape[-1]
    _check_inputs(x, weight, residual)
    x2 = x.reshape(-1, hidden)  # (tokens, hidden)
    res2 = residual.reshape(-1, hidden) if residual is not None else x2
    dtype = x.dtype if fp32_scale else torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(x2.shape, dtype=dtype, device=x.device)
    # Without a residual, x stands in for the unused residual pointers.
    res_out = (
        torch.empty_like(x2, memory_format=torch.contiguous_format) if residual is not None else x2
    )
    tokens = x2.shape[0]
    if tokens > 0 and hidden > 0:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(tokens,)](
            x2,
            res2,
            weight,
            out,
            res_out,
            hidden,
            eps,
            x2.stride(0),
            res2.stride(0),
            out.stride(0),
            res_out.stride(0),
            BLOCK=block,
            HAS_RESIDUAL=residual is not None,
            FP32_SCALE=fp32_scale,
            num_warps=min(max(block // 256, 1), 8),
        )
    out = out.view(x.shape)
    return out, (res_out.view(x.shape) if residual is not None else x)


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    hidden = x.shape[-1]
    if weight.shape != (hidden,) or weight.stride(-1) != 1:
        raise ValueError(
            f"weight must be contiguous of shape ({hidden},), got {tuple(weight.shape)} "
            f"with strides {weight.stride()}"
        )
    if x.stride(-1) != 1:
        raise ValueError(f"x needs a contiguous last dim, got strides {x.stride()}")
    if residual is None:
        return
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(
            f"residual {tuple(residual.shape)} {residual.dtype} must match "
            f"x {tuple(x.shape)} {x.dtype}"
        )
    if residual.stride(-1) != 1:
        raise ValueError(f"residual needs a contiguous last dim, got strides {residual.stride()}")


def rms_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    fp32_scale: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (norm(x + residual) * weight, x + residual); x, residual: (tokens, hidden).

    Accumulates in fp32 like HF's LlamaRMSNorm and casts back to x's dtype before the weight;
    with fp32_scale multiplies by the weight in fp32 and casts the product to x's dtype once
    (HF's Gemma RMSNorms, whose (1 + w) is float32). Without a residual, the second output is
    x itself.
    """
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if fp32_scale:
        return (weight.float() * h).to(x.dtype), x
    return weight * h.to(x.dtype), x


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    fp32_scale: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rms_norm_ref` on the device's kernel. (float32 x with a float32 weight is one product
    either way: fp32_scale changes nothing there.)"""
    if use_triton(x.device):
        return rms_norm_triton(x, weight, eps, residual, fp32_scale)
    if native_elementwise_supported(x, weight, *(() if residual is None else (residual,))):
        _check_inputs(x, weight, residual)
        return rms_norm_cpu(x, weight, eps, residual)
    return rms_norm_ref(x, weight, eps, residual, fp32_scale)
