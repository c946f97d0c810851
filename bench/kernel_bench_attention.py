"""Attention kernels on one CUDA GPU: paged prefill TFLOP/s and split-KV decode GB/s.

    python bench/kernel_bench_attention.py            # the table, one line per row
    python bench/kernel_bench_attention.py --sweep    # also time candidate tile configs

Prefill: one causal sequence of s tokens (32 q heads / 8 kv heads, head_dim 128, bf16) whose
K/V sit in a paged cache in shuffled blocks; FLOPs = 4 * s^2 * heads * head_dim / 2 (two
matmuls of 2 * s^2 * heads * head_dim each, halved by the causal mask; the count FlashAttention
reports). Baseline: torch SDPA's FlashAttention-2 backend, causal, on the same q with K/V
repeated to 32 heads, in the same run.
Decode: batch 1, one query token over a paged context; bytes = the K and V cache bytes read.
Baseline: a device-to-device copy of that many bytes, GB/s = (read + written) / time.
`--decode --kv-bits 8 4`: decode over int8 / int4 caches beside bf16 at the same points.
`--decode --window 4096`: a sliding window's decode at the points past it (its bytes: the
window's keys).
`--shape gemma2-9b` (16 q heads / 8 kv heads, head_dim 256): the same at Gemma 2 9B's heads;
`--softcap 50` soft-caps decode's scores as Gemma 2 does (the prefill table stays uncapped: its
SDPA baseline has no cap).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import kernels.flash_decode as FD  # noqa: E402
import kernels.paged_attention as PA  # noqa: E402
from dist_runtime.memory_planner import KV_PARAM_BYTES  # noqa: E402

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
SHAPES = {"internlm2_5-7b": (32, 8, 128), "gemma2-9b": (16, 8, 256)}
"""--shape: (q heads, kv heads, head_dim) at tp 1; the first is the default."""
SOFTCAP = 0.0
"""--softcap: decode's attention-logit soft-cap (0: none)."""
DTYPE = torch.bfloat16
PREFILL_LENS = [4096, 8192, 16384, 32768, 65536]
DECODE_LENS = [32768, 131072, 524288, 1048576]
SEED = 0


