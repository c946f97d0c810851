"""`launch/run.py --serve` stops like a service: SIGTERM (systemd, Kubernetes) and SIGINT
(Ctrl-C) requeue the running job, release the workers and the Ray instance the process started,
and exit 0 with one closing log line: no traceback, no Ray "*** SIGTERM received" stack dump.
A restarted service on the same job directory then finishes the job."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dist_runtime import JobState, SamplingParams
from dist_runtime.formats.demo_model import demo_model_path
from dist_runtime.jobs.client import JobClient
from tests.conftest import REPO_ROOT

RUN = REPO_ROOT / "launch" / "run.py"
DOC = " ".join(
    f"Entry {i}: the ferry left pier {i % 5} at {6 + i % 12} o'clock." for i in range(60)
)  # about 1,100 tokens: a prefill long enough that the job is still running when signalled
QUESTIONS = ["Which pier did entry 7 use?"]
PARAMS = SamplingParams(max_new_tokens=48, temperature=0.0, ignore_eos=True)
STARTUP_S = 180
STOP_S = 60


@pytest.fixture(scope="module")
def demo_model() -> Path:
    return demo_model_path()  # fetched and converted once, then cached


def _serve(job_dir: Path, log: Path, tp: int, *extra: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, str(RUN), "--serve", "--tp", str(tp), "--job-dir", str(job_dir)]
    cmd += ["--device", "cpu", "--dtype", "float32", "--session-len", "2048", *extra]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # its own Ray
    env["OMP_NUM_THREADS"] = "1"
    with open(log, "wb") as err:
        return subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,  # a Ctrl-C meant for pytest does not reach it
        )


def _wait_for(proc: subprocess.Popen[bytes], log: Path, predicate: Any, what: str) -> None:
    deadline = time.monotonic() + STARTUP_S
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(
                f"the service exited ({proc.returncode}) before {what}:\n"
                + log.read_text(errors="replace")[-3000:]
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _wait_serving(proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until it serves: its signal handlers are in place from here on."""
    _wait_for(proc, log, lambda: "serving jobs in" in log.read_text(errors="replace"), "serving")


def _stop(proc: subprocess.Popen[bytes], log: Path, sig: int, requeued: int) -> str:
    """Signal the service; it must exit 0, cleanly, its last line saying what it requeued."""
    proc.send_signal(sig)
    try:
        rc = proc.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"still running {STOP_S} s after {signal.Signals(sig).name}:\n"
            + log.read_text(errors="replace")[-3000:]
        ) from None
    text = log.read_text(errors="replace")
    assert rc == 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert "SIGTERM received" not in text and "***" not in text, text[-3000:]
    last = text.strip().splitlines()[-1]
    jobs = "job" if requeued == 1 else "jobs"
    assert re.search(rf"stopped: {requeued} running {jobs} requeued$", last), text[-3000:]
    return text


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the process and its children
        proc.wait(timeout=30)


INIT_RAY = """
import os, signal, sys, time
import ray
from dist_runtime.engine.executor.ray_executor import init_ray
got = []
if sys.argv[1] == "handler":
    signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
init_ray(ray, num_cpus=1, include_dashboard=False, log_to_driver=False)
try:
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
finally:
    ray.shutdown()
print("handled", got)
"""


@pytest.mark.parametrize("before", ["handler", "default"])
def test_ray_init_leaves_sigterm_to_the_process(before: str) -> None:
    """The root cause: ray.init installs its own SIGTERM handlers, a Python one over the
    application's and a C++ one that prints "*** SIGTERM received" and a stack dump. After
    init_ray the application's handler runs; without one, Ray's Python handler exits (15)
    quietly, without the dump (the case of a service signalled while its model loads)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", INIT_RAY, before],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "SIGTERM received" not in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if before == "handler":
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"handled [{int(signal.SIGTERM)}]" in proc.stdout
    else:
        assert proc.returncode == 15, proc.stderr[-3000:]


@pytest.mark.parametrize(
    ("tp", "extra"),
    [
        # in-process worker: the same code path without Ray, on demand (-m slow)
        pytest.param(1, ("--no-ray-service",), marks=pytest.mark.slow),
        (3, ()),  # Ray workers + the Ray job-queue actor: where Ray's SIGTERM dump showed
    ],
    ids=["tp1", "tp3-ray"],
)
def test_sigterm_requeues_the_running_job_and_a_restart_finishes_it(
    demo_model: Path, tmp_path: Path, tp: int, extra: tuple[str, ...]
) -> None:
    job_dir = tmp_path / "jobs"
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    proc = _serve(job_dir, first, tp, *extra)
    try:
        _wait_serving(proc, first)
        client = JobClient(job_dir)
        job_id = client.submit(DOC, QUESTIONS, PARAMS)
        _wait_for(
            proc,
            first,
            lambda: client.status(job_id).state is JobState.RUNNING,
            "the job to start",
        )
        text = _stop(proc, first, signal.SIGTERM, requeued=1)
        assert "SIGTERM: stopping" in text
        status = client.status(job_id)
        assert status.state is JobState.QUEUED, status  # back in the queue, nothing lost
        assert status.attempts == 0  # a stop on purpose uses up no attempt
    finally:
        _kill(proc)
    # The restart runs in-process (tp 1): a requeued job finishes on any mesh, and a second
    # Ray start would add nothing but time (the tp1 case, -m slow, runs both in-process).
    proc = _serve(job_dir, second, 1, "--no-ray-service")
    try:
        _wait_serving(proc, second)
        answers = client.result(job_id, timeout=STARTUP_S)
        assert len(answers) == len(QUESTIONS) and answers[0].strip()
        assert client.status(job_id).attempts == 1
        text = _stop(proc, second, signal.SIGINT, requeued=0)  # Ctrl-C: the same clean stop
        assert "SIGINT: stopping" in text
    finally:
        _kill(proc)
        client.close()
