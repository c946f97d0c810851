"""Runs the durable queue's jobs on one Runtime, one job at a time.

A job is a document and its questions: all of them go to the scheduler together, so the
document is prefilled once (prefix caching) and the answers decode as one batch. The runner
writes progress back to the store about four times a second, checks for a cancel request after
every step, and on cancel aborts the job's sequences, which returns their KV blocks to the pool.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

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
        job = self.store.claim()
        if job is None:
            return False
        self._run(job)
        self.num_jobs_run += 1
        return True

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.run_one():
                    self._stop.wait(self.poll_s)
            except Exception:  # the store itself failed: keep serving, say why
                logger.exception("job loop error")
                self._stop.wait(1.0)

    def _run(self, job: Job) -> None:
        logger.info(
            "job %s: %d question(s), attempt %d", job.job_id, len(job.questions), job.attempts
        )
        watcher = _Watcher(self.store, job.job_id, len(job.questions), self._stop)
        try:
            answers = self.runtime._answer(job.document, job.questions, job.params, on_step=watcher)
        except JobCancelled:
            self.store.mark_cancelled(job.job_id)
            logger.info("job %s cancelled", job.job_id)
            return
        except _ServiceStopping:
            self.store.requeue(job.job_id)
            logger.info("job %s requeued: the service is stopping", job.job_id)
            return
        except WorkerError as e:  # the runtime has already replaced its workers
            limit = self.runtime.config.max_job_attempts
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
            return
        except Exception as e:
            logger.exception("job %s failed", job.job_id)
            self.store.fail(job.job_id, f"{type(e).__name__}: {e}")
            return
        watcher.flush()
        self.store.finish(job.job_id, answers)
        logger.info("job %s done", job.job_id)


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
