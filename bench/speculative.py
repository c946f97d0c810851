"""CPU benchmark of speculative decoding by prompt lookup on document questions.

    python bench/speculative.py [--k 4] [--tries 3] [--max-new-tokens 96] [--report PATH]

Two Runtimes on the demo model (SmolLM2-135M-Instruct, fp32, in-process executor), one with
`num_speculative_tokens = --k` and one without, answer the same questions about the bundled
report (`harbor_report`, about 2,100 tokens; `--sections` sets its length) through its chat
template, greedy, up to `--max-new-tokens` tokens each (EOS ends an answer). Questions ask the
model to quote, list and summarise, so some answers copy the document and some do not. After a
warm-up that fills each runtime's prefix cache with the document, each try runs every question
twice in each runtime, alternating runtimes: one at a time (batch 1), then all at once (batch
`len(questions)`). A try's time is from adding its requests to the last answer; tokens/s is the
output tokens over that time. The answers of both runtimes are compared token for token.

Predicted outputs (OpenAI's `prediction`): in each try the runtime without speculation also
rewrites three paragraphs of the report with two names changed, one at a time, once plainly and
once with the paragraph (names changed) as each request's prediction; up to
`--rewrite-tokens` tokens (160).

Reported per batch (and for the rewrites): output tokens/s (median over tries) with and without
drafts, their ratio, the share of draft tokens accepted, the steps and the draft tokens. One
summary line; `--report` writes a markdown report.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from dist_runtime.text.chat import encode_chat  # noqa: E402
from dist_runtime.text.documents import harbor_report  # noqa: E402

QUESTIONS = [
    "Copy the first paragraph of the report word for word.",
    "What happened in March? Quote the report.",
    "Quote what residents were reminded of.",
    "List the months of the report with what happened in each.",
    "Who is the mayor of Kelmsby?",
    "Summarize the report.",
]


def run(rt: Runtime, prompts: list[list[int]], params: Any, batch: bool) -> dict:
    """One pass over the prompts (`params`: one SamplingParams, or one per prompt)."""
    plist = params if isinstance(params, list) else [params] * len(prompts)
    stats0 = rt.engine.stats()
    start = time.perf_counter()
    if batch:
        outs = rt.generate(prompts, plist)
    else:
        outs = [rt.generate([p], [q])[0] for p, q in zip(prompts, plist)]
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


def rewrite_prompts(
    rt: Runtime, report: str, max_new_tokens: int
) -> tuple[tuple[list[list[int]], SamplingParams], list[SamplingParams]]:
    """Predicted outputs: ask to rewrite three paragraphs of `report` with two names changed,
    predicting the paragraph with the names changed; ((prompts, plain params), params with
    each prediction)."""
    assert rt.tokenizer is not None
    paragraphs = [p for p in report.split("\n") if len(p) > 300][:3]
    ask = (
        "Rewrite this paragraph exactly, word for word, but write 'Oldport' instead of "
        "'Kelmsby' and 'council' instead of 'town hall':\n\n"
    )
    prompts = [
        encode_chat(rt.tokenizer, [{"role": "user", "content": ask + p}]) for p in paragraphs
    ]
    plain = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    predicted = [
        dataclasses.replace(
            plain,
            prediction=tuple(
                rt.tokenizer.encode(
                    p.replace("Kelmsby", "Oldport").replace("town hall", "council"),
                    add_special_tokens=False,
                )
            ),
        )
        for p in paragraphs
    ]
    return (prompts, plain), predicted


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens of the runtime")
    p.add_argument("--lookup-min", type=int, default=2, help="prompt_lookup_min")
    p.add_argument("--lookup-max", type=int, default=4, help="prompt_lookup_max")
    p.add_argument("--tries", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--sections", type=int, default=24, help="report sections (~150 tokens each)")
    p.add_argument("--questions", type=int, default=len(QUESTIONS), help="the first N questions")
    p.add_argument("--rewrite-tokens", type=int, default=160, help="new tokens of a rewrite")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report", help="write a markdown report here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    questions = QUESTIONS[: args.questions]
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
        report = harbor_report(num_sections=args.sections).text
        prompts = qa_prompts(rt0.tokenizer, report, questions)
        for rt in runtimes.values():  # fills the prefix cache with the document
            rt.generate(prompts[:1], [SamplingParams(max_new_tokens=4, temperature=0.0)])
        rewrites, predicted = rewrite_prompts(rt0, report, args.rewrite_tokens)
        for _ in range(args.tries):
            for batch in ("1", "all"):
                for mode, rt in runtimes.items():
                    r = run(rt, prompts, params, batch == "all")
                    results.setdefault((batch, mode), []).append(r)
            # predicted outputs on the runtime that drafts nothing else
            for mode, plist in (
                ("plain", [rewrites[1]] * len(predicted)),
                ("predicted", predicted),
            ):
                r = run(rt0, rewrites[0], plist, False)
                results.setdefault(("rewrite", mode), []).append(r)
    finally:
        for rt in runtimes.values():
            rt.shutdown()

    pairs = [("1", "off", "on"), ("all", "off", "on"), ("rewrite", "plain", "predicted")]
    same = all(
        a["ids"] == b["ids"]
        for batch, x, y in pairs
        for a, b in zip(results[(batch, x)], results[(batch, y)], strict=True)
    )

    def tps(batch: str, mode: str) -> float:
        return statistics.median(r["tokens"] / r["seconds"] for r in results[(batch, mode)])

    def total(batch: str, key: str) -> int:
        mode = "predicted" if batch == "rewrite" else "on"
        return sum(r[key] for r in results[(batch, mode)])

    def acceptance(batch: str) -> float:
        return total(batch, "accepted") / max(total(batch, "drafted"), 1)

    parts = []
    for batch in ("1", "all"):
        name = "b1" if batch == "1" else f"b{len(questions)}"
        parts.append(
            f"{name} {tps(batch, 'on'):.1f} vs {tps(batch, 'off'):.1f} tok/s "
            f"({tps(batch, 'on') / tps(batch, 'off'):.2f}x, {acceptance(batch):.0%} of drafts kept)"
        )
    rw_on, rw_off = tps("rewrite", "predicted"), tps("rewrite", "plain")
    parts.append(
        f"predicted outputs (k=0 runtime, {len(predicted)} paragraph rewrites) {rw_on:.1f} vs "
        f"{rw_off:.1f} tok/s ({rw_on / rw_off:.2f}x, {acceptance('rewrite'):.0%} kept)"
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
            f"- demo model (SmolLM2-135M-Instruct, fp32); {len(questions)} questions about the "
            f"bundled report, greedy, up to {args.max_new_tokens} new tokens; {args.tries} tries",
            "",
            "| batch | mode | output tok/s (median) | tokens | steps | drafted | accepted |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for batch, x, y in pairs:
            for mode in (x, y):
                rs = results[(batch, mode)]
                lines.append(
                    f"| {batch} | {mode} | {tps(batch, mode):.1f} | "
                    f"{sum(r['tokens'] for r in rs)} | {sum(r['steps'] for r in rs)} | "
                    f"{sum(r['drafted'] for r in rs)} | {sum(r['accepted'] for r in rs)} |"
                )
        lines += ["", "Questions:", ""] + [f"- {q}" for q in questions]
        Path(args.report).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
