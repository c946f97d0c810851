"""Request bodies of the OpenAI-compatible API, as pydantic models mirroring OpenAI's schema.

Unknown fields are ignored (as OpenAI-compatible servers do; each name is logged once, as vLLM
logs them, so a misspelt option shows in the server's log), except those that would change
the answer and that this server does not implement (`suffix`, chat's `best_of`, ...):
those are a 400 naming the field rather than an answer that silently ignores them. `null`
means the field's default, as in OpenAI's schema. The runtime's own sampling extras (`top_k`,
`min_p`, `repetition_penalty`, `ignore_eos`, `skip_special_tokens`, and vLLM's
`prompt_logprobs`, `guided_choice`, `guided_regex`, `guided_json`, `guided_grammar` and their
newer form `structured_outputs`) are accepted as extra body fields. Ranges are checked here so
a bad field is a 400 naming it. `response_format` `json_object` and `json_schema` turn on
guided JSON output (`SamplingParams.json_object` / `json_schema`); `logit_bias` is OpenAI's.
A request gives one kind of guided output: two (`structured_outputs` and `guided_regex`, ...)
are a 400 naming the later of them.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dist_runtime.beam_search import MAX_BEAM_WIDTH

logger = logging.getLogger(__name__)
_IGNORED_LOGGED: set[tuple[str, str]] = set()
"""(request type, field) pairs already logged as ignored."""
_IGNORED_LOCK = threading.Lock()


class UnsupportedFieldError(ValueError):
    """A request field this server does not implement, set to a value that would matter."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _unsupported(data: dict[str, Any], fields: dict[str, Any], within: str = "") -> None:
    """Raise for the first of `fields` set in `data` to a value other than the harmless ones
    (`fields[name]`: a predicate that is true for values that change nothing); `within`: the
    path of the object `data` is (`structured_outputs.`), which the error's param starts with."""
    for name, harmless in fields.items():
        if name in data and not harmless(data[name]):
            raise UnsupportedFieldError(
                within + name,
                f"{within}{name} is not supported by this server; leave it out of the request",
            )


def _empty(v: Any) -> bool:
    return v is None or v == {} or v == [] or v == ""


def _off(v: Any) -> bool:
    return v is None or v is False


@functools.cache
def _field_names(cls: type[BaseModel]) -> frozenset[str]:
    """A request model's field names and aliases (what `_Request._log_ignored` knows)."""
    fields = cls.model_fields
    return frozenset(fields) | {f.alias for f in fields.values() if f.alias}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _log_ignored(cls, data: Any) -> Any:
        """Log (once per field and request type) the fields this model does not have: they
        are ignored, and a client's misspelt option should not go unnoticed."""
        if not isinstance(data, dict) or cls.model_config.get("extra") != "ignore":
            return data
        unknown = [str(name) for name in data if name not in _field_names(cls)]
        if not unknown:
            return data
        with _IGNORED_LOCK:
            new = [n for n in unknown if (cls.__name__, n) not in _IGNORED_LOGGED]
            _IGNORED_LOGGED.update((cls.__name__, n) for n in new)
        if new:
            logger.warning(
                "%s fields ignored (not part of this API): %s", cls.__name__, ", ".join(sorted(new))
            )
        return data

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """An explicit `null` means the default, as OpenAI's schema allows for its optional
        fields (pydantic would otherwise reject null for a field typed without None)."""
        if not isinstance(data, dict):
            return data
        return {
            k: v
            for k, v in data.items()
            if not (v is None and k in cls.model_fields and not cls.model_fields[k].is_required())
        }


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False
    """vLLM's: with include_usage, every chunk carries the usage so far (its choice's tokens
    generated), not only the last one."""

    @property
    def continuous(self) -> bool:
        return self.include_usage and self.continuous_usage_stats


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: text (the default), any JSON object, or a JSON Schema."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs a json_schema object with its schema')
        return self


