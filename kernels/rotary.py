"""Rotary position embedding (rotate-half layout, as in HF Llama and InternLM2)."""

from __future__ import annotations

import torch


def rotary_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q: (tokens, q_heads, head_dim) and k: (tokens, kv_heads, head_dim).

    positions: (tokens,) int64 absolute positions (already divided by a linear scaling factor
    through inv_freq). inv_freq: (head_dim // 2,) fp32. Angles are computed in fp32 from the
    positions on the fly, so no (max_positions, head_dim) table is held for 1M-token sessions.
    """
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (tokens, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (tokens, 1, head_dim)
    cos, sin = emb.cos(), emb.sin()
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return rotary_ref(q, k, positions, inv_freq)
