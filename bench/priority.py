"""CPU benchmark of priority scheduling: an interactive request arriving while a batch of
documents fills the engine.

    python bench/priority.py [--batch 8] [--doc-tokens 1024] [--tries 5] [--report PATH]

One Runtime on the demo model (SmolLM2-135M-Instruct, fp32, in-process executor, prefix caching
off so no try profits from another's prompts, `--max-num-seqs` sequence slots, `--chunk` tokens
a step, so a step is short next to a document) runs, for each
mode, `--tries` times: `--batch` document requests (`--doc-tokens`-token prompts cut from the
bundled report, `--doc-new-tokens` tokens each, greedy, EOS ignored) are added at once; when
the engine's slots are all taken, one interactive request (a 16-token prompt, 8 new tokens) is
added, and its time to first token and to its last token are taken from `add_requests`. Then
the batch runs to its end, and its output tokens/s (batch tokens / wall time of the batch) is
recorded.

Modes: *equal*, every request at priority 0 (first come, first served: the interactive request
queues behind the waiting documents), and *priority*, the documents at priority 1 (the
interactive request preempts one; the preempted document resumes later). p50 over the tries.
One summary line; `--report` writes a markdown report.
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


def one_try(
    rt: Runtime, docs: list[list[int]], ask: list[int], args: argparse.Namespace, batch_pri: int
) -> dict[str, float]:
    batch_params = SamplingParams(
        max_new_tokens=args.doc_new_tokens, temperature=0.0, ignore_eos=True, priority=batch_pri
    )
    start = time.perf_counter()
    handles = rt.engine.add_requests(docs, [batch_params] * len(docs))
    deadline = time.monotonic() + 600
    while len(rt.engine.scheduler.running) < args.max_num_seqs:  # the slots are taken
        if time.monotonic() > deadline:
            raise RuntimeError("the batch never filled the engine's slots")
        time.sleep(0.001)
    asked = time.perf_counter()
    (interactive,) = rt.engine.add_requests(
        [ask], [SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True, priority=0)]
    )
    first = None
    for _ in interactive:
        if first is None:
            first = time.perf_counter() - asked
    last = time.perf_counter() - asked
    outs = [h.result(timeout=600) for h in handles]
    wall = time.perf_counter() - start
    assert first is not None
    return {
        "ttft": first,
        "e2e": last,
        "batch_tps": sum(len(o.token_ids) for o in outs) / wall,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="document requests per try")
    p.add_argument("--doc-tokens", type=int, default=1024)
    p.add_argument("--doc-new-tokens", type=int, default=48)
    p.add_argument("--max-num-seqs", type=int, default=4)
    p.add_argument("--chunk", type=int, default=256, help="tokens per engine step (prefill chunks)")
    p.add_argument("--tries", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report", help="write a markdown report here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rt = Runtime(
        model=str(demo_model_path()),
        device="cpu",
        dtype="float32",
        session_len=args.doc_tokens + args.doc_new_tokens + 64,
        cache=CacheConfig(enable_prefix_caching=False),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.chunk
        ),
    )
    results: dict[str, list[dict[str, float]]] = {"equal": [], "priority": []}
    preemptions: dict[str, int] = {}
    with rt:
        report = rt.encode(harbor_report().text)
        docs = [
            (report * (args.doc_tokens // len(report) + 2))[i * 7 : i * 7 + args.doc_tokens]
            for i in range(args.batch)
        ]
        ask = rt.encode("A quick question: which pier is the longest?")[:16]
        one_try(rt, docs[: args.max_num_seqs], ask, args, 0)  # warm-up
        for mode, batch_pri in (("equal", 0), ("priority", 1)):
            before = rt.engine.scheduler.num_preemptions
            for _ in range(args.tries):
                results[mode].append(one_try(rt, docs, ask, args, batch_pri))
            preemptions[mode] = rt.engine.scheduler.num_preemptions - before

    def p50(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in results[mode])

    eq, pr = "equal", "priority"
    summary = (
        f"priority: interactive first token during a batch p50 {p50(pr, 'ttft') * 1e3:.0f} ms "
        f"with the batch at priority 1 vs {p50(eq, 'ttft') * 1e3:.0f} ms all equal "
        f"({p50(eq, 'ttft') / p50(pr, 'ttft'):.1f}x sooner); last token "
        f"{p50(pr, 'e2e') * 1e3:.0f} vs {p50(eq, 'e2e') * 1e3:.0f} ms; batch "
        f"{p50(pr, 'batch_tps'):.0f} vs {p50(eq, 'batch_tps'):.0f} tok/s "
        f"({preemptions[pr]} vs {preemptions[eq]} preemptions)"
    )
    print(summary)
    if args.report:
        lines = [
            *cpu_report_header("Priority scheduling on CPU", summary, args.threads),
            f"- demo model (SmolLM2-135M-Instruct, fp32); {args.batch} documents of "
            f"{args.doc_tokens} tokens, {args.doc_new_tokens} new tokens each; "
            f"{args.max_num_seqs} sequence slots, {args.chunk} tokens a step; {args.tries} "
            "tries per mode",
            "",
            "| mode | first token p50 | last token p50 | batch tok/s p50 | preemptions |",
            "|---|---:|---:|---:|---:|",
        ]
        for mode in (eq, pr):
            lines.append(
                f"| {mode} | {p50(mode, 'ttft') * 1e3:.0f} ms | {p50(mode, 'e2e') * 1e3:.0f} ms "
                f"| {p50(mode, 'batch_tps'):.1f} | {preemptions[mode]} |"
            )
        Path(args.report).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
