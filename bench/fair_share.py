"""CPU benchmark of the fair share between tenants: one API key floods the engine, another
sends a few requests just after.

    python bench/fair_share.py [--flood 24] [--others 2] [--tries 3] [--report PATH]

Two Runtimes on the demo model (SmolLM2-135M-Instruct, fp32, in-process executor, prefix
caching off so no try profits from another's prompts, `--max-num-seqs` sequence slots), one
with `scheduler.fair_share` on and one with it off, run a try each in turn, `--tries` times. A
try: tenant `a` adds `--flood` requests at once (`--prompt-tokens`-token prompts cut from the
bundled report, `--new-tokens` tokens each, greedy, EOS ignored); when the engine's slots are
all taken, tenant `b` adds `--others` requests of the same shape. Recorded per try: b's time
from its requests' arrival to the last token of its last one, a's likewise (from its
arrival), and the output tokens/s of the whole try. p50 over the tries.

First come, first served, b waits for all of a's requests; with the fair share its requests
take the first slots that free up. One summary line; `--report` writes a markdown report.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.machine import cpu_report_header  # noqa: E402
from dist_runtime import Runtime, SamplingParams  # noqa: E402
from dist_runtime.config import CacheConfig, SchedulerConfig  # noqa: E402
from dist_runtime.formats.demo_model import demo_model_path  # noqa: E402
from dist_runtime.text.documents import harbor_report  # noqa: E402


def one_try(rt: Runtime, prompts: list[list[int]], args: argparse.Namespace) -> dict[str, float]:
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    flood = rt.engine.add_requests(prompts[: args.flood], [params] * args.flood, tenant="a")
    deadline = time.monotonic() + 600
    while len(rt.engine.scheduler.running) < args.max_num_seqs:  # the slots are taken
        if time.monotonic() > deadline:
            raise RuntimeError("the flood never filled the engine's slots")
        time.sleep(0.001)
    asked = time.perf_counter()
    others = rt.engine.add_requests(prompts[args.flood :], [params] * args.others, tenant="b")
    ends: dict[str, float] = {}
    for name, handles in (("b", others), ("a", flood)):
        outs = [h.result(timeout=600) for h in handles]
        assert all(len(o.token_ids) == args.new_tokens for o in outs)
        ends[name] = max(h.finish_time or 0.0 for h in handles)
    wall = time.perf_counter() - start
    t0 = time.monotonic() - time.perf_counter()  # handle times are time.monotonic()
    return {
        "b_done": ends["b"] - t0 - asked,
        "a_done": ends["a"] - t0 - start,
        "tps": (args.flood + args.others) * args.new_tokens / wall,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--flood", type=int, default=24, help="tenant a's requests, added at once")
    p.add_argument("--others", type=int, default=2, help="tenant b's requests, added after")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=4)
    p.add_argument("--tries", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report", help="write a markdown report here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    def runtime(fair: bool) -> Runtime:
        return Runtime(
            model=str(demo_model_path()),
            device="cpu",
            dtype="float32",
            session_len=args.prompt_tokens + args.new_tokens + 16,
            cache=CacheConfig(enable_prefix_caching=False),
            scheduler=SchedulerConfig(
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=256, fair_share=fair
            ),
        )

    modes = {"first come, first served": runtime(False), "fair share": runtime(True)}
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    try:
        rt = next(iter(modes.values()))
        report = rt.encode(harbor_report().text)
        n = args.flood + args.others
        prompts = [
            (report * (args.prompt_tokens // len(report) + 2))[i * 7 : i * 7 + args.prompt_tokens]
            for i in range(n)
        ]
        for rt in modes.values():  # warm-up
            rt.generate(prompts[:2], SamplingParams(max_new_tokens=2, temperature=0.0))
        for _ in range(args.tries):
            for mode, rt in modes.items():
                results[mode].append(one_try(rt, prompts, args))
    finally:
        for rt in modes.values():
            rt.shutdown()

    def p50(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in results[mode])

    fcfs, fair = modes
    summary = (
        f"fair-share: the second key's {args.others} requests done in p50 "
        f"{p50(fair, 'b_done'):.1f} s with the fair share vs {p50(fcfs, 'b_done'):.1f} s first "
        f"come first served ({p50(fcfs, 'b_done') / p50(fair, 'b_done'):.1f}x sooner) while "
        f"another key's {args.flood} fill the engine; that key's done in "
        f"{p50(fair, 'a_done'):.1f} vs {p50(fcfs, 'a_done'):.1f} s; "
        f"{p50(fair, 'tps'):.0f} vs {p50(fcfs, 'tps'):.0f} tok/s in all"
    )
    print(summary)
    if args.report:
        lines = [
            *cpu_report_header("Fair share between API keys on CPU", summary, args.threads),
            f"- demo model (SmolLM2-135M-Instruct, fp32); key a: {args.flood} requests at "
            f"once, key b: {args.others} once the {args.max_num_seqs} sequence slots are "
            f"taken; {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens each; "
            f"{args.tries} tries per mode, alternating",
            "",
            "| mode | key b's last token p50 | key a's last token p50 | tok/s p50 |",
            "|---|---:|---:|---:|",
        ]
        for mode in modes:
            lines.append(
                f"| {mode} | {p50(mode, 'b_done'):.2f} s | {p50(mode, 'a_done'):.2f} s "
                f"| {p50(mode, 'tps'):.1f} |"
            )
        Path(args.report).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
