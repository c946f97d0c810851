"""Runs step plans on one device: builds the model shard, owns the KV cache, samples.

The model runner is plain Python + torch, built the same way by the Ray worker actor and by the
in-process executor. It keeps per-sequence state (block table, token history, random stream)
so plans only carry deltas.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dist_runtime import memory_planner
from dist_runtime.config import (
    RuntimeConfig,
    async_decode_enabled,
    decode_graph_segments,
    decode_graphs_choice,
)
from dist_runtime.lora import AdapterSpec, adapter_slot_rank, check_slot_rank
from dist_runtime.protocol import (
    DISK_LOAD,
    LAST_SAMPLED,
    PromptLogprobs,
    SampledToken,
    SamplingSpec,
    SeqStep,
    StepPlan,
    StepResult,
)
from workers.checkpoint import CheckpointReader, dtype_from_name
from workers.context_parallel import (
    CPMetadata,
    block_owner,
    build_cp_metadata,
    local_key_count,
)
from workers.cuda_graph import DecodeGraphs, Stage
from workers.distributed import Collectives
from workers.kv_cache import DiskKVTier, HostKVTier, KVCache
from workers.layers.attention import AttentionMetadata
from workers.layers.rotary import model_frequencies
from workers.lora import LoraBatch, LoraLayers, load_adapters
from workers.models.decoder import DecoderLM
from workers.models.layouts import init_dummy_weights, load_weights
from workers.sampler import (
    Sampler,
    greedy_tokens,
    plain_greedy,
    sample_on_device,
    samples_on_device,
    score_rows,
    verify_draft,
)

DRAFT_DECODE_MAX_CONTEXT = 4096
"""Longest context at which a CUDA step checking drafts runs as a wider decode step (each row
reads its sequence's keys: at 4K tokens of a 7B model's KV that is about 0.5 GB a row, next to
15 GB of weights); longer ones run as a prefill chunk per sequence, which reads them once."""

MAX_GRAPH_BATCH = 256
"""Largest decode batch replayed from a CUDA graph; bigger batches run eagerly (launch cost is
small next to their work)."""

logger = logging.getLogger(__name__)


class DeviceBlockTable:
    """A sequence's block ids mirrored on the device and appended to as blocks arrive, so a
    step does not rebuild and copy the whole table: at 1,048,576 tokens that is 65,536 ids,
    several milliseconds of host work per decode step."""

    def __init__(self, device: torch.device):
        self.buf = torch.empty(0, dtype=torch.int32, device=device)
        self.size = 0

    def extend(self, blocks: list[int]) -> None:
        if not blocks:
            return
        need = self.size + len(blocks)
        if need > self.buf.numel():  # grow geometrically: appends stay amortised O(1)
            grown = torch.empty(
                max(need, 2 * self.buf.numel(), 64), dtype=torch.int32, device=self.buf.device
            )
            grown[: self.size].copy_(self.buf[: self.size])
            self.buf = grown
        new = torch.tensor(blocks, dtype=torch.int32)
        if self.buf.is_cuda:  # from pinned memory, so the host never waits for the device
            new = new.pin_memory()
        self.buf[self.size : need].copy_(new, non_blocking=new.is_pinned())
        self.size = need

    def view(self) -> torch.Tensor:
        return self.buf[: self.size]


def padded_block_tables(tables: list[DeviceBlockTable]) -> torch.Tensor:
    """(seqs, longest table) int32, zero-padded, from the tables already on the device."""
    if len(tables) == 1:
        return tables[0].view()[None]
    return torch.nn.utils.rnn.pad_sequence([t.view() for t in tables], batch_first=True)


@dataclass
class SeqState:
    """What a worker remembers about one running sequence."""

    spec: SamplingSpec
    generator: torch.Generator
    table: DeviceBlockTable
    """The blocks of this rank on the device: all of `block_table` at cp = 1, its share
    `block_table[cp_rank::cp]` at cp > 1."""
    block_table: list[int] = field(default_factory=list)
    history: list[int] = field(default_factory=list)
    history_start: int = -1
    """Position of history[0] (-1: empty); a prefix-cache hit starts it past 0."""
    inv_freq: torch.Tensor | None = None
    """RoPE frequencies of a request with its own base (dynamic NTK); None: the model's."""
    adapter: int = 0
    """LoRA adapter slot (0: the base model)."""


