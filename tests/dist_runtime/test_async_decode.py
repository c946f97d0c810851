"""Asynchronous decode (`DIST_RUNTIME_ASYNC_DECODE=1`): plain greedy decode steps are planned and
launched while the step before them runs, their token ids taken on the worker from that step's
picks. Checked on CPU through emulated decode graphs against the same requests decoded one step
at a time: the same tokens, log-probabilities and finish reasons, with requests that stop early
(a stop token, their length), arrive mid-decode, abort, or sample."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_runtime import Runtime, SamplingParams
from dist_runtime.protocol import LAST_SAMPLED
from tests.workers.test_cuda_graph import KW  # the same small emulated-graph runtime
from workers.model_runner import ModelRunner


def _prompts(n: int = 5) -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(4, 512, (k,), generator=gen).tolist() for k in (9, 30, 3, 17, 12)[:n]]


def _greedy(max_new: int, **kw: Any) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=max_new, temperature=0.0, ignore_eos=True, logprobs=0, **kw
    )


@pytest.fixture
def modes(monkeypatch: pytest.MonkeyPatch):
    """Runs a function once decoding step by step and once ahead; returns both results and
    the number of steps the engine launched ahead in each."""
    monkeypatch.setattr(ModelRunner, "_decode_graph_mode", lambda self: "emulate")

    def run(fn: Any, folder: Path) -> tuple[Any, Any, int]:
        out = []
        for flag in ("0", "1"):
            monkeypatch.setenv("DIST_RUNTIME_ASYNC_DECODE", flag)
            with Runtime(model=str(folder), **KW) as rt:
                out.append((fn(rt), rt.engine.num_steps_ahead))
        (sync, sync_ahead), (ahead, num_ahead) = out
        assert sync_ahead == 0
        return sync, ahead, num_ahead

    return run


def _same(a: list[Any], b: list[Any]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids
        assert x.finish_reason == y.finish_reason
        assert x.logprobs is not None and y.logprobs is not None
        assert [lp.logprob for lp in x.logprobs] == pytest.approx(
            [lp.logprob for lp in y.logprobs], abs=1e-4
        )


@pytest.mark.parametrize("on_device", [True, False])
def test_ahead_equals_step_by_step(
    tiny_llama_dir: Path, modes: Any, on_device: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lengths 20 / 5 / 12 / 1 / 16: the batch shrinks as requests reach their length (never
    planned past it); request 2 stops at a stop token, found only when its step is read, so a
    step planned ahead of it ran and its token is dropped. on_device False: the worker cannot
    take the ids from the device (no graph step), so it waits for the step before and fills
    them in from its picks."""
    if not on_device:
        staged = ModelRunner._launch_staged

        def host_ids(self: ModelRunner, plan: Any) -> Any:
            if any(s.token_ids == [LAST_SAMPLED] for s in plan.seqs):
                return None
            return staged(self, plan)

        monkeypatch.setattr(ModelRunner, "_launch_staged", host_ids)
    with Runtime(model=str(tiny_llama_dir), **KW) as rt:
        probe = rt.generate([_prompts()[1]], _greedy(12))[0].token_ids
    stop = probe[6]
    params = [_greedy(n) for n in (20, 5, 12, 1, 16)]
    params[1] = _greedy(12, stop_token_ids=[stop])
    sync, ahead, num_ahead = modes(lambda rt: rt.generate(_prompts(), params), tiny_llama_dir)
    _same(sync, ahead)
    assert ahead[1].finish_reason == "stop" and ahead[1].token_ids[-1] == stop
    assert len(ahead[1].token_ids) == probe.index(stop) + 1
    assert [len(o.token_ids) for o in ahead] == [20, len(ahead[1].token_ids), 12, 1, 16]
    assert num_ahead >= 10


def _arrival_abort_sampling(rt: Runtime) -> list[Any]:
    """Three greedy requests decode; the third is aborted after 4 tokens; a greedy and a
    sampling request arrive mid-decode. Outputs: the two kept, the late two, the aborted."""
    first = rt.add_requests(_prompts(3), [_greedy(24), _greedy(24), _greedy(24)])
    for seen, _ in enumerate(first[2], 1):  # let it decode a few steps
        if seen == 4:
            break  # leaving the iteration aborts request 2
    late = rt.add_requests([_prompts()[3]], [_greedy(10)])
    sampled = rt.add_requests(
        [_prompts()[4]], [SamplingParams(max_new_tokens=6, temperature=0.8, seed=5, logprobs=0)]
    )
    outs = [h.result() for h in first[:2] + late + sampled]
    return outs + [first[2].result()]


def _same_arrival_abort_sampling(sync: list[Any], ahead: list[Any]) -> None:
    _same(sync[:4], ahead[:4])
    # The abort lands after 4 tokens were seen, but how many more the engine sampled before it
    # handled the abort depends on timing in either mode.
    assert ahead[4].finish_reason == "abort" and len(ahead[4].token_ids) >= 4
    assert ahead[4].token_ids[:4] == sync[4].token_ids[:4]


def test_arrival_abort_and_sampling_mid_decode(tiny_llama_dir: Path, modes: Any) -> None:
    """A request that arrives while others decode ahead waits for the step in flight, then
    prefills; an abort drops the aborted request's token from a step planned ahead; a sampling
    request joins them (its draws are seeded by position, so they match step by step)."""
    sync, ahead, num_ahead = modes(_arrival_abort_sampling, tiny_llama_dir)
    _same_arrival_abort_sampling(sync, ahead)
    assert num_ahead > 0


def _sampling(max_new: int, **kw: Any) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new, ignore_eos=True, logprobs=0, **kw)


