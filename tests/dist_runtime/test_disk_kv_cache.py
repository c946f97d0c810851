"""The prefix cache's disk tier (`cache.kv_cache_dir`): blocks written as they are computed come
back in a later process (and in the same one, after the device evicted them) instead of being
prefilled again, with the answers of a run without the tier; the directory is kept per model
and layout, bounded by its capacity, and files that are cut short or gone are never read as
K/V. Unit tests of the block manager's moves and of the worker's files come first."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_runtime import Runtime, SamplingParams
from dist_runtime.config import CacheConfig, ConfigError, SchedulerConfig
from dist_runtime.engine.block_manager import BlockManager
from dist_runtime.engine.kv_disk import InUse, TierDir, choose, prune, survey, trim_shared
from dist_runtime.protocol import DISK_DROP, DISK_LOAD, DISK_SAVE, KVMove
from launch import kv_cache_dir
from workers.kv_cache import DiskKVTier, KVCache

BS = 2
ROOT = 12345


def register(bm: BlockManager, table: list[int], tokens: Sequence[int]) -> list[int]:
    parent, hashes = bm.root_hash, []
    for i in range(len(tokens) // bm.block_size):
        parent = bm.register_block(i, table[i], parent, tokens[i * BS : (i + 1) * BS])
        hashes.append(parent)
    return hashes


def chain(hashes: Sequence[int], root: int = ROOT) -> list[tuple[int, int]]:
    """(digest, parent digest) pairs of a chain, as a listing gives them."""
    return list(zip(hashes, [root, *hashes[:-1]], strict=True))


def disk_bm(present: Sequence[tuple[int, int]] = (), capacity: int = 8, **kw: Any) -> BlockManager:
    return BlockManager(
        num_blocks=kw.pop("num_blocks", 6),
        block_size=BS,
        root=ROOT,
        disk_blocks=[list(present)],
        disk_capacity=capacity,
        **kw,
    )


def kinds(moves: list[KVMove]) -> list[tuple[int, int, str]]:
    return [(m.disk, m.block, m.key) for m in moves]


# -- block manager --------------------------------------------------------------------------------
def test_stable_hashes_are_the_same_in_every_manager_and_depend_on_the_root() -> None:
    """BLAKE2b digests, 128 bits: two managers with one root agree (so do two processes: no
    Python hash seed enters), another root or another token differs."""
    a, b, c = disk_bm(), disk_bm(), BlockManager(4, BS, root=ROOT + 1)
    assert a.block_hash(ROOT, [1, 2]) == b.block_hash(ROOT, [1, 2])
    assert a.block_hash(ROOT, [1, 2]).bit_length() > 64
    assert a.block_hash(ROOT, [1, 2]) != a.block_hash(ROOT, [1, 3])
    assert a.block_hash(a.root_hash, [1, 2]) != c.block_hash(c.root_hash, [1, 2])
    assert a.derive_root(ROOT, 1e6) == b.derive_root(ROOT, 1e6) != a.derive_root(ROOT, 2e6)
    plain = BlockManager(4, BS)
    assert not plain.stable and plain.block_hash(5, [1, 2]) == hash((5, (1, 2)))


def test_registered_blocks_are_saved_once_and_found_again_after_a_restart() -> None:
    bm = disk_bm()
    table: list[int] = []
    bm.grow(table, 6)
    hashes = register(bm, table, [1, 2, 3, 4, 5, 6])
    saves = bm.take_moves()
    assert kinds(saves) == [(DISK_SAVE, table[i], f"{h:032x}") for i, h in enumerate(hashes)]
    assert [m.parent for m in saves] == [f"{p:032x}" for _, p in chain(hashes)]
    register(bm, table, [1, 2, 3, 4, 5, 6])  # registered already: nothing more
    assert bm.take_moves() == [] and bm.num_disk_saved_blocks == 3
    # a new manager (a new process) that the workers tell what they have on disk
    again = disk_bm(present=chain(hashes))
    blocks, parent = again.match_prefix([1, 2, 3, 4, 5, 6, 7], 7)
    assert parent == hashes[-1] and len(blocks) == 3
    assert kinds(again.take_moves()) == [
        (DISK_LOAD, b, f"{h:032x}") for b, h in zip(blocks, hashes, strict=True)
    ]
    assert again.num_disk_hit_tokens == 6 and again.num_hit_tokens == 6
    # now on the device: a second lookup hits there and reads nothing
    again.free(list(blocks))
    more, _ = again.match_prefix([1, 2, 3, 4], 4)
    assert more == blocks[:2] and again.take_moves() == []


def test_a_lookup_stops_at_the_first_block_the_disk_lacks() -> None:
    bm = disk_bm(present=[])
    table: list[int] = []
    bm.grow(table, 6)
    hashes = register(bm, table, [1, 2, 3, 4, 5, 6])
    bm.take_moves()
    fresh = disk_bm(present=[chain(hashes)[0], chain(hashes)[2]])  # the middle one is gone
    blocks, parent = fresh.match_prefix([1, 2, 3, 4, 5, 6], 6)
    assert len(blocks) == 1 and parent == hashes[0]


def saved(bm: BlockManager, tokens: Sequence[int]) -> list[int]:
    """Register a prompt's blocks and free them (their saves taken); their hashes."""
    table: list[int] = []
    bm.grow(table, len(tokens))
    hashes = register(bm, table, tokens)
    bm.free(table)
    return hashes


def test_past_capacity_a_chain_loses_its_tail_first() -> None:
    """Capacity 4: document A's three blocks, then B's: each of B's blocks takes the place of
    A's last block (a leaf), never A's head, so A stays a readable prefix; the least recently
    used document goes first, and a device hit counts as a use."""
    bm = disk_bm(capacity=4, num_blocks=12)
    a = saved(bm, [1, 2, 3, 4, 5, 6])
    c = saved(bm, [7, 7])  # one block, used after A
    bm.take_moves()
    b = saved(bm, [9, 9, 8, 8])
    moves = bm.take_moves()
    assert [(m.disk, m.key) for m in moves] == [
        (DISK_DROP, f"{a[2]:032x}"),
        (DISK_SAVE, f"{b[0]:032x}"),
        (DISK_DROP, f"{a[1]:032x}"),
        (DISK_SAVE, f"{b[1]:032x}"),
    ]
    assert bm.num_disk_blocks == 4
    hit, _ = bm.match_prefix([1, 2], 2)  # A's head, on the device: used now
    bm.free(hit)
    saved(bm, [5, 5])
    assert [(m.disk, m.key) for m in bm.take_moves()][0] == (DISK_DROP, f"{c[0]:032x}")


@pytest.mark.parametrize("order", ["reversed", "shuffled"])
def test_a_listing_in_any_order_still_loses_tails_first(order: str) -> None:
    """A listing comes by time of use and pool by pool, not in chain order: a chain of six
    listed in any order is evicted from its tail, and forgetting a middle block (a read that
    failed its check) leaves the index whole."""
    bm = disk_bm(num_blocks=8)
    hashes = saved(bm, list(range(1, 13)))
    bm.take_moves()
    pairs = chain(hashes)
    listed = pairs[::-1] if order == "reversed" else [pairs[i] for i in (3, 0, 5, 1, 4, 2)]
    tier_bm = disk_bm(present=listed, capacity=8, num_blocks=8)
    tier = tier_bm._pools[0].disk
    assert tier is not None and list(tier.leaves) == [hashes[-1]]
    tier_bm.forget([move(DISK_LOAD, 0, f"{hashes[2]:032x}")])  # no KeyError
    assert set(tier.leaves) == {hashes[1], hashes[-1]}
    evicted = []
    while (victim := tier.victim()) is not None:
        evicted.append(victim)
        tier.remove(victim)
    assert evicted.index(hashes[1]) < evicted.index(hashes[0])
    assert len(evicted) == 5
    assert [h for h in evicted if h in hashes[3:]] == hashes[3:][::-1]  # tail first


