"""Function calling on the chat route: the tools go into the prompt, calls come out of the answer.

Three formats (`ToolFormat`), picked per model (`tool_format_for`, or `--tool-call-format`):

* `internlm2`, for models whose tokenizer has InternLM2's agent tokens (`<|plugin|>`,
  `<|action_start|>`, `<|action_end|>`) and a ChatML prompt, the format those models were
  trained on (as LMDeploy writes it): the functions as a JSON list in a
  `<|im_start|>system name=<|plugin|>` turn after the system message; a call as
  `<|action_start|><|plugin|>\n{"name": ..., "parameters": {...}}<|action_end|>` at the end of
  the assistant's turn (text before it is the message's content); a tool's result as an
  `<|im_start|>environment name=<|plugin|>` turn. One call a turn.
* `template`, for a model whose chat template takes `tools` (Qwen2.5, Hermes, Llama 3.1, ...):
  the template writes the functions, earlier calls and results, as HF's `apply_chat_template`
  does; calls come back between `<tool_call>` tags when the template asks for them, else as
  the whole answer's JSON (`TemplateCalls`).
* `json`, for every other model: the functions described in a system message (`tools_text`)
  that asks for `{"name": ..., "arguments": {...}}` or a JSON list of them as the whole answer;
  earlier calls written back in that form, results as `environment` turns naming their
  function.

Then, in both:

* `tool_choice: "required"` or a named function: guided output (`call_schema`) makes the answer
  a call whose arguments follow the function's `parameters` schema, so it always parses
  (`internlm2` and tagged templates: the prompt ends with the call's opening and the answer is
  its JSON);
* `"auto"`: the model answers freely; a call in its answer comes back as `tool_calls`
  (`CallSplitter` holds back streamed text while it may be one);
* `"none"`: the tools stay out of the prompt.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass
from typing import Any

from dist_runtime.text.chat import (
    IM_START,
    chat_template,
    check_continuable,
    cut_after_final_message,
    encode_chat,
    internlm2_chat_prompt,
    template_variables,
)
from dist_runtime.text.json_stream import JsonStream, Path
from dist_runtime.text.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

TOOLS_INTRO = (
    "You can call functions. To call one, reply with only a JSON object "
    '{"name": <function name>, "arguments": <its arguments as a JSON object>}; to call several '
    "at once, reply with a JSON list of such objects. Otherwise reply normally.\n\n"
    "Functions:"
)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


@dataclass(frozen=True)
class Function:
    name: str
    description: str | None
    parameters: dict[str, Any] | None


def tools_text(functions: list[Function]) -> str:
    """The system text that lists the functions (one JSON line each)."""
    lines = [TOOLS_INTRO, *(json.dumps(_entry(f), ensure_ascii=False) for f in functions)]
    return "\n".join(lines)


def call_text(calls: list[tuple[str, Any]]) -> str:
    """Calls as the model is asked to write them (arguments a JSON object or its text)."""
    objs = [{"name": name, "arguments": _loaded(args)} for name, args in calls]
    return json.dumps(objs[0] if len(objs) == 1 else objs, ensure_ascii=False)


def _loaded(args: Any) -> Any:
    """Arguments given as JSON text, parsed (text that is not JSON stays as it is)."""
    if not isinstance(args, str):
        return args
    try:
        return json.loads(args)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than json allows
        return args


def call_schema(
    functions: list[Function], parallel: bool, key: str = "arguments"
) -> dict[str, Any]:
    """The JSON Schema of an answer that calls one of `functions` (several at once when
    `parallel`), its arguments under `key`."""
    ones = [
        {
            "type": "object",
            "properties": {"name": {"const": f.name}, key: f.parameters or {"type": "object"}},
            "required": ["name", key],
        }
        for f in functions
    ]
    one = ones[0] if len(ones) == 1 else {"anyOf": ones}
    if not parallel:
        return one
    return {"anyOf": [one, {"type": "array", "items": one, "minItems": 1}]}


def parse_calls(text: str, functions: list[Function], parallel: bool) -> list[tuple[str, str]]:
    """The calls an answer makes: [(name, arguments as JSON text)], or [] when the answer is
    not exactly a call (or list of calls) of listed functions with object arguments. Without
    `parallel` only the first call is kept."""
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    if not body.startswith(("{", "[")):
        return []
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return []
    items = value if isinstance(value, list) else [value]
    calls = [_call_of(item, functions) for item in items]
    if not calls or None in calls:
        return []
    found = [c for c in calls if c is not None]
    return found[:1] if not parallel else found


def _call_of(item: Any, functions: list[Function]) -> tuple[str, str] | None:
    """(name, arguments as JSON text) of one call object, `{"name", "arguments"}` (or
    `"parameters"`, arguments as an object or its JSON text), of a listed function; else
    None."""
    name = item.get("name") if isinstance(item, dict) else None
    if not isinstance(name, str) or name not in {f.name for f in functions}:
        return None
    if set(item) - {"name", "arguments", "parameters"}:
        return None
    args = _loaded(item.get("arguments", item.get("parameters")))
    if not isinstance(args, dict):
        return None
    return item["name"], json.dumps(args, ensure_ascii=False)


def _payload_call(payload: str, functions: list[Function]) -> tuple[str, str] | None:
    """The call in a marked block's JSON text (None when it is not one)."""
    try:
        return _call_of(json.loads(payload), functions)
    except (ValueError, RecursionError):
        return None


