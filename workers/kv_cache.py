"""The paged KV cache tensors of one worker.

One allocation holds every layer's K and V: (2, layers, num_blocks, block_size, kv_heads,
head_dim) in the model's dtype. With KV quantization (cache.quant_policy 8 or 4) it holds uint8
codes instead, (..., head_dim) for int8 or (..., head_dim / 2) for int4, plus a float32 (scale,
zero) pair per token and KV head in a second allocation of the same block layout, so paging,
prefix caching and preemption see blocks exactly as before (see kernels/kv_quant.py). Block ids
are handed out by the driver's block manager; a worker only reads and writes the slots a step
plan names.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import queue
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dist_runtime.protocol import DISK_DROP, DISK_LOAD, DISK_SAVE, KVMove
from kernels.kv_quant import code_dim

logger = logging.getLogger(__name__)

PARAM_BYTES = 2 * 4
"""float32 scale and zero per token and KV head, for K and for V each."""


@dataclass(frozen=True)
class LayerKV:
    """One layer's cache: K and V (codes when bits > 0) and their (scale, zero) params."""

    k: torch.Tensor
    v: torch.Tensor
    k_params: torch.Tensor | None = None
    v_params: torch.Tensor | None = None
    bits: int = 0

    def quant_args(self) -> dict[str, object]:
        """The keyword arguments the attention kernels take for this cache."""
        if not self.bits:
            return {}
        return {"k_params": self.k_params, "v_params": self.v_params, "bits": self.bits}


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        scratch: bool = False,
        bits: int = 0,
    ):
        self.num_blocks = num_blocks
        """Blocks the driver may hand out: ids [0, num_blocks)."""
        self.block_size = block_size
        self.bits = bits
        self.scratch_block = num_blocks if scratch else None
        """One extra block no sequence owns (padding rows of graphed decode steps write it)."""
        shape = (2, num_layers, num_blocks + int(scratch), block_size, num_kv_heads)
        # (2, layers, blocks, block_size, kv_heads, head_dim or code bytes)
        self.data = torch.zeros(
            *shape,
            code_dim(head_dim, bits),
            dtype=torch.uint8 if bits else dtype,
            device=device,
        )
        self.params = torch.zeros(*shape, 2, dtype=torch.float32, device=device) if bits else None
        self.layers = [
            LayerKV(
                self.data[0, i],
                self.data[1, i],
                None if self.params is None else self.params[0, i],
                None if self.params is None else self.params[1, i],
                bits,
            )
            for i in range(num_layers)
        ]

    @staticmethod
    def block_bytes(
        num_layers: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        bits: int = 0,
    ) -> int:
        per_head = code_dim(head_dim, bits) + PARAM_BYTES if bits else head_dim * dtype.itemsize
        return 2 * num_layers * block_size * num_kv_heads * per_head

    @property
    def nbytes(self) -> int:
        params = 0 if self.params is None else self.params.numel() * 4
        return self.data.numel() * self.data.element_size() + params


class HostKVTier:
    """One worker's host tier of the prefix cache: `num_slots` blocks in the device cache's
    layout (its heads, codes and params), in pinned memory when the cache is on CUDA. The
    driver's block manager decides every copy (`KVMove`)."""

    def __init__(self, cache: KVCache, num_slots: int):
        pin = cache.data.is_cuda

        def like(t: torch.Tensor) -> torch.Tensor:
            # empty: a slot is read only after a save wrote it (pages are touched as filled)
            shape = (*t.shape[:2], num_slots, *t.shape[3:])
            return torch.empty(shape, dtype=t.dtype, pin_memory=pin)

        self.num_slots = num_slots
        self.data = like(cache.data)
        self.params = None if cache.params is None else like(cache.params)

    @property
    def nbytes(self) -> int:
        params = 0 if self.params is None else self.params.numel() * 4
        return self.data.numel() * self.data.element_size() + params

    def apply(self, cache: KVCache, moves: list[KVMove]) -> None:
        """Do `moves` (this worker's, in plan order): runs of one direction are copied
        together unless a run names a block or slot twice, which goes one copy at a time."""
        for _, run in itertools.groupby(moves, key=lambda m: m.to_host):
            group = list(run)
            if len({m.block for m in group}) < len(group) or len({m.slot for m in group}) < len(
                group
            ):
                for m in group:
                    self._copy(cache, [m])
            else:
                self._copy(cache, group)

    def _copy(self, cache: KVCache, moves: list[KVMove]) -> None:
        bad = [
            m
            for m in moves
            if not (0 <= m.block < cache.num_blocks and 0 <= m.slot < self.num_slots)
        ]
        if bad:
            raise ValueError(
                f"KV moves {bad[:2]} outside {cache.num_blocks} blocks or "
                f"{self.num_slots} host slots"
            )
        pairs = [(cache.data, self.data)]
        if cache.params is not None and self.params is not None:
            pairs.append((cache.params, self.params))
        slots = torch.tensor([m.slot for m in moves])
        for device, host in pairs:
            blocks = torch.tensor([m.block for m in moves], device=device.device)
            if moves[0].to_host:
                host.index_copy_(2, slots, device.index_select(2, blocks).cpu())
            else:
                rows = host.index_select(2, slots)
                device.index_copy_(2, blocks, rows.to(device.device, non_blocking=True))


