"""Tests for the rank-0 token sampler: filters, HF parity, seeded draws, logprobs."""

from __future__ import annotations

import math
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
import torch

from dist_runtime.protocol import SamplingSpec
from workers.sampler import (
    MASK_CACHE_ROWS,
    Sampler,
    allowed_rows,
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    sample_on_device,
    warp_logits,
)

NEG_INF = float("-inf")
EMPTY = torch.empty(0, dtype=torch.long)


def spec(**overrides: Any) -> SamplingSpec:
    fields: dict = dict(
        temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, seed=0, logprobs=-1
    )
    fields.update(overrides)
    return SamplingSpec(**fields)


def generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def sample_ids(
    logits: torch.Tensor,
    specs: list[SamplingSpec],
    gens: list[torch.Generator],
    histories: list[torch.Tensor] | None = None,
) -> list[int]:
    histories = histories if histories is not None else [EMPTY] * len(specs)
    out = Sampler().sample(logits, specs, histories, gens, list(range(len(specs))))
    return [t.token_id for t in out]


def kept(logits: torch.Tensor) -> list[list[int]]:
    return [torch.isfinite(row).nonzero().flatten().tolist() for row in logits]


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add spin-wait overhead (seconds on a busy CI box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf() -> ModuleType:
    return pytest.importorskip("transformers.generation.logits_process")


def random_logits(seed: int, batch: int = 8, vocab: int = 500) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=gen) * 3.0  # (batch, vocab)


# ---------------------------------------------------------------- greedy


def test_greedy_equals_argmax_and_leaves_generator_alone() -> None:
    logits = random_logits(1, batch=16)
    gens = generators(list(range(16)))
    states = [g.get_state() for g in gens]
    ids = sample_ids(logits, [spec(temperature=0.0, top_k=3, top_p=0.5)] * 16, gens)
    assert ids == logits.argmax(dim=-1).tolist()
    assert all(torch.equal(g.get_state(), s) for g, s in zip(gens, states))


def test_greedy_fast_path_equals_general_path() -> None:
    """All-greedy rows without top-k lists or penalties take one read-back; their tokens and
    log-probabilities are the general path's (argmax; logit minus log-sum-exp)."""
    logits = random_logits(9, batch=6)
    seq_ids = [4, 9, 1, 7, 3, 2]
    gens = generators([0] * 6)
    fast = Sampler().sample(logits, [spec(temperature=0.0)] * 6, [EMPTY] * 6, gens, seq_ids)
    ids = logits.argmax(dim=-1)
    want = logits.gather(1, ids[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
    assert [(t.seq_id, t.token_id, t.logprob) for t in fast] == list(
        zip(seq_ids, ids.tolist(), want.tolist())
    )
    assert all(t.top_ids == [] and t.top_logprobs == [] for t in fast)
    full = Sampler().sample(
        logits, [spec(temperature=0.0, logprobs=1)] * 6, [EMPTY] * 6, gens, seq_ids
    )
    assert [t.token_id for t in full] == [t.token_id for t in fast]
    assert [t.logprob for t in fast] == pytest.approx([t.logprob for t in full], abs=1e-5)


def test_greedy_ties_pick_lowest_id() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    assert sample_ids(logits, [spec(temperature=0.0)] * 2, generators([0, 0])) == [1, 0]


def test_greedy_applies_repetition_penalty_first() -> None:
    logits = torch.tensor([[4.0, 3.0, 0.0]])
    history = [torch.tensor([0, 0])]
    ids = sample_ids(
        logits, [spec(temperature=0.0, repetition_penalty=2.0)], generators([0]), history
    )
    assert ids == [1]  # 4 / 2 = 2 < 3


def test_mixed_batch_greedy_and_sampled_rows() -> None:
    logits = random_logits(2, batch=6)
    specs = [spec(temperature=0.0 if i % 2 else 0.8, top_k=5) for i in range(6)]
    ids = sample_ids(logits, specs, generators(list(range(6))))
    argmax = logits.argmax(dim=-1).tolist()
    top5 = logits.topk(5, dim=-1).indices.tolist()
    for i, token in enumerate(ids):
        assert token == argmax[i] if i % 2 else token in top5[i]


# ---------------------------------------------------------------- exact masks


def test_repetition_penalty_exact() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]] * 3)
    histories = [torch.tensor([0, 1, 1]), EMPTY, torch.tensor([0, 1, 3])]
    out = apply_repetition_penalty(logits, histories, torch.tensor([2.0, 2.0, 1.0]))
    expected = torch.tensor([[1.0, -2.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0]])
    assert torch.equal(out, expected)
    assert torch.equal(logits[0], torch.tensor([2.0, -1.0, 0.5, 3.0]))  # input untouched


