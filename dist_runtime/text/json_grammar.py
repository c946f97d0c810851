"""JSON output held to a JSON Schema, or to any JSON object: the grammar.

A schema compiles once to a tree of nodes (`compile_schema`); `JsonGrammar` then says, byte by
byte, whether an output can still become a value the schema accepts. It is a pushdown
recogniser: a state is a set of parse stacks (a set, because `anyOf` and enum members may
share a prefix), each stack a tuple of frames, one per open value. Every (state, byte)
transition is cached, so walking a vocabulary's byte trie from a state
(`dist_runtime.text.guided`) is mostly a dict lookup per trie edge.

What is generated:
* whitespace before the value and around every `{ } [ ] , :`: one space, or (after at most one
  space) a newline and up to `MAX_INDENT` spaces or tabs (compact, `json.dumps` and indented
  output all fit; padding without end, which weak models fall into, does not); none after the
  top-level value, so the output ends with it;
* objects: the schema's `properties` in the order it lists them, each required one present,
  optional ones skippable, no other keys; an object schema without `properties` takes any keys,
  with values of its `additionalProperties` schema (any value when that is absent or true);
* strings: `minLength` / `maxLength` in characters, escapes, well-formed UTF-8 (a string with
  a length bound takes no `\ud800`-`\udfff` escapes: the character itself is written); numbers
  in JSON's syntax (at most `MAX_NUMBER_BYTES` bytes), integers without fraction or exponent;
* `enum` / `const` as their compact JSON text; `anyOf` (and `oneOf`, generated as `anyOf`),
  `allOf` with one member, `$ref` into `$defs` / `definitions` (recursion included), `type`
  lists; nesting to `MAX_DEPTH`.

* `pattern` (`dist_runtime.text.regex`'s subset): such a string's characters are written as
  themselves, not escaped, and its content matches the pattern whole.

Keywords that constrain values in ways this grammar cannot hold (`minimum`, `uniqueItems`,
`multipleOf`, ...) are refused with `SchemaError`, which names the keyword and where it is;
annotations (`title`, `description`, `default`, `examples`, `format`, ...) are ignored, as
JSON Schema's own validators do by default for `format`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from dist_runtime.text.gbnf import Chars, compile_gbnf, rules_of
from dist_runtime.text.regex import Regex, RegexError

MAX_INDENT = 24
"""Spaces or tabs after a newline in one whitespace run (indented output up to some depth
fits; a run of padding that never ends does not)."""
MAX_DEPTH = 24
"""Deepest nesting of arrays and objects an output may reach."""
MAX_NUMBER_BYTES = 24
"""Longest number, sign, fraction and exponent included."""
MAX_GRAMMAR_DEPTH = 256
"""Deepest stack of open rules a GBNF grammar's parse may reach (nested, not repeated: a
repetition and a rule's last item reuse their frame)."""
MAX_CACHE = 500_000
"""Cached transitions per grammar before the cache is dropped and refilled."""

_ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$schema",
        "$id",
        "$comment",
        "deprecated",
        "readOnly",
        "writeOnly",
        "format",
        "contentMediaType",
        "contentEncoding",
        "$defs",
        "definitions",
        "discriminator",
        "strict",
    }
)
_TYPE_KEYWORDS = {
    "object": {"properties", "required", "additionalProperties"},
    "array": {"items", "minItems", "maxItems"},
    "string": {"minLength", "maxLength", "pattern"},
    "integer": set(),
    "number": set(),
    "boolean": set(),
    "null": set(),
}
_COMBINERS = {"type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref"}
_SUPPORTED = sorted(_COMBINERS | set().union(*_TYPE_KEYWORDS.values()))


class SchemaError(ValueError):
    """A schema this grammar cannot hold to; the message names the keyword and its place."""


# -- nodes ----------------------------------------------------------------------------------------
class Node:
    """A compiled schema. Nodes compare by identity: a stack frame names its node."""

    __slots__ = ()


class AnyValue(Node):
    __slots__ = ()


class ObjectNode(Node):
    __slots__ = ("props", "extra", "required_from")

    def __init__(self, props: tuple[tuple[bytes, Node, bool], ...], extra: Node | None):
        self.props = props
        """(key as JSON text with its quotes, value node, required), in generation order."""
        self.extra = extra
        """Value node of free keys (no `properties`), else None."""
        # required_from[i]: some property at index >= i is required
        req = [False] * (len(props) + 1)
        for i in range(len(props) - 1, -1, -1):
            req[i] = req[i + 1] or props[i][2]
        self.required_from = tuple(req)

    def key_candidates(self, start: int) -> list[int]:
        """Indices of the properties that may come next after properties [0, start)."""
        out = []
        for j in range(start, len(self.props)):
            out.append(j)
            if self.props[j][2]:
                break
        return out


class ArrayNode(Node):
    __slots__ = ("item", "min_items", "max_items")

    def __init__(self, item: Node, min_items: int, max_items: int | None):
        self.item, self.min_items, self.max_items = item, min_items, max_items


class StringNode(Node):
    __slots__ = ("min_len", "max_len", "regex")

    def __init__(self, min_len: int = 0, max_len: int | None = None, regex: Regex | None = None):
        self.min_len, self.max_len, self.regex = min_len, max_len, regex

    @property
    def counts(self) -> bool:
        return self.min_len > 0 or self.max_len is not None


