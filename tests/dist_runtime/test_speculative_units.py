"""Unit tests of speculative decoding by prompt lookup: the n-gram draft lookup, the token
buffer, the step-cost fit and draft-length policy (`dist_runtime.engine.speculative`), and
draft verification on the worker (`workers.sampler.verify_draft`), greedy and sampled."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

from dist_runtime.engine.speculative import (
    FORGET,
    PRIOR_ACCEPTED,
    PRIOR_REJECTED,
    PromptLookup,
    StepCost,
    TokenBuffer,
    continuation,
    lookup_draft,
)
from dist_runtime.protocol import SampledToken, SamplingSpec
from dist_runtime.sampling_params import SamplingParams
from workers.sampler import Sampler, verify_draft


def arr(*tokens: int) -> np.ndarray:
    return np.array(tokens, dtype=np.int64)


@dataclass
class FakeSeq:
    """What the lookup and the policy read of a `scheduler.Sequence`."""

    tokens: list[int]
    token_buffer: Any = None
    spec_accepted: float = 0.0
    spec_rejected: float = 0.0
    params: SamplingParams = field(default_factory=SamplingParams)  # no prediction
    slices: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def token_slice(self, start: int, stop: int) -> list[int]:
        self.slices.append((start, stop))
        return self.tokens[start:stop]


def spec(
    temperature: float = 0.0,
    *,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    logprobs: int = -1,
    **extra: Any,
) -> SamplingSpec:
    return SamplingSpec(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=0,
        logprobs=logprobs,
        **extra,
    )


# ---------------------------------------------------------------------------------------------
# lookup_draft


def test_lookup_longest_suffix_beats_more_recent_shorter_match() -> None:
    # suffix [1, 2, 3]: the 3-gram occurred at 0..2 (followed by 9, 5, 3, 8); a more recent
    # occurrence of just [3] at position 5 (followed by 8, 1) must lose to it
    tokens = arr(1, 2, 3, 9, 5, 3, 8, 1, 2, 3)
    assert lookup_draft(tokens, k=2, n_max=3, n_min=1) == [9, 5]
    assert lookup_draft(tokens, k=4, n_max=3, n_min=1) == [9, 5, 3, 8]
    # with n_max = 1 only the last token is matched: its latest occurrence (position 5) wins
    assert lookup_draft(tokens, k=2, n_max=1, n_min=1) == [8, 1]


def test_lookup_latest_of_equal_length_matches() -> None:
    # suffix [4, 5] occurred at 0..1 (then 6) and at 3..4 (then 7); neither extends to 3 tokens
    tokens = arr(4, 5, 6, 4, 5, 7, 4, 5)
    assert lookup_draft(tokens, k=3, n_max=3, n_min=1) == [7, 4, 5]
    assert lookup_draft(tokens, k=3, n_max=2, n_min=2) == [7, 4, 5]


def test_lookup_respects_n_min() -> None:
    # only the 1-gram [2] occurred before (at 1, then 9, 3, 2); [3, 2] did not
    tokens = arr(1, 2, 9, 3, 2)
    assert lookup_draft(tokens, k=3, n_max=3, n_min=1) == [9, 3, 2]
    assert lookup_draft(tokens, k=3, n_max=3, n_min=2) == []


def test_lookup_k_caps_and_nonpositive_k() -> None:
    tokens = arr(1, 2, 3, 4, 5, 6, 1, 2)
    assert lookup_draft(tokens, k=1, n_max=2, n_min=1) == [3]
    assert lookup_draft(tokens, k=3, n_max=2, n_min=1) == [3, 4, 5]
    assert lookup_draft(tokens, k=0, n_max=2, n_min=1) == []
    assert lookup_draft(tokens, k=-1, n_max=2, n_min=1) == []


def test_lookup_match_near_the_end_gives_fewer_than_k() -> None:
    # [1, 2] last occurred at 2..3, right before the suffix: only 2 tokens follow it
    tokens = arr(9, 8, 1, 2, 1, 2)
    assert lookup_draft(tokens, k=5, n_max=2, n_min=1) == [1, 2]
    # [2, 3] at 1..2 is followed by 4 tokens, up to the buffer's end
    tokens = arr(1, 2, 3, 4, 1, 2, 3)
    assert lookup_draft(tokens, k=10, n_max=2, n_min=1) == [4, 1, 2, 3]


def test_lookup_no_match_and_short_buffers() -> None:
    assert lookup_draft(arr(1, 2, 3, 4), k=3, n_max=3, n_min=1) == []
    assert lookup_draft(arr(), k=3, n_max=3, n_min=1) == []
    assert lookup_draft(arr(5), k=3, n_max=3, n_min=1) == []
    # size <= n_min: [] even though the 1-gram [3] repeats
    assert lookup_draft(arr(3, 3), k=3, n_max=3, n_min=2) == []
    assert lookup_draft(arr(3, 3), k=3, n_max=1, n_min=1) == [3]


def test_lookup_overlapping_repeats() -> None:
    # [7] * 5, k = 3: the last token occurred at 0..3; the latest occurrence with 3 tokens after
    # it ends at 1, so the draft is positions 2..4
    tokens = arr(7, 7, 7, 7, 7)
    assert lookup_draft(tokens, k=3, n_max=1, n_min=1) == [7, 7, 7]
    # [7, 7] ends at 1..3; the latest with 3 after it is 1 again
    assert lookup_draft(tokens, k=3, n_max=2, n_min=1) == [7, 7, 7]
    # [7, 7, 7] ends at 2..3, none followed by 3 tokens: the earliest (2) gives the most
    assert lookup_draft(tokens, k=3, n_max=3, n_min=1) == [7, 7]
    # [7] * 4 only ends at 3: one token after it
    assert lookup_draft(tokens, k=3, n_max=4, n_min=1) == [7]
    # a period-2 repeat: suffix [1, 2, 1, 2] occurs overlapping ending at 3 and 5; only the
    # one ending at 3 has 4 tokens after it
    tokens = arr(1, 2, 1, 2, 1, 2, 1, 2)
    assert lookup_draft(tokens, k=4, n_max=4, n_min=1) == [1, 2, 1, 2]
    assert lookup_draft(tokens, k=2, n_max=4, n_min=1) == [1, 2]


def test_lookup_match_at_buffer_start_survives_larger_n_max() -> None:
    # [1, 2] occurred at 0..1 (then 3, 1, 2); n_max = 2 finds it, so n_max = 3 must too
    tokens = arr(1, 2, 3, 1, 2)
    assert lookup_draft(tokens, k=5, n_max=2, n_min=1) == [3, 1, 2]
    assert lookup_draft(tokens, k=5, n_max=3, n_min=1) == [3, 1, 2]
    # [3, 3]: n_max = 1 gives [3], n_max = 3 must too
    assert lookup_draft(arr(3, 3), k=3, n_max=3, n_min=1) == [3]
    # [7] * 5 with n_max = 4 gives [7]; a larger n_max must not lose it
    assert lookup_draft(arr(7, 7, 7, 7, 7), k=3, n_max=5, n_min=1) == [7]


# ---------------------------------------------------------------------------------------------
# TokenBuffer


def test_token_buffer_sync_grows_incrementally() -> None:
    seq = FakeSeq(tokens=[5, 6, 7])
    buf = TokenBuffer()
    view = buf.sync(seq)
    assert view.dtype == np.int64
    assert view.tolist() == [5, 6, 7]
    seq.tokens += list(range(300))  # past the first 256-token allocation
    view = buf.sync(seq)
    assert view.tolist() == seq.tokens
    assert buf.size == 303 and buf.array.size >= 303
    seq.tokens += [1, 2]
    assert buf.sync(seq).tolist() == seq.tokens
    assert buf.sync(seq).tolist() == seq.tokens  # nothing new: no read
    # each sync read only the tokens it did not have
    assert seq.slices == [(0, 3), (3, 303), (303, 305)]


# ---------------------------------------------------------------------------------------------
# StepCost


SIZES = [1, 3, 8, 16, 32]


def test_step_cost_recovers_exact_line() -> None:
    a, b = 2e-3, 5e-4
    cost = StepCost()
    for i in range(23):
        rows = SIZES[i % len(SIZES)]
        cost.record(rows, a + b * rows)
    fit = cost.fit()
    assert fit is not None
    assert fit[0] == pytest.approx(a, rel=1e-9)
    assert fit[1] == pytest.approx(b, rel=1e-9)


def test_step_cost_needs_two_sizes_and_enough_weight() -> None:
    one_size = StepCost()
    for _ in range(20):
        one_size.record(8, 0.01)
    assert one_size.fit() is None

    cost = StepCost()
    data = [(1, 0.011), (4, 0.014), (1, 0.011), (4, 0.014), (1, 0.011)]
    for rows, seconds in data[:3]:
        cost.record(rows, seconds)
    assert cost.fit() is None  # 3 steps
    cost.record(*data[3])
    # 4 steps weigh 1 + d + d^2 + d^3 < 4 (d = 0.5 ** (1 / 64)): still None
    d = 0.5 ** (1 / 64)
    assert 1 + d + d**2 + d**3 < 4.0
    assert cost.fit() is None
    cost.record(*data[4])
    fit = cost.fit()
    assert fit is not None
    assert fit[0] == pytest.approx(0.01, rel=1e-9)
    assert fit[1] == pytest.approx(0.001, rel=1e-9)


def test_step_cost_clamps_negative_slope() -> None:
    cost = StepCost(half_life=1e12)  # no decay to speak of: plain means
    data = [(1, 0.010), (10, 0.005), (1, 0.010), (10, 0.005), (1, 0.010), (10, 0.005)]
    for rows, seconds in data:
        cost.record(rows, seconds)
    fit = cost.fit()
    assert fit is not None
    assert fit[1] == 0.0
    assert fit[0] == pytest.approx(0.0075, rel=1e-9)  # with b = 0, a is the mean


def test_step_cost_decay_is_weighted_least_squares() -> None:
    old, new = (0.01, 0.001), (0.004, 0.003)
    data = [(SIZES[i % 5], old[0] + old[1] * SIZES[i % 5]) for i in range(150)]
    data += [(SIZES[i % 5], new[0] + new[1] * SIZES[i % 5]) for i in range(128)]
    decayed, flat = StepCost(half_life=64.0), StepCost(half_life=1e12)
    for rows, seconds in data:
        decayed.record(rows, seconds)
        flat.record(rows, seconds)
    fit_d, fit_f = decayed.fit(), flat.fit()
    assert fit_d is not None and fit_f is not None

    # the same fit by numpy: weights halve every 64 steps back
    age = np.arange(len(data))[::-1]
    w = np.sqrt(0.5 ** (age / 64.0))
    x = np.array([r for r, _ in data], dtype=np.float64)
    y = np.array([s for _, s in data], dtype=np.float64)
    coef, *_ = np.linalg.lstsq(np.stack([w, w * x], axis=1), w * y, rcond=None)
    assert fit_d[0] == pytest.approx(coef[0], rel=1e-7)
    assert fit_d[1] == pytest.approx(coef[1], rel=1e-7)

    # recent steps count more: the decayed fit sits nearer the new cost than the flat one
    assert abs(fit_d[1] - new[1]) < abs(fit_f[1] - new[1])
    assert abs(fit_d[0] - new[0]) < abs(fit_f[0] - new[0])
    assert abs(fit_d[1] - new[1]) < abs(fit_d[1] - old[1])


# ---------------------------------------------------------------------------------------------
# PromptLookup policy


def alpha_of(accepted: float, rejected: float) -> float:
    return (accepted + PRIOR_ACCEPTED) / (accepted + rejected + PRIOR_ACCEPTED + PRIOR_REJECTED)


def test_draft_len_free_rows_gives_num_tokens() -> None:
    policy = PromptLookup(num_tokens=5, n_max=3, n_min=1)
    assert policy.draft_len(FakeSeq([1], spec_accepted=0.0, spec_rejected=50.0), 0.0) == 5


def test_draft_len_from_acceptance() -> None:
    policy = PromptLookup(num_tokens=5, n_max=3, n_min=1)
    seq = FakeSeq([1], spec_accepted=3.0, spec_rejected=1.0)
    assert alpha_of(3.0, 1.0) == pytest.approx(2 / 3)
    # (2/3)^3 = 0.296 > 0.2 > (2/3)^4 = 0.198: three tokens
    assert policy.draft_len(seq, 0.2) == 3
    assert policy.draft_len(seq, 0.2) == int(math.log(0.2) / math.log(2 / 3))
    # (2/3)^1 > 0.6 > (2/3)^2
    assert policy.draft_len(seq, 0.6) == 1
    # capped at num_tokens: (2/3)^5 = 0.13 > 0.01
    assert policy.draft_len(seq, 0.01) == 5
    assert PromptLookup(num_tokens=2, n_max=3, n_min=1).draft_len(seq, 0.2) == 2


def test_draft_len_zero_when_alpha_not_above_share() -> None:
    policy = PromptLookup(num_tokens=5, n_max=3, n_min=1)
    seq = FakeSeq([1], spec_accepted=0.0, spec_rejected=2.0)  # alpha = 1/4
    assert policy.draft_len(seq, 0.25) == 0
    assert policy.draft_len(seq, 0.3) == 0
    assert policy.draft_len(seq, 0.24) == 1


def test_propose_held_back_decays_counts_only_with_limit() -> None:
    policy = PromptLookup(num_tokens=5, n_max=3, n_min=1)
    seq = FakeSeq([1, 2, 1, 2], spec_accepted=1.0, spec_rejected=5.0)  # alpha = 2/8
    assert policy.propose(seq, limit=0, share=0.5) == []
    assert (seq.spec_accepted, seq.spec_rejected) == (1.0, 5.0)
    assert policy.propose(seq, limit=4, share=0.5) == []
    assert seq.spec_accepted == pytest.approx(FORGET)
    assert seq.spec_rejected == pytest.approx(5.0 * FORGET)
    assert policy.propose(seq, limit=4, share=0.5) == []
    assert seq.spec_accepted == pytest.approx(FORGET**2)
    assert seq.spec_rejected == pytest.approx(5.0 * FORGET**2)
    assert seq.token_buffer is None  # never looked up


def test_propose_looks_up_with_capped_k() -> None:
    policy = PromptLookup(num_tokens=4, n_max=3, n_min=1)
    seq = FakeSeq([1, 2, 3, 9, 5, 3, 8, 1, 2, 3], spec_accepted=3.0, spec_rejected=1.0)
    assert policy.propose(seq, limit=2) == [9, 5]  # limit caps
    assert isinstance(seq.token_buffer, TokenBuffer)
    assert policy.propose(seq, limit=10) == [9, 5, 3, 8]  # num_tokens caps
    assert policy.propose(seq, limit=10, share=0.6) == [9]  # draft_len 1 caps
    assert (seq.spec_accepted, seq.spec_rejected) == (3.0, 1.0)  # drafting: no decay
    seq.tokens.append(5)  # the buffer follows: [3, 5] is new, [5] last seen at 4 (then 3, 8..)
    assert policy.propose(seq, limit=10) == [3, 8, 1, 2]


def test_record_counts() -> None:
    seq = FakeSeq([1])
    PromptLookup.record(seq, drafted=3, accepted=3)
    assert (seq.spec_accepted, seq.spec_rejected) == (3.0, 0.0)
    PromptLookup.record(seq, drafted=3, accepted=1)
    assert (seq.spec_accepted, seq.spec_rejected) == (4.0, 1.0)
    PromptLookup.record(seq, drafted=2, accepted=0)
    assert (seq.spec_accepted, seq.spec_rejected) == (4.0, 2.0)
    PromptLookup.record(seq, drafted=0, accepted=0)
    assert (seq.spec_accepted, seq.spec_rejected) == (4.0, 2.0)


def test_row_share() -> None:
    policy = PromptLookup(num_tokens=4, n_max=3, n_min=1)
    assert policy.row_share(8) == 0.0  # not fitted yet
    a, b = 0.01, 0.001
    for i in range(10):
        rows = SIZES[i % len(SIZES)]
        policy.cost.record(rows, a + b * rows)
    assert policy.row_share(8) == pytest.approx(0.008 / 0.018, rel=1e-9)
    assert policy.row_share(1) == pytest.approx(0.001 / 0.011, rel=1e-9)
    assert policy.row_share(0) == 0.0


# ---------------------------------------------------------------------------------------------
# verify_draft, greedy


TARGETS = [2, 4, 1, 5]


def greedy_logits() -> torch.Tensor:
    """(4, 6) logits whose row argmaxes are TARGETS."""
    g = torch.Generator().manual_seed(1234)
    logits = torch.randn(4, 6, generator=g)
    logits[torch.arange(4), torch.tensor(TARGETS)] = 4.0
    assert logits.argmax(dim=-1).tolist() == TARGETS
    return logits


def ids(tokens: list[SampledToken]) -> list[int]:
    return [t.token_id for t in tokens]


@pytest.mark.parametrize(
    ("draft", "expected"),
    [
        ([2, 4, 1], [2, 4, 1, 5]),  # all kept, then row 3's argmax
        ([3, 4, 1], [2]),  # first rejected: row 0's argmax
        ([2, 0, 1], [2, 4]),  # second rejected
        ([2, 4, 0], [2, 4, 1]),  # last rejected
    ],
)
def test_verify_greedy_tokens_and_logprobs(draft: list[int], expected: list[int]) -> None:
    logits = greedy_logits()
    out = verify_draft(logits, draft, spec(), torch.Generator(), [0, 1, 2, 3], seq_id=17)
    assert ids(out) == expected
    raw = torch.log_softmax(logits, dim=-1)
    for row, t in enumerate(out):
        assert t.seq_id == 17
        assert t.logprob == pytest.approx(float(raw[row, t.token_id]), abs=1e-6)
        assert t.top_ids == [] and t.top_logprobs == []


def test_verify_greedy_empty_draft() -> None:
    logits = greedy_logits()[:1]
    assert ids(verify_draft(logits, [], spec(), torch.Generator(), [0], seq_id=1)) == [2]


def test_verify_greedy_top_logprobs() -> None:
    logits = greedy_logits()
    out = verify_draft(logits, [2, 4, 0], spec(logprobs=3), torch.Generator(), [0] * 4, 1)
    assert ids(out) == [2, 4, 1]
    values, indices = torch.log_softmax(logits, dim=-1).topk(3, dim=-1)
    for row, t in enumerate(out):
        assert len(t.top_ids) == 3 and len(t.top_logprobs) == 3
        assert t.top_ids == indices[row].tolist()
        assert t.top_logprobs == pytest.approx(values[row].tolist(), abs=1e-6)
        assert t.top_ids[0] == t.token_id


def test_verify_greedy_logit_bias() -> None:
    logits = greedy_logits()
    raw = torch.log_softmax(logits, dim=-1)
    assert 3 not in TARGETS
    plain = verify_draft(logits, [3, 3, 3], spec(), torch.Generator(), [0] * 4, 1)
    assert ids(plain) == [2]  # token 3 is no row's argmax
    biased_spec = spec(bias_ids=[3], bias_values=[20.0])
    out = verify_draft(logits, [3, 3, 3], biased_spec, torch.Generator(), [0] * 4, 1)
    assert ids(out) == [3, 3, 3, 3]
    for row, t in enumerate(out):  # raw, not biased, log-probabilities
        assert t.logprob == pytest.approx(float(raw[row, 3]), abs=1e-6)
        assert t.logprob < -1.0
    # the raw argmax is now rejected in favour of the biased one
    out = verify_draft(logits, [2, 4, 1], biased_spec, torch.Generator(), [0] * 4, 1)
    assert ids(out) == [3]


# ---------------------------------------------------------------------------------------------
# verify_draft, sampling (statistical)

TRIALS = 4000
TEMPERATURE = 0.7
ROW0 = [1.2, 0.5, 0.0, -0.4, -1.0]
ROW1 = [0.2, 1.0, -0.3, 0.6, 0.0]


def run_trials(logits: torch.Tensor, draft: list[int], sampling: SamplingSpec) -> list[list[int]]:
    """verify_draft over TRIALS distinct seed lists (every seed used once)."""
    g = torch.Generator()
    rows = len(draft) + 1
    return [
        ids(verify_draft(logits, draft, sampling, g, [i * rows + r for r in range(rows)], 0))
        for i in range(TRIALS)
    ]


def assert_distribution(samples: list[int], probs: torch.Tensor) -> None:
    """Counts of each token within 4.5 binomial standard deviations of n * p (a false failure
    has probability about 7e-6 per token), and none where p is 0."""
    n = len(samples)
    counts = np.bincount(np.array(samples, dtype=np.int64), minlength=probs.numel())
    for token, p in enumerate(probs.tolist()):
        if p == 0.0:
            assert counts[token] == 0, (token, counts)
            continue
        sd = math.sqrt(n * p * (1.0 - p))
        assert abs(counts[token] - n * p) <= 4.5 * sd, (token, counts.tolist(), n * p)
    freqs = counts / n
    assert float(np.abs(freqs - probs.numpy()).max()) < 0.03


def warped(row: list[float], temperature: float = TEMPERATURE) -> torch.Tensor:
    return torch.softmax(torch.tensor(row, dtype=torch.float64) / temperature, dim=-1)


@pytest.mark.parametrize("draft_token", [0, 4], ids=["likely", "unlikely"])
def test_verify_sampling_first_token_distribution(draft_token: int) -> None:
    logits = torch.tensor([ROW0, ROW1])
    p0 = warped(ROW0)
    assert (p0[draft_token] > 0.5) == (draft_token == 0)
    results = run_trials(logits, [draft_token], spec(TEMPERATURE))
    assert all(len(r) == (2 if r[0] == draft_token else 1) for r in results)
    assert_distribution([r[0] for r in results], p0)
    if draft_token == 0:
        # given the draft was kept, the next token is plain sampling's from row 1
        second = [r[1] for r in results if len(r) == 2]
        assert len(second) > 0.5 * TRIALS  # p0[0] = 0.59
        assert_distribution(second, warped(ROW1))


def test_verify_sampling_top_k_excludes_draft() -> None:
    logits = torch.tensor([ROW0, ROW1])
    results = run_trials(logits, [3], spec(TEMPERATURE, top_k=2))
    assert all(len(r) == 1 for r in results)  # never accepted
    p0 = warped(ROW0)
    top2 = torch.zeros_like(p0)
    top2[:2] = p0[:2] / p0[:2].sum()
    assert_distribution([r[0] for r in results], top2)


def test_verify_sampling_certain_draft_always_kept() -> None:
    logits = torch.tensor([ROW0, ROW1])
    g = torch.Generator()
    for i in range(200):
        out = verify_draft(logits, [0], spec(TEMPERATURE, top_k=1), g, [2 * i, 2 * i + 1], 5)
        assert ids(out) == [0, 1]  # the draft, then row 1's only token


def test_verify_sampling_depends_only_on_seeds() -> None:
    logits = torch.tensor([ROW0, ROW1, ROW0])
    sampling = spec(1.0)
    used = torch.Generator().manual_seed(99)
    torch.rand(100, generator=used)  # a generator in some other state
    runs = []
    for s in range(50):
        seeds = [3 * s, 3 * s + 1, 3 * s + 2]
        fresh = ids(verify_draft(logits, [1, 2], sampling, torch.Generator(), seeds, 0))
        assert ids(verify_draft(logits, [1, 2], sampling, used, seeds, 0)) == fresh
        runs.append(tuple(fresh))
    assert len(set(runs)) > 5  # and the seeds do matter


def test_verify_sampling_reports_raw_logprobs() -> None:
    logits = torch.tensor([ROW0, ROW1])
    raw = torch.log_softmax(logits, dim=-1)
    sampling = spec(TEMPERATURE, top_k=2, logprobs=2)
    for s in range(20):
        out = verify_draft(logits, [0], sampling, torch.Generator(), [2 * s, 2 * s + 1], 0)
        for row, t in enumerate(out):
            assert t.logprob == pytest.approx(float(raw[row, t.token_id]), abs=1e-6)
            assert t.top_ids == raw[row].topk(2).indices.tolist()


# ---------------------------------------------------------------------------------------------
# errors


def test_verify_rejects_wrong_shapes() -> None:
    logits = torch.zeros(3, 5)
    g = torch.Generator()
    with pytest.raises(ValueError):
        verify_draft(logits, [1], spec(), g, [0, 1], 0)  # 3 rows for a 1-token draft
    with pytest.raises(ValueError):
        verify_draft(logits, [1, 2], spec(), g, [0, 1], 0)  # 2 seeds for 3 rows
    with pytest.raises(ValueError):
        verify_draft(logits, [1, 2], spec(), g, [0, 1, 2, 3], 0)  # 4 seeds
    with pytest.raises(ValueError):
        verify_draft(torch.zeros(5), [], spec(), g, [0], 0)  # not 2-D


@pytest.mark.parametrize(
    "extra",
    [{"repetition_penalty": 1.1}, {"presence_penalty": 0.5}, {"frequency_penalty": 0.5}],
)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_verify_penalties_need_the_history(extra: dict[str, Any], temperature: float) -> None:
    logits = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="needs its history"):
        verify_draft(logits, [1], spec(temperature, **extra), torch.Generator(), [0, 1], 0)


@pytest.mark.parametrize(
    "extra",
    [{"repetition_penalty": 1.7}, {"presence_penalty": 1.5}, {"frequency_penalty": 0.8}],
)
def test_verify_greedy_penalties_row_by_row(extra: dict[str, Any]) -> None:
    """Row j is penalised over the history through draft token j only (outputs from
    output_start): each kept token is what `Sampler.sample` picks from that row with that
    history."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 6, generator=g)
    history = torch.tensor([5, 0, 1, 2, 3, 4])  # prompt [5, 0], outputs from 2; draft [2, 3, 4]
    s = spec(**extra, num_prompt_tokens=2)
    want = []
    for j in range(4):
        row_history = history[: 3 + j]
        (tok,) = Sampler().sample(logits[j : j + 1], [s], [row_history], [torch.Generator()], [9])
        want.append(tok.token_id)
    draft = [2, 3, 4]
    out = verify_draft(logits, draft, s, torch.Generator(), [0] * 4, 9, None, history, 2)
    kept = 0
    while kept < 3 and draft[kept] == want[kept]:
        kept += 1
    assert ids(out) == draft[:kept] + [want[kept]]
    # a draft of the tokens greedy decoding with these penalties picks: all kept, plus one
    chain: list[int] = []
    for j in range(4):
        row_history = torch.tensor([5, 0, 1, *chain])
        (tok,) = Sampler().sample(logits[j : j + 1], [s], [row_history], [torch.Generator()], [9])
        chain.append(tok.token_id)
    history = torch.tensor([5, 0, 1, *chain[:3]])
    out = verify_draft(logits, chain[:3], s, torch.Generator(), [0] * 4, 9, None, history, 2)
    assert ids(out) == chain


