"""Context-free grammars for guided output, written in GBNF (vLLM's `guided_grammar`).

GBNF is llama.cpp's grammar format, which vLLM's xgrammar backend also takes:

    root   ::= answer ("; " answer)*
    answer ::= "yes" | "no" | number
    number ::= [0-9]+ ("." [0-9]+)?   # a comment

A rule is `name ::= alternatives` (names of letters, digits, `-` and `_`; the answer is a
`root`). Alternatives are split by `|`; an element is a literal `"..."` (escapes `\\n \\r \\t
\\\\ \\" \\xHH \\uHHHH \\UHHHHHHHH`), a class `[a-z0-9_]` / `[^"\\\\]` (the same escapes, and `\\]
\\-`), `.` (any character), a rule's name, or a group `( ... )`, each optionally followed by
`* + ?`, `{m}`, `{m,}`, `{m,n}` or `{,n}`. Whitespace and newlines between elements do not
matter: a rule runs to the next `name ::=`.

`compile_gbnf` turns the text into `Rule`s: alternatives are `Seq`s of items, each a `Chars`
(one code point from a set of ranges; a literal is one per character) or a `Rule`; groups and
repetitions become unnamed rules (`x*` is `R ::= x R | ""`, which the recogniser in
`dist_runtime.text.json_grammar` runs in constant stack depth, as a tail call). Alternatives
that can never finish are dropped. A grammar that cannot be generated left to right is
refused with `GrammarError` naming the rule: left recursion (`expr ::= expr "+" term`, also
through rules that can be empty, such as `("")*`), an undefined rule, no `root`, a `root` that
produces nothing finite.
"""

from __future__ import annotations

import re
from bisect import bisect_right

MAX_REPEAT = 1000
"""Largest count in `{m}` / `{m,n}` (a counted repeat unrolls into that many items)."""
MAX_ITEMS = 100_000
"""Most items (characters and rule references) a grammar may compile to."""
MAX_TEXT = 200_000
"""Longest grammar text, in characters."""

_NAME = re.compile(r"[A-Za-z0-9_-]+")
_RULE_START = re.compile(r"([A-Za-z0-9_-]+)\s*::=")
_COUNTED = re.compile(r"\{\s*(\d*)\s*(?:(,)\s*(\d*)\s*)?\}")
_MAX_CP = 0x10FFFF


class GrammarError(ValueError):
    """A grammar this runtime cannot parse or generate; the message names the place."""


class Chars:
    """One character from a set of code points, as sorted disjoint ranges."""

    __slots__ = ("lows", "highs")

    def __init__(self, ranges: list[tuple[int, int]]):
        merged: list[list[int]] = []
        for lo, hi in sorted(ranges):
            if merged and lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self.lows = tuple(r[0] for r in merged)
        self.highs = tuple(r[1] for r in merged)

    def takes(self, cp: int) -> bool:
        i = bisect_right(self.lows, cp) - 1
        return i >= 0 and cp <= self.highs[i]

    def meets(self, lo: int, hi: int) -> bool:
        """Some code point in [lo, hi] is in the set."""
        i = bisect_right(self.lows, hi) - 1
        return i >= 0 and self.highs[i] >= lo

    @property
    def ranges(self) -> tuple[tuple[int, int], ...]:
        return tuple(zip(self.lows, self.highs, strict=True))

    def covers(self, other: Chars) -> bool:
        """Every code point of `other` is in this set."""
        for lo, hi in other.ranges:
            i = bisect_right(self.lows, lo) - 1
            if i < 0 or self.highs[i] < hi:
                return False
        return True

    def overlaps(self, other: Chars) -> bool:
        return any(self.meets(lo, hi) for lo, hi in other.ranges)

    def __and__(self, other: Chars) -> Chars:
        out = []
        for lo, hi in self.ranges:
            for olo, ohi in other.ranges:
                if olo <= hi and lo <= ohi:
                    out.append((max(lo, olo), min(hi, ohi)))
        return Chars(out)

    def __sub__(self, other: Chars) -> Chars:
        out = []
        for lo, hi in self.ranges:
            at = lo
            for olo, ohi in other.ranges:
                if ohi < at or olo > hi:
                    continue
                if olo > at:
                    out.append((at, olo - 1))
                at = max(at, ohi + 1)
            if at <= hi:
                out.append((at, hi))
        return Chars(out)

    def __bool__(self) -> bool:
        return bool(self.lows)


