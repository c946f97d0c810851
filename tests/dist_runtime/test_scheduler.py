"""The driver's continuous-batching scheduler and KV block manager, without any worker.

`Driver` below plays the runtime's part (mark the scheduled tokens computed, append a sampled
token, finish at max_new_tokens) and `Replay` plays the workers': it rebuilds every block
table from the plans' deltas alone. Sampled tokens are a fixed function of (sequence, position),
so a sequence that is preempted and recomputed must end with exactly the tokens it would have
produced without preemption.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import pytest

from dist_runtime.config import SchedulerConfig
from dist_runtime.engine.block_manager import BlockManager
from dist_runtime.engine.scheduler import Scheduler, SeqStatus, Sequence
from dist_runtime.protocol import StepPlan
from dist_runtime.sampling_params import SamplingParams


def fake_token(seq_id: int, position: int) -> int:
    """The token 'sampled' for seq_id at position: deterministic, so recomputes agree."""
    return (seq_id * 7919 + position * 104729) % 1000


def make_seq(
    seq_id: int,
    prompt_len: int,
    max_new_tokens: int = 4,
    priority: int = 0,
    tenant: str | None = None,
) -> Sequence:
    prompt = [(seq_id * 31 + i) % 1000 for i in range(prompt_len)]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, priority=priority)
    return Sequence(
        seq_id=seq_id, prompt_token_ids=prompt, params=params, seed=seq_id, tenant=tenant
    )


@dataclass
class Replay:
    """Worker-side state rebuilt from plans only: block tables and known tokens per sequence."""

    tables: dict[int, list[int]] = field(default_factory=dict)
    reported_finished: list[int] = field(default_factory=list)

    def apply(self, plan: StepPlan, block_size: int) -> None:
        for seq_id in plan.finished_seq_ids:
            assert seq_id in self.tables, f"finished id {seq_id} was never live on the workers"
            del self.tables[seq_id]
            self.reported_finished.append(seq_id)
        ids = [s.seq_id for s in plan.seqs]
        assert len(ids) == len(set(ids)), "a sequence appears twice in one plan"
        for s in plan.seqs:
            if s.is_new:
                assert s.sampling is not None and s.start_pos == 0
                self.tables[s.seq_id] = []
            else:
                assert s.sampling is None
                assert s.seq_id in self.tables, f"seq {s.seq_id} continued but never started"
            self.tables[s.seq_id].extend(s.new_blocks)
            covered = len(self.tables[s.seq_id]) * block_size
            assert covered >= s.start_pos + len(s.token_ids)
        live = [b for table in self.tables.values() for b in table]
        assert len(live) == len(set(live)), "two live sequences share a KV block"


class Driver:
    """The runtime's loop around a Scheduler, with invariants checked on every plan. Prefix
    caching is off: every sequence computes its whole prompt (the prefix-cache tests drive a
    Scheduler through on_step_done instead)."""

    def __init__(self, num_blocks: int, block_size: int, config: SchedulerConfig):
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.scheduler = Scheduler(config, self.blocks)
        self.config = config
        self.replay = Replay()
        self.seqs: dict[int, Sequence] = {}
        self.plans: list[StepPlan] = []
        self.recomputes: list[int] = []
        self.finished_at: dict[int, int] = {}

    def add(self, *seqs: Sequence) -> None:
        for seq in seqs:
            self.seqs[seq.seq_id] = seq
            self.scheduler.add(seq)

    def step(self) -> StepPlan:
        plan, _ = self.scheduler.schedule()
        self.plans.append(plan)
        total = sum(len(s.token_ids) for s in plan.seqs)
        assert total <= self.config.max_num_batched_tokens
        assert len(self.scheduler.running) <= self.config.max_num_seqs
        self.replay.apply(plan, self.blocks.block_size)
        for s in plan.seqs:
            seq = self.seqs[s.seq_id]
            full = seq.prompt_token_ids + seq.output_token_ids
            assert s.token_ids == full[s.start_pos : s.start_pos + len(s.token_ids)]
            assert s.start_pos == seq.num_computed_tokens
            assert s.sample == (s.start_pos + len(s.token_ids) == seq.num_tokens)
            if s.is_new and seq.output_token_ids:
                self.recomputes.append(seq.seq_id)
            # The workers' tables equal the driver's after every plan.
            assert self.replay.tables[s.seq_id] == seq.block_table
            seq.num_computed_tokens = s.start_pos + len(s.token_ids)
        for s in plan.seqs:
            seq = self.seqs[s.seq_id]
            if s.sample:
                seq.output_token_ids.append(fake_token(seq.seq_id, seq.num_tokens))
                if len(seq.output_token_ids) >= seq.params.max_new_tokens:
                    self.scheduler.finish(seq, "length")
                    self.finished_at[seq.seq_id] = len(self.plans) - 1
        used = sum(len(seq.block_table) for seq in self.scheduler.running)
        assert used + self.blocks.num_free_blocks == self.blocks.num_blocks
        return plan

    def run(self, max_steps: int = 500) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_work():
                break
            plan = self.step()
            assert plan.seqs, "the scheduler made no progress"
        assert not self.scheduler.has_work()
        self.step()  # one empty step flushes the last finished ids to the workers
        assert self.replay.tables == {}
        assert self.blocks.num_free_blocks == self.blocks.num_blocks

    def expected_output(self, seq: Sequence) -> list[int]:
        n = len(seq.prompt_token_ids)
        return [fake_token(seq.seq_id, n + i) for i in range(seq.params.max_new_tokens)]


# -- BlockManager ----------------------------------------------------------------------------


def test_block_manager_grow_and_free() -> None:
    bm = BlockManager(num_blocks=5, block_size=4)
    assert bm.blocks_for(0) == 0 and bm.blocks_for(1) == 1 and bm.blocks_for(8) == 2
    table: list[int] = []
    assert bm.grow(table, 5) == table == [0, 1]
    assert bm.grow(table, 8) == []  # still covered
    assert bm.num_new_blocks(table, 9) == 1 and bm.can_grow(table, 9)
    other: list[int] = []
    bm.grow(other, 12)
    assert bm.num_free_blocks == 0 and not bm.can_grow(table, 9)
    with pytest.raises(MemoryError, match=r"need 1 KV blocks, free per pool: \[0\]"):
        bm.grow(table, 9)
    assert table == [0, 1]  # a failed grow leaves the table alone
    bm.free(other)
    assert other == [] and bm.num_free_blocks == 3
    assert sorted(bm.grow(table, 20)) == [2, 3, 4]


def test_block_manager_needs_a_block() -> None:
    with pytest.raises(ValueError, match=r"the KV cache has 0 blocks"):
        BlockManager(0, 16)


# -- Scheduler -------------------------------------------------------------------------------


def test_prefill_is_chunked_to_the_token_budget() -> None:
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8)
    d = Driver(num_blocks=64, block_size=4, config=config)
    d.add(make_seq(0, prompt_len=21, max_new_tokens=2))
    chunks = [[len(s.token_ids) for s in d.step().seqs] for _ in range(3)]
    assert chunks == [[8], [8], [5]]
    assert [s.sample for s in d.plans[-1].seqs] == [True]
    assert not any(s.sample for p in d.plans[:2] for s in p.seqs)
    d.run()
    assert d.seqs[0].output_token_ids == d.expected_output(d.seqs[0])


def test_decodes_are_scheduled_before_prefill_chunks() -> None:
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=10)
    d = Driver(num_blocks=64, block_size=4, config=config)
    d.add(make_seq(0, prompt_len=6, max_new_tokens=5), make_seq(1, prompt_len=3))
    first = d.step()
    assert [(s.seq_id, len(s.token_ids)) for s in first.seqs] == [(0, 6), (1, 3)]
    d.add(make_seq(2, prompt_len=30))
    second = d.step()
    # both running sequences decode one token; the new prompt gets the remaining 8
    assert [(s.seq_id, len(s.token_ids)) for s in second.seqs] == [(0, 1), (1, 1), (2, 8)]
    third = d.step()
    assert [(s.seq_id, len(s.token_ids)) for s in third.seqs] == [(0, 1), (1, 1), (2, 8)]
    d.run()
    for seq in d.seqs.values():
        assert seq.output_token_ids == d.expected_output(seq)


def test_new_requests_go_ahead_of_a_running_prefill_with_half_the_budget() -> None:
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16)
    d = Driver(num_blocks=64, block_size=4, config=config)
    d.add(make_seq(0, prompt_len=100, max_new_tokens=2))
    assert [(s.seq_id, len(s.token_ids)) for s in d.step().seqs] == [(0, 16)]
    d.add(make_seq(1, prompt_len=5), make_seq(2, prompt_len=40))
    # The short prompt is admitted whole at once, the long newcomer gets the rest of half the
    # budget, and the running document keeps the other half.
    assert [(s.seq_id, len(s.token_ids)) for s in d.step().seqs] == [(1, 5), (2, 3), (0, 8)]
    assert [(s.seq_id, len(s.token_ids)) for s in d.step().seqs] == [(1, 1), (0, 15)]
    d.run()
    for seq in d.seqs.values():
        assert seq.output_token_ids == d.expected_output(seq)


def test_admission_stops_when_blocks_run_out() -> None:
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256)
    d = Driver(num_blocks=5, block_size=4, config=config)
    d.add(*(make_seq(i, prompt_len=8, max_new_tokens=1) for i in range(4)))
    plan = d.step()
    # 8-token prompts take 2 blocks each: two fit whole, the third gets the last block's 4
    # tokens as a first chunk, the fourth waits.
    assert [(s.seq_id, len(s.token_ids)) for s in plan.seqs] == [(0, 8), (1, 8), (2, 4)]
    assert [s.seq_id for s in d.scheduler.waiting] == [3]
    assert sorted(b for s in plan.seqs for b in s.new_blocks) == [0, 1, 2, 3, 4]
    # 0 and 1 sampled their only token and finished, returning 4 blocks for 2 and 3.
    assert d.blocks.num_free_blocks == 4
    d.run()
    assert d.recomputes == []
    for seq in d.seqs.values():
        assert seq.status is SeqStatus.FINISHED and seq.output_token_ids == d.expected_output(seq)


def test_admission_stops_at_max_num_seqs() -> None:
    config = SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=256)
    d = Driver(num_blocks=64, block_size=4, config=config)
    d.add(*(make_seq(i, prompt_len=3, max_new_tokens=3) for i in range(5)))
    assert [s.seq_id for s in d.step().seqs] == [0, 1]
    assert len(d.scheduler.waiting) == 3
    d.run()
    for seq in d.seqs.values():
        assert seq.output_token_ids == d.expected_output(seq)


def test_preemption_frees_blocks_and_the_victim_recomputes() -> None:
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64)
    d = Driver(num_blocks=6, block_size=4, config=config)
    a, b = make_seq(0, prompt_len=7, max_new_tokens=9), make_seq(1, prompt_len=7, max_new_tokens=9)
    d.add(a, b)
    # Both prefill 7 tokens and decode in lockstep; at 12 tokens each they hold 3 blocks of 6,
    # and a's next decode needs a 4th.
    while True:
        held_by_b, generated_by_b = list(b.block_table), list(b.output_token_ids)
        plan = d.step()
        if d.scheduler.num_preemptions:
            break
    assert d.scheduler.num_preemptions == 1 and len(held_by_b) == 3
    step_a, step_b = plan.seqs
    # a (admitted first) keeps decoding, on a block b held a moment ago ...
    assert (step_a.seq_id, len(step_a.token_ids), step_a.is_new) == (0, 1, False)
    assert step_a.new_blocks and set(step_a.new_blocks) <= set(held_by_b)
    # ... and b, the victim, restarts from position 0 on the freed blocks: prompt + the tokens it
    # had generated, as a new sequence (which also tells the workers to drop its old state).
    assert step_b.seq_id == 1 and step_b.is_new and step_b.start_pos == 0
    assert step_b.token_ids == (b.prompt_token_ids + generated_by_b)[: len(step_b.token_ids)]
    assert 1 not in plan.finished_seq_ids
    d.run()
    assert d.recomputes == [1]
    for seq in (a, b):
        assert seq.output_token_ids == d.expected_output(seq)


def test_preempting_a_decode_when_it_is_the_last_admitted() -> None:
    """A decode that cannot grow and is itself the most recent sequence gives up its blocks."""
    config = SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64)
    d = Driver(num_blocks=4, block_size=2, config=config)
    a, b = make_seq(0, prompt_len=3, max_new_tokens=4), make_seq(1, prompt_len=3, max_new_tokens=4)
    d.add(a, b)
    d.run()
    assert d.scheduler.num_preemptions > 0
    for seq in (a, b):
        assert seq.output_token_ids == d.expected_output(seq)


def test_finished_ids_are_reported_once_after_finishing() -> None:
    config = SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=16)
    d = Driver(num_blocks=64, block_size=4, config=config)
    d.add(*(make_seq(i, prompt_len=2 + 3 * i, max_new_tokens=1 + i) for i in range(6)))
    d.run()
    assert d.scheduler.num_preemptions == 0
    assert sorted(d.replay.reported_finished) == list(range(6))
    for seq_id, step in d.finished_at.items():
        (reported,) = [i for i, p in enumerate(d.plans) if seq_id in p.finished_seq_ids]
        assert reported == step + 1  # in the very next plan, before its blocks are reused


def _first_steps(d: Driver) -> list[int]:
    """Sequence ids in the order their (first or recomputed) prefill started."""
    return [s.seq_id for p in d.plans for s in p.seqs if s.is_new]


def test_waiting_requests_are_admitted_by_priority() -> None:
    config = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64)
    d = Driver(num_blocks=64, block_size=4, config=config)
    d.add(*(make_seq(i, prompt_len=3, max_new_tokens=2, priority=p)
            for i, p in enumerate([2, 0, 1, 0, -1])))  # fmt: skip
    d.run()
    # lower first, first come first served among equals; nothing running is ever outranked
    assert _first_steps(d) == [4, 1, 3, 2, 0] and d.scheduler.num_preemptions == 0
    for seq in d.seqs.values():
        assert seq.output_token_ids == d.expected_output(seq)


def test_an_important_arrival_takes_the_slot_of_a_running_one() -> None:
    config = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64)
    d = Driver(num_blocks=64, block_size=4, config=config)
    low, high = make_seq(0, 5, max_new_tokens=12, priority=5), make_seq(1, 4, 3, priority=0)
    d.add(low)
    for _ in range(4):
        d.step()
    d.add(high)
    plan = d.step()
    assert [(s.seq_id, s.is_new) for s in plan.seqs] == [(1, True)]  # low gave up its slot
    assert low.status is SeqStatus.WAITING and d.scheduler.num_preemptions == 1
    d.run()
    assert d.finished_at[1] < d.finished_at[0] and d.recomputes == [0]
    for seq in (low, high):
        assert seq.output_token_ids == d.expected_output(seq)
    # an equal or less important arrival waits for the slot instead
    d = Driver(num_blocks=64, block_size=4, config=config)
    first, second = make_seq(0, 5, 6, priority=1), make_seq(1, 4, 3, priority=1)
    d.add(first)
    d.step()
    d.add(second)
    d.run()
    assert d.scheduler.num_preemptions == 0 and d.finished_at[0] < d.finished_at[1]


def test_an_important_arrival_takes_the_blocks_of_a_running_one() -> None:
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64)
    d = Driver(num_blocks=6, block_size=4, config=config)
    low = make_seq(0, 17, max_new_tokens=4, priority=3)  # 5 of the 6 blocks
    d.add(low)
    d.step()
    high = make_seq(1, 9, max_new_tokens=2, priority=0)  # needs 3
    d.add(high)
    plan = d.step()
    assert d.scheduler.num_preemptions == 1
    # high runs whole; low, preempted, restarts on what is left (3 blocks of its 5)
    assert [(s.seq_id, s.is_new, s.start_pos, len(s.token_ids)) for s in plan.seqs] == [
        (1, True, 0, 9), (0, True, 0, 12)
    ]  # fmt: skip
    d.run()
    assert d.finished_at[1] < d.finished_at[0]
    for seq in (low, high):
        assert seq.output_token_ids == d.expected_output(seq)


def test_an_arrival_whose_prompt_is_cached_preempts_nobody() -> None:
    """The blocks an arrival finds in the prefix cache (here: a document a running sequence
    shares) need no room, so it does not preempt for them. The scheduler alone, as the engine
    drives it (on_step_done caches computed blocks)."""
    blocks = BlockManager(num_blocks=14, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), blocks)
    low = make_seq(0, 40, max_new_tokens=6, priority=5)  # 10 blocks of the document
    scheduler.add(low)
    for _ in range(2):
        plan, _ = scheduler.schedule()
        scheduler.on_step_done(plan)
        for s in plan.seqs:
            if s.sample:
                low.output_token_ids.append(fake_token(0, low.num_tokens))
    assert len(low.block_table) == 11 and blocks.num_free_blocks == 3
    params = SamplingParams(max_new_tokens=2, temperature=0.0, priority=0)
    high = Sequence(seq_id=1, prompt_token_ids=low.prompt_token_ids + [1, 2], params=params,
                    seed=1)  # fmt: skip
    scheduler.add(high)
    plan, _ = scheduler.schedule()
    assert scheduler.num_preemptions == 0
    assert [(s.seq_id, s.start_pos, len(s.token_ids)) for s in plan.seqs] == [
        (0, 41, 1), (1, 40, 2)
    ]  # fmt: skip


def test_a_decode_short_of_blocks_preempts_the_least_important() -> None:
    """The less important sequence gives up its blocks even though it was admitted first."""
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64)
    d = Driver(num_blocks=6, block_size=4, config=config)
    low, high = make_seq(0, 7, max_new_tokens=9, priority=1), make_seq(1, 7, 9, priority=0)
    d.add(low)
    d.add(high)
    d.run()
    assert d.scheduler.num_preemptions >= 1 and d.recomputes and set(d.recomputes) == {0}
    assert d.finished_at[1] < d.finished_at[0]
    for seq in (low, high):
        assert seq.output_token_ids == d.expected_output(seq)


class Clock:
    """time.monotonic as the scheduler reads it, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    import dist_runtime.engine.scheduler as scheduler_module

    c = Clock()
    monkeypatch.setattr(scheduler_module.time, "monotonic", c)
    return c