def test_a_chain_longer_than_the_tier_keeps_its_head() -> None:
    """A tier full of one document's blocks does not write its later ones (dropping its own
    tail to make room would leave neither readable)."""
    bm = disk_bm(capacity=3, num_blocks=8)
    hashes = saved(bm, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    moves = bm.take_moves()
    assert [(m.disk, m.key) for m in moves] == [(DISK_SAVE, f"{h:032x}") for h in hashes[:3]]
    fresh = disk_bm(present=chain(hashes[:3]), capacity=3, num_blocks=8)
    blocks, _ = fresh.match_prefix(list(range(1, 11)), 10)
    assert len(blocks) == 3


def test_match_more_reads_a_share_and_says_when_more_waits() -> None:
    """At most `max_loads` blocks read per call; `paused` when the next block is in a tier,
    so the caller goes on from where it stopped; a device hit costs no read."""
    bm = disk_bm(num_blocks=8)
    tokens = list(range(1, 13))
    table: list[int] = []
    bm.grow(table, 12)
    hashes = register(bm, table, tokens)
    fresh = disk_bm(present=chain(hashes), num_blocks=8)
    got, parent, paused = fresh.match_more(tokens, 12, fresh.root_hash, 0, max_loads=2)
    assert len(got) == 2 and paused and parent == hashes[1]
    more, parent, paused = fresh.match_more(tokens, 12, parent, 2, max_loads=2)
    assert len(more) == 2 and paused and parent == hashes[3]
    rest, parent, paused = fresh.match_more(tokens, 12, parent, 4, max_loads=2)
    assert len(rest) == 2 and not paused and parent == hashes[5]
    assert [m.disk for m in fresh.take_moves()] == [DISK_LOAD] * 6
    assert fresh.num_queried_tokens == 12 and fresh.num_disk_hit_tokens == 12
    fresh.free(got + more + rest)
    again, _, paused = fresh.match_more(tokens, 12, fresh.root_hash, 0, max_loads=0)
    assert len(again) == 6 and not paused  # all on the device now


def test_blocks_past_a_lowered_capacity_are_dropped_tail_first() -> None:
    """Listed blocks over the capacity: the least recently used chain loses its tail."""
    older, newer = [11, 12, 13], [21, 22]
    bm = disk_bm(present=chain(older) + chain(newer), capacity=3)
    assert bm.num_disk_blocks == 3
    assert [(m.disk, m.key) for m in bm.take_moves()] == [
        (DISK_DROP, f"{13:032x}"),
        (DISK_DROP, f"{12:032x}"),
    ]


def test_a_block_whose_files_went_is_a_miss_and_the_others_copies_go_too() -> None:
    gone = {7}
    bm = disk_bm(
        present=[(5, ROOT), (7, ROOT), (9, ROOT)], disk_check=lambda pool, h, p: h not in gone
    )
    assert bm._pools[0].load_from_disk(5, ROOT, first=True) is not None
    assert bm._pools[0].load_from_disk(7, ROOT, first=True) is None
    moves = bm.take_moves()
    assert [m.disk for m in moves] == [DISK_LOAD, DISK_DROP] and moves[1].key == f"{7:032x}"
    assert bm.num_disk_blocks == 2


def test_blocks_another_runtime_wrote_since_the_listing_are_found_and_indexed() -> None:
    """A block missing from the index whose files are on disk (another runtime on the
    directory wrote it after this one started) is read and indexed at its lookup, a share at a
    time as for listed ones; a full index deletes a leaf for it, never the parent the lookup
    just used (then it is a miss, as a save of it would not be written); a block whose files
    are not there, or that this runtime is deleting, is a miss."""
    writer = disk_bm(num_blocks=8)
    tokens = list(range(1, 13))
    theirs = saved(writer, tokens)  # written by the other runtime
    on_disk = set(chain(theirs))
    mine = [31, 32]
    bm = disk_bm(
        present=chain(mine), capacity=4, num_blocks=8,
        disk_check=lambda pool, h, p: (h, p) in on_disk or h in mine,
    )  # fmt: skip
    got, parent, paused = bm.match_more(tokens, 12, bm.root_hash, 0, max_loads=2)
    assert len(got) == 2 and paused and parent == theirs[1]  # the next one is there too
    rest, parent, paused = bm.match_more(tokens, 12, parent, 2, max_loads=None)
    assert len(got + rest) == 4 and parent == theirs[3] and not paused
    moves = bm.take_moves()
    loads = [m.key for m in moves if m.disk == DISK_LOAD]
    assert loads == [f"{h:032x}" for h in theirs[:4]]
    # room for 4: the listed chain went, tail first; the fifth block's only room was its
    # parent's
    drops = [m.key for m in moves if m.disk == DISK_DROP]
    assert drops == [f"{32:032x}", f"{31:032x}"]
    assert bm.num_disk_adopted_blocks == 4 and bm.num_disk_blocks == 4
    assert bm.num_disk_hit_tokens == 8
    bm.free(got + rest)
    missing, _ = bm.match_prefix([7, 7, 8, 8], 4)  # nothing on disk: a miss
    assert missing == [] and bm.num_disk_adopted_blocks == 4
    # 31 is being deleted (its drop queued): its file, still there, is not taken back
    assert bm._pools[0].load_from_disk(31, ROOT, first=True) is None
    assert not bm._pools[0].holds(31, ROOT) and bm.take_moves() == []


def test_a_failed_step_forgets_the_blocks_its_moves_name() -> None:
    """Loads (host and disk) whose step failed leave no hash behind, so a later prompt
    computes those blocks; a disk digest read in it leaves the index; a host slot a save filled
    is freed."""
    bm = BlockManager(
        num_blocks=4, block_size=BS, host_slots=2, root=ROOT, disk_blocks=[[]], disk_capacity=8
    )
    tokens = [1, 2, 3, 4, 5, 6, 7, 8]
    table: list[int] = []
    bm.grow(table, 8)
    register(bm, table, tokens)
    bm.free(table)
    bm.take_moves()  # the disk saves
    other: list[int] = []
    bm.grow(other, 4)  # evicts the last two cached blocks into the host tier
    saves = bm.take_moves()
    assert [(m.disk, m.to_host) for m in saves] == [(0, True), (0, True)]
    bm.free(other)
    blocks, _ = bm.match_prefix(tokens, 8)  # two on the device, two loaded from the host
    loads = bm.take_moves()
    assert [(m.disk, m.to_host) for m in loads] == [(0, False), (0, False)]
    bm.forget(saves + loads)
    bm.free(blocks)
    assert bm.cached_prefix_tokens(tokens, 8) == 4  # only the two the step did not touch
    assert not bm._pools[0].host.by_hash  # type: ignore[union-attr]
    assert bm.num_disk_blocks == 4
    blocks, _ = bm.match_prefix(tokens, 8)  # now the last two come from disk
    reads = bm.take_moves()
    assert [m.disk for m in reads] == [DISK_LOAD, DISK_LOAD]
    kept = blocks[:2]
    bm.forget(reads)
    bm.free(blocks)
    assert bm.cached_prefix_tokens(tokens, 8) == 4 and bm.num_disk_blocks == 2
    assert bm.match_prefix(tokens, 8)[0] == kept and bm.take_moves() == []


def test_disk_tier_needs_a_stable_root_and_a_listing_per_pool() -> None:
    with pytest.raises(ValueError, match="a disk tier needs a fixed hash root"):
        BlockManager(4, BS, disk_blocks=[[]], disk_capacity=4)
    with pytest.raises(ValueError, match="a disk tier needs a fixed hash root"):
        BlockManager(4, BS, root=ROOT, cp_size=2, disk_blocks=[[]], disk_capacity=4)


# -- the worker's files ---------------------------------------------------------------------------
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    ),
]


