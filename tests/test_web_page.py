"""The chat page in a real browser: headless Chromium (Debian's package) driven by Playwright.

It opens `/` on a server with the demo model, sends a chat message and watches the streamed
answer appear, then pastes a document, asks two questions and reads both answers. Screenshots
go to the test's temporary folder (and to $DIST_RUNTIME_SCREENSHOTS when set).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_server import Server

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package")

ADAPTER = "demo-lora"
"""A random LoRA adapter the page's server also serves: the page offers a choice of model."""
DOC = (
    "Harbour report. The lighthouse keeper is Ada Brennan. The ferry leaves pier 4 at "
    "seven o'clock every morning. The harbour master is Tom Reyes."
)


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from dist_runtime.formats.demo_model import demo_model_path
    from dist_runtime.formats.lora_adapter import write_random_adapter

    tmp = tmp_path_factory.mktemp("page")
    adapter = write_random_adapter(tmp / "adapter", demo_model_path(), std=0.02, seed=3)
    s = Server(
        demo_model_path(), tmp, "--session-len", "2048", "--lora-modules", f"{ADAPTER}={adapter}"
    )
    yield s
    s.close()


@pytest.fixture
def page(demo_server: Server) -> Iterator[Any]:
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        tab = browser.new_page(viewport={"width": 1280, "height": 760})
        tab.goto(demo_server.url + "/")
        yield tab
        browser.close()


def _shot(page: Any, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / name))
    target = os.environ.get("DIST_RUNTIME_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / name, Path(target) / name)


def test_chat_streams_and_documents_get_answers(page: Any, tmp_path: Path) -> None:
    expect = sync_api.expect
    expect(page.locator("#model")).to_contain_text("2048 tokens")
    page.fill("#max-tokens", "24")
    page.fill("#prompt", "What is the capital of France?")
    page.click("#send")
    expect(page.locator(".msg.user")).to_have_text("What is the capital of France?")
    answer = page.locator(".msg.assistant").first
    expect(answer).not_to_be_empty(timeout=60_000)
    expect(page.locator("#send")).to_be_enabled(timeout=60_000)  # the stream ended
    assert "Paris" in answer.inner_text()
    _shot(page, tmp_path, "page_chat.png")

    page.fill("#document", DOC)
    page.fill("#questions", "Who is the lighthouse keeper?\nWhen does the ferry leave?")
    page.click("#ask")
    expect(page.locator(".qa")).to_have_count(2, timeout=120_000)
    answers = page.locator(".qa .a").all_inner_texts()
    assert "Ada" in answers[0], answers
    assert "seven" in answers[1].lower() or "7" in answers[1], answers
    expect(page.locator("#job-state")).to_contain_text("done")
    _shot(page, tmp_path, "page_document.png")


def test_system_prompt_and_answer_stats(page: Any, tmp_path: Path) -> None:
    """A system prompt goes first in the messages sent; under each answer a line gives its
    tokens, the time to its first token and its tokens per second (from the stream's usage)."""
    expect = sync_api.expect
    sent: list[Any] = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data))
            if r.url.endswith("/v1/chat/completions") else None)  # fmt: skip
    page.fill("#max-tokens", "12")
    page.fill("#system", "Answer in one short sentence.")
    page.fill("#prompt", "What is the capital of France?")
    page.click("#send")
    expect(page.locator("#send")).to_be_enabled(timeout=60_000)
    stats = page.locator(".stats").first
    expect(stats).to_have_text(re.compile(r"^\d+ tokens? · first token \d+\.\d\d s"))
    assert re.search(r"· \d+\.\d tokens/s$", stats.inner_text()), stats.inner_text()
    assert sent[0]["messages"] == [
        {"role": "system", "content": "Answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    assert sent[0]["stream_options"] == {"include_usage": True}
    assert "tokens" not in page.locator(".msg.assistant").first.inner_text()  # beside it
    _shot(page, tmp_path, "page_stats.png")


def test_document_size_and_a_cancelled_job(page: Any, demo_server: Server) -> None:
    """The document's token count against the context shows once typing pauses (too long in
    red); Cancel stops a running job (DELETE /v1/jobs/{id}) and the page says so."""
    expect = sync_api.expect
    page.fill("#document", DOC)
    expect(page.locator("#doc-size")).to_have_text(
        re.compile(r"^document: \d+ tokens of 2,048$"), timeout=30_000
    )
    page.fill("#document", DOC * 80)
    expect(page.locator("#doc-size")).to_contain_text("(too long)", timeout=30_000)
    assert "error" in (page.locator("#doc-size").get_attribute("class") or "")
    page.fill("#document", DOC)
    page.fill("#max-tokens", "400")
    page.fill("#questions", "\n".join(f"Tell the story of question {i}." for i in range(12)))
    page.click("#ask")
    expect(page.locator("#job-state")).to_contain_text("running", timeout=60_000)
    page.click("#cancel")
    expect(page.locator("#job-state")).to_have_text("cancelled", timeout=60_000)
    expect(page.locator("#ask")).to_be_enabled()
    expect(page.locator("#cancel")).to_be_disabled()
    assert page.locator(".qa").count() == 0
    jobs = demo_server.request("GET", "/v1/jobs")[1]["data"]
    (job,) = [j for j in jobs if j["num_questions"] == 12]
    assert job["state"] == "cancelled", job


def test_a_long_prefill_shows_its_pace_and_the_time_left(page: Any, tmp_path: Path) -> None:
    """A job's prefill shows its tokens per second and the time left at that pace, as the
    page measures it between its polls (the job is served by the browser's routes: 1,000
    tokens of a 1,048,576-token prefill more at each poll, about 3 per second)."""
    expect = sync_api.expect
    polls = [0]

    def job(route: Any) -> None:
        if route.request.method == "POST":
            body = {"id": "job-1", "state": "queued", "prefill_tokens_done": 0,
                    "prefill_tokens_total": 1_048_576, "tokens_generated": 0}  # fmt: skip
        else:
            polls[0] += 1
            body = {"id": "job-1", "state": "running", "prefill_tokens_done": 1000 * polls[0],
                    "prefill_tokens_total": 1_048_576, "tokens_generated": 0}  # fmt: skip
        route.fulfill(status=200, content_type="application/json", body=json.dumps(body))

    page.route("**/v1/jobs*", job)
    page.route("**/v1/jobs/job-1", job)
    page.fill("#document", DOC)
    page.fill("#questions", "Who keeps the lighthouse?")
    page.click("#ask")
    state = page.locator("#job-state")
    expect(state).to_contain_text("tokens/s", timeout=30_000)
    text = state.inner_text()
    found = re.search(r"/ 1,048,576 tokens · ([\d,]+) tokens/s · about (\d+) (min|h)", text)
    assert found, text
    rate = int(found.group(1).replace(",", ""))
    assert 1000 < rate < 6000, text  # 1,000 tokens a poll, a poll every 0.3 s or a little more
    _shot(page, tmp_path, "page_pace.png")
    page.click("#cancel")


def test_stop_button_aborts_the_stream(page: Any, demo_server: Server) -> None:
    expect = sync_api.expect
    page.fill("#max-tokens", "400")
    page.fill("#prompt", "Write a very long story about the sea.")
    page.click("#send")
    expect(page.locator(".msg.assistant").first).not_to_be_empty(timeout=60_000)
    page.click("#stop")
    expect(page.locator("#send")).to_be_enabled()
    deadline = time.monotonic() + 30
    while demo_server.metric("num_requests_running") != 0:  # the server saw the disconnect
        assert time.monotonic() < deadline, "the stopped stream kept running"
        time.sleep(0.1)
    text = page.locator(".msg.assistant").first.inner_text()
    time.sleep(0.5)
    assert page.locator(".msg.assistant").first.inner_text() == text  # nothing more arrives


def test_json_answers(page: Any, tmp_path: Path) -> None:
    """ "answers: JSON" sends response_format json_object: the reply is a JSON object."""
    expect = sync_api.expect
    page.fill("#max-tokens", "60")
    page.select_option("#format", "json_object")
    page.fill("#prompt", "What is the capital of France? Reply in JSON.")
    page.click("#send")
    expect(page.locator(".msg.assistant").first).not_to_be_empty(timeout=60_000)
    expect(page.locator("#send")).to_be_enabled(timeout=60_000)
    reply = page.locator(".msg.assistant").first.inner_text()
    value = json.loads(reply)
    assert isinstance(value, dict) and "Paris" in reply, reply
    _shot(page, tmp_path, "page_json.png")


def test_model_choice_sends_the_adapter(page: Any, demo_server: Server, tmp_path: Path) -> None:
    """With a LoRA adapter loaded the header offers the models; a message sent with the adapter
    chosen gets the adapter's answer (the API's answer for that model, not the base model's)."""
    expect = sync_api.expect
    expect(page.locator("#model-choice")).to_be_visible()
    options = page.locator("#models option").all_inner_texts()
    assert options[1:] == [f"{ADAPTER} (adapter)"] and len(options) == 2, options
    page.fill("#max-tokens", "16")
    page.select_option("#models", ADAPTER)
    question = "Name a color."
    page.fill("#prompt", question)
    page.click("#send")
    expect(page.locator(".msg.assistant").first).not_to_be_empty(timeout=60_000)
    expect(page.locator("#send")).to_be_enabled(timeout=60_000)
    reply = page.locator(".msg.assistant").first.inner_text()
    _shot(page, tmp_path, "page_adapter.png")

    def answer(model: str) -> str:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 16,
            "temperature": 0,
            "response_format": {"type": "text"},
        }
        status, out = demo_server.request("POST", "/v1/chat/completions", body)
        assert status == 200, out
        assert out["model"] == model
        return str(out["choices"][0]["message"]["content"])

    base = demo_server.request("GET", "/v1/models")[1]["data"][0]["id"]
    assert reply == answer(ADAPTER).strip() != answer(base).strip()
    # this server was started without --enable-lora-loading: adapters stay as started
    body = {"lora_name": "x", "lora_path": "/tmp"}
    status, err = demo_server.request("POST", "/v1/load_lora_adapter", body)
    assert status == 403 and "--enable-lora-loading" in err["error"]["message"]


def test_a_reasoning_models_thinking_shows_folded(page: Any, tmp_path: Path) -> None:
    """With a reasoning parser the stream's reasoning_content pieces fill a Thinking section
    above the answer, folded once the answer starts; the history keeps the answer only. The
    stream is the server's format, served here by the browser's route (the demo model does
    not think)."""
    expect = sync_api.expect

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        body = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
        return f"data: {json.dumps(body)}\n\n"

    stream = "".join([
        chunk({"role": "assistant", "content": ""}),
        chunk({"reasoning_content": "The user greets me. "}),
        chunk({"reasoning_content": "I should greet back."}),
        ": keep-alive\n\n",
        chunk({"content": "Hello"}),
        chunk({"content": " there!"}, "stop"),
        "data: [DONE]\n\n",
    ])  # fmt: skip
    sent: list[Any] = []

    def reply(route: Any) -> None:
        sent.append(json.loads(route.request.post_data))
        route.fulfill(status=200, headers={"content-type": "text/event-stream"}, body=stream)

    page.route("**/v1/chat/completions", reply)
    page.fill("#prompt", "Hi!")
    page.click("#send")
    bubble = page.locator(".msg.assistant").last
    expect(bubble.locator(".answer")).to_have_text("Hello there!", timeout=30_000)
    thinking = bubble.locator("details.thinking")
    expect(thinking).to_have_count(1)
    assert thinking.get_attribute("open") is None  # folded once the answer started
    thinking.locator("summary").click()
    expect(thinking.locator("div")).to_have_text("The user greets me. I should greet back.")
    _shot(page, tmp_path, "page_thinking.png")
    page.fill("#prompt", "And now?")
    page.click("#send")
    expect(page.locator(".msg.assistant")).to_have_count(2, timeout=30_000)
    expect(page.locator("#send")).to_be_enabled(timeout=30_000)
    assert sent[1]["messages"][1] == {"role": "assistant", "content": "Hello there!"}


def test_answers_render_markdown_and_nothing_else(page: Any, tmp_path: Path) -> None:
    """A text answer's Markdown is rendered (bold, code, lists, a code block, an http link),
    while markup of its own stays text: an answer cannot put an element on the page."""
    expect = sync_api.expect
    answer = ("**Bold** and `a<b`\n\n- one\n- two *three*\n\n```python\n<b>x</b> = 2 * 3\n```\n"
              "<img src=x onerror=\"window.pwned=1\"> [docs](https://example.com/a?b=1&c=2) "
              "[bad](javascript:window.pwned=2)")  # fmt: skip
    choice = {"index": 0, "delta": {"content": answer}, "finish_reason": "stop"}
    body = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [choice]}  # fmt: skip
    stream = f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"content-type": "text/event-stream"}, body=stream))  # fmt: skip
    page.fill("#prompt", "Show me.")
    page.click("#send")
    shown = page.locator(".msg.assistant .answer").last
    expect(shown.locator("strong")).to_have_text("Bold", timeout=30_000)
    expect(shown.locator("p code")).to_have_text("a<b")
    expect(shown.locator("li")).to_have_text(["one", "two three"])
    expect(shown.locator("li em")).to_have_text("three")
    expect(shown.locator("pre code")).to_have_text("<b>x</b> = 2 * 3")
    expect(shown.locator("a")).to_have_count(1)
    assert shown.locator("a").get_attribute("href") == "https://example.com/a?b=1&c=2"
    assert shown.locator("img, b, script").count() == 0
    assert '<img src=x onerror="window.pwned=1">' in shown.inner_text()
    assert "[bad](javascript:window.pwned=2)" in shown.inner_text()
    assert page.evaluate("window.pwned") is None
    _shot(page, tmp_path, "page_markdown.png")


def test_a_narrow_window_puts_the_panels_one_above_the_other(page: Any, tmp_path: Path) -> None:
    chat, doc = page.locator("main > section").all()
    wide_chat, wide_doc = chat.bounding_box(), doc.bounding_box()
    assert wide_doc["x"] > wide_chat["x"] + wide_chat["width"] - 1  # side by side at 1280 px
    page.set_viewport_size({"width": 700, "height": 700})
    narrow_chat, narrow_doc = chat.bounding_box(), doc.bounding_box()
    assert narrow_doc["y"] >= narrow_chat["y"] + narrow_chat["height"] - 1
    assert narrow_chat["width"] > 600  # each the window's width
    send = page.locator("#send").bounding_box()
    assert send["x"] + send["width"] <= 700
    title = page.locator("header h1").bounding_box()
    assert title["height"] < 30  # one line
    _shot(page, tmp_path, "page_narrow.png")
