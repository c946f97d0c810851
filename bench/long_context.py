"""CPU benchmark of long-context prefill with context parallelism (cp).

One prompt of L random token ids goes through a fresh `Runtime` for every (L, cp) cell, with
tp=1 and cp workers of one torch thread each: cp=1 runs the in-process executor in this very
process (torch.set_num_threads(1) here), cp>1 runs Ray workers, which the Runtime starts with
one thread each (and it starts Ray itself, with max(os.cpu_count(), cp) CPUs, so cp=4 fits
on a 2-core machine by oversubscribing it). Weights are replicated over cp; the KV cache is
striped over the cp ranks block by block, and each cell's cache is sized to its session:
ceil(ceil((L + new tokens) / block_size) / cp) + 2 blocks per worker, so KV bytes per worker
fall as 1/cp. The scheduler's token budget (`--max-batched-tokens`) is per cp rank, so one
step computes up to cp times that many prompt tokens; the first chunk of the prompt runs the
pass-KV ring, later chunks all-gather their queries over the cached shards.

How each number is measured (one timed `generate` call per cell, greedy, EOS ignored):

* The executor's `execute` is wrapped to stamp the wall time at which each step returns.
  Prefill time = from the `generate` call until the step that sampled the first new token
  returned: scheduling, every prefill chunk, the LM head and sampling of that one token (so
  "prefill + 1 sampled token"). With `--decode-tokens 0` (the sweep's default) the call has
  max_new_tokens=1 and the table also gives the whole call's time, which only adds output
  packaging.
* Decode (`--decode-tokens N`, 16 for `--million`): the same call runs max_new_tokens=N+1,
  and decode ms/token = (time the last token's step returned - time the first token's step
  returned) / N. Prefill and decode thus come from ONE run: no second request (which would
  either redo the prefill or hit the prefix cache) is involved.
* Parallel efficiency (cp>1) = t(cp=1) / (cp * t(cp)) on prefill times of the same L.
* Memory: `Runtime.worker_memory()` after the timed call: per worker the peak resident set
  (ru_maxrss of its process) and the KV cache bytes. For cp=1 the worker is this driver
  process, so its peak RSS includes the driver (the prompt, the Python side) and every earlier
  cp=1 cell of the run; all cp=1 cells run first, shortest first, before Ray is started.
* Before the timed call each Runtime does one untimed warm-up on a different random prompt
  with 2 new tokens. By default it is min(L, cp * (budget + block_size)) tokens long: one full
  first step (the pass-KV ring at full chunk size), a short second chunk over the cached part
  (the all-gathered-queries path) and one decode step, so one-off costs (first use of the
  collectives and kernels, allocator growth) stay out of the timing. `--warmup-tokens` sets
  another length (0: none). The timed prompt must not hit the prefix cache; the run checks
  that it did not, and that nothing was preempted.
* `--repeats N` times N different random prompts in the same Runtime and keeps the fastest of
  each number (on a shared machine other processes only ever add time); default 1.

Run from the repository root (no installation needed):

    python bench/long_context.py                  # sweep: L 8192,32768,131072 x cp 1,2,4
    python bench/long_context.py --lengths 2048,4096 --cps 1,2        # small smoke run
    python bench/long_context.py --million --report docs/benchmarks/long_context_cpu_<date>.md
    python bench/long_context.py --million --million-tokens 65536     # smoke the 1M path
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import platform
import resource
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from bench.machine import code_version, cpu_model, usable_cores  # noqa: E402
from dist_runtime import CacheConfig, Runtime, SamplingParams, SchedulerConfig  # noqa: E402
from dist_runtime.formats.random_checkpoint import write_random_checkpoint  # noqa: E402

MILLION = 1 << 20
SLACK_BLOCKS = 2
"""KV blocks per worker beyond what the session needs."""
FIRST_TOKEN_ID = 4
"""Prompt ids start here, past the checkpoint's special tokens."""
MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class ModelShape:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def describe(self, seed: int) -> str:
        return (
            f"{self.name}: random-weight Llama layout (`write_random_checkpoint`, seed {seed}), "
            f"fp32, vocab {self.vocab_size}, hidden {self.hidden_size}, intermediate "
            f"{self.intermediate_size}, {self.num_layers} layer(s), {self.num_heads} query "
            f"head(s) / {self.num_kv_heads} KV head(s) of head_dim {self.head_dim}"
        )

    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 4  # fp32 K and V

    def write(self, folder: Path, seed: int, max_positions: int) -> Path:
        return write_random_checkpoint(
            folder,
            architecture="llama",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=max_positions,
            seed=seed,
            with_tokenizer=False,
        )


