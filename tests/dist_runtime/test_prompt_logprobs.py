"""Prompt log-probabilities (`SamplingParams.prompt_logprobs`, vLLM's semantics): every prompt
token after the first gets log P(token | tokens before it) and the top k, equal to a
full-sequence forward of Hugging Face transformers on the same checkpoint, across prefill
chunks, with a warm prefix cache and through preemption and recompute."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_runtime import RequestOutput, Runtime, SamplingParams
from dist_runtime.config import CacheConfig, SchedulerConfig
from dist_runtime.engine.output_processor import OutputProcessor
from dist_runtime.engine.scheduler import Sequence
from dist_runtime.protocol import PromptLogprobs

CPU32: dict[str, Any] = dict(device="cpu", dtype="float32")
BUDGET = 16
"""Tokens per step: a 53-token prompt prefills in 4 chunks."""
LOGPROB_ATOL = 1e-4
"""fp32 on both sides: only the summation order differs (~1e-6 in the logprobs)."""


def _prompt(n: int, seed: int) -> list[int]:
    return [(seed * 37 + i * 11) % 500 + 3 for i in range(n)]


@pytest.fixture(scope="module")
def rt(tiny_llama_dir: Path) -> Iterator[Runtime]:
    with Runtime(
        model=str(tiny_llama_dir),
        session_len=256,
        cache=CacheConfig(block_size=16, num_blocks=64),
        scheduler=SchedulerConfig(max_num_batched_tokens=BUDGET, max_num_seqs=4),
        **CPU32,
    ) as runtime:
        yield runtime


@pytest.fixture(scope="module")
def oracle(tiny_llama_dir: Path) -> Any:
    """prompt -> (len, vocab) log_softmax of HF's logits over the whole prompt at once."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)

    return logprobs


def _assert_matches(out: RequestOutput, ids: list[int], ref: torch.Tensor, k: int) -> None:
    scored = out.prompt_logprobs
    assert scored is not None and len(scored) == len(ids) and scored[0] is None
    for pos in range(1, len(ids)):
        e = scored[pos]
        assert e is not None and e.token_id == ids[pos], pos
        row = ref[pos - 1]  # the logits at pos - 1 predict the token at pos
        assert abs(e.logprob - row[ids[pos]].item()) <= LOGPROB_ATOL, pos
        values, top_ids = row.topk(k) if k else (row[:0], row[:0].long())
        assert list(e.top) == top_ids.tolist(), pos
        torch.testing.assert_close(
            torch.tensor(list(e.top.values())), values, rtol=0, atol=LOGPROB_ATOL
        )