SAMPLED = [
    _sampling(14, temperature=0.8, seed=3),
    _greedy(9),
    _sampling(11, temperature=1.3, top_k=20, seed=4),
    _sampling(16, temperature=0.7, top_p=0.9, min_p=0.02, seed=5),
    _sampling(6, temperature=1.0),  # the engine draws its seed
]


@pytest.mark.parametrize("on_device", [True, False])
def test_sampling_ahead_equals_step_by_step(
    tiny_llama_dir: Path, modes: Any, on_device: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sampling requests (temperature, top-k, top-p, min-p; seeded or not) decode ahead beside
    a greedy one: on the device the draws are made from the graph's logits and the next step
    takes its ids from them; otherwise the worker fills them in from its picks. Either way
    the same tokens and log-probabilities as step by step: each draw's stream is seeded by
    (seed, position)."""
    import workers.model_runner as MR

    draws = [0]
    real = MR.sample_on_device

    def counted(*args: Any) -> Any:
        draws[0] += 1
        return real(*args)

    monkeypatch.setattr(MR, "sample_on_device", counted)
    if not on_device:
        monkeypatch.setattr(ModelRunner, "_launch_staged", lambda self, plan: None)
    # A request without a seed gets one from the engine's own seeded stream: the same in both.
    sync, ahead, num_ahead = modes(lambda rt: rt.generate(_prompts(), SAMPLED), tiny_llama_dir)
    _same(sync, ahead)
    assert [len(o.token_ids) for o in ahead] == [14, 9, 11, 16, 6]
    assert len({tuple(o.token_ids) for o in ahead}) == 5
    assert num_ahead >= 10
    assert (draws[0] >= num_ahead) if on_device else draws[0] == 0


@pytest.mark.parametrize(
    ("tp", "cp", "graphs"),
    [(2, 1, "emulate"), (1, 2, "emulate"), (2, 1, None)],
    ids=["tp2-graphs", "cp2-graphs", "tp2-eager"],
)
def test_ahead_over_ray(
    ray_cluster: Any,
    tiny_llama_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    tp: int,
    cp: int,
    graphs: str | None,
) -> None:
    """Over Ray each step's call is queued on the actors while the step before runs. At tp 2
    with decode graphs every rank takes the ids from its own graph's picks (every tp rank
    computes the same logits); at cp 2 (the graphs do not run the head) and without graphs the
    driver rank broadcasts them. Same tokens and finish reasons as step by step."""
    if graphs is None:
        monkeypatch.delenv("DIST_RUNTIME_DECODE_GRAPHS", raising=False)
    else:
        monkeypatch.setenv("DIST_RUNTIME_DECODE_GRAPHS", graphs)
    params = [_greedy(14), _sampling(5, temperature=0.9, top_p=0.95, seed=2), _greedy(9)]
    out, later = [], []
    for flag in ("0", "1"):
        monkeypatch.setenv("DIST_RUNTIME_ASYNC_DECODE", flag)
        with Runtime(model=str(tiny_llama_dir), tp=tp, cp=cp, **KW) as rt:
            outs = rt.generate(_prompts(3), params)
            executor = rt.engine.executor
            assert executor is not None
            broadcasts = [s["broadcast"]["calls"] for s in executor.comm_stats()]
            out.append((outs, rt.engine.num_steps_ahead, broadcasts))
            if graphs is not None and cp == 1:  # arrivals and an abort, queued on the actors
                later.append(_arrival_abort_sampling(rt))
    if later:
        _same_arrival_abort_sampling(*later)
    (sync, sync_ahead, sync_casts), (ahead, num_ahead, casts) = out
    _same(sync, ahead)
    assert [len(o.token_ids) for o in ahead] == [14, 5, 9]
    assert sync_ahead == 0 and sync_casts == [0] * (tp * cp)
    assert num_ahead >= 8
    if graphs is not None and cp == 1:
        assert casts == [0] * tp  # every rank read its own graph's picks
    else:
        assert casts == [num_ahead] * (tp * cp)


def test_guided_rows_wait_for_their_token(
    tiny_llama_dir: Path, modes: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A guided row's mask follows its last token, so no step with it is planned ahead: with
    greedy rows beside it, graphs (step by step or ahead) give what eager steps give, and its
    answer is on its schema."""
    schema = {"enum": ["yes", "no", "maybe"]}
    params = [
        _greedy(20),
        SamplingParams(max_new_tokens=40, json_schema=schema, logprobs=0),
        _greedy(12),
    ]
    sync, ahead, num_ahead = modes(lambda rt: rt.generate(_prompts(3), params), tiny_llama_dir)
    _same(sync, ahead)
    monkeypatch.setattr(ModelRunner, "_decode_graph_mode", lambda self: None)
    with Runtime(model=str(tiny_llama_dir), **KW) as rt:
        _same(rt.generate(_prompts(3), params), sync)
    assert ahead[1].finish_reason == "stop" and json.loads(ahead[1].text) in schema["enum"]
    assert num_ahead > 0  # the greedy rows went ahead once the guided one had ended


def test_min_tokens_rows_go_ahead_only_past_it(tiny_llama_dir: Path, modes: Any) -> None:
    """A row before its min_tokens needs the mask without its stop ids, so no step with it is
    planned ahead until then: ahead and step by step give the same tokens, none of the stop
    ids (here every odd one) among the first 6."""
    odd = list(range(1, 512, 2))
    params = [_greedy(16, stop_token_ids=odd, min_tokens=6), _greedy(20), _greedy(14)]
    sync, ahead, num_ahead = modes(lambda rt: rt.generate(_prompts(3), params), tiny_llama_dir)
    _same(sync, ahead)
    first = ahead[0].token_ids
    assert len(first) > 6 and not any(t % 2 for t in first[:6])
    assert num_ahead > 0
