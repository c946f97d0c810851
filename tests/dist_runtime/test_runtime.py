"""The public Runtime end to end with a real (in-process) worker: preemption under a tiny KV
cache, seeded sampling, stop conditions, finish reasons and per-prompt sampling parameters."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_runtime import CacheConfig, RequestOutput, Runtime, SamplingParams, SchedulerConfig
from dist_runtime.config import ConfigError, ModelConfig, RopeScaling, RuntimeConfig, auto_dtype
from dist_runtime.engine.executor.base import WorkerError
from dist_runtime.engine.kv_disk import _scaling_text
from dist_runtime.formats.random_checkpoint import write_random_checkpoint
from dist_runtime.server.metrics import ServerMetrics
from tests.conftest import TINY_SHAPES

VOCAB = TINY_SHAPES["vocab_size"]
CPU32: dict[str, Any] = dict(device="cpu", dtype="float32")
LOGPROB_ATOL = 1e-4
"""fp32: a recomputed prefix runs as one prefill instead of prefill + decodes; the logits differ
only by summation order (~1e-6)."""
TEXT = "The scheduler reads the document before noon."


def _prompt(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (length,), generator=gen).tolist()


@pytest.fixture(scope="module")
def rt(tiny_llama_dir: Path) -> Iterator[Runtime]:
    with Runtime(model=str(tiny_llama_dir), session_len=128, **CPU32) as runtime:
        yield runtime


def _greedy(**kwargs: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, **kwargs)


# -- preemption ------------------------------------------------------------------------------


def test_preemption_gives_the_same_greedy_tokens(tiny_internlm2_dir: Path) -> None:
    """4 sequences needing 8-9 blocks of 4 tokens each share 12 blocks: the scheduler must preempt
    and recompute, and the result must equal a cache where everything fits."""
    prompts = [_prompt(n, seed=n) for n in (6, 9, 11, 14)]
    params = _greedy(max_new_tokens=20, ignore_eos=True, logprobs=3)
    runs: dict[str, tuple[list[RequestOutput], int]] = {}
    for name, num_blocks in (("tiny", 12), ("roomy", 128)):
        with Runtime(
            model=str(tiny_internlm2_dir),
            session_len=64,
            cache=CacheConfig(num_blocks=num_blocks, block_size=4),
            scheduler=SchedulerConfig(max_num_seqs=4),
            **CPU32,
        ) as runtime:
            runs[name] = (
                runtime.generate(prompts, params),
                runtime.engine.scheduler.num_preemptions,
            )
            assert runtime.engine.blocks.num_free_blocks == num_blocks  # everything was given back
    (tiny, preemptions), (roomy, no_preemptions) = runs["tiny"], runs["roomy"]
    assert preemptions > 0 and no_preemptions == 0
    for a, b in zip(tiny, roomy):
        assert a.token_ids == b.token_ids
        assert len(a.token_ids) == 20 and a.finish_reason == b.finish_reason == "length"
        assert a.logprobs is not None and b.logprobs is not None
        for x, y in zip(a.logprobs, b.logprobs):
            assert list(x.top) == list(y.top)
            torch.testing.assert_close(
                torch.tensor([x.logprob, *x.top.values()]),
                torch.tensor([y.logprob, *y.top.values()]),
                rtol=0,
                atol=LOGPROB_ATOL,
            )


# -- seeded sampling -------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible(rt: Runtime, tiny_llama_dir: Path) -> None:
    prompts: list[Any] = [TEXT, _prompt(12, seed=3)]
    seeded = SamplingParams(
        max_new_tokens=16, temperature=0.8, top_p=0.9, seed=123, ignore_eos=True
    )
    first = rt.generate(prompts, seeded)
    with Runtime(model=str(tiny_llama_dir), session_len=128, **CPU32) as other:
        second = other.generate(prompts, seeded)
    assert [o.token_ids for o in first] == [o.token_ids for o in second]
    # The same seed gives the same tokens alone and next to other requests.
    alone = rt.generate([prompts[1]], seeded)[0]
    assert alone.token_ids == first[1].token_ids
    # A different seed gives a different sample (16 tokens at temperature 0.8: a collision is
    # astronomically unlikely, and the seeds are fixed so this cannot flake).
    other_seed = rt.generate(prompts, SamplingParams(**{**_fields(seeded), "seed": 124}))
    assert all(a.token_ids != b.token_ids for a, b in zip(first, other_seed))
    # Sampling is not greedy decoding here.
    greedy = rt.generate(prompts, _greedy(max_new_tokens=16, ignore_eos=True))
    assert [o.token_ids for o in greedy] != [o.token_ids for o in first]


def test_one_sampling_default(rt: Runtime) -> None:
    """No params, SamplingParams() and a SamplingParams that sets only the length all decode
    greedily: the same tokens as an explicit temperature 0."""
    prompts: list[Any] = [TEXT, _prompt(12, seed=4)]
    greedy = [o.token_ids for o in rt.generate(prompts, _greedy(max_new_tokens=64))]
    assert [o.token_ids for o in rt.generate(prompts)] == greedy
    assert [o.token_ids for o in rt.generate(prompts, SamplingParams())] == greedy
    short = rt.generate(prompts, SamplingParams(max_new_tokens=5))
    assert [o.token_ids for o in short] == [g[:5] for g in greedy]


def test_unseeded_requests_follow_the_runtime_seed(tiny_llama_dir: Path) -> None:
    params = SamplingParams(max_new_tokens=10, temperature=1.0, ignore_eos=True)
    outs = []
    for _ in range(2):
        with Runtime(model=str(tiny_llama_dir), session_len=128, seed=5, **CPU32) as runtime:
            outs.append([o.token_ids for o in runtime.generate([TEXT, TEXT], params)])
    assert outs[0] == outs[1]
    assert outs[0][0] != outs[0][1]  # each request draws its own seed


def _fields(params: SamplingParams) -> dict[str, Any]:
    return {k: getattr(params, k) for k in params.__dataclass_fields__ if k != "extra"}


# -- stop conditions and finish reasons ------------------------------------------------------


def _stop_string(text: str) -> tuple[str, int]:
    """A 3-character ASCII-letter stop string from the middle of text, and where it first occurs."""
    for i in range(len(text) // 3, len(text) - 3):
        candidate = text[i : i + 3]
        if candidate.isascii() and candidate.isalpha():
            return candidate, text.find(candidate)
    raise AssertionError(f"no ASCII stop string in {text!r}")


def test_stop_string_cuts_the_text(rt: Runtime) -> None:
    params = _greedy(max_new_tokens=40, ignore_eos=True)
    (full,) = rt.generate([TEXT], params)
    stop, at = _stop_string(full.text)
    assert at > 0
    (cut,) = rt.generate([TEXT], SamplingParams(**{**_fields(params), "stop": [stop, "zzzzqq"]}))
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert full.stop_reason is None  # finished by length
    assert cut.text == full.text[:at] and stop not in cut.text
    # Generation ended on the token that completed the stop string.
    n = len(cut.token_ids)
    assert n < len(full.token_ids) and cut.token_ids == full.token_ids[:n]
    assert stop in rt.tokenizer.decode(cut.token_ids)  # type: ignore[union-attr]
    assert stop not in rt.tokenizer.decode(cut.token_ids[:-1])  # type: ignore[union-attr]


def test_stop_token_ids(rt: Runtime) -> None:
    prompt = _prompt(8, seed=4)
    (full,) = rt.generate([prompt], _greedy(max_new_tokens=16, ignore_eos=True))
    target = full.token_ids[5]
    k = full.token_ids.index(target)
    (stopped,) = rt.generate([prompt], _greedy(max_new_tokens=16, stop_token_ids=[target]))
    assert stopped.token_ids == full.token_ids[: k + 1]  # the stop token is kept
    assert stopped.finish_reason == "stop" and stopped.stop_reason == target
    # ... in the ids, not in the text (as vLLM: the answer is what came before it)
    assert stopped.text == rt.tokenizer.decode(full.token_ids[:k])  # type: ignore[union-attr]


def test_the_ending_eos_adds_no_text_when_special_tokens_are_kept(rt: Runtime) -> None:
    eos = rt.tokenizer.eos_token_ids[0]  # type: ignore[union-attr]
    forced = _greedy(max_new_tokens=4, skip_special_tokens=False, logit_bias={eos: 100.0})
    kept = _greedy(max_new_tokens=3, skip_special_tokens=False, ignore_eos=True,
                   logit_bias={eos: 100.0})  # fmt: skip
    ended, ignored = rt.generate([TEXT, TEXT], [forced, kept])
    assert ended.token_ids == [eos] and ended.text == "" and ended.finish_reason == "stop"
    assert ended.stop_reason == eos and ignored.stop_reason is None
    # with ignore_eos the token is an ordinary one: its text is part of the answer
    assert ignored.token_ids == [eos] * 3
    assert ignored.text == rt.tokenizer.decode([eos] * 3, skip_special_tokens=False)  # type: ignore[union-attr]


def test_min_tokens_holds_back_eos_stop_ids_and_stop_strings(rt: Runtime) -> None:
    tok = rt.tokenizer
    assert tok is not None
    eos = tok.eos_token_ids[0]
    # EOS is forced by a bias, yet the first three tokens are something else
    forced = _greedy(max_new_tokens=6, logit_bias={eos: 100.0}, min_tokens=3)
    (out,) = rt.generate([TEXT], forced)
    assert len(out.token_ids) == 4 and out.token_ids[-1] == eos and eos not in out.token_ids[:3]
    assert out.finish_reason == "stop"
    # a stop id greedy decoding picks early is held back until min_tokens
    prompt = _prompt(8, seed=4)
    (full,) = rt.generate([prompt], _greedy(max_new_tokens=16, ignore_eos=True))
    target = full.token_ids[1]
    (held,) = rt.generate([prompt], _greedy(max_new_tokens=16, ignore_eos=True,
                                            stop_token_ids=[target], min_tokens=6))  # fmt: skip
    assert target not in held.token_ids[:6] and len(held.token_ids) > 2
    assert held.token_ids[0] == full.token_ids[0]  # the same until the held-back pick
    # a stop string in the text before min_tokens does not count
    stop = next(
        full.text[i : i + 2] for i in range(len(full.text) - 1)
        if full.text.count(full.text[i : i + 2]) == 1 and full.text[i : i + 2].strip()
    )  # fmt: skip
    ask = _greedy(max_new_tokens=16, ignore_eos=True, stop=[stop])
    (cut,) = rt.generate([prompt], ask)
    (kept,) = rt.generate([prompt], dataclasses.replace(ask, min_tokens=16))
    assert cut.finish_reason == "stop" and len(cut.token_ids) < 16
    assert kept.finish_reason == "length" and kept.text == full.text
    with pytest.raises(ValueError, match="min_tokens must be an integer in"):
        _greedy(max_new_tokens=4, min_tokens=5)
    with pytest.raises(ValueError, match="min_tokens cannot combine with guided output"):
        _greedy(min_tokens=2, json_object=True)


def test_allowed_token_ids_equal_a_bias_on_them(rt: Runtime) -> None:
    """vLLM's allowed_token_ids: greedy picks the best allowed token at each step, what a +100
    bias on those tokens alone picks too; sampled tokens stay among them."""
    prompt = _prompt(8, seed=5)
    (full,) = rt.generate([prompt], _greedy(max_new_tokens=12, ignore_eos=True))
    allowed = sorted(set(full.token_ids[2:6]) | {7, 300, 301})
    assert full.token_ids[0] not in allowed  # the answer must change
    only = _greedy(max_new_tokens=12, ignore_eos=True, allowed_token_ids=allowed, logprobs=0)
    bias = _greedy(max_new_tokens=12, ignore_eos=True, logit_bias={t: 100.0 for t in allowed})
    (got, want) = rt.generate([prompt, prompt], [only, bias])
    assert got.token_ids == want.token_ids and set(got.token_ids) <= set(allowed)
    assert got.logprobs is not None and got.logprobs[0].logprob < -1.0  # the model's own
    sampled = SamplingParams(temperature=1.0, seed=3, max_new_tokens=12, ignore_eos=True,
                             allowed_token_ids=allowed)  # fmt: skip
    (out,) = rt.generate([prompt], sampled)
    assert set(out.token_ids) <= set(allowed) and len(set(out.token_ids)) > 1


def _bad_word(rt: Runtime, ids: list[int], n: int) -> tuple[int, str]:
    """(i, word): the first i > 0 where `word`, the text of ids[i : i + n], is held back as
    exactly those tokens."""
    tok = rt.tokenizer
    assert tok is not None
    for i in range(1, len(ids) - n):
        word = tok.decode(ids[i : i + n])
        if word.strip() and ids[i : i + n] in rt.engine._bad_word_ids(
            SamplingParams(bad_words=[word]), 0
        ):
            return i, word
    raise AssertionError(f"no {n}-token word of {ids} tokenizes back to its tokens")


def _holds(ids: list[int], word: list[int]) -> bool:
    return any(ids[i : i + len(word)] == word for i in range(len(ids)))


@pytest.mark.parametrize("n", [1, 2])
def test_bad_words_turn_the_answer_where_they_would_start(rt: Runtime, n: int) -> None:
    """vLLM's bad_words: the answer is greedy's up to the word's last token, which another
    takes; no form of the word appears in the answer."""
    (full,) = rt.generate([TEXT], _greedy(max_new_tokens=24, ignore_eos=True))
    i, word = _bad_word(rt, full.token_ids, n)
    (out,) = rt.generate([TEXT], _greedy(max_new_tokens=24, ignore_eos=True, bad_words=[word]))
    end = i + n - 1  # the word's last token
    assert out.token_ids[:end] == full.token_ids[:end]
    assert out.token_ids[end] != full.token_ids[end]
    for form in rt.engine._bad_word_ids(SamplingParams(bad_words=[word]), 0):
        assert not _holds(out.token_ids, form), (word, form)


def test_a_bad_word_is_held_back_inside_a_sentence(rt: Runtime) -> None:
    """A word is held back after a space too, also where the spaced form is fewer tokens (vLLM
    keeps it only at an equal count): " tea" is one token of this tokenizer, "tea" two."""
    tok = rt.tokenizer
    assert tok is not None
    bare, spaced = (tok.encode(w, add_special_tokens=False) for w in ("tea", " tea"))
    assert len(bare) == 2 and len(spaced) == 1
    forms = rt.engine._bad_word_ids(SamplingParams(bad_words=["  tea"]), 0)
    assert forms == [bare, spaced]
    only = _greedy(max_new_tokens=4, ignore_eos=True, allowed_token_ids=[*bare, *spaced, 9])
    (free,) = rt.generate([TEXT], only)
    assert spaced[0] in free.token_ids  # the model says " tea" when it may
    (held,) = rt.generate([TEXT], dataclasses.replace(only, bad_words=("tea",)))
    assert spaced[0] not in held.token_ids and not _holds(held.token_ids, bare)


def test_bans_that_leave_a_guided_step_no_token_fail_that_request_alone(rt: Runtime) -> None:
    """Guided output whose every next token the bans rule out: that request fails naming
    it, the one beside it ends as undisturbed, and the runtime serves on."""
    plain = _greedy(max_new_tokens=6, ignore_eos=True)
    (want,) = rt.generate([TEXT], plain)
    stuck = _greedy(max_new_tokens=6, guided_choice=("yes", "no"), allowed_token_ids=[7])
    handles = rt.add_requests([TEXT, TEXT], [stuck, plain])
    with pytest.raises(RuntimeError, match="no token is left to sample"):
        handles[0].result(timeout=60)
    assert handles[1].result(timeout=60).token_ids == want.token_ids
    (again,) = rt.generate([TEXT], plain)
    assert again.token_ids == want.token_ids


def test_bans_that_could_leave_no_token_are_refused(rt: Runtime) -> None:
    tok = rt.tokenizer
    assert tok is not None
    eos = tok.eos_token_ids[0]
    (word,) = tok.encode(" tea", add_special_tokens=False)
    cases: list[tuple[dict[str, Any], str]] = [
        (dict(allowed_token_ids=[VOCAB + 3]), "allowed_token_ids names token ids outside"),
        (dict(allowed_token_ids=[word], bad_words=["tea"]), "leave no token to pick"),
        (dict(allowed_token_ids=[eos], min_tokens=1), "leave no token to pick"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            rt.generate([TEXT], _greedy(max_new_tokens=4, **kwargs))
    with pytest.raises(ValueError, match="allowed_token_ids must name at least one"):
        SamplingParams(allowed_token_ids=[])
    with pytest.raises(ValueError, match="bad_words must be a list of words"):
        SamplingParams(bad_words=["ok", "  "])


def test_max_new_tokens_finishes_with_length(rt: Runtime) -> None:
    outs = rt.generate([[7], TEXT], _greedy(max_new_tokens=7, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [7, 7]
    assert [o.finish_reason for o in outs] == ["length", "length"]


def test_session_len_finishes_with_length(tiny_llama_dir: Path) -> None:
    with Runtime(model=str(tiny_llama_dir), session_len=12, **CPU32) as runtime:
        (out,) = runtime.generate([[5, 6, 7, 8]], _greedy(max_new_tokens=8, ignore_eos=True))
    assert len(out.token_ids) == 8 and out.finish_reason == "length"


@pytest.fixture
def eos_dir(tiny_llama_dir: Path, rt: Runtime, tmp_path: Path) -> tuple[Path, list[int], list[int]]:
    """A copy of the llama checkpoint whose config.json names the 4th greedy token as EOS."""
    prompt = _prompt(10, seed=9)
    (full,) = rt.generate([prompt], _greedy(max_new_tokens=12, ignore_eos=True))
    eos = full.token_ids[3]
    folder = Path(shutil.copytree(tiny_llama_dir, tmp_path / "ckpt"))
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["eos_token_id"] = [eos]
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder, prompt, full.token_ids


def test_eos_and_ignore_eos(eos_dir: tuple[Path, list[int], list[int]]) -> None:
    folder, prompt, full = eos_dir
    eos = full[3]
    k = full.index(eos)
    with Runtime(model=str(folder), session_len=128, **CPU32) as runtime:
        stops, ignores = runtime.generate(
            [prompt, prompt],
            [_greedy(max_new_tokens=12), _greedy(max_new_tokens=12, ignore_eos=True)],
        )
    assert stops.token_ids == full[: k + 1] and stops.finish_reason == "stop"
    assert ignores.token_ids == full and ignores.finish_reason == "length"


# -- per-prompt parameters -------------------------------------------------------------------


def test_per_prompt_sampling_params(rt: Runtime) -> None:
    prompts: list[Any] = [_prompt(4, seed=1), TEXT, _prompt(30, seed=2)]
    params = [
        _greedy(max_new_tokens=5, ignore_eos=True),
        _greedy(max_new_tokens=8, ignore_eos=True, logprobs=2),
        SamplingParams(max_new_tokens=6, temperature=0.9, top_k=20, seed=7, ignore_eos=True),
    ]
    outs = rt.generate(prompts, params)
    assert [len(o.token_ids) for o in outs] == [5, 8, 6]
    assert outs[0].logprobs is None and outs[2].logprobs is None
    assert outs[1].logprobs is not None and len(outs[1].logprobs) == 8
    assert all(len(lp.top) == 2 for lp in outs[1].logprobs)
    assert [lp.token_id for lp in outs[1].logprobs] == outs[1].token_ids
    # Each request in the mixed batch equals the same request run alone.
    for p, sp, out in zip(prompts, params, outs):
        (alone,) = rt.generate([p], sp)
        assert alone.token_ids == out.token_ids


# -- failures ------------------------------------------------------------------------------


@pytest.mark.parametrize("retries", [1, 0])
def test_runtime_serves_after_a_failed_step(tiny_llama_dir: Path, retries: int) -> None:
    """A step that raises once (its workers live): its request computes it again and ends as
    undisturbed; with request_retries=0 the request fails naming the error instead. Either
    way nothing is left held and the next generate() gets the undisturbed tokens."""
    params = _greedy(max_new_tokens=5, ignore_eos=True)
    with Runtime(
        model=str(tiny_llama_dir), session_len=64, request_retries=retries, **CPU32
    ) as runtime:
        (before,) = runtime.generate([[5, 6, 7]], params)
        executor = runtime.engine.executor
        assert executor is not None
        real_execute = executor.execute
        calls = 0

        def flaky(plan: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 2:  # its first decode
                raise RuntimeError("injected step failure")
            return real_execute(plan)

        executor.execute = flaky  # type: ignore[method-assign]
        if retries:
            (again,) = runtime.generate([[5, 6, 7]], params)
            assert again.token_ids == before.token_ids
        else:
            with pytest.raises(RuntimeError, match="injected step failure"):
                runtime.generate([[5, 6, 7]], params)
        assert runtime.engine.stats()["num_retried_steps"] == 1
        text = ServerMetrics(runtime.engine).render().decode()
        assert "dist_runtime:steps_retried_total 1.0" in text
        assert calls > 2 if retries else calls == 2
        assert not runtime.engine.scheduler.has_work()
        assert runtime.engine.blocks.num_free_blocks == runtime.engine.blocks.num_blocks
        (after,) = runtime.generate([[5, 6, 7]], params)
        assert after.token_ids == before.token_ids


def _break_device_at_step(runtime: Runtime, step: int) -> None:
    """Make the in-process worker's `step`-th execute from now raise a sticky CUDA error."""
    executor = runtime.engine.executor
    assert executor is not None
    runner = executor.worker.runner  # type: ignore[attr-defined]
    real_execute, calls = runner.execute, [0]

    def broken(plan: Any) -> Any:
        calls[0] += 1
        if calls[0] == step:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_execute(plan)

    runner.execute = broken