SWEEP_MODEL = ModelShape(
    name="small model",
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
)
MILLION_MODEL = ModelShape(
    name="micro model",
    vocab_size=256,
    hidden_size=16,
    intermediate_size=32,
    num_layers=1,
    num_heads=1,
    num_kv_heads=1,
    head_dim=16,
)


@dataclasses.dataclass
class Cell:
    """One (L, cp) measurement."""

    length: int
    cp: int
    block_size: int
    num_blocks: int
    """KV blocks per worker."""
    decode_tokens: int
    executor: str = ""
    warmup_tokens: int = 0
    prefill_runs: list[float] = dataclasses.field(default_factory=list)
    call_runs: list[float] = dataclasses.field(default_factory=list)
    decode_runs: list[float] = dataclasses.field(default_factory=list)
    """ms per decode token, per repeat."""
    prefill_steps: int = 0
    kv_bytes: list[int] = dataclasses.field(default_factory=list)
    rss_bytes: list[int] = dataclasses.field(default_factory=list)
    error: str | None = None

    @property
    def prefill_s(self) -> float | None:
        return min(self.prefill_runs, default=None)

    @property
    def call_s(self) -> float | None:
        return min(self.call_runs, default=None)

    @property
    def decode_ms(self) -> float | None:
        return min(self.decode_runs, default=None)

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.prefill_runs)


# -- measuring ------------------------------------------------------------------------------


def random_prompt(length: int, vocab: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_TOKEN_ID, vocab, (length,), generator=gen).tolist()


def session_len_for(length: int, new_tokens: int) -> int:
    return length + max(32, new_tokens)


def blocks_per_worker(length: int, new_tokens: int, block_size: int, cp: int) -> int:
    logical = math.ceil((length + new_tokens) / block_size)
    return math.ceil(logical / cp) + SLACK_BLOCKS


def stamped_generate(
    rt: Runtime, prompts: list[list[int]], new_tokens: int, progress: bool
) -> tuple[float, list[tuple[float, int]], list[Any]]:
    """Greedy `generate` of `new_tokens` per prompt (EOS ignored), recording when each
    executor step returned and how many tokens it sampled: (start time, stamps, outputs)."""
    stamps: list[tuple[float, int]] = []
    executor = rt.engine.executor
    assert executor is not None
    execute, collect = executor.execute, executor.collect

    def stamped(plan: Any) -> Any:
        out = execute(plan)
        stamps.append((time.perf_counter(), len(out.tokens)))
        return out

    def stamped_collect() -> Any:  # steps launched ahead (DIST_RUNTIME_ASYNC_DECODE=1)
        out = collect()
        stamps.append((time.perf_counter(), len(out.tokens)))
        return out

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    executor.execute = stamped  # type: ignore[method-assign]
    executor.collect = stamped_collect  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        outs = rt.generate(prompts, params, use_tqdm=progress)
    finally:
        del executor.execute, executor.collect  # back to the class methods
    return t0, stamps, outs


def timed_generate(
    rt: Runtime, prompt: list[int], new_tokens: int, progress: bool
) -> tuple[float, float, list[float], int]:
    """(first-token time, call time, each sampled token's step time, steps before the first
    token), all times from the start of the `generate` call."""
    t0, stamps, (out,) = stamped_generate(rt, [prompt], new_tokens, progress)
    call = time.perf_counter() - t0
    if len(out.token_ids) != new_tokens:
        raise RuntimeError(f"generated {len(out.token_ids)} tokens, wanted {new_tokens}")
    token_times = [t - t0 for t, n in stamps if n]
    if len(token_times) != new_tokens:
        raise RuntimeError(f"{len(token_times)} steps sampled a token, wanted {new_tokens}")
    first_step = next(i for i, (_, n) in enumerate(stamps) if n)
    return token_times[0], call, token_times, first_step + 1


