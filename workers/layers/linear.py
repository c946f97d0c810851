"""Column- and row-parallel linear layers, with float or 4-bit (AWQ / GPTQ) weights.

A column-parallel layer holds a contiguous block of output rows; a row-parallel layer holds a
block of input columns and all-reduces its partial products (bias added once, after the sum).
The fused projections (q/k/v, gate/up) are column-parallel layers whose local rows are the
concatenation of this rank's slice of each part; the model's loader fills them.

With 4-bit weights (`ModelConfig.weight_quant`) a layer holds, instead of `weight`, the
runtime layout of `dist_runtime/formats/int4.py`: `qweight` int32 [in/8, out], `scales` and
`zeros` [groups, out] and, for GPTQ act-order, `g_idx` [in]. Column-parallel layers split
along out; row-parallel ones along in, on whole groups (act-order: every rank keeps all the
groups' scales, since its rows may belong to any group). On CUDA the forward is the W4A16
Triton kernel. Elsewhere `finalize()` either repacks the codes for PyTorch's CPU int4 matmul
(bfloat16 models: a quarter of the bf16 weight bytes) or dequantizes once (float32 / float16,
act-order, other group sizes: the float model's memory and speed), and frees the codes.
Float weights on CPU are then packed once for the native or oneDNN matmul (`kernels/cpu_gemm.py`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from dist_runtime.config import WeightQuant
from dist_runtime.formats.int4 import Int4Weight
from kernels.cpu_gemm import CpuLinearWeight, pack_cpu_weight
from kernels.dispatch import use_triton
from kernels.gemv import gemv_available, gemv_fits, gemv_triton
from kernels.w4a16 import CpuInt4Weight, cpu_int4_supported, dequantized_weight, w4a16_matmul
from workers.distributed import Collectives

if TYPE_CHECKING:
    from workers.lora import LinearLora


def _scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """Checkpoint scales are float16: kept exactly in half-precision models, float32 else."""
    return torch.float32 if dtype == torch.float32 else torch.float16


class _Linear(nn.Module):
    """Weight storage shared by the two parallel layers: a float `weight` or 4-bit buffers."""

    qweight: torch.Tensor | None
    scales: torch.Tensor | None
    zeros: torch.Tensor | None
    g_idx: torch.Tensor | None

    def _init_weight(
        self,
        in_local: int,
        out_local: int,
        bias_len: int | None,
        dtype: torch.dtype,
        device: torch.device,
        quant: WeightQuant | None,
        groups: int,
        group_size: int,
    ) -> None:
        self.dtype = dtype
        self.group_size = group_size
        self.bias = (
            nn.Parameter(torch.empty(bias_len, dtype=dtype, device=device), requires_grad=False)
            if bias_len is not None
            else None
        )
        if quant is None:
            self.weight: nn.Parameter | None = nn.Parameter(
                torch.empty(out_local, in_local, dtype=dtype, device=device), requires_grad=False
            )
            self.qweight = self.scales = self.zeros = self.g_idx = None
            return
        if in_local % 8:
            raise ValueError(f"4-bit weights need in_features divisible by 8, got {in_local}")
        self.weight = None
        sdt = _scale_dtype(dtype)
        self.register_buffer(
            "qweight", torch.empty(in_local // 8, out_local, dtype=torch.int32, device=device)
        )
        self.register_buffer("scales", torch.empty(groups, out_local, dtype=sdt, device=device))
        self.register_buffer("zeros", torch.empty(groups, out_local, dtype=sdt, device=device))
        g_idx = torch.empty(in_local, dtype=torch.int32, device=device) if quant.desc_act else None
        self.register_buffer("g_idx", g_idx)

    @property
    def quantized(self) -> bool:
        return self.qweight is not None

    def int4(self) -> Int4Weight:
        assert self.qweight is not None and self.scales is not None and self.zeros is not None
        return Int4Weight(self.qweight, self.scales, self.zeros, self.group_size, self.g_idx)

    def finalize(self) -> None:
        """After loading, prepare the weights for this device once.

        4-bit layers off the Triton path: repack the codes for PyTorch's CPU int4 matmul when it
        can serve them (bfloat16 on CPU), else dequantize once; the codes are dropped. Float
        weights on CPU (including dequantized ones) are packed for the native kernel or oneDNN
        (`kernels/cpu_gemm.py`) and the plain copy is dropped."""
        if self.qweight is not None:
            if use_triton(self.qweight.device):
                return
            weight = self.int4()
            if self.qweight.device.type == "cpu" and cpu_int4_supported(weight, self.dtype):
                self.cpu_int4 = CpuInt4Weight(weight)
            else:
                self.weight = nn.Parameter(
                    dequantized_weight(weight, self.dtype), requires_grad=False
                )
            self.qweight = self.scales = self.zeros = self.g_idx = None
        if self.weight is not None:
            self.cpu_packed = pack_cpu_weight(self.weight.data)
            if self.cpu_packed is not None:
                self.weight = None
        if self.weight is not None:
            self.gemv = gemv_available(self.weight)

    cpu_int4: CpuInt4Weight | None = None
    lora: LinearLora | None = None
    """LoRA adapters on this layer (`workers/lora.py`); None: none adapts it."""
    cpu_packed: CpuLinearWeight | None = None
    gemv: bool = False
    """Decode-sized batches of this float layer run the Triton GEMV (`kernels/gemv.py`)."""

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.cpu_packed is not None:
            return self.cpu_packed.matmul(x, bias)
        if self.weight is not None:
            if self.gemv and gemv_fits(x):
                return gemv_triton(x, self.weight, bias)
            return F.linear(x, self.weight, bias)
        if self.cpu_int4 is not None:
            return self.cpu_int4.matmul(x, bias)
        return w4a16_matmul(x, self.int4(), bias)


class ColumnParallelLinear(_Linear):
    def __init__(
        self,
        in_features: int,
        out_local: int,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device,
        quant: WeightQuant | None = None,
    ):
        super().__init__()
        group = quant.group_of(in_features) if quant is not None else in_features
        self._init_weight(
            in_features,
            out_local,
            out_local if bias else None,
            dtype,
            device,
            quant,
            groups=in_features // group,
            group_size=group,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._matmul(x, self.bias)
        return out if self.lora is None else self.lora.add_to(x, out)


class RowParallelLinear(_Linear):
    def __init__(
        self,
        in_local: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device,
        comm: Collectives,
        quant: WeightQuant | None = None,
    ):
        super().__init__()
        self.comm = comm
        in_full = in_local * comm.tp_size
        group = quant.group_of(in_full) if quant is not None else in_full
        # Act-order rows may belong to any group, so every rank keeps all groups' scales.
        groups = in_full // group if quant is not None and quant.desc_act else -(-in_local // group)
        self._init_weight(
            in_local,
            out_features,
            out_features if bias else None,
            dtype,
            device,
            quant,
            groups=groups,
            group_size=group,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.partial(x))

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's partial product (no reduce, no bias), adapters' terms included: their
        sum over ranks is the adapters' whole term."""
        out = self._matmul(x, None)
        return out if self.lora is None else self.lora.add_to(x, out)

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's partial (in place), plus the bias."""
        out = self.comm.tp_all_reduce(partial)
        return out if self.bias is None else out + self.bias
