"""GBNF grammars (`dist_runtime.text.gbnf`, run by `JsonGrammar.from_gbnf`) against independent
oracles: every string over a small alphabet, up to a length, is accepted exactly when Python's
`re` (for grammars that are regular) or a hand-written recogniser (for recursive ones) says it
is in the language, and a prefix stays alive exactly when some string of the language extends
it (no dead ends for the sampler to walk into). Then the syntax, UTF-8 and the errors."""

from __future__ import annotations

import itertools
import re

import pytest

from dist_runtime.text.gbnf import MAX_REPEAT, GrammarError
from dist_runtime.text.json_grammar import MAX_GRAMMAR_DEPTH, JsonGrammar


def accepts(g: JsonGrammar, text: str) -> bool:
    return g.accepts(g.advance(g.start, text.encode()))


def alive(g: JsonGrammar, text: str) -> bool:
    return g.advance(g.start, text.encode()) is not None


def strings(alphabet: str, most: int) -> list[str]:
    return ["".join(p) for n in range(most + 1) for p in itertools.product(alphabet, repeat=n)]


REGULAR = [
    # (grammar, the same language as a Python pattern, alphabet, longest string tried)
    ('root ::= "ab" | "a" "c"* | "b"{2,3}', r"ab|ac*|b{2,3}", "abc", 6),
    ('root ::= [a-b]+ ([0-1] | "-")?', r"[ab]+[01-]?", "ab01-c", 4),
    ('root ::= word (" " word){0,2}\nword ::= [ab]{1,2}', r"[ab]{1,2}( [ab]{1,2}){0,2}", "ab ", 7),
    ('root ::= x{2,}\nx ::= "a" | "bb"', r"(a|bb){2,}", "ab", 6),
    ('root ::= "a"{,2} "b"{3}', r"a{0,2}b{3}", "ab", 6),
    ('root ::= [^a\\n]* "a"', r"[^a\n]*a", "ab\n", 5),
    ('root ::= ("x" | "")  ("y"? "z")+', r"x?(y?z)+", "xyz", 5),
    ('root ::= "" | "a"', r"|a", "ab", 3),
    ('root ::= . "."', r"(.|\n)\.", "a.\n", 3),
]


@pytest.mark.parametrize("case", range(len(REGULAR)))
def test_regular_grammars_match_python_re(case: int) -> None:
    """Membership, and liveness: a prefix is alive exactly when a string of the language (up to
    three characters longer: every language here can finish within three) extends it."""
    grammar, pattern, alphabet, most = REGULAR[case]
    g = JsonGrammar.from_gbnf(grammar)
    texts = strings(alphabet, most)
    members = {t for t in texts if re.fullmatch(pattern, t)}
    assert members, pattern
    for text in texts:
        assert accepts(g, text) == (text in members), (grammar, text)
    longer = [t for t in strings(alphabet, most + 3) if re.fullmatch(pattern, t)]
    prefixes = {m[:i] for m in longer for i in range(len(m) + 1)}
    for text in texts:
        assert alive(g, text) == (text in prefixes), (grammar, text)


def balanced(text: str) -> bool:
    """`(` `)` nested properly, at least one pair at the top, `x` only directly inside a pair
    that holds nothing else."""
    depth = 0
    for i, c in enumerate(text):
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth < 0:
                return False
        elif not (0 < i < len(text) - 1 and text[i - 1] == "(" and text[i + 1] == ")"):
            return False
    return depth == 0 and text != ""


def expression(text: str) -> bool:
    """sum := prod ("+" prod)*; prod := atom ("*" atom)*; atom := digits | "(" sum ")"."""
    pos = 0

    def atom() -> bool:
        nonlocal pos
        if pos < len(text) and text[pos] == "(":
            pos += 1
            if not total() or pos >= len(text) or text[pos] != ")":
                return False
            pos += 1
            return True
        start = pos
        while pos < len(text) and text[pos].isdigit():
            pos += 1
        return pos > start

    def chain(part: object, op: str) -> bool:
        nonlocal pos
        if not part():  # type: ignore[operator]
            return False
        while pos < len(text) and text[pos] == op:
            pos += 1
            if not part():  # type: ignore[operator]
                return False
        return True

    def product() -> bool:
        return chain(atom, "*")

    def total() -> bool:
        return chain(product, "+")

    return total() and pos == len(text)


def test_recursive_grammars_match_hand_written_recognisers() -> None:
    parens = JsonGrammar.from_gbnf(
        """
        root  ::= group+          # one or more groups side by side
        group ::= "(" inner ")"
        inner ::= "x" | group*
        """
    )
    for text in strings("()x", 8):
        assert accepts(parens, text) == balanced(text), text
    arith = JsonGrammar.from_gbnf(
        'root ::= sum\nsum ::= prod ("+" prod)*\nprod ::= atom ("*" atom)*\n'
        'atom ::= [0-9]+ | "(" sum ")"'
    )
    texts = strings("1+*()", 7)
    assert sum(expression(t) for t in texts) > 100
    for text in texts:
        assert accepts(arith, text) == expression(text), text
    # no dead ends: a live prefix can always be finished
    for text in strings("1+*()", 5):
        if alive(arith, text):
            closers = ")" * (text.count("(") - text.count(")"))
            assert any(accepts(arith, text + end + closers) for end in ("", "1")), text


