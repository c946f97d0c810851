r"""Guided output: what holding the output to a JSON Schema (or, with `--grammar`, to a GBNF
grammar) costs per decode step, in one run, on the demo model (SmolLM2-135M-Instruct) unless
`--model` names another.

    python bench/guided_json.py [--batches 1,8] [--max-new-tokens 256] [--grammar] [--report PATH]

1. **Vocabulary.** Time to build the byte tries of the tokenizer's vocabulary (once per
   engine, on the first guided request).
2. **Masks.** Every mask the driver builds during the guided runs below, timed: a miss walks
   the tries from the grammar state, a hit is a cached state (recurring positions of a schema).
3. **Decode steps.** Each batch size runs twice over the same chat prompts (document
   questions): plain (`ignore_eos`, the same length) and guided by a schema of a few fields.
   The engine's own step records give the median time of the steps in which every row of the
   batch decoded; the ratio guided / plain is the cost of guidance (masks on the driver, the
   mask upload and the masked sampling on the worker, no greedy shortcut). Outputs are checked:
   each guided answer must be JSON holding the schema's required keys (with `--grammar`: text
   the grammar produces, checked by an equivalent Python pattern).

One summary line at the end; `--report` writes a markdown report.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dist_runtime import Runtime, SamplingParams  # noqa: E402
from dist_runtime.text import guided  # noqa: E402
from dist_runtime.text.chat import encode_chat  # noqa: E402
from dist_runtime.text.documents import harbor_report  # noqa: E402

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "maxLength": 120},
        "confidence": {"enum": ["low", "medium", "high"]},
        "evidence": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "page": {"type": ["integer", "null"]},
    },
    "required": ["answer", "confidence", "evidence"],
}
GRAMMAR = r"""
root ::= "Answer: " line "\nConfidence: " ("low" | "medium" | "high") "\nEvidence: " quote
         ("; " quote){0,2} "\n"
