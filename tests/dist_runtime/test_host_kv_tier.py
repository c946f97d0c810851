"""The prefix cache's host tier, unit by unit: which `KVMove`s the block manager queues when it
evicts cached blocks and brings them back, and how `HostKVTier.apply` copies them."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from dist_runtime.engine.block_manager import BlockManager, _HostTier
from dist_runtime.protocol import KVMove, StepPlan
from workers.kv_cache import HostKVTier, KVCache

BS = 2
T = [1, 2, 3, 4, 5, 6, 7, 8]  # 4 full blocks of BS tokens
U = [11, 12, 13, 14]  # 2 full blocks, another prefix


def save(block: int, slot: int, pool: int = 0) -> KVMove:
    return KVMove(pool=pool, block=block, slot=slot, to_host=True)


def load(block: int, slot: int, pool: int = 0) -> KVMove:
    return KVMove(pool=pool, block=block, slot=slot, to_host=False)


def register(bm: BlockManager, table: list[int], tokens: Sequence[int]) -> list[int]:
    """Register every full block of `table` the way the scheduler does; returns the hashes."""
    parent, hashes = bm.root_hash, []
    for i in range(len(tokens) // bm.block_size):
        chunk = tokens[i * bm.block_size : (i + 1) * bm.block_size]
        parent = bm.register_block(i, table[i], parent, chunk)
        hashes.append(parent)
    return hashes


def cached_then_freed(bm: BlockManager, tokens: Sequence[int]) -> list[int]:
    """A table holding `tokens`, registered and freed (its blocks cached, evictable)."""
    table: list[int] = []
    bm.grow(table, len(tokens))
    blocks = list(table)
    register(bm, table, tokens)
    bm.free(table)
    return blocks


def refs(bm: BlockManager, pool: int = 0) -> list[int]:
    return list(bm._pools[pool].refs)


def evictable(bm: BlockManager, pool: int = 0) -> list[int]:
    return list(bm._pools[pool].evictable)


# -- block manager --------------------------------------------------------------------------


def test_without_a_host_tier_eviction_loses_the_blocks() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS, host_slots=0)
    assert cached_then_freed(bm, T) == [0, 1, 2, 3]
    assert bm.cached_prefix_tokens(T, 8) == 8
    other: list[int] = []
    bm.grow(other, 8)  # evicts all four cached blocks
    assert other == [3, 2, 1, 0]  # the table's tail is evicted first
    assert bm.take_moves() == []
    assert bm.num_saved_blocks == 0
    bm.free(other)
    assert bm.match_prefix(T, 8) == ([], bm.root_hash)
    assert bm.take_moves() == []
    assert bm.num_hit_tokens == 0 and bm.num_host_hit_tokens == 0


def test_evicted_blocks_are_saved_in_lru_order() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS, host_slots=4)
    assert bm.host_slots == 4
    cached_then_freed(bm, T)
    assert evictable(bm) == [3, 2, 1, 0]  # freed tail first: least recently used first
    assert bm.take_moves() == []  # freeing alone copies nothing
    other: list[int] = []
    bm.grow(other, 8)
    assert other == [3, 2, 1, 0]
    assert bm.take_moves() == [save(3, 0), save(2, 1), save(1, 2), save(0, 3)]
    assert bm.num_saved_blocks == 4
    assert bm.take_moves() == []  # drained
    assert bm.cached_prefix_tokens(T, 8) == 0  # nothing left on the device


def test_only_evicted_blocks_are_saved() -> None:
    bm = BlockManager(num_blocks=6, block_size=BS, host_slots=4)
    cached_then_freed(bm, T)  # blocks 0..3; 4 and 5 never used
    other: list[int] = []
    bm.grow(other, 8)  # two never-used blocks, then evicts T's last two blocks
    assert other == [4, 5, 3, 2]
    assert bm.take_moves() == [save(3, 0), save(2, 1)]
    assert bm.num_saved_blocks == 2
    bm.free(other)
    # T's first two blocks are still on the device, the last two in the host tier
    assert bm.cached_prefix_tokens(T, 8) == 4
    blocks, _ = bm.match_prefix(T, 8)
    # other's blocks went back to the free list tail first: [2, 3, 5, 4]
    assert blocks == [0, 1, 2, 3]
    assert bm.take_moves() == [load(2, 1), load(3, 0)]
    assert bm.num_hit_tokens == 8 and bm.num_host_hit_tokens == 4
    assert bm.cached_prefix_tokens(T, 8) == 8


def test_match_prefix_loads_from_host_then_hits_on_device() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS, host_slots=4)
    cached_then_freed(bm, T)
    other: list[int] = []
    bm.grow(other, 8)
    saves = bm.take_moves()
    slot_of = {m.block: m.slot for m in saves}  # the block each hash lived in -> its slot
    assert slot_of == {3: 0, 2: 1, 1: 2, 0: 3}
    bm.free(other)  # unhashed now: free list [0, 1, 2, 3]
    assert bm.num_free_blocks == 4
    assert bm.cached_prefix_tokens(T, 8) == 0  # host blocks are not counted

    blocks, last = bm.match_prefix(T, 8)
    assert blocks == [0, 1, 2, 3]
    assert last == register(BlockManager(4, BS), [0, 1, 2, 3], T)[-1]  # same hash chain
    # T's block i was in block i before, saved to slot slot_of[i]; it comes back into block i
    assert bm.take_moves() == [load(0, 3), load(1, 2), load(2, 1), load(3, 0)]
    assert refs(bm) == [1, 1, 1, 1] and evictable(bm) == []
    assert bm.num_free_blocks == 0
    assert bm.num_host_hit_tokens == 8 and bm.num_hit_tokens == 8
    assert bm.cached_prefix_tokens(T, 8) == 8

    again, last_again = bm.match_prefix(T, 8)
    assert again == blocks and last_again == last
    assert bm.take_moves() == []
    assert refs(bm) == [2, 2, 2, 2]
    assert bm.num_host_hit_tokens == 8 and bm.num_hit_tokens == 16
    assert bm.num_saved_blocks == 4


def test_match_prefix_loads_only_whole_blocks_within_max_tokens() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS, host_slots=4)
    cached_then_freed(bm, T)
    other: list[int] = []
    bm.grow(other, 8)
    bm.take_moves()
    bm.free(other)
    blocks, _ = bm.match_prefix(T, 5)  # 2 whole blocks
    assert blocks == [0, 1]
    assert bm.take_moves() == [load(0, 3), load(1, 2)]
    assert bm.num_host_hit_tokens == 4 and bm.num_hit_tokens == 4
    assert refs(bm) == [1, 1, 0, 0]


def test_host_tier_lru_reuses_slots() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS, host_slots=2)
    cached_then_freed(bm, T)
    other: list[int] = []
    bm.grow(other, 8)
    # T's blocks 3, 2, 1, 0 are evicted in that order; the third and fourth saves take the
    # slots of the oldest hashes (those of blocks 3 and 2)
    assert bm.take_moves() == [save(3, 0), save(2, 1), save(1, 0), save(0, 1)]
    assert bm.num_saved_blocks == 4
    bm.free(other)
    blocks, _ = bm.match_prefix(T, 8)
    assert blocks == [0, 1]  # T's blocks 2 and 3 lost their slots: the chain stops there
    assert bm.take_moves() == [load(0, 1), load(1, 0)]
    assert bm.num_host_hit_tokens == 4 and bm.num_hit_tokens == 4


def test_host_lookup_of_an_overwritten_hash_misses() -> None:
    bm = BlockManager(num_blocks=2, block_size=BS, host_slots=2)
    cached_then_freed(bm, U)  # U's 2 blocks
    other: list[int] = []
    bm.grow(other, 4)
    assert bm.take_moves() == [save(1, 0), save(0, 1)]
    bm.free(other)
    cached_then_freed(bm, [21, 22, 23, 24])  # another 2 blocks, evicted next
    bm.grow(other, 4)
    assert bm.take_moves() == [save(1, 0), save(0, 1)]  # U's slots, reused
    bm.free(other)
    assert bm.match_prefix(U, 4)[0] == []
    assert bm.take_moves() == []
    assert bm.match_prefix([21, 22, 23, 24], 4)[0] == [0, 1]
    assert bm.take_moves() == [load(0, 1), load(1, 0)]


def test_host_tier_put_of_a_known_hash_refreshes_it() -> None:
    tier = _HostTier(2)
    assert tier.put(101) == 0 and tier.put(102) == 1
    assert tier.put(101) is None  # there already: no copy, and now the most recent
    assert tier.put(103) == 1  # so 102 is the one replaced
    assert tier.get(102) is None
    assert tier.get(101) == 0 and tier.get(103) == 1
    assert tier.get(101) == 0  # a get refreshes too: 103 is now the oldest
    assert tier.put(104) == 1
    assert tier.get(103) is None and tier.get(104) == 1


def test_a_second_eviction_of_the_same_content_saves_nothing() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS, host_slots=4)
    cached_then_freed(bm, U)  # blocks 0, 1
    other: list[int] = []
    bm.grow(other, 8)  # takes 2, 3, then evicts 1 and 0
    assert bm.take_moves() == [save(1, 0), save(0, 1)]
    bm.free(other)  # free list [0, 1, 3, 2]
    blocks, _ = bm.match_prefix(U, 4)
    assert blocks == [0, 1]
    assert bm.take_moves() == [load(0, 1), load(1, 0)]
    bm.free(blocks)  # cached again
    bm.grow(other, 8)  # evicts 1 and 0 again: their hashes are still in the host tier
    assert other == [3, 2, 1, 0]
    assert bm.take_moves() == []
    assert bm.num_saved_blocks == 2
    bm.free(other)
    assert bm.match_prefix(U, 4)[0] == [0, 1]  # and still loadable from the same slots
    assert bm.take_moves() == [load(0, 1), load(1, 0)]


def test_load_stops_when_no_device_block_is_free() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS, host_slots=4)
    cached_then_freed(bm, T)
    held: list[int] = []
    bm.grow(held, 8)  # every block referenced
    assert len(bm.take_moves()) == 4
    blocks, parent = bm.match_prefix(T, 8)
    assert blocks == [] and parent == bm.root_hash
    assert bm.take_moves() == []
    assert bm.num_hit_tokens == 0 and bm.num_host_hit_tokens == 0
    assert refs(bm) == [1, 1, 1, 1]


def test_load_chain_stops_at_the_first_block_without_room() -> None:
    bm = BlockManager(num_blocks=5, block_size=BS, host_slots=4)
    cached_then_freed(bm, T)  # blocks 0..3, block 4 never used
    held: list[int] = []
    bm.grow(held, 8)  # 4, then evicts 3, 2, 1
    one: list[int] = []
    bm.grow(one, 2)  # evicts 0
    assert held == [4, 3, 2, 1] and one == [0]
    assert bm.take_moves() == [save(3, 0), save(2, 1), save(1, 2), save(0, 3)]
    bm.free(one)  # the only free block
    blocks, _ = bm.match_prefix(T, 8)
    assert blocks == [0]
    assert bm.take_moves() == [load(0, 3)]  # nothing queued for T's second block
    assert bm.num_host_hit_tokens == 2 and bm.num_hit_tokens == 2
    assert bm.num_free_blocks == 0


def test_a_load_that_evicts_saves_the_victim_first() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS, host_slots=8)
    assert cached_then_freed(bm, T[:4]) == [0, 1]
    assert cached_then_freed(bm, U) == [2, 3]
    assert evictable(bm) == [1, 0, 3, 2]
    held: list[int] = []
    bm.grow(held, 4)  # evicts T's blocks
    assert held == [1, 0]
    assert bm.take_moves() == [save(1, 0), save(0, 1)]
    blocks, _ = bm.match_prefix(T[:4], 4)
    # T's first block (slot 1) needs a device block: U's last block (3) is the LRU one, so it
    # is saved (slot 2) before T's copy overwrites it; then the same for T's second block
    assert blocks == [3, 2]
    assert bm.take_moves() == [save(3, 2), load(3, 1), save(2, 3), load(2, 0)]
    assert bm.num_saved_blocks == 4 and bm.num_host_hit_tokens == 4
    assert bm.cached_prefix_tokens(T[:4], 4) == 4
    assert bm.cached_prefix_tokens(U, 4) == 0
    bm.free(blocks)
    bm.free(held)  # free list [0, 1]
    assert bm.match_prefix(U, 4)[0] == [0, 1]
    assert bm.take_moves() == [load(0, 3), load(1, 2)]  # U comes back from its own slots


def test_a_one_slot_tier_never_saves_over_the_slot_a_load_reads() -> None:
    """One host slot, holding T's block: loading it takes the only device block, U's, whose
    save would need that very slot; the save is skipped (U's block is simply dropped), so the
    load reads T's content and not U's."""
    bm = BlockManager(num_blocks=1, block_size=BS, host_slots=1)
    assert cached_then_freed(bm, T[:2]) == [0]
    assert cached_then_freed(bm, U[:2]) == [0]  # evicts T's block into slot 0
    assert bm.take_moves() == [save(0, 0)]
    blocks, _ = bm.match_prefix(T[:2], 2)
    assert blocks == [0]
    assert bm.take_moves() == [load(0, 0)]  # not [save(0, 0), load(0, 0)]
    assert bm.cached_prefix_tokens(U[:2], 2) == 0
    assert bm.match_prefix(U[:2], 2)[0] == []  # U was not kept anywhere


def test_host_tier_put_keeps_the_slot_asked_for() -> None:
    tier = _HostTier(2)
    assert tier.put(10) == 0 and tier.put(11) == 1
    assert tier.put(12, keep=10) == 1  # 10 is the LRU entry but kept: 11 gives up its slot
    assert tier.get(10) == 0 and tier.get(11) is None
    one = _HostTier(1)
    assert one.put(10) == 0
    assert one.put(11, keep=10) is None and one.get(10) == 0


def test_cp_moves_name_their_pool_and_each_pool_has_its_own_tier() -> None:
    bm = BlockManager(num_blocks=2, block_size=BS, cp_size=2, host_slots=2)
    table: list[int] = []
    bm.grow(table, 8)
    assert table == [0, 0, 1, 1]  # entry i in pool i % 2
    register(bm, table, T)
    bm.free(table)
    assert evictable(bm, 0) == [1, 0] and evictable(bm, 1) == [1, 0]
    bm.grow(table, 8)
    # two slots per pool hold all four blocks: slot 0 and 1 are used in each pool
    assert bm.take_moves() == [
        save(1, 0, pool=0),
        save(1, 0, pool=1),
        save(0, 1, pool=0),
        save(0, 1, pool=1),
    ]
    assert bm.num_saved_blocks == 4
    bm.free(table)
    blocks, _ = bm.match_prefix(T, 8)
    assert blocks == [0, 0, 1, 1]
    assert bm.take_moves() == [
        load(0, 1, pool=0),
        load(0, 1, pool=1),
        load(1, 0, pool=0),
        load(1, 0, pool=1),
    ]
    assert bm.num_host_hit_tokens == 8
    assert refs(bm, 0) == [1, 1] and refs(bm, 1) == [1, 1]


def test_no_host_tier_without_prefix_caching() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS, enable_prefix_caching=False, host_slots=8)
    assert bm.host_slots == 0
    cached_then_freed(bm, T)
    other: list[int] = []
    bm.grow(other, 8)
    assert bm.take_moves() == [] and bm.num_saved_blocks == 0
    bm.free(other)
    assert bm.match_prefix(T, 8)[0] == []
    assert bm.take_moves() == []


def test_step_plan_has_no_moves_by_default() -> None:
    assert StepPlan(step_id=0, seqs=[], finished_seq_ids=[]).kv_moves == []


# -- worker copies --------------------------------------------------------------------------

L, NB, H, HD, SLOTS = 2, 4, 3, 4, 3


def filled_cache(bits: int, seed: int = 0) -> KVCache:
    cache = KVCache(L, NB, BS, H, HD, torch.float32, torch.device("cpu"), scratch=True, bits=bits)
    g = torch.Generator().manual_seed(seed)
    if bits:
        cache.data.copy_(torch.randint(0, 256, cache.data.shape, generator=g, dtype=torch.uint8))
        assert cache.params is not None
        cache.params.copy_(torch.rand(cache.params.shape, generator=g))
    else:
        cache.data.copy_(torch.rand(cache.data.shape, generator=g))
    return cache


def block_of(cache: KVCache | HostKVTier, i: int) -> list[torch.Tensor]:
    """Block or slot i of every tensor (data, then params if any), cloned."""
    tensors = [cache.data] + ([] if cache.params is None else [cache.params])
    return [t[:, :, i].clone() for t in tensors]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("bits", [0, 8, 4])
def test_save_then_load_restores_data_and_params(bits: int) -> None:
    cache = filled_cache(bits)
    assert (cache.params is not None) == bool(bits)
    tier = HostKVTier(cache, SLOTS)
    orig = [block_of(cache, b) for b in range(NB)]
    assert len({tuple(t.flatten().tolist()) for t in (o[0] for o in orig)}) == NB  # distinct
    tier.apply(cache, [save(0, 2), save(1, 0), save(2, 1)])  # one batched run
    assert same(block_of(tier, 2), orig[0])
    assert same(block_of(tier, 0), orig[1])
    assert same(block_of(tier, 1), orig[2])
    assert same(block_of(cache, 0), orig[0])  # a save leaves the device block alone

    cache.data.zero_()
    if cache.params is not None:
        cache.params.zero_()
    tier.apply(cache, [load(3, 2), load(2, 0), load(0, 1)])
    assert same(block_of(cache, 3), orig[0])
    assert same(block_of(cache, 2), orig[1])
    assert same(block_of(cache, 0), orig[2])
    zero = [torch.zeros_like(t) for t in orig[0]]
    assert same(block_of(cache, 1), zero)  # untouched
    assert same(block_of(cache, NB), zero)  # the scratch block too


@pytest.mark.parametrize("bits", [0, 8])
def test_a_run_naming_a_slot_or_block_twice_goes_in_order(bits: int) -> None:
    cache = filled_cache(bits, seed=1)
    tier = HostKVTier(cache, SLOTS)
    orig = [block_of(cache, b) for b in range(NB)]
    tier.apply(cache, [save(0, 1), save(2, 1)])  # the second save wins
    assert same(block_of(tier, 1), orig[2])
    tier.apply(cache, [save(3, 0), load(3, 1), save(1, 2), load(1, 0)])
    # block 3 is saved before it is overwritten with slot 1 (block 2's content); block 1 is
    # saved to slot 2, then gets slot 0 (block 3's original content)
    assert same(block_of(tier, 0), orig[3])
    assert same(block_of(tier, 2), orig[1])
    assert same(block_of(cache, 3), orig[2])
    assert same(block_of(cache, 1), orig[3])
    tier.apply(cache, [load(0, 2), load(0, 0)])  # the same block twice: the last load wins
    assert same(block_of(cache, 0), orig[3])
    assert same(block_of(cache, 2), orig[2])  # never touched


def test_runs_are_batched_unless_they_repeat_a_block_or_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the CPU a batched copy with a repeated index happens to match the sequential one, so
    check the split itself (index_copy_ with repeated indices is undefined on CUDA)."""
    cache = filled_cache(8)
    tier = HostKVTier(cache, SLOTS)
    calls: list[list[KVMove]] = []
    copy = HostKVTier._copy

    def spy(self: HostKVTier, c: KVCache, moves: list[KVMove]) -> None:
        calls.append(list(moves))
        copy(self, c, moves)

    monkeypatch.setattr(HostKVTier, "_copy", spy)
    distinct = [save(0, 0), save(1, 1), load(2, 0), load(3, 1), save(2, 2)]
    tier.apply(cache, distinct)
    assert calls == [distinct[:2], distinct[2:4], distinct[4:]]
    calls.clear()
    same_slot, same_block = [save(0, 1), save(2, 1)], [load(3, 0), load(3, 2)]
    tier.apply(cache, same_slot + same_block)
    assert calls == [[m] for m in same_slot + same_block]


@pytest.mark.parametrize(
    "move",
    [save(-1, 0), save(NB, 0), save(0, SLOTS), load(NB, 0), load(0, -1), load(0, SLOTS)],
    ids=["neg-block", "scratch-block", "slot-past-end", "load-scratch", "neg-slot", "load-past"],
)
def test_moves_out_of_range_raise(move: KVMove) -> None:
    cache = filled_cache(0)
    tier = HostKVTier(cache, SLOTS)
    with pytest.raises(ValueError):
        tier.apply(cache, [move])
    with pytest.raises(ValueError):
        tier.apply(cache, [save(1, 1), move] if move.to_host else [load(1, 1), move])


@pytest.mark.parametrize(("bits", "want"), [(0, 1152), (8, 864), (4, 720)])
def test_nbytes(bits: int, want: int) -> None:
    cache = filled_cache(bits)
    tier = HostKVTier(cache, SLOTS)
    tensors = [tier.data] + ([] if tier.params is None else [tier.params])
    assert tier.nbytes == sum(t.numel() * t.element_size() for t in tensors) == want
    assert tier.nbytes == SLOTS * KVCache.block_bytes(L, BS, H, HD, torch.float32, bits)
    assert tier.data.shape[2] == SLOTS and tier.data.dtype == cache.data.dtype