def test_repetition_penalty_ignores_ids_beyond_vocab() -> None:
    logits = torch.tensor([[2.0, -1.0]])
    out = apply_repetition_penalty(logits, [torch.tensor([1, 7])], torch.tensor([2.0]))
    assert torch.equal(out, torch.tensor([[2.0, -2.0]]))


def test_top_k_exact() -> None:
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]] * 4)
    out = apply_top_k(logits, torch.tensor([2, 0, 1, 9]))
    assert kept(out) == [[1, 3], [0, 1, 2, 3, 4], [1], [0, 1, 2, 3, 4]]
    assert torch.equal(out[0, [1, 3]], torch.tensor([5.0, 4.0]))


def test_top_k_keeps_ties_like_hf() -> None:
    out = apply_top_k(torch.tensor([[1.0, 3.0, 3.0, 2.0]]), torch.tensor([1]))
    assert kept(out) == [[1, 2]]


def test_top_p_exact() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(4, 1)
    # Ascending cumulative probabilities are 0.05, 0.2, 0.5, 1.0; HF drops those <= 1 - p.
    out = apply_top_p(logits, torch.tensor([0.7, 0.85, 0.4, 1.0], dtype=torch.float64))
    assert kept(out) == [[0, 1], [0, 1, 2], [0], [0, 1, 2, 3]]


def test_top_p_always_keeps_one_token() -> None:
    out = apply_top_p(torch.tensor([[10.0, 0.0, 0.0]]), torch.tensor([1e-6]))
    assert kept(out) == [[0]]


def test_min_p_exact() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(3, 1)
    # Thresholds: 0.25 * 0.5 = 0.125, 0.7 * 0.5 = 0.35, 0 disables.
    out = apply_min_p(logits, torch.tensor([0.25, 0.7, 0.0], dtype=torch.float64))
    assert kept(out) == [[0, 1, 2], [0], [0, 1, 2, 3]]


def test_disabled_filters_return_input_unchanged() -> None:
    logits = random_logits(3, batch=2)
    assert torch.equal(apply_top_k(logits, torch.tensor([0, 0])), logits)
    assert torch.equal(apply_top_p(logits, torch.tensor([1.0, 1.0])), logits)
    assert torch.equal(apply_min_p(logits, torch.tensor([0.0, 0.0])), logits)
    assert torch.equal(apply_repetition_penalty(logits, [EMPTY, EMPTY], torch.ones(2)), logits)


# ---------------------------------------------------------------- HF parity

TOP_KS = [1, 2, 5, 17, 50, 100, 250, 499]
TOP_PS = [0.05, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99, 0.999]
MIN_PS = [0.001, 0.01, 0.05, 0.1, 0.2, 0.5, 0.9, 1.0]


@pytest.mark.parametrize("seed", range(4))
def test_top_k_matches_hf(hf: ModuleType, seed: int) -> None:
    logits = random_logits(seed)
    ours = apply_top_k(logits, torch.tensor(TOP_KS))
    for i, k in enumerate(TOP_KS):
        theirs = hf.TopKLogitsWarper(top_k=k)(None, logits[i : i + 1])
        assert kept(ours[i : i + 1]) == kept(theirs)


@pytest.mark.parametrize("seed", range(4))
def test_top_p_matches_hf(hf: ModuleType, seed: int) -> None:
    logits = random_logits(seed)
    ours = apply_top_p(logits, torch.tensor(TOP_PS, dtype=torch.float64))
    for i, p in enumerate(TOP_PS):
        theirs = hf.TopPLogitsWarper(top_p=p)(None, logits[i : i + 1])
        assert kept(ours[i : i + 1]) == kept(theirs)


