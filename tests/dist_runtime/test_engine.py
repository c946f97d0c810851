"""The engine loop with many callers: shared steps, per-request streams, aborts, interleaved
prefill, continuous job admission, and failure of every handle when the engine cannot go on.

Overlap is asserted from the engine's step records and the steps each handle saw, not from
timings."""

from __future__ import annotations

import asyncio
import gc
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import dist_runtime.engine.engine as engine_module
from dist_runtime import JobState, Runtime, SamplingParams
from dist_runtime.config import CacheConfig, SchedulerConfig
from dist_runtime.engine.engine import EngineDeadError
from dist_runtime.engine.executor.base import WorkerError
from dist_runtime.text.tokenizer import Tokenizer

CPU32: dict[str, Any] = dict(device="cpu", dtype="float32")
BUDGET = 32
"""Tokens per step: a 600-token prompt prefills over many steps."""


def _params(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)


def _prompt(n: int, seed: int) -> list[int]:
    return [(seed * 37 + i * 11) % 500 + 3 for i in range(n)]


@pytest.fixture(scope="module")
def rt(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    with Runtime(
        model=str(tiny_llama_dir),
        session_len=2048,
        job_dir=str(tmp_path_factory.mktemp("jobs")),
        cache=CacheConfig(block_size=16, num_blocks=256),
        scheduler=SchedulerConfig(max_num_batched_tokens=BUDGET, max_num_seqs=16),
        **CPU32,
    ) as runtime:
        yield runtime


def _slow_steps(rt: Runtime, monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Every step takes at least `seconds`, so callers on other threads reliably meet it."""
    executor = rt.engine.executor
    assert executor is not None
    execute = executor.execute

    def slow(plan: Any) -> Any:
        time.sleep(seconds)
        return execute(plan)

    monkeypatch.setattr(executor, "execute", slow)


def test_two_threads_share_steps(rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = [_prompt(20, 1), _prompt(25, 2)]
    alone = [rt.generate([p], _params(12))[0].token_ids for p in prompts]
    _slow_steps(rt, monkeypatch, 0.01)
    first = rt.engine.stats()["num_steps"]
    barrier = threading.Barrier(2)
    outs: dict[int, list[int]] = {}

    def call(i: int) -> None:
        barrier.wait()
        outs[i] = rt.generate([prompts[i]], _params(12))[0].token_ids

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [outs[0], outs[1]] == alone  # batching changes nothing in the outputs
    steps = [r for r in rt.engine.recent_steps() if r.step_id >= first]
    assert max(len(r.request_ids) for r in steps) == 2  # both callers' requests in one step
    assert sum(len(r.request_ids) == 2 for r in steps) >= 6


def test_slow_stream_reader_delays_no_one(rt: Runtime) -> None:
    stream = rt.generate_stream(_prompt(10, 3), _params(40))
    pieces = [next(stream)]  # the stream's request runs
    (other,) = rt.add_requests([_prompt(12, 4)], _params(8))
    for piece in stream:  # a reader slower than the engine
        pieces.append(piece)
        time.sleep(0.05)
        if other.done:
            break
    out = other.result(timeout=60)
    assert len(out.token_ids) == 8
    assert other.first_step_id is not None and other.last_step_id is not None
    # One prefill step (12 tokens fit one step), then one step per token: no waiting.
    assert other.last_step_id - other.first_step_id <= 8 + 2
    stream.close()


def test_leaving_a_stream_frees_its_blocks(rt: Runtime) -> None:
    assert rt.engine.wait_idle(30)
    free = rt.engine.blocks.num_free_blocks
    for _ in rt.generate_stream(_prompt(40, 5), _params(100)):
        break  # the generator is closed when the loop's reference goes away
    gc.collect()
    assert rt.engine.wait_idle(30)
    assert rt.engine.blocks.num_free_blocks == free
    stream = rt.generate_stream(_prompt(40, 6), _params(100))
    next(stream)
    del stream  # garbage-collected without a close()
    gc.collect()
    assert rt.engine.wait_idle(30)
    assert rt.engine.blocks.num_free_blocks == free
    assert rt.engine.stats()["num_running"] == 0


def test_abort_ends_a_request_and_frees_its_blocks(rt: Runtime) -> None:
    assert rt.engine.wait_idle(30)
    free = rt.engine.blocks.num_free_blocks
    (handle,) = rt.add_requests([_prompt(50, 7)], _params(500))
    deltas = iter(handle)
    next(deltas)
    handle.abort()
    out = handle.result(timeout=30)
    assert out.finish_reason == "abort" and 1 <= len(out.token_ids) < 500
    assert rt.engine.wait_idle(30)
    assert rt.engine.blocks.num_free_blocks == free


def test_finish_listeners_run_before_the_caller_sees_the_end(rt: Runtime) -> None:
    """A slow listener (the server's metrics) has recorded a request, finished or aborted,
    before its handle is done: a caller that reads /metrics after its answer sees it counted."""
    seen: list[tuple[str, str | None, bool]] = []

    def listener(handle: Any, output: Any, error: BaseException | None) -> None:
        time.sleep(0.2)  # longer than the caller takes to read its result
        seen.append((handle.request_id, output and output.finish_reason, error is not None))

    rt.engine.add_finish_listener(listener)
    try:
        (done,) = rt.add_requests([_prompt(8, 9)], _params(3))
        assert done.result(timeout=30).finish_reason == "length"
        assert seen == [(done.request_id, "length", False)]
        (aborted,) = rt.add_requests([_prompt(8, 10)], _params(500))
        next(iter(aborted))
        aborted.abort()
        assert aborted.wait(30)
        assert seen[-1] == (aborted.request_id, "abort", False)
    finally:
        rt.engine._finish_listeners.remove(listener)


def test_short_request_runs_while_a_long_prompt_prefills(rt: Runtime) -> None:
    (long,) = rt.add_requests([_prompt(600, 8)], _params(2))
    deadline = time.monotonic() + 30
    while long.first_step_id is None:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    (short,) = rt.add_requests([_prompt(6, 9)], _params(3))
    out = short.result(timeout=60)
    assert len(out.token_ids) == 3
    long.result(timeout=60)
    assert short.first_step_id is not None and short.first_token_step_id is not None
    assert long.first_token_step_id is not None and short.last_step_id is not None
    assert short.last_step_id < long.first_token_step_id  # done before the prefill was
    assert short.first_token_step_id - short.first_step_id <= 1
    steps = {r.step_id: r for r in rt.engine.recent_steps()}
    admitted = steps[short.first_step_id]
    assert long.request_id in admitted.request_ids  # the prefill went on in the same step


def test_async_iteration(rt: Runtime) -> None:
    prompt = _prompt(15, 10)
    (want,) = rt.generate([prompt], _params(10))

    async def read() -> tuple[list[int], str | None]:
        (handle,) = rt.add_requests([prompt], _params(10))
        tokens, reason = [], None
        async for delta in handle:
            tokens += delta.token_ids
            reason = delta.finish_reason
        return tokens, reason

    assert asyncio.run(read()) == (want.token_ids, "length")


def test_job_starts_while_another_decodes(rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    _slow_steps(rt, monkeypatch, 0.005)
    doc = " ".join(f"Line {i}: the tide was {i % 7} metres." for i in range(12))
    long = rt.submit(doc, ["What was the tide?"], _params(150))
    deadline = time.monotonic() + 60
    while rt.status(long).tokens_generated == 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    short = rt.submit(doc + " The end.", ["Which line?"], _params(2))
    assert rt.status(short).prefill_tokens_total > 0  # planned at submit
    assert len(rt.result(short, timeout=60)) == 1
    assert rt.status(long).state is JobState.RUNNING  # no batch barrier
    assert len(rt.result(long, timeout=120)) == 1


def test_every_kind_of_request_goes_on_through_a_worker_failure(tiny_llama_dir: Path) -> None:
    """A worker failure while prompts prefill and others decode replaces the worker; every
    request (greedy, seeded sampling with penalties, top log-probabilities, prompt
    log-probabilities, a guided regex, a stop string, a waiting one) ends as in a run without
    the failure, its stream unbroken."""
    prompts = [_prompt(40, i) for i in range(6)] + [_prompt(200, 9)]
    sampled = dict(temperature=0.8, top_p=0.9, ignore_eos=True)
    params = [
        _params(12),
        SamplingParams(max_new_tokens=12, seed=5, presence_penalty=0.5, **sampled),  # type: ignore[arg-type]
        SamplingParams(max_new_tokens=12, seed=6, repetition_penalty=1.3, logprobs=3, **sampled),  # type: ignore[arg-type]
        SamplingParams(max_new_tokens=6, prompt_logprobs=2, ignore_eos=True),
        SamplingParams(max_new_tokens=12, guided_regex="[a-f]{2,6}", seed=7, temperature=1.0),
        SamplingParams(max_new_tokens=24, stop=("e",), seed=8, temperature=1.0),
        _params(8),  # admitted after the others: prefilling when the worker fails
    ]
    kw: dict[str, Any] = dict(
        session_len=512,
        cache=CacheConfig(block_size=16, num_blocks=128),
        scheduler=SchedulerConfig(max_num_batched_tokens=BUDGET, max_num_seqs=8),
        **CPU32,
    )
    with Runtime(model=str(tiny_llama_dir), **kw) as runtime:
        want = runtime.generate(prompts, params)
    with Runtime(model=str(tiny_llama_dir), **kw) as runtime:
        executor = runtime.engine.executor
        assert executor is not None
        execute, calls, running = executor.execute, [0], [0]

        def dying(plan: Any) -> Any:
            calls[0] += 1
            if calls[0] == 12:  # the short prompts decode, the long one prefills
                running[0] = len(runtime.engine.scheduler.running)
                assert any(len(s.token_ids) > 1 for s in plan.seqs), "no prefill at the failure"
                assert any(len(s.token_ids) == 1 for s in plan.seqs), "no decode at the failure"
                raise WorkerError("injected: worker rank 0 died")
            return execute(plan)

        executor.execute = dying  # type: ignore[method-assign]
        handles = runtime.add_requests(prompts, params)
        streams = [list(h) for h in handles]
        got = [h.result(timeout=60) for h in handles]
        assert runtime.engine.executor is not executor and calls[0] == 12
        stats = runtime.engine.stats()
        assert stats["num_worker_restarts"] == 1 and stats["num_resumed_requests"] == running[0]
        assert running[0] >= 4
    for i, (g, w, deltas) in enumerate(zip(got, want, streams, strict=True)):
        assert g.token_ids == w.token_ids, i
        assert (g.text, g.finish_reason) == (w.text, w.finish_reason), i
        # (a recomputed row sums in another batch: the same to float32 rounding)
        _close_logprobs(g.logprobs, w.logprobs, i)
        _close_logprobs(g.prompt_logprobs, w.prompt_logprobs, i)
        assert [t for d in deltas for t in d.token_ids] == g.token_ids, i
        assert "".join(d.text for d in deltas) == g.text, i
    assert want[5].finish_reason == "stop"  # (the stop string is met)


@pytest.mark.parametrize("kind", ["worker", "step"])
def test_a_request_that_fails_every_step_it_is_in_fails_alone(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """request_retries=1 (the default): a request whose every step fails (its worker dies, or
    the step raises) is counted with the six requests beside it at the first failure; the
    seven then run one at a time past the point where they failed (the six beside whatever
    else runs), so it is counted alone at its second failure and fails, naming the error,
    while the six end as in a run without it. The engine serves the next request."""
    poison = [499, 498, 497, 5, 6]
    prompts = [_prompt(30, i) for i in range(6)]
    sampled = dict(temperature=0.9, top_p=0.9, ignore_eos=True)
    params = [_params(8)] * 3
    params += [SamplingParams(max_new_tokens=8, seed=i, **sampled) for i in range(3)]  # type: ignore[arg-type]
    kw: dict[str, Any] = dict(
        session_len=128,
        scheduler=SchedulerConfig(max_num_batched_tokens=8 * BUDGET, max_num_seqs=8),
        **CPU32,
    )
    with Runtime(model=str(tiny_llama_dir), **kw) as rt:
        want = rt.generate(prompts, params)
    create, engine, together = engine_module.create_executor, list[Any](), list[int]()
    error = WorkerError if kind == "worker" else RuntimeError

    def poisoned(config: Any, replacing: bool = False) -> Any:
        executor = create(config, replacing)
        execute = executor.execute

        def step(plan: Any) -> Any:
            seqs = [engine[0].scheduler.get(s.seq_id) for s in plan.seqs]
            together.append(sum(s.suspect_at is not None for s in seqs))
            if any(s.prompt_token_ids[:3] == poison[:3] for s in seqs):
                raise error("injected: the poison's step")
            return execute(plan)

        executor.execute = step  # type: ignore[method-assign]
        return executor

    monkeypatch.setattr(engine_module, "create_executor", poisoned)
    with Runtime(model=str(tiny_llama_dir), **kw) as rt:
        engine.append(rt.engine)
        *handles, bad = rt.add_requests([*prompts, poison], [*params, _params(4)])
        message = (
            r"dropped this request after 2 failed steps counted against it \(request_retries=1\)"
            if kind == "worker"
            else "the poison's step"
        )
        with pytest.raises(error, match=message):
            bad.result(timeout=60)
        got = [h.result(timeout=60) for h in handles]
        stats = rt.engine.stats()
        if kind == "worker":
            assert rt.num_worker_restarts == 2 and stats["num_retried_steps"] == 0
        else:
            assert rt.num_worker_restarts == 0 and stats["num_retried_steps"] == 2
        assert together[0] == 0 and max(together) == 1  # suspects ran one at a time
        assert sum(t == 1 for t in together) >= 7
        (out,) = rt.generate([[5, 6, 7]], _params(4))
        assert len(out.token_ids) == 4
        assert rt.engine.wait_idle(30)
        assert rt.engine.blocks.num_free_blocks == rt.engine.blocks.num_blocks
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


def _die_at_step(executor: Any, n: int) -> None:
    """The executor's n-th step from now raises a WorkerError (its worker "died")."""
    execute, calls = executor.execute, [0]

    def dying(plan: Any) -> Any:
        calls[0] += 1
        if calls[0] == n:
            raise WorkerError("injected: worker rank 0 died")
        return execute(plan)

    executor.execute = dying


def test_health_says_replacing_workers_while_a_group_is_replaced(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a failed worker group is replaced, /health answers 503 "replacing workers" (a
    load balancer routes elsewhere; requests queue meanwhile) and the metric says so; then
    the request goes on and /health is 200 again."""
    from dist_runtime.server.app import ServerSettings, create_app
    from dist_runtime.server.batch_lines import call

    started, release = threading.Event(), threading.Event()
    create = engine_module.create_executor

    def slow_replacement(config: Any, replacing: bool = False) -> Any:
        if replacing:
            started.set()
            release.wait(60)
        return create(config, replacing)

    def get(app: Any, path: str) -> tuple[int, str]:
        status, body = asyncio.run(call(app, path, b"", method="GET"))
        return status, body.decode()

    monkeypatch.setattr(engine_module, "create_executor", slow_replacement)
    with Runtime(model=str(tiny_llama_dir), session_len=128, **CPU32) as rt:
        app = create_app(rt, ServerSettings(served_model_name="m"))
        executor = rt.engine.executor
        assert executor is not None
        (want,) = rt.generate([[5, 6, 7]], _params(6))
        _die_at_step(executor, 2)
        (handle,) = rt.add_requests([[5, 6, 7]], [_params(6)])
        assert started.wait(30)
        assert get(app, "/health") == (503, '{"status":"replacing workers"}')
        assert "dist_runtime:engine_replacing_workers 1.0" in get(app, "/metrics")[1]
        release.set()
        assert handle.result(timeout=60).token_ids == want.token_ids
        assert get(app, "/health") == (200, '{"status":"ok"}')
        assert "dist_runtime:engine_replacing_workers 0.0" in get(app, "/metrics")[1]


def _close_logprobs(got: list[Any] | None, want: list[Any] | None, i: Any) -> None:
    assert (got is None) == (want is None), i
    for g, w in zip(got or [], want or [], strict=True):
        assert (g is None) == (w is None), i
        if g is not None:
            assert g.token_id == w.token_id and list(g.top) == list(w.top), i
            assert g.logprob == pytest.approx(w.logprob, abs=1e-4), i
            assert list(g.top.values()) == pytest.approx(list(w.top.values()), abs=1e-4), i


_FAILURE_CROWD = (
    range(int(os.environ["FAILURE_CROWD_SEEDS"])) if "FAILURE_CROWD_SEEDS" in os.environ else [0, 1]
)


@pytest.mark.parametrize("seed", _FAILURE_CROWD)
def test_a_crowd_through_worker_failures_gets_the_answers_of_none(
    tiny_llama_dir: Path, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random requests (greedy; seeded sampling with penalties; log-probabilities; prompt
    log-probabilities; stop strings; min_tokens; guided regexes; thinking budgets; priorities;
    shared prefixes behind a hidden prefix pass) from three threads on a tight cache
    (preemptions), with speculative decoding on odd seeds and a host tier on every third: the
    worker dies or the step raises at random steps, up to three times, and every request ends
    as in a run without failures.
    Offline: `FAILURE_CROWD_SEEDS=150 pytest -k crowd_through` (150 seeds clean)."""
    rng = random.Random(seed)
    docs = [_prompt(rng.randint(30, 90), 40 + d) for d in range(2)]
    docs.append((_prompt(7, 43) * 13)[: rng.randint(30, 90)])  # repeats: prompt lookup drafts
    palette: list[dict[str, Any]] = [
        dict(temperature=0.0),
        dict(temperature=0.9, top_p=0.9, presence_penalty=0.4),
        dict(temperature=0.7, top_k=20, repetition_penalty=1.2, frequency_penalty=0.3),
        dict(temperature=0.0, logprobs=2),
        dict(temperature=0.0, prompt_logprobs=1),
        dict(temperature=1.0, stop=("e", "a ")),
        dict(temperature=0.8, min_tokens=3),
        dict(temperature=1.0, guided_regex="[a-h]{1,5}( [0-9]{1,3})?"),
        dict(temperature=0.0, thinking_budget=2),  # (its prompt opens the thinking)
        dict(temperature=0.9, thinking_budget=0),
    ]
    tokenizer = Tokenizer.from_folder(tiny_llama_dir)
    assert tokenizer is not None
    think = tokenizer.encode("<think>", add_special_tokens=False)
    asks: list[tuple[list[list[int]], list[SamplingParams], bool]] = []
    for i in range(10):
        doc = rng.choice(docs)
        n = rng.choice([1, 1, 2, 3])  # several questions about one document share its prefix
        prompts = [doc + _prompt(rng.randint(1, 8), 300 + 10 * i + k) for k in range(n)]
        params = [
            SamplingParams(
                max_new_tokens=rng.randint(3, 12),
                seed=rng.randrange(1000),
                ignore_eos=True,
                priority=rng.choice([0, 0, 1]),
                **rng.choice(palette),
            )
            for _ in prompts
        ]
        prompts = [
            p + think if sp.thinking_budget is not None else p for p, sp in zip(prompts, params)
        ]
        asks.append((prompts, params, n > 1 and rng.random() < 0.7))
    host_gb = 24 * 2 * 2 * 4 * 4 * 8 * 4 / 2**30 if seed % 3 == 0 else 0.0
    kw: dict[str, Any] = dict(
        model=str(tiny_llama_dir),
        session_len=256,
        cache=CacheConfig(block_size=4, num_blocks=60, host_kv_cache_gb=host_gb),
        scheduler=SchedulerConfig(
            max_num_seqs=4, max_num_batched_tokens=16, num_speculative_tokens=3 * (seed % 2)
        ),
        request_retries=5,
        **CPU32,
    )

    def run(rt: Runtime) -> dict[tuple[int, int], Any]:
        got: dict[tuple[int, int], Any] = {}

        def caller(part: list[int]) -> None:
            for i in part:
                prompts, params, share = asks[i]
                handles = rt.add_requests(prompts, params, share_prefix=share)
                time.sleep(rng.random() * 0.02)
                for k, h in enumerate(handles):
                    got[i, k] = h.result(timeout=120)

        threads = [
            threading.Thread(target=caller, args=(list(range(len(asks)))[k::3],)) for k in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
            assert not t.is_alive()
        return got

    with Runtime(**kw) as plain:
        want = run(plain)
    failures = [rng.randint(1, 3)]
    create = engine_module.create_executor

    def failing_executor(config: Any, replacing: bool = False) -> Any:
        executor = create(config, replacing)
        execute, countdown = executor.execute, [rng.randint(2, 40)]

        def step(plan: Any) -> Any:
            countdown[0] -= 1
            if failures[0] and countdown[0] <= 0 and plan.seqs:
                failures[0] -= 1
                if rng.random() < 0.5:
                    raise WorkerError("injected: worker rank 0 died")
                countdown[0] = rng.randint(2, 40)  # (the same workers go on)
                raise RuntimeError("injected: the step raised")
            return execute(plan)

        executor.execute = step  # type: ignore[method-assign]
        return executor

    monkeypatch.setattr(engine_module, "create_executor", failing_executor)
    with Runtime(**kw) as rt:
        got = run(rt)
        stats = rt.engine.stats()
        assert rt.engine.wait_idle(30) and rt.engine.blocks.num_free_blocks == 60
    assert stats["num_worker_restarts"] + stats["num_retried_steps"] >= 1
    assert sorted(got) == sorted(want)
    for key, w in want.items():
        g = got[key]
        assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text, w.finish_reason), key
        _close_logprobs(g.logprobs, w.logprobs, key[0])
        _close_logprobs(g.prompt_logprobs, w.prompt_logprobs, key[0])


def test_dead_engine_fails_every_handle(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers fail and no new group can start: waiting callers get the error, no hang."""
    runtime = Runtime(model=str(tiny_llama_dir), session_len=512, **CPU32)
    try:
        executor = runtime.engine.executor
        assert executor is not None

        def no_devices(config: Any, replacing: bool = False) -> Any:
            raise RuntimeError("injected: no devices left")

        _die_at_step(executor, 5)
        monkeypatch.setattr(engine_module, "create_executor", no_devices)
        errors: list[BaseException] = []

        def call(i: int) -> None:
            try:
                runtime.generate([_prompt(8, i)], _params(50))
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
            assert not t.is_alive()
        assert len(errors) == 3
        assert all(isinstance(e, EngineDeadError) for e in errors), errors
        assert "no devices left" in str(errors[0])
        with pytest.raises(RuntimeError, match=r"replacing failed workers failed"):
            runtime.generate([[1, 2, 3]], _params(2))
    finally:
        runtime.shutdown()


@pytest.mark.usefixtures("heap_freeze")
def test_heap_is_frozen_while_the_engine_runs(tiny_llama_dir: Path) -> None:
    """What exists once the workers run stays out of full collections (a 50-75 ms pause each
    on the engine thread of the demo model otherwise), and is collectable again after
    shutdown."""
    import gc

    gc.unfreeze()
    with Runtime(model=str(tiny_llama_dir), session_len=256, **CPU32) as runtime:
        frozen = gc.get_freeze_count()
        assert frozen > 10_000
        runtime.generate(["a b"], _params(4))
    assert gc.get_freeze_count() == 0


def test_prefills_filling_the_cache_between_them_both_finish(tiny_llama_dir: Path) -> None:
    """A 120- and a 48-token prompt in a 128-token KV cache, 32 tokens a step: admitted
    together, they come to hold every block between them, each short of one more. The earlier
    takes the later one's block instead of the engine failing both ("the KV cache is too
    small"), and each answer equals the one it gets alone."""
    with Runtime(
        model=str(tiny_llama_dir),
        session_len=256,
        cache=CacheConfig(block_size=16, num_blocks=8, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_batched_tokens=BUDGET, max_num_seqs=2),
        **CPU32,
    ) as small:
        prompts = [_prompt(120, 21), _prompt(48, 22)]
        together = [h.result(timeout=60) for h in small.add_requests(prompts, _params(4))]
        alone = [small.generate([p], _params(4))[0] for p in prompts]
        assert [o.token_ids for o in together] == [o.token_ids for o in alone]
        assert small.engine.stats()["num_preemptions"] >= 1


@pytest.mark.parametrize("seed", range(3))
def test_a_random_crowd_gets_the_answers_each_gets_alone(tiny_llama_dir: Path, seed: int) -> None:
    """Many callers at once on a tight KV cache (preemptions, prefix sharing, prefills holding
    blocks), with priorities, tenants sharing fairly and aborts: every request not aborted ends
    with the tokens it gets alone, and every block comes back."""
    rng = random.Random(seed)
    docs = [_prompt(rng.randint(20, 150), 30 + d) for d in range(3)]
    asks = []
    for i in range(24):
        prompt = rng.choice(docs) + _prompt(rng.randint(1, 20), 100 + i)
        params = SamplingParams(max_new_tokens=rng.randint(1, 12), temperature=0.0,
                                ignore_eos=True, priority=rng.randint(0, 2))  # fmt: skip
        asks.append((prompt, params, rng.choice(["a", "b", None]), rng.random() < 0.15))
    with Runtime(
        model=str(tiny_llama_dir),
        session_len=256,
        cache=CacheConfig(block_size=16, num_blocks=24),
        scheduler=SchedulerConfig(max_num_batched_tokens=BUDGET, max_num_seqs=6),
        **CPU32,
    ) as rt:
        results: dict[int, Any] = {}

        def caller(mine: list[int]) -> None:
            for i in mine:
                prompt, params, tenant, abort = asks[i]
                (h,) = rt.engine.add_requests([prompt], [params], tenant=tenant)
                if abort:
                    time.sleep(rng.random() * 0.01)
                    h.abort()
                results[i] = h
                time.sleep(rng.random() * 0.005)

        threads = [threading.Thread(target=caller, args=(list(range(k, 24, 3)),))
                   for k in range(3)]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        outs = {i: h.result(timeout=120) for i, h in results.items()}
        assert rt.engine.wait_idle(30)
        for i, (prompt, params, _, aborted) in enumerate(asks):
            if aborted:
                continue
            alone = rt.generate([prompt], params)[0]
            assert outs[i].token_ids == alone.token_ids, i
        assert rt.engine.blocks.num_free_blocks == 24
