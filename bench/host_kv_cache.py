"""CPU benchmark of the prefix cache's host tier: a document asked about again after another
document pushed its KV blocks out of the device cache.

    python bench/host_kv_cache.py [--tries 3] [--device-blocks 150] [--report PATH]

Two Runtimes on the demo model (SmolLM2-135M-Instruct, fp32, in-process executor), both with a
device KV cache of `--device-blocks` blocks of 16 tokens (room for one ~2,100-token document of
`--sections 24` and its answers, not two), one with a host tier (`host_kv_cache_gb = --host-gb`)
and one without. Each try, in each runtime in turn: three questions about report A (`rt.ask`),
three about report B (another seed of the same generator, so its blocks evict A's), then three
more about A, timed from the call to the last answer. Reported per runtime: the median time of
that last ask, the prompt tokens it computed and how many came back from the host tier; the
answers of both runtimes are compared. One summary line; `--report` writes a markdown report.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.machine import cpu_report_header  # noqa: E402
from dist_runtime import Runtime, SamplingParams  # noqa: E402
from dist_runtime.config import CacheConfig  # noqa: E402
from dist_runtime.formats.demo_model import demo_model_path  # noqa: E402
from dist_runtime.text.documents import harbor_report  # noqa: E402

QUESTIONS = [
    "Who is the mayor of Kelmsby?",
    "Who keeps the lighthouse?",
    "What is the name of the largest boat of the fleet?",
]
MORE = [
    "What happened in March?",
    "When is the town hall open?",
    "Where should visitors park?",
]


def one_try(rt: Runtime, doc_a: str, doc_b: str, params: SamplingParams) -> dict[str, Any]:
    rt.ask(doc_a, QUESTIONS, params)
    rt.ask(doc_b, QUESTIONS, params)
    before = rt.engine.stats()
    start = time.perf_counter()
    answers = rt.ask(doc_a, MORE, params)
    seconds = time.perf_counter() - start
    after = rt.engine.stats()
    return {
        "seconds": seconds,
        "answers": answers,
        "computed": after["num_prompt_tokens_computed"] - before["num_prompt_tokens_computed"],
        "from_host": after["prefix_cache_host_hit_tokens"] - before["prefix_cache_host_hit_tokens"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tries", type=int, default=3)
    p.add_argument("--sections", type=int, default=24, help="report sections (~150 tokens each)")
    p.add_argument("--device-blocks", type=int, default=150, help="device KV blocks (16 tokens)")
    p.add_argument("--host-gb", type=float, default=1.0, help="host tier of the tiered runtime")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report", help="write a markdown report here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    doc_a = harbor_report(seed=7, num_sections=args.sections).text
    doc_b = harbor_report(seed=8, num_sections=args.sections).text
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
    runtimes = {
        mode: Runtime(
            model=str(demo_model_path()),
            device="cpu",
            dtype="float32",
            session_len=4096,
            cache=CacheConfig(num_blocks=args.device_blocks, host_kv_cache_gb=gb),
        )
        for mode, gb in (("device only", 0.0), ("host tier", args.host_gb))
    }
    results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in runtimes}
    try:
        tokens_a = len(runtimes["device only"].encode(doc_a))
        for _ in range(args.tries):
            for mode, rt in runtimes.items():
                results[mode].append(one_try(rt, doc_a, doc_b, params))
    finally:
        for rt in runtimes.values():
            rt.shutdown()

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in results[mode])

    same = all(
        a["answers"] == b["answers"]
        for a, b in zip(results["device only"], results["host tier"], strict=True)
    )
    dev, host = "device only", "host tier"
    summary = (
        f"host-kv-cache: a {tokens_a}-token document asked again after another evicted it: "
        f"{med(host, 'seconds'):.2f} s with the host tier vs {med(dev, 'seconds'):.2f} s without "
        f"({med(dev, 'seconds') / med(host, 'seconds'):.1f}x); prompt tokens computed "
        f"{med(host, 'computed'):.0f} vs {med(dev, 'computed'):.0f} "
        f"({med(host, 'from_host'):.0f} copied back); answers identical: {same}"
    )
    print(summary)
    if args.report:
        lines = [
            *cpu_report_header("Host tier of the prefix cache on CPU", summary, args.threads),
            f"- demo model (SmolLM2-135M-Instruct, fp32); device cache {args.device_blocks} "
            f"blocks of 16 tokens; host tier {args.host_gb} GiB; {args.tries} tries; greedy, "
            f"up to {args.max_new_tokens} new tokens",
            "",
            "| runtime | last ask (median s) | prompt tokens computed | from the host tier |",
            "|---|---:|---:|---:|",
        ]
        for mode in (dev, host):
            lines.append(
                f"| {mode} | {med(mode, 'seconds'):.2f} | {med(mode, 'computed'):.0f} | "
                f"{med(mode, 'from_host'):.0f} |"
            )
        Path(args.report).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
