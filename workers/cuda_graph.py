"""Decode steps replayed from CUDA graphs.

A decode step of a 7B model launches several hundred small kernels from Python; at small batch
their launch cost, not the bytes the step reads, sets the step time. Each graph here holds the
whole decode forward (embedding to final norm, tp all-reduces included, and at cp > 1 the
all-gather and merge of the cp ranks' partial attention: `cp_decode_attention`) for one padded
batch size and replays it in one launch.

A graph reads fixed input buffers. A step copies its inputs into the first `n` rows and pads the
batch to the next captured size with rows that write their K/V to a scratch block that no
sequence owns and attend only to it; the block table keeps its full width (a session's worth of
blocks, or this cp rank's share of them), so the split-KV decode kernel's plan never changes
between replays. Models with dynamic-NTK RoPE get a second set of graphs that read per-token
RoPE frequencies from a fixed buffer, for steps holding a request with its own RoPE base; with
LoRA adapters loaded, another set reads each row's adapter slot from a fixed buffer
(`kernels/lora.py`), for steps holding a request with an adapter. Logits and sampling stay
eager: they depend on the request's sampling options.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from workers.layers.attention import AttentionMetadata
from workers.lora import LoraBatch

logger = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]
Carry = tuple[torch.Tensor, torch.Tensor | None]
Stage = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata, Carry | None], Carry]
"""A segment of the decode forward: (input ids, positions, metadata, what the previous segment
returned or None for the first) -> (hidden, residual); the last returns (final hidden, None)."""


def capture_sizes(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then every 16 up to max_batch (max_batch itself
    included), so padding wastes at most 15 rows past 8."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch]
    sizes += list(range(16, max_batch, 16))
    return sorted(set(sizes + [max_batch]))


class DecodeGraphs:
    """One graph per batch size in `capture_sizes(max_batch)`.

    forward(input_ids, positions, meta) -> hidden (tokens, hidden_size) is the model's decode
    forward. `emulate=True` records nothing and replays by calling forward on the same buffers:
    the padding and buffer logic can then be tested where there is no CUDA.
    """

    def __init__(
        self,
        forward: Forward,
        *,
        max_batch: int,
        max_blocks: int,
        block_size: int,
        scratch_block: int,
        device: torch.device,
        rope_half: int | None = None,
        emulate: bool = False,
        cp_decode: bool = False,
        stages: list[Stage] | None = None,
        head: Callable[[torch.Tensor], torch.Tensor] | None = None,
        vocab_size: int = 0,
        lora: bool = False,
    ):
        if max_batch < 1 or max_blocks < 1:
            raise ValueError(f"max_batch {max_batch} and max_blocks {max_blocks} must be >= 1")
        self.forward = forward
        self.stages = stages
        """Set: each batch size is captured as one graph per stage (`DecodeGraphs.run` replays
        them in order), so the device runs the first while the host launches the next."""
        self.head = head
        """Set: hidden -> (rows, vocab) fp32 logits, replayed in the graph after the forward;
        the logits land in `logits` and each row's argmax with its raw log-probability in
        `greedy`, so a greedy step needs no kernel launch after the replay."""
        self.max_batch = max_batch
        self.max_blocks = max_blocks
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * block_size
        self.emulate = emulate
        self.cp_decode = cp_decode
        self.sizes = capture_sizes(max_batch)

        # Token ids, positions, KV slots and context lengths in one (4, max_batch) buffer, so a
        # step's inputs arrive in one copy from a pinned host twin (`run_staged`).
        self.padding = torch.tensor([0, 0, self.scratch_slot, 1], dtype=torch.int64)
        self.inputs = self.padding[:, None].expand(4, max_batch).to(device).contiguous()
        self.input_ids, self.positions, self.slot_mapping, self.context_lens = self.inputs.unbind()
        pin = device.type == "cuda"
        self._staging = [  # two, so a step can fill one while the last one's copy is pending
            self.padding[:, None].expand(4, max_batch).contiguous().pin_memory()
            if pin
            else self.padding[:, None].expand(4, max_batch).contiguous()
            for _ in range(2)
        ]
        self._staged_rows = [0, 0]
        # Rows of `greedy` (from the replay before) whose token a row takes instead of its
        # staged id: steps planned ahead (LAST_SAMPLED); -1 keeps the staged id.
        self.last_rows = torch.full((max_batch,), -1, dtype=torch.int64, device=device)
        self._last_staging = [
            torch.full((max_batch,), -1, dtype=torch.int64).pin_memory()
            if pin
            else torch.full((max_batch,), -1, dtype=torch.int64)
            for _ in range(2)
        ]
        # Recorded after each staging buffer's copy (re-recorded, not re-created, per step).
        self._copied = [torch.cuda.Event() for _ in range(2)] if pin else None
        self._numpy = [buf.numpy() for buf in self._staging]
        self._turn = 0
        self._padded_rows = 0
        """Rows of block_tables / inv_freq a step filled past the rows of the steps after it."""
        self.cu_seqlens = torch.arange(max_batch + 1, dtype=torch.int64, device=device)
        self.block_tables = torch.full(
            (max_batch, max_blocks), scratch_block, dtype=torch.int32, device=device
        )
        # Per-token RoPE frequencies for steps holding a request with its own base (dynamic NTK
        # past max_position_embeddings): a second set of graphs reads them from here.
        self.rope_half = rope_half
        self.inv_freq = None
        if rope_half is not None:
            self.inv_freq = torch.zeros(max_batch, rope_half, dtype=torch.float32, device=device)
        # Each row's LoRA adapter slot (0: the base model) for the graphs of steps with adapters.
        self.lora_slots: torch.Tensor | None = None
        self._lora_staging: list[torch.Tensor] = []
        if lora:
            self.lora_slots = torch.zeros(max_batch, dtype=torch.int64, device=device)
            self._lora_staging = [  # pinned twins: a step's slots go over without a sync
                torch.zeros(max_batch, dtype=torch.int64).pin_memory()
                if pin
                else torch.zeros(max_batch, dtype=torch.int64)
                for _ in range(2)
            ]
        self.logits: torch.Tensor | None = None
        self.greedy: torch.Tensor | None = None
        if head is not None:
            self.logits = torch.zeros(max_batch, vocab_size, dtype=torch.float32, device=device)
            # (token id, log-probability) per row, float64 so one copy brings both back exactly.
            self.greedy = torch.zeros(max_batch, 2, dtype=torch.float64, device=device)
        self._replay: dict[tuple[int, bool, bool], Callable[[], None]] = {}
        self._outputs: dict[tuple[int, bool, bool], torch.Tensor] = {}
        """By (batch size, per-token RoPE, LoRA slots)."""
        self.num_replays = 0
        self.num_rope_replays = 0
        self.num_lora_replays = 0
        self.num_staged = 0
        """Replays whose inputs came in one copy (`run_staged`)."""

    def _meta(self, b: int, rope: bool, lora: bool) -> AttentionMetadata:
        inv = None
        if rope:
            assert self.inv_freq is not None
            inv = self.inv_freq[:b]
        adapters = None
        if lora:
            assert self.lora_slots is not None
            adapters = LoraBatch(slots=self.lora_slots[:b])
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b],
            block_tables=self.block_tables[:b],
            cu_seqlens_q=self.cu_seqlens[: b + 1],
            context_lens=self.context_lens[:b],
            is_decode=True,
            rope_inv_freq=inv,
            cp_decode=self.cp_decode,
            lora=adapters,
        )

    def _forward(self, b: int, meta: AttentionMetadata) -> torch.Tensor:
        ids, pos = self.input_ids[:b], self.positions[:b]
        if self.stages is None:
            return self._tail(b, self.forward(ids, pos, meta))
        carry: Carry | None = None
        for stage in self.stages:
            carry = stage(ids, pos, meta, carry)
        assert carry is not None
        return self._tail(b, carry[0])

    def _tail(self, b: int, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head and the greedy pick of the first b rows (when `head` is set): the same
        operations as `Sampler`'s greedy path, into the fixed `logits` and `greedy` buffers."""
        if self.head is None:
            return hidden
        assert self.logits is not None and self.greedy is not None
        logits = self.logits[:b]
        logits.copy_(self.head(hidden))
        token_ids = logits.argmax(dim=-1)
        picked = logits.gather(1, token_ids.unsqueeze(1)).squeeze(1)
        self.greedy[:b, 0].copy_(token_ids)
        self.greedy[:b, 1].copy_(picked - torch.logsumexp(logits, dim=-1))
        return hidden

    def _capture_stages(
        self, b: int, meta: AttentionMetadata, pool: Any
    ) -> tuple[Callable[[], None], torch.Tensor, Any]:
        """One graph per stage, each reading what the previous one wrote."""
        assert self.stages is not None
        ids, pos = self.input_ids[:b], self.positions[:b]
        graphs = []
        carry: Carry | None = None
        for i, stage in enumerate(self.stages):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                carry = stage(ids, pos, meta, carry)
                if i == len(self.stages) - 1:
                    self._tail(b, carry[0])
            pool = graph.pool()
            graphs.append(graph)
            self._carries.append(carry)  # the next graph reads it: keep its memory
        assert carry is not None

        def replay() -> None:
            for graph in graphs:
                graph.replay()

        return replay, carry[0], pool

    def capture(self) -> None:
        """Capture every size, largest first, into one memory pool (a smaller graph's tensors
        fit in what the largest one freed)."""
        start = time.perf_counter()
        pool: Any = None
        self._carries: list[Carry] = []
        ropes = [False, True] if self.rope_half is not None else [False]
        loras = [False, True] if self.lora_slots is not None else [False]
        keys = [
            (b, rope, lora)
            for b in sorted(self.sizes, reverse=True)
            for rope in ropes
            for lora in loras
        ]
        for key in keys:
            meta = self._meta(*key)

            def run(b: int = key[0], meta: AttentionMetadata = meta) -> torch.Tensor:
                return self._forward(b, meta)

            if self.emulate:
                out = run()

                def replay(
                    key: tuple[int, bool, bool] = key, run: Callable[[], torch.Tensor] = run
                ) -> None:
                    self._outputs[key].copy_(run())

                self._replay[key], self._outputs[key] = replay, out
                continue
            run()  # warm-up outside the graph: Triton compiles, the allocator grows
            torch.cuda.synchronize()
            if self.stages is not None:
                self._replay[key], self._outputs[key], pool = self._capture_stages(
                    key[0], meta, pool
                )
                continue
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = run()
            pool = graph.pool()
            self._replay[key], self._outputs[key] = graph.replay, out
        if not self.emulate:
            # One replay of each (padding rows only: they write the scratch block) moves its
            # first launch's one-off cost to start-up, out of a request's first decode step.
            for launch in self._replay.values():
                launch()
            torch.cuda.synchronize()
        logger.info(
            "captured decode graphs for batch sizes %s%s in %.1f s",
            self.sizes,
            f" ({len(self.stages)} segments each)" if self.stages is not None else "",
            time.perf_counter() - start,
        )

    @property
    def captured(self) -> bool:
        return bool(self._replay)

    def can_run(self, meta: AttentionMetadata, tokens: int) -> bool:
        """A decode step that fits (at cp > 1 one that runs every row on every cp rank);
        per-request RoPE frequencies and LoRA adapters only where their graphs were captured."""
        inv = meta.rope_inv_freq
        rope_ok = inv is None or (self.rope_half is not None and inv.shape[1:] == (self.rope_half,))
        lora_ok = meta.lora is None or (self.lora_slots is not None and meta.lora.slots is not None)
        return (
            meta.is_decode
            and lora_ok
            and rope_ok
            and meta.cp is None
            and meta.cp_decode == self.cp_decode
            and 0 < tokens <= self.max_batch
            and meta.block_tables.shape[1] <= self.max_blocks
            and bool(self._replay)
        )

    def run_staged(
        self,
        rows: tuple[list[int], list[int], list[int], list[int]],
        block_tables: list[torch.Tensor],
        inv_freq: torch.Tensor | None = None,
        last_rows: list[int] | None = None,
        picks: torch.Tensor | None = None,
        lora_slots: list[int] | None = None,
    ) -> torch.Tensor:
        """A decode step of n sequences from host lists (token ids, positions, KV slots, context
        lengths; n each) and each sequence's 1-D device block table: the four rows go over in
        one copy from pinned memory, padding included, the tables in one multi-tensor copy, and
        the graph replays. `last_rows[i] >= 0`: row i's token id is the pick of that row of the
        previous step, still on the device: column 0 of `picks` (default: the graphs' own
        `greedy`; a step that sampled after its replay picked into another buffer).
        `lora_slots`: each row's LoRA adapter slot, for a step with adapter rows. Returns
        (n, hidden) rows of the graph's output buffer (valid until the next replay). Nothing
        here waits for the device."""
        n = len(rows[0])
        b = next(size for size in self.sizes if size >= n)
        turn = self._turn
        self._turn ^= 1
        if self._copied is not None:  # the copy that last read this buffer has finished
            self._copied[turn].synchronize()  # (at once for an event never recorded)
        host, view = self._staging[turn], self._numpy[turn]
        for i, values in enumerate(rows):
            view[i, :n] = values
        stale = self._staged_rows[turn]
        if stale > n:
            host[:, n:stale] = self.padding[:, None]
        self._staged_rows[turn] = n
        self.inputs.copy_(host, non_blocking=True)
        if last_rows is not None:
            source = self.greedy if picks is None else picks
            assert source is not None, "taking last sampled ids needs the graphs' head"
            src = self._last_staging[turn]
            src.numpy()[:n] = last_rows
            take = self.last_rows[:n]
            take.copy_(src[:n], non_blocking=True)
            picked = source[take.clamp(min=0), 0].to(torch.int64)
            self.input_ids[:n] = torch.where(take >= 0, picked, self.input_ids[:n])
        lora = lora_slots is not None
        if lora_slots is not None:
            assert self.lora_slots is not None, "LoRA rows need graphs captured with adapters"
            staged = self._lora_staging[turn]
            staged.numpy()[:n] = lora_slots
            self.lora_slots[:n].copy_(staged[:n], non_blocking=True)
        if self._copied is not None:  # (after every copy from this turn's pinned buffers)
            self._copied[turn].record()
        # Entries past a table's length keep older ids: its context length bounds every read.
        dst = [self.block_tables[i, : t.shape[0]] for i, t in enumerate(block_tables)]
        torch._foreach_copy_(dst, block_tables)
        rope = inv_freq is not None
        if inv_freq is not None:
            assert self.inv_freq is not None
            self.inv_freq[:n].copy_(inv_freq)
        if self._padded_rows > n:  # rows a larger step left behind become padding again
            self.block_tables[n : self._padded_rows].fill_(self.scratch_block)
            if self.inv_freq is not None:
                self.inv_freq[n : self._padded_rows].zero_()
            if self.lora_slots is not None:
                self.lora_slots[n : self._padded_rows].zero_()
        self._padded_rows = n
        self.num_staged += 1
        return self._replay_size(b, n, rope, lora)

    def _replay_size(self, b: int, n: int, rope: bool, lora: bool) -> torch.Tensor:
        self._replay[(b, rope, lora)]()
        self.num_replays += 1
        self.num_rope_replays += rope
        self.num_lora_replays += lora
        return self._outputs[(b, rope, lora)][:n]

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """The decode forward of `n` sequences through the smallest graph that holds them;
        returns (n, hidden) rows of the graph's output buffer (valid until the next replay)."""
        n = input_ids.shape[0]
        b = next(size for size in self.sizes if size >= n)
        width = meta.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.context_lens[:n].copy_(meta.context_lens)
        self.block_tables[:n, :width].copy_(meta.block_tables)
        rope = meta.rope_inv_freq is not None
        if rope:
            assert meta.rope_inv_freq is not None and self.inv_freq is not None
            self.inv_freq[:n].copy_(meta.rope_inv_freq)
        lora = meta.lora is not None
        if meta.lora is not None:
            assert meta.lora.slots is not None and self.lora_slots is not None
            self.lora_slots[:n].copy_(meta.lora.slots)
        if b > n:  # rows a larger step left behind become padding again
            self.inputs[:, n:b] = self.padding[:, None].to(self.inputs.device)
            self.block_tables[n:b].fill_(self.scratch_block)
            if rope:
                assert self.inv_freq is not None
                self.inv_freq[n:b].zero_()
            if lora:
                assert self.lora_slots is not None
                self.lora_slots[n:b].zero_()
        self._padded_rows = max(self._padded_rows, n)
        return self._replay_size(b, n, rope, lora)
