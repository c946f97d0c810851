r"""W4A16 GEMM (`kernels/w4a16.py`) on InternLM2.5-7B's linear shapes, against the float matmul.

    python bench/w4a16.py                          # CUDA: M = 1, 8, 64, 4096
    python bench/w4a16.py --device cpu             # CPU: M = 1, 8, 64
    python bench/w4a16.py --m 1,16 --report PATH   # other token counts; a markdown report

Shapes (hidden 4096, intermediate 14336, 32 query / 8 KV heads of 128; K -> N): qkv 4096 ->
6144, o 4096 -> 4096, gate_up 4096 -> 28672, down 14336 -> 4096; random 4-bit codes, float16
scales and zeros per group of `--group` inputs (default 128), M activation rows.

- **CUDA**: the Triton kernel (`w4a16_matmul_triton`, float16 activations) against `F.linear`
  on the same weight dequantized to float16, in the same run; each call captured in a CUDA
  graph and replayed under `triton.testing.do_bench` (L2 flushed before each replay, median).
  Also the largest difference between the two outputs.
- **CPU**: the serving fallback (the weight dequantized once with `dequantized_weight`, then
  `F.linear` in float32) against a float32 `F.linear` on a float weight of the same shape, and
  the torch twin (`w4a16_matmul_torch`, which dequantizes on every call); median of `--reps`
  calls after one warm-up (`--twin-reps` for the twin). Also the one-time dequantize cost (the
  faster of two calls: the first also pays for first touches of fresh memory).

TFLOP/s = 2 M N K / time. GB/s = the bytes an implementation must move once / time: int4
weights K N / 2 plus scales and zeros (2 x groups x N x 2 bytes), or float weights K N x dtype
size, plus activations M K and outputs M N in the activation dtype. One summary line at the end
compares the time of a layer's four linears per M.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.machine import code_version, cpu_model, usable_cores  # noqa: E402
from dist_runtime.formats.int4 import Int4Weight  # noqa: E402
from kernels.w4a16 import (  # noqa: E402
    DECODE_MAX_M,  # noqa: E402
    dequantized_weight,
    pick_config,
    w4a16_matmul_torch,
    w4a16_matmul_triton,
)

LINEARS = [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)]
"""(name, K, N) of InternLM2.5-7B's linears at tp 1."""
DEFAULT_M = {"cuda": "1,8,64,4096", "cpu": "1,8,64"}
SEED = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", default=default_device, choices=["cpu", "cuda"])
    p.add_argument(
        "--m", help="comma-separated token counts (default: CUDA 1,8,64,4096; CPU 1,8,64)"
    )
    p.add_argument("--group", type=int, default=128, help="quantization group size")
    p.add_argument("--reps", type=int, default=3, help="CPU: timed calls per float matmul")
    p.add_argument("--twin-reps", type=int, default=1, help="CPU: timed calls of the torch twin")
    p.add_argument("--threads", type=int, default=usable_cores(), help="CPU: torch threads")
    p.add_argument("--report", help="write a markdown report here")
    args = p.parse_args(argv)
    args.ms = [int(v) for v in (args.m or DEFAULT_M[args.device]).split(",")]
    return args


