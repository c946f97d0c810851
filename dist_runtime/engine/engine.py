"""The engine loop: one thread owns the scheduler, block manager, executor and output processing.

Callers on any thread `add_requests` (validated on the caller's thread, so bad input raises
there) and get a `RequestHandle` per prompt at once; an add or abort is a command on a
thread-safe queue. The engine thread drains that queue, runs a step while there is work
(schedule -> plan -> workers -> sample -> process outputs -> each request's delta to its
handle) and blocks on the queue when there is none. Many callers therefore share every step.

    engine = Engine(config, model_config, tokenizer)
    (handle,) = engine.add_requests([[1, 2, 3]], [SamplingParams(max_new_tokens=8)])
    for delta in handle: ...          # or handle.result(), or handle.abort()
    engine.shutdown()

Failures: a dead or hung worker (`WorkerError`) makes the engine replace its whole worker group;
the requests in flight go on there, recomputing what they had. A step that raises with its
workers alive and in step (any error in process, `StepFailedError` over Ray) is computed again
the same way on the same workers. Each failed step is counted against its likeliest
cause (`_blame`); a request counted more than `request_retries` times fails with the error
instead (callers resubmit, the job runner requeues).
When no new group can be started, or the loop itself breaks, every handle fails with
`EngineDeadError` and later adds are refused.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import math
import os
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from dist_runtime import heap
from dist_runtime.config import ConfigError, ModelConfig, RuntimeConfig, check_lora_modules
from dist_runtime.engine.block_manager import BlockManager
from dist_runtime.engine.executor.base import Executor, WorkerError
from dist_runtime.engine.executor.factory import create_executor
from dist_runtime.engine.handle import RequestHandle
from dist_runtime.engine.kv_disk import InUse, disk_tier, trim_shared
from dist_runtime.engine.output_processor import OutputProcessor
from dist_runtime.engine.outputs import RequestDelta, RequestOutput
from dist_runtime.engine.scheduler import Scheduler, SeqStatus, Sequence
from dist_runtime.engine.thinking import ThinkingBudget, prompt_opens
from dist_runtime.lora import (
    AdapterConflictError,
    AdapterNotFoundError,
    AdapterSpec,
    adapter_slot_rank,
    check_slot_rank,
)
from dist_runtime.memory_planner import held_tokens, kv_tokens_per_worker
from dist_runtime.protocol import DISK_SEEN, SampledToken, StepPlan, StepResult
from dist_runtime.sampling_params import SamplingParams
from dist_runtime.text.guided import (
    JsonGuide,
    Vocabulary,
    choice_grammar,
    gbnf_grammar,
    grammar_for,
    regex_grammar,
)
from dist_runtime.text.text_stream import TextStream
from dist_runtime.text.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger(__name__)

T = TypeVar("T")

FinishListener = Callable[[RequestHandle, RequestOutput | None, BaseException | None], None]
"""fn(handle, output, error): a caller's request ended with `output` or failed with `error`."""

PREFIX_PASS = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
"""The pass that computes prompts' shared prefix once: its one sampled token is dropped."""

STEP_HISTORY = 4096
"""Steps kept in `Engine.recent_steps()`."""


class EngineDeadError(RuntimeError):
    """The engine stopped (shut down, or its workers could not be replaced)."""


class SamplingError(RuntimeError):
    """A request's next token could not be sampled: its own settings rule out every token
    (allowed_token_ids, bad_words, guided output) or break the sampler. The request alone
    fails; the server answers 400 (the request's fault, not the server's)."""


@dataclass(frozen=True)
class StepRecord:
    """One engine step: who shared it and how much it computed."""

    step_id: int
    request_ids: tuple[str, ...]
    num_prefill_tokens: int
    num_decodes: int
    seconds: float


@dataclass(eq=False)
class _Request:
    seq: Sequence
    handle: RequestHandle
    after: _Request | None = None
    """Admitted only once this request is done (its prompt prefix is then cached)."""
    dependents: list[_Request] = field(default_factory=list)
    is_internal: bool = False
    """A shared-prefix pass nobody waits on: aborted when all its dependents are."""
    failures: int = 0
    """Failed steps counted against it (it went on after each, up to `request_retries`)."""


DISK_AUDIT_S = 30.0
"""How often a runtime with a disk tier counts the blocks in its directory (other runtimes on
it may have written past this one's bound: `Engine.audit_disk`)."""
REPLACEMENT_KV_WAIT_S = 30.0
"""How long a replacement worker group waits for the KV memory the group it replaces had:
a killed process's device memory is freed some time after its resources return to Ray."""
ORPHAN_AGE_S = 60.0
"""A block file that some of a pool's workers lack at start is deleted as a lost write only
when older than this (younger, another runtime on the directory may still be writing it)."""


def _block_file(disk_dir: str, rank: int, pool: int, digest: int, parent: int) -> str:
    """Where tp rank `rank` of pool `pool` keeps a block's file (`workers.kv_cache`'s name)."""
    return f"{disk_dir}/tp{rank}-cp{pool}/{digest:032x}-{parent:032x}.kv"


def _digest_pair(name: str) -> tuple[int, int] | None:
    """(digest, parent digest) of a disk-tier file's name (`<digest>-<parent>`), None for a
    name of another shape."""
    key, _, parent = name.partition("-")
    if len(key) != 32 or len(parent) != 32:
        return None
    try:
        return int(key, 16), int(parent, 16)
    except ValueError:
        return None