@pytest.mark.parametrize("aging", [0.0, 10.0])
def test_a_request_waiting_long_enough_goes_ahead_of_more_important_arrivals(
    aging: float, clock: Clock
) -> None:
    """With aging every 10 s, a priority-2 request that has waited 25 s ranks ahead of a
    priority-0 arrival (2 levels gained, and earlier); without aging it waits behind it."""
    config = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64, priority_aging_s=aging)
    d = Driver(num_blocks=64, block_size=4, config=config)
    running = make_seq(0, 3, max_new_tokens=3, priority=0)
    d.add(running)
    d.step()
    d.add(make_seq(1, 3, max_new_tokens=2, priority=2))  # waits for the slot
    clock.now += 25
    d.add(make_seq(2, 3, max_new_tokens=2, priority=0))
    d.run()
    order = [1, 2] if aging else [2, 1]
    assert _first_steps(d)[1:] == order and d.scheduler.num_preemptions == 0


def test_aging_preempts_only_a_whole_level_less_important(clock: Clock) -> None:
    """A waiting request preempts a running one only if that one ranks a whole (aged) level
    below it: a priority-1 request running since 5 s before a priority-0 arrival has gained
    half a level and keeps its slot; one arrived with it gives the slot up."""
    config = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64, priority_aging_s=10.0)
    for head_start, preempted in ((5.0, 0), (0.0, 1)):
        d = Driver(num_blocks=64, block_size=4, config=config)
        d.add(make_seq(0, 5, max_new_tokens=6, priority=1))
        d.step()
        clock.now += head_start
        d.add(make_seq(1, 4, max_new_tokens=2, priority=0))
        d.run()
        assert d.scheduler.num_preemptions == preempted, head_start
        for seq in d.seqs.values():
            assert seq.output_token_ids == d.expected_output(seq)


def test_equal_priorities_never_preempt_for_a_waiting_request(clock: Clock) -> None:
    """Among equal priorities a waiting request that arrived before a running one (it waited
    for its LoRA adapter's slot while the later one took the sequence slot) does not take the
    slot back: only whole levels preempt."""
    config = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64, priority_aging_s=10.0)
    d = Driver(num_blocks=64, block_size=4, config=config)
    slot_free = False
    d.scheduler.admit_hook = lambda seq: slot_free
    params = SamplingParams(max_new_tokens=3, temperature=0.0, adapter="x")
    early = Sequence(seq_id=0, prompt_token_ids=[1, 2, 3], params=params, seed=0)
    d.add(early)
    clock.now += 5
    d.add(make_seq(1, 3, max_new_tokens=4))
    d.step()  # the early one's adapter has no slot: the later one runs
    slot_free = True
    d.run()
    assert _first_steps(d) == [1, 0] and d.scheduler.num_preemptions == 0


def test_priority_aging_must_be_a_number_of_seconds() -> None:
    from dist_runtime.config import ConfigError

    for bad in (-1, "soon", True):
        with pytest.raises(ConfigError, match="priority_aging_s must be a number of seconds"):
            SchedulerConfig(priority_aging_s=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("fixed", [True, False])
def test_prefills_holding_every_block_between_them_make_progress(
    fixed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 30-token and a 12-token prompt in a 32-token cache, 8 tokens a step: the second is
    admitted with half of each step while the first goes on, until the first holds 7 blocks
    (28 tokens) and the second 1, each waiting for one more, with no decode to finish and
    free some. The earlier one takes the later one's block (which recomputes), and both
    finish; without that (`fixed` False) the steps come out empty for ever."""
    config = SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=8)
    d = Driver(num_blocks=8, block_size=4, config=config)
    if not fixed:
        monkeypatch.setattr(Scheduler, "_preempt_after", lambda self, seq, scheduled: False)
    d.add(make_seq(0, 30, max_new_tokens=2), make_seq(1, 12, max_new_tokens=2))
    for _ in range(6):
        d.step()
    if not fixed:
        assert d.plans[-1].seqs == [] and d.scheduler.has_work()
        assert d.blocks.num_free_blocks == 0
        return
    d.run()
    assert d.scheduler.num_preemptions >= 1 and d.finished_at[0] < d.finished_at[1]
    for seq in d.seqs.values():
        assert seq.output_token_ids == d.expected_output(seq)


# -- fair share between tenants -----------------------------------------------------------------


@pytest.mark.parametrize("fair", [True, False])
def test_tenants_of_one_priority_take_turns(fair: bool) -> None:
    """Tenant a queues four requests, then b two: with the fair share a free slot goes to
    the tenant served least (each request: 3 prompt tokens + a decode row at weight 2 = 5), so
    b's first request goes second, not fifth; ties go to the older request."""
    config = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64, fair_share=fair)
    d = Driver(num_blocks=64, block_size=4, config=config)
    d.add(*(make_seq(i, 3, max_new_tokens=2, tenant="a") for i in range(4)))
    d.add(*(make_seq(i, 3, max_new_tokens=2, tenant="b") for i in range(4, 6)))
    d.run()
    assert _first_steps(d) == ([0, 4, 1, 5, 2, 3] if fair else [0, 1, 2, 3, 4, 5])
    if fair:
        assert d.scheduler.served == {"a": 20.0, "b": 10.0}
    for seq in d.seqs.values():
        assert seq.output_token_ids == d.expected_output(seq)


def test_a_tenant_back_from_idle_banks_no_credit() -> None:
    """b ran one request, then a ran three alone: b, back, starts at a's count (the lowest of
    those active) rather than its own old one, so the two take turns instead of b's three
    requests all going first."""
    config = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64)
    d = Driver(num_blocks=64, block_size=4, config=config)
    d.add(make_seq(0, 3, max_new_tokens=2, tenant="b"))
    d.run()
    d.add(*(make_seq(i, 3, max_new_tokens=2, tenant="a") for i in range(1, 7)))
    for _ in range(6):  # three of a's requests, 2 steps each
        d.step()
    assert d.scheduler.served == {"a": 15.0, "b": 5.0}
    d.add(*(make_seq(i, 3, max_new_tokens=2, tenant="b") for i in range(7, 10)))
    assert d.scheduler.served["b"] == 15.0  # lifted to a's
    d.run()
    assert _first_steps(d)[4:] == [4, 7, 5, 8, 6, 9]


def test_a_tenant_of_weight_2_gets_twice_the_turns() -> None:
    """Equal requests from a (weight 2) and b (weight 1), all queued at once: a's count grows
    half as fast, so of every three slots a gets two."""
    config = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64)
    d = Driver(num_blocks=64, block_size=4, config=config)
    d.scheduler.weights["a"] = 2.0
    d.add(*(make_seq(i, 3, max_new_tokens=2, tenant="a") for i in range(6)))
    d.add(*(make_seq(i, 3, max_new_tokens=2, tenant="b") for i in range(6, 12)))
    d.run()
    first = [("a" if i < 6 else "b") for i in _first_steps(d)[:9]]
    assert first.count("a") == 6 and first.count("b") == 3, first


def test_the_fair_share_never_crosses_priorities() -> None:
    """b has had no service, but its request is less important than a's: a's go first."""
    config = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64, priority_aging_s=0)
    d = Driver(num_blocks=64, block_size=4, config=config)
    d.add(*(make_seq(i, 3, max_new_tokens=2, priority=0, tenant="a") for i in range(3)))
    d.add(make_seq(3, 3, max_new_tokens=2, priority=1, tenant="b"))
    d.add(make_seq(4, 3, max_new_tokens=2, priority=0, tenant="c"))
    d.run()
    assert _first_steps(d) == [0, 4, 1, 2, 3]


def test_fair_share_must_be_a_bool() -> None:
    from dist_runtime.config import ConfigError

    with pytest.raises(ConfigError, match="scheduler.fair_share must be true or false"):
        SchedulerConfig(fair_share="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", range(300))
def test_random_workloads_replay_and_recompute(seed: int) -> None:
    """Random prompt lengths, budgets and cache sizes, arrivals between steps: every plan
    replays into the driver's tables, blocks are never shared, and preempted sequences end
    with the tokens they would have produced without preemption."""
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 8])
    max_seqs = rng.randint(1, 6)
    config = SchedulerConfig(
        max_num_seqs=max_seqs, max_num_batched_tokens=rng.randint(max_seqs, 40)
    )
    prioritized = seed % 2 == 1  # odd seeds draw priorities too
    tenants = [None] if seed % 3 else ["a", "b", None]  # every third seed: tenants share
    seqs = [
        make_seq(
            i,
            rng.randint(1, 30),
            rng.randint(1, 12),
            rng.randint(0, 3) if prioritized else 0,
            rng.choice(tenants),
        )
        for i in range(rng.randint(3, 12))
    ]
    longest = max(s.num_tokens + s.params.max_new_tokens for s in seqs)
    num_blocks = -(-longest // block_size) + rng.randint(0, 8)  # every sequence fits alone
    d = Driver(num_blocks, block_size, config)
    pending = list(seqs)
    for _ in range(2000):
        while pending and rng.random() < 0.5:
            d.add(pending.pop(0))
        if not pending and not d.scheduler.has_work():
            break
        if d.scheduler.has_work():
            assert d.step().seqs
    d.run()
    for seq in seqs:
        assert seq.status is SeqStatus.FINISHED
        assert seq.output_token_ids == d.expected_output(seq)
    assert not d.scheduler._active  # every tenant's count of live sequences went back to 0


def test_a_request_whose_adapter_has_no_slot_waits_and_the_others_go_ahead() -> None:
    """The admit hook (the engine making an adapter resident) says no: that sequence stays at
    the head of the queue, in its place, and the ones behind it are admitted; once the hook says
    yes it is admitted, with the slot the hook gave it in its first step."""
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4),
                          BlockManager(32, 4, enable_prefix_caching=False))  # fmt: skip
    lora = make_seq(0, 8)
    lora.params = SamplingParams(max_new_tokens=4, adapter="a")
    plain, also = make_seq(1, 8), make_seq(2, 8)
    for seq in (lora, plain, also):
        scheduler.add(seq)
    asked: list[int] = []
    free = False

    def hook(seq: Sequence) -> bool:
        asked.append(seq.seq_id)
        if free:
            seq.adapter = 3
        return free

    scheduler.admit_hook = hook
    plan, _ = scheduler.schedule()
    assert [s.seq_id for s in plan.seqs] == [1, 2] and list(scheduler.waiting) == [lora]
    assert asked == [0, 0]  # asked again by the second admission pass of the step
    free = True
    plan, _ = scheduler.schedule()
    (first,) = [s for s in plan.seqs if s.seq_id == 0]
    assert first.is_new and first.adapter == 3 and not scheduler.waiting


