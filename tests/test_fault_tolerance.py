"""Dead and hung workers through Ray on gloo: detection, a fresh worker group, job retries.

Faults are injected from outside the workers' code: `ray.kill` of an actor, `os._exit` run
inside one (`__ray_call__`), and a step replaced by a sleep. Steps are slowed down in the
driver where a test must hit a window (mid-prefill, mid-decode).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dist_runtime import JobFailedError, JobState, Runtime, SamplingParams
from dist_runtime.config import CacheConfig, SchedulerConfig
from dist_runtime.engine.executor.base import WorkerError
from dist_runtime.server.metrics import ServerMetrics

DOC = " ".join(
    f"Entry {i}: the ferry left pier {i % 5} at {6 + i % 12} o'clock." for i in range(40)
)
QUESTIONS = ["Which pier did entry 7 use?", "When did entry 2 leave?"]
PARAMS = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
KW: dict[str, Any] = dict(
    device="cpu",
    dtype="float32",
    session_len=2048,
    cache=CacheConfig(block_size=16, num_blocks=256),
    scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16),
)


@pytest.fixture(scope="module")
def expected(tiny_llama_dir: Path) -> list[str]:
    """The undisturbed answers (tp=1 in-process: the same greedy tokens as tp=2)."""
    with Runtime(model=str(tiny_llama_dir), **KW) as rt:
        return rt.ask(DOC, QUESTIONS, PARAMS)


@pytest.fixture
def rt(ray_cluster: Any, tiny_llama_dir: Path, tmp_path: Path) -> Iterator[Runtime]:
    with Runtime(
        model=str(tiny_llama_dir),
        tp=2,
        job_dir=str(tmp_path / "jobs"),
        monitor_interval_s=0.5,
        **KW,
    ) as runtime:
        yield runtime


def _slow_steps(rt: Runtime, seconds: float) -> None:
    """Slow down the current worker group's steps (a replacement group runs at full speed),
    run one at a time or launched ahead."""
    executor = rt.engine.executor
    assert executor is not None
    execute, collect = executor.execute, executor.collect

    def slow(plan: Any) -> Any:
        time.sleep(seconds)
        return execute(plan)

    def slow_collect() -> Any:
        time.sleep(seconds)
        return collect()

    executor.execute = slow  # type: ignore[method-assign]
    executor.collect = slow_collect  # type: ignore[method-assign]


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _kill_rank1(rt: Runtime, how: str) -> None:
    import ray

    assert rt.engine.executor is not None
    actor = rt.engine.executor.actors[1]  # type: ignore[attr-defined]
    if how == "ray.kill":
        ray.kill(actor, no_restart=True)
    else:  # the process exits from inside, between two steps
        actor.__ray_call__.remote(lambda self: os._exit(1))


# Each way of dying and each phase runs by default once; the other two pairs on demand (-m slow).
@pytest.mark.parametrize(
    ("phase", "how"),
    [
        ("prefill", "ray.kill"),
        ("decode", "os._exit"),
        pytest.param("prefill", "os._exit", marks=pytest.mark.slow),
        pytest.param("decode", "ray.kill", marks=pytest.mark.slow),
    ],
)
def test_job_survives_a_dead_worker(rt: Runtime, expected: list[str], how: str, phase: str) -> None:
    _slow_steps(rt, 0.05)
    job_id = rt.submit(DOC, QUESTIONS, PARAMS)
    if phase == "prefill":
        _wait(lambda: rt.status(job_id).prefill_tokens_done > 0, 60, "prefill to start")
    else:
        _wait(lambda: rt.status(job_id).tokens_generated > 0, 120, "decode to start")
    _kill_rank1(rt, how)
    assert rt.result(job_id, timeout=180) == expected
    status = rt.status(job_id)
    # Its requests went on on the new workers: the job ran once.
    assert status.state is JobState.DONE and status.attempts == 1
    assert rt.num_worker_restarts == 1 and rt.engine.stats()["num_resumed_requests"] >= 1


@pytest.mark.slow  # (the job runner's requeue on a failed request is also in the next test)
def test_job_is_requeued_when_its_requests_are_not_retried(
    ray_cluster: Any, tiny_llama_dir: Path, tmp_path: Path, expected: list[str]
) -> None:
    """request_retries=0: a worker failure fails the requests of its step, and the job runner
    runs the job again."""
    with Runtime(
        model=str(tiny_llama_dir),
        tp=2,
        job_dir=str(tmp_path / "jobs"),
        monitor_interval_s=0.5,
        request_retries=0,
        **KW,
    ) as rt:
        _slow_steps(rt, 0.05)
        job_id = rt.submit(DOC, QUESTIONS, PARAMS)
        _wait(lambda: rt.status(job_id).tokens_generated > 0, 120, "decode to start")
        _kill_rank1(rt, "os._exit")
        assert rt.result(job_id, timeout=180) == expected
        status = rt.status(job_id)
        assert status.state is JobState.DONE and status.attempts == 2  # one retry
        assert rt.num_worker_restarts == 1 and rt.engine.stats()["num_resumed_requests"] == 0


def test_job_survives_a_dead_worker_with_steps_launched_ahead(
    ray_cluster: Any,
    tiny_llama_dir: Path,
    tmp_path: Path,
    expected: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With decode steps queued on the actors ahead of the one being read
    (`DIST_RUNTIME_ASYNC_DECODE=1`), a worker that exits mid-decode fails the wait on the step
    in flight; the engine replaces the group, drops the step queued behind it with the old
    group, and the job's requests go on there with the undisturbed answers."""
    monkeypatch.setenv("DIST_RUNTIME_ASYNC_DECODE", "1")
    with Runtime(
        model=str(tiny_llama_dir),
        tp=2,
        job_dir=str(tmp_path / "jobs"),
        monitor_interval_s=0.5,
        **KW,
    ) as rt:
        executor = rt.engine.executor
        assert executor is not None and executor.runs_ahead()
        collect = executor.collect

        def slow() -> Any:
            time.sleep(0.05)
            return collect()

        executor.collect = slow  # type: ignore[method-assign]
        job_id = rt.submit(DOC, QUESTIONS, PARAMS)
        _wait(lambda: rt.engine.num_steps_ahead > 0, 120, "a decode step launched ahead")
        _kill_rank1(rt, "os._exit")
        assert rt.result(job_id, timeout=180) == expected
        status = rt.status(job_id)
        assert status.state is JobState.DONE and status.attempts == 1
        assert rt.num_worker_restarts == 1 and rt.engine.stats()["num_resumed_requests"] == 2
        replaced = rt.engine.executor
        assert replaced is not None and replaced is not executor and replaced.runs_ahead()


