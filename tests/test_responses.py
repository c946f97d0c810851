"""OpenAI's Responses API, driven by the official client on a random-weight model: answers equal
the chat route's for the same conversation, `previous_response_id` continues a stored one,
streamed events follow the client's accumulator, function calls round-trip, and bad requests
are 400s naming the field."""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from dist_runtime.server.responses import ResponseStore, input_messages
from tests.test_server import KEY, Server

openai = pytest.importorskip("openai")

PORT = {"type": "object", "properties": {"port": {"type": "string", "maxLength": 6}},
        "required": ["port"]}  # fmt: skip
TOOLS = [{"type": "function", "name": "tide", "description": "Tides", "parameters": PORT}]
YES_NO = {"format": {"type": "json_schema", "name": "yn", "schema": {"enum": ["yes", "no way"]}}}


@pytest.fixture(scope="module")
def client(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    s = Server(tiny_llama_dir, tmp_path_factory.mktemp("responses"), "--api-keys", KEY,
               "--session-len", "2048")  # fmt: skip
    yield openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0)
    s.close()


def _chat(client: Any, messages: list[dict[str, Any]], max_tokens: int) -> Any:
    return client.chat.completions.create(
        model=None, messages=messages, max_tokens=max_tokens, temperature=0
    )


def test_answers_equal_the_chat_route(client: Any) -> None:
    r = client.responses.create(
        model=None, input="Where is the pier?", instructions="Be brief.", max_output_tokens=7,
        temperature=0,
    )  # fmt: skip
    chat = _chat(client, [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Where is the pier?"}], 7)  # fmt: skip
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == 7
    assert r.usage.total_tokens == r.usage.input_tokens + 7
    # cut by max_output_tokens: incomplete, as OpenAI reports it
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    (item,) = r.output
    assert item.type == "message" and item.role == "assistant" and item.status == "incomplete"
    # the same as a list of items with text parts
    items = client.responses.create(
        model=None, max_output_tokens=7, temperature=0, instructions="Be brief.",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Where is the "},
                                            {"type": "input_text", "text": "pier?"}]}],
    )  # fmt: skip
    assert items.output_text == r.output_text


def test_output_text_logprobs_equal_the_chat_routes(client: Any) -> None:
    """include: ["message.output_text.logprobs"] with top_logprobs: each output token's entry
    (token, logprob, bytes, top_logprobs), as the chat route gives them; streamed, each text
    delta carries its tokens' entries and together they make the whole answer's."""
    ask: dict[str, Any] = dict(model=None, input="Where is the pier?", max_output_tokens=6,
                               temperature=0, include=["message.output_text.logprobs"],
                               top_logprobs=2)  # fmt: skip
    r = client.responses.create(**ask)
    entries = r.output[0].content[0].logprobs
    assert len(entries) == 6 and all(len(e.top_logprobs) == 2 for e in entries)
    assert r.top_logprobs == 2
    chat = client.chat.completions.create(
        model=None, messages=[{"role": "user", "content": "Where is the pier?"}], max_tokens=6,
        temperature=0, logprobs=True, top_logprobs=2,
    )  # fmt: skip
    want = [(c.token, c.logprob, [t.token for t in c.top_logprobs])
            for c in chat.choices[0].logprobs.content]  # fmt: skip
    assert [(e.token, e.logprob, [t.token for t in e.top_logprobs]) for e in entries] == want
    assert "".join(bytes(e.bytes).decode("utf-8", "replace") for e in entries) == r.output_text
    events = list(client.responses.create(stream=True, **ask))
    streamed = [e for ev in events if ev.type == "response.output_text.delta" for e in ev.logprobs]
    (done,) = [ev for ev in events if ev.type == "response.output_text.done"]
    assert [e.token for e in streamed] == [e.token for e in done.logprobs] == [w[0] for w in want]
    plain = client.responses.create(**{**ask, "include": None})
    assert plain.output[0].content[0].logprobs == []
    tool = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(tools=[tool], **ask)
    assert info.value.body["param"] == "include"