def test_accepts_and_ended() -> None:
    """`accepts`: the answer may stop here; `ended`: it must (nothing can follow)."""
    g = JsonGrammar.from_gbnf('root ::= "a"+ | "bc"')
    a = g.advance(g.start, b"aa")
    assert g.accepts(a) and not g.ended(a)
    bc = g.advance(g.start, b"bc")
    assert g.accepts(bc) and g.ended(bc)
    b = g.advance(g.start, b"b")
    assert not g.accepts(b) and not g.ended(b)
    assert not g.accepts(g.start)
    empty = JsonGrammar.from_gbnf('root ::= "a"?')
    assert empty.accepts(empty.start) and not empty.ended(empty.start)


def test_syntax() -> None:
    """Comments, rules over several lines, escapes, `.`, counted repeats, names with `-` and
    digits, classes with escapes and a literal `-` at their end."""
    g = JsonGrammar.from_gbnf(
        r"""
# a comment line
root ::= greeting-1 sep
         tail        # the rule goes on over lines
greeting-1 ::= "hi\t\"\\\x41\u00e9\U0001F600" | "\n"
sep ::= [,;\]\-] | [a-c-]
tail ::= . . | [^\x00-\x7F]{1,2}
"""
    )
    good = ['hi\t"\\Aé😀,ab', "\n-日本", "\n]x\n", "\nc€", 'hi\t"\\Aé😀--£']
    bad = ["hi", "\n,a", "\n-abc", "\nd12", "\n,日本語", 'hi\t"\\Aé😀']
    for text in good:
        assert accepts(g, text), text
    for text in bad:
        assert not accepts(g, text), text


def test_utf8_bytes() -> None:
    """Characters are UTF-8: a character's first byte is refused at once when no character it
    can begin is in the class; bytes UTF-8 forbids never pass."""
    g = JsonGrammar.from_gbnf('root ::= [α-ω]+ "😀"')
    assert accepts(g, "αβω😀") and not accepts(g, "αβ")
    assert g.advance(g.start, "ж".encode()[:1]) is None  # U+0436's lead byte: no Greek follows
    assert g.advance(g.start, "α".encode()[:1]) is not None
    assert g.advance(g.start, b"\xce\xc0") is None  # not a continuation byte
    assert g.advance(g.start, "αβ".encode() + "😀".encode()[:3]) is not None
    assert not accepts(g, "α\ufffd")
    dot = JsonGrammar.from_gbnf("root ::= .")
    assert accepts(dot, "\U0010ffff") and accepts(dot, "\x00")
    for raw in (b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xff"):
        assert dot.advance(dot.start, raw) is None, raw


def test_repetition_runs_in_constant_depth() -> None:
    """`x*` and a rule's last item reuse their frame: 5,000 repeats leave one short stack,
    while nesting past MAX_GRAMMAR_DEPTH is cut off."""
    g = JsonGrammar.from_gbnf('root ::= line*\nline ::= [a-z]* "\\n"')
    state = g.advance(g.start, b"ab\n" * 2500)
    assert state is not None and g.accepts(state)
    assert max(len(stack) for stack in state) <= 4
    nest = JsonGrammar.from_gbnf('root ::= "(" root ")" | "x"')
    assert accepts(nest, "(" * 50 + "x" + ")" * 50)
    assert not alive(nest, "(" * (MAX_GRAMMAR_DEPTH + 2))


@pytest.mark.parametrize(
    ("grammar", "message"),
    [
        ('root ::= root "a" | "b"', r"rule root is left-recursive \(root -> root\)"),
        ('root ::= a\na ::= b? "x"\nb ::= a "y"', r"rule a is left-recursive \(a -> .* b -> a\)"),
        ('root ::= x "a"\nx ::= ("a"?)*', "rule x: a repetition of something that can be empty"),
        ('root ::= "a" item\n', r"line 1, column 14: rule item is used but not defined"),
        ('main ::= "a"', r"no rule named root \(rules: main\)"),
        ('root ::= "a" root', "rule root produces no finite text"),
        ('start: "a"\n', "has no `::=` .*looks like Lark"),
        ('root ::= "a"\nroot ::= "b"', "line 2, column 1: rule root is defined twice"),
        ('root ::= "abc', "a literal is not closed"),
        ("root ::= [abc", "a character class is not closed"),
        ('root ::= ("a" | "b"', "a group is not closed"),
        ('root ::= "\\q"', r"unknown escape \\q"),
        ('root ::= "\\u12"', r"\\u needs 4 hex digits"),
        ("root ::= [z-a]", "range 'z'-'a' is reversed"),
        (f'root ::= "a"{{{MAX_REPEAT + 1}}}', f"counts above {MAX_REPEAT}"),
        ('root ::= "a"{3,1}', "the most is below the least"),
        ("root ::= <[1000]>", "token references"),
        ('root ::= * "a"', "unexpected '\\*'"),
        ('root ::= "a" ; "b"', "column 14: unexpected ';' in rule root"),
        ('root ::= "a")', "column 13: unexpected '\\)' in rule root"),
    ],
)
def test_errors_name_the_problem(grammar: str, message: str) -> None:
    with pytest.raises(GrammarError, match=message):
        JsonGrammar.from_gbnf(grammar)


def test_alternatives_that_cannot_finish_are_dropped() -> None:
    """An alternative through a rule with no finite text is never offered: after "b" nothing
    could end, so "b" is refused from the start."""
    g = JsonGrammar.from_gbnf('root ::= "a" | "b" loop\nloop ::= "c" loop')
    assert accepts(g, "a") and not alive(g, "b")
