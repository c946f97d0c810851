"""A thinking budget (`SamplingParams.thinking_budget`, `dist_runtime.engine.thinking`): after
`budget` tokens inside the thinking the end marker's tokens are forced. Checked on a random
model against its own greedy decoding: the tokens before the budget are plain decoding's, then
the end marker's, then what greedy decoding of the prompt plus those tokens gives; a model that
closes its thinking itself is left alone; drafts and steps planned ahead change nothing."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dist_runtime import Runtime, SamplingParams, SchedulerConfig
from dist_runtime.engine.thinking import CLOSED, OPEN, ThinkingBudget, one_token_mask
from tests.dist_runtime.test_async_decode import modes  # noqa: F401  (a fixture)

MAX_NEW = 14


# -- the state machine ------------------------------------------------------------------------
def _feed(budget: ThinkingBudget, tokens: list[int]) -> list[list[int]]:
    """Each token in turn, and what the budget forces after it."""
    out: list[int] = []
    forced = []
    for t in tokens:
        out.append(t)
        budget.advance(out)
        forced.append(list(budget.forced))
    return forced


def test_a_thinking_opened_by_the_prompt_is_closed_at_its_budget() -> None:
    b = ThinkingBudget(3, (7,), (8, 9), opened=True, vocab=16)
    assert _feed(b, [1, 2, 3]) == [[], [], [8, 9]]
    assert b.mask() == one_token_mask(8, 16) and b.draft_room() == 0 and b.needs_last_token()
    assert _feed(b, [8, 9]) == [[9], []]
    assert b.state == CLOSED and b.num_forced == 2 and b.mask() is None
    assert b.draft_room() is None and not b.needs_last_token()


def test_a_thinking_opened_in_the_output_counts_from_its_marker() -> None:
    b = ThinkingBudget(2, (5, 6), (8,), opened=False, vocab=16)
    assert b.draft_room() == 2
    assert _feed(b, [1, 5, 6]) == [[], [], []] and b.state == OPEN and b.count == 0
    assert b.draft_room() == 1 and not b.needs_last_token()
    assert _feed(b, [2]) == [[]] and b.needs_last_token() and b.draft_room() == 0
    assert _feed(b, [3]) == [[8]]


def test_a_model_that_closes_its_thinking_is_not_forced() -> None:
    b = ThinkingBudget(4, (7,), (8, 9), opened=True, vocab=16)
    assert _feed(b, [1, 8, 9, 1, 2, 3, 4, 5]) == [[]] * 8 and b.state == CLOSED


def test_an_end_marker_begun_at_the_budget_is_finished_not_restarted() -> None:
    b = ThinkingBudget(2, (7,), (8, 9, 10), opened=True, vocab=16)
    assert _feed(b, [1, 8]) == [[], [9, 10]]


def test_budget_zero_closes_the_thinking_at_once() -> None:
    assert ThinkingBudget(0, (7,), (8,), opened=True, vocab=16).forced == [8]
    b = ThinkingBudget(0, (7,), (8,), opened=False, vocab=16)
    assert b.needs_last_token() and _feed(b, [1, 7]) == [[], [8]]


def test_one_token_mask_allows_that_token_alone() -> None:
    mask = one_token_mask(11, 20)
    bits = [(mask[i // 8] >> (i % 8)) & 1 for i in range(20)]
    assert len(mask) == 3 and bits == [int(i == 11) for i in range(20)]


# -- on a runtime ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rt(tiny_llama_dir: Path) -> Iterator[Runtime]:
    with Runtime(model=str(tiny_llama_dir), device="cpu", dtype="float32", session_len=128) as r:
        yield r


def _greedy(max_new: int = MAX_NEW, **kw: Any) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new, temperature=0.0, ignore_eos=True, **kw)


def _ids(rt: Runtime, text: str) -> list[int]:
    assert rt.tokenizer is not None
    return rt.tokenizer.encode(text, add_special_tokens=False)


def _expected(rt: Runtime, prompt: list[int], free: list[int], at: int, end: list[int]) -> list:
    """Plain decoding's first `at` tokens, the end marker, then greedy decoding after them."""
    head = free[:at] + end
    (rest,) = rt.generate([prompt + head], _greedy(MAX_NEW - len(head)))
    return head + rest.token_ids