def test_previous_response_continues_the_conversation(client: Any) -> None:
    first = client.responses.create(
        model=None, input="Name a port.", instructions="Reply in French.", max_output_tokens=5,
        temperature=0,
    )  # fmt: skip
    second = client.responses.create(
        model=None, input="And another?", previous_response_id=first.id, max_output_tokens=5,
        temperature=0,
    )  # fmt: skip
    # the first's input and output come first; its instructions do not (OpenAI's rule)
    chat = _chat(client, [{"role": "user", "content": "Name a port."},
                          {"role": "assistant", "content": first.output_text},
                          {"role": "user", "content": "And another?"}], 5)  # fmt: skip
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.output_text == chat.choices[0].message.content
    assert client.responses.retrieve(first.id).output_text == first.output_text
    client.responses.delete(first.id)
    for call in (lambda: client.responses.retrieve(first.id),
                 lambda: client.responses.create(model=None, input="x",
                                                 previous_response_id=first.id)):  # fmt: skip
        with pytest.raises(openai.NotFoundError):
            call()
    unstored = client.responses.create(model=None, input="x", max_output_tokens=1, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_input_items_list_a_responses_own_input(client: Any) -> None:
    """GET /v1/responses/{id}/input_items: the request's own input items (not the ones of the
    response it continues), with ids, newest first by default, paged as OpenAI pages."""
    first = client.responses.create(model=None, input="Name a port.", max_output_tokens=2)
    (only,) = client.responses.input_items.list(first.id).data
    assert only.type == "message" and only.role == "user" and only.id.startswith("msg_")
    assert [(c.type, c.text) for c in only.content] == [("input_text", "Name a port.")]
    given = [
        {"role": "user", "content": "Where is the pier?"},
        {"role": "assistant", "content": "North."},
        {"type": "message", "role": "user", "id": "msg_mine",
         "content": [{"type": "input_text", "text": "And the ferry?"}]},
    ]  # fmt: skip
    second = client.responses.create(
        model=None, input=given, previous_response_id=first.id, max_output_tokens=2
    )
    newest = client.responses.input_items.list(second.id).data
    assert [i.content[0].text for i in newest] == ["And the ferry?", "North.", "Where is the pier?"]
    assert newest[0].id == "msg_mine" and newest[1].content[0].type == "output_text"
    page = client.responses.input_items.list(second.id, order="asc", limit=2)
    assert [i.content[0].text for i in page.data] == ["Where is the pier?", "North."]
    assert page.has_more
    rest = client.responses.input_items.list(second.id, order="asc", after=page.data[-1].id)
    assert [i.id for i in rest.data] == ["msg_mine"] and not rest.has_more
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list("resp_nope")


def test_streamed_events_build_the_same_response(client: Any) -> None:
    kwargs: dict[str, Any] = dict(model=None, input="Yes or no?", max_output_tokens=16,
                                  temperature=0, text=YES_NO)  # fmt: skip
    whole = client.responses.create(**kwargs)
    assert whole.status == "completed" and json.loads(whole.output_text) in ("yes", "no way")
    with client.responses.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]  # fmt: skip
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]  # fmt: skip
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == whole.output_text
    assert client.responses.retrieve(final.id).output_text == whole.output_text


def test_function_calls_round_trip(client: Any) -> None:
    r = client.responses.create(
        model=None, input="Tides in Bergen?", tools=TOOLS, tool_choice="required",
        max_output_tokens=200, temperature=0,
    )  # fmt: skip
    (call,) = r.output
    assert call.type == "function_call" and call.name == "tide" and call.call_id
    jsonschema.validate(json.loads(call.arguments), PORT)
    with client.responses.stream(model=None, input="Tides in Bergen?", tools=TOOLS,
                                 tool_choice={"type": "function", "name": "tide"},
                                 max_output_tokens=200, temperature=0) as stream:  # fmt: skip
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done",
                          "response.completed"]  # fmt: skip
    assert set(kinds[3:-3]) == {"response.function_call_arguments.delta"} and len(kinds) > 7
    assert events[2].item.name == "tide" and events[2].item.status == "in_progress"
    pieces = "".join(e.delta for e in events[3:-3])
    assert pieces == events[-3].arguments == final.output[0].arguments == call.arguments
    # the result goes back as a function_call_output item, continuing the stored response
    answer = client.responses.create(
        model=None, previous_response_id=r.id, tools=TOOLS, tool_choice="none",
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "high at 6"}],
        max_output_tokens=4, temperature=0,
    )  # fmt: skip
    chat = client.chat.completions.create(
        model=None, max_tokens=4, temperature=0, tools=[
            {"type": "function", "function": {"name": "tide", "description": "Tides",
                                              "parameters": PORT}}], tool_choice="none",
        messages=[{"role": "user", "content": "Tides in Bergen?"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": call.call_id, "type": "function",
                       "function": {"name": "tide", "arguments": call.arguments}}]},
                  {"role": "tool", "tool_call_id": call.call_id, "content": "high at 6"}],
    )  # fmt: skip
    assert answer.usage.input_tokens == chat.usage.prompt_tokens
    assert answer.output_text == chat.choices[0].message.content


