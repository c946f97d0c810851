"""Chat prompts: InternLM2's ChatML fallback (text and token ids) and Jinja chat templates
rendered like HF `apply_chat_template`, in a sandbox."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from jinja2.exceptions import SecurityError, TemplateError

from dist_runtime.text.chat import (
    ChatMessage,
    ChatTemplateError,
    build_chat_prompt,
    encode_chat,
    history_to_messages,
    internlm2_chat_prompt,
    render_chat_template,
)
from dist_runtime.text.tokenizer import Tokenizer
from tests.dist_runtime.test_tokenizer import BOS, LAYOUTS, write_sentencepiece_folder

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
INTERNLM2_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""The `chat_template` of InternLM2-chat's tokenizer_config.json."""

SYSTEM = "You are InternLM, a helpful assistant."
HISTORY = [("Hi there!", "Hello! How can I help?"), ("What is 2+2?", "2+2 = 4.")]
QUERY = "And in 中文, with an emoji 😀?"
EXPECTED_INTERNLM2 = (
    "<s><|im_start|>system\nYou are InternLM, a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nHi there!<|im_end|>\n"
    "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n2+2 = 4.<|im_end|>\n"
    "<|im_start|>user\nAnd in 中文, with an emoji 😀?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="module", params=LAYOUTS)
def sp_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sentencepiece_folder(tmp_path_factory.mktemp(request.param), request.param)


def _json_folder(src: Path, dst: Path, **config: Any) -> Path:
    """A copy of `src`'s tokenizer.json folder with tokenizer_config.json entries changed."""
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    (dst / "tokenizer_config.json").write_text(json.dumps({**cfg, **config}), encoding="utf-8")
    return dst


def _messages() -> list[ChatMessage]:
    return history_to_messages(QUERY, HISTORY, system=SYSTEM)


# -- InternLM2 ChatML -------------------------------------------------------------------------
def test_history_to_messages() -> None:
    msgs = _messages()
    assert [m.role for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert [m.content for m in msgs] == [SYSTEM, *HISTORY[0], *HISTORY[1], QUERY]
    assert history_to_messages("q") == [ChatMessage("user", "q")]
    with pytest.raises(ValueError, match="history\\[0\\]"):
        history_to_messages("q", [("only the user",)])  # type: ignore[list-item]


def test_internlm2_prompt_text(sp_folder: Path) -> None:
    assert build_chat_prompt(sp_folder, _messages()) == EXPECTED_INTERNLM2
    assert internlm2_chat_prompt(_messages()) == EXPECTED_INTERNLM2
    assert build_chat_prompt(Tokenizer(sp_folder), _messages()) == EXPECTED_INTERNLM2
    no_gen = build_chat_prompt(sp_folder, _messages(), add_generation_prompt=False)
    assert no_gen == EXPECTED_INTERNLM2.removesuffix("<|im_start|>assistant\n")
    # the real InternLM2 template renders the same text
    assert build_chat_prompt(
        {"chat_template": INTERNLM2_TEMPLATE, "bos_token": "<s>"}, _messages()
    ) == (EXPECTED_INTERNLM2)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("add_bos_token", [True, False])
def test_internlm2_prompt_token_ids(tmp_path: Path, layout: str, add_bos_token: bool) -> None:
    """encode_chat == ids built by hand from sentencepiece: one BOS, specials single ids."""
    import sentencepiece as spm

    folder = write_sentencepiece_folder(tmp_path, layout, add_bos_token=add_bos_token)
    tok = Tokenizer(folder)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert im_start is not None and im_end is not None

    expected = [BOS]
    turns = [("system", SYSTEM), ("user", HISTORY[0][0]), ("assistant", HISTORY[0][1])]
    turns += [("user", HISTORY[1][0]), ("assistant", HISTORY[1][1]), ("user", QUERY)]
    for role, content in turns:
        expected += [im_start, *sp.encode(f"{role}\n{content}"), im_end, *sp.encode("\n")]
    expected += [im_start, *sp.encode("assistant\n")]

    ids = encode_chat(tok, _messages())
    assert ids == expected
    assert ids.count(BOS) == 1 and ids.count(im_start) == 7 and ids.count(im_end) == 6
    assert tok.decode(ids, skip_special_tokens=False) == EXPECTED_INTERNLM2


def test_internlm2_prompt_without_tokenizer_config(tmp_path: Path) -> None:
    """BOS comes from the sentencepiece model; the text's <s> is the only BOS."""
    sp_only = tmp_path / "sp-only"
    sp_only.mkdir()
    src = write_sentencepiece_folder(tmp_path / "src", "internlm2")
    (sp_only / "tokenizer.model").write_bytes((src / "tokenizer.model").read_bytes())
    tok = Tokenizer(sp_only)
    msgs = [ChatMessage("user", "hi")]
    assert (
        build_chat_prompt(tok, msgs) == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert build_chat_prompt({}, msgs) == build_chat_prompt(tok, msgs)
    ids = encode_chat(tok, msgs)
    assert ids[0] == BOS and ids.count(BOS) == 1
    assert build_chat_prompt({"bos_token": None}, msgs).startswith("<|im_start|>user")


# -- Jinja chat templates -----------------------------------------------------------------------
def _hf_render(folder: Path, messages: list[dict[str, str]], **kw: Any) -> Any:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(folder))
    return hf.apply_chat_template(messages, **kw)


CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 😀"}],
    [m.to_dict() for m in history_to_messages("Next?", HISTORY)],
]


@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_jinja_template_matches_hf(
    tiny_llama_dir: Path, tmp_path: Path, chat: list[dict[str, str]], add_generation_prompt: bool
) -> None:
    folder = _json_folder(tiny_llama_dir, tmp_path, chat_template=SMOLLM2_TEMPLATE)
    text = build_chat_prompt(folder, chat, add_generation_prompt=add_generation_prompt)
    hf = _hf_render(folder, chat, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert text == hf
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt
    # the template has no BOS; the tokenizer adds its one (HF's apply_chat_template adds none)
    tok = Tokenizer(folder)
    ids = encode_chat(tok, chat, add_generation_prompt)
    assert ids[0] == tok.bos_token_id == 0 and ids.count(0) == 1
    hf_ids = _hf_render(
        folder, chat, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
    )
    assert ids[1:] == list(hf_ids)


def test_jinja_template_with_bos_gets_one_bos(tiny_llama_dir: Path, tmp_path: Path) -> None:
    folder = _json_folder(tiny_llama_dir, tmp_path, chat_template=INTERNLM2_TEMPLATE)
    tok = Tokenizer(folder)
    assert tok.add_bos
    ids = encode_chat(tok, _messages())
    assert ids[0] == tok.bos_token_id == 0 and ids.count(0) == 1
    hf = _hf_render(folder, [m.to_dict() for m in _messages()], add_generation_prompt=True)
    assert ids == list(hf["input_ids"])
    assert build_chat_prompt(folder, _messages()) == EXPECTED_INTERNLM2


def test_template_sources(tiny_llama_dir: Path, tmp_path: Path) -> None:
    named = [
        {"name": "tool_use", "template": "TOOLS{{ messages[0]['content'] }}"},
        {"name": "default", "template": "DEFAULT{{ messages[0]['content'] }}"},
    ]
    msgs = [ChatMessage("user", "x")]
    folder = _json_folder(tiny_llama_dir, tmp_path / "named", chat_template=named)
    assert build_chat_prompt(folder, msgs) == "DEFAULTx"
    assert build_chat_prompt(folder / "tokenizer_config.json", msgs) == "DEFAULTx"
    assert build_chat_prompt({"chat_template": named}, msgs) == "DEFAULTx"
    with pytest.raises(ValueError, match="default"):
        build_chat_prompt({"chat_template": named[:1]}, msgs)
    # chat_template.jinja (newer save_pretrained) wins over tokenizer_config.json, as in HF
    (folder / "chat_template.jinja").write_text(SMOLLM2_TEMPLATE, encoding="utf-8")
    chat = [m.to_dict() for m in msgs]
    text = build_chat_prompt(folder, msgs)
    assert text == _hf_render(folder, chat, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system")


def test_template_context() -> None:
    template = (
        "{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}|{{ tools is none }}|"
        "{{ messages | tojson }}|{% set ns = namespace(n=0) %}{% for m in messages %}"
        "{% set ns.n = ns.n + 1 %}{% if ns.n > 1 %}{% break %}{% endif %}{% endfor %}{{ ns.n }}|"
        "{% generation %}gen{% endgeneration %}"
    )
    cfg = {"chat_template": template, "bos_token": {"content": "<s>"}, "eos_token": "</s>"}
    msgs = [ChatMessage("user", "é"), ChatMessage("assistant", "ok")]
    assert build_chat_prompt(cfg, msgs, add_generation_prompt=False) == (
        '<s>|</s>|False|True|[{"role": "user", "content": "é"}, '
        '{"role": "assistant", "content": "ok"}]|2|gen'
    )


# -- validation and the sandbox --------------------------------------------------------------------
@pytest.mark.parametrize("role", ["System", "", "function", "bot"])
def test_bad_role(role: str) -> None:
    with pytest.raises(ValueError, match=repr(role)):
        ChatMessage(role, "hi")
    with pytest.raises(ValueError, match=repr(role)):
        build_chat_prompt({}, [{"role": role, "content": "hi"}])


def test_bad_messages() -> None:
    with pytest.raises(ValueError, match="str"):
        ChatMessage("user", None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'role' and 'content'"):
        build_chat_prompt({}, [{"content": "hi"}])
    with pytest.raises(ValueError, match="list of chat messages"):
        build_chat_prompt({}, "hi")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not exist"):
        build_chat_prompt("/nonexistent/folder", [ChatMessage("user", "hi")])


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__ }}",
        "{{ raise_exception.__globals__ }}",
        "{{ messages.append({'role': 'user', 'content': 'x'}) }}",
        "{% set ns = namespace() %}{% set ns.__dict__ = 1 %}",
    ],
)
def test_sandbox_blocks_attribute_tricks(template: str) -> None:
    with pytest.raises(ValueError, match="sandbox") as e:
        build_chat_prompt({"chat_template": template}, [ChatMessage("user", "hi")])
    assert isinstance(e.value.__cause__, SecurityError)


