"""KV block bookkeeping on the driver: plain Python, no torch.

One `BlockManager` owns one worker pool's block ids (every tp rank of a pool mirrors the same
ids, each holding its own heads). A sequence's block table is a list of ids; block i holds
positions [i * block_size, (i + 1) * block_size). With context parallelism each cp rank gets its
own manager and a sequence keeps one table per cp rank.
"""

from __future__ import annotations

from collections import deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(
                f"the KV cache has {num_blocks} blocks; give the workers more memory "
                "(cache.num_blocks, cache.cpu_kv_cache_bytes or "
                "cache.gpu_memory_utilization)"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, table: list[int], num_tokens: int) -> int:
        """Blocks a table holding `len(table)` blocks must gain to cover num_tokens tokens."""
        return max(self.blocks_for(num_tokens) - len(table), 0)

    def can_grow(self, table: list[int], num_tokens: int) -> bool:
        return self.num_new_blocks(table, num_tokens) <= len(self._free)

    def grow(self, table: list[int], num_tokens: int) -> list[int]:
        """Append blocks to `table` so it covers num_tokens; returns the new ids."""
        need = self.num_new_blocks(table, num_tokens)
        if need > len(self._free):
            raise MemoryError(f"need {need} KV blocks, {len(self._free)} free")
        new = [self._free.popleft() for _ in range(need)]
        table.extend(new)
        return new

    def free(self, table: list[int]) -> None:
        self._free.extend(table)
        table.clear()
