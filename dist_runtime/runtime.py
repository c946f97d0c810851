"""The public entry point: `Runtime` starts the workers and serves blocking `generate()` calls.

from dist_runtime import Runtime, SamplingParams
with Runtime(model="path/to/hf_folder", tp=2, session_len=4096, device="cpu") as rt:
    outs = rt.generate(["prompt"], SamplingParams(max_new_tokens=16, temperature=0.0))
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq
from typing import Any

from tqdm import tqdm

from dist_runtime.block_manager import BlockManager
from dist_runtime.chat import MessageLike, encode_chat, history_to_messages
from dist_runtime.config import (
    CacheConfig,
    ConfigError,
    ParallelConfig,
    RuntimeConfig,
    SchedulerConfig,
    build_section,
)
from dist_runtime.doc_qa import check_fits, job_params, qa_prompts, read_document
from dist_runtime.executor import Executor, WorkerError, create_executor
from dist_runtime.job_runner import JobRunner
from dist_runtime.job_store import JobState, JobStatus, JobStore, check_idempotency_key
from dist_runtime.outputs import RequestOutput, TokenLogprobs
from dist_runtime.protocol import SampledToken
from dist_runtime.sampling_params import SamplingParams
from dist_runtime.scheduler import Scheduler, SeqStatus, Sequence
from dist_runtime.text_stream import TextStream
from dist_runtime.tokenizer import IncrementalDetokenizer, Tokenizer
from workers.checkpoint import CheckpointReader
from workers.models.layouts import check_checkpoint

logger = logging.getLogger(__name__)

PREFIX_PASS = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
"""The pass that computes a document's shared prefix once: its one sampled token is dropped."""

Prompt = str | list[int]