def test_a_step_naming_a_broken_device_replaces_the_worker(tiny_llama_dir: Path) -> None:
    """A step error that names a broken device (a sticky CUDA error would fail every later
    step on it) replaces the in-process worker, as a dead worker is, instead of being retried
    on it; the request goes on there with the undisturbed tokens."""
    params = _greedy(max_new_tokens=5, ignore_eos=True)
    with Runtime(model=str(tiny_llama_dir), session_len=64, **CPU32) as runtime:
        (before,) = runtime.generate([[5, 6, 7]], params)
        executor = runtime.engine.executor
        _break_device_at_step(runtime, 2)  # its first decode
        (again,) = runtime.generate([[5, 6, 7]], params)
        assert again.token_ids == before.token_ids
        assert runtime.num_worker_restarts == 1 and runtime.engine.executor is not executor
        assert runtime.engine.stats()["num_retried_steps"] == 0


@pytest.mark.parametrize("offers", [[99], [1, 1, 99]], ids=["more", "freed-late"])
def test_a_replacement_worker_keeps_the_kv_blocks_the_replaced_one_had(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, offers: list[int]
) -> None:
    """The replacement group gets as many KV blocks as the group it replaces: not more when
    more is free, and when less is free at first (a dead process's device memory is freed
    late) it waits for the rest."""
    from dist_runtime.engine import engine as engine_module
    from workers.model_runner import ModelRunner

    params = _greedy(max_new_tokens=5, ignore_eos=True)
    with Runtime(model=str(tiny_llama_dir), session_len=64, **CPU32) as runtime:
        (before,) = runtime.generate([[5, 6, 7]], params)
        had = runtime.engine.blocks.num_blocks
        queue = [had + d if d > 1 else d for d in offers]  # 1: short of what it had
        polls: list[int] = []

        def offered(self: ModelRunner, sharing: int = 1) -> int:
            polls.append(queue[0] if len(queue) == 1 else queue.pop(0))
            return polls[-1]

        monkeypatch.setattr(ModelRunner, "num_available_blocks", offered)
        monkeypatch.setattr(engine_module, "REPLACEMENT_KV_WAIT_S", 5.0)
        _break_device_at_step(runtime, 2)
        (again,) = runtime.generate([[5, 6, 7]], params)
        assert runtime.num_worker_restarts == 1
        assert again.token_ids == before.token_ids
        assert polls == [had + 99 if d > 1 else 1 for d in offers]
        assert runtime.engine.blocks.num_blocks == had