class Engine:
    def __init__(
        self, config: RuntimeConfig, model_config: ModelConfig, tokenizer: Tokenizer | None
    ):
        self.config = config
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.executor: Executor | None = None
        self.num_worker_restarts = 0
        """Times a dead or hung worker made the engine replace its whole worker group."""
        self.num_resumed_requests = 0
        """Running requests that went on after a worker failure, on the new worker group."""
        self.num_retried_steps = 0
        """Steps that failed with the workers alive (their requests computed them again)."""
        self.replacing_workers = False
        """True while a failed worker group is being replaced (requests wait meanwhile)."""
        eos = set(model_config.eos_token_ids)
        if tokenizer is not None:
            eos |= set(tokenizer.eos_token_ids)
        self.outputs = OutputProcessor(eos, config.session_len)
        self.adapters = {
            name: AdapterSpec.load(name, path, model_config)
            for name, path in config.lora_modules.items()
        }
        """LoRA adapters requests may name, checked before any worker starts (replaced whole,
        never changed in place: other threads read it)."""
        slots = config.max_loras or len(self.adapters)
        self._adapter_slots = {name: i + 1 for i, name in enumerate(list(self.adapters)[:slots])}
        """The adapters resident on the workers now, by slot (engine thread). With max_loras
        more adapters than slots may be registered: one is loaded into a slot when a request
        of it is admitted, in place of the least recently used one no running request uses."""
        self._adapter_use = itertools.count()
        self._adapter_last_use: dict[str, int] = {}
        self._adapter_failures: list[tuple[Sequence, BaseException]] = []
        """Sequences whose adapter failed to load while the scheduler admitted: failed after."""
        self.num_adapter_loads = 0
        """Adapters loaded into a slot while running (on demand or by load_adapter)."""
        if config.max_loras is not None:  # the workers reserve slots of one resolved rank
            rank = adapter_slot_rank(config, list(self.adapters.values()))
            self.config = config = dataclasses.replace(config, max_lora_rank=rank)
        self._vocab: Vocabulary | None = None
        self._min_tokens_masks: dict[frozenset[int], bytes] = {}
        """Allowed-token masks before min_tokens, by the ids they leave out."""
        self._vocab_lock = threading.Lock()
        """The tokenizer's tokens as bytes for guided output, built on first use."""
        self._rng = random.Random(config.seed)
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        """Guards the queue's idle flag and the dead/alive switch (never held across a step)."""
        self._idle = threading.Event()
        self._dead: BaseException | None = None
        self._stopping = threading.Event()
        """Set by shutdown(): a worker failure from then on (Ray stopping with the process,
        say) fails what is in flight instead of starting a new worker group."""
        self._active: dict[str, _Request] = {}  # engine thread only: in the scheduler
        self._deferred: list[_Request] = []  # engine thread only: waiting on `after`
        self._by_seq: dict[int, _Request] = {}
        self._steps: deque[StepRecord] = deque(maxlen=STEP_HISTORY)
        self._inflight: tuple[StepPlan, float] | None = None
        """A step launched but not collected (asynchronous decode), with its start time."""
        self.num_steps_ahead = 0
        """Decode steps planned and launched while the step before them ran."""
        self._tier_in_use: InUse | None = None
        """The disk tier's directory, held while the engine runs (`kv_disk.prune` skips it)."""
        self._kv_blocks = 0
        """KV blocks per worker of the running group (a replacement group gets as many)."""
        self.num_disk_unread_blocks = 0
        """Blocks read back from the disk tier whose file failed its check (computed again)."""
        self._disk_dir: str | None = None
        """The disk tier's fingerprint directory (None: no disk tier)."""
        self.num_disk_shared_evicted_blocks = 0
        """Blocks other runtimes on the disk tier's directory wrote, deleted to keep the
        directory within this runtime's bound (`audit_disk`)."""
        self._finish_listeners: list[FinishListener] = []
        self.num_steps = 0
        self.num_generated_tokens = 0
        self.num_finished_requests = 0
        # An in-process worker starts on the engine thread, so its torch thread pool belongs to
        # the thread that runs every step (a pool left on the caller's thread slowed small CPU
        # ops by up to half). Ray workers start here: ray.init wants the main thread.
        self._start_on_loop = config.resolved_executor() == "inprocess"
        if not self._start_on_loop:
            self._start_workers()
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(started,), name="dist-runtime-engine", daemon=True
        )
        self._thread.start()
        started.result()  # re-raises what stopped the workers from starting
        if self._disk_dir is not None:  # the directory's other runtimes count in the bound
            threading.Thread(target=self._audit_loop, name="kv-disk-audit", daemon=True).start()

    # -- callers (any thread) -------------------------------------------------------------------
    def add_requests(
        self,
        prompts: Seq[list[int]],
        params: Seq[SamplingParams],
        *,
        share_prefix: bool = False,
        request_ids: Seq[str] | None = None,
        tenant: str | None = None,
    ) -> list[RequestHandle]:
        """Queue one request per token-id prompt; returns their handles at once.

        Every prompt is checked before any is queued (ids in the vocabulary, prompt +
        max_new_tokens within session_len and the KV cache). They are admitted together.
        With share_prefix, prompts whose common prefix fills a KV block get it computed once
        first (a hidden one-token pass); the prompts then start from its cached blocks.
        `tenant` (an API key's name) is whom they run for: the scheduler shares slots fairly
        between tenants, and the handles' `owner`.
        """
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        if request_ids is not None and len(request_ids) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(request_ids)} request ids")
        seqs = [self._make_sequence(p, sp, i) for i, (p, sp) in enumerate(zip(prompts, params))]
        ids = request_ids or [f"req-{next(self._request_ids)}" for _ in prompts]
        requests = [
            _Request(s, RequestHandle(rid, len(s.prompt_token_ids), self.abort))
            for s, rid in zip(seqs, ids)
        ]
        for r in requests:
            r.seq.tenant = r.handle.owner = tenant
        # A request scoring its prompt computes all of it: a shared-prefix pass would not help.
        # Requests of different adapters have different K/V for the same text.
        share_prefix = (
            share_prefix
            and all(p.prompt_logprobs is None for p in params)
            and len({p.adapter for p in params}) == 1
            and len({p.cache_salt for p in params}) == 1
        )
        shared = self._shared_prefix(list(prompts)) if share_prefix else None
        if shared is not None:
            # the pass runs at its requests' priority (the most important of them)
            priority = min(p.priority for p in params)
            pass_params = dataclasses.replace(
                PREFIX_PASS,
                priority=priority,
                adapter=params[0].adapter,
                cache_salt=params[0].cache_salt,
            )
            pass_seq = self._make_sequence(shared, pass_params, 0)
            pass_seq.tenant = tenant
            prefix = _Request(
                pass_seq,
                RequestHandle(f"prefix-{next(self._request_ids)}", len(shared), self.abort),
                is_internal=True,
            )
            for r in requests:
                r.after = prefix
            prefix.dependents = list(requests)
            requests = [prefix, *requests]
        self._send("add", requests)
        return [r.handle for r in requests if not r.is_internal]

    def add_request(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> RequestHandle:
        (handle,) = self.add_requests(
            [prompt_token_ids], [params], request_ids=None if request_id is None else [request_id]
        )
        return handle

    def abort(self, request_id: str) -> None:
        """Abort a request (its blocks are freed before the next step); unknown ids are ignored."""
        self._send("abort", request_id)

    def reset_prefix_cache(self, host: bool = True, disk: bool = True) -> dict[str, int]:
        """Forget the prefix cache between two steps (`BlockManager.reset_prefix_cache`): the
        device's cached blocks, and with `host` / `disk` those tiers' (the disk's files go with
        the next plan, and when no step is in flight the call waits for them; so do blocks
        other runtimes on the directory wrote, which a lookup would otherwise find again).
        Running requests go on. Returns the blocks forgotten per tier."""

        def reset() -> dict[str, int]:
            forgot = self.blocks.reset_prefix_cache(host=host, disk=disk)
            logger.info("prefix cache reset: %s blocks forgotten", forgot)
            if forgot["disk"] and self._inflight is None and self.executor is not None:
                self._send_moves()  # the deletions now, not with the next step
                self.executor.flush_disk_kv()
            if disk and self._disk_dir is not None:
                forgot["disk"] += self._trim_shared(self._disk_dir, self.blocks, 0)
            return forgot

        return self.call(reset)

    def call(self, fn: Callable[[], T], timeout: float | None = None) -> T:
        """Run fn on the engine thread between two steps (for anything that touches the
        executor or the scheduler's state) and return its result."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._send("call", (fn, future))
        return future.result(timeout)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every queued command is handled and no request is left; False on
        timeout."""
        return self._idle.wait(timeout)

    def add_finish_listener(self, fn: FinishListener) -> None:
        """Call fn(handle, output, error) on the engine thread as each caller's request ends
        (finished, aborted: an output; failed: the error), e.g. to record latencies; it must be
        quick and must not block. It runs before the handle is done, so whoever waits on the
        handle sees what the listener recorded."""
        self._finish_listeners.append(fn)

    def recent_steps(self) -> list[StepRecord]:
        return list(self._steps)

    def stats(self) -> dict[str, float]:
        """Counters since start (read without stopping the loop)."""
        blocks, sched = self.blocks, self.scheduler
        return {
            "num_steps": self.num_steps,
            "num_generated_tokens": self.num_generated_tokens,
            "num_prompt_tokens_computed": sched.num_prompt_tokens_computed,
            "num_preemptions": sched.num_preemptions,
            "num_finished_requests": self.num_finished_requests,
            "num_running": len(sched.running),
            "num_waiting": len(sched.waiting),
            "num_free_blocks": blocks.num_free_blocks,
            "num_blocks": blocks.num_blocks * blocks.cp_size,
            "prefix_cache_queried_tokens": blocks.num_queried_tokens,
            "prefix_cache_hit_tokens": blocks.num_hit_tokens,
            "prefix_cache_host_hit_tokens": blocks.num_host_hit_tokens,
            "host_kv_saved_blocks": blocks.num_saved_blocks,
            "host_kv_blocks": blocks.host_slots * blocks.cp_size,
            "prefix_cache_disk_hit_tokens": blocks.num_disk_hit_tokens,
            "disk_kv_saved_blocks": blocks.num_disk_saved_blocks,
            "disk_kv_adopted_blocks": blocks.num_disk_adopted_blocks,
            "disk_kv_shared_evicted_blocks": self.num_disk_shared_evicted_blocks,
            "disk_kv_blocks": blocks.num_disk_blocks,
            "disk_kv_unread_blocks": self.num_disk_unread_blocks,
            "num_worker_restarts": self.num_worker_restarts,
            "num_resumed_requests": self.num_resumed_requests,
            "num_retried_steps": self.num_retried_steps,
            "num_draft_tokens": sched.num_draft_tokens,
            "num_adapter_loads": self.num_adapter_loads,
            "num_accepted_tokens": sched.num_accepted_tokens,
        }

    def tenant_stats(self) -> dict[str, tuple[int, int, float]]:
        """Each named tenant's (running, waiting) requests and the service the fair share has
        counted for it (read without stopping the loop: a snapshot of the scheduler's lists)."""
        sched = self.scheduler
        served = {t: v for t, v in dict(sched.served).items() if t is not None}
        counts = {t: [0, 0] for t in served}
        for column, seqs in enumerate((list(sched.running), list(sched.waiting))):
            for seq in seqs:
                if seq.tenant is not None:
                    counts.setdefault(seq.tenant, [0, 0])[column] += 1
        return {t: (run, wait, served.get(t, 0.0)) for t, (run, wait) in counts.items()}

    def adapter_stats(self) -> dict[str, tuple[int, int]]:
        """Each loaded LoRA adapter's (running, waiting) requests (read without stopping the
        loop: a snapshot of the scheduler's lists)."""
        counts = {name: [0, 0] for name in self.adapters}
        for column, seqs in enumerate((list(self.scheduler.running), list(self.scheduler.waiting))):
            for seq in seqs:
                if seq.params.adapter in counts:
                    counts[seq.params.adapter][column] += 1
        return {name: (run, wait) for name, (run, wait) in counts.items()}

    @property
    def is_alive(self) -> bool:
        return self._dead is None

    def shutdown(self) -> None:
        """Stop the loop (requests in flight fail with EngineDeadError) and the workers."""
        self._stopping.set()
        abandon = getattr(self.executor, "abandon", None)  # Ray: do not wait out the step
        if abandon is not None:
            abandon()
        with self._lock:
            if self._dead is None:
                self._inbox.put(("stop", None))
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()
        if self.executor is not None:
            self.executor.shutdown()
            self.executor = None
        if self._tier_in_use is not None:  # after the workers' last writes
            self._tier_in_use.close()
            self._tier_in_use = None
        heap.unfreeze()  # what the engine held can be collected again (and is, at exit)

    # -- validation (caller's thread) -----------------------------------------------------------
    def _make_sequence(self, prompt: list[int], params: SamplingParams, index: int) -> Sequence:
        if not isinstance(params, SamplingParams):
            raise ValueError(
                f"params[{index}] must be a SamplingParams, got {type(params).__name__} "
                f"{params!r:.80}"
            )
        ids = list(prompt)
        _check_ids(ids, self.model_config.vocab_size, index)
        total = len(ids) + params.max_new_tokens
        if total > self.config.session_len:
            raise ValueError(
                f"prompt {index} has {len(ids)} tokens + max_new_tokens {params.max_new_tokens} "
                f"= {total}, over session_len {self.config.session_len}; raise session_len, lower "
                "max_new_tokens or shorten the prompt"
            )
        blocks, need = self.blocks, self._kv_tokens(total)
        if need > blocks.capacity_tokens:
            raise ValueError(
                f"prompt {index} needs {need} tokens of KV cache but the cache holds "
                f"{blocks.capacity_tokens} ({blocks.num_blocks} blocks of "
                f"{blocks.block_size} per cp rank x cp={blocks.cp_size}); give the "
                "workers more KV memory, raise cp, or shorten it"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError(
                f"prompt {index}: stop strings need a tokenizer, and "
                f"{self.config.model} has none; use stop_token_ids"
            )
        vocab = self.model_config.vocab_size
        outside = [t for t, _ in params.logit_bias if t >= vocab]
        if outside:
            raise ValueError(
                f"prompt {index}: logit_bias names token ids outside [0, {vocab}): {outside[:5]}"
            )
        outside = [t for t in params.allowed_token_ids or () if t >= vocab]
        if outside:
            raise ValueError(
                f"prompt {index}: allowed_token_ids names token ids outside [0, {vocab}): "
                f"{outside[:5]}"
            )
        if params.guided and self.tokenizer is None:
            raise ValueError(
                f"prompt {index}: guided JSON output needs a tokenizer, and {self.config.model} "
                "has none; leave json_schema / json_object / guided_choice / guided_regex / "
                "guided_grammar out"
            )
        self.check_adapter(params, f"prompt {index}: ")
        seed = params.seed if params.seed is not None else self._draw_seed()
        seq = Sequence(seq_id=next(self._seq_ids), prompt_token_ids=ids, params=params, seed=seed)
        if params.guided:
            seq.guide = self._json_guide(params)
        if params.min_tokens:
            seq.min_tokens_mask = self._min_tokens_mask(params, index)
        if params.bad_words:
            seq.bad_word_ids = self._bad_word_ids(params, index)
        if params.allowed_token_ids is not None or params.bad_words:
            self._check_some_token(params, seq.bad_word_ids, index)
        if params.thinking_budget is not None:
            seq.thinking = self._thinking(params, ids, index)
        base = self.model_config.rope_base(len(ids))
        if base != self.model_config.rope_theta:
            seq.rope_base = base
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(
                self.tokenizer, skip_special_tokens=params.skip_special_tokens
            )
            seq.text_state = TextStream(detok, params.stop, params.include_stop_str_in_output)
        return seq

    def check_adapter(self, params: SamplingParams | None, where: str = "") -> None:
        """Refuse a request naming a LoRA adapter this engine has not loaded."""
        if params is None or params.adapter is None or params.adapter in self.adapters:
            return
        loaded = list(self.adapters) or "none"
        how = (
            "load it (Runtime.load_adapter, the server's /v1/load_lora_adapter)"
            if self.config.max_loras is not None
            else "start the runtime with lora_modules (--lora-modules NAME=DIR) naming it"
        )
        raise ValueError(
            f"{where}adapter {params.adapter!r} is not loaded (loaded: {loaded}); {how}"
        )

    # -- adapters loaded while running (any thread; the work runs on the engine thread) ---------
    def load_adapter(self, name: str, path: str) -> None:
        """Register the PEFT folder `path` as adapter `name` and, when a reserved slot is free,
        load it there between two steps (else its first request loads it). Needs max_loras;
        the name must be new."""
        check_lora_modules({name: path})
        if self.config.max_loras is None:
            raise ValueError(
                "this runtime's adapters are fixed at start; start it with max_loras "
                "(--max-loras) to load adapters while it runs"
            )
        if name in self.adapters:
            raise AdapterConflictError(
                f"adapter {name!r} is loaded already; unload it first to replace it"
            )
        spec = AdapterSpec.load(name, path, self.model_config)
        assert self.config.max_lora_rank is not None
        check_slot_rank(spec, self.config.max_lora_rank)
        self.call(lambda: self._load_adapter(spec))

    def _load_adapter(self, spec: AdapterSpec) -> None:
        if spec.name in self.adapters:
            raise AdapterConflictError(f"adapter {spec.name!r} is loaded already")
        free = self._free_slots()
        if free:
            self._put_adapter(spec, free[0])
        self.adapters = {**self.adapters, spec.name: spec}

    def _free_slots(self) -> list[int]:
        assert self.config.max_loras is not None
        used = set(self._adapter_slots.values())
        return [s for s in range(1, self.config.max_loras + 1) if s not in used]

    def _put_adapter(self, spec: AdapterSpec, slot: int) -> None:
        """Load `spec` into `slot` of every worker (engine thread)."""
        assert self.executor is not None
        try:
            self.executor.load_lora(slot, spec.name, spec.path, spec.digest)
        except BaseException:
            try:  # leave no worker with half an adapter in a slot that reads as free
                self.executor.unload_lora(slot)
            except Exception as e:
                logger.warning("clearing adapter slot %d failed: %s", slot, e)
            raise
        self._adapter_slots = {**self._adapter_slots, spec.name: slot}
        self.num_adapter_loads += 1
        logger.info("loaded LoRA adapter %r from %s into slot %d", spec.name, spec.path, slot)

    def unload_adapter(self, name: str) -> None:
        """Unload adapter `name` between two steps; refused while a request uses it."""
        self.call(lambda: self._unload_adapter(name))

    def _unload_adapter(self, name: str) -> None:
        assert self.executor is not None
        if name not in self.adapters:
            loaded = sorted(self.adapters) or "none"
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded (loaded: {loaded})")
        if self.config.max_loras is None:
            raise ValueError(
                "this runtime's adapters are fixed at start; start it with max_loras "
                "(--max-loras) to unload adapters while it runs"
            )
        users = [
            r for r in (*self._active.values(), *self._deferred) if r.seq.params.adapter == name
        ]
        if users:
            raise AdapterConflictError(
                f"adapter {name!r} answers {len(users)} request(s) now; unload it when they "
                "end (or abort them)"
            )
        slot = self._adapter_slots.get(name)
        if slot is not None:
            self.executor.unload_lora(slot)
            self._adapter_slots = {k: v for k, v in self._adapter_slots.items() if k != name}
        self.adapters = {k: v for k, v in self.adapters.items() if k != name}
        self._adapter_last_use.pop(name, None)
        logger.info("unloaded LoRA adapter %r", name)

    def _make_resident(self, seq: Sequence) -> bool:
        """The scheduler admits `seq`: give it its adapter's slot, loading the adapter into a
        free slot, or in place of the least recently used adapter that no running sequence
        uses; False when every slot serves running sequences (it waits) or the load failed
        (it fails after the step is planned)."""
        name = seq.params.adapter
        if name is None:
            return True
        self._adapter_last_use[name] = next(self._adapter_use)
        slot = self._adapter_slots.get(name)
        if slot is None:
            free = self._free_slots()
            if not free:
                busy = {s.params.adapter for s in self.scheduler.running}
                idle = [n for n in self._adapter_slots if n not in busy]
                if not idle:
                    return False
                victim = min(idle, key=lambda n: self._adapter_last_use.get(n, -1))
                free = [self._adapter_slots[victim]]
                self._adapter_slots = {k: v for k, v in self._adapter_slots.items() if k != victim}
                logger.info("LoRA adapter %r leaves slot %d for %r", victim, free[0], name)
            try:
                self._put_adapter(self.adapters[name], free[0])
            except Exception as e:
                self._adapter_failures.append((seq, e))
                return False
            slot = free[0]
        seq.adapter = slot
        return True

    def _kv_tokens(self, total: int) -> int:
        """KV tokens a sequence of `total` tokens holds at once (`held_tokens`)."""
        return held_tokens(
            self.model_config,
            total,
            self.config.cache.block_size,
            self.config.scheduler.max_num_batched_tokens,
        )

    def _new_scheduler(self) -> Scheduler:
        scheduler = Scheduler(self.config.scheduler, self.blocks, self.config.session_len)
        scheduler.window = self.model_config.uniform_window()
        if self.adapters or self.config.max_loras is not None:
            scheduler.admit_hook = self._make_resident
        return scheduler

    def _fail_adapter_loads(self) -> None:
        """Fail the requests whose adapter could not be loaded at admission."""
        failures, self._adapter_failures = self._adapter_failures, []
        for seq, error in failures:
            request = self._by_seq.get(seq.seq_id)
            if request is not None:
                self._fail(
                    [request],
                    ValueError(f"loading LoRA adapter {seq.params.adapter!r} failed: {error}"),
                )

    def _thinking(self, params: SamplingParams, ids: list[int], index: int) -> ThinkingBudget:
        """A request's thinking budget: its markers as tokens, and whether its prompt opened
        the thinking (ends with the start marker, perhaps then whitespace)."""
        start, end = params.thinking_markers
        if self.tokenizer is None:
            raise ValueError(
                f"prompt {index}: thinking_budget needs a tokenizer (its markers are text), and "
                f"{self.config.model} has none; leave thinking_budget out"
            )
        start_ids = tuple(self.tokenizer.encode(start, add_special_tokens=False))
        end_ids = tuple(self.tokenizer.encode(end, add_special_tokens=False))
        opened = prompt_opens(self.tokenizer, ids, start)
        return ThinkingBudget(
            params.thinking_budget or 0, start_ids, end_ids, opened, self.model_config.vocab_size
        )

    def _min_tokens_mask(self, params: SamplingParams, index: int) -> bytes | None:
        """The allowed-token mask of a request's samples before min_tokens: every token but
        EOS (unless ignore_eos) and its stop ids; None when none of those is in the
        vocabulary."""
        vocab = self.model_config.vocab_size
        banned = {t for t in params.stop_token_ids if t < vocab}
        if not params.ignore_eos:
            banned |= {t for t in self.outputs.eos_token_ids if t < vocab}
        if not banned:
            return None
        if len(banned) >= vocab:
            raise ValueError(
                f"prompt {index}: min_tokens would leave no token to pick (every id is EOS or "
                "a stop_token_id); give fewer stop_token_ids"
            )
        key = frozenset(banned)
        mask = self._min_tokens_masks.get(key)
        if mask is None:
            packed = bytearray(b"\xff" * ((vocab + 7) // 8))
            for t in banned:
                packed[t // 8] &= ~(1 << (t % 8)) & 0xFF  # least significant bit first
            mask = self._min_tokens_masks[key] = bytes(packed)
        return mask

    def _bad_word_ids(self, params: SamplingParams, index: int) -> list[list[int]]:
        """params.bad_words as token sequences: each word without its leading spaces, and with
        one leading space (the word inside a sentence) unless that is the same tokens with a
        space token before them. vLLM keeps the spaced form only when it has as many tokens,
        which lets " exaggerated" through when it is one token and "exaggerated" three (vLLM
        issue 32557); here it is held back too."""
        if self.tokenizer is None:
            raise ValueError(
                f"prompt {index}: bad_words need a tokenizer, and {self.config.model} has none; "
                "use logit_bias or allowed_token_ids"
            )
        vocab = self.model_config.vocab_size
        words: list[list[int]] = []
        for word in params.bad_words:
            bare = self.tokenizer.encode(word.lstrip(), add_special_tokens=False)
            spaced = self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            for ids in (bare, spaced):
                if any(t >= vocab for t in ids):
                    raise ValueError(
                        f"prompt {index}: bad word {word!r} tokenizes to ids past the model's "
                        f"{vocab} logits: {ids}"
                    )
            if bare:
                words.append(bare)
            if spaced and spaced[-len(bare) :] != bare:
                words.append(spaced)
        return words

    def _check_some_token(
        self, params: SamplingParams, bad_words: list[list[int]], index: int
    ) -> None:
        """Refuse allowed_token_ids and bad_words that could leave a step no token to pick:
        every allowed id is a one-token bad word, EOS or a stop id held back by min_tokens, or
        the last token of a longer bad word."""
        held: set[int] = set()
        if params.min_tokens:
            held = set(params.stop_token_ids)
            if not params.ignore_eos:
                held |= self.outputs.eos_token_ids
        vocab = self.model_config.vocab_size
        if params.allowed_token_ids is None and len(bad_words) + len(held) < vocab:
            return  # fewer ids held back than the vocabulary has
        allowed = set(params.allowed_token_ids or range(vocab))
        left = allowed - {w[0] for w in bad_words if len(w) == 1} - held
        if not left - {w[-1] for w in bad_words if len(w) > 1}:
            raise ValueError(
                f"prompt {index}: allowed_token_ids {sorted(allowed)[:8]} leave no token to "
                "pick once bad_words (and min_tokens' EOS and stop ids) are held back; allow "
                "more tokens or name fewer bad words"
            )

    def _json_guide(self, params: SamplingParams) -> JsonGuide:
        """A guided request's grammar state; the vocabulary's byte tries are built on the first
        one (a few tenths of a second for a 100K vocabulary)."""
        with self._vocab_lock:
            if self._vocab is None:
                assert self.tokenizer is not None
                self._vocab = Vocabulary.from_tokenizer(
                    self.tokenizer, self.model_config.vocab_size
                )
                heap.freeze()
            vocab = self._vocab
        stops = set(params.stop_token_ids)
        if not params.ignore_eos:
            stops |= self.outputs.eos_token_ids
        if params.guided_choice:
            grammar = choice_grammar(params.guided_choice)
        elif params.guided_regex is not None:
            grammar = regex_grammar(params.guided_regex)
        elif params.guided_grammar is not None:
            grammar = gbnf_grammar(params.guided_grammar)
        else:
            grammar = grammar_for(params.json_schema, params.compact_json)
        return JsonGuide(grammar, vocab, stops)

    def _draw_seed(self) -> int:
        with self._lock:
            return self._rng.getrandbits(63)

    def _shared_prefix(self, prompts: list[list[int]]) -> list[int] | None:
        """The prompts' common prefix when it fills at least one cache block (and caching is
        on), else None: prompts admitted in one step cannot share blocks none has computed."""
        if len(prompts) < 2 or not self.blocks.enable_prefix_caching:
            return None
        shared = len(os.path.commonprefix(prompts))
        return list(prompts[0][:shared]) if shared >= self.blocks.block_size else None

    def _send(self, kind: str, payload: Any) -> None:
        with self._lock:
            if self._dead is not None:
                raise EngineDeadError(f"the engine is stopped: {self._dead}; create a new Runtime")
            self._idle.clear()
            self._inbox.put((kind, payload))

    # -- the loop (engine thread) ---------------------------------------------------------------
    def _run(self, started: concurrent.futures.Future[None]) -> None:
        try:
            if self._start_on_loop:
                self._start_workers()
            self.scheduler = self._new_scheduler()
        except BaseException as e:
            self._dead = e
            started.set_exception(e)
            return
        started.set_result(None)
        try:
            while self._drain(block=not self._has_work() and not self.blocks.has_moves):
                if self._has_work():
                    self._step()
                else:
                    self._send_moves()
            self._die(EngineDeadError("the engine was shut down"))
        except BaseException as e:  # a bug in the loop: nobody may hang on it
            logger.exception("engine loop failed")
            self._die(e)

    def _has_work(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    def _drain(self, block: bool) -> bool:
        """Handle every queued command (waiting for one when block); False on stop."""
        while True:
            if block:
                with self._lock:
                    if self._inbox.empty():
                        self._idle.set()
                kind, payload = self._inbox.get()
            else:
                try:
                    kind, payload = self._inbox.get_nowait()
                except queue.Empty:
                    return True
            if kind == "stop":
                return False
            self._handle_command(kind, payload)
            self._admit_ready()
            block = not self._has_work()

    def _handle_command(self, kind: str, payload: Any) -> None:
        if kind == "add":
            for request in payload:
                rid = request.handle.request_id
                if rid in self._active or any(r.handle.request_id == rid for r in self._deferred):
                    request.handle.fail(ValueError(f"request id {rid!r} is already running"))
                    continue
                error = self._bind_adapter(request.seq)
                if error is not None:
                    request.handle.fail(error)
                    continue
                self._by_seq[request.seq.seq_id] = request
                if request.after is None:
                    self._admit(request)
                else:
                    self._deferred.append(request)
        elif kind == "abort":
            self._abort(payload)
        elif kind == "call":
            fn, future = payload
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:
                    future.set_exception(e)

    def _bind_adapter(self, seq: Sequence) -> ValueError | None:
        """Give a new sequence its adapter's slot and hash as they are now; the error to fail
        it with when its adapter was unloaded since the caller checked the name."""
        name = seq.params.adapter
        if name is None:
            return None
        spec = self.adapters.get(name)
        if spec is None:
            return ValueError(f"adapter {name!r} was unloaded before this request started")
        seq.adapter_digest = spec.digest  # its slot: when the scheduler admits it
        return None

    def _admit(self, request: _Request) -> None:
        self._active[request.handle.request_id] = request
        guide = request.seq.guide
        if guide is not None and (guide.ended or not guide.can_go_on()):
            # Its grammar takes no token at all (it matches the empty text only, and EOS is
            # ignored or ends it): the answer is empty, as a closing value ends a request, and
            # no step samples from a mask that allows nothing.
            request.handle.put(RequestDelta([], "", None, "stop"))
            self._end(request, self.outputs.output(request.seq, "stop"))
            return
        self.scheduler.add(request.seq)

    def _admit_ready(self) -> None:
        """Deferred requests whose prefix pass ended (however it ended) join the scheduler."""
        if not self._deferred:
            return
        ready = [r for r in self._deferred if r.after is None or r.after.handle.done]
        if ready:
            self._deferred = [r for r in self._deferred if r not in ready]
            for request in ready:
                self._admit(request)

    def _abort(self, request_id: str) -> None:
        request = self._active.get(request_id)
        if request is None:
            request = next((r for r in self._deferred if r.handle.request_id == request_id), None)
            if request is None:
                return
            self._deferred.remove(request)
        else:
            self.scheduler.abort(request.seq)
        self._end(request, self.outputs.output(request.seq, "abort"))

    def _end(self, request: _Request, output: Any, error: BaseException | None = None) -> None:
        self._active.pop(request.handle.request_id, None)
        self._by_seq.pop(request.seq.seq_id, None)
        self.num_finished_requests += not request.is_internal
        request.handle.finish_time = time.monotonic()
        if not request.is_internal:
            for listener in self._finish_listeners:
                try:
                    listener(request.handle, None if error is not None else output, error)
                except Exception:
                    logger.exception("finish listener failed")
        if error is None:
            request.handle.finish(output)
        else:
            request.handle.fail(error)
        parent = request.after
        if (
            parent is not None
            and parent.is_internal
            and not parent.handle.done
            and all(d.handle.done for d in parent.dependents)
        ):
            self._abort(parent.handle.request_id)  # nobody is left to use its blocks

    def _step(self) -> None:
        if self._inflight is not None:
            self._step_ahead()
            return
        started = time.perf_counter()
        plan, _ = self.scheduler.schedule()
        self._fail_adapter_loads()
        if not plan.seqs:
            if plan.kv_moves:  # host-tier copies of blocks already registered: done all the same
                assert self.executor is not None
                try:
                    if not self._check_reads(plan, self.executor.execute(plan)):
                        return  # the reads' requests start again
                except Exception as e:
                    self._step_failed(plan, e)
                    return
            if any(s.loading for s in self.scheduler.running):
                return  # a prefix being read back from the host or disk tier: it goes on
            self._fail_all(RuntimeError("the KV cache is too small for any waiting request"))
            return
        assert self.executor is not None
        if self.executor.runs_ahead():
            try:
                self.executor.launch(plan)
            except Exception as e:
                self._step_failed(plan, e)
                return
            self._inflight = (plan, started)
            self._step_ahead()
            return
        try:
            result = self.executor.execute(plan)
        except Exception as e:
            self._step_failed(plan, e)
            return
        self._finish_step(plan, result, started)

    def _send_moves(self) -> None:
        """Idle: send the KV moves still queued (the disk tier's last saves) in a plan of no
        sequences, so they are done now rather than with the next request's first step."""
        plan = self.scheduler.moves_plan()
        if plan is None:
            return
        assert self.executor is not None
        try:
            self._check_reads(plan, self.executor.execute(plan))
        except Exception as e:
            self._step_failed(plan, e)

    def _check_reads(self, plan: StepPlan, result: StepResult) -> bool:
        """Whether every disk read of the step passed its check. When one did not, the step
        ran on no worker: its blocks are forgotten and the requests that held them start
        again (computing from the block before), and the rest are planned again as they
        were."""
        if not result.unread_moves:
            return True
        moves = [plan.kv_moves[i] for i in result.unread_moves]
        redo = self.scheduler.unread(moves)
        self.num_disk_unread_blocks += len(moves)
        logger.warning(
            "step %d: %d block(s) read back from the disk tier failed their check (see the "
            "workers' log); %d sequence(s) compute them again",
            plan.step_id,
            len(moves),
            len(redo),
        )
        return False

    def _step_ahead(self) -> None:
        """Plan and launch the decode step after the one in flight (when it can be planned
        before that one's tokens are known), then collect the one in flight: the host's work
        for a step overlaps the device's work on the step before."""
        assert self._inflight is not None and self.executor is not None
        plan, started = self._inflight
        ahead = None
        if self._inbox.empty():  # a new request or an abort is handled first
            ahead = self.scheduler.schedule_ahead(plan, self.config.session_len)
        launched = time.perf_counter()
        try:
            if ahead is not None:
                self.executor.launch(ahead)
                self.num_steps_ahead += 1
            result = self.executor.collect()
        except Exception as e:
            self._inflight = None
            if ahead is not None and not isinstance(e, WorkerError):
                with contextlib.suppress(Exception):
                    self.executor.collect()  # the step launched ahead: its requests fail too
                self.blocks.forget(ahead.kv_moves)
            self._step_failed(plan, e)
            return
        self._inflight = None if ahead is None else (ahead, launched)
        self._finish_step(plan, result, started)

    def _step_failed(self, plan: StepPlan, error: Exception) -> None:
        if isinstance(error, WorkerError):
            self._inflight = None
            if self._stopping.is_set():  # the workers are going away with the engine
                logger.debug("worker failure while stopping: %s", error)
                self._fail_all(EngineDeadError(f"the engine is stopping: {error}"))
                return
            self._recover(plan, error)
            return
        # The step itself failed (the workers live): its requests compute it again, but for
        # the one it is counted against past request_retries; the rest go on.
        logger.error("step %d failed", plan.step_id, exc_info=error)
        self.blocks.forget(plan.kv_moves)
        going = self._blame(plan, error, error)
        self.scheduler.redo([r.seq for r in going], plan.kv_moves)
        self.num_retried_steps += 1

    def _finish_step(self, plan: StepPlan, result: StepResult, started: float) -> None:
        if not self._check_reads(plan, result):
            return
        self.scheduler.on_step_done(plan, result)
        began = time.monotonic() - (time.perf_counter() - started)  # the step's start
        request_ids, num_prefill, num_decodes = self._update_progress(plan, began)
        for scored in result.prompt_logprobs:
            self.outputs.record_prompt_logprobs(self._by_seq[scored.seq_id].seq, scored)
        tokens, i = result.tokens, 0
        while i < len(tokens):  # a sequence with a draft has several tokens in a row
            j = i + 1
            while j < len(tokens) and tokens[j].seq_id == tokens[i].seq_id:
                j += 1
            self._deliver(plan.step_id, tokens[i:j])
            i = j
        for seq_id, reason in zip(result.failed_seq_ids, result.failed_reasons, strict=True):
            request = self._by_seq.get(seq_id)
            if request is not None and not request.handle.done:
                error = SamplingError(
                    f"request {request.handle.request_id}: its next token could not be sampled "
                    f"({reason}); the other requests went on"
                )
                self._fail([request], error)
        self._admit_ready()
        self.num_steps += 1
        seconds = time.perf_counter() - started
        self.scheduler.record_step_time(plan, seconds)
        self._steps.append(StepRecord(plan.step_id, request_ids, num_prefill, num_decodes, seconds))

    def _deliver(self, step_id: int, tokens: list[SampledToken]) -> None:
        """One sequence's tokens of a step, in order, to its request: one delta for all of
        them, up to the one that ends it (later ones are dropped)."""
        request = self._by_seq.get(tokens[0].seq_id)
        if request is None or request.seq.status is SeqStatus.FINISHED:
            return  # a step planned ahead of this sequence's stop (or an abort)
        handle = request.handle
        if handle.first_token_step_id is None:
            handle.first_token_step_id = step_id
            handle.first_token_time = time.monotonic()
        deltas = []
        for tok in tokens:
            deltas.append(self.outputs.process(request.seq, tok))
            kept = len(deltas[-1].token_ids)  # (0: a prompt read only)
            handle.num_output_tokens += kept
            if not request.is_internal:
                self.num_generated_tokens += kept
            if deltas[-1].finish_reason is not None:
                break
        delta = deltas[0] if len(deltas) == 1 else _merge(deltas)
        if not request.is_internal:  # a prefix pass's token is dropped
            handle.put(delta)
        if len(deltas) < len(tokens):  # it stopped inside a draft: the rest was not kept
            self.scheduler.drop_draft_tokens(request.seq, len(tokens) - len(deltas))
        if delta.finish_reason is not None:
            self.scheduler.finish(request.seq, delta.finish_reason)
            self._end(request, self.outputs.output(request.seq, delta.finish_reason))

    def _update_progress(self, plan: StepPlan, began: float) -> tuple[tuple[str, ...], int, int]:
        """Write each scheduled request's progress on its handle; (request ids, prefill
        tokens, decodes) of the step."""
        ids = []
        num_prefill = num_decodes = 0
        for step in plan.seqs:
            request = self._by_seq.get(step.seq_id)
            if request is None:  # it ended while this step, planned ahead, ran
                continue
            handle, seq = request.handle, request.seq
            ids.append(handle.request_id)
            if step.start_pos >= len(seq.prompt_token_ids):
                num_decodes += 1
            else:
                num_prefill += len(step.token_ids)
            if handle.first_step_id is None:
                handle.first_step_id = plan.step_id
                handle.first_scheduled_time = began
            handle.last_step_id = plan.step_id
            handle.num_computed_prompt_tokens = min(
                seq.num_computed_tokens, len(seq.prompt_token_ids)
            )
            for dep in request.dependents:  # prompts waiting on this prefix see it progress
                dep.handle.num_computed_prompt_tokens = handle.num_computed_prompt_tokens
        return tuple(ids), num_prefill, num_decodes

    # -- failures (engine thread) ---------------------------------------------------------------
    def _blame(self, plan: StepPlan, error: Exception, failed: Exception) -> list[_Request]:
        """Count the failure of `plan` against its likeliest cause and fail the requests it
        puts past `request_retries` with `failed`; the requests of the step that go on.

        The cause is taken to be the suspect the step ran (a request counted at an earlier
        failure that has not yet run past the point where it failed; one runs at a time), else
        every request of the step, which all become suspects. A request that makes every step
        it is in fail is thus counted alone at its second failure and fails, while those that
        ran beside it go on."""
        in_step = [self._by_seq[s.seq_id] for s in plan.seqs if s.seq_id in self._by_seq]
        suspects = [r for r in in_step if r.seq.suspect_at is not None]
        blamed = suspects or in_step
        for request in blamed:
            request.failures += 1
            seq = request.seq
            seq.suspect_at = max(seq.num_computed_tokens, seq.suspect_at or 0)
        if blamed:
            logger.warning(
                "step %d failed (%s); counted against %s",
                plan.step_id,
                error,
                "its suspect" if suspects else f"its {len(blamed)} request(s)",
            )
        self._fail([r for r in blamed if r.failures > self.config.request_retries], failed)
        return [r for r in in_step if not r.handle.done]

    def _recover(self, plan: StepPlan, error: WorkerError) -> None:
        """A worker died or hung in `plan`: kill the whole group (never reusing its process
        group) and start a fresh one. The requests go on there: each running one computes its
        prompt and the tokens it had again, as a preempted one does, and its stream goes on
        where it was (draws are seeded by position, so its tokens are those of a run without
        the failure); one that the failure puts past `request_retries` (`_blame`) fails."""
        logger.error("worker failure, replacing the worker group: %s", error)
        retries = self.config.request_retries
        counted = f" after {retries + 1} failed steps counted against it" if retries else ""
        self._blame(
            plan,
            error,
            WorkerError(
                f"{error}; the runtime replaced its workers and dropped this request{counted} "
                f"(request_retries={retries}): submit it again"
            ),
        )
        running = [
            self._by_seq[s.seq_id] for s in self.scheduler.running if s.seq_id in self._by_seq
        ]
        old, self.executor = self.executor, None
        owned_ray = bool(getattr(old, "_owns_ray", False))
        self.replacing_workers = True
        try:  # the new workers get the adapters resident now, in their slots
            if old is not None:
                old.shutdown(keep_ray=True)
            self._start_workers(replacing=True)
        except BaseException as e:
            raise EngineDeadError(f"replacing failed workers failed: {e}") from e
        finally:
            self.replacing_workers = False
        if owned_ray:  # the new group inherits the Ray instance the old one started
            setattr(self.executor, "_owns_ray", True)  # noqa: B010
        self.num_worker_restarts += 1
        self.num_resumed_requests += sum(not r.handle.done for r in running)
        self.scheduler.reset(self.blocks)  # every sequence left recomputes from its start
        self._drop_unfit()

    def _fail_all(self, error: BaseException) -> None:
        """Fail every request in flight (running, waiting, deferred) and free its blocks."""
        self._fail([*self._active.values(), *self._deferred], error)

    def _fail(self, requests: list[_Request], error: BaseException) -> None:
        for request in requests:
            if request in self._deferred:
                self._deferred.remove(request)
            self.scheduler.abort(request.seq)
            self._end(request, None, error)
        self._admit_ready()  # a failed prefix pass: the prompts waiting on it start without it

    def _die(self, error: BaseException) -> None:
        with self._lock:
            self._dead = error
            pending: list[_Request] = []
            while not self._inbox.empty():
                kind, payload = self._inbox.get_nowait()
                if kind == "add":
                    pending.extend(payload)
                elif kind == "call":
                    payload[1].set_exception(EngineDeadError(f"the engine is stopped: {error}"))
            self._idle.set()
        dead = error if isinstance(error, EngineDeadError) else EngineDeadError(str(error))
        for request in [*self._active.values(), *self._deferred, *pending]:
            request.handle.fail(dead)
        self._active.clear()
        self._deferred.clear()

    # -- workers ------------------------------------------------------------------------------
    def _start_workers(self, replacing: bool = False) -> None:
        """A new worker group (new processes) and an empty KV cache for it (`replacing`: in
        place of a failed one)."""
        # Adapters fixed at start size the workers' layers; reserved slots are filled once the
        # workers run, with each adapter's hash (the key of their host caches)
        modules = self.config.lora_modules if self.config.max_loras is None else {}
        self.executor = create_executor(
            dataclasses.replace(self.config, lora_modules=modules), replacing=replacing
        )
        try:
            if self.config.max_loras is not None:
                for name, slot in self._adapter_slots.items():
                    spec = self.adapters[name]
                    self.executor.load_lora(slot, name, spec.path, spec.digest)
            num_blocks = self.executor.num_available_blocks()
            if replacing and self._kv_blocks:
                num_blocks = self._replacement_blocks(num_blocks, self._kv_blocks)
            if self.config.cache.num_blocks is None and not replacing:
                self._check_session_fits(num_blocks)  # (replacing: `_drop_unfit`)
            # Anything that changes K/V for the same tokens salts the prefix-cache hashes.
            salt = hash(
                (
                    self.model_config.rope_theta,
                    str(self.model_config.rope_scaling),
                    self.config.resolved_dtype(self.model_config),
                    self.config.cache.quant_policy,
                )
            )
            host_slots = self.executor.num_host_blocks()
            disk_dir, root = None, None
            cache = self.config.cache
            if cache.kv_cache_dir is not None and cache.enable_prefix_caching:
                held, root = disk_tier(self.config, self.model_config)
                if self._tier_in_use is not None:  # (workers started again: the same one)
                    self._tier_in_use.close()
                self._tier_in_use = held
                disk_dir = str(held.where)
            opened = time.time()
            self.executor.allocate_kv_cache(num_blocks, host_slots, disk_dir)
            self._disk_dir = disk_dir
            disk_blocks, capacity, orphans = None, 0, list[list[int]]()
            if disk_dir is not None:
                self._check_disk_dir_shared(disk_dir, opened)
                disk_blocks, capacity, orphans = self._disk_listing(disk_dir)
            self.blocks = BlockManager(
                num_blocks,
                cache.block_size,
                cache.enable_prefix_caching,
                salt,
                cp_size=self.config.parallel.cp,
                host_slots=host_slots,
                root=root,
                disk_blocks=disk_blocks,
                disk_capacity=capacity,
                disk_check=None if disk_dir is None else self._disk_check(disk_dir),
            )
            for pool, digests in enumerate(orphans):
                self.blocks.drop_from_disk(pool, digests)
            self._kv_blocks = num_blocks
        except BaseException:
            self.executor.shutdown()
            self.executor = None
            if self._tier_in_use is not None:
                self._tier_in_use.close()
                self._tier_in_use = None
            raise
        heap.freeze()

    def audit_disk(self) -> int:
        """Bring the disk tier's directory within this runtime's bound when other runtimes
        on it wrote past it (`kv_disk.trim_shared`: their least recently used blocks go; each
        runtime's own blocks stay within its own bound already). Runs every DISK_AUDIT_S
        seconds on a thread of its own; returns the blocks deleted."""
        disk_dir, blocks = self._disk_dir, getattr(self, "blocks", None)
        if disk_dir is None or blocks is None or not blocks.disk_capacity:
            return 0
        deleted = self._trim_shared(disk_dir, blocks, blocks.disk_capacity)
        self.num_disk_shared_evicted_blocks += deleted
        return deleted

    def _trim_shared(self, disk_dir: str, blocks: BlockManager, capacity: int) -> int:
        """`kv_disk.trim_shared` on this runtime's directory, sparing what `blocks` indexes."""
        parallel = self.config.parallel
        return trim_shared(Path(disk_dir), parallel.tp, parallel.cp, capacity, blocks.disk_indexes)

    def _audit_loop(self) -> None:
        while not self._stopping.wait(DISK_AUDIT_S):
            try:
                self.audit_disk()
            except Exception:  # (a directory gone or unreadable: tried again later)
                logger.exception("disk KV tier: checking the directory's size failed")

    def _check_disk_dir_shared(self, disk_dir: str, opened: float) -> None:
        """The driver decides every disk read by looking at the workers' files: fail at start
        when it does not see each worker's touch of its directory since `opened` (workers on
        other nodes, the directory not on a file system they share; a minute's leeway for
        clocks), rather than miss every block and delete the workers' files as gone."""
        parallel = self.config.parallel

        def seen(where: str) -> bool:
            try:
                return os.stat(f"{where}/{DISK_SEEN}").st_mtime >= opened - 60
            except OSError:
                return False

        missing = [
            f"tp{r}-cp{p}"
            for p in range(parallel.cp)
            for r in range(parallel.tp)
            if not seen(f"{disk_dir}/tp{r}-cp{p}")
        ]
        if missing:
            raise ConfigError(
                f"cache.kv_cache_dir = {self.config.cache.kv_cache_dir!r}: the workers' disk-tier "
                f"directories {missing} are not under {disk_dir} as this process sees it. Workers "
                "on other nodes need the directory on a file system every node shares, at the "
                "same path (NFS, Lustre, ...); or run without --kv-cache-dir"
            )

    def _disk_check(self, disk_dir: str) -> Callable[[int, int, int], bool]:
        """Whether every tp rank of a pool has a block's file (the driver reaches the directory
        as the workers do), so a file gone since the start is a miss, not a failed step."""
        tp = self.config.parallel.tp

        def on_disk(pool: int, digest: int, parent: int) -> bool:
            return all(
                os.path.exists(_block_file(disk_dir, r, pool, digest, parent)) for r in range(tp)
            )

        return on_disk

    def _disk_listing(
        self, disk_dir: str
    ) -> tuple[list[list[tuple[int, int]]], int, list[list[int]]]:
        """Per pool, the (digest, parent digest) of the blocks every one of its workers has on
        disk (least recently used first); the disk tier's capacity in blocks per pool; per
        pool, the digests only some of its workers have (a write lost on one of them: deleted)."""
        assert self.executor is not None
        listings = self.executor.disk_kv_blocks()
        capacity = min(cap for _, cap, _ in listings)
        if capacity < 1:
            raise ConfigError(
                f"cache.disk_kv_cache_gb = {self.config.cache.disk_kv_cache_gb:g} GiB holds no "
                "KV block of this model on every worker; raise --disk-kv-cache-gb"
            )
        workers: list[list[list[tuple[int, int]]]] = [[] for _ in range(self.config.parallel.cp)]
        for cp_rank, _, names in listings:
            pairs = [_digest_pair(name) for name in names]
            workers[cp_rank].append([pair for pair in pairs if pair is not None])
        found, orphans = [], []
        for pool, lists in enumerate(workers):  # each pool's workers' listings (one per rank)
            held = [{d for d, _ in pairs} for pairs in lists]
            everywhere = set.intersection(*held)
            found.append([pair for pair in lists[0] if pair[0] in everywhere])
            parents = {d: p for pairs in lists for d, p in pairs}
            orphans.append(
                sorted(
                    d
                    for d in set.union(*held) - everywhere
                    if not self._written_lately(disk_dir, pool, d, parents[d])
                )
            )
        logger.info(
            "disk KV tier %s: %d blocks found, room for %d per cp rank",
            disk_dir,
            sum(map(len, found)),
            capacity,
        )
        return found, capacity, orphans

    def _written_lately(self, disk_dir: str, pool: int, digest: int, parent: int) -> bool:
        """Whether a block's file on some worker of `pool` is younger than a write can take:
        another runtime on the directory may be writing the others' now (so it is not a
        write a crash lost on some of them)."""
        now = time.time()
        for r in range(self.config.parallel.tp):
            with contextlib.suppress(OSError):
                path = _block_file(disk_dir, r, pool, digest, parent)
                if now - os.stat(path).st_mtime < ORPHAN_AGE_S:
                    return True
        return False

    def _replacement_blocks(self, available: int, before: int) -> int:
        """KV blocks for a group replacing one that had `before`: the same count, so what
        fitted still fits and the memory plan stays the one the runtime started with. Memory
        the killed workers held may not be free yet (a device frees a dead process's memory
        after Ray has handed its GPU on): wait up to REPLACEMENT_KV_WAIT_S for it, then go on
        with what there is (requests that no longer fit fail alone: `_drop_unfit`)."""
        assert self.executor is not None
        deadline = time.monotonic() + REPLACEMENT_KV_WAIT_S
        while available < before and time.monotonic() < deadline:
            time.sleep(0.5)
            available = self.executor.num_available_blocks()
        if available < before:
            logger.warning(
                "the replacement workers have KV memory for %d blocks, the replaced ones had %d "
                "(after waiting %g s for it to be freed); going on with %d",
                available,
                before,
                REPLACEMENT_KV_WAIT_S,
                available,
            )
        return min(available, before)

    def _drop_unfit(self) -> None:
        """Fail the requests whose tokens no longer fit the KV cache (a replacement group that
        got less memory than the one it replaced: `_replacement_blocks`)."""
        capacity = self.blocks.capacity_tokens
        unfit = [
            r
            for r in [*self._active.values(), *self._deferred]
            if self._kv_tokens(len(r.seq.prompt_token_ids) + r.seq.params.max_new_tokens) > capacity
        ]
        if unfit:
            self._fail(
                unfit,
                WorkerError(
                    f"the workers were replaced and the new ones' KV cache holds {capacity} "
                    "tokens, fewer than this request needs: submit it again with a shorter "
                    "prompt or max_new_tokens, or once the workers have their memory back"
                ),
            )

    def _check_session_fits(self, num_blocks: int) -> None:
        """Fail at start when one full session cannot fit in the KV memory the workers have
        (with a sliding window on every layer, the KV it holds at once)."""
        bs, cp, tp = self.config.cache.block_size, self.config.parallel.cp, self.config.parallel.tp
        session = self.config.session_len
        per_rank = num_blocks * bs
        if per_rank * cp >= self._kv_tokens(session) or num_blocks < 1:  # (none: BlockManager)
            return
        need_cp = -(-session // max(per_rank, 1))
        where, more = "left on each worker", ""
        if self.config.resolved_device() == "cpu":
            gb = self.config.cache.cpu_kv_cache_gb
            if gb is None:
                where = (
                    "each worker may reserve (one full session's by default, capped at its share "
                    "of 90% of the memory its node has available)"
                )
            else:
                where = f"each worker reserves (--cpu-kv-cache-gb {gb:g})"
                need_blocks = kv_tokens_per_worker(session, cp, bs) // bs
                need_gb = need_blocks * gb / num_blocks  # (gb / num_blocks: one block's GiB)
                more = f"raise --cpu-kv-cache-gb to {math.ceil(need_gb * 100) / 100:g}, "
        raise ConfigError(
            f"session_len {session} does not fit: the KV memory {where} holds "
            f"{num_blocks} blocks of {bs} tokens, {per_rank * cp} tokens over cp={cp}; "
            f"use --cp {need_cp} (KV is split over cp ranks), raise --tp (shards KV heads and "
            f"weights; now {tp}), {more}or shorten --session-len to {per_rank * cp} "
            "(`launch/run.py --dry-run` prints the plan)"
        )


def _merge(deltas: list[RequestDelta]) -> RequestDelta:
    """Consecutive deltas of one request as one."""
    logprobs = None
    if deltas[0].logprobs is not None:
        logprobs = [lp for d in deltas for lp in d.logprobs or ()]
    return RequestDelta(
        [t for d in deltas for t in d.token_ids],
        "".join(d.text for d in deltas),
        logprobs,
        deltas[-1].finish_reason,
        deltas[0].prompt_logprobs,
    )


def _check_ids(ids: list[int], vocab_size: int, index: int) -> None:
    if not ids:
        raise ValueError(f"prompt {index} is empty; give at least one token")
    if set(map(type, ids)) == {int} and min(ids) >= 0 and max(ids) < vocab_size:
        return  # the common case, checked at C speed (a million-token prompt)
    bad = [
        t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size
    ]
    if bad:
        raise ValueError(f"prompt {index} has token ids outside [0, {vocab_size}): {bad[:5]}")


__all__ = ["Engine", "EngineDeadError", "RequestHandle", "StepRecord", "SeqStatus"]
