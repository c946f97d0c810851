"""A bound on a reasoning model's thinking (`SamplingParams.thinking_budget`, vLLM's
`thinking_token_budget`).

Models such as Qwen3 and DeepSeek-R1 think between `<think>` and `</think>` before they answer,
and some think until `max_tokens` runs out, leaving no answer. With a budget the engine counts
the tokens generated inside the thinking; once there are `budget` of them and the model has not
closed it, the next tokens are forced to the end marker's (each by an allowed-token mask of one
token), so the model closes its thinking and answers after it. The thinking opens where the
prompt ends inside an opened marker (a template that ends the prompt with `<think>`), or where
the output's tokens end with the start marker's tokens.

Drafts (speculative decoding) of a budgeted sequence are cut so that no step carries the
thinking past the budget, and a step that may reach it is not planned ahead of the step before
it (the engine has to see that token first).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dist_runtime.text.tokenizer import Tokenizer

BEFORE, OPEN, CLOSED = "before", "open", "closed"


def _ends_with(tokens: list[int], tail: tuple[int, ...]) -> bool:
    return len(tokens) >= len(tail) and tuple(tokens[len(tokens) - len(tail) :]) == tail


def prompt_opens(tokenizer: Tokenizer, prompt_ids: Sequence[int], marker: str) -> bool:
    """Whether a prompt ends with the start marker (perhaps then whitespace): a template that
    opens the thinking."""
    if not prompt_ids:
        return False
    tail = tokenizer.decode(list(prompt_ids[-8:]), skip_special_tokens=False)
    return tail.rstrip().endswith(marker)


@functools.lru_cache(maxsize=64)
def one_token_mask(token_id: int, vocab: int) -> bytes:
    """An allowed-token mask (least significant bit first) that allows `token_id` alone."""
    packed = bytearray((vocab + 7) // 8)
    packed[token_id // 8] = 1 << (token_id % 8)
    return bytes(packed)


class ThinkingBudget:
    """One sequence's thinking: where it is (`state`), its tokens so far (`count`), and the end
    marker's tokens still to force (`forced`)."""

    def __init__(
        self, budget: int, start: tuple[int, ...], end: tuple[int, ...], opened: bool, vocab: int
    ):
        if not end or not start:
            raise ValueError("a thinking budget needs its start and end markers' tokens")
        self.budget, self.start, self.end, self.vocab = budget, start, end, vocab
        self.state = OPEN if opened else BEFORE
        self.count = 0
        """Tokens generated inside the thinking so far."""
        self.forced: list[int] = []
        """The end marker's tokens still to be forced, next first."""
        self.num_forced = 0
        """End-marker tokens forced (the budget ran out when this is > 0)."""
        if opened:
            self._check([])

    def advance(self, output: list[int]) -> None:
        """Take the output's last token (just appended)."""
        if self.state == CLOSED:
            return
        if self.forced:
            if output[-1] == self.forced[0]:
                self.forced.pop(0)
                self.num_forced += 1
                if not self.forced:
                    self.state = CLOSED
                return
            self.forced = []  # (not the forced token: count it as the model's own)
        if self.state == BEFORE:
            if _ends_with(output, self.start):
                self.state, self.count = OPEN, 0
                self._check(output)
            return
        if _ends_with(output, self.end):
            self.state = CLOSED
            return
        self.count += 1
        self._check(output)

    def _check(self, output: list[int]) -> None:
        """At the budget: force the rest of the end marker (what the output already ends with
        of its start is kept)."""
        if self.count < self.budget:
            return
        done = next(
            (k for k in range(len(self.end) - 1, 0, -1) if _ends_with(output, self.end[:k])), 0
        )
        self.forced = list(self.end[done:])

    def mask(self) -> bytes | None:
        """The allowed-token mask of the next sample: the next forced token's; None: any."""
        return one_token_mask(self.forced[0], self.vocab) if self.forced else None

    def draft_room(self) -> int | None:
        """Most draft tokens the next step may carry without passing the budget (a step adds
        its accepted draft tokens and one more); None: no bound."""
        if self.forced:
            return 0
        if self.state == OPEN:
            return max(self.budget - self.count - 1, 0)
        if self.state == BEFORE:  # (the start marker may come in the step, its thinking after)
            return self.budget
        return None

    def needs_last_token(self) -> bool:
        """Whether the next sample depends on the token of the step in flight: it may be the one
        that reaches the budget (or opens a thinking of budget 0)."""
        if self.forced:
            return True
        if self.state == OPEN:
            return self.count + 1 >= self.budget
        return self.state == BEFORE and self.budget == 0
