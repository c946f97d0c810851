"""Choose between a kernel's Triton implementation and its torch reference.

Triton runs on CUDA tensors; everything else runs the reference. The environment variable
`DIST_RUNTIME_KERNELS` forces a choice: `torch` (always the reference) or `triton` (Triton even
off CUDA, which needs `TRITON_INTERPRET=1` on a CPU).
"""

from __future__ import annotations

import functools
import os

import torch

from dist_runtime.config import KERNELS_ENV as ENV_VAR


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(device: torch.device) -> bool:
    """True when the Triton kernel should run for tensors on `device`."""
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced not in ("", "torch", "triton"):
        raise ValueError(
            f"{ENV_VAR}={forced!r} is not valid; use 'torch', 'triton' or leave it unset"
        )
    if forced == "torch":
        return False
    if forced == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV_VAR}=triton but triton is not installed; pip install triton")
        return True
    return device.type == "cuda" and triton_available()
