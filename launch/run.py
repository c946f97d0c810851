"""Run generation with the distributed runtime.

    python launch/run.py --tp 2 --prompt "Hello"                      # demo checkpoint, 2 workers
    python launch/run.py --tp 4 --session-len 32768 --model /models/internlm2_5-7b-chat
    python launch/run.py --config run.yaml --tp 2                     # YAML, CLI overrides it

Without --model (and no `model:` in --config) a small random-weight InternLM2 checkpoint is
written once to the cache folder (~/.cache/dist_runtime, or $DIST_RUNTIME_CACHE) and used: its
text is meaningless, but every part of the runtime runs on it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_runtime import Runtime, RuntimeConfig, SamplingParams  # noqa: E402
from dist_runtime.config import ConfigError, merge_overrides, read_yaml  # noqa: E402

logger = logging.getLogger("launch.run")

DEMO_PROMPTS = [
    "The quick brown fox jumps over the lazy dog. Summarise the sentence:",
    "List three uses of a long-context language model:",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="Hugging Face checkpoint folder (config.json + safetensors)")
    p.add_argument("--config", help="YAML file mapping onto RuntimeConfig; CLI flags override it")
    p.add_argument("--tp", type=int, help="tensor-parallel size (default 1)")
    p.add_argument("--cp", type=int, help="context-parallel size (default 1)")
    p.add_argument("--session-len", type=int, help="longest prompt + output, in tokens")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"])
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "auto"])
    p.add_argument("--executor", choices=["ray", "inprocess", "auto"])
    p.add_argument("--ray-address", help="existing Ray cluster ('auto'); default starts one")
    p.add_argument("--block-size", type=int, help="tokens per KV block")
    p.add_argument("--num-blocks", type=int, help="KV blocks per worker (default: from memory)")
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model,
        "session_len": args.session_len,
        "device": args.device,
        "dtype": args.dtype,
        "executor": args.executor,
        "ray_address": args.ray_address,
        "parallel.tp": args.tp,
        "parallel.cp": args.cp,
        "cache.block_size": args.block_size,
        "cache.num_blocks": args.num_blocks,
        "scheduler.max_num_seqs": args.max_num_seqs,
        "scheduler.max_num_batched_tokens": args.max_num_batched_tokens,
    }


def build_config(args: argparse.Namespace) -> RuntimeConfig:
    raw = read_yaml(args.config) if args.config else {}
    raw = merge_overrides(raw, overrides_from_args(args))
    if not raw.get("model"):
        raw["model"] = str(demo_checkpoint())
    return RuntimeConfig.from_dict(raw, source=args.config or "command line")


def demo_checkpoint() -> Path:
    """The cached random-weight demo checkpoint, written on first use."""
    from dist_runtime.random_checkpoint import write_random_checkpoint

    cache = Path(os.environ.get("DIST_RUNTIME_CACHE", Path.home() / ".cache" / "dist_runtime"))
    folder = cache / "random-internlm2-tiny"
    if not (folder / "config.json").is_file():
        logger.info("writing the random-weight demo checkpoint to %s", folder)
        write_random_checkpoint(
            folder,
            architecture="internlm2",
            vocab_size=2048,
            hidden_size=256,
            intermediate_size=704,
            num_layers=4,
            num_heads=8,
            num_kv_heads=4,
            max_position_embeddings=8192,
            max_shard_bytes=4 << 20,
            seed=0,
        )
    return folder


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
    try:
        config = build_config(args)
        params = SamplingParams(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
        )
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompts = args.prompt or DEMO_PROMPTS
    with Runtime(config=config) as rt:
        start = time.perf_counter()
        outs = rt.generate(prompts, params, use_tqdm=True)
        elapsed = time.perf_counter() - start
    for prompt, out in zip(prompts, outs):
        print(
            f"### prompt: {prompt}\n{out.text}\n[{len(out.token_ids)} tokens, {out.finish_reason}]"
        )
    total = sum(len(o.token_ids) for o in outs)
    print(
        f"generated {total} tokens for {len(outs)} prompts in {elapsed:.2f} s "
        f"(tp={config.parallel.tp}, cp={config.parallel.cp}, device={config.resolved_device()})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
