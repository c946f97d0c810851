r"""Needle-in-a-haystack evaluation: where long-context retrieval holds on your model, mesh and
RoPE settings, as a grid of haystack lengths x needle depths.

examples:
    python launch/needle.py --lengths 512,1k --depths 0,50,100 --out runs/demo   # demo model
    python launch/needle.py --model /models/internlm2_5-7b-chat-1m --tp 4 --cp 2 \
        --lengths 32k,128k,512k,1m --depths 0:100:10 --repeats 3 --out runs/1m
    python launch/needle.py --lengths 8k,12k,16k --depths 0:100:25 --rope-scaling-factor 2.5 \
        --out runs/ntk                       # past the demo model's 8,192 positions
    python launch/needle.py --needles 3 --lengths 4k --depths 0:100:20 --out runs/multi
    python launch/needle.py --compare runs/a runs/b      # per-cell score differences (B - A)

Each cell (length, depth, repeat) is a haystack of exactly `length` tokens of generated filler
prose with the needle sentence at `depth` percent, asked about after the document through the
chat template, as a job on the durable queue in OUT/jobs: killed and run again with the same
command, a grid resumes where it stopped (finished cells are not computed again). Cells of one
length share the filler, and run deepest first, so the prefix cache computes each shared
prefix once: the summary reports prefill tokens computed against the naive total.

Writes OUT/results.jsonl (one line per cell and repeat), OUT/summary.json (scores per length,
per cell and overall, with the settings) and OUT/heatmap.png (depth x length, coloured by
score). A score is 100 when the answer holds the needle's key (case, accents and punctuation
ignored); with --needles K each cell holds K needles spread from its depth to the end, one
question each, and scores the share found.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_runtime.config import ConfigError, RuntimeConfig  # noqa: E402
from dist_runtime.formats.demo_model import DemoModelError  # noqa: E402
from dist_runtime.needle import (  # noqa: E402
    GridSettings,
    compare,
    load_needles,
    parse_depths,
    parse_lengths,
    run_grid,
)
from launch.run import (  # noqa: E402
    add_engine_args,
    bad_input,
    build_config,
    setup_logging,
    start_runtime,
    with_model,
)

logger = logging.getLogger("launch.needle")

PROMPT_OVERHEAD = 256
"""Tokens the chat template, the instruction and the question add around a haystack (a bound)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = p.add_argument_group("grid")
    g.add_argument(
        "--lengths",
        help="haystack lengths in tokens, e.g. 1k,4k,16k or 1024,4096 (default: 1k,2k,4k)",
        default="1k,2k,4k",
    )
    g.add_argument(
        "--depths",
        default="0:100:25",
        help="needle depths in percent: start:stop:step (stop included) or a list like 0,50,100 "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="cells per (length, depth), each with another needle (default: %(default)s)",
    )
    g.add_argument(
        "--needles",
        type=int,
        default=1,
        help="needles per haystack: 1 is single-needle retrieval, K > 1 multi-needle (K facts "
        "spread from the cell's depth to the end, score = share found) (default: %(default)s)",
    )
    g.add_argument(
        "--needle-file",
        help='JSONL of custom needles: {"needle": sentence, "question": ..., "answer": key} per '
        "line (default: the built-in facts with random keys)",
    )
    g.add_argument("--seed", type=int, default=0, help="filler and needle seed (default: 0)")
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=48,
        help="most tokens per answer, greedy (default: %(default)s)",
    )
    g.add_argument("--out", help="output directory (default: none; required unless --compare)")
    g.add_argument(
        "--compare",
        nargs=2,
        metavar=("DIR_A", "DIR_B"),
        help="print the per-cell score differences of two finished runs and exit (default: off)",
    )
    add_engine_args(p)
    return p


