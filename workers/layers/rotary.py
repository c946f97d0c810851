"""RoPE frequencies, with the scaling a checkpoint asks for."""

from __future__ import annotations

import torch
from torch import nn

from dist_runtime.config import ModelConfig
from kernels.dispatch import use_triton
from kernels.rotary import rotary, rotary_cos_sin, rotate


def inverse_frequencies(head_dim: int, theta: float, linear_factor: float = 1.0) -> torch.Tensor:
    """(head_dim // 2,) fp32; linear scaling divides positions, i.e. the frequencies, by factor.

    Same formula as HF's default RoPE init: 1 / theta ** (2i / head_dim).
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (theta**exponents) / linear_factor


class RotaryEmbedding(nn.Module):
    inv_freq: torch.Tensor

    def __init__(self, config: ModelConfig, device: torch.device):
        super().__init__()
        scaling = config.rope_scaling
        # Dynamic NTK keeps the trained base for prompts within max_position_embeddings (the
        # only ones admitted, see ModelConfig.check_prompt_len).
        factor = scaling.factor if scaling is not None and scaling.type == "linear" else 1.0
        inv = inverse_frequencies(config.head_dim, config.rope_theta, factor)
        self.register_buffer("inv_freq", inv.to(device), persistent=False)
        self._positions: torch.Tensor | None = None
        self._cos_sin: tuple[torch.Tensor, torch.Tensor] = (inv, inv)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        positions: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if cos_sin is not None:  # per-token tables (requests with their own RoPE base)
            return rotate(q, *cos_sin), rotate(k, *cos_sin)
        if use_triton(q.device):
            return rotary(q, k, positions, self.inv_freq)
        cos, sin = self.cos_sin(positions)
        return rotate(q, cos, sin), rotate(k, cos, sin)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of `rotary_cos_sin` for the step's positions. Every layer of a step passes
        the same positions tensor, so the angles are computed once per step, not per layer."""
        if positions is not self._positions:
            self._positions = positions
            self._cos_sin = rotary_cos_sin(positions, self.inv_freq)
        return self._cos_sin


def rotary_cos_sin_per_token(
    positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like rotary_cos_sin with one frequency row per token: inv_freq (tokens, head_dim/2)."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    return emb.cos(), emb.sin()
