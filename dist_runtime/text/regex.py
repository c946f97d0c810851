"""Regular expressions for guided output: a pattern compiled to an NFA over Unicode code points.

Used by JSON Schema's `pattern` (a string's content must match it whole) and by vLLM's
`guided_regex` (the whole answer must match). The syntax is the common subset of Python's and
ECMAScript's: literals, `.`, classes `[a-z0-9_]` / `[^,]`, escapes `\\d \\D \\w \\W \\s \\S`
(ASCII classes, as ECMAScript's `\\d \\w`: a subset of what Python's `re` matches),
`\\n \\t \\r \\f \\v \\xHH \\uHHHH` and escaped punctuation, groups `( )` / `(?: )` /
`(?P<name> )`, `|`, and the quantifiers `* + ? {n} {n,} {n,m}` (a lazy `?` after them changes
nothing here). A leading `^` and a trailing `$` are dropped: the match is always the whole text
(JSON Schema's `pattern` searches, and every whole match is also a match). Back-references,
look-arounds and `\\b` cannot be held by an automaton and are refused with `RegexError`.

A state is the frozen set of NFA states reached (closed under empty moves); `step(state, code
point)` is cached.
"""

from __future__ import annotations

import re
from typing import Any

from dist_runtime.text.gbnf import Chars

MAX_NFA_STATES = 20_000
"""Largest automaton a pattern may compile to (bounded repeats are unrolled)."""

_DIGIT = ((0x30, 0x39),)
_WORD = ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A))
_SPACE = ((0x09, 0x0D), (0x20, 0x20))
_CLASSES = {"d": (_DIGIT, False), "D": (_DIGIT, True), "w": (_WORD, False), "W": (_WORD, True),
            "s": (_SPACE, False), "S": (_SPACE, True)}  # fmt: skip
_CONTROL = {"n": 0x0A, "t": 0x09, "r": 0x0D, "f": 0x0C, "v": 0x0B, "0": 0x00}

_COUNTED = re.compile(r"\{(\d+)(,(\d*))?\}")
_NAMED_GROUP = re.compile(r"\?P?<[A-Za-z_]\w*>")

# AST: ("set", ranges, negated) | ("cat", [..]) | ("alt", [..]) | ("rep", node, lo, hi)
Ast = tuple[Any, ...]


class RegexError(ValueError):
    """A pattern this automaton cannot hold (or that does not parse)."""