def run_cell(
    folder: Path,
    shape: ModelShape,
    cell: Cell,
    args: argparse.Namespace,
    log: Callable[[str], None],
) -> None:
    """Measure one cell in a fresh Runtime; fills `cell` in place."""
    new_tokens = cell.decode_tokens + 1
    with Runtime(
        model=str(folder),
        tp=1,
        cp=cell.cp,
        session_len=session_len_for(cell.length, new_tokens),
        device="cpu",
        dtype="float32",
        cache=CacheConfig(block_size=cell.block_size, num_blocks=cell.num_blocks),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_batched_tokens),
        step_timeout_s=args.step_timeout_s,
    ) as rt:
        assert rt.engine.executor is not None
        cell.executor = type(rt.engine.executor).__name__
        warm = args.warmup_tokens
        if warm is None:
            warm = cell.cp * (args.max_batched_tokens + cell.block_size)
        cell.warmup_tokens = warm = min(warm, cell.length)
        if warm > 0:
            wp = random_prompt(warm, shape.vocab_size, args.seed + 1_000_003)
            log(f"  L={cell.length} cp={cell.cp}: {cell.executor}, warm-up ({warm} tokens) ...")
            timed_generate(rt, wp, 2, progress=False)
        for r in range(args.repeats):
            hits_before = rt.prefix_cache_stats()["hit_tokens"]
            prompt = random_prompt(cell.length, shape.vocab_size, args.seed + r)
            log(f"  L={cell.length} cp={cell.cp}: timed run {r + 1}/{args.repeats} ...")
            first, call, token_times, steps = timed_generate(rt, prompt, new_tokens, args.progress)
            hits = rt.prefix_cache_stats()["hit_tokens"] - hits_before
            if hits:
                raise RuntimeError(f"the timed prompt hit {hits} prefix-cached tokens")
            if rt.engine.scheduler.num_preemptions:
                raise RuntimeError(
                    f"{rt.engine.scheduler.num_preemptions} preemptions (KV cache too small)"
                )
            cell.prefill_runs.append(first)
            cell.call_runs.append(call)
            cell.prefill_steps = steps
            if cell.decode_tokens:
                decode_ms = (token_times[-1] - token_times[0]) / cell.decode_tokens * 1e3
                cell.decode_runs.append(decode_ms)
        mem = sorted(rt.worker_memory(), key=lambda m: m["rank"])
    cell.kv_bytes = [m["kv_cache_bytes"] for m in mem]
    cell.rss_bytes = [m["max_rss_bytes"] for m in mem]


def efficiency(cell: Cell, cells: list[Cell]) -> float | None:
    base = next((c for c in cells if c.cp == 1 and c.length == cell.length and c.ok), None)
    if cell.cp == 1 or base is None or not cell.ok:
        return None
    assert base.prefill_s is not None and cell.prefill_s is not None
    return base.prefill_s / (cell.cp * cell.prefill_s)


# -- reporting ------------------------------------------------------------------------------


def ray_version() -> str:
    try:
        import ray
    except ImportError:
        return "not installed"
    return str(ray.__version__)


def _mib(n: int) -> str:
    return f"{n / MIB:.1f}"


def _per_worker(values: list[int]) -> str:
    if not values:
        return "-"
    if len(set(values)) == 1:
        return _mib(values[0]) + (f" (x{len(values)})" if len(values) > 1 else "")
    return " / ".join(_mib(v) for v in values)


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def oversubscribed(cp: int) -> bool:
    return cp > usable_cores()


