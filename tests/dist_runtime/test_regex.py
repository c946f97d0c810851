"""Guided output's regular expressions (`dist_runtime.text.regex`) against Python's `re` (with
`re.ASCII`: `\\d \\w \\s` are ASCII classes here, as in ECMAScript's `\\d \\w`): the
same whole-match answer on strings drawn around each pattern, and a clear refusal of what an
automaton cannot hold."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_runtime.text.regex import MAX_NFA_STATES, Regex, RegexError

PATTERNS = [
    r"\d{3}-\d{4}",
    r"^[A-Z][a-z]+( [A-Z][a-z]+)*$",
    r"(?:cat|dog)s?",
    r"[^,\s]+@[\w.-]+\.[a-z]{2,}",
    r"a{2,}b?",
    r"(?P<y>\d{4})-(0[1-9]|1[0-2])",
    r"\u00e9+|\x41",
    r"[\D]+",
    r".*",
    r"a{0}b",
    r"(ab|a)(bc|c)?",
    r"[a-c-]+",
    r"[\]x]",
    r"\.\*\+\?\(\)\[\]\{\}\|\\\/",
    r"x{2,3}?y",
    r"(a|b|)+c",
    r"[0-9a-fA-F]{1,4}(:[0-9a-fA-F]{1,4}){0,3}",
    r"\s*\S+\s*",
    r"[^a-z]{2}",
    r"(\w+\s?){1,3}",
]
ALPHABET = "abcxyACZ019-:., é\n@*+?()[]{}|\\/_"


def _python(pattern: str) -> re.Pattern[str]:
    body = pattern[1:] if pattern.startswith("^") else pattern
    return re.compile(body[:-1] if body.endswith("$") else body, re.ASCII)


@pytest.mark.parametrize("pattern", PATTERNS)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_whole_matches_agree_with_python(pattern: str, data: st.DataObject) -> None:
    """Random strings (and strings built from the pattern's own matches, then mutated) get
    the same answer from both."""
    ours, theirs = Regex(pattern), _python(pattern)
    text = data.draw(st.text(alphabet=ALPHABET, max_size=12))
    assert ours.fullmatch(text) == (theirs.fullmatch(text) is not None), text
    sample = data.draw(st.from_regex(theirs, fullmatch=True).filter(lambda s: len(s) < 40))
    assert ours.fullmatch(sample), sample
    cut = data.draw(st.integers(0, len(sample)))
    for variant in (sample[:cut], sample[:cut] + "!" + sample[cut:], sample + sample[:1]):
        assert ours.fullmatch(variant) == (theirs.fullmatch(variant) is not None), variant


@pytest.mark.parametrize(
    ("pattern", "match"),
    [
        (r"(a)\1", "back-references"),
        (r"(?=a)a", "look-arounds"),
        (r"(?<=a)b", "look-arounds"),
        (r"(?i)a", "inline flags"),
        (r"a\b", "boundaries"),
        (r"*a", "nothing to repeat"),
        (r"(a", "not closed"),
        (r"a)", "unbalanced"),
        (r"[a", "not closed"),
        (r"[z-a]", "reversed"),
        (r"a{3,1}", "below the least"),
        (r"a++", "possessive"),
        (r"a^b", "start / end"),
        (r"\q", "unknown escape"),
        (r"(a{100}){300}", str(MAX_NFA_STATES)),
    ],
)
def test_refusals_say_why(pattern: str, match: str) -> None:
    with pytest.raises(RegexError, match=re.escape(match)):
        Regex(pattern)


def test_states_know_whether_they_can_go_on() -> None:
    r = Regex(r"ab?")
    after_a = r.step(r.start, ord("a"))
    assert after_a is not None and r.accepts(after_a) and r.can_continue(after_a)
    after_ab = r.step(after_a, ord("b"))
    assert after_ab is not None and r.accepts(after_ab) and not r.can_continue(after_ab)
    assert r.step(after_ab, ord("b")) is None and not r.accepts(r.start)