def tool_calls_json(calls: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """OpenAI's `tool_calls` entries, each with a fresh id."""
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": name, "arguments": args},
        }
        for name, args in calls
    ]


def chat_turns(
    messages: list[dict[str, Any]], functions: list[Function] | None
) -> list[dict[str, str]]:
    """Template turns from OpenAI messages ({"role", "content", "tool_calls", "tool_call_id"}):
    the tools' system text first (merged into a leading system message), calls written as
    the model is asked to write them, tool results as `environment` turns naming their
    function."""
    names: dict[str, str] = {}
    turns: list[dict[str, str]] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = [(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]]
            for c in m["tool_calls"]:
                names[c["id"]] = c["function"]["name"]
            content = (content + "\n" if content else "") + call_text(calls)
        elif role == "tool":
            name = names.get(m.get("tool_call_id") or "")
            role, content = "environment", f"{name} returned: {content}" if name else content
        turns.append({"role": role, "content": content})
    if functions:
        text = tools_text(functions)
        if turns and turns[0]["role"] == "system":
            turns[0] = {"role": "system", "content": turns[0]["content"] + "\n\n" + text}
        else:
            turns.insert(0, {"role": "system", "content": text})
    return turns


# -- formats ------------------------------------------------------------------------------------
ACTION_START = "<|action_start|>"
ACTION_END = "<|action_end|>"
PLUGIN = "<|plugin|>"
INTERNLM2_CALL_OPEN = f"{ACTION_START}{PLUGIN}\n"
"""How an InternLM2 call begins; the call's JSON follows, then `<|action_end|>`."""
TOOL_CALL_FORMATS = ("auto", "json", "internlm2", "template")


class ToolFormat:
    """How functions, calls and results are written into a model's prompt and read back out of
    its answers (see the module docstring)."""

    name = ""
    stop: tuple[str, ...] = ()
    """Stop strings for answers that may call (the model stops after a call)."""
    keep_special_tokens = False
    """Answers that may call keep special tokens in their text (the call is marked by them)."""
    marker: str | None = None
    """What opens a call in an answer (its JSON follows); None: a call is the whole answer."""

    def turns(
        self, messages: list[dict[str, Any]], functions: list[Function] | None
    ) -> list[dict[str, Any]]:
        """Template turns from OpenAI messages ({"role", "content", "tool_calls",
        "tool_call_id"})."""
        raise NotImplementedError

    def encode(
        self,
        tokenizer: Tokenizer,
        turns: list[dict[str, Any]],
        functions: list[Function] | None,
        calling: bool,
        continue_final: bool = False,
        template_kwargs: dict[str, Any] | None = None,
        generation_prompt: bool = True,
    ) -> list[int]:
        """The prompt's token ids; `calling`: the answer must be a call (required / named);
        `continue_final`: the answer continues the last (assistant) turn; `template_kwargs`:
        more variables for the chat template (a format writing its own prompt has none);
        `generation_prompt` false: the prompt ends with the last turn closed (HF's
        `add_generation_prompt=False`), no assistant turn opened."""
        raise NotImplementedError

    def call_schema(self, functions: list[Function], parallel: bool) -> dict[str, Any]:
        """The JSON Schema a required call's answer is held to."""
        raise NotImplementedError

    def split(
        self, text: str, functions: list[Function], parallel: bool, calling: bool
    ) -> tuple[str, list[tuple[str, str]]]:
        """(content, calls) of a whole answer that ended by itself: [] when it calls nothing
        (then the content is the whole text)."""
        raise NotImplementedError

    def sendable(self, text: str, calling: bool) -> int:
        """How much of a streamed answer's text so far can be sent as content: none of what
        may still turn out to be (part of) a call."""
        raise NotImplementedError