def _ms(fn: Callable[[], Any]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _paged_cache(
    ctx: int, block_size: int, device: torch.device, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random K/V caches of exactly ctx tokens in shuffled blocks, and the (1, blocks) table."""
    num_blocks = -(-ctx // block_size)
    shape = (num_blocks, block_size, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, generator=gen, device=device, dtype=DTYPE)
    v_cache = torch.randn(shape, generator=gen, device=device, dtype=DTYPE)
    table = torch.randperm(num_blocks, generator=gen, device=device).to(torch.int32)[None]
    return k_cache, v_cache, table


def bench_prefill(seq: int, device: torch.device, block_size: int = 16) -> dict[str, Any]:
    gen = torch.Generator(device=device).manual_seed(SEED)
    q = torch.randn(seq, Q_HEADS, HEAD_DIM, generator=gen, device=device, dtype=DTYPE)
    k_cache, v_cache, table = _paged_cache(seq, block_size, device, gen)
    cu = torch.tensor([0, seq], device=device)
    lens = torch.tensor([seq], device=device)
    scale = HEAD_DIM**-0.5
    ms = _ms(lambda: PA.paged_attention_triton(q, k_cache, v_cache, table, cu, lens, scale))

    group = Q_HEADS // KV_HEADS
    ids = table[0].long()
    k = k_cache[ids].flatten(0, 1).repeat_interleave(group, dim=1)  # (seq, q_heads, head_dim)
    v = v_cache[ids].flatten(0, 1).repeat_interleave(group, dim=1)
    qh, kh, vh = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, heads, seq, head_dim)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        sdpa = torch.nn.functional.scaled_dot_product_attention
        base_ms = _ms(lambda: sdpa(qh, kh, vh, is_causal=True, scale=scale))
    flops = 4 * seq * seq * Q_HEADS * HEAD_DIM / 2
    return dict(
        name="paged_prefill_causal",
        shape=f"s={seq} h={Q_HEADS}/{KV_HEADS} d={HEAD_DIM} bs={block_size} bf16",
        ms=ms,
        tflops=flops / ms / 1e9,
        baseline="sdpa_flash",
        baseline_ms=base_ms,
        baseline_tflops=flops / base_ms / 1e9,
    )


def _quant_cache(
    ctx: int, block_size: int, bits: int, device: torch.device, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random codes and (scale, zero) of a `bits` cache of ctx tokens, shuffled blocks as
    `_paged_cache`: (k_cache, v_cache, k_params, v_params, table)."""
    num_blocks = -(-ctx // block_size)
    width = HEAD_DIM // 2 if bits == 4 else HEAD_DIM
    shape = (num_blocks, block_size, KV_HEADS, width)
    codes = [
        torch.randint(0, 256, shape, generator=gen, device=device, dtype=torch.uint8)
        for _ in range(2)
    ]
    params = []
    for _ in range(2):
        p = torch.empty(num_blocks, block_size, KV_HEADS, 2, device=device)
        p[..., 0].uniform_(0.01, 0.05, generator=gen)  # scale
        p[..., 1].uniform_(-3.0, -1.0, generator=gen)  # zero: the row's minimum
        params.append(p)
    table = torch.randperm(num_blocks, generator=gen, device=device).to(torch.int32)[None]
    return codes[0], codes[1], params[0], params[1], table


def kv_bytes(batch: int, ctx: int, bits: int) -> int:
    """K and V bytes a decode step reads: elements, or codes plus a float32 scale and zero per
    token and KV head."""
    if bits == 0:
        return 2 * batch * ctx * KV_HEADS * HEAD_DIM * DTYPE.itemsize
    return 2 * batch * ctx * KV_HEADS * (HEAD_DIM * bits // 8 + KV_PARAM_BYTES)


def _decode_ms(
    ctx: int,
    device: torch.device,
    block_size: int,
    batch: int,
    width: int | None,
    bits: int = 0,
    window: int = 0,
) -> float:
    gen = torch.Generator(device=device).manual_seed(SEED)
    q = torch.randn(batch, Q_HEADS, HEAD_DIM, generator=gen, device=device, dtype=DTYPE)
    quant: dict[str, Any] = {}
    if bits:
        k_cache, v_cache, k_params, v_params, table = _quant_cache(
            batch * ctx, block_size, bits, device, gen
        )
        quant = dict(k_params=k_params, v_params=v_params, bits=bits)
    else:
        k_cache, v_cache, table = _paged_cache(batch * ctx, block_size, device, gen)
    table = table.view(batch, -1)
    if width is not None:  # a CUDA graph's table: a session wide, padded past the context
        pad = table[:, -1:].expand(-1, -(-width // block_size) - table.shape[1])
        table = torch.cat([table, pad], dim=1).contiguous()
    lens = torch.full((batch,), ctx, device=device)
    scale = HEAD_DIM**-0.5
    return _ms(
        lambda: FD.flash_decode_triton(
            q, k_cache, v_cache, table, lens, scale, window=window, softcap=SOFTCAP, **quant
        )
    )


def bench_decode(
    ctx: int,
    device: torch.device,
    block_size: int = 16,
    batch: int = 1,
    width: int | None = None,
    bits: int = 0,
    window: int = 0,
) -> dict[str, Any]:
    """Decode of `batch` sequences of `ctx` keys; `width`: block table as wide as that many
    keys (as a decode graph's), else as wide as the context; `bits` 8 / 4: over a quantized
    cache, its bytes counted as read (codes and parameters); `window`: a sliding window of
    that many keys, whose keys alone count as read."""
    ms = _decode_ms(ctx, device, block_size, batch, width, bits, window)  # (freed before)
    nbytes = kv_bytes(batch, min(ctx, window) if window else ctx, bits)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    base_ms = _ms(lambda: dst.copy_(src))
    gbps, copy_gbps = nbytes / ms / 1e6, 2 * nbytes / base_ms / 1e6
    table = f" table={width}" if width is not None else ""
    cache = f" kv{bits}" if bits else ""
    cache += f" window={window}" if window else ""
    cache += f" softcap={SOFTCAP:g}" if SOFTCAP else ""
    return dict(
        name="flash_decode",
        shape=f"ctx={ctx} b={batch}{table}{cache} h={Q_HEADS}/{KV_HEADS} d={HEAD_DIM} "
        f"bs={block_size}",
        ms=ms,
        GBps=gbps,
        baseline="d2d_copy",
        baseline_ms=base_ms,
        baseline_GBps=copy_gbps,
        fraction_of_copy=gbps / copy_gbps,
    )


DECODE_GRID = [(8192, 1), (32768, 1), (131072, 1), (1048576, 1), (8192, 8), (32768, 8), (131072, 8)]
GRAPH_WIDTH = 1048576 + 64
"""--decode: (context, batch), each with an exact table and one a 1M-token session wide."""


def bench_decode_grid(device: torch.device, window: int = 0) -> list[dict[str, Any]]:
    """Every DECODE_GRID point; with `window`, the points past it (a sliding-window model's
    decode, which should read only the window's keys at the copy's rate)."""
    rows = []
    for ctx, batch in DECODE_GRID:
        if window and ctx <= window:
            continue
        for width in (None, GRAPH_WIDTH):
            rows.append(bench_decode(ctx, device, batch=batch, width=width, window=window))
            print(_format(rows[-1]), flush=True)
    return rows


QUANT_GRID = [(32768, 1), (131072, 1), (1048576, 1), (32768, 8), (131072, 8)]
"""--decode --kv-bits: (context, batch), exact tables, each cache format in turn."""


def bench_decode_quant(device: torch.device, bits_list: list[int]) -> list[dict[str, Any]]:
    """The split-KV kernel over bf16 and quantized caches at each QUANT_GRID point: GB/s of
    the bytes each reads against a copy, and the time against bf16's (bench/cuda_compile.py
    --streaming predicts the quantized loops issue-bound below the HBM's bandwidth)."""
    rows = []
    for ctx, batch in QUANT_GRID:
        bf16_ms = None
        for bits in (0, *bits_list):
            row = bench_decode(ctx, device, batch=batch, bits=bits)
            if bits == 0:
                bf16_ms = row["ms"]
            else:
                assert bf16_ms is not None
                row["speedup_vs_bf16"] = bf16_ms / row["ms"]
            rows.append(row)
            print(_format(row), flush=True)
    return rows


GRAPH_SWEEP = [
    (2, dict(BLOCK_N=64, num_warps=4, num_stages=3), 1),
    (4, dict(BLOCK_N=64, num_warps=4, num_stages=3), 1),
    (8, dict(BLOCK_N=64, num_warps=4, num_stages=2), 1),
    (4, dict(BLOCK_N=32, num_warps=4, num_stages=3), 1),
    (2, dict(BLOCK_N=128, num_warps=8, num_stages=2), 1),
    (1, dict(BLOCK_N=64, num_warps=4, num_stages=3), 1),
    (4, dict(BLOCK_N=64, num_warps=4, num_stages=3), 8),
    (8, dict(BLOCK_N=64, num_warps=4, num_stages=3), 16),
]
"""--decode-graph: (programs per SM, pass-1 config, fewest key tiles per split) candidates; the
first is the default. A floor above 1 (`flash_decode.MIN_SPLIT_TILES`) keeps many splits for
long sequences while a short one takes fewer, longer ones."""
GRAPH_GRID = [(8192, 1), (32768, 1), (131072, 1), (8192, 8)]
GRAPH_LAYERS = 32


def bench_decode_graph(device: torch.device) -> list[dict[str, Any]]:
    """The split-KV decode as a decode step runs it: one CUDA graph of 32 calls (32 layers, each
    over its own cache, so no call reads another's keys from L2), timed by replays. A call in
    isolation is launch-bound below ~100K keys; inside a graph it is not."""
    rows = []
    for ctx, batch in GRAPH_GRID:
        rows += _decode_graph_rows(ctx, batch, device)
        torch.cuda.empty_cache()
    print(graph_sweep_summary(rows), flush=True)
    return rows


def graph_sweep_summary(rows: list[dict[str, Any]]) -> str:
    """One line: each shape's fastest candidate (as a fraction of the default's time) and the
    candidate with the lowest mean fraction over all shapes (GRAPH_SWEEP index; 0 = default)."""
    shapes = sorted({(r["ctx"], r["batch"]) for r in rows})
    ratio: dict[int, list[float]] = {}
    parts = []
    for ctx, batch in shapes:
        mine = {r["candidate"]: r["ms"] for r in rows if (r["ctx"], r["batch"]) == (ctx, batch)}
        base = mine[0]
        for c, ms in mine.items():
            ratio.setdefault(c, []).append(ms / base)
        best = min(mine, key=lambda c: mine[c])
        parts.append(f"ctx {ctx} b{batch}: #{best} {mine[best] / base:.2f}")
    overall = min(ratio, key=lambda c: sum(ratio[c]) / len(ratio[c]))
    mean = sum(ratio[overall]) / len(ratio[overall])
    return (
        "decode-graph sweep, time / default (#0): "
        + "; ".join(parts)
        + f"; best overall #{overall} {GRAPH_SWEEP[overall]} at {mean:.2f} on average"
    )


def _decode_graph_rows(ctx: int, batch: int, device: torch.device) -> list[dict[str, Any]]:
    gen = torch.Generator(device=device).manual_seed(SEED)
    q = torch.randn(batch, Q_HEADS, HEAD_DIM, generator=gen, device=device, dtype=DTYPE)
    lens = torch.full((batch,), ctx, device=device)
    layers = []
    for _ in range(GRAPH_LAYERS):
        k, v, table = _paged_cache(batch * ctx, 16, device, gen)
        layers.append((k, v, table.view(batch, -1)))
    nbytes = 2 * batch * ctx * KV_HEADS * HEAD_DIM * DTYPE.itemsize * GRAPH_LAYERS
    scale = HEAD_DIM**-0.5

    def step() -> None:
        for k, v, table in layers:
            FD.flash_decode_triton(q, k, v, table, lens, scale)

    rows = []
    default_decode, default_per_sm = FD.decode_config, FD.PROGRAMS_PER_SM
    default_floor = FD.MIN_SPLIT_TILES
    try:
        for candidate, (per_sm, cfg, floor) in enumerate(GRAPH_SWEEP):
            FD.decode_config = lambda *_, c=cfg: dict(c)  # type: ignore[misc]
            FD.PROGRAMS_PER_SM = per_sm
            FD.MIN_SPLIT_TILES = floor
            step()  # compile outside the graph
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            ms = _ms(graph.replay)
            splits = FD.split_plan(batch, KV_HEADS, ctx, cfg["BLOCK_N"], device, head_dim=HEAD_DIM)
            tiles = -(-ctx // cfg["BLOCK_N"])
            used = min(splits, -(-tiles // max(floor, -(-tiles // splits))))
            rows.append(
                dict(
                    candidate=candidate,
                    ctx=ctx,
                    batch=batch,
                    name="decode_graph",
                    shape=f"ctx={ctx} b={batch} per_sm={per_sm} floor={floor} "
                    f"splits={splits} ({used} with keys) {cfg}",
                    ms=ms / GRAPH_LAYERS,
                    GBps=nbytes / ms / 1e6,
                )
            )
            print(_format(rows[-1]), flush=True)
    finally:
        FD.decode_config, FD.PROGRAMS_PER_SM = default_decode, default_per_sm  # type: ignore[assignment]
        FD.MIN_SPLIT_TILES = default_floor
    return rows


def bench_attention(device: torch.device) -> list[dict[str, Any]]:
    """One row per prefill length and per decode context, each with its baseline."""
    rows = [bench_prefill(s, device) for s in PREFILL_LENS]
    rows.append(bench_prefill(16384, device, block_size=128))
    rows += [bench_decode(c, device) for c in DECODE_LENS]
    return rows


PREFILL_SWEEP = [
    dict(BLOCK_M=256, BLOCK_N=64, num_warps=16, num_stages=3),
    dict(BLOCK_M=256, BLOCK_N=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
]
DECODE_SWEEP = [
    (2, dict(BLOCK_N=64, num_warps=4, num_stages=3)),
    (4, dict(BLOCK_N=64, num_warps=4, num_stages=3)),
    (2, dict(BLOCK_N=128, num_warps=4, num_stages=3)),
    (4, dict(BLOCK_N=128, num_warps=8, num_stages=2)),
]
"""(programs per SM, pass-1 config) candidates."""


def sweep(device: torch.device) -> list[dict[str, Any]]:
    """Time candidate tile configs: prefill at 16K tokens, decode at 128K context."""
    rows = []
    default_prefill = PA.attention_config
    try:
        for block_size in (16, 128):
            for cfg in PREFILL_SWEEP:
                PA.attention_config = lambda *_, c=cfg: dict(c)  # type: ignore[misc]
                shape = f"bs={block_size} {cfg}"
                try:
                    row = bench_prefill(16384, device, block_size)
                except Exception as e:  # a config past the shared-memory limit, say
                    print(f"sweep_prefill {shape}: {type(e).__name__}", flush=True)
                    continue
                rows.append(
                    dict(name="sweep_prefill", shape=shape, ms=row["ms"], tflops=row["tflops"])
                )
                print(_format(rows[-1]), flush=True)
    finally:
        PA.attention_config = default_prefill  # type: ignore[assignment]
    default_decode, default_per_sm = FD.decode_config, FD.PROGRAMS_PER_SM
    try:
        for per_sm, cfg in DECODE_SWEEP:
            FD.decode_config = lambda *_, c=cfg: dict(c)  # type: ignore[misc]
            FD.PROGRAMS_PER_SM = per_sm
            row = bench_decode(131072, device)
            shape = f"per_sm={per_sm} {cfg}"
            rows.append(dict(name="sweep_decode", shape=shape, ms=row["ms"], GBps=row["GBps"]))
            print(_format(rows[-1]), flush=True)
    finally:
        FD.decode_config, FD.PROGRAMS_PER_SM = default_decode, default_per_sm  # type: ignore[assignment]
    return rows


RATIOS = ("fraction_of_copy", "speedup_vs_bf16")


def _format(row: dict[str, Any]) -> str:
    parts = [f"{row['name']:<22}", f"{row['shape']:<52}", f"{row['ms']:9.3f} ms"]
    for key in (
        "tflops",
        "baseline_tflops",
        "GBps",
        "baseline_GBps",
        "fraction_of_copy",
        "speedup_vs_bf16",
    ):
        if key in row:
            parts.append(f"{key}={row[key]:.2f}x" if key in RATIOS else f"{key}={row[key]:.1f}")
    return "  ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time candidate tile configs")
    parser.add_argument(
        "--decode",
        action="store_true",
        help="only decode: batch 1 and 8 from 8K to 1M keys, exact and session-wide tables",
    )
    parser.add_argument(
        "--kv-bits",
        type=int,
        nargs="+",
        choices=(8, 4),
        help="with --decode: time the split-KV kernel over these quantized caches beside bf16",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=0,
        help="with --decode: a sliding window of this many keys (the contexts past it)",
    )
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="internlm2_5-7b",
        help="heads and head_dim (SHAPES)",
    )
    parser.add_argument(
        "--softcap", type=float, default=0.0, help="with --decode: soft-cap the scores"
    )
    parser.add_argument(
        "--decode-graph",
        action="store_true",
        help="only decode, 32 calls per CUDA graph as in a decode step, over candidate configs",
    )
    args = parser.parse_args()
    global Q_HEADS, KV_HEADS, HEAD_DIM, SOFTCAP
    Q_HEADS, KV_HEADS, HEAD_DIM = SHAPES[args.shape]
    SOFTCAP = args.softcap
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    device = torch.device("cuda")
    torch.manual_seed(SEED)
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    if args.decode_graph:
        bench_decode_graph(device)
        return
    if args.decode and args.kv_bits:
        bench_decode_quant(device, args.kv_bits)
        return
    if args.decode:
        bench_decode_grid(device, args.window)
        return
    if args.sweep:
        sweep(device)
    for row in bench_attention(device):
        print(_format(row), flush=True)


if __name__ == "__main__":
    main()
