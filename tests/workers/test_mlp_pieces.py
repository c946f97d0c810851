"""On CPU a long chunk's MLP runs in row pieces (`workers/models/decoder.py: MLP`): the hidden
states equal the whole-chunk MLP's, each piece's gate_up output stays under MLP_PIECE_BYTES,
and the row-parallel layer still reduces once per layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import workers.models.decoder as decoder_module
from dist_runtime.config import CacheConfig, RuntimeConfig
from workers.distributed import Collectives, MeshCoords
from workers.layers.attention import AttentionMetadata
from workers.layers.linear import RowParallelLinear
from workers.model_runner import ModelRunner

TOKENS = 300


def _prefill(runner: ModelRunner, ids: torch.Tensor) -> torch.Tensor:
    n = ids.shape[0]
    assert runner.kv_cache is not None
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n),
        block_tables=torch.arange(-(-n // 16), dtype=torch.int32)[None],
        cu_seqlens_q=torch.tensor([0, n]),
        context_lens=torch.tensor([n]),
    )
    with torch.inference_mode():
        return runner.model(ids, torch.arange(n), meta, runner.kv_cache.layers).clone()


def test_pieces_give_the_whole_chunk_result(
    tiny_internlm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = RuntimeConfig(
        model=str(tiny_internlm2_dir),
        device="cpu",
        dtype="float32",
        cache=CacheConfig(num_blocks=32, block_size=16),
    )
    runner = ModelRunner(config, Collectives(MeshCoords()))
    runner.allocate_kv_cache(32)
    ids = torch.randint(4, 500, (TOKENS,), generator=torch.Generator().manual_seed(0))
    whole = _prefill(runner, ids)

    widths: list[int] = []
    reduces: list[int] = []
    real_gate_up = decoder_module.act_and_mul
    real_reduce = RowParallelLinear.reduce

    def gate_up_spy(x: torch.Tensor, act: str = "silu") -> torch.Tensor:
        widths.append(x.shape[0] * x.shape[1] * x.element_size())
        return real_gate_up(x, act)

    def reduce_spy(self: RowParallelLinear, partial: torch.Tensor) -> Any:
        reduces.append(partial.shape[0])
        return real_reduce(self, partial)

    monkeypatch.setattr(decoder_module, "act_and_mul", gate_up_spy)
    monkeypatch.setattr(RowParallelLinear, "reduce", reduce_spy)
    inter = runner.model_config.intermediate_size
    piece_bytes = 64 * 2 * inter * 4  # 64 rows a piece: 300 tokens in 5 pieces
    monkeypatch.setattr(decoder_module, "MLP_PIECE_BYTES", piece_bytes)
    pieces = _prefill(runner, ids)
    layers = runner.model_config.num_layers
    assert len(widths) == 5 * layers and max(widths) <= piece_bytes
    # o_proj and down_proj: one reduce each per layer, over every row
    assert reduces == [TOKENS] * (2 * layers)
    torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=1e-5)
