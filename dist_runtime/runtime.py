"""The public entry point: `Runtime` starts the engine and is a client of it.

from dist_runtime import Runtime, SamplingParams
with Runtime(model="path/to/hf_folder", tp=2, session_len=4096, device="cpu") as rt:
    outs = rt.generate(["prompt"], SamplingParams(max_new_tokens=16, temperature=0.0))

Every call (generate, generate_stream, chat, ask, and the job runner's thread) adds requests to
the one engine loop and waits on their handles; nothing holds a lock for a request's lifetime,
so calls from many threads share the engine's steps.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import os
import tempfile
import threading
import time
from collections.abc import Callable, Generator
from collections.abc import Sequence as Seq
from typing import Any

from dist_runtime.beam_search import (
    Beam,
    BeamSearch,
    BeamSearchCancelled,
    BeamSearchParams,
    run_beam_search,
)
from dist_runtime.config import (
    CacheConfig,
    ConfigError,
    ParallelConfig,
    RuntimeConfig,
    SchedulerConfig,
    build_section,
    read_chat_template,
)
from dist_runtime.engine.engine import Engine
from dist_runtime.engine.executor.base import Executor
from dist_runtime.engine.handle import RequestHandle
from dist_runtime.engine.outputs import RequestOutput
from dist_runtime.jobs.doc_qa import check_fits, check_job, job_params, qa_prompts
from dist_runtime.jobs.runner import JobRunner
from dist_runtime.jobs.store import JobState, JobStatus, JobStore
from dist_runtime.progress import plural
from dist_runtime.sampling_params import SamplingParams
from dist_runtime.text.chat import (
    MessageLike,
    encode_chat,
    history_to_messages,
    template_variables,
)
from dist_runtime.text.tokenizer import Tokenizer
from workers.checkpoint import CheckpointReader
from workers.models.layouts import check_checkpoint

logger = logging.getLogger(__name__)

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
        self._jobs: JobStore | None = None
        self._runner: JobRunner | None = None
        self._job_tmp: tempfile.TemporaryDirectory[str] | None = None
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
        if self.config.chat_template is not None:
            self._use_chat_template(self.config.chat_template)
        self.engine = Engine(self.config, self.model_config, self.tokenizer)
        """The engine loop every call feeds; its counters are in `engine.stats()`."""
        blocks = self.engine.blocks
        logger.info(
            "ready: tp=%d cp=%d; the KV cache holds %s tokens (%s of %d tokens per worker)",
            self.config.parallel.tp,
            self.config.parallel.cp,
            f"{blocks.num_blocks * blocks.block_size * self.config.parallel.cp:,}",
            plural(blocks.num_blocks, "block"),
            blocks.block_size,
        )

    def _use_chat_template(self, value: str) -> None:
        """Prompt chats with `value` (a template file or text) instead of the model's."""
        if self.tokenizer is None:
            raise ConfigError(
                f"chat_template is set but {self.config.model} has no tokenizer to chat with",
                key="chat_template",
            )
        text = read_chat_template(value)
        template_variables(text)  # a template that does not parse fails here, not per chat
        self.tokenizer.chat_template = text
        logger.info("chat template: %s", "given text" if text is value else value)

    @property
    def adapters(self) -> list[str]:
        """Names of the LoRA adapters loaded now (what `SamplingParams.adapter` may name)."""
        return list(self.engine.adapters)

    def load_adapter(self, name: str, path: str | os.PathLike[str]) -> None:
        """Load the PEFT LoRA folder `path` as adapter `name` while the runtime runs (between
        two steps, on every worker). Needs `max_loras` (`--max-loras`) slots to put it in; a
        folder that does not fit the model, a rank over `max_lora_rank`, a name loaded already
        or no free slot is a ValueError (ConfigError) naming it."""
        self._check_serving()
        self.engine.load_adapter(name, os.fspath(path))

    def unload_adapter(self, name: str) -> None:
        """Unload adapter `name`, freeing its slot; refused (ValueError) while a request uses
        it. Its prefix-cache blocks stay until evicted: loading the same folder again finds
        them."""
        self._check_serving()
        self.engine.unload_adapter(name)

    @property
    def num_worker_restarts(self) -> int:
        """Times a dead or hung worker made the runtime replace its whole worker group."""
        return self.engine.num_worker_restarts

    # -- public API -------------------------------------------------------------------------
    def generate(
        self,
        prompts: Seq[Prompt],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); blocks until all are done.

        Other threads' calls run in the same engine steps. The requests go on through a
        failed step (`request_retries`); if one fails (it was counted at more failed steps
        than that) the others are aborted and the error is raised.
        """
        handles = self.add_requests(prompts, params)
        return self._wait(handles, use_tqdm, _per_prompt(params, len(handles)))

    def beam_search(
        self,
        prompts: Seq[Prompt],
        params: BeamSearchParams,
        *,
        priority: int = 0,
        adapter: str | None = None,
        cache_salt: str | None = None,
        tenant: str | None = None,
        cancel: threading.Event | None = None,
    ) -> list[list[Beam]]:
        """The `params.beam_width` best beams of each prompt (text or token ids), best first
        (`dist_runtime.beam_search`); each beam's `text` is set when the model has a
        tokenizer. The beams of every prompt run in the same engine steps, at `priority`, with
        LoRA `adapter` and prefix-cache `cache_salt`, for `tenant`. Setting `cancel` stops the
        search before its next step (`BeamSearchCancelled`)."""
        self._check_alive()
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Seq) or not prompts:
            raise ValueError(
                "prompts must be a non-empty list of strings or token-id lists, got "
                f"{type(prompts).__name__} {prompts!r:.80}"
            )
        ids = [self._prompt_ids(p, i) for i, p in enumerate(prompts)]
        session = self.config.session_len
        for i, prompt in enumerate(ids):
            if len(prompt) + 1 > session:
                raise ValueError(
                    f"prompt {i} has {len(prompt)} tokens, over session_len {session} less the "
                    "one new token a beam needs; shorten it or raise session_len"
                )
        eos = frozenset(self.engine.outputs.eos_token_ids)
        searches = [
            BeamSearch(p, params, eos, min(params.max_tokens, session - len(p))) for p in ids
        ]

        def step(sequences: list[list[int]], k: int) -> list[dict[int, float]]:
            if cancel is not None and cancel.is_set():
                raise BeamSearchCancelled("the beam search was cancelled")
            one = SamplingParams(
                max_new_tokens=1,
                temperature=0.0,
                logprobs=k,
                ignore_eos=True,
                priority=priority,
                adapter=adapter,
                cache_salt=cache_salt,
            )
            handles = self.engine.add_requests(sequences, [one] * len(sequences), tenant=tenant)
            for h in handles:
                h.part_of = "beam_search"
            tops = []
            for out in self._wait(handles, False, [one] * len(handles)):
                assert out.logprobs is not None
                tops.append(out.logprobs[0].top)
            return tops

        results = run_beam_search(searches, step)
        if self.tokenizer is not None:
            tok = self.tokenizer
            results = [
                [dataclasses.replace(b, text=tok.decode(_cut_eos(b, eos))) for b in beams]
                for beams in results
            ]
        return results

    def add_requests(
        self,
        prompts: Seq[Prompt],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        share_prefix: bool = False,
    ) -> list[RequestHandle]:
        """Queue prompts (text or token ids) on the engine and return their handles at once:
        iterate one for its deltas, `result()` for its output, `abort()` to stop it."""
        self._check_alive()
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Seq) or not prompts:
            raise ValueError(
                "prompts must be a non-empty list of strings or token-id lists, got "
                f"{type(prompts).__name__} {prompts!r:.80}"
            )
        plist = _per_prompt(params, len(prompts))
        ids = [self._prompt_ids(p, i) for i, p in enumerate(prompts)]
        return self.engine.add_requests(ids, plist, share_prefix=share_prefix)

    def generate_stream(
        self, prompt: Prompt, params: SamplingParams | None = None
    ) -> Generator[str, None, None]:
        """Yield the text of one prompt's output in pieces as tokens arrive.

        The pieces concatenate to exactly `generate([prompt], params)[0].text`. Closing the
        iterator early (or dropping it) aborts the request and frees its KV blocks; a slow
        reader delays no other request.
        """
        if self.tokenizer is None:
            raise ValueError(f"{self.config.model} has no tokenizer; streaming text needs one")
        (handle,) = self.add_requests([prompt], params)
        return _stream_text(handle)

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
        template); the document's tokens are computed once and every question starts from
        their cached KV blocks.
        """
        if self.tokenizer is None:
            raise ValueError(f"{self.config.model} has no tokenizer; document QA needs one")
        params = job_params(params)
        prompts = qa_prompts(self.tokenizer, document, questions)
        check_fits(prompts, params, self.config.session_len)
        self._check_alive()
        handles = self.engine.add_requests(prompts, [params] * len(prompts), share_prefix=True)
        shared = len(os.path.commonprefix(prompts)) if len(prompts) > 1 else 0
        return [o.text for o in self._wait(handles, use_tqdm, [params] * len(prompts), shared)]

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
        owner: str | None = None,
    ) -> str:
        """Queue a document-QA job and return its id at once.

        The job is validated here (document text, questions, the longest prompt against
        session_len) and stored durably in the job directory (`job_dir`); the job runner
        starts it as soon as the engine has sequence slots for its questions. `document_path`
        reads a file; bytes that are not UTF-8 are an error unless encoding_errors="replace".
        An `idempotency_key` makes a retry safe: submitting the same job (document,
        questions, params) with a key already used returns the first job's id; a different
        job with that key raises IdempotencyKeyConflictError (a ValueError) naming the key
        and the existing job. `owner` (the server's API key name) keeps idempotency keys and
        the server's job lists per owner and accounts the job's tokens to it.
        """
        self._check_serving()
        if self.tokenizer is None:
            raise ValueError(f"{self.config.model} has no tokenizer; document QA needs one")
        job = check_job(
            document,
            questions,
            params,
            document_path=document_path,
            encoding_errors=encoding_errors,
            idempotency_key=idempotency_key,
            tokenizer=self.tokenizer,
            session_len=self.config.session_len,
        )
        self.engine.check_adapter(job.params)
        store = self._job_store()
        job_id = store.submit(
            job.document, job.questions, job.params, idempotency_key, job.prefill_tokens, owner
        )
        runner = self._job_runner()
        runner.start()
        runner.notify()
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
        """Cancel a job: a queued one at once, a running one's requests are aborted at once
        (their KV blocks return to the pool at the engine's next step). Returns the state the
        job had."""
        state = self._job_store().cancel(job_id)
        if self._runner is not None:
            self._runner.notify()
        return state

    def jobs(self, owner: str | None = None) -> list[JobStatus]:
        """Every job in the job directory, oldest first (only `owner`'s when given)."""
        return self._job_store().list_jobs(owner)

    def job_owner(self, job_id: str) -> str | None:
        """Who submitted a job (`submit`'s owner); UnknownJobError for none."""
        return self._job_store().owner(job_id)

    def job_counts(self) -> dict[str, int]:
        """How many jobs of the job directory are in each state."""
        return self._job_store().count_by_state()

    @property
    def job_dir(self) -> str:
        """The job directory (a temporary one when the config names none)."""
        return str(self._job_store().job_dir)

    def serve_jobs(
        self, max_running_jobs: int | None = None, priority_offset: int = 0
    ) -> JobRunner:
        """Start running the job directory's queued jobs (and those a dead service left
        running) in the background; submit() does this too. max_running_jobs caps the jobs
        running at once (default: as many as fill max_num_seqs with their questions);
        priority_offset is added to every job's priority (lower runs first)."""
        self._check_serving()
        runner = self._job_runner()
        if max_running_jobs is not None:
            runner.max_running_jobs = max_running_jobs
        runner.priority_offset = priority_offset
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
            if self.tokenizer is None:
                raise ValueError(f"{self.config.model} has no tokenizer; document QA needs one")
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
            self._runner = JobRunner(
                self.engine,
                self.tokenizer,
                store,
                session_len=self.config.session_len,
                max_num_seqs=self.config.scheduler.max_num_seqs,
                max_job_attempts=self.config.max_job_attempts,
            )
        return self._runner

    def prefix_cache_stats(self) -> dict[str, float]:
        """Prompt tokens looked up in the prefix cache, found there, and the hit rate."""
        stats = self.engine.stats()
        queried, hits = stats["prefix_cache_queried_tokens"], stats["prefix_cache_hit_tokens"]
        return {
            "queried_tokens": queried,
            "hit_tokens": hits,
            "hit_rate": hits / queried if queried else 0.0,
        }

    def reset_prefix_cache(self, host: bool = True, disk: bool = True) -> dict[str, int]:
        """Forget what the prefix cache holds: the device's blocks, and unless told otherwise
        the host tier's and the disk tier's (this model's and layout's files are deleted).
        Requests running now go on; later prompts compute their prefixes again. Returns the
        blocks forgotten per tier ({"device", "host", "disk"})."""
        return self.engine.reset_prefix_cache(host=host, disk=disk)

    def worker_memory(self) -> list[dict[str, int]]:
        """Each worker's peak resident bytes and KV cache bytes (and CUDA peak), by rank."""
        return self._read_workers(lambda executor: executor.memory_stats())

    def worker_steps(self) -> list[dict[str, int]]:
        """Each worker's steps run and decode steps replayed from its decode graphs, by rank."""
        return self._read_workers(lambda executor: executor.step_stats())

    def _read_workers(
        self, read: Callable[[Executor], list[dict[str, int]]]
    ) -> list[dict[str, int]]:
        self._check_alive()

        def call() -> list[dict[str, int]]:
            if self.engine.executor is None:
                raise RuntimeError("this runtime has no workers")
            return read(self.engine.executor)

        return self.engine.call(call)

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
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
        if self._job_tmp is not None:
            self._job_tmp.cleanup()
            self._job_tmp = None

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- internals --------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._shut_down or not self.engine.is_alive:
            raise RuntimeError(
                "this Runtime was shut down (or replacing failed workers failed); create a new one"
            )

    def _prompt_ids(self, prompt: Prompt, index: int) -> list[int]:
        if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, (str, Seq)):
            raise ValueError(
                f"prompt {index} must be a string or a list of token ids, got "
                f"{type(prompt).__name__} {prompt!r:.80}"
            )
        if isinstance(prompt, str):
            return self.encode(prompt)
        ids = list(prompt)
        if set(map(type, ids)) == {int}:
            return ids  # the common case, checked at C speed (a million-token prompt)
        text = next((t for t in ids if isinstance(t, (str, bytes))), None)
        if text is not None:
            raise ValueError(
                f"prompt {index} is a list holding text ({text!r:.40}), not token ids; a prompt "
                "is a string or a list of int token ids (generate_stream and chat take one "
                "prompt, not a list of them)"
            )
        return [_as_token_id(t) for t in ids]

    def _wait(
        self,
        handles: list[RequestHandle],
        use_tqdm: bool,
        params: list[SamplingParams] | None = None,
        shared: int = 0,
    ) -> list[RequestOutput]:
        """Every handle's output, in order; on an error (or Ctrl-C) the rest are aborted."""
        try:
            if use_tqdm:
                self._progress(handles, params or [SamplingParams()] * len(handles), shared)
            return [h.result() for h in handles]
        finally:
            for h in handles:
                h.abort()

    def _progress(
        self, handles: list[RequestHandle], params: list[SamplingParams], shared: int
    ) -> None:
        """A prefill phase, then a decode phase, over the handles until all are done.

        Prefill counts the prompt tokens the workers compute (prefix-cache hits are not
        computed); its total starts as an estimate (`shared` tokens common to every prompt are
        computed once) and becomes exact as the hits are known. Decode counts output tokens.
        """
        from dist_runtime.progress import Phase

        engine, bs = self.engine, self.config.cache.block_size
        if shared < bs or not self.config.cache.enable_prefix_caching:
            shared = 0  # the engine shares a prefix only when it fills a cached block
        start = engine.stats()
        prompt_tokens = sum(h.num_prompt_tokens for h in handles)
        expected_hits = len(handles) * (shared // bs * bs) if shared else 0

        def prefilled(h: RequestHandle) -> bool:
            return h.done or h.first_token_time is not None

        def wait() -> None:
            next((h for h in handles if not h.done), handles[0]).wait(0.1)

        with Phase("prefill", "token", prompt_tokens + shared - expected_hits) as phase:
            while not all(prefilled(h) for h in handles):
                stats = engine.stats()
                hits = stats["prefix_cache_hit_tokens"] - start["prefix_cache_hit_tokens"]
                phase.update_to(
                    int(stats["num_prompt_tokens_computed"] - start["num_prompt_tokens_computed"]),
                    prompt_tokens + shared - max(int(hits), expected_hits),
                )
                wait()
            stats = engine.stats()
            phase.update_to(
                int(stats["num_prompt_tokens_computed"] - start["num_prompt_tokens_computed"])
            )
        # Each prefill computes its request's first token; a request prefilled early has decoded
        # more while the others were prefilling, and those tokens count as decode.
        first = sum(1 for h in handles if h.num_output_tokens)

        def decode_total() -> int:
            return sum(
                h.num_output_tokens if h.done else max(p.max_new_tokens, h.num_output_tokens)
                for h, p in zip(handles, params)
            )

        # Decoding began with the first request to finish its prefill.
        since = min((h.first_token_time for h in handles if h.first_token_time), default=None)
        with Phase("decode", "token", decode_total() - first, since=since) as phase:
            while not all(h.done for h in handles):
                phase.update_to(sum(h.num_output_tokens for h in handles) - first)
                wait()
            phase.update_to(sum(h.num_output_tokens for h in handles) - first, 0)


def _cut_eos(beam: Beam, eos: frozenset[int]) -> list[int]:
    """A beam's tokens less the EOS that ended it (its text, as a finished request's)."""
    ids = beam.token_ids
    return ids[:-1] if beam.finish_reason == "stop" and ids and ids[-1] in eos else ids


def _as_token_id(t: Any) -> Any:
    """numpy / torch integer scalars (e.g. from a tokenizer's array output) as plain ints;
    anything else unchanged, for the engine's range check to report."""
    if isinstance(t, (int, bool)) or not hasattr(t, "__index__"):
        return t
    try:
        return operator.index(t)
    except TypeError:
        return t


def _stream_text(handle: RequestHandle) -> Generator[str, None, None]:
    """The text pieces of one request; closing the generator aborts the request."""
    try:
        for delta in handle:
            if delta.text:
                yield delta.text
    finally:
        handle.abort()


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
    top = {f.name for f in dataclasses.fields(RuntimeConfig)}
    for key in sorted(set(direct) - top):
        for section, cls in sections.items():
            if key in {f.name for f in dataclasses.fields(cls)}:
                raise ConfigError(
                    f"Runtime: {key} is a {section} setting; pass "
                    f"{section}={{{key!r}: {direct[key]!r}}} (or {cls.__name__}({key}=...))"
                )
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
        from dist_runtime.formats.demo_model import demo_model_path

        config = dataclasses.replace(config, model=str(demo_model_path()))
    return config


def _per_prompt(
    params: SamplingParams | Seq[SamplingParams] | None, n: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    if isinstance(params, dict):
        raise ValueError(
            f"params must be a SamplingParams, got a dict {params!r:.80}; pass "
            "SamplingParams(**that_dict)"
        )
    if isinstance(params, (str, bytes)) or not isinstance(params, Seq):
        many = f" or a list of {n}" if n > 1 else ""
        raise ValueError(
            f"params must be one SamplingParams{many}, got {type(params).__name__} {params!r:.80}"
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
