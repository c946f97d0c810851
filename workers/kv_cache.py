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

import contextlib
import errno
import itertools
import logging
import math
import mmap
import os
import queue
import struct
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dist_runtime.protocol import DISK_DROP, DISK_LOAD, DISK_SAVE, DISK_SEEN, KVMove
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


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed tensor. On CPU it lies in fresh anonymous pages, which the OS zeroes as they are
    first touched: a cache of gigabytes costs nothing to allocate and holds memory only as its
    blocks are used (`torch.zeros` writes every byte first, ~0.2 s and all of it resident per
    GiB)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    pages = mmap.mmap(-1, nbytes)  # page-aligned; freed when the tensor is
    return torch.frombuffer(pages, dtype=torch.uint8).view(dtype).view(shape)


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
        self.data = zeros(
            (*shape, code_dim(head_dim, bits)), torch.uint8 if bits else dtype, torch.device(device)
        )
        self.params = zeros((*shape, 2), torch.float32, torch.device(device)) if bits else None
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
    block still waiting to be written in memory.

    A file is a 32-byte header (magic, the two payload sizes, the payload's CRC-32) and the
    payload. A read checks all of it, so a file that a power loss, a full disk or a bad sector
    left wrong (renames are not fsynced: the tier is a cache, and a block that fails its check
    is computed again) is never read as K/V: `apply` reports it and deletes it. Reads of a
    run of loads go through a few threads, as do the checksums of blocks to write (file reads
    and CRC-32 release the GIL)."""

    SUFFIX = ".kv"
    MAGIC = b"DRKV2\n\0\0"
    HEADER = struct.Struct("<8sQQII")
    """magic, data bytes, params bytes, CRC-32 of data then params, 0."""
    THREADS = 4
    FULL_PAUSE_S = 30.0
    """After a write finds the disk full, saves are dropped (not tried) this long."""
    STALE_TMP_S = 60.0
    """A temporary file this old is a write a crash cut short (a write takes milliseconds);
    a younger one may be another runtime's on the same directory, and is left alone."""

    def __init__(self, cache: KVCache, directory: Path, max_pending: int = 64):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / DISK_SEEN).touch()
        self.dir = directory
        self.data_shape = (*cache.data.shape[:2], *cache.data.shape[3:])
        self.data_dtype = cache.data.dtype
        self.params_shape = (
            None if cache.params is None else (*cache.params.shape[:2], *cache.params.shape[3:])
        )
        self.data_bytes = math.prod(self.data_shape) * cache.data.element_size()
        self.params_bytes = 0 if self.params_shape is None else math.prod(self.params_shape) * 4
        self.file_bytes = self.HEADER.size + self.data_bytes + self.params_bytes
        self._pending: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._names: dict[str, str] = {}
        """Digest -> file name stem (`<digest>-<parent>`) of every block on disk or queued."""
        self._lock = threading.Lock()
        self.max_pending = max_pending
        self._queue: queue.Queue[tuple[int, str, Any]] = queue.Queue(maxsize=max_pending)
        self.num_written = self.num_read = self.num_failed = self.num_unread = 0
        self._threads: ThreadPoolExecutor | None = None
        self._full_until = 0.0
        self._last_error_log = -1e9
        self._errors_unlogged = 0
        self._buffers = threading.local()
        """Each reading thread's buffer of one file."""
        for leftover in directory.glob("*.tmp"):  # a write cut short by a crash
            with contextlib.suppress(OSError):  # (not one another runtime is writing now)
                if time.time() - leftover.stat().st_mtime > self.STALE_TMP_S:
                    leftover.unlink()
        self._thread = threading.Thread(target=self._write_loop, name="kv-disk", daemon=True)
        self._thread.start()

    def listing(self) -> list[str]:
        """The names (`<digest>-<parent>`) of the whole blocks on disk, least recently written
        or read first. A file of another size (a write cut short, another layout's file) is
        deleted."""
        found, wrong = [], 0
        for path in self.dir.glob("*" + self.SUFFIX):
            try:
                st = path.stat()
            except OSError:
                continue
            if st.st_size == self.file_bytes:
                found.append((st.st_mtime_ns, path.stem))
                self._names[path.stem.partition("-")[0]] = path.stem
            else:
                path.unlink(missing_ok=True)
                wrong += 1
        if wrong:
            logger.warning(
                "disk KV tier: deleted %d block file(s) in %s that were not %d bytes long",
                wrong,
                self.dir,
                self.file_bytes,
            )
        return [name for _, name in sorted(found)]

    def apply(self, cache: KVCache, moves: list[KVMove]) -> list[int]:
        """Do this worker's disk moves, in plan order (a run of saves copied off the device
        in one gather, a run of loads read by several threads). Returns the indices in
        `moves` of the loads whose file failed its check (gone, cut short, another layout's,
        its CRC-32 wrong): their blocks hold nothing to use, and their files are deleted."""
        unread: list[int] = []
        at = 0
        for kind, run in itertools.groupby(moves, key=lambda m: m.disk):
            group = list(run)
            if kind == DISK_SAVE:
                for i in range(0, len(group), self.max_pending):  # host memory: a queue's worth
                    self._save(cache, group[i : i + self.max_pending])
            elif kind == DISK_LOAD:
                unread += [at + i for i in self._load(cache, group)]
            else:
                self._drop(group)
            at += len(group)
        return unread

    def _save(self, cache: KVCache, moves: list[KVMove]) -> None:
        blocks = torch.tensor([m.block for m in moves], device=cache.data.device)
        data = cache.data.index_select(2, blocks).cpu()
        params = None if cache.params is None else cache.params.index_select(2, blocks).cpu()
        for i, m in enumerate(moves):
            snapshot = (data[:, :, i], None if params is None else params[:, :, i])
            name = self._names[m.key] = f"{m.key}-{m.parent}"
            with self._lock:
                self._pending[m.key] = snapshot
            packed = self._pool().submit(_pack, snapshot)  # beside the writer's file writes
            self._queue.put((DISK_SAVE, m.key, (name, snapshot, packed)))  # waits while it lags

    def _load(self, cache: KVCache, moves: list[KVMove]) -> list[int]:
        """Read `moves`' blocks into the cache; the indices of those that failed their check."""
        if len(moves) > 1:
            done = list(self._pool().map(lambda m: self._load_one(cache, m), moves))
        else:
            done = [self._load_one(cache, m) for m in moves]
        unread = [i for i, ok in enumerate(done) if not ok]
        self.num_read += len(moves) - len(unread)
        self.num_unread += len(unread)
        return unread

    def _pool(self) -> ThreadPoolExecutor:
        """The threads that read files and compute the checksums of files to write."""
        if self._threads is None:
            self._threads = ThreadPoolExecutor(self.THREADS, thread_name_prefix="kv-disk")
        return self._threads

    def _load_one(self, cache: KVCache, m: KVMove) -> bool:
        """Block `m.key` into `m.block` (from memory while its write waits, else from its file
        through this thread's buffer); False when its file failed its check."""
        with self._lock:
            got = self._pending.get(m.key)
        if got is None:
            buf = getattr(self._buffers, "buf", None)
            if buf is None:
                buf = self._buffers.buf = bytearray(self.file_bytes)
            got = self._read(m.key, buf)
            if got is None:
                return False
        data, params = got
        cache.data[:, :, m.block].copy_(data)  # (from pageable memory: done when it returns)
        if cache.params is not None and params is not None:
            cache.params[:, :, m.block].copy_(params)
        return True

    def _drop(self, moves: list[KVMove]) -> None:
        for m in moves:
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

    def _read(self, key: str, buf: bytearray) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Block `key` from its file, as views of `buf`; None (logged, the file deleted) when
        the file is gone or fails its check."""
        path = self._path(self._name(key) or key)
        try:
            with open(path, "rb") as f:
                got = f.readinto(buf)
                more = f.read(1)
            os.utime(path)  # a block read is a block used: the listing's order is by this time
        except FileNotFoundError:
            logger.warning(
                "disk KV tier: block file %s is gone (deleted while the runtime ran, or its write "
                "failed: see this worker's log); its block is computed again",
                path,
            )
            return None
        view = memoryview(buf)
        head = self.HEADER.size
        magic, data_bytes, params_bytes, crc, _ = self.HEADER.unpack_from(buf)
        if got != self.file_bytes or more:
            problem = f"{'over ' if more else ''}{got} bytes, expected {self.file_bytes}"
        elif magic != self.MAGIC:
            problem = f"its header starts {bytes(magic)!r}, not {self.MAGIC!r}"
        elif (data_bytes, params_bytes) != (self.data_bytes, self.params_bytes):
            problem = f"a block of another layout ({data_bytes} + {params_bytes} bytes)"
        elif zlib.crc32(view[head:]) != crc:
            problem = "its CRC-32 does not match its content"
        else:
            data = torch.frombuffer(buf, dtype=torch.uint8, count=self.data_bytes, offset=head)
            data = data.view(self.data_dtype).reshape(self.data_shape)
            params = None
            if self.params_shape is not None:
                params = torch.frombuffer(buf, dtype=torch.uint8, offset=head + self.data_bytes)
                params = params.view(torch.float32).reshape(self.params_shape)
            return data, params
        logger.warning(
            "disk KV tier: block file %s is damaged (%s); deleted, its block is computed again",
            path,
            problem,
        )
        path.unlink(missing_ok=True)
        return None

    def _write_loop(self) -> None:
        while True:
            kind, key, payload = self._queue.get()  # a save: its name and data; a drop: none
            try:
                if kind != DISK_SAVE:
                    self._path(key).unlink(missing_ok=True)  # (a drop's key is its name)
                elif time.monotonic() < self._full_until:
                    self.num_failed += 1  # full: not tried (a read finds it missing: computed)
                else:
                    name, _, packed = payload
                    self._write(name, packed)
            except OSError as e:
                self.num_failed += 1
                self._failed(key, e)
            finally:
                if kind == DISK_SAVE:
                    with self._lock:
                        if self._pending.get(key) is payload[1]:
                            del self._pending[key]
                self._queue.task_done()

    def _failed(self, key: str, e: OSError) -> None:
        """Log a failed write or deletion: a full disk pauses writes for FULL_PAUSE_S; other
        errors are logged once a minute at most, with a count, not once per block."""
        now = time.monotonic()
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            self._full_until = now + self.FULL_PAUSE_S
            logger.error(
                "disk KV tier: %s is full (%s); no block is written for %g s (the blocks not "
                "written are computed again when a prompt needs them); %d writes failed so far",
                self.dir,
                e.strerror,
                self.FULL_PAUSE_S,
                self.num_failed,
            )
            return
        if now - self._last_error_log < 60.0:
            self._errors_unlogged += 1
            return
        more = f" ({self._errors_unlogged} more since the last message)" * bool(
            self._errors_unlogged
        )
        logger.error("disk KV tier: cannot write block %s in %s: %s%s", key, self.dir, e, more)
        self._last_error_log, self._errors_unlogged = now, 0

    def _write(self, name: str, packed: Future[tuple[list[memoryview], int]]) -> None:
        parts, crc = packed.result()
        tmp = self.dir / f"{name}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(self.HEADER.pack(self.MAGIC, self.data_bytes, self.params_bytes, crc, 0))
                for part in parts:
                    f.write(part)
            os.replace(tmp, self._path(name))
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)  # what a full disk took of it
            raise
        self.num_written += 1


def _pack(snapshot: tuple[torch.Tensor, torch.Tensor | None]) -> tuple[list[memoryview], int]:
    """A block's payload as the file holds it (data, then params) and its CRC-32."""
    parts = [t.contiguous().view(torch.uint8).numpy().data for t in snapshot if t is not None]
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    return parts, crc
