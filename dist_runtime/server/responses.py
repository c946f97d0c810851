"""OpenAI's Responses API on the chat path: `POST /v1/responses`, `GET` and `DELETE
/v1/responses/{id}`, `GET /v1/responses/{id}/input_items`.

A request's `input` (a string, or items: messages with text parts and `input_file` parts of
text files, by `file_id` from `POST /v1/files` or as `file_data`; `function_call` and
`function_call_output` items) and `instructions` become chat messages and run as a chat
request does (the model's template and tool-call format, guided output for `text.format` and
required calls). The answer comes back as `output` items: an assistant `message` with its
`output_text`, then a `function_call` item per call. `stream: true` sends the API's typed
events (`response.created`, `response.output_text.delta`, ..., `response.completed`), in the
order the official client's stream accumulator checks.

`store` (the default) keeps the response, with the conversation it ends: `GET` returns it and
`previous_response_id` continues from it (its input and output come before the new input; its
instructions do not, as in OpenAI's API). With a job directory (`--job-dir`) the store is a
SQLite file there (`DiskResponseStore`), kept across restarts for 30 days as OpenAI keeps
them; without one it is in memory and holds the newest `STORE_MAX_ITEMS` responses and
`STORE_MAX_CHARS` characters of conversation. A request that names an evicted or unknown
response is a 404. `background: true` answers at once with the response `queued` and runs it
on (a million-token prompt outlives most HTTP timeouts): `GET` shows it `in_progress` and then
done, `POST /v1/responses/{id}/cancel` stops it (`cancelled`, with what it had written). With a
job directory its request is stored until it is answered, and a server that stops (or dies)
first leaves it `queued` / `in_progress` there for the next server on that directory, which
runs it again from the start under the same id; without one it is lost with the process.

Hosted tools (web search, file search, ...), images, files by URL and files that are not UTF-8
text in the input, `conversation`, `prompt`, `include` values other than
`message.output_text.logprobs` and reasoning summaries are 400s naming the field.
`truncation: "auto"` drops a conversation's oldest turns (after the instructions) until it fits
the context, as OpenAI's does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dist_runtime.server.calls import (
    APIError,
    ChatRun,
    chat_prompt,
    functions_of,
    gather,
    list_page,
    merged,
    start_chat,
)
from dist_runtime.server.schemas import (
    ChatMessage,
    JsonSchemaFormat,
    ResponseFormat,
    SamplingFields,
    UnsupportedFieldError,
    _empty,
    _Request,
    _unsupported,
    check_tool_choice,
    check_tool_types,
)

logger = logging.getLogger("dist_runtime.server.responses")

if TYPE_CHECKING:
    from dist_runtime.engine.outputs import RequestOutput
    from dist_runtime.server.app import _Server
    from dist_runtime.server.tools import Function

STORE_MAX_ITEMS = 1000
STORE_MAX_CHARS = 64 * 2**20
"""Bounds of the in-memory response store (oldest evicted first): responses, and characters
of their JSON (the conversation, the response with its tools and metadata)."""
_NAME = r"^[A-Za-z0-9_.-]{1,64}$"


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    name: str = Field(pattern=_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunctionChoice(BaseModel):
    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError('format type "json_schema" needs its schema')
        return self


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")
    format: TextFormat | None = None


class ReasoningOptions(_Request):
    effort: str | None = None
    """Passed to the chat template as `reasoning_effort` (as the chat route passes it)."""
    summary: str | None = None
    generate_summary: str | None = None

    @model_validator(mode="after")
    def _no_summary(self) -> ReasoningOptions:
        for name in ("summary", "generate_summary"):
            if getattr(self, name) is not None:
                raise UnsupportedFieldError(
                    f"reasoning.{name}",
                    f"reasoning.{name} is not supported: the thinking comes back whole as a "
                    "reasoning item (with --reasoning-parser); leave it out",
                )
        return self


class ResponsesRequest(_Request):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    """An extra (as vLLM's): the same seed gives the same answer."""
    priority: int = Field(default=0, ge=-(2**31), lt=2**31)
    """An extra (as vLLM's): scheduling priority, lower first."""
    stream: bool = False
    reasoning: ReasoningOptions | None = None
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    store: bool = True
    background: bool = False
    """Answer at once with the response `queued`; it runs on, and `GET /v1/responses/{id}`
    shows it (`in_progress`, then done) until then; `POST .../cancel` stops it. Needs
    `store`; cannot stream."""
    metadata: dict[str, str] | None = None
    """At most 16 pairs, keys of 64 characters and values of 512 (OpenAI's limits)."""
    user: str | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    """As on the chat route: "flex" a level behind interactive requests, "priority" a level
    ahead where `--min-priority` allows; the response names the tier used."""
    include: list[Literal["message.output_text.logprobs"]] | None = None
    """`message.output_text.logprobs`: each output token's log-probability in the message's
    output_text (`logprobs`), with `top_logprobs` alternatives."""
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    truncation: Literal["auto", "disabled"] | None = None
    """`auto`: a conversation longer than the context drops its oldest turns (after the
    instructions) until it fits (`truncated`); `disabled` (the default): it is a 400."""

    @property
    def effort(self) -> str | None:
        """`reasoning.effort`, for the chat template's `reasoning_effort` (None: not given)."""
        return None if self.reasoning is None else self.reasoning.effort

    @property
    def logprobs(self) -> int | None:
        """How many alternatives each output token's log-probability comes with (None: no
        log-probabilities)."""
        if self.include and "message.output_text.logprobs" in self.include:
            return self.top_logprobs or 0
        return None

    @model_validator(mode="before")
    @classmethod
    def _no_unsupported(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        _unsupported(
            data,
            {
                "conversation": _empty,
                "prompt": _empty,
            },
        )
        check_tool_types(data.get("tools"), ("function",), "give function tools only")
        return data

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None and (
            len(v) > 16 or any(len(k) > 64 or len(x) > 512 for k, x in v.items())
        ):
            raise ValueError("metadata holds at most 16 pairs, keys of 64 characters and "
                             "values of 512")  # fmt: skip
        return v

    @model_validator(mode="after")
    def _background_fits(self) -> ResponsesRequest:
        if self.background and not self.store:
            raise UnsupportedFieldError("store", "a background response is stored: drop store")
        if self.background and self.stream:
            raise UnsupportedFieldError(
                "stream", "a background response does not stream here: poll GET instead"
            )
        return self

    @model_validator(mode="after")
    def _choice_fits(self) -> ResponsesRequest:
        choice = self.tool_choice
        check_tool_choice(
            [t.name for t in self.tools or []],
            choice not in (None, "none", "auto"),
            choice.name if isinstance(choice, NamedFunctionChoice) else None,
        )
        return self

    @property
    def tool_mode(self) -> str:
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedFunctionChoice):
            return "named"
        return self.tool_choice or "auto"

    def sampling(self) -> SamplingFields:
        """The chat path's sampling fields for this request."""
        fmt = self.text.format if self.text is not None else None
        response_format = None
        if fmt is not None and fmt.type != "text":
            schema = None
            if fmt.type == "json_schema":
                assert fmt.schema_ is not None  # the format's validator requires it
                schema = JsonSchemaFormat(name=fmt.name, schema=fmt.schema_)
            response_format = ResponseFormat(type=fmt.type, json_schema=schema)
        return SamplingFields(
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            response_format=response_format,
            priority=self.priority,
            model=self.model,
            service_tier=self.service_tier,
        )


@dataclass
class _Stored:
    body: dict[str, Any]
    history: list[dict[str, Any]]
    """The conversation the response ends, as chat messages (its input, then its output)."""
    chars: int
    request: dict[str, Any] | None = None
    """A background response not yet done: its request, to run it again after a restart."""
    input: list[dict[str, Any]] | None = None
    """Its request's `input` as items with ids (`input_items`: `GET .../input_items`)."""


PENDING = ("queued", "in_progress")
"""Statuses of a background response still to be answered."""


class ResponseStore:
    """Stored responses, newest last; the oldest go first past the bounds."""

    def __init__(self, max_items: int = STORE_MAX_ITEMS, max_chars: int = STORE_MAX_CHARS):
        self.max_items, self.max_chars = max_items, max_chars
        self._items: OrderedDict[str, _Stored] = OrderedDict()
        self._chars = 0

    def put(
        self,
        rid: str,
        body: dict[str, Any],
        history: list[dict[str, Any]],
        request: dict[str, Any] | None = None,
        items: list[dict[str, Any]] | None = None,
    ) -> None:
        # everything kept counts: the conversation and the response (tools, metadata, calls)
        chars = len(json.dumps(body)) + len(json.dumps(history)) + len(json.dumps(items))
        old = self._items.pop(rid, None)
        if old is not None:
            self._chars -= old.chars
        self._items[rid] = _Stored(body, history, chars, request, items)
        self._chars += chars
        while self._items and (len(self._items) > self.max_items or self._chars > self.max_chars):
            _, gone = self._items.popitem(last=False)
            self._chars -= gone.chars

    def get(self, rid: str) -> _Stored | None:
        return self._items.get(rid)

    def delete(self, rid: str) -> bool:
        old = self._items.pop(rid, None)
        if old is not None:
            self._chars -= old.chars
        return old is not None

    def pending(self) -> list[tuple[str, _Stored]]:
        """Background responses not yet answered (none survive in memory: always empty at a
        start)."""
        return [(rid, s) for rid, s in self._items.items() if s.body["status"] in PENDING]

    def __len__(self) -> int:
        return len(self._items)


DISK_RETENTION_S = 30 * 86400
"""How long the job directory keeps a stored response (OpenAI keeps them 30 days)."""


class DiskResponseStore:
    """Stored responses in the job directory (SQLite, `responses.sqlite3`): they outlive the
    server, and a background response left `queued` or `in_progress` by one is run again by the
    next (`pending`). Responses older than `retention_s` are deleted as new ones come."""

    def __init__(self, path: str | os.PathLike[str], retention_s: float = DISK_RETENTION_S):
        self.retention_s = retention_s
        self._lock = threading.Lock()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # a stored answer is safe from the process dying at once, from the machine's only after
        # the next checkpoint: no disk sync per response on the event loop (a background
        # request, which is queued work, is synced: `put`)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(
            "CREATE TABLE IF NOT EXISTS responses (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
            "id TEXT NOT NULL UNIQUE, created REAL NOT NULL, status TEXT NOT NULL, "
            "body TEXT NOT NULL, history TEXT NOT NULL, request TEXT);"
            "CREATE INDEX IF NOT EXISTS responses_by_status ON responses (status);"
            "CREATE INDEX IF NOT EXISTS responses_by_age ON responses (created);"
        )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(responses)")}
        if "input" not in columns:  # (a store written before input items were kept)
            self._db.execute("ALTER TABLE responses ADD COLUMN input TEXT")
        self._purged = 0.0

    def put(
        self,
        rid: str,
        body: dict[str, Any],
        history: list[dict[str, Any]],
        request: dict[str, Any] | None = None,
        items: list[dict[str, Any]] | None = None,
    ) -> None:
        now = time.time()
        with self._lock:
            if request is not None:
                self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO responses (id, created, status, body, history, request, input) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET status = "
                "excluded.status, body = excluded.body, history = excluded.history, request = "
                "excluded.request, input = excluded.input",
                (rid, now, body["status"], json.dumps(body), json.dumps(history),
                 None if request is None else json.dumps(request),
                 None if items is None else json.dumps(items)),
            )  # fmt: skip
            if now - self._purged > 60:  # the ones past retention, once a minute at most
                self._purged = now
                self._db.execute(
                    "DELETE FROM responses WHERE created < ?", (now - self.retention_s,)
                )
            self._db.execute("COMMIT")
            if request is not None:
                self._db.execute("PRAGMA synchronous=NORMAL")

    def get(self, rid: str) -> _Stored | None:
        with self._lock:
            row = self._db.execute(
                "SELECT body, history, request, input FROM responses WHERE id = ?", (rid,)
            ).fetchone()
        return None if row is None else _row(row)

    def delete(self, rid: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM responses WHERE id = ?", (rid,)).rowcount > 0

    def pending(self) -> list[tuple[str, _Stored]]:
        """Background responses a server left unanswered, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, body, history, request, input FROM responses WHERE status IN (?, ?) "
                "ORDER BY seq",
                PENDING,
            ).fetchall()
        return [(r[0], _row(r[1:])) for r in rows]

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _row(row: tuple[str, str, str | None, str | None]) -> _Stored:
    body, history, request, items = row
    return _Stored(
        json.loads(body), json.loads(history), len(body) + len(history),
        None if request is None else json.loads(request),
        None if items is None else json.loads(items),
    )  # fmt: skip


_ITEM_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco",
                "reasoning": "rs"}  # fmt: skip


def input_items(given: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A request's `input` as OpenAI lists it back (`GET /v1/responses/{id}/input_items`):
    items with a `type` and an `id` (the caller's, else a new one), message text as content
    parts."""
    raw: list[dict[str, Any]] = (
        [{"role": "user", "content": given}] if isinstance(given, str) else given
    )
    items = []
    for one in raw:
        item: dict[str, Any] = dict(one)
        kind = item.setdefault("type", "message")
        if kind == "message":
            text_part = "output_text" if item.get("role") == "assistant" else "input_text"
            if isinstance(item.get("content"), str):
                item["content"] = [{"type": text_part, "text": item["content"]}]
            item.setdefault("status", "completed")
        item.setdefault("id", f"{_ITEM_PREFIX.get(kind, 'item')}_{uuid.uuid4().hex}")
        items.append(item)
    return items


def input_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages ({"role", "content", "tool_calls", "tool_call_id"}) of a request's
    `input`; a bad item is an `APIError` naming it."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise APIError(
                    400,
                    f"input item role {role!r} is not user, system, developer or assistant",
                    param=f"input.{i}.role",
                )
            messages.append({"role": role, "content": _text(item.get("content"), f"input.{i}")})
        elif kind == "function_call":
            for key in ("call_id", "name"):
                if not isinstance(item.get(key), str):
                    raise APIError(400, f"a function_call item needs {key}", f"input.{i}.{key}")
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item.get("arguments") or "{}"},
            }
            last = messages[-1] if messages else None
            if (
                last is not None
                and last["role"] == "assistant"
                and i > 0
                and (items[i - 1].get("type", "message") in ("message", "function_call"))
            ):
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise APIError(
                    400, "a function_call_output item needs call_id", f"input.{i}.call_id"
                )
            output = item.get("output")
            text = output if isinstance(output, str) else _text(output, f"input.{i}.output")
            messages.append({"role": "tool", "content": text, "tool_call_id": item["call_id"]})
        elif kind == "reasoning":
            continue  # another model's reasoning, sent back with its output: nothing to read
        else:
            raise APIError(
                400,
                f"input item type {kind!r} is not supported here: give message, "
                "function_call or function_call_output items",
                param=f"input.{i}.type",
            )
    return messages


def truncated(
    server: _Server,
    messages: list[ChatMessage],
    functions: list[Function] | None,
    mode: str,
    template_kwargs: dict[str, Any] | None,
    room: int,
) -> list[ChatMessage]:
    """The conversation cut to a prompt of at most `room` tokens (`truncation: "auto"`): its
    leading system message (the instructions) kept, then as few of the oldest turns after it
    dropped as make it fit (a call's results go with it: no cut leaves a `tool` message
    first); a 400 when even its last turn alone is too long."""
    functions = functions if mode != "none" else None
    calling = bool(functions) and mode in ("required", "named")

    def fits(kept: list[ChatMessage]) -> bool:
        ids = chat_prompt(server, kept, functions, calling, False, template_kwargs)
        return len(ids) <= room

    if fits(messages):
        return messages
    head = messages[:1] if messages[0].role in ("system", "developer") else []
    rest = messages[len(head) :]
    cuts = [i for i in range(1, len(rest)) if rest[i].role != "tool"]
    lo, hi = 0, len(cuts)  # the fewest dropped: the first cut that fits (fewer turns, fewer tokens)
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(head + rest[cuts[mid] :]):
            hi = mid
        else:
            lo = mid + 1
    if lo == len(cuts):
        raise APIError(
            400,
            f"the conversation's last turn alone is longer than the {room} tokens the context "
            "leaves (session_len less max_output_tokens): shorten it",
            param="input",
        )
    return head + rest[cuts[lo] :]