class NumberNode(Node):
    __slots__ = ("integer",)

    def __init__(self, integer: bool):
        self.integer = integer


class LiteralNode(Node):
    """`enum` / `const` members (and booleans) as one byte trie: a value is one parse however
    many members share its prefix."""

    __slots__ = ("options", "trie", "ends")

    def __init__(self, options: Iterable[bytes]):
        self.options = tuple(dict.fromkeys(options))
        self.trie: list[dict[int, int]] = [{}]
        ends = set()
        for text in self.options:
            pos = 0
            for b in text:
                nxt = self.trie[pos].get(b)
                if nxt is None:
                    nxt = self.trie[pos][b] = len(self.trie)
                    self.trie.append({})
                pos = nxt
            ends.add(pos)
        self.ends = frozenset(ends)


class AnyOfNode(Node):
    __slots__ = ("options",)

    def __init__(self, options: tuple[Node, ...]):
        self.options = options


class RefNode(Node):
    __slots__ = ("target", "name")

    def __init__(self, name: str):
        self.name = name
        self.target: Node | None = None


_ANY = AnyValue()
_FREE_STRING = StringNode()
_ANY_OBJECT = ObjectNode((), _ANY)
_ANY_ARRAY = ArrayNode(_ANY, 0, None)


def json_text(value: Any) -> bytes:
    """A JSON value's compact text, as `enum` / `const` members are generated."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# -- schema -> nodes ------------------------------------------------------------------------------
def compile_schema(schema: Any) -> Node:
    """Nodes for a JSON Schema (a dict or a bool); `SchemaError` for what cannot be held."""
    return _Compiler(schema).node(schema, "#")


class _Compiler:
    def __init__(self, root: Any):
        self.root = root
        self.refs: dict[str, RefNode] = {}

    def node(self, s: Any, where: str) -> Node:
        if s is True:
            return _ANY
        if s is False:
            raise SchemaError(f"{where}: the schema false admits no value")
        if not isinstance(s, Mapping):
            raise SchemaError(
                f"{where}: a schema must be an object or a boolean, got {type(s).__name__}"
            )
        unknown = [k for k in s if k not in _ANNOTATIONS and k not in _COMBINERS]
        unknown = [k for k in unknown if not any(k in kw for kw in _TYPE_KEYWORDS.values())]
        if unknown:
            raise SchemaError(
                f"{where}: JSON Schema keyword {unknown[0]!r} is not supported in guided "
                f"output; supported: {', '.join(_SUPPORTED)} (and annotations such as "
                "description)"
            )
        if "$ref" in s:
            others = [k for k in s if k not in _ANNOTATIONS and k != "$ref"]
            if others:
                raise SchemaError(f"{where}: $ref beside {others[0]!r} is not supported")
            return self.ref(s["$ref"], where)
        if "enum" in s or "const" in s:
            values = s["enum"] if "enum" in s else [s["const"]]
            if not isinstance(values, list) or not values:
                raise SchemaError(f"{where}/enum: must be a non-empty list")
            return LiteralNode(json_text(v) for v in values)
        for key in ("anyOf", "oneOf"):
            if key in s:
                members = s[key]
                if not isinstance(members, list) or not members:
                    raise SchemaError(f"{where}/{key}: must be a non-empty list of schemas")
                rest = {k: v for k, v in s.items() if k != key and k not in _ANNOTATIONS}
                if rest:
                    raise SchemaError(
                        f"{where}: {key} beside {next(iter(rest))!r} is not supported; move "
                        f"it into each member of {key}"
                    )
                return AnyOfNode(
                    tuple(self.node(m, f"{where}/{key}/{i}") for i, m in enumerate(members))
                )
        if "allOf" in s:
            members = s["allOf"]
            rest = {k: v for k, v in s.items() if k != "allOf" and k not in _ANNOTATIONS}
            if not isinstance(members, list) or len(members) != 1 or rest:
                raise SchemaError(
                    f"{where}/allOf: only a single-member allOf with nothing beside it is supported"
                )
            return self.node(members[0], f"{where}/allOf/0")
        types = s.get("type")
        if types is None:
            if "properties" in s or "additionalProperties" in s or "required" in s:
                types = "object"
            elif "items" in s or "minItems" in s or "maxItems" in s:
                types = "array"
            elif "minLength" in s or "maxLength" in s:
                types = "string"
            else:
                return _ANY
        names = types if isinstance(types, list) else [types]
        if not names or not all(isinstance(t, str) and t in _TYPE_KEYWORDS for t in names):
            raise SchemaError(
                f"{where}/type: {types!r} is not a JSON Schema type; use one or a list of "
                f"{', '.join(_TYPE_KEYWORDS)}"
            )
        mine = set().union(*(_TYPE_KEYWORDS[t] for t in names))
        for k in s:
            if k not in mine and k not in _ANNOTATIONS and k != "type":
                raise SchemaError(f"{where}: keyword {k!r} does not apply to type {types!r}")
        nodes = tuple(self.typed(t, s, where) for t in dict.fromkeys(names))
        return nodes[0] if len(nodes) == 1 else AnyOfNode(nodes)

    def typed(self, t: str, s: Mapping[str, Any], where: str) -> Node:
        if t == "object":
            return self.object(s, where)
        if t == "array":
            item = self.node(s.get("items", True), f"{where}/items")
            lo = _count(s, "minItems", where, 0)
            hi = _count(s, "maxItems", where, None)
            if hi is not None and hi < lo:
                raise SchemaError(f"{where}: maxItems {hi} < minItems {lo}")
            return ArrayNode(item, lo, hi)
        if t == "string":
            lo = _count(s, "minLength", where, 0)
            hi = _count(s, "maxLength", where, None)
            if hi is not None and hi < lo:
                raise SchemaError(f"{where}: maxLength {hi} < minLength {lo}")
            regex = None
            if "pattern" in s:
                try:
                    regex = Regex(s["pattern"])
                except RegexError as e:
                    raise SchemaError(f"{where}/pattern: {e}") from None
            return StringNode(lo, hi, regex) if lo or hi is not None or regex else _FREE_STRING
        if t in ("integer", "number"):
            return NumberNode(integer=t == "integer")
        if t == "boolean":
            return LiteralNode([b"true", b"false"])
        return LiteralNode([b"null"])

    def object(self, s: Mapping[str, Any], where: str) -> Node:
        props = s.get("properties", {})
        required = s.get("required", [])
        if not isinstance(props, Mapping):
            raise SchemaError(f"{where}/properties: must be an object")
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise SchemaError(f"{where}/required: must be a list of property names")
        missing = [r for r in required if r not in props]
        if missing:
            raise SchemaError(
                f"{where}/required: {missing[0]!r} is not in properties; guided output "
                "generates only the properties a schema lists"
            )
        extra_schema = s.get("additionalProperties", True)
        if not props:
            if extra_schema is False:
                return ObjectNode((), None)
            return ObjectNode((), self.node(extra_schema, f"{where}/additionalProperties"))
        members = tuple(
            (json_text(name), self.node(sub, f"{where}/properties/{name}"), name in required)
            for name, sub in props.items()
        )
        return ObjectNode(members, None)

    def ref(self, ref: Any, where: str) -> Node:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise SchemaError(
                f"{where}/$ref: {ref!r} is not supported; only references inside the schema "
                "(#, #/$defs/..., #/definitions/...)"
            )
        if ref in self.refs:
            return self.refs[ref]
        node = self.refs[ref] = RefNode(ref)
        target: Any = self.root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, Mapping) or part not in target:
                raise SchemaError(f"{where}/$ref: {ref!r} points at nothing in the schema")
            target = target[part]
        node.target = self.node(target, ref)
        return node


def _count(s: Mapping[str, Any], key: str, where: str, default: int | None) -> Any:
    value = s.get(key, default)
    if value is default:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SchemaError(f"{where}/{key}: must be a non-negative integer, got {value!r}")
    return value


# -- the recogniser -------------------------------------------------------------------------------
# Frames (tuples; a node is compared by identity):
#   ("root", node, phase, ws)                 phase 0 before the value, 2 in it, 1 after it
#   ("obj", node, phase, idx, n, ws)          see _OBJ_* ; idx: the property in hand / next
#   ("arr", node, phase, n, ws)               see _ARR_*
#   ("str", node, phase, nchars, pending)     see _step_str
#   ("lit", text, pos)                        one text (a property's key)
#   ("enum", node, pos)                       a LiteralNode's members, pos a node of its trie
#   ("num", integer, phase, nbytes)           see _num
#   ("cfg", seq, pos, pending, cp)            a GBNF alternative before its item pos, see _step_cfg
(_OBJ_OPEN, _OBJ_FIRST, _OBJ_KEY, _OBJ_COLON, _OBJ_VALUE, _OBJ_IN_VALUE, _OBJ_AFTER,
 _OBJ_NEXT) = range(8)  # fmt: skip
_ARR_OPEN, _ARR_FIRST, _ARR_ITEM, _ARR_AFTER, _ARR_NEXT = range(5)
_NEWLINE_RUN = 1 << 20
_DIGITS = frozenset(b"0123456789")
_ESCAPES = frozenset(b'"\\/bfnrt')
_HEX = frozenset(b"0123456789abcdefABCDEF")
# step results: (kind, ...) with kind one of
_NEXT = 0  # (NEXT, frame): the byte is consumed, the frame replaces the top
_PUSH = 1  # (PUSH, frame, children): the top becomes frame, then each child takes the byte
_DONE = 2  # (DONE,): the top value ended before this byte; its parent takes the byte
_CLOSE = 3  # (CLOSE,): the byte ends the top value
_REPLACE = 4  # (REPLACE, children): the top is done once a child is; each child takes the byte

Stack = tuple[tuple[Any, ...], ...]


def _start(node: Node) -> list[tuple[Any, ...]]:
    """Frames that can begin a value of `node`."""
    if isinstance(node, RefNode):
        assert node.target is not None
        return _start(node.target)
    if isinstance(node, AnyOfNode):
        return [f for option in node.options for f in _start(option)]
    if isinstance(node, ObjectNode):
        return [("obj", node, _OBJ_OPEN, 0, 0, 0)]
    if isinstance(node, ArrayNode):
        return [("arr", node, _ARR_OPEN, 0, 0)]
    if isinstance(node, StringNode):
        if node.regex is not None:
            return [("rxs", node, 0, 0, node.regex.start, 0, 0)]
        return [("str", node, 0, 0, 0)]
    if isinstance(node, NumberNode):
        return [("num", node.integer, 0, 0)]
    if isinstance(node, LiteralNode):
        return [("enum", node, 0)]
    assert isinstance(node, AnyValue)
    return [
        ("obj", _ANY_OBJECT, _OBJ_OPEN, 0, 0, 0),
        ("arr", _ANY_ARRAY, _ARR_OPEN, 0, 0),
        ("str", _FREE_STRING, 0, 0, 0),
        ("num", False, 0, 0),
        ("lit", b"true", 0),
        ("lit", b"false", 0),
        ("lit", b"null", 0),
    ]


def _ws(frame: tuple[Any, ...], b: int, ws_index: int) -> list[tuple[Any, ...]] | None:
    """Whitespace in a frame whose field `ws_index` holds the run so far (0: none; n: n
    spaces; _NEWLINE_RUN + n: a newline and n spaces or tabs): a NEXT result, [] when the run
    may not take `b`, None when `b` is not JSON whitespace a run can hold."""
    ws = frame[ws_index]
    if b == 0x0A:  # (after at most one space: `json.dumps(indent=..., separators=(", ", ...))`)
        ok, new = ws <= 1, _NEWLINE_RUN
    elif b == 0x20 or b == 0x09:
        if ws >= _NEWLINE_RUN:
            ok, new = ws - _NEWLINE_RUN < MAX_INDENT, ws + 1
        else:
            ok, new = b == 0x20 and ws == 0, 1
    else:
        return None
    return [(_NEXT, frame[:ws_index] + (new,))] if ok else []


def _step_obj(f: tuple[Any, ...], b: int) -> list[tuple[Any, ...]]:
    _, node, phase, idx, n, _ = f
    if phase == _OBJ_OPEN:
        return [(_NEXT, ("obj", node, _OBJ_FIRST, 0, 0, 0))] if b == 0x7B else []
    if phase != _OBJ_KEY and phase != _OBJ_IN_VALUE:
        ws = _ws(f, b, 5)
        if ws is not None:
            return ws
    if phase in (_OBJ_FIRST, _OBJ_NEXT):
        if b == 0x7D and phase == _OBJ_FIRST and not node.required_from[idx]:
            return [(_CLOSE,)]
        if b != 0x22:
            return []
        if node.extra is not None:
            return [(_PUSH, ("obj", node, _OBJ_KEY, 0, n, 0), [("str", _FREE_STRING, 0, 0, 0)])]
        return [
            (_PUSH, ("obj", node, _OBJ_KEY, j, n, 0), [("lit", node.props[j][0], 0)])
            for j in node.key_candidates(idx)
        ]
    if phase == _OBJ_COLON:
        return [(_NEXT, ("obj", node, _OBJ_VALUE, idx, n, 0))] if b == 0x3A else []
    if phase == _OBJ_VALUE:
        value = node.extra if node.extra is not None else node.props[idx][1]
        return [(_PUSH, ("obj", node, _OBJ_IN_VALUE, idx, n, 0), _start(value))]
    if phase == _OBJ_AFTER:
        if b == 0x7D:
            return [] if node.required_from[idx] else [(_CLOSE,)]
        if b == 0x2C and (node.extra is not None or idx < len(node.props)):
            return [(_NEXT, ("obj", node, _OBJ_NEXT, idx, n, 0))]
        return []
    return []  # a child is on top: never stepped


def _step_arr(f: tuple[Any, ...], b: int) -> list[tuple[Any, ...]]:
    _, node, phase, n, _ = f
    if phase == _ARR_OPEN:
        return [(_NEXT, ("arr", node, _ARR_FIRST, 0, 0))] if b == 0x5B else []
    ws = _ws(f, b, 4)
    if ws is not None:
        return ws
    if phase == _ARR_FIRST and b == 0x5D:
        return [(_CLOSE,)] if node.min_items == 0 else []
    if phase in (_ARR_FIRST, _ARR_NEXT):
        if node.max_items is not None and n >= node.max_items:
            return []
        return [(_PUSH, ("arr", node, _ARR_ITEM, n, 0), _start(node.item))]
    if phase == _ARR_AFTER:
        if b == 0x5D:
            return [(_CLOSE,)] if n >= node.min_items else []
        if b == 0x2C and (node.max_items is None or n < node.max_items):
            return [(_NEXT, ("arr", node, _ARR_NEXT, n, 0))]
    return []


# UTF-8's allowed second bytes after the lead bytes that restrict them (no overlong forms, no
# surrogates, nothing past U+10FFFF); a string frame's `pending` holds the continuation bytes
# still due in its low two bits and, for the first of them, an index into this table above.
_SECOND_BYTE = ((0x80, 0xBF), (0xA0, 0xBF), (0x80, 0x9F), (0x90, 0xBF), (0x80, 0x8F))
_LEAD_RANGE = {0xE0: 1, 0xED: 2, 0xF0: 3, 0xF4: 4}
_KIND_LOW = (0, 0x800, 0, 0x10000, 0)  # the code points a restricted lead byte can still give
_KIND_HIGH = (0x10FFFF, 0x10FFFF, 0xD7FF, 0x10FFFF, 0x10FFFF)


def _step_str(f: tuple[Any, ...], b: int) -> list[tuple[Any, ...]]:
    # phases: 0 before '"', 1 content, 2 after '\', 3 after '\u', 4-6 after 1-3 hex digits,
    # 7 after '\uD' in a counted string (no surrogate escapes there: a pair would count as two
    # characters here and one in JSON Schema; the character itself can be written instead)
    _, node, phase, nchars, pending = f
    if phase == 0:
        return [(_NEXT, ("str", node, 1, 0, 0))] if b == 0x22 else []
    if phase == 1:
        if pending:
            lo, hi = _SECOND_BYTE[pending >> 2]
            if lo <= b <= hi:
                return [(_NEXT, ("str", node, 1, nchars, (pending & 3) - 1))]
            return []
        if b == 0x22:
            return [(_CLOSE,)] if nchars >= node.min_len else []
        if b < 0x20:
            return []
        if b == 0x5C:  # an escape is one more character: it needs room
            if node.max_len is not None and nchars >= node.max_len:
                return []
            return [(_NEXT, ("str", node, 2, nchars, 0))]
        if b < 0x80:
            more = 0
        elif 0xC2 <= b <= 0xDF:
            more = 1
        elif 0xE0 <= b <= 0xEF:
            more = 2 | _LEAD_RANGE.get(b, 0) << 2
        elif 0xF0 <= b <= 0xF4:
            more = 3 | _LEAD_RANGE.get(b, 0) << 2
        else:
            return []
        return _counted(node, nchars, more)
    if phase == 2:
        if b in _ESCAPES:
            return _counted(node, nchars, 0)
        return [(_NEXT, ("str", node, 3, nchars, 0))] if b == 0x75 else []
    if phase == 7:  # '\uD' in a counted string: 0-7 next (U+D000-U+D7FF), not a surrogate
        return [(_NEXT, ("str", node, 5, nchars, 0))] if 0x30 <= b <= 0x37 else []
    if b not in _HEX:  # phases 3-6: the four hex digits of \uXXXX
        return []
    if phase == 3 and node.counts and b in (0x44, 0x64):
        return [(_NEXT, ("str", node, 7, nchars, 0))]
    if phase < 6:
        return [(_NEXT, ("str", node, phase + 1, nchars, 0))]
    return _counted(node, nchars, 0)


def _utf8_byte(pend: int, cp: int, b: int) -> tuple[int, int, bool] | None:
    """One byte of a UTF-8 character: (bytes still due as `_step_str`'s `pending`, the code
    point so far, complete) or None for a byte UTF-8 forbids here."""
    if pend:
        lo, hi = _SECOND_BYTE[pend >> 2]
        if not lo <= b <= hi:
            return None
        left = (pend & 3) - 1
        return left, (cp << 6) | (b & 0x3F), left == 0
    if b < 0x80:
        return 0, b, True
    if 0xC2 <= b <= 0xDF:
        return 1, b & 0x1F, False
    if 0xE0 <= b <= 0xEF:
        return 2 | _LEAD_RANGE.get(b, 0) << 2, b & 0x0F, False
    if 0xF0 <= b <= 0xF4:
        return 3 | _LEAD_RANGE.get(b, 0) << 2, b & 0x07, False
    return None


def _step_rxs(f: tuple[Any, ...], b: int) -> list[tuple[Any, ...]]:
    """A string whose content must match its `pattern`: characters are written as themselves
    (no escapes, so no quote, backslash or control character) and fed to the pattern's
    automaton as code points; the closing quote comes where the pattern (and minLength)
    allow it to end."""
    _, node, phase, nchars, rstate, pend, cp = f
    if phase == 0:
        return [(_NEXT, ("rxs", node, 1, 0, rstate, 0, 0))] if b == 0x22 else []
    regex = node.regex
    if not pend:
        if b == 0x22:
            return [(_CLOSE,)] if regex.accepts(rstate) and nchars >= node.min_len else []
        if b < 0x20 or b == 0x5C:
            return []
    got = _utf8_byte(pend, cp, b)
    if got is None:
        return []
    pend, cp, done = got
    if node.max_len is not None and nchars >= node.max_len:
        return []
    if not done:
        if not _may_complete(regex, rstate, pend, cp):
            return []
        return [(_NEXT, ("rxs", node, 1, nchars, rstate, pend, cp))]
    rstate = regex.step(rstate, cp)
    if rstate is None:
        return []
    count = _count_after(node, nchars)
    assert count is not None  # room was checked at the character's first byte
    return [(_NEXT, ("rxs", node, 1, count, rstate, 0, 0))]


def _may_complete(regex: Regex, rstate: Any, pend: int, cp: int) -> bool:
    """A UTF-8 character begun (`pend` bytes still due after the bits `cp`) can end as a code
    point the pattern takes next."""
    shift = 6 * (pend & 3)
    lo, hi = cp << shift, (cp << shift) | ((1 << shift) - 1)
    lo, hi = max(lo, _KIND_LOW[pend >> 2]), min(hi, _KIND_HIGH[pend >> 2])  # E0 F0 ED F4 leads
    return regex.can_take(rstate, lo, hi)


def _step_rx(f: tuple[Any, ...], b: int) -> list[tuple[Any, ...]]:
    """A whole answer matching a pattern (`guided_regex`), as raw UTF-8."""
    _, regex, rstate, pend, cp = f
    got = _utf8_byte(pend, cp, b)
    if got is None:
        return []
    pend, cp, done = got
    if not done:
        if not _may_complete(regex, rstate, pend, cp):
            return []
        return [(_NEXT, ("rx", regex, rstate, pend, cp))]
    rstate = regex.step(rstate, cp)
    if rstate is None:
        return []
    out: list[tuple[Any, ...]] = []
    if regex.accepts(rstate):
        out.append((_CLOSE,))
    if regex.can_continue(rstate):
        out.append((_NEXT, ("rx", regex, rstate, 0, 0)))
    return out


def _count_after(node: StringNode, nchars: int, more: int = 1) -> int | None:
    """A string's character count after `more` characters (None past its maxLength). Only a
    node with bounds counts; without a maxLength the count stops at minLength, so longer
    strings share one state."""
    if not node.counts:
        return 0
    if node.max_len is None:
        return min(nchars + more, node.min_len)
    return nchars + more if nchars + more <= node.max_len else None


def _counted(node: StringNode, nchars: int, pending: int) -> list[tuple[Any, ...]]:
    """One more character in a string's content."""
    count = _count_after(node, nchars)
    return [] if count is None else [(_NEXT, ("str", node, 1, count, pending))]