class PredictionPart(_Request):
    type: Literal["text"]
    text: str


class Prediction(_Request):
    """OpenAI's `prediction`: {"type": "content", "content": text or text parts}."""

    type: Literal["content"]
    content: str | list[PredictionPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StructuredOutputs(_Request):
    """vLLM's `structured_outputs` (its form of the guided_* fields since 0.12): one of
    `choice`, `regex`, `json` (a JSON Schema, or its JSON text), `grammar` (GBNF) and
    `json_object`. `disable_fallback` and `backend` choose how vLLM builds the guide, not what
    it lets through (this server has one way, which never falls back to unguided output):
    accepted and ignored. `disable_any_whitespace` makes guided JSON compact (no whitespace
    outside strings). vLLM's other options that change the answer (`structural_tag`,
    `whitespace_pattern`, `disable_additional_properties`) are a 400 unless left at their
    defaults, and so is any other key."""

    model_config = ConfigDict(extra="forbid")
    choice: list[str] | None = Field(default=None, min_length=1)
    regex: str | None = None
    json_: dict[str, Any] | bool | str | None = Field(default=None, alias="json")
    grammar: str | None = None
    json_object: bool = False
    disable_fallback: bool = False
    backend: str | None = None
    disable_any_whitespace: bool = False

    @model_validator(mode="before")
    @classmethod
    def _no_unsupported(cls, data: Any) -> Any:
        """Refuse vLLM's options that would change the answer; drop them at their defaults."""
        if not isinstance(data, dict):
            return data
        options = {
            "structural_tag": _empty,
            "whitespace_pattern": _empty,
            "disable_additional_properties": _off,
        }
        _unsupported(data, options, "structured_outputs.")
        return {k: v for k, v in data.items() if k not in options}

    @model_validator(mode="after")
    def _one_kind(self) -> StructuredOutputs:
        kinds = self.kinds()
        if len(kinds) > 1:
            given = " and ".join(kinds)
            raise ValueError(
                f"give one of choice, regex, json, grammar and json_object, not {given}"
            )
        return self

    def kinds(self) -> dict[str, Any]:
        """The guides it gives, by vLLM's names (none for `{}`)."""
        given = {
            "choice": self.choice,
            "regex": self.regex,
            "json": self.json_,
            "grammar": self.grammar,
            "json_object": self.json_object or None,
        }
        return {k: v for k, v in given.items() if v is not None}


class SamplingFields(_Request):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=16)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # The runtime's extras.
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    """vLLM's extra: the stop string that ended the answer stays at the end of its text."""
    cache_salt: str | None = Field(default=None, min_length=1)
    """vLLM's extra: prefix-cache isolation; only requests with the same salt share cached K/V."""
    truncate_prompt_tokens: int | None = Field(default=None, ge=1)
    """vLLM's extra: keep only the prompt's last this many tokens."""
    min_tokens: int = Field(default=0, ge=0)
    """vLLM's extra: the answer's least length in tokens (EOS and stop ids held back)."""
    stop_token_ids: list[int] | None = None
    """vLLM's extra: token ids that end the answer (beside EOS); the choice's `stop_reason`
    names the one that did."""
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    """vLLM's extra; either value gives the same text: special tokens are joined to their
    neighbours without spaces, as vLLM's fast-tokenizer path does (its slow tokenizers alone
    put spaces between them when true)."""
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)
    """vLLM's extra: each prompt token's log-probability and this many top ones, returned as
    the choice's `prompt_logprobs`."""
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, float] | None = None
    """OpenAI's: token id (as a string key) -> bias in [-100, 100]."""
    return_token_ids: bool = False
    """vLLM's extra: the answer carries its prompt's token ids and each choice's generated
    ids (`prompt_token_ids`, `token_ids`), streamed too."""
    return_tokens_as_token_ids: bool = False
    """vLLM's extra: logprobs name tokens as `token_id:N` (`bytes` stay the token's own)."""
    allowed_token_ids: list[int] | None = None
    """vLLM's extra: every token is drawn from these ids only."""
    bad_words: list[str] | None = None
    """vLLM's extra: words the answer does not write (`SamplingParams.bad_words`)."""
    guided_choice: list[str] | None = None
    """vLLM's extra: the answer is exactly one of these strings."""
    guided_regex: str | None = None
    """vLLM's extra: the answer matches this regular expression whole."""
    guided_json: dict[str, Any] | None = None
    """vLLM's extra: a JSON Schema for the answer (as response_format's json_schema)."""
    guided_grammar: str | None = None
    """vLLM's extra: the answer is text of this GBNF grammar (llama.cpp's format, from its
    `root` rule)."""
    structured_outputs: StructuredOutputs | None = None
    """vLLM's newer form of the guided_* fields (the only one since vLLM 0.12)."""
    priority: int = Field(default=0, ge=-(2**31), lt=2**31)
    """vLLM's extra: scheduling priority, lower first (`SamplingParams.priority`)."""
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    """OpenAI's: "flex" runs a level behind interactive requests (as batches do), "priority"
    a level ahead where `--min-priority` allows; the response names the tier used."""
    use_beam_search: bool = False
    """vLLM's extra: beam search (`dist_runtime.beam_search`), `n` beams wide; the `n` best
    beams are the choices, best first."""
    length_penalty: float = 1.0
    """vLLM's extra, with beam search: the exponent of the length a beam's score divides by."""
    prediction: Prediction | None = None
    """OpenAI's Predicted Outputs: text the answer is expected to mostly repeat."""
    thinking_token_budget: int | None = Field(default=None, ge=0)
    """vLLM's extra: a reasoning model's most thinking tokens, between `<think>` and
    `</think>`; then `</think>` is forced and the model answers (`SamplingParams.
    thinking_budget`)."""

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, v: str | list[str] | None) -> str | list[str] | None:
        if v is not None and any(not s for s in ([v] if isinstance(v, str) else v)):
            raise ValueError("stop strings must not be empty")
        return v

    @model_validator(mode="before")
    @classmethod
    def _no_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            _unsupported(
                data,
                {
                    # (completions take it: `CompletionRequest.best_of`)
                    "best_of": lambda v: (
                        "best_of" in cls.model_fields or v is None or v == 1 or v == data.get("n")
                    ),
                    "guided_whitespace_pattern": _empty,
                    # vLLM's other options that would change the answer (its
                    # `spaces_between_special_tokens` is taken: `SamplingFields`)
                    "logits_processors": _empty,
                },
            )
        return data

    @model_validator(mode="after")
    def _beam_search_fits(self) -> SamplingFields:
        """Beam search ranks beams by the model's own log-probabilities, greedy, to its own
        EOS: what would sample, hold back, guide or stream it is a 400 naming the field."""
        if not self.use_beam_search:
            if self.length_penalty != 1.0:
                raise UnsupportedFieldError(
                    "length_penalty", "length_penalty goes with use_beam_search: true"
                )
            return self
        if self.n > MAX_BEAM_WIDTH:
            raise UnsupportedFieldError(
                "n", f"with use_beam_search, n (the beam width) is at most {MAX_BEAM_WIDTH}"
            )
        fixed = {
            "stream": self.stream,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "min_tokens": self.min_tokens,
            "logit_bias": self.logit_bias,
            "allowed_token_ids": self.allowed_token_ids is not None,
            "bad_words": self.bad_words,
            "prompt_logprobs": self.prompt_logprobs is not None,
            "prediction": self.prediction,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "top_p": self.top_p != 1.0,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty != 1.0,
            "temperature": self.temperature not in (0.0, 1.0),
            "thinking_token_budget": self.thinking_token_budget is not None,
            **{name: True for name in self.guides()},
        }
        for name, given in fixed.items():
            if given:
                raise UnsupportedFieldError(
                    name, f"{name} does not go with use_beam_search: leave it out"
                )
        return self

    @model_validator(mode="after")
    def _one_guide(self) -> SamplingFields:
        guides = self.guides()
        if len(guides) > 1:
            raise UnsupportedFieldError(
                guides[-1], f"give one of {' and '.join(guides)}: each asks for guided output"
            )
        return self

    def guides(self) -> list[str]:
        """The fields that give the request guided output (response_format other than text,
        guided_*, structured_outputs other than `{}`)."""
        fmt, so = self.response_format, self.structured_outputs
        given = {
            "response_format": fmt is not None and fmt.type != "text",
            "guided_json": self.guided_json is not None,
            "guided_choice": bool(self.guided_choice),
            "guided_regex": self.guided_regex is not None,
            "guided_grammar": self.guided_grammar is not None,
            "structured_outputs": so is not None and bool(so.kinds()),
        }
        return [name for name, on in given.items() if on]


