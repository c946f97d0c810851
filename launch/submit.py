"""Submit a document-QA job to a running service (`launch/run.py --serve`) from any process.

    python launch/submit.py --doc report.txt -q "Who signed it?" -q "When?" --wait
    python launch/submit.py --job-dir /data/jobs --doc report.txt -q "..."   # same machine
    python launch/submit.py --status JOB_ID          # or --result JOB_ID, --cancel JOB_ID, --list

Through Ray (default): connects with ray.init(address="auto") to the named job-queue actor.
With --job-dir: writes straight into the durable queue's directory (same machine or shared
file system). Either way the job is validated against the service's model and session length
before it is queued, and the job id is printed at once.

Exit status: 0 done; 2 bad input or a failed, cancelled or unknown job (also an
--idempotency-key already used by a different job); 124 (as timeout(1)) when --wait or
--result ran out of --timeout: the job goes on in the service, check it with --status JOB_ID
and collect it with --result JOB_ID.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_runtime.jobs.store import (  # noqa: E402
    IdempotencyKeyConflictError,
    JobFailedError,
    UnknownJobError,
)

EXIT_BAD = 2
"""Bad input, a failed / cancelled / unknown job, an idempotency key of another job."""
EXIT_TIMEOUT = 124
"""--wait / --result ran out of --timeout (the code timeout(1) uses); the job goes on."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--doc", help="UTF-8 text file to ask about")
    p.add_argument("-q", "--question", action="append", help="a question (repeatable)")
    p.add_argument("--replace-invalid-utf8", action="store_true", help="decode with U+FFFD")
    p.add_argument(
        "--max-new-tokens", type=int, default=128, help="most tokens per answer (default 128)"
    )
    p.add_argument(
        "--json-schema",
        metavar="FILE",
        help="answer each question with JSON valid against this JSON Schema (a file, or the "
        "schema as JSON text)",
    )
    p.add_argument(
        "--json", dest="json_object", action="store_true", help="answer each with a JSON object"
    )
    p.add_argument(
        "--grammar",
        metavar="FILE",
        help="answer each question with text this GBNF grammar's root rule produces (a file, "
        "or the grammar itself, `root ::= ...`)",
    )
    p.add_argument(
        "--adapter",
        metavar="NAME",
        help="answer with this LoRA adapter, one the serving runtime loaded (--lora-modules)",
    )
    p.add_argument(
        "--priority",
        type=int,
        default=0,
        help="scheduling priority of the job's requests, lower first: e.g. 1 lets interactive "
        "requests (priority 0) go ahead of a batch of documents (default 0)",
    )
    p.add_argument(
        "--idempotency-key",
        help="resubmitting the same job with the same key returns its id; the key with another "
        f"document, questions or --max-new-tokens is an error (exit {EXIT_BAD})",
    )
    p.add_argument(
        "--owner",
        metavar="KEY_NAME",
        help="submit for this API key name of the HTTP server (`--api-keys NAME=KEY`): the key "
        "then sees the job in /v1/jobs, its idempotency keys are that key's, its tokens count "
        "for it and it shares the engine as that key; with --list, only its jobs "
        "(default: none, a job no key sees)",
    )
    p.add_argument("--wait", action="store_true", help="wait and print the answers")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help=f"seconds to --wait (or --result) at most; past it, exit {EXIT_TIMEOUT} and the "
        "job goes on",
    )
    action = p.add_mutually_exclusive_group()
    action.add_argument("--status", metavar="JOB_ID")
    action.add_argument("--result", metavar="JOB_ID")
    action.add_argument("--cancel", metavar="JOB_ID")
    action.add_argument("--list", action="store_true", help="every job, oldest first")
    p.add_argument("--job-dir", help="the queue's directory (instead of the Ray actor)")
    p.add_argument("--address", default="auto", help="Ray cluster address (default auto)")
    p.add_argument("--service-name", default=None)
    p.add_argument("--namespace", default=None)
    return p.parse_args(argv)