def _text(content: Any, where: str) -> str | list[dict[str, Any]]:
    """The content of a message as the chat route takes it: its text, or with `input_file`
    parts (text files) chat parts, a `file` part where each file stands (images are 400s)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, "content must be a string or a list of parts", f"{where}.content")
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "input_file":
            assert isinstance(part, dict)
            if part.get("file_url") is not None:
                raise APIError(
                    400,
                    "file_url is not read here (the server fetches nothing): give file_id (an "
                    "upload, POST /v1/files) or file_data",
                    param=f"{where}.content.{j}.file_url",
                )
            ref = {k: part[k] for k in ("file_id", "file_data", "filename") if k in part}
            parts.append({"type": "file", "file": ref})
            continue
        if kind not in ("input_text", "output_text", "text") or not isinstance(
            part.get("text"), str
        ):
            raise APIError(
                400,
                f"content part type {kind!r} is not supported: this model reads text "
                "(input_text parts, and input_file parts of text files)",
                param=f"{where}.content.{j}.type",
            )
        parts.append({"type": "text", "text": part["text"]})
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _reasoning_item(text: str, status: str) -> dict[str, Any]:
    """A reasoning model's thinking (`--reasoning-parser`) as a Responses output item."""
    return {
        "type": "reasoning",
        "id": f"rs_{uuid.uuid4().hex}",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
        "status": status,
    }


