"""The durable job queue: store semantics, the Runtime's job API, cancel, bad input, and many
submitting processes."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import pickle
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dist_runtime import (
    JobFailedError,
    JobState,
    Runtime,
    SamplingParams,
    UnknownJobError,
)
from dist_runtime.config import CacheConfig, SchedulerConfig
from dist_runtime.jobs.client import JobClient
from dist_runtime.jobs.store import IdempotencyKeyConflictError, JobStore

PARAMS = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
DOC = "The harbour master keeps the tide tables. The lighthouse keeper is Ada Brennan. " * 3


# -- the store alone --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, what",
    [
        (dict(document="doc c"), "document"),
        (dict(questions=["q", "q2"]), "questions"),
        (dict(params=SamplingParams(max_new_tokens=7, temperature=0.0)), "generation settings"),
    ],
)
def test_idempotency_key_of_another_job_is_an_error(
    tmp_path: Path, change: dict[str, Any], what: str
) -> None:
    store = JobStore(tmp_path)
    job: dict[str, Any] = dict(document="doc b", questions=["q"], params=PARAMS)
    first = store.submit(**job, idempotency_key="key-1")
    with pytest.raises(IdempotencyKeyConflictError) as e:
        store.submit(**{**job, **change}, idempotency_key="key-1")
    assert isinstance(e.value, ValueError)
    assert (e.value.key, e.value.job_id, e.value.differs) == ("key-1", first, (what,))
    assert f"idempotency_key 'key-1' already belongs to job {first}" in str(e.value)
    assert what in str(e.value)
    copy = pickle.loads(pickle.dumps(e.value))  # as it crosses from the Ray actor
    assert (copy.key, copy.job_id, str(copy)) == ("key-1", first, str(e.value))
    assert store.submit(**job, idempotency_key="key-1") == first  # the retry still works
    assert [s.job_id for s in store.list_jobs()] == [first]
    store.close()


def test_owners_take_turns_at_the_queue(tmp_path: Path) -> None:
    """Alice queues three jobs, then bob one, then nobody (no owner) one: told how many jobs
    each owner runs, the store hands out the oldest job of an owner running the fewest, so
    bob's goes second, not fourth; without that, the oldest."""
    store = JobStore(tmp_path)
    ids = [store.submit("d", ["q"], PARAMS, owner=o)
           for o in ("alice", "alice", "alice", "bob", None)]  # fmt: skip
    busy: dict[str | None, int] = {}
    order = []
    for _ in range(5):
        job = store.claim(busy)
        assert job is not None
        order.append(job.job_id)
        busy[job.owner] = busy.get(job.owner, 0) + 1
    assert order == [ids[0], ids[3], ids[4], ids[1], ids[2]]
    assert store.claim(busy) is None
    other = JobStore(tmp_path / "fifo")
    fifo = [other.submit("d", ["q"], PARAMS, owner=o) for o in ("alice", "alice", "bob")]
    assert [other.claim().job_id for _ in range(3)] == fifo  # type: ignore[union-attr]
    store.close()
    other.close()


def test_the_queue_hands_out_the_most_important_job_first(tmp_path: Path) -> None:
    """A job asking priority -1 goes before older ones at 0; a priority-1 job that has waited
    two aging periods ranks ahead of a fresh one at 0 (it gained two levels)."""
    store = JobStore(tmp_path)
    normal = [store.submit("d", ["q"], PARAMS) for _ in range(2)]
    urgent = store.submit("d", ["q"], dataclasses.replace(PARAMS, priority=-1))
    assert [store.claim().job_id for _ in range(3)] == [urgent, *normal]  # type: ignore[union-attr]
    late = store.submit("d", ["q"], dataclasses.replace(PARAMS, priority=1))
    fresh = store.submit("d", ["q"], PARAMS)
    with store._tx() as db:  # the priority-1 job has waited 20 minutes
        db.execute("UPDATE jobs SET created = created - 1200 WHERE id = ?", (late,))
    assert store.claim(aging_s=600.0).job_id == late  # type: ignore[union-attr]
    assert store.claim(aging_s=600.0).job_id == fresh  # type: ignore[union-attr]
    store.close()


