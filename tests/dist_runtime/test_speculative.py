"""Speculative decoding by prompt lookup, end to end: greedy answers equal plain decoding's
token for token (log-probabilities to fp32 noise), whichever way the workers check a draft (as
a wider decode step, or as a prefill chunk per sequence), with requests that stop inside a
draft, prompts still prefilling beside drafting sequences, penalties and guided output (no
drafts), the prefix cache, sampling, and tensor parallelism over Ray."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from dist_runtime import Runtime, SamplingParams
from dist_runtime.config import CacheConfig, ConfigError, SchedulerConfig
from dist_runtime.engine.speculative import PromptLookup
from dist_runtime.formats.random_checkpoint import write_random_checkpoint
from tests.conftest import TINY_SHAPES
from workers.model_runner import ModelRunner

KW: dict[str, Any] = dict(
    device="cpu",
    dtype="float32",
    session_len=256,
    cache=CacheConfig(block_size=4, num_blocks=600),
)


def _prompts() -> list[list[int]]:
    """Prompts that repeat themselves (drafts are found) and one that does not."""
    gen = torch.Generator().manual_seed(3)
    phrase = torch.randint(4, 200, (13,), generator=gen).tolist()
    return [
        phrase * 4,
        phrase[:6] * 5 + [9, 8],
        torch.randint(4, 500, (37,), generator=gen).tolist(),
        (phrase[3:] + [1, 2, 3]) * 3,
    ]


def _greedy(**kw: Any) -> SamplingParams:
    kw = {"max_new_tokens": 40, "temperature": 0.0, "ignore_eos": True, "logprobs": 2} | kw
    return SamplingParams(**kw)


@pytest.fixture(autouse=True)
def full_drafts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drafts of full length whatever steps cost here (the policy's fit follows wall time)."""
    monkeypatch.setattr(PromptLookup, "row_share", lambda self, batch: 0.0)


def _run(folder: Path, prompts: list[Any], params: list[SamplingParams], k: int, **kw: Any):
    sched = kw.pop("scheduler", {})
    config = SchedulerConfig(max_num_seqs=8, num_speculative_tokens=k, **sched)
    with Runtime(model=str(folder), **(KW | kw), scheduler=config) as rt:
        outs = rt.generate(prompts, params)
        return outs, rt.engine.stats()


def _assert_same(got: list[Any], want: list[Any]) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.token_ids == w.token_ids, f"prompt {i}"
        assert g.finish_reason == w.finish_reason and g.text == w.text
        assert g.stop_reason == w.stop_reason
        if w.logprobs is None:
            assert g.logprobs is None
            continue
        assert g.logprobs is not None and len(g.logprobs) == len(w.logprobs)
        for a, b in zip(g.logprobs, w.logprobs):
            assert a.token_id == b.token_id and list(a.top) == list(b.top)
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert list(a.top.values()) == pytest.approx(list(b.top.values()), abs=1e-4)


