"""Tensor-parallel collectives through shared memory, for the ranks of a CPU (gloo) group that
share one machine (`csrc/cpu_shm.c`).

Gloo moves every all-reduce through loopback sockets: on a small machine that is about a
millisecond per call with two ranks and several with three, paid twice per decoder layer on
every step. Here each rank writes its piece into its own slot of a segment mapped by the whole
group, publishes a sequence number, and reads the others' slots once all have published: an
all-reduce sums the slots in rank order (every rank gets the same sums, bit for bit), an
all-gather copies them. A waiting rank spins briefly, then yields its core (the group may have
more ranks than free cores); it gives up after the collective timeout, or as soon as a rank it
waits for has died.

The segment is a file under /dev/shm created by the group's first rank and unlinked as soon as
every rank has mapped it, so nothing is left behind whatever way the processes end.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import os
import uuid
from pathlib import Path
from typing import Any

import torch

from kernels import native

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
LINE_BYTES = 64
"""One cache line per rank for its sequence number and pid (csrc/cpu_shm.c)."""
SLOT_BYTES = 1 << 20
"""Bytes a rank writes per round; a larger tensor goes in several rounds (a decode step's
all-reduce is one round; an 8K-token prefill chunk of a 7B model's is 64)."""


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = native.library()
    if lib is None:
        return None
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    p64, pint, dbl = ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int), ctypes.c_double
    lib.dr_shm_attach.argtypes = [ptr, i32, i64]
    lib.dr_shm_attach.restype = None
    lib.dr_shm_all_reduce.argtypes = [ptr, i32, i32, i64, p64, ptr, i64, dbl, pint]
    lib.dr_shm_all_reduce.restype = i32
    lib.dr_shm_all_gather.argtypes = [ptr, i32, i32, i64, p64, ptr, i64, ptr, dbl, pint]
    lib.dr_shm_all_gather.restype = i32
    return lib


def available() -> bool:
    """Whether this machine can run shared-memory collectives (Linux /dev/shm, the library)."""
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK) and _library() is not None


def segment_bytes(world: int, slot_bytes: int = SLOT_BYTES) -> int:
    return world * LINE_BYTES + 2 * world * slot_bytes


def new_segment_path(tag: str) -> Path:
    return SHM_DIR / f"dist_runtime_{tag}_{uuid.uuid4().hex}"


class ShmGroup:
    """One rank's view of a group's segment. The creating rank passes `create=True` (a new file
    of the right size); the others open it. `unlink()` (by any one rank, once all have
    attached) removes the name; the mappings stay until `close()`."""

    def __init__(
        self,
        path: str | Path,
        rank: int,
        world: int,
        create: bool,
        slot_bytes: int = SLOT_BYTES,
    ):
        lib = _library()
        if lib is None:
            raise RuntimeError("the native CPU library is not available (no C compiler?)")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a group of {world}")
        self.path, self.rank, self.world, self.slot_bytes = Path(path), rank, world, slot_bytes
        size = segment_bytes(world, slot_bytes)
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:  # reserved now: a full /dev/shm fails here, not as SIGBUS on first use
                os.posix_fallocate(fd, 0, size)
            elif os.fstat(fd).st_size != size:
                raise RuntimeError(
                    f"{self.path} holds {os.fstat(fd).st_size} bytes, not the {size} of a group "
                    f"of {world} with {slot_bytes}-byte slots"
                )
            self._mm: mmap.mmap | None = mmap.mmap(fd, size, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self._view: ctypes.Array[ctypes.c_char] | None = (ctypes.c_char * size).from_buffer(
            self._mm
        )
        self._address = ctypes.addressof(self._view)
        self._seq = ctypes.c_int64(0)
        self._peer = ctypes.c_int(-1)
        self._lib = lib
        lib.dr_shm_attach(self._address, rank, os.getpid())

    def unlink(self) -> None:
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        self._view = None
        if self._mm is not None:
            self._mm.close()
            self._mm = None

    def _run(self, fn: Any, op: str, timeout_s: float | None, *args: Any) -> None:
        """One library collective over this group's segment; raises naming the late or dead
        rank."""
        if self._mm is None:
            raise RuntimeError("the shared-memory group is closed")
        code = fn(
            self._address,
            self.rank,
            self.world,
            self.slot_bytes,
            ctypes.byref(self._seq),
            *args,
            timeout_s or 0.0,
            ctypes.byref(self._peer),
        )
        if code == 0:
            return
        peer = self._peer.value
        if code == 1:
            raise RuntimeError(
                f"shared-memory {op} timed out after {timeout_s:g} s waiting for rank {peer}"
            )
        raise RuntimeError(f"shared-memory {op}: rank {peer} of the group died")

    def all_reduce(self, x: torch.Tensor, timeout_s: float | None = None) -> None:
        """Sum x (a contiguous float32 CPU tensor) over the group, in place."""
        if not (x.is_cpu and x.dtype == torch.float32 and x.is_contiguous()):
            raise ValueError(
                f"shared-memory all-reduce takes contiguous float32 CPU tensors, got "
                f"{x.dtype} on {x.device}"
            )
        self._run(self._lib.dr_shm_all_reduce, "all-reduce", timeout_s, x.data_ptr(), x.numel())

    def all_gather(self, x: torch.Tensor, timeout_s: float | None = None) -> torch.Tensor:
        """(world, *x.shape): every rank's x (same shape and dtype everywhere), in rank order."""
        if not x.is_cpu:
            raise ValueError(f"shared-memory all-gather takes CPU tensors, got {x.device}")
        x = x.contiguous()
        out = torch.empty((self.world, *x.shape), dtype=x.dtype)
        nbytes = x.numel() * x.element_size()
        self._run(
            self._lib.dr_shm_all_gather,
            "all-gather",
            timeout_s,
            x.data_ptr(),
            nbytes,
            out.data_ptr(),
        )
        return out
