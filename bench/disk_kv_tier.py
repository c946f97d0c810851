"""Throughput of the prefix cache's disk tier on one worker: blocks written from the KV cache to
files, and read back from the files into the cache (`workers.kv_cache.DiskKVTier`).

    python bench/disk_kv_tier.py [--device cuda] [--blocks 512] [--dir PATH]

The cache has InternLM2.5-7B's shape by default (32 layers, 8 KV heads of 128, bf16, blocks of
16 tokens: 2 MiB a block at tp=1). Writing: the moves of `--blocks` saves (gathered off the
cache) until every file is on disk (`flush`). Reading: a new tier on the same directory reads
every block back into the cache, checked bit for bit. The directory is the system's temporary
one unless `--dir` names one; writes may stay in the page cache and reads come from it (the
files were just written), so these are rates of the tier's code path, not of the disk itself
(the summary says so). The baseline, in the same run and directory: the same bytes written to
as many files and read back with plain file calls in one thread (no gather, checksum or copy
into the cache). Each file carries a CRC-32 that the tier writes and checks. One summary line:
both rates against the baseline's, and what reading the K/V of a 1M-token document at the
tier's rate would take.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dist_runtime.protocol import DISK_LOAD, DISK_SAVE, KVMove  # noqa: E402
from workers.kv_cache import DiskKVTier, KVCache  # noqa: E402


def _move(kind: int, block: int) -> KVMove:
    key = f"{block + 1:032x}"
    parent = f"{block:032x}" if kind == DISK_SAVE else ""
    return KVMove(pool=0, block=block, slot=0, to_host=False, disk=kind, key=key, parent=parent)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _plain_io(folder: Path, size: int, count: int) -> tuple[float, float]:
    """Seconds to write `count` files of `size` bytes (renamed into place, as the tier does)
    and to read them back, with plain file calls in one thread."""
    folder.mkdir()
    payload = bytearray(torch.randint(0, 256, (size,), dtype=torch.uint8).numpy().tobytes())
    start = time.perf_counter()
    for i in range(count):
        tmp = folder / f"{i}.tmp"
        with open(tmp, "wb") as f:
            f.write(payload)
        os.replace(tmp, folder / f"{i}.kv")
    write_s = time.perf_counter() - start
    buf = bytearray(size)
    start = time.perf_counter()
    for i in range(count):
        with open(folder / f"{i}.kv", "rb") as f:
            f.readinto(buf)
    return write_s, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--blocks", type=int, default=512)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--bits", type=int, default=0, choices=(0, 8, 4))
    p.add_argument("--dir", type=Path, default=None, help="where the files go (default: a temp)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cache = KVCache(
        args.layers,
        args.blocks,
        args.block_size,
        args.kv_heads,
        args.head_dim,
        torch.bfloat16,
        device,
        bits=args.bits,
    )
    cache.data.copy_(torch.randint(0, 250, cache.data.shape, device=device).to(cache.data.dtype))
    if cache.params is not None:
        cache.params.normal_()
    want = cache.data.clone()
    top = Path(tempfile.mkdtemp(prefix="disk-kv-tier-", dir=args.dir))
    try:
        tier = DiskKVTier(cache, top)
        total = tier.file_bytes * args.blocks
        _sync(device)
        start = time.perf_counter()
        tier.apply(cache, [_move(DISK_SAVE, b) for b in range(args.blocks)])
        tier.flush()
        write_s = time.perf_counter() - start
        cache.data.zero_()
        fresh = DiskKVTier(cache, top)
        fresh.listing()  # as a runtime does at start: every file's name known
        _sync(device)
        start = time.perf_counter()
        fresh.apply(cache, [_move(DISK_LOAD, b) for b in range(args.blocks)])
        _sync(device)
        read_s = time.perf_counter() - start
        same = bool(torch.equal(cache.data, want))
        raw_write_s, raw_read_s = _plain_io(top / "plain", tier.file_bytes, args.blocks)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    gb = total / 1e9
    # 1M tokens of InternLM2.5-7B bf16 K/V: 2 x 32 layers x 8 heads x 128 x 2 bytes a token
    million = 2**20 * 2 * 32 * 8 * 128 * 2 / 1e9
    print(
        f"disk-kv-tier ({device.type}, {args.blocks} blocks of "
        f"{tier.file_bytes / 2**20:.2f} MiB, {gb:.2f} GB in {top.parent}): write "
        f"{gb / write_s:.2f} GB/s ({raw_write_s / write_s:.2f}x plain files' "
        f"{gb / raw_write_s:.2f}), read {gb / read_s:.2f} GB/s ({raw_read_s / read_s:.2f}x "
        f"plain files' {gb / raw_read_s:.2f}; all may stay in the page cache); blocks read back "
        f"identical: {same}; at this read rate the K/V of a 1M-token InternLM2.5-7B document "
        f"({million:.0f} GB) takes {million / (gb / read_s):.0f} s"
    )
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
