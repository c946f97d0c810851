"""How server routes call the engine: a chat request's prompt (in the model's tool-call format)
and its requests (`start_chat`), reading handles on the event loop (`gather`, `merged`; a
client that disconnects aborts its requests), and `APIError`, the error a route answers with.
Shared by the chat, completion and Responses routes."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request

from dist_runtime.engine.engine import SamplingError
from dist_runtime.engine.handle import RequestHandle
from dist_runtime.engine.outputs import RequestOutput
from dist_runtime.sampling_params import SamplingParams
from dist_runtime.server.reasoning import ReasoningSplitter, opens_thinking, reasoning_tokens
from dist_runtime.server.schemas import ChatMessage, FilePart, SamplingFields
from dist_runtime.server.tools import INTERNLM2_CALLS, CallSplitter, Function, tool_format_for
from dist_runtime.text.chat import ChatTemplateError, chat_template, template_variables
from dist_runtime.text.tokenizer import Tokenizer

if TYPE_CHECKING:
    from dist_runtime.server.app import _Server


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )


@dataclass
class ChatRun:
    """A chat request in the engine: its prompt ids, one handle per choice, and a new
    `CallSplitter` per choice when it offered tools (None otherwise)."""

    ids: list[int]
    handles: list[RequestHandle]
    splitter: Callable[[], CallSplitter]
    thinks: bool = False
    """A reasoning parser splits the answers' thinking off (never a required call's)."""
    opened: bool = False
    """The prompt ends inside an opened `<think>`."""
    tokenizer: Tokenizer | None = None

    def thoughts(self) -> ReasoningSplitter | None:
        """A new splitter of one answer's thinking, None when there is none to split."""
        return ReasoningSplitter(self.opened) if self.thinks else None

    def thinking_tokens(self, out: RequestOutput) -> int:
        """How many of an answer's tokens are thinking."""
        return reasoning_tokens(self.tokenizer, out.token_ids, self.opened) if self.thinks else 0


async def start_chat(
    server: _Server,
    sampling: SamplingFields,
    messages: list[ChatMessage],
    functions: list[Function] | None,
    mode: str,
    named: str | None,
    parallel: bool,
    max_tokens: int | None,
    logprobs: int | None,
    n: int,
    continue_final: bool = False,
    template_kwargs: dict[str, Any] | None = None,
    template: str | None = None,
    documents: list[dict[str, str]] | None = None,
    generation_prompt: bool = True,
    special_tokens: bool = False,
) -> ChatRun:
    """Build a chat prompt in the model's tool-call format and add its `n` requests: a
    required (`mode` "required", or "named" for function `named`) call's answer is held to
    the call's schema; answers that may call keep what marks a call; with `continue_final`
    the answer continues the assistant's last message."""
    functions = functions if mode != "none" else None
    fmt = server.tool_format
    calling = bool(functions) and mode in ("required", "named")
    if calling and continue_final:
        raise APIError(
            400,
            "a required tool call and continuing the assistant's last message cannot combine",
            param="tool_choice",
        )
    if calling and not generation_prompt:
        raise APIError(
            400,
            "a required tool call is the assistant's answer: it needs the assistant's turn "
            "opened (leave add_generation_prompt out)",
            param="tool_choice",
        )
    ids = await asyncio.to_thread(
        chat_prompt,
        server,
        messages,
        functions,
        calling,
        continue_final,
        template_kwargs,
        template,
        documents,
        generation_prompt,
        special_tokens,
    )
    if sampling.truncate_prompt_tokens is not None:  # vLLM's: the prompt's last tokens only
        ids = ids[-sampling.truncate_prompt_tokens :]
    if max_tokens is None:
        max_tokens = server.default_max_tokens(len(ids))
    call_format = None
    if calling and functions:
        chosen = [f for f in functions if named is None or f.name == named]
        call_format = fmt.call_schema(chosen, parallel and mode == "required")
        try:
            SamplingParams(json_schema=call_format)
        except ValueError as e:
            raise APIError(400, f"tools: a function's parameters: {e}", param="tools") from e
    params = [
        server.params(sampling, max_tokens, logprobs, i, sampling.prompt_logprobs, call_format)
        for i in range(n)
    ]
    if functions and not calling and (fmt.stop or fmt.keep_special_tokens):
        params = [
            dataclasses.replace(
                p,
                stop=p.stop + tuple(s for s in fmt.stop if s not in p.stop),
                skip_special_tokens=p.skip_special_tokens and not fmt.keep_special_tokens,
            )
            for p in params
        ]
    handles = server.add([ids] * n, params, "messages")

    def splitter() -> CallSplitter:
        return CallSplitter(fmt, functions or [], parallel, calling)

    tokenizer = server.runtime.tokenizer
    thinks = server.reasoning and not calling
    opened = thinks and opens_thinking(tokenizer, ids)
    return ChatRun(ids, handles, splitter, thinks, opened, tokenizer)