def _packed(allowed: list[int], vocab: int = 6) -> bytes:
    bits = np.zeros(vocab, dtype=bool)
    bits[allowed] = True
    return np.packbits(bits, bitorder="little").tobytes()


def test_verify_greedy_row_masks() -> None:
    """Guided output: each row is checked under its own mask. Row 1 forbids its argmax (4), so
    the draft's 4 is refused there and the row's best allowed token (its second best) comes
    instead; a mask that allows the draft token keeps it."""
    logits = greedy_logits()
    second = int(logits[1].topk(2).indices[1])
    everything = _packed(list(range(6)))
    masks = [everything, _packed([t for t in range(6) if t != 4]), everything, everything]
    out = verify_draft(logits, [2, 4, 1], spec(), torch.Generator(), [0] * 4, 3, masks)
    assert ids(out) == [2, second]
    assert out[1].logprob == pytest.approx(float(torch.log_softmax(logits, -1)[1, second]))
    out = verify_draft(logits, [2, 4, 1], spec(), torch.Generator(), [0] * 4, 3, [everything] * 4)
    assert ids(out) == [2, 4, 1, 5]
    # sampling draws only allowed tokens, in every row
    only_3 = _packed([3])
    out = verify_draft(
        logits, [3, 3, 3], spec(1.0), torch.Generator(), [5, 6, 7, 8], 3, [only_3] * 4
    )
    assert ids(out) == [3, 3, 3, 3]


