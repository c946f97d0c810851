"""CPU collectives benchmark: what tensor parallelism's gloo traffic costs per step.

Runs the same greedy workload with `Runtime(tp=1)` (in-process, no communication) and
`Runtime(tp=3)` (three Ray worker processes, gloo over 127.0.0.1), fp32, prefix cache off, and
reads the workers' collective counters (`Executor.comm_stats`) after every step. Beforehand a
micro-benchmark times a bare gloo all-reduce between three processes for each message size the
model sends, which fixes the simple cost model

    all-reduce seconds = calls x latency + bytes x 2 (tp - 1) / tp / bandwidth

(a ring all-reduce moves 2 (tp - 1) / tp of the tensor per rank): latency is the smallest
message's call, bandwidth comes from the largest ones. The model is fitted twice, to the median
call and to the mean call: on an oversubscribed CPU a call's time has a long tail (a peer that
is not running when the data arrives), which the median leaves out and the model's calls meet.

What is measured, per (tp, batch):

* step time: wall time of `executor.execute` on the driver (plan out, every rank's forward,
  sampled tokens back). The counters are fetched after each step, outside that time.
* prefill: the one step that computes all prompts (the token budget holds batch x prompt);
  decode: the following new_tokens - 1 steps, one token per sequence.
* each rank's calls, bytes (its input tensor) and seconds inside `tp_all_reduce` and
  `tp_all_gather` (the LM head's logit slices). On gloo a call's seconds include waiting for
  the slowest peer to arrive, so the rank with the least time in collectives is the best
  estimate of the communication itself, and step time minus that rank's collective time is
  the step's compute and overhead on the slowest rank.
* repeats: one short warm-up run per batch size, then `--repeats` runs. Other processes only
  ever add time, so for each step position (the prefill, decode step 1, 2, ...) the fastest
  repeat's sample is kept, its time and its counters together; the phase reports the mean of
  those steps (the lower envelope), and the median over runs of each run's mean step time.

Run from the repository root:

    python bench/collectives.py --model demo --report docs/benchmarks/collectives_cpu_<date>.md
    python bench/collectives.py --model micro --repeats 1     # small random model, smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import multiprocessing as mp
import os
import platform
import queue
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bench.machine import code_version, cpu_counters, cpu_model, usable_cores  # noqa: E402
from dist_runtime import Runtime, SamplingParams, SchedulerConfig  # noqa: E402
from dist_runtime.formats.demo_model import demo_model_path  # noqa: E402
from dist_runtime.formats.random_checkpoint import write_random_checkpoint  # noqa: E402
from workers.distributed import pin_interfaces_to_loopback  # noqa: E402

FP32 = 4
PHASES = ("prefill", "decode")


# -- machine load -----------------------------------------------------------------------------


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user + system) of `root` and its descendants: this process, the
    micro-benchmark's processes, and the Ray instance it started with its worker processes."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.name)
        parent[pid] = int(fields[1])
        # utime, stime, and cutime, cstime: the children it has reaped (gone from /proc)
        cpu[pid] = sum(int(f) for f in fields[11:15]) / tick
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        total += cpu.get(pid, 0.0)
        stack.extend(children.get(pid, []))
    return total


class LoadMeter:
    """Share of the machine's CPU that processes outside this one's tree used over a span."""

    def __init__(self) -> None:
        self.machine = cpu_counters()
        self.ours = tree_cpu_seconds(os.getpid())
        self.load = loadavg()

    def others(self) -> float | None:
        end = cpu_counters()
        if self.machine is None or end is None or end[1] <= self.machine[1]:
            return None
        ours = tree_cpu_seconds(os.getpid()) - self.ours
        busy = end[0] - self.machine[0]
        return max(busy - ours, 0.0) / (end[1] - self.machine[1])


# -- micro-benchmark ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Message:
    op: str  # "all_reduce" | "all_gather"
    rows: int
    cols: int

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor each rank passes in (fp32)."""
        return self.rows * self.cols * FP32

    def label(self) -> str:
        return f"{self.op} {self.rows} x {self.cols} x 4 B"


@dataclasses.dataclass
class MicroResult:
    world: int
    message: Message
    iters: int
    median_s: float
    mean_s: float


def _iters_for(nbytes: int) -> int:
    return max(10, min(300, int(2e8 // max(nbytes, 1))))


def _micro_worker(rank: int, world: int, init: str, messages: list[Message], out: Any) -> None:
    torch.set_num_threads(1)  # as a Ray worker on CPU runs
    pin_interfaces_to_loopback("127.0.0.1")
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    results = []
    for m in messages:
        x = torch.randn(m.rows, m.cols)
        parts = [torch.empty_like(x) for _ in range(world)]
        iters = _iters_for(m.nbytes)
        times = []
        for i in range(iters + 3):  # 3 warm-up calls
            if i == 3:
                dist.barrier()
            start = time.perf_counter()
            if m.op == "all_reduce":
                dist.all_reduce(x)
            else:
                dist.all_gather(parts, x)
            if i >= 3:
                times.append(time.perf_counter() - start)
        results.append((iters, statistics.median(times), statistics.fmean(times)))
    dist.barrier()
    if rank == 0:
        out.put(results)
    dist.destroy_process_group()


def micro_benchmark(world: int, messages: list[Message]) -> list[MicroResult]:
    """Time each message's collective between `world` fresh processes (gloo, 127.0.0.1,
    1 torch thread each); rank 0's per-call median and mean over back-to-back calls."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{tmp}/rendezvous"
        procs = [
            ctx.Process(target=_micro_worker, args=(r, world, init, messages, out))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        try:
            results = None
            while results is None:
                try:
                    results = out.get(timeout=1.0)
                except queue.Empty:
                    if any(p.exitcode not in (None, 0) for p in procs):
                        codes = [p.exitcode for p in procs]
                        raise RuntimeError(f"micro-benchmark workers failed: {codes}") from None
            for p in procs:
                p.join(timeout=60)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
    return [MicroResult(world, m, *r) for m, r in zip(messages, results)]


@dataclasses.dataclass(frozen=True)
class CostModel:
    """all-reduce seconds = calls x latency + bytes x 2 (tp - 1) / tp / bandwidth."""

    tp: int
    latency_s: float
    bandwidth: float
    """Bytes per second on the wire (of the 2 (tp - 1) / tp share each rank moves)."""

    stat: str
    """Which per-call time of the micro-benchmark it was fitted to: "median" or "mean"."""

    @classmethod
    def fit(cls, tp: int, reduces: list[MicroResult], stat: str) -> CostModel:
        """Latency: the smallest message's call. Seconds per wire byte: least squares through
        the origin of (call - latency) against wire bytes, which the largest messages
        dominate; none above latency (all latency-bound) gives infinite bandwidth."""
        calls = [getattr(r, f"{stat}_s") for r in reduces]
        latency = calls[min(range(len(reduces)), key=lambda i: reduces[i].message.nbytes)]
        wire = [r.message.nbytes * 2 * (tp - 1) / tp for r in reduces]
        extra = [c - latency for c in calls]
        per_byte = sum(w * e for w, e in zip(wire, extra)) / sum(w * w for w in wire)
        return cls(tp, latency, 1 / per_byte if per_byte > 0 else float("inf"), stat)

    def describe(self) -> str:
        return (
            f"{self.stat} call: latency {self.latency_s * 1e6:.0f} us, wire bandwidth "
            f"{self.bandwidth / 1e9:.2f} GB/s"
        )

    def seconds(self, calls: float, nbytes: float) -> float:
        return calls * self.latency_s + nbytes * 2 * (self.tp - 1) / self.tp / self.bandwidth


# -- model runs -----------------------------------------------------------------------------


@dataclasses.dataclass
class StepSample:
    phase: str
    tokens: int
    seconds: float
    stats: list[dict[str, dict[str, float]]]
    """Per rank: op -> calls, bytes, seconds during this step."""


@dataclasses.dataclass
class PhaseSummary:
    """One phase of one (tp, batch): per-step averages over each step position's fastest
    repeat."""

    tp: int
    batch: int
    phase: str
    steps: int
    tokens: float
    step_s: float
    median_run_step_s: float
    ar_calls: float
    ar_bytes: float
    ar_s: list[float]
    """Per rank."""
    ag_calls: float
    ag_bytes: float
    ag_s: list[float]

    @property
    def coll_s(self) -> list[float]:
        return [a + g for a, g in zip(self.ar_s, self.ag_s)]


class ModelRun:
    """One Runtime; each generate records every step's time and counters."""

    def __init__(self, folder: Path, tp: int, session_len: int, max_batched: int):
        self.tp = tp
        self.rt = Runtime(
            model=str(folder),
            tp=tp,
            session_len=session_len,
            device="cpu",
            dtype="float32",
            scheduler=SchedulerConfig(max_num_batched_tokens=max(8192, max_batched)),
            cache={"enable_prefix_caching": False},
        )
        self.model_config = self.rt.engine.model_config

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[StepSample]:
        executor = self.rt.engine.executor
        assert executor is not None
        execute = executor.execute
        samples: list[StepSample] = []

        def timed(plan: Any) -> Any:
            start = time.perf_counter()
            out = execute(plan)
            seconds = time.perf_counter() - start
            phase = "prefill" if any(len(s.token_ids) > 1 for s in plan.seqs) else "decode"
            tokens = sum(len(s.token_ids) for s in plan.seqs)
            samples.append(StepSample(phase, tokens, seconds, executor.comm_stats(reset=True)))
            return out

        executor.comm_stats(reset=True)
        executor.execute = timed  # type: ignore[method-assign]
        try:
            params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
            self.rt.generate(prompts, params)
        finally:
            del executor.execute  # back to the class method
        kinds = [s.phase for s in samples]
        if kinds != ["prefill"] + ["decode"] * (new_tokens - 1):
            raise RuntimeError(f"tp={self.tp}: expected 1 prefill + decodes, got {kinds}")
        return samples

    def close(self) -> None:
        self.rt.shutdown()


def summarize(tp: int, batch: int, phase: str, runs: list[list[StepSample]]) -> PhaseSummary:
    per_run = [[s for s in run if s.phase == phase] for run in runs]
    best = [min(position, key=lambda s: s.seconds) for position in zip(*per_run, strict=True)]
    n = len(best)
    ranks = len(best[0].stats)

    def mean(op: str, key: str, rank: int = 0) -> float:
        return sum(s.stats[rank][op][key] for s in best) / n

    for rank in range(1, ranks):  # every rank sends the same collectives
        for op in ("tp_all_reduce", "tp_all_gather"):
            for key in ("calls", "bytes"):
                if mean(op, key, rank) != mean(op, key):
                    raise RuntimeError(f"rank {rank} {op} {key} differs from rank 0")
    return PhaseSummary(
        tp=tp,
        batch=batch,
        phase=phase,
        steps=n,
        tokens=sum(s.tokens for s in best) / n,
        step_s=sum(s.seconds for s in best) / n,
        median_run_step_s=statistics.median(sum(s.seconds for s in r) / n for r in per_run),
        ar_calls=mean("tp_all_reduce", "calls"),
        ar_bytes=mean("tp_all_reduce", "bytes"),
        ar_s=[mean("tp_all_reduce", "seconds", r) for r in range(ranks)],
        ag_calls=mean("tp_all_gather", "calls"),
        ag_bytes=mean("tp_all_gather", "bytes"),
        ag_s=[mean("tp_all_gather", "seconds", r) for r in range(ranks)],
    )


def make_prompts(batch: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (batch, prompt_len), generator=gen).tolist()


def micro_checkpoint(workdir: Path) -> Path:
    folder = workdir / "collectives-micro-h96-l2"
    if not (folder / "config.json").is_file():
        write_random_checkpoint(
            folder,
            architecture="llama",
            seed=0,
            vocab_size=600,
            hidden_size=96,
            intermediate_size=192,
            num_layers=2,
            num_heads=6,
            num_kv_heads=3,
        )
    return folder


# -- reporting ------------------------------------------------------------------------------


def _ms(s: float) -> str:
    return f"{s * 1e3:.2f}"


def _us(s: float) -> str:
    return f"{s * 1e6:.0f}"


def _size(nbytes: float) -> str:
    for unit, scale in (("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"


def _pct(x: float | None) -> str:
    return "unknown" if x is None else f"{100 * x:.0f}%"


def micro_table(results: list[MicroResult], models: list[CostModel]) -> list[str]:
    lines = [
        "| processes | collective | tensor bytes | calls timed | median per call (us) "
        "| mean per call (us) | cost model, median / mean fit (us) "
        "| tensor bytes / median (MB/s) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        fitted = r.message.op == "all_reduce" and r.world == models[0].tp
        fits = [_us(m.seconds(1, r.message.nbytes)) for m in models]
        predicted = " / ".join(fits) if fitted else ""
        lines.append(
            f"| {r.world} | {r.message.label()} | {_size(r.message.nbytes)} | {r.iters} "
            f"| {_us(r.median_s)} | {_us(r.mean_s)} | {predicted} "
            f"| {r.message.nbytes / r.median_s / 1e6:.3g} |"
        )
    return lines


def config_table(rows: list[PhaseSummary], layers: int, models: list[CostModel]) -> list[str]:
    lines = [
        "| phase | batch | tp | tokens / step | ms / step (envelope) | ms / step (median run) "
        "| all-reduce calls / step | calls / layer | all-reduce bytes / step | bytes / layer "
        "| all-reduce ms / step (min-max rank) | share of step (min-max) "
        "| effective MB/s (min-rank s) | predicted all-reduce ms / step (median / mean fit) "
        "| LM-head all-gather: calls, bytes sent, ms (min-max rank) / step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in rows:
        if s.tp == 1:
            comm = ["0", "0", "0", "0", "0", "0%", "-", "0", "none"]
        else:
            lo, hi = min(s.ar_s), max(s.ar_s)
            comm = [
                f"{s.ar_calls:.0f}",
                f"{s.ar_calls / layers:.2f}",
                _size(s.ar_bytes),
                _size(s.ar_bytes / layers),
                f"{_ms(lo)}-{_ms(hi)}",
                f"{100 * lo / s.step_s:.0f}-{100 * hi / s.step_s:.0f}%",
                f"{s.ar_bytes / lo / 1e6:.3g}" if lo > 0 else "-",
                " / ".join(_ms(m.seconds(s.ar_calls, s.ar_bytes)) for m in models),
                f"{s.ag_calls:.0f}, {_size(s.ag_bytes)}, {_ms(min(s.ag_s))}-{_ms(max(s.ag_s))}",
            ]
        lines.append(
            f"| {s.phase} | {s.batch} | {s.tp} | {s.tokens:.0f} | {_ms(s.step_s)} "
            f"| {_ms(s.median_run_step_s)} | " + " | ".join(comm) + " |"
        )
    return lines


def split_table(pairs: list[tuple[PhaseSummary, PhaseSummary]]) -> list[str]:
    lines = [
        "| phase | batch | tp=1 ms / step | tp=3 ms / step | tp3 / tp1 "
        "| tp=3 ms in collectives, min rank (communication) "
        "| tp=3 ms in collectives, max rank (communication + waiting for peers) "
        "| tp=3 ms outside collectives, slowest rank (compute + overhead) | that / tp=1 step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for one, three in pairs:
        lo, hi = min(three.coll_s), max(three.coll_s)
        outside = three.step_s - lo
        lines.append(
            f"| {one.phase} | {one.batch} | {_ms(one.step_s)} | {_ms(three.step_s)} "
            f"| {three.step_s / one.step_s:.2f}x | {_ms(lo)} | {_ms(hi)} | {_ms(outside)} "
            f"| {outside / one.step_s:.2f}x |"
        )
    return lines


def _share_range(lo: float, hi: float, step: float) -> str:
    a, b = round(100 * lo / step), round(100 * hi / step)
    return f"{a}%" if a == b else f"{a}-{b}%"


def summary_line(pairs: list[tuple[PhaseSummary, PhaseSummary]], models: list[CostModel]) -> str:
    parts = []
    for one, three in pairs:
        shares = [
            f"{100 * m.seconds(three.ar_calls, three.ar_bytes) / three.step_s:.0f}%" for m in models
        ]
        parts.append(
            f"{one.phase} b{one.batch} tp{three.tp}/tp1 step {three.step_s / one.step_s:.2f}x, "
            f"all-reduce {_share_range(min(three.ar_s), max(three.ar_s), three.step_s)} of "
            f"tp{three.tp} step (predicted {' / '.join(shares)} from "
            f"{' / '.join(m.stat for m in models)} call)"
        )
    m = models[0]
    parts.append(
        f"gloo {m.tp}-proc {m.stat} latency {m.latency_s * 1e6:.0f} us, "
        f"{m.bandwidth / 1e9:.2f} GB/s"
    )
    return "collectives-cpu: " + "; ".join(parts)


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        choices=("demo", "micro"),
        default="demo",
        help="demo: SmolLM2-135M (hidden 576, 30 layers); micro: a 2-layer random model",
    )
    p.add_argument("--tp", type=int, default=3, help="the tp compared with tp=1 (default 3)")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated (default 1,8)")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per cell (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path(os.environ.get("TMPDIR", "/tmp")) / "dist_runtime_bench",
        help="where the micro model's checkpoint is written once and reused",
    )
    p.add_argument("--report", type=Path, help="write a markdown report here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    version = code_version()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be >= 2 to time decoding")

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {msg}", flush=True)

    args.workdir.mkdir(parents=True, exist_ok=True)
    folder = demo_model_path() if args.model == "demo" else micro_checkpoint(args.workdir)
    log(f"checkpoint {folder}; load average {loadavg()}")

    # The config decides the message sizes; read it without starting workers.
    from dist_runtime.config import RuntimeConfig

    mc = RuntimeConfig(model=str(folder)).load_model_config()
    hidden, layers, vocab = mc.hidden_size, mc.num_layers, mc.vocab_size
    vocab_per_rank = -(-vocab // args.tp)
    token_counts = sorted({*batches, *(b * args.prompt_len for b in batches)})
    messages = [Message("all_reduce", n, hidden) for n in token_counts]
    messages += [Message("all_gather", b, vocab_per_rank) for b in sorted(set(batches))]

    meter = LoadMeter()
    micro = micro_benchmark(args.tp, messages)
    reduces = [r for r in micro if r.message.op == "all_reduce"]
    models = [CostModel.fit(args.tp, reduces, stat) for stat in ("median", "mean")]
    if args.tp != 2:  # reference: one process per core on this 2-core machine
        micro += micro_benchmark(2, [m for m in messages if m.op == "all_reduce"])
    micro_others = meter.others()
    for r in micro:
        log(
            f"micro {r.world} processes {r.message.label()}: median {_us(r.median_s)} us, "
            f"mean {_us(r.mean_s)} us over {r.iters} calls"
        )
    log(
        f"cost model: {'; '.join(m.describe() for m in models)}; other processes used "
        f"{_pct(micro_others)} of the CPU"
    )

    session_len = args.prompt_len + args.new_tokens + 16
    max_batched = max(batches) * args.prompt_len
    summaries: dict[tuple[int, int, str], PhaseSummary] = {}
    others: dict[int, float | None] = {}
    loads: dict[int, tuple[str, str]] = {}
    for tp in (1, args.tp):
        run = ModelRun(folder, tp, session_len, max_batched)
        log(f"started tp={tp}" + (" (Ray, 1 torch thread per worker)" if tp > 1 else ""))
        meter = LoadMeter()
        try:
            for batch in batches:
                prompts = make_prompts(batch, args.prompt_len, vocab, args.seed + batch)
                run.generate(prompts, 2)  # warm-up: a prefill and a decode step
                runs = []
                for i in range(args.repeats):
                    runs.append(run.generate(prompts, args.new_tokens))
                    pre = runs[-1][0].seconds
                    dec = sum(s.seconds for s in runs[-1][1:])
                    log(
                        f"  tp={tp} batch {batch} repeat {i + 1}/{args.repeats}: prefill "
                        f"{pre * 1e3:.0f} ms, decode {dec * 1e3:.0f} ms "
                        f"({args.new_tokens - 1} steps)"
                    )
                for phase in PHASES:
                    summaries[tp, batch, phase] = summarize(tp, batch, phase, runs)
            others[tp] = meter.others()
            loads[tp] = (meter.load, loadavg())
        finally:
            run.close()
        log(f"tp={tp}: other processes used {_pct(others[tp])} of the CPU")

    rows = [summaries[tp, b, ph] for ph in PHASES for b in batches for tp in (1, args.tp)]
    pairs = [(summaries[1, b, ph], summaries[args.tp, b, ph]) for ph in PHASES for b in batches]
    for s in rows:
        lo, hi = min(s.ar_s), max(s.ar_s)
        predicted = " / ".join(f"{m.seconds(s.ar_calls, s.ar_bytes) * 1e3:.1f}" for m in models)
        log(
            f"{s.phase} b{s.batch} tp={s.tp}: {s.step_s * 1e3:.1f} ms/step, all-reduce "
            f"{s.ar_calls:.0f} calls {_size(s.ar_bytes)} {lo * 1e3:.1f}-{hi * 1e3:.1f} ms/step "
            f"(predicted {predicted} ms from median / mean call), all-gather "
            f"{s.ag_calls:.0f} calls {_size(s.ag_bytes)} "
            f"{min(s.ag_s) * 1e3:.1f}-{max(s.ag_s) * 1e3:.1f} ms/step"
        )
    summary = summary_line(pairs, models)

    if args.report is not None:
        command = "python " + shlex.join([os.path.relpath(sys.argv[0], REPO_ROOT), *sys.argv[1:]])
        report = render_report(
            folder=folder,
            args=args,
            hidden=hidden,
            layers=layers,
            vocab=vocab,
            micro=micro,
            micro_others=micro_others,
            models=models,
            rows=rows,
            pairs=pairs,
            others=others,
            loads=loads,
            summary=summary,
            command=command,
            version=version,
            elapsed_s=time.perf_counter() - started,
        )
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(report, encoding="utf-8")
        log(f"wrote {args.report}")
    print(summary)
    return 0


def render_report(
    *,
    folder: Path,
    args: argparse.Namespace,
    hidden: int,
    layers: int,
    vocab: int,
    micro: list[MicroResult],
    micro_others: float | None,
    models: list[CostModel],
    rows: list[PhaseSummary],
    pairs: list[tuple[PhaseSummary, PhaseSummary]],
    others: dict[int, float | None],
    loads: dict[int, tuple[str, str]],
    summary: str,
    command: str,
    version: str,
    elapsed_s: float,
) -> str:
    tp = args.tp
    load_lines = [
        f"- tp={t}: other processes used {_pct(others[t])} of the machine's CPU; load average "
        f"{loads[t][0]} at the start, {loads[t][1]} at the end"
        for t in others
    ]
    lines = [
        f"# CPU collectives: tp={tp} vs tp=1 ({datetime.date.today()})",
        "",
        "Produced by `bench/collectives.py`; its docstring says how each number is measured.",
        "",
        f"**Summary:** `{summary}`",
        "",
        "## Machine and software",
        "",
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores ({usable_cores()} usable)",
        f"- tp=1: one process, {torch.get_num_threads()} torch threads; tp={tp}: {tp} Ray worker "
        "processes with 1 torch thread each, gloo over 127.0.0.1",
        f"- Python {platform.python_version()}, torch {torch.__version__}, {platform.platform()}",
        f"- code: {version}",
        f"- micro-benchmark: other processes used {_pct(micro_others)} of the machine's CPU",
        *load_lines,
        "",
        "## Workload",
        "",
        f"- model: `{folder}` (hidden {hidden}, {layers} layers, vocab {vocab}), fp32, CPU",
        f"- batches {args.batch_sizes} of random {args.prompt_len}-token prompts, greedy, "
        f"{args.new_tokens} new tokens, EOS ignored, prefix cache off",
        "- prefill: one step computes every prompt of the batch (the token budget holds them); "
        f"decode: the {args.new_tokens - 1} steps after it",
        f"- one warm-up run per batch (prefill + 1 decode step), then {args.repeats} runs; "
        "each step position keeps its fastest repeat (time and counters of that same step), "
        "the tables give the mean over those steps; the median run's mean step time is "
        "alongside",
        "",
        f"## Bare gloo collectives between {tp} processes",
        "",
        f"Cost model fitted to the {tp}-process all-reduce rows, once to the median call and "
        f"once to the mean call: {'; '.join(m.describe() for m in models)}. Latency is the "
        "smallest message's call; wire bandwidth is fitted to the larger messages' extra "
        f"time, per 2 (tp - 1) / tp = {2 * (tp - 1) / tp:.2f} x tensor bytes (what a ring "
        "all-reduce moves per rank). "
        "The 2-process rows (one process per core) are a reference for how much of the "
        "per-call time is oversubscription rather than gloo.",
        "",
        *micro_table(micro, models),
        "",
        "## Per configuration",
        "",
        "Counts and bytes are per rank (identical on every rank; bytes are the tensor each "
        "rank passes in). Calls per layer divide the step's calls by the layer count: each "
        "layer all-reduces twice (attention output, MLP down projection) and the "
        "vocab-parallel embedding once per forward. Time in all-reduce differs between ranks "
        "because a gloo call also waits for the last peer to arrive: the min rank is the "
        "closest to pure communication. Effective MB/s = tensor bytes / min-rank seconds.",
        "",
        *config_table(rows, layers, models),
        "",
        "## Compute vs communication",
        "",
        "Collectives here = all-reduce + LM-head all-gather.",
        "",
        *split_table(pairs),
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


if __name__ == "__main__":
    sys.exit(main())
