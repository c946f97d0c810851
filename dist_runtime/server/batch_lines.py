"""OpenAI's batch file format, shared by `launch/run_batch.py` and the `/v1/batches` routes.

An input line is `{"custom_id", "method": "POST", "url", "body"}`; an answer line is
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`. Each
request goes through the server's own routes in process (`call`), as an HTTP client that
stays connected would send it, so an answer equals what the HTTP server gives.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
"""The routes a batch line may name."""
RETRIED = frozenset({429, 500, 502, 503, 504})
"""Statuses a resumed batch tries again (the others are the request's answer)."""


@dataclass(frozen=True)
class LineError:
    """Why an input line is not a batch request (OpenAI's batch `errors.data` entry)."""

    line: int
    code: str
    message: str
    param: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "line": self.line, "message": self.message, "param": self.param}


def parse_lines(
    lines: Iterable[str], urls: Sequence[str] = URLS, max_errors: int = 100
) -> tuple[list[dict[str, Any]], list[LineError]]:
    """The requests of a batch file's lines (each with its 1-based `line`), and what is wrong
    with the others: at most `max_errors` of them. Blank lines are skipped."""
    requests: list[dict[str, Any]] = []
    errors: list[LineError] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        if len(errors) >= max_errors:
            break
        if not line.strip():
            continue
        error = _check_line(number, line, urls, seen)
        if isinstance(error, LineError):
            errors.append(error)
        else:
            requests.append(error)
    return requests, errors


def _check_line(
    number: int, line: str, urls: Sequence[str], seen: dict[str, int]
) -> dict[str, Any] | LineError:
    where = f"line {number}"
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        return LineError(number, "invalid_json_line", f"{where} is not JSON: {e.msg}")
    if not isinstance(item, dict):
        return LineError(
            number,
            "invalid_request",
            f"{where} must be a JSON object with custom_id, method, url, body",
        )
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return LineError(
            number,
            "missing_required_parameter",
            f"{where}: custom_id must be a non-empty string",
            "custom_id",
        )
    if custom_id in seen:
        return LineError(
            number,
            "duplicate_custom_id",
            f"{where}: custom_id {custom_id!r} repeats line {seen[custom_id]}; give each "
            "request its own",
            "custom_id",
        )
    seen[custom_id] = number
    if item.get("method", "POST") != "POST":
        return LineError(
            number,
            "invalid_method",
            f"{where}: method must be POST, got {item.get('method')!r}",
            "method",
        )
    if item.get("url") not in urls:
        code = "mismatched_endpoint" if item.get("url") in URLS else "invalid_url"
        return LineError(
            number, code, f"{where}: url {item.get('url')!r} is not one of {list(urls)}", "url"
        )
    body = item.get("body")
    if not isinstance(body, dict):
        return LineError(
            number, "invalid_request", f"{where}: body must be a JSON object (the request)", "body"
        )
    if body.get("stream"):
        return LineError(
            number,
            "invalid_request",
            f"{where}: a batch request cannot stream; drop stream: true",
            "body.stream",
        )
    return {**item, "line": number}


def read_answers(path: Path, retried: frozenset[int] = RETRIED) -> dict[str, dict[str, Any]]:
    """The answers of an answer file, by custom_id (a last line cut short is not one).
    Answers worth another try (a status in `retried`) are left out. A line that is not an
    answer is a ValueError naming it."""
    return _read(path, retried)[0]


def _read(path: Path, retried: frozenset[int]) -> tuple[dict[str, dict[str, Any]], list[str], bool]:
    """(answers, the lines holding them, whether those are the whole file)."""
    if not path.exists():
        return {}, [], True
    raw = path.read_bytes()
    # split at newlines only: splitlines() would also cut at U+2028 inside a JSON string
    lines = raw[: raw.rfind(b"\n") + 1].decode("utf-8", errors="replace").split("\n")[:-1]
    answers: dict[str, dict[str, Any]] = {}
    kept: list[str] = []
    for number, line in enumerate(lines, 1):
        try:
            answer = json.loads(line)
            custom_id = answer["custom_id"]
            status = answer["response"]["status_code"] if answer["response"] else None
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"line {number} is not an answer of a batch ({e})") from e
        if status in retried:
            continue
        answers[custom_id] = answer
        kept.append(line)
    torn = bool(raw) and not raw.endswith(b"\n")
    return answers, kept, not torn and len(kept) == len(lines)


def keep_answers(path: Path) -> dict[str, dict[str, Any]]:
    """`read_answers`, with the file rewritten to the kept lines when some were dropped (a
    request to retry, a line cut short), so each custom_id keeps one line."""
    answers, kept, whole = _read(path, RETRIED)
    if not whole:
        scratch = path.with_name(path.name + ".partial")
        scratch.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        scratch.replace(path)
    return answers


def answer_line(custom_id: str, status: int, raw: bytes) -> dict[str, Any]:
    """The answer line of a request the route answered with `status` and body `raw`."""
    try:
        body = json.loads(raw)
    except json.JSONDecodeError:
        body = {"error": {"message": raw.decode(errors="replace"), "type": "server_error"}}
    if not isinstance(body, dict):
        body = {"value": body}
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {
            "status_code": status,
            "request_id": body.get("id") or f"req_{uuid.uuid4().hex}",
            "body": body,
        },
        "error": None,
    }


def unrun_line(custom_id: str, code: str, message: str) -> dict[str, Any]:
    """The answer line of a request the batch never ran (it expired or was cancelled)."""
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }


async def call(
    app: Any,
    path: str,
    body: bytes,
    headers: Sequence[tuple[bytes, bytes]] = (),
    leave: asyncio.Event | None = None,
    method: str = "POST",
) -> tuple[int, bytes]:
    """One request (a POST unless `method` says otherwise) through the ASGI app, as an HTTP
    client that stays connected would send it (until `leave` is set: then it disconnects, and
    the route aborts the request)."""
    path, _, query = path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [
            (b"host", b"batch"),
            *(
                []
                if any(k == b"content-type" for k, _ in headers)
                else [(b"content-type", b"application/json")]
            ),
            (b"content-length", str(len(body)).encode()),
            *headers,
        ],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
    }
    delivered = False
    answered = asyncio.Event()
    status, chunks = 500, []

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        # the routes abort a request whose client leaves: stay until answered (or told to go)
        waits = [asyncio.ensure_future(answered.wait())]
        if leave is not None:
            waits.append(asyncio.ensure_future(leave.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                answered.set()

    try:
        await app(scope, receive, send)
    except Exception as e:  # Starlette re-raises after sending its 500
        logger.error("a batch request failed: %s: %s", type(e).__name__, e)
        if not chunks:
            status = 500
            chunks = [json.dumps({"error": {"message": "internal server error",
                                            "type": "server_error"}}).encode()]  # fmt: skip
    return status, b"".join(chunks)