@pytest.mark.parametrize(
    ("extra", "param", "match"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools.0.type", "built-in tool"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
         "input.0.content.0.type", "reads text"),
        ({"input": [{"type": "computer_call_output"}]}, "input.0.type", "not supported"),
        ({"input": [{"role": "tool", "content": "x"}]}, "input.0.role", "not user"),
        ({"include": ["reasoning.encrypted_content"]}, "include.0",
         "message.output_text.logprobs"),
        ({"truncation": "auto", "input": "pier " * 3000}, "input", "last turn alone"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "x"}}, "tool_choice",
         "not in tools"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format", "schema"),
        ({"metadata": {"k": "x" * 513}}, "metadata", "at most 16 pairs"),
    ],
)  # fmt: skip
def test_bad_requests_name_the_field(
    client: Any, extra: dict[str, Any], param: str, match: str
) -> None:
    body: dict[str, Any] = {"input": "Hi", "max_output_tokens": 2, **extra}
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=None, **body)
    error = info.value.body
    assert error["param"].startswith(param) and match in error["message"], error
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(model=None, input="x", previous_response_id="resp_nope")
    assert missing.value.body["param"] == "previous_response_id"


def _tokens(client: Any, messages: list[dict[str, Any]]) -> int:
    root = str(client.base_url).removesuffix("/").removesuffix("/v1")
    req = urllib.request.Request(
        root + "/tokenize", data=json.dumps({"messages": messages}).encode()
    )
    req.add_header("Content-Type", "application/json")
    req.add_header("Authorization", f"Bearer {KEY}")
    with urllib.request.urlopen(req, timeout=60) as r:
        count: int = json.loads(r.read())["count"]
    return count


def test_truncation_auto_drops_the_oldest_turns(client: Any) -> None:
    """A conversation longer than the context: a 400 by default; with `truncation: "auto"`
    the instructions and the longest run of newest turns that fits (the chat prompt of
    exactly those, as /tokenize counts it)."""
    turns = [
        {"role": "user" if i % 2 == 0 else "assistant",
         "content": f"Turn {i}: " + "the ferry leaves the pier at seven " * 12}
        for i in range(41)
    ]  # fmt: skip
    ask: dict[str, Any] = dict(model=None, instructions="Be brief.", input=turns,
                               max_output_tokens=16, temperature=0)  # fmt: skip
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(**ask)
    assert "over session_len" in info.value.body["message"]
    r = client.responses.create(truncation="auto", **ask)
    assert r.truncation == "auto" and r.usage.output_tokens == 16
    system = [{"role": "system", "content": "Be brief."}]
    fitting = [k for k in range(len(turns)) if _tokens(client, system + turns[k:]) <= 2048 - 16]
    assert 1 < fitting[0] < len(turns) - 1
    assert r.usage.input_tokens == _tokens(client, system + turns[fitting[0] :])


