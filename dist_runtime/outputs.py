"""What `Runtime.generate` returns."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities (from the raw model distribution) of one generated token."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)
    """The `logprobs` most likely token ids with their log-probabilities."""


@dataclass(frozen=True)
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    """'stop' (EOS, stop id or stop string), 'length' (max_new_tokens or session_len)."""
    logprobs: list[TokenLogprobs] | None = None
