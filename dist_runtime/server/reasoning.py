"""Reasoning models' thinking apart from their answer (`--reasoning-parser`, as vLLM's).

Models such as DeepSeek-R1 (and its Llama distills) and Qwen3 think first, between `<think>` and
`</think>`, then answer. With a reasoning parser the chat route returns the thinking as the
message's `reasoning_content` (DeepSeek's API field, as vLLM returns it) and the rest as its
`content`; streamed, as `delta.reasoning_content` pieces, then `delta.content`. The Responses
route returns it as a `reasoning` output item before the message, the Messages route as a
`thinking` block before the text. Tool calls are looked for in the answer only.
`usage.completion_tokens_details.reasoning_tokens` counts the thinking's tokens.

Where thinking starts: at `<think>` opening the answer, or at the answer's start when the prompt
ends with `<think>` (DeepSeek-R1's template opens it there). Where it ends: at `</think>`; an
answer that never closes it (cut by max_tokens) is all thinking. An answer that opens no
thinking is all content. Whitespace between `</think>` and the answer is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

from dist_runtime.engine.thinking import prompt_opens
from dist_runtime.text.tokenizer import Tokenizer

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
REASONING_PARSERS = ("deepseek_r1", "qwen3")
"""vLLM's names of the parsers of this `<think>` ... `</think>` form (one rule serves both)."""


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker` (a marker perhaps cut)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


class ReasoningSplitter:
    """One choice's text: each piece split into (thinking, answer) as it comes; the pieces put
    together equal the whole text's split (`split`)."""

    def __init__(self, opened: bool) -> None:
        self.state = "thinking" if opened else "start"
        self.buf = ""
        self.answered = False
        """Some answer text was sent (whitespace before it is dropped)."""
        self.thought = False
        """The answer opened or continued thinking."""

    def feed(self, piece: str, finished: bool) -> tuple[str, str]:
        """(thinking, answer) of the next piece; `finished`: no more text follows."""
        self.buf += piece
        thinking, answer = [], []
        while True:
            if self.state == "start":
                head = self.buf.lstrip()
                if head.startswith(THINK_OPEN):
                    self.buf, self.state = head[len(THINK_OPEN) :], "thinking"
                    continue
                if not finished and THINK_OPEN.startswith(head):
                    break  # perhaps `<think>` cut in two: wait for more
                self.state = "answer"
                continue
            if self.state == "thinking":
                self.thought = True
                at = self.buf.find(THINK_CLOSE)
                if at >= 0:
                    thinking.append(self.buf[:at])
                    self.buf, self.state = self.buf[at + len(THINK_CLOSE) :], "answer"
                    continue
                keep = 0 if finished else _partial_suffix(self.buf, THINK_CLOSE)
                thinking.append(self.buf[: len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep :]
                break
            text = self.buf if self.answered else self.buf.lstrip()
            self.buf = ""
            if text:
                self.answered = True
                answer.append(text)
            break
        return "".join(thinking), "".join(answer)

    def split(self, text: str) -> tuple[str | None, str]:
        """(thinking or None when the answer opened none, answer) of a whole text."""
        thinking, answer = self.feed(text, finished=True)
        return (thinking if self.thought else None), answer


def opens_thinking(tokenizer: Tokenizer | None, prompt_ids: Sequence[int]) -> bool:
    """Whether a prompt ends inside an opened `<think>` (the template opened the thinking)."""
    return tokenizer is not None and prompt_opens(tokenizer, prompt_ids, THINK_OPEN)


def reasoning_tokens(tokenizer: Tokenizer | None, token_ids: Sequence[int], opened: bool) -> int:
    """How many of an answer's tokens are thinking: those up to the one that completes
    `</think>` (all of them when it never comes and the answer thinks)."""
    if tokenizer is None or not token_ids:
        return 0

    def text(k: int) -> str:
        return tokenizer.decode(list(token_ids[:k]), skip_special_tokens=False)

    whole = text(len(token_ids))
    if not opened and not whole.lstrip().startswith(THINK_OPEN):
        return 0
    if THINK_CLOSE not in whole:
        return len(token_ids)
    lo, hi = 1, len(token_ids)  # the first k whose text holds the marker
    while lo < hi:
        mid = (lo + hi) // 2
        if THINK_CLOSE in text(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo
