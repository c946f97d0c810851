"""Reuse of a long text's tokens for a later text that starts the same way.

A long document asked about again (the next question after the same document, a
conversation's next turn) would be tokenized from its start on every request: about 1.5-2 µs a
token, seconds for a million tokens, before the prefix cache can even look the prompt up.
`PrefixTokenCache` keeps the tokens of the last few long texts; a text sharing a long start
with one of them is tokenized only from shortly before where the two part, and the pieces are
joined.

The join is checked, never assumed. The piece tokenized afresh starts `OVERLAP` tokens before
the shared start ends, at a token boundary of the kept tokens, and must reproduce those
`OVERLAP` tokens; otherwise the whole text is tokenized. Token boundaries come from each
token's byte length, so a text is kept only if its tokens' bytes spell it (no normalizer
rewrote it), or spell it after one space: SentencePiece's dummy prefix (Llama 2, Mistral),
which the tokenizer adds to any text it is given, so there the fresh piece starts just after
the space that begins a token, and its own dummy prefix stands for that space.
"""

from __future__ import annotations

import array
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

MIN_CHARS = 32768
"""Texts shorter than this are tokenized whole and not kept (tokenizing them takes
milliseconds)."""
STRIDE = 64
"""A kept text's token boundaries are recorded every this many tokens."""
OVERLAP = 4 * STRIDE
"""Kept tokens the fresh piece must reproduce before the join is trusted."""
MARGIN = 2 * STRIDE
"""Tokens left between the checked overlap and where the two texts part (the word there may be
split differently)."""
SPACE_SEARCH = 16
"""Marks looked back over for a token starting with a space to cut at."""
MIN_REUSE = 16 * STRIDE
"""Fewer kept tokens than this before the join: tokenize the whole text instead."""


@dataclass(frozen=True)
class _Entry:
    text: str
    ids: array.array[int]
    starts: np.ndarray
    """Char offset where token i * STRIDE starts (non-decreasing; for a token starting inside
    a character's bytes, the next character's)."""
    whole: np.ndarray
    """Whether token i * STRIDE starts at a character (a place to cut the text)."""