class Regex:
    """A compiled pattern: `start`, `step(state, code point)`, `accepts`, `can_continue`."""

    def __init__(self, pattern: str):
        if not isinstance(pattern, str):
            raise RegexError(f"a pattern must be a string, got {type(pattern).__name__}")
        self.pattern = pattern
        body = pattern[1:] if pattern.startswith("^") else pattern
        if body.endswith("$") and not _escaped_at(body, len(body) - 1):
            body = body[:-1]
        parser = _Parser(body, pattern)
        ast = parser.alternation()
        if parser.pos != len(body):
            raise RegexError(f"pattern {pattern!r}: unbalanced ')' at {parser.pos}")
        self._moves: list[list[tuple[tuple[tuple[int, int], ...], bool, int]]] = []
        self._empty: list[list[int]] = []
        start, self.accept = self._build(ast)
        self.start = self._closure({start})
        self._next: dict[tuple[frozenset[int], int], frozenset[int] | None] = {}
        self._takes: dict[tuple[frozenset[int], int, int], bool] = {}
        self._classes: dict[frozenset[int], tuple[Chars, ...]] = {}

    # -- construction ------------------------------------------------------------------------
    def _state(self) -> int:
        if len(self._moves) >= MAX_NFA_STATES:
            raise RegexError(
                f"pattern {self.pattern!r} unrolls past {MAX_NFA_STATES} automaton states; "
                "use smaller repeat counts"
            )
        self._moves.append([])
        self._empty.append([])
        return len(self._moves) - 1

    def _build(self, node: Ast) -> tuple[int, int]:
        """(entry, exit) of a fragment for `node`."""
        kind = node[0]
        if kind == "set":
            a, b = self._state(), self._state()
            self._moves[a].append((node[1], node[2], b))
            return a, b
        if kind == "cat":
            a = b = self._state()
            for part in node[1]:
                s, e = self._build(part)
                self._empty[b].append(s)
                b = e
            return a, b
        if kind == "alt":
            a, b = self._state(), self._state()
            for part in node[1]:
                s, e = self._build(part)
                self._empty[a].append(s)
                self._empty[e].append(b)
            return a, b
        _, inner, lo, hi = node
        a = b = self._state()
        for _ in range(lo):
            s, e = self._build(inner)
            self._empty[b].append(s)
            b = e
        if hi is None:  # then any number more
            s, e = self._build(inner)
            self._empty[b].append(s)
            self._empty[e].append(s)
            end = self._state()
            self._empty[b].append(end)
            self._empty[e].append(end)
            return a, end
        end = self._state()
        for _ in range(hi - lo):
            s, e = self._build(inner)
            self._empty[b].append(s)
            self._empty[b].append(end)
            b = e
        self._empty[b].append(end)
        return a, end

    def _closure(self, states: set[int]) -> frozenset[int]:
        todo, seen = list(states), set(states)
        while todo:
            for t in self._empty[todo.pop()]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return frozenset(s for s in seen if self._moves[s] or s == self.accept)

    # -- matching ----------------------------------------------------------------------------
    def step(self, state: frozenset[int], cp: int) -> frozenset[int] | None:
        key = (state, cp)
        try:
            return self._next[key]
        except KeyError:
            pass
        reached = set()
        for s in state:
            for ranges, negated, target in self._moves[s]:
                if any(lo <= cp <= hi for lo, hi in ranges) != negated:
                    reached.add(target)
        nxt = self._closure(reached) if reached else None
        if nxt is not None and not nxt:
            nxt = None
        if len(self._next) > 200_000:
            self._next.clear()
        self._next[key] = nxt
        return nxt

    def can_take(self, state: frozenset[int], lo: int, hi: int) -> bool:
        """Some code point in [lo, hi] has a move from `state` (a UTF-8 character begun but
        not finished may still lead somewhere)."""
        key = (state, lo, hi)
        hit = self._takes.get(key)
        if hit is not None:
            return hit
        ok = False
        for s in state:
            for ranges, negated, _ in self._moves[s]:
                if negated:
                    ok = not _covers(ranges, lo, hi)
                else:
                    ok = any(r_lo <= hi and lo <= r_hi for r_lo, r_hi in ranges)
                if ok:
                    break
            if ok:
                break
        if len(self._takes) > 200_000:
            self._takes.clear()
        self._takes[key] = ok
        return ok

    def classes(self, state: frozenset[int]) -> tuple[Chars, ...]:
        """The character classes of the moves out of `state` (cached)."""
        hit = self._classes.get(state)
        if hit is None:
            hit = tuple(
                Chars(_complement(ranges) if negated else list(ranges))
                for s in state
                for ranges, negated, _ in self._moves[s]
            )
            if len(self._classes) > 20_000:
                self._classes.clear()
            self._classes[state] = hit
        return hit

    def accepts(self, state: frozenset[int]) -> bool:
        return self.accept in state

    def can_continue(self, state: frozenset[int]) -> bool:
        return any(self._moves[s] for s in state)

    def fullmatch(self, text: str) -> bool:
        """Whether the whole of `text` matches (for tests and checks)."""
        state: frozenset[int] | None = self.start
        for ch in text:
            if state is None:
                return False
            state = self.step(state, ord(ch))
        return state is not None and self.accepts(state)


def _escaped_at(text: str, i: int) -> bool:
    n = 0
    while i - 1 - n >= 0 and text[i - 1 - n] == "\\":
        n += 1
    return n % 2 == 1