@pytest.mark.parametrize("seed", range(4))
def test_min_p_matches_hf(hf: ModuleType, seed: int) -> None:
    logits = random_logits(seed)
    ours = apply_min_p(logits, torch.tensor(MIN_PS, dtype=torch.float64))
    for i, m in enumerate(MIN_PS):
        theirs = hf.MinPLogitsWarper(min_p=m)(None, logits[i : i + 1])
        assert kept(ours[i : i + 1]) == kept(theirs)


def random_histories(seed: int, batch: int, vocab: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 300, (batch,), generator=gen).tolist()
    return [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]


@pytest.mark.parametrize("seed", range(4))
def test_repetition_penalty_matches_hf(hf: ModuleType, seed: int) -> None:
    logits = random_logits(seed)
    histories = random_histories(seed, 8, 500)
    penalties = [0.5, 0.9, 1.0, 1.1, 1.3, 2.0, 1.2, 5.0]
    ours = apply_repetition_penalty(logits, histories, torch.tensor(penalties))
    for i, (history, penalty) in enumerate(zip(histories, penalties)):
        processor = hf.RepetitionPenaltyLogitsProcessor(penalty=penalty)
        theirs = processor(history.unsqueeze(0), logits[i : i + 1].clone())
        torch.testing.assert_close(ours[i : i + 1], theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_full_pipeline_matches_hf(hf: ModuleType, seed: int) -> None:
    logits = random_logits(seed)
    histories = random_histories(seed + 100, 8, 500)
    specs = [
        spec(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.3),
        spec(temperature=1.5, top_k=0, top_p=0.8, min_p=0.0, repetition_penalty=1.0),
        spec(temperature=0.3, top_k=10, top_p=1.0, min_p=0.2, repetition_penalty=0.8),
        spec(temperature=1.0, top_k=200, top_p=0.95, min_p=0.01, repetition_penalty=2.0),
        spec(temperature=2.0, top_k=0, top_p=1.0, min_p=0.1, repetition_penalty=1.1),
        spec(temperature=0.9, top_k=5, top_p=0.5, min_p=0.0, repetition_penalty=1.0),
        spec(temperature=1.2, top_k=0, top_p=0.99, min_p=0.3, repetition_penalty=1.5),
        spec(temperature=0.5, top_k=1, top_p=1.0, min_p=0.0, repetition_penalty=1.0),
    ]
    penalties = torch.tensor([s.repetition_penalty for s in specs])
    ours = warp_logits(apply_repetition_penalty(logits, histories, penalties), specs)
    for i, s in enumerate(specs):
        theirs = hf_pipeline(hf, s)(histories[i].unsqueeze(0), logits[i : i + 1].clone())
        assert kept(ours[i : i + 1]) == kept(theirs)
        torch.testing.assert_close(ours[i : i + 1], theirs, rtol=1e-5, atol=1e-5)


def hf_pipeline(hf: ModuleType, s: SamplingSpec) -> Any:
    """The processors `generate` would build for `s`, in its order."""
    steps: list = []
    if s.repetition_penalty != 1.0:
        steps.append(hf.RepetitionPenaltyLogitsProcessor(penalty=s.repetition_penalty))
    steps.append(hf.TemperatureLogitsWarper(s.temperature))
    if s.top_k:
        steps.append(hf.TopKLogitsWarper(top_k=s.top_k))
    if s.top_p < 1.0:
        steps.append(hf.TopPLogitsWarper(top_p=s.top_p))
    if s.min_p:
        steps.append(hf.MinPLogitsWarper(min_p=s.min_p))
    return hf.LogitsProcessorList(steps)


# ---------------------------------------------------------------- seeded draws


def flat_logits(batch: int, vocab: int = 50) -> torch.Tensor:
    return random_logits(7, batch=batch, vocab=vocab) * 0.1  # (batch, vocab), near uniform


def draw_sequences(seeds: list[int], steps: int, s: SamplingSpec) -> list[list[int]]:
    logits = flat_logits(len(seeds))
    gens = generators(seeds)
    columns = [sample_ids(logits, [s] * len(seeds), gens) for _ in range(steps)]
    return [list(row) for row in zip(*columns)]


def test_same_seed_gives_same_tokens() -> None:
    s = spec(temperature=0.9, top_k=40, top_p=0.95, min_p=0.01)
    first = draw_sequences([0, 1, 2, 3], 200, s)
    assert first == draw_sequences([0, 1, 2, 3], 200, s)


def test_different_seeds_give_different_tokens() -> None:
    sequences = draw_sequences([0, 1, 2, 3], 50, spec())
    assert len({tuple(seq) for seq in sequences}) == 4
    assert all(len(set(seq)) > 10 for seq in sequences)


def test_draw_does_not_depend_on_batch_neighbours() -> None:
    logits = flat_logits(4)
    s = spec(temperature=0.8, top_p=0.9)
    alone = sample_ids(logits[2:3], [s], generators([42]))
    together = sample_ids(
        logits, [spec(), spec(temperature=0.0), s, spec()], generators([1, 2, 42, 3])
    )
    assert together[2] == alone[0]


def test_sampled_tokens_stay_in_surviving_set() -> None:
    logits = random_logits(11, batch=6, vocab=200)
    specs = [
        spec(top_k=3),
        spec(top_p=0.3),
        spec(min_p=0.2),
        spec(temperature=2.0, top_k=20, top_p=0.5),
        spec(temperature=0.5, min_p=0.05, top_p=0.9),
        spec(temperature=1.3, top_k=8, min_p=0.3),
    ]
    allowed = [set(row) for row in kept(warp_logits(logits, specs))]
    gens = generators(list(range(6)))
    seen: list[set[int]] = [set() for _ in specs]
    for _ in range(300):
        for i, token in enumerate(sample_ids(logits, specs, gens)):
            seen[i].add(token)
    assert all(s <= a for s, a in zip(seen, allowed))
    assert all(len(s) > 1 for s in seen)  # every row actually samples, not argmax


def test_empirical_frequencies_match_softmax() -> None:
    vocab, rows, steps = 8, 200, 100
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]]).repeat(rows, 1)
    gens = generators(list(range(rows)))
    counts = torch.zeros(vocab)
    for _ in range(steps):
        ids = torch.tensor(sample_ids(logits, [spec()] * rows, gens))
        counts += torch.bincount(ids, minlength=vocab)
    n = rows * steps
    probs = logits[0].softmax(dim=-1)
    # Each token's count is Binomial(n, p): its frequency has standard deviation
    # sqrt(p (1 - p) / n) <= 0.0036 for n = 20000. A 5-sigma band per token gives a false-failure
    # chance below 1e-5 over 8 tokens for a correct sampler, yet catches any bias above ~1.8%.
    sigma = (probs * (1 - probs) / n).sqrt()
    assert torch.all((counts / n - probs).abs() <= 5 * sigma)