def summary_line(cells: list[Cell], million: bool) -> str:
    done = [c for c in cells if c.ok]
    if not done:
        return (
            "long_context: no cell finished ("
            + "; ".join(f"L={c.length} cp={c.cp}: {c.error}" for c in cells)
            + ")"
        )
    length = max(c.length for c in done)
    row = sorted((c for c in cells if c.length == length), key=lambda c: c.cp)
    times = []
    for c in row:
        if not c.ok:
            times.append(f"cp={c.cp} FAILED")
            continue
        extra = []
        eff = efficiency(c, cells)
        if eff is not None:
            extra.append(f"eff {eff:.2f}")
        if oversubscribed(c.cp):
            extra.append("oversubscribed")
        text = f"cp={c.cp} {c.prefill_s:.2f} s" + (f" ({', '.join(extra)})" if extra else "")
        if c.decode_ms is not None:
            text += f" + decode {c.decode_ms:.1f} ms/tok"
        times.append(text)
    kv = ", ".join(f"cp={c.cp} {_mib(max(c.kv_bytes))} MiB" for c in row if c.ok)
    rss = ", ".join(f"cp={c.cp} {'/'.join(_mib(r) for r in c.rss_bytes)} MiB" for c in row if c.ok)
    tag = "long_context-1M" if million else "long_context"
    failed = sum(not c.ok for c in cells)
    tail = f"; {failed} cell(s) FAILED" if failed else ""
    return (
        f"{tag}: {length} tok prefill {', '.join(times)}; KV/worker {kv}; "
        f"peak RSS/worker {rss}; {usable_cores()} cores{tail}"
    )


