"""OpenAI's Files and Batch APIs: upload a file of requests, run it in the background, download
the answers.

    f = client.files.create(file=open("requests.jsonl", "rb"), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    client.batches.retrieve(b.id).status         # in_progress ... completed
    client.files.content(b.output_file_id).text  # the answers, one JSON line each

Routes: `/v1/files` (upload, list, get, `/content`, delete) and `/v1/batches` (create, list,
get, `/cancel`). An upload is a batch's requests (`purpose` `batch`) or a document (`user_data`)
that messages name in a `file` part (chat), an `input_file` part (Responses), a `document`
block (Messages) or `document_file_id` (jobs): `Batches.file_text` reads it there.

A batch's lines are `launch/run_batch.py`'s (`batch_lines`): each runs through the server's own
route in process, so its answer equals what a client calling that route gets; the batch's
requests share the engine with everyone else's at `batch_priority` (1 by default: interactive
requests, at 0, go first; lower runs first; a request waiting `priority_aging_s` moves a level
ahead). At most `max_in_flight` of all
batches' requests are in flight at once, leaving room under `--max-concurrent-requests` for
interactive callers. A request refused with 429 or 503 is tried again later, not answered.

Durable: uploads, the batches' records and their answers so far live under the job directory
(`--job-dir`, else a temporary one), in `batches/`. Each answer is appended to the batch's
answer log as it ends; a server that stops (or dies) mid-batch leaves the batch `in_progress`,
and the next server on that directory runs the requests not yet answered. At the end the log is
sorted into the output file (answers with a 2xx, in input order) and the error file (the others,
and with `expired` / `cancelled` a `batch_expired` / `batch_cancelled` line for each request not
run), both synced to disk before the batch says `completed`.

A batch is checked when it is created: a line that is not a request for its endpoint makes it
`failed` at once, with every bad line (up to 100) in `errors`. `completion_window` is OpenAI's
"24h" or any other `<n>s|m|h|d`; past it the batch ends `expired`. Batch files are deleted
30 days after they were made (OpenAI's default) or as `expires_after` / `output_expires_after`
say; documents are kept until deleted.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dist_runtime.server.batch_lines import (
    URLS,
    LineError,
    answer_line,
    call,
    keep_answers,
    parse_lines,
    read_answers,
    unrun_line,
)
from dist_runtime.server.calls import CALLER, APIError, list_page
from dist_runtime.server.schemas import FileRef

if TYPE_CHECKING:
    from dist_runtime.server.app import _Server

logger = logging.getLogger("dist_runtime.server.batches")

DB_NAME = "batches.sqlite3"
PURPOSES = ("batch", "user_data", "assistants")
"""Purposes an upload may have: a batch's requests, or a document messages refer to."""
FINAL = ("completed", "failed", "expired", "cancelled")
FILE_RETENTION_S = 30 * 86400
"""How long batch files (their requests, answers and errors) are kept unless told otherwise
(OpenAI's default); documents (`user_data`) are kept until deleted."""
EXPIRY_RANGE = (3600, 30 * 86400)
"""The `expires_after` seconds OpenAI takes (an hour to 30 days)."""
_WINDOW = re.compile(r"^([1-9][0-9]{0,6})([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
RETRY_SECONDS = (0.2, 5.0)
"""First and longest wait before trying again a request refused with 429 / 503."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    body TEXT NOT NULL,
    owner TEXT
);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    body TEXT NOT NULL,
    owner TEXT,
    output_expires_after INTEGER
);
CREATE INDEX IF NOT EXISTS batches_by_status ON batches (status, seq);
"""


def window_seconds(window: str) -> int:
    """Seconds of a completion window (`24h`, `30m`, `2d`, `90s`); a ValueError otherwise."""
    match = _WINDOW.match(window)
    if match is None:
        raise ValueError(
            f"completion_window {window!r} is not a duration like '24h' (a whole number of "
            "s, m, h or d)"
        )
    return int(match.group(1)) * _UNITS[match.group(2)]


class BatchStore:
    """Files and batches of one directory: SQLite records (each object's JSON) and the files'
    bytes in `files/`. One server process writes it."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.files_dir = self.root / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.root / DB_NAME, check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # see _tx
        self._db.executescript(_SCHEMA)
        self._purged = 0.0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _tx(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction; `durable`: synced to disk at its commit (what a client was told
        exists, or a batch's end), else only safe from the process dying (counters)."""
        with self._lock:
            if durable:
                self._db.execute("PRAGMA synchronous=FULL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if durable:
                    self._db.execute("PRAGMA synchronous=NORMAL")

    # -- files ------------------------------------------------------------------------------
    def path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def add_file(
        self,
        file_id: str,
        filename: str,
        purpose: str,
        size: int,
        expires_after: int | None = None,
        owner: str | None = None,
    ) -> dict[str, Any]:
        """Record a file whose bytes are at `path(file_id)` already; it is deleted
        `expires_after` seconds after now (None: kept until deleted). `owner`: the name of
        the API key that uploaded it (only that key sees it)."""
        body = _file_body(file_id, filename, purpose, size, expires_after)
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO files (id, body, owner) VALUES (?, ?, ?)",
                (file_id, json.dumps(body), owner),
            )
        return body

    def file(self, file_id: str, caller: str | None = None) -> dict[str, Any] | None:
        """A file's record; None for none, or for one another key owns (`caller`: the asking
        key's name, None on a server without keys)."""
        with self._lock:
            row = self._db.execute(
                "SELECT body, owner FROM files WHERE id = ?", (file_id,)
            ).fetchone()
        if row is None or not _visible(row[1], caller):
            return None
        return dict(json.loads(row[0]))

    def files(self, purpose: str | None = None, caller: str | None = None) -> list[dict[str, Any]]:
        """Every file `caller` may see, oldest first (of one purpose when given)."""
        with self._lock:
            rows = self._db.execute("SELECT body, owner FROM files ORDER BY seq").fetchall()
        found = [json.loads(r[0]) for r in rows if _visible(r[1], caller)]
        return [f for f in found if purpose is None or f["purpose"] == purpose]

    def delete_file(self, file_id: str) -> bool:
        with self._tx() as db:
            gone = db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount > 0
        with contextlib.suppress(FileNotFoundError):
            self.path(file_id).unlink()
        return gone

    # -- batches ----------------------------------------------------------------------------
    def log_path(self, batch_id: str) -> Path:
        """The batch's answer log: answers appended as they end (`batch_lines` format)."""
        return self.root / f"{batch_id}.answers.jsonl"

    def add_batch(
        self,
        body: dict[str, Any],
        owner: str | None = None,
        output_expires_after: int | None = FILE_RETENTION_S,
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO batches (id, status, body, owner, output_expires_after) "
                "VALUES (?, ?, ?, ?, ?)",
                (body["id"], body["status"], json.dumps(body), owner, output_expires_after),
            )

    def output_expiry(self, batch_id: str) -> int | None:
        """Seconds the batch's output and error files are kept (None: until deleted)."""
        with self._lock:
            row = self._db.execute(
                "SELECT output_expires_after FROM batches WHERE id = ?", (batch_id,)
            ).fetchone()
        return None if row is None else row[0]

    def purge_expired(self, every: float = 60.0) -> int:
        """Delete the files past their `expires_at` (not the input of a batch still running),
        at most once per `every` seconds; how many went."""
        now = time.time()
        if now - self._purged < every:
            return 0
        self._purged = now
        in_use = self.inputs_in_use()
        gone = [
            f["id"]
            for f in self.files()
            if f.get("expires_at") is not None and f["expires_at"] <= now and f["id"] not in in_use
        ]
        for file_id in gone:
            self.delete_file(file_id)
        if gone:
            logger.info("deleted %d expired file(s)", len(gone))
        return len(gone)

    def owner(self, batch_id: str) -> str | None:
        """The name of the API key that created the batch (its requests are accounted to it)."""
        with self._lock:
            row = self._db.execute("SELECT owner FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return None if row is None else row[0]

    def create_batch(
        self,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: dict[str, str] | None = None,
        owner: str | None = None,
        output_expires_after: int | None = FILE_RETENTION_S,
    ) -> dict[str, Any]:
        """A new batch of the requests in an uploaded file: `in_progress`, or `failed` with
        its bad lines in `errors`. Reads the whole file (call it off the event loop)."""
        now = int(time.time())
        body: dict[str, Any] = {
            "id": f"batch_{uuid.uuid4().hex}",
            "object": "batch",
            "endpoint": endpoint,
            "model": None,
            "errors": None,
            "input_file_id": input_file_id,
            "completion_window": completion_window,
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + window_seconds(completion_window),
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": metadata,
            "usage": None,
        }
        requests, errors = read_requests(self.path(input_file_id), endpoint)
        if errors:
            body["errors"] = {"object": "list", "data": [e.to_dict() for e in errors]}
            _mark(body, "failed")
        else:
            models = {r["body"].get("model") for r in requests}
            body["model"] = models.pop() if len(models) == 1 else None
            body["request_counts"]["total"] = len(requests)
            _mark(body, "in_progress")
        self.add_batch(body, owner, output_expires_after)
        return body

    def batch(self, batch_id: str, caller: str | None = None) -> dict[str, Any] | None:
        """A batch's record; None for none, or for one another key created."""
        with self._lock:
            row = self._db.execute(
                "SELECT body, owner FROM batches WHERE id = ?", (batch_id,)
            ).fetchone()
        if row is None or not _visible(row[1], caller):
            return None
        return dict(json.loads(row[0]))

    def batches(self, caller: str | None = None) -> list[dict[str, Any]]:
        """Every batch `caller` may see, newest first."""
        with self._lock:
            rows = self._db.execute("SELECT body, owner FROM batches ORDER BY seq DESC").fetchall()
        return [json.loads(r[0]) for r in rows if _visible(r[1], caller)]

    def unfinished(self) -> list[dict[str, Any]]:
        """Batches not yet in a final status, oldest first."""
        marks = ",".join("?" * len(FINAL))
        with self._lock:
            rows = self._db.execute(
                f"SELECT body FROM batches WHERE status NOT IN ({marks}) ORDER BY seq", FINAL
            ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def update(
        self,
        batch_id: str,
        change: Callable[[dict[str, Any]], None],
        files: Sequence[dict[str, Any]] = (),
        durable: bool = True,
    ) -> dict[str, Any]:
        """Apply `change` to the batch's record (and record `files`) in one transaction."""
        with self._tx(durable) as db:
            row = db.execute("SELECT body FROM batches WHERE id = ?", (batch_id,)).fetchone()
            body = json.loads(row[0])
            change(body)
            db.execute(
                "UPDATE batches SET status = ?, body = ? WHERE id = ?",
                (body["status"], json.dumps(body), batch_id),
            )
            (owner,) = db.execute("SELECT owner FROM batches WHERE id = ?", (batch_id,)).fetchone()
            for f in files:  # a batch's output and error files are its creator's
                db.execute(
                    "INSERT OR REPLACE INTO files (id, body, owner) VALUES (?, ?, ?)",
                    (f["id"], json.dumps(f), owner),
                )
        return dict(body)

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM batches GROUP BY status")
            return {status: n for status, n in rows.fetchall()}

    def inputs_in_use(self) -> set[str]:
        """Input files of batches not yet final."""
        return {b["input_file_id"] for b in self.unfinished()}


def _visible(owner: str | None, caller: str | None) -> bool:
    """Whether a file or batch made by key `owner` is the business of key `caller`: on a
    server without keys (caller None) everything is; with keys, only what that key made."""
    return caller is None or owner == caller


def read_requests(path: Path, endpoint: str) -> tuple[list[dict[str, Any]], list[LineError]]:
    """The requests of a batch's input file, and its bad lines."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        return [], [LineError(0, "invalid_file", f"the file is not UTF-8 text ({e.reason})")]
    requests, errors = parse_lines(text.split("\n"), urls=(endpoint,))  # (not at U+2028)
    if not requests and not errors:
        errors = [LineError(0, "empty_file", "the file holds no requests")]
    return requests, errors


def batch_usage(answers: list[dict[str, Any]]) -> dict[str, Any]:
    """OpenAI's batch `usage`: the answers' tokens added up (chat / completions usage or the
    Responses API's)."""
    inp = out = cached = 0
    for a in answers:
        body = (a.get("response") or {}).get("body") or {}
        usage = body.get("usage") or {}
        inp += usage.get("prompt_tokens", usage.get("input_tokens", 0)) or 0
        out += usage.get("completion_tokens", usage.get("output_tokens", 0)) or 0
        details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
        cached += details.get("cached_tokens", 0) or 0
    return {
        "input_tokens": inp,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": out,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": inp + out,
    }


def _write_lines(path: Path, lines: list[dict[str, Any]]) -> int:
    """Write JSON lines to `path` (through a scratch file), synced; returns the bytes."""
    scratch = path.with_name(path.name + ".partial")
    with scratch.open("w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    scratch.replace(path)
    return path.stat().st_size


class BatchRunner:
    """Runs the store's batches on the server's event loop, through the app's routes."""

    def __init__(
        self,
        store: BatchStore,
        app: Any,
        headers: list[tuple[bytes, bytes]],
        max_in_flight: int,
        priority: int,
        on_answer: Callable[[int], None] | None = None,
    ):
        self.store, self.app, self.headers = store, app, headers
        self.max_in_flight, self.priority = max_in_flight, priority
        self.on_answer = on_answer
        self._gate: asyncio.Semaphore | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._leave: dict[str, asyncio.Event] = {}
        self._stopping = False
        self._broken: set[str] = set()
        """Batches that could not record an answer: left for the next server."""

    def resume(self) -> None:
        """Start (or finish) every batch a previous server left unfinished."""
        for b in self.store.unfinished():
            self.start(b["id"])

    def start(self, batch_id: str) -> None:
        if batch_id in self._tasks or self._stopping:
            return
        task = asyncio.ensure_future(self._run(batch_id))
        self._tasks[batch_id] = task
        task.add_done_callback(lambda t: self._ended(batch_id, t))

    def _ended(self, batch_id: str, task: asyncio.Task[None]) -> None:
        self._tasks.pop(batch_id, None)
        self._leave.pop(batch_id, None)
        if not task.cancelled() and task.exception() is not None:
            logger.error("batch %s stopped: %r", batch_id, task.exception())

    def cancel(self, batch_id: str) -> None:
        """Stop a cancelling batch's requests (its task then ends it `cancelled`)."""
        leave = self._leave.get(batch_id)
        if leave is not None:
            leave.set()
        else:
            self.start(batch_id)

    async def stop(self) -> None:
        """Leave every running batch as it is (its requests aborted, unanswered): the next
        server on this directory goes on with them."""
        self._stopping = True
        for batch_id, leave in self._leave.items():
            logger.info(
                "stopping: batch %s stays in_progress; a server on this job directory goes on "
                "with it",
                batch_id,
            )
            leave.set()
        tasks = list(self._tasks.values())
        if tasks:
            await asyncio.wait(tasks, timeout=30)

    async def _run(self, batch_id: str) -> None:
        store = self.store
        batch = store.batch(batch_id)
        assert batch is not None
        if self._gate is None:
            self._gate = asyncio.Semaphore(self.max_in_flight)
        try:
            requests, _ = await asyncio.to_thread(
                read_requests, store.path(batch["input_file_id"]), batch["endpoint"]
            )
        except OSError as e:  # its input file went (deleted behind the server's back)
            error = {"code": "input_file_missing", "line": None, "param": "input_file_id",
                     "message": f"the input file cannot be read: {e}"}  # fmt: skip

            def failed(b: dict[str, Any]) -> None:
                b["errors"] = {"object": "list", "data": [error]}
                _mark(b, "failed")

            store.update(batch_id, failed)
            logger.error("batch %s failed: %s", batch_id, error["message"])
            return
        if batch["status"] == "in_progress" and time.time() < batch["expires_at"]:
            answers = await asyncio.to_thread(keep_answers, store.log_path(batch_id))
            todo = [r for r in requests if r["custom_id"] not in answers]
            ok = sum(a["response"]["status_code"] < 300 for a in answers.values())

            def recount(b: dict[str, Any]) -> None:
                b["request_counts"].update(completed=ok, failed=len(answers) - ok)

            store.update(batch_id, recount)  # the log is the truth (a crash may split them)
            if answers:
                logger.info(
                    "batch %s: %d answered before, %d to go", batch_id, len(answers), len(todo)
                )
            await self._send(batch, todo)
            if self._stopping or batch_id in self._broken:
                return  # left in_progress: the next server goes on with it
        cancelled = (store.batch(batch_id) or batch)["status"] == "cancelling"
        await self._finish(batch_id, requests, cancelled)

    async def _send(self, batch: dict[str, Any], todo: list[dict[str, Any]]) -> None:
        """Run the requests until all are answered, the batch expires or is cancelled."""
        # this batch's task and the line tasks it starts: the batch creator's requests
        CALLER.set(self.store.owner(batch["id"]))
        assert self._gate is not None
        batch_id = batch["id"]
        leave = self._leave.setdefault(batch_id, asyncio.Event())
        loop = asyncio.get_running_loop()
        timer = loop.call_later(max(0.0, batch["expires_at"] - time.time()), leave.set)
        log = self.store.log_path(batch_id).open("a", encoding="utf-8")
        running: set[asyncio.Task[None]] = set()
        try:
            for item in todo:
                if not await self._acquire(leave):
                    break
                task = asyncio.ensure_future(self._one(batch_id, item, log, leave))
                running.add(task)
                task.add_done_callback(running.discard)
                task.add_done_callback(lambda _: self._release())
            if running:
                await asyncio.wait(running)
        finally:
            timer.cancel()
            log.close()

    async def _acquire(self, leave: asyncio.Event) -> bool:
        """A place among the requests in flight; False once `leave` is set."""
        assert self._gate is not None
        gate = asyncio.ensure_future(self._gate.acquire())
        left = asyncio.ensure_future(leave.wait())
        done, _ = await asyncio.wait((gate, left), return_when=asyncio.FIRST_COMPLETED)
        left.cancel()
        if gate not in done:
            gate.cancel()  # Semaphore.acquire gives back a place it got as it is cancelled
            return False
        if leave.is_set():
            self._release()
            return False
        return True

    def _release(self) -> None:
        assert self._gate is not None
        self._gate.release()

    async def _one(
        self, batch_id: str, item: dict[str, Any], log: Any, leave: asyncio.Event
    ) -> None:
        body = dict(item["body"])
        priority = body.get("priority", 0)
        if isinstance(priority, int) and not isinstance(priority, bool):  # else the route's 400
            body["priority"] = priority + self.priority
        raw_body = json.dumps(body).encode()
        wait = RETRY_SECONDS[0]
        while True:
            status, raw = await call(self.app, item["url"], raw_body, self.headers, leave)
            if leave.is_set() and status == 499:
                return  # aborted unanswered: cancelled, expired or the server stopping
            if status not in (429, 503):
                break
            # busy or restarting: not the request's answer; try again
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(leave.wait(), timeout=wait)
            if leave.is_set():
                return
            wait = min(wait * 2, RETRY_SECONDS[1])
        line = answer_line(item["custom_id"], status, raw)
        key = "completed" if status < 300 else "failed"

        def count(b: dict[str, Any]) -> None:
            b["request_counts"][key] += 1

        try:
            log.write(json.dumps(line, ensure_ascii=False) + "\n")
            log.flush()
            self.store.update(batch_id, count, durable=False)
        except (OSError, sqlite3.Error) as e:  # a full disk, say: stop, and go on after a restart
            logger.error("batch %s: cannot record an answer (%s); the batch stops here and "
                         "goes on when the server restarts", batch_id, e)  # fmt: skip
            self._broken.add(batch_id)
            leave.set()
            return
        if self.on_answer is not None:
            self.on_answer(status)

    async def _finish(self, batch_id: str, requests: list[dict[str, Any]], cancelled: bool) -> None:
        """Sort the answer log into the output and error files and end the batch: `cancelled`,
        `expired` (requests left unanswered) or `completed`."""
        store = self.store
        log = store.log_path(batch_id)
        answers = await asyncio.to_thread(read_answers, log, frozenset())
        done, failed, unrun = [], [], []
        for r in requests:
            a = answers.get(r["custom_id"])
            if a is None:
                unrun.append(r["custom_id"])
            elif a["response"]["status_code"] < 300:
                done.append(a)
            else:
                failed.append(a)
        status = "cancelled" if cancelled else "expired" if unrun else "completed"
        if status == "completed":
            store.update(batch_id, lambda b: _mark(b, "finalizing"))
        code = "batch_cancelled" if cancelled else "batch_expired"
        not_run = [unrun_line(custom_id, code, _UNRUN[code]) for custom_id in unrun]
        hexid = batch_id.removeprefix("batch_")
        keep = store.output_expiry(batch_id)
        files = []
        out_id = err_id = None
        if done:
            out_id = f"file-{hexid}-output"
            size = await asyncio.to_thread(_write_lines, store.path(out_id), done)
            files.append(_file_body(out_id, f"{batch_id}_output.jsonl", "batch_output", size, keep))
        if failed or not_run:
            err_id = f"file-{hexid}-errors"
            size = await asyncio.to_thread(_write_lines, store.path(err_id), failed + not_run)
            files.append(_file_body(err_id, f"{batch_id}_errors.jsonl", "batch_output", size, keep))

        def end(b: dict[str, Any]) -> None:
            _mark(b, status)
            b["output_file_id"], b["error_file_id"] = out_id, err_id
            b["request_counts"] = {
                "total": len(requests),
                "completed": len(done),
                "failed": len(failed),
            }
            b["usage"] = batch_usage(done + failed)

        store.update(batch_id, end, files)
        with contextlib.suppress(FileNotFoundError):
            log.unlink()
        logger.info(
            "batch %s %s: %d answered, %d refused, %d not run",
            batch_id,
            status,
            len(done),
            len(failed),
            len(unrun),
        )


_UNRUN = {
    "batch_expired": "This request could not be executed before the completion window expired.",
    "batch_cancelled": "This request was not executed: the batch was cancelled.",
}


def _mark(b: dict[str, Any], status: str) -> None:
    b["status"] = status
    b[f"{status}_at"] = int(time.time())


def _file_body(
    file_id: str, filename: str, purpose: str, size: int, expires_after: int | None
) -> dict[str, Any]:
    now = int(time.time())
    return {
        "id": file_id,
        "object": "file",
        "bytes": size,
        "created_at": now,
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
        "expires_at": None if expires_after is None else now + expires_after,
        "status_details": None,
    }


class ExpiresAfter(BaseModel):
    """OpenAI's expiry policy of a file: `seconds` after its `created_at`."""

    model_config = ConfigDict(extra="forbid")
    anchor: str = "created_at"
    seconds: int = Field(ge=EXPIRY_RANGE[0], le=EXPIRY_RANGE[1])

    @field_validator("anchor")
    @classmethod
    def _anchor(cls, v: str) -> str:
        if v != "created_at":
            raise ValueError(f"anchor must be 'created_at', got {v!r}")
        return v


class CreateBatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None
    output_expires_after: ExpiresAfter | None = None
    """How long the output and error files are kept (default 30 days)."""

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        if v not in URLS:
            raise ValueError(f"{v!r} is not one of {list(URLS)}")
        return v

    @field_validator("completion_window")
    @classmethod
    def _window(cls, v: str) -> str:
        window_seconds(v)
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is None:
            return v
        if len(v) > 16:
            raise ValueError(f"at most 16 keys, got {len(v)}")
        for key, value in v.items():
            if len(key) > 64 or len(value) > 512:
                raise ValueError(f"key {key[:64]!r}: keys are at most 64 characters, values 512")
        return v


class ListQuery(BaseModel):
    after: str | None = None
    limit: int = Field(default=20, ge=1, le=10_000)


class Batches:
    """The Files and Batch routes' state: the store (opened on first use) and its runner."""

    def __init__(self, server: _Server, app: FastAPI):
        self.server, self.app = server, app
        self._store: BatchStore | None = None
        self._runner: BatchRunner | None = None
        self._open_lock = threading.Lock()

    @property
    def store(self) -> BatchStore:
        with self._open_lock:
            if self._store is None:
                self._store = BatchStore(Path(self.server.runtime.job_dir) / "batches")
            return self._store

    @property
    def runner(self) -> BatchRunner:
        if self._runner is None:
            settings = self.server.settings
            keys = settings.api_keys
            headers = [(b"authorization", f"Bearer {keys[0]}".encode())] if keys else []
            self._runner = BatchRunner(
                self.store,
                self.app,
                headers,
                settings.batch_max_in_flight or max(1, settings.max_concurrent_requests // 2),
                settings.batch_priority,
                self.server.metrics.batch_answer,
            )
        return self._runner

    def counts(self) -> dict[str, int]:
        return {} if self._store is None else self._store.counts()

    def file_text(self, ref: FileRef, where: str) -> str:
        """The text of a file a message gives the model (an upload, or base64 data); an
        APIError naming `where` (the part's path) if there is none or it is not UTF-8 text.
        Reads the whole file: call it off the event loop."""
        if ref.file_id is not None:
            if self.store.file(ref.file_id, CALLER.get()) is None:
                raise APIError(
                    404,
                    f"no file {ref.file_id!r} (upload it with POST /v1/files)",
                    "not_found_error",
                    f"{where}.file_id",
                )
            raw = self.store.path(ref.file_id).read_bytes()
            what = f"file {ref.file_id!r}"
        else:
            assert ref.file_data is not None
            data = ref.file_data
            if data.startswith("data:"):
                _, _, data = data.partition(",")
            try:
                raw = base64.b64decode(data, validate=True)
            except binascii.Error as e:
                raise APIError(
                    400, f"file_data is not base64: {e}", param=f"{where}.file_data"
                ) from e
            what = "file_data"
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise APIError(
                400,
                f"{what} is not UTF-8 text ({e.reason} at byte {e.start}); this server reads "
                "text files only (no PDF or images): send the document's text",
                param=f"{where}.file_id" if ref.file_id is not None else f"{where}.file_data",
            ) from e

    async def startup(self) -> None:
        """Go on with the batches a previous server left (only a --job-dir outlives one)."""
        if self.server.runtime.config.job_dir is not None:
            self.store.purge_expired()
            if self.store.unfinished():
                self.runner.resume()

    async def shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.stop()
        if self._store is not None:
            self._store.close()


def add_batch_routes(app: FastAPI, server: _Server) -> Batches:
    batches = Batches(server, app)

    def file_of(file_id: str) -> dict[str, Any]:
        batches.store.purge_expired()
        found = batches.store.file(file_id, CALLER.get())
        if found is None:
            raise APIError(404, f"no file {file_id!r}", "not_found_error", "file_id")
        return found

    def batch_of(batch_id: str) -> dict[str, Any]:
        found = batches.store.batch(batch_id, CALLER.get())
        if found is None:
            raise APIError(404, f"no batch {batch_id!r}", "not_found_error", "batch_id")
        return found

    @app.post("/v1/files")
    async def upload(request: Request) -> dict[str, Any]:
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise APIError(400, "upload a file as multipart/form-data with 'file' and 'purpose'")
        form = await request.form()
        purpose, upload = form.get("purpose"), form.get("file")
        if purpose not in PURPOSES:
            raise APIError(
                400, f"purpose must be one of {list(PURPOSES)}, got {purpose!r}", param="purpose"
            )
        keep = _form_expiry(form, FILE_RETENTION_S if purpose == "batch" else None)
        batches.store.purge_expired()
        if upload is None or isinstance(upload, str):
            raise APIError(400, "the form has no 'file' part", param="file")
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        dest = batches.store.path(file_id)

        def save() -> int:
            with dest.open("wb") as f:
                shutil.copyfileobj(upload.file, f, 2**20)
                f.flush()
                os.fsync(f.fileno())
            return dest.stat().st_size

        size = await asyncio.to_thread(save)
        quota = server.settings.max_files_bytes_per_key
        if quota is not None:
            held = sum(f["bytes"] for f in batches.store.files(None, CALLER.get()))
            if held + size > quota:
                dest.unlink(missing_ok=True)
                raise APIError(
                    413,
                    f"this upload ({size} bytes) would take this key's files to {held + size} "
                    f"bytes, over its {quota} (--max-files-gb-per-key); delete files "
                    "(DELETE /v1/files/{id}) or ask for a larger quota",
                    code="storage_limit_exceeded",
                )
        name = os.path.basename(upload.filename or "upload.jsonl")
        return batches.store.add_file(file_id, name, str(purpose), size, keep, CALLER.get())

    @app.get("/v1/files")
    async def list_files(
        purpose: str | None = None, after: str | None = None, limit: int = 10_000,
        order: str = "desc",
    ) -> dict[str, Any]:  # fmt: skip
        if order not in ("asc", "desc"):
            raise APIError(400, f"order must be 'asc' or 'desc', got {order!r}", param="order")
        batches.store.purge_expired()
        found = batches.store.files(purpose, CALLER.get())
        if order == "desc":
            found.reverse()
        return list_page(found, after, limit, 10_000)

    @app.get("/v1/files/{file_id}")
    async def get_file(file_id: str) -> dict[str, Any]:
        return file_of(file_id)

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str) -> FileResponse:
        found = file_of(file_id)
        return FileResponse(
            batches.store.path(file_id),
            media_type="application/jsonl" if found["filename"].endswith(".jsonl")
            else "application/octet-stream",
            filename=found["filename"],
        )  # fmt: skip

    @app.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str) -> dict[str, Any]:
        file_of(file_id)
        if file_id in batches.store.inputs_in_use():
            raise APIError(
                409,
                f"file {file_id!r} is the input of a batch still running; cancel the batch "
                "first (POST /v1/batches/{id}/cancel)",
                code="file_in_use",
            )
        batches.store.delete_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    @app.post("/v1/batches")
    async def create(req: CreateBatchRequest) -> dict[str, Any]:
        server.check_alive()
        found = file_of(req.input_file_id)
        if found["purpose"] != "batch":
            raise APIError(
                400,
                f"file {req.input_file_id!r} has purpose {found['purpose']!r}; upload the "
                "requests with purpose 'batch'",
                param="input_file_id",
            )
        body = await asyncio.to_thread(
            batches.store.create_batch,
            req.input_file_id,
            req.endpoint,
            req.completion_window,
            req.metadata,
            CALLER.get(),
            FILE_RETENTION_S
            if req.output_expires_after is None
            else req.output_expires_after.seconds,
        )
        if body["status"] == "in_progress":
            batches.runner.start(body["id"])
        return body

    @app.get("/v1/batches")
    async def list_batches(after: str | None = None, limit: int = 20) -> dict[str, Any]:
        return list_page(batches.store.batches(CALLER.get()), after, limit, 100)

    @app.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str) -> dict[str, Any]:
        return batch_of(batch_id)

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel(batch_id: str) -> dict[str, Any]:
        found = batch_of(batch_id)
        if found["status"] in FINAL:
            raise APIError(
                409,
                f"batch {batch_id!r} is {found['status']}; only a batch in progress can be "
                "cancelled",
                code="batch_not_cancellable",
            )
        if found["status"] != "in_progress":
            return found  # cancelling or finalizing already
        body = batches.store.update(batch_id, lambda b: _mark(b, "cancelling"))
        batches.runner.cancel(batch_id)
        return body

    return batches


def _form_expiry(form: Any, default: int | None) -> int | None:
    """Seconds an upload is kept: its form's `expires_after` (as the official client sends it,
    `expires_after[anchor]` and `expires_after[seconds]`), else `default`."""
    seconds = form.get("expires_after[seconds]")
    anchor = form.get("expires_after[anchor]", "created_at")
    if seconds is None:
        return default
    try:
        return ExpiresAfter(anchor=anchor, seconds=seconds).seconds
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        raise APIError(400, f"expires_after.{where}: {message}",
                       param=f"expires_after.{where}") from e  # fmt: skip