# ---------------------------------------------------------------- logprobs and plumbing


def test_logprobs_come_from_raw_logits() -> None:
    logits = random_logits(5, batch=4, vocab=100)
    histories = random_histories(5, 4, 100)
    specs = [
        spec(logprobs=-1, temperature=0.7, repetition_penalty=1.5),
        spec(logprobs=0, temperature=0.0),
        spec(logprobs=3, top_k=5, repetition_penalty=2.0),
        spec(logprobs=20, temperature=1.8, top_p=0.5),
    ]
    out = Sampler().sample(logits, specs, histories, generators([0, 1, 2, 3]), [10, 11, 12, 13])
    raw = torch.log_softmax(logits, dim=-1)
    assert [t.seq_id for t in out] == [10, 11, 12, 13]
    for i, (token, s) in enumerate(zip(out, specs)):
        assert math.isclose(token.logprob, raw[i, token.token_id].item(), rel_tol=1e-6)
        k = max(s.logprobs, 0)
        values, indices = torch.topk(raw[i], k)
        assert token.top_ids == indices.tolist()
        assert token.top_logprobs == pytest.approx(values.tolist(), rel=1e-6)
        assert len(token.top_ids) == k


def test_logprobs_clamped_to_vocab() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    (token,) = Sampler().sample(logits, [spec(logprobs=20)], [EMPTY], generators([0]), [0])
    assert token.top_ids == [2, 1, 0]