class _RayQueue:
    """The Ray actor behind the same calls as a JobClient."""

    def __init__(self, args: argparse.Namespace):
        import ray

        from dist_runtime.jobs import service

        ray.init(address=args.address, include_dashboard=False, log_to_driver=False)
        self.ray = ray
        self.actor = service.connect(
            args.service_name or service.DEFAULT_NAME, args.namespace or service.DEFAULT_NAMESPACE
        )

    def get(self, ref: Any) -> Any:
        """ray.get, raising the actor's own exception (its message, not Ray's traceback)."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise

    def submit(
        self, document: bytes, questions: list[str], params: dict[str, Any], **kw: Any
    ) -> str:
        return str(
            self.get(
                self.actor.submit.remote(
                    document,
                    questions,
                    params,
                    kw["idempotency_key"],
                    kw["encoding_errors"],
                    kw["owner"],
                )
            )
        )

    def status(self, job_id: str) -> dict[str, Any]:
        return dict(self.get(self.actor.status.remote(job_id)))

    def result(self, job_id: str, timeout: float | None) -> list[str]:
        return list(self.get(self.actor.result.remote(job_id, timeout)))

    def cancel(self, job_id: str) -> str:
        return str(self.get(self.actor.cancel.remote(job_id)))

    def jobs(self, owner: str | None) -> list[dict[str, Any]]:
        return list(self.get(self.actor.jobs.remote(owner)))


class _DirQueue:
    def __init__(self, job_dir: str):
        from dist_runtime.jobs.client import JobClient

        self.client = JobClient(job_dir)

    def submit(
        self, document: bytes, questions: list[str], params: dict[str, Any], **kw: Any
    ) -> str:
        from dist_runtime.sampling_params import SamplingParams

        return self.client.submit(document, questions, SamplingParams(**params), **kw)

    def status(self, job_id: str) -> dict[str, Any]:
        return self.client.status(job_id).to_dict()

    def result(self, job_id: str, timeout: float | None) -> list[str]:
        return self.client.result(job_id, timeout)

    def cancel(self, job_id: str) -> str:
        return self.client.cancel(job_id).value

    def jobs(self, owner: str | None) -> list[dict[str, Any]]:
        return [s.to_dict() for s in self.client.jobs(owner)]


def job_params(args: argparse.Namespace) -> dict[str, Any]:
    """The job's SamplingParams fields (greedy), as a mapping a remote queue takes."""
    from dist_runtime.text.guided import grammar_argument, schema_argument

    params: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "temperature": 0.0}
    if args.json_schema is not None:
        params["json_schema"] = schema_argument(args.json_schema)
    if args.json_object:
        params["json_object"] = True
    if args.grammar is not None:
        params["guided_grammar"] = grammar_argument(args.grammar)
    if args.priority:
        params["priority"] = args.priority
    if args.adapter is not None:
        params["adapter"] = args.adapter
    return params


def check_args(args: argparse.Namespace) -> bytes | None:
    """Everything checkable here, before any queue is touched; the --doc bytes to submit."""
    from dist_runtime.sampling_params import SamplingParams, check_answers

    looking = args.status or args.result or args.cancel or args.list
    if looking and (args.doc or args.question):
        raise ValueError(
            "--doc/-q submit a new job; do not combine them with --status/--result/--cancel/--list"
        )
    if args.timeout is not None:
        if not (args.wait or args.result):
            raise ValueError("--timeout is how long --wait or --result waits; add --wait")
        if not args.timeout >= 0:
            raise ValueError(f"--timeout must be a number of seconds >= 0, got {args.timeout}")
    if args.job_dir and not Path(args.job_dir).is_dir():
        raise ValueError(
            f"--job-dir {args.job_dir!r} is not a directory; give the --job-dir of the running "
            "`launch/run.py --serve`"
        )
    if looking:
        return None
    if not args.doc or not args.question:
        raise ValueError("give --doc FILE and at least one -q/--question")
    for i, question in enumerate(args.question):
        if not question.strip():
            raise ValueError(f"-q/--question {i + 1} is empty ({question!r}); give some text")
    try:
        check_answers(SamplingParams(**job_params(args)))
    except ValueError as e:
        message = str(e).replace("max_new_tokens", "--max-new-tokens", 1)
        message = message.replace("guided_grammar", "--grammar", 1)
        raise ValueError(message.replace("json_schema", "--json-schema", 1)) from e
    try:
        document = Path(args.doc).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read --doc {args.doc!r}: {e.strerror or e}") from e
    if not args.replace_invalid_utf8:
        try:
            document.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"--doc {args.doc!r} is not UTF-8 text (byte 0x{document[e.start]:02x} at "
                f"offset {e.start}); convert it to UTF-8, or pass --replace-invalid-utf8"
            ) from e
    return document


def _queue_flags(args: argparse.Namespace) -> str:
    """The flags that reach the same queue again, for the commands a message suggests."""
    if args.job_dir:
        return f" --job-dir {shlex.quote(args.job_dir)}"
    flags = ""
    if args.address != "auto":
        flags += f" --address {shlex.quote(args.address)}"
    if args.service_name:
        flags += f" --service-name {shlex.quote(args.service_name)}"
    if args.namespace:
        flags += f" --namespace {shlex.quote(args.namespace)}"
    return flags


def _timed_out(args: argparse.Namespace, job_id: str, state: str | None) -> str:
    """What to tell a user whose --timeout ran out: the job is not lost, how to follow it."""
    cmd = f"python launch/submit.py{_queue_flags(args)}"
    now = f" (it is {state})" if state else ""
    return (
        f"error: job {job_id} not finished after --timeout {args.timeout:g} s{now}; it is not "
        "cancelled:\n"
        f"  its state:   {cmd} --status {job_id}\n"
        f"  its answers: {cmd} --result {job_id}   (waits until it is done)\n"
        f"  cancel it:   {cmd} --cancel {job_id}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        document = check_args(args)
        queue: Any = _DirQueue(args.job_dir) if args.job_dir else _RayQueue(args)
        if args.status:
            print(json.dumps(queue.status(args.status)))
            return 0
        if args.cancel:
            print(queue.cancel(args.cancel))
            return 0
        if args.list:
            for job in queue.jobs(args.owner):
                print(json.dumps(job))
            return 0
        job_id = args.result
        if job_id is None:
            assert document is not None  # check_args read it
            job_id = queue.submit(
                document,
                args.question,
                job_params(args),
                idempotency_key=args.idempotency_key,
                encoding_errors="replace" if args.replace_invalid_utf8 else "strict",
                owner=args.owner,
            )
            print(job_id, flush=True)
            if not args.wait:
                return 0
        try:
            answers = queue.result(job_id, args.timeout)
        except TimeoutError:
            try:
                state: str | None = str(queue.status(job_id)["state"])
            except Exception:  # the message matters more than the state in it
                state = None
            print(_timed_out(args, job_id, state), file=sys.stderr)
            return EXIT_TIMEOUT
        for answer in answers:
            print(json.dumps(answer, ensure_ascii=False))
        return 0
    except IdempotencyKeyConflictError as e:
        cmd = f"python launch/submit.py{_queue_flags(args)}"
        print(
            f"error: --idempotency-key {e.key!r} already belongs to job {e.job_id}, whose "
            f"{e.what_differs}; nothing was queued. Give a new key for a new job, or see that "
            f"one with `{cmd} --status {e.job_id}`",
            file=sys.stderr,
        )
        return EXIT_BAD
    except (ValueError, UnknownJobError, JobFailedError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD
    except ConnectionError as e:  # ray.init found no cluster at --address
        print(
            f"error: no Ray cluster at --address {args.address!r} ({e}); start the service "
            "with `launch/run.py --serve` there, or pass --job-dir DIR on its machine",
            file=sys.stderr,
        )
        return EXIT_BAD


if __name__ == "__main__":
    raise SystemExit(main())