def test_input_items_become_chat_messages() -> None:
    items: list[dict[str, Any]] = [
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "c1", "name": "tide", "arguments": '{"port": "A"}'},
        {"type": "function_call", "call_id": "c2", "name": "tide", "arguments": '{"port": "B"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "high"},
        {"type": "function_call_output", "call_id": "c2",
         "output": [{"type": "input_text", "text": "low"}]},
        {"type": "function_call", "call_id": "c3", "name": "tide"},
    ]  # fmt: skip
    assert input_messages(items) == [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "tide", "arguments": '{"port": "A"}'}},
            {"id": "c2", "type": "function",
             "function": {"name": "tide", "arguments": '{"port": "B"}'}}]},
        {"role": "tool", "content": "high", "tool_call_id": "c1"},
        {"role": "tool", "content": "low", "tool_call_id": "c2"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c3", "type": "function", "function": {"name": "tide", "arguments": "{}"}}]},
    ]  # fmt: skip
    assert input_messages("Hello") == [{"role": "user", "content": "Hello"}]


def test_store_keeps_the_newest_within_its_bounds() -> None:
    one = [{"role": "user", "content": "abc"}]
    size = len(json.dumps({"id": "r0"})) + len(json.dumps(one))
    store = ResponseStore(max_items=3, max_chars=4 * size)
    for i in range(4):
        store.put(f"r{i}", {"id": f"r{i}"}, one)
    assert [store.get(f"r{i}") is not None for i in range(4)] == [False, True, True, True]
    # the response's own fields count too (tools, metadata, call arguments), not only text
    store.put("big", {"id": "big", "metadata": {"k": "x" * 3 * size}}, [])
    assert len(store) == 1 and store.get("big") is not None
    assert store.delete("big") and not store.delete("big") and len(store) == 0


