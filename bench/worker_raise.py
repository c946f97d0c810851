"""CPU benchmark of a step that raises inside the Ray workers: retried in place against the
whole worker group replaced, in one run.

    python bench/worker_raise.py [--tp 3] [--tries 3] [--report PATH]

On the demo model (SmolLM2-135M-Instruct, fp32) over Ray (`--tp` workers on this machine),
`--batch` questions about a short report are sent at once beside a poison: a request whose
every step raises inside every worker (a `ValueError` from the workers' step, injected into
each worker group the engine starts). The poison is admitted last, so its first failure strikes
a step the whole batch is in (the report they share is computed once first, as `Runtime.ask`
does); the engine counts it against all of them, runs them again one
suspect at a time, and the poison, counted alone at its second failure, fails.

Each try runs the batch three ways, on one runtime:

1. **alone** (no poison);
2. **in place** (this runtime): every worker finished the failed step, so the group runs on
   and the step's requests compute it again;
3. **replacing the group** (the behaviour before in-place retries, `MAX_IN_PLACE_FAILURES`
   set to 1): each failure replaces the worker group, whose new workers load the weights again.

Each run starts with the batch once for 2 tokens (a group just replaced is cold), then empties
the prefix cache. Reported: medians of the seconds to the batch's answers, worker replacements
and retried steps, whether the batch's answers are the undisturbed ones and whether only the
poison failed. One summary line; `--report` writes a markdown report.
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

import dist_runtime.engine.engine as engine_module  # noqa: E402
from bench.machine import cpu_report_header  # noqa: E402
from dist_runtime import Runtime, SamplingParams  # noqa: E402
from dist_runtime.engine.executor import ray_executor  # noqa: E402
from dist_runtime.formats.demo_model import demo_model_path  # noqa: E402
from dist_runtime.text.documents import harbor_report  # noqa: E402
from dist_runtime.text.tokenizer import Tokenizer  # noqa: E402

QUESTIONS = (
    "Who keeps the lighthouse?",
    "What does the harbor master log each morning?",
    "Which ship arrived last?",
    "What was the tide at noon?",
    "Who repairs the nets?",
    "When does the ferry leave?",
)
KINDS = ("alone", "in place", "replacing the group")


POISON_SEED = 987_654_321
"""The poison's seed (greedy, so it changes no token): how the workers tell its steps."""


def arm(executor: Any) -> Any:
    """Make every worker of `executor` raise in any step that computes the poison (its
    sampling seed is POISON_SEED); `executor`."""
    import ray

    def install(self: Any) -> None:
        runner = self.runner

        def poisoned(s: Any) -> bool:
            spec = s.sampling if s.sampling is not None else runner.seqs[s.seq_id].spec
            return bool(spec.seed == POISON_SEED)

        def failing(run: Any) -> Any:
            def step(plan: Any) -> Any:
                if any(poisoned(s) for s in plan.seqs):
                    raise ValueError("injected: the poison's step")
                return run(plan)

            return step

        runner.execute, runner.launch = failing(runner.execute), failing(runner.launch)

    ray.get([a.__ray_call__.remote(install) for a in executor.actors])
    return executor