def test_a_replacement_worker_with_less_kv_fails_only_what_no_longer_fits(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory that stays short past the wait: the runtime goes on with the blocks there are;
    a request in flight that no longer fits fails with an error saying so, the one beside it
    ends undisturbed, and a new one too long for the smaller cache is refused at once."""
    from dist_runtime.engine import engine as engine_module
    from workers.model_runner import ModelRunner

    short, long = _greedy(max_new_tokens=5, ignore_eos=True), _greedy(max_new_tokens=8)
    long_prompt = _prompt(40, seed=3)
    with Runtime(model=str(tiny_llama_dir), session_len=64, **CPU32) as runtime:
        (before,) = runtime.generate([[5, 6, 7]], short)
        assert runtime.engine.blocks.num_blocks * runtime.engine.blocks.block_size >= 48
        monkeypatch.setattr(ModelRunner, "num_available_blocks", lambda self, sharing=1: 2)
        monkeypatch.setattr(engine_module, "REPLACEMENT_KV_WAIT_S", 0.6)
        _break_device_at_step(runtime, 2)
        h_short, h_long = runtime.add_requests([[5, 6, 7], long_prompt], [short, long])
        assert h_short.result(timeout=60).token_ids == before.token_ids
        with pytest.raises(WorkerError, match="KV cache holds 32 tokens"):
            h_long.result(timeout=60)
        assert runtime.num_worker_restarts == 1 and runtime.engine.blocks.num_blocks == 2
        with pytest.raises(ValueError, match="needs 48 tokens of KV cache but the cache holds 32"):
            runtime.add_requests([long_prompt], long)
        assert runtime.engine.blocks.num_free_blocks == 2


def test_prompts_waiting_on_a_failed_prefix_pass_start_without_it(tiny_llama_dir: Path) -> None:
    """A step that raises while the shared prefix of several prompts is computed once (the
    hidden prefix pass) fails that pass only (request_retries=0): the prompts waiting on it
    start at once and compute the prefix themselves, with the answers of an undisturbed run."""
    params = _greedy(max_new_tokens=4, ignore_eos=True)
    prefix = [5 + i % 50 for i in range(40)]
    prompts = [prefix + [60, 61], prefix + [70, 71]]
    kw: dict[str, Any] = dict(
        session_len=128,
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16),
        request_retries=0,
        **CPU32,
    )
    with Runtime(model=str(tiny_llama_dir), **kw) as runtime:
        want = [h.result(timeout=60).token_ids for h in runtime.add_requests(prompts, params)]
    with Runtime(model=str(tiny_llama_dir), **kw) as runtime:
        executor = runtime.engine.executor
        assert executor is not None
        real_execute, calls = executor.execute, [0]

        def flaky(plan: Any) -> Any:
            calls[0] += 1
            if calls[0] == 2:  # the prefix pass's second chunk
                raise RuntimeError("injected step failure")
            return real_execute(plan)

        executor.execute = flaky  # type: ignore[method-assign]
        handles = runtime.add_requests(prompts, params, share_prefix=True)
        assert [h.result(timeout=60).token_ids for h in handles] == want
        assert calls[0] > 2


def test_a_row_the_sampler_refuses_fails_its_request_only(tiny_llama_dir: Path) -> None:
    """The sampler raising for one request's row (its values broke it) fails that request,
    naming the error; the request sampled in the same steps gets the tokens it gets alone,
    and the engine goes on."""
    with Runtime(model=str(tiny_llama_dir), session_len=64, **CPU32) as runtime:
        good = _greedy(max_new_tokens=6, ignore_eos=True)
        bad = SamplingParams(max_new_tokens=6, ignore_eos=True, temperature=0.123)
        (alone,) = runtime.generate([[5, 6, 7]], good)
        executor = runtime.engine.executor
        runner = executor.worker.runner  # type: ignore[union-attr]
        real = runner.sampler.sample

        def picky(logits: Any, specs: list[Any], *args: Any) -> Any:
            if any(abs(s.temperature - 0.123) < 1e-9 for s in specs):
                raise ValueError("injected: this row's values break the sampler")
            return real(logits, specs, *args)

        runner.sampler.sample = picky
        handles = runtime.add_requests([[9, 9, 9], [5, 6, 7]], [bad, good])
        with pytest.raises(RuntimeError, match="could not be sampled .*injected"):
            handles[0].result(timeout=60)
        assert handles[1].result(timeout=60).token_ids == alone.token_ids
        assert runtime.engine.wait_idle(10)
        assert runtime.engine.blocks.num_free_blocks == runtime.engine.blocks.num_blocks
        assert runtime.generate([[5, 6, 7]], good)[0].token_ids == alone.token_ids


def test_a_draft_check_that_raises_fails_its_request_only(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With drafts (each request predicts its own answer): checking one request's draft
    raising fails that request only; the other, checking its draft in the same steps, gets
    its tokens."""
    import workers.model_runner as runner_module

    prompt = [5, 6, 7, 8] * 6
    spec = SchedulerConfig(num_speculative_tokens=4, draft_policy="fixed")
    with Runtime(model=str(tiny_llama_dir), session_len=64, scheduler=spec, **CPU32) as runtime:
        good = _greedy(max_new_tokens=8, ignore_eos=True)
        bad = _greedy(max_new_tokens=8, ignore_eos=True, repetition_penalty=1.0001)  # (a mark)
        (alone,) = runtime.generate([prompt], good)
        (bad_alone,) = runtime.generate([prompt[1:]], bad)
        good = dataclasses.replace(good, prediction=tuple(alone.token_ids))
        bad = dataclasses.replace(bad, prediction=tuple(bad_alone.token_ids))
        real = runner_module.verify_draft
        checked: list[float] = []

        def picky(logits: Any, draft: Any, sampling: Any, *args: Any) -> Any:
            checked.append(sampling.repetition_penalty)
            if sampling.repetition_penalty != 1.0:
                raise ValueError("injected: this draft's check breaks")
            return real(logits, draft, sampling, *args)

        monkeypatch.setattr(runner_module, "verify_draft", picky)
        handles = runtime.add_requests([prompt[1:], prompt], [bad, good])
        with pytest.raises(RuntimeError, match="could not be sampled .*injected"):
            handles[0].result(timeout=60)
        assert handles[1].result(timeout=60).token_ids == alone.token_ids
        assert set(checked) == {1.0, 1.0001}  # both drafted, in the same steps
        assert runtime.engine.wait_idle(10)
        assert runtime.engine.blocks.num_free_blocks == runtime.engine.blocks.num_blocks


# -- known bugs ------------------------------------------------------------------------------


def test_seeded_sampling_is_preemption_invariant(tiny_internlm2_dir: Path) -> None:
    prompts = [_prompt(n, seed=n) for n in (6, 9, 11, 14)]
    params = SamplingParams(max_new_tokens=20, temperature=0.8, seed=123, ignore_eos=True)
    tokens = {}
    for num_blocks in (12, 128):
        with Runtime(
            model=str(tiny_internlm2_dir),
            session_len=64,
            cache=CacheConfig(num_blocks=num_blocks, block_size=4),
            scheduler=SchedulerConfig(max_num_seqs=4),
            **CPU32,
        ) as runtime:
            tokens[num_blocks] = [o.token_ids for o in runtime.generate(prompts, params)]
            assert (runtime.engine.scheduler.num_preemptions > 0) == (num_blocks == 12)
    assert tokens[12] == tokens[128]


def test_dynamic_ntk_within_trained_length_is_unscaled(tmp_path: Path) -> None:
    """InternLM2.5 checkpoints declare dynamic NTK scaling; it changes nothing until a prompt
    passes max_position_embeddings."""
    shapes: dict[str, Any] = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_layers=2,
        num_heads=8,
        num_kv_heads=4,
        max_position_embeddings=64,
        seed=3,
    )
    plain = write_random_checkpoint(tmp_path / "plain", architecture="internlm2", **shapes)
    dynamic = write_random_checkpoint(
        tmp_path / "dynamic",
        architecture="internlm2",
        rope_scaling={"type": "dynamic", "factor": 2.5},
        **shapes,
    )
    params = SamplingParams(max_new_tokens=8, temperature=0.0, logprobs=3)
    prompt = list(range(10, 50))
    outs = []
    for folder in (plain, dynamic):
        with Runtime(model=str(folder), device="cpu", dtype="float32", session_len=64) as rt:
            outs.append(rt.generate([prompt], params)[0])
    assert outs[0].token_ids == outs[1].token_ids
    assert outs[0].logprobs == outs[1].logprobs


