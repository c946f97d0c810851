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

Host tier (`cache.host_kv_cache_gb`): an evicted cached block is first copied to a slot of its
pool's host tier (least recently used slots are reused), and a prefix lookup that misses on the
device but finds the block's hash there takes a device block and copies it back. The copies are
`KVMove`s, queued in order and sent with the next step plan (`take_moves`); workers do them
before that step, so a block is saved before it is overwritten and loaded before it is read.

Disk tier (`cache.kv_cache_dir`): the hash chain is then a cryptographic digest (BLAKE2b, 128
bits) rooted in a fingerprint of the model and KV layout, the same in every process, so the
blocks outlive the process. Every block registered is also written to disk (a `DISK_SAVE`
move; the worker writes it in the background), a lookup that misses the device and host tier
reads a block found there into a free device block (`DISK_LOAD`), and past the tier's capacity
the least recently used block's files are deleted (`DISK_DROP`). The index starts from the
blocks the workers find on disk.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence

from dist_runtime.protocol import DISK_DROP, DISK_LOAD, DISK_SAVE, KVMove


class _HostTier:
    """One pool's host slots: which block hash each holds, least recently used first."""

    def __init__(self, num_slots: int):
        self.free: deque[int] = deque(range(num_slots))
        self.by_hash: OrderedDict[int, int] = OrderedDict()  # chained hash -> slot

    def put(self, h: int, keep: int | None = None) -> int | None:
        """A slot to copy the block of hash `h` into, giving up the least recently used one
        but `keep`'s (a slot a queued load still reads); None: `h` is there already, or the
        only slot is `keep`'s (the block is not kept)."""
        if h in self.by_hash:
            self.by_hash.move_to_end(h)
            return None
        if self.free:
            slot = self.free.popleft()
        else:
            victim = next((k for k in self.by_hash if k != keep), None)
            if victim is None:
                return None
            slot = self.by_hash.pop(victim)
        self.by_hash[h] = slot
        return slot

    def get(self, h: int) -> int | None:
        slot = self.by_hash.get(h)
        if slot is not None:
            self.by_hash.move_to_end(h)
        return slot


DROPPED_KEPT = 1 << 16
"""Digests of blocks this runtime deleted that the disk tier remembers, so a lookup does not
take them back from files whose deletion is still queued."""


class _DiskTier:
    """The blocks on disk, over every pool: each one's parent (the block before it in its hash
    chain) and pool, at most `capacity`. Only leaves are evicted (blocks no other block on disk
    goes on from), least recently used first, and a leaf's parent that becomes a leaf goes
    first after it: a document loses its tail before its head, so what is left of it is still
    a prefix a prompt can read. `check(pool, digest, parent)`: whether a block's files are
    there now."""

    def __init__(self, capacity: int, check: Callable[[int, int, int], bool] | None):
        self.capacity = capacity
        self.check = check
        self.parent: dict[int, int] = {}
        self.pool: dict[int, int] = {}
        self.children: dict[int, int] = {}
        self.leaves: OrderedDict[int, None] = OrderedDict()
        self.dropped: OrderedDict[int, None] = OrderedDict()
        """Blocks whose files this runtime deleted lately (the last DROPPED_KEPT): never taken
        back from their files by a lookup, which could otherwise read one its deletion has not
        reached yet."""

    def __contains__(self, h: int) -> bool:
        return h in self.parent

    def __len__(self) -> int:
        return len(self.parent)

    def add(self, h: int, parent: int, pool: int) -> None:
        """Index block `h`. Blocks may come in any order (a listing's is by time of use, and
        pool by pool): `children` counts a block's children whether it is indexed yet or not."""
        self.dropped.pop(h, None)
        self.parent[h], self.pool[h] = parent, pool
        if not self.children.get(h):
            self.leaves[h] = None
        self.children[parent] = self.children.get(parent, 0) + 1
        self.leaves.pop(parent, None)

    def touch(self, h: int) -> None:
        if h in self.leaves:
            self.leaves.move_to_end(h)

    def remove(self, h: int) -> None:
        """Take `h` out of the index (its children, if any, stay until they are evicted)."""
        if h not in self.parent:
            return
        parent = self.parent.pop(h)
        del self.pool[h]
        self.leaves.pop(h, None)
        left = self.children.get(parent, 0) - 1
        if left > 0:
            self.children[parent] = left
            return
        self.children.pop(parent, None)
        if parent in self.parent:
            self.leaves[parent] = None
            self.leaves.move_to_end(parent, last=False)  # the same document's next tail

    def clear(self) -> None:
        for index in (self.parent, self.pool, self.children, self.leaves):
            index.clear()

    def victim(self) -> int | None:
        """The leaf to evict next."""
        return next(iter(self.leaves), None)

    def dropping(self, h: int) -> None:
        """Block `h`'s files are being deleted (a `DISK_DROP` queued)."""
        self.dropped[h] = None
        self.dropped.move_to_end(h)
        if len(self.dropped) > DROPPED_KEPT:
            self.dropped.popitem(last=False)