def test_template_errors_are_value_errors() -> None:
    raising = (
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('need a system') }}{% endif %}"
    )
    with pytest.raises(ValueError, match="need a system") as e:
        build_chat_prompt({"chat_template": raising}, [ChatMessage("user", "hi")])
    assert isinstance(e.value.__cause__, TemplateError)
    with pytest.raises(ValueError, match="does not parse"):
        render_chat_template("{% for %}", [ChatMessage("user", "hi")])
    with pytest.raises(ValueError, match="TypeError"):
        render_chat_template("{{ 'a' + 1 }}", [ChatMessage("user", "hi")])


# -- continuing the assistant's last message -------------------------------------------------
STRIPPING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""A template that strips contents: the continued text ends where the stripped one does."""


@pytest.mark.parametrize("template", [SMOLLM2_TEMPLATE, INTERNLM2_TEMPLATE, STRIPPING_TEMPLATE])
@pytest.mark.parametrize("prefix", ["The pier is", '  {"name": ', "Yes. "])
def test_continue_final_message_matches_hf(
    tiny_llama_dir: Path, tmp_path: Path, template: str, prefix: str
) -> None:
    folder = _json_folder(tiny_llama_dir, tmp_path, chat_template=template)
    chat = [{"role": "user", "content": "Where?"}, {"role": "assistant", "content": prefix}]
    text = build_chat_prompt(folder, chat, continue_final_message=True)
    hf = _hf_render(folder, chat, tokenize=False, continue_final_message=True)
    assert text == hf
    assert text.endswith((prefix.lstrip(), prefix.strip()))  # as written, or as the template
    assert "<|im_end|>" not in text[-len(prefix) - 12 :]  # writes it: no end of turn after


def test_continue_final_message_in_internlm2_chatml(sp_folder: Path) -> None:
    chat = [{"role": "user", "content": "Where?"}, {"role": "assistant", "content": "At the "}]
    text = build_chat_prompt(Tokenizer(sp_folder), chat, continue_final_message=True)
    assert text == "<s><|im_start|>user\nWhere?<|im_end|>\n<|im_start|>assistant\nAt the "


@pytest.mark.parametrize(
    ("chat", "match"),
    [
        ([{"role": "user", "content": "Where?"}], "must be the assistant's, got 'user'"),
        ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "  "}], "is empty"),
    ],
)
def test_continue_final_message_needs_an_assistant_start(
    chat: list[dict[str, str]], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        build_chat_prompt({}, chat, continue_final_message=True)
    with pytest.raises(ChatTemplateError, match="rewrites the last message"):
        build_chat_prompt(
            {"chat_template": "{% for m in messages %}{{ m.role }}: [redacted]\n{% endfor %}"},
            [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A secret"}],
            continue_final_message=True,
        )