class PrefixTokenCache:
    """The tokens of the last `max_entries` long texts (at most `max_chars` characters in
    all); `encode` reuses them for a text that starts the same way. Safe to share between
    threads (tokenizing runs outside the lock)."""

    def __init__(
        self,
        encode: Callable[[str], list[int]],
        spelling: Callable[[], tuple[np.ndarray, np.ndarray]],
        max_entries: int = 4,
        max_chars: int = 32 << 20,
    ):
        self._encode = encode
        self._spelling = spelling
        """(UTF-8 byte length of each token id's text, which ids are added tokens); built on
        first use."""
        self._lengths: np.ndarray | None = None
        self._added: np.ndarray | None = None
        self._lead = 0
        """1 when the tokenizer puts a space before every text (a dummy prefix), else 0."""
        self.max_entries = max_entries
        self.max_chars = max_chars
        self._entries: list[_Entry] = []  # most recently used last
        self._lock = threading.Lock()
        self.hits = 0
        """Texts joined from kept tokens and a fresh piece."""
        self.reused_tokens = 0
        """Tokens taken from kept texts instead of tokenized again."""

    def encode(self, text: str) -> list[int]:
        if len(text) < MIN_CHARS:
            return self._encode(text)
        ids = self._join(text)
        if ids is None:
            ids = self._encode(text)
        self._keep(text, ids)
        return ids

    def _join(self, text: str) -> list[int] | None:
        """Tokens of `text` from the kept text sharing the longest start with it and a piece
        tokenized afresh; None when no kept text shares enough or the join does not check."""
        with self._lock:
            entries = list(self._entries)
        best, shared = None, 0
        for entry in entries:
            n = common_prefix(entry.text, text)
            if n > shared:
                best, shared = entry, n
        if best is None:
            return None
        starts = best.starts
        # the last recorded boundary inside the shared start, less the margin and the overlap
        last = int(np.searchsorted(starts, shared, side="right")) - 1
        end = last - MARGIN // STRIDE  # the checked overlap ends at token end * STRIDE
        begin = end - OVERLAP // STRIDE
        begin = self._cut(best, begin)
        if begin * STRIDE < MIN_REUSE or end >= len(starts):
            return None
        cut, stop = begin * STRIDE, end * STRIDE
        fresh = self._encode(text[int(starts[begin]) + self._lead :])
        if fresh[: stop - cut] != best.ids[cut:stop].tolist():
            return None
        with self._lock:
            self.hits += 1
            self.reused_tokens += cut
        return best.ids[:cut].tolist() + fresh

    def _cut(self, entry: _Entry, begin: int) -> int:
        """The mark at or before `begin` to cut the text at: one whose token starts a
        character, preferably a space; with a dummy prefix, one whose token starts with a
        space (the piece then starts after it). -1 when there is none."""
        first_whole = -1
        for mark in range(begin, -1, -1):
            if not entry.whole[mark]:
                continue
            if entry.text[int(entry.starts[mark])] == " ":
                return mark
            if first_whole < 0 and not self._lead:
                first_whole = mark
            if begin - mark >= SPACE_SEARCH and (first_whole >= 0 or self._lead):
                break
        return first_whole

    def _keep(self, text: str, ids: list[int]) -> None:
        if len(text) > self.max_chars:
            return
        marks = self._marks(text, ids)
        if marks is None:
            return  # its tokens do not spell it: boundaries cannot be found
        entry = _Entry(text, array.array("i", ids), *marks)
        with self._lock:
            self._entries = [e for e in self._entries if e.text != text]
            self._entries.append(entry)
            while len(self._entries) > self.max_entries or (
                sum(len(e.text) for e in self._entries) > self.max_chars
            ):
                self._entries.pop(0)

    def _marks(self, text: str, ids: list[int]) -> tuple[np.ndarray, np.ndarray] | None:
        """(`_Entry.starts`, `_Entry.whole`) of tokens 0, STRIDE, 2 * STRIDE, ... of `ids`
        in `text`; None if the tokens' bytes do not add up to the text's."""
        if self._lengths is None:
            self._lengths, self._added = self._spelling()
            self._lead = self._dummy_prefix()
        lengths, added = self._lengths, self._added
        assert added is not None
        tokens = np.asarray(ids, dtype=np.int64)
        if len(tokens) == 0 or tokens.min() < 0 or tokens.max() >= len(lengths):
            return None
        spelled = lengths[tokens]
        if self._lead:
            # the dummy prefix's space is no byte of the text: it leads the first token of
            # the text and of each piece between added tokens (which split the text first)
            is_added = added[tokens]
            leads = np.concatenate(([True], is_added[:-1])) & ~is_added
            spelled = spelled - leads
        ends = np.cumsum(spelled)
        raw = text.encode("utf-8", "surrogatepass")
        if int(ends[-1]) != len(raw):
            return None
        at = np.concatenate(([0], ends[STRIDE - 1 :: STRIDE]))  # byte offsets of the marks
        at = at[at < len(raw)]
        if len(raw) == len(text):  # ASCII: bytes are characters
            return at.astype(np.int64), np.ones(len(at), dtype=bool)
        data = np.frombuffer(raw, dtype=np.uint8)
        first = (data & 0xC0) != 0x80  # a character's first byte
        chars = np.concatenate(([0], np.cumsum(first)))  # characters before each byte
        return chars[at].astype(np.int64), first[at]

    def _dummy_prefix(self) -> int:
        """1 if the tokenizer spells a text with one more leading space than it has."""
        assert self._lengths is not None
        probe = "Harbor x"
        ids = self._encode(probe)
        spelled = int(self._lengths[np.asarray(ids, dtype=np.int64)].sum()) if ids else 0
        return 1 if spelled == len(probe) + 1 else 0


def common_prefix(a: str, b: str) -> int:
    """The length of the longest common start of a and b (compared a block at a time, then
    by halves of the block where they part)."""
    n = min(len(a), len(b))
    step = 1 << 16
    i = 0
    while i < n and a[i : min(i + step, n)] == b[i : min(i + step, n)]:
        i += step
    if i >= n:
        return n
    lo, hi = i, min(i + step, n)  # a[:lo] == b[:lo]; a[lo:hi] != b[lo:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo
