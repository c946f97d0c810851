"""Function calling on the chat route, in both formats (generic JSON; InternLM2's agent tokens):
the prompt's tool text, the parsing of calls, streamed text held back only while it may be a
call, required and named calls held to the functions' schemas (on random-weight models, which
only the grammar makes call anything), streamed like whole answers, errors naming the field,
and a round trip on the demo model (call, tool result, answer)."""

from __future__ import annotations

import json
import random
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from dist_runtime.formats.random_checkpoint import write_random_checkpoint
from dist_runtime.server.tools import (
    INTERNLM2_CALLS,
    JSON_CALLS,
    TOOLS_INTRO,
    CallSplitter,
    Function,
    TemplateCalls,
    ToolFormat,
    call_schema,
    chat_turns,
    parse_calls,
    tool_format_for,
)
from dist_runtime.text.json_grammar import JsonGrammar
from dist_runtime.text.tokenizer import Tokenizer
from tests.conftest import TINY_SEED, TINY_SHAPES
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
AGENT_TOKENS = ("<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>")
"""InternLM2's agent tokens, in its tokenizer's order (ids 92538-92541 there)."""
HISTORY: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Tides in Bergen?"},
    {"role": "assistant", "content": "I will look.", "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "tide", "arguments": '{"port": "Bergen"}'}}]},
    {"role": "tool", "content": "high at 6", "tool_call_id": "c1"},
]  # fmt: skip


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
        ('{"name": ["tide"], "arguments": {}}', True, []),  # a name that is not a string
        ("[" * 3000, True, []),  # deeper than json can parse
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
def _serve(model: Path, tmp: Path) -> Iterator[Any]:
    s = Server(model, tmp, "--api-keys", KEY, "--session-len", "2048")
    yield openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0)
    s.close()