class JsonCalls(ToolFormat):
    name = "json"

    def turns(
        self, messages: list[dict[str, Any]], functions: list[Function] | None
    ) -> list[dict[str, Any]]:
        return list(chat_turns(messages, functions))

    def encode(
        self,
        tokenizer: Tokenizer,
        turns: list[dict[str, Any]],
        functions: list[Function] | None,
        calling: bool,
        continue_final: bool = False,
        template_kwargs: dict[str, Any] | None = None,
        generation_prompt: bool = True,
    ) -> list[int]:
        return encode_chat(
            tokenizer,
            turns,
            add_generation_prompt=generation_prompt,
            continue_final_message=continue_final,
            template_kwargs=template_kwargs,
        )

    def call_schema(self, functions: list[Function], parallel: bool) -> dict[str, Any]:
        return call_schema(functions, parallel)

    def split(
        self, text: str, functions: list[Function], parallel: bool, calling: bool
    ) -> tuple[str, list[tuple[str, str]]]:
        calls = parse_calls(text, functions, parallel)
        return ("" if calls else text), calls

    def sendable(self, text: str, calling: bool) -> int:
        if calling or text.lstrip()[:1] in ("", "{", "[", "`"):
            return 0  # a call is the whole answer: hold it until it ends
        return len(text)


class InternLM2Calls(ToolFormat):
    name = "internlm2"
    stop = (ACTION_END,)
    keep_special_tokens = True
    marker = ACTION_START + PLUGIN

    def turns(
        self, messages: list[dict[str, Any]], functions: list[Function] | None
    ) -> list[dict[str, Any]]:
        turns: list[dict[str, Any]] = []
        for m in messages:
            role, content = m["role"], m.get("content") or ""
            if role == "assistant" and m.get("tool_calls"):
                content += "".join(
                    INTERNLM2_CALL_OPEN + self._payload(c["function"]["name"],
                                                        c["function"]["arguments"]) + ACTION_END
                    for c in m["tool_calls"]
                )  # fmt: skip
            elif role == "tool":
                turns.append({"role": "environment", "name": PLUGIN, "content": content})
                continue
            turns.append({"role": role, "content": content})
        if functions:
            listed = json.dumps([_entry(f) for f in functions], ensure_ascii=False)
            at = 1 if turns and turns[0]["role"] == "system" else 0
            turns.insert(at, {"role": "system", "name": PLUGIN, "content": listed})
        return turns

    def encode(
        self,
        tokenizer: Tokenizer,
        turns: list[dict[str, Any]],
        functions: list[Function] | None,
        calling: bool,
        continue_final: bool = False,
        template_kwargs: dict[str, Any] | None = None,
        generation_prompt: bool = True,
    ) -> list[int]:
        if continue_final:
            check_continuable(turns)
        text = internlm2_chat_prompt(
            turns,
            add_generation_prompt=generation_prompt and not continue_final,
            bos_token=tokenizer.bos_token,
        )
        if continue_final:
            text = cut_after_final_message(text, turns[-1]["content"])
        if calling:
            text += INTERNLM2_CALL_OPEN
        return tokenizer.encode(text, add_special_tokens=False)

    @staticmethod
    def _payload(name: str, args: Any) -> str:
        return json.dumps({"name": name, "parameters": _loaded(args)}, ensure_ascii=False)

    def call_schema(self, functions: list[Function], parallel: bool) -> dict[str, Any]:
        return call_schema(functions, False, key="parameters")  # one call a turn

    def split(
        self, text: str, functions: list[Function], parallel: bool, calling: bool
    ) -> tuple[str, list[tuple[str, str]]]:
        if calling:
            content, payload = "", text
        else:
            at = text.find(ACTION_START + PLUGIN)
            if at < 0:
                return text, []
            content, payload = text[:at].rstrip(), text[at + len(ACTION_START + PLUGIN) :]
        payload = payload.strip()
        if payload.endswith(ACTION_END):
            payload = payload[: -len(ACTION_END)].rstrip()
        call = _payload_call(payload, functions)
        return (content, [call]) if call is not None else (text, [])

    def sendable(self, text: str, calling: bool) -> int:
        return 0 if calling else _before_marker(text, ACTION_START)


TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


class TemplateCalls(ToolFormat):
    """For a model whose chat template takes `tools`: the template writes the functions, the
    earlier calls and the results (HF's message convention: `tool_calls` with arguments as
    objects, `tool` turns with `tool_call_id` and `name`). Calls come back between
    `<tool_call>` and `</tool_call>` when the template asks for that (Hermes, Qwen2.5; text
    before the first is content), else as the whole answer's JSON (Llama 3.1), arguments
    under `key`."""

    name = "template"

    def __init__(self, tagged: bool, key: str = "arguments") -> None:
        self.tagged, self.key = tagged, key
        self.keep_special_tokens = tagged
        self.marker = TOOL_CALL_OPEN if tagged else None

    def turns(
        self, messages: list[dict[str, Any]], functions: list[Function] | None
    ) -> list[dict[str, Any]]:
        names: dict[str, str] = {}
        turns: list[dict[str, Any]] = []
        for m in messages:
            turn: dict[str, Any] = {"role": m["role"], "content": m.get("content") or ""}
            if m["role"] == "assistant" and m.get("tool_calls"):
                turn["tool_calls"] = [
                    {
                        "id": c["id"],
                        "type": "function",
                        "function": {
                            "name": c["function"]["name"],
                            "arguments": _loaded(c["function"]["arguments"]),
                        },
                    }
                    for c in m["tool_calls"]
                ]
                names.update((c["id"], c["function"]["name"]) for c in m["tool_calls"])
            elif m["role"] == "tool":
                turn["tool_call_id"] = m.get("tool_call_id")
                if name := names.get(m.get("tool_call_id") or ""):
                    turn["name"] = name
            turns.append(turn)
        return turns

    def encode(
        self,
        tokenizer: Tokenizer,
        turns: list[dict[str, Any]],
        functions: list[Function] | None,
        calling: bool,
        continue_final: bool = False,
        template_kwargs: dict[str, Any] | None = None,
        generation_prompt: bool = True,
    ) -> list[int]:
        tools = [{"type": "function", "function": _entry(f)} for f in functions or []]
        suffix = TOOL_CALL_OPEN + "\n" if calling and self.tagged else ""
        return encode_chat(
            tokenizer,
            turns,
            add_generation_prompt=generation_prompt,
            tools=tools or None,
            suffix=suffix,
            continue_final_message=continue_final,
            template_kwargs=template_kwargs,
        )

    def call_schema(self, functions: list[Function], parallel: bool) -> dict[str, Any]:
        # a tagged call opened in the prompt holds one call
        return call_schema(functions, parallel and not self.tagged, key=self.key)

    def split(
        self, text: str, functions: list[Function], parallel: bool, calling: bool
    ) -> tuple[str, list[tuple[str, str]]]:
        if not self.tagged:
            return JSON_CALLS.split(text, functions, parallel, calling)
        if calling:
            call = _payload_call(text.strip(), functions)
            return ("", [call]) if call is not None else (text, [])
        at = text.find(TOOL_CALL_OPEN)
        if at < 0:
            return text, []
        calls = []
        for block in text[at:].split(TOOL_CALL_OPEN)[1:]:
            payload, _, after = block.partition(TOOL_CALL_CLOSE)
            call = _payload_call(payload.strip(), functions)
            if call is None or after.strip():  # not a call, or text after one
                return text, []
            calls.append(call)
        return text[:at].rstrip(), calls if parallel else calls[:1]

    def sendable(self, text: str, calling: bool) -> int:
        if not self.tagged:
            return JSON_CALLS.sendable(text, calling)
        return 0 if calling else _before_marker(text, TOOL_CALL_OPEN)


def _before_marker(text: str, marker: str) -> int:
    """How much of `text` is surely content: what comes before `marker` (or before a tail that
    may begin it), less the whitespace before it."""
    at = text.find(marker)
    if at < 0:
        at = len(text)
        for k in range(min(len(marker) - 1, len(text)), 0, -1):
            if marker.startswith(text[-k:]):
                at -= k
                break
    return len(text[:at].rstrip())


def _entry(f: Function) -> dict[str, Any]:
    """A function as the model is shown it: name, description (if any), parameters."""
    entry: dict[str, Any] = {"name": f.name}
    if f.description:
        entry["description"] = f.description
    entry["parameters"] = f.parameters or {"type": "object", "properties": {}}
    return entry


JSON_CALLS = JsonCalls()
INTERNLM2_CALLS = InternLM2Calls()


def tool_format_for(tokenizer: Tokenizer, name: str = "auto") -> ToolFormat:
    """The tool-call format for a model: `name` ("json", "internlm2"), or with "auto"
    InternLM2's when the tokenizer has its agent tokens and the model's own prompt is ChatML
    (not when a chat template was given to replace it: that template writes every prompt)."""
    if name not in TOOL_CALL_FORMATS:
        raise ValueError(f"tool-call format {name!r} is not one of {list(TOOL_CALL_FORMATS)}")
    if name == "json":
        return JSON_CALLS
    if name == "template":
        template = chat_template(tokenizer)
        if template is None or "tools" not in template_variables(template):
            raise ValueError(
                "--tool-call-format template needs a chat template that takes `tools`, and "
                "this model's does not; use --tool-call-format json (or auto)"
            )
        return template_calls(template)
    missing = [t for t in (ACTION_START, ACTION_END, PLUGIN) if tokenizer.token_to_id(t) is None]
    if name == "internlm2":
        if missing:
            raise ValueError(
                f"--tool-call-format internlm2 needs the tokens {missing}, which the model's "
                "tokenizer lacks; use --tool-call-format json (or auto)"
            )
        return INTERNLM2_CALLS
    template = chat_template(tokenizer)
    given = tokenizer.chat_template is not None  # a template given to replace the model's
    if not missing and not given and (template is None or IM_START in template):
        return INTERNLM2_CALLS
    if template is not None and "tools" in template_variables(template):
        return template_calls(template)
    return JSON_CALLS


def template_calls(template: str) -> TemplateCalls:
    """The format of a template that takes `tools`: tagged calls if it asks for
    `<tool_call>`, arguments under `parameters` if it names only that key (Llama 3.1)."""
    key = (
        "parameters"
        if '"parameters"' in template and '"arguments"' not in template
        else ("arguments")
    )
    return TemplateCalls(tagged=TOOL_CALL_OPEN in template, key=key)


