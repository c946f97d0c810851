"""Guided output (JSON, regex, choice, GBNF): which tokens keep an output on its grammar, as a
mask per step.

`Vocabulary` holds a tokenizer's tokens as the bytes they stand for, in a byte trie. A mask
walks the trie from the grammar's state (`dist_runtime.text.json_grammar`) and keeps every
token whose bytes the grammar takes; a branch stops at the first refused byte, so a structural
position (after `{`, `,`, `:`) visits a few thousand trie nodes. Inside a free string nearly
every token fits: there the tokens that cannot leave a string (no quote, backslash or control
byte, whole UTF-8 characters) are taken from a precomputed set, cut by length when the string
has a `maxLength`, and only the rest are walked. A vocabulary caches its masks per (grammar,
state), so a schema's recurring positions cost a lookup.

The engine keeps one `JsonGuide` per guided request on the driver: it sends the packed mask
of the request's current state with each step that samples it (`SeqStep.allowed_tokens`), and
advances the state with the token the worker sampled.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from dist_runtime.text.gbnf import Chars
from dist_runtime.text.json_grammar import JsonGrammar, SchemaError, State

MAX_MASKS = 4096
"""Packed masks a vocabulary caches before the cache is dropped and refilled."""
MAX_CLASSES = 64
"""Character classes whose token sets a vocabulary keeps (`Vocabulary.class_tokens`)."""

_MISS: Any = object()
_Trie = tuple[list[dict[int, int]], list[tuple[int, ...]]]


class Vocabulary:
    """Token ids by the bytes they stand for, as two tries (see the module's docstring)."""

    def __init__(self, token_bytes: Iterable[bytes | None], size: int):
        """`token_bytes[i]`: the bytes token i stands for, None (or b"") for a token guided
        output never uses (special tokens); `size`: the width of the model's logits."""
        self.size = size
        self.token_bytes: list[bytes] = []
        self.string_safe = np.zeros(size, dtype=bool)
        """Tokens that keep a free string open whatever it holds (see the module)."""
        self.char_len = np.zeros(size, dtype=np.int64)
        """Characters of each string-safe token."""
        full: list[tuple[int, bytes]] = []
        rest: list[tuple[int, bytes]] = []
        for i, data in enumerate(token_bytes):
            data = data or b""
            self.token_bytes.append(data)
            if not data or i >= size:
                continue
            full.append((i, data))
            text = _plain_text(data)
            if text is None:
                rest.append((i, data))
            else:
                self.string_safe[i] = True
                self.char_len[i] = len(text)
        self.masks: dict[tuple[JsonGrammar, State, frozenset[int]], bytes] = {}
        """Packed masks by (grammar, state, stop ids), at most MAX_MASKS."""
        self.trie = _build_trie(full)
        self.other_trie = _build_trie(rest)
        """The tokens a string state walks: those not string-safe."""
        self._texts: list[str | None] | None = None
        self._classes: dict[tuple[tuple[int, int], ...], _ClassTokens] = {}

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, size: int) -> Vocabulary:
        """The guided-output vocabulary of a `dist_runtime.text.tokenizer.Tokenizer`."""
        n = min(tokenizer.vocab_size, size)
        return cls(
            (None if tokenizer.is_special(i) else tokenizer.token_bytes(i) for i in range(n)),
            size,
        )

    def mask(self, grammar: JsonGrammar, state: State, stop_ids: frozenset[int]) -> bytes:
        """The packed mask (bit i of byte i // 8, least significant first) of the tokens that
        may come next in `state`: those the grammar takes, plus `stop_ids` where the output
        may end. Cached per (grammar, state, stop ids)."""
        key = (grammar, state, stop_ids)
        cached = self.masks.get(key)
        if cached is not None:
            return cached
        allowed = np.zeros(self.size, dtype=bool)
        run = grammar.string_run(state)
        chars = grammar.char_run(state) if run is None else None
        if chars is not None:
            self._char_run(grammar, state, *chars, allowed)
        elif run is None:
            allowed[_walk(grammar, self.trie, state)] = True
        else:
            _, left = run
            allowed |= (
                self.string_safe if left is None else self.string_safe & (self.char_len <= left)
            )
            allowed[_walk(grammar, self.other_trie, state)] = True
        if grammar.accepts(state):
            allowed[[i for i in stop_ids if 0 <= i < self.size]] = True
        packed = np.packbits(allowed, bitorder="little").tobytes()
        if len(self.masks) >= MAX_MASKS:
            self.masks.clear()
        self.masks[key] = packed
        return packed

    def _char_run(
        self, grammar: JsonGrammar, state: State, chars: Chars, seed: int, allowed: np.ndarray
    ) -> None:
        """Mark the tokens allowed from a GBNF state with a character run (`char_run`): those
        made only of the run's characters by how many characters the grammar can take in a
        row from here (one seed character stands for all: each leads to the same state while
        the state stays uniform), the others by a walk of the trie that holds them."""
        tokens = self.class_tokens(chars)
        step = chr(seed).encode()
        n, st, dead = 0, state, False
        while n < tokens.most:
            nxt = grammar.advance(st, step)
            if nxt is None:
                dead = True
                break
            n, st = n + 1, nxt
            if n < tokens.most and not grammar.uniform(st, chars):
                break
        allowed |= tokens.member & (tokens.lengths <= n)
        if not dead and n < tokens.most:  # longer ones part where the run stops: one by one
            for i in np.flatnonzero(tokens.member & (tokens.lengths > n)).tolist():
                if grammar.advance(state, self.token_bytes[i]) is not None:
                    allowed[i] = True
        allowed[_walk(grammar, tokens.other_trie, state)] = True

    def class_tokens(self, chars: Chars) -> _ClassTokens:
        """The tokens made only of whole characters of `chars`, their lengths in characters,
        and a trie of all the other tokens; cached per class."""
        key = chars.ranges
        hit = self._classes.get(key)
        if hit is not None:
            return hit
        if self._texts is None:
            self._texts = [_utf8(data) for data in self.token_bytes[: self.size]]
        pattern = re.compile(
            "["
            + "".join(
                re.escape(chr(lo)) if lo == hi else f"{re.escape(chr(lo))}-{re.escape(chr(hi))}"
                for lo, hi in key
            )
            + "]+"
        )
        member = np.zeros(self.size, dtype=bool)
        lengths = np.zeros(self.size, dtype=np.int64)
        others: list[tuple[int, bytes]] = []
        for i, text in enumerate(self._texts):
            if not self.token_bytes[i]:
                continue
            if text and pattern.fullmatch(text):
                member[i] = True
                lengths[i] = len(text)
            else:
                others.append((i, self.token_bytes[i]))
        if len(self._classes) >= MAX_CLASSES:
            self._classes.clear()
        tokens = self._classes[key] = _ClassTokens(
            member, lengths, int(lengths.max(initial=0)), _build_trie(others)
        )
        return tokens


