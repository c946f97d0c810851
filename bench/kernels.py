"""All kernel benchmarks on one CUDA device, with one summary line and a markdown report.

    python bench/kernels.py [--out docs/benchmarks/kernels_<card>_<date>.md]

Attention (prefill TFLOP/s against torch SDPA's flash backend, decode GB/s against a
device-to-device copy) from `bench/kernel_bench_attention.py`, elementwise kernels (GB/s
against their torch references) from `bench/kernel_bench_elementwise.py`; every baseline is
measured in the same run. Targets on H100: prefill >= 400 TFLOP/s at 16K, decode >= 80% of the
copy bandwidth at 128K+ context.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.kernel_bench_attention import bench_attention  # noqa: E402
from bench.kernel_bench_elementwise import bench_elementwise  # noqa: E402


def summary(attn: list[dict[str, Any]], elem: list[dict[str, Any]]) -> str:
    prefill = {r["shape"]: r for r in attn if r["name"] != "flash_decode"}
    p16 = next((r for s, r in prefill.items() if "s=16384" in s), None)
    decode = [r for r in attn if r["name"] == "flash_decode"]
    parts = []
    if p16 is not None:
        parts.append(f"prefill@16K {p16.get('tflops', float('nan')):.0f} TFLOP/s")
    parts += [f"decode {r['shape'].split()[0]} {r['fraction_of_copy']:.0%} of copy" for r in decode]
    parts += [f"{r['kernel']} {r['triton_gbps']:.0f} GB/s" for r in elem]
    return "kernels: " + " | ".join(parts)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", help="markdown report path")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("kernels: skipped, no CUDA device")
        return 0
    device = torch.device("cuda")
    attn, elem = bench_attention(device), bench_elementwise(device)
    rows = [str(r) for r in attn + elem]
    line = summary(attn, elem)
    print("\n".join(rows))
    print(line)
    if args.out:
        name = torch.cuda.get_device_name()
        Path(args.out).write_text(
            f"# Kernels on {name}, {datetime.date.today()}\n\ntorch {torch.__version__}\n\n"
            + "\n".join(f"- {r}" for r in rows)
            + f"\n\n**{line}**\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
