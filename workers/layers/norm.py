"""RMSNorm layer over the dispatched kernel, with the fused residual add."""

from __future__ import annotations

import torch
from torch import nn

from kernels.rms_norm import rms_norm


class RMSNorm(nn.Module):
    def __init__(
        self,
        hidden: int,
        eps: float,
        dtype: torch.dtype,
        device: torch.device,
        fp32_scale: bool = False,
    ):
        """fp32_scale: the weight is kept in float32 and the normed values are scaled by it in
        float32, then cast to the input's dtype once (HF's Gemma RMSNorms, whose 1 + w is never
        rounded to the model's dtype); else HF's Llama order (cast, then the weight)."""
        super().__init__()
        self.eps = eps
        self.fp32_scale = fp32_scale
        self.weight = nn.Parameter(
            torch.ones(hidden, dtype=torch.float32 if fp32_scale else dtype, device=device),
            requires_grad=False,
        )

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (norm(x + residual), x + residual)."""
        return rms_norm(x, self.weight, self.eps, residual, self.fp32_scale)
