"""CPU benchmark of speculative decoding by prompt lookup on document questions.

    python bench/speculative.py [--k 4] [--tries 3] [--max-new-tokens 96] [--report PATH]

Two Runtimes on the demo model (SmolLM2-135M-Instruct, fp32, in-process executor), one with
`num_speculative_tokens = --k` and one without, answer the same questions about the bundled
report (`harbor_report`, about 2,100 tokens) through its chat template, greedy, up to
`--max-new-tokens` tokens each (EOS ends an answer). Questions ask the model to quote, list and
summarise, so some answers copy the document and some do not. After a warm-up that fills
each runtime's prefix cache with the document, each try runs every question twice in each
runtime, alternating runtimes: one at a time (batch 1), then all at once (batch `len(questions)`).
A try's time is from adding its requests to the last answer; tokens/s is the output tokens over
that time. The answers of both runtimes are compared token for token.

Reported per batch: output tokens/s (median over tries) with and without speculation, their
ratio, the share of draft tokens accepted and the tokens per step a drafting sequence gained.
One summary line; `--report` writes a markdown report.
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
from dist_runtime.config import SchedulerConfig  # noqa: E402
from dist_runtime.formats.demo_model import demo_model_path  # noqa: E402
from dist_runtime.jobs.doc_qa import qa_prompts  # noqa: E402
from dist_runtime.text.documents import harbor_report  # noqa: E402

QUESTIONS = [
    "Copy the first paragraph of the report word for word.",
    "What happened in March? Quote the report.",
    "Quote what residents were reminded of.",
    "List the months of the report with what happened in each.",
    "Who is the mayor of Kelmsby?",
    "Summarize the report.",
]


def run(rt: Runtime, prompts: list[list[int]], params: SamplingParams, batch: bool) -> dict:
    stats0 = rt.engine.stats()
    start = time.perf_counter()
    if batch:
        outs = rt.generate(prompts, [params] * len(prompts))
    else:
        outs = [rt.generate([p], [params])[0] for p in prompts]
    seconds = time.perf_counter() - start
    stats1 = rt.engine.stats()
    return {
        "seconds": seconds,
        "tokens": sum(len(o.token_ids) for o in outs),
        "ids": [o.token_ids for o in outs],
        "steps": stats1["num_steps"] - stats0["num_steps"],
        "drafted": stats1["num_draft_tokens"] - stats0["num_draft_tokens"],
        "accepted": stats1["num_accepted_tokens"] - stats0["num_accepted_tokens"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens of the runtime")
    p.add_argument("--lookup-min", type=int, default=2, help="prompt_lookup_min")
    p.add_argument("--lookup-max", type=int, default=4, help="prompt_lookup_max")
    p.add_argument("--tries", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report", help="write a markdown report here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    kw: dict[str, Any] = dict(
        model=str(demo_model_path()), device="cpu", dtype="float32", session_len=4096
    )
    runtimes = {
        "off": Runtime(**kw, scheduler=SchedulerConfig(max_num_seqs=8)),
        "on": Runtime(
            **kw,
            scheduler=SchedulerConfig(
                max_num_seqs=8,
                num_speculative_tokens=args.k,
                prompt_lookup_min=args.lookup_min,
                prompt_lookup_max=args.lookup_max,
            ),
        ),
    }
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
    results: dict[tuple[str, str], list[dict]] = {}
    try:
        rt0 = runtimes["off"]
        assert rt0.tokenizer is not None
        prompts = qa_prompts(rt0.tokenizer, harbor_report().text, QUESTIONS)
        for rt in runtimes.values():  # fills the prefix cache with the document
            rt.generate(prompts[:1], [SamplingParams(max_new_tokens=4, temperature=0.0)])
        for _ in range(args.tries):
            for batch in ("1", "all"):
                for mode, rt in runtimes.items():
                    r = run(rt, prompts, params, batch == "all")
                    results.setdefault((batch, mode), []).append(r)
    finally:
        for rt in runtimes.values():
            rt.shutdown()

    same = all(
        a["ids"] == b["ids"]
        for batch in ("1", "all")
        for a, b in zip(results[(batch, "off")], results[(batch, "on")])
    )

    def tps(batch: str, mode: str) -> float:
        return statistics.median(r["tokens"] / r["seconds"] for r in results[(batch, mode)])

    def total(batch: str, key: str) -> int:
        return sum(r[key] for r in results[(batch, "on")])

    def acceptance(batch: str) -> float:
        return total(batch, "accepted") / max(total(batch, "drafted"), 1)

    parts = []
    for batch in ("1", "all"):
        name = "b1" if batch == "1" else f"b{len(QUESTIONS)}"
        parts.append(
            f"{name} {tps(batch, 'on'):.1f} vs {tps(batch, 'off'):.1f} tok/s "
            f"({tps(batch, 'on') / tps(batch, 'off'):.2f}x, {acceptance(batch):.0%} of drafts kept)"
        )
    summary = (
        f"speculative (prompt lookup, k={args.k}): "
        + "; ".join(parts)
        + f"; answers identical: {same}"
    )
    print(summary)
    if args.report:
        lines = [
            *cpu_report_header(
                "Speculative decoding by prompt lookup on CPU", summary, args.threads
            ),
            f"- demo model (SmolLM2-135M-Instruct, fp32); {len(QUESTIONS)} questions about the "
            f"bundled report, greedy, up to {args.max_new_tokens} new tokens; {args.tries} tries",
            "",
            "| batch | mode | output tok/s (median) | tokens | steps | drafted | accepted |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for batch in ("1", "all"):
            for mode in ("off", "on"):
                rs = results[(batch, mode)]
                lines.append(
                    f"| {batch} | {mode} | {tps(batch, mode):.1f} | "
                    f"{sum(r['tokens'] for r in rs)} | {sum(r['steps'] for r in rs)} | "
                    f"{sum(r['drafted'] for r in rs)} | {sum(r['accepted'] for r in rs)} |"
                )
        lines += ["", "Questions:", ""] + [f"- {q}" for q in QUESTIONS]
        Path(args.report).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
