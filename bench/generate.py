"""CPU generate benchmark: our runtime vs Hugging Face transformers `generate()`.

Both systems load the SAME random-weight Llama checkpoint (written once into `--workdir`), run
the same token-id prompts with greedy decoding in fp32, in one process, with the same
`torch.set_num_threads`. Every measurement is preceded by a warm-up run of the same shape, and
the two systems alternate within each repeat so that drift in the machine hits both alike.

On a shared machine other processes only ever add time, so each metric takes the least
disturbed of `--repeats` runs (the minimum); the report also gives the median and how much CPU
other processes used during the run.

* TTFT: wall time of one `generate` call with max_new_tokens=1 (prompt in, first token out:
  input preparation, the prefill forward, LM head, sampling, output packaging).
* prefill tokens/s = batch * prompt_len / TTFT.
* decode tokens/s = batch * (new_tokens - 1) / decode time. In a run with `new_tokens` new
  tokens, t_i is the wall-clock time at which the i-th new token's logits became available: for
  our runtime when `executor.execute` returns the step (one step per token: the whole batch is
  prefilled in one step, then decodes in lock step), for HF when generate calls a no-op logits
  processor (once per new token). Decode step i takes d_i = t_{i+1} - t_i; this includes all
  per-step overhead (scheduling, input building, sampling) and none of the prefill. The decode
  time is sum_i min_over_repeats(d_i): the per-step lower envelope, which stays close to the
  undisturbed time even when every repeat was hit by some interference. The report also gives
  the best and the median whole run (t_last - t_first), and the cross-check
  batch * (new_tokens - 1) / (best total run time - best TTFT).

Both systems generate exactly `new_tokens` tokens: ours with `ignore_eos=True`, HF with the
generation config's eos_token_id removed (HF's `min_new_tokens` would instead mask EOS out of
the logits and so change the greedy tokens). The batch-8 prompts all have the same length, so
HF needs no padding and the greedy tokens should match ours row for row; at batch 1 they must
match (the run exits non-zero otherwise). HF uses its default `sdpa` attention and
`DynamicCache` (`--hf-attn eager` to change it).

Run from the repository root (no installation needed):

    python bench/generate.py               # full run, writes docs/benchmarks/generate_cpu_<date>.md
    python bench/generate.py --quick       # small smoke run
    python bench/generate.py --tp 2        # also our runtime with tp=2 over Ray (1 thread/worker)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList  # noqa: E402

from bench.machine import code_version, cpu_counters, cpu_model  # noqa: E402
from dist_runtime import Runtime, SamplingParams, SchedulerConfig  # noqa: E402
from dist_runtime.config import (  # noqa: E402
    CPU_ATTENTION_ENV,
    CPU_DECODE_ENV,
    CPU_ELEMENTWISE_ENV,
    CPU_GEMM_ENV,
)
from dist_runtime.formats.demo_model import demo_model_path  # noqa: E402
from dist_runtime.formats.random_checkpoint import write_random_checkpoint  # noqa: E402

CONFIG_FILE = "config.json"
HF_NAME = "HF transformers"


@dataclasses.dataclass(frozen=True)
class ModelShape:
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1536
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 4

    demo: bool = False
    """The demo model (SmolLM2-135M-Instruct, real weights) instead of a random checkpoint."""
    architecture: str = "llama"
    """The random checkpoint's (`write_random_checkpoint`): llama, gemma3 (Gemma 3's layers:
    head and output norms, GELU, every second layer windowed on its own RoPE base; the window
    is max_position_embeddings, 4096, so these prompts stay within it), or gemma2 (Gemma 2's:
    output norms, GELU, attention scores and logits soft-capped)."""

    def describe(self, seed: int, num_params: int) -> str:
        if self.demo:
            return (
                "SmolLM2-135M-Instruct (the demo model, converted from its Q4_1 GGUF, run in "
                f"fp32), {self.num_layers} layers, hidden {self.hidden_size}, "
                f"{self.num_heads} heads / {self.num_kv_heads} KV heads, vocab {self.vocab_size}, "
                f"tied LM head: **{num_params / 1e6:.1f} M parameters**."
            )
        kind = {"llama": "Llama", "gemma2": "Gemma 2", "gemma3": "Gemma 3"}[self.architecture]
        return (
            f"Random-weight {kind} (`write_random_checkpoint`, seed {seed}), fp32: "
            f"vocab {self.vocab_size}, hidden {self.hidden_size}, intermediate "
            f"{self.intermediate_size}, {self.num_layers} layers, {self.num_heads} heads / "
            f"{self.num_kv_heads} KV heads (head_dim {self.hidden_size // self.num_heads}), "
            f"untied LM head: **{num_params / 1e6:.1f} M parameters**."
        )

    def folder_name(self, seed: int) -> str:
        return (
            f"{self.architecture}-v{self.vocab_size}-h{self.hidden_size}-i{self.intermediate_size}"
            f"-l{self.num_layers}-a{self.num_heads}-kv{self.num_kv_heads}-s{seed}"
        )


@dataclasses.dataclass(frozen=True)
class Workload:
    prompt_len: int
    new_tokens: int
    batch_sizes: tuple[int, ...]
    repeats: int
    threads: int
    seed: int


@dataclasses.dataclass
class Timing:
    """The repeats of one (system, batch) cell: wall times in seconds, and the greedy tokens."""

    ttft: list[float]
    steps: list[list[float]]
    """Per decode run, the duration of each decode step."""
    total: list[float]
    tokens: list[list[int]]

    @property
    def ttft_s(self) -> float:
        return min(self.ttft)

    @property
    def decode_s(self) -> float:
        """The per-step lower envelope: sum over steps of the fastest repeat of that step."""
        return sum(min(step) for step in zip(*self.steps))

    def prefill_tps(self, batch: int, prompt_len: int) -> float:
        return batch * prompt_len / self.ttft_s

    def decode_tps(self, batch: int, new_tokens: int, stat: Callable | None = None) -> float:
        """From the envelope, or from stat (min, median) over whole decode runs."""
        seconds = self.decode_s if stat is None else stat([sum(s) for s in self.steps])
        return batch * (new_tokens - 1) / seconds

    def decode_tps_subtracted(self, batch: int, new_tokens: int) -> float | None:
        """Cross-check; None when noise made the best total run shorter than the best TTFT."""
        window = min(self.total) - self.ttft_s
        return batch * (new_tokens - 1) / window if window > 0 else None


# -- the two systems ------------------------------------------------------------------------


class OursRunner:
    """Our runtime; records the time each executor step returns."""

    def __init__(
        self,
        folder: Path,
        tp: int,
        session_len: int,
        max_batched: int,
        prefix_cache: bool,
        dtype: str = "float32",
        label: str = "",
        quant_policy: int = 0,
        env: dict[str, str] | None = None,
    ):
        self.env = env or {}
        """Environment switches set while this runner generates (read at every step)."""
        # Every repeat sends the same prompts: with the prefix cache on, all but the first
        # prefill would be served from it (HF has no such cache), so the comparison runs with it
        # off; --prefix-cache measures the cached case under its own name.
        self.name = f"ours tp={tp}" + (" (prefix cache on)" if prefix_cache else "") + label
        self.rt = Runtime(
            model=str(folder),
            tp=tp,
            session_len=session_len,
            device="cpu",
            dtype=dtype,
            scheduler=SchedulerConfig(max_num_batched_tokens=max(8192, max_batched)),
            cache={"enable_prefix_caching": prefix_cache, "quant_policy": quant_policy},
        )

    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], list]:
        stamps: list[float] = []
        executor = self.rt.engine.executor
        assert executor is not None
        execute = executor.execute

        def timed(plan: Any) -> Any:
            out = execute(plan)
            stamps.append(time.perf_counter())
            return out

        executor.execute = timed  # type: ignore[method-assign]
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
            outs = self.rt.generate(prompts, params)
        finally:
            del executor.execute  # back to the class method
            for k, v in saved.items():
                if v is None:
                    del os.environ[k]
                else:
                    os.environ[k] = v
        if len(stamps) != new_tokens:
            raise RuntimeError(
                f"{self.name}: expected 1 prefill + {new_tokens - 1} decode steps, got "
                f"{len(stamps)} steps"
            )
        return [o.token_ids for o in outs], stamps

    def close(self) -> None:
        self.rt.shutdown()


class _Stamp(LogitsProcessor):
    """No-op logits processor: HF calls it once per new token, right after the forward."""

    def __init__(self, stamps: list[float]):
        self.stamps = stamps

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return scores


class HFRunner:
    def __init__(self, folder: Path, attn: str):
        self.name = HF_NAME
        self.model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation=attn
        ).eval()
        gen = self.model.generation_config
        gen.eos_token_id = None  # generate exactly max_new_tokens, without masking EOS
        gen.pad_token_id = 0
        gen.do_sample = False

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], list]:
        if len({len(p) for p in prompts}) != 1:
            raise ValueError("HFRunner takes equal-length prompts (no padding)")
        ids = torch.tensor(prompts, dtype=torch.long)
        stamps: list[float] = []
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                logits_processor=LogitsProcessorList([_Stamp(stamps)]),
            )
        tokens = out[:, ids.shape[1] :].tolist()
        if any(len(t) != new_tokens for t in tokens) or len(stamps) != new_tokens:
            raise RuntimeError(f"HF generated {len(tokens[0])} tokens, wanted {new_tokens}")
        return tokens, stamps

    def close(self) -> None:
        del self.model


# -- measuring ------------------------------------------------------------------------------


def timed_generate(runner: Any, prompts: list[list[int]], new_tokens: int) -> tuple:
    t0 = time.perf_counter()
    tokens, stamps = runner.generate(prompts, new_tokens)
    total = time.perf_counter() - t0
    return tokens, total, [b - a for a, b in zip(stamps, stamps[1:])]


def measure(
    runners: list[Any], prompts: list[list[int]], work: Workload, log: Callable[[str], None]
) -> dict[str, Timing]:
    """Warm up every runner, then alternate them through `repeats` TTFT + decode runs."""
    batch = len(prompts)
    for r in runners:
        timed_generate(r, prompts, work.new_tokens)
    ttft: dict[str, list[float]] = {r.name: [] for r in runners}
    steps: dict[str, list[list[float]]] = {r.name: [] for r in runners}
    total: dict[str, list[float]] = {r.name: [] for r in runners}
    tokens: dict[str, list[list[int]]] = {}
    for i in range(work.repeats):
        for r in runners:
            _, t, _ = timed_generate(r, prompts, 1)
            ttft[r.name].append(t)
            toks, t, d = timed_generate(r, prompts, work.new_tokens)
            total[r.name].append(t)
            steps[r.name].append(d)
            if r.name in tokens and tokens[r.name] != toks:
                raise RuntimeError(f"{r.name}: greedy tokens changed between repeats")
            tokens[r.name] = toks
        cells = ", ".join(
            f"{n}: ttft {ttft[n][-1] * 1e3:.0f} ms decode {sum(steps[n][-1]) * 1e3:.0f} ms"
            for n in ttft
        )
        log(f"  batch {batch} repeat {i + 1}/{work.repeats}: {cells}")
    return {n: Timing(ttft[n], steps[n], total[n], tokens[n]) for n in ttft}


def make_prompts(batch: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    """Equal-length random prompts; ids 4.. avoid the checkpoint's special tokens."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (batch, prompt_len), generator=gen).tolist()


