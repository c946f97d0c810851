"""Comparing two runs' RequestOutputs."""

from __future__ import annotations

from collections.abc import Sequence

from dist_runtime.engine.outputs import RequestOutput


def assert_same_outputs(
    a: Sequence[RequestOutput], b: Sequence[RequestOutput], atol: float
) -> None:
    """The same tokens and top-logprob ids per request; every logprob within atol."""
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids
        assert x.logprobs is not None and y.logprobs is not None
        for lx, ly in zip(x.logprobs, y.logprobs, strict=True):
            assert list(lx.top) == list(ly.top)
            assert abs(lx.logprob - ly.logprob) < atol