class DiskKVTier:
    """One worker's disk tier of the prefix cache: a directory with one file per block (this
    worker's heads of every layer, codes and params when quantized), named by the block's
    digest and its parent's (`<digest>-<parent>.kv`: a listing gives the chains' shape). The
    driver's block manager decides every save, load and deletion (`KVMove`s with `disk`
    set); a save is copied off the device at once and written by a background thread (to a
    temporary name, then renamed: a file under its final name is whole), and a load finds a
    block still waiting to be written in memory."""

    SUFFIX = ".kv"
    MAGIC = b"DRKV1\n"

    def __init__(self, cache: KVCache, directory: Path, max_pending: int = 64):
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.data_shape = (*cache.data.shape[:2], *cache.data.shape[3:])
        self.data_dtype = cache.data.dtype
        self.params_shape = (
            None if cache.params is None else (*cache.params.shape[:2], *cache.params.shape[3:])
        )
        self.data_bytes = math.prod(self.data_shape) * cache.data.element_size()
        self.params_bytes = 0 if self.params_shape is None else math.prod(self.params_shape) * 4
        self.file_bytes = len(self.MAGIC) + 16 + self.data_bytes + self.params_bytes
        self._pending: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._names: dict[str, str] = {}
        """Digest -> file name stem (`<digest>-<parent>`) of every block on disk or queued."""
        self._lock = threading.Lock()
        self.max_pending = max_pending
        self._queue: queue.Queue[tuple[int, str, Any]] = queue.Queue(maxsize=max_pending)
        self.num_written = self.num_read = self.num_failed = 0
        for leftover in directory.glob("*.tmp"):  # a write cut short by a crash
            leftover.unlink(missing_ok=True)
        self._thread = threading.Thread(target=self._write_loop, name="kv-disk", daemon=True)
        self._thread.start()

    def listing(self) -> list[str]:
        """The names (`<digest>-<parent>`) of the whole blocks on disk, least recently written
        or read first (a file of another size, which a cut write left, is skipped)."""
        found = []
        for path in self.dir.glob("*" + self.SUFFIX):
            try:
                st = path.stat()
            except OSError:
                continue
            if st.st_size == self.file_bytes:
                found.append((st.st_mtime_ns, path.stem))
                self._names[path.stem.partition("-")[0]] = path.stem
        return [name for _, name in sorted(found)]

    def apply(self, cache: KVCache, moves: list[KVMove]) -> None:
        """Do this worker's disk moves, in plan order (a run of saves copied off the device
        in one gather)."""
        for is_save, run in itertools.groupby(moves, key=lambda m: m.disk == DISK_SAVE):
            group = list(run)
            if not is_save:
                self._other(cache, group)
                continue
            for at in range(0, len(group), self.max_pending):  # host memory: one queue's worth
                self._save(cache, group[at : at + self.max_pending])

    def _save(self, cache: KVCache, moves: list[KVMove]) -> None:
        blocks = torch.tensor([m.block for m in moves], device=cache.data.device)
        data = cache.data.index_select(2, blocks).cpu()
        params = None if cache.params is None else cache.params.index_select(2, blocks).cpu()
        for i, m in enumerate(moves):
            snapshot = (data[:, :, i], None if params is None else params[:, :, i])
            name = self._names[m.key] = f"{m.key}-{m.parent}"
            with self._lock:
                self._pending[m.key] = snapshot
            self._queue.put((DISK_SAVE, m.key, (name, snapshot)))  # waits while the writer lags

    def _other(self, cache: KVCache, moves: list[KVMove]) -> None:
        for m in moves:
            if m.disk == DISK_LOAD:
                with self._lock:
                    found = self._pending.get(m.key)
                data, params = found if found is not None else self._read(m.key)
                cache.data[:, :, m.block].copy_(data)
                if cache.params is not None and params is not None:
                    cache.params[:, :, m.block].copy_(params)
                self.num_read += 1
            elif m.disk == DISK_DROP:
                name = self._name(m.key)
                self._names.pop(m.key, None)
                if name is not None:
                    self._queue.put((DISK_DROP, name, None))

    def flush(self) -> None:
        """Wait until every queued write and deletion is done."""
        self._queue.join()

    def _name(self, key: str) -> str | None:
        """The file name stem of block `key` (known from the listing or its save; else looked
        up on disk), None when there is no such file."""
        name = self._names.get(key)
        if name is None:
            found = next(self.dir.glob(f"{key}-*{self.SUFFIX}"), None)
            if found is not None:
                name = self._names[key] = found.stem
        return name

    def _path(self, name: str) -> Path:
        return self.dir / (name + self.SUFFIX)

    def _read(self, key: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        path = self._path(self._name(key) or key)
        try:
            raw = path.read_bytes()
            os.utime(path)  # a block read is a block used: the listing's order is by this time
        except FileNotFoundError:
            raise RuntimeError(
                f"disk KV tier: block file {path} is gone (deleted while the runtime ran, or its "
                "write failed: see this worker's log); restart the runtime to re-read the "
                "directory"
            ) from None
        head = len(self.MAGIC) + 16
        sizes = struct.unpack("<QQ", raw[len(self.MAGIC) : head]) if len(raw) >= head else None
        if (
            not raw.startswith(self.MAGIC)
            or sizes != (self.data_bytes, self.params_bytes)
            or len(raw) != self.file_bytes
        ):
            raise RuntimeError(
                f"disk KV tier: {path} is not a block of this KV cache ({len(raw)} bytes, "
                f"expected {self.file_bytes}); delete it and restart the runtime"
            )
        buf = bytearray(raw[head:])
        data = torch.frombuffer(buf, dtype=torch.uint8, count=self.data_bytes)
        data = data.view(self.data_dtype).reshape(self.data_shape)
        params = None
        if self.params_shape is not None:
            params = torch.frombuffer(buf, dtype=torch.uint8, offset=self.data_bytes)
            params = params.view(torch.float32).reshape(self.params_shape)
        return data, params

    def _write_loop(self) -> None:
        while True:
            kind, key, payload = self._queue.get()  # a save: its name and data; a drop: none
            try:
                if kind == DISK_SAVE:
                    self._write(*payload)
                else:
                    self._path(key).unlink(missing_ok=True)  # (a drop's key is its name)
            except OSError as e:
                self.num_failed += 1
                logger.error("disk KV tier: cannot write block %s in %s: %s", key, self.dir, e)
            finally:
                if kind == DISK_SAVE:
                    with self._lock:
                        if self._pending.get(key) is payload[1]:
                            del self._pending[key]
                self._queue.task_done()

    def _write(self, name: str, snapshot: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        data = snapshot[0].contiguous()
        params = None if snapshot[1] is None else snapshot[1].contiguous()
        tmp = self.dir / f"{name}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(self.MAGIC + struct.pack("<QQ", self.data_bytes, self.params_bytes))
            f.write(data.view(torch.uint8).numpy().data)
            if params is not None:
                f.write(params.view(torch.uint8).numpy().data)
        os.replace(tmp, self._path(name))
        self.num_written += 1