@pytest.fixture(scope="module")
def client(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    yield from _serve(tiny_llama_dir, tmp_path_factory.mktemp("tools"))


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


def _accumulate(deltas: list[Any]) -> dict[int, dict[str, Any]]:
    """Streamed tool-call deltas put together as OpenAI's clients do (by index: the first
    carries id, type and name, every one a piece of the arguments)."""
    calls: dict[int, dict[str, Any]] = {}
    for d in deltas:
        for tc in d.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            if tc.id is not None:
                assert entry["id"] is None, "a call's id came twice"
                entry["id"], entry["name"], entry["type"] = tc.id, tc.function.name, tc.type
            else:
                assert entry["id"] is not None, "arguments before the call's id and name"
                assert tc.function.name is None
            entry["arguments"] += tc.function.arguments or ""
    return calls


@pytest.mark.parametrize("name", ["tide", "forecast"])
def test_named_call_streams_its_arguments_as_they_come(client: Any, name: str) -> None:
    """A required call streams: its id and name in the first delta, then its arguments piece
    by piece; put together they are the whole answer's call, arguments character for
    character."""
    kwargs: dict[str, Any] = dict(
        model=None, messages=[{"role": "user", "content": "Tides?"}], tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": name}}, max_tokens=600,
        temperature=0, parallel_tool_calls=False,
    )  # fmt: skip
    whole = client.chat.completions.create(**kwargs).choices[0]
    (call,) = whole.message.tool_calls
    assert call.function.name == name and whole.finish_reason == "tool_calls"
    _arguments_valid(call)
    chunks = [c for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
    deltas = [c.choices[0].delta for c in chunks]
    (streamed,) = _accumulate(deltas).values()
    assert streamed["id"].startswith("call_") and streamed["type"] == "function"
    assert (streamed["name"], streamed["arguments"]) == (name, call.function.arguments)
    pieces = [tc.function.arguments for d in deltas for tc in d.tool_calls or []]
    assert len([p for p in pieces if p]) >= 2  # in pieces, not whole
    assert not any(d.content for d in deltas)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_required_parallel_calls_stream_each_call(client: Any) -> None:
    """tool_choice "required" with parallel calls: the answer may be a list of calls; each
    streams under its own index and the calls put together equal the whole answer's."""
    kwargs: dict[str, Any] = dict(
        model=None, messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS,
        tool_choice="required", max_tokens=600, temperature=1.0, seed=5,
    )  # fmt: skip
    whole = client.chat.completions.create(**kwargs).choices[0]
    chunks = [c for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
    streamed = _accumulate([c.choices[0].delta for c in chunks])
    assert [(c["name"], c["arguments"]) for _, c in sorted(streamed.items())] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_malformed_calls_in_the_history_are_not_server_errors(client: Any) -> None:
    for arguments in ("[" * 3000, '{"port": ' * 2000):
        function = {"name": "tide", "arguments": arguments}
        call = {"id": "c1", "type": "function", "function": function}
        messages = [
            {"role": "user", "content": "Tides?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "high"},
        ]
        try:  # answered, or refused for its length; never a server error
            out = client.chat.completions.create(model=None, messages=messages, tools=TOOLS,
                                                 max_tokens=2)  # fmt: skip
            assert out.choices[0].finish_reason == "length"
        except openai.BadRequestError as e:
            assert "over session_len" in str(e), e


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


FUNCTION_DEFS = [t["function"] for t in TOOLS]


@pytest.mark.parametrize("name", ["tide", "forecast"])
def test_older_functions_and_function_call_answer_in_their_form(client: Any, name: str) -> None:
    """OpenAI's older `functions` / `function_call`: a named call answers as the newer form's
    call does, written as the older API's `function_call` (finish reason `function_call`),
    whole and streamed (the name first, then the arguments in pieces)."""
    ask: dict[str, Any] = dict(
        model=None, messages=[{"role": "user", "content": "Tides?"}], max_tokens=600,
        temperature=0,
    )  # fmt: skip
    newer = client.chat.completions.create(
        tools=TOOLS, tool_choice={"type": "function", "function": {"name": name}},
        parallel_tool_calls=False, **ask,
    ).choices[0]  # fmt: skip
    (call,) = newer.message.tool_calls
    older = client.chat.completions.create(
        functions=FUNCTION_DEFS, function_call={"name": name}, **ask
    ).choices[0]
    assert older.finish_reason == "function_call" and older.message.tool_calls is None
    assert older.message.content is None
    assert (older.message.function_call.name, older.message.function_call.arguments) == (
        name, call.function.arguments,
    )  # fmt: skip
    chunks = [
        c
        for c in client.chat.completions.create(
            functions=FUNCTION_DEFS, function_call={"name": name}, stream=True, **ask
        )
        if c.choices
    ]
    deltas = [c.choices[0].delta for c in chunks if c.choices[0].delta.function_call]
    assert not any(c.choices[0].delta.tool_calls for c in chunks)
    assert deltas[0].function_call.name == name
    assert all(d.function_call.name is None for d in deltas[1:]) and len(deltas) >= 2
    assert "".join(d.function_call.arguments or "" for d in deltas) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "function_call"
    none = client.chat.completions.create(
        functions=FUNCTION_DEFS, function_call="none", **{**ask, "max_tokens": 4}
    ).choices[0]
    assert none.finish_reason == "length" and none.message.function_call is None


def _tokenize(client: Any, body: dict[str, Any]) -> list[int]:
    root = str(client.base_url).removesuffix("/").removesuffix("/v1")
    req = urllib.request.Request(root + "/tokenize", data=json.dumps(body).encode())
    req.add_header("Content-Type", "application/json")
    req.add_header("Authorization", f"Bearer {KEY}")
    with urllib.request.urlopen(req, timeout=60) as r:
        tokens: list[int] = json.loads(r.read())["tokens"]
    return tokens


def test_an_older_function_history_is_the_prompt_of_the_newer_one(client: Any) -> None:
    """An assistant's `function_call` and the `function` message with its result make the
    prompt the newer `tool_calls` and `tool` message make (`functions` that `tools` make)."""
    older = [
        *HISTORY[:2],
        {"role": "assistant", "content": "I will look.",
         "function_call": {"name": "tide", "arguments": '{"port": "Bergen"}'}},
        {"role": "function", "name": "tide", "content": "high at 6"},
    ]  # fmt: skip
    newer_ids = _tokenize(client, {"messages": HISTORY, "tools": TOOLS})
    assert _tokenize(client, {"messages": older, "functions": FUNCTION_DEFS}) == newer_ids
    out = client.chat.completions.create(
        model=None, messages=older, functions=FUNCTION_DEFS, function_call="auto", max_tokens=3
    )
    assert out.usage.prompt_tokens == len(newer_ids)


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
        # OpenAI's older functions / function_call
        ({"functions": FUNCTION_DEFS, "tools": TOOLS}, "functions", "not both"),
        ({"function_call": "auto"}, "function_call", "goes with functions"),
        ({"functions": FUNCTION_DEFS, "function_call": {"name": "x"}}, "tool_choice",
         "'x', which is not in tools"),
        ({"messages": [{"role": "function", "name": "tide", "content": "x"}]}, "messages.0",
         "no assistant message before it calls"),
        ({"messages": [{"role": "function", "content": "x"}]}, "messages.0", "needs the name"),
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
WEATHER: dict[str, Any] = {
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


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from dist_runtime.formats.demo_model import demo_model_path

    s = Server(demo_model_path(), tmp_path_factory.mktemp("demo-tools"), "--session-len", "2048")
    yield s
    s.close()


def test_demo_model_calls_a_tool_and_answers_from_its_result(demo_server: Server) -> None:
    """SmolLM2-135M with a forced call picks the city from the question, then answers from the
    tool's result (greedy)."""
    demo = openai.OpenAI(base_url=demo_server.url + "/v1", api_key=KEY, max_retries=0)
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather in Paris?"}]
    kwargs: dict[str, Any] = dict(model=None, tools=[WEATHER], max_tokens=60, temperature=0)
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


def test_a_call_the_model_chooses_streams_as_it_comes(demo_server: Server) -> None:
    """tool_choice auto: after one call and its answer, the demo model (greedy) calls again for
    another city. Streamed, on the chat, Responses and Anthropic routes alike, the call comes
    as pieces while it is written (not whole at the end), and the pieces make the call the
    whole answer makes."""
    from tests.test_anthropic import Anthropic

    demo = openai.OpenAI(base_url=demo_server.url + "/v1", api_key=KEY, max_retries=0)
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "What is the weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "12 degrees, rain"},
        {"role": "assistant", "content": "It is 12 degrees and raining in Oslo."},
        {"role": "user", "content": "What is the weather in Rome?"},
    ]  # fmt: skip
    kwargs: dict[str, Any] = dict(model=None, tools=[WEATHER], max_tokens=40, temperature=0)
    whole = demo.chat.completions.create(messages=messages, **kwargs).choices[0]
    (call,) = whole.message.tool_calls  # "get_weather", '{"city": "Rome"}' here
    assert whole.finish_reason == "tool_calls" and call.function.name == "get_weather"
    want = (call.function.name, call.function.arguments)

    chunks = list(demo.chat.completions.create(messages=messages, stream=True, **kwargs))
    pieces = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert pieces[0].id and pieces[0].function.name == want[0] and len(pieces) >= 3
    assert (want[0], "".join(p.function.arguments or "" for p in pieces)) == want
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)

    items = [
        {"role": "user", "content": "What is the weather in Oslo?"},
        {"type": "function_call", "call_id": "c1", "name": "get_weather",
         "arguments": '{"city": "Oslo"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "12 degrees, rain"},
        {"role": "assistant", "content": "It is 12 degrees and raining in Oslo."},
        {"role": "user", "content": "What is the weather in Rome?"},
    ]  # fmt: skip
    responses_tool = {"type": "function", **WEATHER["function"]}
    model = demo.models.list().data[0].id
    events = list(demo.responses.create(model=model, input=items, tools=[responses_tool],
                                        max_output_tokens=40, temperature=0, stream=True))  # type: ignore[arg-type]  # fmt: skip
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    (added,) = [e.item for e in events if e.type == "response.output_item.added"]
    assert added.type == "function_call" and added.name == want[0] and len(deltas) >= 3
    assert "".join(deltas) == want[1] and events[-1].type == "response.completed"
    assert [o.type for o in events[-1].response.output] == ["function_call"]

    anthropic_tool = {"name": "get_weather", "description": "Current weather in a city",
                      "input_schema": WEATHER["function"]["parameters"]}  # fmt: skip
    history = [
        {"role": "user", "content": "What is the weather in Oslo?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1",
         "name": "get_weather", "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
         "content": "12 degrees, rain"}]},
        {"role": "assistant", "content": "It is 12 degrees and raining in Oslo."},
        {"role": "user", "content": "What is the weather in Rome?"},
    ]  # fmt: skip
    status, sse = Anthropic(demo_server).post("/v1/messages", {
        "model": model, "max_tokens": 40, "temperature": 0, "tools": [anthropic_tool],
        "messages": history, "stream": True})  # fmt: skip
    assert status == 200, sse
    (start,) = [e for n, e in sse if n == "content_block_start"]
    assert start["content_block"]["type"] == "tool_use"
    assert start["content_block"]["name"] == want[0]
    deltas_of = [e["delta"] for n, e in sse if n == "content_block_delta"]
    json_pieces = [d["partial_json"] for d in deltas_of if d["type"] == "input_json_delta"]
    assert len(json_pieces) >= 3 and "".join(json_pieces) == want[1]
    (ended,) = [e for n, e in sse if n == "message_delta"]
    assert ended["delta"]["stop_reason"] == "tool_use"


# -- InternLM2's format ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def agent_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random InternLM2 checkpoint whose tokenizer has InternLM2's agent tokens."""
    return write_random_checkpoint(
        tmp_path_factory.mktemp("internlm2-agent"),
        architecture="internlm2",
        seed=TINY_SEED,
        extra_special_tokens=AGENT_TOKENS,
        **TINY_SHAPES,
    )


def test_internlm2_prompt_is_its_agent_format(agent_dir: Path) -> None:
    """The functions in a `system name=<|plugin|>` turn after the system message, an earlier
    call at the end of its assistant turn, the result in an `environment name=<|plugin|>` turn
    (InternLM2's chat format, as LMDeploy writes it); a required call opens the answer."""
    tok = Tokenizer.from_folder(agent_dir)
    assert tok is not None
    listed = json.dumps(
        [{"name": "forecast", "parameters": FORECAST},
         {"name": "tide", "description": "Tides", "parameters": TIDE}], ensure_ascii=False
    )  # fmt: skip
    want = (
        "<s><|im_start|>system\nBe brief.<|im_end|>\n"
        f"<|im_start|>system name=<|plugin|>\n{listed}<|im_end|>\n"
        "<|im_start|>user\nTides in Bergen?<|im_end|>\n"
        "<|im_start|>assistant\nI will look.<|action_start|><|plugin|>\n"
        '{"name": "tide", "parameters": {"port": "Bergen"}}<|action_end|><|im_end|>\n'
        "<|im_start|>environment name=<|plugin|>\nhigh at 6<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    turns = INTERNLM2_CALLS.turns(HISTORY, FUNCTIONS)
    ids = INTERNLM2_CALLS.encode(tok, turns, FUNCTIONS, calling=False)
    assert tok.decode(ids, skip_special_tokens=False) == want
    for token in AGENT_TOKENS[:1] + AGENT_TOKENS[2:]:  # each marker is its one special id
        assert ids.count(tok.token_to_id(token) or -1) == want.count(token) > 0
    calling = INTERNLM2_CALLS.encode(tok, turns, FUNCTIONS, calling=True)
    assert tok.decode(calling, skip_special_tokens=False) == (want + "<|action_start|><|plugin|>\n")
    # without tools: no plugin turn; the tools' first turn when there is no system message
    plain = INTERNLM2_CALLS.turns(HISTORY[1:2], None)
    assert plain == [{"role": "user", "content": "Tides in Bergen?"}]
    first = INTERNLM2_CALLS.turns(HISTORY[1:2], FUNCTIONS[:1])
    assert first[0] == {"role": "system", "name": "<|plugin|>", "content": json.dumps(
        [{"name": "forecast", "parameters": FORECAST}])}  # fmt: skip


def test_tool_format_is_picked_from_the_tokenizer(
    agent_dir: Path, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    agent, llama = Tokenizer.from_folder(agent_dir), Tokenizer.from_folder(tiny_llama_dir)
    assert agent is not None and llama is not None
    assert tool_format_for(agent) is INTERNLM2_CALLS
    assert tool_format_for(agent, "json") is JSON_CALLS
    assert tool_format_for(llama) is JSON_CALLS
    with pytest.raises(ValueError, match=r"needs the tokens .*<\|action_start\|>.*json"):
        tool_format_for(llama, "internlm2")
    with pytest.raises(ValueError, match="'hermes' is not one of"):
        tool_format_for(agent, "hermes")
    # the agent tokens under another prompt format (a non-ChatML template): not InternLM2's
    import shutil

    other = Path(shutil.copytree(agent_dir, tmp_path / "other"))
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    templated = Tokenizer.from_folder(other)
    assert templated is not None and tool_format_for(templated) is JSON_CALLS


CALL = '{"name": "tide", "parameters": {"port": "Bergen"}}'


@pytest.mark.parametrize(
    ("text", "calling", "content", "calls"),
    [
        (f"Let me check.\n<|action_start|><|plugin|>\n{CALL}", False, "Let me check.",
         [("tide", '{"port": "Bergen"}')]),
        (f"<|action_start|><|plugin|>\n{CALL}<|action_end|>", False, "",
         [("tide", '{"port": "Bergen"}')]),
        ('<|action_start|><|plugin|>\n{"name": "tide", "arguments": "{\\"port\\": \\"x\\"}"}',
         False, "", [("tide", '{"port": "x"}')]),
        (CALL, True, "", [("tide", '{"port": "Bergen"}')]),  # the prompt opened the call
        (CALL, False, CALL, []),  # InternLM2 calls only through its tokens
        ('<|action_start|><|plugin|>\n{"name": "sunset", "parameters": {}}', False,
         '<|action_start|><|plugin|>\n{"name": "sunset", "parameters": {}}', []),
        ('Hmm <|action_start|><|plugin|>\n{"name": "tide", "par', False,
         'Hmm <|action_start|><|plugin|>\n{"name": "tide", "par', []),
        ('<|action_start|><|plugin|>\n{"name": "tide", "parameters": [1]}', False,
         '<|action_start|><|plugin|>\n{"name": "tide", "parameters": [1]}', []),
        ("It is high at six.", False, "It is high at six.", []),
    ],
)  # fmt: skip
def test_internlm2_calls_are_read_back(
    text: str, calling: bool, content: str, calls: list[tuple[str, str]]
) -> None:
    assert INTERNLM2_CALLS.split(text, FUNCTIONS, True, calling) == (content, calls)


TAGGED = TemplateCalls(tagged=True)
TAGGED_CALL = '{"name": "tide", "arguments": {"port": "Bergen"}}'
STREAMED = [
    (INTERNLM2_CALLS, f"Checking the tide.  \n<|action_start|><|plugin|>\n{CALL}", False),
    (INTERNLM2_CALLS, "The tide <|act is high; <|action_end|> is a token.", False),
    (INTERNLM2_CALLS, "Nothing to call here.\n\n", False),
    (INTERNLM2_CALLS, CALL, True),
    (JSON_CALLS, '  {"name": "tide", "arguments": {"port": "Bergen"}}', False),
    (JSON_CALLS, "`code` and more", False),
    (JSON_CALLS, "Plain words { not a call }", False),
    (
        TAGGED,
        f"Two calls.\n<tool_call>\n{TAGGED_CALL}\n</tool_call>\n<tool_call>\n"
        '{"name": "forecast", "arguments": {"city": "Oslo", "days": 1}}\n</tool_call>\n',
        False,
    ),
    (TAGGED, "A <tool_ is not a call, nor is <tool_call> half", False),
    (TAGGED, TAGGED_CALL, True),
]


@pytest.mark.parametrize(("fmt", "text", "calling"), STREAMED)
@pytest.mark.parametrize("step", [1, 2, 5, 1000])
@pytest.mark.parametrize("finish", ["stop", "length"])
def test_streamed_text_is_held_only_while_it_may_be_a_call(
    fmt: ToolFormat, text: str, calling: bool, step: int, finish: str
) -> None:
    """Fed in pieces, the content sent equals the whole answer's content, a call's marker or
    JSON is never sent as content, and an answer cut short (length) calls nothing."""
    split = CallSplitter(fmt, FUNCTIONS, True, calling)
    sent, calls = [], []
    pieces = [text[i : i + step] for i in range(0, len(text), step)]
    for k, piece in enumerate(pieces):
        out, found = split.feed(piece, finish if k == len(pieces) - 1 else None)
        sent.append(out)
        calls += found
        if k < len(pieces) - 1:
            assert not found
            assert "<|action_start|>" not in "".join(sent) and '"name"' not in "".join(sent)
    want = fmt.split(text, FUNCTIONS, True, calling) if finish == "stop" else (text, [])
    assert ("".join(sent), calls) == want
    if fmt is INTERNLM2_CALLS and not calling and "<|action_start|>" not in text:
        # plain text streams as it comes, less a tail that may begin the marker or be
        # whitespace before one
        split = CallSplitter(fmt, FUNCTIONS, True, calling)
        early, _ = split.feed(text, None)
        assert early == text[: len(text.rstrip())] or text.rstrip().endswith("<|act")


AUTO_STREAMED = [
    *[(fmt, text) for fmt, text, calling in STREAMED if not calling],
    (JSON_CALLS, '[{"name": "tide", "arguments": {}}, {"name": "forecast", "arguments": '
                 '{"city": "Rome", "days": 4}}]'),
    (JSON_CALLS, '{"name": "tide", "arguments": "{\\"port\\": \\"x\\"}"}'),
    (JSON_CALLS, '{"arguments": {"port": "y"}, "name": "tide"}'),
    (JSON_CALLS, '{"name": "sunset", "arguments": {}}'),
    (JSON_CALLS, '{"answer": 42}'),
    (JSON_CALLS, '{"name": "tide", "description": "Tides", "parameters": {}}'),
    (TAGGED, 'A.\n<tool_call>\n{"name": "tide", "why": 1, "arguments": {}}\n</tool_call>'),
    (INTERNLM2_CALLS, 'Let me see.<|action_start|><|plugin|>\n{"name": "sunset", '
                      '"parameters": {}}'),
    (TAGGED, f"One.\n<tool_call>\n{TAGGED_CALL}\n</tool_call>"),
]  # fmt: skip


@pytest.mark.parametrize(("fmt", "text"), AUTO_STREAMED)
@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_auto_calls_stream_as_they_come(fmt: ToolFormat, text: str, step: int) -> None:
    """tool_choice auto, fed in pieces: the content sent and the calls the deltas make equal
    the whole answer's split; a call's deltas start before the answer ends (once its name is
    whole, a listed function's), never as content; the finish reason is tool_calls when it
    calls."""
    split = CallSplitter(fmt, FUNCTIONS, True, False)
    content, calls, finish = "", dict[int, list[str]](), None
    first_call_at = None
    pieces = [text[i : i + step] for i in range(0, len(text), step)]
    for k, piece in enumerate(pieces):
        said, deltas, finish = split.stream(piece, "stop" if k == len(pieces) - 1 else None)
        content += said
        for d in deltas:
            if "id" in d:
                assert d["index"] not in calls and d["type"] == "function"
                calls[d["index"]] = [d["function"]["name"], d["function"]["arguments"]]
                first_call_at = k if first_call_at is None else first_call_at
            else:
                calls[d["index"]][1] += d["function"]["arguments"]
        assert "<tool_call>" not in content and "<|action_start|>" not in content or not calls
    want_content, want_calls = fmt.split(text, FUNCTIONS, True, False)
    assert content == want_content
    assert [tuple(calls[i]) for i in sorted(calls)] == want_calls
    assert finish == ("tool_calls" if want_calls else "stop")
    name_ends = text.find('"', text.find('"name": "') + 9) if want_calls else len(text)
    as_text = '"arguments": "' in text  # (arguments as JSON text go once whole)
    if name_ends < (len(pieces) - 2) * step and not as_text:  # the name was whole early
        assert first_call_at is not None and first_call_at < len(pieces) - 1  # streamed


def _fuzz_call(rng: random.Random) -> str:
    name = rng.choice(["tide", "forecast", "sunset"])
    args = rng.choice(["{}", '{"port": "Bergen"}', '{"city": "Oslo", "days": 2}', "[1]",
                       '"{\\"port\\": \\"x\\"}"', '{"a": {"b": [1, 2.5, null]}}'])  # fmt: skip
    key = rng.choice(["arguments", "parameters"])
    body = rng.choice([f'{{"name": "{name}", "{key}": {args}}}'] * 5 + [
        f'{{"{key}": {args}, "name": "{name}"}}', f'{{"name": "{name}", "{key}": {args}, "x": 1}}'
    ])  # fmt: skip
    return body[: rng.randrange(len(body))] if rng.random() < 0.1 else body


def _fuzz_answer(rng: random.Random, fmt: ToolFormat) -> str:
    bits = ["Sure.", " Let me check", "\n", "  ", "{", "}", "[", '"', "`", "```json\n", "<tool_",
            "<|act"]  # fmt: skip
    text = "".join(rng.choice(bits) for _ in range(rng.randint(0, 4))) if rng.random() < 0.5 else ""
    if fmt is JSON_CALLS:
        if rng.random() < 0.3:
            return text + " " + _fuzz_call(rng)
        if rng.random() < 0.5:
            return "[" + ", ".join(_fuzz_call(rng) for _ in range(rng.randint(1, 3))) + "]"
        return rng.choice(["", "  ", "\n"]) + _fuzz_call(rng)
    assert fmt.marker is not None
    for _ in range(rng.randint(0, 3)):
        close = "\n</tool_call>" if fmt is TAGGED else ""
        text += f"\n{fmt.marker}\n{_fuzz_call(rng)}{close}" + rng.choice(["", "", "", "x"])
    return text


@pytest.mark.parametrize("seed", range(10))
def test_streamed_auto_calls_agree_with_the_whole_answer(seed: int) -> None:
    """Random answers (text, calls of listed and unlisted functions, arguments that are no
    object, extra keys, JSON cut short, text after a call) in random pieces: when the whole
    answer calls, the stream sends exactly its content and calls; when it does not, the
    stream sends its whole text, unless it had streamed a call of a listed function before a
    later part of the answer spoiled it (it cannot be taken back: those calls stand, with
    finish_reason tool_calls; their arguments may be cut short where the answer ended)."""
    rng = random.Random(seed)
    for _ in range(300):
        fmt = rng.choice([JSON_CALLS, INTERNLM2_CALLS, TAGGED])
        parallel = rng.random() < 0.7
        text = _fuzz_answer(rng, fmt)
        count = max(0, min(len(text) - 1, rng.randint(0, 12)))
        cuts = sorted(rng.sample(range(1, max(len(text), 1)), count))
        bounds = [0, *cuts, len(text)]
        pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])] or [""]
        split = CallSplitter(fmt, FUNCTIONS, parallel, False)
        content, calls, finish = "", dict[int, list[str]](), None
        for k, piece in enumerate(pieces):
            said, deltas, finish = split.stream(piece, "stop" if k == len(pieces) - 1 else None)
            content += said
            for d in deltas:
                if "id" in d:
                    calls[d["index"]] = [d["function"]["name"], d["function"]["arguments"]]
                else:
                    calls[d["index"]][1] += d["function"]["arguments"]
        got = [(name, args) for _, (name, args) in sorted(calls.items())]
        want_content, want_calls = fmt.split(text, FUNCTIONS, parallel, False)
        if want_calls or not split.streamed:
            assert (content, got) == (want_content, want_calls), (fmt.name, parallel, text)
            assert finish == ("tool_calls" if want_calls else "stop")
        else:  # streamed, then spoiled: each call sent is one of a listed function
            assert got and finish == "tool_calls" and split.final_calls == got
            for name, args in got:  # (arguments cut short where the answer ended in them)
                assert name in {f.name for f in FUNCTIONS} and args.startswith("{")


def test_an_auto_call_cut_short_ends_with_length() -> None:
    """Deltas wait until the call's arguments begin, then go; cut short, it ends `length`."""
    split = CallSplitter(JSON_CALLS, FUNCTIONS, True, False)
    assert split.stream('{"name": "tide", "argu', None) == ("", [], None)
    said, deltas, finish = split.stream('ments": {"port": "Be', "length")
    assert said == "" and finish == "length"
    assert deltas[0]["function"]["name"] == "tide"
    assert "".join(d["function"]["arguments"] for d in deltas) == '{"port": "Be'


def test_json_with_more_than_a_call_is_content() -> None:
    """A listed function's description echoed back (as the demo model does when asked to
    call it) is no call: nothing streams as one, and it ends as content."""
    text = '{"name": "tide", "description": "Tides", "parameters": {"type": "object"}}'
    split = CallSplitter(JSON_CALLS, FUNCTIONS, True, False)
    got = [split.stream(text[i : i + 4], None) for i in range(0, len(text), 4)]
    assert all(piece == ("", [], None) for piece in got)
    assert split.stream("", "stop") == (text, [], "stop")


REQUIRED: list[tuple[ToolFormat, str]] = [
    (JSON_CALLS, '{"name": "tide", "arguments": {"port": "Bergen"}}'),
    (
        JSON_CALLS,
        '[{"name":"tide","arguments":{}} , {"name": "forecast", "arguments": '
        '{"city": "Oslo", "days": 12}}]',
    ),  # fmt: skip
    (INTERNLM2_CALLS, '{"name": "forecast", "parameters": {"city":"Rome","days":3}}'),
    (TAGGED, '{"name": "tide", "arguments": {"port": "K\\u00f8ge\\n"}}'),
]


@pytest.mark.parametrize(("fmt", "text"), REQUIRED)
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_required_calls_stream_pieces_that_make_the_whole_answer(
    fmt: ToolFormat, text: str, step: int
) -> None:
    """A required call's answer fed in pieces: per call a first delta with id and name, then
    pieces of its arguments, which put together are the whole answer's
    arguments exactly (written as json.dumps writes them, whatever the answer's spacing and
    escapes); the finish reason is tool_calls."""
    split = CallSplitter(fmt, FUNCTIONS, True, True)
    deltas, finish = [], None
    pieces = [text[i : i + step] for i in range(0, len(text), step)]
    for k, piece in enumerate(pieces):
        out, finish = split.call_deltas(piece, "stop" if k == len(pieces) - 1 else None)
        deltas += out
    calls: dict[int, list[str]] = {}
    for d in deltas:
        if "id" in d:  # (with a first piece of the arguments when one came in the same feed)
            assert d["index"] not in calls
            assert d["id"].startswith("call_") and d["type"] == "function"
            calls[d["index"]] = [d["function"]["name"], d["function"]["arguments"]]
            continue
        assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
        calls[d["index"]][1] += d["function"]["arguments"]
    _, want = fmt.split(text, FUNCTIONS, True, True)
    assert [tuple(calls[i]) for i in sorted(calls)] == want and want
    assert finish == "tool_calls"


@pytest.fixture(scope="module")
def agent_client(agent_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    yield from _serve(agent_dir, tmp_path_factory.mktemp("agent-tools"))


def test_internlm2_required_and_named_calls(agent_client: Any, agent_dir: Path) -> None:
    """The server picks InternLM2's format from the tokenizer; a required call's JSON follows
    the opened call, with `parameters` held to the function's schema."""
    tok = Tokenizer.from_folder(agent_dir)
    assert tok is not None
    for choice_ in ("required", {"type": "function", "function": {"name": "forecast"}}):
        out = agent_client.chat.completions.create(
            model=None, messages=HISTORY, tools=TOOLS, tool_choice=choice_, max_tokens=600,
            temperature=1.0, seed=3, n=2,
        )  # fmt: skip
        for choice in out.choices:
            assert choice.finish_reason == "tool_calls", choice
            (call,) = choice.message.tool_calls
            _arguments_valid(call)
            if isinstance(choice_, dict):
                assert call.function.name == "forecast"
    # the prompt (vLLM's prompt_logprobs show its tokens) ended with the call's opening
    out = agent_client.chat.completions.create(
        model=None, messages=HISTORY, tools=TOOLS, tool_choice="required", max_tokens=600,
        temperature=0, extra_body={"prompt_logprobs": 0},
    )  # fmt: skip
    prompt = [next(iter(e)) for e in out.choices[0].model_extra["prompt_logprobs"][1:]]
    opening = [str(tok.token_to_id(t)) for t in ("<|action_start|>", "<|plugin|>")]
    assert prompt[-3:-1] == opening and prompt[-1] == str(tok.encode("\n", False)[0])
    assert prompt.count(opening[1]) == 4  # the tools turn, the earlier call, its result, this call
    chunks = [
        c for c in agent_client.chat.completions.create(
            model=None, messages=HISTORY, tools=TOOLS, tool_choice="required", max_tokens=600,
            temperature=0, stream=True,
        ) if c.choices
    ]  # fmt: skip
    (streamed,) = _accumulate([c.choices[0].delta for c in chunks]).values()
    (call,) = out.choices[0].message.tool_calls  # the same prompt answered whole
    assert streamed["name"] == call.function.name
    assert streamed["arguments"] == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks)


def test_internlm2_auto_keeps_the_markers_and_stops_after_a_call(
    agent_client: Any, agent_dir: Path
) -> None:
    """In auto mode the answer keeps special tokens (a call is marked by them) and ends at
    `<|action_end|>`; without tools, neither."""
    tok = Tokenizer.from_folder(agent_dir)
    assert tok is not None
    end, plugin = tok.token_to_id("<|action_end|>"), tok.token_to_id("<|plugin|>")
    ask: dict[str, Any] = dict(model=None, messages=HISTORY[:2], temperature=0)
    out = agent_client.chat.completions.create(
        tools=TOOLS, max_tokens=5, logit_bias={str(end): 100}, **ask
    )
    choice = out.choices[0]
    assert choice.finish_reason == "stop" and out.usage.completion_tokens == 1, out
    assert choice.message.content == "" and not choice.message.tool_calls
    assert choice.model_extra["stop_reason"] is None  # the server's own stop is not named
    out = agent_client.chat.completions.create(
        tools=TOOLS, max_tokens=3, logit_bias={str(plugin): 100}, **ask
    )
    assert out.choices[0].message.content == "<|plugin|>" * 3
    out = agent_client.chat.completions.create(max_tokens=3, logit_bias={str(end): 100}, **ask)
    assert out.choices[0].finish_reason == "length" and out.choices[0].message.content == ""


def test_serve_refuses_internlm2_calls_for_a_model_without_its_tokens(tiny_llama_dir: Path) -> None:
    import subprocess
    import sys

    from tests.test_server import REPO_ROOT, free_port

    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "launch" / "serve.py"), "--model", str(tiny_llama_dir),
         "--device", "cpu", "--dtype", "float32", "--session-len", "256",
         "--port", str(free_port()), "--tool-call-format", "internlm2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--tool-call-format internlm2 needs the tokens" in done.stderr
    assert "use --tool-call-format json" in done.stderr


