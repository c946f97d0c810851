"""Function calling on the chat route: the prompt's tool text, the parsing of calls, required and
named calls held to the functions' schemas (on a random-weight model, which only the grammar
makes call anything), streamed like whole answers, errors naming the field, and a round trip
on the demo model (call, tool result, answer)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from dist_runtime.server.tools import (
    TOOLS_INTRO,
    Function,
    call_schema,
    chat_turns,
    parse_calls,
)
from dist_runtime.text.json_grammar import JsonGrammar
from tests.test_server import KEY, Server

openai = pytest.importorskip("openai")

FORECAST = {
    "type": "object",
    "properties": {"city": {"enum": ["Oslo", "Rome"]}, "days": {"type": "integer"}},
    "required": ["city", "days"],
}
TIDE = {"type": "object", "properties": {"port": {"type": "string", "maxLength": 6}}}
TOOLS = [
    {"type": "function", "function": {"name": "forecast", "parameters": FORECAST}},
    {"type": "function", "function": {"name": "tide", "description": "Tides", "parameters": TIDE}},
]
FUNCTIONS = [Function("forecast", None, FORECAST), Function("tide", "Tides", TIDE)]


# -- the pieces --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "parallel", "want"),
    [
        ('{"name": "tide", "arguments": {"port": "Bergen"}}', True,
         [("tide", '{"port": "Bergen"}')]),
        ('```json\n{"name": "tide", "arguments": {}}\n```', True, [("tide", "{}")]),
        ('{"name": "tide", "parameters": {"port": "x"}}', True, [("tide", '{"port": "x"}')]),
        ('{"name": "tide", "arguments": "{\\"port\\": \\"x\\"}"}', True,
         [("tide", '{"port": "x"}')]),
        ('[{"name": "tide", "arguments": {}}, {"name": "forecast", "arguments": {"days": 2}}]',
         True, [("tide", "{}"), ("forecast", '{"days": 2}')]),
        ('[{"name": "tide", "arguments": {}}, {"name": "tide", "arguments": {}}]', False,
         [("tide", "{}")]),
        ('{"name": "sunset", "arguments": {}}', True, []),  # not a listed function
        ('{"name": "tide", "arguments": [1]}', True, []),  # arguments not an object
        ('{"name": "tide", "arguments": {}, "why": 1}', True, []),  # more than a call
        ('The tide is high. {"name": "tide", "arguments": {}}', True, []),  # text around it
        ('{"name": "tide", "arguments": {}', True, []),  # cut short
        ("It is sunny.", True, []),
    ],
)  # fmt: skip
def test_parse_calls(text: str, parallel: bool, want: list[tuple[str, str]]) -> None:
    assert parse_calls(text, FUNCTIONS, parallel) == want


def test_chat_turns_put_tools_first_and_write_history_back() -> None:
    call = {"id": "c1", "type": "function",
            "function": {"name": "tide", "arguments": '{"port": "Bergen"}'}}  # fmt: skip
    turns = chat_turns(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Tides?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "high at 6", "tool_call_id": "c1"},
        ],
        FUNCTIONS,
    )
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "environment"]
    system = turns[0]["content"]
    assert system.startswith("Be brief.\n\n" + TOOLS_INTRO)
    assert json.loads(system.splitlines()[-1]) == {
        "name": "tide", "description": "Tides", "parameters": TIDE
    }  # fmt: skip
    assert json.loads(turns[2]["content"]) == {"name": "tide", "arguments": {"port": "Bergen"}}
    assert turns[3]["content"] == "tide returned: high at 6"
    no_tools = chat_turns([{"role": "user", "content": "Hi"}], None)
    assert no_tools == [{"role": "user", "content": "Hi"}]


def test_call_schema_takes_calls_and_nothing_else() -> None:
    single = JsonGrammar.from_schema(call_schema(FUNCTIONS[:1], parallel=False))
    several = JsonGrammar.from_schema(call_schema(FUNCTIONS, parallel=True))

    def ok(g: JsonGrammar, value: Any) -> bool:
        return g.accepts(g.advance(g.start, json.dumps(value).encode()))

    call = {"name": "forecast", "arguments": {"city": "Rome", "days": 3}}
    tide = {"name": "tide", "arguments": {"port": "Bergen"}}
    assert ok(single, call) and not ok(single, tide) and not ok(single, [call])
    assert ok(several, tide) and ok(several, [call, tide]) and not ok(several, [])
    assert not ok(several, {"name": "forecast", "arguments": {"city": "Paris", "days": 3}})


# -- on a server ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    s = Server(
        tiny_llama_dir, tmp_path_factory.mktemp("tools"), "--api-keys", KEY,
        "--session-len", "2048",
    )  # fmt: skip
    yield openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0)
    s.close()


def _arguments_valid(call: Any) -> None:
    schema = FORECAST if call.function.name == "forecast" else TIDE
    jsonschema.validate(json.loads(call.function.arguments), schema)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_required_calls_follow_the_schemas(client: Any, temperature: float) -> None:
    out = client.chat.completions.create(
        model=None, messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS,
        tool_choice="required", max_tokens=600, temperature=temperature, seed=2, n=3,
    )  # fmt: skip
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        calls = choice.message.tool_calls
        assert calls and all(c.id.startswith("call_") and c.type == "function" for c in calls)
        for call in calls:
            _arguments_valid(call)


def test_named_call_streams_like_a_whole_answer(client: Any) -> None:
    kwargs: dict[str, Any] = dict(
        model=None, messages=[{"role": "user", "content": "Tides?"}], tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "tide"}}, max_tokens=600,
        temperature=0, parallel_tool_calls=False,
    )  # fmt: skip
    whole = client.chat.completions.create(**kwargs).choices[0]
    (call,) = whole.message.tool_calls
    assert call.function.name == "tide" and whole.finish_reason == "tool_calls"
    _arguments_valid(call)
    chunks = [c for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
    deltas = [c.choices[0].delta for c in chunks]
    streamed = [tc for d in deltas for tc in d.tool_calls or []]
    assert [(tc.function.name, tc.function.arguments) for tc in streamed] == [
        (call.function.name, call.function.arguments)
    ]
    assert not any(d.content for d in deltas)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_results_in_the_history_are_accepted(client: Any) -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "tide", "arguments": '{"port": "Bergen"}'}}  # fmt: skip
    messages = [
        {"role": "user", "content": "Tides?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "high water at 06:10"},
    ]
    out = client.chat.completions.create(
        model=None, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=4
    )
    assert out.choices[0].finish_reason == "length" and out.choices[0].message.content


@pytest.mark.parametrize(
    ("extra", "param", "match"),
    [
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
         "tool_choice", "'x', which is not in tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}}}],
          "tool_choice": "required"}, "tools", "'minimum'"),
        ({"tools": TOOLS + TOOLS[:1]}, "tools", "share a name"),
        ({"tools": TOOLS, "tool_choice": "required",
          "response_format": {"type": "json_object"}}, "response_format", "cannot combine"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0", "tool_call_id"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
         "tools.0.function.name", "pattern"),
    ],
)  # fmt: skip
def test_tool_errors_name_the_field(
    client: Any, extra: dict[str, Any], param: str, match: str
) -> None:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=None, **{**body, **extra})
    error = info.value.body
    assert error["param"] == param and match in error["message"], error


# -- the demo model ------------------------------------------------------------------------------
def test_demo_model_calls_a_tool_and_answers_from_its_result(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """SmolLM2-135M with a forced call picks the city from the question, then answers from the
    tool's result (greedy)."""
    from dist_runtime.formats.demo_model import demo_model_path

    s = Server(demo_model_path(), tmp_path_factory.mktemp("demo-tools"), "--session-len", "2048")
    try:
        demo = openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0)
        weather = {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather in a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
        messages: list[dict[str, Any]] = [
            {"role": "user", "content": "What is the weather in Paris?"}
        ]
        kwargs: dict[str, Any] = dict(model=None, tools=[weather], max_tokens=60, temperature=0)
        first = demo.chat.completions.create(messages=messages, tool_choice="required", **kwargs)
        (call,) = first.choices[0].message.tool_calls
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        messages += [
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"},
        ]
        answer = demo.chat.completions.create(messages=messages, **kwargs).choices[0]
        # "The weather in Paris is indeed sunny." on the development machine
        assert answer.finish_reason == "stop" and "sunny" in answer.message.content
    finally:
        s.close()
