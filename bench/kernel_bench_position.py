"""GPU benchmark of `position_attention_triton`, the kernel behind context parallelism.

    python bench/kernel_bench_position.py [--out report.md]

Three workloads, bf16, 32 query heads / 8 KV heads, head_dim 128 (InternLM2.5-7B's attention):

* prefix chunk: 8,192 new queries at positions [L - 8192, L) over all L keys (a prefill
  chunk after a cached prefix). Baseline in the same run: `paged_attention_triton`, the
  tuned paged-prefill kernel, on the same queries and a paged cache of the same keys.
* cp shard: the same queries over one cp rank's keys when the cache is striped over cp=4
  ranks by 16-token blocks (keys at blocks b with b % 4 == 0): what each rank computes for a
  chunk after a cached prefix and then merges by LSE.
* ring step: one pass-KV ring step of a fresh 64K-token chunk at cp=4 and block 16: rank 3's
  striped queries over rank 0's striped keys. Baseline: the paged kernel on a contiguous causal
  sequence of the same length as one rank's share (16K), the work a zigzag split would give.
* windowed cp shard: the cp shard's queries over one rank's keys with a sliding window of
  4,096 and Gemma 2's score soft-cap of 50 (a Mistral / Gemma layer at cp = 4: tiles before
  every row's window skipped, straddling ones masked). Baseline: the paged kernel with the
  same window and cap over a contiguous cache of the same length.

Each workload's keys are sorted, as the cp callers promise (`keys_sorted=True`: the key range
of each query tile is found up front and walked in pipelined loops); the generic path, which
decides per key tile from the positions it loads, is timed beside it.

FLOPs count only the (query, key) pairs that the causal rule (and a window) keeps: 4 * head_dim
* q_heads per pair (QK^T and PV). Each workload is also checked against
`position_attention_ref` (fp32 math on the bf16 inputs): the largest |out| and |lse|
differences are printed.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.kernel_bench_attention import _ms  # noqa: E402
from kernels import paged_attention as PA  # noqa: E402
from kernels import position_attention as POS  # noqa: E402

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
DTYPE = torch.bfloat16
CHUNK = 8192
BLOCK = 16
CP = 4
SEED = 0


def _pairs(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int = 0) -> int:
    """(query, key) pairs with k_pos <= q_pos (and k_pos > q_pos - window, window > 0)."""
    keys = torch.sort(k_pos).values
    seen = torch.searchsorted(keys, q_pos, right=True)
    if window:
        seen = seen - torch.searchsorted(keys, q_pos - window, right=True)
    return int(seen.sum())


def _tflops(pairs: int, ms: float) -> float:
    return 4 * HEAD_DIM * Q_HEADS * pairs / ms / 1e9


def _striped(length: int, rank: int, device: torch.device) -> torch.Tensor:
    """Positions in [0, length) of the 16-token blocks rank `rank` of CP holds."""
    pos = torch.arange(length, device=device)
    return pos[(pos // BLOCK) % CP == rank]


def _check(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pos: torch.Tensor,
    window: int = 0,
    softcap: float = 0.0,
) -> tuple[float, float]:
    scale = HEAD_DIM**-0.5
    out, lse = POS.position_attention_triton(q, q_pos, k, v, k_pos, scale, True, window, softcap)
    ref_out, ref_lse = POS.position_attention_ref(
        q, q_pos, k, v, k_pos, scale, window=window, softcap=softcap
    )
    seen = torch.isfinite(ref_lse)
    if not torch.equal(seen, torch.isfinite(lse)):
        raise AssertionError("the kernel and the reference disagree on which rows see a key")
    d_out = (out.float() - ref_out.float()).abs().max().item()
    d_lse = (lse[seen] - ref_lse[seen]).abs().max().item() if seen.any() else 0.0
    if d_out > 3e-2 or d_lse > 1e-2:
        raise AssertionError(f"kernel differs from the reference: |out| {d_out}, |lse| {d_lse}")
    return d_out, d_lse


def _both_ms(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pos: torch.Tensor,
    window: int = 0,
    softcap: float = 0.0,
) -> tuple[float, float]:
    """(ms with keys_sorted=True, ms of the generic path that decides per key tile)."""
    scale = HEAD_DIM**-0.5
    run = POS.position_attention_triton
    fast = _ms(lambda: run(q, q_pos, k, v, k_pos, scale, True, window, softcap))
    generic = _ms(lambda: run(q, q_pos, k, v, k_pos, scale, False, window, softcap))
    return fast, generic


def _rand(n: int, heads: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randn(n, heads, HEAD_DIM, generator=gen, device=device, dtype=DTYPE)


def _paged_ms(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ctx: int,
    window: int = 0,
    softcap: float = 0.0,
) -> float:
    """The paged-prefill kernel: q = the last len(q) positions of a ctx-token sequence whose
    K/V (ctx, kv_heads, d) sit in shuffled 16-token blocks."""
    device = q.device
    blocks = -(-ctx // BLOCK)
    pad = blocks * BLOCK - ctx
    kc = torch.cat([k, k.new_zeros(pad, *k.shape[1:])]).view(blocks, BLOCK, KV_HEADS, HEAD_DIM)
    vc = torch.cat([v, v.new_zeros(pad, *v.shape[1:])]).view(blocks, BLOCK, KV_HEADS, HEAD_DIM)
    perm = torch.randperm(blocks, device=device)
    k_cache, v_cache = torch.empty_like(kc), torch.empty_like(vc)
    k_cache[perm], v_cache[perm] = kc, vc
    table = perm.to(torch.int32)[None]
    cu = torch.tensor([0, q.shape[0]], device=device)
    lens = torch.tensor([ctx], device=device)
    scale = HEAD_DIM**-0.5
    args = (q, k_cache, v_cache, table, cu, lens, scale, False, None, None, 0, window, softcap)
    return _ms(lambda: PA.paged_attention_triton(*args))


def bench_prefix_chunk(length: int, device: torch.device) -> dict[str, Any]:
    gen = torch.Generator(device=device).manual_seed(SEED)
    q = _rand(CHUNK, Q_HEADS, gen, device)
    k, v = _rand(length, KV_HEADS, gen, device), _rand(length, KV_HEADS, gen, device)
    q_pos = torch.arange(length - CHUNK, length, device=device)
    k_pos = torch.arange(length, device=device)
    d_out, d_lse = _check(q, q_pos, k, v, k_pos)
    ms, generic = _both_ms(q, q_pos, k, v, k_pos)
    base = _paged_ms(q, k, v, length)
    pairs = _pairs(q_pos, k_pos)
    return dict(
        name=f"prefix chunk, L={length}",
        ms=ms,
        tflops=_tflops(pairs, ms),
        generic_tflops=_tflops(pairs, generic),
        base_name="paged_attention_triton",
        base_ms=base,
        base_tflops=_tflops(pairs, base),
        d_out=d_out,
        d_lse=d_lse,
    )


def bench_cp_shard(
    length: int, device: torch.device, window: int = 0, softcap: float = 0.0
) -> dict[str, Any]:
    """The cp shard workload; with a window / cap, the kernel and its paged baseline take them."""
    gen = torch.Generator(device=device).manual_seed(SEED)
    q = _rand(CHUNK, Q_HEADS, gen, device)
    k_pos = _striped(length, 0, device)
    k, v = _rand(len(k_pos), KV_HEADS, gen, device), _rand(len(k_pos), KV_HEADS, gen, device)
    q_pos = torch.arange(length - CHUNK, length, device=device)
    d_out, d_lse = _check(q, q_pos, k, v, k_pos, window, softcap)
    ms, generic = _both_ms(q, q_pos, k, v, k_pos, window, softcap)
    # Baseline: the paged kernel over a contiguous cache holding as many keys, with the queries
    # at its end (the same number of keys read; a similar number of kept pairs).
    m = len(k_pos)
    base = _paged_ms(q, k, v, m, window, softcap)
    pairs = _pairs(q_pos, k_pos, window)
    contiguous = torch.arange(m, device=device)
    base_pairs = _pairs(contiguous[m - CHUNK :], contiguous, window)
    extra = f", window {window}, cap {softcap:g}" if window or softcap else ""
    return dict(
        name=f"cp=4 shard, L={length}{extra}",
        ms=ms,
        tflops=_tflops(pairs, ms),
        generic_tflops=_tflops(pairs, generic),
        base_name=f"paged_attention_triton over {m} contiguous keys"
        + (", same window and cap" if extra else ""),
        base_ms=base,
        base_tflops=_tflops(base_pairs, base),
        d_out=d_out,
        d_lse=d_lse,
    )


def bench_ring_step(length: int, device: torch.device) -> dict[str, Any]:
    gen = torch.Generator(device=device).manual_seed(SEED)
    q_pos, k_pos = _striped(length, CP - 1, device), _striped(length, 0, device)
    q = _rand(len(q_pos), Q_HEADS, gen, device)
    k, v = _rand(len(k_pos), KV_HEADS, gen, device), _rand(len(k_pos), KV_HEADS, gen, device)
    d_out, d_lse = _check(q, q_pos, k, v, k_pos)
    ms, generic = _both_ms(q, q_pos, k, v, k_pos)
    share = length // CP
    qc = _rand(share, Q_HEADS, gen, device)
    kc, vc = _rand(share, KV_HEADS, gen, device), _rand(share, KV_HEADS, gen, device)
    base = _paged_ms(qc, kc, vc, share)
    causal = torch.arange(share, device=device)
    return dict(
        name=f"ring step (rank 3 queries, rank 0 keys), chunk {length}",
        ms=ms,
        tflops=_tflops(_pairs(q_pos, k_pos), ms),
        generic_tflops=_tflops(_pairs(q_pos, k_pos), generic),
        base_name=f"paged_attention_triton, causal {share}",
        base_ms=base,
        base_tflops=_tflops(_pairs(causal, causal), base),
        d_out=d_out,
        d_lse=d_lse,
    )


def run(device: torch.device) -> list[dict[str, Any]]:
    rows = [bench_prefix_chunk(n, device) for n in (32768, 131072)]
    rows += [bench_cp_shard(n, device) for n in (131072, 524288)]
    rows.append(bench_ring_step(65536, device))
    rows.append(bench_cp_shard(131072, device, window=4096, softcap=50.0))
    return rows


def _line(r: dict[str, Any]) -> str:
    return (
        f"| {r['name']} | {r['ms']:.2f} ms, {r['tflops']:.0f} TFLOP/s | "
        f"{r['generic_tflops']:.0f} TFLOP/s | {r['base_name']}: "
        f"{r['base_ms']:.2f} ms, {r['base_tflops']:.0f} TFLOP/s | "
        f"{r['tflops'] / r['base_tflops']:.2f} | {r['d_out']:.1e} / {r['d_lse']:.1e} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write a markdown report here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    device = torch.device("cuda")
    rows = run(device)
    head = (
        "| workload | position_attention_triton (keys_sorted) | generic path | baseline | "
        "rate ratio | max diff out / lse |\n"
        "|---|---|---|---|---|---|"
    )
    table = "\n".join([head, *(_line(r) for r in rows)])
    print(table, flush=True)
    worst = min(r["tflops"] / r["base_tflops"] for r in rows)
    print(f"position_attention: {len(rows)} workloads, worst rate vs baseline {worst:.2f}x")
    if args.out:
        args.out.write_text(
            f"# position_attention on {torch.cuda.get_device_name()}, {datetime.date.today()}\n\n"
            f"torch {torch.__version__}; `python bench/kernel_bench_position.py`\n\n{table}\n"
        )


if __name__ == "__main__":
    main()
