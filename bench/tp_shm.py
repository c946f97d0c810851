"""CPU tensor parallelism: tp collectives through shared memory against gloo, in the same run.

    python bench/tp_shm.py                                     # demo model, tp 3
    python bench/tp_shm.py --report docs/benchmarks/tp_shm_cpu_<date>.md

1. A bare all-reduce between `--tp` processes for the message sizes a step sends (a decode
   step's hidden row at batch 1 and 8, a 512-token prefill chunk's rows), through gloo over
   127.0.0.1 and through the shared-memory group (`kernels/cpu_shm.py`); median of `--calls`
   calls after a warm-up, the slowest rank's view (every rank waits for the last to arrive).
2. The demo model at `--tp` over Ray, greedy, prefix cache off: a Runtime with
   `DIST_RUNTIME_CPU_COLLECTIVES=gloo`, then one with `shm` (the default), on the same
   prompts; per run the engine's step records give the prefill time (the steps that computed
   the prompts) and the mean decode step; the fastest of `--repeats` runs after a warm-up is
   kept.

The summary line gives shm against gloo for the bare call per size and for the model's steps.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from dist_runtime.config import CPU_COLLECTIVES_ENV  # noqa: E402
from kernels import cpu_shm  # noqa: E402
from kernels.cpu_shm import ShmGroup  # noqa: E402
from workers.distributed import create_store  # noqa: E402


def _calls(rank: int, world: int, port: int, path: str, sizes: list[int], calls: int, out: Any):
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    group = ShmGroup(path, rank, world, create=False)
    results = {}
    for n in sizes:
        x = torch.randn(n)
        for name, reduce in (
            ("gloo", lambda t: dist.all_reduce(t)),
            ("shm", lambda t: group.all_reduce(t, 60.0)),
        ):
            for _ in range(20):
                reduce(x)
            times = []
            for _ in range(calls):
                dist.barrier()
                start = time.perf_counter()
                reduce(x)
                times.append(time.perf_counter() - start)
            results[(name, n)] = statistics.median(times)
    out.put((rank, results))
    group.close()
    dist.destroy_process_group()


def bare_calls(world: int, sizes: list[int], calls: int) -> dict[tuple[str, int], float]:
    """Median seconds per all-reduce of each size, the slowest rank's."""
    path = cpu_shm.new_segment_path("bench")
    owner = ShmGroup(path, 0, world, create=True)
    owner.close()  # the ranks map it themselves
    store, port = create_store("127.0.0.1", 60)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_calls, args=(r, world, port, str(path), sizes, calls, queue))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    try:
        got = [queue.get(timeout=600) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
        path.unlink(missing_ok=True)
    del store
    return {k: max(r[k] for _, r in got) for k in got[0][1]}


def model_steps(
    tp: int, batch: int, prompt_len: int, new_tokens: int, repeats: int
) -> dict[str, dict[str, float]]:
    """{choice: {"prefill_s", "decode_ms"}}: the fastest of `repeats` runs after a warm-up, on
    the same prompts for both choices."""
    from dist_runtime import Runtime, SamplingParams

    gen = torch.Generator().manual_seed(batch)
    runs = [
        [torch.randint(100, 20000, (prompt_len,), generator=gen).tolist() for _ in range(batch)]
        for _ in range(repeats + 1)
    ]
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    best = {}
    for choice in ("gloo", "shm"):
        os.environ[CPU_COLLECTIVES_ENV] = choice  # read by the workers when they start
        try:
            rt = Runtime(
                tp=tp,
                session_len=prompt_len + new_tokens + 16,
                cache={"enable_prefix_caching": False},
            )
        finally:
            os.environ.pop(CPU_COLLECTIVES_ENV, None)
        b = best[choice] = {"prefill_s": float("inf"), "decode_ms": float("inf")}
        with rt:
            for run, prompts in enumerate(runs):  # the first is a warm-up
                earlier = rt.engine.recent_steps()
                last = earlier[-1].step_id if earlier else -1
                rt.generate(prompts, params)
                steps = [s for s in rt.engine.recent_steps() if s.step_id > last]
                if run:
                    prefill = sum(s.seconds for s in steps if s.num_prefill_tokens)
                    decode = [s.seconds for s in steps if not s.num_prefill_tokens]
                    b["prefill_s"] = min(b["prefill_s"], prefill)
                    b["decode_ms"] = min(b["decode_ms"], statistics.mean(decode) * 1e3)
    return best


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tp", type=int, default=3)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-model", action="store_true", help="only the bare calls")
    p.add_argument("--report", type=Path)
    args = p.parse_args()
    if not cpu_shm.available():
        sys.exit("shared-memory collectives are not available here (/dev/shm, C compiler)")
    hidden = 576  # the demo model's
    sizes = {
        "decode b1": hidden,
        "decode b8": 8 * hidden,
        f"prefill {args.prompt_len}": args.prompt_len * hidden,
    }
    bare = bare_calls(args.tp, list(sizes.values()), args.calls)
    lines = [
        f"Bare all-reduce between {args.tp} processes (median of {args.calls} calls):",
        "",
        "| message | floats | gloo (us) | shm (us) | gloo / shm |",
        "|---|---:|---:|---:|---:|",
    ]
    summary = []
    for name, n in sizes.items():
        g, s = bare[("gloo", n)] * 1e6, bare[("shm", n)] * 1e6
        lines.append(f"| {name} | {n:,} | {g:.0f} | {s:.0f} | {g / s:.1f}x |")
        summary.append(f"{name} call {g / s:.1f}x")
    if not args.skip_model:
        lines += [
            "",
            f"The demo model at tp {args.tp}, prompts of {args.prompt_len} tokens, "
            f"{args.new_tokens} new tokens, fastest of {args.repeats} runs:",
            "",
            "| batch | prefill gloo (s) | prefill shm (s) | speed-up | decode step gloo (ms) "
            "| decode step shm (ms) | speed-up |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            r = model_steps(args.tp, batch, args.prompt_len, args.new_tokens, args.repeats)
            rg, rs = r["gloo"], r["shm"]
            lines.append(
                f"| {batch} | {rg['prefill_s']:.2f} | {rs['prefill_s']:.2f} | "
                f"{rg['prefill_s'] / rs['prefill_s']:.2f}x | {rg['decode_ms']:.1f} | "
                f"{rs['decode_ms']:.1f} | {rg['decode_ms'] / rs['decode_ms']:.2f}x |"
            )
            summary.append(
                f"b{batch} prefill {rg['prefill_s'] / rs['prefill_s']:.2f}x, "
                f"decode {rg['decode_ms'] / rs['decode_ms']:.2f}x"
            )
    text = "\n".join(lines)
    line = f"tp-shm: shm vs gloo at tp {args.tp}: " + ", ".join(summary)
    print(text)
    print(line)
    if args.report:
        machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
        args.report.write_text(
            f"# CPU tp collectives: shared memory vs gloo ({datetime.date.today()})\n\n"
            + __doc__.split("\n\n", 2)[2]
            + f"\nMachine: {machine}.\n\n{text}\n\n**Summary:** `{line}`\n\n"
            f"Command: `python bench/tp_shm.py --report {args.report}`\n"
        )


if __name__ == "__main__":
    main()
