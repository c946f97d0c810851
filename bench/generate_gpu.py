"""End-to-end prefill and decode speed of a 7B-shaped model on one GPU, against the hardware.

    python bench/generate_gpu.py                                  # InternLM2.5-7B shape, bf16
    python bench/generate_gpu.py --model-config bench/model_configs/internlm2_5-1_8b-chat.json
    python bench/generate_gpu.py --prompt-lens 8192 --batch 8 --batch-lens 8192,32768

Random weights (load_format=dummy) from a public config.json, tp=1, in-process executor. The
ceilings are measured in the same run: bf16 matmul TFLOP/s (8192^3) and device-to-device copy
bandwidth. Prefill FLOPs = 2 * params * L + causal attention 2 * L^2 * heads * head_dim * layers
(4 * L^2 * h * d / 2, as in FlashAttention's accounting). The decode floor is the bytes one
step must read (weights + KV at that context) over the copy bandwidth. The config's
rope_scaling is dropped unless the prompt is longer than max_position_embeddings: it
changes no shape or FLOP. Prefill and decode are timed in one call per length (see
bench/long_context.py's timed_generate), so the prefix cache never shortens a timed prefill.
`--batch N` also times decode with N distinct sequences at each `--batch-lens` context: the
median step in which all N get a token, against a floor of the weights + N sequences' KV.
`--profile DIR` then traces `--profile-steps` decode steps at every prompt length and of the
first batched decode with torch.profiler (started and stopped inside the engine thread's
executor calls): a Chrome trace in DIR, the top operators by device time in the report, and how
busy the device was between the first traced step's start and the last one's end (kernel time /
wall time: what is not busy is host work between kernels: scheduling, input building,
sampling, launches). A traced run sends the timed run's prompts again: the prefix cache (on)
serves their prefill, so a trace costs a few steps. Timed prompts are fresh random tokens, so
the cache never shortens a timed prefill.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dist_runtime import CacheConfig, Runtime, SamplingParams, SchedulerConfig  # noqa: E402


def measure_ceilings(device: str = "cuda") -> tuple[float, float]:
    """(bf16 matmul TFLOP/s, copy GB/s counting bytes read + written); small sizes off CUDA
    (`--device cpu` is a smoke run of the script, not a measurement)."""
    size = 8192 if device == "cuda" else 512
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    t = _time(lambda: a @ b, 10)
    src = torch.empty(1 << (30 if device == "cuda" else 24), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    c = _time(lambda: dst.copy_(src), 10)
    return 2 * size**3 / t / 1e12, 2 * src.numel() / c / 1e9


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(fn, reps: int) -> float:
    fn()
    _sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync()
    return (time.perf_counter() - start) / reps


def batched_decode(rt: Runtime, prompts: list[list[int]], new_tokens: int) -> float:
    """Median seconds of a decode step in which every one of `prompts` gets a token (after
    all their prefills), from the times the executor's steps return."""
    from bench.long_context import stamped_generate

    _, stamps, _ = stamped_generate(rt, prompts, new_tokens, progress=False)
    full = [i for i, (_, n) in enumerate(stamps) if n == len(prompts)]
    gaps = [stamps[i][0] - stamps[i - 1][0] for i in full if i - 1 in full]
    if len(gaps) < 2:
        raise RuntimeError(f"only {len(gaps)} full-batch decode steps; raise --decode-tokens")
    return statistics.median(gaps)


def trace_decode_steps(
    rt: Runtime, prompts: list[list[int]], first: int, last: int, activities: list
) -> tuple[Any, float]:
    """Generate `prompts` greedily for `last` executor steps, tracing steps first..last
    (1-based; the prefill steps come first) with torch.profiler. The profiler starts and stops
    inside the engine thread's executor calls, where the ops run. Returns the profiler and the
    wall seconds from the first traced step's start to the last one's end."""
    from torch.profiler import profile

    executor = rt.engine.executor
    assert executor is not None
    execute = executor.execute
    prof = profile(activities=activities)
    calls, window = [0], [0.0, 0.0]

    def traced(plan):
        calls[0] += 1
        if calls[0] == first:
            _sync()
            prof.__enter__()
            window[0] = time.perf_counter()
        out = execute(plan)
        if calls[0] == last:
            _sync()
            window[1] = time.perf_counter()
            prof.__exit__(None, None, None)
        return out

    executor.execute = traced  # type: ignore[method-assign]
    try:
        params = SamplingParams(max_new_tokens=last, temperature=0.0, ignore_eos=True)
        rt.generate(prompts, params)
    finally:
        del executor.execute
    return prof, window[1] - window[0]