def test_idempotency_retry_matches_a_row_with_fewer_param_fields(tmp_path: Path) -> None:
    """A job row written before SamplingParams had some of its fields (the schema itself is
    unchanged): a retry with the same key compares with the stored job's defaults filled in."""
    import json
    import sqlite3

    from dist_runtime.jobs.store import _SCHEMA, DB_NAME

    db = sqlite3.connect(tmp_path / DB_NAME)
    db.executescript(_SCHEMA)
    old_params = json.dumps({"max_new_tokens": 6, "temperature": 0.0, "ignore_eos": True})
    db.execute(
        "INSERT INTO jobs (id, idempotency_key, state, document, questions, params, created, "
        "updated) VALUES ('old', 'k', 'queued', 'doc', '[\"q\"]', ?, 0, 0)",
        (old_params,),
    )
    db.commit()
    db.close()
    store = JobStore(tmp_path)
    assert store.submit("doc", ["q"], PARAMS, idempotency_key="k") == "old"
    with pytest.raises(IdempotencyKeyConflictError, match="generation settings"):
        store.submit("doc", ["q"], SamplingParams(max_new_tokens=6), idempotency_key="k")
    job = store.claim()
    assert job is not None and job.job_id == "old" and job.params == PARAMS
    store.close()


def test_store_lifecycle_and_persistence(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    a = store.submit("doc a", ["q1", "q2"], PARAMS)
    b = store.submit("doc b", ["q"], PARAMS, idempotency_key="k")
    assert store.submit("doc b", ["q"], PARAMS, idempotency_key="k") == b  # a retry
    assert [s.job_id for s in store.list_jobs()] == [a, b]
    job = store.claim()
    assert job is not None and job.job_id == a and job.questions == ["q1", "q2"]
    assert job.params == PARAMS and job.attempts == 1
    assert store.status(a).state is JobState.RUNNING
    store.progress(a, 10, 40, 3)
    s = store.status(a)
    assert (s.prefill_tokens_done, s.prefill_tokens_total, s.tokens_generated) == (10, 40, 3)
    store.close()

    # A new process on the same directory: the running job goes back to the queue.
    store = JobStore(tmp_path)
    assert store.requeue_running() == 1
    again = store.claim()
    assert again is not None and again.job_id == a and again.attempts == 2
    store.finish(a, ["one", "two"])
    assert store.answers(a) == ["one", "two"] and store.wait(a, timeout=1) == ["one", "two"]
    assert store.cancel(b) is JobState.QUEUED  # queued: cancelled at once
    assert store.status(b).state is JobState.CANCELLED
    with pytest.raises(JobFailedError, match=r"cancelled before it started"):
        store.answers(b)
    assert store.claim() is None
    with pytest.raises(UnknownJobError, match=r"no job 'nope'"):
        store.status("nope")
    with pytest.raises(UnknownJobError):
        store.cancel("nope")


def _submit_many(job_dir: str, worker: int, count: int, out: Any) -> None:
    client = JobClient(job_dir)
    ids = [
        client.submit(f"{DOC} Worker {worker}, job {i}.", [f"Who keeps the light? ({i})"], PARAMS)
        for i in range(count)
    ]
    out.put((worker, ids))


# -- through a Runtime ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rt(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    with Runtime(
        model=str(tiny_llama_dir),
        device="cpu",
        dtype="float32",
        session_len=2048,
        job_dir=str(tmp_path_factory.mktemp("jobs")),
        cache=CacheConfig(block_size=16, num_blocks=256),
        scheduler=SchedulerConfig(max_num_batched_tokens=64),
    ) as runtime:
        yield runtime


def test_submit_result_equals_ask(rt: Runtime) -> None:
    questions = ["Who keeps the light?", "Who keeps the tide tables?"]
    job_id = rt.submit(DOC, questions, PARAMS)
    answers = rt.result(job_id, timeout=120)
    assert answers == rt.ask(DOC, questions, PARAMS)
    status = rt.status(job_id)
    assert status.state is JobState.DONE and status.num_questions == 2 and status.attempts == 1
    assert status.prefill_tokens_done == status.prefill_tokens_total > 0
    assert status.tokens_generated == 2 * PARAMS.max_new_tokens
    assert job_id in [s.job_id for s in rt.jobs()]


