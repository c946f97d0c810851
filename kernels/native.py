"""The native CPU kernels' library: C sources in `csrc/`, compiled once per machine.

The sources (`csrc/cpu_decode.c`: paged decode attention and RoPE + KV store;
`csrc/cpu_gemm.c`: linear layers over a panel-packed weight; `csrc/cpu_elementwise.c`: the
residual add with RMSNorm and SiLU-and-mul; `csrc/cpu_decoder.c`: a decode step's layers
through those kernels in one call; `csrc/cpu_shm.c`: tp all-reduce and all-gather through
shared memory; `csrc/simd.h`: the vector helpers they share;
`csrc/kernels.h`: their declarations)
are compiled together with the system C compiler (`cc`, or `$CC`) into the runtime's cache
folder (`$DIST_RUNTIME_CACHE/native`, see `formats/demo_model.py`) and loaded with ctypes. The file
name is keyed by the sources, the compiler, its flags and the CPU's feature flags, so a change
to any of them builds anew. OpenMP links against the libgomp PyTorch already loaded, so the
kernels and PyTorch share one thread pool. Without a compiler, or when the build fails, every
caller falls back to its torch path (with one warning).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = tuple(
    CSRC / name
    for name in ("cpu_decode.c", "cpu_gemm.c", "cpu_elementwise.c", "cpu_decoder.c", "cpu_shm.c")
)
HEADERS = (CSRC / "simd.h", CSRC / "kernels.h")
"""Included by the sources: part of the build's key, not of its command line."""
BUILD_TIMEOUT_S = 300
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11")


def _cpu_signature() -> str:
    """What a binary built with -march=native depends on: the CPU's feature flags."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build(cc: str, target: Path, sources: tuple[Path, ...] = SOURCES) -> None:
    """Compile `sources` (default SOURCES) to target atomically (concurrent workers each
    build, the last rename wins, and every rename installs a complete file). A compiler that
    does not know -march=native builds without it; one without OpenMP builds one-thread
    kernels."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    portable = tuple(f for f in FLAGS if f != "-march=native")
    try:
        for flags in (FLAGS, portable, tuple(f for f in portable if f != "-fopenmp")):
            done = subprocess.run(
                [cc, *flags, "-o", tmp, *(str(s) for s in sources), "-lm"],
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT_S,
            )
            if done.returncode == 0:
                if "-fopenmp" not in flags:
                    logger.warning("%s has no OpenMP: the native CPU kernels run on one thread", cc)
                os.replace(tmp, target)
                return
        raise RuntimeError(done.stderr.strip()[-2000:])
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled library, built on first use; None (with one warning) when it cannot be."""
    from dist_runtime.formats.demo_model import default_cache_dir

    cc = compiler()
    if cc is None:
        logger.warning(
            "no C compiler found (set CC or install gcc): the CPU decode attention, linear "
            "layers, RMSNorm and SiLU-and-mul use their torch paths, which are slower"
        )
        return None
    parts = [s.read_bytes() for s in (*SOURCES, *HEADERS)]
    key = hashlib.sha256(
        b"\0".join([*parts, cc.encode(), " ".join(FLAGS).encode(), _cpu_signature().encode()])
    ).hexdigest()[:16]
    target = default_cache_dir() / "native" / f"cpu_kernels-{key}.so"
    try:
        if not target.exists():
            logger.info("building the native CPU kernels (once per machine): %s", target)
            build(cc, target)
        return ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        logger.warning(
            "could not build the native CPU kernels with %s (%s); the torch paths are used",
            cc,
            err,
        )
        return None


def run_profiled(fn: Callable[..., Any], profile_name: str, args: tuple) -> Any:
    """Call a library function, under a profiler label while a torch.profiler trace runs."""
    if torch.autograd.profiler._is_profiler_enabled:
        with torch.profiler.record_function(profile_name):
            return fn(*args)
    return fn(*args)
