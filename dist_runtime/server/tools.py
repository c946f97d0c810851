"""Function calling on the chat route: the tools go into the prompt, calls come out of the answer.

The functions are described to the model in a system message (`tools_text`), which asks for a
call as one JSON object, `{"name": ..., "arguments": {...}}`, or a JSON list of them. Earlier
calls in the history are written back in that form, and tool results go to the template as
`environment` turns (InternLM2's role for them), each naming its function. Then:

* `tool_choice: "required"` or a named function: guided output (`call_schema`) makes the answer
  a call whose `arguments` follow the function's `parameters` schema, so it always parses;
* `"auto"`: the model answers freely, and an answer that is exactly such a call of a listed
  function (`parse_calls`; a ```json fence around it is allowed) comes back as `tool_calls`;
* `"none"`: the tools stay out of the prompt.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

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
    lines = [TOOLS_INTRO]
    for f in functions:
        entry: dict[str, Any] = {"name": f.name}
        if f.description:
            entry["description"] = f.description
        entry["parameters"] = f.parameters or {"type": "object", "properties": {}}
        lines.append(json.dumps(entry, ensure_ascii=False))
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
    except ValueError:
        return args


def call_schema(functions: list[Function], parallel: bool) -> dict[str, Any]:
    """The JSON Schema of an answer that calls one of `functions` (several at once when
    `parallel`)."""
    ones = [
        {
            "type": "object",
            "properties": {
                "name": {"const": f.name},
                "arguments": f.parameters or {"type": "object"},
            },
            "required": ["name", "arguments"],
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
    except ValueError:
        return []
    items = value if isinstance(value, list) else [value]
    names = {f.name for f in functions}
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return []
        args = item.get("arguments", item.get("parameters"))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return []
        if not isinstance(args, dict) or set(item) - {"name", "arguments", "parameters"}:
            return []
        calls.append((item["name"], json.dumps(args, ensure_ascii=False)))
    return calls[:1] if not parallel else calls


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
