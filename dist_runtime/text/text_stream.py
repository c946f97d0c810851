"""A sequence's output text, grown token by token, with stop strings.

Text that could still turn out to be the start of a stop string is held back from streaming, so
the concatenated deltas always equal the final (stop-cut) text.
"""

from __future__ import annotations

from typing import Protocol


class Detokenizer(Protocol):
    def add(self, token_id: int) -> str: ...


class TextStream:
    def __init__(
        self, detokenizer: Detokenizer, stops: tuple[str, ...], include_stop: bool = False
    ):
        self.detokenizer = detokenizer
        self.stops = stops
        self.include_stop = include_stop
        """The text is cut after the stop string found, not before it."""
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.num_emitted = 0
        self.hit_stop = False
        self.stop_hit: str | None = None
        """The stop string the text was cut at (the earliest one in the text)."""
        self.stop_from = 0
        """Where a stop string may start: text added while not `armed` is passed over."""

    def add(self, token_id: int, armed: bool = True) -> bool:
        """Append a token's text; True when a stop string now appears (the text is cut there).
        Not `armed` (before min_tokens): the token's text is no place for a stop string."""
        before = len(self.text)
        self.text += self.detokenizer.add(token_id)
        if not armed:
            self.stop_from = len(self.text)
        elif self.stops:
            self.hit_stop = self._cut_at_stop(before)
        return self.hit_stop

    def finish(self) -> None:
        flush = getattr(self.detokenizer, "flush", None)
        if flush is not None and not self.hit_stop:
            self.text += flush()
            if self.stops:
                self._cut_at_stop(self.stop_from)

    def release(self, finished: bool) -> str:
        """Text not yet streamed that can no longer change."""
        end = len(self.text) if finished else len(self.text) - self.hold
        if end <= self.num_emitted:
            return ""
        delta = self.text[self.num_emitted : end]
        self.num_emitted = end
        return delta

    def _cut_at_stop(self, before: int) -> bool:
        start = self.stop_from
        found = [(self.text.find(s, max(start, before - len(s) + 1)), s) for s in self.stops]
        found = [(at, s) for at, s in found if at >= 0]
        if not found:
            return False
        at, self.stop_hit = min(found, key=lambda hit: hit[0])
        self.text = self.text[: at + len(self.stop_hit) if self.include_stop else at]
        return True