def check(args: argparse.Namespace) -> tuple[list[int], list[float]]:
    lengths = parse_lengths(args.lengths)
    depths = parse_depths(args.depths)
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.needles < 1:
        raise ValueError(f"--needles must be >= 1, got {args.needles}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.out:
        raise ValueError("--out DIR is required: the grid's results, summary and heatmap go there")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out!r} is a file; give a directory")
    return lengths, depths


def check_lengths_fit(config: RuntimeConfig, longest: int, max_new_tokens: int) -> None:
    """Refuse --lengths whose session (derived from them, not typed) passes the model's RoPE,
    naming --lengths rather than the --session-len the user never gave."""
    model = config.load_model_config()
    try:
        config.check_session_len(model)
    except ConfigError as e:
        limit = model.max_rope_len()
        if e.key != "session_len" or limit is None:
            raise
        fits = limit - PROMPT_OVERHEAD - max_new_tokens
        raise ConfigError(
            f"--lengths {longest:,} needs a session of {config.session_len:,} tokens (the haystack "
            f"+ {PROMPT_OVERHEAD} for the prompt + --max-new-tokens {max_new_tokens}), over the "
            f"{limit:,} this model's RoPE supports; keep --lengths at most {max(fits, 0):,}, or "
            "run past it with --rope-scaling-factor (dynamic NTK) or --allow-rope-extrapolation"
        ) from e


def run_compare(a: str, b: str) -> int:
    summaries = []
    for d in (a, b):
        path = Path(d) / "summary.json"
        try:
            summaries.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as e:
            print(f"error: cannot read {path}: {e}", file=sys.stderr)
            return 2
    print(f"A = {a}\nB = {b}")
    for line in compare(summaries[0], summaries[1]):
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.compare:
        return run_compare(*args.compare)
    setup_logging(args.log_level)
    if args.log_level != "DEBUG":  # a line per cell's job would bury the progress line
        logging.getLogger("dist_runtime.jobs").setLevel(logging.WARNING)
    try:
        lengths, depths = check(args)
        custom = load_needles(args.needle_file) if args.needle_file else None
        derived = args.session_len is None
        if derived:  # room for the longest haystack and its question
            args.session_len = max(lengths) + PROMPT_OVERHEAD + args.max_new_tokens
        config = with_model(build_config(args))
        if derived:
            check_lengths_fit(config, max(lengths), args.max_new_tokens)
    except (ValueError, OSError, DemoModelError) as e:
        return bad_input(e, args)
    out = Path(args.out)
    config = dataclasses.replace(config, job_dir=str(out / "jobs"))
    rt = start_runtime(config, args, service=False)
    if isinstance(rt, int):
        return rt
    model = rt.model_config
    if config.rope_scaling_factor is not None:
        rope = f"dynamic NTK x{config.rope_scaling_factor:g} (--rope-scaling-factor)"
    elif model.rope_scaling is not None:
        rope = f"{model.rope_scaling.type} x{model.rope_scaling.factor:g} (checkpoint)"
    else:
        rope = f"base {model.rope_theta:g}, {model.max_position_embeddings:,} positions"
    settings = GridSettings(
        model=config.model,
        lengths=lengths,
        depths=depths,
        repeats=args.repeats,
        num_needles=args.needles,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        needle_file=args.needle_file,
        tp=config.parallel.tp,
        cp=config.parallel.cp,
        rope=rope,
        quant_policy=config.cache.quant_policy,
    )
    try:
        with rt:
            summary = run_grid(rt, settings, out, custom)
    except ValueError as e:  # e.g. the output directory holds another grid
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume", file=sys.stderr)
        return 130
    for length, score in summary["per_length"].items():
        print(f"{int(length):>9,} tokens: {score:5.1f}")
    print(
        f"overall {summary['overall']:.1f} over {summary['num_cells']} cells; prefill "
        f"{summary['prefill_tokens_computed']:,} tokens computed of "
        f"{summary['prefill_tokens_naive']:,} naive; {out / 'heatmap.png'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