def small_cache(bits: int = 0, num_blocks: int = 4, device: str = "cpu") -> KVCache:
    cache = KVCache(2, num_blocks, 4, 2, 8, torch.bfloat16, torch.device(device), bits=bits)
    cache.data.copy_(torch.randint(0, 200, cache.data.shape).to(cache.data.dtype))
    if cache.params is not None:
        cache.params.copy_(torch.randn(cache.params.shape))
    return cache


P = "0" * 32
"""The parent digest these files' blocks are saved under."""


def move(kind: int, block: int, key: str) -> KVMove:
    parent = P if kind == DISK_SAVE else ""
    return KVMove(pool=0, block=block, slot=0, to_host=False, disk=kind, key=key, parent=parent)


def name(key: str) -> str:
    return f"{key}-{P}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [0, 8, 4])
def test_files_round_trip_before_and_after_they_are_written(
    tmp_path: Path, bits: int, device: str
) -> None:
    cache = small_cache(bits, device=device)
    want = cache.data[:, :, 1].clone()
    want_params = None if cache.params is None else cache.params[:, :, 1].clone()
    tier = DiskKVTier(cache, tmp_path)
    key = "ab" * 16
    tier.apply(cache, [move(DISK_SAVE, 1, key), move(DISK_LOAD, 2, key)])  # maybe still queued
    assert torch.equal(cache.data[:, :, 2], want)
    tier.flush()
    assert tier.listing() == [name(key)] and tier.num_written == 1
    assert (tmp_path / f"{name(key)}.kv").stat().st_size == tier.file_bytes
    fresh = small_cache(bits, device=device)
    DiskKVTier(fresh, tmp_path).apply(fresh, [move(DISK_LOAD, 3, key)])  # from the file
    assert torch.equal(fresh.data[:, :, 3], want)
    if want_params is not None:
        assert fresh.params is not None and torch.equal(fresh.params[:, :, 3], want_params)
    tier.apply(cache, [move(DISK_DROP, 0, key)])
    tier.flush()
    assert tier.listing() == [] and not (tmp_path / f"{name(key)}.kv").exists()


@pytest.mark.parametrize("device", DEVICES)
def test_a_run_of_saves_longer_than_the_queue_is_gathered_in_pieces(
    tmp_path: Path, device: str
) -> None:
    """Six saves through a two-entry queue (then loads and a drop in the same plan, in order):
    every block's file holds that block."""
    cache = small_cache(num_blocks=8, device=device)
    want = [cache.data[:, :, b].clone() for b in range(6)]
    tier = DiskKVTier(cache, tmp_path, max_pending=2)
    keys = [f"{b:032x}" for b in range(6)]
    tier.apply(
        cache,
        [move(DISK_SAVE, b, keys[b]) for b in range(6)]
        + [move(DISK_LOAD, 6, keys[4]), move(DISK_DROP, 0, keys[5]), move(DISK_LOAD, 7, keys[1])],
    )
    assert torch.equal(cache.data[:, :, 6], want[4]) and torch.equal(cache.data[:, :, 7], want[1])
    tier.flush()
    assert sorted(tier.listing()) == [name(k) for k in keys[:5]]
    fresh = small_cache(num_blocks=8, device=device)
    DiskKVTier(fresh, tmp_path).apply(fresh, [move(DISK_LOAD, b, keys[b]) for b in range(5)])
    for b in range(5):
        assert torch.equal(fresh.data[:, :, b], want[b])


def test_files_of_another_size_are_deleted_when_listed(tmp_path: Path) -> None:
    cache = small_cache()
    tier = DiskKVTier(cache, tmp_path)
    a, b, c = "a" * 32, "b" * 32, "c" * 32
    tier.apply(cache, [move(DISK_SAVE, 0, a), move(DISK_SAVE, 1, b)])
    tier.flush()
    os.utime(tmp_path / f"{name(a)}.kv", ns=(1, 2))  # the oldest
    with open(tmp_path / f"{name(b)}.kv", "r+b") as f:
        f.truncate(100)  # a write cut short
    (tmp_path / f"{c}.123.tmp").write_bytes(b"x")
    os.utime(tmp_path / f"{c}.123.tmp", (1, 1))  # a crash's leftover, not a write under way
    (tmp_path / f"{a}.456.tmp").write_bytes(b"y")  # another runtime's write under way
    again = DiskKVTier(cache, tmp_path)
    assert again.listing() == [name(a)]
    assert not (tmp_path / f"{name(b)}.kv").exists()
    assert not (tmp_path / f"{c}.123.tmp").exists()  # leftovers of a crash are removed
    assert (tmp_path / f"{a}.456.tmp").exists()
    before = (tmp_path / f"{name(a)}.kv").stat().st_mtime_ns
    assert again.apply(cache, [move(DISK_LOAD, 3, a)]) == []
    assert (tmp_path / f"{name(a)}.kv").stat().st_mtime_ns > before  # a read refreshes it


@pytest.mark.parametrize("bits", [0, 4])
def test_a_read_that_fails_its_check_is_reported_not_copied(tmp_path: Path, bits: int) -> None:
    """One flipped bit anywhere in a file (payload, params, header), a file cut short or grown
    after the listing, or a file gone: `apply` names those loads, leaves their blocks alone and
    deletes their files; the good loads of the same run (read by several threads) land."""
    cache = small_cache(bits, num_blocks=12)
    tier = DiskKVTier(cache, tmp_path)
    keys = [f"{i:032x}" for i in range(8)]
    tier.apply(cache, [move(DISK_SAVE, i, k) for i, k in enumerate(keys)])
    tier.flush()
    path = [tmp_path / f"{name(k)}.kv" for k in keys]
    size = tier.file_bytes
    flips = {1: size - 1, 2: tier.HEADER.size + 5, 3: 9}  # last byte, first payload, a size
    for i, at in flips.items():
        raw = bytearray(path[i].read_bytes())
        raw[at] ^= 0x10
        path[i].write_bytes(bytes(raw))
    with open(path[4], "r+b") as f:
        f.truncate(size - 8)
    with open(path[5], "ab") as f:
        f.write(b"\0")
    path[6].unlink()
    fresh = small_cache(bits, num_blocks=12)
    fresh.data.zero_()
    loads = [move(DISK_LOAD, 4 + i, k) for i, k in enumerate(keys)]
    assert DiskKVTier(fresh, tmp_path).apply(fresh, [move(DISK_DROP, 0, "f" * 32), *loads]) == [
        2,
        3,
        4,
        5,
        6,
        7,
    ]
    for i in range(8):
        got = fresh.data[:, :, 4 + i]
        if i in (0, 7):
            assert torch.equal(got, cache.data[:, :, i])
        else:
            assert not got.any()  # left alone
    for i in range(8):
        assert path[i].exists() == (i in (0, 7))
    if bits:
        assert fresh.params is not None and cache.params is not None
        assert torch.equal(fresh.params[:, :, 4], cache.params[:, :, 0])


