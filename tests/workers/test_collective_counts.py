"""The collective counters report exactly the traffic the decoder's wiring implies.

Per forward of T tokens a tp rank all-reduces (T, hidden) activations once for the
vocab-parallel embedding and twice per layer (attention o_proj and MLP down_proj, both
row-parallel); a step that samples n sequences all-gathers their (n, vocab / tp) fp32 logit
slices in the LM head. At tp=1 every collective is a no-op and counts nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dist_runtime import Runtime, SamplingParams
from dist_runtime.formats.random_checkpoint import write_random_checkpoint
from workers.distributed import COLLECTIVE_OPS

TP = 3
HIDDEN = 96
LAYERS = 2
VOCAB = 500
"""Not a multiple of tp: every rank's LM-head slice is padded to ceil(500 / 3) = 167 rows."""
FP32 = 4
PROMPT_LENS = (21, 9)
DECODE_STEPS = 4
PARAMS = SamplingParams(max_new_tokens=DECODE_STEPS + 1, temperature=0.0, ignore_eos=True)
"""The prefill step samples the first new token; each decode step one more."""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(
        tmp_path_factory.mktemp("tp3-micro"),
        architecture="llama",
        seed=3,
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=192,
        num_layers=LAYERS,
        num_heads=6,
        num_kv_heads=3,
    )


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(4, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def _generate(folder: Path, tp: int) -> tuple[list[dict[str, dict[str, float]]], Any, int]:
    """(per-rank counters after the run, counters after a reset, steps run)."""
    with Runtime(
        model=str(folder),
        tp=tp,
        session_len=64,
        device="cpu",
        dtype="float32",
        cache={"enable_prefix_caching": False},
    ) as rt:
        executor = rt.engine.executor
        assert executor is not None
        assert all(s[op]["calls"] == 0 for s in executor.comm_stats() for op in COLLECTIVE_OPS)
        outs = rt.generate(_prompts(), PARAMS)
        assert [len(o.token_ids) for o in outs] == [DECODE_STEPS + 1] * len(PROMPT_LENS)
        stats = executor.comm_stats(reset=True)
        after_reset = executor.comm_stats()
        steps = rt.engine.num_steps
    return stats, after_reset, steps


def test_tp1_counts_no_communication(checkpoint: Path) -> None:
    stats, _, _ = _generate(checkpoint, tp=1)
    assert len(stats) == 1
    for op in COLLECTIVE_OPS:
        assert stats[0][op] == {"calls": 0, "bytes": 0, "seconds": 0.0}, op


def test_tp3_counts_match_the_wiring(ray_cluster: Any, checkpoint: Path) -> None:
    stats, after_reset, steps = _generate(checkpoint, tp=TP)
    batch = len(PROMPT_LENS)
    # One step prefills both prompts together (they fit the token budget), then each decode
    # step runs one token per sequence.
    assert steps == 1 + DECODE_STEPS
    step_tokens = [sum(PROMPT_LENS)] + [batch] * DECODE_STEPS  # [30, 2, 2, 2, 2]
    reduces_per_forward = 1 + 2 * LAYERS  # embedding + (o_proj, down_proj) per layer = 5
    expected_reduce_calls = reduces_per_forward * len(step_tokens)  # 5 * 5 = 25
    # Each all-reduce of a forward carries that forward's (tokens, hidden) fp32 activations:
    # 5 * (30 + 4 * 2) * 96 * 4 = 72960 bytes.
    expected_reduce_bytes = reduces_per_forward * sum(step_tokens) * HIDDEN * FP32
    assert expected_reduce_calls == 25 and expected_reduce_bytes == 72_960
    # Every step samples both sequences: one all-gather of a (2, 167) fp32 slice per step.
    rows_per_rank = -(-VOCAB // TP)
    expected_gather_bytes = len(step_tokens) * batch * rows_per_rank * FP32  # 5 * 2 * 167 * 4
    assert expected_gather_bytes == 6_680

    assert len(stats) == TP
    for rank, s in enumerate(stats):
        reduce, gather = s["tp_all_reduce"], s["tp_all_gather"]
        assert reduce["calls"] == expected_reduce_calls, rank
        assert reduce["bytes"] == expected_reduce_bytes, rank
        assert gather["calls"] == len(step_tokens), rank
        assert gather["bytes"] == expected_gather_bytes, rank
        assert reduce["seconds"] > 0 and gather["seconds"] > 0, rank
        for op in ("cp_all_gather", "cp_all_to_all", "cp_ring_shift"):  # cp = 1
            assert s[op] == {"calls": 0, "bytes": 0, "seconds": 0.0}, (rank, op)
    for s in after_reset:
        assert all(s[op] == {"calls": 0, "bytes": 0, "seconds": 0.0} for op in COLLECTIVE_OPS)