class CallSplitter:
    """One streamed choice's text: what to send as content as it comes, and at its end the
    calls it makes (`feed`). The concatenated content equals the whole answer's `split`.
    Without functions it passes the text through as it comes.

    A required call (`calling`: the answer is held to the call's schema, so it is one) streams
    instead (`call_deltas`): each call's id and name once its name is whole, then its arguments
    as they come, written as the whole answer's `tool_calls` write them (`JsonStream`).

    `stream` does both, and streams the calls of an answer free to call (`tool_choice` auto)
    too: content until the format's marker opens a call (`<tool_call>`, InternLM2's
    `<|action_start|><|plugin|>`), then the call's pieces; where a call is the whole answer
    (the JSON format), its pieces once a listed function's name is whole in JSON the answer
    starts with (until then they wait: JSON that turns out not to be a call is content)."""

    def __init__(
        self, fmt: ToolFormat, functions: list[Function], parallel: bool, calling: bool
    ) -> None:
        self.fmt, self.functions, self.parallel, self.calling = fmt, functions, parallel, calling
        self.text = ""
        self.sent = 0
        self.streams_calls = calling and bool(functions)
        self.final_calls: list[tuple[str, str]] = []
        """Once a streamed answer ended by itself (`call_deltas`, `stream`): the calls it
        made."""
        self._json = JsonStream()
        self._top = ""
        self._names: dict[int, list[str]] = {}
        self._calls: dict[int, dict[str, Any]] = {}
        """Call index -> {"id", "name" (None until whole), "held" (arguments before the name),
        "arguments" (sent), "raw" (arguments given as a JSON string, kept until whole)}."""
        self._names_known = {f.name for f in functions}
        self._phase = "text"
        """Auto mode's reading of the answer: "text" (content so far), "plain" (content to
        its end: a whole-answer format's answer that is no JSON), "json" (JSON that may be
        the calls, waiting for a name), "call" (inside a call's JSON, streamed), "after" (past
        a marked call), "held" (held to the end, as `feed` holds it)."""
        self._fed = 0
        """Characters of `text` fed to the call's JSON reader."""
        self._index = 0
        """The marked call being read."""
        self._waiting: dict[int, dict[str, Any]] = {}
        """Deltas of whole-answer JSON not sent yet (no listed function's name is whole)."""
        self._sent: dict[int, list[str]] = {}
        """Call index -> [name, arguments] as sent (auto mode)."""
        self._released: set[int] = set()
        """Calls whose deltas go out as they come (auto mode)."""

    @property
    def streamed(self) -> bool:
        """Call deltas were sent (auto mode)."""
        return bool(self._released)

    def call_deltas(
        self, delta: str, finish_reason: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """A required call's next piece: OpenAI's streamed `tool_calls` deltas (the first of a
        call with its id, type and name, the others with pieces of its arguments) and the
        finish reason to send (`tool_calls` when the answer ended as the calls sent)."""
        self.text += delta
        out: dict[int, dict[str, Any]] = {}
        try:
            events = self._json.feed(delta)
            if finish_reason is not None:
                events += self._json.finish()
        except ValueError as e:  # not JSON after all (the guide held it to the schema)
            logger.warning("a required tool call's answer is not JSON: %s", e)
            events = []
        for path, piece, done in events:
            self._take(path, piece, done, out)
        deltas = [out[i] for i in sorted(out)]
        if finish_reason != "stop":
            return deltas, finish_reason
        _, calls = self.fmt.split(self.text, self.functions, self.parallel, self.calling)
        self.final_calls = calls
        sent = [(c["name"], "".join(c["arguments"])) for _, c in sorted(self._calls.items())]
        if calls != sent:
            logger.warning("streamed tool calls %s differ from the answer's %s", sent, calls)
        return deltas, "tool_calls" if calls else "stop"

    def _take(
        self,
        path: Path,
        piece: str,
        done: bool,
        out: dict[int, dict[str, Any]],
        marked: int | None = None,
    ) -> None:
        """One JSON event into call deltas (`out`); `marked`: the index of the marked call
        whose JSON this is (else the answer's JSON: a call, or a list of them)."""
        index: str | int
        if marked is not None:
            index, rest = marked, path
        elif not path:
            self._top = self._top or piece[:1]
            return
        elif self._top == "[":
            index, rest = path[0], path[1:]
        else:
            index, rest = 0, path
        if not isinstance(index, int) or not rest:
            return
        call = self._calls.setdefault(
            index,
            {"id": f"call_{uuid.uuid4().hex[:24]}", "name": None, "held": [], "arguments": []},
        )
        if rest[0] == "name":
            self._names.setdefault(index, []).append(piece)
            if done and len(rest) == 1:
                call["name"] = json.loads("".join(self._names[index]))
                head = out.setdefault(index, {"index": index})
                head.update(id=call["id"], type="function")
                head["function"] = {"name": call["name"], "arguments": ""}
                self._send(index, call, "".join(call["held"]), out)
                call["held"] = []
        elif rest[0] in ("arguments", "parameters"):
            if call.get("raw") is not None or (
                not call["held"]
                and not call["arguments"]
                and len(rest) == 1
                and piece.startswith('"')
            ):
                # arguments as JSON text: sent once whole, as the object they spell
                call["raw"] = call.get("raw", "") + piece
                if done and len(rest) == 1:
                    text = _loaded(json.loads(call["raw"]))
                    call["raw"] = None
                    if isinstance(text, dict):
                        self._send_or_hold(index, call, json.dumps(text, ensure_ascii=False), out)
                    else:
                        call["bad"] = True  # JSON text of no object: no call
                return
            self._send_or_hold(index, call, piece, out)

    def _send_or_hold(
        self, index: int, call: dict[str, Any], piece: str, out: dict[int, dict[str, Any]]
    ) -> None:
        if call["name"] is None:
            call["held"].append(piece)
        else:
            self._send(index, call, piece, out)

    @staticmethod
    def _send(index: int, call: dict[str, Any], piece: str, out: dict[int, dict[str, Any]]) -> None:
        if not piece:
            return
        call["arguments"].append(piece)
        entry = out.setdefault(index, {"index": index})
        function = entry.setdefault("function", {"arguments": ""})
        function["arguments"] = function.get("arguments", "") + piece

    def stream(
        self, delta: str, finish_reason: str | None
    ) -> tuple[str, list[dict[str, Any]], str | None]:
        """(content to send now, OpenAI's streamed `tool_calls` deltas to send now, the finish
        reason to send: `tool_calls` when the answer ended as the calls sent) for the next
        piece of text."""
        if not self.functions:
            return delta, [], finish_reason
        if self.calling:
            deltas, finish = self.call_deltas(delta, finish_reason)
            return "", deltas, finish
        self.text += delta
        out: dict[int, dict[str, Any]] = {}
        content = self._read(out)
        if finish_reason is not None and self._phase == "json":
            self._json_done(out)  # (JSON ending with a number: its last events)
        deltas = [out[i] for i in sorted(out)]
        for d in deltas:  # what the client has been sent
            function = d["function"]
            sent = self._sent.setdefault(d["index"], [function.get("name", ""), ""])
            sent[1] += function.get("arguments", "")
        if finish_reason is None:
            return content, deltas, None
        if not self.streamed:  # as `feed`: the rest as content, or the calls whole
            rest, calls = self.feed("", finish_reason)
            self.final_calls = calls
            deltas = [{"index": j, **c} for j, c in enumerate(tool_calls_json(calls))]
            return content + rest, deltas, "tool_calls" if calls else finish_reason
        if finish_reason != "stop":
            return content, deltas, finish_reason
        _, calls = self.fmt.split(self.text, self.functions, self.parallel, self.calling)
        self.final_calls = [(name, args) for _, (name, args) in sorted(self._sent.items())]
        if calls != self.final_calls:
            logger.warning(
                "streamed tool calls %s differ from the answer's %s", self.final_calls, calls
            )
        return content, deltas, "tool_calls" if self.final_calls else "stop"

    def _read(self, out: dict[int, dict[str, Any]]) -> str:
        """Auto mode: take the text so far through the phases; the content to send now."""
        marker = self.fmt.marker
        content = ""
        if self._phase == "plain":  # a whole-answer format's answer that is not JSON
            content, self.sent = self.text[self.sent :], len(self.text)
            return content
        if self._phase == "text":
            if marker is not None:
                at = self.text.find(marker)
                if at < 0:
                    end = max(self.sent, self.fmt.sendable(self.text, False))
                    content, self.sent = self.text[self.sent : end], end
                    return content
                end = max(self.sent, len(self.text[:at].rstrip()))
                content, self.sent = self.text[self.sent : end], end
                self._open_marked(at + len(marker))
            else:
                head = self.text.lstrip()[:1]
                if head and head not in "{[`":
                    self._phase = "plain"
                    content, self.sent = self.text[self.sent :], len(self.text)
                    return content
                if head in ("", "`"):  # nothing yet, or a fenced block: held
                    self._phase = "held" if head else "text"
                    return content
                self._phase, self._fed = "json", 0
                self._json = JsonStream()
        if self._phase == "json":
            self._read_json(out)
        elif self._phase == "call":
            self._read_marked(out)
        while self._phase == "after" and marker is not None and self.parallel:
            at = self.text.find(marker, self._fed)
            if at < 0:
                break
            self._open_marked(at + len(marker))
            self._read_marked(out)
        return content

    def _open_marked(self, start: int) -> None:
        self._phase, self._fed = "call", start
        self._json = JsonStream(trailing=True)

    def _read_marked(self, out: dict[int, dict[str, Any]]) -> None:
        """A marked call's JSON so far into deltas; "after" once it ended."""
        piece, self._fed = self.text[self._fed :], len(self.text)
        try:
            events = self._json.feed(piece)
        except ValueError:  # not JSON: not a call (the answer's split says so at its end)
            self._phase, self._index = "after", self._index + 1
            return
        self._take_events(events, out, self._index)
        if self._json.ended:
            self._fed = len(self.text) - len(self._json.rest)
            self._phase, self._index = "after", self._index + 1

    def _read_json(self, out: dict[int, dict[str, Any]]) -> None:
        """Whole-answer JSON so far: deltas wait until a listed function's name is whole."""
        piece, self._fed = self.text[self._fed :], len(self.text)
        try:
            events = self._json.feed(piece)
        except ValueError:
            self._phase = "held"
            return
        self._take_events(events, out, None)

    def _json_done(self, out: dict[int, dict[str, Any]]) -> None:
        try:
            self._take_events(self._json.finish(), out, None)
        except ValueError:
            self._phase = "held"

    def _take_events(
        self,
        events: list[tuple[Path, str, bool]],
        out: dict[int, dict[str, Any]],
        marked: int | None,
    ) -> None:
        """JSON events into deltas. A call's deltas wait (in `_waiting`) until its name, a
        listed function's, is whole and its arguments have begun, with no other key: then
        they go (into `out`), and the rest of it as it comes. A key other than a call's,
        arguments that are no object, or the name of a function not listed stop the reading:
        the answer is held to its end, as `feed` holds it (where nothing was sent yet, its
        split decides)."""
        for path, piece, done in events:
            if marked is not None:
                index: str | int | None = marked
                rest = path
            elif self._top == "[":
                index, rest = (path[0] if path else None), path[1:]
            else:
                index, rest = (0 if path else None), path
            key = rest[0] if rest and isinstance(rest[0], str) else None
            call = self._calls.get(index) if isinstance(index, int) else None
            begun = call is not None and bool(
                call["held"] or call["arguments"] or call.get("raw") is not None
            )
            if key is not None and key not in ("name", "arguments", "parameters"):
                self._stop_reading()
                return
            if (
                key in ("arguments", "parameters")
                and len(rest) == 1
                and not begun
                and piece
                and piece[0] not in '{"'
            ):  # arguments that are no object: no call
                self._stop_reading()
                return
            released = index in self._released
            target = out if released else self._waiting
            if marked is None and not self.parallel and self._top == "[" and index != 0:
                target = {}  # one call wanted: the list's others are read, not sent
            self._take(path, piece, done, target, marked)
            call = self._calls.get(index) if isinstance(index, int) else None
            if call is None or call["name"] is None:
                continue
            if call["name"] not in self._names_known or call.get("bad"):
                self._stop_reading()
                return
            # (arguments given as JSON text go once whole: until then, nothing to send)
            if not released and target is self._waiting and (call["held"] or call["arguments"]):
                assert isinstance(index, int)
                out[index] = self._waiting.pop(index)  # a listed function's call: it goes
                self._released.add(index)

    def _stop_reading(self) -> None:
        self._phase = "held"
        self._waiting.clear()

    def feed(self, delta: str, finish_reason: str | None) -> tuple[str, list[tuple[str, str]]]:
        """(content to send now, calls) for the next piece of text; calls only at the end, and
        only when the answer ended by itself (`stop`)."""
        if not self.functions:
            return delta, []
        self.text += delta
        if finish_reason is None:
            end = max(self.sent, self.fmt.sendable(self.text, self.calling))
            out, self.sent = self.text[self.sent : end], end
            return out, []
        content, calls = self.text, list[tuple[str, str]]()
        if finish_reason == "stop":
            content, calls = self.fmt.split(self.text, self.functions, self.parallel, self.calling)
        out = content[self.sent :]
        self.sent = len(self.text)
        return out, calls
