"""Per-request sampling parameters, validated on construction."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick tokens for one request.

    The default is greedy decoding (temperature 0), the same as passing no params at all to
    `generate`, `chat`, `ask` or `submit`: `SamplingParams(max_new_tokens=200)` only lengthens
    the answer. Random sampling happens only when you set `temperature` > 0 (then `top_k`,
    `top_p`, `min_p` and `seed` apply). The HTTP server follows the OpenAI API instead, whose
    omitted temperature means 1.
    """

    max_new_tokens: int = 64
    """Most tokens to generate. 0 only reads the prompt: its `prompt_logprobs` (scoring a
    text) and the prefix cache's blocks; nothing is generated and the request ends with
    finish_reason 'length'."""
    temperature: float = 0.0
    """Softmax temperature; 0 (the default) means greedy."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 disables)."""
    top_p: float = 1.0
    """Keep the smallest set whose probability reaches p (1 disables)."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the top token's probability (0 disables)."""
    repetition_penalty: float = 1.0
    """HF-style penalty on tokens already in the prompt or output (1 disables)."""
    presence_penalty: float = 0.0
    """OpenAI-style: subtracted from the logit of every token already generated (0 disables)."""
    frequency_penalty: float = 0.0
    """OpenAI-style: subtracted once per earlier occurrence in the output (0 disables)."""
    seed: int | None = None
    """Seed of this request's random stream; the same seed gives the same output."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra ids that end generation (the model's EOS ids always do unless ignore_eos). The
    token that ends a request stays in its token ids, not in its text."""
    stop: tuple[str, ...] = ()
    """Strings that end generation; the text is cut before the first one."""
    ignore_eos: bool = False
    """Keep generating past EOS until max_new_tokens."""
    min_tokens: int = 0
    """The answer's least length (vLLM's `min_tokens`, LMDeploy's `min_new_tokens`): before
    this many tokens, EOS and stop_token_ids are left out of sampling, and stop strings count
    only once they start in the text of the min_tokens-th token or later. 0: off."""
    logprobs: int | None = None
    """Return this many top log-probabilities per generated token (plus the chosen one)."""
    prompt_logprobs: int | None = None
    """Return the log-probability of every prompt token after the first (given the tokens
    before it) and this many top log-probabilities at each position; None: off. The request
    then computes its whole prompt (no prefix-cache hit), as in vLLM."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the decoded text."""
    json_schema: Any = None
    """Guided output: a JSON Schema (a dict, or its JSON text) the output must be a value of;
    every token is drawn from those that keep the output on the schema, and the request ends
    when the value is complete. Stored as the schema's JSON text. See
    `dist_runtime.text.json_grammar` for the keywords held (an unsupported one is a
    ValueError naming it)."""
    json_object: bool = False
    """Guided output: any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
    compact_json: bool = False
    """With json_schema or json_object: no whitespace outside strings (vLLM's
    `disable_any_whitespace`), so the answer is compact JSON."""
    guided_choice: tuple[str, ...] = ()
    """Guided output: the answer is exactly one of these strings (vLLM's `guided_choice`)."""
    guided_regex: str | None = None
    """Guided output: the answer matches this regular expression whole (vLLM's
    `guided_regex`; the syntax `dist_runtime.text.regex` holds)."""
    guided_grammar: str | None = None
    """Guided output: the answer is text that a GBNF grammar's `root` rule produces (vLLM's
    `guided_grammar`, llama.cpp's format; see `dist_runtime.text.gbnf`)."""
    logit_bias: Any = ()
    """OpenAI's logit bias: {token id: bias in [-100, 100]} added to the logits before
    sampling (-100 in effect bans a token, 100 forces it); stored as sorted (id, bias) pairs.
    Log-probabilities stay the model's own."""
    allowed_token_ids: Sequence[int] | None = None
    """vLLM's `allowed_token_ids`: every token is drawn from these ids only (the others'
    logits are set to -inf before sampling; log-probabilities stay the model's own). None:
    any token; stored sorted and without repeats."""
    bad_words: Sequence[str] = ()
    """vLLM's `bad_words`: words the answer does not write. Each word is tokenized without
    its leading spaces and with one leading space (inside a sentence); a form's last token is
    held back whenever the answer's tokens so far end with the ones before it (a one-token
    form is never drawn). The same text in other tokens is not caught. Needs a tokenizer."""
    priority: int = 0
    """Scheduling priority, lower first (vLLM's convention): waiting requests are admitted in
    priority order (first come, first served within one), and when KV blocks or sequence slots
    run out, the running request with the highest value (the latest admitted among equals) is
    preempted for a waiting one with a lower value. Preempted requests resume from the prefix
    cache where their blocks were not reused."""
    prediction: tuple[int, ...] = ()
    """Predicted output (OpenAI's `prediction`): token ids the answer is expected to mostly
    repeat, e.g. a document being edited. Decoding drafts from it (speculative decoding, even
    when the runtime's num_speculative_tokens is 0) and keeps what the model agrees with; the
    answer is the one decoding without it gives."""
    adapter: str | None = None
    """The LoRA adapter to answer with, by the name it was loaded under
    (`RuntimeConfig.lora_modules`, `--lora-modules NAME=DIR`); None: the base model. Requests
    of different adapters share a batch."""
    include_stop_str_in_output: bool = False
    """Keep the stop string that ended the answer at the end of its text (vLLM's)."""
    cache_salt: str | None = None
    """Prefix-cache isolation (vLLM's `cache_salt`): this request finds and leaves cached K/V
    only among requests with the same salt, so callers who do not share it cannot tell from
    its speed what others asked."""
    thinking_budget: int | None = None
    """A reasoning model's most thinking tokens (vLLM's `thinking_token_budget`): once it has
    generated this many between `thinking_markers` without closing them, the end marker's
    tokens are forced, so it closes its thinking and answers (`dist_runtime.engine.thinking`).
    The thinking opens where the prompt ends with the start marker (a template that opens it)
    or where the output writes it. None: no bound. Needs a tokenizer."""
    thinking_markers: tuple[str, str] = ("<think>", "</think>")
    """The thinking's start and end markers (Qwen3's and DeepSeek-R1's by default), as text
    the tokenizer turns into tokens."""
    extra: dict[str, object] = field(default_factory=dict, compare=False, repr=False)
    """Reserved for options of later versions; must be empty."""

    def __post_init__(self) -> None:
        # Accept lists from JSON/YAML callers but store tuples so the object stays hashable.
        _check(
            isinstance(self.stop_token_ids, (list, tuple)),
            f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}",
        )
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        _check(
            isinstance(self.stop, (list, tuple)),
            f"stop must be a string or a list of strings, got {self.stop!r}",
        )
        object.__setattr__(self, "stop", tuple(self.stop))
        _check(
            _is_int(self.max_new_tokens) and self.max_new_tokens >= 0,
            f"max_new_tokens must be an integer >= 0 (0: read the prompt only), got "
            f"{self.max_new_tokens!r}",
        )
        _check(
            _is_number(self.temperature) and self.temperature >= 0.0,
            f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}",
        )
        _check(
            _is_int(self.top_k) and self.top_k >= 0,
            f"top_k must be an integer >= 0 (0 disables), got {self.top_k!r}",
        )
        _check(
            _is_number(self.top_p) and 0.0 < self.top_p <= 1.0,
            f"top_p must be in (0, 1], got {self.top_p!r}",
        )
        _check(
            _is_number(self.min_p) and 0.0 <= self.min_p <= 1.0,
            f"min_p must be in [0, 1], got {self.min_p!r}",
        )
        _check(
            _is_number(self.repetition_penalty) and self.repetition_penalty > 0.0,
            f"repetition_penalty must be > 0 (1 disables), got {self.repetition_penalty!r}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(
                _is_number(value) and -2.0 <= value <= 2.0,
                f"{name} must be in [-2, 2] (0 disables), got {value!r}",
            )
        _check(
            self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**63),
            f"seed must be a non-negative integer below 2**63 or None, got {self.seed!r}",
        )
        _check(
            _is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_new_tokens,
            f"min_tokens must be an integer in [0, max_new_tokens={self.max_new_tokens!r}], "
            f"got {self.min_tokens!r}",
        )
        _check(
            all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
            f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}",
        )
        _check(
            all(isinstance(s, str) and s for s in self.stop),
            f"stop must hold non-empty strings, got {self.stop!r}",
        )
        _check(
            self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= 20),
            f"logprobs must be an integer in [0, 20] or None, got {self.logprobs!r}",
        )
        _check(
            self.prompt_logprobs is None
            or (_is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= 20),
            f"prompt_logprobs must be an integer in [0, 20] or None, got {self.prompt_logprobs!r}",
        )
        _check(
            _is_int(self.priority) and -(2**31) <= self.priority < 2**31,
            f"priority must be an integer in [-2**31, 2**31) (lower runs first), "
            f"got {self.priority!r}",
        )
        if isinstance(self.prediction, list):
            object.__setattr__(self, "prediction", tuple(self.prediction))
        _check(
            isinstance(self.prediction, tuple)
            and all(_is_int(t) and t >= 0 for t in self.prediction),
            f"prediction must be a list of token ids, got {self.prediction!r:.80}",
        )
        _check(
            self.adapter is None or (isinstance(self.adapter, str) and bool(self.adapter)),
            f"adapter must be a LoRA adapter's name or None, got {self.adapter!r:.80}",
        )
        for name in ("ignore_eos", "skip_special_tokens"):
            value = getattr(self, name)
            _check(isinstance(value, bool), f"{name} must be True or False, got {value!r}")
        _check(
            isinstance(self.json_object, bool),
            f"json_object must be True or False, got {self.json_object!r}",
        )
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            _check(
                isinstance(ids, (list, tuple)) and all(_is_int(t) and t >= 0 for t in ids),
                f"allowed_token_ids must be a list of token ids, got {ids!r:.80}",
            )
            _check(
                len(ids) > 0,
                "allowed_token_ids must name at least one token id (None: any token)",
            )
            object.__setattr__(self, "allowed_token_ids", tuple(sorted(set(ids))))
        if isinstance(self.bad_words, str):
            object.__setattr__(self, "bad_words", (self.bad_words,))
        _check(
            isinstance(self.bad_words, (list, tuple))
            and all(isinstance(w, str) and w.strip() for w in self.bad_words),
            f"bad_words must be a list of words (not blank), got {self.bad_words!r:.80}",
        )
        object.__setattr__(self, "bad_words", tuple(self.bad_words))
        if isinstance(self.guided_choice, str):
            object.__setattr__(self, "guided_choice", (self.guided_choice,))
        _check(
            isinstance(self.guided_choice, (list, tuple))
            and all(isinstance(c, str) and c for c in self.guided_choice),
            f"guided_choice must be a list of non-empty strings, got {self.guided_choice!r:.80}",
        )
        object.__setattr__(self, "guided_choice", tuple(self.guided_choice))
        kinds = [
            bool(self.guided_choice),
            self.guided_regex is not None,
            self.guided_grammar is not None,
            self.json_object,
            self.json_schema is not None,
        ]
        _check(
            sum(kinds) <= 1 or kinds == [False, False, False, True, True],
            "give one of guided_choice, guided_regex, guided_grammar, json_schema and json_object",
        )
        if self.guided_regex is not None:
            _check_regex(self.guided_regex)
        if self.guided_grammar is not None:
            _check_grammar(self.guided_grammar)
        if self.json_schema is not None:
            _check(not self.json_object, "give json_schema or json_object, not both")
            object.__setattr__(self, "json_schema", _schema_text(self.json_schema))
        _check(
            isinstance(self.compact_json, bool),
            f"compact_json must be True or False, got {self.compact_json!r}",
        )
        _check(
            not self.compact_json or self.json_object or self.json_schema is not None,
            "compact_json goes with guided JSON (json_schema or json_object)",
        )
        _check(
            not (self.min_tokens and self.guided),
            "min_tokens cannot combine with guided output (the grammar decides where the "
            "answer ends); leave one out",
        )
        _check(
            isinstance(self.include_stop_str_in_output, bool),
            "include_stop_str_in_output must be True or False, got "
            f"{self.include_stop_str_in_output!r}",
        )
        _check(
            self.cache_salt is None or (isinstance(self.cache_salt, str) and bool(self.cache_salt)),
            f"cache_salt must be a non-empty string or None, got {self.cache_salt!r:.80}",
        )
        _check(
            self.thinking_budget is None
            or (_is_int(self.thinking_budget) and self.thinking_budget >= 0),
            f"thinking_budget must be an integer >= 0 or None, got {self.thinking_budget!r}",
        )
        if isinstance(self.thinking_markers, list):
            object.__setattr__(self, "thinking_markers", tuple(self.thinking_markers))
        _check(
            isinstance(self.thinking_markers, tuple)
            and len(self.thinking_markers) == 2
            and all(isinstance(m, str) and m for m in self.thinking_markers),
            "thinking_markers must be two non-empty strings (start, end), got "
            f"{self.thinking_markers!r:.80}",
        )
        _check(
            self.thinking_budget is None or not self.guided,
            "thinking_budget cannot combine with guided output (the grammar holds the whole "
            "answer, which then has no thinking); leave one out",
        )
        _check(
            isinstance(self.extra, dict),
            f"extra must be an empty dict (reserved), got {self.extra!r:.80}",
        )
        _check(not self.extra, f"unknown sampling options {sorted(self.extra)}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def guided(self) -> bool:
        """The output is held to a grammar (json_schema, json_object, guided_choice,
        guided_regex or guided_grammar)."""
        return (
            self.json_object
            or self.json_schema is not None
            or bool(self.guided_choice)
            or self.guided_regex is not None
            or self.guided_grammar is not None
        )


def _bias_pairs(bias: object) -> tuple[tuple[int, float], ...]:
    """logit_bias as sorted (token id, bias) pairs, from a mapping (ids may be JSON's string
    keys) or pairs."""
    wrong = f"logit_bias must map token ids to biases, got {bias!r:.80}"
    if isinstance(bias, dict):
        items: list[Any] = list(bias.items())
    else:
        _check(isinstance(bias, (list, tuple)), wrong)
        items = list(bias)  # type: ignore[call-overload]
    pairs: dict[int, float] = {}
    for item in items:
        _check(isinstance(item, (list, tuple)) and len(item) == 2, wrong)
        key: Any = item[0]
        value: Any = item[1]
        if isinstance(key, str) and key.strip().isdigit():
            key = int(key)
        _check(
            _is_int(key) and key >= 0,
            f"logit_bias keys must be token ids (integers >= 0), got {key!r:.40}",
        )
        _check(
            _is_number(value) and -100.0 <= value <= 100.0,
            f"logit_bias values must be in [-100, 100], got {value!r:.40} for token {key}",
        )
        pairs[key] = float(value)
    return tuple(sorted(pairs.items()))


def _check_regex(pattern: object) -> None:
    from dist_runtime.text.guided import regex_grammar
    from dist_runtime.text.regex import RegexError

    _check_guide("guided_regex", pattern, regex_grammar, RegexError)


def _check_grammar(text: object) -> None:
    from dist_runtime.text.gbnf import GrammarError
    from dist_runtime.text.guided import gbnf_grammar

    _check_guide("guided_grammar", text, gbnf_grammar, GrammarError)


def _check_guide(
    field: str, text: object, build: Callable[[str], object], error: type[Exception]
) -> None:
    """`text` is a string its guide can be built from; a ValueError naming `field` if not."""
    _check(isinstance(text, str), f"{field} must be a string, got {text!r:.80}")
    try:
        build(str(text))
    except error as e:
        raise ValueError(f"{field}: {e}") from None


def _schema_text(schema: object) -> str:
    """A schema's compact JSON text (its key order kept: properties are generated in it),
    checked by compiling it."""
    from dist_runtime.text.guided import SchemaError, grammar_for

    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"json_schema is not valid JSON: {e}") from None
    _check(
        isinstance(schema, (dict, bool)),
        f"json_schema must be a JSON Schema object, got {type(schema).__name__}",
    )
    text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"))
    try:
        grammar_for(text)
    except SchemaError as e:
        raise ValueError(f"json_schema: {e}") from None
    except RecursionError:
        raise ValueError("json_schema: nested too deeply") from None
    return text


def _is_number(x: object) -> bool:
    """A finite int or float (bools, NaN and infinities rejected)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def check_answers(params: SamplingParams) -> SamplingParams:
    """Refuse parameters that generate nothing where answers are asked for (jobs, the command
    line): max_new_tokens 0 only reads a prompt."""
    if params.max_new_tokens < 1:
        raise ValueError(
            f"max_new_tokens must be an integer >= 1, got {params.max_new_tokens!r}: answers are "
            "generated here (0 only reads a prompt: generate() with prompt_logprobs scores it)"
        )
    return params