def run_batch(rt: Runtime, kind: str, prompts: list[list[int]], poison: list[int],
              params: SamplingParams) -> dict[str, Any]:  # fmt: skip
    """The batch at once, alone or beside the poison (admitted last)."""
    engine = rt.engine
    rt.generate(prompts, SamplingParams(max_new_tokens=2))  # warm (a replaced group is cold)
    rt.reset_prefix_cache()
    before = engine.stats()
    restarts = rt.num_worker_restarts
    limit = ray_executor.MAX_IN_PLACE_FAILURES
    if kind == KINDS[2]:
        ray_executor.MAX_IN_PLACE_FAILURES = 1  # every failure replaces the group
    try:
        start = time.perf_counter()
        if kind == KINDS[0]:
            handles = rt.add_requests(prompts, params, share_prefix=True)
        else:
            marked = dataclasses.replace(params, seed=POISON_SEED)
            plist = [*[params] * len(prompts), marked]
            handles = rt.add_requests([*prompts, poison], plist, share_prefix=True)
        outs = [h.result(timeout=600) for h in handles[: len(prompts)]]
        seconds = time.perf_counter() - start
        poison_failed = False
        if kind != KINDS[0]:
            try:
                handles[-1].result(timeout=600)
            except Exception:
                poison_failed = True
    finally:
        ray_executor.MAX_IN_PLACE_FAILURES = limit
    after = engine.stats()
    return {
        "seconds": seconds,
        "tokens": [o.token_ids for o in outs],
        "restarts": rt.num_worker_restarts - restarts,
        "retried": after["num_retried_steps"] - before["num_retried_steps"],
        "poison_failed": poison_failed,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tp", type=int, default=3)
    p.add_argument("--tries", type=int, default=3)
    p.add_argument("--batch", type=int, default=4, help="questions sent beside the poison")
    p.add_argument("--sections", type=int, default=8, help="report sections (~90 tokens each)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--report", help="write a markdown report here")
    args = p.parse_args()
    if not 1 <= args.batch < len(QUESTIONS):
        raise SystemExit(f"--batch must be 1 to {len(QUESTIONS) - 1}, got {args.batch}")
    engine_module.logger.disabled = True  # (the injected failures' tracebacks)
    ray_executor.logger.disabled = True
    tokenizer = Tokenizer.from_folder(demo_model_path())
    assert tokenizer is not None
    doc = harbor_report(seed=11, num_sections=args.sections).text
    asks = [tokenizer.encode(f"{doc}\n\nQuestion: {q}\nAnswer:") for q in QUESTIONS]
    batch, poison = asks[: args.batch], asks[args.batch] + [13]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0, ignore_eos=True)
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    started = time.perf_counter()
    create = engine_module.create_executor
    engine_module.create_executor = lambda c, replacing=False: arm(create(c, replacing))  # type: ignore[assignment]
    with Runtime(model=str(demo_model_path()), tp=args.tp, device="cpu", dtype="float32",
                 session_len=4096) as rt:  # fmt: skip
        start_s = time.perf_counter() - started
        for _ in range(args.tries):
            for kind in KINDS:
                runs[kind].append(run_batch(rt, kind, batch, poison, params))

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[kind])

    want = runs[KINDS[0]][0]["tokens"]
    same = all(r["tokens"] == want for kind in KINDS for r in runs[kind])
    only_poison = all(r["poison_failed"] for kind in KINDS[1:] for r in runs[kind])
    alone, in_place, replacing = KINDS
    summary = (
        f"worker-raise: {args.batch} questions beside a poison whose steps raise in the "
        f"{args.tp} Ray workers: {med(in_place, 'seconds'):.2f} s retried in place "
        f"({med(in_place, 'restarts'):.0f} replacements) vs {med(replacing, 'seconds'):.2f} s "
        f"replacing the group ({med(replacing, 'restarts'):.0f} replacements), "
        f"{med(alone, 'seconds'):.2f} s alone; only the poison failed: {only_poison}, "
        f"batch answers identical: {same}"
    )
    print(summary)
    if args.report:
        lines = [
            *cpu_report_header("A step raising in the Ray workers on CPU", summary, 2),
            f"- demo model (SmolLM2-135M-Instruct, fp32), tp={args.tp} over Ray on this "
            f"machine (runtime start {start_s:.1f} s); {args.batch} questions about a "
            f"{len(batch[0])}-token report, greedy, {args.max_new_tokens} new tokens; "
            f"{args.tries} tries",
            "",
            "| batch | to its answers (s) | worker replacements | steps retried | "
            "only the poison failed |",
            "|---|---:|---:|---:|---|",
        ]
        for kind in KINDS:
            failed = "" if kind == alone else str(all(r["poison_failed"] for r in runs[kind]))
            lines.append(
                f"| {kind} | {med(kind, 'seconds'):.2f} | {med(kind, 'restarts'):.0f} | "
                f"{med(kind, 'retried'):.0f} | {failed} |"
            )
        Path(args.report).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