def _step_num(f: tuple[Any, ...], b: int) -> list[tuple[Any, ...]]:
    # phases: 0 start, 1 after '-', 2 int digits, 3 leading 0, 4 after '.', 5 fraction digits,
    # 6 after 'e', 7 after the exponent's sign, 8 exponent digits. Complete: 2, 3, 5, 8.
    _, integer, phase, nbytes = f
    nxt: int | None = None
    if nbytes < MAX_NUMBER_BYTES:
        digit = b in _DIGITS
        if phase == 0:
            nxt = 1 if b == 0x2D else 3 if b == 0x30 else 2 if digit else None
        elif phase == 1:
            nxt = 3 if b == 0x30 else 2 if digit else None
        elif phase in (2, 3) and b == 0x2E and not integer:
            nxt = 4
        elif phase in (2, 3, 5) and b in (0x65, 0x45) and not integer:
            nxt = 6
        elif phase == 2 and digit:
            nxt = 2
        elif phase in (4, 5) and digit:
            nxt = 5
        elif phase == 6:
            nxt = 7 if b in (0x2B, 0x2D) else 8 if digit else None
        elif phase in (7, 8) and digit:
            nxt = 8
    if nxt is not None and (nxt not in (1, 4, 6, 7) or nbytes + 2 <= MAX_NUMBER_BYTES):
        # (a phase that needs a digit after it is entered only with room for that digit)
        return [(_NEXT, ("num", integer, nxt, nbytes + 1))]
    return [(_DONE,)] if phase in (2, 3, 5, 8) else []


