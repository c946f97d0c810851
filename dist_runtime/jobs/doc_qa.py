"""Document QA prompts and job validation, shared by the Runtime and job submitters.

A document question is one chat turn with the document first and the question after it, so
every question on a document shares the document's tokens as a prefix (and its KV blocks).
"""

from __future__ import annotations

import os
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path

from dist_runtime.jobs.store import check_idempotency_key
from dist_runtime.sampling_params import SamplingParams, check_answers
from dist_runtime.text.chat import encode_chat
from dist_runtime.text.tokenizer import Tokenizer


@dataclass(frozen=True)
class JobRequest:
    """A validated document-QA job, ready to queue."""

    document: str
    questions: list[str]
    params: SamplingParams
    prompts: list[list[int]] | None
    """Token ids of each question's prompt; None when no tokenizer was at hand to check."""

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens the job covers (0 when unknown); the document's part is computed once
        and shared by every question."""
        return sum(len(p) for p in self.prompts) if self.prompts is not None else 0


def check_job(
    document: str | bytes | None,
    questions: Seq[str],
    params: SamplingParams | None,
    *,
    document_path: str | os.PathLike[str] | None = None,
    encoding_errors: str = "strict",
    idempotency_key: str | None = None,
    tokenizer: Tokenizer | None = None,
    session_len: int | None = None,
) -> JobRequest:
    """The one check of a job before it is queued, for every submitter: the idempotency key,
    the document (text, UTF-8 bytes or a file), the questions, the sampling parameters and,
    given the model's tokenizer and session_len, the longest prompt against session_len."""
    check_idempotency_key(idempotency_key)
    text = read_document(document, document_path, encoding_errors)
    if isinstance(questions, str) or not isinstance(questions, Seq) or not questions:
        raise ValueError(
            "questions must be a non-empty list of strings, got "
            f"{questions if isinstance(questions, str) else questions!r:.80}"
        )
    for q in questions:
        qa_prompt(text, q)  # each question a non-empty string
    params = job_params(params)
    prompts = None
    if tokenizer is not None:
        prompts = qa_prompts(tokenizer, text, questions)
        if session_len is not None:
            check_fits(prompts, params, session_len)
    return JobRequest(text, list(questions), params, prompts)


def read_document(
    document: str | bytes | None,
    path: str | os.PathLike[str] | None,
    errors: str = "strict",
) -> str:
    """A job's document text from a string, UTF-8 bytes, or a file."""
    if errors not in ("strict", "replace"):
        raise ValueError(f"encoding_errors must be 'strict' or 'replace', got {errors!r}")
    if (document is None) == (path is None):
        raise ValueError("give exactly one of document (text or bytes) and document_path")
    where = "document"
    if path is not None:
        where = f"document_path {str(path)!r}"
        try:
            document = Path(path).read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read {where}: {e.strerror or e}") from e
    if isinstance(document, (bytes, bytearray)):
        try:
            document = bytes(document).decode("utf-8", errors=errors)
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{where} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                f"{e.start}); convert it to UTF-8, or pass encoding_errors='replace' to decode "
                "with replacement characters"
            ) from e
    if not isinstance(document, str) or not document.strip():
        raise ValueError(f"{where} must be non-empty text, got {document!r:.80}")
    return document


def qa_prompt(document: str, question: str) -> str:
    """The user turn of a document question: the document first, then the question."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"each question must be a non-empty string, got {question!r:.80}")
    return (
        f"{document}\n\nAnswer the question about the document above briefly.\nQuestion: {question}"
    )


def qa_prompts(tokenizer: Tokenizer, document: str, questions: Seq[str]) -> list[list[int]]:
    """Token ids of one chat prompt per question (document first)."""
    if not isinstance(document, str) or not document.strip():
        raise ValueError("document must be a non-empty string")
    if isinstance(questions, str) or not questions:
        raise ValueError(
            "questions must be a non-empty list of strings, got "
            f"{questions if isinstance(questions, str) else list(questions)!r:.80}"
        )
    return [
        encode_chat(tokenizer, [{"role": "user", "content": qa_prompt(document, q)}])
        for q in questions
    ]


def job_params(params: SamplingParams | None) -> SamplingParams:
    """A QA job's sampling parameters: greedy with up to 128 new tokens unless given."""
    if params is None:
        return SamplingParams(max_new_tokens=128, temperature=0.0)
    if not isinstance(params, SamplingParams):
        raise ValueError(
            f"params must be a SamplingParams or None, got {type(params).__name__} "
            f"{params!r:.80}; build one with SamplingParams(max_new_tokens=..., ...)"
        )
    return check_answers(params)


def check_fits(prompts: list[list[int]], params: SamplingParams, session_len: int) -> None:
    """Refuse a job whose longest prompt plus its new tokens passes session_len."""
    longest = max(len(p) for p in prompts)
    if longest + params.max_new_tokens > session_len:
        raise ValueError(
            f"the document's longest prompt has {longest} tokens + max_new_tokens "
            f"{params.max_new_tokens} = {longest + params.max_new_tokens}, over session_len "
            f"{session_len}; raise session_len (with --cp for long documents), lower "
            "max_new_tokens or shorten the document"
        )