line ::= [^\n]+
quote ::= "\"" word (" " word){0,11} "\""
word ::= [A-Za-z0-9,.'-]+
"""
"""The `--grammar` answer: a free line, a choice, one to three quotes of up to 12 words."""
_QUOTE = r"\"[A-Za-z0-9,.'-]+( [A-Za-z0-9,.'-]+){0,11}\""
GRAMMAR_PATTERN = (
    rf"Answer: [^\n]+\nConfidence: (low|medium|high)\nEvidence: {_QUOTE}(; {_QUOTE}){{0,2}}\n"
)
"""GRAMMAR's language as a Python pattern, to check answers independently of the grammar."""
QUESTIONS = [
    "Who signed the report?",
    "Which equipment failed?",
    "When was the inspection?",
    "What must be repaired first?",
    "How many cranes were inspected?",
    "What is the harbour's name?",
    "Who is responsible for follow-up?",
    "What was the weather?",
]


class MaskTimer:
    """Wraps `Vocabulary.mask` to time each call, split by whether its grammar had it cached."""

    def __init__(self) -> None:
        self.miss: list[float] = []
        self.hit: list[float] = []
        self._orig = guided.Vocabulary.mask

    def __enter__(self) -> MaskTimer:
        orig = self._orig

        def timed(vocab: Any, grammar: Any, state: Any, stop_ids: Any) -> bytes:
            cached = (grammar, state, stop_ids) in vocab.masks
            t = time.perf_counter()
            out = orig(vocab, grammar, state, stop_ids)
            (self.hit if cached else self.miss).append(time.perf_counter() - t)
            return out

        guided.Vocabulary.mask = timed  # type: ignore[method-assign,assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        guided.Vocabulary.mask = self._orig  # type: ignore[method-assign]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _full_steps_ms(rt: Runtime, batch: int, since: int) -> list[float]:
    return [
        s.seconds * 1e3
        for s in rt.engine.recent_steps()
        if s.step_id >= since and s.num_prefill_tokens == 0 and s.num_decodes == batch
    ]


def _last_step_id(rt: Runtime) -> int:
    steps = rt.engine.recent_steps()
    return steps[-1].step_id + 1 if steps else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the demo model)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="runs per (batch, mode); medians")
    p.add_argument("--sections", type=int, default=24, help="report sections (~150 tokens each)")
    p.add_argument("--example-tokens", type=int, default=160, help="new tokens of the example")
    p.add_argument("--grammar", action="store_true", help="guide by GRAMMAR (GBNF), not SCHEMA")
    p.add_argument("--report", type=Path, default=None)
    args = p.parse_args(argv)
    guide: dict[str, Any] = {"guided_grammar": GRAMMAR} if args.grammar else {"json_schema": SCHEMA}
    kind = "guided-grammar" if args.grammar else "guided-json"
    batches = [int(b) for b in args.batches.split(",")]
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    with Runtime(model=args.model, session_len=4096) as rt:
        tok = rt.engine.tokenizer
        assert tok is not None, "guided output needs a tokenizer"
        t = time.perf_counter()
        vocab = guided.Vocabulary.from_tokenizer(tok, rt.engine.model_config.vocab_size)
        vocab_s = time.perf_counter() - t
        doc = harbor_report(num_sections=args.sections)
        prompts = [
            encode_chat(tok, [{"role": "user", "content": f"{doc}\n\n{q} Answer in JSON."}])
            for q in QUESTIONS
        ]
        rt.generate(prompts[:1], SamplingParams(max_new_tokens=4))  # warm-up, caches the doc
        valid = total = stopped = 0
        with MaskTimer() as masks:
            for batch in batches:
                batch_prompts = [prompts[i % len(prompts)] for i in range(batch)]
                row: dict[str, Any] = {"batch": batch}
                for mode in ("plain", "guided"):
                    params = (
                        SamplingParams(max_new_tokens=args.max_new_tokens, **guide)
                        if mode == "guided"
                        else SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
                    )
                    steps: list[float] = []
                    tokens = 0
                    for _ in range(args.repeats):
                        since = _last_step_id(rt)
                        outs = rt.generate(batch_prompts, params)
                        steps += _full_steps_ms(rt, batch, since)
                        tokens += sum(len(o.token_ids) for o in outs)
                        if mode == "guided":
                            for o in outs:
                                total += 1
                                stopped += o.finish_reason == "stop"
                                if args.grammar:
                                    valid += bool(re.fullmatch(GRAMMAR_PATTERN, o.text))
                                    continue
                                try:
                                    value = json.loads(o.text)
                                except ValueError:
                                    continue
                                valid += set(SCHEMA["required"]) <= set(value)
                    row[f"{mode}_ms"] = statistics.median(steps) if steps else float("nan")
                    row[f"{mode}_steps"] = len(steps)
                    row[f"{mode}_tokens"] = tokens
                row["ratio"] = row["guided_ms"] / row["plain_ms"]
                rows.append(row)
        example = rt.generate(
            prompts[:1], SamplingParams(max_new_tokens=args.example_tokens, **guide)
        )
    miss_ms = [x * 1e3 for x in masks.miss]
    hit_ms = [x * 1e3 for x in masks.hit]
    ratios = " ".join(f"b{r['batch']} {r['ratio']:.2f}x" for r in rows)
    summary = (
        f"{kind}: vocab {vocab.size} tokens in {vocab_s:.2f} s | masks built "
        f"{len(miss_ms)} (total {sum(miss_ms) / 1e3:.2f} s) p50 {_pct(miss_ms, 0.5):.2f} ms "
        f"p95 {_pct(miss_ms, 0.95):.2f} ms, cached "
        f"{len(hit_ms)} p50 {_pct(hit_ms, 0.5):.3f} ms | decode step guided/plain {ratios} | "
        f"{valid}/{total} answers valid, {stopped} ended by themselves"
    )
    if args.report:
        lines = [
            f"# Guided {'GBNF' if args.grammar else 'JSON'} output, "
            f"{platform.processor() or platform.machine()}, "
            f"{datetime.date.today()}",
            "",
            f"`python bench/guided_json.py --batches {args.batches} --max-new-tokens "
            f"{args.max_new_tokens} --repeats {args.repeats}{' --grammar' * args.grammar}` on "
            f"{args.model or 'the demo model (SmolLM2-135M-Instruct, fp32, CPU)'}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads.",
            "",
            f"**Summary:** `{summary}`",
            "",
            f"Vocabulary tries: {vocab.size} tokens, {len(vocab.trie[0])} trie nodes "
            f"({len(vocab.other_trie[0])} in the trie a string state walks), {vocab_s:.2f} s.",
            "",
            "| masks | count | p50 ms | p95 ms | max ms |",
            "|---|---|---|---|---|",
            f"| built (trie walk) | {len(miss_ms)} | {_pct(miss_ms, 0.5):.2f} | "
            f"{_pct(miss_ms, 0.95):.2f} | {max(miss_ms, default=float('nan')):.2f} |",
            f"| cached state | {len(hit_ms)} | {_pct(hit_ms, 0.5):.3f} | {_pct(hit_ms, 0.95):.3f} "
            f"| {max(hit_ms, default=float('nan')):.3f} |",
            "",
            "| batch | plain step (ms) | guided step (ms) | guided / plain | steps timed "
            "(plain, guided) |",
            "|---|---|---|---|---|",
            *(
                f"| {r['batch']} | {r['plain_ms']:.2f} | {r['guided_ms']:.2f} | "
                f"{r['ratio']:.2f}x | {r['plain_steps']}, {r['guided_steps']} |"
                for r in rows
            ),
            "",
            "A guided answer (first question, greedy):",
            "",
            "```" + ("" if args.grammar else "json"),
            example[0].text,
            "```",
            "",
        ]
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text("\n".join(lines))
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
