"""Beam search on the engine, as vLLM runs it: a step at a time, one request per live beam.

Each step adds, for every live beam of every prompt at once, a request of one new token that
returns the top `2 x beam_width` log-probabilities of the raw model distribution; the prefix
cache serves what the beams share, so a step computes about one block per beam. A candidate
(beam + token) that is EOS is complete (unless `ignore_eos`); of the others the `beam_width`
best by cumulative log-probability live on. At the end the complete and live beams are ranked by
their score, cumulative log-probability / generated length ** `length_penalty` (HF's length: the
tokens after the prompt, a final EOS not counted; vLLM counts the prompt too), and the best
`beam_width` returned.

The search stops early only when it cannot change the answer: `beam_width` beams are complete
and no live beam can still score above the worst of them (log-probabilities only fall as a
beam grows).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dist_runtime.engine.outputs import TokenLogprobs


class BeamSearchCancelled(Exception):
    """The search was told to stop (its caller left)."""


MAX_BEAM_WIDTH = 10
"""Widest beam: a step asks for 2 x width log-probabilities, at most 20."""


@dataclass(frozen=True)
class BeamSearchParams:
    beam_width: int
    """Beams kept, and answers returned."""
    max_tokens: int
    """New tokens per beam at most."""
    ignore_eos: bool = False
    length_penalty: float = 1.0
    """Exponent of the generated length the score divides by (> 0 favours longer beams)."""
    logprobs: int | None = None
    """Keep each beam token's log-probability with this many top alternatives (at most 20;
    None: none)."""

    def __post_init__(self) -> None:
        w = self.beam_width
        if isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= MAX_BEAM_WIDTH:
            raise ValueError(
                f"beam_width must be an integer in [1, {MAX_BEAM_WIDTH}] (a step asks for 2 x "
                f"width log-probabilities, at most 20), got {w!r}"
            )
        n = self.max_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {n!r}")
        lp = self.length_penalty
        if isinstance(lp, bool) or not isinstance(lp, (int, float)) or not math.isfinite(lp):
            raise ValueError(f"length_penalty must be a finite number, got {lp!r}")
        k = self.logprobs
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 20):
            raise ValueError(f"logprobs must be an integer in [0, 20] or None, got {k!r}")


@dataclass(frozen=True)
class Beam:
    token_ids: list[int]
    """Generated tokens (an EOS that ended it included)."""
    cumulative_logprob: float
    finish_reason: str
    """"stop" (it ended with EOS) or "length"."""
    score: float
    text: str = ""
    logprobs: list[TokenLogprobs] | None = None
    """With `BeamSearchParams.logprobs`: each token's log-probability and top alternatives."""


@dataclass
class BeamSearch:
    """One prompt's search: `wanted()` the sequences to extend this step, `advance()` with each
    one's top next tokens; `done` then `results()`."""

    prompt: list[int]
    params: BeamSearchParams
    eos_ids: frozenset[int]
    max_new_tokens: int
    """The params' max_tokens, less what the session length leaves."""
    live: list[tuple[list[int], float, list[TokenLogprobs]]] = field(default_factory=list)
    complete: list[Beam] = field(default_factory=list)
    steps: int = 0

    def __post_init__(self) -> None:
        self.live = [([], 0.0, [])]

    @property
    def done(self) -> bool:
        if not self.live or self.steps >= self.max_new_tokens:
            return True
        width = self.params.beam_width
        if len(self.complete) < width:
            return False
        worst = sorted(b.score for b in self.complete)[-width]
        best_live = max(cum for _, cum, _ in self.live)
        return self._bound(best_live) <= worst

    def wanted(self) -> list[list[int]]:
        return [self.prompt + tokens for tokens, _, _ in self.live]

    def advance(self, tops: Sequence[dict[int, float]]) -> None:
        """Each live beam's top next tokens (id -> log-probability), in `wanted()`'s order."""
        candidates: list[tuple[list[int], float, list[TokenLogprobs]]] = []
        k = 2 * self.params.beam_width  # (a step shared with wider searches asks for more)
        shown = self.params.logprobs
        for (tokens, cum, scored), top in zip(self.live, tops):
            ranked = sorted(top.items(), key=lambda kv: kv[1], reverse=True)
            alternatives = dict(ranked[:shown]) if shown is not None else {}
            for token, logprob in ranked[:k]:
                lps = (
                    scored + [TokenLogprobs(token, logprob, alternatives)]
                    if shown is not None
                    else scored
                )
                grown = (tokens + [token], cum + logprob, lps)
                if token in self.eos_ids and not self.params.ignore_eos:
                    self.complete.append(self._beam(*grown, "stop"))
                else:
                    candidates.append(grown)
        candidates.sort(key=lambda c: c[1], reverse=True)  # (one length: score order)
        self.live = candidates[: self.params.beam_width]
        self.steps += 1

    def results(self) -> list[Beam]:
        beams = self.complete + [self._beam(t, c, lps, "length") for t, c, lps in self.live]
        beams.sort(key=lambda b: b.score, reverse=True)
        return beams[: self.params.beam_width]

    def _beam(
        self, tokens: list[int], cum: float, scored: list[TokenLogprobs], reason: str
    ) -> Beam:
        length = len(tokens) - (1 if reason == "stop" else 0)
        score = cum / max(length, 1) ** self.params.length_penalty
        return Beam(
            tokens,
            cum,
            reason,
            score,
            logprobs=scored if self.params.logprobs is not None else None,
        )

    def _bound(self, cum: float) -> float:
        """The best score a live beam of cumulative log-probability `cum` can reach."""
        lp = self.params.length_penalty
        length = self.steps
        if lp > 0 and cum < 0:  # a longer beam divides by more: at most the longest
            length = self.max_new_tokens
        return cum / max(length, 1) ** lp


def run_beam_search(
    searches: list[BeamSearch], step: Callable[[list[list[int]], int], list[dict[int, float]]]
) -> list[list[Beam]]:
    """Run searches together: each step asks `step(sequences, k)` for the top-k next tokens of
    every live beam of every search not done, in one call."""
    while True:
        going = [s for s in searches if not s.done]
        if not going:
            return [s.results() for s in searches]
        wanted = [s.wanted() for s in going]
        k = max(max(2 * s.params.beam_width, s.params.logprobs or 0) for s in going)
        tops = step([seq for w in wanted for seq in w], k)
        at = 0
        for search, w in zip(going, wanted):
            search.advance(tops[at : at + len(w)])
            at += len(w)
