"""CPU benchmark of LoRA adapters served beside the base model: batched generation with every
request on the base model, every request on one adapter, and the requests spread over four
adapters, in one run.

    python bench/lora.py [--batch 8] [--rank 16] [--max-new-tokens 64] [--repeats 3] [--report PATH]

On the demo model (SmolLM2-135M-Instruct, fp32, in-process executor), four random adapters of
rank `--rank` on every projection of every layer (q, k, v, o, gate, up, down). Decode steps
run on the native CPU decoder, adapter rows included; the adapter modes are also timed layer by
layer (`DIST_RUNTIME_CPU_DECODE=layers`), the path steps with adapter rows took before the
native decoder took them. Each repeat sends
`--batch` prompts of about 60 tokens (fresh per repeat, so the prefix cache serves none) with
greedy decoding past EOS to `--max-new-tokens`, and times `generate` from call to return.
Reported: medians of generated tokens per second and their ratio to the base model's. Then, on
a runtime with one adapter slot (`max_loras=1`) and the four adapters registered, the time of
one-token requests whose adapter holds the slot, takes it from the workers' host cache, or is
read from its folder (its first use). One summary line; `--report` writes a markdown report.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.machine import cpu_report_header  # noqa: E402
from dist_runtime import Runtime, SamplingParams  # noqa: E402
from dist_runtime.config import CPU_DECODE_ENV  # noqa: E402
from dist_runtime.formats.demo_model import demo_model_path  # noqa: E402
from dist_runtime.formats.lora_adapter import write_random_adapter  # noqa: E402

ADAPTERS = ("a0", "a1", "a2", "a3")
MODES = {
    "base model": lambda i: None,
    "one adapter": lambda i: ADAPTERS[0],
    "four adapters": lambda i: ADAPTERS[i % len(ADAPTERS)],
    "one adapter, layer by layer": lambda i: ADAPTERS[0],
    "four adapters, layer by layer": lambda i: ADAPTERS[i % len(ADAPTERS)],
}
"""Modes ending in LAYERS run their decode steps without the native CPU decoder
(DIST_RUNTIME_CPU_DECODE=layers)."""
LAYERS = ", layer by layer"


def prompts(batch: int, repeat: int) -> list[str]:
    return [
        f"Request {repeat}-{i}: write a short note about harbour number {i * 7 + repeat} and "
        "the boats that sail from it in the morning, with their names and their captains."
        for i in range(batch)
    ]


def demo_runtime(model: Path, modules: dict[str, str], **kw: Any) -> Runtime:
    return Runtime(
        model=str(model), device="cpu", dtype="float32", session_len=1024, lora_modules=modules,
        **kw,
    )  # fmt: skip


def swap_times(model: Path, modules: dict[str, str], repeats: int) -> dict[str, list[float]]:
    """Seconds of one-token requests on a runtime with one adapter slot and every adapter
    registered: adapter resident, adapter copied into the slot from the host cache, adapter
    read from its folder (its first use)."""
    times: dict[str, list[float]] = {"resident": [], "from host cache": [], "from its folder": []}
    # every adapter's shards kept once read
    rt = demo_runtime(model, modules, max_loras=1, max_cpu_loras=len(modules))
    try:
        rt.generate(["warm up"], SamplingParams(max_new_tokens=1))
        calls = iter(range(10**6))

        def one(name: str) -> float:
            start = time.perf_counter()
            rt.generate([f"request {next(calls)}"], SamplingParams(max_new_tokens=1, adapter=name))
            return time.perf_counter() - start

        names = list(modules)  # the first is in the slot from the start
        for name in names[1:]:
            times["from its folder"].append(one(name))
        for _ in range(repeats):
            for name in names:  # each takes the slot from the one before it
                times["from host cache"].append(one(name))
                times["resident"].append(one(name))
    finally:
        rt.shutdown()
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report", help="write a markdown report here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = demo_model_path()
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as tmp:
        modules = {
            name: str(write_random_adapter(Path(tmp) / name, model, rank=args.rank, seed=i))
            for i, name in enumerate(ADAPTERS)
        }
        rt = demo_runtime(model, modules)
        try:
            tps: dict[str, list[float]] = {mode: [] for mode in MODES}
            for repeat in range(args.repeats + 1):  # the first round warms up
                for m, (mode, pick) in enumerate(MODES.items()):
                    texts = prompts(args.batch, repeat * len(MODES) + m)
                    params = [
                        SamplingParams(
                            max_new_tokens=args.max_new_tokens, ignore_eos=True, adapter=pick(i)
                        )
                        for i in range(args.batch)
                    ]
                    os.environ[CPU_DECODE_ENV] = "layers" if mode.endswith(LAYERS) else "fused"
                    start = time.perf_counter()
                    outs = rt.generate(texts, params)
                    seconds = time.perf_counter() - start
                    tokens = sum(len(o.token_ids) for o in outs)
                    if repeat:
                        tps[mode].append(tokens / seconds)
        finally:
            os.environ.pop(CPU_DECODE_ENV, None)
            rt.shutdown()
        swaps = swap_times(model, modules, args.repeats)
    med = {mode: statistics.median(v) for mode, v in tps.items()}
    base = med["base model"]
    summary = (
        f"lora: batch {args.batch}, rank {args.rank}, {args.max_new_tokens} new tokens: "
        + ", ".join(f"{mode} {med[mode]:.0f} tok/s ({med[mode] / base:.2f}x)" for mode in MODES)
        + "; one slot, one-token requests: "
        + ", ".join(f"{kind} {statistics.median(v) * 1000:.1f} ms" for kind, v in swaps.items())
    )
    print(summary)
    if args.report:
        lines = [
            *cpu_report_header("LoRA adapters on CPU", summary, args.threads),
            f"- demo model (SmolLM2-135M-Instruct, fp32); {len(ADAPTERS)} random adapters of "
            f"rank {args.rank} on every projection; batch {args.batch}, prompts of about 60 "
            f"tokens, {args.max_new_tokens} new tokens (greedy, past EOS); "
            f"{args.repeats} repeats after one warm-up",
            "",
            "| requests | tokens/s (median) | vs base | each repeat |",
            "|---|---:|---:|---|",
        ]
        for mode in MODES:
            each = ", ".join(f"{v:.0f}" for v in tps[mode])
            lines.append(f"| {mode} | {med[mode]:.0f} | {med[mode] / base:.2f}x | {each} |")
        lines += [
            "",
            "One slot (`max_loras=1`), the four adapters registered: a one-token request whose "
            "adapter holds the slot, one whose adapter takes the slot from the workers' host "
            "cache, and one whose adapter is read from its folder (its first use).",
            "",
            "| request | ms (median) | each |",
            "|---|---:|---|",
        ]
        for kind, values in swaps.items():
            each = ", ".join(f"{v * 1000:.1f}" for v in values)
            lines.append(f"| {kind} | {statistics.median(values) * 1000:.1f} | {each} |")
        Path(args.report).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
