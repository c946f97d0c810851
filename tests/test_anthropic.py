"""Anthropic's Messages API on a random-weight model, over raw HTTP as Anthropic's SDK sends it
(`x-api-key`, `anthropic-version`): answers equal the chat route's for the same conversation,
streamed events in Anthropic's order, stop reasons, tool use round trips, token counts, and
errors in Anthropic's shape naming the field."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.test_server import KEY, Server

PORT = {"type": "object", "properties": {"port": {"type": "string", "maxLength": 6}},
        "required": ["port"]}  # fmt: skip
TOOLS = [{"name": "tide", "description": "Tides", "input_schema": PORT}]
OPENAI_TOOLS = [{"type": "function", "function": {"name": "tide", "description": "Tides",
                                                  "parameters": PORT}}]  # fmt: skip


class Anthropic:
    def __init__(self, server: Server, key: str = KEY):
        self.server, self.key = server, key

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        req = urllib.request.Request(
            self.server.url + path, data=json.dumps(body).encode(), method="POST",
            headers={"x-api-key": self.key, "anthropic-version": "2023-06-01",
                     "content-type": "application/json"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                raw, status = r.read(), r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        if body.get("stream") and status == 200:
            return status, _events(raw.decode())
        return status, json.loads(raw)


def _events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of an SSE body; the data's type must name its event."""
    out = []
    for chunk in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in chunk.splitlines())
        data = json.loads(lines["data"])
        assert data["type"] == lines["event"]
        out.append((lines["event"], data))
    return out


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tiny_llama_dir, tmp_path_factory.mktemp("anthropic"), "--api-keys", KEY,
               "--session-len", "2048")  # fmt: skip
    yield s
    s.close()


@pytest.fixture(scope="module")
def api(server: Server) -> Anthropic:
    return Anthropic(server)


def _model(server: Server) -> str:
    return str(server.request("GET", "/v1/models")[1]["data"][0]["id"])


def _chat(server: Server, messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    status, body = server.request(
        "POST", "/v1/chat/completions", {"messages": messages, "temperature": 0, **extra}
    )
    assert status == 200, body
    return body


def test_answers_equal_the_chat_route(server: Server, api: Anthropic) -> None:
    ask = {"model": _model(server), "max_tokens": 7, "temperature": 0, "system": "Be brief.",
           "messages": [{"role": "user", "content": "Where is the pier?"}]}  # fmt: skip
    status, msg = api.post("/v1/messages", ask)
    assert status == 200, msg
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Where is the pier?"}]  # fmt: skip
    chat = _chat(server, messages, max_tokens=7)
    assert msg["type"] == "message" and msg["role"] == "assistant" and msg["id"].startswith("msg_")
    assert msg["content"] == [{"type": "text", "text": chat["choices"][0]["message"]["content"]}]
    assert msg["stop_reason"] == "max_tokens" and msg["stop_sequence"] is None
    usage = msg["usage"]
    assert (
        usage["input_tokens"] + usage["cache_read_input_tokens"] == (chat["usage"]["prompt_tokens"])
    )
    assert usage["output_tokens"] == 7
    # blocks and a system given as text blocks: the same prompt
    parts = [{"type": "text", "text": "Where is "}, {"type": "text", "text": "the pier?"}]
    blocks = {**ask, "system": [{"type": "text", "text": "Be brief."}],
              "messages": [{"role": "user", "content": parts}]}  # fmt: skip
    assert api.post("/v1/messages", blocks)[1]["content"] == msg["content"]
    status, counted = api.post("/v1/messages/count_tokens", {
        "model": _model(server), "system": "Be brief.", "messages": ask["messages"]})  # fmt: skip
    assert status == 200 and counted == {"input_tokens": chat["usage"]["prompt_tokens"]}

    # streamed: Anthropic's event order, the same text
    status, events = api.post("/v1/messages", {**ask, "stream": True})
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[2:-3]) == {"content_block_delta"}
    text = "".join(data["delta"]["text"] for name, data in events if name == "content_block_delta")
    assert text == msg["content"][0]["text"]
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 7


def test_stop_sequences_say_which(server: Server, api: Anthropic) -> None:
    ask = {"model": _model(server), "max_tokens": 24, "temperature": 0,
           "messages": [{"role": "user", "content": "Tell me about the tide."}]}  # fmt: skip
    full = api.post("/v1/messages", ask)[1]["content"][0]["text"]
    at = next(i for i in range(1, len(full) - 1) if full.find(full[i : i + 2]) == i)
    stop = full[at : at + 2]
    status, cut = api.post("/v1/messages", {**ask, "stop_sequences": ["never-seen", stop]})
    assert status == 200 and cut["content"][0]["text"] == full[:at]
    assert cut["stop_reason"] == "stop_sequence" and cut["stop_sequence"] == stop


def test_tool_use_round_trips(server: Server, api: Anthropic) -> None:
    ask: dict[str, Any] = {
        "model": _model(server), "max_tokens": 200, "temperature": 0, "tools": TOOLS,
        "messages": [{"role": "user", "content": "Tides in Bergen?"}],
    }  # fmt: skip
    status, msg = api.post("/v1/messages", {**ask, "tool_choice": {"type": "any"}})
    assert status == 200 and msg["stop_reason"] == "tool_use", msg
    (use,) = msg["content"]
    assert use["type"] == "tool_use" and use["name"] == "tide" and use["id"].startswith("toolu_")
    jsonschema.validate(use["input"], PORT)
    status, events = api.post(
        "/v1/messages", {**ask, "tool_choice": {"type": "tool", "name": "tide"}, "stream": True}
    )
    names = [n for n, _ in events]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[2:-3]) == {"content_block_delta"} and len(names) > 6  # in pieces
    start = events[1][1]
    assert start["content_block"]["type"] == "tool_use" and start["content_block"]["input"] == {}
    assert start["content_block"]["name"] == "tide"
    pieces = [e["delta"] for _, e in events[2:-3]]
    assert {p["type"] for p in pieces} == {"input_json_delta"}
    streamed = "".join(p["partial_json"] for p in pieces)
    assert json.loads(streamed) == use["input"]  # greedy: the same call
    assert streamed == json.dumps(use["input"], ensure_ascii=False)
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    # the result goes back as a tool_result block: the prompt the chat route builds
    messages = [
        ask["messages"][0],
        {"role": "assistant", "content": msg["content"]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use["id"],
                                      "content": [{"type": "text", "text": "high at 6"}]}]},
    ]  # fmt: skip
    status, answer = api.post(
        "/v1/messages", {**ask, "messages": messages, "max_tokens": 4,
                         "tool_choice": {"type": "none"}}
    )  # fmt: skip
    chat = _chat(server, [
        {"role": "user", "content": "Tides in Bergen?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": use["id"], "type": "function",
             "function": {"name": "tide", "arguments": json.dumps(use["input"])}}]},
        {"role": "tool", "tool_call_id": use["id"], "content": "high at 6"},
    ], tools=OPENAI_TOOLS, tool_choice="none", max_tokens=4)  # fmt: skip
    assert (
        status == 200 and answer["content"][0]["text"] == (chat["choices"][0]["message"]["content"])
    )


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "xx"}}]}]},
         "messages.0.content.0.type: content block type 'image'"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "less than max_tokens"),
        ({"thinking": {"type": "enabled", "budget_tokens": 2}}, "needs a reasoning model"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type"),
        ({"tools": TOOLS, "tool_choice": {"type": "tool", "name": "x"}}, "not in tools"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop_sequences": [""]}, "stop_sequences"),
    ],
)  # fmt: skip
def test_errors_are_anthropic_shaped_and_name_the_field(
    server: Server, api: Anthropic, extra: dict[str, Any], match: str
) -> None:
    body = {"model": _model(server), "max_tokens": 4,
            "messages": [{"role": "user", "content": "Hi"}], **extra}  # fmt: skip
    status, error = api.post("/v1/messages", body)
    assert status == 400, error
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert match in error["error"]["message"], error


def test_keys_and_unknown_models(server: Server) -> None:
    body = {"model": "claude-x", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}
    status, error = Anthropic(server, key="wrong").post("/v1/messages", body)
    assert status == 401 and error["error"]["type"] == "authentication_error"
    status, error = Anthropic(server).post("/v1/messages", body)
    assert status == 404 and error["error"]["type"] == "not_found_error"
    assert "claude-x" in error["error"]["message"]
    # the OpenAI routes keep OpenAI's error shape
    status, error = server.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": -1})
    assert status == 400 and error["error"]["param"] == "max_tokens"


def test_count_tokens_checks_what_messages_checks(server: Server, api: Anthropic) -> None:
    base = {"model": _model(server), "messages": [{"role": "user", "content": "Hi"}]}
    for tools, match in (
        (TOOLS + TOOLS, "share a name"),
        ([{"type": "web_search_20250305", "name": "web_search"}], "tools.0.type"),
    ):
        status, error = api.post("/v1/messages/count_tokens", {**base, "tools": tools})
        assert status == 400 and match in error["error"]["message"], error
    status, counted = api.post("/v1/messages/count_tokens", {**base, "tools": TOOLS})
    assert status == 200 and counted["input_tokens"] > api.post(
        "/v1/messages/count_tokens", base)[1]["input_tokens"]  # fmt: skip


def test_a_last_assistant_message_is_continued(server: Server, api: Anthropic) -> None:
    """Anthropic's prefill: the answer continues the assistant's last message, as the chat
    route's continue_final_message does."""
    messages = [{"role": "user", "content": "Where is the pier?"},
                {"role": "assistant", "content": "The pier is"}]  # fmt: skip
    ask = {"model": _model(server), "max_tokens": 6, "temperature": 0, "messages": messages}
    status, msg = api.post("/v1/messages", ask)
    assert status == 200, msg
    chat = _chat(server, messages, max_tokens=6, continue_final_message=True,
                 add_generation_prompt=False)  # fmt: skip
    assert msg["content"][0]["text"] == chat["choices"][0]["message"]["content"]
    assert (
        msg["usage"]["input_tokens"] + msg["usage"]["cache_read_input_tokens"]
        == (chat["usage"]["prompt_tokens"])
    )
    counted = api.post("/v1/messages/count_tokens", {"model": _model(server),
                                                     "messages": messages})[1]  # fmt: skip
    assert counted["input_tokens"] == chat["usage"]["prompt_tokens"]
    use = {"type": "tool_use", "id": "toolu_1", "name": "tide", "input": {"port": "A"}}
    status, error = api.post("/v1/messages", {**ask, "tools": TOOLS, "messages": [
        messages[0], {"role": "assistant", "content": [use]}]})  # fmt: skip
    assert status == 400 and "tool_result" in error["error"]["message"], error