# -- chat templates that take tools ---------------------------------------------------------------
HERMES_STYLE = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}Functions you can call:
{% for t in tools %}{{ t | tojson }}
{% endfor %}To call one, write <tool_call>
{"name": <name>, "arguments": <object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'system' %}
{%- elif m.role == 'tool' %}<|im_start|>user
<tool_response name="{{ m.name }}">
{{ m.content }}
</tool_response><|im_end|>
{% elif m.role == 'assistant' %}<|im_start|>assistant
{{ m.content }}{% for c in m.tool_calls or [] %}
<tool_call>
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
"""A template in the style of Hermes / Qwen2.5: tools in the system turn, calls in <tool_call>
tags, results in user turns."""
BARE_JSON_STYLE = """\
{%- if tools %}<|im_start|>system
Reply to call a function as JSON: {"name": function name, "parameters": its arguments}.
{% for t in tools %}{{ t | tojson }}
{% endfor %}<|im_end|>
{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}
{% if m.tool_calls %}{% for c in m.tool_calls %}{"name": "{{ c.function.name }}", \
"parameters": {{ c.function.arguments | tojson }}}{% endfor %}{% else %}{{ m.content }}\
{% endif %}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
"""A template in the style of Llama 3.1: a call is the whole answer, its arguments under
`parameters`."""


def _with_template(folder: Path, out: Path, template: str) -> Path:
    import shutil

    copy = Path(shutil.copytree(folder, out))
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    return copy


@pytest.fixture(scope="module")
def hermes_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _with_template(tiny_llama_dir, tmp_path_factory.mktemp("hermes") / "m", HERMES_STYLE)


def test_templates_that_take_tools_write_them(hermes_dir: Path, tmp_path: Path) -> None:
    tok = Tokenizer.from_folder(hermes_dir)
    assert tok is not None
    fmt = tool_format_for(tok)
    assert isinstance(fmt, TemplateCalls) and fmt.tagged and fmt.key == "arguments"
    turns = fmt.turns(HISTORY, FUNCTIONS)
    text = tok.decode(fmt.encode(tok, turns, FUNCTIONS, calling=True), skip_special_tokens=False)
    tools = "".join(
        json.dumps({"type": "function", "function": f}, ensure_ascii=False) + "\n"
        for f in (
            {"name": "forecast", "parameters": FORECAST},
            {"name": "tide", "description": "Tides", "parameters": TIDE},
        )
    )
    assert text == (
        "<s><|im_start|>system\nBe brief.\n\nFunctions you can call:\n" + tools
        + 'To call one, write <tool_call>\n{"name": <name>, "arguments": <object>}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\nTides in Bergen?<|im_end|>\n"
        "<|im_start|>assistant\nI will look.<tool_call>\n"  # trim_blocks ate the newline
        '{"name": "tide", "arguments": {"port": "Bergen"}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response name="tide">\nhigh at 6\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n<tool_call>\n"
    )  # fmt: skip
    # HF's apply_chat_template, given the same turns and tools, writes the same prompt
    from transformers import AutoTokenizer

    hf: Any = AutoTokenizer.from_pretrained(str(hermes_dir))
    hf_tools = [{"type": "function", "function": json.loads(line)["function"]}
                for line in tools.splitlines()]  # fmt: skip
    hf_text = hf.apply_chat_template(
        turns, tools=hf_tools, tokenize=False, add_generation_prompt=True
    )
    assert "<s>" + hf_text + "<tool_call>\n" == text
    bare_dir = _with_template(hermes_dir, tmp_path / "bare", BARE_JSON_STYLE)
    bare_tok = Tokenizer.from_folder(bare_dir)
    assert bare_tok is not None
    bare = tool_format_for(bare_tok)
    assert isinstance(bare, TemplateCalls) and not bare.tagged and bare.key == "parameters"
    text = bare_tok.decode(
        bare.encode(bare_tok, bare.turns(HISTORY[1:3], FUNCTIONS), FUNCTIONS, calling=True),
        skip_special_tokens=False,
    )
    assert text.endswith(
        '<|im_start|>assistant\n{"name": "tide", "parameters": {"port": "Bergen"}}<|im_end|>\n'
        "<|im_start|>assistant\n"
    )
    assert tool_format_for(bare_tok, "json") is JSON_CALLS
    llama = Tokenizer.from_folder(_with_template(hermes_dir, tmp_path / "plain", "{{ messages }}"))
    assert llama is not None
    with pytest.raises(ValueError, match="needs a chat template that takes `tools`"):
        tool_format_for(llama, "template")


@pytest.mark.parametrize(
    ("text", "parallel", "content", "calls"),
    [
        (f"Sure.\n<tool_call>\n{TAGGED_CALL}\n</tool_call>", True, "Sure.",
         [("tide", '{"port": "Bergen"}')]),
        (f"<tool_call>{TAGGED_CALL}</tool_call><tool_call>{TAGGED_CALL}</tool_call>", False, "",
         [("tide", '{"port": "Bergen"}')]),
        (f"<tool_call>{TAGGED_CALL}", True, "", [("tide", '{"port": "Bergen"}')]),  # unclosed
        (f"<tool_call>{TAGGED_CALL}</tool_call> and then more", True,
         f"<tool_call>{TAGGED_CALL}</tool_call> and then more", []),
        ('<tool_call>{"name": "nope", "arguments": {}}</tool_call>', True,
         '<tool_call>{"name": "nope", "arguments": {}}</tool_call>', []),
        (TAGGED_CALL, True, TAGGED_CALL, []),  # tagged templates call with tags
    ],
)  # fmt: skip
def test_tagged_calls_are_read_back(
    text: str, parallel: bool, content: str, calls: list[tuple[str, str]]
) -> None:
    assert TAGGED.split(text, FUNCTIONS, parallel, False) == (content, calls)


def test_template_calls_on_a_server(hermes_dir: Path, tmp_path: Path) -> None:
    """A required call opens `<tool_call>` in the prompt and guides the call's JSON; the
    template received the tools."""
    tok = Tokenizer.from_folder(hermes_dir)
    assert tok is not None
    gen = _serve(hermes_dir, tmp_path)
    client = next(gen)
    try:
        out = client.chat.completions.create(
            model=None, messages=HISTORY, tools=TOOLS, tool_choice="required", max_tokens=600,
            temperature=1.0, seed=5, n=2, extra_body={"prompt_logprobs": 0},
        )  # fmt: skip
        for choice in out.choices:
            assert choice.finish_reason == "tool_calls", choice
            (call,) = choice.message.tool_calls
            _arguments_valid(call)
        prompt = [int(next(iter(e))) for e in out.choices[0].model_extra["prompt_logprobs"][1:]]
        text = tok.decode(prompt, skip_special_tokens=False)
        assert text.endswith("<|im_start|>assistant\n<tool_call>\n")
        assert "Functions you can call:" in text and '"name": "forecast"' in text
    finally:
        next(gen, None)