def _step_cfg(f: tuple[Any, ...], b: int) -> list[tuple[Any, ...]]:
    """An alternative of a GBNF rule (`dist_runtime.text.gbnf`), standing before item `pos`:
    a character (fed as UTF-8, `pending` / `cp` a character begun as in `_step_rxs`) or a
    rule, whose alternatives are pushed above this frame, or replace it when the rule is the
    last item (a tail call: `x*` repeats in constant depth)."""
    _, seq, pos, pend, cp = f
    items = seq.items
    if pos == len(items):
        return [(_DONE,)]
    item = items[pos]
    if type(item) is Chars:
        got = _utf8_byte(pend, cp, b)
        if got is None:
            return []
        pend, cp, done = got
        if not done:
            shift = 6 * (pend & 3)
            lo = max(cp << shift, _KIND_LOW[pend >> 2])
            hi = min((cp << shift) | ((1 << shift) - 1), _KIND_HIGH[pend >> 2])
            return [(_NEXT, ("cfg", seq, pos, pend, cp))] if item.meets(lo, hi) else []
        if not item.takes(cp):
            return []
        if pos + 1 == len(items):
            return [(_CLOSE,)]
        return [(_NEXT, ("cfg", seq, pos + 1, 0, 0))]
    if pos + 1 == len(items):
        return [(_REPLACE, item.starts)]
    return [(_PUSH, ("cfg", seq, pos + 1, 0, 0), item.starts)]


