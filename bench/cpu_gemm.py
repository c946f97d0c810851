"""CPU linear layers: the native panel kernel against oneDNN and F.linear, per layer shape.

    python bench/cpu_gemm.py                                   # the demo model's shapes
    python bench/cpu_gemm.py --rows 1,8,512 --report docs/benchmarks/cpu_gemm_<date>.md

For each (rows M, in K, out N) it multiplies M rows by enough distinct weights of that shape
to pass the last-level cache (`--weight-mb` in all), so every weight comes from memory as in a
decode step, and reports the weight bytes read per second (decode sizes are bound by them)
and GFLOP/s, best of `--repeats` after a warm-up, for:

* native: `NativeLinearWeight` (`kernels/cpu_gemm.py`, the default on CPU for float32);
* oneDNN: `PackedLinearWeight`, oneDNN's inner product over its reordered weight;
* F.linear: MKL's sgemm over the plain [out, in] weight, what `DIST_RUNTIME_CPU_GEMM=torch`
  and HF transformers run.

The three are timed in turn within each shape; each result is checked against F.linear first.
The summary line gives native / oneDNN per row count, the geometric mean over the shapes.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels.cpu_gemm import NativeLinearWeight, PackedLinearWeight  # noqa: E402

DEMO_SHAPES = [(576, 960), (576, 576), (576, 1536), (1536, 576), (576, 49152)]
"""(in, out) of the demo model's layers: fused qkv, o, gate / up, down, the LM head."""


def time_best(fn, repeats: int) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_shape(k: int, n: int, rows: list[int], weight_mb: float, repeats: int) -> list:
    count = max(1, int(weight_mb * 1e6 / (n * k * 4)))
    gen = torch.Generator().manual_seed(k * 7 + n)
    weights = [torch.randn(n, k, generator=gen) / k**0.5 for _ in range(count)]
    native = [NativeLinearWeight(w) for w in weights]
    onednn = [PackedLinearWeight(w) for w in weights]
    nbytes = count * n * k * 4
    out = []
    for m in rows:
        x = torch.randn(m, k, generator=gen)
        want = F.linear(x, weights[-1])
        for packed in (native[-1], onednn[-1]):
            torch.testing.assert_close(packed.matmul(x), want, rtol=1e-4, atol=1e-4)
        seconds = {
            "native": time_best(lambda x=x: [w.matmul(x) for w in native], repeats),
            "oneDNN": time_best(lambda x=x: [w.matmul(x) for w in onednn], repeats),
            "F.linear": time_best(lambda x=x: [F.linear(x, w) for w in weights], repeats),
        }
        out.append(
            {
                "m": m,
                "k": k,
                "n": n,
                "seconds": seconds,
                "bytes": nbytes,
                "flops": 2 * m * n * k * count,
            }
        )
        print(
            f"M={m} K={k} N={n}: "
            + ", ".join(f"{name} {nbytes / s / 1e9:.1f} GB/s" for name, s in seconds.items()),
            flush=True,
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", default="1,2,4,8,16,64,512")
    p.add_argument("--weight-mb", type=float, default=300.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report", help="markdown report path")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    results = [
        r for k, n in DEMO_SHAPES for r in measure_shape(k, n, rows, args.weight_mb, args.repeats)
    ]
    ratio = {}
    for m in rows:
        logs = [
            math.log(r["seconds"]["oneDNN"] / r["seconds"]["native"])
            for r in results
            if r["m"] == m
        ]
        ratio[m] = math.exp(sum(logs) / len(logs))
    summary = "cpu-gemm: native / oneDNN " + ", ".join(f"M={m} {ratio[m]:.2f}x" for m in rows)
    print(summary)
    if args.report:
        lines = [
            "| M | K | N | native GB/s | oneDNN GB/s | F.linear GB/s | native GFLOP/s "
            "| oneDNN GFLOP/s | native / oneDNN |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in sorted(results, key=lambda r: (r["m"], r["k"], r["n"])):
            s = r["seconds"]
            lines.append(
                f"| {r['m']} | {r['k']} | {r['n']} | "
                + " | ".join(f"{r['bytes'] / s[name] / 1e9:.1f}" for name in s)
                + f" | {r['flops'] / s['native'] / 1e9:.0f} | {r['flops'] / s['oneDNN'] / 1e9:.0f}"
                + f" | {s['oneDNN'] / s['native']:.2f}x |"
            )
        Path(args.report).write_text(
            f"# CPU linear layers: native panel kernel vs oneDNN vs F.linear "
            f"({datetime.date.today()})\n\n"
            + "\n\n".join(__doc__.split("\n\n")[2:]).strip()
            + f"\n\nMachine: {platform.processor() or platform.machine()}, torch "
            f"{torch.__version__}, {args.threads} threads, {args.weight_mb:g} MB of weights per "
            f"shape, best of {args.repeats}.\n\n"
            + "\n".join(lines)
            + f"\n\n**Summary:** `{summary}`\n\nCommand: `python bench/cpu_gemm.py "
            + " ".join(sys.argv[1:])
            + "`\n"
        )


if __name__ == "__main__":
    main()
