"""The pass-KV ring gives plain causal attention, on block-striped rows over real gloo ranks.

Layout as the runtime's fresh prefill: logical KV block b of a sequence (positions
[b * bs, (b + 1) * bs)) belongs to cp rank b % cp, and rank r holds, sequence by sequence, the
positions in [0, length) of its blocks. Every sequence starts at position 0.

One spawned gloo world of 4 processes runs every default case (cp = 2 and 3 on subgroups of its
first ranks), since starting processes costs more than the cases; ranks save their rows and
the parent compares them with causal attention on the unsharded sequences. A fake ring in
this process checks the schedule: each block is sent on before it is computed on, and the
last is not sent.
"""

from __future__ import annotations

import datetime
import functools
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import workers.ring_attention as ring
from workers.distributed import Collectives, MeshCoords, RingTransfer, pin_interfaces_to_loopback
from workers.ring_attention import RankRows, ring_attention

WORLD = 4
BRUTE_MAX_TOKENS = 512
"""Sequences up to this long get the float64 brute-force oracle (and an lse check)."""


@dataclass(frozen=True)
class Case:
    name: str
    cp: int
    lengths: tuple[int, ...]
    block_size: int
    q_heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    dtype: torch.dtype = torch.float32
    seed: int = 0
    window: int = 0
    """A sliding window: query p sees positions (p - window, p]; 0: every earlier one."""
    softcap: float = 0.0
    """Scaled scores s become softcap * tanh(s / softcap); 0: as they are."""


CASES = [
    Case("cp1-two-seqs", 1, (37, 5), 4),
    Case("cp2-mixed", 2, (1, 5, 37, 100), 4, kv_heads=1),
    Case("cp2-block16", 2, (100, 37), 16),
    Case("cp3-mixed", 3, (5, 100, 1, 37), 4),
    Case("cp3-rank0-only", 3, (3,), 16),
    Case("cp3-seq-on-one-rank", 3, (3, 40), 16, kv_heads=1),
    Case("cp4-mixed", 4, (37, 1, 100, 5), 4, kv_heads=1),
    Case("cp4-block16", 4, (100, 70), 16),
    Case("cp4-fp64", 4, (37, 20), 4, dtype=torch.float64),
    Case("cp4-bf16", 4, (100,), 4, dtype=torch.bfloat16),
    Case("cp2-8k", 2, (8192,), 64, q_heads=2, kv_heads=1, head_dim=32),
    Case("cp2-window", 2, (1, 37, 100), 4, window=11),
    Case("cp3-window-cap", 3, (100, 5), 4, kv_heads=1, window=20, softcap=2.0),
    Case("cp4-cap", 4, (37, 64), 16, softcap=1.5),
]
SLOW_CASES = [
    Case(f"cp{cp}-{n // 1024}k", cp, (n,), 64, q_heads=2, kv_heads=1, head_dim=32)
    for n in (16384, 32768)
    for cp in (2, 4)
]


# -- layout and inputs (computed identically in the parent and every rank) -------------------


def rank_rows(lengths: tuple[int, ...], block_size: int, cp: int, rank: int) -> list[torch.Tensor]:
    """Per sequence, the positions rank `rank` holds, in order."""
    rows = []
    for length in lengths:
        pos = torch.arange(length, dtype=torch.int64)
        rows.append(pos[(pos // block_size) % cp == rank])
    return rows


def layouts(case: Case) -> list[RankRows]:
    out = []
    for r in range(case.cp):
        segments, start = [], 0
        per_seq = rank_rows(case.lengths, case.block_size, case.cp, r)
        for s, pos in enumerate(per_seq):
            if pos.numel():
                segments.append((s, start, pos.numel()))
                start += pos.numel()
        out.append(RankRows(positions=torch.cat(per_seq), segments=segments))
    return out


def full_inputs(case: Case) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per sequence, its unsharded (q, k, v), from the case's seed."""
    gen = torch.Generator().manual_seed(case.seed)
    seqs = []
    for n in case.lengths:
        q, k, v = (
            torch.randn(n, h, case.head_dim, generator=gen, dtype=torch.float64).to(case.dtype)
            for h in (case.q_heads, case.kv_heads, case.kv_heads)
        )
        seqs.append((q, k, v))
    return seqs


def local_inputs(case: Case, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank `rank`'s packed (q, k, v) rows."""
    rows = rank_rows(case.lengths, case.block_size, case.cp, rank)
    seqs = full_inputs(case)
    return (
        torch.cat([seq[0][pos] for seq, pos in zip(seqs, rows)]),
        torch.cat([seq[1][pos] for seq, pos in zip(seqs, rows)]),
        torch.cat([seq[2][pos] for seq, pos in zip(seqs, rows)]),
    )


def scale_of(case: Case) -> float:
    return 1.0 / math.sqrt(case.head_dim)


# -- the spawned world --------------------------------------------------------------------------


def _worker(rank: int, world: int, port: int, cases: list[Case], out_dir: str) -> None:
    """Rank `rank` of a gloo world: runs every case whose cp group includes it, saves its rows."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    pin_interfaces_to_loopback("127.0.0.1")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        # Every rank creates every group, in the same order.
        groups = {cp: dist.new_group(list(range(cp))) for cp in sorted({c.cp for c in cases})}
        results = {}
        for case in cases:
            if rank >= case.cp:
                continue
            comm = Collectives(
                MeshCoords(tp_rank=0, tp_size=1, cp_rank=rank, cp_size=case.cp),
                tp_group=None,
                cp_group=groups[case.cp] if case.cp > 1 else None,
            )
            q, k, v = local_inputs(case, rank)
            results[case.name] = ring_attention(
                q, k, v, layouts(case), comm, scale_of(case), case.window, case.softcap
            )
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # The results are on disk: skip the interpreter's teardown of torch, about a second of CPU
    # per process, which a few processes on two cores serialize.
    os._exit(0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


Results = dict[str, list[tuple[torch.Tensor, torch.Tensor]]]


def run_world(cases: list[Case], world: int, out_dir: Path) -> Results:
    """Every case's (out, lse) per cp rank, from one spawned gloo world."""
    mp.spawn(_worker, args=(world, _free_port(), cases, str(out_dir)), nprocs=world, join=True)
    per_rank = [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]
    return {c.name: [per_rank[r][c.name] for r in range(c.cp)] for c in cases}


@pytest.fixture(scope="module")
def default_results(tmp_path_factory: pytest.TempPathFactory) -> Results:
    return run_world(CASES, WORLD, tmp_path_factory.mktemp("ring"))


# -- oracle and comparison ----------------------------------------------------------------------


def causal_oracle(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal attention of one sequence: float64 brute force (with lse) when short, else fp32
    SDPA (lse None; no window, no cap)."""
    group = q.shape[1] // k.shape[1]
    if q.shape[0] <= BRUTE_MAX_TOKENS:
        q64, k64, v64 = (x.double().transpose(0, 1) for x in (q, k, v))  # (heads, n, d)
        k64, v64 = k64.repeat_interleave(group, 0), v64.repeat_interleave(group, 0)
        scores = q64 @ k64.transpose(1, 2) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        future = torch.ones(q.shape[0], q.shape[0], dtype=torch.bool).triu(1)
        if window:  # (keys window or more positions back)
            future |= torch.ones_like(future).tril(-window)
        scores = scores.masked_fill(future, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v64
        return out.transpose(0, 1), torch.logsumexp(scores, dim=-1).transpose(0, 1)
    assert not window and not softcap, "windowed or capped cases must be brute-force sized"
    qh, kh, vh = (x.float().transpose(0, 1)[None] for x in (q, k, v))  # (1, heads, n, d)
    out = torch.nn.functional.scaled_dot_product_attention(
        qh,
        kh,
        vh,
        is_causal=True,
        scale=scale,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1), None


@functools.cache
def sequence_oracle(case: Case, seq: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The oracle of one sequence of a case, computed once for all its ranks."""
    return causal_oracle(*full_inputs(case)[seq], scale_of(case), case.window, case.softcap)


def tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2}[dtype]


def check_rank(case: Case, rank: int, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Rank `rank`'s (out, lse) against the oracle on each of its sequences."""
    lay = layouts(case)[rank]
    n = lay.positions.numel()
    assert out.shape == (n, case.q_heads, case.head_dim) and out.dtype == case.dtype
    assert lse.shape == (n, case.q_heads)
    assert lse.dtype == torch.promote_types(case.dtype, torch.float32)
    atol = tolerance(case.dtype)
    for s, start, count in lay.segments:
        want_out, want_lse = sequence_oracle(case, s)
        pos = lay.positions[start : start + count]
        err = (out[start : start + count].double() - want_out[pos].double()).abs().max().item()
        assert err < atol, f"{case.name}: seq {s} rank {rank} out off by {err:.3g}"
        if want_lse is not None:
            lerr = (lse[start : start + count].double() - want_lse[pos]).abs().max().item()
            assert lerr < atol, f"{case.name}: seq {s} rank {rank} lse off by {lerr:.3g}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_ring_matches_causal_attention(case: Case, default_results: Results) -> None:
    for rank, (out, lse) in enumerate(default_results[case.name]):
        check_rank(case, rank, out, lse)


def test_rank_without_rows_takes_part() -> None:
    """The 3-token, block 16, cp 3 case leaves ranks 1 and 2 empty (they still join the ring)."""
    case = next(c for c in CASES if c.name == "cp3-rank0-only")
    assert [lay.positions.numel() for lay in layouts(case)] == [3, 0, 0]


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=lambda c: c.name)
def test_ring_long_context(case: Case, tmp_path: Path) -> None:
    for rank, (out, lse) in enumerate(run_world([case], case.cp, tmp_path)[case.name]):
        check_rank(case, rank, out, lse)


# -- the schedule, with a fake ring in this process --------------------------------------------


class FakeRing(Collectives):
    """cp rank `rank` of a ring whose other ranks are simulated from the full inputs.

    Shift i must send the block of rank (rank - i) % cp and delivers that of rank
    (rank - i - 1) % cp, as the real ring would; sends and receives go to `log`.
    """

    def __init__(self, case: Case, rank: int, log: list[str]):
        super().__init__(MeshCoords(cp_rank=rank, cp_size=case.cp))
        n_max = max(lay.positions.numel() for lay in layouts(case))
        self.blocks = [
            [ring._pad(x, n_max) for x in local_inputs(case, r)[1:]] for r in range(case.cp)
        ]
        self.log = log
        self.shifts = 0

    def cp_ring_shift(self, tensors: list[torch.Tensor]) -> RingTransfer:
        held = (self.cp_rank - self.shifts) % self.cp_size
        prev = (held - 1) % self.cp_size
        assert all(torch.equal(t, b) for t, b in zip(tensors, self.blocks[held], strict=True))
        self.log.append(f"send {held}")
        self.shifts += 1
        log = self.log

        class Transfer(RingTransfer):
            def wait(self) -> list[torch.Tensor]:
                log.append(f"recv {prev}")
                return super().wait()

        return Transfer([], [b.clone() for b in self.blocks[prev]])


def test_schedule_overlaps_transfer_with_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each held block is sent on before it is computed on; the last one is not sent."""
    case = Case("fake-cp3", 3, (37, 20), 4)
    rank = 1
    log: list[str] = []
    real = ring.position_attention

    def logged(
        q: torch.Tensor,
        q_pos: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_pos: torch.Tensor,
        scale: float,
        keys_sorted: bool = False,
        window: int = 0,
        softcap: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Positions identify the rank whose keys these are (each block has one owner).
        owner = int(k_pos[0]) // case.block_size % case.cp
        if log[-1:] != [f"compute {owner}"]:
            log.append(f"compute {owner}")
        return real(q, q_pos, k, v, k_pos, scale, keys_sorted, window, softcap)

    monkeypatch.setattr(ring, "position_attention", logged)
    q, k, v = local_inputs(case, rank)
    out, lse = ring_attention(q, k, v, layouts(case), FakeRing(case, rank, log), scale_of(case))
    assert log == [
        "send 1", "compute 1", "recv 0",
        "send 0", "compute 0", "recv 2",
        "compute 2",
    ]  # fmt: skip
    check_rank(case, rank, out, lse)


def test_single_rank_without_process_group() -> None:
    """cp = 1 never touches torch.distributed: plain local causal attention."""
    case = Case("cp1-local", 1, (37, 5, 1), 4, kv_heads=1)
    q, k, v = local_inputs(case, 0)
    out, lse = ring_attention(q, k, v, layouts(case), Collectives(MeshCoords()), scale_of(case))
    check_rank(case, 0, out, lse)
