"""A decoder layer's elementwise steps on CPU in one native call each (`csrc/cpu_elementwise.c`).

The torch references are chains of small operators: the residual add with RMSNorm is add, pow,
mean (a sum and a division), rsqrt and two products; SiLU-and-mul is a chunk, silu and a
product (Gemma's GELU-and-mul the same with gelu). At decode sizes each operator's dispatch
outweighs its arithmetic (about 35 us per norm on the demo model, 61 norms a step); at prefill
sizes each is a pass through memory over a (tokens, hidden) or (tokens, 2 * intermediate)
tensor. The native kernels make one pass per
row and one call per layer step.

float32 only (the CPU default); bfloat16 and other dtypes, other devices,
`DIST_RUNTIME_CPU_ELEMENTWISE=torch`, or a machine without a C compiler take the references
(`kernels/rms_norm.py`, `kernels/silu_and_mul.py`), which these agree with to float rounding.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from dist_runtime.config import cpu_elementwise_choice
from kernels import native
from kernels.native import run_profiled

RMS_NORM_PROFILE_NAME = "cpu_elementwise::rms_norm"
"""What a torch.profiler trace calls the native norm's calls (recorded only while one runs)."""
SILU_PROFILE_NAME = "cpu_elementwise::silu_and_mul"
ACT_PROFILE_NAME = "cpu_elementwise::act_and_mul"


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The native library with this module's functions typed; None when it cannot be built."""
    lib = native.library()
    if lib is None:
        return None
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.dr_rms_norm.argtypes = [
        *(ptr, i64),  # x and its row stride
        *(ptr, i64),  # residual (or NULL)
        *(ptr, i64),  # x + residual out (or NULL)
        *(ptr, i64),  # out
        ptr,  # weight
        *(i64, i64),  # rows, hidden
        ctypes.c_float,  # eps
        i32,  # threads
    ]
    lib.dr_rms_norm.restype = None
    lib.dr_silu_and_mul.argtypes = [*(ptr, i64), *(ptr, i64), i64, i64, i32]
    lib.dr_silu_and_mul.restype = None
    lib.dr_act_and_mul.argtypes = [*(ptr, i64), *(ptr, i64), i64, i64, i32, i32]
    lib.dr_act_and_mul.restype = None
    return lib


def native_elementwise_supported(*tensors: torch.Tensor) -> bool:
    """True when the native kernels take these tensors: float32 CPU tensors with a contiguous
    last dim whose leading dims flatten to rows, DIST_RUNTIME_CPU_ELEMENTWISE not `torch`, and
    the library built. Asked on every call, so written for speed (plain attribute reads)."""
    for t in tensors:
        if not t.is_cpu or t.dtype != torch.float32 or t.dim() == 0:
            return False
        if t.dim() > 1 and t.stride(-1) != 1:
            return False
    return cpu_elementwise_choice() == "native" and _library() is not None


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, last): itself when 2-D (the layers' case), else reshaped without a copy where
    its strides allow one, contiguous otherwise."""
    if t.dim() == 2:
        return t
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def rms_norm_cpu(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual) * weight, x + residual), as `rms_norm_ref`; without a residual the
    second output is x itself. Inputs checked by the caller (`kernels/rms_norm.py`): float32,
    weight a contiguous (hidden,), residual x's shape, last dims contiguous.

    At decode sizes the call's own Python is most of its cost, so it stays lean: no reshapes
    for 2-D inputs."""
    lib = _library()
    assert lib is not None, "needs the native library (native_elementwise_supported)"
    xr = _rows(x)
    rows, hidden = xr.shape
    out = torch.empty_like(xr)
    h = None
    if residual is None:
        r_ptr = h_ptr = None
        r_stride = 0
    else:
        rr = _rows(residual)
        h = torch.empty_like(xr)
        r_ptr, r_stride, h_ptr = rr.data_ptr(), rr.stride(0), h.data_ptr()
    if rows:
        args = (
            *(xr.data_ptr(), xr.stride(0)),
            *(r_ptr, r_stride),
            *(h_ptr, out.stride(0)),
            *(out.data_ptr(), out.stride(0)),
            weight.data_ptr(),
            *(rows, hidden),
            eps,
            torch.get_num_threads(),
        )
        run_profiled(lib.dr_rms_norm, RMS_NORM_PROFILE_NAME, args)
    if x.dim() != 2:
        return out.view(x.shape), (x if h is None else h.view(x.shape))
    return out, (x if h is None else h)


def silu_and_mul_cpu(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x (tokens, 2 * inter) float32 laid out [gate | up], as
    `silu_and_mul_ref`: (tokens, inter) contiguous. Inputs checked by the caller
    (`kernels/silu_and_mul.py`)."""
    lib = _library()
    assert lib is not None, "needs the native library (native_elementwise_supported)"
    tokens, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty(tokens, inter, dtype=torch.float32)
    if tokens and inter:
        args = (x.data_ptr(), x.stride(0), out.data_ptr(), inter, tokens, inter)
        run_profiled(lib.dr_silu_and_mul, SILU_PROFILE_NAME, (*args, torch.get_num_threads()))
    return out


def act_and_mul_cpu(x: torch.Tensor, act: int) -> torch.Tensor:
    """act(gate) * up for x (tokens, 2 * inter) float32 laid out [gate | up], act the code of
    `kernels.silu_and_mul.ACTIVATIONS` (1: GELU's tanh form, as `gelu_tanh_and_mul_ref`):
    (tokens, inter) contiguous. Inputs checked by the caller (`kernels/silu_and_mul.py`)."""
    lib = _library()
    assert lib is not None, "needs the native library (native_elementwise_supported)"
    tokens, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty(tokens, inter, dtype=torch.float32)
    if tokens and inter:
        args = (x.data_ptr(), x.stride(0), out.data_ptr(), inter, tokens, inter, act)
        run_profiled(lib.dr_act_and_mul, ACT_PROFILE_NAME, (*args, torch.get_num_threads()))
    return out
