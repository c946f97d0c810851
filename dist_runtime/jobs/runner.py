"""Runs the durable queue's jobs on the engine, admitted continuously.

A job is a document and its questions. The runner is one more client of the engine: it claims
the oldest queued jobs while their questions fit the engine's sequence slots, adds each job's
questions as requests sharing the document's prefix (computed once, then every question starts
from its cached blocks), and writes each job back as soon as its own answers are in. Jobs join
and leave the running batch step by step: when one job ends, the next queued job starts while
the others still decode.

The runner's thread wakes when a request ends, when it is told of a new job or a cancel, and at
least four times a second while jobs run (progress writes and cancel checks); with nothing to
run it polls the store every `poll_s` for jobs other processes queued. A cancel aborts the job's
requests (their blocks return to the pool at the engine's next step) and the job is marked
cancelled once the engine has let go of them.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass

from dist_runtime.engine.engine import Engine, EngineDeadError
from dist_runtime.engine.executor.base import WorkerError
from dist_runtime.engine.handle import RequestHandle
from dist_runtime.jobs.doc_qa import check_job
from dist_runtime.jobs.store import Job, JobStore
from dist_runtime.progress import plural
from dist_runtime.text.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.25


@dataclass(eq=False)
class _Running:
    job: Job
    handles: list[RequestHandle]
    total: int
    """Prompt tokens of all its questions."""
    cancelling: bool = False
    last_progress: tuple[int, int, int] | None = None


class JobRunner:
    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        store: JobStore,
        *,
        session_len: int,
        max_num_seqs: int,
        max_job_attempts: int,
        poll_s: float = 0.2,
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.store = store
        self.session_len = session_len
        self.max_num_seqs = max_num_seqs
        self.max_job_attempts = max_job_attempts
        self.poll_s = poll_s
        self.max_running_jobs: int | None = None
        """At most this many jobs at once; None: as many as fill max_num_seqs."""
        self.priority_offset = 0
        """Added to every job's priority (1: requests at priority 0, e.g. interactive HTTP
        traffic, go ahead of the queue's documents)."""
        self.num_jobs_run = 0
        self.num_requeued_at_stop = 0
        """Running jobs that `stop` put back in the queue (the next service runs them)."""
        self._running: dict[str, _Running] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Requeue what a dead service left running, then run jobs in a background thread."""
        if self._thread is not None:
            return
        requeued = self.store.requeue_running()
        if requeued:
            logger.warning("requeued %d job(s) a previous service left running", requeued)
        self._thread = threading.Thread(target=self._loop, name="dist-runtime-jobs", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """Look at the store now (a job was queued or a cancel asked for)."""
        self._wake.set()

    def stop(self, timeout: float | None = None) -> None:
        """Stop claiming; jobs still running go back to the queue for the next service."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # -- the runner's thread --------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self._claim()
                self._check_running()
            except Exception:  # the store itself failed: keep serving, say why
                logger.exception("job loop error")
                self._stop.wait(1.0)
            self._wake.wait(PROGRESS_INTERVAL_S if self._running else self.poll_s)
        self._requeue_running()

    def _has_room(self) -> bool:
        if not self._running:
            return True
        if self.max_running_jobs is not None and len(self._running) >= self.max_running_jobs:
            return False
        return sum(len(r.handles) for r in self._running.values()) < self.max_num_seqs

    def _claim(self) -> None:
        while self._has_room() and not self._stop.is_set():
            busy: dict[str | None, int] = {}  # running jobs per owner: the least busy goes next
            for run in self._running.values():
                busy[run.job.owner] = busy.get(run.job.owner, 0) + 1
            job = self.store.claim(busy, self.engine.config.scheduler.priority_aging_s)
            if job is None:
                return
            self._start(job)

    def _start(self, job: Job) -> None:
        logger.info(
            "job %s: %s, attempt %d",
            job.job_id,
            plural(len(job.questions), "question"),
            job.attempts,
        )
        try:  # checked at submit; checked again against this service's settings
            request = check_job(
                job.document,
                job.questions,
                job.params,
                tokenizer=self.tokenizer,
                session_len=self.session_len,
            )
            prompts = request.prompts
            assert prompts is not None  # a tokenizer was given
            params = request.params
            if self.priority_offset:
                params = dataclasses.replace(
                    params, priority=params.priority + self.priority_offset
                )
            handles = self.engine.add_requests(
                prompts,
                [params] * len(prompts),
                share_prefix=True,
                request_ids=[f"job-{job.job_id}-{i}" for i in range(len(prompts))],
                tenant=job.owner,
            )
        except Exception as e:
            self.store.fail(job.job_id, f"{type(e).__name__}: {e}")
            logger.error("job %s failed: %s", job.job_id, e)
            return
        for h in handles:
            h.add_done_callback(lambda _h: self._wake.set())
        self._running[job.job_id] = _Running(job, handles, sum(len(p) for p in prompts))

    def _check_running(self) -> None:
        for job_id, run in list(self._running.items()):
            if not run.cancelling and self.store.cancel_requested(job_id):
                run.cancelling = True
                for h in run.handles:
                    h.abort()
            if all(h.done for h in run.handles):
                del self._running[job_id]
                self._end(run)
            else:
                self._write_progress(run, force=False)

    def _write_progress(self, run: _Running, force: bool) -> None:
        progress = (
            sum(h.num_computed_prompt_tokens for h in run.handles),
            run.total,
            sum(h.num_output_tokens for h in run.handles),
        )
        if force or progress != run.last_progress:
            run.last_progress = progress
            self.store.progress(run.job.job_id, *progress)

    def _end(self, run: _Running) -> None:
        job = run.job
        errors = [h.exception() for h in run.handles if h.exception() is not None]
        if run.cancelling:
            self._write_progress(run, force=True)
            self.store.mark_cancelled(job.job_id)
            logger.info("job %s cancelled", job.job_id)
        elif errors:
            self._failed(job, errors[0])
        else:
            self._write_progress(run, force=True)
            self.store.finish(job.job_id, [h.result().text for h in run.handles])
            self.num_jobs_run += 1
            logger.info("job %s done", job.job_id)

    def _failed(self, job: Job, error: BaseException | None) -> None:
        if isinstance(error, EngineDeadError):  # the next service on this job_dir runs it
            self.store.requeue(job.job_id)
            logger.error("job %s requeued: the engine stopped: %s", job.job_id, error)
        elif isinstance(error, WorkerError) and job.attempts < self.max_job_attempts:
            self.store.requeue(job.job_id)
            logger.warning(
                "job %s: worker failure on attempt %d of %d, requeued: %s",
                job.job_id,
                job.attempts,
                self.max_job_attempts,
                error,
            )
        elif isinstance(error, WorkerError):
            self.store.fail(
                job.job_id, f"worker failure on each of {job.attempts} attempts; last: {error}"
            )
            logger.error("job %s failed after %d attempts: %s", job.job_id, job.attempts, error)
        else:
            self.store.fail(job.job_id, f"{type(error).__name__}: {error}")
            logger.error("job %s failed: %s", job.job_id, error)

    def _requeue_running(self) -> None:
        """The service is stopping: abort what runs and put it back in the queue."""
        for run in self._running.values():
            for h in run.handles:
                h.abort()
            if run.cancelling:
                self.store.mark_cancelled(run.job.job_id)
            else:
                self.store.requeue(run.job.job_id, count_attempt=False)
                self.num_requeued_at_stop += 1
                logger.info("job %s requeued: the service is stopping", run.job.job_id)
        self._running.clear()