def profile_decode(
    rt: Runtime, prompts: list[list[int]], steps: int, out_dir: Path, device: str, top_n: int = 15
) -> list[str]:
    """Trace `steps` decode steps of `prompts` (sent before, so the prefix cache serves their
    prefill: one step each, then two untraced decode steps); returns report lines: the
    device-busy fraction, the host time between kernels, and the top operators (device kernels
    on CUDA)."""
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    first = len(prompts) + 3
    prof, wall_s = trace_decode_steps(rt, prompts, first, first + steps - 1, activities)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"decode_trace_{len(prompts[0])}" + (f"_b{len(prompts)}" if len(prompts) > 1 else "")
    trace = out_dir / f"{name}.json"
    prof.export_chrome_trace(str(trace))
    events = prof.key_averages()
    on_device = device == "cuda"
    key = "self_device_time_total" if on_device else "self_cpu_time_total"
    pool = [e for e in events if not on_device or e.device_type.name == "CUDA"]
    busy_us = sum(getattr(e, key) for e in pool)
    wall_us = wall_s * 1e6
    what = "kernel time" if on_device else "operator self CPU time"
    batch = f" batch {len(prompts)}" if len(prompts) > 1 else ""
    lines = [
        f"profile of {steps} decode steps{batch} at {len(prompts[0])} context: "
        f"{wall_us / steps / 1e3:.2f} ms/step wall, {what} {busy_us / steps / 1e3:.2f} ms/step "
        f"-> device busy {busy_us / wall_us:.0%}, idle {(wall_us - busy_us) / steps / 1e3:.2f} "
        f"ms/step; Chrome trace {trace}",
    ]
    top = sorted(pool, key=lambda e: getattr(e, key), reverse=True)[:top_n]
    for e in top:
        lines.append(
            f"  {e.key[:70]:70s} {getattr(e, key) / steps / 1e3:8.3f} ms/step "
            f"({getattr(e, key) / max(busy_us, 1):5.1%}), {e.count / steps:.0f} calls/step"
        )
    return lines


class HostBreakdown:
    """Where a decode step's wall time goes, without a profiler: each ModelRunner.execute call's
    host time, each graph replay's host time (the cudaGraphLaunch call), and its device time
    (CUDA events around the replay). Steps are consecutive execute calls that replayed a graph;
    `report` gives medians over the steps recorded since `reset`."""

    def __init__(self, rt: Runtime):
        executor = rt.engine.executor
        self.runner = executor.worker.runner  # type: ignore[union-attr]
        self.calls: list[tuple[float, float, int]] = []  # (start, end, replays so far)
        self.replays: list[tuple[float, float, Any, Any]] = []  # host start, end, events
        execute = self.runner.execute

        def timed_execute(plan: Any) -> Any:
            start = time.perf_counter()
            out = execute(plan)
            self.calls.append((start, time.perf_counter(), len(self.replays)))
            return out

        self.runner.execute = timed_execute
        graphs = self.runner.graphs
        if graphs is not None:
            for key, replay in list(graphs._replay.items()):
                graphs._replay[key] = self._timed(replay)

    def _timed(self, replay: Any) -> Any:
        def timed() -> None:
            cuda = torch.cuda.is_available()  # emulated graphs (CPU smoke runs): no device time
            events = [torch.cuda.Event(enable_timing=True) if cuda else None for _ in range(2)]
            if events[0] is not None:
                events[0].record()
            start = time.perf_counter()
            replay()
            end = time.perf_counter()
            if events[1] is not None:
                events[1].record()
            self.replays.append((start, end, events[0], events[1]))

        return timed

    def reset(self) -> None:
        self.calls.clear()
        self.replays.clear()

    def report(self) -> str:
        """Medians in ms over graph-replay steps: step interval, execute call (inputs before
        the replay, the replay call, then logits, sampling and the wait for the device), engine
        time between calls, graph run (device)."""
        _sync()
        if self.runner.runs_ahead():
            return "host breakdown: decode steps launch ahead (DIST_RUNTIME_ASYNC_DECODE=1)"
        steps = []
        for prev, (start, end, done), nxt in zip(self.calls, self.calls[1:], self.calls[2:]):
            if done == prev[2] + 1:  # this call replayed one graph: a decode step
                r0, r1, e0, e1 = self.replays[done - 1]
                steps.append(
                    (nxt[0] - start, end - start, r0 - start, r1 - r0, end - r1, nxt[0] - end)
                    + (e0.elapsed_time(e1) / 1e3 if e0 is not None else float("nan"),)
                )
        if not steps:
            return "host breakdown: no graph-replay steps"
        m = [statistics.median(col) * 1e3 for col in zip(*steps)]
        slowest = max(range(len(steps)), key=lambda i: steps[i][0])
        worst = ", ".join(f"{x * 1e3:.2f}" for x in steps[slowest])
        return (
            f"host breakdown over {len(steps)} decode steps (medians, ms): step {m[0]:.2f} = "
            f"worker execute {m[1]:.2f} (inputs {m[2]:.3f}, graph launch call {m[3]:.3f}, "
            f"logits + sampling + wait {m[4]:.2f}) + engine between steps {m[5]:.3f}; "
            f"graph run on the device {m[6]:.2f}; slowest step (#{slowest + 1}): {worst}"
        )