def test_cancel_running_job_frees_its_blocks(rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    rt.result(rt.submit(DOC, ["warm-up"], PARAMS), timeout=120)
    free_before = rt.engine.blocks.num_free_blocks
    assert rt.engine.executor is not None
    execute = rt.engine.executor.execute

    def slow_step(plan: Any) -> Any:  # ~20 steps of prefill take long enough to cancel in
        time.sleep(0.05)
        return execute(plan)

    monkeypatch.setattr(rt.engine.executor, "execute", slow_step)
    long_doc = " ".join(f"Line {i}: the tide was {i % 7} metres at dawn." for i in range(60))
    job_id = rt.submit(long_doc, ["What was the tide at line 3?"], PARAMS)
    deadline = time.monotonic() + 60
    while rt.status(job_id).prefill_tokens_done == 0:  # running, partway through its prefill
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert rt.cancel(job_id) is JobState.RUNNING
    with pytest.raises(JobFailedError, match=r"cancelled while running"):
        rt.result(job_id, timeout=60)
    status = rt.status(job_id)
    assert status.state is JobState.CANCELLED
    assert status.prefill_tokens_done < status.prefill_tokens_total
    assert rt.engine.wait_idle(timeout=30)  # the cancel reached the engine
    assert rt.engine.blocks.num_free_blocks == free_before
    assert not rt.engine.scheduler.has_work()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(document=DOC, questions=[]), r"questions must be a non-empty list"),
        (dict(document=DOC, questions="one string"), r"questions must be a non-empty list"),
        (dict(document=DOC, questions=["ok", " "]), r"each question must be a non-empty"),
        (dict(document="   ", questions=["q"]), r"must be non-empty text"),
        (dict(document=b"caf\xe9 au lait", questions=["q"]), r"not UTF-8 .*0xe9 at offset 3"),
        (dict(document_path="/nonexistent/doc.txt", questions=["q"]), r"cannot read document_"),
        (dict(document="x " * 3000, questions=["q"]), r"tokens \+ max_new_tokens 6 = \d+, over "),
        (dict(questions=["q"]), r"exactly one of document"),
    ],
)
def test_submit_rejects_bad_input(rt: Runtime, kwargs: dict[str, Any], match: str) -> None:
    before = len(rt.jobs())
    with pytest.raises(ValueError, match=match):
        rt.submit(params=PARAMS, **kwargs)
    assert len(rt.jobs()) == before  # nothing queued


