r"""Predict one long prompt's prefill time and decode ms/token on N GPUs, for every tp x cp mesh.

    python bench/predict.py --gpus 4xA100-80GB \
        --model bench/model_configs/internlm2_5-7b-chat-1m.json --session-len 1048576 \
        [--chunk 8192] [--link nvlink|pcie] [--report PATH]

For every mesh with tp x cp = the number of GPUs and a tp that shards the model, it prints the
memory per worker (`dist_runtime.memory_planner.plan_memory`) and, for the meshes that fit, the
predicted prefill time of a `--session-len`-token prompt and the decode ms/token at that
context, with the terms that make them up. Then it validates the same model against every
single-GPU run stored in `docs/benchmarks/` (parsed from the markdown, not typed in), compares
the target with LMDeploy's published 1M-token round and the FLOP floor, and ends with one
summary line.

The model (per GPU; tokens = the prompt length L, chunks of T = `--chunk` tokens, the
runtime's `max_num_batched_tokens`; el = bytes per element of the dtype):

* **Matmul FLOPs**: 2 x (wqkv + wo + gate + up + down weights) per token per layer, for L/cp
  tokens, sharded over tp; the LM head (2 x vocab x hidden) runs on the last token only, as the
  runtime samples it. Rate: the bf16 8192^3 matmul ceilings measured in the GPU reports, as a
  fraction of that card's datasheet peak, times the target's peak.
* **Attention FLOPs**, causal: per layer 2 x 2 x L^2/2 x heads x head_dim (QK^T and PV, each a
  multiply-add per (query, key, dim), over the L^2/2 pairs the causal rule keeps; exactly
  L(L+1)/2, a 1/L difference), split over tp x cp. Rate: at cp = 1 the paged prefill kernel
  (`attention_kernels_*` reports, by sequence length, log-interpolated and clamped to the
  measured lengths); at cp > 1 the position kernel's sorted-key path (`kernel_bench_position`
  tables), which is what a cp rank runs; both as fractions of the measured card's peak.
* **Elementwise**: RMSNorm + residual (twice a layer, replicated over tp: 4 x hidden x el per
  call), RoPE (2 x (q + kv heads per rank) x head_dim x el + 8), SiLU-and-mul
  (3 x intermediate/tp x el), KV store (4 x KV heads per rank x head_dim x el + 8) bytes per
  token, each at its measured GB/s as a fraction of the measured card's HBM peak.
* **TP all-reduce**: 2 per layer (after the attention o-proj and the MLP down-proj) + 1 after
  the vocab-parallel embedding, each of (L/cp) x hidden x el bytes; a ring all-reduce sends
  2(tp-1)/tp of that per GPU, over one direction of the link. Not overlapped with compute.
* **CP exchange** (cp > 1). A *fresh* chunk (nothing of the sequence cached: the prompt's first
  chunk) runs pass-KV ring attention: cp - 1 steps per layer, in each every rank sends its
  local K and V block, (T/cp) x KV heads per rank x head_dim x 2 x el bytes, while it computes
  attention on the block it holds; a step costs max(transfer, compute), so only the excess of
  transfer over compute is added. Every later chunk attends over a cached prefix, where the
  runtime moves queries instead of KV (`workers/context_parallel.py`): per layer an all-gather
  of the chunk's queries ((cp-1) x T/cp x q heads per rank x head_dim x el sent per GPU) and an
  all-to-all of the partial outputs and their fp32 LSE ((cp-1) x T/cp x q heads per rank x
  (head_dim x el + 4)); these are not overlapped and are added.
* **Decode** (batch 1): every rank computes the new token (weights are replicated over cp)
  and reads its weights (the sharded parameters of `weight_params_per_worker` less the
  embedding table, of which a step reads one row) at the measured device-copy fraction of HBM
  peak; every cp rank reads its KV shard, `kv_bytes_per_token` x ceil(context/cp), at the
  split-KV decode kernel's measured fraction (by context per rank); collectives add their bytes
  over the link: the tp all-reduces, and at cp > 1 one all-gather per layer of the partial
  output with its fp32 LSE ((cp-1) x q heads per rank x (head_dim x el + 4) sent per GPU).
  The latency of the per-step collectives and the host-side step cost are not modelled: the
  decode figure is a floor, and the validation shows by how much the measured runs exceed it.
  A batch of B sequences reads the same weights, and its matmuls (2 x params / tp x B FLOP, on
  every cp rank: decode runs replicated over cp) stay under that read up to the batch printed
  as "weight-bound up to"; past it a split decode (each cp rank 1/cp of the batch, at the cost
  of exchanging queries and partial outputs) would save matmul time, below it nothing.

Efficiencies transfer across cards by assumption: a kernel tuned on H100 is taken to reach the
same fraction of an A100's peak. Link rates are datasheet peaks: no multi-GPU run exists yet to
measure them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.hardware import GPU, GPUS, accepted_names, lookup, match_device_name  # noqa: E402
from dist_runtime.config import ConfigError, ModelConfig, SchedulerConfig  # noqa: E402
from dist_runtime.memory_planner import (  # noqa: E402
    DTYPE_BYTES,
    GiB,
    MemoryPlan,
    kv_bytes_per_token,
    kv_heads_per_rank,
    plan_memory,
    valid_tp,
    weight_params_per_worker,
)

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "docs" / "benchmarks"
MODEL_CONFIGS = REPO / "bench" / "model_configs"
AIM = 0.15
"""Validation aim: |predicted - measured| / measured within 15%."""

LMDEPLOY_ROUND_S = 364.0
LMDEPLOY_TOKENS = 1_000_000
LMDEPLOY_SOURCE = (
    "https://github.com/InternLM/lmdeploy/blob/main/docs/en/advance/long_context.md "
    "(passkey retrieval, internlm2_5-7b-chat-1m, TurbomindEngineConfig(session_len=1000000, "
    "tp=4): 'approximately 364 seconds per round when conducted on A100-80G GPUs')"
)
QUOTED_FLOOR_S = 221.0
PREDICTION_TITLE = "Prediction:"
"""How this script's reports' titles begin; `read_report` skips them."""
ELEMENTWISE_KERNELS = ("rms_norm", "rotary", "silu_and_mul", "store_kv")


# -- counts: FLOPs and bytes, pure arithmetic on ModelConfig -------------------------------------


def layer_linear_params(model: ModelConfig) -> int:
    """Weights of one layer's matmuls, unsharded: wqkv, wo, gate, up, down (no biases, norms)."""
    h, hd = model.hidden_size, model.head_dim
    qkv = (model.num_heads + 2 * model.num_kv_heads) * hd * h
    o = h * model.num_heads * hd
    return qkv + o + 3 * model.intermediate_size * h


def lm_head_params(model: ModelConfig) -> int:
    return model.vocab_size * model.hidden_size


def matmul_params(model: ModelConfig) -> int:
    """Non-embedding linear parameters, the LM head included."""
    return model.num_layers * layer_linear_params(model) + lm_head_params(model)


def matmul_flops(model: ModelConfig, tokens: int, lm_head_tokens: int = 1) -> int:
    """Prefill matmul FLOPs: every layer on every token, the LM head on `lm_head_tokens`."""
    return 2 * (
        model.num_layers * layer_linear_params(model) * tokens
        + lm_head_params(model) * lm_head_tokens
    )


def attention_flops(model: ModelConfig, tokens: int) -> int:
    """Causal attention FLOPs of a `tokens`-long prompt: per layer 2 (QK^T, PV) x 2 (a
    multiply-add) x tokens^2/2 (the causal half) x heads x head_dim."""
    return 2 * model.num_layers * tokens * tokens * model.num_heads * model.head_dim


def floor_flops(model: ModelConfig, tokens: int) -> int:
    """The issue's FLOP count for the compute floor: 2 x matmul_params per token (LM head on
    every token) + causal attention."""
    return 2 * matmul_params(model) * tokens + attention_flops(model, tokens)


