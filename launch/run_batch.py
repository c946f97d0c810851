"""Run a file of OpenAI batch requests and write their answers (OpenAI's batch file format, as
vLLM's `run_batch` takes it).

    python launch/run_batch.py -i requests.jsonl -o results.jsonl          # the demo model
    python launch/run_batch.py -i requests.jsonl -o results.jsonl \\
        --model /models/internlm2_5-7b-chat-1m --tp 4 --session-len 1048576

Each input line is `{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions",
"body": {...}}` (also `/v1/completions` and `/v1/responses`). Each output line is
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}`, in the
order the answers finish; a request the route refuses (a bad field) gets its 4xx and error body
there, as OpenAI's batches report it. The requests go through the HTTP server's own routes in
this process, so an answer equals what `launch/serve.py` would give; they run together (up to
--max-concurrent at once) in one engine, sharing its prefix cache.

A run that stops (Ctrl-C, a crash) resumes: lines whose custom_id already has an answer in the
output file are skipped and the rest appended; answers worth another try (a 5xx, a 429) are
taken out of the file and their requests run again. Bad input (a line that is not such a request,
custom_ids that repeat, a stream request) is an `error:` naming the line, exit 2, before any
model is loaded. Every engine flag of launch/run.py applies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_runtime.formats.demo_model import DemoModelError  # noqa: E402
from dist_runtime.server.batch_lines import (  # noqa: E402
    answer_line,
    call,
    keep_answers,
    parse_lines,
)
from launch.run import (  # noqa: E402
    add_engine_args,
    bad_input,
    build_config,
    setup_logging,
    start_runtime,
    with_model,
)

logger = logging.getLogger("launch.run_batch")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-i", "--input", required=True, help="batch requests, one JSON per line")
    p.add_argument(
        "-o", "--output", required=True, help="answers, one JSON per line (appended on resume)"
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=256,
        help="requests in flight at once (default: %(default)s)",
    )
    add_engine_args(p)
    return p


def read_requests(path: Path, done: set[str]) -> list[dict[str, Any]]:
    """The input's requests not yet answered; a bad line is a ValueError naming it."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # (not at U+2028 in a string)
    except OSError as e:
        raise ValueError(f"--input {str(path)!r} cannot be read: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"--input {str(path)!r} is not UTF-8 text ({e.reason})") from e
    requests, errors = parse_lines(lines, max_errors=1)
    if errors:
        raise ValueError(f"--input {errors[0].message}")
    return [r for r in requests if r["custom_id"] not in done]


def answered(path: Path) -> set[str]:
    """custom_ids with a final answer in an earlier run's output. Answers worth another try (a
    server error, a 429) and a last line the earlier run did not finish writing are removed
    from the file, so their requests run again and each custom_id keeps one line."""
    try:
        return set(keep_answers(path))
    except ValueError as e:
        raise ValueError(
            f"--output {e}; give another --output, or remove the file to start over"
        ) from e


async def run_all(
    app: Any, requests: list[dict[str, Any]], out: Any, max_concurrent: int
) -> tuple[int, int]:
    """Send every request (at most max_concurrent at once), appending each answer as it
    finishes; (answered 2xx, refused)."""
    from tqdm import tqdm

    gate = asyncio.Semaphore(max_concurrent)
    counts = [0, 0]  # answered (2xx), refused
    bar = tqdm(total=len(requests), desc="batch", unit="req", file=sys.stderr, disable=None)

    async def one(item: dict[str, Any]) -> None:
        async with gate:
            status, raw = await call(app, item["url"], json.dumps(item["body"]).encode())
        line = answer_line(item["custom_id"], status, raw)
        out.write(json.dumps(line, ensure_ascii=False) + "\n")
        out.flush()
        counts[0 if status < 300 else 1] += 1
        bar.update()

    try:
        await asyncio.gather(*(one(item) for item in requests))
    finally:
        bar.close()
    return counts[0], counts[1]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    if args.log_level != "DEBUG":  # not a line per request: the progress bar counts them
        logging.getLogger("dist_runtime.server").setLevel(logging.WARNING)
    inp, outp = Path(args.input), Path(args.output)
    try:
        if args.max_concurrent < 1:
            raise ValueError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
        if inp.resolve() == outp.resolve():
            raise ValueError("--output must be another file than --input")
        done = answered(outp)
        requests = read_requests(inp, done)
        config = with_model(build_config(args))
    except (ValueError, DemoModelError) as e:
        return bad_input(e, args)
    if not requests:
        logger.info("every request of %s has its answer in %s", inp, outp)
        return 0
    if done:
        logger.info("resuming: %d answered, %d to go", len(done), len(requests))
    from dist_runtime.server.app import ServerSettings, create_app

    rt = start_runtime(config, args, service=False)
    if isinstance(rt, int):
        return rt
    with rt:
        settings = ServerSettings(
            served_model_name=Path(config.model).name,
            max_concurrent_requests=2**31,  # --max-concurrent bounds the lines in flight
            max_request_bytes=2**62,
        )
        try:
            app = create_app(rt, settings)
        except ValueError as e:
            return bad_input(e, args)
        with outp.open("a", encoding="utf-8") as out:
            ok, refused = asyncio.run(run_all(app, requests, out, args.max_concurrent))
    logger.info("%d answered, %d refused (see their error bodies) -> %s", ok, refused, outp)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