# -- progress lines --------------------------------------------------------------------------


def test_progress_counts_every_decoded_token(
    tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A short prompt prefilled first decodes while a long one is still prefilling (8-token
    steps): those tokens are decode tokens too, so the decode line counts every generated
    token but the one each prefill sampled."""
    scheduler = SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=8)
    with Runtime(
        model=str(tiny_llama_dir), session_len=128, scheduler=scheduler, **CPU32
    ) as runtime:
        capsys.readouterr()
        outs = runtime.generate(
            [_prompt(3, 1), _prompt(60, 2)], _greedy(max_new_tokens=20, ignore_eos=True), True
        )
    generated = sum(len(o.token_ids) for o in outs)
    assert generated == 40
    lines = capsys.readouterr().err.splitlines()
    decode = [line for line in lines if line.startswith("decode: ")]
    assert len(decode) == 1 and decode[0].startswith(f"decode: {generated - 2} tokens in "), lines


def test_an_important_request_goes_ahead_of_a_running_one(tiny_llama_dir: Path) -> None:
    """One sequence slot: a priority-0 arrival preempts the priority-5 request whose long
    prompt is being prefilled in small chunks, ends first, and the preempted one still ends
    with the tokens it gives alone (greedy)."""
    import time

    low_prompt, high_prompt = _prompt(1500, seed=21), _prompt(9, seed=22)
    with Runtime(
        model=str(tiny_llama_dir),
        session_len=2048,
        scheduler=SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=32),
        **CPU32,
    ) as runtime:
        (alone,) = runtime.generate([low_prompt], _greedy(max_new_tokens=8, ignore_eos=True))
        ended: list[str] = []
        (low,) = runtime.engine.add_requests(
            [low_prompt], [_greedy(max_new_tokens=8, ignore_eos=True, priority=5)]
        )
        low.add_done_callback(lambda _h: ended.append("low"))
        deadline = time.monotonic() + 30
        while not runtime.engine.scheduler.running:  # low's prefill has begun
            assert time.monotonic() < deadline
            time.sleep(0.001)
        (high,) = runtime.engine.add_requests(
            [high_prompt], [_greedy(max_new_tokens=4, ignore_eos=True, priority=0)]
        )
        high.add_done_callback(lambda _h: ended.append("high"))
        assert len(high.result(timeout=60).token_ids) == 4
        out = low.result(timeout=60)
        preemptions = runtime.engine.scheduler.num_preemptions
    assert ended == ["high", "low"] and preemptions >= 1
    assert out.token_ids == alone.token_ids


def test_a_shared_prefix_pass_runs_at_its_requests_priority(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job's document is read once by a hidden pass first: at the job's priority, so a
    low-priority batch does not read its documents ahead of interactive requests."""
    made: list[SamplingParams] = []
    make = rt.engine._make_sequence

    def spy(prompt: Any, params: SamplingParams, index: int) -> Any:
        made.append(params)
        return make(prompt, params, index)

    monkeypatch.setattr(rt.engine, "_make_sequence", spy)
    doc = _prompt(40, seed=30)
    handles = rt.engine.add_requests(
        [doc + [7], doc + [8]],
        [_greedy(max_new_tokens=2, priority=4), _greedy(max_new_tokens=2, priority=2)],
        share_prefix=True,
    )
    for h in handles:
        h.result(timeout=60)
    assert [p.priority for p in made] == [4, 2, 2]  # the two requests, then the pass
    assert made[2].max_new_tokens == 1


def test_generation_config_eos_ids_end_generation(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """generation_config.json's eos_token_id (where Llama 3 Instruct names <|eot_id|>, which its
    config.json may not) ends generation as config.json's EOS does."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    params = _greedy(max_new_tokens=8)
    with Runtime(model=str(folder), session_len=64, **CPU32) as rt:
        (free,) = rt.generate([[5, 6, 7]], params)
    stop = free.token_ids[3]
    assert stop not in free.token_ids[:3]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, stop]}))
    model = ModelConfig.from_pretrained(str(folder))
    assert stop in model.eos_token_ids and 2 in model.eos_token_ids
    with Runtime(model=str(folder), session_len=64, **CPU32) as rt:
        (out,) = rt.generate([[5, 6, 7]], params)
    assert out.token_ids == free.token_ids[:4] and out.finish_reason == "stop"
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": ["x"]}))
    with pytest.raises(ConfigError, match="eos_token_id must be token ids"):
        ModelConfig.from_pretrained(str(folder))


@pytest.mark.parametrize(
    ("saved", "key", "cuda", "cpu"),
    [
        ("float16", "torch_dtype", "float16", "float32"),
        ("bfloat16", "torch_dtype", "bfloat16", "float32"),
        ("float16", "dtype", "float16", "float32"),  # (transformers 5's key)
        ("torch.float16", "torch_dtype", "float16", "float32"),
        ("float32", "torch_dtype", "bfloat16", "float32"),
        ("auto", "torch_dtype", "bfloat16", "float32"),
        (None, None, "bfloat16", "float32"),
    ],
)
def test_auto_dtype_follows_the_checkpoints_half_type_on_cuda(
    saved: str | None, key: str | None, cuda: str, cpu: str
) -> None:
    """`dtype: auto` keeps a float16 checkpoint in float16 on CUDA (bfloat16 would round its
    weights to a 7-bit mantissa), bfloat16 for float32 or unnamed ones; CPU computes in fp32."""
    hf: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
    }
    if key is not None:
        hf[key] = saved
    model = ModelConfig.from_dict(hf)
    for device, want in (("cuda", cuda), ("cpu", cpu)):
        config = RuntimeConfig(model="m", device=device)
        assert config.resolved_dtype(model) == want
        assert auto_dtype(device, model) == want
        assert RuntimeConfig(model="m", device=device, dtype="float32").resolved_dtype(model) == (
            "float32"
        )
    assert RuntimeConfig(model="m", device="cuda").resolved_dtype() == "bfloat16"


def test_a_disk_tier_fingerprint_spells_linear_and_dynamic_scaling_as_it_always_has() -> None:
    """Directories written before llama3 / YaRN scaling were read keep their fingerprint: the
    two older types are spelt by type and factor alone (the RopeScaling repr of that time)."""
    assert _scaling_text(RopeScaling(type="dynamic", factor=2.0)) == (
        "RopeScaling(type='dynamic', factor=2.0)"
    )
    assert _scaling_text(RopeScaling(type="linear", factor=4.0)) == (
        "RopeScaling(type='linear', factor=4.0)"
    )
    assert _scaling_text(None) == "None"
    yarn = RopeScaling(type="yarn", factor=4.0, original_max_position_embeddings=32)
    assert "original_max_position_embeddings=32" in _scaling_text(yarn)
