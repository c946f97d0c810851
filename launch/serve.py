"""Serve a model over HTTP: an OpenAI-compatible API, document-QA jobs, metrics and a chat page.

    python launch/serve.py                                   # the demo model on 127.0.0.1:23333
    python launch/serve.py --model /models/internlm2_5-7b-chat --tp 4 --session-len 32768 \\
        --api-keys "$KEY" --job-dir /data/jobs
    curl http://127.0.0.1:23333/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32}'

One process hosts the engine, the HTTP server and (with --job-dir) the durable job queue, so HTTP
requests, queued jobs and its Ray service share one engine and its prefix cache. Every engine
flag of launch/run.py applies. The server binds 127.0.0.1 unless --host names an interface.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_runtime.formats.demo_model import DemoModelError  # noqa: E402
from dist_runtime.server.reasoning import REASONING_PARSERS  # noqa: E402
from dist_runtime.server.tools import TOOL_CALL_FORMATS  # noqa: E402
from launch.run import (  # noqa: E402
    add_engine_args,
    add_ray_service_args,
    bad_input,
    build_config,
    setup_logging,
    start_runtime,
    with_model,
)

logger = logging.getLogger("launch.serve")

API_KEYS_ENV = "DIST_RUNTIME_API_KEYS"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_engine_args(p)
    g = p.add_argument_group("HTTP server")
    g.add_argument("--host", default="127.0.0.1", help="interface to bind (default: %(default)s)")
    g.add_argument("--port", type=int, default=23333, help="port (default: %(default)s)")
    g.add_argument(
        "--served-model-name", help="the model's name in the API (default: the folder's name)"
    )
    g.add_argument(
        "--api-keys",
        default=os.environ.get(API_KEYS_ENV),
        help="comma-separated keys required as 'Authorization: Bearer' on /v1/*, each KEY or "
        "NAME=KEY (the name labels its usage in /metrics and the access log; default key1, "
        f"key2, ...) (default: ${API_KEYS_ENV}, else none: no key needed)",
    )
    g.add_argument(
        "--allowed-origins", help="comma-separated origins allowed by CORS (default: none)"
    )
    g.add_argument(
        "--max-request-mb",
        type=float,
        default=64.0,
        help="largest request body, in MiB (default: %(default)s)",
    )
    g.add_argument(
        "--tool-call-format",
        choices=TOOL_CALL_FORMATS,
        default="auto",
        help="how tools and their calls are written for the model: internlm2 (its "
        "<|action_start|><|plugin|> calls), template (the chat template writes the tools; "
        "calls in <tool_call> tags or as JSON), json (a JSON object as the whole answer, any "
        "model); auto: internlm2 when the tokenizer has those tokens, else template when the "
        "chat template takes tools, else json (default: %(default)s)",
    )
    g.add_argument(
        "--reasoning-parser",
        choices=REASONING_PARSERS,
        help="a reasoning model's thinking (<think> ... </think>: DeepSeek-R1 and its distills, "
        "Qwen3) returned apart from its answer, as reasoning_content on the chat route and a "
        "reasoning item on the Responses route (default: none, thinking stays in the content)",
    )
    g.add_argument(
        "--enable-lora-loading",
        action="store_true",
        help="serve /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's), which load "
        "LoRA folders from this machine's disk into the --max-loras slots; keep --api-keys set "
        "(default: off)",
    )
    g.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="render a chat request's own chat_template (vLLM's field): it runs in jinja2's "
        "sandbox, but its loops can keep a CPU busy, so trust your callers (default: off, a 400)",
    )
    g.add_argument(
        "--enable-cache-reset",
        action="store_true",
        help="serve POST /reset_prefix_cache (vLLM's), which makes the runtime forget its prefix "
        "cache, the disk tier's files included (?host=false / ?disk=false keep a tier); keep "
        "--api-keys set (default: off)",
    )
    g.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=256,
        help="generation requests in flight at once; more get 429 (default: %(default)s)",
    )
    g.add_argument(
        "--max-concurrent-requests-per-key",
        type=int,
        help="of those, one API key's at most, so one caller cannot take every place "
        "(default: no limit of its own)",
    )
    g = p.add_argument_group("batches (/v1/files and /v1/batches, kept in --job-dir)")
    g.add_argument(
        "--max-file-mb",
        type=float,
        default=200.0,
        help="largest upload to /v1/files, in MiB (default: %(default)s)",
    )
    g.add_argument(
        "--max-files-gb-per-key",
        type=float,
        default=100.0,
        help="most GiB of files (uploads, batch outputs) one API key may hold; an upload past "
        "it is a 413; 0: no limit (default: %(default)s)",
    )
    g.add_argument(
        "--batch-priority",
        type=int,
        default=1,
        help="added to each batch request's priority (lower runs first): 1 lets interactive "
        "requests (priority 0) go ahead of batches (default: %(default)s)",
    )
    g.add_argument(
        "--key-weights",
        help="each named API key's share of the engine under the fair share, NAME=W,...: a "
        "key of weight 2 gets twice the turns of one of weight 1 among requests of one "
        "priority (default: 1 each)",
    )
    g.add_argument(
        "--min-priority",
        type=int,
        help="the most important priority a request (or job, or batch line) may ask for; "
        "lower values are a 400 naming priority. On a server many share, 0 keeps any caller "
        "from going ahead of everyone's interactive requests (default: any)",
    )
    g.add_argument(
        "--max-batch-requests",
        type=int,
        help="batch requests in flight at once, all batches together (default: half of "
        "--max-concurrent-requests)",
    )
    g = p.add_argument_group("jobs")
    g.add_argument(
        "--job-dir",
        help="durable job queue directory (SQLite) served at /v1/jobs (default: no job queue)",
    )
    g.add_argument(
        "--job-priority",
        type=int,
        default=0,
        help="added to every queued job's priority (lower runs first): 1 lets HTTP requests "
        "(priority 0 unless they say otherwise) go ahead of the queue's documents "
        "(default: %(default)s)",
    )
    add_ray_service_args(g, "--job-dir on Ray")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


_KEY_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")


def parse_api_keys(text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(keys, names) of `--api-keys`: comma-separated `KEY` or `NAME=KEY` entries (a NAME is a
    letter then up to 63 letters, digits, `_.-`; an entry whose part before `=` is not one is a
    plain key). Plain keys are named key1, key2, ... by position."""
    keys: list[str] = []
    names: list[str] = []
    for i, entry in enumerate(e.strip() for e in text.split(",") if e.strip()):
        name, eq, key = entry.partition("=")
        if not (eq and key and _KEY_NAME.match(name)):
            name, key = f"key{i + 1}", entry
        if name in names:
            raise ValueError(f"--api-keys names {name!r} twice; give each key its own name")
        if key in keys:
            raise ValueError(f"--api-keys lists the key named {name!r} twice")
        keys.append(key)
        names.append(name)
    return tuple(keys), tuple(names)


