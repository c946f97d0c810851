"""What a request gives back: deltas while it runs, one `RequestOutput` when it ends."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities (from the raw model distribution) of one generated or prompt token."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)
    """The `logprobs` most likely token ids with their log-probabilities."""


@dataclass(frozen=True)
class RequestDelta:
    """What one engine step added to a request."""

    token_ids: list[int]
    text: str
    """Text that can no longer change (held back while it may still become a stop string);
    the deltas of a request concatenate to its final text."""
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    """None while the request runs; then 'stop', 'length' or 'abort'."""
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """With params.prompt_logprobs, on the request's first delta: as in RequestOutput."""


@dataclass(frozen=True)
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    """'stop' (EOS, stop id or stop string), 'length' (max_new_tokens or session_len), 'abort'
    (the caller aborted it)."""
    logprobs: list[TokenLogprobs] | None = None
    num_cached_tokens: int = 0
    """Prompt tokens whose K/V came from the prefix cache."""
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """With params.prompt_logprobs: one entry per prompt token, None for the first (nothing
    precedes it); entry i holds log P(prompt[i] | prompt[:i]) and the top k at position i."""
    num_draft_tokens: int = 0
    """Draft tokens checked for it (speculative decoding: prompt lookup or a prediction)."""
    num_accepted_draft_tokens: int = 0
    """Of those, the ones kept (each saved a decode step)."""
    stop_reason: str | int | None = None
    """What ended a 'stop' (vLLM's field): the stop string the text was cut at, or the EOS or
    stop token id; None for a guided answer whose value closed, and for other finishes."""
