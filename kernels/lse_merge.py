"""Merge two partial attention results over disjoint key sets by their log-sum-exp.

With lse = logaddexp(lse_a, lse_b), the merged output is out_a * exp(lse_a - lse) +
out_b * exp(lse_b - lse) (the softmax over the union of both key sets; DESIGN.md section 3).
An empty partial (lse -inf, e.g. a ring step whose keys all lie in the query's future)
contributes nothing, whatever its output holds; two empty partials give out 0 and lse -inf.
"""

from __future__ import annotations

from typing import Any

import torch

from kernels.dispatch import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: only the torch reference runs
    triton = None  # type: ignore[assignment]

TILE_ELEMENTS = 4096
"""Elements (heads x head_dim) of one program's tile."""


def _jit(fn: Any) -> Any:
    return triton.jit(fn) if triton is not None else fn


@_jit
def _lse_merge_kernel(
    out_a_ptr,
    lse_a_ptr,
    out_b_ptr,
    lse_b_ptr,
    out_ptr,
    lse_ptr,
    heads,
    stride_oa_tok,
    stride_oa_head,
    stride_ob_tok,
    stride_ob_head,
    stride_la_tok,
    stride_la_head,
    stride_lb_tok,
    stride_lb_head,
    stride_o_tok,
    stride_o_head,
    stride_lse_tok,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < heads
    mask = h_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    lse_a = tl.load(lse_a_ptr + tok * stride_la_tok + offs_h * stride_la_head, mask=h_mask)
    lse_b = tl.load(lse_b_ptr + tok * stride_lb_tok + offs_h * stride_lb_head, mask=h_mask)
    # logaddexp, shifted by the max; a -inf max (both empty) shifts by 0 and gives log(0) = -inf.
    m = tl.maximum(lse_a, lse_b)
    m = tl.where(m == float("-inf"), 0.0, m)
    lse = m + tl.log(tl.exp(lse_a - m) + tl.exp(lse_b - m))  # (BLOCK_H,)
    shift = tl.where(lse == float("-inf"), 0.0, lse)
    w_a = tl.exp(lse_a - shift)[:, None]
    w_b = tl.exp(lse_b - shift)[:, None]
    tile = offs_h[:, None]
    o_a = tl.load(
        out_a_ptr + tok * stride_oa_tok + tile * stride_oa_head + offs_d[None, :], mask=mask
    )
    o_b = tl.load(
        out_b_ptr + tok * stride_ob_tok + tile * stride_ob_head + offs_d[None, :], mask=mask
    )
    # A zero weight drops its side outright, so an empty partial's NaN/garbage output is ignored.
    out = tl.where(w_a > 0, o_a.to(tl.float32) * w_a, 0.0) + tl.where(
        w_b > 0, o_b.to(tl.float32) * w_b, 0.0
    )
    out_ptrs = out_ptr + tok * stride_o_tok + tile * stride_o_head + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_ptr + tok * stride_lse_tok + offs_h, lse, mask=h_mask)


def lse_merge_triton(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `lse_merge_ref`.

    out_a, out_b: (tokens, heads, head_dim), same dtype, contiguous last dim, any token/head
    strides; lse_a, lse_b: (tokens, heads) fp32. Returns new contiguous out (tokens, heads,
    head_dim) in out_a's dtype and lse (tokens, heads) fp32.
    """
    _check_inputs(out_a, lse_a, out_b, lse_b)
    tokens, heads, head_dim = out_a.shape
    out = torch.empty(out_a.shape, dtype=out_a.dtype, device=out_a.device)
    lse = torch.empty(tokens, heads, dtype=torch.float32, device=out_a.device)
    if out.numel() == 0:
        return out, lse
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(heads), max(TILE_ELEMENTS // block_d, 1))
    _lse_merge_kernel[(tokens, triton.cdiv(heads, block_h))](
        out_a,
        lse_a,
        out_b,
        lse_b,
        out,
        lse,
        heads,
        out_a.stride(0),
        out_a.stride(1),
        out_b.stride(0),
        out_b.stride(1),
        lse_a.stride(0),
        lse_a.stride(1),
        lse_b.stride(0),
        lse_b.stride(1),
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        HEAD_DIM=head_dim,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return out, lse


def _check_inputs(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> None:
    if out_a.dim() != 3 or out_a.shape != out_b.shape or out_a.dtype != out_b.dtype:
        raise ValueError(
            f"out_a {tuple(out_a.shape)} {out_a.dtype} and out_b {tuple(out_b.shape)} "
            f"{out_b.dtype} must be equal (tokens, heads, head_dim)"
        )
    if out_a.stride(-1) != 1 or out_b.stride(-1) != 1:
        raise ValueError(
            f"out_a and out_b need a contiguous last dim, got {out_a.stride()}, {out_b.stride()}"
        )
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        if lse.shape != out_a.shape[:2] or lse.dtype != torch.float32:
            raise ValueError(
                f"{name} must be {tuple(out_a.shape[:2])} fp32, got {tuple(lse.shape)} {lse.dtype}"
            )


def lse_merge_ref(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partials out_a, out_b: (tokens, heads, head_dim) with lse_a, lse_b: (tokens, heads).

    Math in fp32 (float64 stays float64); out is cast to out_a's dtype, lse is fp32 or wider.
    """
    compute = torch.promote_types(out_a.dtype, torch.float32)
    lse_a, lse_b = lse_a.to(compute), lse_b.to(compute)
    lse = torch.logaddexp(lse_a, lse_b)  # -inf only when both are
    shift = torch.where(lse == float("-inf"), 0.0, lse)
    w_a = torch.exp(lse_a - shift)[..., None]  # (tokens, heads, 1)
    w_b = torch.exp(lse_b - shift)[..., None]
    zero = torch.zeros((), dtype=compute, device=out_a.device)
    out = torch.where(w_a > 0, out_a.to(compute) * w_a, zero) + torch.where(
        w_b > 0, out_b.to(compute) * w_b, zero
    )
    return out.to(out_a.dtype), lse


def lse_merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(out_a.device):
        return lse_merge_triton(out_a, lse_a, out_b, lse_b)
    return lse_merge_ref(out_a, lse_a, out_b, lse_b)
