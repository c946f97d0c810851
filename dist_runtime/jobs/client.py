"""Submit to and watch a job directory from any process that can reach its files.

The service (`launch/run.py --serve`, or any Runtime after `serve_jobs()`) records its model
and session length in the directory, so a client validates a job exactly as the service would
(tokenized with the model's tokenizer and chat template) before queueing it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence as Seq
from pathlib import Path

from dist_runtime.jobs.doc_qa import check_job
from dist_runtime.jobs.store import JobState, JobStatus, JobStore
from dist_runtime.sampling_params import SamplingParams
from dist_runtime.text.tokenizer import Tokenizer


class JobClient:
    def __init__(self, job_dir: str | os.PathLike[str]):
        self.store = JobStore(job_dir)
        self._tokenizer: tuple[str, Tokenizer | None] | None = None

    def submit(
        self,
        document: str | bytes | None = None,
        questions: Seq[str] = (),
        params: SamplingParams | None = None,
        *,
        document_path: str | os.PathLike[str] | None = None,
        encoding_errors: str = "strict",
        idempotency_key: str | None = None,
        owner: str | None = None,
    ) -> str:
        """Validate and queue a job; returns its id (see `Runtime.submit`; `owner`: the
        server's API key name it is submitted for, which then sees it and is accounted its
        tokens)."""
        info = self.store.service_info()
        model = str(info["model"]) if info is not None else None
        job = check_job(
            document,
            questions,
            params,
            document_path=document_path,
            encoding_errors=encoding_errors,
            idempotency_key=idempotency_key,
            tokenizer=self._load_tokenizer(model) if model is not None else None,
            session_len=int(info["session_len"]) if info is not None else None,
        )
        return self.store.submit(
            job.document, job.questions, job.params, idempotency_key, job.prefill_tokens, owner
        )

    def status(self, job_id: str) -> JobStatus:
        return self.store.status(job_id)

    def result(self, job_id: str, timeout: float | None = None) -> list[str]:
        return self.store.wait(job_id, timeout)

    def cancel(self, job_id: str) -> JobState:
        return self.store.cancel(job_id)

    def jobs(self, owner: str | None = None) -> list[JobStatus]:
        """Every job, oldest first (only `owner`'s when given)."""
        return self.store.list_jobs(owner)

    def close(self) -> None:
        self.store.close()

    def _load_tokenizer(self, model: str) -> Tokenizer | None:
        if self._tokenizer is None or self._tokenizer[0] != model:
            tok = Tokenizer.from_folder(model) if Path(model).is_dir() else None
            self._tokenizer = (model, tok)
        return self._tokenizer[1]