def random_weight(
    k: int, n: int, group: int, device: torch.device, gen: torch.Generator
) -> Int4Weight:
    """Random codes (every nibble uniform), float16 scales, zeros 0..15 as float16."""
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(k // group, n, generator=gen) * 0.004 + 0.002).half()
    zeros = torch.randint(0, 16, (k // group, n), generator=gen).half()
    return Int4Weight(qweight.to(device), scales.to(device), zeros.to(device), group)


def int4_bytes(w: Int4Weight) -> int:
    return sum(t.numel() * t.element_size() for t in (w.qweight, w.scales, w.zeros))


def gflop(m: int, k: int, n: int) -> float:
    return 2 * m * n * k / 1e9


def io_bytes(m: int, k: int, n: int, dtype: torch.dtype) -> int:
    return (m * k + m * n) * dtype.itemsize


def cpu_ms(fn: Callable[[], Any], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def cuda_ms(fn: Callable[[], Any]) -> float:
    """Median time of one call replayed from a CUDA graph (no Python launch overhead), with
    `do_bench` flushing L2 before each replay (weights stream from HBM, as in a real layer)."""
    from triton.testing import do_bench

    for _ in range(3):  # compile, autotune cuBLAS, warm the allocator
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return float(do_bench(graph.replay, warmup=25, rep=100, return_mode="median"))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest difference, relative to the reference's RMS."""
    ref = ref.float()
    rms = ref.pow(2).mean().sqrt().clamp(min=1e-30)
    return float(((out.float() - ref).abs().max() / rms).item())


def bench_cuda(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device("cuda")
    dtype = torch.float16
    gen = torch.Generator().manual_seed(SEED)
    weights = {name: random_weight(k, n, args.group, device, gen) for name, k, n in LINEARS}
    dense = {name: dequantized_weight(w, dtype) for name, w in weights.items()}
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    rows = []
    for m in args.ms:
        for name, k, n in LINEARS:
            w, wd = weights[name], dense[name]
            x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
            err = rel_err(w4a16_matmul_triton(x, w), F.linear(x, wd))
            t_w4 = cuda_ms(partial(w4a16_matmul_triton, x, w))
            t_fp = cuda_ms(partial(F.linear, x, wd))
            c = pick_config(m, n, k, args.group, sms)
            w4_bytes = int4_bytes(w) + io_bytes(m, k, n, dtype)
            fp_bytes = k * n * dtype.itemsize + io_bytes(m, k, n, dtype)
            rows.append(
                dict(
                    m=m,
                    linear=name,
                    k=k,
                    n=n,
                    config=f"{c.block_m}x{c.block_n}x{c.block_k} split {c.split_k}",
                    w4_ms=t_w4,
                    fp_ms=t_fp,
                    w4_tflops=gflop(m, k, n) / t_w4,
                    fp_tflops=gflop(m, k, n) / t_fp,
                    w4_gbps=w4_bytes / t_w4 / 1e6,
                    fp_gbps=fp_bytes / t_fp / 1e6,
                    err=err,
                )
            )
            r = rows[-1]
            print(
                f"M={m:5d} {name:8s} w4a16 {t_w4 * 1e3:8.1f} us {r['w4_tflops']:6.1f} TFLOP/s "
                f"{r['w4_gbps']:7.0f} GB/s | fp16 {t_fp * 1e3:8.1f} us {r['fp_tflops']:6.1f} "
                f"TFLOP/s {r['fp_gbps']:7.0f} GB/s | x{t_fp / t_w4:.2f} ({r['config']}, "
                f"max diff {err:.1e} of RMS)",
                flush=True,
            )
    return rows


def bench_cpu(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, float]]:
    device = torch.device("cpu")
    dtype = torch.float32
    gen = torch.Generator().manual_seed(SEED)
    weights, cached, floats, load_ms = {}, {}, {}, {}
    for name, k, n in LINEARS:
        weights[name] = random_weight(k, n, args.group, device, gen)
        times = []
        for _ in range(2):  # the first call also pays for first touches of fresh memory
            started = time.perf_counter()
            cached[name] = dequantized_weight(weights[name], dtype)
            times.append(time.perf_counter() - started)
        load_ms[name] = min(times) * 1e3
        floats[name] = torch.randn(n, k, generator=gen) * 0.02
        print(f"{name}: dequantize once {load_ms[name]:.0f} ms", flush=True)
    rows = []
    for m in args.ms:
        for name, k, n in LINEARS:
            w, wc, wf = weights[name], cached[name], floats[name]
            x = torch.randn(m, k, generator=gen)
            err = rel_err(F.linear(x, wc), w4a16_matmul_torch(x, w))
            t_fp = cpu_ms(partial(F.linear, x, wf), args.reps)
            t_fb = cpu_ms(partial(F.linear, x, wc), args.reps)
            t_tw = cpu_ms(partial(w4a16_matmul_torch, x, w), args.twin_reps)
            fp_bytes = k * n * dtype.itemsize + io_bytes(m, k, n, dtype)
            rows.append(
                dict(
                    m=m,
                    linear=name,
                    k=k,
                    n=n,
                    fp_ms=t_fp,
                    fb_ms=t_fb,
                    tw_ms=t_tw,
                    fp_gbps=fp_bytes / t_fp / 1e6,
                    fb_gbps=fp_bytes / t_fb / 1e6,
                    tw_gbps=(int4_bytes(w) + io_bytes(m, k, n, dtype)) / t_tw / 1e6,
                    fb_tflops=gflop(m, k, n) / t_fb,
                    err=err,
                )
            )
            print(
                f"M={m:3d} {name:8s} fp32 {t_fp:7.1f} ms | fallback {t_fb:7.1f} ms "
                f"({rows[-1]['fb_gbps']:.1f} GB/s) | twin {t_tw:7.1f} ms | fallback vs twin "
                f"max diff {err:.1e} of RMS",
                flush=True,
            )
    memory = {
        "int4_mb": sum(int4_bytes(w) for w in weights.values()) / 1e6,
        "cache_mb": sum(t.numel() * t.element_size() for t in cached.values()) / 1e6,
        "load_ms": sum(load_ms.values()),
    }
    return rows, memory


def per_m(rows: list[dict[str, Any]], key: str) -> dict[int, float]:
    """Sum of `key` over the four linears, per M."""
    out: dict[int, float] = {}
    for r in rows:
        out[r["m"]] = out.get(r["m"], 0.0) + r[key]
    return out


def summary_cuda(rows: list[dict[str, Any]]) -> str:
    w4, fp = per_m(rows, "w4_ms"), per_m(rows, "fp_ms")
    decode = [f"M={m}: x{fp[m] / w4[m]:.2f}" for m in w4 if m <= DECODE_MAX_M]
    prefill = [f"M={m}: x{fp[m] / w4[m]:.2f}" for m in w4 if m > DECODE_MAX_M]
    parts = [
        f"{label} {', '.join(v)}" for label, v in (("decode", decode), ("prefill", prefill)) if v
    ]
    return (
        f"w4a16 vs fp16 F.linear ({torch.cuda.get_device_name()}), a layer's 4 linears: "
        + "; ".join(parts)
    )


def summary_cpu(rows: list[dict[str, Any]], memory: dict[str, float]) -> str:
    fp, fb, tw = per_m(rows, "fp_ms"), per_m(rows, "fb_ms"), per_m(rows, "tw_ms")
    fallback = ", ".join(f"M={m}: x{fp[m] / fb[m]:.2f}" for m in fb)
    twin = ", ".join(f"M={m}: x{fp[m] / tw[m]:.3f}" for m in tw)
    return (
        f"w4a16 cpu, a layer's 4 linears vs fp32 F.linear: dequantize-once fallback {fallback}; "
        f"torch twin {twin}; dequantize at load {memory['load_ms']:.0f} ms, cache "
        f"{memory['cache_mb']:.0f} MB = x{memory['cache_mb'] / memory['int4_mb']:.1f} the int4 "
        f"{memory['int4_mb']:.0f} MB"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    memory: dict[str, float] = {}
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device")
        rows = bench_cuda(args)
        line = summary_cuda(rows)
    else:
        torch.set_num_threads(args.threads)
        rows, memory = bench_cpu(args)
        line = summary_cpu(rows, memory)
    print(line)
    if args.report:
        write_report(args, rows, memory, line)
    return 0


def write_report(
    args: argparse.Namespace, rows: list[dict[str, Any]], memory: dict[str, float], line: str
) -> None:
    if args.device == "cuda":
        machine = f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}"
        table = [
            "| M | linear | K -> N | tiles (M x N x K, split K) | w4a16 | TFLOP/s | GB/s | "
            "fp16 F.linear | TFLOP/s | GB/s | speedup | max diff / RMS |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            table.append(
                f"| {r['m']} | {r['linear']} | {r['k']} -> {r['n']} | {r['config']} | "
                f"{r['w4_ms'] * 1e3:.1f} us | {r['w4_tflops']:.1f} | {r['w4_gbps']:.0f} | "
                f"{r['fp_ms'] * 1e3:.1f} us | {r['fp_tflops']:.1f} | {r['fp_gbps']:.0f} | "
                f"x{r['fp_ms'] / r['w4_ms']:.2f} | {r['err']:.1e} |"
            )
        notes = (
            "- w4a16: `w4a16_matmul_triton`, float16 activations, tiles from `pick_config`; "
            "fp16: `F.linear` on the same weight dequantized to float16.\n"
            "- Times: one call captured in a CUDA graph, replayed under `triton.testing.do_bench` "
            "(L2 flushed before each replay; median over 100 ms of replays)."
        )
    else:
        machine = f"{cpu_model()}, {args.threads} torch threads of {usable_cores()} usable cores"
        table = [
            "| M | linear | K -> N | fp32 F.linear | GB/s | dequantize-once fallback | GB/s | "
            "TFLOP/s | torch twin | GB/s (int4) | fallback vs twin, max diff / RMS |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            table.append(
                f"| {r['m']} | {r['linear']} | {r['k']} -> {r['n']} | {r['fp_ms']:.1f} ms | "
                f"{r['fp_gbps']:.1f} | {r['fb_ms']:.1f} ms | {r['fb_gbps']:.1f} | "
                f"{r['fb_tflops']:.3f} | {r['tw_ms']:.1f} ms | {r['tw_gbps']:.2f} | "
                f"{r['err']:.1e} |"
            )
        notes = (
            "- fp32 F.linear: a float32 weight of the same shape. Fallback: `F.linear` on the "
            "weight `dequantized_weight` returned once at load "
            f"({memory['load_ms']:.0f} ms for the four linears; {memory['cache_mb']:.0f} MB "
            f"float32 against {memory['int4_mb']:.0f} MB of int4 codes, scales and zeros). "
            "Torch twin: `w4a16_matmul_torch`, which dequantizes the whole weight every call.\n"
            f"- Times: median of {args.reps} calls after one warm-up ({args.twin_reps} for the "
            "twin); dequantize at load: the faster of two calls per linear (the first also pays "
            "for first touches of fresh memory)."
        )
    ms = ",".join(str(m) for m in args.ms)
    text = f"""# W4A16 GEMM ({args.device}, {datetime.date.today()})

`python bench/w4a16.py --device {args.device} --m {ms} --group {args.group}` on {machine},
torch {torch.__version__}; code {code_version()}.

InternLM2.5-7B linears (K -> N), random 4-bit weights with float16 scales and zeros per group of
{args.group} inputs.

{chr(10).join(table)}

{notes}
- TFLOP/s = 2 M N K / time; GB/s = bytes moved once (weights as stored, with scales and zeros
  for int4; activations and outputs) / time.

Summary: `{line}`
"""
    Path(args.report).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
