"""What a draft row costs in a decode step: the speculative-decoding break-even on a device.

    python bench/draft_rows.py                                    # 7B shape on CUDA, bf16
    python bench/draft_rows.py --contexts 4096,16384 --batches 1,8 --drafts 0,2,4,8
    python bench/draft_rows.py --device cpu --model-config tests/... --contexts 256   # smoke

Random weights (load_format=dummy) from a config.json, tp=1, in-process executor, prefix cache
off. For each context length and batch, fresh random prompts decode `--decode-tokens` tokens
while every sequence is made to check a draft of k random tokens each step (the prompt lookup
is replaced by one that always proposes k tokens; random weights keep almost none, so each step
computes k + 1 rows per sequence and yields one token). The median wall time of the steps in
which the whole batch decodes, per k, is the cost of a step with that many rows; its growth
from k = 0 is what the draft rows cost (`StepCost`'s b), and the break-even acceptance of a
draft of k is the share alpha at which the tokens a step keeps on average,
(1 - alpha^(k+1)) / (1 - alpha), pay for its time against a plain step's. One summary line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.machine import code_version  # noqa: E402
from dist_runtime import CacheConfig, Runtime, SamplingParams, SchedulerConfig  # noqa: E402
from dist_runtime.engine.speculative import PromptLookup  # noqa: E402


def force_drafts(k: int, vocab: int) -> None:
    """Every decoding sequence proposes k random tokens (within its limits), whatever its
    history: the rows are what is timed, not the lookup."""
    gen = torch.Generator().manual_seed(0)

    def propose(self: PromptLookup, seq: Any, limit: int, share: float = 0.0) -> list[int]:
        n = min(k, limit)
        return torch.randint(4, vocab, (n,), generator=gen).tolist() if n > 0 else []

    PromptLookup.propose = propose  # type: ignore[method-assign]


def break_even(ratio: float, k: int) -> float:
    """The alpha in [0, 1] with (1 - alpha^(k+1)) / (1 - alpha) = ratio (bisection); 1.0 when
    even a draft kept whole does not pay (ratio > k + 1)."""
    if ratio >= k + 1:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        kept = sum(mid**j for j in range(k + 1))
        lo, hi = (mid, hi) if kept < ratio else (lo, mid)
    return (lo + hi) / 2


def step_seconds(rt: Runtime, prompts: list[list[int]], new_tokens: int) -> float:
    """Median seconds of the steps in which every prompt decodes (no prefill rides along)."""
    before = len(rt.engine.recent_steps())
    rt.generate(
        prompts, SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    )
    steps = rt.engine.recent_steps()[before:]
    full = [s.seconds for s in steps if s.num_prefill_tokens == 0 and s.num_decodes == len(prompts)]
    if len(full) < 3:
        raise RuntimeError(f"only {len(full)} full-batch decode steps; raise --decode-tokens")
    return statistics.median(full[1:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--model-config", default="bench/model_configs/internlm2_5-7b-chat.json", help="config.json"
    )
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--contexts", default="4096,16384")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--drafts", default="0,2,4,8", help="draft lengths k (0 first: the baseline)")
    p.add_argument("--decode-tokens", type=int, default=24)
    p.add_argument("--out", help="markdown report path")
    args = p.parse_args()
    cfg = json.loads(Path(args.model_config).read_text())
    contexts = [int(x) for x in args.contexts.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    drafts = [int(x) for x in args.drafts.split(",")]
    if drafts[0] != 0:
        raise SystemExit("--drafts must start with 0 (the plain step every other is compared to)")
    session = max(contexts) + args.decode_tokens + max(drafts) + 16
    if session <= cfg.get("max_position_embeddings", 0):
        cfg.pop("rope_scaling", None)
    folder = Path(tempfile.mkdtemp()) / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    times: dict[tuple[int, int, int], float] = {}
    for k in drafts:
        force_drafts(k, cfg["vocab_size"])
        with Runtime(
            model=str(folder),
            device=args.device,
            dtype=dtype,
            session_len=session,
            load_format="dummy",
            cache=CacheConfig(gpu_memory_utilization=0.9, enable_prefix_caching=False),
            scheduler=SchedulerConfig(
                max_num_seqs=max(batches),
                max_num_batched_tokens=max(8192, max(batches) * (max(drafts) + 1)),
                num_speculative_tokens=max(k, 0),
            ),
        ) as rt:
            gen = torch.Generator().manual_seed(1)
            rt.generate([[1] * 64], SamplingParams(max_new_tokens=4))  # warm-up
            for n in contexts:
                for b in batches:
                    prompts = [
                        torch.randint(4, cfg["vocab_size"], (n,), generator=gen).tolist()
                        for _ in range(b)
                    ]
                    times[n, b, k] = step_seconds(rt, prompts, args.decode_tokens)
    lines = [
        "| context | batch | "
        + " | ".join(f"k={k} step ms" for k in drafts)
        + " | ms per draft row | "
        + " | ".join(f"k={k} break-even" for k in drafts[1:])
        + " |",
        "|" + "---|" * (2 + 2 * len(drafts)),
    ]
    summary = []
    for n in contexts:
        for b in batches:
            base = times[n, b, 0]
            ms = [times[n, b, k] * 1e3 for k in drafts]
            top = drafts[-1]
            per_row = (times[n, b, top] - base) / (top * b) * 1e3 if top else 0.0
            evens = [break_even(times[n, b, k] / base, k) for k in drafts[1:]]
            lines.append(
                f"| {n} | {b} | "
                + " | ".join(f"{x:.2f}" for x in ms)
                + f" | {per_row:.3f} | "
                + " | ".join(f"{a:.2f}" for a in evens)
                + " |"
            )
            summary.append(
                f"{n // 1024}K b{b}: k={top} step {times[n, b, top] / base:.2f}x plain, "
                f"pays from {evens[-1]:.0%} kept"
                if evens
                else f"{n} b{b}: {ms[0]:.2f} ms"
            )
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    config_path = Path(args.model_config)
    name = config_path.parent.name if config_path.stem == "config" else config_path.stem
    head = f"draft-rows ({device}, {name}): " + "; ".join(summary)
    print(head)
    print("\n".join(lines))
    if args.out:
        command = "python bench/draft_rows.py" + "".join(f" {a}" for a in sys.argv[1:])
        Path(args.out).write_text(
            f"# Draft rows on {device} ({datetime.date.today()})\n\nProduced by `{command}`; "
            f"see its docstring for how each number is measured.\n\n**Summary:** `{head}`\n\n"
            f"- {device}, torch {torch.__version__}, {dtype}, code {code_version()}\n\n"
            + "\n".join(lines)
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
