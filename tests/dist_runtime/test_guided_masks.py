"""Guided-output token masks (`dist_runtime.text.guided`) against brute force: a token is in
the mask of a state exactly when the grammar takes each of its bytes from that state (stop ids
too where the output may end), whatever shortcut the trie walk or the string-run sets take.
Checked on a synthetic vocabulary of awkward pieces (partial UTF-8, escapes, runs of
structure, special tokens, padded logits) and on the demo model's real tokenizer."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from dist_runtime.formats.demo_model import default_cache_dir
from dist_runtime.text.guided import JsonGuide, Vocabulary, grammar_for, unpack_mask
from dist_runtime.text.json_grammar import JsonGrammar, SchemaError, State
from tests.dist_runtime.test_json_grammar import SCHEMAS as GRAMMAR_SCHEMAS

SMILE = "😀".encode()
PIECES: list[bytes] = (
    [bytes([c]) for c in range(0x20, 0x7F)]
    + [b"\n", b"\t", b"\n  ", b"\n\t", b"  ", b" \n", b"\x00", b"\x1f", b"\x7f"]
    + [b'{"', b'":', b'": ', b'", "', b'","', b"},", b"}", b"]}", b'"]', b' "', b'"}', b"[]"]
    + [b"{}", b"[[", b"]]", b", ", b": ", b',"', b'"name":"', b'{"value":', b"},\n  "]
    + [b"true", b"false", b"null", b"nul", b"tru", b"123", b"0", b"00", b"-1", b"1.5", b"e+"]
    + [b"E-7", b"99999999", b".0", b"-0"]
    + [b"\\u00", b"\\u", b"\\n", b'\\"', b"\\\\", b"\\x", b"e9", b"D83D", b"\\uDE00"]
    + [b"name", b"age", b"red", b"green", b"hello", b" world", b"abc", b"ab", b"value"]
    + ["é".encode(), "日本".encode(), "日".encode()[:2], "日".encode()[2:], "本".encode()]
    + [SMILE, SMILE[:2], SMILE[2:], SMILE[:1], SMILE[1:], b"\xff", b"\xc3", b"\xa9"]
    + ['é"'.encode(), b'a"', b"a\\", "ü,".encode(), "日本語です".encode()]
)
TOKENS: list[bytes | None] = [None, *PIECES[:40], None, b"", *PIECES[40:], None]
SIZE = len(TOKENS) + 13
"""Logits wider than the vocabulary, as models pad them."""
STOP_IDS = frozenset({0, TOKENS.index(b"x"), SIZE + 5})
"""A special token, an ordinary one, and one outside the logits."""
VOCAB = Vocabulary(TOKENS, SIZE)

SCHEMAS: dict[str, Any] = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 4},
            "age": {"type": "integer"},
            "score": {"type": ["number", "null"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 2}, "maxItems": 3},
            "color": {"enum": ["red", "日本", {"a": 1}]},
            "ok": {"type": "boolean"},
        },
        "required": ["name", "age"],
    },
    "tree": GRAMMAR_SCHEMAS["tree"],
    "words": {"type": "array", "items": {"type": "string", "minLength": 3}, "minItems": 1},
    "integer": {"type": "integer"},
    "nullable": {"anyOf": [{"type": "string", "maxLength": 1}, {"type": "string"}, {}]},
    "patterned": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{2}\\d{1,3}$"},
            "word": {"type": "string", "pattern": "(é|ab)+", "maxLength": 3},
        },
        "required": ["code", "word"],
    },
}
REGEX = r"(yes|no)(, because [a-z ]{1,20})?"
"""The `regex` grammar: a whole raw answer (guided_regex)."""
GBNF = r"""
root  ::= item ("," " "? item){0,3}
item  ::= "name" | "日本" [é😀]? | num | "\"" [^"\\\n]* "\"" | "[" (item ("," item)*)? "]"
num   ::= "-"? [0-9]+ ("." [0-9]+)?
"""
"""The `gbnf` grammar: a raw answer from a recursive GBNF grammar (guided_grammar)."""
RUNS: dict[str, str] = {
    "runs_counted": r'root ::= "<" [^>\n]{0,4} ">" [a-z]{1,3} [a-c] "!"',
    "runs_digits": r'root ::= [0-9]{2,6} ("." [0-9]+)? | "-" [0-9]+',
    "runs_utf8": r'root ::= [^a-z]{1,5} [α-ω]* "z"',
}
"""GBNF grammars whose states have character runs (`JsonGrammar.char_run`) of every kind: a
counted run that ends (tokens past it refused), one that meets an overlapping class (tokens
past that point checked one by one), digits (a run picked by another seed), multi-byte
characters in and out of overlapping classes."""
TEXTS: dict[str, list[str]] = {
    "person": [
        '{"name":"日本é","age":-12,"score":1.5e+3,"tags":["ab","😀"],"color":"日本","ok":true}',
        '{\n  "name": "a\\u00e9",\n  "age": 0,\n  "score": null,\n  "color": {"a":1}\n}',
        '{"name":"","age":7}',
    ],
    "tree": ['{"value":1,"children":[{"value":2},{"value":3,"children":[]}]}'],
    "words": ['["hello", "日本語です", "a\\"\\\\\\n😀"]'],
    "integer": ["-1234", "0"],
    "nullable": ['"é"', '"\\uD83D\\uDE00 world"', '{"a":[1,2]}'],
    "patterned": ['{"code":"AB12","word":"éab"}', '{ "code": "ZZ1", "word": "é" }'],
    "regex": ["yes", "no, because it rains"],
    "gbnf": ["name, 日本😀,-12.5", '[1,[name,"a b é"]], "x", []', "日本é"],
    "runs_counted": ["<ab é>xyb!", "<>ab!", "<日本😀>abca!"],
    "runs_digits": ["12.5", "123456", "-0"],
    "runs_utf8": ["1日😀z", "Ωαβγz", "日本語ですz"],
    "any_object": ['{"hello world":"abc\\u00e9😀", "n":[1,-2.5E-7,true,null,{}]}'],
}


def grammar(name: str) -> JsonGrammar:
    if name == "any_object":
        return JsonGrammar.any_object()
    if name == "regex":
        return JsonGrammar.from_regex(REGEX)
    if name == "gbnf":
        return JsonGrammar.from_gbnf(GBNF)
    if name in RUNS:
        return JsonGrammar.from_gbnf(RUNS[name])
    return JsonGrammar.from_schema(SCHEMAS[name])


def brute_force(
    g: JsonGrammar,
    state: State,
    tokens: Sequence[bytes | None],
    size: int,
    stop_ids: frozenset[int],
) -> np.ndarray:
    """Token i is allowed iff its bytes are not empty and the grammar takes them all, or it
    is a stop id (within the logits) and the output may end here."""
    want = np.zeros(size, dtype=bool)
    for i, data in enumerate(tokens[:size]):
        if data and g.advance(state, data) is not None:
            want[i] = True
    if g.accepts(state):
        want[[i for i in stop_ids if i < size]] = True
    return want


def reach(g: JsonGrammar, data: bytes, state: State | None = None) -> State:
    """The state after `data` (from the start or `state`), which must be alive."""
    after = g.advance(g.start if state is None else state, data)
    assert after is not None, data
    return after


def assert_mask(g: JsonGrammar, state: State, where: str) -> None:
    packed = VOCAB.mask(g, state, STOP_IDS)
    assert len(packed) == (SIZE + 7) // 8
    got = unpack_mask(packed, SIZE)
    want = brute_force(g, state, TOKENS, SIZE, STOP_IDS)
    extra, missing = np.flatnonzero(got & ~want), np.flatnonzero(want & ~got)
    assert not extra.size and not missing.size, (
        where,
        [TOKENS[i] if i < len(TOKENS) else i for i in extra],
        [TOKENS[i] if i < len(TOKENS) else i for i in missing],
    )


@pytest.mark.parametrize("name", list(TEXTS))
def test_masks_match_brute_force_along_valid_texts(name: str) -> None:
    """At every byte prefix of valid outputs (in strings with and without maxLength, in the
    middle of UTF-8 characters and escapes, in numbers, after commas, at the end)."""
    g = grammar(name)
    for text in TEXTS[name]:
        data = text.encode()
        for n in range(len(data) + 1):
            state = reach(g, data[:n])
            assert_mask(g, state, data[:n].decode("utf-8", "replace"))
        assert g.accepts(state)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("name", list(TEXTS))
def test_masks_match_brute_force_along_random_walks(name: str, seed: int) -> None:
    """Along outputs sampled token by token from the mask itself: each mask is the brute-force
    one, and every token it holds keeps the output alive."""
    rng = random.Random(seed)
    g = grammar(name)
    state = g.start
    out = b""
    for _ in range(80):
        assert_mask(g, state, out.decode("utf-8", "replace"))
        allowed = [
            i
            for i in np.flatnonzero(unpack_mask(VOCAB.mask(g, state, STOP_IDS), SIZE))
            if i < len(TOKENS) and TOKENS[i] and i not in STOP_IDS
        ]
        if not allowed:  # a closed value, or a number at MAX_NUMBER_BYTES: only a stop
            assert g.accepts(state)
            break
        # lean on closing tokens now and then so walks reach the end of values
        closers = [i for i in allowed if (TOKENS[i] or b"")[-1:] in (b"}", b"]", b'"')]
        data = TOKENS[rng.choice(closers if closers and rng.random() < 0.3 else allowed)]
        assert data is not None
        out += data
        state = reach(g, data, state)


@pytest.mark.parametrize("name", ["gbnf", *RUNS, "regex", "patterned", "person"])
def test_character_runs_are_taken(name: str) -> None:
    """The GBNF and pattern masks above go through character runs (the brute-force tests check
    them): a share of the states along the valid texts have one (GBNF and whole-answer
    patterns: at least half; a schema with patterned strings: some; a schema without: none),
    and every character of a run leads where its seed does."""
    g = grammar(name)
    with_run = total = 0
    for text in TEXTS[name]:
        state = g.start
        for ch in text:
            run = g.char_run(state)
            total += 1
            if run is not None:
                with_run += 1
                chars, seed = run
                assert chars.takes(seed)  # (a run may be dead: a maxLength reached)
                after = g.advance(state, chr(seed).encode())
                for lo, hi in chars.ranges[:4]:  # members lead where the seed does
                    for cp in {lo, (lo + hi) // 2, hi} - set(range(0xD800, 0xE000)):
                        assert g.advance(state, chr(cp).encode()) == after, (name, cp)
            state = reach(g, ch.encode(), state)
    least = {"patterned": total // 5, "person": 0}.get(name, total // 2)
    assert with_run >= least, (with_run, total)
    if name == "person":
        assert with_run == 0


def test_mask_layout_and_cache() -> None:
    """Bit i of byte i // 8, least significant first; stop ids only where the output may end,
    never beyond the logits; masks are cached per (grammar, state, stop ids)."""
    g = grammar("integer")
    start = VOCAB.mask(g, g.start, STOP_IDS)
    zero = TOKENS.index(b"0")
    assert start[zero // 8] >> (zero % 8) & 1
    assert not unpack_mask(start, SIZE)[0]  # EOS: nothing written yet
    after = reach(g, b"12")
    with_stop = VOCAB.mask(g, after, STOP_IDS)
    assert with_stop is VOCAB.mask(g, after, STOP_IDS)
    got = unpack_mask(with_stop, SIZE)
    assert got[0] and got[TOKENS.index(b"123")] and not got[TOKENS.index(b"-1")]
    without = unpack_mask(VOCAB.mask(g, after, frozenset()), SIZE)
    assert not without[0] and without[TOKENS.index(b"123")]
    assert not got[len(TOKENS) :].any()
    assert unpack_mask(with_stop, SIZE).shape == (SIZE,)


def test_guide_refuses_tokens_off_the_mask() -> None:
    """`JsonGuide.advance` is False for a token the mask refuses (a letter before `{`, a
    special token, a stop id before the value ends); a guide off its grammar stays off."""
    g = grammar("person")
    guide = JsonGuide(g, VOCAB, STOP_IDS - {TOKENS.index(b"x")})
    assert not guide.advance(0)  # EOS before anything: refused, the guide keeps its place
    assert guide.state == g.start
    letter = TOKENS.index(b"a")
    assert not unpack_mask(guide.allowed_tokens(), SIZE)[letter]
    assert not guide.advance(letter)
    assert guide.state is None and not guide.ended
    assert not guide.advance(TOKENS.index(b"{"))
    with pytest.raises(RuntimeError):
        guide.allowed_tokens()
    special = JsonGuide(g, VOCAB, [0])
    assert not special.advance(TOKENS.index(None, 1))
    padded = JsonGuide(g, VOCAB, [0])
    assert not padded.advance(SIZE - 1)


def test_guide_walk_on_the_synthetic_vocabulary() -> None:
    """A greedy tokenisation of a valid text walks a guide to its end: each token in the mask
    before it, `ended` after the last, then only the stop ids allowed."""
    g = grammar("person")
    stops = frozenset({0})
    guide = JsonGuide(g, VOCAB, stops)
    data = TEXTS["person"][0].encode()
    pieces = sorted({t for t in TOKENS if t}, key=len, reverse=True)
    while data:
        piece = next(p for p in pieces if data.startswith(p))
        token = TOKENS.index(piece)
        assert unpack_mask(guide.allowed_tokens(), SIZE)[token], piece
        assert guide.advance(token)
        data = data[len(piece) :]
    assert guide.ended
    assert np.flatnonzero(unpack_mask(guide.allowed_tokens(), SIZE)).tolist() == [0]
    assert guide.advance(0)


def test_guide_can_go_on() -> None:
    """`can_go_on` is False only where no token (nor stop id) may come next: a vocabulary
    without `{` for an object, or a closed value without stop ids."""
    assert JsonGuide(JsonGrammar.any_object(), VOCAB, []).can_go_on()
    lacking = Vocabulary([b"x", b"[", None], 8)
    assert not JsonGuide(JsonGrammar.any_object(), lacking, [2]).can_go_on()
    g = grammar("person")
    for stops, can in [([0], True), ([], False)]:
        guide = JsonGuide(g, VOCAB, stops)
        for piece in [b'{"', b"name", b'":', b'"', b'","', b"age", b'":', b"-1", b"}"]:
            assert guide.advance(TOKENS.index(piece))
        assert guide.ended and guide.can_go_on() is can


def test_grammar_for() -> None:
    """One grammar per schema text (None: any JSON object); a bad schema raises SchemaError."""
    text = json.dumps(SCHEMAS["person"], sort_keys=True)
    assert grammar_for(text) is grammar_for(text)
    g = grammar_for(None)
    assert g is grammar_for(None)
    assert g.accepts(g.advance(g.start, b'{"a":[1]}'))
    assert g.advance(g.start, b"[") is None
    with pytest.raises(SchemaError, match="minimum"):
        grammar_for(json.dumps({"type": "integer", "minimum": 1}))


def test_masks_are_not_shared_between_vocabularies() -> None:
    """A grammar's mask for one vocabulary is never served to another (each vocabulary keeps
    its own cache; one created after the first is freed may get its id)."""
    g = JsonGrammar.any_object()
    for k in range(20):
        tokens = [b"{", b"x"] if k % 2 == 0 else [b"x", b"{"]
        vocab = Vocabulary(tokens, 8)
        got = unpack_mask(vocab.mask(g, g.start, frozenset()), 8)
        assert np.flatnonzero(got).tolist() == [tokens.index(b"{")]
        del vocab


# -- the demo model's tokenizer -------------------------------------------------------------------
REAL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "population": {"type": "integer"},
        "area": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "coastal": {"type": "boolean"},
        "mayor": {"type": ["string", "null"]},
        "kind": {"enum": ["city", "town", "village"]},
    },
    "required": ["city", "population", "tags", "kind"],
}
REAL_VALUE: dict[str, Any] = {
    "city": "Zürich 日本",
    "population": 421878,
    "area": 87.88,
    "tags": ["lake", "banks", "😀 fun", 'quote " and \\ slash'],
    "coastal": False,
    "mayor": None,
    "kind": "city",
}


@pytest.fixture(scope="module")
def smollm2() -> tuple[Any, Vocabulary]:
    folder = default_cache_dir() / "smollm2-135m-instruct"
    if not (folder / "tokenizer.json").exists():
        pytest.skip(f"no demo tokenizer at {folder}")
    from dist_runtime.text.tokenizer import Tokenizer

    tok = Tokenizer(folder)
    return tok, Vocabulary.from_tokenizer(tok, 49152)


@pytest.mark.parametrize(
    "dumps",
    [
        dict(ensure_ascii=False, separators=(",", ":")),
        dict(ensure_ascii=False, indent=2),
        dict(ensure_ascii=True),
    ],
)
def test_real_tokenizer_walk(smollm2: tuple[Any, Vocabulary], dumps: dict[str, Any]) -> None:
    """The demo tokenizer's ids of a valid output: each in the mask before it; at the end the
    guide has `ended` and only EOS is allowed, which the guide then takes."""
    tok, vocab = smollm2
    eos = frozenset(tok.eos_token_ids)
    guide = JsonGuide(JsonGrammar.from_schema(REAL_SCHEMA), vocab, eos)
    ids = tok.encode(json.dumps(REAL_VALUE, **dumps), add_special_tokens=False)
    for n, token in enumerate(ids):
        assert not guide.ended
        assert unpack_mask(guide.allowed_tokens(), vocab.size)[token], (n, tok.decode(ids[:n]))
        assert guide.advance(token)
    assert guide.ended
    assert np.flatnonzero(unpack_mask(guide.allowed_tokens(), vocab.size)).tolist() == sorted(eos)
    assert guide.advance(min(eos))


def test_real_tokenizer_eos_after_a_number(smollm2: tuple[Any, Vocabulary]) -> None:
    """After `12` under `{"type": "integer"}` the output may end (EOS allowed) or go on
    (digits allowed): not ended."""
    tok, vocab = smollm2
    eos = frozenset(tok.eos_token_ids)
    guide = JsonGuide(JsonGrammar.from_schema({"type": "integer"}), vocab, eos)
    assert not unpack_mask(guide.allowed_tokens(), vocab.size)[sorted(eos)].any()
    for token in tok.encode("12", add_special_tokens=False):
        assert guide.advance(token)
    assert not guide.ended
    mask = unpack_mask(guide.allowed_tokens(), vocab.size)
    assert mask[sorted(eos)].all()
    assert mask[tok.encode("3", add_special_tokens=False)[0]]
    assert not mask[tok.encode("a", add_special_tokens=False)[0]]


def test_real_tokenizer_masks_match_brute_force(smollm2: tuple[Any, Vocabulary]) -> None:
    """The full 49,152-token mask equals brute force at the start, inside a bounded and a free
    string, after a comma, inside a number and an escape, and at the end."""
    tok, vocab = smollm2
    eos = frozenset(tok.eos_token_ids)
    g = JsonGrammar.from_schema(REAL_SCHEMA)
    text = json.dumps(REAL_VALUE, ensure_ascii=False).encode()
    for prefix in [
        b"",
        '{"city": "Zürich'.encode(),
        text[: text.index(b'"lake') + 3],
        text[: text.index(b'"area"') - 1],
        text[: text.index(b"421878") + 3],
        text[: text.index(b"\\ slash") + 1],
        text,
    ]:
        state = reach(g, prefix)
        got = unpack_mask(vocab.mask(g, state, eos), vocab.size)
        want = brute_force(g, state, vocab.token_bytes, vocab.size, eos)
        assert np.array_equal(got, want), (prefix, np.flatnonzero(got != want)[:10])


def test_guide_checks_a_draft_without_moving() -> None:
    """`check_draft` keeps the draft tokens the grammar takes, up to the first it refuses, a
    stop token or the end of the value, with the mask of every row that checks them: the
    masks a guide shows when walked token by token; the guide itself stays where it was."""
    g = grammar("person")
    stops = frozenset({0})
    data = TEXTS["person"][0].encode()
    pieces = sorted({t for t in TOKENS if t}, key=len, reverse=True)
    tokens = []
    while data:
        piece = next(p for p in pieces if data.startswith(p))
        tokens.append(TOKENS.index(piece))
        data = data[len(piece) :]
    guide = JsonGuide(g, VOCAB, stops)
    walker = JsonGuide(g, VOCAB, stops)
    expected = []
    for token in tokens:
        expected.append(walker.allowed_tokens())
        assert walker.advance(token)
    expected.append(walker.allowed_tokens())
    # the whole value, then a stop token and more: kept up to the value's end
    kept, masks = guide.check_draft([*tokens, 0, tokens[0]])
    assert kept == tokens and masks == expected
    assert guide.state == g.start  # not moved
    # a refused token cuts the draft before it
    allowed_after_first = unpack_mask(expected[1], SIZE)
    refused = next(i for i, t in enumerate(TOKENS) if t and not allowed_after_first[i])
    kept, masks = guide.check_draft([tokens[0], refused, tokens[1]])
    assert kept == [tokens[0]] and masks == expected[:2]
    # a stop token where the value is not complete is not kept
    kept, masks = guide.check_draft([0])
    assert kept == [] and masks == expected[:1]


SQL = r"""
root ::= "SELECT " cols " FROM " name (" WHERE " cond)? ";"
cols ::= "*" | name (", " name)*
name ::= [a-z_] [a-z0-9_]*
cond ::= name " = " (num | text)
num  ::= [0-9]+
text ::= "'" [^'\n]* "'"
"""


def test_real_tokenizer_gbnf(smollm2: tuple[Any, Vocabulary]) -> None:
    """A GBNF grammar with the demo tokenizer: the ids of a valid answer are each in the mask
    before them, the guide ends after `;` (only EOS then), and the full mask equals brute force
    at the start, inside a name, inside a quoted text and after the end."""
    tok, vocab = smollm2
    eos = frozenset(tok.eos_token_ids)
    g = JsonGrammar.from_gbnf(SQL)
    text = "SELECT id, city FROM towns WHERE city = 'Zürich 日本';"
    guide = JsonGuide(g, vocab, eos)
    for n, token in enumerate(tok.encode(text, add_special_tokens=False)):
        assert not guide.ended
        assert unpack_mask(guide.allowed_tokens(), vocab.size)[token], n
        assert guide.advance(token)
    assert guide.ended
    assert np.flatnonzero(unpack_mask(guide.allowed_tokens(), vocab.size)).tolist() == sorted(eos)
    data = text.encode()
    for prefix in [b"", b"SELECT id, ci", data[: data.index("Zü".encode()) + 2], data]:
        state = reach(g, prefix)
        got = unpack_mask(vocab.mask(g, state, eos), vocab.size)
        want = brute_force(g, state, vocab.token_bytes, vocab.size, eos)
        assert np.array_equal(got, want), (prefix, np.flatnonzero(got != want)[:10])
