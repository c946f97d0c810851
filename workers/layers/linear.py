"""Column- and row-parallel linear layers.

A column-parallel layer holds a contiguous block of output rows; a row-parallel layer holds a
block of input columns and all-reduces its partial products (bias added once, after the sum).
The fused projections (q/k/v, gate/up) are column-parallel layers whose local rows are the
concatenation of this rank's slice of each part; the model's loader fills them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.distributed import Collectives


class ColumnParallelLinear(nn.Module):
    def __init__(
        self, in_features: int, out_local: int, bias: bool, dtype: torch.dtype, device: torch.device
    ):
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(out_local, in_features, dtype=dtype, device=device), requires_grad=False
        )
        self.bias = (
            nn.Parameter(torch.empty(out_local, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    def __init__(
        self,
        in_local: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device,
        comm: Collectives,
    ):
        super().__init__()
        self.comm = comm
        self.weight = nn.Parameter(
            torch.empty(out_features, in_local, dtype=dtype, device=device), requires_grad=False
        )
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.comm.tp_all_reduce(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias
