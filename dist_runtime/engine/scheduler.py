"""Continuous batching on the driver: plain Python, no torch.

Each step spends a token budget: every running decode first (one token each), then prefill
chunks of sequences still reading their prompt, then newly admitted sequences while KV blocks
last. When a decode cannot get a block, the most recently arrived sequence is preempted: its
blocks are freed and it is recomputed later (prompt + output so far).

Requests carry a priority (`SamplingParams.priority`, lower first) that improves by one level
for every `priority_aging_s` seconds since they arrived, so no request waits behind more
important ones forever. As the aging is the same for all, it orders requests by a fixed rank
(`Sequence.rank`: priority plus arrival time in aging units): the waiting queue is kept in rank
order (arrival order within one priority), decodes claim blocks most important first, a
preemption takes the least important running sequence (the latest arrived among equals), and a
waiting sequence that finds no block or slot preempts a running one at least a whole level
less important that this step has not scheduled yet. With every priority equal (the default)
this is the plain first-come order above.

Among requests of one priority, tenants (the server's API keys, a job's submitter: the
`tenant` a request is added with) share fairly (`SchedulerConfig.fair_share`), as in the
Virtual Token Counter (Sheng et al., OSDI 2024): each tenant counts the service it received
(prompt tokens computed, plus `FAIR_OUTPUT_WEIGHT` per generated token, charged as steps are
planned, divided by the tenant's weight), and a free slot goes to the oldest waiting request of
the tenant with the lowest count.
A tenant returning from idle starts at the lowest count of those active, so idle time banks no
credit. One tenant's hundred queued requests then take turns with another's one instead of
going first; with a single tenant (no API keys) the order is unchanged.

With speculative decoding (`num_speculative_tokens` > 0), a decoding sequence may carry a draft
(`dist_runtime.engine.speculative`): the step computes its last token and the draft, and the
workers return the draft tokens the model agrees with plus one more. Drafts use the step's
spare budget and only never-used blocks (no preemption, no eviction from the prefix cache); K/V
written for a rejected draft token lies past the sequence's computed tokens and is overwritten by
the next step.

A prompt whose prefix waits in the host or disk tier of the prefix cache is read back a share
per step (`LOADS_PER_STEP` times the token budget, over every sequence reading): the copies run
before each step, so a long document's read goes between the other requests' decode steps, as
its prefill would, instead of holding them up for all of it at once.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dist_runtime.config import SchedulerConfig
from dist_runtime.engine.block_manager import BlockManager
from dist_runtime.engine.speculative import PromptLookup
from dist_runtime.engine.thinking import ThinkingBudget
from dist_runtime.protocol import (
    DISK_LOAD,
    LAST_SAMPLED,
    KVMove,
    SamplingSpec,
    SeqStep,
    StepPlan,
    StepResult,
    reads_history,
)
from dist_runtime.sampling_params import SamplingParams

FAIR_OUTPUT_WEIGHT = 2.0
"""Service one generated token counts for, against 1 for a computed prompt token (the Virtual
Token Counter's weights: a decode row costs a share of a weight-bandwidth-bound step, a prompt
token a share of a compute-bound chunk)."""

LOADS_PER_STEP = 2
"""Tokens of prefix read back from the host and disk tiers per step, as a multiple of the
step's token budget (reading is faster than computing, so a step reads more than it prefills)."""


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    output_token_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0
    """Tokens whose K/V are in the cache."""
    block_table: list[int] = field(default_factory=list)
    num_blocks_sent: int = 0
    """Leading entries of block_table the workers already know."""
    is_reset: bool = True
    """Workers must (re)create their state for this sequence at its next step."""
    finish_reason: str | None = None
    logprobs: list[Any] = field(default_factory=list)
    """TokenLogprobs of each output token, when the request asked for them."""
    text_state: Any = None
    """The driver's detokenization state (a TextStream), when the model has a tokenizer."""
    guide: Any = None
    """With guided output: the request's `dist_runtime.text.guided.JsonGuide`."""
    draft: list[int] = field(default_factory=list)
    """Draft tokens proposed for the step being planned (speculative decoding)."""
    draft_masks: list[bytes] = field(default_factory=list)
    """With guided output and a draft: the allowed-token masks of its rows."""
    token_buffer: Any = None
    """Its tokens as an array for the draft lookup (`speculative.TokenBuffer`), once needed."""
    spec_accepted: float = 0.0
    """Draft tokens of this sequence the model kept (decayed while it drafts nothing)."""
    spec_rejected: float = 0.0
    """Its drafts that ended in a rejected token (the same decay)."""
    num_drafted: int = 0
    """Draft tokens the workers checked for it."""
    num_accepted: int = 0
    """Of those, the ones kept."""
    prediction_array: Any = None
    """params.prediction as an array, once a draft needs it."""
    prediction_checked: int = 0
    """Output tokens found equal to the prediction's start so far (-1: they parted)."""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def holds_stops(self, ahead: int = 0) -> bool:
        """Whether its sample `ahead` tokens from now must not be EOS or a stop id (it has
        fewer than min_tokens output tokens before it)."""
        return (
            self.min_tokens_mask is not None
            and len(self.output_token_ids) + ahead < self.params.min_tokens
        )

    num_hashed_blocks: int = 0
    """Leading blocks of block_table registered in the prefix cache."""
    num_released_blocks: int = 0
    """Leading entries of block_table given back to the pool, a sliding window past them
    (`Scheduler.window`): stale ids that no kernel reads and `BlockManager.free` skips."""
    prefix_hash: int | None = None
    """Chained hash after the last registered block (None: the cache's root)."""
    num_cached_tokens: int = 0
    """Prompt tokens found in the prefix cache at admission."""
    was_preempted: bool = False
    """Preempted at least once (its blocks were taken back; it recomputes)."""
    suspect_at: int | None = None
    """Tokens it had computed when a step it ran in failed, until it runs past that point: a
    suspect of that failure. At most one suspect runs at a time (others run beside it), so a
    request that makes steps fail again is singled out (`Engine._blame`)."""
    loading: bool = False
    """Admitted while more of its prefix waits in the host or disk tier than one step reads:
    it runs no chunk until the rest is read (`Scheduler._go_on_loading`)."""
    bad_word_ids: list[list[int]] = field(default_factory=list)
    """params.bad_words as token sequences (`Engine._bad_word_ids`)."""
    thinking: ThinkingBudget | None = None
    """With params.thinking_budget: where its thinking is and what it must write next."""
    min_tokens_mask: bytes | None = None
    """With min_tokens: the allowed-token mask of its samples before it (EOS and stop ids
    out); None when there is nothing to hold back."""
    rank: float = 0.0
    """Its place in priority order, lower first: its priority, plus its arrival time in
    units of `SchedulerConfig.priority_aging_s` (so a request that has waited that long
    ranks with those one priority level more important arriving now); set by `add`."""
    tenant: str | None = None
    """Who it runs for (an API key's name; None: unnamed), for the fair share between tenants."""
    rope_base: float = 0.0
    """RoPE base fixed for this request (0: the model's own); it salts its prefix-cache keys."""
    adapter: int = 0
    """LoRA adapter slot (0: the base model)."""
    adapter_digest: bytes = b""
    """Its adapter's content hash, which salts its prefix-cache keys."""
    prompt_logprobs: list[Any] = field(default_factory=list)
    """With params.prompt_logprobs: a TokenLogprobs (or None) per prompt position, so a
    recompute overwrites positions instead of adding entries; [0] stays None."""
    num_prompt_logprobs: int = 0
    """Positions of prompt_logprobs filled so far (complete at len(prompt) - 1)."""

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt positions are still to be scored: such a sequence computes its prompt."""
        return (
            self.params.prompt_logprobs is not None
            and self.num_prompt_logprobs < len(self.prompt_token_ids) - 1
        )

    def token_slice(self, start: int, stop: int) -> list[int]:
        """Tokens [start, stop) of prompt + output, without concatenating the whole sequence."""
        n = len(self.prompt_token_ids)
        if stop <= n:
            return self.prompt_token_ids[start:stop]
        if start >= n:
            return self.output_token_ids[start - n : stop - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - n]

    def sampling_spec(self) -> SamplingSpec:
        p = self.params
        return SamplingSpec(
            temperature=float(p.temperature),
            top_k=p.top_k if p.top_k < 2**31 else 0,  # (past any vocabulary: no limit)
            top_p=float(p.top_p),
            min_p=float(p.min_p),
            repetition_penalty=float(p.repetition_penalty),
            presence_penalty=float(p.presence_penalty),
            frequency_penalty=float(p.frequency_penalty),
            num_prompt_tokens=len(self.prompt_token_ids),
            seed=self.seed,
            logprobs=-1 if p.logprobs is None else p.logprobs,
            bias_ids=[t for t, _ in p.logit_bias],
            bias_values=[b for _, b in p.logit_bias],
            allowed_ids=list(p.allowed_token_ids or ()),
            bad_words=self.bad_word_ids,
        )


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_tokens: int


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, session_len: int = 0):
        self.config = config
        self.blocks = blocks
        self.session_len = session_len
        """Longest sequence (drafts never run past it); 0: unbounded (tests)."""
        self.lookup = PromptLookup(
            config.num_speculative_tokens,
            config.prompt_lookup_max,
            config.prompt_lookup_min,
            adaptive=config.draft_policy == "adaptive",
        )
        """Drafts for every decoding sequence (num_speculative_tokens > 0), or for those with
        a predicted output only."""
        self.num_draft_tokens = 0
        """Draft tokens the workers checked (speculative decoding)."""
        self.num_accepted_tokens = 0
        """Of those, the ones the model agreed with."""
        self.window = 0
        """The model's sliding window when every layer has it (0: none, or some layer sees
        every key): after each step a sequence gives back the blocks its next query's window
        has passed, so it holds about window + one step's tokens of KV, not its length."""
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._finished_ids: list[int] = []
        self._step_ids = itertools.count()
        self._loads_left = 0
        """Blocks the current step may still read back from the host and disk tiers."""
        self.num_preemptions = 0
        self.num_prompt_tokens_computed = 0
        """Prompt tokens the workers computed (prefix-cache hits excluded, recomputes counted)."""
        self._seqs: dict[int, Sequence] = {}
        self.admit_hook: Callable[[Sequence], bool] | None = None
        """Called for a waiting sequence with a LoRA adapter before it is admitted (the engine
        makes its adapter resident and gives it the slot); False leaves it waiting this step,
        behind the sequences admitted past it."""
        self.served: dict[str | None, float] = {}
        """Service each tenant received (the fair share's counters): prompt tokens computed
        plus FAIR_OUTPUT_WEIGHT per generated token, lifted on a return from idle."""
        self._active: dict[str | None, int] = {}
        """Sequences waiting or running per tenant (tenants with none are absent)."""
        self.weights: dict[str | None, float] = {}
        """Each tenant's share of the service (1 when absent): a tenant of weight 2 is counted
        half of what it receives, so it gets twice the turns of one of weight 1."""
        self._waiting_by: dict[tuple[str | None, int], int] = {}
        """Sequences waiting per (tenant, priority) (pairs with none are absent)."""

    def add(self, seq: Sequence) -> None:
        aging = self.config.priority_aging_s
        seq.rank = seq.params.priority + (time.monotonic() / aging if aging else 0.0)
        tenant = seq.tenant
        if tenant not in self._active:  # back from idle: no credit for the time away
            active = [self.served.get(t, 0.0) for t in self._active]
            if active:
                self.served[tenant] = max(self.served.get(tenant, 0.0), min(active))
        self._active[tenant] = self._active.get(tenant, 0) + 1
        self._enqueue(seq, front=False)
        self._seqs[seq.seq_id] = seq

    def _enqueue(self, seq: Sequence, front: bool) -> None:
        """Into the waiting queue in priority order: at the back of its priority (a new
        arrival) or at its front (a preempted or reset sequence)."""
        p = seq.rank
        waiting = self.waiting
        key = (seq.tenant, seq.params.priority)
        self._waiting_by[key] = self._waiting_by.get(key, 0) + 1
        if not front and (not waiting or waiting[-1].rank <= p):
            waiting.append(seq)  # the common case: equal priorities
            return
        if front and (not waiting or waiting[0].rank >= p):
            waiting.appendleft(seq)
            return
        ahead = (lambda q: q > p) if not front else (lambda q: q >= p)
        at = next((i for i, w in enumerate(waiting) if ahead(w.rank)), len(waiting))
        waiting.insert(at, seq)

    def get(self, seq_id: int) -> Sequence:
        return self._seqs[seq_id]

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[StepPlan, list[ScheduledSeq]]:
        # The budget is per cp rank: striped blocks spread a chunk evenly over the ranks.
        budget = self.config.max_num_batched_tokens * self.blocks.cp_size
        self._loads_left = LOADS_PER_STEP * budget // self.blocks.block_size
        scheduled: list[ScheduledSeq] = []
        self._make_room_for_waiting()
        decodes = self._decodes_with_blocks()
        budget -= len(decodes)
        share = self.lookup.row_share(len(decodes))
        for seq in decodes:
            n = self._propose(seq, budget, share) if self.lookup.drafts(seq) else 0
            scheduled.append(ScheduledSeq(seq, 1 + n))
            budget -= n
        prefilling = [
            s
            for s in self.running
            if s.num_computed_tokens < s.num_tokens - 1 and not _has(scheduled, s)
        ]
        # New requests go before running prefill chunks, so a short request's first token never
        # waits for a long document's prefill; while one runs they take at most half the
        # budget, so the document keeps going too. Preempted sequences queue behind running
        # prefills (else a recompute could take the blocks a prefill needs, step after step).
        share = budget if not prefilling else max(budget // 2, 1)
        budget -= self._admit_waiting(scheduled, min(share, budget), fresh_only=True)
        for seq in prefilling:
            if seq.loading and seq.status is SeqStatus.RUNNING:
                self._go_on_loading(seq)
            if budget <= 0:
                break
            if seq.status is not SeqStatus.RUNNING or seq.loading:
                continue  # preempted just now for a more important arrival, or still reading
            n = self._chunk(seq, budget)
            while not n and self._preempt_after(seq, scheduled):
                n = self._chunk(seq, budget)
            if n:
                scheduled.append(ScheduledSeq(seq, n))
                budget -= n
        self._admit_waiting(scheduled, budget)
        return self._plan(scheduled), scheduled

    def _admit_waiting(
        self, scheduled: list[ScheduledSeq], budget: int, fresh_only: bool = False
    ) -> int:
        """Admit waiting sequences in order while tokens, slots and blocks last (with
        fresh_only, up to the first preempted one); tokens used."""
        used = 0
        skipped: set[int] = set()  # waiting for an adapter slot: the others go on
        while used < budget:
            seq = self._next_waiting(skipped)
            if seq is None or (fresh_only and seq.was_preempted):
                break
            if seq.suspect_at is not None and self.suspect_running():
                skipped.add(seq.seq_id)  # one suspect at a time: the others go on
                continue
            hook = self.admit_hook
            if hook is not None and seq.params.adapter is not None and not hook(seq):
                skipped.add(seq.seq_id)
                continue
            if len(self.running) >= self.config.max_num_seqs and not self._preempt_for(
                seq, scheduled
            ):
                break
            self._reuse_prefix(seq)
            if seq.loading:  # admitted; it computes once the rest of its prefix is read
                self._unqueue(seq)
                seq.status = SeqStatus.RUNNING
                self.running.append(seq)
                continue
            n = self._chunk(seq, budget - used)
            if not n:
                self._drop_blocks(seq)
                if self._preempt_for(seq, scheduled):
                    continue  # its blocks may be enough now
                break
            self._unqueue(seq)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, n))
            used += n
        return used

    def suspect_running(self) -> bool:
        """Whether a suspect of a failed step (`Sequence.suspect_at`) runs."""
        return any(s.suspect_at is not None for s in self.running)

    def _next_waiting(self, skipped: set[int]) -> Sequence | None:
        """The waiting sequence to admit next (None: none but those in `skipped`): the head
        of the queue, unless other tenants wait at its priority: then the oldest of those of
        the tenant with the least service (a preempted head goes first regardless)."""
        head = next((s for s in self.waiting if s.seq_id not in skipped), None)
        if head is None or head.was_preempted or not self.config.fair_share:
            return head
        priority = head.params.priority
        tenants = sum(1 for _, p in self._waiting_by if p == priority)
        if tenants < 2:
            return head  # the common case: one tenant waits at this priority
        best, least = head, self.served.get(head.tenant, 0.0)
        seen = {head.tenant}
        for seq in self.waiting:
            if (
                seq.tenant in seen
                or seq.params.priority != priority
                or seq.was_preempted
                or seq.seq_id in skipped
            ):
                continue
            seen.add(seq.tenant)
            served = self.served.get(seq.tenant, 0.0)
            if served < least:
                best, least = seq, served
            if len(seen) == tenants:
                break  # the oldest of every tenant waiting at this priority seen
        return best

    def _unqueue(self, seq: Sequence) -> None:
        if self.waiting[0] is seq:
            self.waiting.popleft()
        else:
            del self.waiting[next(i for i, s in enumerate(self.waiting) if s is seq)]
        self._count_out(seq)

    def _count_out(self, seq: Sequence) -> None:
        _decrement(self._waiting_by, (seq.tenant, seq.params.priority))

    def _decodes_with_blocks(self) -> list[Sequence]:
        """Running sequences that decode this step, preempting others until all have blocks."""
        decodes: list[Sequence] = []
        # most important first, so a preemption takes blocks from the least important
        for seq in sorted(self.running, key=lambda s: s.rank):
            if seq.status is not SeqStatus.RUNNING or seq.num_computed_tokens != seq.num_tokens - 1:
                continue
            while not self.blocks.can_grow(seq.block_table, seq.num_tokens):
                victim = self._victim(exclude=decodes)
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                self.blocks.grow(seq.block_table, seq.num_tokens)
                decodes.append(seq)
        return decodes

    def _propose(self, seq: Sequence, budget: int, share: float) -> int:
        """Give a decoding sequence a draft of at most `budget` tokens, within its length
        limits, the never-used blocks (its table grows to hold it) and what its rows are worth
        (`PromptLookup.draft_len` at a row's cost `share`); its length."""
        p = seq.params
        room = seq.thinking.draft_room() if seq.thinking is not None else None
        if seq.holds_stops() or room == 0:  # its next sample needs a mask: no draft rows
            seq.draft = []
            return 0
        limit = min(budget, p.max_new_tokens - len(seq.output_token_ids) - 1)
        if room is not None:  # (no step takes the thinking past its budget)
            limit = min(limit, room)
        if self.session_len:
            limit = min(limit, self.session_len - seq.num_tokens - 1)
        limit = min(limit, self.blocks.max_tokens(seq.block_table, evict=False) - seq.num_tokens)
        draft = self.lookup.propose(seq, limit, share)
        if draft and seq.guide is not None:  # the part its grammar takes, and the rows' masks
            draft, seq.draft_masks = seq.guide.check_draft(draft)
            if not draft:
                seq.draft_masks = []
        if draft:
            self.blocks.grow(seq.block_table, seq.num_tokens + len(draft))
        seq.draft = draft
        return len(draft)

    def _victim(self, exclude: list[Sequence]) -> Sequence:
        """The running sequence to preempt, of those not in `exclude`."""
        victim = self._least_important(lambda s: not _in(exclude, s))
        assert victim is not None  # the sequence asking is never excluded
        return victim

    def _least_important(self, eligible: Callable[[Sequence], bool]) -> Sequence | None:
        """The eligible running sequence with the highest priority value, the latest admitted
        among equals; None when none is eligible."""
        candidates = [i for i, s in enumerate(self.running) if eligible(s)]
        if not candidates:
            return None
        return self.running[max(candidates, key=lambda i: (self.running[i].rank, i))]

    def _make_room_for_waiting(self) -> None:
        """Preempt running sequences less important than the head of the queue (least
        important first) until it has a slot and the blocks of a first chunk: else running
        decodes, scheduled first every step, would keep it out until they finish."""
        if not self.waiting:
            return
        head = self.waiting[0]
        if head.suspect_at is not None and self.suspect_running():  # it waits for that one
            first = next((s for s in self.waiting if s.suspect_at is None), None)
            if first is None:
                return
            head = first
        p = head.rank
        if not any(s.rank >= p + 1 for s in self.running):
            return  # the common case (equal priorities): nothing to preempt
        cached = 0
        if not head.block_table and not head.needs_prompt_logprobs:
            # the blocks its prompt finds in the prefix cache need no room
            n = head.num_tokens - 1
            cached = self.blocks.cached_prefix_tokens(head.token_slice(0, n), n, self._root(head))
        first_chunk = min(head.num_tokens - cached, self.config.max_num_batched_tokens)
        while not (
            len(self.running) < self.config.max_num_seqs and self.blocks.can_grow([], first_chunk)
        ):
            if not self._preempt_for(head, []):
                return

    def _preempt_for(self, seq: Sequence, scheduled: list[ScheduledSeq]) -> bool:
        """Preempt a running sequence of lower priority than waiting `seq` (one this step
        has not scheduled), to free its blocks and slot; False when there is none."""
        p = seq.rank
        # a whole priority level less important (ranks within one level only order the queue)
        victim = self._least_important(lambda s: s.rank >= p + 1 and not _has(scheduled, s))
        if victim is None:
            return False
        self._preempt(victim)
        return True

    def _preempt_after(self, seq: Sequence, scheduled: list[ScheduledSeq]) -> bool:
        """For a running prefill that found no free block: preempt the least important
        running sequence ranked after it (less important, or as important and admitted later)
        that this step has not scheduled; False when there is none. Without it, prefills
        admitted together could hold every block between them, each waiting for one more, with
        no decode left to finish and free some."""
        order = {id(s): i for i, s in enumerate(self.running)}
        after = (seq.rank, order[id(seq)])
        victim = self._least_important(
            lambda s: (s.rank, order[id(s)]) > after and not _has(scheduled, s)
        )
        if victim is None:
            return False
        self._preempt(victim)
        return True

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """Prefill tokens of seq to run now (grows its table), 0 when no block is free."""
        remaining = seq.num_tokens - seq.num_computed_tokens
        n = min(remaining, budget)
        n = min(n, self.blocks.max_tokens(seq.block_table) - seq.num_computed_tokens)
        if n <= 0:
            return 0
        self.blocks.grow(seq.block_table, seq.num_computed_tokens + n)
        return n

    def _reuse_prefix(self, seq: Sequence) -> None:
        """Start a sequence from the cached blocks of its longest known prefix."""
        if seq.block_table or seq.num_computed_tokens or seq.needs_prompt_logprobs:
            return
        self._match(seq, self._root(seq))

    def _match(self, seq: Sequence, parent: int) -> None:
        """Extend a sequence's table with cached blocks from its first block not computed on,
        reading at most this step's share from the host and disk tiers (`loading` when more
        waits there)."""
        # At least the last token is computed, so the step yields logits to sample from.
        n, start = seq.num_tokens - 1, len(seq.block_table)
        bm = self.blocks
        read = bm.num_host_hit_tokens + bm.num_disk_hit_tokens
        blocks, seq.prefix_hash, seq.loading = bm.match_more(
            seq.token_slice(0, n), n, parent, start, max_loads=max(self._loads_left, 0)
        )
        read = bm.num_host_hit_tokens + bm.num_disk_hit_tokens - read
        self._loads_left -= read // bm.block_size
        seq.block_table.extend(blocks)
        seq.num_hashed_blocks = len(seq.block_table)
        cached = len(seq.block_table) * self.blocks.block_size
        seq.num_computed_tokens = seq.num_cached_tokens = cached
        self._release_passed(seq)  # (a long cached prefix: only its window's blocks stay held)

    def _go_on_loading(self, seq: Sequence) -> None:
        """Read the next share of a loading sequence's prefix (it stops loading when its
        chain ends, in a tier or not)."""
        assert seq.prefix_hash is not None
        self._match(seq, seq.prefix_hash)

    def _drop_blocks(self, seq: Sequence) -> None:
        seq.loading = False
        self.blocks.free(seq.block_table, seq.num_released_blocks)
        seq.num_released_blocks = 0
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0
        seq.prefix_hash = None

    def _register_blocks(self, seq: Sequence) -> None:
        bs = self.blocks.block_size
        # a step's accepted draft tokens are computed before the engine appends them
        known = min(seq.num_computed_tokens, seq.num_tokens)
        full = min(known // bs, len(seq.block_table))
        if full <= seq.num_hashed_blocks:
            return
        first = seq.num_hashed_blocks
        tokens = seq.token_slice(first * bs, full * bs)
        parent = self._root(seq) if seq.prefix_hash is None else seq.prefix_hash
        for i in range(first, full):
            parent = self.blocks.register_block(
                i, seq.block_table[i], parent, tokens[(i - first) * bs : (i - first + 1) * bs]
            )
        seq.num_hashed_blocks, seq.prefix_hash = full, parent

    def _release_passed(self, seq: Sequence) -> None:
        """Give back the leading blocks of `seq` that its sliding window has passed: its next
        query, at position num_computed_tokens, sees positions from num_computed_tokens -
        window + 1 on (and later ones later still). Nothing without a window."""
        if not self.window:
            return
        passed = (seq.num_computed_tokens - self.window + 1) // self.blocks.block_size
        passed = min(passed, len(seq.block_table))
        if passed > seq.num_released_blocks:
            self.blocks.release_head(seq.block_table, seq.num_released_blocks, passed)
            seq.num_released_blocks = passed

    def _root(self, seq: Sequence) -> int:
        """Hash chain root of a sequence's blocks: K/V rotated with another base, or computed
        through an adapter, differ; a cache salt keeps its blocks among its own."""
        root = self.blocks.root_hash
        if seq.rope_base != 0.0:
            root = self.blocks.derive_root(root, seq.rope_base)
        if seq.adapter_digest:
            root = self.blocks.derive_root(root, seq.adapter_digest)
        if seq.params.cache_salt is not None:
            root = self.blocks.derive_root(root, b"salt:" + seq.params.cache_salt.encode())
        return root

    def reset(self, blocks: BlockManager) -> None:
        """The workers were replaced and every KV block with them: adopt the new pool and put
        every running sequence back at the head of the queue, to recompute from its start."""
        self.blocks = blocks
        for seq in reversed(self.running):
            seq.status = SeqStatus.WAITING
            seq.was_preempted = True  # ahead of the arrivals, as a preempted sequence is
            self._enqueue(seq, front=True)
        self.running.clear()
        for seq in self.waiting:
            seq.block_table.clear()  # ids of the old pool: nothing to free
            seq.num_released_blocks = 0
            seq.num_computed_tokens = 0
            seq.num_blocks_sent = 0
            seq.num_hashed_blocks = 0
            seq.prefix_hash = None
            seq.is_reset = True
            seq.loading = False
            seq.draft = []
            seq.draft_masks = []
        self._finished_ids.clear()

    def unread(self, moves: list[KVMove]) -> list[Sequence]:
        """Disk reads that failed their check on a worker (the step that carried them ran on
        none): the prefix cache forgets their blocks and their files go from every worker, and
        each running sequence whose table holds one starts again, to find its prefix up to the
        block before and compute the rest. Returns those sequences."""
        bm = self.blocks
        bm.forget(moves)
        for m in moves:
            bm.drop_from_disk(m.pool, [int(m.key, 16)])
        bm.num_disk_hit_tokens -= len(moves) * bm.block_size
        bm.num_hit_tokens -= len(moves) * bm.block_size
        redo = self._holding({(m.pool, m.block) for m in moves})
        for seq in redo:
            self._preempt(seq)
        return redo

    def _holding(self, blocks: set[tuple[int, int]]) -> list[Sequence]:
        """The running sequences whose tables hold one of `blocks` ((pool, block) pairs)."""
        cp = self.blocks.cp_size
        return [
            s
            for s in self.running
            if any(
                (i % cp, b) in blocks
                for i, b in enumerate(s.block_table)
                if i >= s.num_released_blocks
            )
        ]

    def redo(self, seqs: list[Sequence], moves: list[KVMove]) -> None:
        """A step failed on the workers without taking their state with it (the caller made
        the prefix cache forget the blocks its `moves` touched): its running sequences, and
        every running one holding a block the step was to read back, give their blocks back
        (those their earlier steps filled stay in the prefix cache) and wait at the head of
        the queue to compute again."""
        loads = {
            (m.pool, m.block)
            for m in moves
            if m.disk == DISK_LOAD or (m.disk == 0 and not m.to_host)  # into a device block
        }
        for seq in [*seqs, *self._holding(loads)]:
            if seq.status is SeqStatus.RUNNING:  # (once: a preempted one waits)
                self._preempt(seq, count=False)

    def _preempt(self, seq: Sequence, count: bool = True) -> None:
        self.running.remove(seq)
        self._register_blocks(seq)
        self._drop_blocks(seq)
        seq.num_computed_tokens = 0
        seq.num_blocks_sent = 0
        seq.is_reset = True
        seq.status = SeqStatus.WAITING
        seq.was_preempted = True
        seq.draft = []
        seq.draft_masks = []
        self._enqueue(seq, front=True)
        self._finished_ids.append(seq.seq_id)
        self.num_preemptions += count

    def _plan(self, scheduled: list[ScheduledSeq]) -> StepPlan:
        steps = []
        for item in scheduled:
            seq, n = item.seq, item.num_tokens
            start = seq.num_computed_tokens
            new_blocks = seq.block_table[seq.num_blocks_sent :]
            draft, seq.draft = seq.draft, []
            masks, seq.draft_masks = seq.draft_masks, []
            self._charge(seq, start, n)
            n -= len(draft)
            rows, next_token = _prompt_rows(seq, start, n)
            sample = start + n == seq.num_tokens
            steps.append(
                SeqStep(
                    seq_id=seq.seq_id,
                    token_ids=seq.token_slice(start, start + n) + draft,
                    start_pos=start,
                    num_draft_tokens=len(draft),
                    new_blocks=new_blocks,
                    is_new=seq.is_reset,
                    sample=sample,
                    sampling=seq.sampling_spec() if seq.is_reset else None,
                    rope_base=seq.rope_base if seq.is_reset else 0.0,
                    adapter=seq.adapter if seq.is_reset else 0,
                    cached_token_ids=seq.token_slice(0, start)
                    if seq.is_reset and start and _needs_history(seq)
                    else [],
                    prompt_logprobs=(seq.params.prompt_logprobs or 0) if rows else -1,
                    prompt_logprob_rows=rows,
                    next_prompt_token=next_token,
                    allowed_tokens=_allowed(seq) if sample and not draft else None,
                    draft_allowed_tokens=masks,
                )
            )
            seq.num_blocks_sent = len(seq.block_table)
            seq.is_reset = False
        reset_ids = {s.seq_id for s in steps if s.is_new}
        finished = [i for i in self._finished_ids if i not in reset_ids]
        self._finished_ids = []
        return StepPlan(
            step_id=next(self._step_ids),
            seqs=steps,
            finished_seq_ids=finished,
            kv_moves=self.blocks.take_moves(),
        )

    def _charge(self, seq: Sequence, start: int, n: int) -> None:
        """Count rows [start, start + n) of a planned step (draft rows included: they cost
        their compute whether kept or not) to its tenant's service."""
        prompt = min(max(len(seq.prompt_token_ids) - start, 0), n)
        cost = prompt + FAIR_OUTPUT_WEIGHT * (n - prompt)
        weight = self.weights.get(seq.tenant, 1.0)
        self.served[seq.tenant] = self.served.get(seq.tenant, 0.0) + cost / weight

    def moves_plan(self) -> StepPlan | None:
        """A plan of no sequences carrying the KV moves queued since the last plan (the disk
        tier's saves of the blocks a finished request's last step filled), for an engine with
        nothing else to run; None when none are queued."""
        if not self.blocks.has_moves:
            return None
        finished, self._finished_ids = self._finished_ids, []
        return StepPlan(
            step_id=next(self._step_ids),
            seqs=[],
            finished_seq_ids=finished,
            kv_moves=self.blocks.take_moves(),
        )

    def schedule_ahead(self, inflight: StepPlan, session_len: int) -> StepPlan | None:
        """The decode step after `inflight` (launched, its tokens not read yet), planned on the
        guess that no sequence stops at it: each of its sequences computes the token it is
        sampling now (`LAST_SAMPLED`, filled in on the worker). None when the step cannot be
        planned ahead: a request waits or prefills, a sequence needs a penalty (its token history
        on the worker), top-k log-probabilities, prompt log-probabilities, a logit bias, allowed
        ids, bad words or guided output (its mask follows its last token), or a block is
        missing. Greedy and sampling
        sequences alike go ahead: a draw is seeded by (seed, position), so it is the same token
        either way. A sequence that certainly stops at
        `inflight` (its length limit) is left out; one that stops by EOS or a stop string runs
        one step more, whose token the engine drops."""
        if self.waiting or len(inflight.seqs) != len(self.running):
            return None
        if any(m.disk == DISK_LOAD for m in inflight.kv_moves):
            return None  # a read may fail its check: the step is then planned again
        if self.lookup.would_draft([s for s in self.running if self.lookup.drafts(s)]):
            return None  # a draft follows the token in flight: this step waits for it
        seqs = []
        for step in inflight.seqs:  # every check before any block moves
            seq = self._seqs.get(step.seq_id)
            if seq is None or seq.status is not SeqStatus.RUNNING:
                return None
            p = seq.params
            if (
                len(step.token_ids) != 1
                or step.start_pos != seq.num_tokens - 1
                or p.logprobs
                or p.guided
                or p.logit_bias
                or p.allowed_token_ids
                or seq.bad_word_ids
                or seq.holds_stops(ahead=1)
                or (seq.thinking is not None and seq.thinking.needs_last_token())
                or _needs_history(seq)
                or seq.needs_prompt_logprobs
            ):
                return None
            seqs.append(seq)
        steps = []
        for seq in seqs:
            pos = seq.num_tokens
            if len(seq.output_token_ids) + 1 >= seq.params.max_new_tokens or pos + 1 >= session_len:
                continue  # its in-flight token is its last
            if not self.blocks.can_grow(seq.block_table, pos + 1):
                break  # the rest decode after the step in flight is read, as usual
            self.blocks.grow(seq.block_table, pos + 1)
            self._charge(seq, pos, 1)
            steps.append(
                SeqStep(
                    seq_id=seq.seq_id,
                    token_ids=[LAST_SAMPLED],
                    start_pos=pos,
                    new_blocks=seq.block_table[seq.num_blocks_sent :],
                    is_new=False,
                    sample=True,
                )
            )
            seq.num_blocks_sent = len(seq.block_table)
        if not steps:
            return None
        finished, self._finished_ids = self._finished_ids, []
        return StepPlan(
            step_id=next(self._step_ids),
            seqs=steps,
            finished_seq_ids=finished,
            kv_moves=self.blocks.take_moves(),
        )

    def on_step_done(self, plan: StepPlan, result: StepResult | None = None) -> None:
        """The workers ran `plan`: its tokens' K/V are now cached (of a draft, the K/V of the
        tokens `result` accepted: it returns accepted + 1 tokens for such a sequence)."""
        returned: dict[int, int] = {}
        if result is not None and any(s.num_draft_tokens for s in plan.seqs):
            for tok in result.tokens:
                returned[tok.seq_id] = returned.get(tok.seq_id, 0) + 1
        for step in plan.seqs:
            seq = self._seqs.get(step.seq_id)
            if seq is not None and seq.status is SeqStatus.RUNNING:
                computed = len(step.token_ids)
                if step.num_draft_tokens:
                    accepted = max(returned.get(step.seq_id, 1) - 1, 0)
                    self.num_draft_tokens += step.num_draft_tokens
                    self.num_accepted_tokens += accepted
                    seq.num_drafted += step.num_draft_tokens
                    seq.num_accepted += accepted
                    PromptLookup.record(seq, step.num_draft_tokens, accepted)
                    computed += accepted - step.num_draft_tokens
                seq.num_computed_tokens = step.start_pos + computed
                if seq.suspect_at is not None and seq.num_computed_tokens > seq.suspect_at:
                    seq.suspect_at = None  # it ran past its failure: the next suspect may run
                prompt_len = len(seq.prompt_token_ids)
                self.num_prompt_tokens_computed += max(
                    0, min(seq.num_computed_tokens, prompt_len) - step.start_pos
                )
                self._register_blocks(seq)
                self._release_passed(seq)

    def drop_draft_tokens(self, seq: Sequence, unused: int) -> None:
        """A sequence ended inside a step's kept draft, `unused` of its tokens after the stop:
        all but the last (the model's own token) were counted as accepted draft tokens."""
        dropped = max(unused - 1, 0)
        seq.num_accepted -= dropped
        self.num_accepted_tokens -= dropped

    def record_step_time(self, plan: StepPlan, seconds: float) -> None:
        """A step's wall time, for the draft policy's cost fit (decode steps only)."""
        if not plan.seqs:
            return
        rows = 0
        for step in plan.seqs:
            if len(step.token_ids) != step.num_draft_tokens + 1:
                return  # a prefill chunk rode along
            rows += len(step.token_ids)
        self.lookup.cost.record(rows, seconds)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        self._release(seq)

    def abort(self, seq: Sequence) -> None:
        """Drop a sequence wherever it is (waiting or running) and free its blocks."""
        if seq.status is SeqStatus.FINISHED:
            return
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = seq.finish_reason or "abort"
        if seq in self.waiting:
            self.waiting.remove(seq)
            self._count_out(seq)
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        _decrement(self._active, seq.tenant)
        if seq in self.running:
            self.running.remove(seq)
        self._register_blocks(seq)  # blocks its last step filled (accepted draft tokens)
        self._drop_blocks(seq)
        self._seqs.pop(seq.seq_id, None)
        if seq.num_blocks_sent or not seq.is_reset:
            self._finished_ids.append(seq.seq_id)


def _decrement(counts: dict[Any, int], key: Any) -> None:
    """One fewer of `key`, which leaves `counts` at none."""
    left = counts.get(key, 1) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


def _has(scheduled: list[ScheduledSeq], seq: Sequence) -> bool:
    return any(s.seq is seq for s in scheduled)


def _in(seqs: list[Sequence], seq: Sequence) -> bool:
    return any(s is seq for s in seqs)


def _prompt_rows(seq: Sequence, start: int, n: int) -> tuple[int, int]:
    """(rows to score, the prompt token after the chunk or -1) for the chunk [start, start + n)
    of seq: positions whose next token is a prompt token, while some are still unscored."""
    if not seq.needs_prompt_logprobs:
        return 0, -1
    prompt = seq.prompt_token_ids
    rows = max(0, min(start + n, len(prompt) - 1) - start)
    return rows, prompt[start + n] if rows == n else -1


def _allowed(seq: Sequence) -> bytes | None:
    """The allowed-token mask of a sequence's next sample: the forced end of its thinking
    (its budget spent), its grammar's, or before min_tokens one without EOS and its stop ids;
    None: any token."""
    if seq.thinking is not None and seq.thinking.forced:
        return seq.thinking.mask()
    if seq.guide is not None:
        return seq.guide.allowed_tokens()
    return seq.min_tokens_mask if seq.holds_stops() else None


def _needs_history(seq: Sequence) -> bool:
    """Whether the workers' sampler reads the sequence's earlier tokens (`reads_history`)."""
    p = seq.params
    return reads_history(
        p.repetition_penalty, p.presence_penalty, p.frequency_penalty, seq.bad_word_ids
    )