def parse_key_weights(text: str) -> dict[str, float]:
    """`--key-weights`: comma-separated NAME=W entries, W a number > 0."""
    weights: dict[str, float] = {}
    for entry in (e.strip() for e in text.split(",") if e.strip()):
        name, eq, value = entry.partition("=")
        try:
            weight = float(value) if eq else float("nan")
        except ValueError:
            weight = float("nan")
        if not (weight > 0 and weight != float("inf")):
            raise ValueError(
                f"--key-weights entry {entry!r} is not NAME=W with W a number > 0 (e.g. alice=2)"
            )
        weights[name.strip()] = weight
    return weights


def check(args: argparse.Namespace) -> None:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if not args.max_request_mb > 0:
        raise ValueError(f"--max-request-mb must be > 0, got {args.max_request_mb}")
    if args.max_concurrent_requests < 1:
        raise ValueError(
            f"--max-concurrent-requests must be >= 1, got {args.max_concurrent_requests}"
        )
    per_key = args.max_concurrent_requests_per_key
    if per_key is not None and not 1 <= per_key <= args.max_concurrent_requests:
        raise ValueError(
            f"--max-concurrent-requests-per-key must be in 1..{args.max_concurrent_requests} "
            f"(--max-concurrent-requests), got {per_key}"
        )
    if not args.max_file_mb > 0:
        raise ValueError(f"--max-file-mb must be > 0, got {args.max_file_mb}")
    if not args.max_files_gb_per_key >= 0:
        raise ValueError(
            f"--max-files-gb-per-key must be >= 0 (0: no limit), got {args.max_files_gb_per_key}"
        )
    if args.max_batch_requests is not None and not (
        1 <= args.max_batch_requests <= args.max_concurrent_requests
    ):
        raise ValueError(
            f"--max-batch-requests must be in 1..{args.max_concurrent_requests} "
            f"(--max-concurrent-requests), got {args.max_batch_requests}"
        )
    if args.api_keys is not None and not [k for k in args.api_keys.split(",") if k.strip()]:
        raise ValueError("--api-keys is empty; give at least one key or drop the flag")
    parse_api_keys(args.api_keys or "")


