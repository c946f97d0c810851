"""Runs the durable queue's jobs on one Runtime, in batches.

A job is a document and its questions. The runner claims the oldest queued jobs, as many as
fill the scheduler's sequence slots with their questions, and runs them as one batch: each
document's shared prefix is prefilled once (prefix caching), the documents together, then every
question of every job decodes together. Each job is written back as soon as its own answers are
complete. The runner writes progress about four times a second per job, checks for a cancel
request after every step, and on cancel aborts only that job's sequences, which returns their KV
blocks to the pool while the rest of the batch goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from dist_runtime.doc_qa import check_fits, job_params
from dist_runtime.executor.base import WorkerError
from dist_runtime.job_store import Job, JobStore

if TYPE_CHECKING:
    from dist_runtime.runtime import Runtime
    from dist_runtime.scheduler import Sequence

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.25


class JobCancelled(Exception):
    """Raised inside a job's step callback to stop it."""


class _ServiceStopping(Exception):
    """Raised inside a job's step callback when the runner stops: the job goes back to the
    queue for the next service."""


class JobRunner:
    def __init__(self, runtime: Runtime, store: JobStore, poll_s: float = 0.2):
        self.runtime = runtime
        self.store = store
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.num_jobs_run = 0
        self.max_batch_jobs: int | None = None
        """At most this many jobs per batch; None: as many as fill max_num_seqs."""

    def start(self) -> None:
        """Requeue what a dead service left running, then run jobs in a background thread."""
        if self._thread is not None:
            return
        requeued = self.store.requeue_running()
        if requeued:
            logger.warning("requeued %d job(s) a previous service left running", requeued)
        self._thread = threading.Thread(target=self._loop, name="dist-runtime-jobs", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def run_pending(self) -> int:
        """Run queued jobs in this thread until none is left; returns how many ran."""
        n = 0
        while not self._stop.is_set() and self.run_one():
            n += 1
        return n

    def run_one(self) -> bool:
        """Claim a batch of queued jobs and run it; False when none was queued."""
        jobs = self._claim_batch()
        if not jobs:
            return False
        self._run_batch(jobs)
        self.num_jobs_run += len(jobs)
        return True

    def _claim_batch(self) -> list[Job]:
        """The oldest queued jobs, as many as fill the scheduler's sequence slots with their
        questions (at least one job)."""
        slots = self.runtime.config.scheduler.max_num_seqs
        jobs: list[Job] = []
        cap = self.max_batch_jobs or slots
        while not jobs or (sum(len(j.questions) for j in jobs) < slots and len(jobs) < cap):
            job = self.store.claim()
            if job is None:
                break
            jobs.append(job)
        return jobs

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.run_one():
                    self._stop.wait(self.poll_s)
            except Exception:  # the store itself failed: keep serving, say why
                logger.exception("job loop error")
                self._stop.wait(1.0)

    def _run_batch(self, jobs: list[Job]) -> None:
        """Run jobs as one batch: their documents prefill together and all their questions
        decode together; each job finishes, fails or is cancelled on its own."""
        runs: list[tuple[Job, _Watcher, int]] = []
        items = []
        for job in jobs:
            logger.info(
                "job %s: %d question(s), attempt %d", job.job_id, len(job.questions), job.attempts
            )
            try:  # checked at submit; checked again against this service's settings
                params = job_params(job.params)
                prompts = self.runtime._qa_prompts(job.document, job.questions)
                check_fits(prompts, params, self.runtime.config.session_len)
            except Exception as e:
                self.store.fail(job.job_id, f"{type(e).__name__}: {e}")
                logger.error("job %s failed: %s", job.job_id, e)
                continue
            watcher = _Watcher(self.store, job.job_id, len(job.questions), self._stop)
            runs.append((job, watcher, sum(len(p) for p in prompts)))
            items.append((prompts, params))
        if len(runs) > 1:
            logger.info("running %d jobs as one batch", len(runs))
        ended: set[int] = set()

        def on_step(i: int, seqs: list[Sequence], prefix_pass: bool) -> bool:
            job, watcher, total = runs[i]
            try:
                watcher(seqs, total, prefix_pass)
            except JobCancelled:
                self.store.mark_cancelled(job.job_id)
                ended.add(i)
                logger.info("job %s cancelled", job.job_id)
                return False
            return True

        def on_done(i: int, answers: list[str]) -> None:
            job, watcher, _ = runs[i]
            watcher.flush()
            self.store.finish(job.job_id, answers)
            ended.add(i)
            logger.info("job %s done", job.job_id)

        try:
            self.runtime._answer_batch(items, on_step, on_done)
        except _ServiceStopping:
            for i, (job, _, _) in enumerate(runs):
                if i not in ended:
                    self.store.requeue(job.job_id)
                    logger.info("job %s requeued: the service is stopping", job.job_id)
        except WorkerError as e:  # the runtime has already replaced its workers
            limit = self.runtime.config.max_job_attempts
            for i, (job, _, _) in enumerate(runs):
                if i in ended:
                    continue
                if job.attempts < limit:
                    self.store.requeue(job.job_id)
                    logger.warning(
                        "job %s: worker failure on attempt %d of %d, requeued: %s",
                        job.job_id,
                        job.attempts,
                        limit,
                        e,
                    )
                else:
                    self.store.fail(
                        job.job_id, f"worker failure on each of {job.attempts} attempts; last: {e}"
                    )
                    logger.error("job %s failed after %d attempts: %s", job.job_id, limit, e)
        except Exception as e:
            logger.exception("batch of %d job(s) failed", len(runs) - len(ended))
            for i, (job, _, _) in enumerate(runs):
                if i not in ended:
                    self.store.fail(job.job_id, f"{type(e).__name__}: {e}")


class _Watcher:
    """Step callback of one job: throttled progress writes and cancel checks."""

    def __init__(self, store: JobStore, job_id: str, num_questions: int, stopping: threading.Event):
        self.store = store
        self.stopping = stopping
        self.job_id = job_id
        self.num_questions = num_questions
        self._last = 0.0
        self._progress = (0, 0, 0)

    def __call__(self, seqs: list[Sequence], total: int, shared_prefix: bool) -> None:
        """seqs: the sequences of the current generate call; total: the job's prompt tokens."""
        if shared_prefix:  # one sequence holding the document part all questions share
            (seq,) = seqs
            done = _prefilled(seq) * self.num_questions
            self._progress = (done, total, 0)
        else:
            done = sum(_prefilled(s) for s in seqs)
            self._progress = (done, total, sum(len(s.output_token_ids) for s in seqs))
        if all(s.finish_reason is not None for s in seqs):
            return  # the closing call after the last token: nothing left to stop
        if self.stopping.is_set():
            raise _ServiceStopping(self.job_id)
        if self.store.cancel_requested(self.job_id):  # one indexed read: cheap next to a step
            raise JobCancelled(self.job_id)
        now = time.monotonic()
        if now - self._last >= PROGRESS_INTERVAL_S:
            self._last = now
            self.flush()

    def flush(self) -> None:
        self.store.progress(self.job_id, *self._progress)


def _prefilled(seq: Sequence) -> int:
    """Prompt tokens of seq whose K/V were computed (all of them once it finished, when its
    blocks were already released)."""
    if seq.finish_reason is not None:
        return len(seq.prompt_token_ids)
    return min(seq.num_computed_tokens, len(seq.prompt_token_ids))