def check_tool_types(tools: Any, allowed: tuple[str | None, ...], give: str) -> None:
    """Every tool (a raw request's list) is of an `allowed` type: the others are a provider's
    built-in tools (web search, ...), which this server does not have. Anything but a list
    is left to the field's own validation (a 400 naming `tools`)."""
    if not isinstance(tools, list):
        return
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind not in allowed:
            raise UnsupportedFieldError(
                f"tools.{i}.type",
                f"tool type {kind!r} is a built-in tool this server does not have; {give}",
            )


def check_tool_choice(names: list[str], calls: bool, named: str | None) -> None:
    """The tools' names are distinct; a choice that requires a call (`calls`) has tools to
    call, and a named one (`named`) is among them."""
    if len(set(names)) != len(names):
        raise UnsupportedFieldError("tools", f"two tools share a name: {names}")
    if calls and not names:
        raise UnsupportedFieldError("tool_choice", "tool_choice needs tools to choose from")
    if named is not None and named not in names:
        raise UnsupportedFieldError(
            "tool_choice", f"tool_choice names {named!r}, which is not in tools {names}"
        )


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class FileRef(BaseModel):
    """A file given to the model: an upload's `file_id` (`POST /v1/files`) or the file itself
    as `file_data` (base64, or a `data:` URL). Text files only (UTF-8): its text stands where
    the part is."""

    model_config = ConfigDict(extra="forbid")
    file_id: str | None = None
    file_data: str | None = None
    filename: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> FileRef:
        if (self.file_id is None) == (self.file_data is None):
            raise ValueError(
                "give file_id (an uploaded file, POST /v1/files) or file_data (its bytes in "
                "base64), one of them"
            )
        return self