def _step_lit(f: tuple[Any, ...], b: int) -> list[tuple[Any, ...]]:
    _, text, pos = f
    if text[pos] != b:
        return []
    return [(_CLOSE,)] if pos + 1 == len(text) else [(_NEXT, ("lit", text, pos + 1))]


def _step_enum(f: tuple[Any, ...], b: int) -> list[tuple[Any, ...]]:
    _, node, pos = f
    nxt = node.trie[pos].get(b)
    if nxt is None:
        return []
    out: list[tuple[Any, ...]] = []
    if nxt in node.ends:  # a member ends here (and may be the prefix of a longer one)
        out.append((_CLOSE,))
    if node.trie[nxt]:
        out.append((_NEXT, ("enum", node, nxt)))
    return out


def _step_root(f: tuple[Any, ...], b: int) -> list[tuple[Any, ...]]:
    _, node, phase, _ = f
    if phase != 0:
        return []
    ws = _ws(f, b, 3)
    if ws is not None:
        return ws
    return [(_PUSH, ("root", node, 2, 0), _start(node))]


_STEPS = {
    "obj": _step_obj,
    "arr": _step_arr,
    "str": _step_str,
    "num": _step_num,
    "lit": _step_lit,
    "enum": _step_enum,
    "rxs": _step_rxs,
    "rx": _step_rx,
    "cfg": _step_cfg,
    "root": _step_root,
}