def functions_of(
    tools: list[tuple[str, str | None, dict[str, Any] | None]],
) -> list[Function] | None:
    """Functions from (name, description, parameters); None for none."""
    return [Function(*t) for t in tools] or None


def message_text(server: _Server, message: ChatMessage, index: int) -> str:
    """A message's text, files read (an upload or base64 data, text only) where they stand."""
    if not isinstance(message.content, list):
        return message.content or ""
    texts = []
    for j, part in enumerate(message.content):
        if isinstance(part, FilePart):
            texts.append(server.file_text(part.file, f"messages.{index}.content.{j}.file"))
        else:
            texts.append(part.text)
    return "".join(texts)


def chat_prompt(
    server: _Server,
    messages: list[ChatMessage],
    functions: list[Function] | None,
    calling: bool,
    continue_final: bool = False,
    template_kwargs: dict[str, Any] | None = None,
    template: str | None = None,
    documents: list[dict[str, str]] | None = None,
    generation_prompt: bool = True,
    special_tokens: bool = False,
) -> list[int]:
    """A chat request's prompt ids, in the model's tool-call format (run off the event loop:
    a million-token document takes seconds); `special_tokens`: with the tokens the tokenizer
    adds to a text (BOS) on top of the template's (vLLM's chat `add_special_tokens`).
    `template` is the request's own chat template
    (vLLM's `chat_template`, with `--trust-request-chat-template`), `documents` the template's
    `documents` (vLLM's, for templates that write retrieved documents)."""
    tokenizer = server.runtime.tokenizer
    if tokenizer is None:
        raise APIError(400, f"{server.runtime.config.model} has no tokenizer; chat needs one")
    fmt = server.tool_format
    if template is not None:
        server.check_request_templates()
        tokenizer = copy.copy(tokenizer)
        tokenizer.chat_template = template
        try:
            own = tool_format_for(tokenizer, server.settings.tool_call_format)
        except ValueError as e:
            raise APIError(400, str(e), param="chat_template") from e
        if functions and (type(own), vars(own)) != (type(fmt), vars(fmt)):
            raise APIError(
                400,
                f"this chat_template writes tool calls in the {own.name} format and the server "
                f"reads them in its {fmt.name} format (--tool-call-format); leave tools or "
                "chat_template out",
                param="chat_template",
            )
        fmt = own  # the template writes the prompt (not InternLM2's ChatML)
    if documents is not None:
        if "documents" in (template_kwargs or {}):
            raise APIError(
                400,
                "give documents or chat_template_kwargs.documents, not both",
                param="documents",
            )
        if fmt is INTERNLM2_CALLS:
            raise APIError(
                400,
                "documents go to a chat template, and this server writes InternLM2's ChatML "
                "itself (its tool-call format); put the documents' text in the messages",
                param="documents",
            )
        template_kwargs = {**(template_kwargs or {}), **_documents(tokenizer, documents)}
    try:
        turns = fmt.turns(
            [
                {
                    "role": m.template_role,
                    "content": message_text(server, m, i),
                    "tool_calls": [c.model_dump() for c in m.tool_calls or []],
                    "tool_call_id": m.tool_call_id,
                }
                for i, m in enumerate(messages)
            ],
            functions,
        )
        ids = fmt.encode(
            tokenizer, turns, functions, calling, continue_final, template_kwargs, generation_prompt
        )
    except (ValueError, RecursionError) as e:
        what = str(e) if isinstance(e, ValueError) else "a value nests too deeply"
        mine = template is not None and isinstance(e, ChatTemplateError)
        raise APIError(400, what, param="chat_template" if mine else "messages") from e
    if not special_tokens:
        return ids
    before, after = special_ids(tokenizer)
    return [*before, *ids, *after]


