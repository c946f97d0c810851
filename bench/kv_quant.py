r"""KV cache quantization (--quant-policy 0/8/4): capacity, decode step time at long context,
and accuracy, per policy, in one run.

    python bench/kv_quant.py [--context 32768] [--steps 16] [--report PATH]
    python bench/kv_quant.py --device cuda --layers 4 --context 131072 \
        --model-config bench/model_configs/internlm2_5-7b-chat-1m.json    # a GPU: the 7B shape

1. **Capacity.** Tokens of KV cache that fit in a fixed budget (`--cache-gib` per worker) for
   the `--model-config` shape (default the demo model's config) at tp 1, from the bytes per
   token each policy stores (codes plus a float32 scale and zero per token and KV head).
2. **Decode at long context.** One sequence of `--context` tokens is prefilled into a cache of
   that policy (random weights of `--model-config` with `--layers` layers; default a small
   Llama shape on CPU), then `--steps` one-token decode steps read the whole cache; the median
   step time is reported, with the bytes a step reads (weights + KV) and the achieved GB/s.
3. **Accuracy.** Teacher-forced NLL (nats/token) of a held-out generated report of
   `--nll-tokens` tokens on the demo model (SmolLM2-135M-Instruct, fp32), read through the
   quantized cache; and the demo's three bundled questions answered with each policy.

One summary line at the end; `--report` writes a markdown report.
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

from dist_runtime import Runtime, RuntimeConfig, SamplingParams  # noqa: E402
from dist_runtime.config import CacheConfig, ModelConfig  # noqa: E402
from dist_runtime.formats.demo_model import DEMO_HF_CONFIG, demo_model_path  # noqa: E402
from dist_runtime.memory_planner import kv_bytes_per_token, weight_params_per_worker  # noqa: E402
from dist_runtime.text.documents import harbor_report  # noqa: E402
from dist_runtime.text.tokenizer import Tokenizer  # noqa: E402
from workers.scoring import Scorer  # noqa: E402

POLICIES = (0, 8, 4)
SMALL_CPU_SHAPE: dict[str, Any] = {
    **DEMO_HF_CONFIG,
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "num_hidden_layers": 2,
    "vocab_size": 1024,
    "max_position_embeddings": 131072,
}
"""The default decode shape on CPU: head_dim 64, 2 KV heads, small enough to prefill 32K."""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--model-config", help="config.json of the decode shape (default: small)")
    p.add_argument("--layers", type=int, help="override num_hidden_layers of the decode shape")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--cache-gib", type=float, default=16.0)
    p.add_argument("--nll-tokens", type=int, default=3072)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report", help="write a markdown report here")
    return p.parse_args()


def decode_shape(args: argparse.Namespace) -> dict[str, Any]:
    if args.model_config:
        cfg = json.loads(Path(args.model_config).read_text(encoding="utf-8"))
    else:
        cfg = dict(SMALL_CPU_SHAPE)
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    cfg["max_position_embeddings"] = max(cfg.get("max_position_embeddings", 0), args.context + 64)
    cfg.pop("rope_scaling", None)
    return cfg


def capacity(model: ModelConfig, dtype: str, cache_gib: float) -> dict[int, int]:
    budget = int(cache_gib * 2**30)
    return {p: budget // kv_bytes_per_token(model, 1, dtype, p) for p in POLICIES}


def decode_timing(args: argparse.Namespace, hf: dict[str, Any], dtype: str) -> dict[int, Any]:
    model = ModelConfig.from_dict(hf)
    itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    weight_bytes = weight_params_per_worker(model, 1) * itemsize
    out: dict[int, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(hf), encoding="utf-8")
        gen = torch.Generator().manual_seed(0)
        n = args.context + args.steps
        ids = torch.randint(4, model.vocab_size, (n,), generator=gen).tolist()
        for policy in POLICIES:
            config = RuntimeConfig(
                model=tmp,
                load_format="dummy",
                device=args.device,
                dtype=dtype,
                session_len=n + 16,
                cache=CacheConfig(quant_policy=policy),
                enforce_eager=True,
            )
            scorer = Scorer(config, max_tokens=n)
            try:
                started = time.perf_counter()
                score = scorer.score(ids, chunk=4096, decode_last=args.steps)
                total = time.perf_counter() - started
            finally:
                scorer.close()
            step = statistics.median(score.decode_seconds)
            kv = kv_bytes_per_token(model, 1, dtype, policy) * args.context
            out[policy] = {
                "step_ms": step * 1e3,
                "prefill_s": total - sum(score.decode_seconds),
                "bytes": weight_bytes + kv,
                "gbps": (weight_bytes + kv) / step / 1e9,
            }
            print(f"decode policy {policy}: {step * 1e3:.2f} ms/step", flush=True)
    return out


def accuracy(args: argparse.Namespace) -> dict[int, Any]:
    demo = str(demo_model_path())
    tokenizer = Tokenizer.from_folder(demo)
    assert tokenizer is not None
    held_out = tokenizer.encode(harbor_report(seed=3, num_sections=40).text)[: args.nll_tokens]
    doc = harbor_report()
    out: dict[int, Any] = {}
    for policy in POLICIES:
        config = RuntimeConfig(
            model=demo,
            device="cpu",
            dtype="float32",
            session_len=max(args.nll_tokens + 64, 4096),
            cache=CacheConfig(quant_policy=policy),
        )
        scorer = Scorer(config, max_tokens=len(held_out))
        try:
            nll = scorer.score(held_out, chunk=1024).mean_nll
        finally:
            scorer.close()
        with Runtime(config=config) as rt:
            answers = rt.ask(doc.text, doc.questions, SamplingParams(max_new_tokens=64))
        right = [fact in a for fact, a in zip(doc.answers, answers)]
        out[policy] = {"nll": nll, "right": right, "answers": answers, "tokens": len(held_out)}
        print(f"accuracy policy {policy}: NLL {nll:.4f}, answers {right}", flush=True)
    return out


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    hf = decode_shape(args)
    caps = capacity(ModelConfig.from_dict(hf), dtype, args.cache_gib)
    demo_caps = capacity(ModelConfig.from_dict(dict(DEMO_HF_CONFIG)), "float32", args.cache_gib)
    timing = decode_timing(args, hf, dtype)
    acc = accuracy(args)
    base = acc[0]["nll"]
    line = (
        f"kv_quant: capacity x{caps[8] / caps[0]:.2f} (int8) x{caps[4] / caps[0]:.2f} (int4) at "
        f"{dtype}; decode @{args.context:,} {timing[0]['step_ms']:.1f} / "
        f"{timing[8]['step_ms']:.1f} / {timing[4]['step_ms']:.1f} ms (0/8/4); demo NLL "
        f"{base:.4f}, int8 {100 * (acc[8]['nll'] / base - 1):+.2f}%, int4 "
        f"{100 * (acc[4]['nll'] / base - 1):+.2f}%; bundled answers right "
        f"{sum(acc[0]['right'])}/{sum(acc[8]['right'])}/{sum(acc[4]['right'])} of 3"
    )
    print(line)
    if args.report:
        write_report(args, dtype, hf, caps, demo_caps, timing, acc, line)
    return 0


def write_report(
    args: argparse.Namespace,
    dtype: str,
    hf: dict[str, Any],
    caps: dict[int, int],
    demo_caps: dict[int, int],
    timing: dict[int, Any],
    acc: dict[int, Any],
    line: str,
) -> None:
    name = {0: f"0 ({dtype})", 8: "8 (int8)", 4: "4 (int4)"}
    rows = [
        "| policy | KV tokens in "
        f"{args.cache_gib:g} GiB (decode shape) | (demo model, fp32) | decode step @ "
        f"{args.context:,} | bytes read / step | achieved GB/s | demo NLL | vs policy 0 | "
        "bundled answers right |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in POLICIES:
        t, a = timing[p], acc[p]
        rows.append(
            f"| {name[p]} | {caps[p]:,} | {demo_caps[p]:,} | {t['step_ms']:.2f} ms | "
            f"{t['bytes'] / 1e6:,.1f} MB | {t['gbps']:.2f} | {a['nll']:.4f} | "
            f"{100 * (a['nll'] / acc[0]['nll'] - 1):+.2f}% | {sum(a['right'])} of 3 |"
        )
    shape = {
        k: hf[k]
        for k in (
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "num_hidden_layers",
            "vocab_size",
        )
        if k in hf
    }
    answers = "\n".join(
        f"- policy {p}: " + " | ".join(repr(a.strip()) for a in acc[p]["answers"]) for p in POLICIES
    )
    text = f"""# KV cache quantization ({args.device}, {datetime.date.today()})

`python bench/kv_quant.py --context {args.context} --steps {args.steps} --device {args.device}`
on {platform.processor() or platform.machine()}, torch {torch.__version__},
{args.threads} torch threads.

{chr(10).join(rows)}

- Decode shape: {shape}, {dtype}, random weights, one sequence of {args.context:,} tokens, the
  median of {args.steps} decode steps after its prefill (eager). Bytes read per step = the
  weights + the whole KV cache of the sequence at that policy (codes + scale/zero).
- NLL: teacher-forced over {acc[0]["tokens"]:,} tokens of a held-out generated report
  (`harbor_report(seed=3)`), each token predicted from the quantized K/V of all tokens before it
  (`workers/scoring.py`).
- Bundled answers (greedy, 64 new tokens):
{answers}

Summary: `{line}`
"""
    Path(args.report).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
