"""Decode-sized linear layers: the Triton GEMV (`kernels/gemv.py`) against cuBLAS (F.linear).

    python bench/kernel_bench_gemv.py          # on a CUDA machine

The InternLM2.5-7B layer shapes at tp 1 (qkv 6144 x 4096, o 4096 x 4096, gate-up 28672 x 4096,
down 4096 x 14336, LM head 92544 x 4096), bf16, at 1 and 8 rows. Each timing is a CUDA graph of
calls over enough weight copies (>= 512 MB) that no call finds its weight in L2, replayed by
`triton.testing.do_bench`: what a decode graph sees, launch cost excluded. GB/s counts weight
bytes; the device copy rate is measured in the same run. A few tile configs are swept beside the
default (`gemv_config`). The last line sums one 7B decode step's linear layers (32 layers + the
head) both ways, from the best config per shape and from the default.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels.gemv as G  # noqa: E402

SHAPES = {  # name: (N, K, calls per decode step)
    "qkv": (6144, 4096, 32),
    "o": (4096, 4096, 32),
    "gate_up": (28672, 4096, 32),
    "down": (4096, 14336, 32),
    "lm_head": (92544, 4096, 1),
}
ROWS = (1, 8)
SWEEP = [
    dict(BLOCK_N=16, BLOCK_K=512, num_warps=4, num_stages=4),
    dict(BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=4),
    dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3),
    dict(BLOCK_N=32, BLOCK_K=512, num_warps=8, num_stages=3),
    dict(BLOCK_N=16, BLOCK_K=256, num_warps=2, num_stages=4),
]
MIN_BYTES = 512 << 20
DTYPE = torch.bfloat16


def _graph_ms(call: Callable[[], None], reps: int) -> float:
    """ms per call of `call`, replayed `reps` times inside one CUDA graph."""
    import triton.testing

    call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            call()
    return triton.testing.do_bench(graph.replay) / reps


def copy_gbs() -> float:
    """Device-to-device copy of 1 GiB, GB/s counting bytes read and written."""
    import triton.testing

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def bench_shape(
    name: str, m: int, device: str = "cuda", dtype: torch.dtype = DTYPE
) -> dict[str, float | str]:
    """One shape at m rows: cuBLAS, the default config and the sweep (each checked against
    F.linear first); device and dtype other than CUDA bf16 for the CPU smoke test."""
    n, k, _ = SHAPES[name]
    nbytes = n * k * dtype.itemsize
    copies = max(1, -(-MIN_BYTES // nbytes))
    weights = [torch.randn(n, k, device=device, dtype=dtype) / k**0.5 for _ in range(copies)]
    x = torch.randn(m, k, device=device, dtype=dtype)
    turn = [0]

    def step(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def call() -> None:
            fn(weights[turn[0] % copies])
            turn[0] += 1

        return call

    ref = F.linear(x, weights[0]).float()
    cublas = _graph_ms(step(lambda w: F.linear(x, w)), copies)
    default = G.gemv_config(m, n, k, x.device)
    results = {}
    for cfg in [default] + [dict(c, BLOCK_M=default["BLOCK_M"]) for c in SWEEP]:
        out = G.gemv_triton(x, weights[0], config=cfg).float()
        err = (out - ref).abs().max().item() / ref.abs().max().item()
        if err > 2e-2:
            raise SystemExit(f"{name} m={m} {cfg}: relative error {err:.3g} against F.linear")
        key = f"N{cfg['BLOCK_N']} K{cfg['BLOCK_K']} w{cfg['num_warps']} s{cfg['num_stages']}"

        def kernel(w: torch.Tensor, c: dict[str, int] = cfg) -> torch.Tensor:
            return G.gemv_triton(x, w, config=c)

        results[key] = _graph_ms(step(kernel), copies)
    best = min(results, key=lambda c: results[c])
    dkey = next(iter(results))
    weights.clear()
    torch.cuda.empty_cache()
    return dict(
        shape=name,
        m=m,
        bytes=nbytes,
        cublas_ms=cublas,
        default_ms=results[dkey],
        default=dkey,
        best_ms=results[best],
        best=best,
    )


def main() -> int:
    if not torch.cuda.is_available():
        print("kernel_bench_gemv: skipped, no CUDA device", file=sys.stderr)
        return 0
    copy = copy_gbs()
    print(f"{torch.cuda.get_device_name()}: device copy {copy:.0f} GB/s")
    rows = []
    for m in ROWS:
        for name in SHAPES:
            r = bench_shape(name, m)
            rows.append(r)
            gbs = {k: float(r["bytes"]) / float(r[k]) / 1e6 for k in ("cublas_ms", "best_ms")}
            print(
                f"{name:>8} m={m}: cuBLAS {r['cublas_ms']:.4f} ms ({gbs['cublas_ms']:.0f} GB/s, "
                f"{gbs['cublas_ms'] / copy:.0%} of copy) | triton default {r['default_ms']:.4f} "
                f"ms ({r['default']}) | best {r['best_ms']:.4f} ms ({gbs['best_ms']:.0f} GB/s, "
                f"{gbs['best_ms'] / copy:.0%}; {r['best']})",
                flush=True,
            )
    parts = []
    for m in ROWS:
        per = {k: 0.0 for k in ("cublas_ms", "default_ms", "best_ms")}
        for r in rows:
            if r["m"] == m:
                for k in per:
                    per[k] += float(r[k]) * SHAPES[str(r["shape"])][2]
        parts.append(
            f"m={m} cuBLAS {per['cublas_ms']:.3f} ms, triton default {per['default_ms']:.3f} ms "
            f"({per['cublas_ms'] / per['default_ms']:.2f}x), best {per['best_ms']:.3f} ms "
            f"({per['cublas_ms'] / per['best_ms']:.2f}x)"
        )
    print("gemv, one 7B decode step's linear layers: " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
