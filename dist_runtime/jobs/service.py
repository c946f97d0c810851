"""The cluster-facing job queue: a named, detached Ray actor in front of a job directory.

`launch/run.py --serve` runs the model (a Runtime whose job runner drains the directory) and
starts this actor on its own node (or attaches to the one already there), so any process on
the cluster submits with

    ray.init(address="auto")
    queue = dist_runtime.jobs.service.connect()          # name / namespace configurable
    job_id = ray.get(queue.submit.remote(document, ["q1", "q2"]))
    answers = ray.get(queue.result.remote(job_id))

The actor is detached: it outlives the serving process, keeps accepting jobs into the durable
queue while the service restarts, and a new service on the same directory attaches to it.
Arguments and results are plain strings, lists and dicts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

from dist_runtime.jobs.client import JobClient
from dist_runtime.sampling_params import SamplingParams, check_answers

logger = logging.getLogger(__name__)

DEFAULT_NAME = "dist_runtime_jobs"
DEFAULT_NAMESPACE = "dist_runtime"


class JobQueue:
    """The actor's body: a JobClient on the serving node's job directory."""

    def __init__(self, job_dir: str):
        self.job_dir = job_dir
        self.client = JobClient(job_dir)

    def submit(
        self,
        document: str | bytes,
        questions: list[str],
        params: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        encoding_errors: str = "strict",
        owner: str | None = None,
    ) -> str:
        sampling = None if params is None else _sampling_params(params)
        return self.client.submit(
            document,
            questions,
            sampling,
            encoding_errors=encoding_errors,
            idempotency_key=idempotency_key,
            owner=owner,
        )

    def status(self, job_id: str) -> dict[str, Any]:
        return self.client.status(job_id).to_dict()

    def result(self, job_id: str, timeout: float | None = None) -> list[str]:
        return self.client.result(job_id, timeout)

    def cancel(self, job_id: str) -> str:
        return self.client.cancel(job_id).value

    def jobs(self, owner: str | None = None) -> list[dict[str, Any]]:
        return [s.to_dict() for s in self.client.jobs(owner)]

    def where(self) -> dict[str, Any]:
        return {"job_dir": self.job_dir, "pid": os.getpid()}


def _sampling_params(params: Any) -> SamplingParams:
    """SamplingParams from the plain mapping a remote submitter sends."""
    if not isinstance(params, dict):
        raise ValueError(
            f"params must be a mapping of SamplingParams fields or None, got {params!r:.80}"
        )
    known = {f.name for f in dataclasses.fields(SamplingParams)} - {"extra"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"unknown sampling params {unknown}; known: {sorted(known)}")
    return check_answers(SamplingParams(**params))


def start(job_dir: str, name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE) -> Any:
    """The named queue actor, created on this node for `job_dir` unless it already runs."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    actor: Any = (
        ray.remote(JobQueue)
        .options(
            name=name,
            namespace=namespace,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_concurrency=32,  # result() blocks; others must still get through
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
        )
        .remote(os.path.abspath(job_dir))
    )
    where = ray.get(actor.where.remote(), timeout=120)
    if os.path.abspath(where["job_dir"]) != os.path.abspath(job_dir):
        raise ValueError(
            f"a job queue named {name!r} in namespace {namespace!r} already serves "
            f"{where['job_dir']}, not {job_dir}; use its --job-dir or another --service-name"
        )
    return actor


def connect(name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE) -> Any:
    """The running queue actor (after `ray.init(address="auto")`)."""
    import ray

    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError as e:
        raise ValueError(
            f"no job queue named {name!r} in Ray namespace {namespace!r}; start one with "
            "`python launch/run.py --serve ...` on the cluster"
        ) from e


def stop(
    name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE, timeout: float = 30.0
) -> None:
    """Kill the queue actor and wait (up to `timeout` s) until Ray no longer lists its name, so
    a `start` or `connect` right after sees it gone (Ray drops the name asynchronously)."""
    import ray

    try:
        ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
    except ValueError:  # not running
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:
            return
        time.sleep(0.05)
    logger.warning("job queue actor %r: still listed %.0f s after it was killed", name, timeout)