def _child_done(parent: tuple[Any, ...]) -> tuple[Any, ...]:
    """The parent frame once the value on top of it has ended."""
    kind = parent[0]
    if kind == "cfg":  # (moved past the rule when it was pushed)
        return parent
    if kind == "root":
        return ("root", parent[1], 1, 0)
    if kind == "arr":
        return ("arr", parent[1], _ARR_AFTER, parent[3] + 1, 0)
    _, node, phase, idx, n, _ = parent
    if phase == _OBJ_KEY:
        return ("obj", node, _OBJ_COLON, idx, n, 0)
    return ("obj", node, _OBJ_AFTER, idx + (node.extra is None), n + 1, 0)


def _feed(stack: Stack, b: int, out: set[Stack]) -> None:
    top = stack[-1]
    for result in _STEPS[top[0]](top, b):
        kind = result[0]
        if kind == _NEXT:
            out.add(stack[:-1] + (result[1],))
        elif kind == _PUSH:
            base = stack[:-1] + (result[1],)
            for child in result[2]:
                if len(base) > MAX_DEPTH and child[0] in ("obj", "arr"):
                    continue
                if len(base) > MAX_GRAMMAR_DEPTH and child[0] == "cfg":
                    continue
                _feed(base + (child,), b, out)
        elif kind == _REPLACE:
            base = stack[:-1]
            for child in result[1]:
                _feed(base + (child,), b, out)
        else:
            parent = stack[:-2] + (_child_done(stack[-2]),)
            if kind == _CLOSE:
                out.add(parent)
            else:
                _feed(parent, b, out)