def test_fixed_policy_ignores_the_step_cost() -> None:
    """draft_policy fixed: a fitted cost that would hold every draft back changes nothing."""
    adaptive, fixed = PromptLookup(4, 4, 2), PromptLookup(4, 4, 2, adaptive=False)
    for lookup in (adaptive, fixed):
        for rows in (1, 2, 3, 4, 5, 6):
            lookup.cost.record(rows, 0.001 + 0.01 * rows)  # rows cost 10x the base
    assert adaptive.row_share(8) > 0.9 and fixed.row_share(8) == 0.0
    seq = FakeSeq([1, 2, 3, 1, 2, 3, 4, 5, 1, 2])
    assert adaptive.draft_len(seq, adaptive.row_share(8)) == 0
    assert fixed.draft_len(seq, fixed.row_share(8)) == 4


def test_continuation_finds_the_suffix_in_another_corpus() -> None:
    corpus = arr(5, 6, 7, 8, 9, 6, 7, 3)
    # [6, 7] occurs twice: the latest (ending at 6) gives what follows it
    assert continuation(corpus, arr(1, 6, 7), k=3, n_max=4, n_min=1) == [3]
    # the longest suffix wins: [5, 6, 7] only at the start
    assert continuation(corpus, arr(5, 6, 7), k=3, n_max=4, n_min=1) == [8, 9, 6]
    # n_min = 2 and only the last token occurs: nothing
    assert continuation(corpus, arr(1, 2, 9), k=3, n_max=4, n_min=2) == []
    assert continuation(corpus, arr(1, 2, 9), k=3, n_max=4, n_min=1) == [6, 7, 3]
    assert continuation(corpus, arr(4), k=3, n_max=4, n_min=1) == []


def test_verify_greedy_bad_words_follow_each_rows_history() -> None:
    """A bad word [2, 4] holds 4 back only at the row after the draft's 2: the draft [2, 4, 1]
    loses its 4 there, and the row's next best token comes instead."""
    logits = greedy_logits()
    banned = spec(bad_words=[[2, 4]], num_prompt_tokens=1)
    history = torch.tensor([0, 2, 4, 1])  # the prompt [0], then the draft
    out = verify_draft(logits, [2, 4, 1], banned, torch.Generator(), [0] * 4, 1, None, history, 1)
    runner_up = int(logits[1].topk(2).indices[1])
    assert ids(out) == [2, runner_up]
    plain = verify_draft(logits, [2, 4, 1], spec(), torch.Generator(), [0] * 4, 1)
    assert ids(plain) == [2, 4, 1, 5]
