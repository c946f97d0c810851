"""Kernel tests run Triton's CPU interpreter when there is no CUDA device.

The variable must be set before any module decorates a kernel with `triton.jit`. The fixtures
here are the Triton kernel tests': the device they run on, and one intra-op thread for a module
(`pytestmark = pytest.mark.usefixtures("single_thread")`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add spin-wait overhead to the interpreter."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
