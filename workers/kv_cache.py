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
from dataclasses import dataclass

import torch

from dist_runtime.protocol import KVMove
from kernels.kv_quant import code_dim

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
