"""Targets for submitting processes (multiprocessing's spawn start method).

A spawned process imports the module of its target: kept here, apart from the test modules
(which import torch and the whole driver), each submitter starts in a fraction of a second
and loads only the job client, as a real client process does.
"""

from __future__ import annotations

from typing import Any

from dist_runtime.jobs.client import JobClient
from dist_runtime.sampling_params import SamplingParams


def submit_questions(
    job_dir: str, worker: int, count: int, out: Any, doc: str, params: SamplingParams
) -> None:
    """`count` jobs of `doc` with one question each; puts (worker, job ids) on `out`."""
    client = JobClient(job_dir)
    ids = [
        client.submit(f"{doc} Worker {worker}, job {i}.", [f"Who keeps the light? ({i})"], params)
        for i in range(count)
    ]
    out.put((worker, ids))


def submit_notes(job_dir: str, worker: int, count: int, out: Any) -> None:
    """`count` small one-question jobs; puts (worker, job ids) on `out`."""
    client = JobClient(job_dir)
    params = SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True)
    ids = [
        client.submit(f"Note {worker}-{i}: the tide turned at {i % 12} o'clock.", ["When?"], params)
        for i in range(count)
    ]
    out.put((worker, ids))