_UNWRITTEN = (Chars([(0x22, 0x22)]), Chars([(0x5C, 0x5C)]), Chars([(0x00, 0x1F)]))
"""A patterned string's quote, backslash and control characters (see `_consumers`)."""


def _consumers(stack: Stack, out: list[Chars]) -> bool:
    """Add the character classes that may take the next character of a parse: a GBNF
    alternative's (its rules expanded as `_feed` expands them), a pattern's moves (a whole
    answer's, or a patterned JSON string's beside the classes that end or break that string);
    False when the stack is not at a character boundary of such frames (then no character run
    applies). Listing a class that takes nothing is safe: a run only gets narrower."""
    top = stack[-1]
    kind = top[0]
    if kind == "root":
        return top[2] == 1  # the answer is complete: nothing takes a character
    if kind == "rx":
        if top[3]:
            return False
        out.extend(top[1].classes(top[2]))
        return True
    if kind == "rxs":
        if top[2] != 1 or top[5]:
            return False
        out.extend(top[1].regex.classes(top[4]))
        out.extend(_UNWRITTEN)
        return True
    if kind != "cfg" or top[3]:
        return False
    _, seq, pos, _, _ = top
    items = seq.items
    if pos == len(items):
        return _consumers(stack[:-2] + (_child_done(stack[-2]),), out)
    item = items[pos]
    if type(item) is Chars:
        out.append(item)
        return True
    if pos + 1 == len(items):
        base = stack[:-1]
    else:
        base = stack[:-1] + (("cfg", seq, pos + 1, 0, 0),)
        if len(base) > MAX_GRAMMAR_DEPTH:
            return True
    return all(_consumers(base + (child,), out) for child in item.starts)


_SEEDS = tuple(map(ord, "a 0A.e"))
"""Characters tried, in order, to pick a state's character run (`JsonGrammar.char_run`)."""


def _finishes(stack: Stack) -> bool:
    """The value can end here (with no more bytes)."""
    while stack[-1][0] in ("num", "rx", "cfg"):
        top = stack[-1]
        if top[0] == "cfg" and (top[3] or not top[1].rest_nullable[top[2]]):
            return False
        if top[0] == "num" and top[2] not in (2, 3, 5, 8):
            return False
        if top[0] == "rx" and (top[3] or not top[1].accepts(top[2])):
            return False
        stack = stack[:-2] + (_child_done(stack[-2]),)
    top = stack[-1]
    return top[0] == "root" and top[2] == 1


_WHITESPACE = frozenset(b" \t\n\r")


def _in_string(stack: Stack) -> bool:
    """The parse is inside a JSON string's content (where whitespace is text)."""
    top = stack[-1]
    return top[0] in ("str", "rxs") and top[2] == 1


State = frozenset[Stack]
"""A recogniser state: the parse stacks still alive. Hashable; its hash is cached."""