def special_ids(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds before and after a text's own (BOS; EOS for some)."""
    bare = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    at = next(
        (k for k in range(len(full) - len(bare) + 1) if full[k : k + len(bare)] == bare), None
    )
    if at is None:  # (a tokenizer that changes the text's own ids: add nothing)
        return [], []
    return full[:at], full[at + len(bare) :]


def _documents(tokenizer: Tokenizer, documents: list[dict[str, str]]) -> dict[str, Any]:
    """The template variables for a request's `documents`: a 400 naming `documents` when the
    chat template would not write them (none, or one that never reads `documents`)."""
    template = chat_template(tokenizer)
    if template is None or "documents" not in template_variables(template):
        raise APIError(
            400,
            "documents go to a chat template that writes them (reads `documents`), and this "
            "model's does not; put the documents' text in the messages",
            param="documents",
        )
    return {"documents": documents}


async def gather(handles: list[RequestHandle], request: Request) -> list[RequestOutput]:
    """Every handle's output, read on the event loop (deltas consumed, never blocking). A client
    that disconnects first aborts the requests (499 in the access log)."""

    async def read() -> None:
        for h in handles:
            async for _ in h:
                pass

    reader = asyncio.ensure_future(read())
    watcher = asyncio.ensure_future(disconnect(request))
    finished = False
    try:
        await asyncio.wait((reader, watcher), return_when=asyncio.FIRST_COMPLETED)
        if not reader.done():
            raise APIError(499, "the client disconnected", code="client_disconnected")
        try:
            reader.result()  # a failed request raises here
        except SamplingError as e:
            raise APIError(400, str(e)) from e
        finished = True
        return [h.result(timeout=0) for h in handles]
    finally:
        watcher.cancel()
        reader.cancel()
        if not finished:
            for h in handles:
                h.abort()


async def disconnect(request: Request) -> None:
    """Returns when the client has disconnected (the body is already read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar("caller", default=None)
"""The name of the API key the request being served came with (set by the app's middleware,
or by the batch runner for a batch's requests: its creator's); engine requests added while
serving it are accounted to it."""

SSE_COMMENT = ": keep-alive\n\n"
"""An SSE comment: every SSE client skips it; proxies see bytes flow."""


async def keep_alive(
    body: AsyncIterator[str], every: float, ping: str = SSE_COMMENT
) -> AsyncGenerator[str, None]:
    """`body`'s events, with `ping` sent whenever none came for `every` seconds: a stream
    whose first token waits on a long prefill (minutes for a million-token prompt) would
    otherwise send nothing, and proxies close connections idle for a minute or so. Closing
    this stream (the client left) closes `body`, whose own clean-up aborts its requests."""
    events = body.__aiter__()
    step: asyncio.Future[str] | None = None
    try:
        while True:
            step = asyncio.ensure_future(events.__anext__())
            while True:
                done, _ = await asyncio.wait({step}, timeout=every)
                if done:
                    break
                yield ping
            try:
                event = step.result()
            except StopAsyncIteration:
                return
            yield event
    finally:
        if step is not None and not step.done():
            step.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await step
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


async def merged(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, Any]]:
    """(index, delta) of every handle as they arrive, in arrival order."""
    import asyncio

    if len(handles) == 1:  # the common case: no tasks, no queue
        try:
            async for delta in handles[0]:
                yield 0, delta
        finally:
            handles[0].abort()
        return

    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(i: int, h: RequestHandle) -> None:
        try:
            async for delta in h:
                await queue.put((i, delta))
            await queue.put((i, None))
        except BaseException as e:
            await queue.put((i, e))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    try:
        left = len(handles)
        while left:
            i, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for h in handles:
            h.abort()


def client_stop(reason: str | int | None, requested: Any) -> str | int | None:
    """A finished request's `stop_reason` as its client may see it: a stop string only if the
    client asked for it (not one the server added, like InternLM2's `<|action_end|>`)."""
    if isinstance(reason, str):
        asked = [requested] if isinstance(requested, str) else list(requested or ())
        return reason if reason in asked else None
    return reason


def list_page(
    items: list[dict[str, Any]], after: str | None, limit: int, most: int
) -> dict[str, Any]:
    """One page of a list (OpenAI's cursor pagination: the items after the one named)."""
    if not 1 <= limit <= most:
        raise APIError(400, f"limit must be in 1..{most}, got {limit}", param="limit")
    if after is not None:
        at = next((i for i, x in enumerate(items) if x["id"] == after), None)
        if at is None:
            raise APIError(404, f"no object {after!r} to list after", "not_found_error", "after")
        items = items[at + 1 :]
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }
