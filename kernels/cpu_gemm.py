"""Float linear layers on CPU, with each weight packed once after loading.

`F.linear` on CPU hands an [out, in] weight to MKL's sgemm on every call, which re-reads it in
its plain layout; at decode-sized M (one row per sequence) that runs well below the memory
bandwidth (about 11 GB/s of weight reads for the demo model's layers at M = 1 and 8 GB/s at
M = 8 on a 2-core Zen 4, where a plain read runs at about 30 GB/s). Two packed paths instead:

* `NativeLinearWeight` (float32, the default): the weight in panels of 16 output columns,
  k-major, multiplied by the native kernel (`csrc/cpu_gemm.c`, built with the other native
  kernels: `kernels/native.py`). Up to 6 rows x 16 outputs accumulate in registers while
  their panel streams past once, so decode sizes read the weight closer to the sequential
  rate: on the demo's layers 17-29 GB/s at M = 1 and 1.1-1.75x oneDNN's rate at M = 1-16,
  and prefill-sized M = 512 still 1.05-1.3x (`bench/cpu_gemm.py`,
  `docs/benchmarks/cpu_gemm_2026-12-03.md`).
* `PackedLinearWeight` (float32 and bfloat16 where this CPU's oneDNN runs them): oneDNN's
  inner product with the weight reordered ahead of time into its blocked layout (what
  PyTorch's inductor does when it freezes a CPU model), about 2x F.linear at M = 1-8.

Both hold only the packed weight; the plain copy is dropped once loading is done. The results
agree with `F.linear` to float rounding. `DIST_RUNTIME_CPU_GEMM` chooses: `native` (the
default: the native kernel for float32, else oneDNN where it runs, else F.linear), `onednn`,
or `torch` (always `F.linear`, e.g. to compare).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any, Union

import torch

from dist_runtime.config import CPU_GEMM_DTYPES, cpu_gemm_choice
from kernels import native
from kernels.native import run_profiled

PANEL = 16
"""Output columns per panel of `NativeLinearWeight` (`csrc/cpu_gemm.c`)."""
PROFILE_NAME = "cpu_gemm::linear"
"""What a torch.profiler trace calls the native kernel's calls (recorded only while one runs)."""
BATCH_HINT = 8
"""The M oneDNN's weight layout is chosen for: decode batches; prefill runs fast with it too."""


@functools.cache
def _onednn_runs(dtype: torch.dtype) -> bool:
    """Whether this CPU's oneDNN reorders and multiplies `dtype` weights (fp16 needs AVX-512
    FP16 or AVX-NE-CONVERT, bf16 is emulated or native depending on the build)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ones(16, 16, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, BATCH_HINT)
        out = torch.ops.mkldnn._linear_pointwise(
            torch.ones(2, 16, dtype=dtype), packed, None, "none", [], ""
        )
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return bool(torch.all(out == 16))


def pack_cpu_weight(weight: torch.Tensor) -> CpuLinearWeight | None:
    """The packed form of an [out, in] float weight for this CPU and `DIST_RUNTIME_CPU_GEMM`,
    or None where `F.linear` serves it (not on CPU, another dtype, `torch` chosen, nothing
    that runs it)."""
    if (
        weight.device.type != "cpu"
        or str(weight.dtype).removeprefix("torch.") not in CPU_GEMM_DTYPES
    ):
        return None
    choice = cpu_gemm_choice()
    if choice == "native" and weight.dtype == torch.float32 and _linear_fn() is not None:
        return NativeLinearWeight(weight)
    if choice in ("native", "onednn") and _onednn_runs(weight.dtype):
        return PackedLinearWeight(weight)
    return None


CpuLinearWeight = Union["NativeLinearWeight", "PackedLinearWeight"]
"""A packed CPU weight: `matmul(x, bias)` computes F.linear(x, weight, bias)."""


@functools.cache
def _linear_fn() -> Any:
    """`dr_linear` of the native library, typed; None when the library cannot be built."""
    lib = native.library()
    if lib is None:
        return None
    fn = lib.dr_linear
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, i64, ptr, i64, ptr, ptr, ctypes.c_int]  # x, M, K, panels, N, bias, y
    fn.restype = None
    return fn


def _check_input(x: torch.Tensor, in_features: int, dtype: torch.dtype) -> None:
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the weight {in_features}")
    if x.dtype != dtype:
        raise ValueError(f"input is {x.dtype}, the weight {dtype}")


def _check_weight(weight: torch.Tensor) -> None:
    if weight.dim() != 2 or weight.device.type != "cpu":
        raise ValueError(f"expected a 2-D CPU weight, got {tuple(weight.shape)} on {weight.device}")


class NativeLinearWeight:
    """An [out, in] float32 weight in 16-column panels; `matmul(x, bias)` = F.linear."""

    def __init__(self, weight: torch.Tensor):
        _check_weight(weight)
        if weight.dtype != torch.float32:
            raise ValueError(f"the native CPU linear kernel takes float32, got {weight.dtype}")
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        n_pad = -(-self.out_features // PANEL) * PANEL
        padded = torch.zeros(n_pad, self.in_features, dtype=torch.float32)
        padded[: self.out_features] = weight
        # panels[p, k, j] = W[16 p + j, k]
        self.panels = padded.view(n_pad // PANEL, PANEL, self.in_features).transpose(1, 2)
        self.panels = self.panels.contiguous()

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        _check_input(x, self.in_features, self.dtype)
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features).contiguous()
        out = torch.empty(rows.shape[0], self.out_features, dtype=torch.float32)
        if rows.shape[0]:
            b = None if bias is None else bias.to(torch.float32).contiguous()
            run_profiled(
                _linear_fn(),
                PROFILE_NAME,
                (
                    rows.data_ptr(),
                    rows.shape[0],
                    self.in_features,
                    self.panels.data_ptr(),
                    self.out_features,
                    None if b is None else b.data_ptr(),
                    out.data_ptr(),
                    torch.get_num_threads(),
                ),
            )
        return out.view(*lead, self.out_features)


class PackedLinearWeight:
    """An [out, in] float weight in oneDNN's blocked layout; `matmul(x, bias)` = F.linear."""

    def __init__(self, weight: torch.Tensor):
        _check_weight(weight)
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), BATCH_HINT)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        _check_input(x, self.in_features, self.dtype)
        if x.numel() == 0:
            return x.new_empty(*x.shape[:-1], self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")
