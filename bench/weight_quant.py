r"""4-bit weights on the demo model: quality of RTN and AWQ against float, in one run.

    python bench/weight_quant.py [--group-size 64] [--nll-tokens 3072] [--report PATH]

The demo model (SmolLM2-135M-Instruct) ships as a Q4_1 GGUF, so its "float" weights are already
the dequantized Q4_1 values. Variants:

- **float**: the converted float32 checkpoint (the reference);
- **gguf-q4**: the same GGUF converted with `--weights int4`: its own Q4_1 blocks kept 4-bit
  (group 32, float zeros), which must score as float does;
- **rtn** / **awq**: `launch/quantize.py --method rtn|awq --group-size G` applied to the float
  checkpoint, written as AWQ GEMM folders (the demo's 576-wide inputs rule out group 128).

Each is scored by teacher-forced NLL (nats/token) of a held-out generated report of
`--nll-tokens` tokens (`harbor_report(seed=3)`, never used for calibration) on one in-process
worker, and answers the demo's three bundled questions (greedy, 64 new tokens). The weight
bytes are those a GPU worker holds (`weight_bytes_per_worker`; this run is float32 on CPU,
where the 4-bit layers are dequantized once after loading). One summary line
at the end; `--report` writes a markdown report.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dist_runtime import Runtime, RuntimeConfig, SamplingParams  # noqa: E402
from dist_runtime.config import ModelConfig  # noqa: E402
from dist_runtime.formats.demo_model import demo_gguf_path, demo_model_path  # noqa: E402
from dist_runtime.formats.gguf import convert_gguf  # noqa: E402
from dist_runtime.memory_planner import weight_bytes_per_worker  # noqa: E402
from dist_runtime.quantize import quantize_checkpoint  # noqa: E402
from dist_runtime.text.documents import harbor_report  # noqa: E402
from dist_runtime.text.tokenizer import Tokenizer  # noqa: E402
from workers.scoring import Scorer  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--group-size", type=int, default=64, help="RTN / AWQ group size")
    p.add_argument("--nll-tokens", type=int, default=3072, help="held-out tokens scored")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--report", default=None, help="markdown report path")
    return p.parse_args()


def build_variants(work: Path, group: int) -> dict[str, dict[str, Any]]:
    demo = demo_model_path()
    variants: dict[str, dict[str, Any]] = {"float": {"path": demo, "seconds": 0.0}}
    started = time.perf_counter()
    path = convert_gguf(demo_gguf_path(), work / "gguf-q4", weights="int4", progress=False)
    variants["gguf-q4"] = {"path": path, "seconds": time.perf_counter() - started}
    for method in ("rtn", "awq"):
        started = time.perf_counter()
        quantize_checkpoint(demo, work / method, method=method, group_size=group)
        variants[method] = {"path": work / method, "seconds": time.perf_counter() - started}
        print(f"{method}: quantized in {variants[method]['seconds']:.1f} s", flush=True)
    return variants


def evaluate(path: Path, held_out: list[int]) -> dict[str, Any]:
    config = RuntimeConfig(
        model=str(path), device="cpu", dtype="float32", session_len=len(held_out) + 1024
    )
    scorer = Scorer(config, max_tokens=len(held_out))
    try:
        nll = scorer.score(held_out, chunk=1024).mean_nll
    finally:
        scorer.close()
    doc = harbor_report()
    with Runtime(config=config) as rt:
        answers = rt.ask(doc.text, doc.questions, SamplingParams(max_new_tokens=64))
    model = ModelConfig.from_pretrained(path)
    return {
        "nll": nll,
        "answers": answers,
        "right": [fact in a for fact, a in zip(doc.answers, answers, strict=True)],
        "gpu_bytes": weight_bytes_per_worker(model, 1, "bfloat16"),
        "quant": model.weight_quant,
    }


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = Tokenizer.from_folder(demo_model_path())
    assert tokenizer is not None
    held_out = tokenizer.encode(harbor_report(seed=3, num_sections=40).text)[: args.nll_tokens]
    with tempfile.TemporaryDirectory() as tmp:
        variants = build_variants(Path(tmp), args.group_size)
        for name, v in variants.items():
            v.update(evaluate(v["path"], held_out))
            print(f"{name}: NLL {v['nll']:.4f}, answers {v['right']}", flush=True)
    base = variants["float"]["nll"]

    def rel(name: str) -> str:
        return f"{100 * (variants[name]['nll'] / base - 1):+.2f}%"

    line = (
        f"weight_quant: demo NLL float {base:.4f}, gguf-q4 (native Q4_1) {rel('gguf-q4')}, "
        f"rtn g{args.group_size} {rel('rtn')}, awq g{args.group_size} {rel('awq')}; answers "
        + "/".join(f"{sum(variants[n]['right'])}" for n in variants)
        + " of 3; bf16 GPU weights "
        + " / ".join(f"{variants[n]['gpu_bytes'] / 2**20:.0f}" for n in variants)
        + " MiB (float/gguf-q4/rtn/awq)"
    )
    print(line)
    if args.report:
        write_report(args, variants, len(held_out), line)
    return 0


def write_report(
    args: argparse.Namespace, variants: dict[str, dict[str, Any]], tokens: int, line: str
) -> None:
    base = variants["float"]["nll"]
    rows = [
        "| variant | format | NLL (nats/token) | vs float | bundled answers right | "
        "weights on a GPU (bf16) | made in |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, v in variants.items():
        q = v["quant"]
        fmt = "float32" if q is None else f"{q.method} 4-bit, group {q.group_size}"
        rows.append(
            f"| {name} | {fmt} | {v['nll']:.4f} | {100 * (v['nll'] / base - 1):+.2f}% | "
            f"{sum(v['right'])} of 3 | {v['gpu_bytes'] / 2**20:,.0f} MiB | {v['seconds']:.1f} s |"
        )
    answers = "\n".join(
        f"- {name}: " + " | ".join(repr(a.strip()) for a in v["answers"])
        for name, v in variants.items()
    )
    text = f"""# 4-bit weights on the demo model (CPU, {datetime.date.today()})

`python bench/weight_quant.py --group-size {args.group_size} --nll-tokens {args.nll_tokens}`
on {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads}
torch threads.

{chr(10).join(rows)}

- NLL: teacher-forced over {tokens:,} tokens of a held-out generated report
  (`harbor_report(seed=3)`), fp32 activations on one in-process worker.
- The demo's float weights are its GGUF's Q4_1 values dequantized, so gguf-q4 (those blocks
  kept 4-bit) is the same function; RTN and AWQ quantize those values again at group
  {args.group_size}, as a float checkpoint would be.
- "Made in": GGUF conversion or `launch/quantize.py` wall time on this machine.
- Weights on a GPU: what a bf16 worker holds (`weight_bytes_per_worker`), embeddings and
  the tied head in bf16. On CPU the 4-bit layers are dequantized once after loading.
- Bundled answers (greedy, 64 new tokens):
{answers}

Summary: `{line}`
"""
    Path(args.report).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