class FilePart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["file"]
    file: FileRef


ContentPart = Annotated[TextPart | FilePart, Field(discriminator="type")]
"""A part of a chat message's content: text, or a text file (OpenAI's `file` part)."""


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool", "function"]
    """`developer` is OpenAI's newer name for `system` and is sent to the template as one; a
    `tool` message carries a call's result (`tool_call_id`); `function` is the older form of
    `tool` (the result of the call named `name`: `legacy_function_turns`)."""
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCall | None = None
    """The older form of an assistant's `tool_calls`: one call."""
    name: str | None = None
    """A `function` message's function (other roles' `name` changes nothing here)."""

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if self.role == "function" and not self.name:
            raise ValueError("a function message needs the name of the function it answers")
        if (self.tool_calls or self.function_call) and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls or a function_call")
        if self.tool_calls and self.function_call:
            raise ValueError("send tool_calls or the older function_call, not both")
        return self

    @property
    def template_role(self) -> str:
        return "system" if self.role == "developer" else self.role

    def text(self) -> str:
        """The content's text (files left out: `calls.message_text` reads them)."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content if isinstance(part, TextPart))
        return self.content or ""


def legacy_function_turns(messages: list[ChatMessage]) -> list[ChatMessage]:
    """Messages in OpenAI's older function-calling form (an assistant's `function_call`, a
    `function` message with its result) in the newer one: the call gets an id and the result
    names it (the latest call of that function before it), as `tool_calls` and `tool`."""
    if not any(m.role == "function" or m.function_call for m in messages):
        return messages
    out, ids = list[ChatMessage](), dict[str, str]()
    for i, m in enumerate(messages):
        if m.function_call is not None:
            ids[m.function_call.name] = call_id = f"call_{i}"
            call = ToolCall(id=call_id, function=m.function_call)
            m = m.model_copy(update={"function_call": None, "tool_calls": [call]})
        elif m.role == "function":
            assert m.name is not None
            if m.name not in ids:
                raise UnsupportedFieldError(
                    f"messages.{i}",
                    f"function message {i} answers {m.name!r}, which no assistant message "
                    "before it calls (function_call)",
                )
            m = m.model_copy(update={"role": "tool", "tool_call_id": ids[m.name]})
        out.append(m)
    return out


def tools_with_functions(
    tools: list[Tool] | None, functions: list[FunctionDef] | None
) -> list[Tool] | None:
    """A request's `tools`, or the older `functions` as tools (not both)."""
    if functions is None:
        return tools
    if tools is not None:
        raise UnsupportedFieldError("functions", "send tools or the older functions, not both")
    return [Tool(type="function", function=f) for f in functions]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    continue_final_message: bool = False
    """vLLM's extra: the last message, the assistant's, starts the answer; the model continues
    it (send `add_generation_prompt: false` with it, as vLLM asks)."""
    add_generation_prompt: bool | None = None
    """vLLM's extra: open the assistant's turn after the messages (the default unless
    continue_final_message); false alone ends the prompt with the last turn closed."""
    chat_template_kwargs: dict[str, Any] | None = None
    """vLLM's extra: more variables for the chat template (e.g. `enable_thinking`)."""
    chat_template: str | None = Field(default=None, min_length=1)
    """vLLM's extra: a Jinja chat template for this request instead of the model's (with
    `--trust-request-chat-template`)."""
    reasoning_effort: str | None = None
    """OpenAI's: passed to the chat template as `reasoning_effort` (as vLLM does), for
    templates that read it; chat_template_kwargs may set it too."""
    include_reasoning: bool = True
    """vLLM's extra: false leaves a reasoning model's thinking out of the answer (its tokens
    still count)."""
    echo: bool = False
    """vLLM's extra: the answer's content starts with the last message's when that is the
    assistant's (the text it continues)."""
    documents: list[dict[str, str]] | None = None
    """vLLM's extra: documents for a chat template that writes them (its `documents`, as HF's
    `apply_chat_template(documents=...)`), each e.g. `{"title": ..., "text": ...}`."""
    add_special_tokens: bool = False
    """vLLM's extra: the tokens the tokenizer adds to a text (BOS) on top of what the chat
    template writes (for a template that writes no BOS); off by default, as in vLLM."""
    functions: list[FunctionDef] | None = None
    """OpenAI's older form of `tools` (functions alone). The answer then calls at most one,
    as the older API's `function_call` in the message, finish reason `function_call`."""
    function_call: Literal["none", "auto"] | NamedFunction | None = None
    """OpenAI's older form of `tool_choice`, with `functions`."""

    def template_kwargs(self) -> dict[str, Any] | None:
        """chat_template_kwargs, with reasoning_effort when given (the kwargs' own wins)."""
        if self.reasoning_effort is None:
            return self.chat_template_kwargs
        return {"reasoning_effort": self.reasoning_effort, **(self.chat_template_kwargs or {})}

    @model_validator(mode="after")
    def _tool_choice_fits(self) -> ChatCompletionRequest:
        self._from_functions()
        if self.continue_final_message and self.add_generation_prompt:
            raise UnsupportedFieldError(
                "add_generation_prompt",
                "continue_final_message continues the last message: it cannot open a new "
                "turn too; send add_generation_prompt: false",
            )
        choice = self.tool_choice
        check_tool_choice(
            [t.function.name for t in self.tools or []],
            choice not in (None, "none", "auto"),
            choice.function.name if isinstance(choice, NamedToolChoice) else None,
        )
        guides = self.guides()
        if choice not in (None, "none", "auto") and guides:
            raise UnsupportedFieldError(
                guides[0], f"a required tool call and a {guides[0]} cannot combine"
            )
        return self

    def _from_functions(self) -> None:
        """The older function-calling fields in their newer form (tools, tool_choice, one
        call at most; the messages' `function_call` and `function` turns)."""
        self.messages = legacy_function_turns(self.messages)
        self.tools = tools_with_functions(self.tools, self.functions)
        if self.functions is not None:
            self.parallel_tool_calls = False  # (the older answer holds one call)
        if self.function_call is None:
            return
        if self.functions is None or self.tool_choice is not None:
            raise UnsupportedFieldError(
                "function_call",
                "function_call goes with functions (the older form of tools and tool_choice): "
                "send functions with it, or tools with tool_choice",
            )
        call = self.function_call
        self.tool_choice = (
            call if isinstance(call, str) else NamedToolChoice(type="function", function=call)
        )

    @property
    def tool_mode(self) -> str:
        """ "none", "auto", "required" or "named" (OpenAI's default: auto with tools)."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    @model_validator(mode="before")
    @classmethod
    def _no_unsupported_chat(cls, data: Any) -> Any:
        if isinstance(data, dict):
            _unsupported(
                data,
                {
                    "audio": _empty,
                    "modalities": lambda v: _empty(v) or v == ["text"],
                    "web_search_options": lambda v: v is None,
                },
            )
            if data.get("top_logprobs") and not data.get("logprobs"):
                raise UnsupportedFieldError(
                    "top_logprobs", "top_logprobs needs logprobs: true (as in OpenAI's API)"
                )
        return data


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=0)
    """0 (OpenAI's legacy API, vLLM): the prompt is read and nothing generated; with `echo`
    and `logprobs` the choice is the prompt with its tokens' log-probabilities (scoring)."""
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    add_special_tokens: bool = True
    """vLLM's extra: text prompts get the tokenizer's special tokens (BOS); false: none."""
    best_of: int | None = Field(default=None, ge=1, le=16)
    """OpenAI's: sample this many completions per prompt and return the `n` with the highest
    log-probability per token (the model's own, before temperature and the other settings),
    best first; every one sampled counts in the usage."""

    @model_validator(mode="before")
    @classmethod
    def _no_unsupported_completion(cls, data: Any) -> Any:
        if isinstance(data, dict):
            _unsupported(data, {"suffix": _empty})
        return data

    @model_validator(mode="after")
    def _best_of_fits(self) -> CompletionRequest:
        if self.best_of is None or self.best_of == self.n:
            return self
        if self.best_of < self.n:
            raise UnsupportedFieldError(
                "best_of", f"best_of ({self.best_of}) must be at least n ({self.n})"
            )
        for name, on in (("stream", self.stream), ("use_beam_search", self.use_beam_search)):
            if on:
                raise UnsupportedFieldError(
                    "best_of",
                    f"best_of ({self.best_of}) above n ({self.n}) does not go with {name}: the "
                    "best completions are known only once all are done; leave one out",
                )
        return self

    @property
    def width(self) -> int:
        """Completions sampled per prompt: `best_of`, else `n`."""
        return self.best_of or self.n

    @property
    def prompt_logprobs_k(self) -> int | None:
        """Top-k of the prompt log-probabilities the engine computes: `prompt_logprobs`, and
        `logprobs` when echo returns the prompt's tokens with theirs (as vLLM does)."""
        wanted = [self.prompt_logprobs]
        if self.echo:
            wanted.append(self.logprobs)
        ks = [k for k in wanted if k is not None]
        return max(ks) if ks else None


class TokenizeRequest(_Request):
    """vLLM's /tokenize: a completion `prompt` or chat `messages` (with the `tools` that shape
    the chat prompt), counted and tokenized as the matching route would."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = Field(default=None, min_length=1)
    documents: list[dict[str, str]] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    """For `messages`: as the chat route's fields."""
    add_special_tokens: bool | None = None
    """Add the tokenizer's special tokens (BOS) as the matching route does: by default for a
    `prompt` (as completions), not for `messages` (as chat, whose template writes them)."""
    return_token_strs: bool = False
    functions: list[FunctionDef] | None = None
    """The older form of `tools`, as the chat route takes it."""

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise UnsupportedFieldError("prompt", "give a prompt or messages (one of them)")
        if self.messages is not None and not self.messages:
            raise UnsupportedFieldError("messages", "messages must not be empty")
        if self.messages is not None:
            self.messages = legacy_function_turns(self.messages)
        self.tools = tools_with_functions(self.tools, self.functions)
        return self


class LoadLoraRequest(_Request):
    """vLLM's /v1/load_lora_adapter."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraRequest(_Request):
    """vLLM's /v1/unload_lora_adapter (its lora_int_id is taken and ignored)."""

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int] = Field(max_length=16 * 2**20)


