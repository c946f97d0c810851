"""Draft tokens by prompt lookup (n-gram speculation) on the driver.

A decoding sequence's last n tokens (n from `prompt_lookup_max` down to `prompt_lookup_min`)
are searched for among its earlier tokens, prompt and output alike; at the latest place the
longest such n-gram occurred with k tokens after it, those tokens are the draft. Answers about a
document quote it, and code edits repeat their input, so drafts are often right; the step that
computes the draft checks it (`workers.sampler.verify_draft`), keeps the tokens the model
agrees with and adds one of its own, so a step yields 1 to k + 1 tokens where plain decode
yields 1. Nothing runs on the device: one vectorised pass over the sequence's tokens per
step (about a millisecond at a million tokens).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

PRIOR_ACCEPTED = 1.0
PRIOR_REJECTED = 1.0
"""A sequence's acceptance estimate starts from 1 accepted token in 2 (and drifts back to it)."""

FORGET = 0.9
"""Each step a sequence's draft is held back, its acceptance counts keep this share, so a
sequence whose drafts were rejected is tried again after a while."""


class TokenBuffer:
    """A sequence's tokens as a growing int64 array, appended to as outputs arrive."""

    def __init__(self) -> None:
        self.array = np.empty(0, dtype=np.int64)
        self.size = 0

    def sync(self, seq: Any) -> np.ndarray:
        """The buffer brought up to `seq`'s prompt + output; returns the filled view."""
        total = seq.num_tokens
        if total > self.size:
            if total > self.array.size:
                grown = np.empty(max(total, 2 * self.array.size, 256), dtype=np.int64)
                grown[: self.size] = self.array[: self.size]
                self.array = grown
            self.array[self.size : total] = seq.token_slice(self.size, total)
            self.size = total
        return self.array[: self.size]


PREDICTION_TOKENS = 8
"""Draft length for a request with a predicted output on a runtime that drafts no other (its
num_speculative_tokens is 0)."""


def _longest_match(corpus: np.ndarray, tokens: np.ndarray, n_max: int) -> tuple[np.ndarray, int]:
    """(ends, n): the positions of `corpus` (each followed by a token) where the longest suffix
    of `tokens` of at most n_max tokens ends, and its length n (ends is empty when not even
    the last token occurs)."""
    size, length = tokens.shape[0], corpus.shape[0]
    ends = np.flatnonzero(corpus[: length - 1] == tokens[size - 1])
    n = 1
    while n < min(n_max, size):
        room = ends[ends >= n]  # room for one more token before the match
        longer = room[corpus[room - n] == tokens[size - 1 - n]]
        if not longer.size:
            break
        ends, n = longer, n + 1
    return ends, n


def continuation(
    corpus: np.ndarray, tokens: np.ndarray, k: int, n_max: int, n_min: int
) -> list[int]:
    """Up to k tokens of `corpus` after the latest place (followed by a token) where the longest
    suffix of `tokens` of n_min..n_max tokens occurs in it; [] when none does."""
    if k <= 0 or tokens.shape[0] < n_min or corpus.shape[0] < 2:
        return []
    ends, n = _longest_match(corpus, tokens, n_max)
    if n < n_min or not ends.size:
        return []
    start = int(ends[-1]) + 1
    return corpus[start : start + k].tolist()


def lookup_draft(tokens: np.ndarray, k: int, n_max: int, n_min: int) -> list[int]:
    """Up to k tokens that followed an earlier occurrence of the longest suffix of `tokens` of
    n_min..n_max tokens (an occurrence may overlap the suffix itself): the latest one with k
    tokens after it, else the earliest; [] when no such n-gram occurred before."""
    size = tokens.shape[0]
    if k <= 0 or size <= n_min:
        return []
    ends, n = _longest_match(tokens, tokens, n_max)
    if n < n_min or not ends.size:
        return []
    # the latest occurrence followed by k tokens, else the earliest (followed by the most):
    # in a run of one repeated token the latest is the suffix itself, with one token after it
    full = ends[ends + k < size]
    start = int(full[-1] if full.size else ends[0]) + 1
    return tokens[start : start + k].tolist()


class StepCost:
    """Seconds of a decode step as a + b * rows, fitted by least squares over recent decode
    steps (weights halve every `half_life` steps)."""

    def __init__(self, half_life: float = 64.0):
        self.decay = 0.5 ** (1.0 / half_life)
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def record(self, rows: int, seconds: float) -> None:
        d = self.decay
        self._w = self._w * d + 1.0
        self._x = self._x * d + rows
        self._y = self._y * d + seconds
        self._xx = self._xx * d + rows * rows
        self._xy = self._xy * d + rows * seconds

    def fit(self) -> tuple[float, float] | None:
        """(a, b) with b >= 0, or None until steps of at least two sizes were seen."""
        w = self._w
        var = self._xx * w - self._x * self._x
        if w < 4.0 or var <= 1e-9 * max(self._xx * w, 1.0):
            return None
        b = max((self._xy * w - self._x * self._y) / var, 0.0)
        a = max((self._y - b * self._x) / w, 0.0)
        return a, b