def elementwise_bytes_per_token(model: ModelConfig, tp: int, el: int) -> dict[str, int]:
    """Bytes each elementwise kernel reads + writes per token per layer on one tp rank (the
    byte counts of `bench/kernel_bench_elementwise.py`)."""
    hd = model.head_dim
    q_local, kv_local = model.num_heads // tp, kv_heads_per_rank(model, tp)
    return {
        "rms_norm": 2 * 4 * model.hidden_size * el,
        "rotary": 2 * (q_local + kv_local) * hd * el + 8,
        "silu_and_mul": 3 * (model.intermediate_size // tp) * el,
        "store_kv": 4 * kv_local * hd * el + 8,
    }


def all_reduce_payload(tokens: int, model: ModelConfig, el: int) -> int:
    """Bytes of one tp all-reduce over `tokens` hidden states."""
    return tokens * model.hidden_size * el


def ring_all_reduce_sent(payload: int, tp: int) -> float:
    """Bytes one GPU sends in a ring all-reduce of `payload` bytes over tp ranks."""
    return 2 * (tp - 1) / tp * payload


def ring_step_bytes(model: ModelConfig, tp: int, tokens_per_rank: int, el: int) -> int:
    """Bytes one cp rank sends per pass-KV ring step per layer: its K and V block."""
    return tokens_per_rank * kv_heads_per_rank(model, tp) * model.head_dim * 2 * el


def query_exchange_bytes(model: ModelConfig, tp: int, cp: int, chunk: int, el: int) -> int:
    """Bytes one GPU sends per layer for a chunk after a cached prefix: the query all-gather
    plus the all-to-all of partial outputs and fp32 LSE."""
    n_max, q_local, hd = -(-chunk // cp), model.num_heads // tp, model.head_dim
    gather = (cp - 1) * n_max * q_local * hd * el
    scatter = (cp - 1) * n_max * q_local * (hd * el + 4)
    return gather + scatter


def decode_merge_bytes(model: ModelConfig, tp: int, cp: int, el: int) -> int:
    """Bytes one GPU sends per layer in a cp decode step of one sequence: the all-gather of its
    partial output with its fp32 LSE packed alongside (`cp_decode_attention`)."""
    return (cp - 1) * (model.num_heads // tp) * (model.head_dim * el + 4)


def decode_weight_bytes(model: ModelConfig, tp: int, el: int) -> int:
    """Weight bytes a decode step reads on one tp rank: all it holds but the embedding table."""
    embedding_rows = -(-model.vocab_size // tp) * model.hidden_size
    return (weight_params_per_worker(model, tp) - embedding_rows) * el


def decode_kv_bytes(model: ModelConfig, tp: int, cp: int, context: int, dtype: str) -> int:
    """KV bytes one worker reads per decode step at `context` tokens."""
    return kv_bytes_per_token(model, tp, dtype) * -(-context // cp)


# -- the stored GPU reports ---------------------------------------------------------------------


@dataclasses.dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    context: str
    """The heading and prose between the previous table or heading and this table."""


@dataclasses.dataclass
class Block:
    kind: str
    """'heading', 'prose' or 'table'."""
    text: str = ""
    table: Table | None = None


@dataclasses.dataclass
class BenchReport:
    path: Path
    title: str
    gpu: GPU
    blocks: list[Block]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def read_report(path: Path) -> BenchReport | None:
    """A GPU report split into headings, prose paragraphs and tables; None for a report whose
    title names no GPU of `bench/hardware.py` (the CPU reports) and for this script's own
    reports, which hold predictions, not measurements."""
    lines = path.read_text().splitlines()
    title = next((ln[2:].strip() for ln in lines if ln.startswith("# ")), "")
    gpu = match_device_name(title)
    if gpu is None or title.lower().startswith(PREDICTION_TITLE.lower()):
        return None
    blocks: list[Block] = []
    para: list[str] = []
    table: list[str] = []
    context: list[str] = []

    def flush() -> None:
        if para:
            text = " ".join(para)
            blocks.append(Block("prose", text))
            context.append(text)
            para.clear()
        if table:
            rows = [_cells(ln) for ln in table if not re.fullmatch(r"\|[\s|:-]+\|?", ln.strip())]
            if rows:
                t = Table(header=[h.lower() for h in rows[0]], rows=rows[1:], context="")
                t.context = " ".join(context)
                blocks.append(Block("table", table=t))
                context.clear()
            table.clear()

    in_code = False
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            continue
        if stripped.startswith("|"):
            if para:
                flush()
            table.append(stripped)
            continue
        if table:
            flush()
        if stripped.startswith("#"):
            flush()
            text = stripped.lstrip("#").strip()
            blocks.append(Block("heading", text))
            context[:] = [text]
        elif not stripped:
            flush()
        elif stripped.startswith("- "):
            flush()
            para.append(stripped[2:])
        else:
            para.append(stripped)
    flush()
    return BenchReport(path=path, title=title, gpu=gpu, blocks=blocks)


def read_reports(bench_dir: Path) -> list[BenchReport]:
    reports = [read_report(p) for p in sorted(bench_dir.glob("*.md"))]
    return [r for r in reports if r is not None]


def _num(text: str) -> float:
    return float(text.replace(",", ""))


def _sentences(text: str) -> list[str]:
    return re.split(r"(?<=\.)\s+(?=[A-Z(`*])", text)


@dataclasses.dataclass(frozen=True)
class Point:
    """One measured figure and where it came from."""

    value: float
    """As measured (TFLOP/s or GB/s)."""
    efficiency: float
    """value / the measured card's datasheet peak."""
    source: str
    at: int = 0
    """Tokens or context length, where the figure depends on it."""


@dataclasses.dataclass
class Rates:
    """Measured kernel and device rates, as fractions of the measured card's peak."""

    matmul: list[Point] = dataclasses.field(default_factory=list)
    copy: list[Point] = dataclasses.field(default_factory=list)
    paged_attention: list[Point] = dataclasses.field(default_factory=list)
    position_attention: list[Point] = dataclasses.field(default_factory=list)
    elementwise: dict[str, list[Point]] = dataclasses.field(default_factory=dict)
    decode_kv: list[Point] = dataclasses.field(default_factory=list)
    cards: set[str] = dataclasses.field(default_factory=set)

    def check(self) -> None:
        missing = [
            name
            for name, pts in (
                ("matmul ceiling", self.matmul),
                ("device copy ceiling", self.copy),
                ("paged prefill attention", self.paged_attention),
                ("position attention", self.position_attention),
                ("split-KV decode", self.decode_kv),
            )
            if not pts
        ]
        missing += [k for k in ELEMENTWISE_KERNELS if not self.elementwise.get(k)]
        if missing:
            raise ValueError(f"no measurement of {', '.join(missing)} in the GPU reports")

    @staticmethod
    def median(points: Sequence[Point]) -> float:
        return statistics.median(p.efficiency for p in points)

    @staticmethod
    def by_length(points: Sequence[Point], length: int) -> float:
        """Efficiency at `length`: piecewise linear in log2(length) between the measured
        lengths (the median where one length was measured more than once), clamped at both
        ends."""
        grouped: dict[int, list[float]] = {}
        for p in points:
            grouped.setdefault(p.at, []).append(p.efficiency)
        xs = sorted(grouped)
        ys = [statistics.median(grouped[x]) for x in xs]
        if length <= xs[0]:
            return ys[0]
        if length >= xs[-1]:
            return ys[-1]
        for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
            if x0 <= length <= x1:
                f = (math.log2(length) - math.log2(x0)) / (math.log2(x1) - math.log2(x0))
                return y0 + f * (y1 - y0)
        return ys[-1]

    def attention(self, cp: int, tokens: int) -> float:
        if cp == 1:
            return self.by_length(self.paged_attention, tokens)
        return self.median(self.position_attention)

    def kv_read(self, context_per_rank: int) -> float:
        return self.by_length(self.decode_kv, context_per_rank)


def measured_rates(reports: Sequence[BenchReport]) -> Rates:
    """Every kernel and ceiling measurement of the GPU reports, with its efficiency."""
    rates = Rates()
    for rep in reports:
        peak_f, peak_b, src = rep.gpu.bf16_dense_flops, rep.gpu.hbm_bytes_per_s, rep.path.name
        for block in rep.blocks:
            if block.kind == "prose":
                for sentence in _sentences(block.text):
                    if "eiling" not in sentence:
                        continue
                    rates.cards.add(rep.gpu.key)
                    for m in re.finditer(r"((?:\d+\s*/\s*)*\d+)\s*TFLOP/s", sentence):
                        for v in re.split(r"\s*/\s*", m.group(1)):
                            rates.matmul.append(Point(_num(v), _num(v) * 1e12 / peak_f, src))
                    for m in re.finditer(r"((?:\d+\s*[/-]\s*)*\d+)\s*GB/s", sentence):
                        for v in re.split(r"\s*[/-]\s*", m.group(1)):
                            rates.copy.append(Point(_num(v), _num(v) * 1e9 / peak_b, src))
                continue
            if block.table is None:
                continue
            head, rows = block.table.header, block.table.rows
            if head[0] == "tokens" and len(head) > 1 and "tflop/s" in head[1]:
                for row in rows:
                    v = _num(row[1])
                    rates.paged_attention.append(
                        Point(v, v * 1e12 / peak_f, src, int(_num(row[0])))
                    )
            elif any("keys_sorted" in h for h in head):
                col = next(i for i, h in enumerate(head) if "keys_sorted" in h)
                for row in rows:
                    hit = re.search(r"([\d.]+)\s*TFLOP/s", row[col])
                    if hit:
                        v = _num(hit.group(1))
                        rates.position_attention.append(Point(v, v * 1e12 / peak_f, src))
            elif head[0] == "context" and any("read tb/s" in h for h in head):
                col = next(i for i, h in enumerate(head) if "read tb/s" in h)
                for row in rows:
                    v = _num(row[col])
                    rates.decode_kv.append(Point(v, v * 1e12 / peak_b, src, int(_num(row[0]))))
            elif head[:2] == ["kernel", "triton"]:
                for row in rows:
                    name = next((k for k in ELEMENTWISE_KERNELS if row[0].startswith(k)), None)
                    hit = re.search(r"([\d.]+)\s*GB/s", row[1])
                    if name and hit:
                        v = _num(hit.group(1))
                        rates.elementwise.setdefault(name, []).append(
                            Point(v, v * 1e9 / peak_b, src)
                        )
            else:
                continue
            rates.cards.add(rep.gpu.key)
    return rates


# -- measured single-GPU runs -------------------------------------------------------------------

SHAPE_NAMES = (
    (r"7B-Chat-1M|7b-chat-1m", "internlm2_5-7b-chat-1m.json"),
    (r"20B|20b-chat", "internlm2_5-20b-chat.json"),
    (r"1\.8B|1_8b-chat", "internlm2_5-1_8b-chat.json"),
    (r"7B|7b-chat", "internlm2_5-7b-chat.json"),
)
DEFAULT_SHAPE = "internlm2_5-7b-chat.json"


def load_model(path: Path) -> ModelConfig:
    if path.is_dir():
        path = path / "config.json"
    return ModelConfig.from_dict(json.loads(path.read_text()), source=str(path))


@dataclasses.dataclass(frozen=True)
class Shape:
    config: str
    """File name in bench/model_configs/."""
    layers: int


def infer_shape(context: str, previous: Shape | None) -> Shape:
    """The model shape a table measures, from the prose before it: a `model_configs/*.json`
    path or a model name, and `--layers N` / `cut to N layers` / `N layers`; what is not
    named is the previous table's (or the default InternLM2.5-7B-Chat with its own layers)."""
    config = None
    m = re.search(r"model_configs/([\w.-]+\.json)", context)
    if m and (MODEL_CONFIGS / m.group(1)).exists():
        config = m.group(1)
    else:
        config = next((f for pat, f in SHAPE_NAMES if re.search(pat, context)), None)
    m = re.search(r"--layers[ =](\d+)|cut to (\d+) layers|\b(\d+) layers\b", context)
    layers = int(next(g for g in m.groups() if g)) if m else None
    if config is None and layers is None and previous is not None:
        return previous
    if config is None:
        config = previous.config if previous else DEFAULT_SHAPE
    if layers is None:
        layers = load_model(MODEL_CONFIGS / config).num_layers
    return Shape(config, layers)


@dataclasses.dataclass(frozen=True)
class MeasuredRun:
    source: str
    section: str
    gpu: str
    shape: Shape
    kind: str
    """'prefill' (measured: seconds for the prompt) or 'decode' (seconds per token)."""
    tokens: int
    """Prompt length, or the context a decode step attends over."""
    mode: str
    """'CUDA graphs' or 'eager' (decode steps); prefill is the same either way."""
    measured_s: float


def _mode(header: str, context: str) -> str:
    if "graph" in header:
        return "CUDA graphs"
    if "eager" in header:
        return "eager"
    return "CUDA graphs" if "graph" in context.lower() else "eager"


class _Runs:
    """The runs of one report. A table's first value column is always a run of its own; a
    later column (a comparison: 'first run today (eager)') that repeats a figure the report
    already gave for the same shape, length and mode is that earlier run, not a new one."""

    def __init__(self, rep: BenchReport) -> None:
        self.rep = rep
        self.section = ""
        self.seen: set[tuple] = set()
        self.runs: list[MeasuredRun] = []

    def add(
        self, kind: str, tokens: int, mode: str, value: float, shape: Shape, comparison: bool
    ) -> None:
        key = (kind, tokens, shape, mode, round(value, 9))
        if not (comparison and key in self.seen):
            self.seen.add(key)
            self.runs.append(
                MeasuredRun(
                    self.rep.path.name,
                    self.section,
                    self.rep.gpu.key,
                    shape,
                    kind,
                    tokens,
                    mode,
                    value,
                )
            )


PROSE_PREFILL = re.compile(r"((?:\d+\.\d+\s*/\s*)*\d+\.\d+)\s*s at (\d+)K\b")
"""Prefill times quoted in prose after a table: '0.24 / 0.23 s at 8K' (one per column)."""


def _report_runs(rep: BenchReport) -> list[MeasuredRun]:
    out = _Runs(rep)
    shape: Shape | None = None
    modes: list[str] = []
    for block in rep.blocks:
        if block.kind == "heading":
            out.section = block.text
        elif block.kind == "prose" and shape is not None:
            for sentence in _sentences(block.text):
                if "refill" not in sentence:
                    continue
                for m in PROSE_PREFILL.finditer(sentence):
                    values = [_num(v) for v in re.split(r"\s*/\s*", m.group(1))]
                    labels = modes if len(modes) == len(values) else [""] * len(values)
                    for j, (v, mode) in enumerate(zip(values, labels)):
                        out.add("prefill", int(m.group(2)) * 1024, mode, v, shape, j > 0)
        elif block.table is not None:
            head, rows, context = block.table.header, block.table.rows, block.table.context
            if head[0] not in ("workload", "decode at") or any("keys_sorted" in h for h in head):
                continue
            cols = [
                i
                for i, h in enumerate(head)
                if i
                and (h == "time" or re.search(r"graph|eager|\brun\b", h))
                and not re.search(r"against|floor|speed", h)
            ]
            if not cols:
                continue
            shape = infer_shape(context, shape)
            modes = [_mode(head[i], context) for i in cols]
            for row in rows:
                pre = re.match(r"prefill ([\d,]+) tokens", row[0])
                dec = re.match(r"(?:decode at )?([\d,]+) context", row[0])
                for j, (i, mode) in enumerate(zip(cols, modes)):
                    if pre and (t := re.match(r"([\d.]+) s\b", row[i])):
                        tokens, value = int(_num(pre.group(1))), _num(t.group(1))
                        out.add("prefill", tokens, mode, value, shape, j > 0)
                    elif dec and (t := re.match(r"([\d.]+) ms/token", row[i])):
                        tokens, value = int(_num(dec.group(1))), _num(t.group(1)) / 1e3
                        out.add("decode", tokens, mode, value, shape, j > 0)
    return out.runs


def measured_runs(reports: Sequence[BenchReport]) -> list[MeasuredRun]:
    """Every end-to-end prefill and decode measurement in the GPU reports, one per run (a figure
    a later table repeats from an earlier one in the same report counts once)."""
    return [run for rep in reports for run in _report_runs(rep)]


# -- predictions --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PrefillPrediction:
    matmul_s: float
    attention_s: float
    elementwise_s: float
    tp_all_reduce_s: float
    cp_exchange_s: float
    all_reduce_payload: int
    """Bytes of one tp all-reduce (one cp rank's tokens x hidden x el)."""
    all_reduce_sent: float
    """Bytes one GPU sends for it."""
    all_reduces: int
    chunks: int
    fresh_chunk: int
    """Tokens of the prompt's first chunk, the one that runs the ring."""
    ring_step_bytes: int
    """Bytes each rank sends per ring step per layer of a fresh chunk (0 at cp = 1)."""
    ring_step_transfer_s: float
    ring_step_compute_s: float
    whole_ring_step_bytes: int
    """The same for a ring over the whole prompt in one fresh step (cp blocks of L/cp)."""
    whole_ring_step_transfer_s: float
    whole_ring_step_compute_s: float
    query_exchange_bytes: int
    """Bytes one GPU sends per layer for each later chunk (query all-gather + all-to-all)."""
    query_exchange_s: float
    """Their time over all layers and later chunks."""

    @property
    def total_s(self) -> float:
        return (
            self.matmul_s
            + self.attention_s
            + self.elementwise_s
            + self.tp_all_reduce_s
            + self.cp_exchange_s
        )

    @property
    def ring_hidden(self) -> bool:
        return self.ring_step_transfer_s <= self.ring_step_compute_s


@dataclasses.dataclass(frozen=True)
class DecodePrediction:
    weight_bytes: int
    kv_bytes: int
    weights_s: float
    kv_s: float
    comm_bytes: float
    comm_s: float
    collectives: int
    """Collective calls per step (their latency is not in the figure)."""
    token_matmul_s: float
    """One token's matmuls on one rank at the measured matmul rate (every cp rank runs every
    token of a decode step)."""

    @property
    def total_s(self) -> float:
        return self.weights_s + self.kv_s + self.comm_s

    @property
    def weight_bound_batch(self) -> int:
        """The largest decode batch whose matmuls take no longer than reading the weights."""
        return int(self.weights_s // self.token_matmul_s)


@dataclasses.dataclass(frozen=True)
class Target:
    gpu: GPU
    count: int
    link: str = "nvlink"


def predict_prefill(
    model: ModelConfig,
    gpu: GPU,
    rates: Rates,
    *,
    tp: int,
    cp: int,
    tokens: int,
    chunk: int,
    link: str = "nvlink",
    dtype: str = "bfloat16",
) -> PrefillPrediction:
    el, world = DTYPE_BYTES[dtype], tp * cp
    peak, hbm, bw = gpu.bf16_dense_flops, gpu.hbm_bytes_per_s, gpu.link_bytes_per_s(link)
    mm_rate = rates.median(rates.matmul) * peak
    attn_rate = rates.attention(cp, tokens) * peak
    matmul_s = (matmul_flops(model, tokens, 0) / world + 2 * lm_head_params(model) / tp) / mm_rate
    attention_s = attention_flops(model, tokens) / world / attn_rate
    per_token = elementwise_bytes_per_token(model, tp, el)
    local = tokens / cp
    elementwise_s = sum(
        local * model.num_layers * b / (rates.median(rates.elementwise[k]) * hbm)
        for k, b in per_token.items()
    )
    payload = all_reduce_payload(-(-tokens // cp), model, el)
    sent = ring_all_reduce_sent(payload, tp)
    n_all_reduce = 2 * model.num_layers + 1 if tp > 1 else 0
    chunks = -(-tokens // chunk)
    step_bytes, xfer, compute = 0, 0.0, 0.0
    whole_bytes, whole_xfer, whole_compute = 0, 0.0, 0.0
    q_bytes = 0
    q_s = cp_s = 0.0
    if cp > 1:
        first = min(chunk, tokens)
        step_bytes = ring_step_bytes(model, tp, -(-first // cp), el)
        xfer = step_bytes / bw
        compute = attention_flops(model, first) / model.num_layers / world / cp / attn_rate
        ring_s = model.num_layers * (cp - 1) * max(0.0, xfer - compute)
        whole_bytes = ring_step_bytes(model, tp, -(-tokens // cp), el)
        whole_xfer = whole_bytes / bw
        whole_compute = attention_flops(model, tokens) / model.num_layers / world / cp / attn_rate
        q_bytes = query_exchange_bytes(model, tp, cp, chunk, el)
        q_s = model.num_layers * (chunks - 1) * q_bytes / bw
        cp_s = ring_s + q_s
    return PrefillPrediction(
        matmul_s=matmul_s,
        attention_s=attention_s,
        elementwise_s=elementwise_s,
        tp_all_reduce_s=n_all_reduce * sent / bw,
        cp_exchange_s=cp_s,
        all_reduce_payload=payload,
        all_reduce_sent=sent,
        all_reduces=n_all_reduce,
        chunks=chunks,
        fresh_chunk=min(chunk, tokens),
        ring_step_bytes=step_bytes,
        ring_step_transfer_s=xfer,
        ring_step_compute_s=compute,
        whole_ring_step_bytes=whole_bytes,
        whole_ring_step_transfer_s=whole_xfer,
        whole_ring_step_compute_s=whole_compute,
        query_exchange_bytes=q_bytes,
        query_exchange_s=q_s,
    )


def predict_decode(
    model: ModelConfig,
    gpu: GPU,
    rates: Rates,
    *,
    tp: int,
    cp: int,
    context: int,
    link: str = "nvlink",
    dtype: str = "bfloat16",
) -> DecodePrediction:
    el, hbm = DTYPE_BYTES[dtype], gpu.hbm_bytes_per_s
    weights = decode_weight_bytes(model, tp, el)
    kv = decode_kv_bytes(model, tp, cp, context, dtype)
    comm = 0.0
    collectives = 0
    if tp > 1:
        collectives += 2 * model.num_layers + 2  # all-reduces + the logits all-gather
        comm += (2 * model.num_layers + 1) * ring_all_reduce_sent(model.hidden_size * el, tp)
    if cp > 1:
        collectives += model.num_layers
        comm += model.num_layers * decode_merge_bytes(model, tp, cp, el)
    return DecodePrediction(
        weight_bytes=weights,
        kv_bytes=kv,
        weights_s=weights / (rates.median(rates.copy) * hbm),
        kv_s=kv / (rates.kv_read(-(-context // cp)) * hbm),
        comm_bytes=comm,
        comm_s=comm / gpu.link_bytes_per_s(link),
        collectives=collectives,
        token_matmul_s=2
        * matmul_params(model)
        / tp
        / (rates.median(rates.matmul) * gpu.bf16_dense_flops),
    )


# -- validation ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ValidationRow:
    run: MeasuredRun
    predicted_s: float

    @property
    def error(self) -> float:
        return (self.predicted_s - self.run.measured_s) / self.run.measured_s

    @property
    def within_aim(self) -> bool:
        return abs(self.error) <= AIM

    @property
    def flag(self) -> str:
        """Why a row misses the aim ('' when it does not)."""
        if self.within_aim:
            return ""
        if self.run.kind == "decode":
            extra = (self.run.measured_s - self.predicted_s) * 1e3
            if self.run.mode == "eager":
                return (
                    f"eager decode: {extra:+.1f} ms/step of host-side launch cost, which the "
                    "bandwidth model does not count"
                )
            return f"{extra:+.1f} ms/step above the bandwidth floor (host-side step cost)"
        return "prefill outside the aim"


def validation_table(bench_dir: Path = BENCH_DIR) -> tuple[list[ValidationRow], Rates]:
    """Every measured single-GPU run of the stored reports, predicted at its shape and card."""
    reports = read_reports(bench_dir)
    rates = measured_rates(reports)
    rates.check()
    rows = []
    for run in measured_runs(reports):
        base = load_model(MODEL_CONFIGS / run.shape.config)
        model = dataclasses.replace(base, num_layers=run.shape.layers)
        gpu = GPUS[run.gpu]
        if run.kind == "prefill":
            pred = predict_prefill(
                model, gpu, rates, tp=1, cp=1, tokens=run.tokens, chunk=16384
            ).total_s
        else:
            pred = predict_decode(model, gpu, rates, tp=1, cp=1, context=run.tokens).total_s
        rows.append(ValidationRow(run, pred))
    return rows, rates


# -- the CLI ------------------------------------------------------------------------------------


def parse_gpus(text: str) -> Target:
    """'4xA100-80GB' -> Target(A100-80GB, 4)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\S+)\s*", text)
    gpu = lookup(m.group(2)) if m else None
    if m is None or gpu is None or int(m.group(1)) < 1:
        raise argparse.ArgumentTypeError(
            f"--gpus {text!r}: expected COUNTxGPU, e.g. 4xA100-80GB or 8xH100-SXM, with COUNT >= 1 "
            f"and GPU one of: {accepted_names()}"
        )
    return Target(gpu=gpu, count=int(m.group(1)))


def meshes(model: ModelConfig, gpus: int) -> list[tuple[int, int]]:
    """(tp, cp) with tp x cp = gpus and a tp that shards the model, largest tp first."""
    return [(tp, gpus // tp) for tp in range(gpus, 0, -1) if gpus % tp == 0 and valid_tp(model, tp)]


@dataclasses.dataclass
class MeshResult:
    tp: int
    cp: int
    plan: MemoryPlan
    prefill: PrefillPrediction
    decode: DecodePrediction

    @property
    def name(self) -> str:
        return f"tp{self.tp}" + (f"xcp{self.cp}" if self.cp > 1 else "")


def _s(x: float) -> str:
    return f"{x:,.1f}" if x >= 10 else f"{x:.2f}" if x >= 0.1 else f"{x:.3f}"


def _ms(x: float) -> str:
    return f"{x * 1e3:.2f}"


def _gb(x: float) -> str:
    return f"{x / 1e9:,.2f} GB" if x >= 1e8 else f"{x / 1e6:,.2f} MB"


def _pct(x: float) -> str:
    return f"{x:.1%}"


def rates_lines(rates: Rates, gpu: GPU) -> list[str]:
    cards = ", ".join(sorted(rates.cards))
    peaks = "; ".join(
        f"{k}: {GPUS[k].bf16_dense_flops / 1e12:g} TFLOP/s bf16 dense, "
        f"{GPUS[k].hbm_bytes_per_s / 1e9:g} GB/s HBM"
        for k in sorted(rates.cards)
    )
    tf, hb = gpu.bf16_dense_flops / 1e12, gpu.hbm_bytes_per_s / 1e9

    def span(points: Sequence[Point]) -> str:
        lo, hi = min(p.value for p in points), max(p.value for p in points)
        return f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"

    pa, pk = rates.paged_attention, rates.decode_kv
    lines = [
        f"Rates measured on {cards} (docs/benchmarks/), scaled to {gpu.key} by efficiency: "
        f"achieved / the measured card's datasheet peak ({peaks}), times {gpu.key}'s peak "
        f"({tf:g} TFLOP/s, {hb:g} GB/s):",
        f"- matmul: bf16 8192^3 ceilings {span(rates.matmul)} TFLOP/s ({len(rates.matmul)} "
        f"runs), median {_pct(rates.median(rates.matmul))} of peak -> "
        f"{rates.median(rates.matmul) * tf:.0f} TFLOP/s",
        f"- attention at cp=1: paged prefill kernel {span(pa)} TFLOP/s at "
        f"{min(p.at for p in pa):,}-{max(p.at for p in pa):,} tokens, "
        f"{_pct(min(p.efficiency for p in pa))}-{_pct(max(p.efficiency for p in pa))} of peak "
        f"(by length, clamped past the longest) -> {min(p.efficiency for p in pa) * tf:.0f}-"
        f"{max(p.efficiency for p in pa) * tf:.0f} TFLOP/s",
        f"- attention at cp>1: position kernel, sorted keys, {span(rates.position_attention)} "
        f"TFLOP/s, median {_pct(rates.median(rates.position_attention))} -> "
        f"{rates.median(rates.position_attention) * tf:.0f} TFLOP/s",
        "- elementwise: "
        + ", ".join(f"{k} {_pct(rates.median(rates.elementwise[k]))}" for k in ELEMENTWISE_KERNELS)
        + f" of HBM peak -> x {hb:g} GB/s",
        f"- decode KV reads: split-KV kernel {span(pk)} TB/s at {min(p.at for p in pk):,}-"
        f"{max(p.at for p in pk):,} context, {_pct(min(p.efficiency for p in pk))}-"
        f"{_pct(max(p.efficiency for p in pk))} of HBM peak (by context per rank, clamped)",
        f"- decode weight reads: device copy {span(rates.copy)} GB/s (read + written), median "
        f"{_pct(rates.median(rates.copy))} of HBM peak -> "
        f"{rates.median(rates.copy) * hb:.0f} GB/s",
        "- links: datasheet peak, one direction (no multi-GPU run exists to measure them)",
    ]
    return lines


def mesh_table(results: Sequence[MeshResult]) -> list[str]:
    lines = [
        "| mesh | memory/worker | fits | prefill s | matmul | attention | elementwise "
        "| tp all-reduce | cp exchange | decode ms/token | weights | KV | comm |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        mem = f"{r.plan.total / GiB:.2f} / {r.plan.device_bytes / GiB:.2f} GiB"
        if not r.plan.fits:
            lines.append(f"| {r.name} | {mem} | **no** | - | - | - | - | - | - | - | - | - | - |")
            continue
        p, d = r.prefill, r.decode
        ar = _s(p.tp_all_reduce_s) if r.tp > 1 else "-"
        cpx = _s(p.cp_exchange_s) if r.cp > 1 else "-"
        comm = _ms(d.comm_s) if r.tp * r.cp > 1 else "-"
        lines.append(
            f"| {r.name} | {mem} | yes | **{_s(p.total_s)}** | {_s(p.matmul_s)} | "
            f"{_s(p.attention_s)} | {_s(p.elementwise_s)} | {ar} | {cpx} | "
            f"**{_ms(d.total_s)}** | {_ms(d.weights_s)} | {_ms(d.kv_s)} | {comm} |"
        )
    return lines


def _hidden(transfer_s: float, compute_s: float) -> str:
    if transfer_s <= compute_s:
        return f"hidden (compute {compute_s / transfer_s:,.1f}x the transfer)"
    return f"NOT hidden (transfer {transfer_s / compute_s:.1f}x the compute; the excess is added)"


def term_lines(
    r: MeshResult,
    model: ModelConfig,
    target: Target,
    tokens: int,
    dtype: str,
    residual_ms: tuple[float, float] | None,
    residual_cards: str = "",
) -> list[str]:
    """The terms behind one mesh's row; residual_ms: the measured CUDA-graph decode steps'
    excess over their floor (min, max), if any, on `residual_cards`."""
    p, d = r.prefill, r.decode
    bw = target.gpu.link_bytes_per_s(target.link)
    link = f"{target.link} {bw / 1e9:g} GB/s per direction"
    per_rank, el = -(-tokens // r.cp), DTYPE_BYTES[dtype]
    lines = [f"{r.name}:"]
    if not r.plan.fits:
        lines.append(f"- memory planner: {r.plan.suggestion()}")
        return lines
    lines.append(
        f"- memory per worker (memory planner): weights {r.plan.weights / GiB:.2f} + KV "
        f"{r.plan.kv_cache / GiB:.2f} + activations {r.plan.activations / GiB:.2f} + overhead "
        f"{r.plan.overhead / GiB:.2f} = {r.plan.total / GiB:.2f} GiB of "
        f"{r.plan.device_bytes / GiB:.2f}: fits"
    )
    if r.tp > 1:
        lines.append(
            f"- tp all-reduce: {p.all_reduces} per prefill (2 per layer, after the o-proj and "
            f"the down-proj, + 1 after the embedding), each {per_rank:,} tokens x "
            f"{model.hidden_size} x {el} B = {_gb(p.all_reduce_payload)}; a ring sends "
            f"2(tp-1)/tp = {2 * (r.tp - 1) / r.tp:.2f}x that per GPU = "
            f"{_gb(p.all_reduce_sent)} over {link} = {p.all_reduce_sent / bw * 1e3:.1f} ms "
            f"each, {_s(p.tp_all_reduce_s)} s in all"
        )
    if r.cp > 1:
        kv_local = kv_heads_per_rank(model, r.tp)
        lines.append(
            f"- ring exchange, pass-KV over the prompt's fresh first chunk ({p.fresh_chunk:,} "
            f"tokens): {r.cp - 1} step{'s' if r.cp > 2 else ''} per layer, in each every rank "
            f"sends its K and V block, {-(-p.fresh_chunk // r.cp):,} tokens x {kv_local} KV heads "
            f"x {model.head_dim} x 2 x {el} B = {_gb(p.ring_step_bytes)}: "
            f"{p.ring_step_transfer_s * 1e3:.3f} ms on the wire against "
            f"{p.ring_step_compute_s * 1e3:.3f} ms of attention per step: "
            + _hidden(p.ring_step_transfer_s, p.ring_step_compute_s)
        )
        lines.append(
            f"- a ring over the whole prompt in one step (cp blocks of {per_rank:,} tokens; the "
            f"runtime chunks instead): {_gb(p.whole_ring_step_bytes)} per step, "
            f"{p.whole_ring_step_transfer_s * 1e3:,.1f} ms against "
            f"{p.whole_ring_step_compute_s * 1e3:,.0f} ms of attention: "
            + _hidden(p.whole_ring_step_transfer_s, p.whole_ring_step_compute_s)
        )
        lines.append(
            f"- the other {p.chunks - 1:,} chunks follow a cached prefix, where queries move "
            f"instead of KV: {_gb(p.query_exchange_bytes)} sent per GPU per layer (query "
            f"all-gather + partial-output all-to-all), not overlapped: "
            f"{_s(p.query_exchange_s)} s"
        )
    kv_token = kv_bytes_per_token(model, r.tp, dtype)
    line = (
        f"- decode: weights {_gb(d.weight_bytes)} (every rank computes the new token) + KV "
        f"{_gb(d.kv_bytes)} ({kv_token:,} B/token x {per_rank:,} tokens per rank) -> "
        f"{_ms(d.weights_s)} + {_ms(d.kv_s)} ms"
    )
    if d.collectives:
        line += (
            f"; collectives {_gb(d.comm_bytes)} -> {_ms(d.comm_s)} ms, {d.collectives} calls per "
            "step whose latency is not modelled"
        )
    mm_rate = 2 * matmul_params(model) / r.tp / d.token_matmul_s
    line += (
        f"; a batch's matmuls ({d.token_matmul_s * 1e3:.3f} ms a token at "
        f"{mm_rate / 1e12:.0f} TFLOP/s"
        + (", on every cp rank: decode runs replicated" if r.cp > 1 else "")
        + f") stay under the weight reads up to batch {d.weight_bound_batch:,}, and each "
        f"sequence's KV read is {d.kv_s / d.token_matmul_s:,.0f}x its matmuls"
        + (", so splitting a batch over the cp ranks would not pay" if r.cp > 1 else "")
    )
    if residual_ms:
        line += (
            f"; the measured {residual_cards} decode steps (CUDA graphs) ran {residual_ms[0]:.1f}-"
            f"{residual_ms[1]:.1f} ms above their floor: if that carries over, "
            f"{d.total_s * 1e3 + residual_ms[0]:.1f}-{d.total_s * 1e3 + residual_ms[1]:.1f} ms"
        )
    lines.append(line)
    return lines


def validation_lines(rows: Sequence[ValidationRow]) -> list[str]:
    lines = [
        "| report | card | shape | run | mode | measured | predicted | error | |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        run = row.run
        shape = f"{run.shape.config.removesuffix('.json')} x{run.shape.layers} layers"
        if run.kind == "prefill":
            what = f"prefill {run.tokens:,}"
            meas = f"{run.measured_s:.2f} s ({run.tokens / run.measured_s:,.0f} tok/s)"
            pred = f"{row.predicted_s:.2f} s ({run.tokens / row.predicted_s:,.0f} tok/s)"
        else:
            what = f"decode at {run.tokens:,}"
            meas = f"{run.measured_s * 1e3:.2f} ms/token"
            pred = f"{row.predicted_s * 1e3:.2f} ms/token"
        status = "within 15%" if row.within_aim else row.flag
        lines.append(
            f"| {run.source} | {run.gpu} | {shape} | {what} | {run.mode or '-'} | {meas} | "
            f"{pred} | {row.error:+.1%} | {status} |"
        )
    return lines


def validation_summary(rows: Sequence[ValidationRow]) -> tuple[str, str]:
    pre = [r for r in rows if r.run.kind == "prefill"]
    dec = [r for r in rows if r.run.kind == "decode"]
    graphs = [r for r in dec if r.run.mode == "CUDA graphs"]

    def count(rs: Sequence[ValidationRow]) -> str:
        return f"{sum(r.within_aim for r in rs)}/{len(rs)}"

    def spread(rs: Sequence[ValidationRow]) -> str:
        if not rs:
            return "none"
        return f"{min(r.error for r in rs):+.0%} to {max(r.error for r in rs):+.0%}"

    short = f"prefill {count(pre)} within 15%, decode {count(dec)}"
    long = (
        f"prefill: {count(pre)} runs within 15% (errors {spread(pre)}); decode: {count(dec)} "
        f"(errors {spread(dec)}; CUDA-graph runs {spread(graphs)}, measured "
        + (
            f"{min(r.run.measured_s - r.predicted_s for r in graphs) * 1e3:.1f}-"
            f"{max(r.run.measured_s - r.predicted_s for r in graphs) * 1e3:.1f} ms/step above "
            "the floor"
            if graphs
            else "n/a"
        )
        + "). The decode figure is a bandwidth floor: every measured decode step is slower "
        "than predicted, by the host-side step cost the model leaves out."
    )
    return short, long


LMDEPLOY_SHAPE = "internlm2_5-7b-chat-1m.json"


def same_shape(a: ModelConfig, b: ModelConfig) -> bool:
    """Whether two configs do the same work per token (RoPE settings aside)."""
    fields = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
    )
    return all(getattr(a, f) == getattr(b, f) for f in fields)


def comparison_lines(
    model: ModelConfig,
    target: Target,
    results: Sequence[MeshResult],
    rates: Rates,
    *,
    session_len: int,
    chunk: int,
    dtype: str,
) -> tuple[list[str], dict[str, float], bool]:
    """The compute floor at session_len tokens; where the model and target are LMDeploy's
    (InternLM2.5-7B-Chat-1M on 4 x A100-80GB), also at its 10^6 tokens, with its round and this
    runtime's prediction at that length. Returns (lines, figures, comparable)."""
    gpu, n = target.gpu, target.count
    peak = n * gpu.bf16_dense_flops
    comparable = (
        gpu.key == "A100-80GB"
        and n == 4
        and same_shape(model, load_model(MODEL_CONFIGS / LMDEPLOY_SHAPE))
    )
    lines = []
    numbers: dict[str, float] = {}
    for tokens in sorted({LMDEPLOY_TOKENS, session_len} if comparable else {session_len}):
        mm = 2 * matmul_params(model) * tokens
        at = attention_flops(model, tokens)
        numbers[f"floor_{tokens}"] = floor_flops(model, tokens) / peak
        lines.append(
            f"- compute floor at {tokens:,} tokens: matmul 2 x {matmul_params(model):,} params "
            f"(non-embedding linears, LM head included) x {tokens:,} = {mm:.3e} FLOP + causal "
            f"attention 2 x 2 x L^2/2 x {model.num_heads} heads x {model.head_dim} x "
            f"{model.num_layers} layers = {at:.3e} FLOP ({at / (mm + at):.0%} of the total) = "
            f"{mm + at:.3e} FLOP over {n} x {gpu.bf16_dense_flops / 1e12:g} TFLOP/s = "
            f"**{numbers[f'floor_{tokens}']:.1f} s**"
        )
    if not comparable:
        lines.append(
            f"- LMDeploy's published round (~{LMDEPLOY_ROUND_S:.0f} s) is for "
            "InternLM2.5-7B-Chat-1M on 4 x A100-80G: not this model and target"
        )
        return lines, numbers, comparable
    f_lm, f_sess = numbers[f"floor_{LMDEPLOY_TOKENS}"], numbers[f"floor_{session_len}"]
    ratio = session_len / LMDEPLOY_TOKENS
    non_causal = (
        floor_flops(model, LMDEPLOY_TOKENS) + attention_flops(model, LMDEPLOY_TOKENS)
    ) / peak
    lines.append(
        f"- the quoted {QUOTED_FLOOR_S:.0f} s floor is this count at {LMDEPLOY_TOKENS:,} tokens "
        f"({f_lm:.1f} s); at {session_len:,} tokens it is {f_sess:.1f} s, because the attention "
        f"term grows with L^2 ({ratio:.4f}^2 = {ratio**2:.3f}x). Without the causal halving the "
        f"attention term doubles: {non_causal:.0f} s at {LMDEPLOY_TOKENS:,}. The runtime runs the "
        "LM head on the last prompt token only, which takes "
        f"{2 * lm_head_params(model) * LMDEPLOY_TOKENS / peak:.1f} s off the floor's count."
    )
    lines.append(
        f"- LMDeploy: ~{LMDEPLOY_ROUND_S:.0f} s per passkey round, session_len "
        f"{LMDEPLOY_TOKENS:,}, tp 4 on A100-80G: a ~{LMDEPLOY_TOKENS:,}-token prefill plus "
        f"tokenizing the prompt and a short answer, i.e. {f_lm / LMDEPLOY_ROUND_S:.0%} of the "
        f"4-GPU peak if it were all prefill. Source: {LMDEPLOY_SOURCE}"
    )
    for r in results:
        if not r.plan.fits:
            continue
        pre = predict_prefill(
            model,
            gpu,
            rates,
            tp=r.tp,
            cp=r.cp,
            tokens=LMDEPLOY_TOKENS,
            chunk=chunk,
            link=target.link,
            dtype=dtype,
        )
        numbers[f"lmdeploy_{r.name}"] = pre.total_s
        lines.append(
            f"- this runtime at {LMDEPLOY_TOKENS:,} tokens, {r.name}: prefill "
            f"**{pre.total_s:.0f} s** predicted = {pre.total_s / LMDEPLOY_ROUND_S:.2f}x "
            f"LMDeploy's round, {pre.total_s / f_lm:.2f}x the floor; its attention alone is "
            f"{pre.attention_s:.0f} s, at {rates.attention(r.cp, LMDEPLOY_TOKENS):.1%} of peak"
        )
    return lines, numbers, comparable


def reading_lines(
    results: Sequence[MeshResult], rates: Rates, numbers: dict[str, float], comparable: bool
) -> list[str]:
    """What the numbers say, in figures computed above."""
    fits = [r for r in results if r.plan.fits]
    if not fits:
        return []
    best = min(fits, key=lambda r: r.prefill.total_s)
    p = best.prefill
    comm = p.tp_all_reduce_s + p.cp_exchange_s
    bound = "attention" if p.attention_s > p.matmul_s else "matmul"
    line = (
        f"- Prefill is {bound}-bound: on {best.name}, the fastest mesh, attention is "
        f"{p.attention_s / p.total_s:.0%} of the predicted time, matmuls "
        f"{p.matmul_s / p.total_s:.0%}, elementwise kernels {p.elementwise_s / p.total_s:.1%}, "
        f"collectives {comm / p.total_s:.1%}."
    )
    if best.cp > 1 and any(r.cp == 1 for r in fits):
        line += (
            f" Meshes with cp > 1 come out ahead because a cp rank's attention runs the position "
            f"kernel ({rates.attention(2, 1):.0%} of peak measured) where cp = 1 runs the paged "
            f"kernel ({max(pt.efficiency for pt in rates.paged_attention):.0%} at best); the "
            "links are not what separates them."
        )
    lines = [line]
    if comparable:
        ours = min(numbers[f"lmdeploy_{r.name}"] for r in fits)
        floor = numbers[f"floor_{LMDEPLOY_TOKENS}"]
        lines.append(
            f"- Against LMDeploy: its ~{LMDEPLOY_ROUND_S:.0f} s round means at least "
            f"{floor / LMDEPLOY_ROUND_S:.0%} of the 4 x A100 peak over the whole prefill; this "
            f"runtime's best predicted {ours:.0f} s is {floor / ours:.0%}. Nearly all of the "
            "gap is the attention kernels' efficiency; closing it needs a faster attention "
            "kernel on A100 (or its measured rate, which may differ from the H100 fraction used "
            "here), not less communication."
        )
    lowest = min(fits, key=lambda r: r.decode.total_s)
    d = lowest.decode
    what = "KV" if d.kv_s > d.weights_s else "weight"
    lines.append(
        f"- Decode is {what}-read bound at this length: on {lowest.name}, the lowest decode "
        f"floor, KV reads are {d.kv_s / d.total_s:.0%} of it and weight reads "
        f"{d.weights_s / d.total_s:.0%}. cp splits the KV but not the weights (each cp rank "
        "holds its whole tp shard), so trading tp for cp costs decode weight reads; tp splits "
        "both."
    )
    return lines


UNMEASURED = [
    "Collectives: no multi-GPU run exists. The tp all-reduce, the cp ring and the query "
    "exchange are datasheet link bandwidth with no measured efficiency, no latency and no "
    "overlap beyond the ring's; the CPU gloo measurements are a separate issue item.",
    "The A100 itself: every rate was measured on H100 and moved to A100 by the fraction of peak "
    "it reached. The Triton attention kernel's tiles (256x64, 16 warps, 3 stages) were tuned on "
    "H100's 228 KB of shared memory per SM; A100 has 164 KB, so its config and efficiency there "
    "are untested.",
    "cp > 1 prefill: the position kernel's sorted-key rate was measured on a cp rank's workload "
    "on one GPU; the ring and query-exchange paths have run only on CPU.",
    "Decode: the model is a bandwidth floor. Host-side step cost (scheduling, block tables, "
    "launches) is not modelled; on the measured H100 and H200 runs it added milliseconds per "
    "step (see the validation; docs/benchmarks/gpu_h200_2026-12-04.md splits it: about 1 ms of "
    "host work per step at batch 1 while the device waits). Collective latency per decode step "
    "(tp and cp) is not modelled either.",
    "Prefill step overhead: nothing per chunk beyond the terms above; at 16,384-token chunks "
    "on H100 the prefill validation says that is within the aim; smaller chunks (the default "
    "8,192) double the number of steps.",
]


def build(args: argparse.Namespace) -> tuple[list[str], list[str], str]:
    """(stdout lines, report lines, summary line)."""
    model = load_model(Path(args.model))
    target: Target = args.gpus
    target = Target(gpu=target.gpu, count=target.count, link=args.link)
    gpu, n, tokens = target.gpu, target.count, args.session_len
    rows, rates = validation_table(Path(args.benchmarks))
    results = []
    for tp, cp in meshes(model, n):
        plan = plan_memory(
            model,
            tp=tp,
            cp=cp,
            session_len=tokens,
            dtype=args.dtype,
            device_bytes=gpu.memory_bytes,
            block_size=args.block_size,
            max_num_batched_tokens=args.chunk,
        )
        pre = predict_prefill(
            model,
            gpu,
            rates,
            tp=tp,
            cp=cp,
            tokens=tokens,
            chunk=args.chunk,
            link=args.link,
            dtype=args.dtype,
        )
        dec = predict_decode(
            model, gpu, rates, tp=tp, cp=cp, context=tokens, link=args.link, dtype=args.dtype
        )
        results.append(MeshResult(tp, cp, plan, pre, dec))
    head = [
        f"Model {args.model}: {model.architecture}, {model.num_layers} layers, hidden "
        f"{model.hidden_size}, {model.num_heads} / {model.num_kv_heads} heads x "
        f"{model.head_dim}, intermediate {model.intermediate_size}, vocab {model.vocab_size}; "
        f"{args.dtype}.",
        f"Target: {n} x {gpu.name} ({gpu.bf16_dense_flops / 1e12:g} TFLOP/s bf16 dense, "
        f"{gpu.hbm_bytes_per_s / 1e9:g} GB/s HBM, {gpu.memory_bytes / GiB:.2f} GiB; NVLink "
        f"{gpu.nvlink_bidir_bytes_per_s / 1e9:g} GB/s bidirectional = "
        f"{gpu.nvlink_bytes_per_s_per_direction / 1e9:g} GB/s per direction, PCIe "
        f"{gpu.pcie_bidir_bytes_per_s / 1e9:g} GB/s bidirectional); collectives over "
        f"{target.link} at {gpu.link_bytes_per_s(target.link) / 1e9:g} GB/s per direction.",
        f"Prompt {tokens:,} tokens in chunks of {args.chunk:,} (max_num_batched_tokens), then "
        f"decode at {tokens:,} context, batch 1; block size {args.block_size}.",
    ]
    fits = [r for r in results if r.plan.fits]
    short, long = validation_summary(rows)
    cmp_lines, numbers, comparable = comparison_lines(
        model,
        target,
        results,
        rates,
        session_len=tokens,
        chunk=args.chunk,
        dtype=args.dtype,
    )
    hw = [
        "| GPU | bf16 dense TFLOP/s | HBM GB/s | memory | NVLink GB/s (bidirectional / per "
        "direction) | PCIe GB/s (bidirectional / per direction) | source |",
        "|---|---|---|---|---|---|---|",
    ] + [
        f"| {g.name} | {g.bf16_dense_flops / 1e12:g} | {g.hbm_bytes_per_s / 1e9:g} | "
        f"{g.memory_bytes / GiB:.2f} GiB | {g.nvlink_bidir_bytes_per_s / 1e9:g} / "
        f"{g.nvlink_bytes_per_s_per_direction / 1e9:g} | {g.pcie_bidir_bytes_per_s / 1e9:g} / "
        f"{g.pcie_bytes_per_s_per_direction / 1e9:g} | {' '.join(g.sources)} |"
        for g in GPUS.values()
    ]
    graph_rows = [r for r in rows if r.run.kind == "decode" and r.run.mode == "CUDA graphs"]
    excess = [(r.run.measured_s - r.predicted_s) * 1e3 for r in graph_rows]
    residual = (min(excess), max(excess)) if excess else None
    cards = " and ".join(sorted({r.run.gpu.split("-")[0] for r in graph_rows}))
    terms: list[str] = []
    for r in results:
        terms += term_lines(r, model, target, tokens, args.dtype, residual, cards)
    reading = reading_lines(results, rates, numbers, comparable)
    out = (
        head
        + [""]
        + rates_lines(rates, gpu)
        + ["", "Meshes (times in s for prefill, ms for decode):", ""]
        + mesh_table(results)
        + [""]
        + terms
        + ["", "Against LMDeploy and the compute floor:"]
        + cmp_lines
        + ([""] + reading if reading else [])
        + ["", f"Validation against every single-GPU run in {_shown(args.benchmarks)}:", ""]
        + validation_lines(rows)
        + ["", long, "", "Not measured, so not validated:"]
        + [f"- {u}" for u in UNMEASURED]
    )
    fastest = ""
    if fits:
        best = min(fits, key=lambda r: r.prefill.total_s)
        close = [
            r.name
            for r in fits
            if r is not best and r.prefill.total_s <= 1.02 * best.prefill.total_s
        ]
        fastest = f"; fastest prefill {best.name}" + (
            f" ({', '.join(close)} within 2%)" if close else ""
        )
        fastest += f", lowest decode floor {min(fits, key=lambda r: r.decode.total_s).name}"
    mesh_part = ", ".join(
        f"{r.name} {_s(r.prefill.total_s)} s / {r.decode.total_s * 1e3:.1f} ms"
        if r.plan.fits
        else f"{r.name} does not fit"
        for r in results
    )
    summary = (
        f"predict: {n}x{gpu.key}, {tokens:,}-token prompt: {mesh_part} (prefill / decode floor)"
        + (fastest or "; no mesh fits")
        + (
            f"; LMDeploy ~{LMDEPLOY_ROUND_S:.0f} s and floor "
            f"{numbers[f'floor_{LMDEPLOY_TOKENS}']:.0f} s at {LMDEPLOY_TOKENS:,} tokens, this "
            f"runtime's best mesh {_s(min(numbers[f'lmdeploy_{r.name}'] for r in fits))} s"
            if comparable and fits
            else ""
        )
        + f"; FLOP floor {_s(numbers[f'floor_{tokens}'])} s at {tokens:,}"
        + f"; validation: {short}"
    )
    report = [
        f"# {PREDICTION_TITLE} {tokens:,}-token prompt on {n} x {gpu.name}, "
        f"{datetime.date.today()}",
        "",
        "**These are predictions of `bench/predict.py`, not measurements.** Command:",
        "",
        "```",
        "python bench/predict.py " + " ".join(args.argv),
        "```",
        "",
        "The model, term by term, is in the docstring of `bench/predict.py`; every rate below "
        "comes from the stored GPU reports in `docs/benchmarks/` and every peak from "
        "`bench/hardware.py`.",
        "",
        "## Inputs",
        "",
    ]
    report += (
        [f"- {h}" for h in head]
        + ["", "Hardware (`bench/hardware.py`, datasheet peaks):", ""]
        + hw
        + [""]
    )
    report += rates_lines(rates, gpu)
    report += ["", "## Meshes", "", "Times: prefill in s, decode in ms per token.", ""]
    report += mesh_table(results)
    for line in terms:
        report += [line] if line.startswith("- ") else ["", f"### {line.rstrip(':')}", ""]
    report += ["", "## Against LMDeploy and the compute floor", ""] + cmp_lines
    if reading:
        report += ["", "## Reading", ""] + reading
    report += [
        "",
        "## Validation against the measured single-GPU runs",
        "",
        f"Parsed from the GPU reports in `{_shown(args.benchmarks)}/` by `bench/predict.py` (one "
        "row per measured run: a comparison column that repeats a figure the same report gave "
        "earlier is that earlier run), each predicted at its shape and card with tp = cp = 1. "
        f"Aim: within {AIM:.0%}. *mode* is how that run's decode steps ran (CUDA graphs or "
        "eager); prefill is the same either way.",
        "",
    ]
    report += validation_lines(rows) + ["", long]
    report += ["", "## Not measured, so not validated", ""] + [f"- {u}" for u in UNMEASURED]
    report += ["", "Summary line:", "", "```", summary, "```", ""]
    return out, report, summary


def _shown(path: str) -> str:
    """`path` relative to the repository when it lies inside it."""
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--gpus",
        required=True,
        type=parse_gpus,
        help=f"COUNTxGPU, e.g. 4xA100-80GB; GPU: {', '.join(GPUS)} (or an alias)",
    )
    p.add_argument("--model", required=True, help="config.json (or its folder)")
    p.add_argument("--session-len", type=int, required=True, help="prompt length in tokens")
    p.add_argument(
        "--chunk",
        type=int,
        default=SchedulerConfig.max_num_batched_tokens,
        help="prefill chunk, the runtime's max_num_batched_tokens (default %(default)s)",
    )
    p.add_argument("--link", choices=("nvlink", "pcie"), default="nvlink")
    p.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--benchmarks", default=str(BENCH_DIR), help="folder of the GPU reports")
    p.add_argument("--report", help="write a markdown report here")
    return p


def main(argv: Sequence[str] | None = None, print_fn: Callable[[str], None] = print) -> int:
    parser = make_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    for name in ("session_len", "chunk", "block_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    model_path = Path(args.model)
    if not model_path.exists():
        parser.error(f"--model {args.model}: no such file")
    try:
        load_model(model_path)
    except (ConfigError, ValueError, KeyError) as e:
        parser.error(f"--model {args.model}: {e}")
    try:
        out, report, summary = build(args)
    except ValueError as e:
        parser.error(f"--benchmarks {args.benchmarks}: {e}")
    for line in out:
        print_fn(line)
    if args.report:
        Path(args.report).write_text("\n".join(report))
        print_fn(f"report: {args.report}")
    print_fn(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