class JobRequest(_Request):
    """`POST /v1/jobs`: a field this API does not know is a 400 naming it (a misspelt
    sampling option would otherwise be dropped without a word)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    """The served model or one of its LoRA adapters (None: the base model)."""
    document: str | None = Field(default=None, min_length=1)
    document_file_id: str | None = None
    """The document as an upload (`POST /v1/files`, a UTF-8 text file) instead of `document`."""
    questions: list[str] = Field(min_length=1)
    max_tokens: int = Field(default=128, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    idempotency_key: str | None = None
    priority: int = Field(default=0, ge=-(2**31), lt=2**31)
    """Scheduling priority of the job's requests, lower first (`SamplingParams.priority`)."""
    response_format: ResponseFormat | None = None
    """Guided JSON answers, as on the chat route (a multipart form sends it as JSON text)."""
    # The rest of the sampling options, as on the completion route (`SamplingParams`).
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    thinking_token_budget: int | None = Field(default=None, ge=0)
    """A reasoning model's most thinking tokens per answer (as on the chat route)."""

    @field_validator(
        "response_format", "stop_token_ids", "logit_bias", "allowed_token_ids", "bad_words",
        mode="before",
    )  # fmt: skip
    @classmethod
    def _form_json(cls, v: Any) -> Any:
        """A multipart form's value of these fields is their JSON text."""
        if isinstance(v, str):
            try:
                return json.loads(v)
            except json.JSONDecodeError as e:
                raise ValueError(f"not valid JSON: {e}") from None
        return v

    @model_validator(mode="after")
    def _one_document(self) -> JobRequest:
        if (self.document is None) == (self.document_file_id is None):
            raise UnsupportedFieldError(
                "document",
                "give the document as document (its text), a file part (multipart), or "
                "document_file_id (an upload, POST /v1/files): one of them",
            )
        return self


def error_body(
    message: str,
    type_: str,
    param: str | None = None,
    code: str | None = None,
    path: str = "",
    status: int = 400,
) -> dict[str, Any]:
    """An error's JSON: OpenAI's `{"error": {"message", "type", "param", "code"}}`, or on
    Anthropic's routes (`path` under /v1/messages) `{"type": "error", "error": {"type",
    "message"}}` with Anthropic's type for the status."""
    if path.startswith(ANTHROPIC_PATH):
        if param and not message.startswith(param):
            message = f"{param}: {message}"
        kind = ANTHROPIC_ERROR_TYPES.get(status, "api_error" if status >= 500 else type_)
        return {"type": "error", "error": {"type": kind, "message": message}}
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


ANTHROPIC_PATH = "/v1/messages"
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}