def register_ray_service(job_dir: str, args: argparse.Namespace) -> None:
    """The job directory's named Ray actor (see launch/run.py --serve), when this process runs
    on Ray (tp * cp > 1 or --ray-address): processes anywhere on the cluster submit to it."""
    if "ray" not in sys.modules:
        return
    import ray

    from dist_runtime.jobs import service

    if not ray.is_initialized():
        return
    name = args.service_name or service.DEFAULT_NAME
    namespace = args.namespace or service.DEFAULT_NAMESPACE
    service.start(job_dir, name, namespace)
    logger.info("job queue actor %r in namespace %r", name, namespace)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level, timestamps=True)
    try:
        check(args)
        config = with_model(build_config(args))
        if args.enable_lora_loading and config.max_loras is None:
            raise ValueError(
                "--enable-lora-loading loads adapters into reserved slots; add --max-loras N"
            )
        if args.job_priority and config.job_dir is None:
            raise ValueError(
                "--job-priority applies to the queued jobs of --job-dir; add --job-dir or "
                "drop --job-priority"
            )
    except (ValueError, DemoModelError) as e:
        return bad_input(e, args)
    import uvicorn

    from dist_runtime.server.app import ServerSettings, create_app

    rt = start_runtime(config, args, service=True)
    if isinstance(rt, int):
        return rt
    with rt:
        if config.job_dir is not None:
            rt.serve_jobs(priority_offset=args.job_priority)
            if not args.no_ray_service:
                register_ray_service(rt.job_dir, args)
        keys, key_names = parse_api_keys(args.api_keys or "")
        settings = ServerSettings(
            served_model_name=args.served_model_name or Path(config.model).name,
            api_keys=keys,
            api_key_names=key_names,
            allowed_origins=tuple(
                o.strip() for o in (args.allowed_origins or "").split(",") if o.strip()
            ),
            max_request_bytes=int(args.max_request_mb * 2**20),
            max_concurrent_requests=args.max_concurrent_requests,
            max_concurrent_requests_per_key=args.max_concurrent_requests_per_key,
            max_file_bytes=int(args.max_file_mb * 2**20),
            max_files_bytes_per_key=int(args.max_files_gb_per_key * 2**30) or None,
            batch_priority=args.batch_priority,
            min_priority=args.min_priority,
            key_weights=parse_key_weights(args.key_weights or ""),
            batch_max_in_flight=args.max_batch_requests,
            tool_call_format=args.tool_call_format,
            reasoning_parser=args.reasoning_parser,
            enable_lora_loading=args.enable_lora_loading,
            enable_cache_reset=args.enable_cache_reset,
            trust_request_chat_template=args.trust_request_chat_template,
        )
        try:
            app = create_app(rt, settings)
        except ValueError as e:
            return bad_input(e, args)
        logger.info("serving %s on http://%s:%d", settings.served_model_name, args.host, args.port)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