def ensure_checkpoint(workdir: Path, shape: ModelShape, seed: int) -> Path:
    folder = workdir / shape.folder_name(seed)
    if (folder / CONFIG_FILE).is_file():
        return folder
    tmp = workdir / f".{folder.name}.tmp{os.getpid()}"
    write_random_checkpoint(
        tmp,
        architecture=shape.architecture,
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_layers=shape.num_layers,
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        seed=seed,
    )
    tmp.rename(folder)
    return folder


def match_summary(ours: list[list[int]], hf: list[list[int]]) -> tuple[bool, str]:
    same = [a == b for a, b in zip(ours, hf)]
    if all(same):
        return True, f"identical ({len(same)}/{len(same)} rows)"
    firsts = []
    for a, b in zip(ours, hf):
        if a != b:
            firsts.append(next(i for i, (x, y) in enumerate(zip(a, b)) if x != y))
    return False, f"{sum(same)}/{len(same)} rows identical; first divergence at tokens {firsts}"


def ratios(ours: Timing, hf: Timing, batch: int, work: Workload) -> tuple[float, float]:
    """(prefill, decode) tokens/s of ours divided by HF's."""
    pre = ours.prefill_tps(batch, work.prompt_len) / hf.prefill_tps(batch, work.prompt_len)
    dec = ours.decode_tps(batch, work.new_tokens) / hf.decode_tps(batch, work.new_tokens)
    return pre, dec


