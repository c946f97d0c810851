"""`--chat-template` (RuntimeConfig.chat_template) replaces the model's template for every chat
prompt, and a chat request's `chat_template_kwargs` reach the template; through the server's
routes in process."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from dist_runtime import Runtime
from dist_runtime.formats.random_checkpoint import write_random_checkpoint
from dist_runtime.server.app import ServerSettings, create_app
from dist_runtime.server.batch_lines import call
from dist_runtime.server.tools import INTERNLM2_CALLS, tool_format_for
from dist_runtime.text.chat import ChatTemplateError, encode_chat
from dist_runtime.text.tokenizer import Tokenizer
from tests.conftest import TINY_SEED, TINY_SHAPES

TEMPLATE = (
    "{% for m in messages %}[{{ m.role }}]{{ m.content }}\n{% endfor %}"
    "{% if shout %}LOUD {% endif %}{% if add_generation_prompt %}[assistant]{% endif %}"
)
HI = [{"role": "user", "content": "Hi"}]


def _post(app: Any, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    status, raw = asyncio.run(call(app, path, json.dumps(body).encode()))
    return status, json.loads(raw)


@pytest.mark.parametrize("as_file", [True, False])
def test_a_given_template_writes_every_chat_prompt(
    as_file: bool, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    source = tmp_path / "chat.jinja"
    source.write_text(TEMPLATE)
    value = str(source) if as_file else TEMPLATE
    with Runtime(model=str(tiny_llama_dir), session_len=256, device="cpu", dtype="float32",
                 chat_template=value) as rt:  # fmt: skip
        tok = rt.tokenizer
        assert tok is not None and tok.chat_template == TEMPLATE
        want = tok.encode("[user]Hi\n[assistant]")
        assert encode_chat(tok, HI) == want
        app = create_app(rt, ServerSettings(served_model_name="m"))
        status, out = _post(app, "/tokenize", {"messages": HI})
        assert status == 200 and out["tokens"] == want
        loud = {"messages": HI, "chat_template_kwargs": {"shout": True}}
        status, out = _post(app, "/tokenize", loud)
        assert status == 200 and out["tokens"] == tok.encode("[user]Hi\nLOUD [assistant]")
        body = {"messages": HI, "max_tokens": 2, "temperature": 0,
                "chat_template_kwargs": {"shout": True}}  # fmt: skip
        status, out = _post(app, "/v1/chat/completions", body)
        assert status == 200 and out["usage"]["prompt_tokens"] == len(
            tok.encode("[user]Hi\nLOUD [assistant]")
        )
        status, out = _post(app, "/v1/chat/completions",
                            {**body, "chat_template_kwargs": {"messages": []}})  # fmt: skip
        assert status == 400 and "may not set ['messages']" in out["error"]["message"]


def test_a_template_that_does_not_parse_fails_at_start(tiny_llama_dir: Path) -> None:
    with pytest.raises(ChatTemplateError, match="does not parse"):
        Runtime(model=str(tiny_llama_dir), session_len=256, device="cpu",
                chat_template="{% if %}")  # fmt: skip


def test_a_given_template_is_not_overridden_by_internlm2_calls(tmp_path: Path) -> None:
    """With InternLM2's agent tokens the tool-call format is InternLM2's own prompt writer,
    unless a template was given: then the given template writes the prompts."""
    folder = write_random_checkpoint(
        tmp_path / "agent", architecture="internlm2", seed=TINY_SEED,
        extra_special_tokens=("<|plugin|>", "<|interpreter|>", "<|action_end|>",
                              "<|action_start|>"),
        **TINY_SHAPES,
    )  # fmt: skip
    tok = Tokenizer.from_folder(folder)
    assert tok is not None and tool_format_for(tok) is INTERNLM2_CALLS
    tok.chat_template = TEMPLATE
    assert tool_format_for(tok).name == "json"


DOC_TEMPLATE = (
    "{% for d in documents or [] %}<doc {{ d.title }}>{{ d.text }}</doc>\n{% endfor %}"
    "{% for m in messages %}[{{ m.role }}]{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def test_a_request_template_needs_the_flag_and_writes_that_prompt(tiny_llama_dir: Path) -> None:
    """vLLM's per-request chat_template: a 400 naming it unless the server trusts request
    templates; then it writes that request's prompt (and /tokenize's) and no other."""
    with Runtime(model=str(tiny_llama_dir), session_len=256, device="cpu",
                 dtype="float32") as rt:  # fmt: skip
        tok = rt.tokenizer
        assert tok is not None
        own = encode_chat(tok, HI)
        mine = {"messages": HI, "chat_template": TEMPLATE}
        closed = create_app(rt, ServerSettings(served_model_name="m"))
        status, out = _post(closed, "/tokenize", mine)
        assert status == 400 and out["error"]["param"] == "chat_template"
        assert "--trust-request-chat-template" in out["error"]["message"]
        app = create_app(
            rt, ServerSettings(served_model_name="m", trust_request_chat_template=True)
        )
        want = tok.encode("[user]Hi\n[assistant]")
        assert want != own
        status, out = _post(app, "/tokenize", mine)
        assert status == 200 and out["tokens"] == want
        body = {**mine, "max_tokens": 2, "temperature": 0}
        status, out = _post(app, "/v1/chat/completions", body)
        assert status == 200 and out["usage"]["prompt_tokens"] == len(want)
        status, out = _post(app, "/tokenize", {"messages": HI})  # the model's own again
        assert status == 200 and out["tokens"] == own and tok.chat_template is None
        for bad, says in (("{% if %}", "does not parse"), ("{{ raise_exception('no') }}", "no"),
                          ("{{ ''.__class__ }}", "sandbox")):  # fmt: skip
            status, out = _post(app, "/v1/chat/completions", {**body, "chat_template": bad})
            assert status == 400 and out["error"]["param"] == "chat_template", out
            assert says in out["error"]["message"]


def test_documents_reach_a_template_that_writes_them(tiny_llama_dir: Path) -> None:
    """vLLM's documents: the template's `documents`, for templates that write them; a 400
    naming `documents` where the template would drop them."""
    docs = [{"title": "tides", "text": "High water at noon."}, {"title": "b", "text": "x"}]
    with Runtime(model=str(tiny_llama_dir), session_len=256, device="cpu", dtype="float32",
                 chat_template=DOC_TEMPLATE) as rt:  # fmt: skip
        tok = rt.tokenizer
        assert tok is not None
        app = create_app(rt, ServerSettings(served_model_name="m"))
        text = "<doc tides>High water at noon.</doc>\n<doc b>x</doc>\n[user]Hi\n[assistant]"
        status, out = _post(app, "/tokenize", {"messages": HI, "documents": docs})
        assert status == 200 and out["tokens"] == tok.encode(text)
        body = {"messages": HI, "documents": docs, "max_tokens": 2, "temperature": 0}
        status, out = _post(app, "/v1/chat/completions", body)
        assert status == 200 and out["usage"]["prompt_tokens"] == len(tok.encode(text))
        both = {**body, "chat_template_kwargs": {"documents": docs}}
        status, out = _post(app, "/v1/chat/completions", both)
        assert status == 400 and out["error"]["param"] == "documents"
    with Runtime(model=str(tiny_llama_dir), session_len=256, device="cpu", dtype="float32",
                 chat_template=TEMPLATE) as rt:  # fmt: skip
        app = create_app(
            rt, ServerSettings(served_model_name="m", trust_request_chat_template=True)
        )
        status, out = _post(app, "/v1/chat/completions", body)
        assert status == 400 and out["error"]["param"] == "documents"
        assert "does not" in out["error"]["message"]
        status, out = _post(
            app,
            "/tokenize",  # the request's own template writes them
            {"messages": HI, "documents": docs, "chat_template": DOC_TEMPLATE},
        )
        assert status == 200 and out["tokens"] == rt.tokenizer.encode(text)  # type: ignore[union-attr]


def test_internlm2_prompts_take_a_request_template_but_not_documents(tmp_path: Path) -> None:
    """InternLM2's tool-call format writes ChatML itself: documents would be dropped there (a
    400); a request's template writes the prompt instead, but not with tools that template
    would write in another format than the server reads."""
    folder = write_random_checkpoint(
        tmp_path / "agent", architecture="internlm2", seed=TINY_SEED,
        extra_special_tokens=("<|plugin|>", "<|interpreter|>", "<|action_end|>",
                              "<|action_start|>"),
        **TINY_SHAPES,
    )  # fmt: skip
    with Runtime(model=str(folder), session_len=256, device="cpu", dtype="float32") as rt:
        tok = rt.tokenizer
        assert tok is not None
        app = create_app(
            rt, ServerSettings(served_model_name="m", trust_request_chat_template=True)
        )
        status, out = _post(app, "/tokenize", {"messages": HI, "documents": [{"text": "x"}]})
        assert status == 400 and out["error"]["param"] == "documents"
        status, out = _post(app, "/tokenize", {"messages": HI, "chat_template": TEMPLATE})
        assert status == 200 and out["tokens"] == tok.encode("[user]Hi\n[assistant]")
        with_tools = {"messages": HI, "chat_template": TEMPLATE, "tools": TOOLS}
        status, out = _post(app, "/tokenize", with_tools)
        assert status == 400 and out["error"]["param"] == "chat_template"
        assert "json format" in out["error"]["message"]


def test_reasoning_effort_reaches_the_template(tiny_llama_dir: Path) -> None:
    """OpenAI's reasoning_effort goes to the template as `reasoning_effort` (as vLLM passes
    it); chat_template_kwargs' own value wins."""
    effort = "{% for m in messages %}{{ m.content }}{% endfor %}|{{ reasoning_effort or '-' }}|"
    with Runtime(model=str(tiny_llama_dir), session_len=256, device="cpu", dtype="float32",
                 chat_template=effort) as rt:  # fmt: skip
        tok = rt.tokenizer
        assert tok is not None
        app = create_app(rt, ServerSettings(served_model_name="m"))
        body = {"messages": HI, "max_tokens": 1, "temperature": 0}
        for extra, text in (({}, "Hi|-|"), ({"reasoning_effort": "low"}, "Hi|low|"),
                            ({"reasoning_effort": "low",
                              "chat_template_kwargs": {"reasoning_effort": "very high"}},
                             "Hi|very high|")):  # fmt: skip
            status, out = _post(app, "/v1/chat/completions", {**body, **extra})
            assert status == 200 and out["usage"]["prompt_tokens"] == len(tok.encode(text))
        assert len({len(tok.encode(t)) for t in ("Hi|-|", "Hi|low|", "Hi|very high|")}) == 3
        # the Responses route's reasoning.effort, the same way; a summary is not made here
        ask = {"input": "Hi", "max_output_tokens": 1, "temperature": 0, "store": False}
        status, out = _post(app, "/v1/responses", {**ask, "reasoning": {"effort": "low"}})
        assert status == 200 and out["usage"]["input_tokens"] == len(tok.encode("Hi|low|"))
        assert out["reasoning"] == {"effort": "low", "summary": None}
        status, out = _post(app, "/v1/responses", ask)
        assert out["usage"]["input_tokens"] == len(tok.encode("Hi|-|")) and out["reasoning"] is None
        status, out = _post(app, "/v1/responses", {**ask, "reasoning": {"summary": "auto"}})
        assert status == 400 and out["error"]["param"] == "reasoning.summary"