def _marker_at(rt: Runtime, tokens: list[int], lo: int) -> tuple[int, str]:
    """The first position from `lo` whose token's text is that one token again (and does not
    come earlier): a marker the model writes there of its own accord."""
    assert rt.tokenizer is not None
    for i in range(lo, len(tokens) - 4):
        text = rt.tokenizer.decode([tokens[i]])
        if _ids(rt, text) == tokens[i : i + 1] and tokens[i] not in tokens[:i]:
            return i, text
    raise AssertionError(f"no token of {tokens} makes a marker")


def test_the_budget_forces_the_end_marker_and_decoding_goes_on(rt: Runtime) -> None:
    prompt = _ids(rt, "Think it through. <think>")
    (free,) = rt.generate([prompt], _greedy())
    end = _ids(rt, "</think>")
    assert len(end) > 1 and free.token_ids[3 : 3 + len(end)] != end
    for budget in (3, 0):
        (out,) = rt.generate([prompt], _greedy(thinking_budget=budget))
        assert out.token_ids == _expected(rt, prompt, free.token_ids, budget, end)
    # markers of the caller's own: the thinking opened by a token the model writes itself
    plain = _ids(rt, "Answer:")
    (free,) = rt.generate([plain], _greedy())
    at, start_text = _marker_at(rt, free.token_ids, 1)
    params = _greedy(thinking_budget=2, thinking_markers=(start_text, "</think>"))
    (out,) = rt.generate([plain], params)
    assert out.token_ids == _expected(rt, plain, free.token_ids, at + 3, end)


def test_a_thinking_closed_before_its_budget_is_left_alone(rt: Runtime) -> None:
    prompt = _ids(rt, "Think it through. <think>")
    (free,) = rt.generate([prompt], _greedy())
    at, end_text = _marker_at(rt, free.token_ids, 1)
    params = _greedy(thinking_budget=at + 1, thinking_markers=("<think>", end_text))
    (out,) = rt.generate([prompt], params)
    assert out.token_ids == free.token_ids


def test_drafts_do_not_carry_the_thinking_past_its_budget(
    rt: Runtime, tiny_llama_dir: Path
) -> None:
    """A prediction that is the unbounded answer drafts past the budget (every draft as long
    as it goes); the answer is still the budgeted one (the draft is cut to the budget's room,
    then the forced tokens follow without one)."""
    prompt = _ids(rt, "Think it through. <think>")
    (free,) = rt.generate([prompt], _greedy())
    budgeted = _greedy(thinking_budget=4)
    (want,) = rt.generate([prompt], budgeted)
    drafting = SchedulerConfig(draft_policy="fixed", num_speculative_tokens=4)
    with Runtime(model=str(tiny_llama_dir), device="cpu", dtype="float32", session_len=128,
                 scheduler=drafting) as other:  # fmt: skip
        (out,) = other.generate(
            [prompt], dataclasses.replace(budgeted, prediction=tuple(free.token_ids))
        )
    assert out.token_ids == want.token_ids and out.num_accepted_draft_tokens >= 3


def test_steps_planned_ahead_keep_the_budget(tiny_llama_dir: Path, modes: Any) -> None:  # noqa: F811
    """Asynchronous decode plans the next step before the token in flight is seen; around the
    budget it waits for it, so the answers equal step-by-step decoding's, and steps were
    still planned ahead elsewhere."""

    def run(rt: Runtime) -> list[list[int]]:
        prompts = [_ids(rt, "Think it through. <think>"), _ids(rt, "Plan. <think>")]
        params = [_greedy(thinking_budget=3), _greedy(thinking_budget=6)]
        return [o.token_ids for o in rt.generate(prompts, params)]

    sync, ahead, num_ahead = modes(run, tiny_llama_dir)
    assert ahead == sync and num_ahead > 0


def test_bad_thinking_options_are_refused(rt: Runtime) -> None:
    with pytest.raises(ValueError, match="thinking_budget must be an integer >= 0"):
        SamplingParams(thinking_budget=-1)
    with pytest.raises(ValueError, match="thinking_markers must be two non-empty strings"):
        SamplingParams(thinking_budget=1, thinking_markers=("<think>", ""))
    with pytest.raises(ValueError, match="cannot combine with guided output"):
        SamplingParams(thinking_budget=1, guided_choice=("a",))
