"""`--reasoning-parser`: a reasoning model's thinking apart from its answer, on the chat route
(`reasoning_content`, streamed as its own deltas) and the Responses route (a `reasoning` item),
with its tokens counted. Answers are forced into the `<think>` form by guided_regex on a
random-weight model, through the server's routes in process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dist_runtime import Runtime
from dist_runtime.server.app import ServerSettings, create_app
from dist_runtime.server.batch_lines import call
from dist_runtime.server.reasoning import ReasoningSplitter
from dist_runtime.text.tokenizer import Tokenizer
from tests.test_keep_alive import _stream

THINKING = r"<think>\n[a-z]{4,8} [a-z]{4,8}\n</think>\n\n[A-Z][a-z]{3,8} [a-z]{3,8}\."
HI = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    ("opened", "text", "want"),
    [
        (False, "<think>\nhmm\n</think>\n\nYes.", ("\nhmm\n", "Yes.")),
        (False, "  <think>a</think>b", ("a", "b")),
        (False, "No thinking here.", (None, "No thinking here.")),
        (False, "<thx>not it", (None, "<thx>not it")),
        (True, "so...</think>\nDone.", ("so...", "Done.")),
        (True, "cut off mid-thought", ("cut off mid-thought", "")),
        (False, "<think>never closed", ("never closed", "")),
        (False, "<think></think>", ("", "")),
    ],
)  # fmt: skip
def test_split_and_every_cut_agree(opened: bool, text: str, want: tuple[str | None, str]) -> None:
    assert ReasoningSplitter(opened).split(text) == want
    for cut in range(len(text) + 1):
        for second in range(cut, len(text) + 1):
            r = ReasoningSplitter(opened)
            pieces = [r.feed(text[:cut], False), r.feed(text[cut:second], False),
                      r.feed(text[second:], True)]  # fmt: skip
            thought = "".join(p[0] for p in pieces)
            answer = "".join(p[1] for p in pieces)
            assert (thought if r.thought else None, answer) == want, (cut, second)


@pytest.fixture(scope="module")
def app(tiny_llama_dir: Path) -> Iterator[Any]:
    with Runtime(model=str(tiny_llama_dir), session_len=512, device="cpu",
                 dtype="float32") as rt:  # fmt: skip
        yield create_app(rt, ServerSettings(served_model_name="m", reasoning_parser="deepseek_r1"))


def _post(app: Any, path: str, body: dict[str, Any]) -> Any:
    status, raw = asyncio.run(call(app, path, json.dumps(body).encode()))
    assert status == 200, raw
    return json.loads(raw)


def test_chat_returns_the_thinking_apart(app: Any) -> None:
    ask = {"messages": HI, "max_tokens": 60, "temperature": 0, "guided_regex": THINKING}
    out = _post(app, "/v1/chat/completions", ask)
    message = out["choices"][0]["message"]
    thought, answer = message["reasoning_content"], message["content"]
    assert thought.startswith("\n") and thought.endswith("\n") and " " in thought
    assert answer[0].isupper() and answer.endswith(".") and "<think>" not in answer
    n = out["usage"]["completion_tokens_details"]["reasoning_tokens"]
    assert 0 < n < out["usage"]["completion_tokens"]  # up to the token completing </think>
    streamed = asyncio.run(_stream(app, "/v1/chat/completions", {**ask, "stream": True}))
    deltas = [json.loads(e.removeprefix("data: "))["choices"][0]["delta"]
              for e in streamed.split("\n\n") if e.startswith("data: {")]  # fmt: skip
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == thought
    assert "".join(d.get("content") or "" for d in deltas) == answer
    # without thinking in the answer: all content, reasoning_content null
    plain = _post(app, "/v1/chat/completions", {**ask, "guided_regex": "[A-Z][a-z]{3,6}\\."})
    assert plain["choices"][0]["message"]["reasoning_content"] is None
    assert plain["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0
    # vLLM's include_reasoning: false leaves the thinking out, the answer and counts alone
    hidden = _post(app, "/v1/chat/completions", {**ask, "include_reasoning": False})
    assert "reasoning_content" not in hidden["choices"][0]["message"]
    assert hidden["choices"][0]["message"]["content"] == answer
    tokens = ("completion_tokens", "completion_tokens_details")
    assert [hidden["usage"][k] for k in tokens] == [out["usage"][k] for k in tokens]
    streamed = asyncio.run(
        _stream(app, "/v1/chat/completions", {**ask, "stream": True, "include_reasoning": False})
    )
    deltas = [json.loads(e.removeprefix("data: "))["choices"][0]["delta"]
              for e in streamed.split("\n\n") if e.startswith("data: {")]  # fmt: skip
    assert not any("reasoning_content" in d for d in deltas)
    assert "".join(d.get("content") or "" for d in deltas) == answer


def _force_thinking(monkeypatch: pytest.MonkeyPatch, request_type: Any) -> None:
    """Hold a route's answers to the thinking form (its requests take no guided_regex)."""
    sampling = request_type.sampling

    def forced(self: Any, *args: Any) -> Any:
        fields = sampling(self, *args)
        return fields.model_copy(update={"guided_regex": THINKING, "temperature": 0.0})

    monkeypatch.setattr(request_type, "sampling", forced)


def _thinking_chat(app: Any) -> Any:
    """The chat route's greedy answer in the thinking form (what the other routes must give)."""
    body = {"messages": HI, "max_tokens": 60, "temperature": 0, "guided_regex": THINKING}
    return _post(app, "/v1/chat/completions", body)