def test_job_failing_on_every_attempt_ends_failed_and_others_complete(
    ray_cluster: Any, tiny_llama_dir: Path, tmp_path: Path, expected: list[str], monkeypatch: Any
) -> None:
    import dist_runtime.engine.engine as engine_module

    chaos = threading.Event()
    chaos.set()
    create = engine_module.create_executor

    def faulty_executor(config: Any, replacing: bool = False) -> Any:
        """Every new group loses rank 1 at its third step while chaos is on."""
        executor = create(config, replacing)
        execute, launch, steps = executor.execute, executor.launch, [0]

        def chaos_step() -> None:
            steps[0] += 1
            if chaos.is_set() and steps[0] == 3:
                import ray

                ray.kill(executor.actors[1], no_restart=True)  # type: ignore[attr-defined]

        def step(plan: Any) -> Any:
            chaos_step()
            return execute(plan)

        def launched(plan: Any) -> None:  # steps launched ahead
            chaos_step()
            launch(plan)

        executor.execute = step  # type: ignore[method-assign]
        executor.launch = launched  # type: ignore[method-assign]
        return executor

    monkeypatch.setattr(engine_module, "create_executor", faulty_executor)
    with Runtime(
        model=str(tiny_llama_dir),
        tp=2,
        job_dir=str(tmp_path / "jobs"),
        max_job_attempts=2,
        request_retries=0,  # (each attempt then ends at its first failure)
        **KW,
    ) as rt:
        doomed = rt.submit(DOC, QUESTIONS[:1], PARAMS)  # (one request: one failure an attempt)
        with pytest.raises(JobFailedError, match=r"worker failure on each of 2 attempts; last: "):
            rt.result(doomed, timeout=180)
        assert rt.status(doomed).attempts == 2
        chaos.clear()
        fine = rt.submit(DOC, QUESTIONS, PARAMS)
        assert rt.result(fine, timeout=180) == expected
        assert rt.status(fine).attempts == 1


