"""Anthropic's Messages API on the chat path: `POST /v1/messages` and
`POST /v1/messages/count_tokens` (as LMDeploy serves them), for clients built on Anthropic's
SDK.

A request's `system` and `messages` (text blocks; `tool_use` blocks in assistant turns and
`tool_result` blocks in user turns) become chat messages and run as a chat request does: the
model's template and tool-call format, and guided calls for `tool_choice` `any` / `tool`. A
last assistant message starts the answer (Anthropic's prefill): the model continues it. The
answer comes back as content blocks: a `text` block, then a `tool_use` block per call, with
`stop_reason` `end_turn`, `max_tokens`, `stop_sequence` (and which) or `tool_use`. `stream:
true` sends Anthropic's events (`message_start`, `content_block_start` / `_delta` / `_stop`,
`message_delta`, `message_stop`). Keys go in `x-api-key` (or `Authorization: Bearer`); errors
are `{"type": "error", "error": {"type", "message"}}`. `document` blocks of text (a `text`
source, base64 `text/plain`, or a `file` source naming an upload of `POST /v1/files`) stand in
the user's turn as their text, after their `title` and `context` lines. With a reasoning
parser (`--reasoning-parser`) the thinking comes back as a `thinking` block, and `thinking`
(`enabled` with `budget_tokens`, or `disabled`: a budget of 0) bounds it; without one,
enabled thinking is a 400. Images, PDFs, citations and server tools are 400s naming the field.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dist_runtime.engine.engine import SamplingError
from dist_runtime.server.calls import (
    APIError,
    chat_prompt,
    client_stop,
    functions_of,
    gather,
    merged,
    start_chat,
)
from dist_runtime.server.schemas import (
    ChatMessage,
    SamplingFields,
    UnsupportedFieldError,
    _Request,
    check_tool_choice,
    check_tool_types,
)

if TYPE_CHECKING:
    from dist_runtime.engine.outputs import RequestOutput
    from dist_runtime.server.app import _Server

_NAME = r"^[A-Za-z0-9_.-]{1,64}$"


class AnthropicTool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str | None = None
    name: str = Field(pattern=_NAME)
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})


class AnthropicToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class ThinkingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["enabled", "disabled"]
    budget_tokens: int | None = Field(default=None, ge=1)


class MessagesRequest(_Request):
    model: str | None = None
    max_tokens: int = Field(ge=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    stop_sequences: list[str] | None = None
    stream: bool = False
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    metadata: dict[str, Any] | None = None
    priority: int = Field(default=0, ge=-(2**31), lt=2**31)
    """An extra (as vLLM's): scheduling priority, lower first."""

    thinking: ThinkingConfig | None = None
    """Extended thinking, for a reasoning model (`--reasoning-parser`): `enabled` bounds its
    thinking to `budget_tokens` (then `</think>` is forced), `disabled` closes it at once."""

    @model_validator(mode="before")
    @classmethod
    def _no_unsupported(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        check_tool_types(
            data.get("tools"), (None, "custom"), "give custom tools (name, input_schema)"
        )
        return data

    @model_validator(mode="after")
    def _budget_fits(self) -> MessagesRequest:
        thinking = self.thinking
        if thinking is not None and thinking.type == "enabled":
            if thinking.budget_tokens is None:
                raise UnsupportedFieldError(
                    "thinking.budget_tokens", "enabled thinking needs budget_tokens"
                )
            if thinking.budget_tokens >= self.max_tokens:
                raise UnsupportedFieldError(
                    "thinking.budget_tokens",
                    f"thinking.budget_tokens ({thinking.budget_tokens}) must be less than "
                    f"max_tokens ({self.max_tokens}): the thinking is part of the output",
                )
        return self

    def thinking_budget(self, reasoning: bool) -> int | None:
        """The answer's thinking budget on a server with (`reasoning`) or without a reasoning
        parser; a 400 for thinking asked of a model that has none."""
        thinking = self.thinking
        if thinking is None:
            return None
        if not reasoning:
            if thinking.type == "enabled":
                raise APIError(
                    400,
                    "extended thinking needs a reasoning model: start the server with "
                    "--reasoning-parser (deepseek_r1 or qwen3), or leave thinking out",
                    param="thinking",
                )
            return None
        return thinking.budget_tokens if thinking.type == "enabled" else 0

    @model_validator(mode="after")
    def _choice_fits(self) -> MessagesRequest:
        choice = self.tool_choice
        check_tool_choice(
            [t.name for t in self.tools or []],
            choice is not None and choice.type in ("any", "tool"),
            choice.name or "" if choice is not None and choice.type == "tool" else None,
        )
        if any(not s for s in self.stop_sequences or []):
            raise UnsupportedFieldError("stop_sequences", "stop sequences must not be empty")
        return self

    @property
    def tool_mode(self) -> str:
        choice = self.tool_choice
        if not self.tools or (choice is not None and choice.type == "none"):
            return "none"
        if choice is None or choice.type == "auto":
            return "auto"
        return "required" if choice.type == "any" else "named"

    def sampling(self, reasoning: bool) -> SamplingFields:
        return SamplingFields(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop=self.stop_sequences or None,
            priority=self.priority,
            model=self.model,
            thinking_token_budget=self.thinking_budget(reasoning),
        )


def chat_messages(
    system: str | list[dict[str, Any]] | None, messages: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Chat messages ({"role", "content", "tool_calls", "tool_call_id"}) of a request's system
    prompt and messages; a bad block is an `APIError` naming it."""
    out: list[dict[str, Any]] = []
    if system:
        out.append({"role": "system", "content": _texts(system, "system")})
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("user", "assistant"):
            raise APIError(400, f"role {role!r} is not user or assistant", param=f"{where}.role")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise APIError(400, "content must be a string or a list of blocks", f"{where}.content")
        parts: list[dict[str, Any]] = []
        calls: list[dict[str, Any]] = []
        for j, block in enumerate(content):
            kind = block.get("type") if isinstance(block, dict) else None
            at = f"{where}.content.{j}"
            if kind == "text" and isinstance(block.get("text"), str):
                parts.append({"type": "text", "text": block["text"]})
            elif kind == "document" and role == "user":
                parts += _document(block, at)
            elif kind == "tool_use" and role == "assistant":
                if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                    raise APIError(400, "a tool_use block needs id and name", param=at)
                arguments = json.dumps(block.get("input") or {}, ensure_ascii=False)
                function = {"name": block["name"], "arguments": arguments}
                calls.append({"id": block["id"], "type": "function", "function": function})
            elif kind == "tool_result" and role == "user":
                if not isinstance(block.get("tool_use_id"), str):
                    raise APIError(400, "a tool_result block needs tool_use_id", param=at)
                result = block.get("content") or ""
                text = result if isinstance(result, str) else _texts(result, f"{at}.content")
                if block.get("is_error"):
                    text = f"Error: {text}"
                out.append({"role": "tool", "content": text, "tool_call_id": block["tool_use_id"]})
            elif kind in ("thinking", "redacted_thinking") and role == "assistant":
                continue  # another model's reasoning, sent back with its answer
            else:
                raise APIError(
                    400,
                    f"content block type {kind!r} is not supported in a {role} turn: this "
                    "model reads text (and tool_use / tool_result blocks)",
                    param=f"{at}.type",
                )
        if parts or calls or role == "assistant":
            text_only = all(p["type"] == "text" for p in parts)
            body = "".join(p["text"] for p in parts) if text_only else parts
            message: dict[str, Any] = {"role": role, "content": body}
            if calls:
                message["tool_calls"] = calls
            out.append(message)
    return out


def _document(block: dict[str, Any], at: str) -> list[dict[str, Any]]:
    """Chat parts of a `document` block: its `title` and `context` lines (when given), then the
    document's text (a `text` source, a base64 `text/plain` one, or an upload's `file_id`)."""
    citations = block.get("citations")
    if isinstance(citations, dict) and citations.get("enabled"):
        raise APIError(
            400, "citations are not supported by this model; leave them out", f"{at}.citations"
        )
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    head = "".join(f"{block[k]}\n" for k in ("title", "context") if isinstance(block.get(k), str))
    parts = [{"type": "text", "text": head + "\n"}] if head else []
    if kind == "text" and isinstance(source, dict) and isinstance(source.get("data"), str):
        return [*parts, {"type": "text", "text": source["data"]}]
    if kind == "base64" and isinstance(source, dict) and isinstance(source.get("data"), str):
        if source.get("media_type") != "text/plain":
            raise APIError(
                400,
                f"a document of media_type {source.get('media_type')!r} is not read here: "
                "send text/plain (this model reads text, no PDF)",
                param=f"{at}.source.media_type",
            )
        return [*parts, {"type": "file", "file": {"file_data": source["data"]}}]
    if kind == "file" and isinstance(source, dict) and isinstance(source.get("file_id"), str):
        return [*parts, {"type": "file", "file": {"file_id": source["file_id"]}}]
    raise APIError(
        400,
        f"document source type {kind!r} is not read here: give a text source, base64 text/plain "
        "data or a file_id (POST /v1/files)",
        param=f"{at}.source",
    )


def _texts(blocks: Any, where: str) -> str:
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise APIError(400, "must be a string or a list of text blocks", param=where)
    texts = []
    for j, block in enumerate(blocks):
        if not (isinstance(block, dict) and block.get("type") == "text"
                and isinstance(block.get("text"), str)):  # fmt: skip
            raise APIError(400, "only text blocks are supported here", param=f"{where}.{j}.type")
        texts.append(block["text"])
    return "".join(texts)


def stop_fields(
    out: RequestOutput, calls: list[tuple[str, str]], requested: list[str] | None
) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of an answer; only the client's own stop sequences are
    named (not one the tool-call format added)."""
    if calls:
        return "tool_use", None
    if out.finish_reason == "length":
        return "max_tokens", None
    sequence = client_stop(out.stop_reason, requested)
    if isinstance(sequence, str):
        return "stop_sequence", sequence
    return "end_turn", None


def _thinking_block(text: str) -> dict[str, Any]:
    """A reasoning model's thinking (`--reasoning-parser`) as Anthropic's thinking block
    (unsigned: it is not checked when sent back, and is dropped from the prompt then)."""
    return {"type": "thinking", "thinking": text, "signature": ""}


ANTHROPIC_PING = 'event: ping\ndata: {"type": "ping"}\n\n'
"""Anthropic's keep-alive event (its SDK skips it)."""


def _tool_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


def add_messages_routes(app: FastAPI, server: _Server) -> None:

    def messages_of(req: MessagesRequest) -> list[ChatMessage]:
        try:
            return [ChatMessage.model_validate(m) for m in chat_messages(req.system, req.messages)]
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e

    def functions(req: MessagesRequest) -> Any:
        return functions_of([(t.name, t.description, t.input_schema) for t in req.tools or []])

    def prefilled(req: MessagesRequest, messages: list[ChatMessage]) -> bool:
        """A last assistant message starts the answer (Anthropic's prefill)."""
        last = messages[-1]
        if last.role != "assistant":
            return False
        if last.tool_calls:
            raise APIError(
                400,
                "the last message is the assistant's tool_use: answer it with a user message "
                "holding its tool_result",
                param=f"messages.{len(req.messages) - 1}",
            )
        return bool(last.text().strip())

    @app.post("/v1/messages")
    async def create(req: MessagesRequest, request: Request) -> Any:
        server.check_model(req.model)
        choice = req.tool_choice
        messages = messages_of(req)
        run = await start_chat(
            server,
            req.sampling(server.reasoning),
            messages,
            functions(req),
            req.tool_mode,
            choice.name if choice is not None and choice.type == "tool" else None,
            not (choice is not None and choice.disable_parallel_tool_use),
            req.max_tokens,
            None,
            1,
            prefilled(req, messages),
        )
        mid = f"msg_{uuid.uuid4().hex}"

        def usage(out: RequestOutput | None) -> dict[str, Any]:
            cached = out.num_cached_tokens if out is not None else 0
            return {
                "input_tokens": len(run.ids) - cached,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": cached,
                "output_tokens": len(out.token_ids) if out is not None else 0,
            }

        def tool_block(call: tuple[str, str]) -> dict[str, Any]:
            return {"type": "tool_use", "id": _tool_id(), "name": call[0],
                    "input": json.loads(call[1])}  # fmt: skip

        def account(out: RequestOutput) -> None:
            request.state.usage = {
                "prompt_tokens": len(run.ids), "completion_tokens": len(out.token_ids)
            }  # fmt: skip

        if not req.stream:
            (out,) = await gather(run.handles, request)
            splits = run.thoughts()
            thought, answer = (None, out.text) if splits is None else splits.split(out.text)
            text, calls = run.splitter().feed(answer, out.finish_reason)
            content = [] if thought is None else [_thinking_block(thought)]
            if text or not calls:
                content.append({"type": "text", "text": text})
            content += [tool_block(c) for c in calls]
            reason, sequence = stop_fields(out, calls, req.stop_sequences)
            account(out)
            return {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "model": server.model_name(req.model),
                "content": content,
                "stop_reason": reason,
                "stop_sequence": sequence,
                "usage": usage(out),
            }

        async def events() -> AsyncIterator[str]:
            def event(kind: str, **fields: Any) -> str:
                return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n"

            yield event("message_start", message={
                "id": mid, "type": "message", "role": "assistant",
                "model": server.model_name(req.model),
                "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage(None),
            })  # fmt: skip
            split = run.splitter()
            index = -1  # the open text block's index
            thoughts = run.thoughts()
            blocks = 0  # blocks started
            thinking = -1  # the thinking block's index, while it is open
            tool = -1  # the open tool_use block's index
            call_blocks: dict[int, int] = {}  # call index -> its block's index

            def open_text() -> list[str]:
                nonlocal index, blocks, thinking
                closed = [event("content_block_stop", index=thinking)] if thinking >= 0 else []
                thinking, index, blocks = -1, blocks, blocks + 1
                start = event("content_block_start", index=index,
                              content_block={"type": "text", "text": ""})  # fmt: skip
                return [*closed, start]

            def close_open() -> list[str]:
                """Stop the open thinking, text or tool_use block."""
                nonlocal thinking, index, tool
                closed = []
                if thinking >= 0:
                    signed = {"type": "signature_delta", "signature": ""}
                    closed.append(event("content_block_delta", index=thinking, delta=signed))
                for at in (thinking, index, tool):
                    if at >= 0:
                        closed.append(event("content_block_stop", index=at))
                thinking = index = tool = -1
                return closed

            def call_events(pieces: list[dict[str, Any]]) -> list[str]:
                """A tool_use block once a call's name is whole, then its input's JSON as it
                comes."""
                nonlocal blocks, tool
                events: list[str] = []
                for d in pieces:
                    if "id" in d:
                        events += close_open()
                        tool, blocks = blocks, blocks + 1
                        call_blocks[d["index"]] = tool
                        block = {"type": "tool_use", "id": _tool_id(),
                                 "name": d["function"]["name"], "input": {}}  # fmt: skip
                        events.append(event("content_block_start", index=tool,
                                            content_block=block))  # fmt: skip
                    piece = d["function"].get("arguments")
                    if piece:
                        json_delta = {"type": "input_json_delta", "partial_json": piece}
                        events.append(event("content_block_delta", index=call_blocks[d["index"]],
                                            delta=json_delta))  # fmt: skip
                return events

            try:
                async for _, delta in merged(run.handles):
                    said = delta.text
                    if thoughts is not None:
                        thought, said = thoughts.feed(said, delta.finish_reason is not None)
                        if thought and index < 0 and not call_blocks:
                            if thinking < 0:
                                thinking, blocks = blocks, blocks + 1
                                yield event("content_block_start", index=thinking,
                                            content_block=_thinking_block(""))  # fmt: skip
                            step = {"type": "thinking_delta", "thinking": thought}
                            yield event("content_block_delta", index=thinking, delta=step)
                    # text, and calls' pieces as they come (required, or auto once a call opens)
                    piece, pieces, _ = split.stream(said, delta.finish_reason)
                    if piece and not call_blocks:
                        for e in open_text() if index < 0 else []:
                            yield e
                        yield event("content_block_delta", index=index,
                                    delta={"type": "text_delta", "text": piece})  # fmt: skip
                    for e in call_events(pieces):
                        yield e
            except Exception as error:
                kind = "invalid_request_error" if isinstance(error, SamplingError) else "api_error"
                yield event("error", error={"type": kind, "message": str(error)})
                return
            out = run.handles[0].result(timeout=0)
            if index < 0 and not call_blocks and not split.streams_calls:
                for e in open_text():  # (a required call cut short has no block at all)
                    yield e
            for e in close_open():
                yield e
            reason, sequence = stop_fields(out, split.final_calls, req.stop_sequences)
            account(out)
            yield event("message_delta", delta={"stop_reason": reason, "stop_sequence": sequence},
                        usage={"output_tokens": len(out.token_ids)})  # fmt: skip
            yield event("message_stop")

        return server.sse(events(), ping=ANTHROPIC_PING)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(req: CountRequest) -> dict[str, Any]:
        """The prompt's tokens, as /v1/messages would build it (tools included)."""
        server.check_model(req.model)
        try:  # checked as /v1/messages checks them
            as_messages = MessagesRequest.model_validate(
                {"max_tokens": 1, "messages": req.messages, "system": req.system,
                 "tools": req.tools}
            )  # fmt: skip
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from e
        messages = messages_of(as_messages)
        ids = await asyncio.to_thread(
            chat_prompt, server, messages, functions(as_messages), False,
            prefilled(as_messages, messages),
        )  # fmt: skip
        return {"input_tokens": len(ids)}


class CountRequest(_Request):
    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
