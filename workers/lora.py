"""LoRA adapters on a worker: each rank's shards of A and B, and the batched forward.

Every adapted linear layer gets a `LinearLora`: per adapter slot (1..; 0 is the base model) an
`A` [R, in_local] and a `B` [out_local, R] with the scale folded into `B`, stacked over the
slots, so the layer adds `B[s] (A[s] x)` to each row's output.

* Column-parallel layers (q/k/v, gate/up) keep all of `A` and this rank's output rows of `B`.
  A fused layer's parts have their own `A`s: they are stacked along R and `B` is block-diagonal
  over them (rows of q use q's columns only, ...), so one pair of matmuls serves the fused
  output. InternLM2's packed wqkv has one `A`, and `B`'s rows are cut as the weight's are.
* Row-parallel layers (o, down) keep this rank's input columns of `A` and all of `B`; the
  rank's `B (A_local x_local)` goes into its partial product before the all-reduce, whose sum
  over ranks is `B (A x)`: no collective of its own.

A step's rows come by adapter (`LoraBatch`, built by the model runner from the sequences'
slots): steps run eagerly take one pair of matmuls per adapter present (on CPU, with rows of
most slots, every slot at once, masked); decode steps replayed from CUDA graphs read each row's
slot from a device tensor through the shrink / expand kernels (`kernels/lora.py`); decode steps
on the native CPU decoder read each row's slot and the stacks from C (`kernels/cpu_decoder.py`).
Steps without adapter rows cost nothing.

`LoraLayers` fills the stacks: sized to the adapters given at start, or with reserved slots
(`max_loras`) filled and zeroed in place while the runtime runs, from a host cache of recently
used adapters' shards or their files.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dist_runtime.config import ModelConfig
from dist_runtime.lora import ADAPTER_WEIGHTS, AdapterModule, AdapterSpec
from kernels.lora import lora_add
from workers.layers.attention import HeadShard
from workers.layers.linear import _Linear
from workers.models.decoder import DecoderLayer, DecoderLM
from workers.models.layouts import qk_projection_rows, reorder_heads

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraBatch:
    """A step's rows by adapter, in one of two forms: `groups`, (slot, row indices on the
    device, or None for every row) per adapter present, for steps run eagerly (one pair of
    matmuls per adapter); or `slots`, each row's slot as a device tensor (0: base), for decode
    steps replayed from CUDA graphs (`kernels/lora.py`, one pair of kernels for any mix)."""

    groups: tuple[tuple[int, torch.Tensor | None], ...] = ()
    slots: torch.Tensor | None = None

    @classmethod
    def build(cls, slots: list[int], counts: list[int], device: torch.device) -> LoraBatch | None:
        """From each sequence's adapter slot and its number of rows in the step (rows packed
        sequence by sequence); None when no row has an adapter."""
        present = sorted({s for s, n in zip(slots, counts, strict=True) if s and n})
        if not present:
            return None
        per_row = torch.tensor(slots).repeat_interleave(torch.tensor(counts))
        total = sum(counts)
        groups: list[tuple[int, torch.Tensor | None]] = []
        for slot in present:
            rows = [
                r
                for s, n, start in zip(slots, counts, _starts(counts), strict=True)
                if s == slot
                for r in range(start, start + n)
            ]
            index = None if len(rows) == total else torch.tensor(rows, dtype=torch.int64)
            groups.append((slot, None if index is None else index.to(device)))
        return cls(tuple(groups), per_row.to(device))


def _starts(counts: list[int]) -> list[int]:
    out, at = [], 0
    for n in counts:
        out.append(at)
        at += n
    return out


class LoraState:
    """The step's `LoraBatch`, shared by every adapted layer of a model (set by the model's
    forward for its duration)."""

    def __init__(self) -> None:
        self.batch: LoraBatch | None = None


class LinearLora:
    """One layer's adapters, stacked by slot: `a` [slots, R, in_local] and `b` [slots,
    out_local, R] (scale folded in; slot 0 and a slot that leaves this layer alone are zeros;
    R the largest rank here), and each slot's own (A, B) as views of its rank."""

    def __init__(self, state: LoraState) -> None:
        self.state = state
        self.weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.a = self.b = torch.empty(0)

    def stack(self, num_slots: int, device: torch.device, dtype: torch.dtype) -> int:
        """Move the adapters' matrices (fp32 on the host so far) into stacks on the device of
        their largest rank; returns the stacks' bytes."""
        rank = max(a.shape[0] for a, _ in self.weights.values())
        a0, b0 = next(iter(self.weights.values()))
        return self.reserve(num_slots, rank, a0.shape[1], b0.shape[0], device, dtype)

    def reserve(
        self,
        num_slots: int,
        rank: int,
        in_local: int,
        out_local: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> int:
        """Stacks of `num_slots` slots of `rank`, zeros but for the adapters held so far."""
        held = self.weights
        self.a = torch.zeros(num_slots, rank, in_local, dtype=dtype, device=device)
        self.b = torch.zeros(num_slots, out_local, rank, dtype=dtype, device=device)
        self.weights = {}
        self._b_flat = self._b_rows = None
        for slot, (a, b) in held.items():
            self.put(slot, a, b)
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()

    def put(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Copy a slot's (A [r, in_local], B [out_local, r]) into the stacks, in place (a
        captured graph keeps reading the same memory)."""
        r = a.shape[0]
        if r > self.a.shape[1]:
            raise ValueError(f"rank {r} is over the {self.a.shape[1]} this layer's slots hold")
        self.a[slot].zero_()
        self.b[slot].zero_()
        self.a[slot, :r].copy_(a)
        self.b[slot, :, :r].copy_(b)
        self.weights[slot] = (self.a[slot, :r], self.b[slot, :, :r])
        self._b_flat = self._b_rows = None

    def remove(self, slot: int) -> None:
        """Zero a slot (an unloaded adapter)."""
        if self.weights.pop(slot, None) is not None:
            self.a[slot].zero_()
            self.b[slot].zero_()
            self._b_flat = self._b_rows = None

    def add_to(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` plus the adapters' terms for the step's rows of `x` (in place)."""
        batch = self.state.batch
        if batch is None:
            return out
        if not batch.groups:
            assert batch.slots is not None
            return lora_add(x, self.a, self.b, batch.slots, out)
        if x.is_cpu and 2 * len(batch.groups) > self.a.shape[0]:
            return self._add_dense(x, out, batch)
        for slot, rows in batch.groups:
            ab = self.weights.get(slot)
            if ab is None:
                continue
            a, b = ab
            if rows is None:
                torch.addmm(out, torch.matmul(x, a.t()), b.t(), out=out)
            else:
                delta = torch.matmul(torch.matmul(x.index_select(0, rows), a.t()), b.t())
                out.index_add_(0, rows, delta)
        return out

    def _add_dense(self, x: torch.Tensor, out: torch.Tensor, batch: LoraBatch) -> torch.Tensor:
        """A step holding rows of more than half the slots, on CPU: every slot's A at once (the
        stack viewed as one [slots * R, in] matrix), each row's products outside its own slot
        zeroed, then every slot's B at once. Two matmuls that compute every slot for every row,
        against a gather, two matmuls and a scatter per adapter present (at 8 decode rows of
        the demo model, 4 adapters: 83 against 4 x 32 us for a q/k/v layer)."""
        assert batch.slots is not None
        slots, rank = self.a.shape[0], self.a.shape[1]
        h = torch.matmul(x, self.a.view(slots * rank, -1).t())  # (rows, slots * R)
        own = batch.slots[:, None] == self._column_slots(slots, rank, x.device)[None, :]
        h.mul_(own)
        if self._b_flat is None:  # (out, slots * R): every slot's B side by side, made once
            self._b_flat = self.b.permute(1, 0, 2).reshape(self.b.shape[1], -1).contiguous()
        return out.add_(torch.matmul(h, self._b_flat.t()))

    def b_rows(self) -> torch.Tensor:
        """The B stack as (slots, R, out), each rank's row contiguous over the outputs (what the
        native CPU decoder adds from, a row at a time); made once per change of the stacks."""
        if self._b_rows is None:
            self._b_rows = self.b.transpose(1, 2).contiguous()
        return self._b_rows

    def _column_slots(self, slots: int, rank: int, device: torch.device) -> torch.Tensor:
        if self._columns is None:
            self._columns = torch.arange(slots, device=device).repeat_interleave(rank)
        return self._columns

    _columns: torch.Tensor | None = None
    _b_flat: torch.Tensor | None = None
    _b_rows: torch.Tensor | None = None


class LoraLayers:
    """The adapters of one model on this rank: which slot holds which, and their shards in the
    model's linear layers.

    Without `room` (adapters fixed at start) each layer's stacks are sized to the adapters given
    (`finish`), a fused layer's parts packed one after another. With `room` = (slots, rank)
    every projection of every layer reserves that many slots at once, each fused part `rank`
    columns wide, so adapters can be added and removed later, in place."""

    def __init__(
        self,
        model: DecoderLM,
        config: ModelConfig,
        shard: HeadShard,
        tp_rank: int,
        tp_size: int,
        room: tuple[int, int] | None = None,
        host_cache: int = 0,
    ) -> None:
        from workers.models.layouts import _qkv_out_ranges
        from workers.models.names import LAYOUTS

        self.model, self.room, self.tp_rank = model, room, tp_rank
        self.config = config
        self.state = LoraState()
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        lay = LAYOUTS[config.architecture]
        inter = config.intermediate_size // tp_size
        mlp_rows = (tp_rank * inter, (tp_rank + 1) * inter)
        hd = config.head_dim
        q_cols = (shard.q_start * hd, (shard.q_start + shard.num_q) * hd)
        self.columns: list[tuple[_Linear, list[tuple[str, int, int]]]] = []
        """Column-parallel layers with their output ranges (checkpoint module, rows)."""
        self.rows: list[tuple[_Linear, str, tuple[int, int]]] = []
        """Row-parallel layers with their module and input columns."""
        for i, layer in enumerate(model.layers):
            assert isinstance(layer, DecoderLayer)
            p = lay.layer.format(i)
            qkv = _qkv_out_ranges(lay, p, config, shard)
            gate_up = [(f"{p}{n}", *mlp_rows) for n in (lay.gate, lay.up)]
            self.columns += [(layer.attn.qkv_proj, qkv), (layer.mlp.gate_up_proj, gate_up)]
            self.rows += [
                (layer.attn.o_proj, f"{p}{lay.o}", q_cols),
                (layer.mlp.down_proj, f"{p}{lay.down}", mlp_rows),
            ]
        self.bytes = 0
        self.host_cache = host_cache
        self._host: collections.OrderedDict[bytes, list[tuple[int, torch.Tensor, torch.Tensor]]]
        self._host = collections.OrderedDict()
        """Adapters' shards kept in host memory by content hash, most recently used last (at
        most `host_cache`): loading one again into a slot copies them instead of reading and
        cutting its file."""
        self.num_file_reads = 0
        self.num_host_hits = 0
        if room is not None:
            slots, rank = room
            for linear, ranges in self.columns:
                parts = len(dict.fromkeys(m for m, _, _ in ranges))
                rows = sum(hi - lo for _, lo, hi in ranges)
                self.bytes += self._lora(linear).reserve(
                    slots, parts * rank, config.hidden_size, rows, self.device, self.dtype
                )
            for linear, _, (lo, hi) in self.rows:
                self.bytes += self._lora(linear).reserve(
                    slots, rank, hi - lo, config.hidden_size, self.device, self.dtype
                )

    def _lora(self, linear: _Linear) -> LinearLora:
        if linear.lora is None:
            linear.lora = LinearLora(self.state)
        return linear.lora

    def add(self, slot: int, spec: AdapterSpec) -> None:
        """Put this rank's shards of `spec` into `slot` of every layer it adapts: from the host
        cache, or read and cut from its file."""
        if self.put_cached(slot, spec.digest):
            return
        shards = self._read(spec)
        if self.host_cache and spec.digest:  # (a start adapter's hash is the driver's)
            self._host[spec.digest] = shards
            while len(self._host) > self.host_cache:
                self._host.popitem(last=False)
        self._put_all(slot, shards)

    def _put_all(self, slot: int, shards: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        linears = [linear for linear, _ in self.columns] + [linear for linear, _, _ in self.rows]
        for index, a, b in shards:
            self._put(linears[index], slot, (a, b))

    def put_cached(self, slot: int, digest: bytes) -> bool:
        """Put the adapter with content hash `digest` into `slot` from the host cache; False
        when the cache does not hold it."""
        shards = self._host.get(digest) if digest else None
        if shards is None:
            return False
        self._host.move_to_end(digest)
        self.num_host_hits += 1
        self._put_all(slot, shards)
        return True

    def _read(self, spec: AdapterSpec) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """(layer index in columns + rows, A, B) of every layer `spec` adapts, this rank's
        shards (in the model's dtype when they are kept in the host cache)."""
        self.num_file_reads += 1
        width = None if self.room is None else self.room[1]
        out: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        with _AdapterFile(spec, self.config) as pair:
            for index, (_, ranges) in enumerate(self.columns):
                ab = _column(ranges, pair, width)
                if ab is not None:
                    out.append((index, *ab))
            for index, (_, module, (lo, hi)) in enumerate(self.rows, start=len(self.columns)):
                found = pair(module)
                if found is not None:
                    out.append((index, found[0][:, lo:hi].contiguous(), found[1]))
        if self.host_cache:
            pin = self.device.type == "cuda"

            def kept(t: torch.Tensor) -> torch.Tensor:
                t = t.to(self.dtype)
                return t.pin_memory() if pin else t

            out = [(i, kept(a), kept(b)) for i, a, b in out]
        return out

    def _put(self, linear: _Linear, slot: int, ab: tuple[torch.Tensor, torch.Tensor]) -> None:
        lora = self._lora(linear)
        if self.room is None:  # fp32 on the host until `finish` sizes the stacks
            lora.weights[slot] = (ab[0].contiguous(), ab[1].contiguous())
        else:
            lora.put(slot, ab[0], ab[1])

    def finish(self, num_slots: int) -> None:
        """Without room: size every adapted layer's stacks to the adapters added."""
        if self.room is not None:
            return
        for linear in self.model.modules():
            if isinstance(linear, _Linear) and linear.lora is not None:
                self.bytes += linear.lora.stack(num_slots, self.device, self.dtype)

    def remove(self, slot: int) -> None:
        for linear in self.model.modules():
            if isinstance(linear, _Linear) and linear.lora is not None:
                linear.lora.remove(slot)


def load_adapters(
    model: DecoderLM,
    config: ModelConfig,
    specs: list[AdapterSpec],
    shard: HeadShard,
    tp_rank: int,
    tp_size: int,
    room: tuple[int, int] | None = None,
    host_cache: int = 0,
) -> LoraLayers:
    """Read every adapter (slot i + 1 for specs[i]) and attach this rank's shards to the
    model's linear layers (with `room` = (slots, rank), reserving that many slots; keeping
    up to `host_cache` adapters' shards in host memory)."""
    layers = LoraLayers(model, config, shard, tp_rank, tp_size, room, host_cache)
    for slot, spec in enumerate(specs, start=1):
        layers.add(slot, spec)
    layers.finish(len(specs) + 1)
    logger.info(
        "tp rank %d: %d LoRA adapter(s), %.1f MiB%s",
        tp_rank,
        len(specs),
        layers.bytes / 2**20,
        "" if room is None else f" ({room[0] - 1} slots of rank {room[1]} reserved)",
    )
    return layers


class _AdapterFile:
    """An adapter's weights file, open: `pair(module)` reads (A, scaled B, module) in float32,
    or None when the adapter leaves that module alone."""

    def __init__(self, spec: AdapterSpec, config: ModelConfig) -> None:
        self.spec = spec
        self.by_name = {m.name: m for m in spec.modules}
        # (partial or interleaved RoPE: B's q / k rows are reordered, and scaled, as the loader
        # reorders and scales the base weights' rows)
        self.order, self.scale = qk_projection_rows(config)
        self.head_dim = config.head_dim

    def __enter__(self) -> Callable[[str], tuple[torch.Tensor, torch.Tensor, AdapterModule] | None]:
        from safetensors import safe_open

        self.file = safe_open(f"{self.spec.path}/{ADAPTER_WEIGHTS}", framework="pt")
        return self.pair

    def __exit__(self, *exc: object) -> None:
        del self.file

    def pair(self, module: str) -> tuple[torch.Tensor, torch.Tensor, AdapterModule] | None:
        m = self.by_name.get(module)
        if m is None:
            return None
        a = self.file.get_tensor(m.a_key).to(torch.float32)
        b = self.file.get_tensor(m.b_key).to(torch.float32)
        if m.b_rows is not None:  # (a packed projection's adapter: this part's rows)
            b = b[m.b_rows[0] : m.b_rows[1]]
        if self.order is not None and module.endswith((".q_proj", ".k_proj")):
            b = reorder_heads(b, self.order, self.head_dim, self.scale)
        return a, b * m.scale, m


def _column(
    ranges: list[tuple[str, int, int]],
    pair: Callable[[str], tuple[torch.Tensor, torch.Tensor, AdapterModule] | None],
    part_width: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A fused column-parallel layer's (A, B): the parts' A stacked, B's local rows of each
    part placed under that part's columns (zeros where a part has no adapter). The parts follow
    one another, or with `part_width` each starts at its index x part_width."""
    a_of: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = {}
    offset = 0
    for index, module in enumerate(dict.fromkeys(m for m, _, _ in ranges)):
        found = pair(module)
        if part_width is not None:
            offset = index * part_width
        if found is None:
            continue
        a, b, _ = found
        a_of[module] = (offset, a, b)
        offset += a.shape[0]
    if not a_of:
        return None
    rows = sum(hi - lo for _, lo, hi in ranges)
    width = next(iter(a_of.values()))[1].shape[1]
    a_cat = torch.zeros(offset, width, dtype=torch.float32)
    for col, a, _ in a_of.values():
        a_cat[col : col + a.shape[0]] = a
    b_cat = torch.zeros(rows, offset, dtype=torch.float32)
    at = 0
    for module, lo, hi in ranges:
        if module in a_of:
            col, a, b = a_of[module]
            b_cat[at : at + hi - lo, col : col + a.shape[0]] = b[lo:hi]
        at += hi - lo
    assert a_cat.shape[1] == width
    return a_cat, b_cat
