"""Vocab-parallel embedding and LM head: each tp rank owns a contiguous slice of the vocab."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.cpu_gemm import CpuLinearWeight, pack_cpu_weight
from kernels.gemv import gemv_available, gemv_fits, gemv_triton
from workers.distributed import Collectives


def vocab_range(vocab_size: int, tp_rank: int, tp_size: int) -> tuple[int, int, int]:
    """(start, stop, rows per rank): the vocab is padded up to a multiple of tp_size."""
    per_rank = -(-vocab_size // tp_size)
    start = min(tp_rank * per_rank, vocab_size)
    return start, min(start + per_rank, vocab_size), per_rank


class VocabParallelEmbedding(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        hidden: int,
        dtype: torch.dtype,
        device: torch.device,
        comm: Collectives,
    ):
        super().__init__()
        self.comm = comm
        self.vocab_size = vocab_size
        self.start, self.stop, per_rank = vocab_range(vocab_size, comm.tp_rank, comm.tp_size)
        # Padding rows stay zero so a padded LM head produces logits that are sliced away.
        self.weight = nn.Parameter(
            torch.zeros(per_rank, hidden, dtype=dtype, device=device), requires_grad=False
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.comm.tp_size == 1:
            return F.embedding(ids, self.weight)
        is_local = (ids >= self.start) & (ids < self.stop)
        local = torch.where(is_local, ids - self.start, torch.zeros_like(ids))
        out = F.embedding(local, self.weight) * is_local[:, None].to(self.weight.dtype)
        return self.comm.tp_all_reduce(out)


class ParallelLMHead(nn.Module):
    """Logits over the full vocab, gathered from every tp rank's slice: (tokens, vocab) fp32."""

    def __init__(
        self,
        vocab_size: int,
        hidden: int,
        dtype: torch.dtype,
        device: torch.device,
        comm: Collectives,
        tied: VocabParallelEmbedding | None = None,
    ):
        super().__init__()
        self.comm = comm
        self.vocab_size = vocab_size
        self.start, self.stop, per_rank = vocab_range(vocab_size, comm.tp_rank, comm.tp_size)
        self.tied = tied
        self.weight = (
            None
            if tied is not None
            else nn.Parameter(
                torch.zeros(per_rank, hidden, dtype=dtype, device=device), requires_grad=False
            )
        )

    packed: CpuLinearWeight | None = None

    def finalize(self) -> None:
        """After loading: on CPU, pack the head (`kernels/cpu_gemm.py`). A tied head gets its
        own packed copy (the embedding keeps the plain rows it looks up)."""
        weight = self.tied.weight if self.tied is not None else self.weight
        assert weight is not None
        self.packed = pack_cpu_weight(weight.data)
        if self.packed is not None and self.tied is None:
            self.weight = None
        self.gemv = self.packed is None and gemv_available(weight)

    gemv: bool = False
    """Decode-sized batches run the Triton GEMV (`kernels/gemv.py`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            logits = self.packed.matmul(x).float()
        else:
            weight = self.tied.weight if self.tied is not None else self.weight
            assert weight is not None
            if self.gemv and gemv_fits(x):
                logits = gemv_triton(x, weight).float()
            else:
                logits = F.linear(x, weight).float()  # (tokens, vocab_per_rank)
        return self.comm.tp_all_gather(logits, dim=-1)[:, : self.vocab_size]
