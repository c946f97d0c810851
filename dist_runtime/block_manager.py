"""KV block bookkeeping on the driver: plain Python, no torch.

One `BlockManager` owns one worker pool's block ids (every tp rank of a pool mirrors the same
ids, each holding its own heads). A sequence's block table is a list of ids; block i holds
positions [i * block_size, (i + 1) * block_size). With context parallelism each cp rank gets its
own manager and a sequence keeps one table per cp rank.

Prefix caching: once a full block's K/V are computed, it is registered under a chained hash of
every token up to its end (seeded with whatever else shapes K/V, such as the RoPE base). A new
sequence whose leading blocks hash the same shares those blocks by reference count. Blocks
nobody references keep their content and are evicted least recently used, only when no
never-used block is left.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        cache_salt: int = 0,
    ):
        if num_blocks < 1:
            raise ValueError(
                f"the KV cache has {num_blocks} blocks; give the workers more memory "
                "(cache.num_blocks, cache.cpu_kv_cache_bytes or "
                "cache.gpu_memory_utilization)"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.root_hash = hash(("dist_runtime-kv", cache_salt))
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, int] = {}  # block id -> chained hash of its content
        self._by_hash: dict[int, int] = {}  # chained hash -> block id
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced, hashed, LRU
        self.num_hit_tokens = 0
        self.num_queried_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, table: list[int], num_tokens: int) -> int:
        """Blocks a table holding `len(table)` blocks must gain to cover num_tokens tokens."""
        return max(self.blocks_for(num_tokens) - len(table), 0)

    def can_grow(self, table: list[int], num_tokens: int) -> bool:
        return self.num_new_blocks(table, num_tokens) <= self.num_free_blocks

    def grow(self, table: list[int], num_tokens: int) -> list[int]:
        """Append blocks to `table` so it covers num_tokens; returns the new ids."""
        need = self.num_new_blocks(table, num_tokens)
        if need > self.num_free_blocks:
            raise MemoryError(f"need {need} KV blocks, {self.num_free_blocks} free")
        new = [self._take() for _ in range(need)]
        table.extend(new)
        return new

    def free(self, table: list[int]) -> None:
        """Drop one reference to each block; the last reference keeps hashed content cached."""
        for block in reversed(table):  # tail blocks are evicted before the shared head
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        table.clear()

    # -- prefix caching ---------------------------------------------------------------------
    def block_hash(self, parent: int, tokens: Sequence[int]) -> int:
        return hash((parent, tuple(tokens)))

    def match_prefix(self, token_ids: Sequence[int], max_tokens: int) -> tuple[list[int], int]:
        """Cached blocks holding the longest block-aligned prefix of at most max_tokens tokens.

        Returns (block ids, now referenced by the caller; chained hash after the last one).
        """
        parent, blocks = self.root_hash, list[int]()
        if not self.enable_prefix_caching:
            return blocks, parent
        bs = self.block_size
        for i in range(max_tokens // bs):
            h = self.block_hash(parent, token_ids[i * bs : (i + 1) * bs])
            block = self._by_hash.get(h)
            if block is None:
                break
            blocks.append(block)
            parent = h
        for block in blocks:
            self._evictable.pop(block, None)
            self._refs[block] += 1
        self.num_queried_tokens += max_tokens
        self.num_hit_tokens += len(blocks) * bs
        return blocks, parent

    def register_block(self, block: int, parent: int, tokens: Sequence[int]) -> int:
        """Record a full, computed block under hash(parent, tokens); returns that hash."""
        h = self.block_hash(parent, tokens)
        if self.enable_prefix_caching and h not in self._by_hash and block not in self._hash_of:
            self._by_hash[h] = block
            self._hash_of[block] = h
        return h

    def _take(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._by_hash[self._hash_of.pop(block)]
        self._refs[block] = 1
        return block