class _ClassTokens(NamedTuple):
    member: np.ndarray
    """Tokens made only of whole characters of the class."""
    lengths: np.ndarray
    """Their lengths in characters (0 for the others)."""
    most: int
    """The longest of them."""
    other_trie: _Trie
    """Every other token with bytes."""


def _utf8(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _plain_text(data: bytes) -> str | None:
    """The text of bytes that cannot end or escape a JSON string: whole UTF-8 characters and
    no quote, backslash or control character; None otherwise."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if '"' in text or "\\" in text or any(ord(c) < 0x20 for c in text):
        return None
    return text


def _build_trie(tokens: list[tuple[int, bytes]]) -> _Trie:
    """(children, ends): children[node] maps a byte to the next node, ends[node] holds the ids
    of the tokens whose bytes end there. Dicts of ints and tuples of ints only, which Python's
    garbage collector stops tracking: a 100K-node trie adds nothing to a full collection's
    pause."""
    children: list[dict[int, int]] = [{}]
    ends: list[list[int]] = [[]]
    for token_id, data in tokens:
        node = 0
        for b in data:
            nxt = children[node].get(b)
            if nxt is None:
                nxt = children[node][b] = len(children)
                children.append({})
                ends.append([])
            node = nxt
        ends[node].append(token_id)
    return children, [tuple(e) for e in ends]


def _walk(grammar: JsonGrammar, trie: _Trie, state: State) -> list[int]:
    """Ids of the trie's tokens whose every byte the grammar takes from `state`."""
    children, ends = trie
    cache, step = grammar._next, grammar.step
    ids: list[int] = []
    todo = [(0, state)]
    while todo:
        node, st = todo.pop()
        for b, child in children[node].items():
            nxt = cache.get((st, b), _MISS)
            if nxt is _MISS:
                nxt = step(st, b)
            if nxt is None:
                continue
            ids.extend(ends[child])
            if children[child]:
                todo.append((child, nxt))
    return ids


class JsonGuide:
    """One request's place in its grammar, on the driver."""

    def __init__(self, grammar: JsonGrammar, vocab: Vocabulary, stop_ids: Iterable[int]):
        self.grammar = grammar
        self.vocab = vocab
        self.stop_ids = frozenset(stop_ids)
        self.state: State | None = grammar.start

    def allowed_tokens(self) -> bytes:
        """The packed mask of the next token (see `Vocabulary.mask`)."""
        if self.state is None:
            raise RuntimeError("the output has left its grammar")
        return self.vocab.mask(self.grammar, self.state, self.stop_ids)

    def advance(self, token_id: int) -> bool:
        """Take a sampled token; False if the grammar refuses it (the mask did not allow it)."""
        if self.state is None:
            return False
        if token_id in self.stop_ids:
            return self.grammar.accepts(self.state)
        data = self.vocab.token_bytes[token_id] if token_id < len(self.vocab.token_bytes) else b""
        self.state = self.grammar.advance(self.state, data) if data else None
        return self.state is not None

    def check_draft(self, draft: list[int]) -> tuple[list[int], list[bytes]]:
        """The leading draft tokens the grammar takes from here (up to a stop token, a token
        it refuses, or the end of the value), and the masks of the rows that check them: one
        per kept token and one after the last (the state is not moved)."""
        grammar, state = self.grammar, self.state
        kept: list[int] = []
        masks: list[bytes] = []
        if state is None:
            raise RuntimeError("the output has left its grammar")
        for token in draft:
            mask = self.vocab.mask(grammar, state, self.stop_ids)
            if (
                grammar.ended(state)
                or token in self.stop_ids
                or token >= len(self.vocab.token_bytes)
                or not mask[token // 8] >> (token % 8) & 1
            ):
                break
            data = self.vocab.token_bytes[token]
            after = grammar.advance(state, data) if data else None
            if after is None:
                break
            kept.append(token)
            masks.append(mask)
            state = after
        masks.append(self.vocab.mask(grammar, state, self.stop_ids))
        return kept, masks

    def can_go_on(self) -> bool:
        """Some token may come next. False only where the grammar cannot be finished with this
        vocabulary (a byte no token holds, nesting past MAX_DEPTH that the schema requires)."""
        return any(self.allowed_tokens())

    @property
    def ended(self) -> bool:
        """The value is complete and nothing may follow: the request can stop here."""
        return self.grammar.ended(self.state)


@functools.lru_cache(maxsize=64)
def grammar_for(schema_text: str | None, compact: bool = False) -> JsonGrammar:
    """The grammar of a schema's canonical JSON text (None: any JSON object), shared by the
    requests that name the same schema; `compact`: no whitespace outside strings."""
    if schema_text is None:
        return JsonGrammar.any_object(compact)
    return JsonGrammar.from_schema(json.loads(schema_text), compact)


@functools.lru_cache(maxsize=64)
def choice_grammar(choices: tuple[str, ...]) -> JsonGrammar:
    """The grammar of an answer that is exactly one of `choices`."""
    return JsonGrammar.one_of(choices)


@functools.lru_cache(maxsize=64)
def regex_grammar(pattern: str) -> JsonGrammar:
    """The grammar of an answer that matches `pattern` whole."""
    return JsonGrammar.from_regex(pattern)


@functools.lru_cache(maxsize=64)
def gbnf_grammar(text: str) -> JsonGrammar:
    """The grammar of an answer that a GBNF grammar produces (`dist_runtime.text.gbnf`)."""
    return JsonGrammar.from_gbnf(text)


def schema_argument(value: str, flag: str = "--json-schema") -> str:
    """A command line's schema argument as JSON text: the text itself when it starts with `{`,
    else the file it names (a ValueError naming `flag` when that cannot be read)."""
    inline = value.lstrip().startswith("{")
    return _text_argument(value, flag, inline, "a JSON Schema file or the schema as JSON text")


def grammar_argument(value: str, flag: str = "--grammar") -> str:
    """A command line's GBNF grammar argument as text: the text itself when it holds a rule
    (`::=`), else the file it names (a ValueError naming `flag` when that cannot be read)."""
    give = "a GBNF grammar file or the grammar itself (root ::= ...)"
    return _text_argument(value, flag, "::=" in value, give)


def _text_argument(value: str, flag: str, inline: bool, give: str) -> str:
    if inline:
        return value
    try:
        return Path(value).read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(
            f"{flag} {value}: cannot read it ({e.strerror or e}); give {give}"
        ) from None


def unpack_mask(packed: bytes, size: int) -> np.ndarray:
    """The bool mask (size,) of a packed one."""
    return np.unpackbits(np.frombuffer(packed, dtype=np.uint8), bitorder="little")[:size].astype(
        bool
    )


__all__ = [
    "JsonGuide",
    "SchemaError",
    "Vocabulary",
    "choice_grammar",
    "gbnf_grammar",
    "grammar_argument",
    "grammar_for",
    "regex_grammar",
    "schema_argument",
    "unpack_mask",
]
