"""Prefix caching: shared full blocks are computed once and give the same outputs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dist_runtime import CacheConfig, Runtime, SamplingParams
from dist_runtime.engine.block_manager import BlockManager

BS = 4
GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0, logprobs=2)


def runtime(folder: Path, caching: bool, num_blocks: int = 256) -> Runtime:
    cache = CacheConfig(block_size=BS, num_blocks=num_blocks, enable_prefix_caching=caching)
    return Runtime(model=str(folder), device="cpu", dtype="float32", session_len=512, cache=cache)


@pytest.fixture(scope="module")
def cached(tiny_llama_dir: Path) -> Iterator[Runtime]:
    with runtime(tiny_llama_dir, caching=True) as rt:
        yield rt


@pytest.fixture(scope="module")
def uncached(tiny_llama_dir: Path) -> Iterator[Runtime]:
    with runtime(tiny_llama_dir, caching=False) as rt:
        yield rt


DOC = [(7 * i + 3) % 500 + 4 for i in range(41)]  # 41 tokens: 10 full blocks + 1


def prefill_tokens(rt: Runtime, prompts: list[list[int]]) -> tuple[int, list]:
    before = rt.engine.scheduler.num_prompt_tokens_computed
    outs = rt.generate(prompts, GREEDY)
    return rt.engine.scheduler.num_prompt_tokens_computed - before, outs


def test_second_question_prefills_only_its_own_tokens(cached: Runtime, uncached: Runtime) -> None:
    q1, q2 = DOC + [11, 12, 13], DOC + [21, 22]
    n1, out1 = prefill_tokens(cached, [q1])
    n2, out2 = prefill_tokens(cached, [q2])
    assert n1 == len(q1)
    # q2 has 43 tokens; its first 40 (10 blocks, all full and computed for q1) come from the
    # cache; the last token is always computed so the step yields logits.
    assert n2 == len(q2) - 40
    ref1, ref2 = uncached.generate([q1], GREEDY)[0], uncached.generate([q2], GREEDY)[0]
    assert out1[0].token_ids == ref1.token_ids and out2[0].token_ids == ref2.token_ids
    for got, want in zip(out2[0].logprobs or [], ref2.logprobs or []):
        assert got.token_id == want.token_id
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)  # fp32, other summation order
    assert cached.prefix_cache_stats()["hit_tokens"] >= 40


def test_identical_prompt_recomputes_only_its_last_token(cached: Runtime) -> None:
    prompt = DOC[:36]  # exactly 9 blocks
    prefill_tokens(cached, [prompt])
    n, _ = prefill_tokens(cached, [prompt])
    assert n == BS  # the last block is recomputed so the final position yields logits


def test_blocks_return_to_the_pool(cached: Runtime) -> None:
    prefill_tokens(cached, [DOC + [5], DOC + [6], DOC[:9]])
    assert cached.engine.blocks.num_free_blocks == cached.engine.blocks.num_blocks
    assert not cached.engine.scheduler.has_work()


def test_ask_prefills_the_document_once(tiny_llama_dir: Path) -> None:
    doc = "The harbour of Kelmsby holds forty boats and one lighthouse. " * 6
    questions = ["How many boats?", "What stands on the cliff?", "Name the town."]
    with runtime(tiny_llama_dir, caching=True) as rt:
        before = rt.engine.scheduler.num_prompt_tokens_computed
        answers = rt.ask(doc, questions, SamplingParams(max_new_tokens=4, temperature=0.0))
        computed = rt.engine.scheduler.num_prompt_tokens_computed - before
    with runtime(tiny_llama_dir, caching=False) as rt:
        before = rt.engine.scheduler.num_prompt_tokens_computed
        reference = rt.ask(doc, questions, SamplingParams(max_new_tokens=4, temperature=0.0))
        full = rt.engine.scheduler.num_prompt_tokens_computed - before
    assert answers == reference
    doc_tokens = len(rt.encode(doc))
    # Without caching every question prefills the document; with it the document is computed
    # once (by the shared-prefix pass) and each question adds only its own tail.
    assert full - computed >= (len(questions) - 1) * (doc_tokens - 2 * BS)


def test_lru_eviction_keeps_serving_and_outputs_stay_exact(tiny_llama_dir: Path) -> None:
    prompts = [[(13 * i + 7 * j) % 500 + 4 for i in range(30)] for j in range(6)]
    with runtime(tiny_llama_dir, caching=True, num_blocks=24) as small:
        outs = [small.generate([p], GREEDY)[0].token_ids for p in prompts + prompts[:2]]
        assert small.engine.blocks.num_free_blocks == 24
    with runtime(tiny_llama_dir, caching=False) as plain:
        ref = [plain.generate([p], GREEDY)[0].token_ids for p in prompts + prompts[:2]]
    assert outs == ref


def test_block_manager_sharing_and_eviction_order() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    tokens = [1, 2, 3, 4, 5]
    a: list[int] = []
    bm.grow(a, 5)  # 3 blocks
    parent = bm.root_hash
    for i in range(2):  # blocks 0 and 1 are full and computed
        parent = bm.register_block(i, a[i], parent, tokens[2 * i : 2 * i + 2])
    shared, _ = bm.match_prefix(tokens, 4)
    assert shared == a[:2]
    first_two = list(shared)
    bm.free(a)  # a's tail block returns to the free list; shared blocks stay referenced
    assert bm.num_free_blocks == 2
    bm.free(shared)  # now unreferenced but cached: still free to take, evicted last-in-first
    assert bm.num_free_blocks == 4
    again, _ = bm.match_prefix(tokens, 4)
    assert again == first_two
    bm.free(again)
    taken: list[int] = []
    bm.grow(taken, 8)  # takes everything: never-used blocks first, then evicts the cache
    assert bm.match_prefix(tokens, 4)[0] == []
    assert bm.num_hit_tokens == 8 and bm.num_queried_tokens == 12


def test_blocks_given_back_early_are_not_freed_again() -> None:
    """A sliding window's passed blocks go back while their ids stay in the table; another
    table takes them, and freeing the first table skips them (no double release)."""
    bm = BlockManager(num_blocks=6, block_size=2)
    a: list[int] = []
    bm.grow(a, 8)  # 4 blocks
    bm.release_head(a, 0, 2)
    assert bm.num_free_blocks == 4
    b: list[int] = []
    bm.grow(b, 8)  # takes the 2 never-used blocks and the 2 given back
    assert set(a[:2]) <= set(b) and bm.num_free_blocks == 0
    bm.free(a, released=2)
    assert bm.num_free_blocks == 2
    bm.free(b)
    assert bm.num_free_blocks == 6


@pytest.mark.parametrize(
    "penalty",
    [dict(repetition_penalty=1.5), dict(presence_penalty=1.5, frequency_penalty=0.5)],
)
def test_penalties_see_the_cached_prefix(
    cached: Runtime, uncached: Runtime, penalty: dict[str, Any]
) -> None:
    """A penalty reads every earlier token, including those found in the prefix cache."""
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True, **penalty)
    prompts = [DOC + [9, 8], DOC + [7]]
    for p in prompts:  # the second of each pair starts from DOC's cached blocks
        first = cached.generate([p], params)[0].token_ids
        again = cached.generate([p], params)[0]
        assert again.num_cached_tokens > 0
        assert again.token_ids == first == uncached.generate([p], params)[0].token_ids
