"""The durable job queue: one SQLite database (WAL) in a job directory.

Every state change is one transaction, so any number of processes may submit, watch and cancel
jobs on the same directory while one service process runs them. After the service dies, the
next one to open the directory puts the jobs it was running back in the queue
(`requeue_running`); finished results stay readable. Documents, questions, parameters and
answers are stored as text / JSON, never pickled.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_runtime.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

DB_NAME = "jobs.sqlite3"
SERVICE_INFO = "service.json"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    idempotency_key TEXT UNIQUE,
    state TEXT NOT NULL,
    document TEXT NOT NULL,
    questions TEXT NOT NULL,
    params TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    prefill_tokens_done INTEGER NOT NULL DEFAULT 0,
    prefill_tokens_total INTEGER NOT NULL DEFAULT 0,
    tokens_generated INTEGER NOT NULL DEFAULT 0,
    answers TEXT,
    owner TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, seq);
"""


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class UnknownJobError(KeyError):
    """No job with this id in the store."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown job"


class JobFailedError(RuntimeError):
    """The job ended failed (or cancelled); the message carries its error."""


def _differ(differs: tuple[str, ...]) -> str:
    """`questions differ`, `document and generation settings differ`."""
    return f"{' and '.join(differs)} differ" if differs else "job differs"


class IdempotencyKeyConflictError(ValueError):
    """An idempotency key already used by a job with another document, questions or
    generation settings. `key`, `job_id` (the existing job) and `differs` (what differs)."""

    def __init__(self, key: str, job_id: str, differs: tuple[str, ...] = ()):
        self.key, self.job_id, self.differs = key, job_id, tuple(differs)
        super().__init__(
            f"idempotency_key {key!r} already belongs to job {job_id}, whose "
            f"{_differ(self.differs)}; resubmitting the same job with the key returns that "
            "id, a different job needs a new key"
        )

    @property
    def what_differs(self) -> str:
        return _differ(self.differs)

    def __reduce__(self) -> tuple[Any, ...]:  # pickles across processes (the Ray actor)
        return type(self), (self.key, self.job_id, self.differs)


@dataclass(frozen=True)
class JobStatus:
    """What `Runtime.status` / `jobs()` report about one job."""

    job_id: str
    state: JobState
    num_questions: int
    prefill_tokens_done: int
    prefill_tokens_total: int
    tokens_generated: int
    attempts: int
    error: str | None
    created: float
    updated: float

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["state"] = self.state.value
        return d


@dataclass(frozen=True)
class Job:
    """A job as the service runs it."""

    job_id: str
    document: str
    questions: list[str]
    params: SamplingParams
    attempts: int
    owner: str | None = None
    """Who submitted it (its requests are accounted to it)."""


def check_idempotency_key(key: object) -> None:
    if key is not None and (not isinstance(key, str) or not key):
        raise ValueError(f"idempotency_key must be a non-empty string or None, got {key!r:.80}")


def params_to_json(params: SamplingParams) -> str:
    d = dataclasses.asdict(params)
    d.pop("extra", None)
    return json.dumps(d)


def params_from_json(text: str) -> SamplingParams:
    d = json.loads(text)
    for key in ("stop_token_ids", "stop"):
        d[key] = tuple(d.get(key) or ())
    return SamplingParams(**d)


class JobStore:
    """Thread-safe handle on one job directory's database (one connection, one lock)."""

    def __init__(self, job_dir: str | os.PathLike[str]):
        if not isinstance(job_dir, (str, os.PathLike)) or not str(job_dir):
            raise ValueError(f"job_dir must be a directory path, got {job_dir!r:.80}")
        self.job_dir = Path(job_dir)
        try:
            self.job_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot create the job directory {str(job_dir)!r}: {e}") from e
        self.path = self.job_dir / DB_NAME
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.path, timeout=60.0, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self._tx():
            for stmt in _SCHEMA.strip().split(";"):
                if stmt.strip():
                    self._db.execute(stmt)
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(jobs)")}
            if "owner" not in columns:  # a job directory from before owners were kept
                self._db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT")
        try:  # SQLite's JSON functions (built in since 3.38, an option before)
            self._db.execute("SELECT json_extract('{}', '$.x')")
            self._json1 = True
        except sqlite3.OperationalError:
            self._json1 = False
            logger.warning("this SQLite has no json_extract: queued jobs start in arrival order "
                           "whatever their priority")  # fmt: skip

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- transactions -----------------------------------------------------------------------
    class _Tx:
        def __init__(self, store: JobStore):
            self.store = store

        def __enter__(self) -> sqlite3.Connection:
            self.store._lock.acquire()
            try:
                self.store._db.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.store._lock.release()
                raise
            return self.store._db

        def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
            try:
                self.store._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
            finally:
                self.store._lock.release()

    def _tx(self) -> JobStore._Tx:
        return JobStore._Tx(self)

    # -- submitters -------------------------------------------------------------------------
    def submit(
        self,
        document: str,
        questions: list[str],
        params: SamplingParams,
        idempotency_key: str | None = None,
        prefill_tokens_total: int = 0,
        owner: str | None = None,
    ) -> str:
        """Queue a job and return its id. With an idempotency key already used: the same
        job (document, questions and params equal) returns that job's id without queueing
        another; a different one raises IdempotencyKeyConflictError.
        prefill_tokens_total: the prompt tokens it will prefill, shown by status() at once.
        owner: who submitted it (the server's API key name); idempotency keys are per owner."""
        check_idempotency_key(idempotency_key)
        now = time.time()
        stored_key = idempotency_key
        if idempotency_key is not None and owner is not None:
            stored_key = f"{owner}\x00{idempotency_key}"  # another owner's key is another key
        with self._tx() as db:
            if idempotency_key is not None:
                row = db.execute(
                    "SELECT id, document, questions, params FROM jobs WHERE idempotency_key = ?",
                    (stored_key,),
                ).fetchone()
                if row is not None:
                    differs = _differences(row[1:], document, questions, params)
                    if differs:
                        raise IdempotencyKeyConflictError(idempotency_key, str(row[0]), differs)
                    return str(row[0])
            job_id = uuid.uuid4().hex
            db.execute(
                "INSERT INTO jobs (id, idempotency_key, state, document, questions, params, "
                "prefill_tokens_total, created, updated, owner) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    stored_key,
                    JobState.QUEUED.value,
                    document,
                    json.dumps(questions),
                    params_to_json(params),
                    prefill_tokens_total,
                    now,
                    now,
                    owner,
                ),
            )
        return job_id

    def owner(self, job_id: str) -> str | None:
        """Who submitted a job (None: unknown, or no owner given); UnknownJobError for none."""
        with self._tx() as db:
            row = db.execute("SELECT owner FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise UnknownJobError(f"no job {job_id!r} in {self.path}")
        return None if row[0] is None else str(row[0])

    def status(self, job_id: str) -> JobStatus:
        with self._tx() as db:
            row = db.execute(f"SELECT {_STATUS_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
            found = row.fetchone()
        if found is None:
            raise UnknownJobError(f"no job {job_id!r} in {self.path}")
        return _status(found)

    def list_jobs(self, owner: str | None = None) -> list[JobStatus]:
        """Every job, oldest first (only `owner`'s when given)."""
        with self._tx() as db:
            if owner is None:
                rows = db.execute(f"SELECT {_STATUS_COLUMNS} FROM jobs ORDER BY seq").fetchall()
            else:
                rows = db.execute(
                    f"SELECT {_STATUS_COLUMNS} FROM jobs WHERE owner = ? ORDER BY seq", (owner,)
                ).fetchall()
        return [_status(r) for r in rows]

    def count_by_state(self) -> dict[str, int]:
        """How many jobs are in each state (every state listed, zeros included)."""
        with self._tx() as db:
            rows = db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        counts = {state.value: 0 for state in JobState}
        counts.update({str(state): int(n) for state, n in rows})
        return counts

    def answers(self, job_id: str) -> list[str]:
        """A done job's answers; JobFailedError for a failed or cancelled job."""
        with self._tx() as db:
            row = db.execute(
                "SELECT state, answers, error FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
        if row is None:
            raise UnknownJobError(f"no job {job_id!r} in {self.path}")
        state = JobState(row[0])
        if state is JobState.DONE:
            return list(json.loads(row[1]))
        if state in (JobState.FAILED, JobState.CANCELLED):
            raise JobFailedError(f"job {job_id} {state.value}: {row[2]}")
        raise ValueError(f"job {job_id} is {state.value}, not finished")

    def cancel(self, job_id: str) -> JobState:
        """Cancel a queued job now, or ask the service to stop a running one; returns the
        state the job had (a finished job is left as it is)."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise UnknownJobError(f"no job {job_id!r} in {self.path}")
            state = JobState(row[0])
            if state is JobState.QUEUED:
                db.execute(
                    "UPDATE jobs SET state = ?, error = ?, updated = ? WHERE id = ?",
                    (JobState.CANCELLED.value, "cancelled before it started", now, job_id),
                )
                return state
            if state is JobState.RUNNING:
                db.execute(
                    "UPDATE jobs SET cancel_requested = 1, updated = ? WHERE id = ?",
                    (now, job_id),
                )
            return state

    def wait(self, job_id: str, timeout: float | None = None) -> list[str]:
        """Block until a job ends; its answers, or JobFailedError / TimeoutError."""
        if timeout is not None and (
            not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout >= 0
        ):
            raise ValueError(
                f"timeout must be a number of seconds >= 0 or None, got {timeout!r:.80}"
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.01
        while not self.status(job_id).state.is_final:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.25)
        return self.answers(job_id)

    def service_info(self) -> dict[str, Any] | None:
        """What the service serving this directory wrote about itself (model, session_len)."""
        path = self.job_dir / SERVICE_INFO
        try:
            return dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return None

    def write_service_info(self, info: dict[str, Any]) -> None:
        tmp = self.job_dir / f".{SERVICE_INFO}.{os.getpid()}"
        tmp.write_text(json.dumps(info), encoding="utf-8")
        os.replace(tmp, self.job_dir / SERVICE_INFO)

    # -- the service ------------------------------------------------------------------------
    def requeue_running(self) -> int:
        """Put jobs a dead service was running back in the queue; returns how many."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET state = ?, updated = ? WHERE state = ?",
                (JobState.QUEUED.value, time.time(), JobState.RUNNING.value),
            )
            return cur.rowcount

    def requeue(self, job_id: str, count_attempt: bool = True) -> None:
        """Put one running job back in the queue. count_attempt=False when its service is
        stopping on purpose: that run is not an attempt, so stops never use up
        max_job_attempts (a failure's run, or a crash's, is one)."""
        undo = 0 if count_attempt else 1
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state = ?, attempts = MAX(attempts - ?, 0), updated = ? "
                "WHERE id = ? AND state = ?",
                (JobState.QUEUED.value, undo, time.time(), job_id, JobState.RUNNING.value),
            )

    def claim(
        self, busy: Mapping[str | None, int] | None = None, aging_s: float = 0.0
    ) -> Job | None:
        """Take a queued job (now running, one more attempt), or None: of the jobs within a
        priority level of the most important (a job's priority, less a level for every
        `aging_s` seconds it has waited, as the scheduler ages requests; 0: no aging), the
        oldest; with `busy` (jobs running per owner) the oldest of an owner running the
        fewest, so one owner's hundred queued jobs take turns with another's one."""
        rank = "COALESCE(json_extract(params, '$.priority'), 0)" if self._json1 else "0"
        args: list[Any] = [JobState.QUEUED.value]
        if aging_s > 0:
            rank += " - (? - created) / ?"
            args = [time.time(), aging_s, *args]
        ranked = f"SELECT owner, seq, {rank} AS rank FROM jobs WHERE state = ?"
        with self._tx() as db:
            heads = db.execute(  # each owner's oldest job within a level of the best
                f"WITH q AS ({ranked}) SELECT owner, MIN(seq) FROM q "
                "WHERE rank < (SELECT MIN(rank) FROM q) + 1 GROUP BY owner",
                args,
            ).fetchall()
            if not heads:
                return None
            owners = busy or {}
            key = (lambda h: (owners.get(h[0], 0), h[1])) if busy is not None else (lambda h: h[1])
            _, seq = min(heads, key=key)
            row = db.execute(
                "SELECT id, document, questions, params, attempts, owner FROM jobs WHERE seq = ?",
                (seq,),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = ?, attempts = attempts + 1, updated = ?, "
                "prefill_tokens_done = 0, tokens_generated = 0 WHERE id = ?",
                (JobState.RUNNING.value, time.time(), row[0]),
            )
        return Job(
            job_id=row[0],
            document=row[1],
            questions=list(json.loads(row[2])),
            params=params_from_json(row[3]),
            attempts=row[4] + 1,
            owner=row[5],
        )

    def cancel_requested(self, job_id: str) -> bool:
        with self._tx() as db:
            row = db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row[0])

    def progress(self, job_id: str, prefill_done: int, prefill_total: int, generated: int) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET prefill_tokens_done = ?, prefill_tokens_total = ?, "
                "tokens_generated = ?, updated = ? WHERE id = ? AND state = ?",
                (prefill_done, prefill_total, generated, time.time(), job_id, "running"),
            )

    def finish(self, job_id: str, answers: list[str]) -> None:
        self._end(job_id, JobState.DONE, None, json.dumps(answers))

    def fail(self, job_id: str, error: str) -> None:
        self._end(job_id, JobState.FAILED, error, None)

    def mark_cancelled(self, job_id: str) -> None:
        self._end(job_id, JobState.CANCELLED, "cancelled while running", None)

    def _end(self, job_id: str, state: JobState, error: str | None, answers: str | None) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state = ?, error = ?, answers = ?, updated = ? WHERE id = ?",
                (state.value, error, answers, time.time(), job_id),
            )


def _differences(
    stored: tuple[Any, ...], document: str, questions: list[str], params: SamplingParams
) -> tuple[str, ...]:
    """What of a job differs from a stored row's (document, questions, params) columns."""
    doc, qs, ps = stored
    differs = []
    if doc != document:
        differs.append("document")
    if json.loads(qs) != list(questions):
        differs.append("questions")
    try:  # through SamplingParams: a row written before a field existed gets its default
        same_params = params_to_json(params_from_json(ps)) == params_to_json(params)
    except (TypeError, ValueError):
        same_params = False
    if not same_params:
        differs.append("generation settings")
    return tuple(differs)


_STATUS_COLUMNS = (
    "id, state, questions, prefill_tokens_done, prefill_tokens_total, tokens_generated, "
    "attempts, error, created, updated"
)


def _status(row: tuple[Any, ...]) -> JobStatus:
    return JobStatus(
        job_id=row[0],
        state=JobState(row[1]),
        num_questions=len(json.loads(row[2])),
        prefill_tokens_done=row[3],
        prefill_tokens_total=row[4],
        tokens_generated=row[5],
        attempts=row[6],
        error=row[7],
        created=row[8],
        updated=row[9],
    )
