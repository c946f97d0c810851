"""The job service end to end: a service process killed mid-prefill and restarted, the Ray
queue actor, `launch/run.py --jobs`, and `launch/submit.py`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dist_runtime import JobState, Runtime, SamplingParams
from dist_runtime.config import SchedulerConfig
from dist_runtime.formats.random_checkpoint import write_random_checkpoint
from dist_runtime.jobs.client import JobClient
from launch import run as run_cli
from launch import submit as submit_cli
from tests.conftest import REPO_ROOT, TINY_SEED, TINY_SHAPES

DOC = " ".join(
    f"Entry {i}: the ferry left pier {i % 5} at {6 + i % 12} o'clock." for i in range(60)
)
QUESTIONS = ["Which pier did entry 7 use?", "When did entry 2 leave?"]
PARAMS = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
SERVE_FLAGS = [
    "--device", "cpu", "--dtype", "float32", "--session-len", "2048",
    "--max-num-seqs", "4", "--max-num-batched-tokens", "8",
]  # fmt: skip


def _serve(model: Path, job_dir: Path, *extra: str) -> subprocess.Popen[bytes]:
    """`launch/run.py --serve` on job_dir; `extra` flags after SERVE_FLAGS override them."""
    cmd = [sys.executable, str(REPO_ROOT / "launch" / "run.py"), "--serve", "--no-ray-service"]
    cmd += ["--model", str(model), "--job-dir", str(job_dir), *SERVE_FLAGS, *extra]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


LONG_DOC = " ".join(
    f"Entry {i}: the ferry left pier {i % 5} at {6 + i % 12} o'clock." for i in range(240)
)
"""Long enough (~7.7K prompt tokens at 8 a step) that the prefill outlasts a few of the
service's 0.25 s progress writes, so the kill lands mid-prefill; DOC's can end before the
first."""


def test_job_survives_the_service_being_killed(tmp_path: Path) -> None:
    """kill -9 the service mid-prefill; a new service on the same directory requeues the job,
    which completes with the answers an undisturbed run gives."""
    # The session's tiny model with room for LONG_DOC's positions.
    model = write_random_checkpoint(
        tmp_path / "model", seed=TINY_SEED, max_position_embeddings=16384, **TINY_SHAPES
    )
    with Runtime(
        model=str(model),
        device="cpu",
        dtype="float32",
        session_len=16384,
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8),
    ) as rt:
        want = rt.ask(LONG_DOC, QUESTIONS, PARAMS)
    job_dir = tmp_path / "jobs"
    service = _serve(model, job_dir, "--session-len", "16384")
    try:
        _wait_for(lambda: (job_dir / "service.json").exists(), 120, "the service to start")
        client = JobClient(job_dir)
        job_id = client.submit(LONG_DOC, QUESTIONS, PARAMS)
        _wait_for(lambda: client.status(job_id).prefill_tokens_done > 0, 60, "prefill to start")
        service.send_signal(signal.SIGKILL)
        service.wait(timeout=30)
        status = client.status(job_id)
        assert status.state is JobState.RUNNING  # died with the job in flight
        assert status.prefill_tokens_done < status.prefill_tokens_total
    finally:
        if service.poll() is None:
            service.kill()
    service = _serve(model, job_dir, "--session-len", "16384")
    try:
        assert client.result(job_id, timeout=180) == want
        assert client.status(job_id).attempts == 2
    finally:
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=60) == 0
    client.close()


@pytest.fixture
def serving(tiny_llama_dir: Path, tmp_path: Path) -> Iterator[Runtime]:
    with Runtime(
        model=str(tiny_llama_dir),
        device="cpu",
        dtype="float32",
        session_len=2048,
        job_dir=str(tmp_path / "jobs"),
    ) as rt:
        rt.serve_jobs()
        yield rt


def test_ray_queue_actor(ray_cluster: Any, serving: Runtime) -> None:
    from dist_runtime.jobs import service

    name = f"jobs-{uuid.uuid4().hex[:8]}"
    job_dir = str(serving.job_dir)
    actor = service.start(job_dir, name=name, namespace="tests")
    try:
        assert service.connect(name, "tests")._actor_id == actor._actor_id
        params = {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}
        job_id = ray_cluster.get(actor.submit.remote(DOC, QUESTIONS, params))
        answers = ray_cluster.get(actor.result.remote(job_id, 120))
        assert answers == serving.ask(DOC, QUESTIONS, PARAMS)
        assert ray_cluster.get(actor.status.remote(job_id))["state"] == "done"
        assert [j["job_id"] for j in ray_cluster.get(actor.jobs.remote())] == [job_id]
        owned = ray_cluster.get(actor.submit.remote(DOC, QUESTIONS[:1], params, None,
                                                    "strict", "bob"))  # fmt: skip
        assert [j["job_id"] for j in ray_cluster.get(actor.jobs.remote("bob"))] == [owned]
        assert serving.job_owner(owned) == "bob"
        ray_cluster.get(actor.result.remote(owned, 120))
        with pytest.raises(Exception, match=r"over session_len 2048"):
            ray_cluster.get(actor.submit.remote("word " * 3000, ["q"], params))
        with pytest.raises(ValueError, match=r"already serves"):
            service.start(str(Path(job_dir).parent / "other"), name=name, namespace="tests")
    finally:
        service.stop(name, "tests")
    with pytest.raises(ValueError, match=r"no job queue named"):
        service.connect(name, "tests")


def test_submit_cli_against_a_job_dir(serving: Runtime, tmp_path: Path, capsys: Any) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC, encoding="utf-8")
    job_dir = str(serving.job_dir)
    argv = ["--job-dir", job_dir, "--doc", str(doc), "--max-new-tokens", "8"]
    assert submit_cli.main([*argv, *sum((["-q", q] for q in QUESTIONS), []), "--wait"]) == 0
    out = capsys.readouterr().out.splitlines()
    job_id, answers = out[0], [json.loads(line) for line in out[1:]]
    assert answers == serving.result(job_id)
    assert submit_cli.main(["--job-dir", job_dir, "--status", job_id]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "done"
    assert submit_cli.main(["--job-dir", job_dir, "--status", "nope"]) == 2
    assert "no job 'nope'" in capsys.readouterr().err
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\xff\xfe not text")
    assert submit_cli.main(["--job-dir", job_dir, "--doc", str(bad), "-q", "q"]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    # --owner: the job is that API key's (the server lists it for that key only)
    assert submit_cli.main([*argv, "-q", QUESTIONS[0], "--owner", "alice"]) == 0
    alices = capsys.readouterr().out.strip()
    assert serving.job_owner(alices) == "alice" and serving.job_owner(job_id) is None
    assert submit_cli.main(["--job-dir", job_dir, "--list", "--owner", "alice"]) == 0
    listed = [json.loads(line)["job_id"] for line in capsys.readouterr().out.splitlines()]
    assert listed == [alices]
    serving.result(alices, timeout=120)


def test_run_jobs_file(tiny_llama_dir: Path, tmp_path: Path, capsys: Any) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC, encoding="utf-8")
    jobs = tmp_path / "in.jsonl"
    lines = [
        {"document": DOC, "questions": QUESTIONS},
        {"document_path": str(doc), "questions": QUESTIONS[:1], "max_new_tokens": 4},
        {"document_path": str(tmp_path / "missing.txt"), "questions": ["q"]},
    ]
    jobs.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    out = tmp_path / "answers.jsonl"
    argv = ["--model", str(tiny_llama_dir), "--jobs", str(jobs), "--out", str(out)]
    argv += ["--max-new-tokens", "8", "--device", "cpu", "--dtype", "float32"]
    assert run_cli.main([*argv, "--session-len", "2048"]) == 1  # one line failed
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3]
    assert len(records[0]["answers"]) == 2 and len(records[1]["answers"]) == 1
    assert "cannot read document_path" in records[2]["error"]
    assert "2 of 3 jobs answered" in capsys.readouterr().out

    jobs.write_text('{"document": "d", "questions": ["q"], "colour": 1}\n', encoding="utf-8")
    assert run_cli.main([*argv, "--session-len", "2048"]) == 2
    assert "in.jsonl:1: unknown keys ['colour']" in capsys.readouterr().err
    os.remove(out)


ENUM_SCHEMA = {
    "type": "object",
    "properties": {"who": {"enum": ["Ada", "Tom"]}, "sure": {"type": "boolean"}},
    "required": ["who", "sure"],
}


def test_run_jobs_file_with_json_schema(tiny_llama_dir: Path, tmp_path: Path, capsys: Any) -> None:
    """A --jobs line's own json_schema guides its answers; --json guides the others; a line
    whose schema cannot be held stops the file before anything is queued, naming the line."""
    jobs = tmp_path / "in.jsonl"
    lines = [
        {
            "document": DOC,
            "questions": QUESTIONS,
            "json_schema": ENUM_SCHEMA,
            "max_new_tokens": 400,
        },
        {"document": DOC, "questions": QUESTIONS[:1], "max_new_tokens": 40},
    ]
    jobs.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    out = tmp_path / "answers.jsonl"
    argv = ["--model", str(tiny_llama_dir), "--jobs", str(jobs), "--out", str(out), "--json"]
    argv += ["--max-new-tokens", "64", "--device", "cpu", "--dtype", "float32"]
    assert run_cli.main([*argv, "--session-len", "4096"]) == 0
    first, second = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    for answer in first["answers"]:
        value = json.loads(answer)
        assert value["who"] in ("Ada", "Tom") and isinstance(value["sure"], bool)
    (answer,) = second["answers"]  # --json: an object, or a prefix of one at 40 tokens
    assert answer.lstrip().startswith("{")
    lines[1]["json_schema"] = {"type": "integer", "minimum": 0}
    jobs.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    assert run_cli.main([*argv, "--session-len", "4096"]) == 2
    assert "in.jsonl:2: json_schema: #: JSON Schema keyword 'minimum'" in capsys.readouterr().err


def test_submit_cli_with_a_json_schema(serving: Runtime, tmp_path: Path, capsys: Any) -> None:
    doc, schema = tmp_path / "doc.txt", tmp_path / "schema.json"
    doc.write_text(DOC, encoding="utf-8")
    schema.write_text(json.dumps(ENUM_SCHEMA), encoding="utf-8")
    argv = ["--job-dir", str(serving.job_dir), "--doc", str(doc), "-q", QUESTIONS[0]]
    assert submit_cli.main([*argv, "--json-schema", str(schema), "--wait"]) == 0
    out = capsys.readouterr().out.splitlines()
    value = json.loads(json.loads(out[1]))
    assert value["who"] in ("Ada", "Tom") and isinstance(value["sure"], bool)
    assert submit_cli.main([*argv, "--json-schema", '{"minimum": 3}']) == 2
    assert "--json-schema: #: JSON Schema keyword 'minimum'" in capsys.readouterr().err


def _submit_batch(job_dir: str, worker: int, count: int, out: Any) -> None:
    client = JobClient(job_dir)
    params = SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True)
    ids = [
        client.submit(f"Note {worker}-{i}: the tide turned at {i % 12} o'clock.", ["When?"], params)
        for i in range(count)
    ]
    out.put((worker, ids))


# (the stress case, ~15 s; test_job_survives_the_service_being_killed kills it by default)
@pytest.mark.slow
def test_two_hundred_jobs_from_four_processes_survive_a_kill(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """200 small jobs from 4 submitting processes; the service is killed with SIGKILL midway
    and restarted: every job ends done, exactly once (one answer list; only the batch in flight
    is retried)."""
    import multiprocessing as mp

    job_dir = tmp_path / "jobs"
    service = _serve(tiny_llama_dir, job_dir)
    try:
        _wait_for(lambda: (job_dir / "service.json").exists(), 120, "the service to start")
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        procs = [
            ctx.Process(target=_submit_batch, args=(str(job_dir), w, 50, out)) for w in range(4)
        ]
        for p in procs:
            p.start()
        submitted = dict(out.get(timeout=180) for _ in procs)
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
        client = JobClient(job_dir)
        done = lambda: sum(s.state is JobState.DONE for s in client.jobs())  # noqa: E731
        _wait_for(lambda: done() >= 40, 180, "some jobs to finish")
        service.send_signal(signal.SIGKILL)
        service.wait(timeout=30)
        assert done() < 200
    finally:
        if service.poll() is None:
            service.kill()
    service = _serve(tiny_llama_dir, job_dir)
    try:
        ids = [i for w in range(4) for i in submitted[w]]
        assert len(set(ids)) == 200
        for job_id in ids:
            assert len(client.result(job_id, timeout=300)) == 1
        statuses = client.jobs()
        assert len(statuses) == 200
        assert all(s.state is JobState.DONE and s.attempts <= 2 for s in statuses)
        # At most the batch in flight was retried: max_num_seqs 4 one-question jobs.
        assert sum(s.attempts == 2 for s in statuses) <= 4
    finally:
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=60) == 0
    client.close()
