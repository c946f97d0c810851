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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_runtime import Runtime  # noqa: E402
from dist_runtime.config import ConfigError  # noqa: E402
from dist_runtime.engine.executor.base import WorkerError  # noqa: E402
from dist_runtime.formats.demo_model import DemoModelError  # noqa: E402
from launch.run import add_engine_args, build_config, with_model  # noqa: E402

logger = logging.getLogger("launch.serve")

API_KEYS_ENV = "DIST_RUNTIME_API_KEYS"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=23333)
    p.add_argument(
        "--served-model-name", help="the model's name in the API (default: the folder's name)"
    )
    p.add_argument(
        "--api-keys",
        default=os.environ.get(API_KEYS_ENV),
        help="comma-separated keys required as 'Authorization: Bearer' on /v1/* "
        f"(or ${API_KEYS_ENV})",
    )
    p.add_argument(
        "--allowed-origins", help="comma-separated origins allowed by CORS (default: none)"
    )
    p.add_argument("--max-request-mb", type=float, default=64.0, help="largest request body")
    p.add_argument(
        "--no-ray-service",
        action="store_true",
        help="with --job-dir on Ray: do not register the named job-queue actor",
    )
    p.add_argument("--service-name", default=None, help="name of the Ray job-queue actor")
    p.add_argument("--namespace", default=None, help="Ray namespace of the job-queue actor")
    p.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=256,
        help="generation requests in flight at once; more get 429",
    )
    return p.parse_args(argv)


def check(args: argparse.Namespace) -> None:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if not args.max_request_mb > 0:
        raise ValueError(f"--max-request-mb must be > 0, got {args.max_request_mb}")
    if args.max_concurrent_requests < 1:
        raise ValueError(
            f"--max-concurrent-requests must be >= 1, got {args.max_concurrent_requests}"
        )
    if args.api_keys is not None and not [k for k in args.api_keys.split(",") if k.strip()]:
        raise ValueError("--api-keys is empty; give at least one key or drop the flag")


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
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
    try:
        check(args)
        config = with_model(build_config(args))
    except (ConfigError, ValueError, DemoModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    from dist_runtime.server.app import ServerSettings, create_app

    try:
        rt = Runtime(config=config)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WorkerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    with rt:
        if config.job_dir is not None:
            rt.serve_jobs()
            if not args.no_ray_service:
                register_ray_service(rt.job_dir, args)
        settings = ServerSettings(
            served_model_name=args.served_model_name or Path(config.model).name,
            api_keys=tuple(k.strip() for k in (args.api_keys or "").split(",") if k.strip()),
            allowed_origins=tuple(
                o.strip() for o in (args.allowed_origins or "").split(",") if o.strip()
            ),
            max_request_bytes=int(args.max_request_mb * 2**20),
            max_concurrent_requests=args.max_concurrent_requests,
        )
        app = create_app(rt, settings)
        logger.info("serving %s on http://%s:%d", settings.served_model_name, args.host, args.port)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
