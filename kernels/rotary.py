"""Rotary position embedding (rotate-half layout, as in HF Llama and InternLM2).

The Triton kernel runs one program per token: it computes that token's fp32 angles from its
position and inv_freq once, then rotates all query and key heads with them, so no
(max_positions, head_dim) cos/sin table is held for 1M-token sessions.
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

TILE_ELEMENTS = 2048
"""Elements of one half-head tile (heads x head_dim/2) rotated per loop step."""


def _jit(fn: Any) -> Any:
    return triton.jit(fn) if triton is not None else fn


@_jit
def _rotate_heads(
    x_ptr,
    out_ptr,
    num_heads,
    stride_x_head,
    stride_out_head,
    cos,
    sin,
    HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Rotate one token's heads; x_ptr, out_ptr point at the token's row, cos/sin: (BLOCK_D,)."""
    offs_d = tl.arange(0, BLOCK_D)
    for h0 in range(0, num_heads, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask = (offs_h < num_heads)[:, None] & (offs_d < HALF)[None, :]
        x_ptrs = x_ptr + offs_h[:, None] * stride_x_head + offs_d[None, :]  # first half
        x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
        # rotate_half(x) = [-x2, x1]: same products and sums as the reference.
        o1 = x1 * cos[None, :] - x2 * sin[None, :]
        o2 = x2 * cos[None, :] + x1 * sin[None, :]
        out_ptrs = out_ptr + offs_h[:, None] * stride_out_head + offs_d[None, :]
        tl.store(out_ptrs, o1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptrs + HALF, o2.to(out_ptr.dtype.element_ty), mask=mask)


@_jit
def _token_angles(
    positions_ptr,
    inv_freq_ptr,
    tok,
    stride_inv_tok,
    HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """(cos, sin), each (BLOCK_D,) fp32, of one token's angles: its position times inv_freq, the
    model's (stride_inv_tok 0) or a row per token (its request's RoPE base)."""
    offs_d = tl.arange(0, BLOCK_D)
    pos = tl.load(positions_ptr + tok).to(tl.float32)
    inv_freq = tl.load(inv_freq_ptr + tok * stride_inv_tok + offs_d, mask=offs_d < HALF, other=0.0)
    angle = pos * inv_freq  # the reference's freqs
    return tl.cos(angle), tl.sin(angle)


@_jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    positions_ptr,
    inv_freq_ptr,
    q_out_ptr,
    k_out_ptr,
    q_heads,
    kv_heads,
    stride_inv_tok,
    stride_q_tok,
    stride_q_head,
    stride_k_tok,
    stride_k_head,
    stride_qo_tok,
    stride_qo_head,
    stride_ko_tok,
    stride_ko_head,
    HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    cos, sin = _token_angles(positions_ptr, inv_freq_ptr, tok, stride_inv_tok, HALF, BLOCK_D)
    _rotate_heads(
        q_ptr + tok * stride_q_tok,
        q_out_ptr + tok * stride_qo_tok,
        q_heads,
        stride_q_head,
        stride_qo_head,
        cos,
        sin,
        HALF,
        BLOCK_D,
        BLOCK_HQ,
    )
    _rotate_heads(
        k_ptr + tok * stride_k_tok,
        k_out_ptr + tok * stride_ko_tok,
        kv_heads,
        stride_k_head,
        stride_ko_head,
        cos,
        sin,
        HALF,
        BLOCK_D,
        BLOCK_HK,
    )


def rotary_triton(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `rotary_ref`; returns new contiguous (q_out, k_out).

    q: (tokens, q_heads, head_dim), k: (tokens, kv_heads, head_dim), both with a contiguous
    last dim and any token/head strides (views into a fused qkv output). positions: (tokens,)
    integer; inv_freq: (head_dim // 2,) fp32 contiguous, or (tokens, head_dim // 2) with a
    contiguous last dim: one row per token, for requests with their own RoPE base.
    """
    _check_inputs(q, k, positions, inv_freq)
    tokens, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    block_d = triton.next_power_of_2(half)
    max_heads = max(TILE_ELEMENTS // block_d, 1)
    _rotary_kernel[(tokens,)](
        q,
        k,
        positions,
        inv_freq,
        q_out,
        k_out,
        q_heads,
        kv_heads,
        inv_freq.stride(0) if inv_freq.dim() == 2 else 0,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        q_out.stride(0),
        q_out.stride(1),
        k_out.stride(0),
        k_out.stride(1),
        HALF=half,
        BLOCK_D=block_d,
        BLOCK_HQ=min(triton.next_power_of_2(q_heads), max_heads),
        BLOCK_HK=min(triton.next_power_of_2(kv_heads), max_heads),
        num_warps=4,
    )
    return q_out, k_out


def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor
) -> None:
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q and k must be (tokens, heads, head_dim), got {q.shape} and {k.shape}")
    tokens, _, head_dim = q.shape
    if k.shape[0] != tokens or k.shape[2] != head_dim or head_dim % 2:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree or odd head_dim")
    if q.dtype != k.dtype:
        raise ValueError(f"q and k dtypes differ: {q.dtype} vs {k.dtype}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError(
            f"q and k need a contiguous last dim, got strides {q.stride()} and {k.stride()}"
        )
    if positions.shape != (tokens,) or positions.dtype.is_floating_point:
        raise ValueError(
            f"positions must be ({tokens},) integer, got {tuple(positions.shape)} {positions.dtype}"
        )
    if inv_freq.shape not in ((head_dim // 2,), (tokens, head_dim // 2)) or (
        inv_freq.dtype != torch.float32
    ):
        raise ValueError(
            f"inv_freq must be ({head_dim // 2},) or ({tokens}, {head_dim // 2}) fp32, got "
            f"{tuple(inv_freq.shape)} {inv_freq.dtype}"
        )
    if inv_freq.stride(-1) != 1:
        raise ValueError(f"inv_freq needs a contiguous last dim, got stride {inv_freq.stride()}")


def rotary_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q: (tokens, q_heads, head_dim) and k: (tokens, kv_heads, head_dim).

    positions: (tokens,) int64 absolute positions (already divided by a linear scaling factor
    through inv_freq). inv_freq: (head_dim // 2,) fp32, or (tokens, head_dim // 2): a row per
    token. Angles are computed in fp32 from the positions on the fly, so no
    (max_positions, head_dim) table is held for 1M-token sessions.
    """
    cos, sin = rotary_cos_sin(positions, inv_freq)
    return rotate(q, cos, sin), rotate(k, cos, sin)


def rotary_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (tokens, 1, head_dim) fp32, for rotate(); shared by all layers.
    inv_freq: (head_dim // 2,), or (tokens, head_dim // 2) for a row per token."""
    inv = inv_freq if inv_freq.dim() == 2 else inv_freq[None, :]
    freqs = positions.to(torch.float32)[:, None] * inv  # (tokens, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (tokens, 1, head_dim)
    return emb.cos(), emb.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply a rotation from rotary_cos_sin to x: (tokens, heads, head_dim)."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(q.device):
        return rotary_triton(q, k, positions, inv_freq)
    return rotary_ref(q, k, positions, inv_freq)
