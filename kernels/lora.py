"""LoRA terms of a batch whose rows use different adapters: `y += B[s] (A[s] x)` per row, with
s the row's adapter slot (0: none, the row is left alone).

Two kernels, as punica's BGMV pair: `shrink` h = A[s] x (the rank-R intermediate, fp32; one
program per row and 16 ranks) and `expand` y += B[s] h (one program per row and 128 outputs),
each reading its own slot's matrices from the stacked weights. The slots are a device tensor,
so a decode step captured in a CUDA graph serves any mix of adapters on replay. `lora_add_ref`
is the torch twin (a gather of each row's matrices, then batched products).

Shapes: x (rows, in), a (slots, R, in), b (slots, out, R), slots (rows,) int, y (rows, out).
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

BLOCK_K = 128
"""Input columns per step of the shrink loop."""
BLOCK_N = 128
"""Output columns per expand program."""
SHRINK_R = 16
"""Ranks per shrink program: a row's intermediate is computed by R / 16 programs side by side."""


def _jit(fn: Any) -> Any:
    return triton.jit(fn) if triton is not None else fn


@_jit
def _shrink_kernel(
    x_ptr,
    a_ptr,
    slots_ptr,
    h_ptr,
    in_f,
    rank,
    stride_x,
    stride_a_slot,
    stride_a_r,
    stride_h,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    width = tl.where(slot != 0, in_f, 0)  # a base row (slot 0) reads nothing
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    a_rows = a_ptr + slot * stride_a_slot + r[:, None] * stride_a_r
    for k0 in range(0, in_f, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < width
        x = tl.load(x_ptr + row * stride_x + k, mask=kmask, other=0.0).to(tl.float32)
        a = tl.load(a_rows + k[None, :], mask=(r[:, None] < rank) & kmask[None, :], other=0.0)
        acc += tl.sum(a.to(tl.float32) * x[None, :], axis=1)
    tl.store(h_ptr + row * stride_h + r, acc, mask=r < rank)


@_jit
def _expand_kernel(
    h_ptr,
    b_ptr,
    slots_ptr,
    y_ptr,
    out_f,
    rank,
    stride_h,
    stride_b_slot,
    stride_b_n,
    stride_y,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r = tl.arange(0, BLOCK_R)
    nmask = n < tl.where(slot != 0, out_f, 0)  # a base row (slot 0) is left alone
    rmask = r < rank
    h = tl.load(h_ptr + row * stride_h + r, mask=rmask, other=0.0)
    b = tl.load(
        b_ptr + slot * stride_b_slot + n[:, None] * stride_b_n + r[None, :],
        mask=nmask[:, None] & rmask[None, :],
        other=0.0,
    )
    delta = tl.sum(b.to(tl.float32) * h[None, :], axis=1)
    y = tl.load(y_ptr + row * stride_y + n, mask=nmask, other=0.0)
    tl.store(y_ptr + row * stride_y + n, (y.to(tl.float32) + delta).to(y.dtype), mask=nmask)


def _check(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, y: torch.Tensor):
    rows, in_f = x.shape
    if a.dim() != 3 or a.shape[2] != in_f:
        raise ValueError(f"a must be (slots, R, {in_f}), got {tuple(a.shape)}")
    if b.dim() != 3 or b.shape[0] != a.shape[0] or b.shape[2] != a.shape[1]:
        raise ValueError(f"b must be ({a.shape[0]}, out, {a.shape[1]}), got {tuple(b.shape)}")
    if slots.shape != (rows,) or y.shape != (rows, b.shape[1]):
        raise ValueError(
            f"slots {tuple(slots.shape)} and y {tuple(y.shape)} must be ({rows},) and "
            f"({rows}, {b.shape[1]})"
        )


def lora_add_triton(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Triton twin of `lora_add_ref` (in place on y; contiguous last dims)."""
    _check(x, a, b, slots, y)
    rows, rank = x.shape[0], a.shape[1]
    if rows == 0 or rank == 0:
        return y
    if x.stride(1) != 1 or y.stride(1) != 1 or not a.is_contiguous() or not b.is_contiguous():
        raise ValueError("x and y need contiguous last dims, a and b must be contiguous")
    h = torch.empty(rows, rank, dtype=torch.float32, device=x.device)
    block_r = max(16, triton.next_power_of_2(rank))
    _shrink_kernel[(rows, triton.cdiv(rank, SHRINK_R))](
        x,
        a,
        slots,
        h,
        x.shape[1],
        rank,
        x.stride(0),
        a.stride(0),
        a.stride(1),
        h.stride(0),
        BLOCK_R=SHRINK_R,
        BLOCK_K=BLOCK_K,
        num_warps=4,
    )
    out_f = b.shape[1]
    _expand_kernel[(rows, triton.cdiv(out_f, BLOCK_N))](
        h,
        b,
        slots,
        y,
        out_f,
        rank,
        h.stride(0),
        b.stride(0),
        b.stride(1),
        y.stride(0),
        BLOCK_R=block_r,
        BLOCK_N=BLOCK_N,
        num_warps=4,
    )
    return y


def lora_add_ref(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """y[i] += b[slots[i]] @ (a[slots[i]] @ x[i]) for rows whose slot is not 0 (in place); the
    products in fp32."""
    _check(x, a, b, slots, y)
    s = slots.to(torch.int64)
    h = torch.bmm(a[s].float(), x.float().unsqueeze(2))  # (rows, R, 1)
    delta = torch.bmm(b[s].float(), h).squeeze(2)  # (rows, out)
    delta = torch.where((s != 0).unsqueeze(1), delta, torch.zeros_like(delta))
    y.copy_((y.float() + delta).to(y.dtype))
    return y


def lora_add(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """y += the LoRA term of each row's adapter slot (0: none), in place."""
    if use_triton(x.device):
        return lora_add_triton(x, a, b, slots, y)
    return lora_add_ref(x, a, b, slots, y)