def test_half_precision_logits_are_upcast() -> None:
    logits = random_logits(6, batch=3).to(torch.bfloat16)
    out = Sampler().sample(
        logits, [spec(logprobs=2)] * 3, [EMPTY] * 3, generators([0, 1, 2]), [0, 1, 2]
    )
    assert all(isinstance(t.token_id, int) and isinstance(t.logprob, float) for t in out)
    assert all(t.logprob <= 0.0 and len(t.top_logprobs) == 2 for t in out)


def test_empty_batch() -> None:
    assert Sampler().sample(torch.empty(0, 10), [], [], [], []) == []


def test_mismatched_lengths_raise() -> None:
    with pytest.raises(ValueError, match="specs"):
        Sampler().sample(torch.zeros(2, 10), [spec()], [EMPTY] * 2, generators([0, 1]), [0, 1])


def test_presence_and_frequency_penalties_count_output_tokens_only() -> None:
    from workers.sampler import apply_presence_frequency

    logits = torch.zeros(2, 6, dtype=torch.float64)
    outputs = [torch.tensor([1, 1, 3]), torch.tensor([2])]
    out = apply_presence_frequency(logits, outputs, [0.5, 0.0], [0.25, 0.0])
    # row 0: token 1 twice (2 * 0.25 + 0.5), token 3 once (0.25 + 0.5); row 1 untouched
    assert out[0].tolist() == [0.0, -1.0, 0.0, -0.75, 0.0, 0.0]
    assert out[1].tolist() == [0.0] * 6
    # Through the sampler: history = prompt [4, 4] + output [1]; only the output is penalised.
    greedy = spec(temperature=0.0, presence_penalty=2.0, num_prompt_tokens=2)
    row = torch.tensor([[0.0, 3.0, 0.0, 0.0, 2.5, 0.0]])
    (tok,) = Sampler().sample(row, [greedy], [torch.tensor([4, 4, 1])], generators([0]), [0])
    assert tok.token_id == 4  # token 1 fell to 1.0; the prompt's 4 kept 2.5


