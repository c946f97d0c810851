"""Submit to and watch a job directory from any process that can reach its files.

The service (`launch/run.py --serve`, or any Runtime after `serve_jobs()`) records its model
and session length in the directory, so a client validates a job exactly as the service would
(tokenized with the model's tokenizer and chat template) before queueing it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence as Seq
from pathlib import Path

from dist_runtime.doc_qa import check_fits, job_params, qa_prompts, read_document
from dist_runtime.job_store import JobState, JobStatus, JobStore, check_idempotency_key
from dist_runtime.sampling_params import SamplingParams
from dist_runtime.tokenizer import Tokenizer


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
    ) -> str:
        """Validate and queue a job; returns its id (see `Runtime.submit`)."""
        check_idempotency_key(idempotency_key)
        text = read_document(document, document_path, encoding_errors)
        if isinstance(questions, str) or not questions:
            raise ValueError("questions must be a non-empty list of strings")
        params = job_params(params)
        info = self.store.service_info()
        if info is not None:
            tokenizer = self._load_tokenizer(str(info["model"]))
            if tokenizer is not None:
                check_fits(qa_prompts(tokenizer, text, questions), params, int(info["session_len"]))
        for i, q in enumerate(questions):
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"question {i} must be a non-empty string, got {q!r:.80}")
        return self.store.submit(text, list(questions), params, idempotency_key)

    def status(self, job_id: str) -> JobStatus:
        return self.store.status(job_id)

    def result(self, job_id: str, timeout: float | None = None) -> list[str]:
        return self.store.wait(job_id, timeout)

    def cancel(self, job_id: str) -> JobState:
        return self.store.cancel(job_id)

    def jobs(self) -> list[JobStatus]:
        return self.store.list_jobs()

    def close(self) -> None:
        self.store.close()

    def _load_tokenizer(self, model: str) -> Tokenizer | None:
        if self._tokenizer is None or self._tokenizer[0] != model:
            tok = Tokenizer.from_folder(model) if Path(model).is_dir() else None
            self._tokenizer = (model, tok)
        return self._tokenizer[1]