class PromptLookup:
    """Proposes drafts for decoding sequences (`Scheduler` asks once per sequence per step).

    A draft is worth its rows while each token's chance of being kept beats what a row costs:
    with the step cost fitted as a + b * rows (`StepCost`, measured) and a batch of B
    sequences, a plain step's token costs (a + b * B) / B, a draft token b, and draft token j
    is kept with probability alpha ** j, alpha the sequence's own share of draft tokens kept.
    So a sequence drafts the j tokens with alpha ** j > b * B / (a + b * B), at most
    `num_tokens`: long drafts while a small batch waits on memory (where rows are nearly free)
    and a sequence keeps copying, short or none once rows cost compute or drafts miss."""

    def __init__(self, num_tokens: int, n_max: int, n_min: int, adaptive: bool = True):
        self.num_tokens = num_tokens
        """Longest draft of a sequence's own tokens (0: it drafts only from a prediction)."""
        self.prediction_tokens = num_tokens or PREDICTION_TOKENS
        """Longest draft from a request's predicted output."""
        self.n_max = n_max
        self.n_min = n_min
        self.adaptive = adaptive
        """False (draft_policy fixed): every draft as long as the lookup finds."""
        self.cost = StepCost()

    def row_share(self, batch: int) -> float:
        """b * B / (a + b * B) for a decode batch of `batch` sequences; 0 until fitted (and
        always with the fixed policy)."""
        fit = self.cost.fit() if self.adaptive else None
        if fit is None or batch <= 0:
            return 0.0
        a, b = fit
        rows = b * batch
        return rows / (a + rows) if a + rows > 0 else 0.0

    def drafts(self, seq: Any) -> bool:
        """Whether `seq` may draft at all: it has a prediction, or the runtime drafts."""
        return bool(self.num_tokens or seq.params.prediction)

    def draft_len(self, seq: Any, share: float) -> int:
        """How many draft tokens `seq` may propose when a row costs `share` (`row_share`)."""
        cap = self.prediction_tokens if seq.params.prediction else self.num_tokens
        if share <= 0.0:
            return cap
        alpha = (seq.spec_accepted + PRIOR_ACCEPTED) / (
            seq.spec_accepted + seq.spec_rejected + PRIOR_ACCEPTED + PRIOR_REJECTED
        )
        if alpha <= share:
            return 0
        if alpha >= 1.0:
            return cap
        return min(cap, int(math.log(share) / math.log(alpha)))

    def propose(self, seq: Any, limit: int, share: float = 0.0) -> list[int]:
        """At most min(num_tokens, limit, `draft_len`) draft tokens for `seq` (which keeps its
        token buffer and acceptance counts)."""
        k = min(limit, self.draft_len(seq, share))
        if k <= 0:
            if limit > 0:
                self.hold(seq)
            return []
        buffer = seq.token_buffer
        if buffer is None:
            buffer = seq.token_buffer = TokenBuffer()
        tokens = buffer.sync(seq)
        if seq.params.prediction:
            draft = self._from_prediction(seq, tokens, k)
            if draft or not self.num_tokens:
                return draft
        return lookup_draft(tokens, min(k, self.num_tokens), self.n_max, self.n_min)

    def _from_prediction(self, seq: Any, tokens: np.ndarray, k: int) -> list[int]:
        """The prediction's next tokens while the output still follows it from its start;
        after they part, what follows the output's last tokens where they occur in it (n-grams
        from one token: a prediction is the answer's own text)."""
        prediction = seq.prediction_array
        if prediction is None:
            prediction = seq.prediction_array = np.asarray(seq.params.prediction, dtype=np.int64)
        out = seq.output_token_ids
        done = seq.prediction_checked
        if done >= 0:  # the output has matched the prediction so far: check the new tokens
            m = len(out)
            agree = m <= len(prediction) and out[done:m] == seq.params.prediction[done:m]
            seq.prediction_checked = m if agree else -1
            if agree:
                return prediction[m : m + k].tolist()
        return continuation(prediction, tokens, k, self.n_max, 1)

    def would_draft(self, seqs: list[Any]) -> bool:
        """Whether the policy lets any of these decoding sequences draft now (a step planned
        ahead of their last token drafts nothing; the others' records fade as in `propose`)."""
        share = self.row_share(len(seqs))
        held = [s for s in seqs if self.draft_len(s, share) <= 0]
        if len(held) < len(seqs):
            return True
        for seq in held:
            self.hold(seq)
        return False

    @staticmethod
    def hold(seq: Any) -> None:
        """A sequence held back by its record: its counts fade towards the prior."""
        seq.spec_accepted *= FORGET
        seq.spec_rejected *= FORGET

    @staticmethod
    def record(seq: Any, drafted: int, accepted: int) -> None:
        """A step kept `accepted` of `seq`'s `drafted` draft tokens."""
        seq.spec_accepted += accepted
        seq.spec_rejected += accepted < drafted