def test_score_rows_in_slices_equals_one_piece(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows scored in slices (the LM head called once per slice, on every rank) give the
    values of a whole log_softmax; a rank that does not keep them only runs the head."""
    import workers.sampler as sampler

    gen = torch.Generator().manual_seed(0)
    vocab, rows = 50, 23
    head = torch.randn(vocab, 8, generator=gen)
    hidden = torch.randn(rows, 8, generator=gen)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    calls: list[int] = []

    def logits(h: torch.Tensor) -> torch.Tensor:
        calls.append(h.shape[0])
        return h @ head.T

    monkeypatch.setattr(sampler, "PROMPT_LOGITS_BYTES", 4 * vocab * 5)  # 5 rows a slice
    chosen, top_ids, top_lp = sampler.score_rows(logits, hidden, targets, 3, vocab)
    assert calls == [5, 5, 5, 5, 3]
    full = torch.log_softmax(hidden @ head.T, dim=-1)
    torch.testing.assert_close(torch.tensor(chosen), full.gather(1, targets[:, None])[:, 0])
    values, ids = full.topk(3, dim=-1)
    assert top_ids == ids.flatten().tolist()
    torch.testing.assert_close(torch.tensor(top_lp), values.flatten())
    calls.clear()
    assert sampler.score_rows(logits, hidden, targets, 3, vocab, keep=False) == ([], [], [])
    assert calls == [5, 5, 5, 5, 3]


def test_sample_on_device_equals_sample() -> None:
    """The rows a step launched ahead picks on the device: the same tokens and chosen
    log-probabilities as `Sampler.sample` with the same seeded streams, greedy rows included;
    rows needing a history or a top-k list are refused."""
    gen = torch.Generator().manual_seed(21)
    logits = 3 * torch.randn(5, 300, generator=gen)
    specs = [
        spec(temperature=0.0, logprobs=0),
        spec(temperature=0.7, seed=3),
        spec(temperature=1.2, top_k=12, seed=4, logprobs=0),
        spec(temperature=0.9, top_p=0.8, min_p=0.05, seed=5),
        spec(temperature=0.0),
    ]
    seeds = [0, 3, 4, 5, 0]
    want = Sampler().sample(logits, specs, [EMPTY] * 5, generators(seeds), list(range(5)))
    got = sample_on_device(logits, specs, generators(seeds))
    assert got.dtype == torch.float64 and got.shape == (5, 2)
    assert [int(t) for t in got[:, 0]] == [w.token_id for w in want]
    assert got[:, 1].tolist() == [w.logprob for w in want]
    for bad in (spec(logprobs=2), spec(repetition_penalty=1.1), spec(presence_penalty=0.5)):
        with pytest.raises(ValueError, match="without penalties or top-k"):
            sample_on_device(logits[:1], [bad], generators([0]))


# -- guided output: allowed-token masks -------------------------------------------------------


def _packed(allowed: list[int], vocab: int) -> bytes:
    bits = bytearray((vocab + 7) // 8)
    for i in allowed:
        bits[i // 8] |= 1 << (i % 8)
    return bytes(bits)


def test_allowed_masks_hold_greedy_and_sampled_rows_to_their_tokens() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 21)
    allowed: list[list[int] | None] = [[3, 17], [20], None, [0, 5, 9]]
    specs = [spec(temperature=0.0), spec(temperature=0.0), spec(temperature=0.0), spec()]
    masks = [None if a is None else _packed(a, 21) for a in allowed]
    for seed in range(20):
        out = Sampler().sample(logits, specs, [EMPTY] * 4, generators([seed] * 4), [0, 1, 2, 3],
                               allowed=masks)  # fmt: skip
        ids = [t.token_id for t in out]
        assert ids[0] == max([3, 17], key=lambda i: logits[0, i].item())
        assert ids[1] == 20 and ids[2] == int(logits[2].argmax()) and ids[3] in (0, 5, 9)
        raw = torch.log_softmax(logits, dim=-1)  # log-probabilities stay the raw model's
        for row, t in enumerate(out):
            assert t.logprob == pytest.approx(raw[row, t.token_id].item(), abs=1e-5)


def test_allowed_rows_from_the_mask_cache_equal_the_masks_bits() -> None:
    """Unpacked masks are cached (least recently used out past MASK_CACHE_ROWS): through many
    more masks than it holds, repeated in turn, with a vocabulary that is not a multiple of 8,
    every row is the mask's own bits."""
    vocab = 37
    gen = torch.Generator().manual_seed(3)
    masks = []
    for _ in range(MASK_CACHE_ROWS + 20):
        bits = torch.rand(vocab, generator=gen) < 0.5
        bits[int(torch.randint(vocab, (1,), generator=gen))] = True
        packed = bytearray((vocab + 7) // 8)
        for t in bits.nonzero().flatten().tolist():
            packed[t // 8] |= 1 << (t % 8)
        masks.append((bytes(packed), bits))
    logits = torch.zeros(3, vocab)
    for k in [*range(len(masks)), *range(len(masks) - 1, -1, -3)]:
        rows = allowed_rows([masks[k][0], None, masks[(k * 7) % len(masks)][0]], logits)
        assert torch.equal(rows[0], masks[k][1]) and bool(rows[1].all())
        assert torch.equal(rows[2], masks[(k * 7) % len(masks)][1])


def test_allowed_masks_must_fit_the_logits_and_allow_something() -> None:
    logits = torch.zeros(1, 16)
    with pytest.raises(ValueError, match="3 bytes for 16 logits"):
        Sampler().sample(logits, [spec()], [EMPTY], generators([0]), [0], allowed=[b"\xff" * 3])
    with pytest.raises(ValueError, match="allows no token"):
        Sampler().sample(logits, [spec()], [EMPTY], generators([0]), [0], allowed=[b"\0\0"])


# -- logit bias -------------------------------------------------------------------------------


def test_logit_bias_bans_and_forces_tokens_and_keeps_raw_logprobs() -> None:
    torch.manual_seed(1)
    logits = torch.randn(3, 12)
    top = [int(i) for i in logits.argmax(dim=-1)]
    specs = [
        spec(temperature=0.0, bias_ids=[top[0]], bias_values=[-100.0]),  # its argmax banned
        spec(temperature=0.0, bias_ids=[3], bias_values=[100.0]),  # token 3 forced
        spec(bias_ids=[5, 7], bias_values=[100.0, 100.0]),  # a draw from {5, 7} only
    ]
    raw = torch.log_softmax(logits, dim=-1)
    for seed in range(10):
        out = Sampler().sample(logits, specs, [EMPTY] * 3, generators([seed] * 3), [0, 1, 2])
        second = int(logits[0].topk(2).indices[1])
        assert [t.token_id for t in out][:2] == [second, 3] and out[2].token_id in (5, 7)
        for row, t in enumerate(out):
            assert t.logprob == pytest.approx(raw[row, t.token_id].item(), abs=1e-5)


def test_logit_bias_past_the_logits_is_named() -> None:
    with pytest.raises(ValueError, match="names token 40, past the 12 logits"):
        Sampler().sample(
            torch.zeros(1, 12), [spec(bias_ids=[40], bias_values=[1.0])], [EMPTY],
            generators([0]), [0],
        )  # fmt: skip


# -- allowed token ids and bad words (vLLM's) -----------------------------------------------------


def test_allowed_ids_hold_greedy_and_sampled_rows_and_keep_raw_logprobs() -> None:
    torch.manual_seed(2)
    logits = torch.randn(3, 30)
    specs = [
        spec(temperature=0.0, allowed_ids=[4, 11, 29]),
        spec(allowed_ids=[0, 7]),
        spec(temperature=0.0),  # a row without any: the plain argmax beside them
    ]
    raw = torch.log_softmax(logits, dim=-1)
    seen: set[int] = set()
    for seed in range(40):
        out = Sampler().sample(logits, specs, [EMPTY] * 3, generators([seed] * 3), [0, 1, 2])
        assert out[0].token_id == max([4, 11, 29], key=lambda i: logits[0, i].item())
        assert out[1].token_id in (0, 7) and out[2].token_id == int(logits[2].argmax())
        seen.add(out[1].token_id)
        for row, t in enumerate(out):
            assert t.logprob == pytest.approx(raw[row, t.token_id].item(), abs=1e-5)
    assert seen == {0, 7}  # both drawn: a mask, not a pick


def test_bad_words_ban_one_token_words_always_and_longer_ones_after_their_start() -> None:
    logits = torch.zeros(1, 10)
    logits[0, 5] = 3.0  # the argmax
    logits[0, 6] = 2.0  # the runner-up
    banned = spec(temperature=0.0, bad_words=[[5]], num_prompt_tokens=2)
    history = torch.tensor([5, 5, 1, 2])  # prompt [5, 5], output [1, 2]
    assert sample_ids(logits, [banned], generators([0]), [history]) == [6]
    phrase = spec(temperature=0.0, bad_words=[[1, 2, 5]], num_prompt_tokens=2)
    assert sample_ids(logits, [phrase], generators([0]), [history]) == [6]  # output ends 1, 2
    other = torch.tensor([5, 5, 2, 1])
    assert sample_ids(logits, [phrase], generators([0]), [other]) == [5]
    # only the output counts: the prompt's [1, 2] does not start the word
    in_prompt = spec(temperature=0.0, bad_words=[[1, 2, 5]], num_prompt_tokens=4)
    assert sample_ids(logits, [in_prompt], generators([0]), [history]) == [5]
    # the output shorter than the word's start: nothing held back
    short = spec(temperature=0.0, bad_words=[[9, 1, 2, 5]], num_prompt_tokens=2)
    assert sample_ids(logits, [short], generators([0]), [history]) == [5]


def test_bans_turn_the_fast_paths_off() -> None:
    from workers.sampler import plain_greedy, samples_on_device

    for s in (spec(temperature=0.0, allowed_ids=[1]), spec(temperature=0.0, bad_words=[[1]])):
        assert not plain_greedy([s]) and not samples_on_device([s])
    assert spec(bad_words=[[1, 2]]).needs_history and not spec(bad_words=[[1]]).needs_history


def test_bans_that_leave_no_token_are_named() -> None:
    logits = torch.zeros(1, 4)
    banned = spec(allowed_ids=[2], bad_words=[[2]])
    with pytest.raises(ValueError, match="no token is left to sample"):
        Sampler().sample(logits, [banned], [EMPTY], generators([0]), [0])
    with pytest.raises(ValueError, match="allowed_token_ids names token 9, past the 4 logits"):
        Sampler().sample(logits, [spec(allowed_ids=[9])], [EMPTY], generators([0]), [0])
