"""The guided-output grammar (`dist_runtime.text.json_grammar`) against `json` and `jsonschema`
as oracles: instances a schema admits, written as the grammar generates them (properties in the
schema's order, enum members compact, whitespace runs within bounds, nothing after the value),
are accepted with every prefix alive; texts the oracle refuses are never accepted; refused
keywords raise `SchemaError` naming the keyword; the documented limits hold."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dist_runtime.text.json_grammar import (
    MAX_DEPTH,
    MAX_INDENT,
    MAX_NUMBER_BYTES,
    JsonGrammar,
    SchemaError,
    compile_schema,
)

SCHEMAS: dict[str, Any] = {
    "person": {
        "type": "object",
        "title": "a person",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 8},
            "age": {"type": "integer", "description": "years"},
            "score": {"type": "number"},
            "ok": {"type": "boolean"},
            "nothing": {"type": "null"},
            "color": {"enum": ["red", "grün", "日本", 7, None]},
            "kind": {"const": "v1"},
            "nick": {"type": "string", "format": "email"},
        },
        "required": ["name", "age", "ok", "color"],
    },
    "matrix": {
        "type": "array",
        "items": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
        "maxItems": 3,
    },
    "short_strings": {
        "type": "array",
        "items": {"type": "string", "minLength": 1, "maxLength": 2},
        "minItems": 2,
        "maxItems": 4,
    },
    "emoji": {"type": "string", "minLength": 2, "maxLength": 3},
    "unions": {
        "type": "object",
        "properties": {
            "a": {"type": ["string", "null"]},
            "b": {
                "anyOf": [
                    {"type": "integer"},
                    {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
                ]
            },
            "c": {"oneOf": [{"const": {"x": [1, "é"]}}, {"enum": [1.5, None, "日本"]}]},
            "d": {"allOf": [{"type": "string", "maxLength": 1}]},
        },
        "required": ["a", "b", "c"],
    },
    "tree": {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "value": {"type": "integer"},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                },
                "required": ["value"],
            }
        },
        "$ref": "#/$defs/node",
    },
    "map": {"type": "object", "additionalProperties": {"type": "number"}},
    "optional_only": {
        "type": "object",
        "properties": {"p": {"type": "boolean"}, "q": {"type": "string", "maxLength": 3}},
    },
    "nothing_in": {"type": "array", "items": {"type": "integer"}, "maxItems": 0},
    "any": {},
    "true": True,
}


def grammar(name: str) -> JsonGrammar:
    return JsonGrammar.from_schema(SCHEMAS[name])


# -- generating instances -------------------------------------------------------------------------
class Lit:
    """An enum / const member: the grammar generates it as its compact JSON text."""

    def __init__(self, value: Any):
        self.value = value


def plain(v: Any) -> Any:
    """The JSON value behind a generated instance (Lit unwrapped)."""
    if isinstance(v, Lit):
        return v.value
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [plain(x) for x in v]
    return v


CHARS = st.one_of(
    st.sampled_from(['"', "\\", "/", "\n", "\t", "\x00", "\x1f", "\x7f", "é", "日", "本", "😀"]),
    st.characters(codec="utf-8"),
)
KEYS = st.text(CHARS, max_size=5)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**18), 10**18),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(CHARS, max_size=6),
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=8,
)


def resolve(root: Any, ref: str) -> Any:
    target = root
    for part in ref[2:].split("/"):
        target = target[part]
    return target


def instances(s: Any, root: Any, depth: int = 0) -> st.SearchStrategy[Any]:
    """Values `s` admits, in the shape the grammar generates (listed properties in order)."""
    if s is True or not s:
        return JSON_VALUES
    if "$ref" in s:
        return instances(resolve(root, s["$ref"]), root, depth)
    if "enum" in s or "const" in s:
        return st.sampled_from(s["enum"] if "enum" in s else [s["const"]]).map(Lit)
    for key in ("anyOf", "oneOf"):
        if key in s:
            return st.one_of([instances(m, root, depth) for m in s[key]])
    if "allOf" in s:
        return instances(s["allOf"][0], root, depth)
    types = s["type"] if isinstance(s["type"], list) else [s["type"]]
    return st.one_of([typed(t, s, root, depth) for t in types])


def typed(t: str, s: dict[str, Any], root: Any, depth: int) -> st.SearchStrategy[Any]:
    if t == "object":
        props = s.get("properties")
        if not props:
            values = instances(s.get("additionalProperties", True), root, depth + 1)
            return st.dictionaries(KEYS, values, max_size=3)
        required = set(s.get("required", []))
        parts = [
            st.tuples(
                st.just(k),
                instances(sub, root, depth + 1),
                st.just(True) if k in required else st.booleans(),
            )
            for k, sub in props.items()
        ]
        return st.tuples(*parts).map(lambda kvs: {k: v for k, v, keep in kvs if keep})
    if t == "array":
        hi = s.get("maxItems", 3 if depth < 3 else 0)
        if hi == 0:  # also where a recursive schema bottoms out
            return st.just([])
        item = instances(s.get("items", True), root, depth + 1)
        return st.lists(item, min_size=s.get("minItems", 0), max_size=hi)
    if t == "string":
        lo = s.get("minLength", 0)
        return st.text(CHARS, min_size=lo, max_size=s.get("maxLength", lo + 6))
    if t == "integer":
        return st.integers(-(10**18), 10**18)
    if t == "number":
        return st.integers(-(10**9), 10**9) | st.floats(allow_nan=False, allow_infinity=False)
    if t == "boolean":
        return st.booleans()
    assert t == "null"
    return st.none()


def depth_of(v: Any) -> int:
    if isinstance(v, dict):
        return 1 + max(map(depth_of, v.values()), default=0)
    if isinstance(v, list):
        return 1 + max(map(depth_of, v), default=0)
    return 0


def has_astral(v: Any) -> bool:
    """Whether a value holds a character past U+FFFF (escaped as a surrogate pair)."""
    return any(ord(c) > 0xFFFF for c in json.dumps(v, ensure_ascii=False))


STYLES = st.fixed_dictionaries(
    {
        "indent": st.sampled_from([None, 0, 1, 2, 4, "\t", " \t"]),
        "separators": st.sampled_from([(",", ":"), (", ", ": "), (",", ": "), (", ", ":")]),
        "ensure_ascii": st.booleans(),
        "lead": st.sampled_from(["", " ", "\n", "\n\t  "]),
    }
)


def render(value: Any, style: dict[str, Any]) -> bytes:
    """`json.dumps` of a generated instance in `style`, enum / const members compact, as UTF-8.
    Indented output keeps `,` bare before its newlines (what `json.dumps(indent=...)` writes
    by default): a space before a newline is not a whitespace run the grammar generates."""
    lits: dict[str, str] = {}

    def mark(v: Any) -> Any:
        if isinstance(v, Lit):
            tag = f"\x00lit{len(lits)}\x00"
            lits[json.dumps(tag)] = json.dumps(v.value, ensure_ascii=False, separators=(",", ":"))
            return tag
        if isinstance(v, dict):
            return {k: mark(x) for k, x in v.items()}
        if isinstance(v, list):
            return [mark(x) for x in v]
        return v

    indent, (item_sep, key_sep) = style["indent"], style["separators"]
    width = 0 if indent is None else indent if isinstance(indent, int) else len(indent)
    if depth_of(plain(value)) * width > MAX_INDENT:
        indent = None
    if indent is not None:
        item_sep = ","
    text = json.dumps(
        mark(value),
        indent=indent,
        separators=(item_sep, key_sep),
        ensure_ascii=style["ensure_ascii"],
    )
    for tag, literal in lits.items():
        text = text.replace(tag, literal)
    return (style["lead"] + text).encode("utf-8")


# -- checks ---------------------------------------------------------------------------------------
def strict_loads(data: bytes) -> Any:
    """`json.loads` held to RFC 8259: UTF-8, and no NaN / Infinity."""
    return json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def validates(schema: Any, data: bytes) -> bool:
    """The oracle: `data` is one JSON value the schema admits."""
    try:
        value = strict_loads(data)
    except ValueError:
        return False
    return jsonschema.Draft202012Validator(schema).is_valid(value)


def walk(g: JsonGrammar, data: bytes) -> list[Any]:
    """The states after each prefix of `data`, the empty one first, up to the first refusal."""
    states = [g.start]
    for b in data:
        nxt = g.step(states[-1], b)
        if nxt is None:
            break
        states.append(nxt)
    return states


def assert_accepted(g: JsonGrammar, schema: Any, data: bytes) -> None:
    """Every prefix of `data` is alive, the whole is accepted, and wherever the grammar would
    let the output end, that prefix is a value the oracle admits."""
    states = walk(g, data)
    assert len(states) == len(data) + 1, f"refused at byte {len(states) - 1} of {data!r}"
    assert g.advance(g.start, data) == states[-1]
    assert g.accepts(states[-1]), data
    for n, state in enumerate(states):
        if g.accepts(state):
            assert validates(schema, data[:n]), data[:n]


def assert_sound(g: JsonGrammar, schema: Any, data: bytes) -> None:
    """Wherever the grammar would let `data` (or a prefix of it) end, the oracle agrees."""
    for n, state in enumerate(walk(g, data)):
        if g.accepts(state):
            assert validates(schema, data[:n]), data[:n]


@pytest.mark.parametrize("name", list(SCHEMAS))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_valid_instances_are_accepted(name: str, data: st.DataObject) -> None:
    """Instances the oracle admits, in the grammar's shape and any json.dumps layout within the
    whitespace bounds, are accepted with every prefix alive."""
    schema = SCHEMAS[name]
    value = data.draw(instances(schema, schema), label="value")
    style = data.draw(STYLES, label="style")
    jsonschema.validate(plain(value), schema)  # the generator's own check
    if has_astral(plain(value)) and "Length" in json.dumps(schema):
        style["ensure_ascii"] = False  # see test_surrogate_pair_escape_is_one_character
    assert_accepted(grammar(name), schema, render(value, style))


MUTATION_BYTES = list(b'{}[],:"\\ \n\t0129-+.eEtrufalsn\x01\x1fa') + ["é".encode(), b"\xff"]


@pytest.mark.parametrize("name", ["person", "matrix", "short_strings", "unions", "tree", "map"])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_instances_are_never_wrongly_accepted(name: str, data: st.DataObject) -> None:
    """A valid text with a few bytes inserted, deleted or replaced: wherever the grammar lets it
    (or a prefix of it) end, `json.loads` and the schema accept it."""
    schema = SCHEMAS[name]
    text = bytearray(render(data.draw(instances(schema, schema)), data.draw(STYLES)))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(text)))
        op = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = data.draw(st.sampled_from(MUTATION_BYTES))
        piece = bytes([piece]) if isinstance(piece, int) else piece
        if op == "insert":
            text[at:at] = piece
        elif op == "delete":
            del text[at : at + 1]
        else:
            text[at : at + 1] = piece
    assert_sound(grammar(name), schema, bytes(text))


REFUSED: list[tuple[str, Any]] = [
    # wrong types, missing or extra members, bounds
    ("person", {"name": "ab", "age": "3", "ok": True, "color": "red"}),
    ("person", {"name": "ab", "age": 3.5, "ok": True, "color": "red"}),
    ("person", {"name": "ab", "age": 3, "color": "red"}),
    ("person", {"name": "ab", "age": 3}),
    ("person", {}),
    ("person", {"name": "", "age": 3, "ok": True, "color": "red"}),
    ("person", {"name": "abcdefghi", "age": 3, "ok": True, "color": "red"}),
    ("person", {"name": "ab", "age": 3, "ok": 1, "color": "red"}),
    ("person", {"name": "ab", "age": 3, "ok": True, "color": "blue"}),
    ("person", {"name": "ab", "age": 3, "ok": True, "color": "red", "kind": "v2"}),
    ("person", {"name": "ab", "age": 3, "ok": True, "color": "red", "nothing": 0}),
    ("person", []),
    ("matrix", [[1], [2], [3], [4]]),
    ("matrix", [[1, 2, 3, 4]]),
    ("matrix", [[]]),
    ("matrix", [["1"]]),
    ("short_strings", ["a"]),
    ("short_strings", ["a", "bcd"]),
    ("short_strings", ["a", ""]),
    ("short_strings", ["日本", "日本人"]),
    ("short_strings", ["a", "b", "c", "d", "e"]),
    ("emoji", "😀"),
    ("emoji", "😀😀😀😀"),
    ("emoji", "é"),
    ("emoji", "éééé"),
    ("unions", {"a": 1, "b": 1, "c": None}),
    ("unions", {"a": None, "b": [True, False, True], "c": None}),
    ("unions", {"a": None, "b": "x", "c": None}),
    ("unions", {"a": None, "b": 1, "c": 2}),
    ("unions", {"a": None, "b": 1, "c": {"x": [1]}}),
    ("unions", {"a": None, "b": 1, "c": None, "d": "ab"}),
    ("tree", {"value": 1, "children": [{"children": []}]}),
    ("tree", {"value": 1, "children": [{}]}),
    ("unions", {"a": None, "b": 1}),
    ("nothing_in", [1]),
    ("tree", {"value": 1, "children": [{"value": "2"}]}),
    ("map", {"a": "1"}),
    ("map", {"a": [1]}),
    ("map", [1]),
]


@pytest.mark.parametrize("style_index", range(3))
@pytest.mark.parametrize(("name", "value"), REFUSED)
def test_instances_the_oracle_refuses_are_refused(name: str, value: Any, style_index: int) -> None:
    """Values against the schema (wrong type, missing required, too many items, too long or
    short strings, enum misses) are not accepted, in compact and indented layouts."""
    schema = SCHEMAS[name]
    assert not jsonschema.Draft202012Validator(schema).is_valid(value)
    styles: list[dict[str, Any]] = [
        {"indent": None, "separators": (",", ":"), "ensure_ascii": False, "lead": ""},
        {"indent": 2, "separators": (",", ": "), "ensure_ascii": False, "lead": "\n"},
        {"indent": None, "separators": (", ", ": "), "ensure_ascii": True, "lead": " "},
    ]
    style = styles[style_index]
    if has_astral(value):
        style["ensure_ascii"] = False  # see test_surrogate_pair_escape_is_one_character
    data = render(value, style)
    g = grammar(name)
    assert not g.accepts(g.advance(g.start, data)), data


BAD_TEXTS: list[tuple[str, bytes]] = [
    ("any", b"[1,2,]"),
    ("any", b'{"a":1,}'),
    ("any", b"[,1]"),
    ("any", b"[1,,2]"),
    ("any", b"01"),
    ("any", b"-01"),
    ("any", b"[00]"),
    ("any", b"-"),
    ("any", b"[-]"),
    ("any", b"1."),
    ("any", b"[1.]"),
    ("any", b"1e"),
    ("any", b"1e+"),
    ("any", b".5"),
    ("any", b"+1"),
    ("any", b"0x10"),
    ("any", b"NaN"),
    ("any", b"Infinity"),
    ("any", b"True"),
    ("any", b"nul"),
    ("any", b'"\\x41"'),
    ("any", b'"\\u12"'),
    ("any", b'"\\u12G4"'),
    ("any", b'"\\'),
    ("any", b'"a\nb"'),
    ("any", b'"\t"'),
    ("any", b'"\x00"'),
    ("any", b'"\x10"'),
    ("any", b'"a\x1f"'),
    ("any", b'{"\x1b":1}'),
    ("any", b'"abc'),
    ("any", b"'a'"),
    ("any", b"{a:1}"),
    ("any", b"{'a':1}"),
    ("any", b'{"a" 1}'),
    ("any", b'{"a":}'),
    ("any", b'{"a"}'),
    ("any", b"{1:2}"),
    ("any", b"[1]]"),
    ("any", b"[1"),
    ("any", b"{}x"),
    ("any", b"1 2"),
    ("any", b'"a""b"'),
    ("any", b""),
    ("any", b" "),
    ("any", b'"\xff"'),
    ("any", b'"\xc3"'),
    ("any", b'"\xc3\x28"'),
    ("any", b'"\x80"'),
    ("true", b"[1,]"),
    ("person", b'{"name":"ab","age":1,"ok":true,"color":"red",}'),
    ("person", b'{"name":"ab","age":01,"ok":true,"color":"red"}'),
    ("person", b'{name:"ab","age":1,"ok":true,"color":"red"}'),
    ("person", b'{"name":"\\x","age":1,"ok":true,"color":"red"}'),
    ("person", b'{"name":"a\tb","age":1,"ok":true,"color":"red"}'),
    ("person", b'{"name":"ab","age":1,"ok":true,"color":"red"}}'),
    ("map", b'{"a":-}'),
    ("map", b'{"a":1.}'),
    ("map", b'{"a":1,"b":}'),
    ("matrix", b"[[1],]"),
    ("matrix", b"[[1,]]"),
]


@pytest.mark.parametrize(("name", "data"), BAD_TEXTS)
def test_bad_json_is_refused(name: str, data: bytes) -> None:
    """Texts `json.loads` (or the schema) refuses: trailing commas, leading zeros, bare `-`,
    `1.`, invalid escapes, raw control characters, unquoted keys, bad UTF-8, trailing garbage."""
    schema = SCHEMAS[name]
    assert not validates(schema, data)
    g = grammar(name)
    assert not g.accepts(g.advance(g.start, data)), data
    assert_sound(g, schema, data)


OFF_THE_RULES: list[tuple[str, bytes]] = [
    ("any", b"{} "),
    ("any", b"{}\n"),
    ("any", b"1 "),
    ("any", b'"a"\t'),
    ("any", b"[1,  2]"),
    ("any", b"[1,  \n2]"),
    ("any", b"[1,\n\n2]"),
    ("any", b"[1,\t2]"),
    ("any", b"\r\n[1]"),
    ("person", b'{"age":1,"name":"ab","ok":true,"color":"red"}'),
    ("person", b'{"name":"ab","age":1,"ok":true,"color":"red","extra":1}'),
    ("person", b'{"name":"ab","age":1.0,"ok":true,"color":"red"}'),
    ("person", b'{"name":"ab","age":1,"ok":true,"color":"\\u65e5\\u672c"}'),
    ("person", b'{"\\u006eame":"ab","age":1,"ok":true,"color":"red"}'),
    ("unions", b'{"a":null,"b":1,"c":{"x": [1,"\xc3\xa9"]}}'),
    ("unions", b'{"a":null,"b":1,"c":{"x":[1,"\\u00e9"]}}'),
    ("any", b"1" * (MAX_NUMBER_BYTES + 1)),
]


@pytest.mark.parametrize(("name", "data"), OFF_THE_RULES)
def test_valid_json_off_the_generation_rules_is_refused(name: str, data: bytes) -> None:
    """Values the oracle admits but written otherwise than the grammar generates (whitespace
    after the value or beyond one run, keys out of order or unlisted, `1.0` for an integer,
    enum members not in compact text, over-long numbers) are not accepted."""
    schema = SCHEMAS[name]
    assert validates(schema, data)
    g = grammar(name)
    assert not g.accepts(g.advance(g.start, data)), data


@pytest.mark.parametrize(
    "data",
    [
        b'"\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9\\uD83D\\uDE00"',
        '"日本😀é\x7f"'.encode(),
        b"-0",
        b"-0.0e-0",
        b"1E+2",
        b"123.456e789",
        b"0.5",
        b"[]",
        b"{}",
        b'{"":{"":[]}}',
        b"[true,false,null]",
        b'[\n\t1, {"a" : 2}\n]',
        b' \n{"a":1}'[1:],
    ],
)
def test_json_syntax_corners_are_accepted(data: bytes) -> None:
    """Escapes (surrogate pairs included), raw UTF-8, DEL, every number form, empty containers
    and whitespace around `:` are accepted by the any-value grammar."""
    assert_accepted(grammar("any"), True, data)


# -- any JSON object ------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(value=st.dictionaries(KEYS, JSON_VALUES, max_size=4), style=STYLES)
def test_any_object_accepts_every_object(value: dict[str, Any], style: dict[str, Any]) -> None:
    """`json.dumps` of random nested dicts, in any layout within the whitespace bounds."""
    g = JsonGrammar.any_object()
    assert_accepted(g, {"type": "object"}, render(value, style))


@settings(max_examples=150, deadline=None)
@given(value=st.dictionaries(KEYS, JSON_VALUES, max_size=4), style=STYLES)
def test_compact_grammars_take_compact_json_only(
    value: dict[str, Any], style: dict[str, Any]
) -> None:
    """vLLM's disable_any_whitespace: the compact rendering is accepted, whitespace inside
    strings included; any layout with whitespace outside strings is refused at its first
    such byte, and the compact grammar refuses exactly the bytes the full one takes there."""
    compact, full = JsonGrammar.any_object(compact=True), JsonGrammar.any_object()
    tight = json.dumps(value, separators=(",", ":"), ensure_ascii=style["ensure_ascii"]).encode()
    assert_accepted(compact, {"type": "object"}, tight)
    loose = render(value, style)
    state, full_state = compact.start, full.start
    for i, b in enumerate(loose):
        after = compact.step(state, b)
        in_string = any(stack[-1][0] in ("str", "rxs") and stack[-1][2] == 1 for stack in state)
        if b in b" \t\n\r" and not in_string:
            assert after is None, (loose, i)
            break
        full_after = full.step(full_state, b)
        assert after is not None and after == full_after, (loose, i)
        assert full_after is not None
        state, full_state = after, full_after
    else:
        assert loose == tight or compact.accepts(state)
    small = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    }
    schema = JsonGrammar.from_schema(small, compact=True)
    assert schema.accepts(schema.advance(schema.start, b'{"name":"a b","age":3}'))
    assert schema.advance(schema.start, b'{"name": "a b"') is None


@settings(max_examples=100, deadline=None)
@given(value=JSON_VALUES.filter(lambda v: not isinstance(v, dict)), style=STYLES)
def test_any_object_refuses_other_values(value: Any, style: dict[str, Any]) -> None:
    """Arrays, strings, numbers, booleans and null at the top level are refused outright."""
    g = JsonGrammar.any_object()
    data = render(value, style)
    assert not g.accepts(g.advance(g.start, data))
    assert g.advance(g.start, data.lstrip(b" \n\t")[:1]) is None


@settings(max_examples=200, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=12),
        st.text(st.sampled_from('{}[]:,"\\ \n0-1.eatrufn'), max_size=16).map(str.encode),
        st.dictionaries(KEYS, JSON_VALUES, max_size=3).map(json.dumps).map(str.encode),
    ),
    cut=st.integers(0, 3),
    garbage=st.sampled_from([b"", b"}", b",", b" ", b"]", b'"', b"0"]),
)
def test_any_object_accepts_only_objects(data: bytes, cut: int, garbage: bytes) -> None:
    """Random text (and objects cut short or with bytes after them): wherever the grammar
    would let it end, `json.loads` gives a dict."""
    g = JsonGrammar.any_object()
    text = (data[: len(data) - cut] if cut else data) + garbage
    for n, state in enumerate(walk(g, text)):
        if g.accepts(state):
            try:
                value = strict_loads(text[:n])
            except ValueError:
                pytest.fail(f"accepted {text[:n]!r}")
            assert isinstance(value, dict), text[:n]


# -- schema errors --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("schema", "keyword"),
    [
        ({"type": "string", "pattern": "(a)\\1"}, "pattern"),
        ({"type": "string", "pattern": "(?=a)b"}, "pattern"),
        ({"type": "number", "multipleOf": 2}, "multipleOf"),
        ({"type": "integer", "minimum": 0}, "minimum"),
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"type": "array", "prefixItems": [{"type": "integer"}]}, "prefixItems"),
        ({"$ref": "https://example.com/schema.json"}, "$ref"),
        ({"$ref": "#/$defs/missing", "$defs": {}}, "$ref"),
        ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "required"),
        (False, "false"),
        ({"type": "foo"}, "type"),
        ({"type": ["string", "foo"]}, "type"),
        ({"type": "string", "minLength": 3, "maxLength": 2}, "maxLength"),
        ({"type": "array", "minItems": 3, "maxItems": 2}, "maxItems"),
        ({"type": "string", "maxLength": -1}, "maxLength"),
        ({"type": "string", "minItems": 1}, "minItems"),
        ({"properties": {"a": {"type": "string", "pattern": "x\\b"}}}, "#/properties/a/pattern"),
        ({"items": {"not": {}}}, "#/items"),
        ({"anyOf": [{"type": "null"}, {"multipleOf": 2}]}, "#/anyOf/1"),
    ],
)
def test_unsupported_schemas_name_the_keyword(schema: Any, keyword: str) -> None:
    """Keywords the grammar cannot hold raise SchemaError (a ValueError) naming the keyword
    and where it is."""
    with pytest.raises(SchemaError, match=re.escape(keyword)):
        compile_schema(schema)
    with pytest.raises(ValueError):
        JsonGrammar.from_schema(schema)


def test_annotations_are_ignored() -> None:
    """`format`, `title`, `description`, `default`, `examples` do not change what is
    generated."""
    bare = JsonGrammar.from_schema({"type": "string", "maxLength": 2})
    annotated = JsonGrammar.from_schema(
        {
            "type": "string",
            "maxLength": 2,
            "format": "date",
            "title": "t",
            "description": "d",
            "default": "x",
            "examples": ["a"],
            "$comment": "c",
        }
    )
    for data in [b'"ab"', b'"abc"', b'"', b"1", b'""']:
        assert bare.accepts(bare.advance(bare.start, data)) == annotated.accepts(
            annotated.advance(annotated.start, data)
        )


# -- limits ---------------------------------------------------------------------------------------
def test_max_depth() -> None:
    """Arrays and objects nest MAX_DEPTH deep, not deeper."""
    g = grammar("any")
    assert_accepted(g, True, b"[" * MAX_DEPTH + b"]" * MAX_DEPTH)
    assert g.advance(g.start, b"[" * (MAX_DEPTH + 1)) is None
    obj = JsonGrammar.any_object()
    nested = b'{"a":' * MAX_DEPTH + b"1" + b"}" * MAX_DEPTH
    assert_accepted(obj, True, nested)
    assert obj.advance(obj.start, b'{"a":' * MAX_DEPTH + b"{") is None
    assert obj.advance(obj.start, b'{"a":' * MAX_DEPTH + b"[") is None
    assert obj.advance(obj.start, b'{"a":' * MAX_DEPTH + b'"s"') is not None  # strings don't nest


def test_max_indent() -> None:
    """A whitespace run is one space, or (after at most one space: the trailing space of
    `json.dumps(indent=2, separators=(", ", ": "))`) a newline then at most MAX_INDENT spaces
    or tabs."""
    g = grammar("any")
    for pad in (b" " * MAX_INDENT, b"\t" * MAX_INDENT, b" \t" * (MAX_INDENT // 2)):
        assert_accepted(g, True, b"[\n" + pad + b"1\n" + pad + b"]")
        assert_accepted(g, True, b"\n" + pad + b"{\n" + pad + b'"a"\n' + pad + b":\n" + pad + b"1}")
    assert g.advance(g.start, b"[\n" + b" " * (MAX_INDENT + 1)) is None
    assert g.advance(g.start, b"\n" + b"\t" * (MAX_INDENT + 1)) is None
    assert g.advance(g.start, b"[  ") is None
    assert_accepted(g, True, b"[1, \n  2]")
    assert g.advance(g.start, b"[  \n") is None
    assert g.advance(g.start, b"[\n\n") is None
    assert g.advance(g.start, b"[\t") is None


def test_max_number_bytes() -> None:
    """Numbers run to MAX_NUMBER_BYTES bytes, sign, fraction and exponent included."""
    number = JsonGrammar.from_schema({"type": "number"})
    integer = JsonGrammar.from_schema({"type": "integer"})
    longest = b"-1." + b"2" * (MAX_NUMBER_BYTES - 7) + b"e+10"
    assert len(longest) == MAX_NUMBER_BYTES
    assert_accepted(number, {"type": "number"}, longest)
    assert number.advance(number.start, longest + b"0") is None
    assert_accepted(integer, {"type": "integer"}, b"9" * MAX_NUMBER_BYTES)
    assert integer.advance(integer.start, b"9" * (MAX_NUMBER_BYTES + 1)) is None
    matrix = grammar("matrix")
    assert_accepted(matrix, SCHEMAS["matrix"], b"[[" + b"1" * MAX_NUMBER_BYTES + b"]]")
    assert matrix.advance(matrix.start, b"[[" + b"1" * (MAX_NUMBER_BYTES + 1)) is None


# -- ended ----------------------------------------------------------------------------------------
def test_ended_after_the_top_level_value() -> None:
    """`ended` once the top-level object closes (then nothing may follow); a number may always
    grow, so after `12` the output may end (`accepts`) but need not (`ended` is False)."""
    g = grammar("person")
    data = b'{"name":"ab","age":1,"ok":true,"color":"red"}'
    states = walk(g, data)
    assert g.ended(states[-1]) and g.accepts(states[-1])
    assert not any(g.ended(s) for s in states[:-1])
    for b in b' \n}],"1':
        assert g.step(states[-1], b) is None
    integer = JsonGrammar.from_schema({"type": "integer"})
    after = integer.advance(integer.start, b"12")
    assert integer.accepts(after) and not integer.ended(after)
    assert integer.advance(after, b"3") is not None
    string = JsonGrammar.from_schema({"enum": ["a", "ab"]})
    assert string.ended(string.advance(string.start, b'"ab"'))
    assert not string.accepts(string.advance(string.start, b'"a'))
    assert not g.ended(None) and not g.accepts(None)


# -- no dead ends ---------------------------------------------------------------------------------
DEAD_END_NAMES = ["person", "matrix", "short_strings", "emoji", "unions"]
"""SCHEMAS small enough to explore whole (no recursion, no free-form values)."""


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "minLength": 1, "maxLength": 2},
        {"type": "integer"},
        {"type": "number"},
        {"type": "array", "items": {"type": "string", "maxLength": 1}, "maxItems": 2},
        {"anyOf": [{"type": "string", "maxLength": 1}, {"type": "number"}, {"const": [1]}]},
        {
            "type": "object",
            "properties": {"a": {"enum": ["x", "xy", 1]}, "b": {"type": "boolean"}},
            "required": ["b"],
        },
        {"type": "string", "pattern": "^[a-c]é{1,2}(日|x)?$", "maxLength": 3},
        *(SCHEMAS[name] for name in DEAD_END_NAMES),
    ],
    ids=[
        "string",
        "integer",
        "number",
        "array",
        "anyOf",
        "object",
        "pattern",
        *DEAD_END_NAMES,
    ],  # fmt: skip
)
def test_every_state_can_be_finished(schema: Any) -> None:
    """Every state any bytes reach (all 256 tried from each) can still reach an accepting one:
    the grammar never takes a byte after which no value can be finished (a string at its
    maxLength taking an escape, a number at MAX_NUMBER_BYTES taking a '.' or an 'e')."""
    g = JsonGrammar.from_schema(schema)
    edges: dict[Any, set[Any]] = {g.start: set()}
    todo = [g.start]
    while todo:
        state = todo.pop()
        for b in range(256):
            nxt = g.step(state, b)
            if nxt is not None:
                edges[state].add(nxt)
                if nxt not in edges:
                    edges[nxt] = set()
                    todo.append(nxt)
        assert len(edges) < 20_000
    back: dict[Any, list[Any]] = {s: [] for s in edges}
    for state, succ in edges.items():
        for nxt in succ:
            back[nxt].append(state)
    done = {s for s in edges if g.accepts(s)}
    todo = list(done)
    while todo:
        for prev in back[todo.pop()]:
            if prev not in done:
                done.add(prev)
                todo.append(prev)
    stuck = [s for s in edges if s not in done]
    assert not stuck, f"{len(stuck)} of {len(edges)} states cannot be finished"


def test_regex_answers_can_always_be_finished() -> None:
    """The same for whole answers held to a pattern (`guided_regex`)."""
    for pattern in [r"(yes|no)(, [a-z]{1,3})?", r"[^\n]{0,2}日", r"\d+(\.\d{1,2})?"]:
        g = JsonGrammar.from_regex(pattern)
        seen, todo = {g.start}, [g.start]
        while todo:
            state = todo.pop()
            nexts = [n for b in range(256) if (n := g.step(state, b)) is not None]
            assert nexts or g.accepts(state), pattern
            for n in nexts:
                if n not in seen and len(seen) < 1_500:
                    seen.add(n)
                    todo.append(n)


@pytest.mark.parametrize(
    ("schema", "good", "bad"),
    [
        ({"type": "string", "pattern": "^\\d{4}-\\d{2}$"}, ['"2024-03"'],
         ['"2024-3"', '"2024-03-"', '"2024\\u002d03"']),
        ({"type": "string", "pattern": "(é|ab)+", "maxLength": 3}, ['"éab"', '"ééé"'],
         ['"ababab"', '""', '"x"']),
        ({"type": "string", "pattern": "[^a-z]+", "minLength": 2}, ['"日本"', '"A1"'],
         ['"A"', '"Ab"']),
    ],
)  # fmt: skip
def test_pattern_strings(schema: dict[str, Any], good: list[str], bad: list[str]) -> None:
    """A string with a pattern: whole matches only, written without escapes, within its
    length bounds; jsonschema agrees with every one it takes."""
    g = JsonGrammar.from_schema(schema)
    for text in good:
        assert g.accepts(g.advance(g.start, text.encode())), text
        jsonschema.validate(json.loads(text), schema)
    for text in bad:
        assert not g.accepts(g.advance(g.start, text.encode())), text


# -- string runs ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("schema", "prefix", "count", "left"),
    [
        ({"type": "string"}, b'"', 0, None),
        ({"type": "string"}, b'"abc', 0, None),
        ({"type": "string", "maxLength": 5}, '"é日'.encode(), 2, 3),
        ({"type": "string", "minLength": 3}, b'"a\\n', 2, None),
        ({"type": "string", "minLength": 3}, b'"abcdef', 3, None),
        (SCHEMAS["person"], b'{"name":"a', 1, 7),
    ],
)
def test_string_run_matches_stepping(schema: Any, prefix: bytes, count: int, left: Any) -> None:
    """Inside a string's content, `string_run` gives (characters so far, characters left), and
    `after_string_run` is the state stepping plain characters reaches."""
    g = JsonGrammar.from_schema(schema)
    state = g.advance(g.start, prefix)
    assert state is not None
    assert g.string_run(state) == (count, left)
    for text in ["", "x", "é", "日本", "😀 x", "abcde"]:
        if left is not None and len(text) > left:
            assert g.advance(state, text.encode()) is None
            continue
        assert g.advance(state, text.encode()) == g.after_string_run(state, len(text))
    for outside in [b'"a\\', b'"\\u00', '"é'.encode()[:2], b'"ab"', b"[", b"1", b"{"]:
        inside = g.advance(g.start, outside)
        if inside is not None:
            assert g.string_run(inside) is None


# -- strings' characters --------------------------------------------------------------------------
def test_surrogate_escapes_only_where_length_is_not_counted() -> None:
    """JSON Schema counts "\\uD83D\\uDE00" as one character (U+1F600), the grammar's count
    would say two: a string with a length bound takes no surrogate escape (the character is
    written as UTF-8 instead); other escapes and unbounded strings are unaffected."""
    g = JsonGrammar.from_schema({"type": "string", "minLength": 2})
    assert g.advance(g.start, b'"\\ud83d') is None
    assert g.accepts(g.advance(g.start, b'"\\ud7ff\\u00e9"'))
    assert g.accepts(g.advance(g.start, '"😀é"'.encode()))
    free = JsonGrammar.from_schema({"type": "string"})
    assert free.accepts(free.advance(free.start, b'"\\ud83d\\ude00"'))


@pytest.mark.parametrize("bad", [b"\xed\xa0\x80", b"\xe0\x80\x80", b"\xf4\x90\x80\x80"])
def test_invalid_utf8_is_refused(bad: bytes) -> None:
    """Byte sequences UTF-8 forbids are not string content (decoded with replacement they
    become several U+FFFD, past a maxLength of 1), in bounded and free strings alike; the
    edge characters just inside the ranges pass."""
    schema = {"type": "string", "maxLength": 1}
    data = b'"' + bad + b'"'
    assert not validates(schema, data)
    for g in (JsonGrammar.from_schema(schema), JsonGrammar.from_schema({"type": "string"})):
        assert not g.accepts(g.advance(g.start, data))
        for ok in ("\u0800", "\ud7ff", "\ue000", "\U00010000", "\U0010ffff"):
            assert g.accepts(g.advance(g.start, f'"{ok}"'.encode())), ascii(ok)
