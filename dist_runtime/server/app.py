"""The OpenAI-compatible HTTP server: one FastAPI app in front of a Runtime's engine.

    app = create_app(runtime, ServerSettings(served_model_name="internlm2_5-7b-chat"))
    uvicorn.run(app, host="127.0.0.1", port=23333)

Every HTTP request is one more engine client: it adds requests and reads their handles on the
event loop (never blocking it); a client that disconnects, mid-stream or while waiting for a
whole answer, aborts its requests. Routes: `/v1/models` (and `/v1/models/{name}`),
`/v1/chat/completions`, `/v1/completions` (SSE with `stream: true`), the Responses API under
`/v1/responses` (`dist_runtime.server.responses`), Anthropic's `/v1/messages`
(`dist_runtime.server.anthropic`), the document-QA jobs under `/v1/jobs`,
vLLM's `/tokenize`, `/detokenize` and `/reset_prefix_cache` (when enabled), `/health`, `/metrics`
and the chat page at `/`.
Errors are `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from dist_runtime.beam_search import Beam, BeamSearchCancelled, BeamSearchParams
from dist_runtime.engine.engine import SamplingError
from dist_runtime.engine.handle import RequestHandle
from dist_runtime.engine.outputs import RequestDelta, RequestOutput, TokenLogprobs
from dist_runtime.jobs.store import (
    IdempotencyKeyConflictError,
    JobState,
    JobStatus,
    UnknownJobError,
)
from dist_runtime.lora import AdapterConflictError, AdapterNotFoundError
from dist_runtime.runtime import Runtime
from dist_runtime.sampling_params import SamplingParams
from dist_runtime.server.calls import (
    CALLER,
    SSE_COMMENT,
    APIError,
    chat_prompt,
    client_stop,
    disconnect,
    functions_of,
    gather,
    keep_alive,
    list_page,
    merged,
    message_text,
    start_chat,
)
from dist_runtime.server.metrics import ServerMetrics
from dist_runtime.server.reasoning import (
    REASONING_PARSERS,
    ReasoningSplitter,
    opens_thinking,
)
from dist_runtime.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    FileRef,
    JobRequest,
    LoadLoraRequest,
    NamedToolChoice,
    ResponseFormat,
    SamplingFields,
    TokenizeRequest,
    Tool,
    UnloadLoraRequest,
    UnsupportedFieldError,
    error_body,
)
from dist_runtime.server.tools import (
    JSON_CALLS,
    Function,
    ToolFormat,
    tool_calls_json,
    tool_format_for,
)

logger = logging.getLogger("dist_runtime.server")
KEYED_PATHS = ("/v1/", "/tokenize", "/detokenize", "/reset_prefix_cache")
"""Routes that need an API key when the server has keys."""
REQUEST_ID_HEADER = "x-request-id"
"""Every answer carries one (OpenAI's header; the official client shows it as `_request_id`):
the caller's own, when it sent a usable one, else a new one. The access log names it."""
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


def request_id(given: str | None) -> str:
    """The id of a request: the caller's `x-request-id` when it is 1-128 plain characters,
    else a new `req_...`."""
    if given is not None and _REQUEST_ID.match(given):
        return given
    return f"req_{uuid.uuid4().hex}"


@dataclass(frozen=True)
class ServerSettings:
    served_model_name: str
    api_keys: tuple[str, ...] = ()
    """Bearer keys accepted on /v1/*; empty: no key needed."""
    api_key_names: tuple[str, ...] = ()
    """A name per key, for the per-key metrics and the access log (default key1, key2, ...)."""
    allowed_origins: tuple[str, ...] = ()
    """CORS origins allowed to call the API from a browser; empty: same origin only."""
    max_request_bytes: int = 64 * 2**20
    max_concurrent_requests: int = 256
    """Generation requests in flight at once; past it, 429."""
    max_concurrent_requests_per_key: int | None = None
    """Of those, one API key's at most (so one tenant cannot take every place); None: no
    limit of its own."""
    tool_call_format: str = "auto"
    """How tools and calls are written for the model: auto, json or internlm2 (see
    `dist_runtime.server.tools`)."""
    reasoning_parser: str | None = None
    """Return a reasoning model's thinking (`<think>` ... `</think>`) as `reasoning_content`
    apart from its answer: "deepseek_r1" or "qwen3" (`dist_runtime.server.reasoning`)."""
    sse_keepalive_s: float = 15.0
    """A stream that sent nothing for this long (a long prefill before the first token) sends
    a keep-alive (an SSE comment; Anthropic's `ping` event on /v1/messages); 0: never."""
    max_file_bytes: int = 200 * 2**20
    """Largest upload to /v1/files (a batch's requests)."""
    max_files_bytes_per_key: int | None = 100 * 2**30
    """Most bytes of files (uploads, batch outputs) one API key may hold (OpenAI's default
    storage limit: 100 GB); None: no limit."""
    batch_priority: int = 1
    """Added to each batch request's priority (lower runs first): 1 lets interactive
    requests go first."""
    key_weights: dict[str, float] = field(default_factory=dict)
    """Each API key's share of the engine under the fair share (1 when absent): a key of
    weight 2 gets twice the turns of one of weight 1 among requests of one priority."""
    min_priority: int | None = None
    """The most important priority a request may ask for (lower is more important): on a
    server many share, 0 keeps any caller from going ahead of everyone else's interactive
    requests; None: any."""
    batch_max_in_flight: int | None = None
    """Batch requests in flight at once, all batches together (default: half of
    max_concurrent_requests)."""
    enable_lora_loading: bool = False
    """Serve /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's): callers with a key
    load adapters from folders on the server's disk. Off: those routes are 403."""
    trust_request_chat_template: bool = False
    """Render a chat request's own `chat_template` (vLLM's field and flag). A template runs in
    jinja2's sandbox, but it is code the caller chose: its loops can keep a CPU busy. Off:
    such a request is a 400."""
    enable_cache_reset: bool = False
    """Serve POST /reset_prefix_cache (vLLM's route): callers with a key make the runtime forget
    its prefix cache, the disk tier's files included. Off: that route is 403."""
    extra_info: dict[str, Any] = field(default_factory=dict)


def create_app(runtime: Runtime, settings: ServerSettings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # go on with the batches and background responses a previous server left
        await app.state.batches.startup()
        await app.state.responses.startup()
        try:
            yield
        finally:
            await app.state.responses.shutdown()
            await app.state.batches.shutdown()

    app = FastAPI(
        title="dist-runtime", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    server = _Server(runtime, settings)
    app.state.server = server
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.allowed_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", REQUEST_ID_HEADER],
            expose_headers=[REQUEST_ID_HEADER],
        )
    app.add_middleware(
        _BodyLimit,
        max_bytes=settings.max_request_bytes,
        paths={"/v1/files": (settings.max_file_bytes, "--max-file-mb")},
    )
    _add_error_handlers(app)
    _add_routes(app, server)
    from dist_runtime.server.anthropic import add_messages_routes
    from dist_runtime.server.batches import add_batch_routes
    from dist_runtime.server.responses import add_responses_routes

    app.state.responses = add_responses_routes(app, server)
    add_messages_routes(app, server)
    app.state.batches = add_batch_routes(app, server)
    server.file_text = app.state.batches.file_text
    server.metrics.batch_counts = app.state.batches.counts

    @app.middleware("http")
    async def access_log(request: Request, call_next: Callable[[Request], Awaitable[Any]]) -> Any:
        start = time.perf_counter()
        rid = request_id(request.headers.get(REQUEST_ID_HEADER))
        caller = CALLER.get() or server.key_name(request)  # (a batch's requests: its creator)
        CALLER.set(caller)
        if request.url.path.startswith(KEYED_PATHS) and not server.key_ok(request):
            return JSONResponse(
                error_body(
                    "missing or wrong API key: send 'Authorization: Bearer <key>' (or "
                    "'x-api-key: <key>')",
                    "authentication_error",
                    code="invalid_api_key",
                    path=request.url.path,
                    status=401,
                ),
                status_code=401,
                headers={REQUEST_ID_HEADER: rid},
            )
        response = await call_next(request)
        response.headers[REQUEST_ID_HEADER] = rid

        def log() -> None:
            usage = getattr(request.state, "usage", None) or {}
            logger.info(
                "%s %s %d prompt=%s completion=%s %.3fs id=%s%s",
                request.method,
                request.url.path,
                response.status_code,
                usage.get("prompt_tokens", "-"),
                usage.get("completion_tokens", "-"),
                time.perf_counter() - start,
                rid,
                f" key={caller}" if caller else "",
            )

        if response.headers.get("content-type", "").startswith("text/event-stream"):
            body = response.body_iterator

            async def logged() -> AsyncIterator[Any]:
                try:
                    async for part in body:
                        yield part
                finally:
                    log()  # a stream's line is written when it ends, with its token counts

            response.body_iterator = logged()
        else:
            log()
        return response

    return app


class _Server:
    def __init__(self, runtime: Runtime, settings: ServerSettings):
        self.runtime = runtime
        self.settings = settings
        if settings.served_model_name in runtime.engine.adapters:
            raise ValueError(
                f"the served model name {settings.served_model_name!r} is also a LoRA adapter's "
                "name; give the adapter another name in --lora-modules (or --served-model-name)"
            )
        self.in_flight = 0
        """Generation requests not yet ended; the event loop adds, engine callbacks subtract."""
        if settings.reasoning_parser not in (None, *REASONING_PARSERS):
            raise ValueError(
                f"reasoning parser {settings.reasoning_parser!r} is not one of "
                f"{list(REASONING_PARSERS)}"
            )
        self.reasoning = settings.reasoning_parser is not None
        """Thinking is returned apart from the answer (`dist_runtime.server.reasoning`)."""
        unknown = sorted(set(settings.key_weights) - set(settings.api_key_names))
        if unknown:
            raise ValueError(
                f"--key-weights names {unknown}, which --api-keys does not name; name keys "
                "as NAME=KEY there"
            )
        # (a dict the engine thread only reads: one update under the GIL is safe)
        runtime.engine.scheduler.weights.update(settings.key_weights)
        self.file_text: Callable[[FileRef, str], str] = _no_files
        """The text of a file a message refers to (`Batches.file_text` reads the uploads)."""
        self.in_flight_by: dict[str | None, int] = {}
        """Of those, each API key's (by name)."""
        self._in_flight_lock = threading.Lock()
        self.metrics = ServerMetrics(runtime.engine, runtime.job_counts)
        self.created = int(time.time())
        tok = runtime.tokenizer
        self.tool_format: ToolFormat = (
            tool_format_for(tok, settings.tool_call_format) if tok is not None else JSON_CALLS
        )
        logger.info("tool calls in the %s format", self.tool_format.name)

    # -- checks ---------------------------------------------------------------------------------
    def key_ok(self, request: Request) -> bool:
        return not self.settings.api_keys or self.key_name(request) is not None

    def key_name(self, request: Request) -> str | None:
        """The name of the API key a request came with; None without a right one."""
        keys = self.settings.api_keys
        if not keys:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else ""
        if given not in keys:
            given = request.headers.get("x-api-key", "").strip()  # Anthropic's header
        if given not in keys:
            return None
        at = keys.index(given)
        names = self.settings.api_key_names
        return names[at] if at < len(names) else f"key{at + 1}"

    def check_model(self, name: str | None) -> None:
        """A request's `model`: the served name, a LoRA adapter's name, or none (the base
        model); anything else is a 404."""
        adapters = self.runtime.engine.adapters
        if name is not None and name != self.settings.served_model_name and name not in adapters:
            served = [self.settings.served_model_name, *adapters]
            raise APIError(
                404,
                f"model {name!r} does not exist; this server serves {served} (GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    def model_name(self, name: str | None) -> str:
        """The `model` a response names: the adapter a request asked for, else the served
        name."""
        return name if name in self.runtime.engine.adapters else self.settings.served_model_name

    def adapter(self, name: str | None) -> str | None:
        """The LoRA adapter a request's `model` picks (None: the base model)."""
        return name if name in self.runtime.engine.adapters else None

    def check_lora_loading(self) -> None:
        _check_on(
            self.settings.enable_lora_loading,
            "loading and unloading LoRA adapters",
            "--enable-lora-loading (and --max-loras)",
        )

    def check_request_templates(self) -> None:
        if not self.settings.trust_request_chat_template:
            raise APIError(
                400,
                "this server renders only its own chat template; a request's chat_template "
                "needs the server started with --trust-request-chat-template",
                param="chat_template",
            )

    def check_cache_reset(self) -> None:
        _check_on(
            self.settings.enable_cache_reset, "resetting the prefix cache", "--enable-cache-reset"
        )

    def check_alive(self) -> None:
        if not self.runtime.engine.is_alive:
            raise APIError(503, "the engine is down; restart the server", "service_unavailable")

    # -- generation ----------------------------------------------------------------------------
    def check_priority(self, priority: int) -> None:
        """A 400 naming `priority` for one more important than `--min-priority` allows."""
        floor = self.settings.min_priority
        if floor is not None and priority < floor:
            raise APIError(
                400,
                f"priority {priority} is more important than this server lets a request ask "
                f"for: give {floor} or more (--min-priority)",
                param="priority",
            )

    def tier(self, req: SamplingFields) -> tuple[str, int]:
        """(the service tier a request runs at, the priority it runs with): "flex" a level
        less important than asked, "priority" a level more where `--min-priority` allows it
        (else "default"); any other tier is "default"."""
        self.check_priority(req.priority)
        if req.service_tier == "flex":
            return "flex", req.priority + 1
        floor = self.settings.min_priority
        if req.service_tier == "priority" and (floor is None or req.priority - 1 >= floor):
            return "priority", req.priority - 1
        return "default", req.priority

    def params(
        self,
        req: SamplingFields,
        max_tokens: int | None,
        logprobs: int | None,
        index: int,
        prompt_logprobs: int | None = None,
        call_format: dict[str, Any] | None = None,
    ) -> SamplingParams:
        """The request's SamplingParams; `call_format`: the schema of a required tool call,
        which takes the place of a response_format."""
        _, priority = self.tier(req)
        seed = None if req.seed is None else (req.seed + index) % 2**63
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        json_object, schema = _guided(req.response_format)
        guide_params: dict[str, Any] = {  # one kind at most: the request's validator checks it
            "json_object": json_object,
            "json_schema": req.guided_json if req.guided_json is not None else schema,
            "guided_choice": tuple(req.guided_choice or ()),
            "guided_regex": req.guided_regex,
            "guided_grammar": req.guided_grammar,
        }
        structured = req.structured_outputs.kinds() if req.structured_outputs else {}
        guide_params.update({_STRUCTURED[k]: v for k, v in structured.items()})
        if call_format is not None:
            guide_params.update(json_object=False, json_schema=call_format)
        if req.structured_outputs is not None and req.structured_outputs.disable_any_whitespace:
            if not guide_params["json_object"] and guide_params["json_schema"] is None:
                raise APIError(
                    400,
                    "structured_outputs.disable_any_whitespace goes with guided JSON (json, "
                    "json_object, a JSON response_format or guided_json)",
                    param="structured_outputs.disable_any_whitespace",
                )
            guide_params["compact_json"] = True
        try:
            return SamplingParams(
                max_new_tokens=max_tokens if max_tokens is not None else 16,
                temperature=req.temperature,
                top_p=req.top_p,
                top_k=req.top_k,
                min_p=req.min_p,
                repetition_penalty=req.repetition_penalty,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                seed=seed,
                stop=tuple(stop),
                ignore_eos=req.ignore_eos,
                stop_token_ids=tuple(req.stop_token_ids or ()),
                min_tokens=req.min_tokens,
                include_stop_str_in_output=req.include_stop_str_in_output,
                cache_salt=req.cache_salt,
                skip_special_tokens=req.skip_special_tokens,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                logit_bias=req.logit_bias or (),
                allowed_token_ids=req.allowed_token_ids,
                bad_words=req.bad_words or (),
                priority=priority,
                prediction=self.prediction_ids(req),
                adapter=self.adapter(req.model),
                thinking_budget=None if call_format is not None else req.thinking_token_budget,
                **guide_params,
            )
        except ValueError as e:
            if structured:
                raise _structured_error(str(e)) from e
            raise APIError(400, str(e), param=_param_of(str(e))) from e

    def sse(self, body: AsyncIterator[str], ping: str = SSE_COMMENT) -> StreamingResponse:
        """A streamed answer, kept alive while it waits (`ServerSettings.sse_keepalive_s`)."""
        every = self.settings.sse_keepalive_s
        if every > 0:
            body = keep_alive(body, every, ping)
        return StreamingResponse(body, media_type="text/event-stream")

    def prediction_ids(self, req: SamplingFields) -> tuple[int, ...]:
        """The token ids of the request's predicted output (none without a tokenizer)."""
        tok = self.runtime.tokenizer
        if req.prediction is None or tok is None:
            return ()
        return tuple(tok.encode(req.prediction.text(), add_special_tokens=False))

    def _check_room(self, count: int) -> str | None:
        """429 unless `count` more requests fit the server's and the caller's caps; the
        caller (its key's name)."""
        self.check_alive()
        if self.in_flight + count > self.settings.max_concurrent_requests:
            raise APIError(
                429,
                f"{self.in_flight} requests in flight, at most "
                f"{self.settings.max_concurrent_requests} (--max-concurrent-requests); retry later",
                "rate_limit_exceeded",
            )
        owner = CALLER.get()
        per_key = self.settings.max_concurrent_requests_per_key
        mine = self.in_flight_by.get(owner, 0)
        if owner is not None and per_key is not None and mine + count > per_key:
            raise APIError(
                429,
                f"this key has {mine} requests in flight, at most {per_key} "
                "(--max-concurrent-requests-per-key); retry later",
                "rate_limit_exceeded",
            )
        return owner

    async def beam_search(
        self,
        prompts: list[list[int]],
        req: SamplingFields,
        max_tokens: int,
        param: str,
        request: Request,
        logprobs: int | None = None,
    ) -> list[list[Beam]]:
        """Each prompt's `req.n` best beams (`Runtime.beam_search`), counted as `req.n`
        requests in flight per prompt while they run; a prompt the runtime refuses is a 400
        naming `param`. A client that leaves stops the search before its next step (499)."""
        _, priority = self.tier(req)
        count = req.n * len(prompts)
        owner = self._check_room(count)
        self._count_in(owner, count)
        cancel = threading.Event()
        try:
            params = BeamSearchParams(
                beam_width=req.n,
                max_tokens=max_tokens,
                ignore_eos=req.ignore_eos,
                length_penalty=req.length_penalty,
                logprobs=logprobs,
            )
            search = asyncio.ensure_future(
                asyncio.to_thread(
                    self.runtime.beam_search,
                    prompts,
                    params,
                    priority=priority,
                    adapter=self.adapter(req.model),
                    cache_salt=req.cache_salt,
                    tenant=owner,
                    cancel=cancel,
                )
            )
            watcher = asyncio.ensure_future(disconnect(request))
            await asyncio.wait((search, watcher), return_when=asyncio.FIRST_COMPLETED)
            watcher.cancel()
            if not search.done():
                cancel.set()
                with contextlib.suppress(BeamSearchCancelled):
                    await search  # (its step in flight ends first)
                raise APIError(499, "the client disconnected", code="client_disconnected")
            found: list[list[Beam]] = search.result()
            for prompt, beams in zip(prompts, found):
                self.metrics.observe_whole(
                    owner, beams[0].finish_reason, len(prompt), sum(len(b.token_ids) for b in beams)
                )
            return found
        except ValueError as e:
            raise APIError(400, str(e), param=_param_of(str(e), param)) from e
        finally:
            self._count_in(owner, -count)

    def add(
        self, prompts: list[list[int]], params: list[SamplingParams], param: str
    ) -> list[RequestHandle]:
        """Add the requests; a prompt the engine refuses is a 400 naming `param`."""
        owner = self._check_room(len(prompts))
        try:
            handles = self.runtime.engine.add_requests(prompts, params, tenant=owner)
        except ValueError as e:
            raise APIError(400, str(e), param=_param_of(str(e), param)) from e
        self._count_in(owner, len(handles))
        for h in handles:
            h.add_done_callback(self._release)
        return handles

    def _release(self, handle: RequestHandle) -> None:
        self._count_in(handle.owner, -1)

    def _count_in(self, owner: str | None, count: int) -> None:
        """`count` more requests in flight (fewer when negative), the server's and `owner`'s."""
        with self._in_flight_lock:
            self.in_flight += count
            left = self.in_flight_by.get(owner, 0) + count
            if left:
                self.in_flight_by[owner] = left
            else:
                self.in_flight_by.pop(owner, None)

    def default_max_tokens(self, prompt_len: int) -> int:
        return max(1, self.runtime.config.session_len - prompt_len)

    def prompt_text(self, prompt: Any, index: int, ids: list[int]) -> str:
        """The text of prompt `index` for echo: as sent, or decoded from its token ids."""
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list) and isinstance(prompt[index], str):
            return str(prompt[index])
        tok = self.runtime.tokenizer
        return tok.decode(ids, skip_special_tokens=False) if tok is not None else ""

    def token_bytes(self, token_id: int) -> bytes:
        """A token's raw bytes (part of a UTF-8 character for some tokens)."""
        tok = self.runtime.tokenizer
        return tok.token_bytes(token_id) if tok is not None else b""

    def token_text(self, token_id: int) -> str:
        """A token as logprobs show it: see `token_string`."""
        return token_string(self.token_bytes(token_id))

    def logprob_entries(
        self, entries: list[TokenLogprobs] | None, as_ids: bool = False
    ) -> list[dict[str, Any]]:
        """OpenAI's logprobs entries (chat's `logprobs.content`, a Responses output_text's
        `logprobs`): token, logprob, bytes and top_logprobs of each token; with `as_ids` each
        `token` is `token_id:N` (vLLM's return_tokens_as_token_ids), `bytes` still the raw
        ones."""

        def one(token_id: int, lp: float) -> dict[str, Any]:
            raw = self.token_bytes(token_id)
            token = f"token_id:{token_id}" if as_ids else token_string(raw)
            return {"token": token, "logprob": lp, "bytes": list(raw)}

        content = []
        for e in entries or []:
            item = one(e.token_id, e.logprob)
            item["top_logprobs"] = [one(t, lp) for t, lp in e.top.items()]
            content.append(item)
        return content

    def is_special(self, token_id: int) -> bool:
        tok = self.runtime.tokenizer
        return tok is not None and tok.is_special(token_id)


def _no_files(ref: FileRef, where: str) -> str:
    raise APIError(400, "this server keeps no files", param=where)


def token_string(raw: bytes) -> str:
    """The `token` of a logprobs entry: its bytes as text, with bytes that are not a whole
    UTF-8 character (a token holding part of an emoji) written as `\\xNN` escapes, as
    DeepSeek's API does, rather than as U+FFFD (vLLM's choice, which loses which bytes they
    were). `bytes` carries the exact bytes: clients rebuild the text from consecutive tokens'
    `bytes`."""
    return raw.decode("utf-8", errors="backslashreplace")


def _add_error_handlers(app: FastAPI) -> None:
    def reply(
        request: Request,
        status: int,
        message: str,
        type_: str,
        param: str | None = None,
        code: str | None = None,
    ) -> JSONResponse:
        body = error_body(message, type_, param, code, path=request.url.path, status=status)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return reply(request, e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(list(e.errors()))
        return reply(request, 400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return reply(request, e.status_code, str(e.detail), kind)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        logger.exception("internal error")
        return reply(request, 500, "internal server error", "server_error")


_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _is_union_tag(part: Any) -> bool:
    """Whether a part of a pydantic error location names a member of a union (`str`,
    `list[int]`, `function-after[...]`) rather than a field or an index."""
    return isinstance(part, str) and (part in _TYPE_NAMES or not part.isidentifier())


def _validation_message(errors: list[Any]) -> tuple[str, str | None]:
    """(message, param) of a request that failed validation: param is the field's dotted path
    as the client wrote it (`messages.0.content`), never pydantic's union member names."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if first.get("type") == "model_attributes_type" and tuple(first.get("loc", ())) == ("body",):
        return "the request body must be a JSON object (Content-Type: application/json)", None
    error = (first.get("ctx") or {}).get("error")
    if isinstance(error, UnsupportedFieldError):
        return str(error), error.param
    loc = [x for x in first.get("loc", ()) if x != "body"]
    tag_at = next((i for i, x in enumerate(loc) if _is_union_tag(x)), None)
    msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    if tag_at is None:
        param = ".".join(str(x) for x in loc) or None
        return (f"{param}: {msg}" if param else msg), param
    # A union field none of whose forms matched: name the field and the forms it takes, with
    # the deepest mismatch (the form the client most likely meant).
    field = loc[:tag_at]
    param = ".".join(str(x) for x in field) or None
    tags: list[str] = []
    deepest: Any = first
    reach: tuple[int, list[int]] = (-1, [])
    for err in errors:
        eloc = [x for x in err.get("loc", ()) if x != "body"]
        if eloc[:tag_at] != field or len(eloc) <= tag_at or not _is_union_tag(eloc[tag_at]):
            continue
        if eloc[tag_at] not in tags:
            tags.append(str(eloc[tag_at]))
        # how far into the value this form got: deeper, then further along a list
        got = (len(eloc), [x if isinstance(x, int) else -1 for x in eloc[tag_at + 1 :]])
        if got > reach:
            deepest, reach = err, got
    inner = [x for x in deepest.get("loc", ()) if x != "body"][tag_at + 1 :]
    where = ".".join([param or "", *(str(x) for x in inner)]) if inner else param
    detail = str(deepest.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{param}: must be one of {', '.join(tags)} ({where}: {detail})", param


def _check_on(on: bool, what: str, flags: str) -> None:
    """403 for a route the server was not started with."""
    if not on:
        raise APIError(
            403, f"{what} over HTTP is off; start the server with {flags}", code="forbidden"
        )


def _beam_usage(prompt_tokens: int, beams: list[Beam]) -> dict[str, Any]:
    completion = sum(len(b.token_ids) for b in beams)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


def _usage(
    prompt_tokens: int,
    outputs: list[RequestOutput],
    n: int,
    reasoning: Callable[[RequestOutput], int] | None = None,
) -> dict[str, Any]:
    """Usage of the outputs of prompts with n choices each (outputs grouped by prompt);
    `reasoning`: an output's thinking tokens, when a reasoning parser is on."""
    completion = sum(len(o.token_ids) for o in outputs)
    cached = sum(o.num_cached_tokens for o in outputs[::n])
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    drafted = sum(o.num_draft_tokens for o in outputs)
    if drafted:  # OpenAI's Predicted Outputs counts, for every draft checked
        accepted = sum(o.num_accepted_draft_tokens for o in outputs)
        usage["completion_tokens_details"] = {
            "accepted_prediction_tokens": accepted,
            "rejected_prediction_tokens": drafted - accepted,
        }
    if reasoning is not None:
        details = usage.setdefault("completion_tokens_details", {})
        details["reasoning_tokens"] = sum(reasoning(o) for o in outputs)
    return usage


def _function_call_delta(pieces: list[dict[str, Any]]) -> dict[str, str]:
    """Streamed `tool_calls` pieces of one call in the older API's form: the delta's
    `function_call`, its name with the first piece, then its arguments."""
    delta: dict[str, str] = {"arguments": ""}
    for piece in pieces:
        function = piece.get("function", {})
        if function.get("name") is not None:
            delta["name"] = function["name"]
        delta["arguments"] += function.get("arguments") or ""
    return delta


def _best_of(outputs: list[RequestOutput], width: int, n: int) -> list[RequestOutput]:
    """The `n` of each prompt's `width` outputs (grouped by prompt) with the highest mean
    log-probability per token, best first (ties: the one sampled first)."""

    def mean(o: RequestOutput) -> float:
        lps = o.logprobs or []
        return sum(lp.logprob for lp in lps) / len(lps) if lps else -math.inf

    best: list[RequestOutput] = []
    for at in range(0, len(outputs), width):
        group = outputs[at : at + width]
        best += sorted(group, key=mean, reverse=True)[:n]
    return best


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _package_version() -> str:
    """The installed package's version (pyproject's, for a source checkout not installed)."""
    try:
        return importlib.metadata.version("dist-runtime")
    except importlib.metadata.PackageNotFoundError:
        text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
        match = re.search(r'^version = "([^"]+)"', text, re.M)
        return match.group(1) if match else "unknown"


def _add_routes(app: FastAPI, server: _Server) -> None:
    runtime = server.runtime
    name = server.settings.served_model_name

    @app.get("/health")
    async def health() -> Response:
        if not runtime.engine.is_alive:
            return JSONResponse({"status": "engine down"}, status_code=503)
        if runtime.engine.replacing_workers:  # (requests queue meanwhile: route elsewhere)
            return JSONResponse({"status": "replacing workers"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:
        """SageMaker's health route (as vLLM serves it): /health's answer."""
        return await health()

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": _package_version()}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page() -> HTMLResponse:
        html = resources.files("dist_runtime.server").joinpath("static/index.html").read_text()
        return HTMLResponse(html)

    def model_card(model: str) -> dict[str, Any]:
        adapter = runtime.engine.adapters.get(model)
        return {
            "id": model,
            "object": "model",
            "created": server.created,
            "owned_by": "dist-runtime",
            "root": runtime.config.model if adapter is None else adapter.path,
            "parent": None if adapter is None else name,
            "max_model_len": runtime.config.session_len,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [model_card(m) for m in (name, *runtime.engine.adapters)]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        server.check_model(model)
        return model_card(model)

    async def beam_chat(req: ChatCompletionRequest, request: Request) -> dict[str, Any]:
        """`use_beam_search`: the `n` best beams are the choices, best first."""
        if req.tool_mode != "none":
            raise APIError(400, "tools do not go with use_beam_search: leave them out",
                           param="tools")  # fmt: skip
        ids = await asyncio.to_thread(
            chat_prompt, server, req.messages, None, False, req.continue_final_message,
            req.template_kwargs(), req.chat_template, req.documents,
            req.add_generation_prompt is not False, req.add_special_tokens,
        )  # fmt: skip
        if req.truncate_prompt_tokens is not None:
            ids = ids[-req.truncate_prompt_tokens :]
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:
            max_tokens = server.default_max_tokens(len(ids))
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        (beams,) = await server.beam_search([ids], req, max_tokens, "messages", request, logprobs)
        usage = _beam_usage(len(ids), beams)
        request.state.usage = usage
        opened = server.reasoning and opens_thinking(server.runtime.tokenizer, ids)
        choices = []
        echoed = _echoed(server, req)
        for k, beam in enumerate(beams):
            thought, answer = (
                ReasoningSplitter(opened).split(beam.text)
                if server.reasoning
                else (None, beam.text)
            )
            message: dict[str, Any] = {"role": "assistant", "content": echoed + answer}
            if server.reasoning and req.include_reasoning:
                message["reasoning_content"] = thought
            scored = (
                _chat_logprobs(server, beam.logprobs, req.return_tokens_as_token_ids)
                if logprobs is not None
                else None
            )
            choices.append({"index": k, "message": message, "logprobs": scored,
                            "finish_reason": beam.finish_reason, "stop_reason": None,
                            **_ids(req, token_ids=beam.token_ids)})  # fmt: skip
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": server.model_name(req.model),
            "choices": choices,
            "usage": usage,
            **_ids(req, prompt_token_ids=ids),
        }

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request) -> Any:
        server.check_model(req.model)
        if req.use_beam_search:
            return await beam_chat(req, request)
        named = (
            req.tool_choice.function.name if isinstance(req.tool_choice, NamedToolChoice) else None
        )
        run = await start_chat(
            server,
            req,
            req.messages,
            _functions(req.tools),
            req.tool_mode,
            named,
            req.parallel_tool_calls,
            req.max_completion_tokens or req.max_tokens,
            (req.top_logprobs or 0) if req.logprobs else None,
            req.n,
            req.continue_final_message,
            req.template_kwargs(),
            req.chat_template,
            req.documents,
            req.add_generation_prompt is not False,
            req.add_special_tokens,
        )
        ids, handles, splitter = run.ids, run.handles, run.splitter

        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        thinking = run.thinking_tokens if server.reasoning else None
        legacy = req.functions is not None  # (the answer's call in the older API's form)
        if req.stream:
            splitters = [splitter() for _ in range(req.n)]
            thoughts = [run.thoughts() for _ in range(req.n)]

            def chat_choice(i: int, delta: RequestDelta, _first: bool) -> dict[str, Any] | None:
                scored = delta.prompt_logprobs
                text, finish = delta.text, delta.finish_reason
                thought, splits = "", thoughts[i]
                if splits is not None:
                    thought, text = splits.feed(text, finish is not None)
                # content, and calls' pieces as they come (required, or auto once a call opens)
                text, pieces, finish = splitters[i].stream(text, finish)
                shown = thought and req.include_reasoning
                said: dict[str, Any] = {"reasoning_content": thought} if shown else {}
                if pieces and legacy:
                    said["function_call"] = _function_call_delta(pieces)
                elif pieces:
                    said["tool_calls"] = pieces
                if legacy and finish == "tool_calls":
                    finish = "function_call"
                if not text and not said and finish is None and scored is None:
                    return None
                logprobs = (
                    _chat_logprobs(server, delta.logprobs, req.return_tokens_as_token_ids)
                    if delta.logprobs
                    else None
                )
                if text:
                    said["content"] = text
                choice: dict[str, Any] = {
                    "index": i,
                    "delta": said,
                    "logprobs": logprobs,
                    "finish_reason": finish,
                }
                if scored is not None:
                    choice["prompt_logprobs"] = _vllm_prompt_logprobs(server, scored, ids)
                return choice

            role = {"role": "assistant", "content": _echoed(server, req)}
            body = _stream(
                handles,
                request,
                {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": server.model_name(req.model),
                    "service_tier": server.tier(req)[0],
                },
                chat_choice,
                prompt_tokens=len(ids),
                n=req.n,
                include_usage=bool(req.stream_options and req.stream_options.include_usage),
                continuous_usage=bool(req.stream_options and req.stream_options.continuous),
                token_ids=req.return_token_ids,
                opening=_ids(req, prompt_token_ids=ids),
                first=[
                    {"index": i, "delta": role, "logprobs": None, "finish_reason": None}
                    for i in range(req.n)
                ],
                reasoning=thinking,
            )
            return server.sse(body)
        outs = await gather(handles, request)
        usage = _usage(len(ids), outs, req.n, thinking)
        request.state.usage = usage
        choices: list[dict[str, Any]] = []
        echoed = _echoed(server, req)
        for i, o in enumerate(outs):
            splits = run.thoughts()
            thought, answer = (None, o.text) if splits is None else splits.split(o.text)
            content, found = splitter().feed(answer, o.finish_reason)
            content = echoed + content if echoed else content
            calls = tool_calls_json(found)
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if calls and legacy:
                (call,) = calls  # (functions: parallel_tool_calls is off)
                message = {"role": "assistant", "content": content or None,
                           "function_call": call["function"]}  # fmt: skip
            elif calls:
                message = {"role": "assistant", "content": content or None, "tool_calls": calls}
            if server.reasoning and req.include_reasoning:
                message["reasoning_content"] = thought
            choices.append(
                {
                    "index": i,
                    "message": message,
                    "logprobs": _chat_logprobs(server, o.logprobs, req.return_tokens_as_token_ids)
                    if req.logprobs
                    else None,
                    "finish_reason": ("function_call" if legacy else "tool_calls")
                    if calls
                    else o.finish_reason,
                    "stop_reason": client_stop(o.stop_reason, req.stop),
                    **_ids(req, token_ids=o.token_ids),
                }
            )
        if req.prompt_logprobs is not None:
            for choice, o in zip(choices, outs):
                choice["prompt_logprobs"] = _vllm_prompt_logprobs(server, o.prompt_logprobs, ids)
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": server.model_name(req.model),
            "service_tier": server.tier(req)[0],
            "choices": choices,
            "usage": usage,
            **_ids(req, prompt_token_ids=ids),
        }

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        """vLLM's /tokenize: the prompt's token ids, as the completion or chat route would
        build them, with the server's context length (to check a long document fits)."""
        server.check_model(req.model)
        if req.messages is not None:
            ids = await asyncio.to_thread(
                chat_prompt,
                server,
                req.messages,
                _functions(req.tools),
                False,
                req.continue_final_message,
                req.chat_template_kwargs,
                req.chat_template,
                req.documents,
                req.add_generation_prompt and not req.continue_final_message,
                bool(req.add_special_tokens),
            )
        else:
            tokenizer = runtime.tokenizer
            if tokenizer is None:
                raise APIError(400, f"{runtime.config.model} has no tokenizer", param="prompt")
            text, special = req.prompt or "", req.add_special_tokens is not False
            ids = await asyncio.to_thread(tokenizer.encode, text, special)
        return {
            "count": len(ids),
            "max_model_len": runtime.config.session_len,
            "tokens": ids,
            "token_strs": [server.token_text(t) for t in ids] if req.return_token_strs else None,
        }

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache(host: bool = True, disk: bool = True) -> dict[str, Any]:
        """Forget the prefix cache (vLLM's route); `?host=false` / `?disk=false` keep a tier.
        Requests running now go on."""
        server.check_cache_reset()
        server.check_alive()
        forgot = await asyncio.to_thread(runtime.reset_prefix_cache, host, disk)
        return {"object": "prefix_cache.reset", "forgotten_blocks": forgot}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(req: LoadLoraRequest) -> Response:
        server.check_lora_loading()
        if req.lora_name == name:
            raise APIError(
                400, f"{name!r} is the served model's name; name the adapter otherwise", "lora_name"
            )
        try:
            await asyncio.to_thread(runtime.load_adapter, req.lora_name, req.lora_path)
        except AdapterConflictError as e:
            raise APIError(409, str(e), param="lora_name", code="conflict") from e
        except ValueError as e:
            raise APIError(400, str(e), param="lora_path") from e
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(req: UnloadLoraRequest) -> Response:
        server.check_lora_loading()
        try:
            await asyncio.to_thread(runtime.unload_adapter, req.lora_name)
        except AdapterNotFoundError as e:
            raise APIError(404, str(e), param="lora_name", code="model_not_found") from e
        except AdapterConflictError as e:
            raise APIError(409, str(e), param="lora_name", code="conflict") from e
        except ValueError as e:
            raise APIError(400, str(e), param="lora_name") from e
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict[str, Any]:
        server.check_model(req.model)
        tokenizer = runtime.tokenizer
        if tokenizer is None:
            raise APIError(400, f"{runtime.config.model} has no tokenizer", param="tokens")
        vocab = runtime.engine.model_config.vocab_size
        outside = [t for t in req.tokens if not 0 <= t < vocab]
        if outside:
            raise APIError(400, f"tokens outside [0, {vocab}): {outside[:5]}", param="tokens")
        text = await asyncio.to_thread(tokenizer.decode, req.tokens, False)
        return {"prompt": text}

    async def beam_completions(
        req: CompletionRequest, request: Request, prompts: list[list[int]], max_tokens: int
    ) -> dict[str, Any]:
        """`use_beam_search`: each prompt's `n` best beams are its choices, best first."""
        if req.echo:
            raise APIError(400, "echo does not go with use_beam_search: leave it out",
                           param="echo")  # fmt: skip
        found = await server.beam_search(prompts, req, max_tokens, "prompt", request, req.logprobs)
        beams = [b for per_prompt in found for b in per_prompt]
        usage = _beam_usage(sum(len(p) for p in prompts), beams)
        request.state.usage = usage
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": server.model_name(req.model),
            "choices": [
                {
                    "index": k,
                    "text": b.text,
                    "logprobs": _completion_logprobs(
                        server, b.logprobs, 0, None, req.logprobs, req.return_tokens_as_token_ids
                    )
                    if req.logprobs is not None
                    else None,
                    "finish_reason": b.finish_reason,
                    "stop_reason": None,
                    **_ids(req, prompt_token_ids=prompts[k // req.n], token_ids=b.token_ids),
                }
                for k, b in enumerate(beams)
            ],  # fmt: skip
            "usage": usage,
        }

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        server.check_model(req.model)
        prompts = await asyncio.to_thread(_prompt_ids, server, req.prompt, req.add_special_tokens)
        cut = req.truncate_prompt_tokens
        if cut is not None:
            prompts = [ids[-cut:] for ids in prompts]
        max_tokens = req.max_tokens if req.max_tokens is not None else 16
        if req.use_beam_search:
            return await beam_completions(req, request, prompts, max_tokens)
        width = req.width  # (best_of: more sampled than returned, ranked by their logprobs)
        all_ids = [ids for ids in prompts for _ in range(width)]
        scored_k = req.prompt_logprobs_k
        ranked_by = req.logprobs if width == req.n else max(req.logprobs or 0, 0)
        all_params = [
            server.params(req, max_tokens, ranked_by, j, scored_k)
            for _ in prompts
            for j in range(width)
        ]
        handles = server.add(all_ids, all_params, "prompt")
        echo = [
            server.prompt_text(req.prompt if cut is None else None, i, ids) if req.echo else ""
            for i, ids in enumerate(prompts)
        ]  # (a cut prompt echoes what is left of it)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_tokens = sum(len(p) for p in prompts)
        # echo with logprobs: the prompt's tokens (and their log-probabilities) come first.
        echo_logprobs = req.echo and req.logprobs is not None

        def echoed(k: int, scored: list[TokenLogprobs | None] | None) -> _EchoedPrompt | None:
            if not echo_logprobs:
                return None
            ids = prompts[k // req.n]
            return _EchoedPrompt(ids, scored or [None] * len(ids), echo[k // req.n])

        def extras(k: int, scored: list[TokenLogprobs | None] | None) -> dict[str, Any]:
            if req.prompt_logprobs is None:
                return {}
            ids = prompts[k // req.n]
            return {
                "prompt_logprobs": _vllm_prompt_logprobs(server, scored, ids, req.prompt_logprobs)
            }

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            sent = [0] * len(handles)  # characters of text sent so far, per choice

            def text_choice(k: int, delta: RequestDelta, first: bool) -> dict[str, Any] | None:
                text = (echo[k // req.n] if first else "") + delta.text
                if not text and delta.finish_reason is None:
                    return None
                start = sent[k] + len(text) - len(delta.text)
                prompt = echoed(k, delta.prompt_logprobs) if first else None
                logprobs = (
                    _completion_logprobs(
                        server,
                        delta.logprobs,
                        start,
                        prompt,
                        req.logprobs,
                        req.return_tokens_as_token_ids,
                    )
                    if delta.logprobs or prompt is not None
                    else None
                )
                sent[k] += len(text)
                return {
                    "index": k,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": delta.finish_reason,
                    **(extras(k, delta.prompt_logprobs) if first else {}),
                    **(_ids(req, prompt_token_ids=prompts[k // req.n]) if first else {}),
                }

            body = _stream(
                handles,
                request,
                {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": server.model_name(req.model),
                },
                text_choice,
                prompt_tokens=prompt_tokens,
                n=req.n,
                include_usage=include_usage,
                continuous_usage=bool(req.stream_options and req.stream_options.continuous),
                choice_prompt_tokens=[len(prompts[k // req.n]) for k in range(len(handles))],
                token_ids=req.return_token_ids,
            )
            return server.sse(body)
        outs = await gather(handles, request)
        usage = _usage(prompt_tokens, outs, width)
        request.state.usage = usage
        if width > req.n:
            outs = _best_of(outs, width, req.n)
        choices = [
            {
                "index": k,
                "text": echo[k // req.n] + o.text,
                "logprobs": _completion_logprobs(
                    server,
                    o.logprobs,
                    len(echo[k // req.n]),
                    echoed(k, o.prompt_logprobs),
                    req.logprobs,
                    req.return_tokens_as_token_ids,
                )
                if req.logprobs is not None
                else None,
                "finish_reason": o.finish_reason,
                "stop_reason": client_stop(o.stop_reason, req.stop),
                **extras(k, o.prompt_logprobs),
                **_ids(req, prompt_token_ids=prompts[k // req.n], token_ids=o.token_ids),
            }
            for k, o in enumerate(outs)
        ]
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": server.model_name(req.model),
            "choices": choices,
            "usage": usage,
        }

    _add_job_routes(app, server)


def _functions(tools: list[Tool] | None) -> list[Function] | None:
    return functions_of(
        [(t.function.name, t.function.description, t.function.parameters) for t in tools or []]
    )


def _prompt_ids(server: _Server, prompt: Any, special: bool = True) -> list[list[int]]:
    """The token ids of each prompt of a /v1/completions request (text prompts with the
    tokenizer's special tokens unless `special` is false)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    out = []
    for p in prompt:
        if isinstance(p, str):
            if server.runtime.tokenizer is None:
                raise APIError(400, "this model has no tokenizer; send token ids", param="prompt")
            out.append(server.runtime.tokenizer.encode(p, special))
        else:
            out.append(list(p))
    return out


def _ids(req: SamplingFields, **ids: list[int]) -> dict[str, list[int]]:
    """vLLM's return_token_ids fields (`prompt_token_ids`, `token_ids`) when asked for."""
    return {name: list(value) for name, value in ids.items()} if req.return_token_ids else {}


def _echoed(server: _Server, req: ChatCompletionRequest) -> str:
    """vLLM's chat `echo`: the last message's text when it is the assistant's (the answer
    continues it), else ""."""
    last = req.messages[-1] if req.messages else None
    if not req.echo or last is None or last.template_role != "assistant":
        return ""
    return message_text(server, last, len(req.messages) - 1)


def _chat_logprobs(
    server: _Server, entries: list[TokenLogprobs] | None, as_ids: bool = False
) -> dict[str, Any]:
    return {"content": server.logprob_entries(entries, as_ids)}


@dataclass(frozen=True)
class _EchoedPrompt:
    """A prompt echoed with its tokens' log-probabilities (entries[0] is None)."""

    token_ids: list[int]
    entries: list[TokenLogprobs | None]
    text: str


def _completion_logprobs(
    server: _Server,
    entries: list[TokenLogprobs] | None,
    start: int,
    prompt: _EchoedPrompt | None = None,
    top: int | None = None,
    as_ids: bool = False,
) -> dict[str, Any]:
    """The legacy logprobs object; `text_offset` counts characters of the choice's whole text,
    the first token starting at `start` (after the echoed prompt or the text streamed so far).
    A token that continues a character split over tokens starts at that character. With
    `prompt`, its tokens come first (from offset 0; the first has null logprobs, as in OpenAI's
    API), and a special token the echoed text leaves out (a BOS added by the tokenizer) takes
    no characters. `top` caps each top_logprobs map. With `as_ids` tokens (and top_logprobs'
    keys) are `token_id:N` (vLLM's return_tokens_as_token_ids)."""
    tokens: list[str] = []
    token_lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []

    name = (lambda t: f"token_id:{t}") if as_ids else server.token_text

    def add(token_ids: list[int], scored: list[Any], pos: int, text: str | None) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for token_id, e in zip(token_ids, scored):
            raw = server.token_bytes(token_id)
            piece = decoder.decode(raw)
            if text is not None and server.is_special(token_id) and not text.startswith(piece, pos):
                piece = ""
            offsets.append(pos)
            pos += len(piece)
            tokens.append(f"token_id:{token_id}" if as_ids else token_string(raw))
            token_lps.append(None if e is None else e.logprob)
            items = [] if e is None else list(e.top.items())[:top]
            tops.append(None if e is None else {name(t): lp for t, lp in items})

    if prompt is not None:
        add(prompt.token_ids, prompt.entries, 0, prompt.text)
    output = entries or []
    add([e.token_id for e in output], output, start, None)
    return {
        "tokens": tokens,
        "token_logprobs": token_lps,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def _vllm_prompt_logprobs(
    server: _Server,
    scored: list[TokenLogprobs | None] | None,
    token_ids: list[int],
    top: int | None = None,
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs` of a choice: per prompt token (None for the first) a map from
    token id to {logprob, rank, decoded_token}, the prompt token first, then the top ones (rank
    1 = most likely; the prompt token's rank is null unless it is among them)."""
    out: list[dict[str, dict[str, Any]] | None] = []
    for e in scored or [None] * len(token_ids):
        if e is None:
            out.append(None)
            continue
        ranked = list(e.top.items())[:top]
        ranks = {t: r for r, (t, _) in enumerate(ranked, 1)}
        entry = {
            str(e.token_id): {
                "logprob": e.logprob,
                "rank": ranks.get(e.token_id),
                "decoded_token": server.token_text(e.token_id),
            }
        }
        for t, lp in ranked:
            entry.setdefault(
                str(t), {"logprob": lp, "rank": ranks[t], "decoded_token": server.token_text(t)}
            )
        out.append(entry)
    return out


async def _stream(
    handles: list[RequestHandle],
    request: Request,
    header: dict[str, Any],
    choice: Callable[[int, RequestDelta, bool], dict[str, Any] | None],
    *,
    prompt_tokens: int,
    n: int,
    include_usage: bool,
    first: Sequence[dict[str, Any]] = (),
    reasoning: Callable[[RequestOutput], int] | None = None,
    continuous_usage: bool = False,
    choice_prompt_tokens: Sequence[int] | None = None,
    token_ids: bool = False,
    opening: dict[str, Any] | None = None,
) -> AsyncIterator[str]:
    """The SSE body of a streamed request: `first` chunks, then choice(index, delta, is_first)
    for every delta (None skips it), the usage chunk when asked for, and [DONE]. With
    `continuous_usage` (vLLM's continuous_usage_stats) each choice's chunk carries the usage
    so far: its prompt's tokens (`choice_prompt_tokens[k]`, default all of them) and the
    tokens that choice has generated. With `token_ids` (vLLM's return_token_ids) each choice
    carries the `token_ids` generated since its last chunk; `opening` are more fields of the
    first chunk (the prompt's ids)."""
    opened = False

    def chunk(choices: list[dict[str, Any]], usage: Any = None) -> str:
        nonlocal opened
        body = {**header, "choices": choices}
        if include_usage:
            body["usage"] = usage
        if opening and not opened:
            body.update(opening)
        opened = True
        return _sse(body)

    generated = [0] * len(handles)

    def so_far(k: int) -> dict[str, int] | None:
        if not continuous_usage:
            return None
        done = generated[k]
        asked = prompt_tokens if choice_prompt_tokens is None else choice_prompt_tokens[k]
        return {"prompt_tokens": asked, "completion_tokens": done, "total_tokens": asked + done}

    for c in first:
        yield chunk([c], so_far(c["index"]))
    started: set[int] = set()
    pending: dict[int, list[TokenLogprobs]] = {}
    """Logprobs of tokens whose text is still held back: sent with the text they make."""
    unsent: dict[int, list[int]] = {}
    """The same for their ids (return_token_ids)."""
    try:
        async for k, delta in merged(handles):
            generated[k] += len(delta.token_ids)
            if k in pending:
                delta = dataclasses.replace(delta, logprobs=pending.pop(k) + (delta.logprobs or []))
            made = choice(k, delta, k not in started)
            started.add(k)
            if made is not None:
                if token_ids:
                    made["token_ids"] = unsent.pop(k, []) + delta.token_ids
                yield chunk([made], so_far(k))
            else:
                if delta.logprobs:
                    pending[k] = delta.logprobs
                unsent[k] = unsent.get(k, []) + delta.token_ids
    except Exception as e:
        kind = "invalid_request_error" if isinstance(e, SamplingError) else "server_error"
        yield _sse(error_body(str(e), kind))
        return
    usage = _usage(prompt_tokens, [h.result(timeout=0) for h in handles], n, reasoning)
    request.state.usage = usage
    if include_usage:
        yield chunk([], usage)
    yield _sse("[DONE]")


_ERROR_PARAMS = (
    ("json_schema", "response_format"),
    ("logit_bias", "logit_bias"),
    ("allowed_token_ids", "allowed_token_ids"),
    ("bad_words", "bad_words"),
    ("bad word", "bad_words"),
    ("guided_choice", "guided_choice"),
    ("guided_regex", "guided_regex"),
    ("guided_grammar", "guided_grammar"),
    ("give one of guided_choice", "guided_choice"),
    ("min_tokens", "min_tokens"),
)
"""How SamplingParams' and the engine's errors begin, by the request field they are about."""
_PROMPT_PREFIX = re.compile(r"^prompt \d+: ")
_STRUCTURED = {
    "choice": "guided_choice",
    "regex": "guided_regex",
    "json": "json_schema",
    "grammar": "guided_grammar",
    "json_object": "json_object",
}
"""structured_outputs' keys -> the SamplingParams fields they set."""


def _param_of(message: str, default: str | None = None) -> str | None:
    """The request field an error names first (after the engine's "prompt N: "), else
    `default`."""
    text = _PROMPT_PREFIX.sub("", message)
    return next((field for start, field in _ERROR_PARAMS if text.startswith(start)), default)


def _structured_error(message: str) -> APIError:
    """A 400 for SamplingParams' error about the guide structured_outputs gave, in the
    request's names (`structured_outputs.grammar: ...` for `guided_grammar: ...`)."""
    for key, name in _STRUCTURED.items():
        if message.startswith(name):
            param = f"structured_outputs.{key}"
            return APIError(400, param + message.removeprefix(name), param=param)
    return APIError(400, message, param=_param_of(message))


def _guided(fmt: ResponseFormat | None) -> tuple[bool, Any]:
    """(json_object, json_schema) of SamplingParams for a request's `response_format`."""
    if fmt is None or fmt.type == "text":
        return False, None
    if fmt.type == "json_object":
        return True, None
    assert fmt.json_schema is not None  # the model's validator requires it
    return False, fmt.json_schema.schema_


def _add_job_routes(app: FastAPI, server: _Server) -> None:
    runtime = server.runtime

    def status(job_id: str) -> dict[str, Any]:
        try:
            caller = CALLER.get()
            if caller is not None and runtime.job_owner(job_id) != caller:
                raise UnknownJobError(job_id)  # another key's job: none of this one's business
            s = runtime.status(job_id)
        except UnknownJobError as e:
            raise APIError(404, f"no job {job_id!r}", "not_found_error", "id") from e
        return job_dict(s)

    def job_dict(s: JobStatus) -> dict[str, Any]:
        d = s.to_dict()
        d["id"] = d.pop("job_id")
        d["object"] = "job"
        return d

    @app.post("/v1/jobs")
    async def submit(request: Request) -> dict[str, Any]:
        server.check_alive()
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            form = await request.form()
            upload = form.get("file")
            raw: dict[str, Any] = {k: v for k, v in form.items() if k != "file"}
            raw["questions"] = form.getlist("questions")
            if upload is not None and not isinstance(upload, str):
                data = await upload.read()
                try:
                    raw["document"] = data.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise APIError(400, "the uploaded file is not UTF-8 text", param="file") from e
        else:
            try:
                raw = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise APIError(400, "the request body is not valid JSON") from e
            if not isinstance(raw, dict):
                raise APIError(400, "the request body must be a JSON object")
        try:
            req = JobRequest.model_validate(raw)
        except ValidationError as e:
            message, param = _validation_message(list(e.errors()))
            raise APIError(400, message, param=param) from e
        server.check_model(req.model)
        document = req.document
        if req.document_file_id is not None:
            ref = FileRef(file_id=req.document_file_id)
            try:
                document = await asyncio.to_thread(server.file_text, ref, "document")
            except APIError as e:
                e.param = "document_file_id"
                raise
        assert document is not None
        try:
            json_object, schema = _guided(req.response_format)
            server.check_priority(req.priority)
            params = SamplingParams(
                adapter=server.adapter(req.model),
                max_new_tokens=req.max_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                top_k=req.top_k,
                min_p=req.min_p,
                repetition_penalty=req.repetition_penalty,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                seed=req.seed,
                stop=(req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ()),
                stop_token_ids=tuple(req.stop_token_ids or ()),
                ignore_eos=req.ignore_eos,
                min_tokens=req.min_tokens,
                logit_bias=req.logit_bias or (),
                allowed_token_ids=req.allowed_token_ids,
                bad_words=req.bad_words or (),
                json_object=json_object,
                json_schema=schema,
                priority=req.priority,
                thinking_budget=req.thinking_token_budget,
            )
            job_id = runtime.submit(
                document,
                req.questions,
                params,
                idempotency_key=req.idempotency_key,
                owner=CALLER.get(),
            )
        except IdempotencyKeyConflictError as e:
            raise APIError(
                409, str(e), param="idempotency_key", code="idempotency_key_conflict"
            ) from e
        except ValueError as e:
            raise APIError(400, str(e), param=_param_of(str(e))) from e
        return status(job_id)

    @app.get("/v1/jobs")
    async def list_jobs(
        state: str | None = None, after: str | None = None, limit: int | None = None,
        order: str = "asc",
    ) -> dict[str, Any]:  # fmt: skip
        """The caller's jobs, oldest first (`order=desc`: newest first), those in `state`
        only when given; with `limit`, one page after the job `after` (OpenAI's cursor
        pagination: `has_more`, `last_id`)."""
        states = [s.value for s in JobState]
        if state is not None and state not in states:
            raise APIError(400, f"state must be one of {states}, got {state!r}", param="state")
        if order not in ("asc", "desc"):
            raise APIError(400, f"order must be 'asc' or 'desc', got {order!r}", param="order")
        jobs = [job_dict(s) for s in runtime.jobs(CALLER.get())]  # (only the caller's)
        if state is not None:
            jobs = [j for j in jobs if j["state"] == state]
        if order == "desc":
            jobs.reverse()
        if limit is None and after is None:
            return {"object": "list", "data": jobs}
        return list_page(jobs, after, 20 if limit is None else limit, 10_000)

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str) -> dict[str, Any]:
        return status(job_id)

    @app.get("/v1/jobs/{job_id}/result")
    async def job_result(job_id: str) -> dict[str, Any]:
        s = status(job_id)
        if s["state"] == JobState.DONE.value:
            return {"id": job_id, "object": "job.result", "answers": runtime.result(job_id, 0)}
        if s["state"] in (JobState.QUEUED.value, JobState.RUNNING.value):
            raise APIError(
                409,
                f"job {job_id} is {s['state']}; poll GET /v1/jobs/{job_id}",
                code="job_not_finished",
            )
        raise APIError(409, f"job {job_id} {s['state']}: {s['error']}", code=f"job_{s['state']}")

    @app.delete("/v1/jobs/{job_id}")
    async def cancel(job_id: str) -> dict[str, Any]:
        status(job_id)  # 404 for an unknown id
        previous = runtime.cancel(job_id)
        return {
            "id": job_id,
            "object": "job",
            "cancelled_from": previous.value,
            **{k: v for k, v in status(job_id).items() if k not in ("id", "object")},
        }


DRAIN_SECONDS = 30.0
"""How long an oversized upload is read (and dropped) before its 413 goes out regardless."""


class _BodyLimit:
    """413 for a body over the limit, by Content-Length or by counting a chunked body.

    A body without a Content-Length is read here (up to the limit) and handed on whole,
    so an oversized one is a 413 however the route reads it. Before answering 413 the
    rest of the body is read and dropped, up to `drain_bytes` and `DRAIN_SECONDS` (not when
    the client waits on `Expect: 100-continue`, which sends nothing before a go-ahead): a
    client still sending when the server closes the connection would see a broken pipe
    instead of the 413. Past those bounds the connection is closed at once.
    """

    def __init__(
        self,
        app: Any,
        max_bytes: int,
        drain_bytes: int = 64 * 2**20,
        paths: dict[str, tuple[int, str]] | None = None,
        flag: str = "--max-request-mb",
    ):
        self.app = app
        self.max_bytes, self.flag = max_bytes, flag
        self.drain_bytes = max(drain_bytes, 4 * max_bytes)
        self.paths = {
            path: _BodyLimit(app, limit, drain_bytes, flag=flag)
            for path, (limit, flag) in (paths or {}).items()
        }
        """Routes with their own limit (uploads), each with its limiter."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        own = self.paths.get(scope.get("path", ""))
        if own is not None:
            await own(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        # a client that sent `Expect: 100-continue` waits for a go-ahead before its body:
        # answer at once rather than ask for the body only to drop it
        waiting = headers.get(b"expect", b"").lower() == b"100-continue"
        if length is not None and length.isdigit():
            if int(length) > self.max_bytes:
                if int(length) <= self.drain_bytes and not waiting:
                    await self._drain(receive, 0)
                await self._reject(send, scope)
                return
            await self.app(scope, receive, send)
            return
        if scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        parts: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body was sent
            body = message.get("body", b"")
            seen += len(body)
            more = bool(message.get("more_body", False))
            if seen > self.max_bytes:
                if more:
                    await self._drain(receive, seen)
                await self._reject(send, scope)
                return
            parts.append(body)
            if not more:
                break
        whole = {"type": "http.request", "body": b"".join(parts), "more_body": False}
        given = False

        async def replay() -> Any:
            nonlocal given
            if not given:
                given = True
                return whole
            return await receive()

        await self.app(scope, replay, send)

    async def _drain(self, receive: Any, seen: int) -> None:
        async def drain() -> None:
            nonlocal seen
            while seen <= self.drain_bytes:
                message = await receive()
                if message["type"] != "http.request":
                    return
                seen += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return

        with contextlib.suppress(TimeoutError):  # a stalled upload gets its 413 anyway
            await asyncio.wait_for(drain(), timeout=DRAIN_SECONDS)

    async def _reject(self, send: Any, scope: Any) -> None:
        body = json.dumps(
            error_body(
                f"request body over {self.max_bytes} bytes ({self.flag})",
                "invalid_request_error",
                code="request_too_large",
                path=scope.get("path", ""),
                status=413,
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})
