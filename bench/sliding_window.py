"""CPU benchmark: a sliding-window model (Mistral v0.1's layout) against the same weights
attending to every key, at one long context, in one run.

    python bench/sliding_window.py [--context 8192] [--window 1024] [--new-tokens 32]
                                   [--report PATH]

A random Mistral checkpoint (`--layers` layers, hidden `--hidden`, 8 query heads over 4 KV
heads, head_dim 64, MLP 3 x hidden, vocabulary 4,096; fp32) is run twice: with
`sliding_window: --window` and with `sliding_window: null`. One prompt of `--context` random
tokens and 1 + `--new-tokens` new ones, streamed; timed (best of `--repeats`, prefix cache off,
greedy, EOS ignored): its prefill (the time to the first token) and the decode steps after it
(from the first token to the last). Reported: prefill seconds, decode ms per token,
and the windowed model's speed-up on each. One summary line; `--report` writes a markdown report.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.machine import cpu_report_header  # noqa: E402
from dist_runtime import Runtime, SamplingParams  # noqa: E402
from dist_runtime.formats.random_checkpoint import write_random_checkpoint  # noqa: E402

HEADS, KV_HEADS = 8, 4


def timings(folder: Path, prompt: list[int], new: int, repeats: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds per token), each the best of `repeats` after a warm-up:
    the time to the first token, and from it to the last over the `new` tokens after it."""
    params = SamplingParams(max_new_tokens=1 + new, temperature=0.0, ignore_eos=True)
    with Runtime(
        model=str(folder), device="cpu", dtype="float32", session_len=len(prompt) + new + 1,
        cache={"enable_prefix_caching": False},
    ) as rt:  # fmt: skip
        rt.generate([prompt], params)
        prefill = decode = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            (handle,) = rt.add_requests([prompt], params)
            first = None
            tokens = 0
            for delta in handle:
                if delta.token_ids and first is None:
                    first = time.perf_counter()
                tokens += len(delta.token_ids)
            end = time.perf_counter()
            assert first is not None and tokens == 1 + new
            prefill = min(prefill, first - start)
            decode = min(decode, (end - first) / new)
    return prefill, decode


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report", help="write a markdown report here")
    args = p.parse_args()
    if not 0 < args.window < args.context:
        p.error(f"--window {args.window} must be in (0, --context {args.context})")
    torch.set_num_threads(args.threads)
    prompt = torch.randint(300, 4096, (args.context,), generator=torch.Generator().manual_seed(0))
    results: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_random_checkpoint(
            Path(tmp) / "mistral", vocab_size=4096, hidden_size=args.hidden,
            intermediate_size=3 * args.hidden, num_layers=args.layers, num_heads=HEADS,
            num_kv_heads=KV_HEADS, max_position_embeddings=2 * args.context, seed=1,
            with_tokenizer=False,
        )  # fmt: skip
        path = folder / "config.json"
        config = json.loads(path.read_text())
        config.update(architectures=["MistralForCausalLM"], model_type="mistral")
        for name, window in (("full", None), ("windowed", args.window)):
            path.write_text(json.dumps({**config, "sliding_window": window}))
            results[name] = timings(folder, prompt.tolist(), args.new_tokens, args.repeats)
    (fp, fd), (wp, wd) = results["full"], results["windowed"]
    summary = (
        f"sliding-window: context {args.context}, window {args.window}, {args.layers} layers of "
        f"{args.hidden}: prefill {fp:.2f} s -> {wp:.2f} s ({fp / wp:.2f}x), decode "
        f"{fd * 1e3:.1f} -> {wd * 1e3:.1f} ms/token ({fd / wd:.2f}x) against full attention"
    )
    print(summary)
    if args.report:
        lines = [
            *cpu_report_header("CPU sliding-window attention", summary, args.threads),
            f"- random fp32 Mistral checkpoint: {args.layers} layers, hidden {args.hidden}, "
            f"{HEADS} heads over {KV_HEADS} KV heads, head_dim {args.hidden // HEADS}, MLP "
            f"{3 * args.hidden}, vocabulary 4,096; one prompt of {args.context} random tokens, "
            f"{args.new_tokens} decode steps, greedy; best of {args.repeats} after a warm-up; "
            "prefix cache off",
            "",
            "| attention | prefill (s) | decode (ms / token) |",
            "|---|---:|---:|",
            f"| every key | {fp:.2f} | {fd * 1e3:.2f} |",
            f"| window {args.window} | {wp:.2f} | {wd * 1e3:.2f} |",
            f"| speed-up | {fp / wp:.2f}x | {fd / wd:.2f}x |",
        ]
        Path(args.report).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