def test_suspects_of_a_failed_step_run_one_at_a_time_beside_the_others() -> None:
    """Sequences a failed step was counted against (`suspect_at`: the tokens each had then) are
    admitted one at a time, each until a step takes it past that point; a sequence that is
    no suspect is admitted beside it. `redo` puts a failed step's sequences back to wait."""
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=10, max_num_seqs=8),
                          BlockManager(64, 4, enable_prefix_caching=False))  # fmt: skip
    first, second, fresh = make_seq(0, 8), make_seq(1, 8), make_seq(2, 8)
    first.suspect_at, second.suspect_at = 8, 0  # first failed in its first decode
    for seq in (first, second, fresh):
        scheduler.add(seq)

    def step() -> list[tuple[int, int]]:
        plan, _ = scheduler.schedule()
        scheduler.on_step_done(plan)
        for s in plan.seqs:
            if s.sample:
                scheduler.get(s.seq_id).output_token_ids.append(7)
        return [(s.seq_id, len(s.token_ids)) for s in plan.seqs]

    assert step() == [(0, 8), (2, 2)]  # the second suspect waits; the fresh one goes beside
    assert first.suspect_at == 8 and [s.seq_id for s in scheduler.waiting] == [1]
    assert step() == [(0, 1), (2, 6)]  # the first runs past its failure: no suspect now
    assert first.suspect_at is None
    assert step() == [(0, 1), (2, 1), (1, 8)]
    assert second.suspect_at is None
    scheduler.redo([first, fresh], [])  # a step failed with the workers alive
    assert [s.seq_id for s in scheduler.waiting] == [0, 2] and scheduler.running == [second]
    assert first.num_computed_tokens == 0 and first.status is SeqStatus.WAITING
    assert scheduler.num_preemptions == 0  # (not counted as preemptions)


@pytest.mark.parametrize("seed", range(150))
def test_random_workloads_with_the_prefix_cache(seed: int) -> None:
    """As the engine drives it (`on_step_done` marks tokens computed and caches full blocks):
    prompts sharing documents, a tight cache, priorities, tenants, cp pools, aborts. Every
    step makes progress, every request ends with its tokens, and every block comes back."""
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 8])
    cp = rng.choice([1, 1, 2])
    max_seqs = rng.randint(1, 6)
    config = SchedulerConfig(
        max_num_seqs=max_seqs,
        max_num_batched_tokens=rng.randint(max_seqs, 40),
        priority_aging_s=rng.choice([0.0, 600.0]),
    )
    docs = [[rng.randrange(1000) for _ in range(rng.randint(1, 24))] for _ in range(3)]
    seqs = []
    for i in range(rng.randint(3, 14)):
        prompt = rng.choice(docs) + [rng.randrange(1000) for _ in range(rng.randint(1, 6))]
        params = SamplingParams(
            max_new_tokens=rng.randint(1, 10), temperature=0.0, priority=rng.randint(0, 2)
        )
        seqs.append(
            Sequence(
                seq_id=i,
                prompt_token_ids=prompt,
                params=params,
                seed=i,
                tenant=rng.choice(["a", "b", None]),
            )  # fmt: skip
        )
    longest = max(len(s.prompt_token_ids) + s.params.max_new_tokens for s in seqs)
    longest_blocks = -(-longest // block_size)
    per_pool = -(-longest_blocks // cp) + rng.randint(0, 6)  # every sequence fits alone
    blocks = BlockManager(per_pool, block_size, cp_size=cp)
    scheduler = Scheduler(config, blocks)
    pending, aborted = list(seqs), set()
    for _ in range(3000):
        while pending and rng.random() < 0.4:
            scheduler.add(pending.pop(0))
        live = [s for s in seqs if s.status is not SeqStatus.FINISHED and s not in pending]
        if live and rng.random() < 0.03:
            victim = rng.choice(live)
            scheduler.abort(victim)
            aborted.add(victim.seq_id)
        if not scheduler.has_work():
            if not pending:
                break
            continue
        plan, _ = scheduler.schedule()
        assert plan.seqs, "no progress"
        assert scheduler._waiting_by == dict(
            Counter((s.tenant, s.params.priority) for s in scheduler.waiting)
        )
        for step in plan.seqs:
            seq = scheduler.get(step.seq_id)
            full = seq.prompt_token_ids + seq.output_token_ids
            assert step.token_ids == full[step.start_pos : step.start_pos + len(step.token_ids)]
        scheduler.on_step_done(plan)
        for step in plan.seqs:
            seq = scheduler.get(step.seq_id)
            if step.sample:
                seq.output_token_ids.append(fake_token(seq.seq_id, seq.num_tokens))
                if len(seq.output_token_ids) >= seq.params.max_new_tokens:
                    scheduler.finish(seq, "length")
    else:
        raise AssertionError("the workload did not finish")
    for seq in seqs:
        assert seq.status is SeqStatus.FINISHED
        if seq.seq_id not in aborted:
            n = len(seq.prompt_token_ids)
            expected = [fake_token(seq.seq_id, n + i) for i in range(seq.params.max_new_tokens)]
            assert seq.output_token_ids == expected
    assert blocks.num_free_blocks == per_pool * cp  # every block free or evictable
    assert not scheduler._active and not scheduler._waiting_by