def test_background_responses_run_on_and_can_be_cancelled(client: Any) -> None:
    """background: answered at once as queued, polled to its end (the same answer as a
    foreground request); a long one cancelled ends `cancelled` with what it had written."""

    ask: dict[str, Any] = dict(model=None, input="Where is the pier?", max_output_tokens=12,
                               temperature=0)  # fmt: skip
    queued = client.responses.create(background=True, **ask)
    assert queued.status in ("queued", "in_progress") and queued.output == []
    deadline = time.monotonic() + 60
    while (got := client.responses.retrieve(queued.id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert got.background and got.status == "incomplete"  # cut by max_output_tokens
    assert got.output_text == client.responses.create(**ask).output_text
    long = client.responses.create(
        model=None, input="Tell me everything.", max_output_tokens=1900, background=True
    )
    cancelled = client.responses.cancel(long.id)
    assert cancelled.status == "cancelled" and cancelled.usage.output_tokens < 1900
    assert client.responses.retrieve(long.id).status == "cancelled"
    assert client.responses.cancel(long.id).status == "cancelled"  # again: nothing changes
    with pytest.raises(openai.BadRequestError, match="only a background response"):
        client.responses.cancel(client.responses.create(**ask).id)
    for extra, param in (({"store": False}, "store"), ({"stream": True}, "stream")):
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.create(background=True, **ask, **extra)
        assert info.value.body["param"] == param


def test_disk_store_keeps_responses_and_pending_requests(tmp_path: Path) -> None:
    from dist_runtime.server.responses import DiskResponseStore

    # a store written before input items were kept gets their column
    made = sqlite3.connect(tmp_path / "responses.sqlite3")
    made.execute(
        "CREATE TABLE responses (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL "
        "UNIQUE, created REAL NOT NULL, status TEXT NOT NULL, body TEXT NOT NULL, history TEXT "
        "NOT NULL, request TEXT)"
    )
    made.execute("INSERT INTO responses (id, created, status, body, history) VALUES "
                 "('old', ?, 'completed', '{}', '[]')", (time.time(),))  # fmt: skip
    made.commit()
    made.close()
    store = DiskResponseStore(tmp_path / "responses.sqlite3")
    was = store.get("old")
    assert was is not None and was.input is None
    one = [{"role": "user", "content": "abc"}]
    items = [{"type": "message", "id": "msg_1", "role": "user", "content": []}]
    store.put("r0", {"id": "r0", "status": "completed"}, one, items=items)
    store.put("r1", {"id": "r1", "status": "queued"}, [], {"input": "x", "background": True})
    store.close()
    store = DiskResponseStore(tmp_path / "responses.sqlite3")  # a later server
    got = store.get("r0")
    assert got is not None and got.history == one and got.request is None
    assert got.input == items
    assert [(rid, s.request) for rid, s in store.pending()] == [
        ("r1", {"input": "x", "background": True})
    ]
    store.put("r1", {"id": "r1", "status": "completed"}, one)  # answered: no longer pending
    assert store.pending() == [] and len(store) == 3
    old = DiskResponseStore(tmp_path / "responses.sqlite3", retention_s=-1)
    old.put("r2", {"id": "r2", "status": "completed"}, [])  # past retention: all go
    assert len(old) == 0 and store.get("r0") is None
    assert not store.delete("r0")


def test_a_background_response_outlives_a_server_restart(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """A background response still queued when the server stops (SIGTERM) is run again by the
    next server on the job directory, under its id, to the answer a foreground request gives."""
    import http.client
    import time

    args = ("--api-keys", KEY, "--job-dir", str(tmp_path / "jobs"), "--max-num-seqs", "1")
    first = Server(tiny_llama_dir, tmp_path, *args)
    try:
        # a long answer holds the only sequence slot, so the background ones wait, queued
        conn = http.client.HTTPConnection("127.0.0.1", first.port, timeout=60)
        body = {"prompt": "x", "max_tokens": 450, "ignore_eos": True, "stream": True}
        conn.request(
            "POST",
            "/v1/completions",
            json.dumps(body),
            {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        )
        assert conn.getresponse().status == 200  # fmt: skip
        c = openai.OpenAI(base_url=first.url + "/v1", api_key=KEY, max_retries=0)
        ask: dict[str, Any] = dict(model=None, input="Where is the pier?", max_output_tokens=9,
                                   temperature=0)  # fmt: skip
        kept = c.responses.create(background=True, **ask)
        assert c.responses.retrieve(kept.id).status == "queued"
    finally:
        first.close()  # SIGTERM: the background responses stay queued in the job directory
    second = Server(tiny_llama_dir, tmp_path, *args)
    try:
        c = openai.OpenAI(base_url=second.url + "/v1", api_key=KEY, max_retries=0)
        deadline = time.monotonic() + 60
        while (got := c.responses.retrieve(kept.id)).status in ("queued", "in_progress"):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert got.status == "incomplete" and got.created_at == kept.created_at
        assert got.output_text == c.responses.create(**ask).output_text
    finally:
        second.close()


def test_a_response_cancelled_before_it_runs_again_stays_cancelled(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """In process: a background response a previous server left queued, cancelled before this
    server's start-up runs it again, is not run again."""
    import asyncio

    from dist_runtime import Runtime
    from dist_runtime.server.app import ServerSettings, create_app
    from dist_runtime.server.batch_lines import call
    from dist_runtime.server.responses import DiskResponseStore

    job_dir = tmp_path / "jobs"
    job_dir.mkdir()
    left = DiskResponseStore(job_dir / "responses.sqlite3")
    request = {"input": "Hi", "background": True, "max_output_tokens": 3}
    for rid in ("resp_a", "resp_b"):
        body = {"id": rid, "status": "queued", "created_at": 1, "background": True}
        left.put(rid, body, [], request)
    left.close()
    with Runtime(model=str(tiny_llama_dir), session_len=256, device="cpu",
                 job_dir=str(job_dir)) as rt:  # fmt: skip
        app = create_app(rt, ServerSettings(served_model_name="m"))

        async def run() -> tuple[Any, Any]:
            status, raw = await call(app, "/v1/responses/resp_a/cancel", b"")
            assert status == 200 and json.loads(raw)["status"] == "cancelled"
            state = app.state.responses
            await state.startup()
            assert state._resuming is not None
            await state._resuming
            while state.background:
                await asyncio.sleep(0.01)
            a, b = state.store.get("resp_a"), state.store.get("resp_b")
            await state.shutdown()
            return a, b

        a, b = asyncio.run(run())
    assert a.body["status"] == "cancelled" and a.request is None
    assert b.body["status"] == "incomplete" and b.body["created_at"] == 1 and b.request is None
