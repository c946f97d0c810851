"""Chat prompts: the folder's Jinja `chat_template`, else InternLM2's ChatML.

    from dist_runtime.text.chat import ChatMessage, encode_chat, history_to_messages
    messages = history_to_messages("And in French?", [("Hi", "Hello!")], system="Be brief.")
    ids = encode_chat(tokenizer, messages)  # exactly one BOS, special tokens as single ids

Templates are rendered as HF `apply_chat_template` renders them (jinja2's immutable sandbox,
`trim_blocks`, `lstrip_blocks`, `raise_exception`, HF's `tojson`, `strftime_now`, `namespace`,
`loopcontrols` and the `{% generation %}` tag), except that reaching for an unsafe attribute
(`''.__class__`) is an error here, where HF renders it as an empty string. Every template
failure is a `ChatTemplateError` (a `ValueError`) whose `__cause__` is the jinja2 error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dist_runtime.text.tokenizer import (
    IM_END,
    TOKENIZER_CONFIG,
    Tokenizer,
    read_tokenizer_config,
    token_content,
)

if TYPE_CHECKING:
    import jinja2

ROLES = ("system", "user", "assistant", "environment", "tool")
"""InternLM2's roles (`environment` carries tool and interpreter results), and `tool`: a tool's
result for templates that take one (HF's convention, with `tool_call_id` / `name`)."""
CHAT_TEMPLATE_FILE = "chat_template.jinja"
"""Where newer `save_pretrained` writes the template; it wins over tokenizer_config.json."""
DEFAULT_BOS = "<s>"
IM_START = "<|im_start|>"
INTERNLM2_META_INSTRUCTION = (
    "You are an AI assistant whose name is InternLM (书生·浦语).\n"
    "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI "
    "Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by "
    "the user such as English and 中文."
)
"""The system prompt InternLM2's `model.chat` uses by default (pass it as `system`)."""


class ChatTemplateError(ValueError):
    """A chat template that does not parse, fails to render, or trips the sandbox."""


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"chat message role {self.role!r} is not one of {list(ROLES)}")
        if not isinstance(self.content, str):
            raise ValueError(
                f"content of the {self.role} message must be a str, got "
                f"{type(self.content).__name__}"
            )

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


MessageLike = ChatMessage | Mapping[str, Any]


def history_to_messages(
    query: str,
    history: Sequence[tuple[str, str]] = (),
    system: str | None = None,
) -> list[ChatMessage]:
    """Messages for HF's `model.chat(tokenizer, query, history, meta_instruction=system)`:
    the optional system message, each (user, assistant) turn of `history`, then `query`."""
    messages = [ChatMessage("system", system)] if system else []
    for i, turn in enumerate(history):
        if not isinstance(turn, (tuple, list)) or len(turn) != 2:
            raise ValueError(f"history[{i}] must be a (user, assistant) pair, got {turn!r:.80}")
        messages += [ChatMessage("user", turn[0]), ChatMessage("assistant", turn[1])]
    messages.append(ChatMessage("user", query))
    return messages


def build_chat_prompt(
    tokenizer_folder_or_config: str | os.PathLike[str] | Mapping[str, Any] | Tokenizer,
    messages: Sequence[MessageLike],
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    continue_final_message: bool = False,
    template_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """The prompt text for `messages`.

    `tokenizer_folder_or_config` is a model folder (its `chat_template.jinja` or the
    `chat_template` of its `tokenizer_config.json`), a loaded `tokenizer_config.json` dict,
    or a `Tokenizer`. Without a template, InternLM2's ChatML is used:
    `<s><|im_start|>{role}\\n{content}<|im_end|>\\n...<|im_start|>assistant\\n`.
    `tools` (OpenAI's `{"type": "function", "function": {...}}` entries) go to a template as
    its `tools`, as HF's `apply_chat_template(tools=...)` passes them.
    `continue_final_message` (as HF's): the last message, the assistant's, is the start of
    the answer: the prompt ends right after its content, so the model continues it.
    `template_kwargs` are more variables for the template (vLLM's `chat_template_kwargs`,
    e.g. `{"enable_thinking": false}`); they may not replace the ones set here.
    """
    special_tokens, template = _load_template(tokenizer_folder_or_config)
    dicts = _message_dicts(messages)
    if continue_final_message:
        check_continuable(dicts)
        add_generation_prompt = False
    if template is None:
        bos = special_tokens.get("bos_token")
        text = internlm2_chat_prompt(dicts, add_generation_prompt, bos_token=bos)
    else:
        context = {"tools": tools, **special_tokens}
        taken = sorted(set(template_kwargs or {}) & {*context, "messages", "add_generation_prompt"})
        if taken:
            raise ValueError(
                f"chat_template_kwargs may not set {taken}: the prompt's own variables"
            )
        text = render_chat_template(
            template,
            dicts,
            add_generation_prompt=add_generation_prompt,
            **{**(template_kwargs or {}), **context},
        )
    return cut_after_final_message(text, dicts[-1]["content"]) if continue_final_message else text


def check_continuable(dicts: list[dict[str, Any]]) -> None:
    """The messages end with a non-empty assistant message, for continue_final_message."""
    if not dicts or dicts[-1]["role"] != "assistant":
        role = dicts[-1]["role"] if dicts else None
        raise ValueError(
            "continue_final_message continues the assistant's last message: the last message "
            f"must be the assistant's, got {role!r}"
        )
    if not dicts[-1]["content"].strip():
        raise ValueError(
            "continue_final_message needs the assistant's last message to start the answer; "
            "it is empty (leave the message out and ask for a generation prompt instead)"
        )


def cut_after_final_message(rendered: str, final: str) -> str:
    """A rendered chat cut right after the final message's content (HF's rule: its text as
    written, or stripped where the template strips it), dropping its end-of-turn markup."""
    stripped = final.strip()
    at = rendered.rfind(stripped)
    if at < 0:
        raise ChatTemplateError(
            "continue_final_message: the chat template rewrites the last message, so its text "
            "does not appear in the prompt and cannot be continued"
        )
    kept = final.lstrip()
    if rendered[at : at + len(kept)] == kept:
        return rendered[: at + len(kept)]
    return rendered[: at + len(stripped)]


def encode_chat(
    tokenizer: Tokenizer,
    messages: Sequence[MessageLike],
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    suffix: str = "",
    continue_final_message: bool = False,
    template_kwargs: Mapping[str, Any] | None = None,
) -> list[int]:
    """Token ids of the chat prompt (then `suffix`, the answer's forced start), with exactly
    one BOS where the model uses one.

    A prompt whose text starts with the BOS string (InternLM2's ChatML, `{{ bos_token }}`
    templates) is encoded without adding another; otherwise the tokenizer adds BOS per its
    `add_bos_token`.
    """
    text = build_chat_prompt(
        tokenizer, messages, add_generation_prompt, tools, continue_final_message, template_kwargs
    )
    text += suffix
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def internlm2_chat_prompt(
    messages: Sequence[MessageLike],
    add_generation_prompt: bool = True,
    bos_token: str | None = DEFAULT_BOS,
) -> str:
    """InternLM2's ChatML, as its `model.chat` / `build_inputs` writes it. A message with a
    `name` (InternLM2's agent turns: `{"role": "system", "name": "<|plugin|>", ...}`) opens
    with `<|im_start|>{role} name={name}`."""
    parts = [bos_token or ""]
    for message in _message_dicts(messages):
        name = message.get("name")
        role = f"{message['role']} name={name}" if name else message["role"]
        parts.append(f"{IM_START}{role}\n{message['content']}{IM_END}\n")
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


def chat_template(tokenizer_folder_or_config: object) -> str | None:
    """The chat template `build_chat_prompt` renders (None: InternLM2's ChatML)."""
    return _load_template(tokenizer_folder_or_config)[1]


def template_variables(template: str) -> set[str]:
    """The variables a template reads from its context (`messages`, `tools`, ...)."""
    import jinja2.meta

    try:
        return set(jinja2.meta.find_undeclared_variables(_environment().parse(template)))
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not parse (line {e.lineno}): {e}") from e


def render_chat_template(
    template: str,
    messages: Sequence[MessageLike],
    add_generation_prompt: bool = True,
    **context: Any,
) -> str:
    """Render a Jinja chat template in the sandbox (see the module docstring)."""
    import jinja2

    dicts = _message_dicts(messages)
    try:
        compiled = _compile(template)
        context = {"tools": None, "documents": None, **context}
        return compiled.render(
            messages=dicts, add_generation_prompt=add_generation_prompt, **context
        )
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"chat template blocked by the jinja2 sandbox: {e}") from e
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not parse (line {e.lineno}): {e}") from e
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template raised an error: {e}") from e
    except Exception as e:  # a template's own bug, e.g. `'a' + 1`
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e


# -- internals --------------------------------------------------------------------------------
def _message_dicts(messages: Sequence[MessageLike]) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes, Mapping, ChatMessage)) or not isinstance(
        messages, Sequence
    ):
        raise ValueError(f"messages must be a list of chat messages, got {messages!r:.80}")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if isinstance(message, ChatMessage):
            out.append(message.to_dict())
        elif isinstance(message, Mapping):
            if "role" not in message or "content" not in message:
                raise ValueError(f"messages[{i}] needs 'role' and 'content' keys: {message!r:.80}")
            ChatMessage(message["role"], message["content"])  # validates
            out.append(dict(message))
        else:
            raise ValueError(
                f"messages[{i}] must be a ChatMessage or a dict, got {type(message).__name__}"
            )
    return out


def _load_template(source: object) -> tuple[dict[str, str], str | None]:
    """(named special tokens, chat template or None) from a folder, a config or a Tokenizer.

    The special tokens are the Tokenizer's (its sentencepiece defaults included), else the
    config's; a config that does not mention `bos_token` gets InternLM2's `<s>`.
    """
    folder: Path | None = None
    if isinstance(source, Tokenizer):
        config: Mapping[str, Any] = source.config
        folder = source.folder
        special_tokens = source.special_tokens_map
        if source.chat_template is not None:
            return special_tokens, source.chat_template
    elif isinstance(source, Mapping):
        config = source
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_file():
            config = _read_json(path)
        elif path.is_dir():
            folder = path
            config = read_tokenizer_config(path)
        else:
            raise ValueError(f"tokenizer folder {path} does not exist")
    else:
        raise TypeError(
            "build_chat_prompt needs a folder, a tokenizer_config dict or a Tokenizer, got "
            f"{type(source).__name__}"
        )
    if not isinstance(source, Tokenizer):
        special_tokens = _special_tokens(config)
        if "bos_token" not in config:
            special_tokens["bos_token"] = DEFAULT_BOS
    if folder is not None and (folder / CHAT_TEMPLATE_FILE).is_file():
        return special_tokens, (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    return special_tokens, _pick_template(config.get("chat_template"))


def _pick_template(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, Mapping):
        templates = dict(value)
    elif isinstance(value, list):
        templates = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
    else:
        raise ChatTemplateError(f"chat_template must be a string or a list, got {value!r:.80}")
    if "default" not in templates:
        raise ChatTemplateError(
            f"{TOKENIZER_CONFIG} has chat templates {sorted(map(str, templates))} but none "
            "named 'default'"
        )
    template = templates["default"]
    if not isinstance(template, str):
        raise ChatTemplateError(f"the 'default' chat template is not a string: {template!r:.80}")
    return template


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a JSON object")
    return data


def _special_tokens(config: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        token = token_content(config.get(key))
        if token is not None:
            out[key] = token
    return out


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    return _environment().from_string(template)


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.exceptions import SecurityError, TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class StrictSandbox(ImmutableSandboxedEnvironment):
        """Raise on unsafe attribute access instead of rendering an empty Undefined."""

        def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
            raise SecurityError(
                f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
            )

    class GenerationTag(jinja2.ext.Extension):
        """HF's `{% generation %}...{% endgeneration %}` (marks assistant text): the body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> jinja2.nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_render")
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return str(caller())

    class TemplateNamespace(jinja2.utils.Namespace):
        """`namespace()` that refuses underscore names (as HF's)."""

        def __init__(*args: Any, **kwargs: Any) -> None:
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                _check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            _check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat templates cannot set namespace attribute {name!r}")

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    def make_dict(*args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    env = StrictSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals.update(
        raise_exception=raise_exception,
        strftime_now=strftime_now,
        namespace=TemplateNamespace,
        dict=make_dict,
    )
    return env
