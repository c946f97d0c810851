"""`JsonStream`: JSON fed in pieces is re-written exactly as `json.dumps(value,
ensure_ascii=False)` writes it (whatever its whitespace and escapes, wherever the pieces are
cut), each piece tagged with the path of the value it belongs to; and text that is not JSON is
refused."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_runtime.text.json_stream import JsonStream

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def _raw(value: Any, rng: random.Random) -> str:
    """value as some writer might write it: escapes or not, any indent and separators."""
    return json.dumps(
        value,
        ensure_ascii=rng.random() < 0.5,
        indent=rng.choice([None, 0, 2]),
        separators=rng.choice([None, (",", ":"), (" , ", " : ")]),
    )


def _feed(raw: str, rng: random.Random) -> tuple[str, list[tuple[Any, str, bool]]]:
    stream, events = JsonStream(), []
    at = 0
    while at < len(raw):
        step = rng.randint(1, 7)
        events += stream.feed(raw[at : at + step])
        at += step
    events += stream.finish()
    return "".join(e[1] for e in events), events


@settings(max_examples=300, deadline=None)
@given(values, st.integers(0, 2**32))
def test_pieces_concatenate_to_json_dumps(value: Any, seed: int) -> None:
    rng = random.Random(seed)
    raw = _raw(value, rng)
    text, _ = _feed(raw, rng)
    assert text == json.dumps(value, ensure_ascii=False)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["a", "b", "c"]), values, min_size=1), st.integers(0, 2**32))
def test_each_piece_names_its_value(value: dict[str, Any], seed: int) -> None:
    """The pieces of one member's value (path starting with its key) concatenate to that value
    as json.dumps writes it."""
    rng = random.Random(seed)
    _, events = _feed(_raw(value, rng), rng)
    for key, member in value.items():
        mine = "".join(t for path, t, _ in events if path[:1] == (key,))
        assert mine == json.dumps(member, ensure_ascii=False)
        ends = [path for path, _, done in events if done and path == (key,)]
        assert len(ends) == 1


def test_a_string_is_written_as_it_arrives() -> None:
    stream = JsonStream()
    assert stream.feed('{"city": "Par') == [
        ((), "{", False),
        ((), '"city": ', False),
        (("city",), '"', False),
        (("city",), "Par", False),
    ]
    assert stream.feed("is\\u00e9\\") == [(("city",), "isé", False)]  # the cut escape waits
    assert stream.feed('n", "n": 1') == [
        (("city",), "\\n", False),
        (("city",), '"', True),
        ((), ', "n": ', False),
    ]
    assert stream.feed("2}") == [(("n",), "12", True), ((), "}", True)]
    assert stream.ended


def test_a_surrogate_pair_cut_between_its_escapes_makes_one_character() -> None:
    stream = JsonStream()
    text = "".join(t for _, t, _ in stream.feed('["\\ud83d'))
    text += "".join(t for _, t, _ in stream.feed('\\ude00"]'))
    assert text == '["😀"]' and stream.ended


@pytest.mark.parametrize(
    "bad", ['{"a" 1}', '{"a": 1 "b": 2}', "[1, 2}", "{1: 2}", '"a\\q"', "[tru]", "[1] 2", '"\x01"']
)
def test_not_json_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        JsonStream().feed(bad)
        JsonStream().feed(bad + " ")
