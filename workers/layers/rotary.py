"""RoPE frequencies, with the scaling a checkpoint asks for."""

from __future__ import annotations

import torch
from torch import nn

from dist_runtime.config import ModelConfig
from kernels.rotary import rotary


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

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary(q, k, positions, self.inv_freq)
