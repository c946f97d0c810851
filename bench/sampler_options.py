"""CPU benchmark of decoding with the sampling options that change the sampler's path, against
plain greedy decoding, in one run, alternating.

    python bench/sampler_options.py [--batch 8] [--new-tokens 64] [--repeats 3] [--report PATH]

On the demo model (SmolLM2-135M-Instruct, fp32, in-process executor, prefix cache off so every
repeat computes its prompts), `--batch` prompts of `--prompt-len` random tokens ending in
`<think>` decode `--new-tokens` tokens each, greedy, EOS ignored, with one option per run:

- **plain**: nothing else (the sampler's greedy fast path);
- **allowed_token_ids**: 2,000 ids (every row's logits outside them set to -inf each step);
- **bad_words**: three words, bare and spaced (each step, a row's output tail is compared with
  every form);
- **logit_bias**: 100 ids biased;
- **min_tokens**: `--new-tokens` (EOS left to the model, so an allowed-token mask without EOS
  is sent with every step);
- **thinking_budget**: 16 (the prompt opens the thinking: 16 tokens are counted, then the
  `</think>` tokens are forced through one-token masks, then decoding goes on).

Timed: the whole `generate` call (the prompts' prefill is the same in every run), the median of
`--repeats`. Reported: seconds, output tokens per second and the slowdown against plain. One
summary line; `--report` writes a markdown report.
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
from dist_runtime.formats.demo_model import demo_model_path  # noqa: E402


def options(new_tokens: int, vocab: int) -> dict[str, dict[str, Any]]:
    gen = torch.Generator().manual_seed(1)
    allowed = torch.randperm(vocab, generator=gen)[:2000].tolist()
    biased = torch.randperm(vocab, generator=gen)[:100].tolist()
    return {
        "plain": {},
        "allowed_token_ids": {"allowed_token_ids": allowed},
        "bad_words": {"bad_words": ["harbor", "the ship", "tide"]},
        "logit_bias": {"logit_bias": {t: 2.0 for t in biased}},
        "min_tokens": {"min_tokens": new_tokens, "ignore_eos": False},
        "thinking_budget": {"thinking_budget": 16},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report", help="write a markdown report here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rt = Runtime(
        model=str(demo_model_path()), device="cpu", dtype="float32", session_len=1024,
        cache={"enable_prefix_caching": False},
    )  # fmt: skip
    try:
        assert rt.tokenizer is not None
        vocab = rt.engine.model_config.vocab_size
        think = rt.tokenizer.encode("<think>", add_special_tokens=False)
        gen = torch.Generator().manual_seed(0)
        prompts = [
            torch.randint(100, vocab, (args.prompt_len,), generator=gen).tolist() + think
            for _ in range(args.batch)
        ]
        kinds = options(args.new_tokens, vocab)
        params = {
            name: SamplingParams(
                **{
                    "max_new_tokens": args.new_tokens,
                    "temperature": 0.0,
                    "ignore_eos": True,
                    **extra,
                }
            )  # fmt: skip
            for name, extra in kinds.items()
        }
        for sp in params.values():  # warm-up: every path once
            rt.generate(prompts[:2], sp)
        times: dict[str, list[float]] = {name: [] for name in kinds}
        produced: dict[str, int] = {}
        for _ in range(args.repeats):
            for name, sp in params.items():
                start = time.perf_counter()
                outs = rt.generate(prompts, sp)
                times[name].append(time.perf_counter() - start)
                produced[name] = sum(len(o.token_ids) for o in outs)
    finally:
        rt.shutdown()
    med = {name: statistics.median(v) for name, v in times.items()}
    plain = med["plain"]
    parts = [f"{name} {med[name] / plain:.3f}x" for name in kinds if name != "plain"]
    summary = (
        f"sampler-options: b{args.batch} x {args.new_tokens} tokens, time against plain greedy "
        f"({plain:.2f} s): " + ", ".join(parts)
    )
    print(summary)
    if args.report:
        lines = [
            *cpu_report_header("CPU decoding with sampling options", summary, args.threads),
            f"- demo model, in-process executor, prefix cache off; {args.batch} prompts of "
            f"{args.prompt_len} random tokens + `<think>`, {args.new_tokens} new tokens each, "
            f"greedy; {args.repeats} repeats after a warm-up, the options alternating",
            "",
            "| option | seconds (median) | output tokens / s | against plain | each |",
            "|---|---:|---:|---:|---|",
        ]
        for name in kinds:
            each = ", ".join(f"{v:.3f}" for v in times[name])
            rate = produced[name] / med[name]
            lines.append(
                f"| {name} | {med[name]:.3f} | {rate:,.0f} | {med[name] / plain:.3f}x | {each} |"
            )
        Path(args.report).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