def test_requests_running_at_a_worker_failure_go_on_with_their_tokens(rt: Runtime) -> None:
    """A worker dies while a greedy and a seeded sampling request (with a penalty, so the new
    workers need its token history) decode: both go on on the new group, their streams
    unbroken, with the tokens of a run without the failure."""
    prompts: list[Any] = [[5, 6, 7, 8, 9] * 10, [11, 12, 13] * 7]
    params = [
        SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True),
        SamplingParams(
            max_new_tokens=24, temperature=0.9, seed=7, repetition_penalty=1.3, ignore_eos=True
        ),
    ]
    want = [o.token_ids for o in rt.generate(prompts, params)]
    assert want[0] != want[1]
    _slow_steps(rt, 0.05)
    handles = rt.add_requests(prompts, params)
    _wait(lambda: handles[1].num_output_tokens >= 4, 120, "decode to start")
    _kill_rank1(rt, "ray.kill")
    streamed = [[t for delta in h for t in delta.token_ids] for h in handles]
    assert streamed == want
    assert [h.result().token_ids for h in handles] == want
    stats = rt.engine.stats()
    assert rt.num_worker_restarts == 1 and stats["num_resumed_requests"] == 2
    text = ServerMetrics(rt.engine).render().decode()
    assert "dist_runtime:worker_restarts_total 1.0" in text
    assert "dist_runtime:requests_resumed_total 2.0" in text