def _message_item(text: str, status: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": f"msg_{uuid.uuid4().hex}",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def _call_item(name: str, arguments: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": f"fc_{uuid.uuid4().hex}",
        "call_id": f"call_{uuid.uuid4().hex[:24]}",
        "name": name,
        "arguments": arguments,
        "status": "completed",
    }


def _output_history(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The response's output as chat messages (to continue from)."""
    message: dict[str, Any] = {"role": "assistant", "content": ""}
    for item in output:
        if item["type"] == "message":
            message["content"] += "".join(p["text"] for p in item["content"])
        elif item["type"] == "reasoning":
            continue  # thinking is not sent back to the model (its template drops it)
        else:
            message.setdefault("tool_calls", []).append(
                {
                    "id": item["call_id"],
                    "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]},
                }
            )
    return [message]


class Responses:
    """The routes' state: the store (in the job directory when the server has one) and the
    background responses running; `startup` runs again those a previous server left."""

    def __init__(self, server: _Server):
        job_dir = server.runtime.config.job_dir
        self.store: ResponseStore | DiskResponseStore = (
            DiskResponseStore(os.path.join(job_dir, "responses.sqlite3"))
            if job_dir is not None
            else ResponseStore()
        )
        self.background: dict[str, tuple[asyncio.Future[None], Any]] = {}
        """Background responses still running: their task and engine handle."""
        self.stopping = False
        self._resuming: asyncio.Future[None] | None = None
        self.resume: Any = None
        """Run a stored background request again (set by the routes)."""

    async def startup(self) -> None:
        pending = self.store.pending()
        if pending:  # in the background: the server answers meanwhile
            self._resuming = asyncio.ensure_future(self._resume_all([rid for rid, _ in pending]))

    async def _resume_all(self, rids: list[str]) -> None:
        for rid in rids:
            stored = self.store.get(rid)  # again: it may have been cancelled meanwhile
            if self.stopping or stored is None or stored.body["status"] not in PENDING:
                continue
            if stored.request is None:
                continue
            logger.info("running again background response %s (left %s)", rid,
                        stored.body["status"])  # fmt: skip
            await self.resume(rid, stored)

    async def shutdown(self) -> None:
        """Stop the background responses unanswered (the next server on the job directory
        runs them again; without one they are lost with this process)."""
        self.stopping = True
        if self._resuming is not None:
            self._resuming.cancel()
        for task, handle in list(self.background.values()):
            handle.abort()
            task.cancel()
        if isinstance(self.store, DiskResponseStore):
            self.store.close()


def add_responses_routes(app: FastAPI, server: _Server) -> Responses:
    state = Responses(server)
    store, background = state.store, state.background

    def body(
        req: ResponsesRequest,
        rid: str,
        created: int,
        status: str,
        output: list[dict[str, Any]],
        usage: dict[str, Any] | None,
    ) -> dict[str, Any]:
        fmt = req.text.format if req.text is not None else None
        choice = req.tool_choice or ("auto" if req.tools else "none")
        return {
            "id": rid,
            "object": "response",
            "created_at": created,
            "status": status,
            "error": None,
            "incomplete_details": (
                {"reason": "max_output_tokens"} if status == "incomplete" else None
            ),
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": server.model_name(req.model),
            "output": output,
            "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id,
            "reasoning": None if req.effort is None else {"effort": req.effort, "summary": None},
            "store": req.store,
            "background": req.background,
            "temperature": req.temperature,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True)
                     if fmt is not None else {"type": "text"}},
            "tool_choice": choice.model_dump() if isinstance(choice, BaseModel) else choice,
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "top_p": req.top_p,
            "top_logprobs": req.top_logprobs,
            "service_tier": server.tier(req.sampling())[0],
            "truncation": req.truncation or "disabled",
            "usage": usage,
            "user": req.user,
            "metadata": req.metadata or {},
        }  # fmt: skip

    def usage_of(run: ChatRun, out: RequestOutput) -> dict[str, Any]:
        n_in, n_out = len(run.ids), len(out.token_ids)
        thought = run.thinking_tokens(out)
        return {
            "input_tokens": n_in,
            "input_tokens_details": {"cached_tokens": out.num_cached_tokens},
            "output_tokens": n_out,
            "output_tokens_details": {"reasoning_tokens": thought},
            "total_tokens": n_in + n_out,
        }

    @app.post("/v1/responses")
    async def create(req: ResponsesRequest, request: Request) -> Any:
        return await respond(req, request)

    async def resume(rid: str, stored: _Stored) -> None:
        created = stored.body["created_at"]
        try:
            req = ResponsesRequest.model_validate(stored.request)
            await respond(req, None, rid, created)
        except (APIError, ValueError) as e:
            failed = stored.body | {"status": "failed"}
            failed["error"] = {"code": "server_error", "message": f"not run again: {e}"}
            store.put(rid, failed, [], items=stored.input)

    state.resume = resume

    async def respond(
        req: ResponsesRequest,
        request: Request | None,
        rid: str | None = None,
        created: int | None = None,
    ) -> Any:
        """Answer a request (`request`: its HTTP request; None for a background response run
        again after a restart, under its first `rid` and `created`)."""
        server.check_model(req.model)
        history: list[dict[str, Any]] = []
        if req.previous_response_id is not None:
            previous = store.get(req.previous_response_id)
            if previous is None:
                raise APIError(
                    404,
                    f"no stored response {req.previous_response_id!r} (never stored, deleted, "
                    "or evicted from the store)",
                    "not_found_error",
                    "previous_response_id",
                )
            if previous.body["status"] in ("queued", "in_progress"):
                raise APIError(
                    400,
                    f"response {req.previous_response_id!r} is still {previous.body['status']}"
                    "; continue from it once it is done",
                    param="previous_response_id",
                )
            history = [dict(m) for m in previous.history]
        new = input_messages(req.input)
        items = input_items(req.input)
        conversation = history + new
        if req.instructions:
            conversation = [{"role": "system", "content": req.instructions}, *conversation]
        if not conversation:
            raise APIError(400, "input has no messages", param="input")
        try:
            messages = [ChatMessage.model_validate(m) for m in conversation]
        except ValueError as e:
            raise APIError(400, str(e), param="input") from e
        if req.logprobs is not None and (req.tool_mode != "none" or server.reasoning):
            raise APIError(
                400,
                "output_text log-probabilities are given for answers that are all text: not with "
                "tools or a reasoning parser (leave message.output_text.logprobs out)",
                param="include",
            )
        named = req.tool_choice.name if isinstance(req.tool_choice, NamedFunctionChoice) else None
        functions = functions_of([(t.name, t.description, t.parameters) for t in req.tools or []])
        template_kwargs = None if req.effort is None else {"reasoning_effort": req.effort}
        if req.truncation == "auto":
            room = server.runtime.config.session_len - (req.max_output_tokens or 1)
            messages = await asyncio.to_thread(
                truncated, server, messages, functions, req.tool_mode, template_kwargs, room
            )
        run = await start_chat(
            server,
            req.sampling(),
            messages,
            functions,
            req.tool_mode,
            named,
            req.parallel_tool_calls,
            req.max_output_tokens,
            req.logprobs,
            1,
            template_kwargs=template_kwargs,
        )
        rid = rid or f"resp_{uuid.uuid4().hex}"
        created = created or int(time.time())

        def finish(out: RequestOutput, output: list[dict[str, Any]]) -> dict[str, Any]:
            status = "incomplete" if out.finish_reason == "length" else "completed"
            if out.finish_reason == "abort":
                status = "cancelled"
            for item in output:
                if item["type"] in ("message", "reasoning"):
                    item["status"] = status
            usage = usage_of(run, out)
            if request is not None:
                request.state.usage = {
                    "prompt_tokens": usage["input_tokens"],
                    "completion_tokens": usage["output_tokens"],
                }
            done = body(req, rid, created, status, output, usage)
            if req.store:
                store.put(rid, done, history + new + _output_history(output), items=items)
            return done

        def whole(out: RequestOutput) -> dict[str, Any]:
            splits = run.thoughts()
            thought, answer = (None, out.text) if splits is None else splits.split(out.text)
            content, calls = run.splitter().feed(answer, out.finish_reason)
            output = [] if thought is None else [_reasoning_item(thought, "completed")]
            if content or not calls:
                output.append(_message_item(content, "completed"))
                if req.logprobs is not None:
                    output[-1]["content"][0]["logprobs"] = server.logprob_entries(out.logprobs)
            output += [_call_item(n, a) for n, a in calls]
            return finish(out, output)

        if req.background:
            queued = body(req, rid, created, "queued", [], None)
            asked = req.model_dump(mode="json", by_alias=True, exclude_unset=True)
            store.put(rid, queued, [], asked, items)  # kept until answered: a restart runs it
            (handle,) = run.handles

            async def run_on() -> None:
                try:
                    async for _ in handle:  # a first token: it runs
                        if queued["status"] == "queued":
                            queued["status"] = "in_progress"
                            store.put(rid, queued, [], asked, items)
                    whole(handle.result(timeout=0))
                except Exception as e:  # the engine failed the request
                    if state.stopping:
                        return  # the server stops: left for the next one to run again
                    failed = body(req, rid, created, "failed", [], None)
                    failed["error"] = {"code": "server_error", "message": str(e)}
                    store.put(rid, failed, [], items=items)
                finally:
                    background.pop(rid, None)

            background[rid] = (asyncio.ensure_future(run_on()), handle)
            return queued

        if not req.stream:
            assert request is not None  # only background responses run again without one
            (out,) = await gather(run.handles, request)
            return whole(out)

        async def events() -> AsyncIterator[str]:
            seq = 0

            def event(kind: str, **fields: Any) -> str:
                nonlocal seq
                data = {"type": kind, "sequence_number": seq, **fields}
                seq += 1
                return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

            start = body(req, rid, created, "in_progress", [], None)
            yield event("response.created", response=start)
            yield event("response.in_progress", response=start)
            output: list[dict[str, Any]] = []
            message: dict[str, Any] | None = None
            text = ""
            split = run.splitter()
            thoughts = run.thoughts()
            reasoning: dict[str, Any] | None = None
            thought_text = ""

            def open_reasoning() -> str:
                nonlocal reasoning
                reasoning = _reasoning_item("", "in_progress")
                output.append(reasoning)
                return event("response.output_item.added", output_index=len(output) - 1,
                             item=json.loads(json.dumps(reasoning)))  # fmt: skip

            def close_reasoning() -> list[str]:
                if reasoning is None or reasoning["status"] != "in_progress":
                    return []
                at = output.index(reasoning)
                reasoning["content"] = [{"type": "reasoning_text", "text": thought_text}]
                reasoning["status"] = "completed"
                return [
                    event("response.reasoning_text.done", item_id=reasoning["id"],
                          output_index=at, content_index=0, text=thought_text),
                    event("response.output_item.done", output_index=at, item=reasoning),
                ]  # fmt: skip

            def failure(error: Exception) -> str:
                failed = body(req, rid, created, "failed", output, None)
                failed["error"] = {"code": "server_error", "message": str(error)}
                return event("response.failed", response=failed)

            def completion(out: RequestOutput) -> str:
                done = finish(out, output)
                cut = done["status"] == "incomplete"
                return event("response.incomplete" if cut else "response.completed", response=done)

            def open_message() -> list[str]:
                nonlocal message
                closed = close_reasoning()
                message = _message_item("", "in_progress")
                message["content"] = []
                output.append(message)
                at = len(output) - 1
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                return [
                    *closed,
                    event("response.output_item.added", output_index=at, item=message),
                    event("response.content_part.added", item_id=message["id"],
                          output_index=at, content_index=0, part=part),
                ]  # fmt: skip

            items: dict[int, dict[str, Any]] = {}  # the calls' items, by call index

            text_logprobs: list[dict[str, Any]] = []
            scored: list[dict[str, Any]] = []  # entries of tokens whose text is not sent yet

            def close_message(status: str) -> list[str]:
                if message is None or message["status"] != "in_progress":
                    return []
                at = output.index(message)
                part = {"type": "output_text", "text": text, "annotations": [],
                        "logprobs": text_logprobs}  # fmt: skip
                message["content"] = [part]
                message["status"] = status
                return [
                    event("response.output_text.done", item_id=message["id"], output_index=at,
                          content_index=0, text=text, logprobs=text_logprobs),
                    event("response.content_part.done", item_id=message["id"],
                          output_index=at, content_index=0, part=part),
                    event("response.output_item.done", output_index=at, item=message),
                ]  # fmt: skip

            def call_events(pieces: list[dict[str, Any]]) -> list[str]:
                """A call's item once its name is whole, then its arguments as they come."""
                events: list[str] = []
                for d in pieces:
                    if "id" in d:
                        events += [*close_reasoning(), *close_message("completed")]
                        item = _call_item(d["function"]["name"], "")
                        item["status"] = "in_progress"
                        items[d["index"]] = item
                        output.append(item)
                        at = len(output) - 1
                        events.append(
                            event("response.output_item.added", output_index=at, item=dict(item))
                        )
                    item = items[d["index"]]
                    piece = d["function"].get("arguments", "")
                    if piece:
                        item["arguments"] += piece
                        events.append(event("response.function_call_arguments.delta",
                                            item_id=item["id"], output_index=output.index(item),
                                            delta=piece))  # fmt: skip
                return events

            def close_calls() -> list[str]:
                events: list[str] = []
                for item in items.values():
                    index = output.index(item)
                    item["status"] = "completed"
                    events.append(event("response.function_call_arguments.done",
                                        item_id=item["id"], output_index=index, name=item["name"],
                                        arguments=item["arguments"]))  # fmt: skip
                    events.append(event("response.output_item.done", output_index=index,
                                        item=item))  # fmt: skip
                return events

            try:
                async for _, delta in merged(run.handles):
                    said = delta.text
                    if thoughts is not None:
                        thought, said = thoughts.feed(said, delta.finish_reason is not None)
                        if thought:
                            if reasoning is None:
                                yield open_reasoning()
                            assert reasoning is not None
                            thought_text += thought
                            yield event("response.reasoning_text.delta",
                                        item_id=reasoning["id"],
                                        output_index=output.index(reasoning), content_index=0,
                                        delta=thought)  # fmt: skip
                    # content, and calls' pieces as they come (required, or auto once a call
                    # opens)
                    piece, pieces, _ = split.stream(said, delta.finish_reason)
                    # (with log-probabilities there are no tools: the text is all content; a
                    # token whose text is held back has its entry sent with the text's delta)
                    if req.logprobs is not None:
                        scored += server.logprob_entries(delta.logprobs)
                    if piece:
                        for e in open_message() if message is None else []:
                            yield e
                        assert message is not None
                        text += piece
                        text_logprobs.extend(scored)
                        yield event(
                            "response.output_text.delta",
                            item_id=message["id"],
                            output_index=output.index(message),
                            content_index=0,
                            delta=piece,
                            logprobs=scored,
                        )
                        scored = []
                    for e in call_events(pieces):
                        yield e
            except Exception as error:
                yield failure(error)
                return
            out = run.handles[0].result(timeout=0)
            text_logprobs.extend(scored)  # (tokens of no text: a stop string's, say)
            for e in close_reasoning():
                yield e
            if message is None and not items:
                for e in open_message():
                    yield e
            for e in close_message("incomplete" if out.finish_reason == "length" else "completed"):
                yield e
            for e in close_calls():
                yield e
            yield completion(out)

        return server.sse(events())

    @app.get("/v1/responses/{response_id}")
    async def get(response_id: str) -> dict[str, Any]:
        stored = store.get(response_id)
        if stored is None:
            raise APIError(404, f"no stored response {response_id!r}", "not_found_error",
                           "response_id")  # fmt: skip
        return stored.body

    @app.get("/v1/responses/{response_id}/input_items")
    async def items_of(
        response_id: str, limit: int = 20, order: str = "desc", after: str | None = None
    ) -> dict[str, Any]:
        """The response's input items (its own request's, not those of the responses it
        continues), newest first by default; one page (`limit`, `after`)."""
        stored = store.get(response_id)
        if stored is None:
            raise APIError(404, f"no stored response {response_id!r}", "not_found_error",
                           "response_id")  # fmt: skip
        if order not in ("asc", "desc"):
            raise APIError(400, f"order must be 'asc' or 'desc', got {order!r}", param="order")
        found = list(stored.input or [])
        if order == "desc":
            found.reverse()
        return list_page(found, after, limit, 100)

    @app.post("/v1/responses/{response_id}/cancel")
    async def cancel(response_id: str) -> dict[str, Any]:
        """Stop a background response; it ends `cancelled` with what it had written."""
        running = background.get(response_id)
        if running is None:
            stored = store.get(response_id)
            if stored is None:
                raise APIError(404, f"no stored response {response_id!r}", "not_found_error",
                               "response_id")  # fmt: skip
            if not stored.body.get("background"):
                raise APIError(400, "only a background response can be cancelled",
                               param="response_id")  # fmt: skip
            if stored.body["status"] in PENDING:  # left by a previous server, not yet resumed
                cancelled = stored.body | {"status": "cancelled"}
                store.put(response_id, cancelled, [], items=stored.input)
                return cancelled
            return stored.body  # done already: cancelling changes nothing
        task, handle = running
        handle.abort()
        await asyncio.shield(task)
        stored = store.get(response_id)
        assert stored is not None
        return stored.body

    @app.delete("/v1/responses/{response_id}")
    async def delete(response_id: str) -> dict[str, Any]:
        if not store.delete(response_id):
            raise APIError(404, f"no stored response {response_id!r}", "not_found_error",
                           "response_id")  # fmt: skip
        return {"id": response_id, "object": "response", "deleted": True}

    return state