def param_count(cfg: dict) -> int:
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = h // cfg["num_attention_heads"]
    attn = h * hd * (cfg["num_attention_heads"] * 2 + cfg["num_key_value_heads"] * 2)
    return layers * (attn + 3 * h * inter) + 2 * cfg["vocab_size"] * h


KV_NAMES = {0: "bf16", 8: "int8", 4: "int4"}


def run(args: argparse.Namespace) -> list[str]:
    from bench.long_context import timed_generate

    cfg = json.loads(Path(args.model_config).read_text())
    lens = [int(x) for x in args.prompt_lens.split(",")]
    batch_lens = [int(x) for x in args.batch_lens.split(",")] if args.batch > 1 else []
    session = max(lens + batch_lens) + args.decode_tokens + 16
    if session <= cfg.get("max_position_embeddings", 0):
        cfg.pop("rope_scaling", None)  # changes no shape or FLOP; kept where it makes L legal
    if args.layers is not None:
        cfg["num_hidden_layers"] = args.layers
    if args.weights == "int4":  # random 4-bit weights in the AWQ layout, group 128
        cfg["quantization_config"] = {
            "quant_method": "awq",
            "bits": 4,
            "group_size": 128,
            "zero_point": True,
            "version": "gemm",
        }
    folder = Path(tempfile.mkdtemp()) / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    tflops_peak, copy_gbs = measure_ceilings(args.device)
    rows = [f"ceilings: bf16 matmul {tflops_peak:.0f} TFLOP/s, copy {copy_gbs:.0f} GB/s"]
    rt = Runtime(
        model=str(folder),
        device=args.device,
        dtype="bfloat16",
        session_len=session,
        load_format="dummy",
        enforce_eager=args.enforce_eager,
        cache=CacheConfig(
            gpu_memory_utilization=0.92, enable_prefix_caching=True, quant_policy=args.kv_quant
        ),
        scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=args.chunk),
    )
    params = param_count(cfg)
    from dist_runtime.config import ModelConfig
    from dist_runtime.memory_planner import kv_bytes_per_token, weight_bytes_per_worker

    model = ModelConfig.from_dict(cfg)
    # Bytes a decode step reads for the weights: every layer and the LM head, not the embedding.
    weight_bytes = weight_bytes_per_worker(model, 1, "bfloat16")
    # ... and per token of context: K and V (codes plus scale and zero for a quantized cache).
    token_kv_bytes = kv_bytes_per_token(model, 1, "bfloat16", args.kv_quant)
    weight_bytes -= 2 * cfg["vocab_size"] * cfg["hidden_size"]
    emb = cfg["vocab_size"] * cfg["hidden_size"]
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    heads, layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
    gen = torch.Generator().manual_seed(0)
    warm = [[1] * min(512, session - 8)]
    rt.generate(warm, SamplingParams(max_new_tokens=4, temperature=0.0))  # warm-up
    runner = rt.engine.executor.worker.runner  # type: ignore[union-attr]
    breakdown = HostBreakdown(rt) if runner.graphs is not None else None
    for n in lens:
        ids = torch.randint(3, cfg["vocab_size"], (n,), generator=gen).tolist()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        # One call: prefill = until the first token's step returned; decode = the steps after.
        if breakdown is not None:
            breakdown.reset()
        prefill, _, token_times, steps = timed_generate(
            rt, ids, args.decode_tokens + 1, progress=args.progress
        )
        decode = (token_times[-1] - token_times[0]) / args.decode_tokens
        # Embedding lookups are no matmul and the LM head runs on the last token only.
        flops = 2 * (params - 2 * emb) * n + 2 * n * n * heads * hd * layers
        rows.append(
            f"prefill {n:>7} tokens ({steps} steps): {prefill:7.2f} s, {n / prefill:9.0f} tok/s, "
            f"{flops / prefill / 1e12:6.1f} TFLOP/s ({flops / prefill / 1e12 / tflops_peak:.0%}"
            " of matmul peak)"
        )
        kv_bytes = token_kv_bytes * n
        # A decode step reads every layer weight, the LM head and the KV once.
        floor = (weight_bytes + kv_bytes) / (copy_gbs * 1e9)
        rows.append(
            f"decode at {n:>7} context: {decode * 1e3:6.2f} ms/token, floor "
            f"{floor * 1e3:5.2f} ms (weights {weight_bytes / 1e9:.1f} GB + KV "
            f"{kv_bytes / 1e9:.2f} GB at the copy bandwidth) -> {floor / decode:.0%}; "
            f"peak GPU memory {_peak_gib():.1f} GiB"
        )
        if breakdown is not None:
            rows.append(f"  {breakdown.report()}")
        print("\n".join(rows[-3:]), flush=True)
        if args.profile:
            rows += profile_decode(rt, [ids], args.profile_steps, Path(args.profile), args.device)
            print("\n".join(rows[-16:]), flush=True)
    for i, n in enumerate(batch_lens):
        prompts = [
            torch.randint(3, cfg["vocab_size"], (n,), generator=gen).tolist()
            for _ in range(args.batch)
        ]
        if breakdown is not None:
            breakdown.reset()
        step = batched_decode(rt, prompts, args.decode_tokens)
        kv_bytes = args.batch * token_kv_bytes * n
        floor = (weight_bytes + kv_bytes) / (copy_gbs * 1e9)
        rows.append(
            f"decode batch {args.batch} at {n:>7} context: {step * 1e3:6.2f} ms/step, floor "
            f"{floor * 1e3:5.2f} ms (weights {weight_bytes / 1e9:.1f} GB + KV "
            f"{kv_bytes / 1e9:.2f} GB) -> {floor / step:.0%}"
        )
        if breakdown is not None:
            rows.append(f"  {breakdown.report()}")
        print("\n".join(rows[-2:]), flush=True)
        if args.profile and i == 0:
            rows += profile_decode(rt, prompts, args.profile_steps, Path(args.profile), args.device)
            print("\n".join(rows[-16:]), flush=True)
    rt.shutdown()
    return rows


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model-config",
        default=str(Path(__file__).parent / "model_configs" / "internlm2_5-7b-chat.json"),
    )
    p.add_argument("--prompt-lens", default="8192,32768,65536")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument(
        "--batch",
        type=int,
        default=1,
        help="also time decode with this many distinct sequences at each --batch-lens length",
    )
    p.add_argument("--batch-lens", default="8192,32768", help="contexts of the batched decode")
    p.add_argument(
        "--device", default="cuda", help="cuda; cpu only smoke-tests the script (tiny configs)"
    )
    p.add_argument("--chunk", type=int, default=16384, help="max_num_batched_tokens")
    p.add_argument("--layers", type=int, help="override num_hidden_layers (e.g. 2 for 1M tokens)")
    p.add_argument("--progress", action="store_true", help="prefill progress bar")
    p.add_argument(
        "--enforce-eager", action="store_true", help="decode without CUDA graphs (baseline)"
    )
    p.add_argument(
        "--weights",
        choices=["bf16", "int4"],
        default="bf16",
        help="int4: random AWQ 4-bit weights (group 128) through the W4A16 kernel",
    )
    p.add_argument(
        "--kv-quant",
        type=int,
        choices=[0, 8, 4],
        default=0,
        help="KV cache: 0 bf16, 8 int8, 4 int4 (cache.quant_policy); the floor counts its bytes",
    )
    p.add_argument(
        "--profile", metavar="DIR", help="trace decode steps with torch.profiler into DIR"
    )
    p.add_argument("--profile-steps", type=int, default=8, help="decode steps to trace")
    p.add_argument("--out", default=None, help="markdown report path")
    args = p.parse_args()
    rows = run(args)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (smoke run)"
    print(rows[0], flush=True)
    if args.out:
        Path(args.out).write_text(
            f"# generate on {name}, {datetime.date.today()}\n\n"
            f"torch {torch.__version__}, python {platform.python_version()}, model shape "
            f"{args.model_config}, layers {args.layers or 'as configured'} (random {args.weights} "
            f"weights, bf16 activations, KV cache {KV_NAMES[args.kv_quant]}, "
            f"tp=1, chunk {args.chunk}, decode {'eager' if args.enforce_eager else 'CUDA graphs'})"
            "\n\n"
            + "\n".join(f"- {r}" for r in rows)
            + "\n\n"
            + f"Command: `python bench/generate_gpu.py {' '.join(sys.argv[1:])}`\n"
        )


if __name__ == "__main__":
    main()