def test_non_utf8_with_replacement_and_unknown_ids(rt: Runtime, tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(DOC.encode() + b" caf\xe9.")
    job_id = rt.submit(
        questions=["Who keeps the light?"],
        params=PARAMS,
        document_path=path,
        encoding_errors="replace",
    )
    assert len(rt.result(job_id, timeout=120)) == 1
    for call in (rt.status, rt.cancel, rt.result):
        with pytest.raises(UnknownJobError, match=r"no job 'missing'"):
            call("missing")


def test_eight_processes_submit_every_job_runs_once(rt: Runtime) -> None:
    """Eight submitting processes on the service's job directory: every job completes, once."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    job_dir = str(rt.job_dir)
    rt.serve_jobs()  # the service runs them (an earlier submit() may already have started it)
    procs = [ctx.Process(target=_submit_many, args=(job_dir, w, 3, out)) for w in range(8)]
    for p in procs:
        p.start()
    submitted = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    ids = [i for w in range(8) for i in submitted[w]]
    assert len(set(ids)) == 24
    for job_id in ids:
        assert len(rt.result(job_id, timeout=300)) == 1
        status = rt.status(job_id)
        assert status.state is JobState.DONE and status.attempts == 1


def test_queued_jobs_run_as_one_batch_and_cancel_alone(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """Four queued jobs (7 questions) run as one batch: all four are running at once, a cancel
    stops only its own job, and the others' answers equal ask() run alone."""
    docs = [f"{DOC} Note {i}: the ferry leaves pier {i} at {5 + i} o'clock." for i in range(4)]
    questions = [
        ["Who keeps the light?", "When does the ferry leave?"],
        ["Which pier?"],
        ["Who keeps the tide tables?", "Who keeps the light?", "What leaves the pier?"],
        ["When?"],
    ]
    store = JobStore(tmp_path / "jobs")
    ids = [store.submit(d, q, PARAMS) for d, q in zip(docs, questions, strict=True)]
    store.close()
    with Runtime(
        model=str(tiny_llama_dir),
        device="cpu",
        dtype="float32",
        session_len=2048,
        job_dir=str(tmp_path / "jobs"),
        cache=CacheConfig(block_size=16, num_blocks=256),
        scheduler=SchedulerConfig(max_num_batched_tokens=64),
    ) as rt:
        assert rt.engine.executor is not None
        execute = rt.engine.executor.execute
        steps = []

        def slow_step(plan: Any) -> Any:
            time.sleep(0.03)
            steps.append(len(plan.seqs))
            return execute(plan)

        rt.engine.executor.execute = slow_step  # type: ignore[method-assign]
        free_before = rt.engine.blocks.num_free_blocks
        rt.serve_jobs()
        deadline = time.monotonic() + 60
        while not all(rt.status(i).state is JobState.RUNNING for i in ids):
            assert time.monotonic() < deadline, [rt.status(i).state for i in ids]
            time.sleep(0.005)
        assert rt.cancel(ids[1]) is JobState.RUNNING
        answers = {}
        for n, job_id in enumerate(ids):
            if n == 1:
                with pytest.raises(JobFailedError, match=r"cancelled while running"):
                    rt.result(job_id, timeout=120)
            else:
                answers[n] = rt.result(job_id, timeout=120)
        assert max(steps) >= 6  # questions of several jobs shared steps
        del rt.engine.executor.execute  # type: ignore[attr-defined]
        for n, got in answers.items():
            assert got == rt.ask(docs[n], questions[n], PARAMS), n
            assert rt.status(ids[n]).attempts == 1
        assert rt.engine.wait_idle(timeout=30)
        assert rt.engine.blocks.num_free_blocks == free_before
        assert not rt.engine.scheduler.has_work()


def test_serve_jobs_offsets_every_jobs_priority(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`serve_jobs(priority_offset=N)` (`launch/serve.py --job-priority N`) runs each queued
    job's requests N lower than the job asked, so HTTP traffic at 0 goes first."""
    store = JobStore(tmp_path / "jobs")
    asked = dataclasses.replace(PARAMS, priority=2)
    job_id = store.submit(DOC, ["Who keeps the light?", "Who keeps the tide tables?"], asked)
    store.close()
    with Runtime(model=str(tiny_llama_dir), device="cpu", dtype="float32", session_len=2048,
                 job_dir=str(tmp_path / "jobs")) as rt:  # fmt: skip
        seen: list[int] = []
        add = rt.engine.add_requests

        def spy(prompts: Any, params: Any, **kw: Any) -> Any:
            seen.extend(p.priority for p in params)
            return add(prompts, params, **kw)

        monkeypatch.setattr(rt.engine, "add_requests", spy)
        rt.serve_jobs(priority_offset=3)
        assert len(rt.result(job_id, timeout=120)) == 2
    assert seen == [5, 5]


def test_a_job_directory_from_before_owners_opens_and_keeps_owners(tmp_path: Path) -> None:
    """A job database without the owner column gets it on open; owners then scope listings
    and idempotency keys."""
    import sqlite3

    from dist_runtime.jobs.store import _SCHEMA, DB_NAME

    old_schema = _SCHEMA.replace(",\n    owner TEXT\n", "\n")
    assert "owner" not in old_schema
    with sqlite3.connect(tmp_path / DB_NAME) as db:
        db.executescript(old_schema)
    store = JobStore(tmp_path)
    params = SamplingParams(max_new_tokens=2)
    a = store.submit("doc a", ["q"], params, idempotency_key="k", owner="alice")
    b = store.submit("doc b", ["q"], params, idempotency_key="k", owner="bob")
    assert a != b and store.owner(a) == "alice" and store.owner(b) == "bob"
    assert [s.job_id for s in store.list_jobs("alice")] == [a]
    assert {s.job_id for s in store.list_jobs()} == {a, b}
    assert store.submit("doc a", ["q"], params, idempotency_key="k", owner="alice") == a