# -- reporting ------------------------------------------------------------------------------


def others_cpu_fraction(start: tuple[float, float] | None, own_start: float) -> float | None:
    """Share of the machine's CPU time used by other processes since `start`."""
    end = cpu_counters()
    if start is None or end is None or end[1] <= start[1]:
        return None
    own = time.process_time() - own_start
    return max(end[0] - start[0] - own, 0.0) / (end[1] - start[1])


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def _pct(x: float | None) -> str:
    return "unknown" if x is None else f"{100 * x:.0f}%"


def render_report(
    *,
    shape: ModelShape,
    num_params: int,
    work: Workload,
    hf_attn: str,
    results: dict[int, dict[str, Timing]],
    matches: dict[int, str],
    ours_names: list[str],
    summary: str,
    command: str,
    elapsed_s: float,
    others_cpu: float | None,
    version: str,
) -> str:
    hf = HF_NAME
    hf_class = {"gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}.get(
        shape.architecture, "LlamaForCausalLM"
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [
        f"# CPU generate benchmark: dist_runtime vs HF transformers ({datetime.date.today()})",
        "",
        "Produced by `bench/generate.py`; see its docstring for how each number is measured.",
        "",
        f"**Summary:** `{summary}`",
        "",
        "## Machine and software",
        "",
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores ({cores} usable by this process)",
        f"- torch threads: {work.threads} (`torch.set_num_threads`, same for both systems)",
        f"- Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {platform.platform()}",
        f"- code: {version}",
        f"- CPU used by other processes during the run: {_pct(others_cpu)} of the machine "
        "(from /proc/stat, minus this process's own CPU time)",
        *(
            [
                "",
                "> **Noisy run:** other processes competed for the CPUs, so some repeats were "
                "slowed down a lot (compare the best-run and median-run decode columns). The "
                "minimum / lower-envelope numbers are the least disturbed, but treat the ratios "
                "as approximate.",
            ]
            if others_cpu is not None and others_cpu >= 0.2
            else []
        ),
        "",
        "## Model",
        "",
        shape.describe(work.seed, num_params),
        "",
        "## Workload",
        "",
        "- ours runs with the prefix cache off (every repeat sends the same prompts, which the "
        "cache would serve; HF has none); a row marked `(prefix cache on)` is the cached case",
        "- a row marked `4-bit (the GGUF's Q4_1 blocks), bf16` (`--int4`) runs the demo's own "
        "Q4_1 weights kept 4-bit (`convert --weights int4`; the float rows use the same values "
        "dequantized) with bfloat16 activations through PyTorch's CPU int4 matmul: the same "
        "weights, another activation precision, so its tokens may differ from HF's fp32 ones",
        "- a row marked `KV int8` / `KV int4` (`--kv-quant`) keeps ours' KV cache quantized "
        "(`cache.quant_policy` 8 / 4: a scale and zero per token and KV head, "
        "`kernels/kv_quant.py`); its tokens may differ from HF's, which keeps K/V in fp32",
        f"- prompts: random token ids, all {work.prompt_len} tokens long (no padding), "
        f"batch sizes {', '.join(map(str, work.batch_sizes))}",
        f"- greedy (ours temperature=0, HF do_sample=False), {work.new_tokens} new tokens per "
        "sequence, EOS ignored by both",
        f"- one warm-up run per system and batch size, then {work.repeats} alternating repeats; "
        "the table shows the least disturbed numbers (see Results)",
        "- ours: in-process executor (tp=1), paged KV cache, block size 16, decode attention "
        "through the native CPU kernel that reads the paged cache in place and RoPE + KV store "
        "in one native call (`kernels/cpu_attention.py`; a row marked `native off` "
        "(`--torch-attention`) runs the torch references instead: a gather plus SDPA, RoPE and "
        "the store as torch operators), the residual add + RMSNorm and SiLU-and-mul through "
        "their native kernels (`kernels/cpu_elementwise.py`; a row marked `elementwise off` "
        "(`--torch-elementwise`) runs them as torch operators), the other kernels' torch "
        "references, "
        "float linear layers and the LM head through the native panel kernel with each weight "
        "packed once after loading (`kernels/cpu_gemm.py`); decode steps run all of these "
        "kernels for every layer from one native call (`kernels/cpu_decoder.py`; a row marked "
        "`layer-by-layer decode` (`--layer-decode`) calls them layer by layer from Python, and "
        "alternates with the other two rows); a row marked `oneDNN` "
        "(`--onednn-gemm`) runs them through oneDNN's reordered weights instead, one marked "
        "`F.linear` (`--torch-gemm`) through `F.linear` (`DIST_RUNTIME_CPU_GEMM=torch`), as HF "
        "does",
        f"- HF: `{hf_class}.generate`, attn_implementation={hf_attn}, DynamicCache",
        "",
        "## Results",
        "",
        "Tokens/s are absolute; the ratio is ours / HF (> 1: ours is faster). Prefill tokens/s "
        "= batch x prompt_len / best TTFT (TTFT = one `generate` with max_new_tokens=1). "
        f"Decode tokens/s = batch x {work.new_tokens - 1} / decode time, where the decode "
        "time sums, over the decode steps (from the first new token's logits to the last "
        "one's), each step's fastest repeat; the best-run and median-run columns use whole "
        "runs instead, and the last column is the cross-check batch x "
        f"{work.new_tokens - 1} / (best total time - best TTFT).",
        "",
        "| batch | system | TTFT (ms) | prefill tok/s | decode tok/s | ms / decode step "
        "| decode tok/s, best run | decode tok/s, median run | decode tok/s (total - TTFT) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for batch, cells in results.items():
        for name in [*ours_names, hf]:
            t = cells[name]
            steps = work.new_tokens - 1
            lines.append(
                f"| {batch} | {name} | {t.ttft_s * 1e3:.1f} "
                f"| {t.prefill_tps(batch, work.prompt_len):.0f} "
                f"| {t.decode_tps(batch, work.new_tokens):.1f} "
                f"| {t.decode_s / steps * 1e3:.1f} "
                f"| {t.decode_tps(batch, work.new_tokens, min):.1f} "
                f"| {t.decode_tps(batch, work.new_tokens, statistics.median):.1f} "
                f"| {_num(t.decode_tps_subtracted(batch, work.new_tokens))} |"
            )
        for name in ours_names:
            pre, dec = ratios(cells[name], cells[hf], batch, work)
            lines.append(
                f"| {batch} | **ratio {name} / HF** | | **{pre:.2f}x** | **{dec:.2f}x** | | | | |"
            )
    lines += ["", "## Greedy tokens, ours (tp=1) vs HF", ""]
    lines += [f"- batch {b}: {m}" for b, m in matches.items()]
    lines += [
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small model and workload (smoke run)")
    p.add_argument(
        "--model",
        choices=("random", "demo", "gemma2", "gemma3"),
        default="random",
        help="random: a ~58M-parameter random Llama; demo: SmolLM2-135M-Instruct; gemma2 / "
        "gemma3: a random Gemma 2 / 3 of the random Llama's shape",
    )
    p.add_argument("--prompt-len", type=int, help="prompt tokens (default 512, quick 64)")
    p.add_argument("--new-tokens", type=int, help="new tokens per sequence (default 64, quick 8)")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated (default 1,8)")
    p.add_argument("--repeats", type=int, help="timed repeats per cell (default 5, quick 1)")
    p.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        help="torch.set_num_threads for both systems (default: all usable cores)",
    )
    p.add_argument("--tp", type=int, default=1, help="also run ours at this tp (> 1: Ray)")
    p.add_argument(
        "--prefix-cache",
        action="store_true",
        help="also run ours with the prefix cache on, labelled as such (repeats then hit it)",
    )
    p.add_argument(
        "--int4",
        action="store_true",
        help="demo model: also run ours on the GGUF's own Q4_1 blocks kept 4-bit (convert "
        "--weights int4) in bfloat16 through PyTorch's CPU int4 matmul, labelled as such",
    )
    p.add_argument(
        "--torch-gemm",
        action="store_true",
        help="also run ours with its linear layers through F.linear "
        "(DIST_RUNTIME_CPU_GEMM=torch), labelled as such: the before/after of packed weights",
    )
    p.add_argument(
        "--onednn-gemm",
        action="store_true",
        help="also run ours with its linear layers through oneDNN instead of the native panel "
        "kernel (DIST_RUNTIME_CPU_GEMM=onednn), labelled as such",
    )
    p.add_argument(
        "--torch-attention",
        action="store_true",
        help="also run ours with the native CPU decode kernels off (DIST_RUNTIME_CPU_ATTENTION="
        "torch: attention as a gather + SDPA, RoPE and the KV store as torch operators), "
        "labelled as such: the before/after of those kernels",
    )
    p.add_argument(
        "--torch-elementwise",
        action="store_true",
        help="also run ours with the residual add + RMSNorm and SiLU-and-mul as torch operators "
        "(DIST_RUNTIME_CPU_ELEMENTWISE=torch) instead of their native kernels, labelled as such",
    )
    p.add_argument(
        "--layer-decode",
        action="store_true",
        help="also run ours with decode steps layer by layer (DIST_RUNTIME_CPU_DECODE=layers) "
        "instead of the native decoder's one call, alternating with the other two rows, "
        "labelled as such",
    )
    p.add_argument(
        "--kv-quant",
        default="",
        help="comma list of KV cache policies (8: int8, 4: int4): also run ours with its KV "
        "cache quantized at each, labelled as such (what decode at long context gains by "
        "reading fewer bytes)",
    )
    p.add_argument("--hf-attn", default="sdpa", choices=("sdpa", "eager"))
    p.add_argument("--seed", type=int, default=0, help="checkpoint and prompt seed")
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path(os.environ.get("TMPDIR", "/tmp")) / "dist_runtime_bench",
        help="where the random checkpoint is written once and reused",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="report path (default docs/benchmarks/generate_cpu_<date>.md; quick: none)",
    )
    p.add_argument("--no-report", action="store_true", help="do not write the markdown report")
    args = p.parse_args(argv)
    try:
        args.kv_quant_policies = [int(x) for x in args.kv_quant.split(",") if x.strip()]
    except ValueError:
        p.error(f"--kv-quant {args.kv_quant!r}: give a comma list of 8 and / or 4")
    bad = [x for x in args.kv_quant_policies if x not in (8, 4)]
    if bad:
        p.error(f"--kv-quant {args.kv_quant!r}: {bad} not a KV policy; use 8 (int8), 4 (int4)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    counters, own_cpu = cpu_counters(), time.process_time()
    version = code_version()  # when the library modules are imported, not when the run ends
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    quick = args.quick
    if args.model == "demo":
        shape = ModelShape(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_layers=30,
            num_heads=9,
            num_kv_heads=3,
            demo=True,
        )
    elif quick:
        shape = ModelShape(vocab_size=8000, hidden_size=256, intermediate_size=768, num_layers=4)
    else:
        shape = ModelShape()
    if args.model in ("gemma2", "gemma3"):
        shape = dataclasses.replace(shape, architecture=args.model)
    if args.model == "gemma2" and args.hf_attn == "sdpa":
        args.hf_attn = "eager"  # (HF's Gemma 2 has no SDPA path: it soft-caps the scores)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    work = Workload(
        prompt_len=args.prompt_len or (64 if quick else 512),
        new_tokens=args.new_tokens or (8 if quick else 64),
        batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")),
        repeats=args.repeats or (1 if quick else 5),
        threads=threads,
        seed=args.seed,
    )
    if work.new_tokens < 2:
        raise SystemExit("--new-tokens must be >= 2 to time decoding")

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {msg}", flush=True)

    args.workdir.mkdir(parents=True, exist_ok=True)
    folder = demo_model_path() if shape.demo else ensure_checkpoint(args.workdir, shape, args.seed)
    log(f"checkpoint {folder}; torch threads {threads}")
    session_len = work.prompt_len + work.new_tokens + 16
    max_batched = max(work.batch_sizes) * work.prompt_len
    hf = HFRunner(folder, args.hf_attn)
    ours = OursRunner(folder, 1, session_len, max_batched, prefix_cache=False)
    # The layer-by-layer decode row alternates with ours and HF: it is the before of a change
    # worth a fair comparison on a noisy machine.
    layered = (
        OursRunner(
            folder,
            1,
            session_len,
            max_batched,
            prefix_cache=False,
            label=" layer-by-layer decode",
            env={CPU_DECODE_ENV: "layers"},
        )
        if args.layer_decode
        else None
    )
    log(f"loaded both systems ({hf.num_params() / 1e6:.1f} M parameters)")

    results: dict[int, dict[str, Timing]] = {}
    matches: dict[int, str] = {}
    b1_ok = True
    try:
        for batch in work.batch_sizes:
            prompts = make_prompts(batch, work.prompt_len, shape.vocab_size, args.seed + batch)
            results[batch] = measure(
                [ours, hf, *([layered] if layered else [])], prompts, work, log
            )
            ok, text = match_summary(
                results[batch][ours.name].tokens, results[batch][hf.name].tokens
            )
            matches[batch] = text
            if batch == 1 and not ok:
                b1_ok = False
            log(f"  batch {batch} greedy tokens ours vs HF: {text}")
    finally:
        ours.close()
        if layered is not None:
            layered.close()
    ours_names = [ours.name, *([layered.name] if layered else [])]

    def extra_row(runner: OursRunner, note: str = "") -> str:
        """Measure another configuration of ours alone (not alternating with HF) and close it."""
        log(f"started {runner.name}{note}")
        try:
            for batch in work.batch_sizes:
                prompts = make_prompts(batch, work.prompt_len, shape.vocab_size, args.seed + batch)
                results[batch].update(measure([runner], prompts, work, log))
        finally:
            runner.close()
        ours_names.append(runner.name)
        return runner.name

    if args.tp > 1:
        tp_runner = OursRunner(folder, args.tp, session_len, max_batched, prefix_cache=False)
        extra_row(tp_runner, " (Ray, 1 torch thread per worker)")
    if args.prefix_cache:
        extra_row(OursRunner(folder, 1, session_len, max_batched, prefix_cache=True))
    gemm_names: dict[str, str] = {}
    for choice, wanted, label in (
        ("onednn", args.onednn_gemm, "oneDNN"),
        ("torch", args.torch_gemm, "F.linear"),
    ):
        if not wanted:
            continue
        os.environ[CPU_GEMM_ENV] = choice  # read when the layers are finalized after loading
        try:
            runner = OursRunner(
                folder, 1, session_len, max_batched, prefix_cache=False, label=f" {label}"
            )
        finally:
            del os.environ[CPU_GEMM_ENV]
        gemm_names[label] = extra_row(runner)
    attn_name = None
    if args.torch_attention:
        # Read at every decode step, so it is set while this row runs.
        os.environ[CPU_ATTENTION_ENV] = "torch"
        try:
            attn_name = extra_row(
                OursRunner(
                    folder, 1, session_len, max_batched, prefix_cache=False, label=" native off"
                )
            )
        finally:
            del os.environ[CPU_ATTENTION_ENV]
    elementwise_name = None
    if args.torch_elementwise:
        os.environ[CPU_ELEMENTWISE_ENV] = "torch"  # read at every call: set while the row runs
        try:
            off = OursRunner(
                folder, 1, session_len, max_batched, prefix_cache=False, label=" elementwise off"
            )
            elementwise_name = extra_row(off)
        finally:
            del os.environ[CPU_ELEMENTWISE_ENV]
    int4_name = None
    if args.int4:
        from dist_runtime.formats.demo_model import demo_gguf_path
        from dist_runtime.formats.gguf import convert_gguf

        int4_folder = args.workdir / "smollm2-135m-int4"
        if not (int4_folder / "config.json").is_file():
            convert_gguf(demo_gguf_path(), int4_folder, weights="int4", progress=False)
        int4 = OursRunner(
            int4_folder,
            1,
            session_len,
            max_batched,
            prefix_cache=False,
            dtype="bfloat16",
            label=" 4-bit (the GGUF's Q4_1 blocks), bf16",
        )
        int4_name = extra_row(int4)

    kv_names: dict[int, str] = {}
    for policy in args.kv_quant_policies:
        kv_names[policy] = extra_row(
            OursRunner(
                folder,
                1,
                session_len,
                max_batched,
                prefix_cache=False,
                label=f" KV int{policy}",
                quant_policy=policy,
            )
        )

    rs = {b: ratios(results[b][ours.name], results[b][hf.name], b, work) for b in results}
    parts = [
        f"{kind} " + " ".join(f"b{b} {rs[b][k]:.2f}x" for b in work.batch_sizes)
        for k, kind in enumerate(("prefill", "decode"))
    ]
    tag = "generate-cpu-demo" if shape.demo else "generate-cpu"
    tag += "" if shape.architecture == "llama" else f"-{shape.architecture}"
    for label, gemm_name in gemm_names.items():
        rg = {b: ratios(results[b][gemm_name], results[b][hf.name], b, work) for b in results}
        parts.append(
            f"{label} decode " + " ".join(f"b{b} {rg[b][1]:.2f}x" for b in work.batch_sizes)
        )
    if layered is not None:
        rl = {b: ratios(results[b][layered.name], results[b][hf.name], b, work) for b in results}
        parts.append(
            "layer-by-layer decode " + " ".join(f"b{b} {rl[b][1]:.2f}x" for b in work.batch_sizes)
        )
    if attn_name is not None:
        ra = {b: ratios(results[b][attn_name], results[b][hf.name], b, work) for b in results}
        parts.append(
            "native-off decode " + " ".join(f"b{b} {ra[b][1]:.2f}x" for b in work.batch_sizes)
        )
    if elementwise_name is not None:
        re_ = {
            b: ratios(results[b][elementwise_name], results[b][hf.name], b, work) for b in results
        }
        parts.append(
            "elementwise-off "
            + " | ".join(
                f"{kind} " + " ".join(f"b{b} {re_[b][k]:.2f}x" for b in work.batch_sizes)
                for k, kind in enumerate(("prefill", "decode"))
            )
        )
    if int4_name is not None:
        r4 = {b: ratios(results[b][int4_name], results[b][hf.name], b, work) for b in results}
        parts.append(
            "4-bit bf16 decode " + " ".join(f"b{b} {r4[b][1]:.2f}x" for b in work.batch_sizes)
        )
    for policy, kv_name in kv_names.items():
        rk = {b: ratios(results[b][kv_name], results[b][hf.name], b, work) for b in results}
        parts.append(
            f"KV int{policy} decode " + " ".join(f"b{b} {rk[b][1]:.2f}x" for b in work.batch_sizes)
        )
    summary = f"{tag}: {' | '.join(parts)} (ours/HF tokens/s)"
    others = others_cpu_fraction(counters, own_cpu)
    log(f"CPU used by other processes during the run: {_pct(others)} of the machine")
    if not args.no_report and (args.out or not quick):
        out = (
            args.out
            or REPO_ROOT
            / "docs"
            / "benchmarks"
            / f"generate_cpu_{'demo_' if shape.demo else ''}"
            f"{'' if shape.architecture == 'llama' else shape.architecture + '_'}"
            f"{datetime.date.today()}.md"
        )
        command = "python " + shlex.join([os.path.relpath(sys.argv[0], REPO_ROOT), *sys.argv[1:]])
        report = render_report(
            shape=shape,
            num_params=hf.num_params(),
            work=work,
            hf_attn=args.hf_attn,
            results=results,
            matches=matches,
            ours_names=ours_names,
            summary=summary,
            command=command,
            elapsed_s=time.perf_counter() - started,
            others_cpu=others,
            version=version,
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report, encoding="utf-8")
        log(f"wrote {out}")
    hf.close()
    print(summary)
    if not b1_ok:
        print("FAILED: batch-1 greedy tokens differ between ours and HF", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