class ModelRunner:
    def __init__(self, config: RuntimeConfig, comm: Collectives):
        self.config = config
        self.comm = comm
        device = config.resolved_device()
        # Ray exposes one GPU per actor (CUDA_VISIBLE_DEVICES), so it is always index 0.
        self.device = torch.device("cuda:0" if device == "cuda" else device)
        self.model_config = config.load_model_config()
        self.dtype = dtype_from_name(config.resolved_dtype(self.model_config))
        config.parallel.check_model(self.model_config)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.model = DecoderLM(self.model_config, comm, self.dtype, self.device).eval()
        if config.load_format == "dummy":
            init_dummy_weights(self.model, config.seed)
            self.weight_bytes_read = 0
        else:
            reader = CheckpointReader(config.model)
            load_weights(self.model, reader)
            self.weight_bytes_read = reader.bytes_read
            reader.close()
        self.lora: LoraLayers | None = None
        """The adapters' shards (`workers/lora.py`); None without lora_modules / max_loras."""
        self.num_adapter_slots = config.max_loras or len(config.lora_modules)
        if self.num_adapter_slots:
            specs = [  # checked by the driver, which hashed them too
                AdapterSpec.load(name, path, self.model_config, digest=b"")
                for name, path in config.lora_modules.items()
            ]
            room, host_cache = None, 0
            if config.max_loras is not None:
                room = (config.max_loras + 1, adapter_slot_rank(config, specs))
                host_cache = config.max_cpu_loras or 2 * config.max_loras
            self.lora = load_adapters(
                self.model,
                self.model_config,
                specs,
                self.model.shard,
                comm.tp_rank,
                comm.tp_size,
                room,
                host_cache,
            )
            self.model.lora = self.lora.state
        self.kv_cache: KVCache | None = None
        self.host_kv: HostKVTier | None = None
        self.disk_kv: DiskKVTier | None = None
        self.graphs: DecodeGraphs | None = None
        self.seqs: dict[int, SeqState] = {}
        self.sampler = Sampler()
        self._launched: collections.deque[_Launched | StepResult | None] = collections.deque()
        self._last_rows: dict[int, int] | None = None
        """seq id -> row of the last step replayed by `launch`, whose picks (`_last_picks`) are
        still on the device; None after any other step."""
        self._failed_rows: list[tuple[int, str]] = []
        """(seq id, error) of this step's rows the sampler could not take (`_sample`)."""
        self._last_picks: torch.Tensor | None = None
        """The (token, log-probability) rows the last launched step picked into, on the device
        (the graphs' `greedy`, or `_picks` for a step that sampled)."""
        self._out_turn = 0
        self._ahead = async_decode_enabled()
        """`DIST_RUNTIME_ASYNC_DECODE`, read once (the Ray worker sets it before building)."""
        self.num_launched_ahead = 0
        """Steps `launch` ran without waiting for the device."""
        self.num_steps = 0
        """Steps that ran the model (plans with at least one sequence)."""
        self.is_driver_rank = comm.coords.rank == 0
        """Global rank 0 samples; with cp its cp group's ranks also compute the logits."""

    # -- LoRA adapters loaded while running ---------------------------------------------------
    def load_lora(self, slot: int, name: str, path: str, digest: bytes = b"") -> None:
        """Put the adapter into reserved `slot` (replacing what it held): from the host cache
        when it holds `digest` (the adapter's content hash), else read from the folder `path`."""
        lora = self._reserved(slot)
        lora.remove(slot)
        if digest and lora.put_cached(slot, digest):
            return
        spec = AdapterSpec.load(name, path, self.model_config, digest=digest)
        assert lora.room is not None
        check_slot_rank(spec, lora.room[1])
        lora.add(slot, spec)

    def unload_lora(self, slot: int) -> None:
        """Zero reserved `slot`."""
        self._reserved(slot).remove(slot)

    def _reserved(self, slot: int) -> LoraLayers:
        if self.lora is None or self.lora.room is None:
            raise ValueError(
                "this runtime's adapters are fixed at start; start it with max_loras "
                "(--max-loras) to load and unload adapters while it runs"
            )
        if not 1 <= slot < self.lora.room[0]:
            raise ValueError(f"adapter slot {slot} is outside 1..{self.lora.room[0] - 1}")
        return self.lora

    # -- KV cache ---------------------------------------------------------------------------
    def kv_block_bytes(self) -> int:
        shard = self.model.shard
        return KVCache.block_bytes(
            self.model_config.num_layers,
            self.config.cache.block_size,
            shard.num_kv,
            self.model_config.head_dim,
            self.dtype,
            self.config.cache.quant_policy,
        )

    def num_available_blocks(self, sharing: int = 1) -> int:
        """Blocks this worker can hold: the configured count, else from its memory budget
        (`sharing`: the runtime's workers on this worker's node, itself included)."""
        cache = self.config.cache
        if cache.num_blocks is not None:
            return cache.num_blocks
        if self.device.type == "cpu":
            return max(self.cpu_kv_budget(sharing) // self.kv_block_bytes(), 0)
        free, total = torch.cuda.mem_get_info(self.device)
        used = total - free
        budget = int(total * cache.gpu_memory_utilization) - used - self._activation_reserve()
        spare = 1 if self._decode_graph_mode() else 0  # the graphs' scratch block
        return max(budget // self.kv_block_bytes() - spare, 0)

    def cpu_kv_budget(self, sharing: int = 1) -> int:
        """Bytes of host memory this worker reserves for its KV cache on CPU:
        `cache.cpu_kv_cache_gb`, else one full session's blocks of this worker (its KV heads,
        its share of a cp split), at least CPU_KV_MIN_BYTES and at most its share (of
        `sharing` workers on the node) of CPU_KV_AVAILABLE_FRACTION of what the node has
        available (`dist_runtime.memory_planner`). Reserving costs nothing until blocks are
        written (see `workers.kv_cache.zeros`)."""
        gb = self.config.cache.cpu_kv_cache_gb
        available = memory_planner.available_host_bytes()
        if gb is not None:
            budget = int(gb * 2**30)
            if available is not None and budget > available:
                raise ValueError(
                    f"cache.cpu_kv_cache_gb = {gb:g} GiB per worker, but this worker's node has "
                    f"{available / 2**30:.1f} GiB of memory available; lower --cpu-kv-cache-gb "
                    "(each worker on a node reserves that much)"
                )
            return budget
        bs, least = self.config.cache.block_size, memory_planner.CPU_KV_MIN_BYTES
        tokens = memory_planner.kv_tokens_per_worker(
            self.config.session_len, self.config.parallel.cp, bs
        )
        budget = max(least, tokens // bs * self.kv_block_bytes())
        if available is not None and budget > least:
            share = int(available * memory_planner.CPU_KV_AVAILABLE_FRACTION) // max(sharing, 1)
            budget = max(least, min(budget, share))
        return budget

    def num_host_blocks(self) -> int:
        """Blocks of `cache.host_kv_cache_gb` GiB of host memory (0: no host tier)."""
        gb = self.config.cache.host_kv_cache_gb
        if not gb:
            return 0
        available = memory_planner.available_host_bytes()
        if available is not None and gb * 2**30 > available:
            raise ValueError(
                f"cache.host_kv_cache_gb = {gb:g} GiB per worker, but this worker's node has "
                f"{available / 2**30:.1f} GiB of memory available; lower --host-kv-cache-gb "
                "(each worker on a node takes that much)"
            )
        return int(gb * 2**30) // self.kv_block_bytes()

    def host_kv_bytes(self) -> int:
        return 0 if self.host_kv is None else self.host_kv.nbytes

    def disk_kv_blocks(self) -> tuple[int, int, list[str]]:
        """(this worker's cp rank, disk-tier blocks per pool that `cache.disk_kv_cache_gb`
        allows, the digests of the blocks on disk, least recently written first)."""
        if self.disk_kv is None:
            raise RuntimeError("this worker has no disk tier (allocate_kv_cache without a dir)")
        budget = int(self.config.cache.disk_kv_cache_gb * 2**30)
        per_pool = budget // (self.disk_kv.file_bytes * self.comm.tp_size * self.comm.cp_size)
        return self.comm.cp_rank, per_pool, self.disk_kv.listing()

    def flush_disk_kv(self) -> None:
        """Wait until the disk tier's queued writes are on disk."""
        if self.disk_kv is not None:
            self.disk_kv.flush()

    def _per_request_rope(self) -> bool:
        """Whether a request can bring its own RoPE base (dynamic NTK past max positions)."""
        scaling = self.model_config.rope_scaling
        return scaling is not None and scaling.type == "dynamic"

    def _decode_graph_mode(self) -> str | None:
        """'cuda' when decode steps are replayed from CUDA graphs, 'emulate' when
        `DIST_RUNTIME_DECODE_GRAPHS=emulate` asks for the graph path without capture, else None
        (eager)."""
        if self.config.enforce_eager:
            return None
        if decode_graphs_choice() == "emulate":
            return "emulate"
        return "cuda" if self.device.type == "cuda" else None

    def _activation_reserve(self) -> int:
        """Bytes kept free for one step's activations: a bound from the token budget."""
        c, tokens = self.model_config, self.config.scheduler.max_num_batched_tokens
        width = 4 * c.hidden_size + 4 * c.intermediate_size // self.comm.tp_size
        per_token = width * self.dtype.itemsize + 4 * c.vocab_size // max(tokens, 1)
        graph_logits = 0  # the decode graphs' fp32 logits buffer (`DecodeGraphs.logits`)
        if self._decode_graph_mode() is not None:
            rows = self._graph_rows()
            graph_logits = 4 * c.vocab_size * rows
        return tokens * per_token + graph_logits + (512 << 20)

    def allocate_kv_cache(
        self, num_blocks: int, num_host_blocks: int = 0, disk_dir: str | None = None
    ) -> None:
        """The KV cache, its host tier (`num_host_blocks`) and its disk tier: `disk_dir`, the
        directory of this model's and layout's blocks, where this worker keeps its own."""
        # The native decoder points at the old cache: let it go with it, before the new one.
        self.model.drop_native_decoder()
        self.flush_disk_kv()
        self.kv_cache = self.graphs = self.host_kv = self.disk_kv = None
        mode = self._decode_graph_mode()
        self.kv_cache = KVCache(
            self.model_config.num_layers,
            num_blocks,
            self.config.cache.block_size,
            self.model.shard.num_kv,
            self.model_config.head_dim,
            self.dtype,
            self.device,
            scratch=mode is not None,
            bits=self.config.cache.quant_policy,
        )
        if num_host_blocks:
            self.host_kv = HostKVTier(self.kv_cache, num_host_blocks)
        if disk_dir is not None:
            where = Path(disk_dir) / f"tp{self.comm.tp_rank}-cp{self.comm.cp_rank}"
            self.disk_kv = DiskKVTier(self.kv_cache, where)
        if mode is None:
            return
        kv = self.kv_cache
        assert kv.scratch_block is not None
        block_size = self.config.cache.block_size
        self.graphs = DecodeGraphs(
            lambda ids, pos, meta: self.model(ids, pos, meta, kv.layers),
            stages=self._graph_stages(kv.layers),
            # At cp > 1 every cp rank holds the same hidden states after the merge and runs the
            # head in its graph, side by side; the driver rank's picks are the ones read.
            head=self.model.compute_logits,
            vocab_size=self.model_config.vocab_size,
            max_batch=self._graph_rows(),
            # A cp rank holds every cp-th block of a sequence.
            max_blocks=-(-self.config.session_len // (block_size * self.comm.cp_size)),
            block_size=block_size,
            scratch_block=kv.scratch_block,
            device=self.device,
            rope_half=self.model_config.head_dim // 2 if self._per_request_rope() else None,
            emulate=mode == "emulate",
            cp_decode=self.comm.cp_size > 1,
            lora=self.lora is not None,
        )
        with torch.inference_mode():
            self.graphs.capture()

    def _graph_rows(self) -> int:
        """Rows of the largest decode graph: a row per running sequence, and with speculative
        decoding a row per draft token too (`_draft_rows`), up to MAX_GRAPH_BATCH."""
        sched = self.config.scheduler
        return min(sched.max_num_seqs * (1 + sched.num_speculative_tokens), MAX_GRAPH_BATCH)

    def _graph_stages(self, kv_layers: list) -> list[Stage] | None:
        """The decode forward cut into `decode_graph_segments()` runs of whole layers (None:
        one graph of `model.forward`)."""
        layers = self.model_config.num_layers
        segments = min(decode_graph_segments(), layers)
        if segments == 1:
            return None
        bounds = [layers * i // segments for i in range(segments + 1)]

        def stage(span: range) -> Stage:
            return lambda ids, pos, meta, carry: self.model.forward_layers(
                ids, pos, meta, kv_layers, span, carry
            )

        return [stage(range(lo, hi)) for lo, hi in itertools.pairwise(bounds)]

    # -- steps launched ahead ---------------------------------------------------------------
    def runs_ahead(self) -> bool:
        """`launch` can return before a decode step ends (`DIST_RUNTIME_ASYNC_DECODE=1`, decode
        graphs with their head; at cp > 1 `_launch_staged` declines and the ids are
        broadcast)."""
        graphs = self.graphs
        return self._ahead and graphs is not None and graphs.greedy is not None

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> None:
        """Start a step; `collect` returns its result (in launch order). A decode step whose
        rows need no history and no top-k list goes through the graphs without waiting for the
        device: the graph's greedy picks, or draws made on the device from its logits, are read
        back at `collect`, and the next step's `LAST_SAMPLED` ids are taken from them on the
        device. Any other step runs here, as `execute` would."""
        unread = self._move_kv(plan)
        out: _Launched | StepResult | None
        if unread:
            out = self._skip(plan, unread)
        else:
            out = self._launch_staged(plan) if self.runs_ahead() else None
            if out is None:
                if any(s.token_ids[:1] == [LAST_SAMPLED] for s in plan.seqs):
                    plan = self._fill_last_sampled(plan)
                out = self._execute(plan)
        if self.is_driver_rank:  # the other ranks return no results: nothing to collect
            self._launched.append(out)

    def drop_launched(self) -> None:
        """Forget the launched steps not yet collected (a step among them raised)."""
        for item in self._launched:
            if isinstance(item, _Launched) and item.event is not None:
                item.event.synchronize()  # its device work ends before its buffers are reused
        self._launched.clear()

    def collect(self) -> StepResult | None:
        if not self._launched:
            raise RuntimeError("collect() without a launched step")
        item = self._launched.popleft()
        return item.result() if isinstance(item, _Launched) else item

    def _launch_staged(self, plan: StepPlan) -> _Launched | None:
        graphs = self.graphs
        assert graphs is not None and graphs.greedy is not None and self.kv_cache is not None
        seqs = plan.seqs
        # At cp > 1 each cp rank's logits come through its own tp group's all-reduces, equal
        # but not guaranteed bit for bit across groups: the next ids go through a broadcast.
        if not seqs or len(seqs) > graphs.max_batch or self.comm.cp_size != 1:
            return None
        for s in seqs:
            state = self.seqs.get(s.seq_id)
            if (
                state is None
                or s.is_new
                or not s.sample
                or s.allowed_tokens is not None
                or len(s.token_ids) != 1
                or not samples_on_device([state.spec])
                or state.table.size + len(s.new_blocks) > graphs.max_blocks
                or (state.inv_freq is not None and graphs.rope_half is None)
                or (state.adapter and graphs.lora_slots is None)
            ):
                return None
        ahead = [s.token_ids[0] == LAST_SAMPLED for s in seqs]
        last = self._last_rows
        if any(a and (last is None or s.seq_id not in last) for s, a in zip(seqs, ahead)):
            return None  # the ids it needs are not on the device: `launch` fills them in
        for seq_id in plan.finished_seq_ids:
            self.seqs.pop(seq_id, None)
        for s in seqs:
            self._update_state(s)
        self.num_steps += 1
        own_rope = any(self.seqs[s.seq_id].inv_freq is not None for s in seqs)
        inputs, tables = self._decode_inputs(seqs, ahead)
        rows = [last[s.seq_id] if a and last else -1 for s, a in zip(seqs, ahead)]
        inv = self._rope_inv_freq(seqs, False) if own_rope else None
        adapters = [self.seqs[s.seq_id].adapter for s in seqs]
        graphs.run_staged(
            inputs,
            tables,
            inv,
            rows if any(ahead) else None,
            self._last_picks,
            lora_slots=adapters if any(adapters) else None,
        )
        n, turn = len(seqs), self._out_turn
        specs = [self.seqs[s.seq_id].spec for s in seqs]
        picks = graphs.greedy
        if not plain_greedy(specs):  # draws on the device from the graph's logits
            assert graphs.logits is not None
            self._seed_draws(seqs)
            picks = self._picks
            gens = [self.seqs[s.seq_id].generator for s in seqs]
            picks[:n].copy_(sample_on_device(graphs.logits[:n], specs, gens))
        self._last_picks = picks
        self._out_turn ^= 1
        out, event = self._read_back[turn]
        out[:n].copy_(picks[:n], non_blocking=True)
        if event is not None:
            event.record()
        self._last_rows = {s.seq_id: i for i, s in enumerate(seqs)}
        self.num_launched_ahead += 1
        return _Launched(plan.step_id, [s.seq_id for s in seqs], out[:n], event)

    @functools.cached_property
    def _picks(self) -> torch.Tensor:
        """The device's (token, log-probability) rows of launched steps that sample (greedy ones
        use the graphs' own `greedy`). One buffer is enough: in stream order the next step
        reads its ids from it, and the read-back copies it, before that step overwrites it."""
        assert self.graphs is not None
        return torch.zeros(self.graphs.max_batch, 2, dtype=torch.float64, device=self.device)

    @functools.cached_property
    def _read_back(self) -> list[tuple[torch.Tensor, torch.cuda.Event | None]]:
        """Two host buffers (pinned on CUDA) for the (token, log-probability) rows of launched
        steps, each with the event after its copy: two steps are in flight at most."""
        assert self.graphs is not None
        cuda = self.device.type == "cuda"
        return [
            (
                torch.zeros(self.graphs.max_batch, 2, dtype=torch.float64, pin_memory=cuda),
                torch.cuda.Event() if cuda else None,
            )
            for _ in range(2)
        ]

    def _fill_last_sampled(self, plan: StepPlan) -> StepPlan:
        """`plan` with each LAST_SAMPLED id replaced by the token the last launched step sampled
        for that sequence (waiting for that step). Only the driver rank reads results: at
        tp * cp > 1 it broadcasts the ids to the other ranks (-1 where it has none, and then
        every rank raises)."""
        slots = [i for i, s in enumerate(plan.seqs) if s.token_ids[:1] == [LAST_SAMPLED]]
        ids, error = [-1] * len(slots), None
        if self.is_driver_rank:
            last = self._launched[-1] if self._launched else None
            result = last.result() if isinstance(last, _Launched) else last
            if result is None:
                error = f"step {plan.step_id} takes last sampled ids but none was launched"
            else:
                sampled = {t.seq_id: t.token_id for t in result.tokens}
                ids = [sampled.get(plan.seqs[i].seq_id, -1) for i in slots]
        if self.comm.coords.world_size > 1:
            shared = torch.tensor(ids, dtype=torch.int64, device=self.device)
            ids = self.comm.broadcast(shared).tolist()
        missing = [plan.seqs[i].seq_id for i, t in zip(slots, ids) if t < 0]
        if error is not None or missing:
            raise ValueError(error or f"seqs {missing}: no token sampled in the step before")
        seqs = list(plan.seqs)
        for i, token in zip(slots, ids):
            seqs[i] = dataclasses.replace(seqs[i], token_ids=[token])
        return dataclasses.replace(plan, seqs=seqs)

    # -- steps ------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult | None:
        """Run one step; tp rank 0 of the world returns the sampled tokens, others None."""
        unread = self._move_kv(plan)
        if unread:
            return self._skip(plan, unread)
        return self._execute(plan)

    def _move_kv(self, plan: StepPlan) -> list[int]:
        """The plan's host- and disk-tier copies of this worker's cp rank, in order, before its
        step. Returns the indices in `plan.kv_moves` of the disk reads that failed their check
        on any rank (the same list on every rank: the step then runs on none)."""
        if self.kv_cache is None:
            raise RuntimeError("allocate_kv_cache() must run before execute()")
        if not plan.kv_moves:
            return []
        rank = self.comm.cp_rank
        mine = [(i, m) for i, m in enumerate(plan.kv_moves) if m.pool == rank]
        unread: list[int] = []
        for on_disk, run in itertools.groupby(mine, key=lambda im: bool(im[1].disk)):
            group = list(run)
            tier = self.disk_kv if on_disk else self.host_kv
            if tier is None:
                raise ValueError(
                    f"step {plan.step_id} moves KV blocks but this worker has no "
                    f"{'disk' if on_disk else 'host'} tier"
                )
            failed = tier.apply(self.kv_cache, [m for _, m in group])  # (disk: reads that failed)
            unread += [group[j][0] for j in failed or ()]
        if self.comm.coords.world_size > 1 and any(m.disk == DISK_LOAD for m in plan.kv_moves):
            flags = torch.zeros(len(plan.kv_moves), dtype=torch.int32, device=self.device)
            flags[unread] = 1
            unread = self.comm.world_max(flags).nonzero().flatten().tolist()
        return unread

    def _skip(self, plan: StepPlan, unread: list[int]) -> StepResult | None:
        """A step some of whose disk reads failed: its sequences' state is taken in (block
        tables, new sequences, finished ones) but nothing runs, and the driver rank says which
        reads failed; the driver plans the step again without those blocks."""
        self._take_in(plan)
        if not self.is_driver_rank:
            return None
        return StepResult(step_id=plan.step_id, tokens=[], unread_moves=unread)

    def _take_in(self, plan: StepPlan) -> None:
        """The plan's news for this worker's sequence state: finished ones go, new ones come,
        block tables grow."""
        for seq_id in plan.finished_seq_ids:
            self.seqs.pop(seq_id, None)
        for seq in plan.seqs:
            self._update_state(seq)

    @torch.inference_mode()
    def _execute(self, plan: StepPlan) -> StepResult | None:
        if self.kv_cache is None:
            raise RuntimeError("allocate_kv_cache() must run before execute()")
        self._last_rows = None
        self._failed_rows = []
        self._take_in(plan)
        if not plan.seqs:
            return StepResult(step_id=plan.step_id, tokens=[]) if self.is_driver_rank else None
        self.num_steps += 1
        cp = self.comm.cp_size
        # A cp decode step runs every row on every cp rank (`cp_decode_attention`).
        drafts = any(s.num_draft_tokens for s in plan.seqs)
        # rows of the forward pass: a decode step checking drafts runs as a wider decode step
        rows_of = _draft_rows(plan.seqs) if drafts and self._drafts_as_decode(plan.seqs) else None
        seqs = plan.seqs if rows_of is None else rows_of
        split = cp > 1 and any(len(s.token_ids) != 1 for s in seqs)
        own_rope = any(self.seqs[s.seq_id].inv_freq is not None for s in seqs)
        adapted = any(self.seqs[s.seq_id].adapter for s in seqs)
        hidden = self._staged_decode(seqs, own_rope, adapted)
        staged = hidden is not None
        sample_rows: torch.Tensor | None = None  # None: every row of `hidden`
        cp_meta: CPMetadata | None = None  # (a split step's layout over the cp ranks)
        if hidden is None:
            if split:
                input_ids, positions, meta, sample_rows = self._prepare_cp(seqs)
                cp_meta = meta.cp
            else:
                input_ids, positions, meta, sample_rows = self._prepare(seqs)
            if own_rope:
                inv = self._rope_inv_freq(seqs, split)
                meta = dataclasses.replace(meta, rope_inv_freq=inv)
            if adapted:
                slots = [self.seqs[s.seq_id].adapter for s in seqs]
                lora = LoraBatch.build(slots, self._row_counts(seqs, split), self.device)
                meta = dataclasses.replace(meta, lora=lora)
            if self.graphs is not None and self.graphs.can_run(meta, input_ids.shape[0]):
                hidden = self.graphs.run(input_ids, positions, meta)
            else:
                hidden = self.model(input_ids, positions, meta, self.kv_cache.layers)
        scored = self._score_prompts(seqs, hidden, cp_meta)
        sampled = [s for s in plan.seqs if s.sample]
        if not sampled:
            if not self.is_driver_rank:
                return None
            return StepResult(step_id=plan.step_id, tokens=[], prompt_logprobs=scored)
        graphs = self.graphs
        if (
            staged
            and graphs is not None
            and graphs.logits is not None
            and graphs.greedy is not None
            and len(sampled) == len(plan.seqs)
        ):  # the graph ran the LM head (and the greedy pick) already
            if not self.is_driver_rank:
                return None
            n = len(seqs)  # one row per sequence, or per row of a draft
            if drafts:
                tokens = self._sample_drafts(graphs.logits[:n], sampled)
            elif plain_greedy([self.seqs[s.seq_id].spec for s in sampled]) and not any(
                s.allowed_tokens is not None for s in sampled
            ):
                tokens = greedy_tokens(graphs.greedy[:n], [s.seq_id for s in sampled])
            else:
                tokens = self._sample(graphs.logits[:n], sampled)
            return self._result(plan, tokens, scored)
        if sample_rows is None and len(sampled) < len(plan.seqs):
            picks = [i for i, s in enumerate(plan.seqs) if s.sample]
            sample_rows = torch.tensor(picks, dtype=torch.int64, device=self.device)
        rows = hidden if sample_rows is None else hidden[sample_rows]
        if split:
            rows = self._gather_sample_rows(rows, plan.seqs)
        if self.comm.cp_rank != 0:
            return None
        logits = self.model.compute_logits(rows)  # (sampled rows, vocab) fp32
        if not self.is_driver_rank:
            return None
        if any(s.num_draft_tokens for s in sampled):
            tokens = self._sample_drafts(logits, sampled)
        else:
            tokens = self._sample(logits, sampled)
        return self._result(plan, tokens, scored)

    def _result(
        self, plan: StepPlan, tokens: list[SampledToken], scored: list[PromptLogprobs]
    ) -> StepResult:
        failed = self._failed_rows
        return StepResult(
            step_id=plan.step_id,
            tokens=tokens,
            prompt_logprobs=scored,
            failed_seq_ids=[seq_id for seq_id, _ in failed],
            failed_reasons=[reason for _, reason in failed],
        )

    def _score_prompts(
        self, seqs: list[SeqStep], hidden: torch.Tensor, cp_meta: CPMetadata | None = None
    ) -> list[PromptLogprobs]:
        """Prompt log-probabilities of the chunks that ask for them (rows packed in plan order).
        Every tp rank runs the LM head on the same slices; the driver rank keeps the values.

        A step split over cp ranks (`cp_meta`) first all-gathers every rank's rows into that
        order (`_gather_step_rows`), and cp rank 0's tp group scores them; a cp decode step has
        every row on every rank already."""
        wanted = [
            (i, s) for i, s in enumerate(seqs) if s.prompt_logprobs >= 0 and s.prompt_logprob_rows
        ]
        if not wanted:
            return []
        if cp_meta is not None:
            hidden = self._gather_step_rows(hidden, cp_meta, seqs)
        if self.comm.cp_rank != 0:  # (cp rank 0 holds the driver; its tp group scores)
            return []
        starts = [0, *itertools.accumulate(len(s.token_ids) for s in seqs)]
        rows: list[torch.Tensor] = []
        targets: list[int] = []
        for i, s in wanted:
            n = s.prompt_logprob_rows
            if not 0 < n <= len(s.token_ids) or (n == len(s.token_ids) and s.next_prompt_token < 0):
                raise ValueError(
                    f"seq {s.seq_id}: {n} prompt-logprob rows in a chunk of {len(s.token_ids)} "
                    f"tokens (next prompt token {s.next_prompt_token})"
                )
            rows.append(hidden[starts[i] : starts[i] + n])  # (n, hidden)
            targets += s.token_ids[1 : n + 1]
            if n == len(s.token_ids):
                targets.append(s.next_prompt_token)
        top_k = max(s.prompt_logprobs for _, s in wanted)
        chosen, top_ids, top_lp = score_rows(
            self.model.compute_logits,
            torch.cat(rows),
            torch.tensor(targets, dtype=torch.int64),
            top_k,
            self.model_config.vocab_size,
            keep=self.is_driver_rank,
        )
        if not self.is_driver_rank:
            return []
        out, r, width = [], 0, min(top_k, self.model_config.vocab_size)
        for _, s in wanted:
            n, k = s.prompt_logprob_rows, min(s.prompt_logprobs, width)
            picks = [j for row in range(r, r + n) for j in range(row * width, row * width + k)]
            out.append(
                PromptLogprobs(
                    seq_id=s.seq_id,
                    start_pos=s.start_pos,
                    logprobs=chosen[r : r + n],
                    top_k=k,
                    top_ids=[top_ids[j] for j in picks],
                    top_logprobs=[top_lp[j] for j in picks],
                )
            )
            r += n
        return out

    def _update_state(self, seq: SeqStep) -> None:
        if seq.is_new:
            if seq.sampling is None:
                raise ValueError(f"seq {seq.seq_id}: a new sequence needs its sampling spec")
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seq.sampling.seed)
            inv = None
            if seq.rope_base:
                inv = model_frequencies(self.model_config, seq.rope_base)
            if not 0 <= seq.adapter <= self.num_adapter_slots:
                raise ValueError(
                    f"seq {seq.seq_id}: adapter slot {seq.adapter} but this worker has "
                    f"{self.num_adapter_slots} LoRA adapter slot(s)"
                )
            self.seqs[seq.seq_id] = SeqState(
                spec=seq.sampling,
                generator=gen,
                table=DeviceBlockTable(self.device),
                inv_freq=None if inv is None else inv.to(self.device),
                adapter=seq.adapter,
            )
        state = self.seqs.get(seq.seq_id)
        if state is None:
            raise ValueError(f"seq {seq.seq_id} is unknown to this worker and not marked new")
        assert self.kv_cache is not None
        bad = [b for b in seq.new_blocks if not 0 <= b < self.kv_cache.num_blocks]
        if bad:
            raise ValueError(
                f"seq {seq.seq_id}: block ids {bad[:4]} outside this worker's "
                f"{self.kv_cache.num_blocks} KV blocks"
            )
        cp, first = self.comm.cp_size, len(state.block_table)
        state.block_table.extend(seq.new_blocks)
        # Logical block i lives on cp rank i % cp.
        state.table.extend(seq.new_blocks[(self.comm.cp_rank - first) % cp :: cp])
        if self.is_driver_rank and state.spec.needs_history:
            if state.history_start < 0:
                state.history = list(seq.cached_token_ids)
                state.history_start = seq.start_pos - len(seq.cached_token_ids)
            del state.history[max(seq.start_pos - state.history_start, 0) :]  # a step planned again
            state.history.extend(seq.token_ids)
        needed = -(-(seq.start_pos + len(seq.token_ids)) // self.config.cache.block_size)
        if needed > len(state.block_table):
            raise ValueError(
                f"seq {seq.seq_id} needs {needed} blocks but has {len(state.block_table)}"
            )

    def _staged_decode(
        self, seqs: list[SeqStep], own_rope: bool, adapted: bool
    ) -> torch.Tensor | None:
        """A decode step through the graphs, its inputs sent in one copy
        (`DecodeGraphs.run_staged`; at cp > 1 this rank's slots, key counts and blocks): the
        final hidden states, one row per sequence; None when the step is not such a step
        (prefill chunks, too many rows, no graphs)."""
        graphs = self.graphs
        if (
            graphs is None
            or not graphs.captured
            or len(seqs) > graphs.max_batch
            or any(len(s.token_ids) != 1 for s in seqs)
            or (own_rope and graphs.rope_half is None)
            or (adapted and graphs.lora_slots is None)
        ):
            return None
        if max(self.seqs[s.seq_id].table.size for s in seqs) > graphs.max_blocks:
            return None
        rows, tables = self._decode_inputs(seqs, [False] * len(seqs))
        inv = self._rope_inv_freq(seqs, False) if own_rope else None
        lora = [self.seqs[s.seq_id].adapter for s in seqs] if adapted else None
        return graphs.run_staged(rows, tables, inv, lora_slots=lora)

    def _decode_inputs(
        self, seqs: list[SeqStep], ahead: list[bool]
    ) -> tuple[tuple[list[int], list[int], list[int], list[int]], list[torch.Tensor]]:
        """A decode step's (token ids, positions, KV slots, context lengths) and each sequence's
        device block table; a sequence marked in `ahead` gets id 0 (its id is set on the
        device, `DecodeGraphs.run_staged`). At cp > 1 these are this rank's: the slot only where
        it holds the token's block (else -1, not stored), its count of the keys, its blocks."""
        bs, cp, rank = self.config.cache.block_size, self.comm.cp_size, self.comm.cp_rank
        ids, pos, slots, ctx, tables = [], [], [], [], []
        for s, is_ahead in zip(seqs, ahead, strict=True):
            state, p = self.seqs[s.seq_id], s.start_pos
            ids.append(0 if is_ahead else s.token_ids[0])
            pos.append(p)
            block = p // bs
            slots.append(state.block_table[block] * bs + p % bs if block % cp == rank else -1)
            ctx.append(p + 1)
            tables.append(state.table.view())
        if cp > 1:
            ctx = local_key_count(torch.tensor(ctx), bs, cp, rank).tolist()
        return (ids, pos, slots, ctx), tables

    def _prepare(
        self, seqs: list[SeqStep]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """Every token of the step; at cp > 1 (decode steps only) each rank stores the K/V of
        the tokens whose blocks it holds and attends over its own share of each sequence."""
        block_size, cp, cp_rank = self.config.cache.block_size, self.comm.cp_size, self.comm.cp_rank
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        cu = [0]
        ctx: list[int] = []
        tables: list[DeviceBlockTable] = []
        for s in seqs:
            state = self.seqs[s.seq_id]
            table = state.block_table
            end = s.start_pos + len(s.token_ids)
            ids.extend(s.token_ids)
            span = range(s.start_pos, end)
            pos.extend(span)
            if cp == 1:
                slots.extend(table[p // block_size] * block_size + p % block_size for p in span)
            else:  # the K/V of a token whose block another cp rank holds is not stored here
                slots.extend(
                    table[p // block_size] * block_size + p % block_size
                    if (p // block_size) % cp == cp_rank
                    else -1
                    for p in span
                )
            cu.append(cu[-1] + len(s.token_ids))
            ctx.append(end)
            tables.append(state.table)
        dev = self.device
        context_lens = torch.tensor(ctx, dtype=torch.int64)
        block_tables = padded_block_tables(tables)
        if cp > 1:
            context_lens = local_key_count(context_lens, block_size, cp, cp_rank)
            if block_tables.shape[1] == 0:  # no rank-local block yet in any sequence
                block_tables = torch.zeros(len(seqs), 1, dtype=torch.int32, device=dev)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=block_tables,
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int64, device=dev),
            context_lens=context_lens.to(dev),
            is_decode=all(len(s.token_ids) == 1 for s in seqs),
            cp_decode=cp > 1,
        )
        rows = torch.tensor(  # a draft's sequence samples after each of its last tokens
            [r for i, s in enumerate(seqs) if s.sample for r in _sample_span(s, cu[i + 1])],
            dtype=torch.int64,
            device=dev,
        )
        return (
            torch.tensor(ids, dtype=torch.int64, device=dev),
            torch.tensor(pos, dtype=torch.int64, device=dev),
            meta,
            rows,
        )

    def _prepare_cp(
        self, seqs: list[SeqStep]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """This cp rank's share of the step: the tokens whose K/V blocks it holds."""
        bs, cp, rank, dev = (
            self.config.cache.block_size,
            self.comm.cp_size,
            self.comm.cp_rank,
            self.device,
        )
        spans = [(s.start_pos, s.start_pos + len(s.token_ids)) for s in seqs]
        local_tables = [self.seqs[s.seq_id].block_table[rank::cp] for s in seqs]
        ids: list[torch.Tensor] = []
        pos: list[torch.Tensor] = []
        slots: list[torch.Tensor] = []
        rows: list[int] = []
        n = 0
        for s, (start, end), table in zip(seqs, spans, local_tables):
            span = torch.arange(start, end, dtype=torch.int64)
            mine = span[block_owner(span, bs, cp) == rank]
            if mine.numel() == 0:
                continue
            local_block = torch.div(mine, bs * cp, rounding_mode="floor")
            ids.append(torch.tensor(s.token_ids, dtype=torch.int64)[mine - start])
            pos.append(mine)
            slots.append(torch.tensor(table, dtype=torch.int64)[local_block] * bs + mine % bs)
            if s.sample:  # its last token's row, and a draft's rows before it, where held here
                picked = torch.nonzero(mine >= end - 1 - s.num_draft_tokens).flatten()
                rows += (n + picked).tolist()
            n += mine.numel()
        empty = torch.empty(0, dtype=torch.int64)
        meta = AttentionMetadata(
            slot_mapping=(torch.cat(slots) if slots else empty).to(dev),
            block_tables=torch.empty(0, 0, dtype=torch.int32, device=dev),
            cu_seqlens_q=torch.zeros(1, dtype=torch.int64, device=dev),
            context_lens=empty.to(dev),
            cp=build_cp_metadata(spans, local_tables, bs, self.comm, dev),
        )
        return (
            (torch.cat(ids) if ids else empty).to(dev),
            (torch.cat(pos) if pos else empty).to(dev),
            meta,
            torch.tensor(rows, dtype=torch.int64, device=dev),
        )

    def _rope_inv_freq(self, seqs: list[SeqStep], split: bool) -> torch.Tensor:
        """(tokens, head_dim // 2) RoPE frequencies per token when some request has its own
        base, rows packed sequence by sequence in plan order (split: a cp rank's share of the
        step's tokens, else all of them)."""
        default = self.model.rotary.inv_freq
        rows = [self.seqs[s.seq_id].inv_freq for s in seqs]
        counts = self._row_counts(seqs, split)
        per_seq = torch.stack([default if inv is None else inv for inv in rows])
        if all(n == 1 for n in counts):  # a decode step: one row per sequence
            return per_seq
        repeats = torch.tensor(counts, device=per_seq.device)
        return per_seq.repeat_interleave(repeats, dim=0, output_size=sum(counts))

    def _row_counts(self, seqs: list[SeqStep], split: bool) -> list[int]:
        """Each sequence's rows in the step's forward, packed in plan order (split: this cp
        rank's share of its tokens)."""
        if not split:
            return [len(s.token_ids) for s in seqs]
        bs, cp, rank = self.config.cache.block_size, self.comm.cp_size, self.comm.cp_rank
        counts = []
        for s in seqs:
            span = torch.arange(s.start_pos, s.start_pos + len(s.token_ids))
            counts.append(int((block_owner(span, bs, cp) == rank).sum()))
        return counts

    def _gather_step_rows(
        self, hidden: torch.Tensor, cp_meta: CPMetadata, seqs: list[SeqStep]
    ) -> torch.Tensor:
        """A split step's final hidden states of every token, from every cp rank, in cp = 1's
        order (each sequence's tokens by position, sequences in plan order), on every cp rank.

        Each rank holds the rows of the tokens whose blocks it stores, laid out as
        `cp_meta.layouts[rank]`; the ranks all-gather them (padded to the most any holds)."""
        n_max = cp_meta.n_max
        padded = hidden.new_zeros(n_max, hidden.shape[-1])
        padded[: hidden.shape[0]] = hidden
        gathered = self.comm.cp_all_gather(padded).flatten(0, 1)  # (cp * n_max, hidden)
        starts = [0, *itertools.accumulate(len(s.token_ids) for s in seqs)]
        index = torch.empty(starts[-1], dtype=torch.int64)
        for j, lay in enumerate(cp_meta.layouts):
            positions = lay.positions.cpu()
            for b, row, count in lay.segments:
                order = starts[b] + positions[row : row + count] - seqs[b].start_pos
                index[order] = torch.arange(j * n_max + row, j * n_max + row + count)
        return gathered[index.to(hidden.device)]

    def _gather_sample_rows(self, rows: torch.Tensor, seqs: list[SeqStep]) -> torch.Tensor:
        """Final hidden states of the sampled rows (each sampled sequence's last token, and a
        draft's tokens before it), in plan order, on every cp rank.

        Each row lives on the rank holding its token's block; the ranks all-gather their rows
        (padded to the most any rank has)."""
        bs, cp = self.config.cache.block_size, self.comm.cp_size
        owners = [
            (p // bs) % cp
            for s in seqs
            if s.sample
            for p in _sample_span(s, s.start_pos + len(s.token_ids))
        ]
        counts = [owners.count(j) for j in range(cp)]
        width = max(counts)
        padded = rows.new_zeros(width, rows.shape[-1])
        padded[: rows.shape[0]] = rows
        gathered = self.comm.cp_all_gather(padded)  # (cp, width, hidden)
        seen = [0] * cp
        order = []
        for owner in owners:
            order.append(owner * width + seen[owner])
            seen[owner] += 1
        return gathered.flatten(0, 1)[torch.tensor(order, device=rows.device)]

    def _seed_draws(self, seqs: list[SeqStep]) -> None:
        """Seed each sampling sequence's stream for the token this step picks: one stream per
        (seed, position), so a draw does not depend on batching, on a preemption that recomputed
        the sequence, or on whether the step was launched ahead."""
        for s in seqs:
            st = self.seqs[s.seq_id]
            if st.spec.temperature > 0:
                st.generator.manual_seed(draw_seed(st.spec.seed, s.start_pos + len(s.token_ids)))

    def _drafts_as_decode(self, seqs: list[SeqStep]) -> bool:
        """Whether a step whose sequences decode (some checking a draft) runs as a decode step
        of one row per token (`_draft_rows`): the decode path (the native CPU decoder, the
        decode graphs) instead of a prefill chunk per sequence. Each row attends over its
        sequence's keys, so a sequence's keys are read once per row except where the rows
        share blocks (the CPU decode attends over a batch's common blocks once); on CUDA
        that is taken only while contexts are short (`DRAFT_DECODE_MAX_CONTEXT`)."""
        if any(len(s.token_ids) != s.num_draft_tokens + 1 or not s.sample for s in seqs):
            return False  # a prefill chunk rides along
        if self.comm.cp_size > 1:
            return False
        if self.device.type == "cpu":
            return True
        return max(s.start_pos + len(s.token_ids) for s in seqs) <= DRAFT_DECODE_MAX_CONTEXT

    def _sample_drafts(self, logits: torch.Tensor, seqs: list[SeqStep]) -> list[SampledToken]:
        """Tokens of a step where some sequences check a draft: `logits` has one row per
        sequence without one and num_draft_tokens + 1 rows per sequence with one, in plan
        order; the tokens come back in plan order, a draft's kept tokens in a row."""
        starts = [0, *itertools.accumulate(s.num_draft_tokens + 1 for s in seqs)]
        plain = [i for i, s in enumerate(seqs) if not s.num_draft_tokens]
        out: list[list[SampledToken]] = [[] for _ in seqs]
        if plain:
            rows = torch.tensor([starts[i] for i in plain], device=logits.device)
            picked = self._sample(logits.index_select(0, rows), [seqs[i] for i in plain])
            for i, tok in zip(plain, picked):
                out[i] = [tok]
        for i, s in enumerate(seqs):
            n = s.num_draft_tokens
            if not n:
                continue
            if s.draft_allowed_tokens and len(s.draft_allowed_tokens) != n + 1:
                raise ValueError(
                    f"seq {s.seq_id}: {len(s.draft_allowed_tokens)} masks for a draft of {n}"
                )
            state = self.seqs[s.seq_id]
            first = s.start_pos + len(s.token_ids) - n  # position of the first token picked
            history, output_start = None, 0
            if state.spec.needs_history:  # through the draft's last token (`_update_state`)
                history = torch.tensor(state.history, dtype=torch.int64, device=self.device)
                output_start = max(0, state.spec.num_prompt_tokens - max(state.history_start, 0))
            try:
                out[i] = verify_draft(
                    logits[starts[i] : starts[i + 1]],
                    s.token_ids[-n:],
                    state.spec,
                    state.generator,
                    [draw_seed(state.spec.seed, first + j) for j in range(n + 1)],
                    s.seq_id,
                    s.draft_allowed_tokens or None,
                    history,
                    output_start,
                )
            except Exception as e:  # this request's values broke it: it alone fails
                logger.exception("seq %d: checking its draft failed", s.seq_id)
                self._failed_rows.append((s.seq_id, f"{type(e).__name__}: {e}"))
                continue
            if state.spec.needs_history:  # the rejected draft tokens leave the history
                del state.history[len(state.history) - (n + 1 - len(out[i])) :]
        return [tok for toks in out for tok in toks]

    def _sample(self, logits: torch.Tensor, seqs: list[SeqStep]) -> list[SampledToken]:
        """The rows' tokens; when the batch raises, each row is sampled alone and the rows that
        raise again are left out and recorded in `_failed_rows` (a request's values that break
        the sampler fail that request, not the others of its step)."""
        try:
            return self._sample_batch(logits, seqs)
        except Exception as e:
            logger.warning("sampling %d rows failed (%s); sampling them one by one", len(seqs), e)
        tokens: list[SampledToken] = []
        for i, seq in enumerate(seqs):
            try:
                tokens += self._sample_batch(logits[i : i + 1], [seq])
            except Exception as e:
                logger.exception("seq %d: sampling failed", seq.seq_id)
                self._failed_rows.append((seq.seq_id, f"{type(e).__name__}: {e}"))
        return tokens

    def _sample_batch(self, logits: torch.Tensor, seqs: list[SeqStep]) -> list[SampledToken]:
        states = [self.seqs[s.seq_id] for s in seqs]
        self._seed_draws(seqs)
        none = torch.empty(0, dtype=torch.int64, device=self.device)
        histories = [
            torch.tensor(st.history, dtype=torch.int64, device=self.device)
            if st.spec.needs_history
            else none
            for st in states
        ]
        return self.sampler.sample(
            logits,
            [st.spec for st in states],
            histories,
            [st.generator for st in states],
            [s.seq_id for s in seqs],
            [max(0, st.spec.num_prompt_tokens - max(st.history_start, 0)) for st in states],
            [s.allowed_tokens for s in seqs],
        )


@dataclass
class _Launched:
    """A step `ModelRunner.launch` left running: its picks arrive in `picked` once `event`
    (None off CUDA) has passed."""

    step_id: int
    seq_ids: list[int]
    picked: torch.Tensor
    event: torch.cuda.Event | None
    _result: StepResult | None = None

    def result(self) -> StepResult:
        if self._result is None:
            if self.event is not None:
                self.event.synchronize()
            tokens = greedy_tokens(self.picked, self.seq_ids)
            self._result = StepResult(step_id=self.step_id, tokens=tokens)
        return self._result


def _draft_rows(seqs: list[SeqStep]) -> list[SeqStep]:
    """A decode step with drafts as one single-token sampled step per token, in order: a
    sequence with a draft of n tokens becomes n + 1 rows at consecutive positions. Every row
    stores its K/V before any attends, so row j sees the draft tokens before it."""
    rows = []
    for s in seqs:
        if not s.num_draft_tokens:
            rows.append(s)
            continue
        for j, token in enumerate(s.token_ids):
            rows.append(
                SeqStep(
                    seq_id=s.seq_id,
                    token_ids=[token],
                    start_pos=s.start_pos + j,
                    new_blocks=[],
                    is_new=False,
                    sample=True,
                )
            )
    return rows


def _sample_span(step: SeqStep, end: int) -> range:
    """Rows of a sampled chunk ending at row `end` (exclusive) that are sampled after: its last
    row, and with a draft the num_draft_tokens rows before it too."""
    return range(end - 1 - step.num_draft_tokens, end)


def draw_seed(seed: int, position: int) -> int:
    """Seed of the draw for the token at `position` (splitmix64 of the pair, 63 bits)."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 1
