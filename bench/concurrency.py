"""CPU benchmark of the engine loop: many concurrent callers, and a short request during a long
prefill.

    python bench/concurrency.py [--callers 1,4,16] [--new-tokens 64] [--doc-tokens 16384]
                                [--tries 5] [--report PATH]

One Runtime on the demo model (SmolLM2-135M-Instruct, fp32, in-process executor, `--threads`
torch threads, prefix caching off so no run profits from another's prompts) measures, in one
process:

1. **Throughput.** For each N in `--callers`: N different prompts of ~32 tokens, each
   generating exactly `--new-tokens` tokens (greedy, EOS ignored). *Concurrent*: N threads,
   released together by a barrier, each calling `rt.generate([its prompt])`. *Serial*: the
   same N calls one after another on one thread. Output tokens/s = N * new_tokens / wall time;
   the ratio is concurrent / serial. The outputs of both must be identical (checked).
2. **Time to first token under a long prefill.** A `--doc-tokens` document (the bundled
   generated report, repeated and cut to length; RoPE scaled with dynamic NTK past the model's
   8,192 positions) prefills in chunks of `--chunk` tokens. Try i waits until the document has
   computed i chunks, then adds a 16-token request (one new token) and takes the time from
   `add_requests` to its first delta, and the engine steps that took (from the step running
   when it was added to the step that sampled its token). The document is then aborted.
   *Idle*: the same short request on an idle engine, `--tries` times. p50 and p99 are over the
   tries (with 5 tries p99 is the largest).

A warm-up (one short and one chunked request) runs first. One summary line; `--report` writes a
markdown report.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.machine import code_version, cpu_model, usable_cores  # noqa: E402
from dist_runtime import Runtime, SamplingParams  # noqa: E402
from dist_runtime.config import CacheConfig, SchedulerConfig  # noqa: E402
from dist_runtime.engine.handle import RequestHandle  # noqa: E402
from dist_runtime.formats.demo_model import demo_model_path  # noqa: E402
from dist_runtime.text.documents import harbor_report  # noqa: E402


def prompts_for(rt: Runtime, n: int) -> list[list[int]]:
    return [
        rt.encode(f"Caller {i} asks: write a short note about harbour number {i * 7 + 3}.")
        for i in range(n)
    ]


def throughput(rt: Runtime, n: int, new_tokens: int) -> dict[str, float]:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    prompts = prompts_for(rt, n)
    t0 = time.perf_counter()
    serial = [rt.generate([p], params)[0].token_ids for p in prompts]
    serial_s = time.perf_counter() - t0
    barrier = threading.Barrier(n + 1)
    outs: list[list[int]] = [[] for _ in range(n)]

    def call(i: int) -> None:
        barrier.wait()
        outs[i] = rt.generate([prompts[i]], params)[0].token_ids

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    first_step = rt.engine.stats()["num_steps"]
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    concurrent_s = time.perf_counter() - t0
    if outs != serial:
        raise SystemExit(f"{n} callers: concurrent outputs differ from serial ones")
    steps = [r for r in rt.engine.recent_steps() if r.step_id >= first_step]
    tokens = n * new_tokens
    return {
        "callers": n,
        "serial_tps": tokens / serial_s,
        "concurrent_tps": tokens / concurrent_s,
        "ratio": serial_s / concurrent_s,
        "steps": len(steps),
        "max_batch": max(len(r.request_ids) for r in steps),
    }


def first_token(rt: Runtime, prompt: list[int]) -> tuple[float, RequestHandle, int]:
    """(seconds to the first delta, the handle, the engine step running when it was added)."""
    params = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
    at_step = int(rt.engine.stats()["num_steps"])
    t0 = time.perf_counter()
    (handle,) = rt.add_requests([prompt], params)
    next(iter(handle))
    return time.perf_counter() - t0, handle, at_step


def ttft(rt: Runtime, doc: list[int], chunk: int, tries: int) -> dict[str, list[float]]:
    short = rt.encode("Quick question: what colour is the sky on a clear day?")[:16]
    idle = []
    for _ in range(tries):
        seconds, _, _ = first_token(rt, short)
        idle.append(seconds)
    loaded, steps = [], []
    long_params = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
    for i in range(tries):
        (document,) = rt.add_requests([doc], long_params)
        while document.num_computed_prompt_tokens < i * chunk or document.first_step_id is None:
            document.wait(0.001)
        seconds, handle, at_step = first_token(rt, short)
        if document.done:
            raise SystemExit("the document finished prefilling before the short request ran")
        assert handle.first_token_step_id is not None
        loaded.append(seconds)
        steps.append(handle.first_token_step_id - at_step + 1)
        document.abort()
        rt.engine.wait_idle()
    return {"idle": idle, "loaded": loaded, "steps": [float(s) for s in steps]}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--callers", default="1,4,16")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--doc-tokens", type=int, default=16384)
    p.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens")
    p.add_argument("--tries", type=int, default=5)
    p.add_argument("--threads", type=int, default=usable_cores())
    p.add_argument("--report", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    callers = [int(c) for c in args.callers.split(",")]
    with Runtime(
        model=str(demo_model_path()),
        device="cpu",
        dtype="float32",
        session_len=args.doc_tokens + 64,
        rope_scaling_factor=2.0 if args.doc_tokens + 64 > 8192 else None,
        cache=CacheConfig(enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.chunk, max_num_seqs=64),
    ) as rt:
        text = harbor_report(seed=7, num_sections=12).text
        doc = rt.encode(text)
        doc = (doc * (args.doc_tokens // len(doc) + 1))[: args.doc_tokens]
        warm = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
        rt.generate([prompts_for(rt, 1)[0], doc[: args.chunk * 2]], warm)
        rows = [throughput(rt, n, args.new_tokens) for n in callers]
        for r in rows:
            print(
                f"{r['callers']:>3} callers: serial {r['serial_tps']:.1f} tok/s, concurrent "
                f"{r['concurrent_tps']:.1f} tok/s ({r['ratio']:.2f}x), {r['steps']} steps, "
                f"up to {r['max_batch']} per step"
            )
        t = ttft(rt, doc, args.chunk, args.tries)
    idle50, idle99 = pct(t["idle"], 0.5), pct(t["idle"], 0.99)
    load50, load99 = pct(t["loaded"], 0.5), pct(t["loaded"], 0.99)
    top = rows[-1]
    line = (
        f"concurrency: {top['callers']} callers {top['ratio']:.2f}x serial "
        f"({top['concurrent_tps']:.0f} vs {top['serial_tps']:.0f} tok/s); "
        + ", ".join(f"{r['callers']}: {r['ratio']:.2f}x" for r in rows[:-1])
        + f"; short request's first token during a {args.doc_tokens}-token prefill "
        f"p50 {load50 * 1e3:.0f} ms p99 {load99 * 1e3:.0f} ms (idle p50 {idle50 * 1e3:.0f} ms "
        f"p99 {idle99 * 1e3:.0f} ms), within {int(max(t['steps']))} step(s)"
    )
    print(line)
    if args.report:
        write_report(args, rows, t, line)


def write_report(
    args: argparse.Namespace, rows: list[dict[str, float]], t: dict[str, list[float]], line: str
) -> None:
    table = "\n".join(
        f"| {r['callers']:.0f} | {r['serial_tps']:.1f} | {r['concurrent_tps']:.1f} | "
        f"{r['ratio']:.2f}x | {r['steps']:.0f} | {r['max_batch']:.0f} |"
        for r in rows
    )
    tries = "\n".join(
        f"| {i} | {i * args.chunk} | {t['loaded'][i] * 1e3:.0f} | {t['steps'][i]:.0f} | "
        f"{t['idle'][i] * 1e3:.0f} |"
        for i in range(len(t["loaded"]))
    )
    args.report.write_text(
        f"# Engine concurrency on CPU, {datetime.date.today()}\n\n"
        f"`python bench/concurrency.py {' '.join(sys.argv[1:])}`\n\n"
        f"- code: {code_version()}\n- CPU: {cpu_model()}, {usable_cores()} usable cores, "
        f"{args.threads} torch threads\n- torch {torch.__version__}, Python "
        f"{platform.python_version()}; demo model SmolLM2-135M-Instruct fp32, in-process "
        f"executor, prefix caching off, max_num_batched_tokens {args.chunk}\n\n"
        f"## Throughput: N callers each generating {args.new_tokens} tokens\n\n"
        "| callers | serial tok/s | concurrent tok/s | ratio | steps (concurrent) | "
        "most requests in one step |\n|---|---|---|---|---|---|\n"
        f"{table}\n\n"
        f"## First token of a 16-token request while a {args.doc_tokens}-token document "
        "prefills\n\n"
        "| try | document tokens computed when it arrived | first token (ms) | engine steps "
        "it took | idle engine, same request (ms) |\n|---|---|---|---|---|\n"
        f"{tries}\n\n{line}\n"
    )


if __name__ == "__main__":
    main()
