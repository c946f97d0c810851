"""The paged KV cache tensors of one worker.

One allocation holds every layer's K and V: (2, layers, num_blocks, block_size, kv_heads,
head_dim). Block ids are handed out by the driver's block manager; a worker only reads and
writes the slots a step plan names.
"""

from __future__ import annotations

import torch


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
    ):
        self.num_blocks = num_blocks
        """Blocks the driver may hand out: ids [0, num_blocks)."""
        self.block_size = block_size
        self.scratch_block = num_blocks if scratch else None
        """One extra block no sequence owns (padding rows of graphed decode steps write it)."""
        # (2, layers, blocks, block_size, kv_heads, head_dim)
        self.data = torch.zeros(
            2,
            num_layers,
            num_blocks + int(scratch),
            block_size,
            num_kv_heads,
            head_dim,
            dtype=dtype,
            device=device,
        )
        self.layers = [(self.data[0, i], self.data[1, i]) for i in range(num_layers)]

    @staticmethod
    def block_bytes(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()