class Seq:
    """One alternative of a rule: items in order. `rest_nullable[i]`: items[i:] can all be
    empty (so a parse standing before item i may end there)."""

    __slots__ = ("items", "rest_nullable")

    def __init__(self, items: list[Chars | Rule]):
        self.items: tuple[Chars | Rule, ...] = tuple(items)
        self.rest_nullable: tuple[bool, ...] = ()


class Rule:
    """A rule (named, or made for a group or repetition): its alternatives. Compared by
    identity: a recogniser frame names its `Seq`."""

    __slots__ = ("name", "alts", "nullable", "starts")

    def __init__(self, name: str):
        self.name = name
        self.alts: list[Seq] = []
        self.nullable = False
        self.starts: tuple[tuple[object, ...], ...] = ()
        """The recogniser's frames that begin each alternative (set by the recogniser)."""


def compile_gbnf(text: str) -> Rule:
    """The `root` rule of a GBNF grammar (see the module); `GrammarError` if it cannot be
    parsed or generated."""
    if not isinstance(text, str):
        raise GrammarError(f"a grammar must be a string, got {type(text).__name__}")
    if len(text) > MAX_TEXT:
        raise GrammarError(f"the grammar is {len(text)} characters; at most {MAX_TEXT}")
    if "::=" not in text:
        hint = (
            " (it looks like Lark / EBNF with `:` rules; write `name ::= ...` with a `root` rule)"
            if re.search(r"^\s*[?!]?\w+\s*:", text, re.M)
            else ""
        )
        raise GrammarError(
            "a grammar is GBNF: rules written `name ::= alternatives`, starting at `root`; "
            f"this text has no `::=`{hint}"
        )
    rules = _Parser(text).grammar()
    if "root" not in rules:
        raise GrammarError(
            f"the grammar has no rule named root (rules: {', '.join(list(rules)[:8])}); the "
            "answer is what `root ::= ...` produces"
        )
    every = rules_of(rules["root"])
    _prune_unproductive(every)
    _nullable(every)
    _check_left_recursion(every)
    return rules["root"]


def rules_of(root: Rule) -> list[Rule]:
    """Every rule `root` reaches, itself first."""
    seen = {id(root): root}
    todo = [root]
    while todo:
        for alt in todo.pop().alts:
            for item in alt.items:
                if isinstance(item, Rule) and id(item) not in seen:
                    seen[id(item)] = item
                    todo.append(item)
    return list(seen.values())


def _prune_unproductive(rules: list[Rule]) -> None:
    """Drop the alternatives that can never finish (an item that produces no finite text):
    a parse must never walk into a dead end."""
    productive: set[int] = set()
    changed = True
    while changed:
        changed = False
        for rule in rules:
            if id(rule) in productive:
                continue
            if any(all(_productive(i, productive) for i in alt.items) for alt in rule.alts):
                productive.add(id(rule))
                changed = True
    root = rules[0]
    if id(root) not in productive:
        raise GrammarError(
            "rule root produces no finite text (each alternative recurses without end); "
            "give the recursion an alternative that stops"
        )
    for rule in rules:
        rule.alts = [a for a in rule.alts if all(_productive(i, productive) for i in a.items)]


def _productive(item: Chars | Rule, productive: set[int]) -> bool:
    return isinstance(item, Chars) or id(item) in productive


def _nullable(rules: list[Rule]) -> None:
    changed = True
    while changed:
        changed = False
        for rule in rules:
            if not rule.nullable and any(
                all(isinstance(i, Rule) and i.nullable for i in alt.items) for alt in rule.alts
            ):
                rule.nullable = changed = True
    for rule in rules:
        for alt in rule.alts:
            rest = [True]
            for item in reversed(alt.items):
                rest.append(rest[-1] and isinstance(item, Rule) and item.nullable)
            alt.rest_nullable = tuple(reversed(rest))


