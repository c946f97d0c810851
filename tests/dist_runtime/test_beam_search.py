"""Beam search (`dist_runtime.beam_search`): the search against a plain re-statement of vLLM's
loop on a made-up model, and on a real engine (the tiny checkpoint) against greedy decoding and
the engine's own scores."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from dist_runtime import BeamSearchParams, Runtime, SamplingParams
from dist_runtime.beam_search import BeamSearch, run_beam_search

VOCAB = 7
EOS = 0


def fake_top(seq: list[int], k: int, salt: int) -> dict[int, float]:
    """A made-up model: a fixed distribution over VOCAB tokens per sequence; its top k."""
    rng = random.Random(hash((tuple(seq), salt)))
    weights = [rng.random() ** 3 + 1e-3 for _ in range(VOCAB)]
    total = sum(weights)
    logprobs = {t: math.log(w / total) for t, w in enumerate(weights)}
    return dict(sorted(logprobs.items(), key=lambda kv: kv[1], reverse=True)[:k])


def reference(
    prompt: list[int], params: BeamSearchParams, salt: int
) -> list[tuple[list[int], float, str]]:
    """vLLM's loop, stated plainly: every step to max_tokens, no early stop."""
    width = params.beam_width
    live: list[tuple[list[int], float]] = [([], 0.0)]
    complete: list[tuple[list[int], float, str]] = []
    for _ in range(params.max_tokens):
        grown = []
        for tokens, cum in live:
            for t, lp in fake_top(prompt + tokens, 2 * width, salt).items():
                if t == EOS and not params.ignore_eos:
                    complete.append((tokens + [t], cum + lp, "stop"))
                else:
                    grown.append((tokens + [t], cum + lp))
        live = sorted(grown, key=lambda b: b[1], reverse=True)[:width]
    everything = complete + [(t, c, "length") for t, c in live]

    def score(b: tuple[list[int], float, str]) -> float:
        length = len(b[0]) - (b[2] == "stop")
        return b[1] / max(length, 1) ** params.length_penalty

    return sorted(everything, key=score, reverse=True)[:width]


@pytest.mark.parametrize("seed", range(40))
def test_search_equals_vllms_loop(seed: int) -> None:
    """Several prompts searched together, random widths, lengths, length penalties and EOS
    handling: the same beams, scores and order as the plain loop (which never stops early)."""
    rng = random.Random(seed)
    searches, params_of = [], []
    for _ in range(rng.randint(1, 3)):
        params = BeamSearchParams(
            beam_width=rng.randint(1, 4),
            max_tokens=rng.randint(1, 6),
            ignore_eos=rng.random() < 0.3,
            length_penalty=rng.choice([0.0, 0.5, 1.0, 2.0, -1.0]),
        )
        prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 4))]
        searches.append(BeamSearch(prompt, params, frozenset({EOS}), params.max_tokens))
        params_of.append((prompt, params))
    calls = []

    def step(seqs: list[list[int]], k: int) -> list[dict[int, float]]:
        calls.append(len(seqs))
        return [fake_top(s, k, seed) for s in seqs]

    results = run_beam_search(searches, step)
    for beams, (prompt, params) in zip(results, params_of):
        want = reference(prompt, params, seed)
        got = [(b.token_ids, b.cumulative_logprob, b.finish_reason) for b in beams]
        assert [(t, r) for t, _, r in got] == [(t, r) for t, _, r in want]
        assert all(abs(a[1] - b[1]) < 1e-9 for a, b in zip(got, want))
    assert len(calls) <= max(p.max_tokens for _, p in params_of)  # (batched: one call a step)


def test_a_search_stops_once_nothing_can_beat_its_complete_beams() -> None:
    """EOS likely from the start: with length_penalty 0 (scores are log-probabilities), the
    search ends when its width of beams are complete and better than any live one can get."""
    eos_first = {EOS: math.log(0.9), 1: math.log(0.05), 2: math.log(0.05)}
    calls = []

    def step(seqs: list[list[int]], k: int) -> list[dict[int, float]]:
        calls.append(len(seqs))
        return [dict(list(eos_first.items())[:k]) for _ in seqs]

    params = BeamSearchParams(beam_width=2, max_tokens=50, length_penalty=0.0)
    (beams,) = run_beam_search([BeamSearch([5], params, frozenset({EOS}), 50)], step)
    assert [b.token_ids for b in beams] == [[EOS], [1, EOS]]
    assert len(calls) == 2  # not 50


def test_bad_params_are_named() -> None:
    with pytest.raises(ValueError, match="beam_width must be an integer in"):
        BeamSearchParams(beam_width=11, max_tokens=4)
    with pytest.raises(ValueError, match="max_tokens must be a positive integer"):
        BeamSearchParams(beam_width=2, max_tokens=0)
    with pytest.raises(ValueError, match="length_penalty must be a finite number"):
        BeamSearchParams(beam_width=2, max_tokens=3, length_penalty=float("nan"))


@pytest.fixture(scope="module")
def rt(tiny_llama_dir: Path) -> Iterator[Runtime]:
    with Runtime(model=str(tiny_llama_dir), device="cpu", dtype="float32", session_len=256) as r:
        yield r


def test_on_the_engine(rt: Runtime) -> None:
    """Width 1 is greedy decoding; each beam's cumulative log-probability is the sum of the
    engine's log-probabilities of its tokens scored as a prompt; beams come best first."""
    prompts = [[5, 9, 13, 17, 21], [40, 3, 3, 70]]
    greedy = rt.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0.0,
                                                 ignore_eos=True))  # fmt: skip
    ones = rt.beam_search(prompts, BeamSearchParams(beam_width=1, max_tokens=6, ignore_eos=True))
    assert [b[0].token_ids for b in ones] == [g.token_ids for g in greedy]
    wide = rt.beam_search(prompts, BeamSearchParams(beam_width=4, max_tokens=6, ignore_eos=True))
    for prompt, beams in zip(prompts, wide):
        assert len(beams) == 4 and len({tuple(b.token_ids) for b in beams}) == 4
        assert [b.score for b in beams] == sorted((b.score for b in beams), reverse=True)
        for beam in beams:
            scored = rt.generate([prompt + beam.token_ids], SamplingParams(
                max_new_tokens=1, prompt_logprobs=0, temperature=0.0))[0]  # fmt: skip
            assert scored.prompt_logprobs is not None
            own = sum(p.logprob for p in scored.prompt_logprobs[len(prompt) :] if p is not None)
            assert abs(own - beam.cumulative_logprob) < 1e-3
            assert beam.text == rt.tokenizer.decode(beam.token_ids)  # type: ignore[union-attr]
    (with_logprobs,) = rt.beam_search(
        prompts[:1], BeamSearchParams(beam_width=3, max_tokens=5, ignore_eos=True, logprobs=2)
    )
    for beam in with_logprobs:
        assert beam.logprobs is not None and len(beam.logprobs) == 5
        assert [e.token_id for e in beam.logprobs] == beam.token_ids
        assert abs(sum(e.logprob for e in beam.logprobs) - beam.cumulative_logprob) < 1e-9
        assert all(len(e.top) == 2 for e in beam.logprobs)
    with pytest.raises(ValueError, match="over session_len"):
        rt.beam_search([[1] * 300], BeamSearchParams(beam_width=2, max_tokens=2))
