"""CPU benchmark of the job queue: queued document-QA jobs run in batches vs one at a time.

    python bench/job_batching.py [--jobs 8] [--sections 4] [--report PATH]

N different documents (`harbor_report` with different seeds, `--sections` sections each) with
their three questions are queued in one job directory; then ONE Runtime (demo model, fp32,
in-process, `--threads` torch threads) serves them twice, on two copies of the queue:

1. **batched** (the service's default): the runner keeps as many jobs running as fill
   `max_num_seqs` with their questions (documents prefilled together, every question decoding
   together, a queued job starting as soon as a running one ends).
2. **one at a time**: the same runner with `serve_jobs(max_running_jobs=1)`.

The order alternates with `--repeats` (batched first on odd repeats) and each system keeps its
fastest run. Time = from `serve_jobs()` until the last job is done (`JobStore.wait`). Both runs
use fresh prefix caches (a new Runtime per run) after an untimed warm-up on another document,
and must give identical answers (greedy decoding); the script checks that.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dist_runtime import Runtime, SamplingParams  # noqa: E402
from dist_runtime.config import CacheConfig, SchedulerConfig  # noqa: E402
from dist_runtime.formats.demo_model import demo_model_path  # noqa: E402
from dist_runtime.jobs.store import JobStore  # noqa: E402
from dist_runtime.text.documents import harbor_report, passkey_haystack  # noqa: E402


def run_once(
    model: str, docs: list, params: SamplingParams, batched: bool, args: argparse.Namespace
) -> tuple[float, list[list[str]], int]:
    """(seconds from serve_jobs to the last job done, answers per job, steps)."""
    job_dir = Path(tempfile.mkdtemp(prefix="bench_jobs_"))
    store = JobStore(job_dir)
    ids = [store.submit(d.text, d.questions, params) for d in docs]
    with Runtime(
        model=model,
        device="cpu",
        dtype="float32",
        session_len=args.session_len,
        job_dir=str(job_dir),
        cache=CacheConfig(block_size=16),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs),
    ) as rt:
        warm = passkey_haystack(1234, num_filler=20)
        rt.ask(warm, ["What is the pass key?", "What is it?"], params)
        assert rt.engine.executor is not None
        execute = rt.engine.executor.execute
        steps = [0]

        def counted(plan):  # type: ignore[no-untyped-def]
            steps[0] += 1
            return execute(plan)

        rt.engine.executor.execute = counted  # type: ignore[method-assign]
        start = time.perf_counter()
        rt.serve_jobs(max_running_jobs=None if batched else 1)
        answers = [store.wait(i, timeout=3600) for i in ids]
        seconds = time.perf_counter() - start
    store.close()
    return seconds, answers, steps[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--sections", type=int, default=4, help="sections per document (~150 tok)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--session-len", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--report", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = str(demo_model_path())
    docs = [harbor_report(seed=100 + i, num_sections=args.sections) for i in range(args.jobs)]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
    best: dict[bool, tuple[float, list[list[str]], int]] = {}
    for r in range(args.repeats):
        for batched in (True, False) if r % 2 == 0 else (False, True):
            got = run_once(model, docs, params, batched, args)
            print(f"{'batched' if batched else 'one at a time'}: {got[0]:.1f} s, {got[2]} steps")
            if batched not in best or got[0] < best[batched][0]:
                best[batched] = got
    (tb, ab, sb), (ts, a_s, ss) = best[True], best[False]
    if ab != a_s:
        raise SystemExit("batched and one-at-a-time answers differ")
    n_q = sum(len(d.questions) for d in docs)
    line = (
        f"job batching: {args.jobs} jobs, {n_q} questions: batched {tb:.1f} s ({sb} steps), one "
        f"at a time {ts:.1f} s ({ss} steps): {ts / tb:.2f}x; answers identical"
    )
    print(line)
    if args.report:
        args.report.write_text(
            f"# Job batching on CPU, {datetime.date.today()}\n\n"
            f"`python bench/job_batching.py {' '.join(sys.argv[1:])}` (torch {torch.__version__}, "
            f"Python {platform.python_version()}, {args.threads} threads, demo model "
            f"SmolLM2-135M-Instruct fp32, in-process executor).\n\n"
            f"{args.jobs} jobs, each a different generated report of {args.sections} sections "
            f"with its {len(docs[0].questions)} questions, {args.max_new_tokens} new tokens per "
            f"answer, max_num_seqs {args.max_num_seqs}; best of {args.repeats} run(s) each.\n\n"
            "| service | time to finish every job | steps |\n|---|---|---|\n"
            f"| batched (default) | {tb:.1f} s | {sb} |\n"
            f"| one job at a time | {ts:.1f} s | {ss} |\n\n"
            f"{line}\n"
        )


if __name__ == "__main__":
    main()