def _check_left_recursion(rules: list[Rule]) -> None:
    """Refuse a rule that can reach itself before consuming a character: a left-to-right
    recogniser would expand it without end."""
    firsts: dict[int, list[Rule]] = {}
    for rule in rules:
        out: list[Rule] = []
        for alt in rule.alts:
            for item in alt.items:
                if isinstance(item, Chars):
                    break
                out.append(item)
                if not item.nullable:
                    break
        firsts[id(rule)] = out
    state: dict[int, int] = {}  # 1: on the path, 2: done

    def visit(rule: Rule, path: list[Rule]) -> None:
        state[id(rule)] = 1
        path.append(rule)
        for nxt in firsts[id(rule)]:
            s = state.get(id(nxt), 0)
            if s == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                named = next((r.name for r in cycle if not r.name.startswith("(")), None)
                if named is None:  # only a group's or repetition's rules: (x #2) is in x
                    raise GrammarError(
                        f"rule {nxt.name[1:].split(' #')[0]}: a repetition of something that "
                        'can be empty (such as ("")* or (a?)+) would repeat without end; make '
                        "the repeated part produce at least one character"
                    )
                raise GrammarError(
                    f"rule {named} is left-recursive ({' -> '.join(r.name for r in cycle)}): "
                    "it can reach itself before producing a character, which left-to-right "
                    'generation cannot expand; write it with repetition, e.g. sum ::= term ("+" '
                    "term)*, and do not repeat what can be empty"
                )
            if s == 0:
                visit(nxt, path)
        path.pop()
        state[id(rule)] = 2

    for rule in rules:
        if id(rule) not in state:
            visit(rule, [])


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0
        self.rules: dict[str, Rule] = {}
        self.defined: set[str] = set()
        self.used: dict[str, int] = {}
        self.items = 0
        self.anon = 0
        self.rule: Rule | None = None

    def fail(self, what: str, at: int | None = None) -> GrammarError:
        at = self.pos if at is None else at
        line = self.text.count("\n", 0, at) + 1
        col = at - (self.text.rfind("\n", 0, at) + 1) + 1
        return GrammarError(f"grammar line {line}, column {col}: {what}")

    def space(self) -> None:
        text, n = self.text, len(self.text)
        while self.pos < n:
            c = text[self.pos]
            if c in " \t\r\n":
                self.pos += 1
            elif c == "#":
                end = text.find("\n", self.pos)
                self.pos = n if end < 0 else end + 1
            else:
                break

    def peek(self) -> str | None:
        return self.text[self.pos] if self.pos < len(self.text) else None

    def named(self, name: str) -> Rule:
        rule = self.rules.get(name)
        if rule is None:
            rule = self.rules[name] = Rule(name)
        return rule

    def grammar(self) -> dict[str, Rule]:
        self.space()
        while self.pos < len(self.text):
            m = _RULE_START.match(self.text, self.pos)
            if m is None:
                raise self.fail("expected a rule, `name ::= ...`")
            name = m.group(1)
            if name in self.defined:
                raise self.fail(f"rule {name} is defined twice; join its alternatives with |")
            self.defined.add(name)
            self.pos = m.end()
            self.rule = self.named(name)
            self.rule.alts = self.alternatives()
            self.space()
            if self.pos < len(self.text) and _RULE_START.match(self.text, self.pos) is None:
                raise self.fail(f"unexpected {self.text[self.pos]!r} in rule {name}")
        undefined = [n for n in self.rules if n not in self.defined]
        if undefined:
            name = undefined[0]
            raise self.fail(f"rule {name} is used but not defined", self.used[name])
        return self.rules

    def alternatives(self) -> list[Seq]:
        alts = [self.sequence()]
        while True:
            self.space()
            if self.peek() != "|":
                return alts
            self.pos += 1
            alts.append(self.sequence())

    def sequence(self) -> Seq:
        items: list[Chars | Rule] = []
        while True:
            self.space()
            c = self.peek()
            if c is None or c in "|)" or _RULE_START.match(self.text, self.pos):
                return Seq(items)
            start = len(items)
            self.element(items)
            self.quantified(items, start)
            self.items += len(items) - start
            if self.items > MAX_ITEMS:
                raise self.fail(f"the grammar compiles to more than {MAX_ITEMS} items")

    def element(self, items: list[Chars | Rule]) -> None:
        c = self.peek()
        at = self.pos
        if c == '"':
            self.pos += 1
            while True:
                d = self.peek()
                if d is None or d == "\n":
                    raise self.fail("a literal is not closed", at)
                if d == '"':
                    self.pos += 1
                    return
                cp = self.char()
                items.append(Chars([(cp, cp)]))
        if c == "[":
            items.append(self.char_class())
            return
        if c == ".":
            self.pos += 1
            items.append(Chars([(0, _MAX_CP)]))
            return
        if c == "(":
            self.pos += 1
            rule = self.anonymous()
            rule.alts = self.alternatives()
            self.space()
            if self.peek() != ")":
                raise self.fail("a group is not closed", at)
            self.pos += 1
            items.append(rule)
            return
        m = _NAME.match(self.text, self.pos)
        if m is not None:
            self.pos = m.end()
            self.used.setdefault(m.group(0), at)
            items.append(self.named(m.group(0)))
            return
        if c == "<":
            raise self.fail("token references (<...>) are not supported; write the text")
        assert self.rule is not None
        raise self.fail(
            f"unexpected {c!r} in rule {self.rule.name}; expected a literal, a class, a rule "
            "name or ("
        )

    def anonymous(self) -> Rule:
        self.anon += 1
        assert self.rule is not None
        return Rule(f"({self.rule.name} #{self.anon})")

    def quantified(self, items: list[Chars | Rule], start: int) -> None:
        c = self.peek()
        if c in ("*", "+", "?"):
            self.pos += 1
            lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        elif c == "{":
            m = _COUNTED.match(self.text, self.pos)
            if m is None or not (m.group(1) or m.group(3)):
                raise self.fail("a repeat is written {m}, {m,}, {m,n} or {,n}")
            self.pos = m.end()
            lo = int(m.group(1) or 0)
            hi = lo if m.group(2) is None else (int(m.group(3)) if m.group(3) else None)
            if max(lo, hi or 0) > MAX_REPEAT:
                raise self.fail(f"repeat {m.group(0)}: counts above {MAX_REPEAT} are not supported")
            if hi is not None and hi < lo:
                raise self.fail(f"repeat {m.group(0)}: the most is below the least")
        else:
            return
        if len(items) == start:
            raise self.fail(f"nothing to repeat before {c!r}")
        if len(items) - start == 1:
            unit = items.pop()
        else:  # a literal of several characters repeats whole
            unit = self.anonymous()
            unit.alts = [Seq(items[start:])]
            del items[start:]
        items.extend([unit] * lo)
        if hi is None:
            star = self.anonymous()
            star.alts = [Seq([unit, star]), Seq([])]
            items.append(star)
            return
        tail: Rule | None = None  # (unit (unit (...)?)?)?, nested so each text has one parse
        for _ in range(hi - lo):
            opt = self.anonymous()
            opt.alts = [Seq([unit] if tail is None else [unit, tail]), Seq([])]
            tail = opt
        if tail is not None:
            items.append(tail)

    def char(self) -> int:
        """One character of a literal or class, escapes decoded; the position moves past it."""
        c = self.text[self.pos]
        self.pos += 1
        if c != "\\":
            return ord(c)
        e = self.peek()
        if e is None:
            raise self.fail("the grammar ends in a backslash")
        self.pos += 1
        simple = {"n": 0x0A, "r": 0x0D, "t": 0x09, "\\": 0x5C, '"': 0x22, "[": 0x5B, "]": 0x5D,
                  "-": 0x2D, "^": 0x5E, "/": 0x2F, "0": 0x00}  # fmt: skip
        if e in simple:
            return simple[e]
        width = {"x": 2, "u": 4, "U": 8}.get(e)
        if width is None:
            raise self.fail(f"unknown escape \\{e}", self.pos - 2)
        digits = self.text[self.pos : self.pos + width]
        if len(digits) != width or any(d not in "0123456789abcdefABCDEF" for d in digits):
            raise self.fail(f"\\{e} needs {width} hex digits", self.pos - 2)
        self.pos += width
        cp = int(digits, 16)
        if cp > _MAX_CP or 0xD800 <= cp <= 0xDFFF:
            raise self.fail(f"\\{e}{digits} is not a Unicode character", self.pos - 2 - width)
        return cp

    def char_class(self) -> Chars:
        at = self.pos
        self.pos += 1
        negated = self.peek() == "^"
        if negated:
            self.pos += 1
        ranges: list[tuple[int, int]] = []
        while True:
            c = self.peek()
            if c is None or c == "\n":
                raise self.fail("a character class is not closed", at)
            if c == "]":
                self.pos += 1
                break
            lo = self.char()
            if self.peek() == "-" and self.text[self.pos + 1 : self.pos + 2] not in ("]", ""):
                self.pos += 1
                hi = self.char()
                if hi < lo:
                    raise self.fail(f"range {chr(lo)!r}-{chr(hi)!r} is reversed")
                ranges.append((lo, hi))
            else:
                ranges.append((lo, lo))
        chars = Chars([(0, _MAX_CP)]) - Chars(ranges) if negated else Chars(ranges)
        if not chars:
            raise self.fail("the class admits no character", at)
        return chars


__all__ = ["Chars", "GrammarError", "Rule", "Seq", "compile_gbnf", "rules_of"]