class Runtime:
    def __init__(
        self,
        model: str | None = None,
        *,
        tp: int | None = None,
        cp: int | None = None,
        session_len: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        config: RuntimeConfig | None = None,
        **overrides: Any,
    ):
        self.config = _build_config(model, tp, cp, session_len, device, dtype, config, overrides)
        self._lock = threading.RLock()
        """Serialises the scheduler: direct calls and the job runner's thread take turns."""
        self._jobs: JobStore | None = None
        self._runner: JobRunner | None = None
        self._job_tmp: tempfile.TemporaryDirectory[str] | None = None
        self.executor: Executor | None = None
        self._shut_down = False
        self.model_config = self.config.load_model_config()
        self.config.parallel.check_model(self.model_config)
        self.config.check_session_len(self.model_config)
        if self.config.load_format == "safetensors":
            # Headers only: a bad checkpoint fails here, before any worker starts.
            reader = CheckpointReader(self.config.model)
            check_checkpoint(self.model_config, reader)
            reader.close()
        self.tokenizer = Tokenizer.from_folder(self.config.model)
        self._rng = random.Random(self.config.seed)
        self._seq_ids = itertools.count()
        self.num_worker_restarts = 0
        """Times a dead or hung worker made the runtime replace its whole worker group."""
        self._start_workers()
        self.scheduler = Scheduler(self.config.scheduler, self.blocks)
        self._eos_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None:
            self._eos_ids |= set(self.tokenizer.eos_token_ids)
        logger.info(
            "runtime ready: %s, tp=%d cp=%d, %d KV blocks of %d tokens",
            self.config.model,
            self.config.parallel.tp,
            self.config.parallel.cp,
            self.blocks.num_blocks,
            self.config.cache.block_size,
        )

    def _start_workers(self) -> None:
        """A new worker group (new processes) and an empty KV cache for it."""
        self.executor = create_executor(self.config)
        try:
            num_blocks = self.executor.num_available_blocks()
            if self.config.cache.num_blocks is None:
                self._check_session_fits(num_blocks)
            # Anything that changes K/V for the same tokens salts the prefix-cache hashes.
            salt = hash(
                (
                    self.model_config.rope_theta,
                    str(self.model_config.rope_scaling),
                    self.config.resolved_dtype(),
                )
            )
            self.blocks = BlockManager(
                num_blocks,
                self.config.cache.block_size,
                self.config.cache.enable_prefix_caching,
                salt,
                cp_size=self.config.parallel.cp,
            )
            self.executor.allocate_kv_cache(num_blocks)
        except BaseException:
            self.shutdown()
            raise

    def _recover(self, error: Exception) -> None:
        """A worker died or hung: kill the whole group (never reusing its process group),
        start a fresh one, and restart every in-flight sequence from its first token."""
        logger.error("worker failure, replacing the worker group: %s", error)
        old = self.executor
        self.executor = None
        owned_ray = bool(getattr(old, "_owns_ray", False))
        if old is not None:
            old.shutdown(keep_ray=True)
        self._start_workers()
        if owned_ray:  # the new group inherits the Ray instance the old one started
            setattr(self.executor, "_owns_ray", True)  # noqa: B010
        self.scheduler.reset(self.blocks)
        self.num_worker_restarts += 1

    def _check_session_fits(self, num_blocks: int) -> None:
        """Fail at start when one full session cannot fit in the KV memory the workers have."""
        bs, cp, tp = self.config.cache.block_size, self.config.parallel.cp, self.config.parallel.tp
        session = self.config.session_len
        per_rank = num_blocks * bs
        if per_rank * cp >= session or num_blocks < 1:  # no KV at all: BlockManager says so
            return
        need_cp = -(-session // max(per_rank, 1))
        raise ConfigError(
            f"session_len {session} does not fit: the KV memory left on each worker holds "
            f"{num_blocks} blocks of {bs} tokens, {per_rank * cp} tokens over cp={cp}; "
            f"use --cp {need_cp} (KV is split over cp ranks), raise --tp (shards KV heads and "
            f"weights; now {tp}), or shorten --session-len to {per_rank * cp} "
            "(`launch/run.py --dry-run` prints the plan)"
        )

    # -- public API -------------------------------------------------------------------------
    def generate(
        self,
        prompts: Seq[Prompt],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); blocks until all are done."""
        return self._generate(prompts, params, use_tqdm)

    def _generate(
        self,
        prompts: Seq[Prompt],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
        on_step: Callable[[list[Sequence]], None] | None = None,
    ) -> list[RequestOutput]:
        """generate() with a callback after every step (it may raise to abort the call)."""
        with self._lock:
            seqs = self._submit(prompts, params)
            num_prompt = sum(len(s.prompt_token_ids) for s in seqs)
            prefill = tqdm(total=num_prompt, desc="prefill", unit="tok", disable=not use_tqdm)
            done = tqdm(total=len(seqs), desc="generate", unit="seq", disable=not use_tqdm)

            def step_done() -> None:
                if use_tqdm:
                    n = sum(min(s.num_computed_tokens, len(s.prompt_token_ids)) for s in seqs)
                    prefill.update(max(n - prefill.n, 0))
                if on_step is not None:
                    on_step(seqs)

            try:
                for _seq, finished in self._drive(seqs, step_done):
                    if finished:
                        done.update(1)
                if on_step is not None:  # the last step's tokens arrived after its callback
                    on_step(seqs)
            finally:
                prefill.close()
                done.close()
            return [self._output(seq) for seq in seqs]

    def generate_stream(
        self, prompt: Prompt, params: SamplingParams | None = None
    ) -> Iterator[str]:
        """Yield the text of one prompt's output in pieces as tokens arrive.

        The pieces concatenate to exactly `generate([prompt], params)[0].text`. Closing the
        iterator early releases the sequence.
        """
        if self.tokenizer is None:
            raise ValueError(f"{self.config.model} has no tokenizer; streaming text needs one")
        with self._lock:
            (seq,) = self._submit([prompt], params)
            for _, finished in self._drive([seq]):
                delta = seq.text_state.release(finished)
                if delta:
                    yield delta

    def chat(
        self,
        messages: str | Seq[MessageLike],
        history: Seq[tuple[str, str]] = (),
        system: str | None = None,
        params: SamplingParams | None = None,
    ) -> tuple[str, list[Any]]:
        """One chat turn through the model's chat template; returns (reply, new history).

        `rt.chat("question", history=[(user, assistant), ...])` works like HF's
        `model.chat(tokenizer, query, history)` and returns the history with the new pair;
        `rt.chat([{"role": "user", "content": "..."}, ...])` returns the messages with the
        assistant's reply appended. Greedy with up to 512 new tokens unless params say otherwise.
        """
        if self.tokenizer is None:
            raise ValueError(f"{self.config.model} has no tokenizer; chat needs one")
        if not isinstance(messages, str) and (
            isinstance(messages, bytes) or not isinstance(messages, Seq) or not messages
        ):
            raise ValueError(
                "messages must be a question string or a non-empty list of chat messages, got "
                f"{type(messages).__name__} {messages!r:.80}"
            )
        turns: list[MessageLike] = (
            list(history_to_messages(messages, history, system))
            if isinstance(messages, str)
            else list(messages)
        )
        ids = encode_chat(self.tokenizer, turns)
        params = params or SamplingParams(max_new_tokens=512, temperature=0.0)
        reply = self.generate([ids], params)[0].text
        if isinstance(messages, str):
            return reply, [*history, (messages, reply)]
        return reply, [*turns, {"role": "assistant", "content": reply}]

    def ask(
        self,
        document: str,
        questions: Seq[str],
        params: SamplingParams | None = None,
        use_tqdm: bool = False,
    ) -> list[str]:
        """Answer each question about `document`; blocks until all answers are in.

        Each prompt puts the document first and the question after it (through the chat
        template), so every question on one document shares the document's tokens as a prefix.
        """
        params = job_params(params)
        prompts = self._qa_prompts(document, questions)
        check_fits(prompts, params, self.config.session_len)
        with self._lock:
            self._prefill_shared_prefix(prompts)
            outs = self._generate(prompts, params, use_tqdm=use_tqdm)
        return [o.text for o in outs]

    def _qa_prompts(self, document: str, questions: Seq[str]) -> list[list[int]]:
        if self.tokenizer is None:
            raise ValueError(f"{self.config.model} has no tokenizer; document QA needs one")
        return qa_prompts(self.tokenizer, document, questions)

    def _answer_batch(
        self,
        items: list[tuple[list[list[int]], SamplingParams]],
        on_step: Callable[[int, list[Sequence], bool], bool],
        on_done: Callable[[int, list[str]], None],
    ) -> None:
        """Answer several jobs together: items[i] = (job i's prompts, its params).

        The jobs' shared-prefix passes run as one batch, then every question of every job
        decodes in one batch. After each step, on_step(i, job i's sequences, is_prefix_pass)
        runs for each job still live; returning False cancels that job alone (its sequences
        are aborted, their blocks freed). on_done(i, answers) runs as soon as job i's last
        answer is complete. An exception from a callback or the workers aborts the rest.
        """
        live = set(range(len(items)))
        with self._lock:
            prefix = {}
            for i, (prompts, _) in enumerate(items):
                shared = self._shared_prefix(prompts)
                if shared is not None:
                    prefix[i] = self._submit([shared], PREFIX_PASS)
            self._run_groups(prefix, live, on_step, None)
            groups = {i: self._submit(*items[i]) for i in sorted(live)}
            self._run_groups(groups, live, on_step, on_done)

    def _run_groups(
        self,
        groups: dict[int, list[Sequence]],
        live: set[int],
        on_step: Callable[[int, list[Sequence], bool], bool],
        on_done: Callable[[int, list[str]], None] | None,
    ) -> None:
        """Drive every group's sequences together (see _answer_batch); on_done None marks the
        shared-prefix pass."""
        owner = {seq.seq_id: i for i, seqs in groups.items() for seq in seqs}
        is_prefix = on_done is None
        done: set[int] = set()

        def report(i: int) -> None:
            if i in live and not on_step(i, groups[i], is_prefix):
                live.discard(i)
                for seq in groups[i]:
                    self.scheduler.abort(seq)

        def after_step() -> None:
            for i in groups:
                if i not in done:
                    report(i)

        for seq, finished in self._drive([s for g in groups.values() for s in g], after_step):
            i = owner[seq.seq_id]
            if not finished or i in done or i not in live:
                continue
            if all(s.status is SeqStatus.FINISHED for s in groups[i]):
                done.add(i)
                report(i)  # the closing call: the last step's tokens are in
                if on_done is not None and i in live:
                    on_done(i, [self._output(s).text for s in groups[i]])

    # -- durable jobs -----------------------------------------------------------------------
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
        """Queue a document-QA job and return its id at once.

        The job is validated here (document text, questions, the longest prompt against
        session_len) and stored durably in the job directory (`job_dir`); a background thread
        runs queued jobs. `document_path` reads a file; bytes that are not UTF-8 are an error
        unless encoding_errors="replace". A repeated idempotency key returns the first job's id.
        """
        self._check_serving()
        check_idempotency_key(idempotency_key)
        text = read_document(document, document_path, encoding_errors)
        if isinstance(questions, str) or not questions:
            raise ValueError("questions must be a non-empty list of strings")
        params = job_params(params)
        check_fits(self._qa_prompts(text, questions), params, self.config.session_len)
        store = self._job_store()
        job_id = store.submit(text, list(questions), params, idempotency_key)
        self._job_runner().start()
        return job_id

    def status(self, job_id: str) -> JobStatus:
        """State (queued/running/done/failed/cancelled), prefill tokens done/total, tokens
        generated, attempts and error of one job."""
        return self._job_store().status(job_id)

    def result(self, job_id: str, timeout: float | None = None) -> list[str]:
        """Wait for a job's answers; raises JobFailedError with its error if it failed or was
        cancelled, TimeoutError after `timeout` seconds."""
        return self._job_store().wait(job_id, timeout)

    def cancel(self, job_id: str) -> JobState:
        """Cancel a job: a queued one at once, a running one at its next step (its KV blocks
        return to the pool). Returns the state the job had."""
        return self._job_store().cancel(job_id)

    def jobs(self) -> list[JobStatus]:
        """Every job in the job directory, oldest first."""
        return self._job_store().list_jobs()

    def serve_jobs(self) -> JobRunner:
        """Start running the job directory's queued jobs (and those a dead service left
        running) in the background; submit() does this too."""
        self._check_serving()
        runner = self._job_runner()
        runner.start()
        return runner

    def _check_serving(self) -> None:
        """Refuse new jobs on a shut-down runtime: nothing would run them."""
        if self._shut_down:
            raise RuntimeError(
                "this Runtime was shut down; create a new one (queued jobs stay in job_dir; "
                "JobClient(job_dir) reads them without a Runtime)"
            )

    def _job_store(self) -> JobStore:
        if self._jobs is None:
            # After shutdown the store is closed; reopening it here would leave a stray
            # temporary directory behind. A JobClient reads a job_dir without a Runtime.
            self._check_serving()
            job_dir = self.config.job_dir
            if job_dir is None:
                self._job_tmp = tempfile.TemporaryDirectory(prefix="dist_runtime_jobs_")
                job_dir = self._job_tmp.name
            self._jobs = JobStore(job_dir)
        return self._jobs

    def _job_runner(self) -> JobRunner:
        if self._runner is None:
            store = self._job_store()
            store.write_service_info(
                {
                    "model": self.config.model,
                    "session_len": self.config.session_len,
                    "tp": self.config.parallel.tp,
                    "cp": self.config.parallel.cp,
                    "pid": os.getpid(),
                    "started": time.time(),
                }
            )
            self._runner = JobRunner(self, store)
        return self._runner

    def prefix_cache_stats(self) -> dict[str, float]:
        """Prompt tokens looked up in the prefix cache, found there, and the hit rate."""
        queried, hits = self.blocks.num_queried_tokens, self.blocks.num_hit_tokens
        return {
            "queried_tokens": queried,
            "hit_tokens": hits,
            "hit_rate": hits / queried if queried else 0.0,
        }

    def worker_memory(self) -> list[dict[str, int]]:
        """Each worker's peak resident bytes and KV cache bytes (and CUDA peak), by rank."""
        if self.executor is None:
            raise RuntimeError("this runtime is shut down")
        return self.executor.memory_stats()

    def _shared_prefix(self, prompts: list[list[int]]) -> list[int] | None:
        """The prompts' common prefix when it fills at least one cache block (and caching is
        on), else None."""
        if len(prompts) < 2 or not self.blocks.enable_prefix_caching:
            return None
        shared = len(os.path.commonprefix(prompts))
        return prompts[0][:shared] if shared >= self.blocks.block_size else None

    def _prefill_shared_prefix(self, prompts: list[list[int]]) -> None:
        """Compute the prompts' common prefix once so every prompt finds it in the cache
        (prompts admitted in the same step cannot share blocks none of them has computed)."""
        shared = self._shared_prefix(prompts)
        if shared is not None:
            self._generate([shared], PREFIX_PASS)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(
                f"{self.config.model} has no tokenizer (tokenizer.json or tokenizer.model); "
                "pass token ids instead of text"
            )
        return self.tokenizer.encode(text)

    def shutdown(self) -> None:
        self._shut_down = True
        if self._runner is not None:
            self._runner.stop()
            self._runner = None
        if self._jobs is not None:
            self._jobs.close()
            self._jobs = None
        if self.executor is not None:
            self.executor.shutdown()
            self.executor = None
        if self._job_tmp is not None:
            self._job_tmp.cleanup()
            self._job_tmp = None

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- internals --------------------------------------------------------------------------
    def _submit(
        self, prompts: Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None
    ) -> list[Sequence]:
        if self.executor is None:
            raise RuntimeError("this Runtime was shut down; create a new one")
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Seq) or not prompts:
            raise ValueError(
                "prompts must be a non-empty list of strings or token-id lists, got "
                f"{type(prompts).__name__} {prompts!r:.80}"
            )
        plist = _per_prompt(params, len(prompts))
        seqs = [self._make_sequence(p, sp, i) for i, (p, sp) in enumerate(zip(prompts, plist))]
        for seq in seqs:
            self.scheduler.add(seq)
        return seqs

    def _make_sequence(self, prompt: Prompt, params: SamplingParams, index: int) -> Sequence:
        if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, (str, Seq)):
            raise ValueError(
                f"prompt {index} must be a string or a list of token ids, got "
                f"{type(prompt).__name__} {prompt!r:.80}"
            )
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        _check_ids(ids, self.model_config.vocab_size, index)
        total = len(ids) + params.max_new_tokens
        if total > self.config.session_len:
            raise ValueError(
                f"prompt {index} has {len(ids)} tokens + max_new_tokens {params.max_new_tokens} "
                f"= {total}, over session_len {self.config.session_len}; raise session_len or "
                "shorten the prompt"
            )
        if total > self.blocks.capacity_tokens:
            raise ValueError(
                f"prompt {index} needs {total} tokens of KV cache but the cache holds "
                f"{self.blocks.capacity_tokens} ({self.blocks.num_blocks} blocks of "
                f"{self.blocks.block_size} per cp rank x cp={self.blocks.cp_size}); give the "
                "workers more KV memory, raise cp, or shorten it"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError(
                f"prompt {index}: stop strings need a tokenizer, and "
                f"{self.config.model} has none; use stop_token_ids"
            )
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        seq = Sequence(seq_id=next(self._seq_ids), prompt_token_ids=ids, params=params, seed=seed)
        base = self.model_config.rope_base(len(ids))
        if base != self.model_config.rope_theta:
            seq.rope_base = base
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(
                self.tokenizer, skip_special_tokens=params.skip_special_tokens
            )
            seq.text_state = TextStream(detok, params.stop)
        return seq

    def _drive(
        self, seqs: list[Sequence], on_step: Callable[[], None] | None = None
    ) -> Iterator[tuple[Sequence, bool]]:
        """Run steps until every seq finishes; yields (seq, finished) per sampled token.

        Whatever ends the loop early (an error, a closed stream) aborts the unfinished seqs so
        their blocks return to the pool.
        """
        if self.executor is None:
            raise RuntimeError(
                "this runtime has no workers (it was shut down, or replacing failed workers "
                "failed); create a new Runtime"
            )
        pending = {s.seq_id: s for s in seqs}
        try:
            while pending:
                for seq in [s for s in pending.values() if s.status is SeqStatus.FINISHED]:
                    del pending[seq.seq_id]  # finished while another call drove the steps
                    yield seq, True
                if not pending:
                    break
                plan, _ = self.scheduler.schedule()
                if not plan.seqs:
                    raise RuntimeError(
                        "the scheduler made no progress; the KV cache is too small "
                        "for any waiting sequence"
                    )
                try:
                    result = self.executor.execute(plan)
                except WorkerError as e:
                    self._recover(e)
                    raise WorkerError(
                        f"{e}; the runtime replaced its workers and dropped the requests in "
                        "flight: submit them again"
                    ) from e
                self.scheduler.on_step_done(plan)
                if on_step is not None:
                    on_step()
                for tok in result.tokens:
                    seq = self.scheduler.get(tok.seq_id)
                    finished = self._append(seq, tok)
                    if finished:
                        pending.pop(seq.seq_id, None)
                    if seq.seq_id in pending or finished:
                        yield seq, finished
        finally:
            for seq in pending.values():
                self.scheduler.abort(seq)

    def _append(self, seq: Sequence, tok: SampledToken) -> bool:
        """Record a sampled token; True when the sequence finished."""
        seq.output_token_ids.append(tok.token_id)
        if seq.params.logprobs is not None:
            seq.logprobs.append((tok.token_id, tok.logprob, tok.top_ids, tok.top_logprobs))
        hit_stop = seq.text_state is not None and seq.text_state.add(tok.token_id)
        reason = "stop" if hit_stop else self._stop_reason(seq, tok.token_id)
        if reason is None:
            return False
        if seq.text_state is not None:
            seq.text_state.finish()
        self.scheduler.finish(seq, reason)
        return True

    def _stop_reason(self, seq: Sequence, token_id: int) -> str | None:
        p = seq.params
        if (not p.ignore_eos and token_id in self._eos_ids) or token_id in p.stop_token_ids:
            return "stop"
        if len(seq.output_token_ids) >= p.max_new_tokens:
            return "length"
        if seq.num_tokens >= self.config.session_len:
            return "length"
        return None

    def _output(self, seq: Sequence) -> RequestOutput:
        text = seq.text_state.text if seq.text_state is not None else ""
        logprobs = None
        if seq.params.logprobs is not None:
            logprobs = [
                TokenLogprobs(t, lp, dict(zip(ids, lps))) for t, lp, ids, lps in seq.logprobs
            ]
        return RequestOutput(
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=list(seq.output_token_ids),
            text=text,
            finish_reason=seq.finish_reason or "length",
            logprobs=logprobs,
        )


def _build_config(
    model: str | None,
    tp: int | None,
    cp: int | None,
    session_len: int | None,
    device: str | None,
    dtype: str | None,
    config: RuntimeConfig | None,
    overrides: dict[str, Any],
) -> RuntimeConfig:
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if config is not None and not isinstance(config, RuntimeConfig):
        raise ConfigError(
            f"config must be a RuntimeConfig, got {type(config).__name__} {config!r:.80}; "
            "read a YAML file with RuntimeConfig.from_yaml(path)"
        )
    direct = {
        "model": model,
        "session_len": session_len,
        "device": device,
        "dtype": dtype,
        **overrides,
    }
    direct = {k: v for k, v in direct.items() if v is not None}
    sections = {"parallel": ParallelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig}
    for key, cls in sections.items():
        if isinstance(direct.get(key), dict):
            direct[key] = build_section(cls, direct[key], f"Runtime({key}=...)")
    demo = config is None and model is None
    if config is None:
        # The demo model (a download on first use) is fetched only once the rest is valid.
        config = RuntimeConfig(model=model if model is not None else "demo")
    base = direct.pop("parallel", config.parallel)
    if not isinstance(base, ParallelConfig):
        raise ConfigError(f"parallel must be a ParallelConfig or a mapping, got {base!r:.80}")
    parallel = dataclasses.replace(
        base, **{k: v for k, v in (("tp", tp), ("cp", cp)) if v is not None}
    )
    try:
        config = dataclasses.replace(config, parallel=parallel, **direct)
    except TypeError as e:
        raise ConfigError(f"Runtime: {e}") from e
    if demo:
        from dist_runtime.demo_model import demo_model_path

        config = dataclasses.replace(config, model=str(demo_model_path()))
    return config


def _per_prompt(
    params: SamplingParams | Seq[SamplingParams] | None, n: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    if isinstance(params, (str, bytes)) or not isinstance(params, Seq):
        raise ValueError(
            f"params must be one SamplingParams or a list of {n}, got "
            f"{type(params).__name__} {params!r:.80}"
        )
    plist = list(params)
    if len(plist) != n:
        raise ValueError(f"params must be one SamplingParams or a list of {n}, got {len(plist)}")
    for i, p in enumerate(plist):
        if not isinstance(p, SamplingParams):
            raise ValueError(
                f"params[{i}] must be a SamplingParams, got {type(p).__name__} {p!r:.80}"
            )
    return plist


def _check_ids(ids: list[int], vocab_size: int, index: int) -> None:
    if not ids:
        raise ValueError(f"prompt {index} is empty; give at least one token")
    bad = [
        t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size
    ]
    if bad:
        raise ValueError(f"prompt {index} has token ids outside [0, {vocab_size}): {bad[:5]}")
