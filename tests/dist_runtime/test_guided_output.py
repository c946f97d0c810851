"""Guided JSON output end to end on a random-weight model: whatever the weights prefer, every
output is on its schema (checked with `jsonschema`), ends when the value closes, and leaves the
other requests of its steps alone. A random model is the hard case: left to itself it would
never write JSON, so only the masks can make these outputs valid."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from dist_runtime import JobState, Runtime, SamplingParams
from dist_runtime.config import CacheConfig
from dist_runtime.text.guided import JsonGuide, grammar_for, unpack_mask

CPU32: dict[str, Any] = dict(device="cpu", dtype="float32")

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "n": {"type": "integer"},
        "score": {"type": ["number", "null"]},
        "ok": {"type": "boolean"},
        "name": {"type": "string", "minLength": 1, "maxLength": 4},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
        "note": {"type": "string", "maxLength": 2},
    },
    "required": ["color", "n", "score", "ok", "name", "tags"],
}
"""Every part bounded (the optional `note` too), so a value must close within ~400 tokens of
the tiny model's mostly one-byte vocabulary."""
ROOM = 700


@pytest.fixture(scope="module")
def rt(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    with Runtime(
        model=str(tiny_llama_dir),
        session_len=1024,
        job_dir=str(tmp_path_factory.mktemp("jobs")),
        **CPU32,
    ) as runtime:
        yield runtime


def _check_tokens_were_allowed(rt: Runtime, params: SamplingParams, token_ids: list[int]) -> None:
    """Replay the output through a fresh guide: each token was in the mask before it."""
    engine = rt.engine
    guide = engine._json_guide(params)
    size = engine.model_config.vocab_size
    for i, token in enumerate(token_ids):
        assert unpack_mask(guide.allowed_tokens(), size)[token], f"token {i} ({token})"
        assert guide.advance(token)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_outputs_follow_the_schema(rt: Runtime, temperature: float) -> None:
    params = [
        SamplingParams(max_new_tokens=ROOM, json_schema=SCHEMA, temperature=temperature, seed=s)
        for s in range(4)
    ]
    outs = rt.generate(["hello", "a b c", "hello", [5, 6, 7]], params)
    for out, p in zip(outs, params):
        assert out.finish_reason == "stop", out.text
        assert out.stop_reason is None  # the value closed: no stop string or token
        value = json.loads(out.text)
        jsonschema.validate(value, SCHEMA)
        assert list(value)[:5] == ["color", "n", "score", "ok", "name"]  # the schema's order
        assert out.text.endswith("}")  # the request ends with the value: nothing after it
        _check_tokens_were_allowed(rt, p, out.token_ids)
    if temperature > 0:  # four seeds, four different draws
        assert len({o.text for o in outs}) > 1


def test_guided_rows_leave_their_batch_alone(rt: Runtime) -> None:
    plain = SamplingParams(max_new_tokens=12, ignore_eos=True)
    alone = rt.generate(["one two", "three"], plain)
    guided = SamplingParams(max_new_tokens=ROOM, json_schema=SCHEMA, temperature=1.0, seed=3)
    mixed = rt.generate(["one two", "x", "three"], [plain, guided, plain])
    assert [mixed[0].token_ids, mixed[2].token_ids] == [o.token_ids for o in alone]
    jsonschema.validate(json.loads(mixed[1].text), SCHEMA)


def test_json_object_output_is_an_object_or_its_prefix(rt: Runtime) -> None:
    params = [
        SamplingParams(max_new_tokens=60, json_object=True, temperature=1.0, seed=s)
        for s in range(4)
    ]
    outs = rt.generate(["hi"] * 4, params)
    grammar = grammar_for(None)
    for out in outs:
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict)
        else:  # cut by max_new_tokens: still a prefix of some JSON object
            assert out.finish_reason == "length"
            assert grammar.advance(grammar.start, out.text.encode()) is not None


def test_logprobs_and_stop_ids_with_guided_output(rt: Runtime) -> None:
    """Log-probabilities stay the raw model's (vLLM's default), one per token; a stop id is
    allowed only where the value may end, so it never cuts the JSON short."""
    eos = rt.engine.tokenizer.eos_token_ids if rt.engine.tokenizer else []
    (out,) = rt.generate(
        ["hello"], SamplingParams(max_new_tokens=ROOM, json_schema=SCHEMA, logprobs=2, seed=1)
    )
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
    assert all(lp.logprob <= 0.0 for lp in out.logprobs)
    assert not set(out.token_ids[:-1]) & set(eos)
    jsonschema.validate(json.loads(out.text), SCHEMA)


def test_preempted_guided_requests_recompute_on_their_schema(tiny_llama_dir: Path) -> None:
    """12 blocks of 16 tokens for 4 growing outputs: the scheduler preempts and recomputes,
    and the driver's grammar state carries over (greedy: the same outputs as with room)."""
    params = SamplingParams(max_new_tokens=120, json_schema=SCHEMA)
    prompts = [[3 + i, 9, 11 + i] for i in range(4)]
    with Runtime(model=str(tiny_llama_dir), session_len=256, **CPU32) as roomy:
        want = roomy.generate(prompts, params)
    with Runtime(
        model=str(tiny_llama_dir), session_len=256, cache=CacheConfig(num_blocks=12), **CPU32
    ) as tight:
        got = tight.generate(prompts, params)
        assert tight.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for out in got:
        if out.finish_reason == "stop":
            jsonschema.validate(json.loads(out.text), SCHEMA)


def test_queued_job_keeps_its_schema(rt: Runtime) -> None:
    params = SamplingParams(max_new_tokens=ROOM, json_schema=SCHEMA, temperature=0.7, seed=5)
    job = rt.submit(document="a short document", questions=["q1", "q2"], params=params)
    answers = rt.result(job, timeout=120)
    assert rt.status(job).state is JobState.DONE
    for answer in answers:
        text = answer if isinstance(answer, str) else answer.text
        jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"json_schema": {"type": "string", "pattern": "(a)\\1"}}, "back-references"),
        ({"json_schema": {"type": "integer", "minimum": 0}}, "minimum"),
        ({"json_schema": "{not json"}, "not valid JSON"),
        ({"json_schema": {"type": "object"}, "json_object": True}, "not both"),
        ({"json_schema": [1]}, "JSON Schema object"),
        ({"json_object": 1}, "json_object"),
    ],
)
def test_bad_guided_params_name_the_problem(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_schema_is_kept_as_its_json_text() -> None:
    """The schema is stored as text (hashable, and a job's params survive the queue's JSON),
    in its own key order: properties are generated in it."""
    p = SamplingParams(json_schema={"properties": {"b": {}, "a": {}}})
    assert p.json_schema == '{"properties":{"b":{},"a":{}}}' and p.guided
    assert SamplingParams(json_schema=p.json_schema) == p
    assert hash(p) == hash(SamplingParams(json_schema=p.json_schema))
    assert not SamplingParams().guided and SamplingParams(json_object=True).guided


def test_guide_refuses_a_token_off_the_grammar(rt: Runtime) -> None:
    guide: JsonGuide = rt.engine._json_guide(SamplingParams(json_schema=SCHEMA))
    tok = rt.engine.tokenizer
    assert tok is not None
    (brace,) = [i for i in range(tok.vocab_size) if tok.token_bytes(i) == b"{"]
    (letter,) = [i for i in range(tok.vocab_size) if tok.token_bytes(i) == b"x"]
    assert not unpack_mask(guide.allowed_tokens(), rt.engine.model_config.vocab_size)[letter]
    assert guide.advance(brace) and not guide.advance(letter)


def test_logit_bias_end_to_end(rt: Runtime) -> None:
    """+100 on one token makes it every token; -100 on what greedy picked removes it; ids past
    the vocabulary and values past 100 are refused by name."""
    (forced,) = rt.generate(["hi"], SamplingParams(max_new_tokens=5, logit_bias={"77": 100}))
    assert forced.token_ids == [77] * 5
    (plain,) = rt.generate(["hi"], SamplingParams(max_new_tokens=5, ignore_eos=True))
    banned = plain.token_ids[0]
    (out,) = rt.generate(
        ["hi"], SamplingParams(max_new_tokens=5, ignore_eos=True, logit_bias={banned: -100})
    )
    assert banned not in out.token_ids
    with pytest.raises(ValueError, match=r"logit_bias names token ids outside \[0, 512\)"):
        rt.generate(["hi"], SamplingParams(logit_bias={600: 1}))
    with pytest.raises(ValueError, match="logit_bias values must be in"):
        SamplingParams(logit_bias={1: 101})
    with pytest.raises(ValueError, match="logit_bias keys must be token ids"):
        SamplingParams(logit_bias={"x": 1})
    assert SamplingParams(logit_bias={"7": 1, 2: -1}).logit_bias == ((2, -1.0), (7, 1.0))


def test_guided_choice(rt: Runtime) -> None:
    """The answer is exactly one of the choices, as written (no quotes, no whitespace), even
    where one is the prefix of another."""
    choices = ("positive", "negative", "neutral", "pos")
    outs = rt.generate(
        ["review: fine"] * 6,
        [SamplingParams(guided_choice=choices, temperature=1.0, seed=s) for s in range(6)],
    )
    for out in outs:
        assert out.text in choices and out.finish_reason == "stop", out.text
    with pytest.raises(ValueError, match="give one of guided_choice, guided_regex, guided_gr"):
        SamplingParams(guided_choice=("a",), json_object=True)
    with pytest.raises(ValueError, match="guided_choice must be a list of non-empty strings"):
        SamplingParams(guided_choice=("a", ""))


GRAMMAR = r"""
root ::= answer ("; " answer){0,2} "."
answer ::= ("yes" | "no") | list
list ::= "[" (item (", " item){0,2})? "]"
item ::= [0-9]{1,3} | list
"""
"""A recursive GBNF grammar (lists nest); its language as `well_formed` checks it."""


def well_formed(text: str) -> bool:
    """Independently of the grammar: answers split by "; " (one to three) then ".", each
    yes / no or a bracketed list whose items are 1-3 digits or lists, up to three per list."""

    def value(s: str, i: int) -> int:  # the index after a list or number starting at i
        if s.startswith("[", i):
            i, n = i + 1, 0
            while not s.startswith("]", i):
                if n:
                    if not s.startswith(", ", i):
                        return -1
                    i += 2
                i = value(s, i)
                n += 1
                if i < 0 or n > 3:
                    return -1
            return i + 1
        j = i
        while j < len(s) and s[j].isdigit():
            j += 1
        return j if 1 <= j - i <= 3 else -1

    if not text.endswith("."):
        return False
    answers = text[:-1].split("; ")
    if not 1 <= len(answers) <= 3:
        return False
    for a in answers:
        if a not in ("yes", "no") and not (a.startswith("[") and value(a, 0) == len(a)):
            return False
    return True


def test_guided_grammar(rt: Runtime) -> None:
    """Answers from a recursive GBNF grammar (vLLM's guided_grammar): each is in the language
    (checked by a recogniser written apart from the grammar), ends by itself at the grammar's
    end, and every token was in its mask; a grammar that cannot be generated is refused."""
    params = [
        SamplingParams(guided_grammar=GRAMMAR, temperature=1.0, seed=s, max_new_tokens=200)
        for s in range(5)
    ]
    outs = rt.generate(["q"] * 5, params)
    for out, p in zip(outs, params, strict=True):
        assert out.finish_reason == "stop" and well_formed(out.text), out.text
        _check_tokens_were_allowed(rt, p, out.token_ids)
    assert well_formed("[1, [22, []]]; no.") and not well_formed("[1, 2, 3, 4].")
    with pytest.raises(ValueError, match="guided_grammar: rule root is left-recursive"):
        SamplingParams(guided_grammar='root ::= root "a" | "a"')
    with pytest.raises(ValueError, match="give one of guided_choice, guided_regex, guided_gr"):
        SamplingParams(guided_grammar='root ::= "a"', guided_regex="a")


def test_guided_regex_and_pattern_strings(rt: Runtime) -> None:
    """A whole answer held to a pattern, and a JSON string held to its schema's `pattern`:
    Python's `re` (ASCII classes) and jsonschema agree with every output."""
    import re

    pattern = r"(yes|no), [a-z]{2,5}( [a-z]{2,5}){0,2}\."
    outs = rt.generate(
        ["q"] * 4,
        [SamplingParams(guided_regex=pattern, temperature=1.0, seed=s, max_new_tokens=60)
         for s in range(4)],
    )  # fmt: skip
    for out in outs:
        assert out.finish_reason == "stop" and re.fullmatch(pattern, out.text, re.ASCII), out.text
    schema = {
        "type": "object",
        "properties": {"date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
                       "code": {"type": "string", "pattern": "[A-Z]{2}[0-9]{1,3}"}},
        "required": ["date", "code"],
    }  # fmt: skip
    for out in rt.generate(
        ["q"] * 3, [SamplingParams(json_schema=schema, temperature=1.0, seed=s, max_new_tokens=300)
                    for s in range(3)],
    ):  # fmt: skip
        value = json.loads(out.text)
        jsonschema.validate(value, schema)
        assert re.fullmatch(r"[A-Z]{2}[0-9]{1,3}", value["code"])
    with pytest.raises(ValueError, match=r"guided_regex: pattern '\(a\)\\\\1'"):
        SamplingParams(guided_regex=r"(a)\1")


def test_a_grammar_that_takes_no_token_ends_empty_and_alone(rt: Runtime) -> None:
    """A grammar matching only the empty text, with EOS ignored, allows no token at all: the
    request ends at once with "" ("stop"), streamed as one closing delta, and the request
    sharing its step is untouched (it used to fail with it: an empty mask raised in the
    sampler)."""
    other = SamplingParams(max_new_tokens=5, ignore_eos=True)
    alone = rt.generate(["other"], other)[0]
    empties = [
        SamplingParams(max_new_tokens=40, ignore_eos=True, guided_regex=""),
        SamplingParams(max_new_tokens=40, ignore_eos=True, guided_grammar='root ::= ""'),
    ]
    for empty in empties:
        got = [h.result(timeout=60) for h in rt.add_requests(["hello", "other"], [empty, other])]
        assert (got[0].text, got[0].token_ids, got[0].finish_reason) == ("", [], "stop")
        assert got[1].token_ids == alone.token_ids
        (h,) = rt.add_requests(["hello"], [empty])
        assert [(d.text, d.finish_reason) for d in h] == [("", "stop")]
    maybe = SamplingParams(max_new_tokens=40, ignore_eos=True, guided_regex="a?")
    assert rt.generate(["hello"], maybe)[0].text == "a"  # it can take a token: it does
