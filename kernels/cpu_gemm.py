"""Float linear layers on CPU through oneDNN, with each weight reordered once after loading.

`F.linear` on CPU hands an [out, in] weight to MKL's sgemm on every call, which re-reads it in
its plain layout; at decode-sized M (one row per sequence) that runs well below the memory
bandwidth (about 11 GB/s of weight reads for the demo model's layers at M = 1 and 8 GB/s at
M = 8 on a 2-core Zen 4, where a plain read runs at about 30 GB/s). oneDNN's inner-product
primitive with the weight reordered ahead of time into its blocked layout (what PyTorch's
inductor does when it freezes a CPU model) reads the same bytes about 2x faster at M = 1-8 and
is still faster at prefill sizes; the results agree with `F.linear` to float rounding.

`PackedLinearWeight` holds the reordered weight (an opaque `torch._mkldnn` tensor: it cannot
be sliced, saved or moved, so it replaces the float weight only once loading is done).
float32 and bfloat16 are packed when this CPU's oneDNN supports the dtype (probed once);
anything else keeps `F.linear`. The environment variable `DIST_RUNTIME_CPU_GEMM` chooses:
`onednn` (the default) or `torch` (always `F.linear`, e.g. to compare the two).
"""

from __future__ import annotations

import functools

import torch

from dist_runtime.config import CPU_GEMM_DTYPES, cpu_gemm_choice

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


def onednn_linear_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """True when float weights of `dtype` on `device` are served by `PackedLinearWeight`."""
    return (
        device.type == "cpu"
        and str(dtype).removeprefix("torch.") in CPU_GEMM_DTYPES
        and cpu_gemm_choice() == "onednn"
        and _onednn_runs(dtype)
    )


class PackedLinearWeight:
    """An [out, in] float weight in oneDNN's blocked layout; `matmul(x, bias)` = F.linear."""

    def __init__(self, weight: torch.Tensor):
        if weight.dim() != 2 or weight.device.type != "cpu":
            raise ValueError(
                f"expected a 2-D CPU weight, got {tuple(weight.shape)} on {weight.device}"
            )
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), BATCH_HINT)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the weight {self.in_features}")
        if x.dtype != self.dtype:
            raise ValueError(f"input is {x.dtype}, the weight {self.dtype}")
        if x.numel() == 0:
            return x.new_empty(*x.shape[:-1], self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")