def test_a_full_disk_pauses_writes_and_errors_are_not_logged_per_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A write that finds the disk full leaves no temporary file and pauses writes (the next
    saves are not tried, one message); other errors log once a minute with a count."""
    import workers.kv_cache as kv_module

    cache = small_cache(num_blocks=8)
    tier = DiskKVTier(cache, tmp_path)
    tries: list[str] = []

    def full(src: Any, dst: Any) -> None:
        tries.append(str(dst))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(kv_module.os, "replace", full)
    keys = [f"{i:032x}" for i in range(8)]
    with caplog.at_level("ERROR", logger="workers.kv_cache"):
        tier.apply(cache, [move(DISK_SAVE, i, keys[i]) for i in range(4)])
        tier.flush()
    assert len(tries) == 1 and tier.num_failed == 4 and tier.num_written == 0
    left = [f.name for f in tmp_path.iterdir()]
    assert left == ["worker.seen"]  # the cut temporary file went too
    assert [r.message.count("is full") for r in caplog.records] == [1]
    caplog.clear()
    tier._full_until = 0.0  # the pause is over; now the directory refuses writes

    def refused(src: Any, dst: Any) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(kv_module.os, "replace", refused)
    with caplog.at_level("ERROR", logger="workers.kv_cache"):
        tier.apply(cache, [move(DISK_SAVE, i, keys[i]) for i in range(4, 8)])
        tier.flush()
    assert tier.num_failed == 8 and len(caplog.records) == 1
    assert "Permission denied" in caplog.records[0].message


# -- end to end -----------------------------------------------------------------------------------
PARAMS = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1)


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(4, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


DOC = _tokens(120, 1)


def _ask(folder: Path, kv_dir: Path | None, docs: Sequence[list[int]], **kw: Any) -> dict[str, Any]:
    cache = CacheConfig(
        block_size=4,
        num_blocks=kw.pop("num_blocks", 70) // kw.get("cp", 1),
        kv_cache_dir=None if kv_dir is None else str(kv_dir),
        quant_policy=kw.pop("bits", 0),
        disk_kv_cache_gb=kw.pop("disk_gb", 1.0),
    )
    with Runtime(
        model=str(folder), device="cpu", dtype="float32", session_len=256, cache=cache, **kw
    ) as rt:
        outs = [rt.generate([doc], PARAMS)[0] for doc in docs]
        stats = rt.engine.stats()
    return {"outs": outs, "stats": stats}


def _same(got: list[Any], want: list[Any]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        assert [x.logprob for x in g.logprobs] == pytest.approx(
            [x.logprob for x in w.logprobs], abs=1e-5
        )


def _in_three_threads(caller: Callable[[list[int]], None], items: list[int]) -> None:
    """caller(a third of `items`) on each of three threads at once; returns when all end."""
    threads = [threading.Thread(target=caller, args=(items[k::3],)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _files(kv_dir: Path) -> list[Path]:
    return sorted(kv_dir.glob("*/*/*.kv"))


@pytest.mark.parametrize("bits", [0, 8])
def test_a_document_comes_back_from_disk_in_a_new_process(
    tiny_llama_dir: Path, tmp_path: Path, bits: int
) -> None:
    plain = _ask(tiny_llama_dir, None, [DOC + [7]], bits=bits)
    first = _ask(tiny_llama_dir, tmp_path, [DOC + [7]], bits=bits)
    # every block computed is on disk, the last step's too (121 + 7 tokens through the model)
    assert len(_files(tmp_path)) == 32
    again = _ask(tiny_llama_dir, tmp_path, [DOC + [9]], bits=bits)
    _same(first["outs"], plain["outs"])
    assert again["stats"]["prefix_cache_disk_hit_tokens"] == len(DOC)
    assert again["stats"]["num_prompt_tokens_computed"] == 1
    assert again["outs"][0].num_cached_tokens == len(DOC)
    other = _ask(tiny_llama_dir, None, [DOC + [9]], bits=bits)
    _same(again["outs"], other["outs"])


def test_evicted_blocks_come_back_from_disk_in_the_same_process(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """A 70-block device cache and no host tier: three other documents push DOC out, and the
    fourth question about it reads it back from disk."""
    docs = [DOC + [7], *(_tokens(120, s) for s in (2, 3, 4)), DOC + [9]]
    plain = _ask(tiny_llama_dir, None, docs)
    disk = _ask(tiny_llama_dir, tmp_path, docs)
    _same(disk["outs"], plain["outs"])
    assert disk["stats"]["prefix_cache_disk_hit_tokens"] == len(DOC)
    assert plain["stats"]["num_prompt_tokens_computed"] - disk["stats"][
        "num_prompt_tokens_computed"
    ] == len(DOC)


def test_each_model_and_layout_has_its_own_directory(
    tiny_llama_dir: Path, tiny_internlm2_dir: Path, tmp_path: Path
) -> None:
    """Another checkpoint, block size or KV quantization never reads these blocks."""
    _ask(tiny_llama_dir, tmp_path, [DOC + [7]])
    for folder, kw in [(tiny_internlm2_dir, {}), (tiny_llama_dir, {"bits": 4})]:
        run = _ask(folder, tmp_path, [DOC + [7]], **kw)
        assert run["stats"]["prefix_cache_disk_hit_tokens"] == 0
    cards = sorted(tmp_path.glob("*/fingerprint.json"))
    assert len(cards) == 3
    assert (tmp_path / "weights.json").exists()


def test_a_cut_file_is_recomputed_not_read(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A block file cut short (a crash mid-write that still renamed it, a full disk) is left
    out when the directory is read, so the prefix is found up to it and the rest computed."""
    plain = _ask(tiny_llama_dir, None, [DOC + [7]])
    _ask(tiny_llama_dir, tmp_path, [DOC + [7]])
    files = sorted(_files(tmp_path), key=lambda p: p.stat().st_mtime_ns)
    with open(files[10], "r+b") as f:  # the 11th block written: tokens 40-43
        f.truncate(64)
    again = _ask(tiny_llama_dir, tmp_path, [DOC + [7]])
    _same(again["outs"], plain["outs"])
    assert again["stats"]["prefix_cache_disk_hit_tokens"] == 40
    assert files[10].stat().st_size == files[0].stat().st_size  # deleted when listed, rewritten


@contextlib.contextmanager
def _doc_on_disk_only(folder: Path, kv_dir: Path) -> Iterator[tuple[Runtime, Path]]:
    """A runtime that wrote DOC's blocks to disk, then pushed them off its device cache with
    three other documents; and the file of DOC's fourth block."""
    cache = CacheConfig(block_size=4, num_blocks=70, kv_cache_dir=str(kv_dir))
    with Runtime(
        model=str(folder), device="cpu", dtype="float32", session_len=256, cache=cache
    ) as rt:
        for doc in [DOC + [7], *(_tokens(120, s) for s in (2, 3, 4))]:
            rt.generate([doc], PARAMS)
        rt.engine.wait_idle(10)
        yield rt, sorted(_files(kv_dir), key=lambda p: p.stat().st_mtime_ns)[3]


