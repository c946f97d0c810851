"""Decode launched one step ahead against step by step, over Ray, in one run.

    python bench/async_decode.py                       # demo model, tp 3, batch 1 and 8
    python bench/async_decode.py --tp 2 --cp 2 --report docs/benchmarks/async_decode_cpu_<date>.md

Step by step (`DIST_RUNTIME_ASYNC_DECODE=0`), the driver sends a decode step to every worker,
waits for the driver rank's tokens, processes them, plans the next step and only then sends it:
the workers idle through that round trip and the engine's work. Launched ahead (`=1`), the
next plain greedy decode step is queued on the workers before the step in flight is read, so
a worker starts it the moment it ends the one before; the ids it decodes come from that step's
picks (from the device where a decode graph picked them, otherwise broadcast by the driver
rank). Both modes decode the same greedy requests (`ignore_eos`, same prompts) on fresh
runtimes in alternating rounds; the rate is tokens after the first over the time from each
request's first token to its last, as a caller sees it. Tokens must match between the modes.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dist_runtime import Runtime, SamplingParams  # noqa: E402
from dist_runtime.config import ASYNC_DECODE_ENV, CacheConfig, SchedulerConfig  # noqa: E402
from dist_runtime.formats.demo_model import demo_model_path  # noqa: E402

MODES = {"0": "step by step", "1": "launched ahead"}


def _prompts(batch: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 40000, (length,), generator=gen).tolist() for _ in range(batch)]


def decode_rate(rt: Runtime, batch: int, args: argparse.Namespace) -> tuple[float, list[Any]]:
    """Tokens per second per sequence after the first token, and the token ids."""
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    prompts = _prompts(batch, args.prompt_len, seed=batch)
    handles = rt.add_requests(prompts, [params] * batch)
    outs = [h.result() for h in handles]
    first = max(h.first_token_time or 0.0 for h in handles)
    last = max(h.finish_time or 0.0 for h in handles)
    assert all(len(o.token_ids) == args.new_tokens for o in outs)
    return (args.new_tokens - 1) / (last - first), [o.token_ids for o in outs]


def run_mode(flag: str, args: argparse.Namespace, batches: list[int]) -> dict[int, Any]:
    os.environ[ASYNC_DECODE_ENV] = flag
    kw: dict[str, Any] = dict(
        tp=args.tp,
        cp=args.cp,
        device="cpu",
        session_len=args.prompt_len + args.new_tokens + 16,
        cache=CacheConfig(enable_prefix_caching=False, num_blocks=args.num_blocks),
        scheduler=SchedulerConfig(max_num_seqs=max(batches)),
    )
    out: dict[int, Any] = {}
    with Runtime(model=str(demo_model_path()), **kw) as rt:
        decode_rate(rt, 1, args)  # warm-up
        for batch in batches:
            rates, tokens = [], None
            for _ in range(args.repeats):
                rate, tokens = decode_rate(rt, batch, args)
                rates.append(rate)
            out[batch] = (statistics.median(rates), tokens)
        out[-1] = rt.engine.num_steps_ahead
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tp", type=int, default=3)
    p.add_argument("--cp", type=int, default=1)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per batch size and round")
    p.add_argument("--rounds", type=int, default=2, help="fresh runtimes per mode, alternating")
    p.add_argument("--num-blocks", type=int, default=256)
    p.add_argument("--report", type=Path)
    args = p.parse_args()
    if args.tp * args.cp < 2:
        p.error(f"--tp {args.tp} --cp {args.cp} is one worker; this compares Ray runs (tp*cp > 1)")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    started = time.perf_counter()
    results: dict[str, list[dict[int, Any]]] = {flag: [] for flag in MODES}
    for _ in range(args.rounds):
        for flag in MODES:
            results[flag].append(run_mode(flag, args, batches))
    rows, ratios = [], []
    for batch in batches:
        rate = {f: statistics.median(r[batch][0] for r in results[f]) for f in MODES}
        same = all(r[batch][1] == results["0"][0][batch][1] for f in MODES for r in results[f])
        if not same:
            raise SystemExit(f"batch {batch}: the modes decoded different tokens")
        ratios.append(rate["1"] / rate["0"])
        rows.append(
            f"| {batch} | {rate['0']:.1f} | {rate['1']:.1f} | {ratios[-1]:.2f}x | "
            f"{1e3 / rate['0']:.2f} | {1e3 / rate['1']:.2f} |"
        )
    ahead = [r[-1] for r in results["1"]]
    summary = (
        f"async-decode tp={args.tp} cp={args.cp}: "
        + " ".join(f"b{b} {x:.2f}x" for b, x in zip(batches, ratios))
        + " (launched ahead / step by step, decode token/s per sequence; tokens identical)"
    )
    lines = [
        f"# Decode launched ahead vs step by step, CPU, {datetime.date.today()}",
        "",
        "```",
        "python bench/async_decode.py " + " ".join(sys.argv[1:]),
        "```",
        "",
        f"Demo model (SmolLM2-135M-Instruct, fp32), tp {args.tp} x cp {args.cp} over Ray on "
        f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}); prompts of "
        f"{args.prompt_len} random tokens, {args.new_tokens} greedy new tokens each, prefix "
        f"cache off; median of {args.repeats} runs x {args.rounds} fresh runtimes per mode.",
        "",
        "| batch | step by step token/s | launched ahead token/s | ratio | ms/step before | "
        "ms/step after |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Steps launched ahead per runtime: {ahead}.",
        "",
        summary,
        "",
        f"Wall time of the whole run: {time.perf_counter() - started:.0f} s.",
    ]
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[8:-4]))
    print(summary)


if __name__ == "__main__":
    main()