class _Parser:
    def __init__(self, text: str, pattern: str):
        self.text, self.pattern, self.pos = text, pattern, 0

    def fail(self, what: str) -> RegexError:
        return RegexError(f"pattern {self.pattern!r}: {what}")

    def peek(self) -> str | None:
        return self.text[self.pos] if self.pos < len(self.text) else None

    def alternation(self) -> Ast:
        parts = [self.concatenation()]
        while self.peek() == "|":
            self.pos += 1
            parts.append(self.concatenation())
        return parts[0] if len(parts) == 1 else ("alt", parts)

    def concatenation(self) -> Ast:
        parts: list[Ast] = []
        while self.peek() not in (None, "|", ")"):
            parts.append(self.quantified(self.atom()))
        return ("cat", parts)

    def quantified(self, atom: Ast) -> Ast:
        c = self.peek()
        counted = _COUNTED.match(self.text, self.pos) if c == "{" else None
        if c in ("*", "+", "?"):
            self.pos += 1
            lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        elif counted:
            self.pos = counted.end()
            lo = int(counted.group(1))
            hi = lo if counted.group(2) is None else (int(counted.group(3) or -1))
            hi = None if hi == -1 else hi
            if hi is not None and hi < lo:
                raise self.fail(f"repeat {counted.group(0)}: the most is below the least")
        else:
            return atom
        if self.peek() == "?":  # lazy: the same set of whole matches
            self.pos += 1
        elif self.peek() == "+":
            raise self.fail("possessive quantifiers are not supported")
        return ("rep", atom, lo, hi)

    def atom(self) -> Ast:
        c = self.peek()
        assert c is not None
        self.pos += 1
        if c == "(":
            rest = self.text[self.pos :]
            named = _NAMED_GROUP.match(rest)
            if rest.startswith("?:"):
                self.pos += 2
            elif named:
                self.pos += named.end()
            elif rest.startswith("?"):
                raise self.fail("look-arounds, conditionals and inline flags are not supported")
            inner = self.alternation()
            if self.peek() != ")":
                raise self.fail("a group is not closed")
            self.pos += 1
            return inner
        if c == "[":
            return self.char_class()
        if c == ".":
            return ("set", ((0x0A, 0x0A),), True)
        if c == "\\":
            return self.escape(in_class=False)
        if c in "*+?":
            raise self.fail(f"nothing to repeat at {self.pos - 1}")
        if c in "^$":
            raise self.fail(f"{c!r} is supported only at the pattern's start / end")
        return ("set", ((ord(c), ord(c)),), False)

    def escape(self, in_class: bool) -> Ast:
        c = self.peek()
        if c is None:
            raise self.fail("the pattern ends in a backslash")
        self.pos += 1
        if c in _CLASSES:
            ranges, negated = _CLASSES[c]
            return ("set", ranges, negated)
        if c in _CONTROL:
            return ("set", ((_CONTROL[c], _CONTROL[c]),), False)
        if c in "xu":
            width = 2 if c == "x" else 4
            digits = self.text[self.pos : self.pos + width]
            if len(digits) != width or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.fail(f"\\{c} needs {width} hex digits")
            self.pos += width
            v = int(digits, 16)
            return ("set", ((v, v),), False)
        if c.isdigit() or c in "bBAZkpP":
            raise self.fail(f"\\{c} is not supported (no back-references, boundaries or classes)")
        if c.isalnum():
            raise self.fail(f"unknown escape \\{c}")
        return ("set", ((ord(c), ord(c)),), False)

    def char_class(self) -> Ast:
        negated = self.peek() == "^"
        if negated:
            self.pos += 1
        ranges: list[tuple[int, int]] = []
        negated_parts: list[tuple[tuple[int, int], ...]] = []
        first = True
        while True:
            c = self.peek()
            if c is None:
                raise self.fail("a character class is not closed")
            if c == "]" and not first:
                self.pos += 1
                break
            first = False
            if c == "\\":
                self.pos += 1
                node = self.escape(in_class=True)
                if node[2]:  # \D \W \S inside a class
                    negated_parts.append(node[1])
                    continue
                lo = node[1][0][0]
                if len(node[1]) > 1 or node[1][0][0] != node[1][0][1]:
                    ranges.extend(node[1])
                    continue
            else:
                self.pos += 1
                lo = ord(c)
            if (
                self.peek() == "-"
                and self.pos + 1 < len(self.text)
                and self.text[self.pos + 1] != "]"
            ):
                self.pos += 1
                d = self.peek()
                assert d is not None
                self.pos += 1
                hi = self.escape(in_class=True)[1][0][0] if d == "\\" else ord(d)
                if hi < lo:
                    raise self.fail(f"range {chr(lo)}-{chr(hi)} is reversed")
                ranges.append((lo, hi))
            else:
                ranges.append((lo, lo))
        for part in negated_parts:  # [\D...]: everything outside `part`
            ranges.extend(_complement(part))
        return ("set", tuple(sorted(ranges)), negated)


def _covers(ranges: tuple[tuple[int, int], ...], lo: int, hi: int) -> bool:
    """Whether the union of `ranges` holds all of [lo, hi]."""
    at = lo
    for r_lo, r_hi in sorted(ranges):
        if r_lo > at:
            break
        at = max(at, r_hi + 1)
        if at > hi:
            return True
    return at > hi


def _complement(ranges: tuple[tuple[int, int], ...]) -> list[tuple[int, int]]:
    out, at = [], 0
    for lo, hi in sorted(ranges):
        if lo > at:
            out.append((at, lo - 1))
        at = max(at, hi + 1)
    if at <= 0x10FFFF:
        out.append((at, 0x10FFFF))
    return out