class _Pool:
    """One cp rank's block ids: free list, reference counts, prefix-cache maps."""

    def __init__(self, num_blocks: int, index: int, host_slots: int, moves: list[KVMove]):
        self.free: deque[int] = deque(range(num_blocks))
        self.refs = [0] * num_blocks
        self.hash_of: dict[int, int] = {}  # block id -> chained hash of its content
        self.by_hash: dict[int, int] = {}  # chained hash -> block id
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced, hashed, LRU
        self.index = index
        self.host = _HostTier(host_slots) if host_slots else None
        self.moves = moves  # the manager's queue, shared by its pools
        self.num_saved = 0
        self.disk: _DiskTier | None = None  # shared by every pool
        self.num_disk_saved = 0
        self.num_disk_adopted = 0

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.evictable)

    def take(self, keep: int | None = None) -> int:
        """A block for new content: a never-used one, else the least recently used cached one
        (saved to the host tier first, never into `keep`'s slot)."""
        if self.free:
            block = self.free.popleft()
        else:
            block, _ = self.evictable.popitem(last=False)
            h = self.hash_of.pop(block)
            del self.by_hash[h]
            slot = None if self.host is None else self.host.put(h, keep)
            if slot is not None:  # keep its content in the host tier
                self.moves.append(KVMove(pool=self.index, block=block, slot=slot, to_host=True))
                self.num_saved += 1
        self.refs[block] = 1
        return block

    def load(self, h: int) -> int | None:
        """A device block holding the host tier's copy of hash `h` (registered and referenced
        once; its copy queued), or None when the tier lacks it or no block is free."""
        slot = None if self.host is None else self.host.get(h)
        if slot is None or not self.num_free:
            return None
        block = self.take(keep=h)  # an eviction's save must not reuse the slot read here
        self.moves.append(KVMove(pool=self.index, block=block, slot=slot, to_host=False))
        self.by_hash[h] = block
        self.hash_of[block] = h
        return block

    def holds(self, h: int, parent: int) -> bool:
        """The host or disk tier has the block of hash `h` (after `parent` in its chain): a
        later lookup may load it. On disk that includes a block another runtime on the same
        directory wrote."""
        if self.host is not None and h in self.host.by_hash:
            return True
        return self.disk is not None and (h in self.disk or self._written_elsewhere(h, parent))

    def _written_elsewhere(self, h: int, parent: int) -> bool:
        """Block `h` (not indexed) has its files on disk: another runtime on the directory
        wrote it since this one listed it (never one this runtime is deleting)."""
        disk = self.disk
        assert disk is not None
        check = disk.check
        return h not in disk.dropped and check is not None and check(self.index, h, parent)

    def save_to_disk(self, h: int, parent: int, block: int, first: bool) -> None:
        """Write the block of hash `h` (after `parent` in its chain; `first`: the chain's first
        block) to the disk tier, unless it is there (then it is only marked used) or its parent
        is not (a lookup would never reach it); past the tier's capacity a leaf is deleted
        first, or, when the leaf to go is `parent` (the tier is full of this very chain), the
        block is not written."""
        disk = self.disk
        if disk is None:
            return
        if h in disk:
            disk.touch(h)
            return
        if not first and parent not in disk:
            return
        if len(disk) >= disk.capacity:
            victim = disk.victim()
            if victim is None or victim == parent:
                return
            self._drop(victim)
        disk.add(h, parent, self.index)
        self.moves.append(_disk_move(DISK_SAVE, self.index, block, h, parent))
        self.num_disk_saved += 1

    def load_from_disk(self, h: int, parent: int, first: bool) -> int | None:
        """A device block holding the disk tier's copy of hash `h` (after `parent` in its
        chain; `first`: the chain's first block; registered and referenced once; its read
        queued), or None when the tier lacks it or no block is free."""
        disk = self.disk
        if disk is None or not self.num_free:
            return None
        if h not in disk:
            if not (self._written_elsewhere(h, parent) and self._adopt(h, parent, first)):
                return None
        elif disk.check is not None and not disk.check(self.index, h, disk.parent[h]):
            # its files went (deleted by hand or by another runtime; a write that failed): a
            # miss, and the other workers' copies of it go too
            self._drop(h)
            return None
        disk.touch(h)
        block = self.take()
        self.moves.append(_disk_move(DISK_LOAD, self.index, block, h))
        self.by_hash[h] = block
        self.hash_of[block] = h
        return block

    def _adopt(self, h: int, parent: int, first: bool) -> bool:
        """Index block `h`, whose files are on disk though the index lacks them (another
        runtime on the directory wrote it after this one listed the directory), as a save
        would: past the tier's capacity a leaf is deleted first; a block whose parent the
        index lacks, or whose only room would be its parent's, is not taken (a miss, as a save
        of it would not be written). Whether it was."""
        disk = self.disk
        assert disk is not None
        if not first and parent not in disk:
            return False
        if len(disk) >= disk.capacity:
            victim = disk.victim()
            if victim is None or victim == parent:
                return False
            self._drop(victim)
        disk.add(h, parent, self.index)
        self.num_disk_adopted += 1
        return True

    def _drop(self, h: int) -> None:
        """Take block `h` out of the disk tier's index and delete its files."""
        disk = self.disk
        assert disk is not None
        self.moves.append(_disk_move(DISK_DROP, disk.pool[h], 0, h))
        disk.remove(h)
        disk.dropping(h)

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self.hash_of:
                self.evictable[block] = None
            else:
                self.free.append(block)