def test_a_file_deleted_while_running_is_computed_again(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """The driver checks a block's files before it queues their read: one deleted by hand
    since the start is a miss, and the answer is the one a run without the tier gives."""
    plain = _ask(tiny_llama_dir, None, [DOC + [7]])
    with _doc_on_disk_only(tiny_llama_dir, tmp_path) as (rt, fourth):
        fourth.unlink()
        again = rt.generate([DOC + [7]], PARAMS)[0]
        stats = rt.engine.stats()
    _same([again], plain["outs"])
    assert stats["prefix_cache_disk_hit_tokens"] == 12


def test_a_file_damaged_while_running_is_computed_again(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """A file that is there but fails its check when read (one flipped bit): the step that
    read it runs on no worker, the request finds its prefix up to the block before and
    computes the rest, with the answer of a run without the tier; the block is written again,
    whole."""
    plain = _ask(tiny_llama_dir, None, [DOC + [7]])
    with _doc_on_disk_only(tiny_llama_dir, tmp_path) as (rt, target):
        raw = bytearray(target.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        target.write_bytes(bytes(raw))
        again = rt.generate([DOC + [7]], PARAMS)[0]
        rt.engine.wait_idle(10)
        stats = rt.engine.stats()
        rewritten = target.read_bytes()
    _same([again], plain["outs"])
    assert stats["disk_kv_unread_blocks"] == 1
    assert stats["prefix_cache_disk_hit_tokens"] == len(DOC) - 4  # read, all but that one
    assert again.num_cached_tokens == 12  # the three blocks before it
    assert len(rewritten) == len(raw) and rewritten != bytes(raw)
    assert _ask(tiny_llama_dir, tmp_path, [DOC + [9]])["stats"]["prefix_cache_disk_hit_tokens"] == (
        len(DOC)
    )


def test_a_long_prefix_is_read_a_share_per_step_between_decodes(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """With a 16-token step budget a step reads at most 2 x 16 tokens (8 blocks) of prefix
    back from disk: the document's 30 blocks come over four steps, another request decodes in
    the same steps, and both answers are those of runs without the tier."""
    short = _tokens(6, 11)
    plain = _ask(tiny_llama_dir, None, [short, DOC + [7]])
    _ask(tiny_llama_dir, tmp_path, [DOC + [7]])
    cache = CacheConfig(block_size=4, num_blocks=70, kv_cache_dir=str(tmp_path))
    with Runtime(
        model=str(tiny_llama_dir),
        device="cpu",
        dtype="float32",
        session_len=256,
        cache=cache,
        scheduler=SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=4),
    ) as rt:
        executor = rt.engine.executor
        assert executor is not None
        plans: list[Any] = []
        run = executor.execute

        def spy(plan: Any) -> Any:
            plans.append(plan)
            return run(plan)

        executor.execute = spy  # type: ignore[method-assign]
        both = rt.generate([short, DOC + [7]], PARAMS)
        stats = rt.engine.stats()
    reads = [sum(m.disk == DISK_LOAD for m in p.kv_moves) for p in plans]
    assert sum(reads) == 30 and max(reads) <= 8 and sum(r > 0 for r in reads) >= 4
    assert any(r and p.seqs for r, p in zip(reads, plans, strict=True))  # beside a decode
    assert stats["prefix_cache_disk_hit_tokens"] == len(DOC)
    _same(both, plain["outs"])


def test_a_read_failing_while_nothing_else_runs_is_planned_again(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """A lone request reads its prefix back 8 blocks a step (no sequence in those steps); the
    11th block's file is damaged, so the second read fails with nothing else running: the
    request starts again from the 10 blocks read, instead of the engine failing it as if the
    cache were too small."""
    plain = _ask(tiny_llama_dir, None, [DOC + [7]])
    _ask(tiny_llama_dir, tmp_path, [DOC + [7]])
    names = [f.stem for f in _files(tmp_path)]
    eleventh = _longest_chain(names)[10]
    (target,) = tmp_path.glob(f"*/*/{eleventh}-*.kv")
    raw = bytearray(target.read_bytes())
    raw[-3] ^= 0x40
    target.write_bytes(bytes(raw))
    run = _ask(
        tiny_llama_dir,
        tmp_path,
        [DOC + [7]],
        scheduler=SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=4),
    )
    _same(run["outs"], plain["outs"])
    assert run["stats"]["disk_kv_unread_blocks"] == 1
    assert run["outs"][0].num_cached_tokens == 40


def test_the_directory_stays_within_its_capacity(tiny_llama_dir: Path, tmp_path: Path) -> None:
    block_file = 2 * 2 * 4 * 4 * 8 * 4 + 32  # K and V, 2 layers, 4 tokens, 4 KV heads, 8, fp32
    gb = 20 * block_file / 2**30  # room for 20 blocks
    run = _ask(tiny_llama_dir, tmp_path, [DOC + [7], _tokens(120, 5)], disk_gb=gb)
    assert run["stats"]["disk_kv_blocks"] == 20
    assert len(_files(tmp_path)) == 20
    with pytest.raises(ConfigError, match="holds no KV block of this model"):
        _ask(tiny_llama_dir, tmp_path, [DOC], disk_gb=block_file / 2 / 2**30)


def test_disk_tier_needs_the_prefix_cache() -> None:
    with pytest.raises(ConfigError, match="enable_prefix_caching is false"):
        CacheConfig(kv_cache_dir="/tmp/x", enable_prefix_caching=False)
    with pytest.raises(ConfigError, match="disk_kv_cache_gb must be a number of GiB > 0"):
        CacheConfig(kv_cache_dir="/tmp/x", disk_kv_cache_gb=0)


def test_a_capacity_lowered_at_restart_keeps_the_head_of_a_document(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """32 blocks on disk, then a restart with room for 10: the document's tail goes, its first
    10 blocks stay and are read (40 tokens), and its later blocks are not written over them."""
    block_file = 2 * 2 * 4 * 4 * 8 * 4 + 32
    plain = _ask(tiny_llama_dir, None, [DOC + [7]])
    _ask(tiny_llama_dir, tmp_path, [DOC + [7]])
    assert len(_files(tmp_path)) == 32
    head = sorted(_files(tmp_path), key=lambda p: p.stat().st_mtime_ns)[:10]
    run = _ask(tiny_llama_dir, tmp_path, [DOC + [7]], disk_gb=10 * block_file / 2**30)
    _same(run["outs"], plain["outs"])
    assert run["stats"]["prefix_cache_disk_hit_tokens"] == 40
    assert run["stats"]["disk_kv_blocks"] == 10
    assert sorted(_files(tmp_path)) == sorted(head)


def _longest_chain(names: list[str]) -> list[str]:
    """The digests of the longest chain among block file names (`<digest>-<parent>`), first
    block first."""
    parent = dict(n.split("-") for n in names)
    longest: list[str] = []
    for leaf in set(parent) - set(parent.values()):
        chain = [leaf]
        while chain[-1] in parent and parent[chain[-1]] in parent:
            chain.append(parent[chain[-1]])
        longest = max(longest, chain[::-1], key=len)
    return longest


@pytest.mark.parametrize(
    ("tp", "cp"),
    # (one mesh over Ray by default, the in-process tests cover the tier itself; -m slow)
    [pytest.param(2, 1, marks=pytest.mark.slow), (1, 2)],
)
def test_disk_tier_over_ray(
    ray_cluster: Any, tiny_llama_dir: Path, tmp_path: Path, tp: int, cp: int
) -> None:
    """Each worker writes its own heads (tp) or stripe of blocks (cp); the workers' queued
    writes are flushed before they stop, and a new worker group reads them back."""
    plain = _ask(tiny_llama_dir, None, [DOC + [7]])
    _ask(tiny_llama_dir, tmp_path, [DOC + [7]], tp=tp, cp=cp)
    workers = sorted(tmp_path.glob("*/tp*-cp*"))
    assert len(workers) == tp * cp
    # one worker lost the write of one block minutes ago: the others' copies of it are
    # deleted at start, and the document is found up to that block; another block some
    # workers have, written seconds ago, may be another runtime's write under way: kept
    written = sorted(workers[-1].glob("*.kv"), key=lambda p: p.stat().st_mtime_ns)
    lost, young = written[5], written[8]
    lost.unlink()
    young.unlink()
    for w in workers:
        if (w / lost.name).exists():
            os.utime(w / lost.name, (time.time() - 600,) * 2)
    _ask(tiny_llama_dir, tmp_path, [_tokens(8, 9)], tp=tp, cp=cp)  # another prompt
    assert not any((w / lost.name).exists() for w in workers)
    assert sum((w / young.name).exists() for w in workers) == len(workers) // cp - 1
    again = _ask(tiny_llama_dir, tmp_path, [DOC + [7]], tp=tp, cp=cp)
    _same(again["outs"], plain["outs"])
    assert 0 < again["stats"]["prefix_cache_disk_hit_tokens"] < len(DOC)
    third = _ask(tiny_llama_dir, tmp_path, [DOC + [7]], tp=tp, cp=cp)
    _same(third["outs"], plain["outs"])
    assert third["stats"]["prefix_cache_disk_hit_tokens"] == len(DOC)  # written again
    # one worker's file of a block is damaged: that worker's failed check stops the step on
    # every worker (else its peers would wait in a collective), and the block is computed again
    fourth_block = _longest_chain([f.stem for w in workers for f in w.glob("*.kv")])[3]
    damaged = next(f for w in workers[::-1] for f in w.glob(f"{fourth_block}-*.kv"))
    raw = bytearray(damaged.read_bytes())
    raw[-1] ^= 0x01
    damaged.write_bytes(bytes(raw))
    fourth = _ask(tiny_llama_dir, tmp_path, [DOC + [7]], tp=tp, cp=cp)
    _same(fourth["outs"], plain["outs"])
    assert fourth["stats"]["disk_kv_unread_blocks"] == 1
    assert fourth["outs"][0].num_cached_tokens < len(DOC)


_CROWD = (
    [(s, h) for s in range(int(os.environ["DISK_CROWD_SEEDS"])) for h in (0, 24)]
    if "DISK_CROWD_SEEDS" in os.environ
    else [(14, 0), (3, 24)]
)


@pytest.mark.parametrize(("seed", "host_slots"), _CROWD)
def test_a_crowd_reading_damaged_files_gets_the_answers_of_no_tier(
    tiny_llama_dir: Path, tmp_path: Path, seed: int, host_slots: int
) -> None:
    """Documents written to disk by one runtime, a fifth of their files then damaged (bits
    flipped, cut short); a new runtime with a tight device cache and a small step budget (reads
    spread over steps, shared blocks, evictions) answers a crowd of questions about them from
    three threads, with more files damaged between its rounds: every answer is the one a
    runtime without the tier gives, the damaged blocks were caught, and every block comes back.
    With `host_slots`, a host tier of that many blocks between the device and the disk. Seed 14
    has a retried read fail again while nothing else ran (the engine then failed every request
    as if the cache were too small). Offline: `DISK_CROWD_SEEDS=200 pytest -k crowd_reading`
    (200 seeds clean, with and without the host tier)."""
    rng = random.Random(seed)
    docs = [_tokens(rng.randint(40, 110), 60 + d) for d in range(4)]
    asks = [rng.choice(docs) + _tokens(rng.randint(1, 6), 200 + i) for i in range(12)]
    params = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    host_gb = host_slots * 2 * 2 * 4 * 4 * 8 * 4 / 2**30
    cache = CacheConfig(block_size=4, num_blocks=70, kv_cache_dir=str(tmp_path),
                        host_kv_cache_gb=host_gb)  # fmt: skip
    kw: dict[str, Any] = {"model": str(tiny_llama_dir), "device": "cpu", "dtype": "float32",
                          "session_len": 256}  # fmt: skip
    with Runtime(**kw, cache=CacheConfig(block_size=4, num_blocks=70)) as plain:
        want = [plain.generate([a], params)[0].token_ids for a in asks]
    with Runtime(**kw, cache=cache) as first:
        first.generate([d + [1] for d in docs], params)

    def damage(share: float) -> int:
        files = _files(tmp_path)
        hit = rng.sample(files, max(1, int(len(files) * share)))
        for path in hit:
            raw = bytearray(path.read_bytes())
            if rng.random() < 0.2:
                raw = raw[: rng.randrange(len(raw))]
            else:
                raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
            path.write_bytes(bytes(raw))
        return len(hit)

    damage(0.2)
    got: dict[int, list[int]] = {}
    with Runtime(
        **kw, cache=cache, scheduler=SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=4)
    ) as rt:
        for round_ in range(2):
            mine = list(range(round_ * 6, round_ * 6 + 6))

            def caller(part: list[int]) -> None:
                handles = [(i, rt.engine.add_requests([asks[i]], [params])[0]) for i in part]
                for i, h in handles:
                    got[i] = h.result(timeout=120).token_ids

            _in_three_threads(caller, mine)
            assert rt.engine.wait_idle(30)
            damage(0.2)
        stats = rt.engine.stats()
        assert rt.engine.blocks.num_free_blocks == 70
    assert [got[i] for i in range(len(asks))] == want
    assert stats["disk_kv_unread_blocks"] >= 1 and stats["prefix_cache_disk_hit_tokens"] > 0
    if not host_slots:
        assert stats["host_kv_saved_blocks"] == 0
    elif seed == 3:  # (this seed reads blocks back from both tiers)
        assert stats["prefix_cache_host_hit_tokens"] > 0


def test_trimming_a_shared_directory_deletes_the_others_tails_least_recent_first(
    tmp_path: Path,
) -> None:
    """tp=2: pool files counted on rank 0, deleted on both ranks; blocks this runtime indexes
    stay; the others' chains lose their tails first, the least recently used chain first."""
    mine, old_doc, new_doc = [1, 2, 3], [11, 12, 13], [21, 22]
    stamp = 1_000_000
    for rank in range(2):
        (tmp_path / f"tp{rank}-cp0").mkdir()
    for i, (h, parent) in enumerate(chain(mine) + chain(old_doc) + chain(new_doc)):
        for rank in range(2):
            f = tmp_path / f"tp{rank}-cp0" / f"{h:032x}-{parent:032x}.kv"
            f.write_bytes(b"x")
            os.utime(f, (stamp + i, stamp + i))
    (tmp_path / "tp0-cp0" / "stray.tmp").write_bytes(b"x")

    def left(rank: int) -> list[int]:
        return sorted(int(f.name[:32], 16) for f in (tmp_path / f"tp{rank}-cp0").glob("*.kv"))

    assert trim_shared(tmp_path, 2, 1, 8, lambda d: d in mine) == 0
    assert trim_shared(tmp_path, 2, 1, 7, lambda d: d in mine) == 1
    assert left(0) == left(1) == [1, 2, 3, 11, 12, 21, 22]  # the older document's tail
    assert trim_shared(tmp_path, 2, 1, 5, lambda d: d in mine) == 2
    assert left(0) == left(1) == [1, 2, 3, 21, 22]  # the rest of it, before the newer one
    assert trim_shared(tmp_path, 2, 1, 1, lambda d: d in mine) == 2  # never its own
    assert left(0) == left(1) == mine
    assert trim_shared(tmp_path, 2, 2, 1, lambda d: False) == 2  # (no cp1 directory)


def test_a_runtime_keeps_a_shared_directory_within_its_bound(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """Two runtimes with room for 20 blocks each write a document of 17 blocks each: the
    directory holds 34 files until one runtime's audit deletes the tail of the other's
    document; that one then reads the head back and computes the rest, with the same answer."""
    block_file = 2 * 2 * 4 * 4 * 8 * 4 + 32
    docs = [_tokens(60, 21), _tokens(60, 22)]
    plain = _ask(tiny_llama_dir, None, [docs[0] + [7], docs[0] + [8]])
    cache = CacheConfig(block_size=4, num_blocks=70, kv_cache_dir=str(tmp_path),
                        disk_kv_cache_gb=20 * block_file / 2**30)  # fmt: skip
    kw: dict[str, Any] = {"model": str(tiny_llama_dir), "device": "cpu", "dtype": "float32",
                          "session_len": 256, "cache": cache}  # fmt: skip
    with Runtime(**kw) as a, Runtime(**kw) as b:
        first = a.generate([docs[0] + [7]], PARAMS)[0]
        b.generate([docs[1] + [7]], PARAMS)
        for rt in (a, b):
            rt.engine.wait_idle(10)
            rt.engine.call(rt.engine.executor.flush_disk_kv)  # type: ignore[union-attr]
        assert len(_files(tmp_path)) == 34
        assert a.engine.audit_disk() == 14 and len(_files(tmp_path)) == 20
        assert a.engine.stats()["disk_kv_shared_evicted_blocks"] == 14
        assert a.engine.audit_disk() == 0
        a.reset_prefix_cache(disk=False)  # its device copies go: the disk's are read
        again = a.generate([docs[0] + [8]], PARAMS)[0]
        hit = a.engine.stats()["prefix_cache_disk_hit_tokens"]
        b.reset_prefix_cache(disk=False)
        other = b.generate([docs[1] + [8]], PARAMS)[0]
        assert other.num_cached_tokens == 3 * 4  # the head of its document: 3 blocks left
    _same([first, again], plain["outs"])
    assert hit == len(docs[0])


def test_the_audit_runs_on_its_own_while_the_runtime_serves(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dist_runtime.engine import engine as engine_module

    monkeypatch.setattr(engine_module, "DISK_AUDIT_S", 0.05)
    block_file = 2 * 2 * 4 * 4 * 8 * 4 + 32
    cache = CacheConfig(block_size=4, num_blocks=70, kv_cache_dir=str(tmp_path),
                        disk_kv_cache_gb=5 * block_file / 2**30)  # fmt: skip
    with Runtime(
        model=str(tiny_llama_dir), device="cpu", dtype="float32", session_len=256, cache=cache
    ) as rt:
        assert rt.engine._disk_dir is not None
        pool = Path(rt.engine._disk_dir) / "tp0-cp0"
        for i in range(1, 9):  # another runtime's chain of 8 blocks
            (pool / f"{i:032x}-{i - 1:032x}.kv").write_bytes(b"x")
        deadline = time.monotonic() + 10
        while len(list(pool.glob("*.kv"))) > 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sorted(int(f.name[:32], 16) for f in pool.glob("*.kv")) == [1, 2, 3, 4, 5]
        assert rt.engine.stats()["disk_kv_shared_evicted_blocks"] == 3


def test_a_driver_that_does_not_see_the_workers_directories_fails_at_start(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers whose directory is not the driver's (another node's disk) would have every
    block missed and deleted as gone: the runtime refuses to start, naming the fix, even when
    the driver's directory holds an earlier local run's worker directories."""
    elsewhere = tmp_path / "worker-node"
    real_init = DiskKVTier.__init__

    def on_another_node(self: DiskKVTier, cache: KVCache, directory: Path, *a: Any) -> None:
        real_init(self, cache, elsewhere / directory.name, *a)

    cache = CacheConfig(block_size=4, num_blocks=70, kv_cache_dir="kv")  # (relative)
    kw: dict[str, Any] = {"model": str(tiny_llama_dir), "device": "cpu", "dtype": "float32",
                          "session_len": 256, "cache": cache}  # fmt: skip
    monkeypatch.chdir(tmp_path)
    with Runtime(**kw) as rt:  # workers get the directory as an absolute path
        assert rt.engine._disk_dir is not None
        assert Path(rt.engine._disk_dir).is_absolute()
        assert Path(rt.engine._disk_dir).parent == tmp_path / "kv"
    for seen in (tmp_path / "kv").glob("*/tp*-cp*/worker.seen"):  # that run was a while ago
        os.utime(seen, (time.time() - 600,) * 2)
    monkeypatch.setattr(DiskKVTier, "__init__", on_another_node)
    with pytest.raises(ConfigError, match=r"tp0-cp0.*file system every node shares"):
        Runtime(**kw)


_SHARED = (
    list(range(int(os.environ["DISK_SHARED_SEEDS"]))) if "DISK_SHARED_SEEDS" in os.environ else [5]
)


@pytest.mark.parametrize("seed", _SHARED)
def test_two_runtimes_on_one_directory_answer_a_crowd_as_no_tier_does(
    tiny_llama_dir: Path, tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runtimes on one directory at once, each with a tight device cache and a disk bound
    smaller than the documents together: callers ask either about four documents at random,
    so each reads blocks the other wrote (listed at its start, or written since), and deletes
    blocks the other indexes (a read that then finds its file gone is computed again); each
    audits the directory every 0.1 s, deleting what the other wrote past its bound. Every
    answer is the one a runtime without the tier gives, and each ends with every device block
    free. Offline: `DISK_SHARED_SEEDS=100 pytest -k crowd_as_no_tier` (100 seeds clean)."""
    from dist_runtime.engine import engine as engine_module

    monkeypatch.setattr(engine_module, "DISK_AUDIT_S", 0.1)
    rng = random.Random(seed)
    docs = [_tokens(rng.randint(40, 110), 80 + d) for d in range(4)]
    asks = [rng.choice(docs) + _tokens(rng.randint(1, 6), 300 + i) for i in range(16)]
    params = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    kw: dict[str, Any] = {"model": str(tiny_llama_dir), "device": "cpu", "dtype": "float32",
                          "session_len": 256}  # fmt: skip
    with Runtime(**kw, cache=CacheConfig(block_size=4, num_blocks=70)) as plain:
        want = [plain.generate([a], params)[0].token_ids for a in asks]
    with Runtime(**kw, cache=CacheConfig(block_size=4, num_blocks=70, kv_cache_dir=str(tmp_path))
                 ) as first:  # fmt: skip
        first.generate([docs[0] + [1]], params)  # on disk before the two start
    block_file = 2 * 2 * 4 * 4 * 8 * 4 + 32
    cache = CacheConfig(block_size=4, num_blocks=50, kv_cache_dir=str(tmp_path),
                        disk_kv_cache_gb=45 * block_file / 2**30)  # fmt: skip
    sched = SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=4)
    got: dict[int, list[int]] = {}
    with (
        Runtime(**kw, cache=cache, scheduler=sched) as a,
        Runtime(**kw, cache=cache, scheduler=sched) as b,
    ):
        runtimes = [a, b]
        order = list(range(len(asks)))
        rng.shuffle(order)
        which = {i: rng.randrange(2) for i in order}

        def caller(part: list[int]) -> None:
            for i in part:  # one at a time: a later question may find an earlier one's blocks
                (h,) = runtimes[which[i]].engine.add_requests([asks[i]], [params])
                got[i] = h.result(timeout=120).token_ids

        _in_three_threads(caller, order)
        stats = []
        for rt in runtimes:
            assert rt.engine.wait_idle(30)
            stats.append(rt.engine.stats())
            assert rt.engine.blocks.num_free_blocks == 50
    assert [got[i] for i in range(len(asks))] == want
    assert sum(s["prefix_cache_disk_hit_tokens"] for s in stats) > 0
    if seed == 5:  # (this seed reads blocks the other runtime wrote while both ran)
        assert sum(s["disk_kv_adopted_blocks"] for s in stats) > 0


# -- the directory as a whole (launch/kv_cache_dir.py) ---------------------------------------------
def _tier(name: str, nbytes: int, last_used: float, in_use: bool = False) -> TierDir:
    return TierDir(Path("/x") / name, {}, 1, nbytes, last_used, in_use)


def test_choose_picks_named_stale_and_least_recently_used_never_in_use() -> None:
    tiers = [_tier("aa1", 50, 100), _tier("ab2", 40, 200, in_use=True), _tier("b3", 30, 300),
             _tier("c4", 20, 400)]  # fmt: skip
    ids = lambda picked: [t.id for t in picked]  # noqa: E731
    assert ids(choose(tiers, ["b"])) == ["b3"]
    assert ids(choose(tiers, ["ab"])) == []  # in use
    assert ids(choose(tiers, unused_for_s=200, now=500)) == ["aa1", "b3"]  # (ab2 in use)
    assert ids(choose(tiers, max_bytes=60)) == ["aa1", "b3"]  # 140 -> 90 (ab2 held) -> 60
    assert ids(choose(tiers, max_bytes=200)) == []
    assert ids(choose(tiers, ["ab"], max_bytes=60)) == ["aa1", "b3"]  # ab2 stays: it counts
    for bad, match in [("a", "names 2 directories"), ("z", "names no directory")]:
        with pytest.raises(ValueError, match=match):
            choose(tiers, [bad])


def test_a_directory_a_runtime_holds_is_never_pruned(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Two layouts' directories; while a runtime holds one, pruning to 0 GiB deletes only the
    other (through the command line), and once it stops the held one goes too."""
    _ask(tiny_llama_dir, tmp_path, [DOC + [7]], bits=8)
    cache = CacheConfig(block_size=4, num_blocks=70, kv_cache_dir=str(tmp_path))
    with Runtime(
        model=str(tiny_llama_dir), device="cpu", dtype="float32", session_len=256, cache=cache
    ) as rt:
        rt.generate([DOC + [7]], PARAMS)
        rt.engine.wait_idle(10)
        tiers = survey(tmp_path)
        assert [t.in_use for t in tiers] == [False, True]  # the int8 one, least recent
        assert tiers[0].card["quant_policy"] == 8 and tiers[0].files == 32
        assert tiers[0].card["checkpoint"] == str(tiny_llama_dir)
        assert tiers[0].nbytes == sum(f.stat().st_size for f in tiers[0].path.rglob("*.kv"))
        assert kv_cache_dir.main([str(tmp_path), "--max-gb", "0", "--dry-run"]) == 0
        assert len(survey(tmp_path)) == 2
        assert kv_cache_dir.main([str(tmp_path), "--max-gb", "0"]) == 0
        (left,) = survey(tmp_path)
        assert left.in_use and left.path == tiers[1].path
        again = rt.generate([DOC + [9]], PARAMS)[0]  # its own blocks are all there
        assert again.num_cached_tokens == len(DOC)
    assert kv_cache_dir.main([str(tmp_path), "--delete", left.id[:6]]) == 0
    assert survey(tmp_path) == []
    assert kv_cache_dir.main([str(tmp_path), "--delete", "ff"]) == kv_cache_dir.EXIT_BAD
    assert kv_cache_dir.main([str(tmp_path / "none")]) == kv_cache_dir.EXIT_BAD


def test_a_runtime_starting_during_a_deletion_waits_and_starts_anew(tmp_path: Path) -> None:
    where = tmp_path / "ab"
    first = InUse(where)
    first.close()
    with open(where / "in_use.lock", "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # a prune under way
        started: list[InUse] = []
        waiter = threading.Thread(target=lambda: started.append(InUse(where)))
        waiter.start()
        time.sleep(0.2)
        assert not started  # waits for the deletion
        shutil.rmtree(where)
    waiter.join(5)
    (held,) = started
    assert (where / "in_use.lock").exists()  # made anew, and held
    tier = TierDir(where, {}, 0, 0, 0.0, True)
    assert not prune(tier) and where.exists()
    held.close()
    assert prune(tier) and not where.exists()


def test_two_runtimes_share_a_directory(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Two runtimes on one directory at once, the second with room for 20 blocks: it reads
    the head of a document written before it started, and its evictions delete files the first
    has listed; the first finds those gone (a miss) and computes them. A document the first
    writes while both run is read by the second. Every answer is the one a runtime without
    the tier gives."""
    block_file = 2 * 2 * 4 * 4 * 8 * 4 + 32
    other, third = _tokens(120, 8), _tokens(40, 9)
    plain = _ask(tiny_llama_dir, None, [DOC + [7], other + [7], DOC + [9], third + [8]])
    _ask(tiny_llama_dir, tmp_path, [DOC + [7]])

    def runtime(gb: float) -> Runtime:
        cache = CacheConfig(block_size=4, num_blocks=40, kv_cache_dir=str(tmp_path),
                            disk_kv_cache_gb=gb)  # fmt: skip
        return Runtime(
            model=str(tiny_llama_dir), device="cpu", dtype="float32", session_len=256, cache=cache
        )

    with runtime(1.0) as first, runtime(20 * block_file / 2**30) as second:
        a = second.generate([DOC + [7]], PARAMS)[0]  # DOC's first 20 blocks (its bound)
        assert second.engine.stats()["prefix_cache_disk_hit_tokens"] == 80
        b = second.generate([other + [7]], PARAMS)[0]  # its writes push DOC's files out
        second.engine.wait_idle(10)
        assert len(_files(tmp_path)) <= 20
        c = first.generate([DOC + [9]], PARAMS)[0]  # listed at its start; many files gone now
        stats = first.engine.stats()
        first.generate([third + [7]], PARAMS)
        first.engine.wait_idle(10)
        first.engine.call(first.engine.executor.flush_disk_kv)  # type: ignore[union-attr]
        d = second.generate([third + [8]], PARAMS)[0]  # written after it started
        seconds = second.engine.stats()
    _same([a, b, c, d], plain["outs"])
    assert stats["prefix_cache_disk_hit_tokens"] < len(DOC)
    assert d.num_cached_tokens == len(third)
    assert seconds["disk_kv_adopted_blocks"] == len(third) // 4
    assert seconds["prefix_cache_disk_hit_tokens"] == 80 + len(third)


def test_reset_forgets_every_tier_and_running_requests_go_on(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """`Runtime.reset_prefix_cache`: with `disk=False` the device's blocks go and the disk's
    stay (the next question reads them back); a full reset deletes the files too (the next
    question computes everything), with the same answers; a request running during a reset
    ends with its own answer. Over HTTP (POST /reset_prefix_cache) it is 403 unless enabled,
    and needs a key."""
    from dist_runtime.server.app import ServerSettings, create_app
    from dist_runtime.server.batch_lines import call

    plain = _ask(tiny_llama_dir, None, [DOC + [7], DOC + [8]])
    cache = CacheConfig(block_size=4, num_blocks=70, kv_cache_dir=str(tmp_path),
                        host_kv_cache_gb=20 * 1024 / 2**30)  # fmt: skip
    with Runtime(
        model=str(tiny_llama_dir), device="cpu", dtype="float32", session_len=256, cache=cache
    ) as rt:
        first = rt.generate([DOC + [7]], PARAMS)[0]
        rt.engine.wait_idle(10)
        rt.engine.call(rt.engine.executor.flush_disk_kv)  # type: ignore[union-attr]
        forgot = rt.reset_prefix_cache(disk=False)
        assert forgot["device"] == 32 and forgot["disk"] == 0
        assert rt.engine.blocks.num_free_blocks == 70
        again = rt.generate([DOC + [8]], PARAMS)[0]
        assert again.num_cached_tokens == len(DOC)
        assert rt.engine.stats()["prefix_cache_disk_hit_tokens"] == len(DOC)
        (running,) = rt.add_requests([DOC + [7]], [PARAMS])
        forgot = rt.reset_prefix_cache()
        assert forgot["disk"] >= 32
        assert running.result(timeout=60).token_ids == first.token_ids
        rt.engine.wait_idle(10)
        pool = next(tmp_path.glob("*/tp0-cp0"))
        (pool / f"{1:032x}-{2:032x}.kv").write_bytes(b"x")  # another runtime's block
        forgot = rt.reset_prefix_cache()  # the blocks it registered as it went, and that one
        assert _files(tmp_path) == []  # (the call waits for the deletions)
        assert forgot["disk"] >= 2
        cold = rt.generate([DOC + [8]], PARAMS)[0]
        assert cold.num_cached_tokens == 0
        keyed = [(b"authorization", b"Bearer k")]

        def post(app: Any, path: str, headers: Any = keyed) -> tuple[int, Any]:
            status, body = asyncio.run(call(app, path, b"", headers))
            return status, json.loads(body)

        off = create_app(rt, ServerSettings(served_model_name="m", api_keys=("k",)))
        status, body = post(off, "/reset_prefix_cache")
        assert status == 403 and "--enable-cache-reset" in body["error"]["message"]
        on = create_app(
            rt, ServerSettings(served_model_name="m", api_keys=("k",), enable_cache_reset=True)
        )
        assert post(on, "/reset_prefix_cache", [])[0] == 401
        status, body = post(on, "/reset_prefix_cache?disk=false&host=false")
        assert status == 200 and body["forgotten_blocks"]["device"] > 0
        assert body["forgotten_blocks"]["disk"] == 0 and len(_files(tmp_path)) > 0
    _same([first, again, cold], plain["outs"][:1] + plain["outs"][1:] * 2)


def test_a_file_system_without_locks_still_runs_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where flock fails (Lustre mounted without it, some NFS), a runtime starts anyway with a
    warning, and the survey says it cannot tell whether a directory is in use."""
    import dist_runtime.engine.kv_disk as kv_disk

    def no_locks(f: Any, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(kv_disk.fcntl, "flock", no_locks)
    where = tmp_path / "ab"
    with caplog.at_level("WARNING", logger="dist_runtime.engine.kv_disk"):
        held = InUse(where)
    assert "cannot be locked (No locks available)" in caplog.text
    (where / "fingerprint.json").write_text("{}")
    (tier,) = survey(tmp_path)
    assert tier.in_use is None
    assert prune(tier) and not where.exists()
    held.close()
