"""RMSNorm layer over the dispatched kernel, with the fused residual add."""

from __future__ import annotations

import torch
from torch import nn

from kernels.rms_norm import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(
            torch.ones(hidden, dtype=dtype, device=device), requires_grad=False
        )

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (norm(x + residual), x + residual)."""
        return rms_norm(x, self.weight, self.eps, residual)
