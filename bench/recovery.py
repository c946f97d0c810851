"""CPU benchmark of a request going on through a worker failure: a long prompt whose worker
dies (an injected `WorkerError`) part way through, against the same request undisturbed.

    python bench/recovery.py [--tries 3] [--report PATH]

Each try, on the demo model (SmolLM2-135M-Instruct, fp32, in-process executor; a replaced
worker is a new one loading the weights again), one question about a ~3,500-token report
(`--sections`, 40 by default), prefilled in chunks of `--chunk` tokens (512), greedy, with the
prefix cache emptied before each run (the first three runs share a Runtime, the fourth has one
of its own per try, on a new directory):

1. **undisturbed**;
2. **failure in the prefill**: the worker fails at the chunk that starts past 3/4 of the
   prompt; the engine replaces it and the request recomputes its prompt there and goes on;
3. **the same with a disk tier** (`kv_cache_dir`, empty at the start of the try): the blocks
   written before the failure are read back instead of computed;
4. **failure in the decode**: the worker fails at the request's `--decode-at`-th new token;
   the request recomputes prompt and tokens and goes on.

Timed from the call to the answer; the worker's replacement is timed apart (`Engine._recover`
around the new executor's start). Reported: medians, prompt tokens computed (over both
workers), tokens read from the disk tier, and whether every answer is the undisturbed one.

Then a request that makes every step it is in fail (a poison), sent with `--batch` questions
about a shorter report (`--batch-sections`): the batch alone, then beside the poison whose
worker dies at each of its steps, then beside one whose steps raise with the workers alive.
The questions share their report's prefix pass (as `Runtime.ask` does), so every run computes
the report once. The poison is admitted last, so the failure first strikes a step the whole
batch is in; the engine counts it against all of them, runs them again one suspect at a time,
and the poison, counted alone at its second failure, fails. Reported: seconds to the batch's
answers, whether they are the undisturbed ones, whether only the poison failed, and the worker
replacements and retried steps it cost.

One summary line; `--report` writes a markdown report.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import dist_runtime.engine.engine as engine_module  # noqa: E402
from bench.machine import cpu_report_header  # noqa: E402
from dist_runtime import Runtime, SamplingParams  # noqa: E402
from dist_runtime.config import CacheConfig, SchedulerConfig  # noqa: E402
from dist_runtime.engine.executor.base import WorkerError  # noqa: E402
from dist_runtime.formats.demo_model import demo_model_path  # noqa: E402
from dist_runtime.text.documents import harbor_report  # noqa: E402
from dist_runtime.text.tokenizer import Tokenizer  # noqa: E402

QUESTION = "Who keeps the lighthouse?"
MODES = (
    "undisturbed",
    "failure in the prefill",
    "the same with a disk tier",
    "failure in the decode",
)


def new_runtime(kv_dir: str | None, args: argparse.Namespace) -> Runtime:
    return Runtime(
        model=str(demo_model_path()),
        device="cpu",
        dtype="float32",
        session_len=8192,
        cache=CacheConfig(kv_cache_dir=kv_dir),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.chunk),
    )


def run(
    rt: Runtime, mode: str, prompt: list[int], params: SamplingParams, args: argparse.Namespace
) -> dict[str, Any]:
    """One request on `rt` (its prefix cache emptied first), failing as `mode` says."""
    engine = rt.engine
    rt.reset_prefix_cache()
    before = engine.stats()
    replaced: list[float] = []
    recover = type(engine)._recover

    def timed_recover(plan: Any, error: WorkerError) -> None:
        start = time.perf_counter()
        recover(engine, plan, error)
        replaced.append(time.perf_counter() - start)

    engine._recover = timed_recover  # type: ignore[method-assign]
    executor = engine.executor
    assert executor is not None
    execute, failed = executor.execute, [False]

    def failing(plan: Any) -> Any:
        if not failed[0] and plan.seqs and mode != MODES[0]:
            step = plan.seqs[0]
            if mode == MODES[3]:
                hit = step.start_pos >= len(prompt) + args.decode_at - 1
            else:
                hit = step.start_pos >= 3 * len(prompt) // 4
            if hit:
                failed[0] = True
                raise WorkerError("injected: worker rank 0 died")
        return execute(plan)

    executor.execute = failing  # type: ignore[method-assign]
    start = time.perf_counter()
    (out,) = rt.generate([prompt], params)
    seconds = time.perf_counter() - start
    executor.execute = execute  # type: ignore[method-assign]
    after = engine.stats()
    assert failed[0] == (mode != MODES[0]), f"{mode}: the failure was not injected"
    return {
        "seconds": seconds,
        "replace": replaced[0] if replaced else 0.0,
        "tokens": out.token_ids,
        "computed": after["num_prompt_tokens_computed"] - before["num_prompt_tokens_computed"],
        "from_disk": after["prefix_cache_disk_hit_tokens"] - before["prefix_cache_disk_hit_tokens"],
    }


POISON_KINDS = ("alone", "beside a poison killing its worker", "beside a poison whose steps raise")
BATCH_QUESTIONS = (
    "Who keeps the lighthouse?",
    "What does the harbor master log each morning?",
    "Which ship arrived last?",
    "What was the tide at noon?",
    "Who repairs the nets?",
    "What is stored in the north shed?",
    "When does the ferry leave?",
    "How deep is the channel?",
)


def run_batch(
    rt: Runtime, kind: str, prompts: list[list[int]], poison: list[int], params: SamplingParams
) -> dict[str, Any]:
    """`prompts` at once, alone or beside `poison` (admitted last), each of whose steps fails
    as `kind` says (in every worker group the engine starts)."""
    engine = rt.engine
    rt.reset_prefix_cache()
    before = engine.stats()
    create = engine_module.create_executor
    error = WorkerError if kind == POISON_KINDS[1] else RuntimeError
    plain: list[tuple[Any, Any]] = []

    def poisoned(executor: Any) -> Any:
        execute = executor.execute
        plain.append((executor, execute))

        def step(plan: Any) -> Any:
            for s in plan.seqs:
                seq = engine.scheduler.get(s.seq_id)
                if seq.prompt_token_ids == poison:
                    raise error("injected: the poison's step")
            return execute(plan)

        executor.execute = step
        return executor

    if kind != POISON_KINDS[0]:
        poisoned(engine.executor)
        engine_module.create_executor = lambda c, replacing=False: poisoned(create(c, replacing))  # type: ignore[assignment]
    try:
        start = time.perf_counter()
        sent = prompts if kind == POISON_KINDS[0] else [*prompts, poison]
        handles = rt.add_requests(sent, params, share_prefix=True)  # (as Runtime.ask does)
        outs = [h.result() for h in handles[: len(prompts)]]
        seconds = time.perf_counter() - start
        poison_failed = False
        if kind != POISON_KINDS[0]:
            try:
                handles[-1].result()
            except Exception:
                poison_failed = True
    finally:
        engine_module.create_executor = create
        for executor, execute in plain:
            executor.execute = execute
    after = engine.stats()
    return {
        "seconds": seconds,
        "tokens": [o.token_ids for o in outs],
        "poison_failed": poison_failed,
        "restarts": after["num_worker_restarts"] - before["num_worker_restarts"],
        "retried": after["num_retried_steps"] - before["num_retried_steps"],
        "computed": after["num_prompt_tokens_computed"] - before["num_prompt_tokens_computed"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tries", type=int, default=3)
    p.add_argument("--sections", type=int, default=40, help="report sections (~90 tokens each)")
    p.add_argument("--chunk", type=int, default=512, help="prefill tokens per step")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--decode-at", type=int, default=16, help="new token the decode failure hits")
    p.add_argument("--batch", type=int, default=4, help="questions sent beside the poison")
    p.add_argument(
        "--batch-sections", type=int, default=8, help="report sections of the batch's document"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report", help="write a markdown report here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    engine_module.logger.disabled = True  # (the injected failures' tracebacks)
    doc = harbor_report(seed=7, num_sections=args.sections).text
    tokenizer = Tokenizer.from_folder(demo_model_path())
    assert tokenizer is not None
    prompt = tokenizer.encode(f"{doc}\n\nQuestion: {QUESTION}\nAnswer:")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0, ignore_eos=True)
    results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    top = Path(tempfile.mkdtemp(prefix="recovery-bench-"))
    plain, prefill, disk, decode = MODES
    try:
        with new_runtime(None, args) as rt:
            for _ in range(args.tries):
                for mode in (plain, prefill, decode):
                    results[mode].append(run(rt, mode, prompt, params, args))
        for i in range(args.tries):  # a new directory each try
            with new_runtime(str(top / f"try{i}"), args) as rt:
                results[disk].append(run(rt, disk, prompt, params, args))
    finally:
        shutil.rmtree(top, ignore_errors=True)
    if not 1 <= args.batch <= len(BATCH_QUESTIONS):
        raise SystemExit(f"--batch must be 1 to {len(BATCH_QUESTIONS)}, got {args.batch}")
    short = harbor_report(seed=11, num_sections=args.batch_sections).text
    asks = [tokenizer.encode(f"{short}\n\nQuestion: {q}\nAnswer:") for q in BATCH_QUESTIONS]
    batch, poison = asks[: args.batch], asks[args.batch % len(asks)] + [13]
    batches: dict[str, list[dict[str, Any]]] = {kind: [] for kind in POISON_KINDS}
    with new_runtime(None, args) as rt:
        for _ in range(args.tries):
            for kind in POISON_KINDS:
                batches[kind].append(run_batch(rt, kind, batch, poison, params))

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in results[mode])

    def bmed(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in batches[kind])

    want = results[plain][0]["tokens"]
    same = all(r["tokens"] == want for mode in MODES for r in results[mode])
    alone, killer, raiser = POISON_KINDS
    same_batch = all(
        r["tokens"] == batches[alone][0]["tokens"] for k in POISON_KINDS for r in batches[k]
    )
    only_poison = all(r["poison_failed"] for k in (killer, raiser) for r in batches[k])
    summary = (
        f"recovery: a {len(prompt)}-token prompt whose worker fails at 3/4 of its prefill "
        f"answers in {med(prefill, 'seconds'):.2f} s ({med(disk, 'seconds'):.2f} s with the "
        f"disk tier, {med(disk, 'from_disk'):.0f} tokens read back) vs "
        f"{med(plain, 'seconds'):.2f} s undisturbed; failing at new token {args.decode_at}: "
        f"{med(decode, 'seconds'):.2f} s; worker replaced in {med(prefill, 'replace'):.2f} s; "
        f"answers identical: {same}; {args.batch} questions beside a poison killing its worker "
        f"{bmed(killer, 'seconds'):.2f} s ({bmed(killer, 'restarts'):.0f} replacements), "
        f"whose steps raise {bmed(raiser, 'seconds'):.2f} s, vs {bmed(alone, 'seconds'):.2f} s "
        f"alone; only the poison failed: {only_poison}, batch answers identical: {same_batch}"
    )
    print(summary)
    if args.report:
        lines = [
            *cpu_report_header("A request through a worker failure on CPU", summary, args.threads),
            f"- demo model (SmolLM2-135M-Instruct, fp32), in-process executor; a "
            f"{len(prompt)}-token prompt prefilled {args.chunk} tokens a step; greedy, "
            f"{args.max_new_tokens} new tokens; {args.tries} tries; the disk tier's directory "
            "on this machine's disk, empty at each try's start",
            "",
            "| run | to the answer (s) | worker replaced in (s) | prompt tokens computed | "
            "read from the disk tier |",
            "|---|---:|---:|---:|---:|",
        ]
        for mode in MODES:
            lines.append(
                f"| {mode} | {med(mode, 'seconds'):.2f} | {med(mode, 'replace'):.2f} | "
                f"{med(mode, 'computed'):.0f} | {med(mode, 'from_disk'):.0f} |"
            )
        lines += [
            "",
            f"{args.batch} questions about a {len(batch[0])}-token report, sent at once "
            f"(greedy, {args.max_new_tokens} new tokens), alone and beside a poison (a "
            "request each of whose steps fails; admitted last, so the first failure strikes a "
            "step the whole batch is in):",
            "",
            "| batch | to its answers (s) | worker replacements | steps retried | prompt "
            "tokens computed | only the poison failed |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for kind in POISON_KINDS:
            failed = "" if kind == alone else str(all(r["poison_failed"] for r in batches[kind]))
            lines.append(
                f"| {kind} | {bmed(kind, 'seconds'):.2f} | {bmed(kind, 'restarts'):.0f} | "
                f"{bmed(kind, 'retried'):.0f} | {bmed(kind, 'computed'):.0f} | {failed} |"
            )
        Path(args.report).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