class JsonGrammar:
    """The recogniser of one schema's outputs.

    `start` is the state before any output; `step(state, byte)` the state after one more byte
    (None: no value can follow that byte); `accepts(state)` whether the output may end there;
    `ended(state)` whether it must (nothing can follow). Transitions are cached (and the cache
    dropped whole past MAX_CACHE entries, which is always safe: states are values).
    """

    def __init__(self, node: Node, start: State | None = None, compact: bool = False):
        """`start`: a state other than "before a value of `node`" (a raw answer begun);
        `compact`: JSON without whitespace outside strings (vLLM's `disable_any_whitespace`)."""
        self.node = node
        self.start: State = start or frozenset({(("root", node, 0, 0),)})
        self.compact = compact
        self._next: dict[tuple[State, int], State | None] = {}

    @classmethod
    def from_schema(cls, schema: Any, compact: bool = False) -> JsonGrammar:
        return cls(compile_schema(schema), compact=compact)

    @classmethod
    def from_regex(cls, pattern: str) -> JsonGrammar:
        """An answer that matches `pattern` whole, as it is (not JSON): vLLM's
        `guided_regex`; `RegexError` for a pattern the automaton cannot hold."""
        regex = Regex(pattern)
        return cls(_ANY, frozenset({(("root", _ANY, 2, 0), ("rx", regex, regex.start, 0, 0))}))

    @classmethod
    def from_gbnf(cls, text: str) -> JsonGrammar:
        """An answer that a GBNF grammar's `root` produces, as it is (not JSON): vLLM's
        `guided_grammar`; `GrammarError` for a grammar that cannot be held
        (`dist_runtime.text.gbnf`)."""
        root = compile_gbnf(text)
        for rule in rules_of(root):
            rule.starts = tuple(("cfg", alt, 0, 0, 0) for alt in rule.alts)
        node = AnyOfNode(())
        return cls(node, frozenset((("root", node, 2, 0), start) for start in root.starts))

    @classmethod
    def one_of(cls, texts: Iterable[str]) -> JsonGrammar:
        """Exactly one of `texts`, as they are (not JSON): vLLM's `guided_choice`."""
        node = LiteralNode(t.encode("utf-8") for t in texts)
        return cls(node, frozenset({(("root", node, 2, 0), ("enum", node, 0))}))

    @classmethod
    def any_object(cls, compact: bool = False) -> JsonGrammar:
        """Any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
        return cls(_ANY_OBJECT, compact=compact)

    def step(self, state: State, b: int) -> State | None:
        key = (state, b)
        try:
            return self._next[key]
        except KeyError:
            pass
        out: set[Stack] = set()
        for stack in state:
            if self.compact and b in _WHITESPACE and not _in_string(stack):
                continue  # (compact: whitespace only inside strings)
            _feed(stack, b, out)
        nxt = frozenset(out) if out else None
        if len(self._next) >= MAX_CACHE:
            self._next.clear()
        self._next[key] = nxt
        return nxt

    def advance(self, state: State | None, data: bytes) -> State | None:
        """The state after `data` (None as soon as a byte is refused)."""
        for b in data:
            if state is None:
                break
            state = self.step(state, b)
        return state

    def accepts(self, state: State | None) -> bool:
        return state is not None and any(_finishes(s) for s in state)

    def ended(self, state: State | None) -> bool:
        """Every parse is complete: the top-level value is closed and nothing may follow."""
        return state is not None and all(
            len(s) == 1 and s[0][0] == "root" and s[0][2] == 1 for s in state
        )

    def string_run(self, state: State) -> tuple[int, int | None] | None:
        """When the state is one parse inside a string's content (no escape or UTF-8 sequence
        open): (characters so far, most characters left or None); else None. Bytes that keep
        such a string open (no quote, backslash or control byte, whole UTF-8 characters) lead
        to the same state with the count raised, which lets a vocabulary mask take them
        wholesale (`after_string_run`)."""
        if len(state) != 1:
            return None
        (stack,) = state
        top = stack[-1]
        if top[0] != "str" or top[2] != 1 or top[4]:
            return None
        node = top[1]
        return top[3], None if node.max_len is None else node.max_len - top[3]

    def char_run(self, state: State) -> tuple[Chars, int] | None:
        """For a state at a character boundary of GBNF or pattern frames: a set of characters
        C that every parse treats alike (each class that may take the next character holds
        all of C or none of it), so every character of C leads to one and the same state, and
        one of them; None when there is no such set worth using. A vocabulary mask takes the
        tokens made only of C's characters by their length instead of walking them
        (`dist_runtime.text.guided`)."""
        consumers = self._consumers(state)
        if not consumers:
            return None
        classes = list({id(k): k for k in consumers}.values())
        for seed in _SEEDS:
            holding = [k for k in classes if k.takes(seed)]
            if not holding:
                continue
            run = holding[0]
            for k in holding[1:]:
                run = run & k
            for k in classes:
                if not k.takes(seed):
                    run = run - k
            return run, seed  # (holds the seed: never empty)
        return None

    def uniform(self, state: State, chars: Chars) -> bool:
        """Every character of `chars` leads from `state` to the same state (see `char_run`)."""
        consumers = self._consumers(state)
        return consumers is not None and all(
            k.covers(chars) or not k.overlaps(chars) for k in consumers
        )

    def _consumers(self, state: State) -> list[Chars] | None:
        out: list[Chars] = []
        for stack in state:
            if not _consumers(stack, out):
                return None
        return out

    def after_string_run(self, state: State, nchars: int) -> State:
        """The state after `nchars` plain characters from a `string_run` state."""
        (stack,) = state
        _, node, _, count, _ = stack[-1]
        if nchars == 0 or not node.counts:
            return state
        count = _count_after(node, count, nchars)
        assert count is not None, "more characters than the string's maxLength leaves"
        return frozenset({stack[:-1] + (("str", node, 1, count, 0),)})