class BlockManager:
    """Block ids of `cp_size` pools of `num_blocks` each (one pool per cp rank).

    A sequence's table is logical: entry i holds positions [i * block_size, (i+1) * block_size)
    and is an id in pool i % cp_size, so blocks are striped over the cp ranks. Striping keeps
    every rank's share of a sequence within one block of the others' (KV memory and attention
    work balanced for prefill chunks, cached prefixes and decode alike) and lets each rank find
    its blocks as table[cp_rank::cp_size].
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        cache_salt: int = 0,
        cp_size: int = 1,
        host_slots: int = 0,
        root: int | None = None,
        disk_blocks: Sequence[Sequence[tuple[int, int]]] | None = None,
        disk_capacity: int = 0,
        disk_check: Callable[[int, int, int], bool] | None = None,
    ):
        """`root`: a fixed root of the hash chain, which makes the hashes BLAKE2b digests, the
        same in every process (the disk tier's); `disk_blocks`: per pool, the (digest, parent
        digest) pairs of the blocks the disk tier holds, least recently used first, at most
        `disk_capacity` blocks per pool (the disk tier is on when given); `disk_check(pool,
        digest, parent)`: whether a block's files are on disk now, asked before each read is
        queued."""
        if num_blocks < 1:
            raise ValueError(
                f"the KV cache has {num_blocks} blocks; give the workers more memory "
                "(cache.num_blocks, cache.cpu_kv_cache_gb or "
                "cache.gpu_memory_utilization)"
            )
        self.num_blocks = num_blocks
        """Blocks per pool (per cp rank)."""
        self.block_size = block_size
        self.cp_size = cp_size
        self.enable_prefix_caching = enable_prefix_caching
        self.stable = root is not None
        """Hashes are BLAKE2b digests rooted at `root` (the disk tier's), not Python's."""
        self.root_hash = root if root is not None else hash(("dist_runtime-kv", cache_salt))
        self.host_slots = host_slots if enable_prefix_caching else 0
        """Host-tier slots per pool (0: no host tier)."""
        self._moves: list[KVMove] = []
        self._pools = [_Pool(num_blocks, i, self.host_slots, self._moves) for i in range(cp_size)]
        self.disk_capacity = 0
        """Disk-tier blocks per pool (0: no disk tier)."""
        if disk_blocks is not None and enable_prefix_caching:
            if not self.stable or len(disk_blocks) != cp_size or disk_capacity < 1:
                raise ValueError(
                    "a disk tier needs a fixed hash root, one listing per pool and a capacity"
                )
            self.disk_capacity = disk_capacity
            tier = _DiskTier(disk_capacity * cp_size, disk_check)
            for index, present in enumerate(disk_blocks):
                for h, parent in present:
                    tier.add(h, parent, index)
            for pool in self._pools:
                pool.disk = tier
            while len(tier) > tier.capacity:  # a capacity lowered since they were written
                victim = tier.victim()
                assert victim is not None  # (a chain's last block is a leaf)
                self.drop_from_disk(tier.pool[victim], [victim])
                tier.remove(victim)
        self.num_disk_hit_tokens = 0
        """Prompt tokens read back from the disk tier."""
        self.num_hit_tokens = 0
        """Prompt tokens found cached, on the device or in the host tier."""
        self.num_host_hit_tokens = 0
        """Of those, the ones copied back from the host tier."""
        self.num_queried_tokens = 0

    def drop_from_disk(self, pool: int, digests: Sequence[int]) -> None:
        """Delete these blocks' files from pool `pool`'s workers (blocks out of the index: past
        its capacity, or held by only some of the pool's workers)."""
        tier = self._pools[0].disk
        for h in digests:
            self._moves.append(_disk_move(DISK_DROP, pool, 0, h))
            if tier is not None:
                tier.dropping(h)

    def reset_prefix_cache(self, host: bool = True, disk: bool = True) -> dict[str, int]:
        """Forget every cached block on the device (blocks running requests hold stay theirs,
        no longer shared), and with `host` / `disk` every block those tiers keep (the disk's
        files are deleted). Returns how many blocks each tier forgot."""
        forgot = {"device": 0, "host": 0, "disk": 0}
        for pool in self._pools:
            forgot["device"] += len(pool.hash_of)
            pool.hash_of.clear()
            pool.by_hash.clear()
            pool.free.extend(pool.evictable)
            pool.evictable.clear()
            if host and pool.host is not None:
                forgot["host"] += len(pool.host.by_hash)
                pool.host.free.extend(pool.host.by_hash.values())
                pool.host.by_hash.clear()
        tier = self._pools[0].disk
        if disk and tier is not None:
            forgot["disk"] = len(tier)
            for h, pool_index in list(tier.pool.items()):
                self.drop_from_disk(pool_index, [h])
            tier.clear()
        return forgot

    def forget(self, moves: Sequence[KVMove]) -> None:
        """A step carrying `moves` failed, perhaps part way through them: no block they name
        may be trusted, so the prefix cache forgets them (a device block a load filled, a host
        slot a save filled, a block the disk tier wrote or read); the caller ends or restarts
        the requests holding them (`Scheduler.redo`), and a later prompt computes them again."""
        for m in moves:
            pool = self._pools[m.pool]
            if m.disk in (DISK_SAVE, DISK_LOAD) and pool.disk is not None:
                pool.disk.remove(int(m.key, 16))
            if m.disk == DISK_SAVE or m.disk == DISK_DROP:
                continue
            if m.disk == 0 and m.to_host:
                if pool.host is not None:
                    stale = [h for h, slot in pool.host.by_hash.items() if slot == m.slot]
                    for h in stale:
                        del pool.host.by_hash[h]
                        pool.host.free.append(m.slot)
                continue
            if m.block not in pool.hash_of:
                continue
            h = pool.hash_of.pop(m.block)  # a load into m.block
            if pool.by_hash.get(h) == m.block:
                del pool.by_hash[h]
            if m.block in pool.evictable:
                del pool.evictable[m.block]
                pool.free.append(m.block)

    @property
    def has_moves(self) -> bool:
        return bool(self._moves)

    def take_moves(self) -> list[KVMove]:
        """The host-tier copies queued since the last call, in order (for the next plan)."""
        moves = list(self._moves)
        self._moves.clear()
        return moves

    @property
    def num_saved_blocks(self) -> int:
        """Blocks copied to the host tier on eviction, since start."""
        return sum(p.num_saved for p in self._pools)

    @property
    def num_disk_saved_blocks(self) -> int:
        """Blocks written to the disk tier, since start."""
        return sum(p.num_disk_saved for p in self._pools)

    @property
    def num_disk_adopted_blocks(self) -> int:
        """Blocks found on disk that another runtime on the directory wrote after this one
        listed it (indexed at their first lookup), since start."""
        return sum(p.num_disk_adopted for p in self._pools)

    def disk_indexes(self, digest: int) -> bool:
        """Whether the disk tier's index has block `digest` (safe from another thread)."""
        disk = self._pools[0].disk
        return disk is not None and digest in disk

    @property
    def num_disk_blocks(self) -> int:
        """Blocks the disk tier holds now."""
        disk = self._pools[0].disk
        return 0 if disk is None else len(disk)

    @property
    def num_free_blocks(self) -> int:
        """Free or evictable blocks over every pool."""
        return sum(p.num_free for p in self._pools)

    def pool_free_blocks(self) -> list[int]:
        return [p.num_free for p in self._pools]

    @property
    def capacity_tokens(self) -> int:
        """Tokens one sequence could hold if it had every block."""
        return self.num_blocks * self.cp_size * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, table: list[int], num_tokens: int) -> int:
        """Blocks a table holding `len(table)` blocks must gain to cover num_tokens tokens."""
        return max(self.blocks_for(num_tokens) - len(table), 0)

    def _need_per_pool(self, have: int, want: int) -> list[int]:
        """New blocks each pool gives when a table grows from `have` to `want` entries."""
        cp = self.cp_size
        return [_count(want, s, cp) - _count(have, s, cp) for s in range(cp)]

    def can_grow(self, table: list[int], num_tokens: int) -> bool:
        want = self.blocks_for(num_tokens)
        if want <= len(table):
            return True
        need = self._need_per_pool(len(table), want)
        return all(n <= p.num_free for n, p in zip(need, self._pools))

    def max_tokens(self, table: list[int], evict: bool = True) -> int:
        """Most tokens `table` can cover if it takes free blocks (at least what it covers);
        with evict=False only never-used ones, not cached blocks."""
        cp, have = self.cp_size, len(table)
        # Pool s can hold its current entries plus its free blocks: a_s entries in all, and a
        # table of B entries holds ceil((B - s) / cp) of them, so B <= a_s * cp + s.
        most = min(
            (_count(have, s, cp) + (p.num_free if evict else len(p.free))) * cp + s
            for s, p in enumerate(self._pools)
        )
        return max(most, have) * self.block_size

    def grow(self, table: list[int], num_tokens: int) -> list[int]:
        """Append blocks to `table` so it covers num_tokens; returns the new ids."""
        if not self.can_grow(table, num_tokens):
            raise MemoryError(
                f"need {self.num_new_blocks(table, num_tokens)} KV blocks, free per pool: "
                f"{self.pool_free_blocks()}"
            )
        new = [
            self._pools[i % self.cp_size].take()
            for i in range(len(table), self.blocks_for(num_tokens))
        ]
        table.extend(new)
        return new

    def free(self, table: list[int], released: int = 0) -> None:
        """Drop one reference to each block but the first `released` entries' (given back
        already: `release_head`); the last reference keeps hashed content cached."""
        for i in reversed(range(released, len(table))):  # tail blocks go before the shared head
            self._pools[i % self.cp_size].release(table[i])
        table.clear()

    def release_head(self, table: list[int], start: int, stop: int) -> None:
        """Give back entries [start, stop) of `table`: blocks a sliding window has passed, which
        no later query of the sequence reads. Their ids stay in the table (stale once another
        sequence takes the block; no kernel reads them) and `free` skips them."""
        for i in reversed(range(start, stop)):
            self._pools[i % self.cp_size].release(table[i])

    # -- prefix caching ---------------------------------------------------------------------
    def block_hash(self, parent: int, tokens: Sequence[int]) -> int:
        if self.stable:
            return _digest(parent.to_bytes(16, "little") + struct.pack(f"<{len(tokens)}q", *tokens))
        return hash((parent, tuple(tokens)))

    def derive_root(self, root: int, value: float | bytes) -> int:
        """A hash chain's root for K/V that `value` (a RoPE base, or a LoRA adapter's content
        hash) also shapes."""
        if self.stable:
            salt = value if isinstance(value, bytes) else struct.pack("<d", value)
            return _digest(root.to_bytes(16, "little") + salt)
        return hash((root, value))

    def match_prefix(
        self, token_ids: Sequence[int], max_tokens: int, root: int | None = None
    ) -> tuple[list[int], int]:
        """Cached blocks holding the longest block-aligned prefix of at most max_tokens tokens.

        `root` starts the hash chain (default: this cache's root). Blocks found only in the
        host or disk tier are copied back into free device blocks (`take_moves`). Returns
        (block ids, now referenced by the caller; chained hash after the last one).
        """
        root = self.root_hash if root is None else root
        blocks, parent, _ = self.match_more(token_ids, max_tokens, root, 0)
        return blocks, parent

    def match_more(
        self,
        token_ids: Sequence[int],
        max_tokens: int,
        parent: int,
        start: int,
        max_loads: int | None = None,
    ) -> tuple[list[int], int, bool]:
        """`match_prefix` from block `start` on (`parent`: the chained hash before it),
        copying back at most `max_loads` blocks from the host and disk tiers. Returns (block
        ids, chained hash after the last one, paused: it stopped at `max_loads` before a block
        a tier holds, so a later call may go on)."""
        bs = self.block_size
        if start == 0:
            self.num_queried_tokens += max_tokens
        blocks: list[int] = []
        if not self.enable_prefix_caching:
            return blocks, parent, False
        loads, paused = 0, False
        for i in range(start, max_tokens // bs):
            h = self.block_hash(parent, token_ids[i * bs : (i + 1) * bs])
            pool = self._pools[i % self.cp_size]
            block = pool.by_hash.get(h)
            if block is not None:
                pool.evictable.pop(block, None)
                pool.refs[block] += 1
                if pool.disk is not None:
                    pool.disk.touch(h)  # (a device hit keeps its file fresh too)
            elif max_loads is not None and loads >= max_loads:
                paused = pool.holds(h, parent)
                break
            else:
                block = pool.load(h)
                if block is not None:
                    self.num_host_hit_tokens += bs
                else:
                    block = pool.load_from_disk(h, parent, first=i == 0)
                    if block is None:
                        break
                    self.num_disk_hit_tokens += bs
                loads += 1
            blocks.append(block)
            parent = h
        self.num_hit_tokens += len(blocks) * bs
        return blocks, parent, paused

    def cached_prefix_tokens(
        self, token_ids: Sequence[int], max_tokens: int, root: int | None = None
    ) -> int:
        """How many leading tokens `match_prefix` would find on the device (nothing is
        referenced; a host-tier hit still needs a free block, so it is not counted)."""
        return len(self._cached_chain(token_ids, max_tokens, root)[0]) * self.block_size

    def _cached_chain(
        self, token_ids: Sequence[int], max_tokens: int, root: int | None
    ) -> tuple[list[int], int]:
        parent, blocks = (self.root_hash if root is None else root), list[int]()
        if not self.enable_prefix_caching:
            return blocks, parent
        bs = self.block_size
        for i in range(max_tokens // bs):
            h = self.block_hash(parent, token_ids[i * bs : (i + 1) * bs])
            block = self._pools[i % self.cp_size].by_hash.get(h)
            if block is None:
                break
            blocks.append(block)
            parent = h
        return blocks, parent

    def register_block(self, index: int, block: int, parent: int, tokens: Sequence[int]) -> int:
        """Record full, computed block `index` of a table under hash(parent, tokens); returns
        that hash."""
        h = self.block_hash(parent, tokens)
        pool = self._pools[index % self.cp_size]
        if self.enable_prefix_caching and h not in pool.by_hash and block not in pool.hash_of:
            pool.by_hash[h] = block
            pool.hash_of[block] = h
            pool.save_to_disk(h, parent, block, first=index == 0)
        return h


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=16).digest(), "little")


def _disk_move(kind: int, pool: int, block: int, h: int, parent: int = 0) -> KVMove:
    return KVMove(
        pool=pool,
        block=block,
        slot=0,
        to_host=False,
        disk=kind,
        key=f"{h:032x}",
        parent=f"{parent:032x}" if kind == DISK_SAVE else "",
    )


def _count(entries: int, pool: int, cp: int) -> int:
    """How many of a table's first `entries` entries belong to `pool` (entry i to i % cp)."""
    return max(0, -(-(entries - pool) // cp))