def test_responses_return_a_reasoning_item(app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same answer on the Responses route: a reasoning item, then the message; streamed,
    reasoning_text deltas at output 0 and output_text deltas at output 1."""
    from dist_runtime.server.responses import ResponsesRequest

    _force_thinking(monkeypatch, ResponsesRequest)
    chat = _thinking_chat(app)
    want = chat["choices"][0]["message"]
    ask = {"input": "Hi", "max_output_tokens": 60, "temperature": 0}
    r = _post(app, "/v1/responses", ask)
    reasoning, message = r["output"]
    assert reasoning["type"] == "reasoning" and message["type"] == "message"
    assert reasoning["content"] == [{"type": "reasoning_text", "text": want["reasoning_content"]}]
    assert message["content"][0]["text"] == want["content"]
    details = chat["usage"]["completion_tokens_details"]["reasoning_tokens"]
    assert r["usage"]["output_tokens_details"]["reasoning_tokens"] == details
    streamed = asyncio.run(_stream(app, "/v1/responses", {**ask, "stream": True}))
    events = [json.loads(e.split("data: ", 1)[1]) for e in streamed.split("\n\n")
              if "data: " in e]  # fmt: skip
    thought = [e for e in events if e["type"] == "response.reasoning_text.delta"]
    said = [e for e in events if e["type"] == "response.output_text.delta"]
    assert "".join(e["delta"] for e in thought) == want["reasoning_content"]
    assert "".join(e["delta"] for e in said) == want["content"]
    assert {e["output_index"] for e in thought} == {0} and {e["output_index"] for e in said} == {1}
    (done,) = [e for e in events if e["type"] == "response.completed"]
    assert [item["type"] for item in done["response"]["output"]] == ["reasoning", "message"]
    assert done["response"]["output"][0]["content"] == reasoning["content"]


def test_messages_return_a_thinking_block(app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """On Anthropic's route: a thinking block, then the text; streamed, thinking_delta pieces
    in block 0 (closed with its signature_delta) and text_delta pieces in block 1."""
    from dist_runtime.server.anthropic import MessagesRequest

    _force_thinking(monkeypatch, MessagesRequest)
    want = _thinking_chat(app)["choices"][0]["message"]
    ask = {"messages": HI, "max_tokens": 60}
    m = _post(app, "/v1/messages", ask)
    assert m["content"] == [
        {"type": "thinking", "thinking": want["reasoning_content"], "signature": ""},
        {"type": "text", "text": want["content"]},
    ]
    streamed = asyncio.run(_stream(app, "/v1/messages", {**ask, "stream": True}))
    events = [json.loads(e.split("data: ", 1)[1]) for e in streamed.split("\n\n")
              if "data: " in e]  # fmt: skip
    deltas = [e for e in events if e["type"] == "content_block_delta"]
    thought = "".join(e["delta"].get("thinking", "") for e in deltas if e["index"] == 0)
    text = "".join(e["delta"].get("text", "") for e in deltas if e["index"] == 1)
    assert thought == want["reasoning_content"] and text == want["content"]
    starts = [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"]
    stops = [e["index"] for e in events if e["type"] == "content_block_stop"]
    assert starts == ["thinking", "text"] and stops == [0, 1]


OPENED = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>"}]
"""A conversation whose prompt ends inside an opened `<think>` (the answer continues it)."""


def test_a_thinking_budget_closes_the_thinking_and_the_model_answers(
    app: Any, tiny_llama_dir: Path
) -> None:
    """vLLM's thinking_token_budget: the random model never closes its thinking by itself (all
    of its answer is reasoning); with a budget of 3 its thinking is those 3 tokens and the
    forced `</think>`, and the rest is the answer. Anthropic's thinking.budget_tokens gives the
    same, and `disabled` closes the thinking at once (budget 0)."""
    ask = {"messages": OPENED, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
           "continue_final_message": True, "add_generation_prompt": False,
           "return_token_ids": True}  # fmt: skip
    free = _post(app, "/v1/chat/completions", ask)
    assert free["choices"][0]["message"]["content"] == ""
    details = free["usage"]["completion_tokens_details"]
    assert details["reasoning_tokens"] == 12
    out = _post(app, "/v1/chat/completions", {**ask, "thinking_token_budget": 3})
    message = out["choices"][0]["message"]
    assert message["content"] and "</think>" not in message["content"]
    tokenizer = Tokenizer.from_folder(tiny_llama_dir)
    assert tokenizer is not None
    end = tokenizer.encode("</think>", add_special_tokens=False)
    assert out["usage"]["completion_tokens_details"]["reasoning_tokens"] == 3 + len(end)
    first3 = tokenizer.decode(free["choices"][0]["token_ids"][:3])
    assert message["reasoning_content"] == first3
    claude = {"messages": OPENED, "max_tokens": 12, "temperature": 0}
    m = _post(app, "/v1/messages", {**claude, "thinking": {"type": "enabled", "budget_tokens": 3}})
    assert [b["type"] for b in m["content"]] == ["thinking", "text"]
    assert m["content"][0]["thinking"] == first3
    off = _post(app, "/v1/messages", {**claude, "thinking": {"type": "disabled"}})
    none = _post(app, "/v1/chat/completions", {**ask, "thinking_token_budget": 0})
    assert none["usage"]["completion_tokens_details"]["reasoning_tokens"] == len(end)
    assert off["content"][-1] == {
        "type": "text", "text": none["choices"][0]["message"]["content"]
    }  # fmt: skip
