"""Where a CPU decode step's time goes, before and after one of the CPU kernel choices.

    python bench/cpu_decode_profile.py                       # demo model, 1K context, b1 and b8
    python bench/cpu_decode_profile.py --report docs/benchmarks/cpu_decode_profile_<date>.md
    python bench/cpu_decode_profile.py --compare gemm        # native vs oneDNN linear layers

`--compare attention` (the default) runs decode attention and RoPE + KV store through the native
kernels (`kernels/cpu_attention.py`) and through the torch references
(`DIST_RUNTIME_CPU_ATTENTION=torch`: a gather plus SDPA, RoPE and the store as torch operators);
`--compare gemm` runs the linear layers through the native panel kernel and through oneDNN
(`DIST_RUNTIME_CPU_GEMM=onednn`), both over weights packed once after loading
(`kernels/cpu_gemm.py`); `--compare elementwise` runs the residual add + RMSNorm and
SiLU-and-mul through their native kernels and as torch operators
(`DIST_RUNTIME_CPU_ELEMENTWISE=torch`, `kernels/cpu_elementwise.py`); those three run decode
layer by layer (`DIST_RUNTIME_CPU_DECODE=layers`), so that each kernel is its own operator in
the trace. `--compare decoder` runs decode steps through the native decoder, every layer's
kernels from one call (`kernels/cpu_decoder.py`: one operator), and layer by layer.

Our runtime (in-process executor, prefix cache off) decodes `--steps` steps after a
`--prompt-len`-token prefill, with torch.profiler started and stopped inside the engine
thread's executor calls (where the ops run). Operators are grouped: linear layers and the LM
head (the native kernel's calls, `mkldnn::_linear_pointwise` / `aten::mm`, `aten::addmm`),
attention (the native kernel's calls, or SDPA and the reference's matmuls), the paged-KV
gather (`aten::index_select`), the native RoPE + KV store calls (the reference's RoPE and
store operators count as other operators),
and every other operator; "outside operators" is the step's wall time minus the operators' self
time (Python, plan building, sampling glue). Each configuration loads its own runtime; the two
choices are measured one after the other, so machine drift between them shows up as well.
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.generate_gpu import trace_decode_steps  # noqa: E402
from dist_runtime import Runtime, SamplingParams, SchedulerConfig  # noqa: E402
from dist_runtime.config import (  # noqa: E402
    CPU_ATTENTION_ENV,
    CPU_DECODE_ENV,
    CPU_ELEMENTWISE_ENV,
    CPU_GEMM_ENV,
)
from dist_runtime.formats.demo_model import demo_model_path  # noqa: E402
from kernels.cpu_attention import PROFILE_NAME, ROPE_STORE_PROFILE_NAME  # noqa: E402
from kernels.cpu_decoder import PROFILE_NAME as DECODER_PROFILE_NAME  # noqa: E402
from kernels.cpu_elementwise import RMS_NORM_PROFILE_NAME, SILU_PROFILE_NAME  # noqa: E402
from kernels.cpu_gemm import PROFILE_NAME as GEMM_PROFILE_NAME  # noqa: E402

GROUPS = {
    "linear layers + LM head": (
        GEMM_PROFILE_NAME,
        "mkldnn::_linear_pointwise",
        "aten::mm",
        "aten::addmm",
    ),
    "attention": (
        PROFILE_NAME,
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::bmm",
        "aten::matmul",
    ),
    "paged-KV gather": ("aten::index_select",),
    "RoPE + KV store (native)": (ROPE_STORE_PROFILE_NAME,),
    "RMSNorm + SiLU-and-mul (native)": (RMS_NORM_PROFILE_NAME, SILU_PROFILE_NAME),
    "decoder layers (one native call)": (DECODER_PROFILE_NAME,),
}
CHOICES = {
    "attention": (CPU_ATTENTION_ENV, {"native": "native kernels", "torch": "torch references"}),
    "gemm": (CPU_GEMM_ENV, {"native": "native kernel", "onednn": "oneDNN"}),
    "elementwise": (
        CPU_ELEMENTWISE_ENV,
        {"native": "native norm + SiLU", "torch": "torch norm + SiLU"},
    ),
    "decoder": (CPU_DECODE_ENV, {"fused": "one native call", "layers": "layer by layer"}),
}
"""--compare: the environment variable and its two values (after, before) with their labels."""


def profile_steps(rt: Runtime, batch: int, prompt_len: int, steps: int, seed: int) -> dict:
    """Per-step milliseconds by group over `steps` decode steps (after two untraced ones)."""
    from torch.profiler import ProfilerActivity

    rng = random.Random(seed)
    prompts = [[rng.randrange(100, 40000) for _ in range(prompt_len)] for _ in range(batch)]
    first, last = 4, 3 + steps  # step 1 is the prefill
    params = SamplingParams(max_new_tokens=last, temperature=0.0, ignore_eos=True)
    rt.generate(prompts, params)  # warm-up: same shapes, untraced
    prof, wall_s = trace_decode_steps(rt, prompts, first, last, [ProfilerActivity.CPU])
    events = prof.key_averages()
    ms = {name: 0.0 for name in GROUPS} | {"other operators": 0.0}
    for e in events:
        group = next((g for g, keys in GROUPS.items() if e.key in keys), "other operators")
        ms[group] += e.self_cpu_time_total / 1e3 / steps
    wall = wall_s * 1e3 / steps
    ms["outside operators"] = max(wall - sum(ms.values()), 0.0)
    ms["step (wall)"] = wall
    return ms


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None, help="checkpoint folder (default: the demo model)")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--compare", choices=sorted(CHOICES), default="attention")
    p.add_argument("--report", help="markdown report path")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    folder = args.model or str(demo_model_path())
    batches = [int(b) for b in args.batch_sizes.split(",")]
    results: dict[tuple[str, int], dict] = {}
    env, label = CHOICES[args.compare]
    if args.compare != "decoder":
        os.environ[CPU_DECODE_ENV] = "layers"
    for value in label:
        # The GEMM choice is read when the layers are finalized after loading, the attention
        # choice at every step: set for the configuration's whole life.
        os.environ[env] = value
        rt = Runtime(
            model=folder,
            session_len=args.prompt_len + args.steps + 32,
            device="cpu",
            dtype="float32",
            scheduler=SchedulerConfig(max_num_batched_tokens=max(batches) * args.prompt_len),
            cache={"enable_prefix_caching": False},
        )
        try:
            for b in batches:
                results[value, b] = profile_steps(rt, b, args.prompt_len, args.steps, seed=b)
                print(value, b, {k: round(v, 1) for k, v in results[value, b].items()}, flush=True)
        finally:
            rt.shutdown()
            del os.environ[env]
    names = list(next(iter(results.values())))
    order = list(label)[::-1]  # before, after
    header = "| ms per decode step | " + " | ".join(
        f"b{b} {label[v]}" for b in batches for v in order
    )
    lines = [header + " |", "|---" + "|---:" * (2 * len(batches)) + "|"]
    for name in names:
        cells = [f"{results[v, b][name]:.1f}" for b in batches for v in order]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.report:
        model_name = args.model or "the demo model (SmolLM2-135M-Instruct)"
        Path(args.report).write_text(
            f"# Where a CPU decode step goes ({datetime.date.today()})\n\n"
            + "\n\n".join(__doc__.split("\n\n")[2:]).strip()
            + f"\n\nModel {model_name}, fp32, prompt {args.prompt_len} tokens, {args.steps} traced "
            f"decode steps, torch {torch.__version__}, {args.threads} threads.\n\n"
            + table
            + "\n\nCommand: `python bench/cpu_decode_profile.py "
            + " ".join(sys.argv[1:])
            + "`\n"
        )


if __name__ == "__main__":
    main()