def test_a_prefill_cut_by_a_worker_failure_goes_on_from_the_disk_tier(
    ray_cluster: Any, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """With a disk tier, the blocks a long prefill wrote before a worker died are read back by
    the new group: the request goes on from there rather than from its first token."""
    prompt: list[Any] = [[3 + (i * 7) % 90 for i in range(400)]]
    params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    with Runtime(model=str(tiny_llama_dir), **KW) as plain:
        (want,) = plain.generate(prompt, params)
    cache = CacheConfig(block_size=16, num_blocks=256, kv_cache_dir=str(tmp_path / "kv"))
    with Runtime(model=str(tiny_llama_dir), tp=2, **{**KW, "cache": cache}) as rt:
        _slow_steps(rt, 0.05)
        (handle,) = rt.add_requests(prompt, params)
        _wait(lambda: handle.num_computed_prompt_tokens >= 240, 120, "half the prefill")
        _kill_rank1(rt, "ray.kill")
        assert handle.result(timeout=120).token_ids == want.token_ids
        stats = rt.engine.stats()
        assert rt.num_worker_restarts == 1 and stats["num_resumed_requests"] == 1
        # the blocks written before the failure (all but those still queued) were read back
        assert stats["prefix_cache_disk_hit_tokens"] >= 160
        assert stats["num_prompt_tokens_computed"] <= 400 + 400 - 160


def test_a_worker_dead_between_requests_is_replaced_before_the_next(rt: Runtime) -> None:
    prompt = [[5, 6, 7, 8, 9] * 10]
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    (want,) = rt.generate(prompt, params)
    _kill_rank1(rt, "ray.kill")
    _wait(lambda: getattr(rt.engine.executor, "dead", None) is not None, 10, "the monitor")
    assert "worker rank 1 died" in str(getattr(rt.engine.executor, "dead", ""))
    (again,) = rt.generate(prompt, params)
    assert again.token_ids == want.token_ids
    assert rt.num_worker_restarts == 1 and not rt.engine.scheduler.has_work()


def test_generate_raises_when_requests_are_not_retried(
    ray_cluster: Any, tiny_llama_dir: Path
) -> None:
    """request_retries=0: the requests of the step a worker fails in fail with WorkerError,
    and the new group serves the next call."""
    with Runtime(model=str(tiny_llama_dir), tp=2, request_retries=0, **KW) as rt:
        prompt = [[5, 6, 7, 8, 9] * 10]
        params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
        (want,) = rt.generate(prompt, params)
        _slow_steps(rt, 0.05)
        (handle,) = rt.add_requests(prompt, params)
        _wait(lambda: handle.num_output_tokens >= 2, 60, "decode to start")
        _kill_rank1(rt, "ray.kill")
        dropped = r"(?s)worker died.*dropped this request \(request_retries=0\)"
        with pytest.raises(WorkerError, match=dropped):
            handle.result(timeout=60)  # (failed at once, before the new group is up)
        _wait(lambda: rt.num_worker_restarts == 1, 60, "the new worker group")
        assert not rt.engine.scheduler.has_work()
        (again,) = rt.generate(prompt, params)
        assert again.token_ids == want.token_ids


def _hung_rank1_fails_then_recovers(
    rt: Runtime, match: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Rank 1's steps sleep forever: within a minute the engine replaces the group, naming
    `match`, and the request goes on there with the undisturbed tokens."""
    prompt = [[5, 6, 7, 8, 9] * 10]
    params = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    (want,) = rt.generate(prompt, params)
    assert rt.engine.executor is not None
    actor = rt.engine.executor.actors[1]  # type: ignore[attr-defined]

    def hang(self: Any) -> None:
        self.runner.execute = lambda plan: time.sleep(3600)

    import ray

    ray.get(actor.__ray_call__.remote(hang))
    start = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="dist_runtime.engine.engine"):
        (again,) = rt.generate(prompt, params)
    assert time.monotonic() - start < 60
    assert again.token_ids == want.token_ids
    assert rt.num_worker_restarts == 1
    failures = [
        r.getMessage() for r in caplog.records if "replacing the worker group" in r.getMessage()
    ]
    assert len(failures) == 1 and re.search(match, failures[0]), failures


def test_hung_worker_is_detected_by_the_step_timeout(
    ray_cluster: Any, tiny_llama_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Runtime(model=str(tiny_llama_dir), tp=2, step_timeout_s=3.0, **KW) as rt:
        _hung_rank1_fails_then_recovers(rt, r"timed out after 3 s", caplog)


def test_hung_peer_fails_the_collective_before_the_step_timeout(
    ray_cluster: Any, tiny_llama_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Rank 1 stops answering; rank 0's next all-reduce gives up after collective_timeout_s
    (well before the 120 s step timeout), the step fails naming the collective, and a fresh
    group carries the request on."""
    with Runtime(
        model=str(tiny_llama_dir), tp=2, step_timeout_s=120.0, collective_timeout_s=3.0, **KW
    ) as rt:
        hung = r"rank 0: tp all-reduce failed; a peer is hung or dead \(collective_timeout_s=3\)"
        _hung_rank1_fails_then_recovers(rt, hung, caplog)


def _raise_in_steps(rt: Runtime, ranks: list[int], times: int) -> None:
    """The next `times` steps raise on `ranks`, inside each worker before it computes
    anything (so a rank left out goes on into the step's collectives). Armed from the engine
    thread between two steps, so every rank is armed before the same step (a step submitted
    to one actor before the arming and to the other after it would raise on one rank only)."""
    import ray

    def arm(self: Any) -> None:
        runner, left = self.runner, [times]
        execute, launch = runner.execute, runner.launch

        def failing(run: Any) -> Any:
            def step(plan: Any) -> Any:
                if left[0] > 0:
                    left[0] -= 1
                    raise ValueError("injected step failure")
                return run(plan)

            return step

        runner.execute, runner.launch = failing(execute), failing(launch)

    def arm_all() -> None:
        assert rt.engine.executor is not None
        actors = rt.engine.executor.actors  # type: ignore[attr-defined]
        ray.get([actors[r].__ray_call__.remote(arm) for r in ranks])

    rt.engine.call(arm_all, timeout=120)


FAULT_PROMPTS: list[Any] = [[5, 6, 7, 8, 9] * 10, [11, 12, 13] * 7]
FAULT_PARAMS = [
    SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True),
    SamplingParams(max_new_tokens=16, temperature=0.9, seed=7, repetition_penalty=1.3,
                   ignore_eos=True),
]  # fmt: skip


def _decode_with_fault(rt: Runtime, ranks: list[int], times: int) -> list[list[int]]:
    """The requests' tokens when steps start raising (on `ranks`, `times` steps) mid-decode."""
    handles = rt.add_requests(FAULT_PROMPTS, FAULT_PARAMS)
    _wait(lambda: handles[1].num_output_tokens >= 3, 120, "decode to start")
    _raise_in_steps(rt, ranks, times)
    return [[t for delta in h for t in delta.token_ids] for h in handles]


def test_a_step_raising_on_every_worker_runs_on_in_place(rt: Runtime) -> None:
    """Every worker raises in one step and finishes it: the group is in step, so it runs on
    (no new workers, no weights loaded again) and the step's requests compute it again, with
    the tokens of a run without the failure."""
    want = [o.token_ids for o in rt.generate(FAULT_PROMPTS, FAULT_PARAMS)]
    _slow_steps(rt, 0.05)
    assert _decode_with_fault(rt, [0, 1], 1) == want
    stats = rt.engine.stats()
    assert rt.num_worker_restarts == 0 and stats["num_retried_steps"] == 1


def test_a_step_raising_on_one_worker_replaces_the_group(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 1 raises before the step's first all-reduce, which rank 0 waits in: the group is
    out of step, so it is replaced once its grace runs out, and the requests go on there."""
    from dist_runtime.engine.executor import ray_executor

    monkeypatch.setattr(ray_executor, "STEP_ERROR_GRACE_S", 1.0)
    want = [o.token_ids for o in rt.generate(FAULT_PROMPTS, FAULT_PARAMS)]
    _slow_steps(rt, 0.05)
    assert _decode_with_fault(rt, [1], 1) == want
    assert rt.num_worker_restarts == 1


def test_steps_failing_in_a_row_replace_the_group(ray_cluster: Any, tiny_llama_dir: Path) -> None:
    """A step that fails in place again and again (a worker left broken) is not retried for
    ever: the third failure in a row replaces the group, whose fresh workers go on."""
    with Runtime(model=str(tiny_llama_dir), tp=2, request_retries=5, **KW) as rt:
        want = [o.token_ids for o in rt.generate(FAULT_PROMPTS, FAULT_PARAMS)]
        assert _decode_with_fault(rt, [0, 1], 100) == want
        assert rt.num_worker_restarts == 1
        assert rt.engine.stats()["num_retried_steps"] == 2  # the third failure replaced them


def test_a_launched_step_raising_on_every_worker_runs_on_in_place(
    ray_cluster: Any, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With steps launched ahead (`DIST_RUNTIME_ASYNC_DECODE=1`), a launched step raising on
    every worker: the step queued behind it is dropped on the workers too, and the group runs
    on with the undisturbed tokens."""
    monkeypatch.setenv("DIST_RUNTIME_ASYNC_DECODE", "1")
    with Runtime(model=str(tiny_llama_dir), tp=2, **KW) as rt:
        executor = rt.engine.executor
        assert executor is not None and executor.runs_ahead()
        greedy = [FAULT_PARAMS[0]] * 2  # (a penalty would keep steps from going ahead)
        want = [o.token_ids for o in rt.generate(FAULT_PROMPTS, greedy)]
        collect = executor.collect

        def slow() -> Any:
            time.sleep(0.05)
            return collect()

        executor.collect = slow  # type: ignore[method-assign]
        handles = rt.add_requests(FAULT_PROMPTS, greedy)
        _wait(lambda: rt.engine.num_steps_ahead > 2, 120, "decode steps launched ahead")
        _raise_in_steps(rt, [0, 1], 1)
        assert [[t for d in h for t in d.token_ids] for h in handles] == want
        assert rt.num_worker_restarts == 0 and rt.engine.stats()["num_retried_steps"] == 1
        assert rt.engine.executor is executor