def render_report(
    *,
    cells: list[Cell],
    shape: ModelShape,
    args: argparse.Namespace,
    summary: str,
    command: str,
    elapsed_s: float,
    version: str,
) -> str:
    cores, logical = usable_cores(), os.cpu_count()
    decode = any(c.decode_tokens for c in cells)
    mode = "1M-token run" if args.million else "sweep"
    lines = [
        f"# CPU long-context prefill with context parallelism, {mode} ({datetime.date.today()})",
        "",
        "Produced by `bench/long_context.py`; its docstring says how each number is measured.",
        "",
        f"**Summary:** `{summary}`",
        "",
        "## Machine and software",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- CPU: {cpu_model()}, os.cpu_count() = {logical} logical cores ({cores} usable by "
        "this process)",
        f"- Python {platform.python_version()}, torch {torch.__version__}, ray {ray_version()}, "
        f"{platform.platform()}",
        f"- code: {version}",
        "- one torch thread per worker: cp=1 runs the in-process executor in the driver "
        "process, cp>1 runs cp Ray worker processes (tp=1)",
    ]
    over = sorted({c.cp for c in cells if oversubscribed(c.cp)})
    if over:
        lines += [
            "",
            f"> **Oversubscribed:** this machine has {cores} usable cores, so cp="
            f"{', '.join(map(str, over))} runs more single-thread workers than there are cores "
            "(Ray is started with max(os.cpu_count(), cp) CPUs so the placement group fits). "
            "Those workers time-share the cores, and the driver and Ray's own processes "
            "compete with them too: their times and efficiencies measure oversubscription, "
            "not how cp scales on enough cores.",
        ]
    lines += [
        "",
        "## Model",
        "",
        shape.describe(args.seed) + f"; KV cache {shape.kv_bytes_per_token()} bytes per token "
        "(all layers, K and V, fp32).",
        "",
        "## Workload",
        "",
        "- one prompt of L random token ids per cell, greedy, EOS ignored, a fresh Runtime per "
        f"cell; {'max_new_tokens = 1' if not decode else f'{args.decode_tokens + 1} new tokens'}",
        f"- scheduler token budget {args.max_batched_tokens} tokens per step per cp rank (a "
        "step computes up to cp times as many); KV block size "
        f"{cells[0].block_size if cells else '-'}; KV cache per worker sized to the session: "
        f"ceil(ceil((L + new tokens) / block_size) / cp) + {SLACK_BLOCKS} blocks",
        "- warm-up per Runtime (untimed): another random prompt of "
        + (
            f"{args.warmup_tokens} tokens"
            if args.warmup_tokens is not None
            else "min(L, cp x (budget + block size)) tokens"
        )
        + ", 2 new tokens; the timed prompts had no prefix-cache hits and no preemptions",
        f"- {args.repeats} timed run(s) per cell, each on a different random prompt"
        + ("; the table keeps the fastest of each number" if args.repeats > 1 else ""),
        "",
        "## Results",
        "",
        "Prefill = from the `generate` call until the step that sampled the first new token "
        "returned (all prefill chunks + LM head + sampling one token). Efficiency = "
        "t(cp=1) / (cp x t(cp)) at the same L. "
        + (
            "Decode ms/token = (last token's step - first token's step) / "
            f"{args.decode_tokens}, from the same run. "
            if decode
            else "Call = the whole `generate(max_new_tokens=1)` call. "
        )
        + "KV and peak RSS are per worker (rank order); for cp=1 the worker is the driver "
        "process, so its RSS includes the driver and the earlier cp=1 cells.",
        "",
        "| L (tokens) | cp | executor | steps to 1st token | prefill (s) | prefill tok/s "
        f"| efficiency | {'decode ms/token' if decode else 'call (s)'} | KV / worker (MiB) "
        "| peak RSS / worker (MiB) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in sorted(cells, key=lambda c: (c.length, c.cp)):
        if not c.ok:
            lines.append(
                f"| {c.length} | {c.cp} | {c.executor or '-'} | | **failed**: "
                f"{(c.error or '').replace('|', '/')[:200]} | | | | | |"
            )
            continue
        assert c.prefill_s is not None
        eff = efficiency(c, cells)
        eff_text = "-" if eff is None else f"{eff:.2f}"
        if oversubscribed(c.cp):
            eff_text += " (oversubscribed)"
        last = ("-" if c.decode_ms is None else f"{c.decode_ms:.1f}") if decode else _secs(c.call_s)
        lines.append(
            f"| {c.length} | {c.cp} | {c.executor} | {c.prefill_steps} | {c.prefill_s:.2f} "
            f"| {c.length / c.prefill_s:.0f} | {eff_text} | {last} | {_per_worker(c.kv_bytes)} "
            f"| {_per_worker(c.rss_bytes)} |"
        )
    driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    lines += [
        "",
        f"Driver process peak RSS over the whole run: {_mib(driver)} MiB (for cp=1 this is "
        "also the worker's number above; for cp>1 the workers are separate processes).",
        "",
        "## Command",
        "",
        "```",
        command,
        "```",
        "",
        f"Wall time of the whole run: {elapsed_s:.0f} s.",
        "",
    ]
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument(
        "--million",
        action="store_true",
        help="one micro-model run at --million-tokens prompt tokens + 16 decode tokens",
    )
    p.add_argument(
        "--million-tokens",
        type=int,
        default=MILLION,
        help=f"prompt tokens of the --million run (default {MILLION}; lower it to smoke-test)",
    )
    p.add_argument(
        "--lengths",
        type=_ints,
        default=[8192, 32768, 131072],
        help="sweep: comma-separated prompt lengths (default 8192,32768,131072)",
    )
    p.add_argument(
        "--cps", type=_ints, help="comma-separated cp sizes (default: sweep 1,2,4; --million 2)"
    )
    p.add_argument(
        "--decode-tokens",
        type=int,
        help="decode tokens timed after the first one (default: sweep 0, --million 16)",
    )
    p.add_argument("--block-size", type=int, help="KV block size (default: sweep 16, --million 64)")
    p.add_argument(
        "--max-batched-tokens",
        type=int,
        default=8192,
        help="scheduler token budget per step PER CP RANK (default 8192)",
    )
    p.add_argument(
        "--warmup-tokens",
        type=int,
        help="untimed warm-up prompt per Runtime (default min(L, cp * (max-batched-tokens + "
        "block-size)): one full step and a short second chunk; 0: none)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed runs per cell on different prompts; the fastest counts (default 1)",
    )
    p.add_argument(
        "--step-timeout-s",
        type=float,
        default=3600.0,
        help="seconds one step may take before the workers count as hung (default 3600)",
    )
    p.add_argument("--seed", type=int, default=0, help="checkpoint and prompt seed")
    p.add_argument("--report", type=Path, help="write a markdown report to this path")
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar over the prefill tokens",
    )
    args = p.parse_args(argv)
    if args.million:
        args.lengths = [args.million_tokens]
    args.cps = args.cps or ([2] if args.million else [1, 2, 4])
    if args.decode_tokens is None:
        args.decode_tokens = 16 if args.million else 0
    args.block_size = args.block_size or (64 if args.million else 16)
    if args.million_tokens < 1 or args.repeats < 1 or args.max_batched_tokens < 1:
        p.error("--million-tokens, --repeats and --max-batched-tokens must be >= 1")
    if args.decode_tokens < 0 or (args.warmup_tokens or 0) < 0:
        p.error("--decode-tokens and --warmup-tokens must be >= 0")
    if args.block_size & (args.block_size - 1) or args.block_size < 1:
        p.error("--block-size must be a power of two")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    version = code_version()
    torch.set_num_threads(1)  # the in-process (cp=1) worker; Ray workers set their own

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {msg}", flush=True)

    shape = MILLION_MODEL if args.million else SWEEP_MODEL
    new_tokens = args.decode_tokens + 1
    longest = session_len_for(max(args.lengths), new_tokens)
    max_positions = max(1 << 21, 1 << (longest - 1).bit_length())
    # cp=1 first (before Ray starts, so its driver-process RSS is not inflated by Ray), then
    # every length shortest first within each cp.
    cells = [
        Cell(
            length=length,
            cp=cp,
            block_size=args.block_size,
            num_blocks=blocks_per_worker(length, new_tokens, args.block_size, cp),
            decode_tokens=args.decode_tokens,
        )
        for cp in sorted(set(args.cps))
        for length in sorted(set(args.lengths))
    ]
    log(
        f"{'million' if args.million else 'sweep'}: lengths {sorted(set(args.lengths))}, cps "
        f"{sorted(set(args.cps))}, {usable_cores()} usable cores (os.cpu_count() "
        f"{os.cpu_count()}), torch {torch.__version__}"
    )
    with tempfile.TemporaryDirectory(prefix="long_context_") as tmp:
        folder = shape.write(Path(tmp) / "model", args.seed, max_positions)
        log(f"wrote {shape.describe(args.seed)} to {folder}")
        for cell in cells:
            t = time.perf_counter()
            try:
                run_cell(folder, shape, cell, args, log)
            except Exception as e:  # record it and go on with the other cells
                cell.error = f"{type(e).__name__}: {e}"
                log(f"  L={cell.length} cp={cell.cp} FAILED: {cell.error}")
                continue
            eff = efficiency(cell, cells)
            log(
                f"  L={cell.length} cp={cell.cp}: prefill {cell.prefill_s:.2f} s "
                f"({cell.prefill_steps} steps)"
                + (f", decode {cell.decode_ms:.1f} ms/tok" if cell.decode_ms is not None else "")
                + (f", eff {eff:.2f}" if eff is not None else "")
                + (" (oversubscribed)" if oversubscribed(cell.cp) else "")
                + f"; KV/worker {_mib(max(cell.kv_bytes))} MiB, peak RSS/worker "
                f"{'/'.join(_mib(r) for r in cell.rss_bytes)} MiB "
                f"[cell {time.perf_counter() - t:.0f} s]"
            )
    summary = summary_line(cells, args.million)
    if args.report is not None:
        command = "python " + shlex.join([os.path.relpath(sys.argv[0], REPO_ROOT), *sys.argv[1:]])
        report = render_report(
            cells=cells,
            shape=shape,
            args=args,
            summary=summary,
            command=command,
            elapsed_s=time.perf_counter() - started,
            version=version,
        )
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(report, encoding="utf-8")
        log(f"wrote {args.report}")
    print(summary)
    return 0 if all(c.ok for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())
