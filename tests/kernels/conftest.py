"""Kernel tests run Triton's CPU interpreter when there is no CUDA device.

The variable must be set before any module decorates a kernel with `triton.jit`.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