@pytest.mark.parametrize("path", ["decode-rows", "chunk", "graphs"])
def test_greedy_equals_plain_decoding(
    tiny_llama_dir: Path, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """decode-rows: a draft's tokens are rows of a decode step; chunk: a prefill chunk per
    sequence; graphs: decode graphs (emulated on CPU, as on CUDA, with asynchronous decode
    asked for: a drafting engine plans no step ahead) run the draft rows and their LM head."""
    if path == "chunk":
        monkeypatch.setattr(ModelRunner, "_drafts_as_decode", lambda self, seqs: False)
    if path == "graphs":
        monkeypatch.setattr(ModelRunner, "_decode_graph_mode", lambda self: "emulate")
        monkeypatch.setenv("DIST_RUNTIME_ASYNC_DECODE", "1")
        staged = ModelRunner._staged_decode
        drafted_rows = []

        def probe(self: ModelRunner, seqs: list[Any], own_rope: bool, adapted: bool) -> Any:
            hidden = staged(self, seqs, own_rope, adapted)
            ids = [s.seq_id for s in seqs]
            drafted_rows.append(hidden is not None and len(set(ids)) < len(ids))
            return hidden

        monkeypatch.setattr(ModelRunner, "_staged_decode", probe)
    prompts = _prompts()
    params = [_greedy()] * len(prompts)
    want, plain_stats = _run(tiny_llama_dir, prompts, params, k=0)
    got, stats = _run(tiny_llama_dir, prompts, params, k=4)
    _assert_same(got, want)
    assert plain_stats["num_draft_tokens"] == 0
    assert stats["num_accepted_tokens"] > 0
    assert stats["num_draft_tokens"] > stats["num_accepted_tokens"]  # some were rejected
    # each step that kept draft tokens saved a step
    assert stats["num_steps"] < plain_stats["num_steps"]
    if path == "graphs":
        assert any(drafted_rows), "no graph replay ran a draft's rows"


def test_native_decoder_checks_drafts(tmp_path: Path) -> None:
    """head_dim 16: the native CPU decoder runs the draft rows (a shared-prefix batch: the
    rows of one sequence share its blocks)."""
    folder = write_random_checkpoint(
        tmp_path / "hd16", seed=6, **dict(TINY_SHAPES, num_heads=4, num_kv_heads=2)
    )
    prompts = _prompts()
    params = [_greedy(max_new_tokens=30)] * len(prompts)
    want, _ = _run(folder, prompts, params, k=0)
    got, stats = _run(folder, prompts, params, k=6)
    _assert_same(got, want)
    assert stats["num_accepted_tokens"] > 0


def test_limits_and_stops_equal_plain_decoding(tiny_llama_dir: Path) -> None:
    """Stop tokens, stop strings and length limits end answers where plain decoding does
    (drafts never run past max_new_tokens)."""
    prompts = _prompts()
    (first, *_), _ = _run(tiny_llama_dir, prompts[1:2], [_greedy()], k=0)
    stop_id = first.token_ids[25]
    stop_text = first.text[len(first.text) // 2 : len(first.text) // 2 + 3]
    params = [
        _greedy(stop_token_ids=[stop_id]),
        _greedy(max_new_tokens=23),
        _greedy(stop=[stop_text]) if stop_text.strip() else _greedy(max_new_tokens=3),
        _greedy(max_new_tokens=1),
        _greedy(stop_token_ids=[stop_id], ignore_eos=False),
    ]
    batch = [prompts[1]] * len(params)
    want, _ = _run(tiny_llama_dir, batch, params, k=0)
    got, stats = _run(tiny_llama_dir, batch, params, k=8)
    _assert_same(got, want)
    assert want[0].finish_reason == "stop" and want[0].stop_reason == stop_id
    assert len(want[1].token_ids) == 23
    assert stats["num_accepted_tokens"] > 0


def test_min_tokens_drafts_only_past_it(tiny_llama_dir: Path) -> None:
    """Before min_tokens a sequence drafts nothing (each sample needs the mask without its stop
    ids): a predicted output that plain decoding follows, one of whose tokens is a stop id,
    is not taken up to that token; the answer goes on past it."""
    prompt = _prompts()[2]
    (plain,), _ = _run(tiny_llama_dir, [prompt], [_greedy(max_new_tokens=16)], k=0)
    ids = plain.token_ids
    at = next(i for i in range(3, 12) if ids[i] not in ids[:i])
    params = _greedy(max_new_tokens=16, stop_token_ids=[ids[at]], min_tokens=12,
                     prediction=tuple(ids))  # fmt: skip
    (out,), stats = _run(tiny_llama_dir, [prompt], [params], k=4)
    assert out.token_ids[:at] == ids[:at] and ids[at] not in out.token_ids[:12]
    assert len(out.token_ids) >= 12


def test_stop_token_inside_a_draft(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first step that keeps three draft tokens has its second token turned into the
    request's stop token: the answer ends there, the tokens after it in that step are
    dropped, and the streamed deltas add up to the answer."""
    stop = 3
    sample = ModelRunner._sample_drafts
    hit: list[list[int]] = []

    kept_before = [0]

    def inject(self: ModelRunner, logits: torch.Tensor, seqs: list[Any]) -> list[Any]:
        tokens = sample(self, logits, seqs)
        ids = [t.token_id for t in tokens]
        if not hit and len(tokens) >= 4 and len(set(t.seq_id for t in tokens)) == 1:
            hit.append(ids)
            tokens[1] = dataclasses.replace(tokens[1], token_id=stop)
        elif not hit:
            kept_before[0] += len(tokens) - 1  # the draft tokens this step kept
        return tokens

    monkeypatch.setattr(ModelRunner, "_sample_drafts", inject)
    prompt = _prompts()[1]
    (plain,), _ = _run(tiny_llama_dir, [prompt], [_greedy()], k=0)
    assert stop not in plain.token_ids
    config = SchedulerConfig(num_speculative_tokens=4)
    with Runtime(model=str(tiny_llama_dir), **KW, scheduler=config) as rt:
        handle = rt.engine.add_request(prompt, _greedy(stop_token_ids=[stop]))
        deltas = list(handle)
        out = handle.result()
        stats_accepted = [rt.engine.stats()["num_accepted_tokens"]]
    assert hit, "no step kept two draft tokens"
    n = len(out.token_ids)
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids[-1] == stop and n < 40
    assert out.token_ids[: n - 2] == plain.token_ids[: n - 2]
    assert out.token_ids[n - 2] == hit[0][0]  # the kept token before the stop
    assert [t for d in deltas for t in d.token_ids] == out.token_ids
    assert "".join(d.text for d in deltas) == out.text
    assert deltas[-1].finish_reason == "stop" and len(deltas[-1].token_ids) == 2
    # of the injected step's draft only the two before the stop's end count as kept
    assert out.num_accepted_draft_tokens == stats_accepted[0] == kept_before[0] + 2


def test_prefill_beside_drafts(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A small step budget: long prompts prefill in chunks over several steps while a short
    one already decodes with drafts, so steps mix prefill chunks and drafts (checked as
    chunks)."""
    mixed = []
    as_decode = ModelRunner._drafts_as_decode

    def probe(self: ModelRunner, seqs: list[Any]) -> bool:
        mixed.append(any(len(s.token_ids) != s.num_draft_tokens + 1 for s in seqs))
        return as_decode(self, seqs)

    monkeypatch.setattr(ModelRunner, "_drafts_as_decode", probe)
    gen = torch.Generator().manual_seed(8)
    longs = [torch.randint(4, 500, (n,), generator=gen).tolist() for n in (150, 120)]
    short = _prompts()[1]  # its answer soon repeats one token: drafts every step

    def run(k: int) -> tuple[list[Any], dict[str, float]]:
        config = SchedulerConfig(
            max_num_seqs=8, max_num_batched_tokens=32, num_speculative_tokens=k
        )
        with Runtime(model=str(tiny_llama_dir), **KW, scheduler=config) as rt:
            first = rt.engine.add_request(short, _greedy(max_new_tokens=70))
            later: list[Any] = []
            seen = 0
            for delta in first:  # the long prompts arrive while it decodes
                seen += len(delta.token_ids)
                if seen >= 20 and not later:
                    later = rt.engine.add_requests(longs, [_greedy(max_new_tokens=12)] * 2)
            outs = [first.result(), *(h.result() for h in later)]
            assert outs[0].finish_reason == "length"
            return outs, rt.engine.stats()

    want, _ = run(0)
    got, stats = run(4)
    _assert_same(got, want)
    assert stats["num_accepted_tokens"] > 0
    assert any(mixed), "no step checked a draft beside a prefill chunk"


@pytest.mark.parametrize("path", ["decode-rows", "chunk"])
def test_penalties_with_drafts(tiny_llama_dir: Path, path: str, monkeypatch: Any) -> None:
    """Penalties over the history: each draft row is penalised over the tokens before it, and
    the rejected draft tokens leave the worker's history (later steps equal plain decoding's)."""
    if path == "chunk":
        monkeypatch.setattr(ModelRunner, "_drafts_as_decode", lambda self, seqs: False)
    prompts = _prompts()
    params = [
        _greedy(repetition_penalty=1.05),
        _greedy(presence_penalty=0.3),
        _greedy(frequency_penalty=0.2, repetition_penalty=1.02),
        _greedy(repetition_penalty=1.05),
    ]
    want, _ = _run(tiny_llama_dir, prompts, params, k=0)
    got, stats = _run(tiny_llama_dir, prompts, params, k=4)
    _assert_same(got, want)
    assert stats["num_accepted_tokens"] > 0
    assert stats["num_draft_tokens"] > stats["num_accepted_tokens"]


def test_allowed_ids_and_bad_words_with_drafts(tiny_llama_dir: Path) -> None:
    """allowed_token_ids and bad_words hold each draft row to what plain decoding may pick
    there (a bad word's last token is held back on the row after its start, in the draft or
    not): answers equal plain decoding's."""
    prompts = _prompts()
    plain, _ = _run(tiny_llama_dir, prompts, [_greedy()] * 4, k=0)
    with Runtime(model=str(tiny_llama_dir), **KW) as rt:
        found = _repeated_word(rt, [p + o.token_ids for p, o in zip(prompts, plain)], prompts)
    assert found is not None, "no two tokens the answers repeat are a word"
    at, pair, word = found
    prompts = [prompts[at], prompts[at], prompts[1 - at % 2], prompts[at]]
    params = [
        _greedy(bad_words=[word]),
        _greedy(allowed_token_ids=sorted(set(plain[at].token_ids))),
        _greedy(allowed_token_ids=sorted(set(plain[1 - at % 2].token_ids[:30]))),
        _greedy(allowed_token_ids=sorted(set(plain[at].token_ids)), bad_words=[word]),
    ]
    want, _ = _run(tiny_llama_dir, prompts, params, k=0)
    got, stats = _run(tiny_llama_dir, prompts, params, k=4)
    _assert_same(got, want)
    assert stats["num_accepted_tokens"] > 0
    for out in (want[0], want[3]):
        assert not _count(out.token_ids, pair)


def _repeated_word(
    rt: Runtime, texts: list[list[int]], prompts: list[list[int]]
) -> tuple[int, list[int], str] | None:
    """(k, pair, word): two tokens that answer k writes twice (drafts offer them the second
    time) and that are a word tokenized back to them."""
    assert rt.tokenizer is not None
    for k, (ids, prompt) in enumerate(zip(texts, prompts)):
        for i in range(len(prompt) + 1, len(ids) - 2):
            pair = ids[i : i + 2]
            word = rt.tokenizer.decode(pair)
            if _count(ids, pair) > 1 and pair in rt.engine._bad_word_ids(
                SamplingParams(bad_words=[word]), 0
            ):
                return k, pair, word
    return None


def _count(ids: list[int], part: list[int]) -> int:
    return sum(ids[i : i + len(part)] == part for i in range(len(ids)))


REPEATED_SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {"name": {"enum": ["alpha", "beta"]}, "n": {"enum": [1, 2, 3]}},
        "required": ["name", "n"],
    },
    "minItems": 5,
    "maxItems": 5,
}


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_guided_output_drafts(tiny_llama_dir: Path, temperature: float) -> None:
    """Guided JSON: a draft is cut where the grammar refuses a token, and each of its rows is
    checked under the mask of the grammar's state after the draft tokens before it. The
    answers' repeated structure gets drafted; greedy answers equal plain decoding's, sampled
    ones stay valid JSON of the schema."""
    schema = json.dumps(REPEATED_SCHEMA)
    params = [
        SamplingParams(max_new_tokens=200, temperature=temperature, seed=s, json_schema=schema)
        for s in range(3)
    ]
    prompts = ["Five records:", "JSON list:", "The data"]
    want, _ = _run(tiny_llama_dir, prompts, params, k=0)
    got, stats = _run(tiny_llama_dir, prompts, params, k=4)
    assert stats["num_accepted_tokens"] > 0
    for out in got:
        assert out.finish_reason == "stop"
        jsonschema.validate(json.loads(out.text), REPEATED_SCHEMA)
    if temperature == 0.0:
        _assert_same(got, want)


def test_accepted_tokens_reach_the_prefix_cache(tiny_llama_dir: Path) -> None:
    """Blocks filled by accepted draft tokens are registered, those of a request's last step
    too (registered as it finishes): a follow-up prompt made of a prompt and its whole answer
    finds as many tokens cached as after plain decoding, and continues as plain decoding
    does."""
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(4, 500, (7,), generator=gen).tolist() * 6 for _ in range(12)]
    cached: dict[int, list[int]] = {}
    seconds: dict[int, list[list[int]]] = {}
    for k in (0, 8):
        config = SchedulerConfig(max_num_seqs=8, num_speculative_tokens=k)
        with Runtime(model=str(tiny_llama_dir), **KW, scheduler=config) as rt:
            cached[k], seconds[k] = [], []
            for prompt in prompts:
                (first,) = rt.generate([prompt], _greedy(max_new_tokens=30, logprobs=None))
                (second,) = rt.generate(
                    [prompt + first.token_ids], _greedy(max_new_tokens=4, logprobs=None)
                )
                cached[k].append(second.num_cached_tokens)
                seconds[k].append(second.token_ids)
            if k:
                assert rt.engine.stats()["num_accepted_tokens"] > 0
    assert cached[8] == cached[0]
    assert seconds[8] == seconds[0]


def test_seeded_sampling_is_the_same_with_drafts(tiny_llama_dir: Path) -> None:
    """A seeded sampled answer is the same token for token with drafts and without: each
    row's pick is the exponential race of its own (seed, position), which a draft token
    either matches or not."""
    prompts = _prompts()
    params = [
        SamplingParams(max_new_tokens=30, temperature=0.7, top_p=0.9, seed=5, ignore_eos=True),
        SamplingParams(max_new_tokens=25, temperature=1.0, top_k=3, seed=6, ignore_eos=True),
        SamplingParams(max_new_tokens=30, temperature=0.3, seed=7, ignore_eos=True, logprobs=1),
        SamplingParams(
            max_new_tokens=20, temperature=0.5, seed=8, ignore_eos=True, repetition_penalty=1.1
        ),
    ]
    want, _ = _run(tiny_llama_dir, prompts, params, k=0)
    got, stats = _run(tiny_llama_dir, prompts, params, k=4)
    _assert_same(got, want)
    assert [len(o.token_ids) for o in got] == [30, 25, 30, 20]
    assert stats["num_accepted_tokens"] > 0


def test_async_decode_goes_on_while_nothing_drafts(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the policy holds every sequence's draft back (rows cost too much), decode steps
    are planned ahead as without speculation; the answers are the same."""
    monkeypatch.setattr(ModelRunner, "_decode_graph_mode", lambda self: "emulate")
    monkeypatch.setenv("DIST_RUNTIME_ASYNC_DECODE", "1")
    monkeypatch.setattr(PromptLookup, "row_share", lambda self, batch: 0.99)
    prompts = _prompts()
    params = [_greedy(logprobs=None)] * len(prompts)
    config = SchedulerConfig(max_num_seqs=8, num_speculative_tokens=4)
    with Runtime(model=str(tiny_llama_dir), **KW, scheduler=config) as rt:
        got = rt.generate(prompts, params)
        ahead = rt.engine.num_steps_ahead
        drafted = rt.engine.stats()["num_draft_tokens"]
    want, _ = _run(tiny_llama_dir, prompts, params, k=0)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert drafted == 0 and ahead > 0


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="num_speculative_tokens must be an integer in"):
        SchedulerConfig(num_speculative_tokens=-1)
    with pytest.raises(ConfigError, match="num_speculative_tokens must be an integer in"):
        SchedulerConfig(num_speculative_tokens=17)
    with pytest.raises(ConfigError, match="1 <= min <= max"):
        SchedulerConfig(num_speculative_tokens=2, prompt_lookup_min=5, prompt_lookup_max=3)


def test_tensor_parallel_drafts(ray_cluster: Any, tmp_path: Path) -> None:
    """tp = 2 over Ray (the draft crosses the wire in the plan; every rank runs the draft rows
    through the native decoder stage by stage): the tp = 1 plain answers."""
    folder = write_random_checkpoint(
        tmp_path / "hd16", seed=6, **dict(TINY_SHAPES, num_heads=4, num_kv_heads=2)
    )
    prompts = _prompts()
    params = [_greedy(max_new_tokens=30)] * len(prompts)
    want, _ = _run(folder, prompts, params, k=0)
    got, stats = _run(folder, prompts, params, k=4, tp=2)
    _assert_same(got, want)
    assert stats["num_accepted_tokens"] > 0


@pytest.mark.parametrize("cp", [2, 3])
def test_context_parallel_drafts(ray_cluster: Any, tiny_llama_dir: Path, cp: int) -> None:
    """cp > 1 over Ray: a step with drafts runs as prefill chunks through the ring (each rank
    stores and scores the draft tokens whose blocks it holds; the rows are gathered in plan
    order): the single-device plain answers."""
    prompts = _prompts()
    params = [_greedy(max_new_tokens=30)] * len(prompts)
    want, _ = _run(tiny_llama_dir, prompts, params, k=0)
    got, stats = _run(tiny_llama_dir, prompts, params, k=4, cp=cp)
    _assert_same(got, want)
    assert stats["num_accepted_tokens"] > 0


@pytest.mark.parametrize("k", [0, 4])
def test_predicted_output(tiny_llama_dir: Path, k: int) -> None:
    """A prediction (OpenAI's Predicted Outputs) drafts even on a runtime that drafts nothing
    else (k = 0): the answer is plain decoding's; a right prediction is kept whole, and one
    with a changed stretch is followed again after it (its n-grams realign the drafts)."""
    prompts = _prompts()[2:3] * 3
    plain = _greedy(max_new_tokens=40)
    (want, *_), _ = _run(tiny_llama_dir, prompts[:1], [plain], k=0)
    edited = [*want.token_ids[:12], 7, 8, 9, *want.token_ids[15:]]
    params = [
        dataclasses.replace(plain, prediction=tuple(want.token_ids)),
        dataclasses.replace(plain, prediction=tuple(edited)),
        plain,
    ]
    got, stats = _run(tiny_llama_dir, prompts, params, k=k)
    _assert_same(got, [want] * 3)
    right, changed, none = got
    # right: every draft kept; the 40 tokens in 40 / (draft + 1) steps
    assert right.num_draft_tokens == right.num_accepted_draft_tokens >= 30
    # changed: drafts miss at the changed stretch, and are kept again after it
    assert 0 < changed.num_accepted_draft_tokens < changed.num_draft_tokens
    assert changed.num_accepted_draft_tokens >= 25
    if k == 0:
        assert none.num_draft_tokens == 0  # no prediction, no speculation on this runtime
    assert stats["num_accepted_tokens"] == sum(o.num_accepted_draft_tokens for o in got)