def test_match_a_full_forward_across_chunks(rt: Runtime, oracle: Any) -> None:
    """Two prompts in the same steps, 4 and 2 chunks, top-5 and top-0, with sampled logprobs
    beside them; the generated tokens are those of a request without prompt logprobs."""
    prompts = [_prompt(53, 1), _prompt(20, 2)]
    params = [
        SamplingParams(max_new_tokens=4, prompt_logprobs=5, logprobs=2, ignore_eos=True),
        SamplingParams(max_new_tokens=4, prompt_logprobs=0, ignore_eos=True),
    ]
    outs = rt.generate(prompts, params)
    _assert_matches(outs[0], prompts[0], oracle(prompts[0]), 5)
    _assert_matches(outs[1], prompts[1], oracle(prompts[1]), 0)
    plain = rt.generate(prompts, SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert all(o.prompt_logprobs is None for o in plain)
    assert outs[0].logprobs is not None and len(outs[0].logprobs[0].top) == 2


def test_warm_prefix_cache_still_scores_every_position(rt: Runtime, oracle: Any) -> None:
    """The prompt's blocks are cached by a plain request first: the scoring request computes
    them anyway, and registers its own blocks for the requests after it."""
    ids = _prompt(70, 3)
    rt.generate([ids], SamplingParams(max_new_tokens=1))
    hits = rt.engine.stats()["prefix_cache_hit_tokens"]
    params = SamplingParams(max_new_tokens=2, prompt_logprobs=3)
    first, second = (rt.generate([ids], params)[0] for _ in range(2))
    assert first.num_cached_tokens == second.num_cached_tokens == 0
    assert rt.engine.stats()["prefix_cache_hit_tokens"] == hits
    ref = oracle(ids)
    _assert_matches(first, ids, ref, 3)
    _assert_matches(second, ids, ref, 3)
    assert rt.generate([ids], SamplingParams(max_new_tokens=1))[0].num_cached_tokens == 64


def test_stream_carries_them_on_the_first_delta(rt: Runtime) -> None:
    ids = _prompt(30, 4)
    params = SamplingParams(max_new_tokens=3, prompt_logprobs=1, ignore_eos=True)
    (handle,) = rt.add_requests([ids], params)
    deltas = list(handle)
    assert deltas[0].prompt_logprobs == handle.result().prompt_logprobs
    assert all(d.prompt_logprobs is None for d in deltas[1:])


def test_zero_new_tokens_reads_the_prompt_only(rt: Runtime, oracle: Any) -> None:
    """max_new_tokens=0 scores a text: the prompt's log-probabilities over 4 chunks, beside a
    request that generates in the same steps; no token, no text, finish_reason 'length', and
    nothing counted as generated. Streamed, the one delta carries the scores."""
    ids, other = _prompt(53, 7), _prompt(20, 8)
    before = rt.engine.stats()["num_generated_tokens"]
    scored, generated = rt.generate(
        [ids, other],
        [
            SamplingParams(max_new_tokens=0, prompt_logprobs=3, logprobs=2),
            SamplingParams(max_new_tokens=4, ignore_eos=True),
        ],
    )
    _assert_matches(scored, ids, oracle(ids), 3)
    assert (scored.token_ids, scored.text, scored.logprobs) == ([], "", [])
    assert scored.finish_reason == "length" and scored.stop_reason is None
    assert len(generated.token_ids) == 4
    assert rt.engine.stats()["num_generated_tokens"] - before == 4
    (handle,) = rt.add_requests([ids], SamplingParams(max_new_tokens=0, prompt_logprobs=1))
    (delta,) = list(handle)
    assert (delta.token_ids, delta.text, delta.finish_reason) == ([], "", "length")
    assert delta.prompt_logprobs == handle.result().prompt_logprobs
    assert handle.num_output_tokens == 0


def test_one_token_prompt_has_only_the_leading_none(rt: Runtime) -> None:
    (out,) = rt.generate([[42]], SamplingParams(max_new_tokens=2, prompt_logprobs=2))
    assert out.prompt_logprobs == [None]


def test_preemption_does_not_duplicate_entries(tiny_llama_dir: Path, oracle: Any) -> None:
    """4 sequences need 8-9 blocks of 4 tokens each and share 12: some are preempted and
    recompute their prompts; each position still holds one entry, equal to the oracle."""
    prompts = [_prompt(n, seed=n) for n in (6, 9, 11, 14)]
    params = SamplingParams(max_new_tokens=20, ignore_eos=True, prompt_logprobs=2)
    with Runtime(
        model=str(tiny_llama_dir),
        session_len=64,
        cache=CacheConfig(num_blocks=12, block_size=4),
        scheduler=SchedulerConfig(max_num_seqs=4),
        **CPU32,
    ) as runtime:
        outs = runtime.generate(prompts, params)
        assert runtime.engine.scheduler.num_preemptions > 0
    for ids, out in zip(prompts, outs):
        _assert_matches(out, ids, oracle(ids), 2)


def test_recorded_per_position() -> None:
    """A chunk scored again (a recompute) overwrites its positions."""
    seq = Sequence(
        seq_id=0,
        prompt_token_ids=[5, 6, 7, 8],
        params=SamplingParams(prompt_logprobs=1),
        seed=0,
    )
    chunk = PromptLogprobs(
        seq_id=0,
        start_pos=0,
        logprobs=[-1.0, -2.0],
        top_k=1,
        top_ids=[6, 9],
        top_logprobs=[-1.0, -0.5],
    )
    for _ in range(2):
        OutputProcessor.record_prompt_logprobs(seq, chunk)
    assert seq.num_prompt_logprobs == 2 and seq.needs_prompt_logprobs
    assert [e and (e.token_id, e.logprob, e.top) for e in seq.prompt_logprobs] == [
        None,
        (6, -1.0, {6: -1.0}),
        (7, -2.0, {9: -0.5}),
        None,
    ]


@pytest.mark.parametrize("bad", [-1, 21, 1.5, True, "3"])
def test_bad_values_are_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match="prompt_logprobs must be an integer in \\[0, 20\\]"):
        SamplingParams(prompt_logprobs=bad)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0"):
        SamplingParams(max_new_tokens=-1)
