"""Graphed decode steps: batch padding, the scratch block and buffer reuse.

Without CUDA the graphs are emulated (`DecodeGraphs(emulate=True)`: replay re-runs the forward
over the same fixed buffers), which checks everything but the capture itself; on a GPU
`tests/test_gpu_oracle.py` runs the real graphs against HF transformers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch

from dist_runtime import CacheConfig, Runtime, SamplingParams, SchedulerConfig
from tests.helpers.outputs import assert_same_outputs
from workers.cuda_graph import DecodeGraphs, capture_sizes
from workers.layers.attention import AttentionMetadata
from workers.model_runner import ModelRunner

KW: dict[str, Any] = dict(
    device="cpu",
    dtype="float32",
    session_len=96,
    cache=CacheConfig(block_size=4, num_blocks=160),
    scheduler=SchedulerConfig(max_num_seqs=6),
)


def test_capture_sizes() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 32, 40]


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(4, 512, (n,), generator=gen).tolist() for n in (9, 30, 3, 17, 12)]


def _run(
    folder: Path,
    emulate: bool,
    monkeypatch: pytest.MonkeyPatch,
    logprobs: int = 2,
    sampled: bool = False,
    **kw: Any,
) -> tuple[list[Any], Any]:
    """logprobs 0: greedy rows take the graphs' own greedy pick; sampled: one request draws
    (temperature 0.8) from the graphs' logits beside the greedy ones."""
    mode = "emulate" if emulate else None
    monkeypatch.setattr(ModelRunner, "_decode_graph_mode", lambda self: mode)
    # Different lengths: sequences finish at different steps, so the batch shrinks from 5
    # (graph of 6, one padding row) to 1, and rows a larger step used become padding again.
    params = [
        SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True, logprobs=logprobs)
        for n in (20, 5, 12, 1, 16)
    ]
    if sampled:
        params[2] = SamplingParams(
            max_new_tokens=12, temperature=0.8, seed=3, ignore_eos=True, logprobs=logprobs
        )
    with Runtime(model=str(folder), **{**KW, **kw}) as rt:
        outs = rt.generate(_prompts(), params)
        runner = rt.engine.executor.worker.runner  # type: ignore[union-attr]
        return outs, runner.graphs


@pytest.mark.parametrize(
    "segments, logprobs, sampled", [(1, 2, False), (1, 0, False), (2, 0, True)]
)
def test_emulated_graphs_equal_eager(
    tiny_llama_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    segments: int,
    logprobs: int,
    sampled: bool,
) -> None:
    """segments 2: each graph is cut into two runs of layers (embedding with the first, the
    final norm and the LM head with the last), replayed one after the other. logprobs 0: the
    tokens come from the graphs' greedy pick; with top-k lists or a sampling request in the
    batch, from their logits."""
    import workers.model_runner as model_runner

    monkeypatch.setenv("DIST_RUNTIME_DECODE_GRAPH_SEGMENTS", str(segments))
    # Steps one at a time: the path counted here (launched ahead: test_async_decode.py).
    monkeypatch.setenv("DIST_RUNTIME_ASYNC_DECODE", "0")
    picks: list[int] = []
    greedy_tokens = model_runner.greedy_tokens

    def counted(picked: torch.Tensor, seq_ids: list[int]) -> Any:
        picks.append(len(seq_ids))
        return greedy_tokens(picked, seq_ids)

    monkeypatch.setattr(model_runner, "greedy_tokens", counted)
    eager, none = _run(tiny_llama_dir, False, monkeypatch, logprobs, sampled)
    assert not picks  # eager steps sample from their own logits
    graphed, graphs = _run(tiny_llama_dir, True, monkeypatch, logprobs, sampled)
    # The graphs' greedy pick serves every step of plain greedy rows (none with top-k lists;
    # with the sampling request, only the steps after it finished).
    assert (len(picks) == 19) if logprobs == 0 and not sampled else (len(picks) < 19)
    assert logprobs != 0 or picks
    assert none is None
    assert graphs is not None and graphs.sizes == [1, 2, 4, 6]
    assert (graphs.stages is None) == (segments == 1)
    assert graphs.stages is None or len(graphs.stages) == segments
    assert graphs.num_replays == 19  # one replay per decode step: the longest has 20 tokens
    assert_same_outputs(eager, graphed, atol=1e-4)


@pytest.mark.parametrize("policy", [8, 4])
def test_emulated_graphs_over_a_quantized_cache(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, policy: int
) -> None:
    """Graphed decode steps read and write the int8/int4 codes and their scales like eager ones
    (padding rows write only the scratch block of both). The padded batch sums in another
    order (~1e-6); a code that sits on a rounding boundary can then round the other way (one
    quantization step), so logprobs agree to 1e-3 here, not 1e-4."""
    cache = {"quant_policy": policy}
    eager, _ = _run(tiny_llama_dir, False, monkeypatch, cache=cache)
    graphed, graphs = _run(tiny_llama_dir, True, monkeypatch, cache=cache)
    assert graphs is not None and graphs.num_replays == 19
    assert_same_outputs(eager, graphed, atol=1e-3)


def test_emulated_graphs_with_per_request_rope(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dynamic NTK: a prompt past max_position_embeddings (32) decodes with its own RoPE base
    through the graphs that read per-token RoPE frequencies; after it finishes, the short
    request's steps use the plain graphs. Both equal eager decoding."""
    from dist_runtime.formats.random_checkpoint import write_random_checkpoint
    from tests.conftest import TINY_SHAPES

    folder = write_random_checkpoint(
        tmp_path / "dyn",
        architecture="llama",
        **dict(TINY_SHAPES, max_position_embeddings=32, seed=5, with_tokenizer=False),
        rope_scaling={"type": "dynamic", "factor": 2.0},
    )
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, 512, (n,), generator=gen).tolist() for n in (50, 9)]
    params = [
        SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True, logprobs=1)
        for n in (6, 14)
    ]
    runs = {}
    for mode in (None, "emulate"):
        monkeypatch.setattr(ModelRunner, "_decode_graph_mode", lambda self, m=mode: m)
        with Runtime(model=str(folder), **dict(KW, session_len=80)) as rt:
            runs[mode] = rt.generate(prompts, params)
            graphs = rt.engine.executor.worker.runner.graphs  # type: ignore[union-attr]
    assert graphs is not None and graphs.rope_half == 4
    assert graphs.num_rope_replays == 5 and graphs.num_replays == 13
    assert_same_outputs(runs[None], runs["emulate"], atol=1e-4)


def _meta(**kw: Any) -> AttentionMetadata:
    base: dict[str, Any] = dict(
        slot_mapping=torch.zeros(2, dtype=torch.int64),
        block_tables=torch.zeros(2, 3, dtype=torch.int32),
        cu_seqlens_q=torch.arange(3),
        context_lens=torch.ones(2, dtype=torch.int64),
        is_decode=True,
    )
    base.update(kw)
    return AttentionMetadata(**base)


def _small_graphs(forward: Any, **kw: Any) -> DecodeGraphs:
    """Emulated graphs for batches up to 4 over 3-block tables (scratch block 9)."""
    return DecodeGraphs(
        forward,
        max_batch=4,
        max_blocks=3,
        block_size=4,
        scratch_block=9,
        device=torch.device("cpu"),
        emulate=True,
        **kw,
    )


def test_padding_rows_touch_only_the_scratch_block() -> None:
    """Rows past the step's batch write the scratch slot and see only it, also after a larger
    step left real values in them; a smaller graph leaves rows past its size alone."""
    seen: list[tuple[torch.Tensor, ...]] = []

    def forward(ids: torch.Tensor, pos: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        seen.append(
            tuple(t.clone() for t in (ids, meta.slot_mapping, meta.context_lens, meta.block_tables))
        )
        return torch.stack([ids, pos], dim=1).float()

    graphs = _small_graphs(forward)
    graphs.capture()
    assert len(seen) == 3  # sizes 4, 2, 1
    four = _meta(
        slot_mapping=torch.tensor([1, 2, 3, 4]),
        block_tables=torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]], dtype=torch.int32),
        cu_seqlens_q=torch.arange(5),
        context_lens=torch.tensor([3, 4, 5, 6]),
    )
    ids = torch.tensor([5, 6, 7, 8])
    out = graphs.run(ids, ids + 100, four)
    assert out.tolist() == [[5, 105], [6, 106], [7, 107], [8, 108]]
    three = _meta(
        slot_mapping=four.slot_mapping[:3],
        block_tables=four.block_tables[:3],
        cu_seqlens_q=torch.arange(4),
        context_lens=four.context_lens[:3],
    )
    out = graphs.run(ids[:3], ids[:3] + 100, three)  # the graph of 4, one padding row
    assert out.tolist() == [[5, 105], [6, 106], [7, 107]]
    row_ids, slots, lens, tables = seen[-1]
    assert row_ids.tolist() == [5, 6, 7, 0]
    assert slots.tolist() == [1, 2, 3, 36] and lens.tolist() == [3, 4, 5, 1]
    assert tables[3].tolist() == [9, 9, 9] and tables[2].tolist()[:2] == [4, 5]
    one = _meta(
        slot_mapping=torch.tensor([8]),
        block_tables=torch.tensor([[2]], dtype=torch.int32),
        cu_seqlens_q=torch.arange(2),
        context_lens=torch.tensor([2]),
    )
    out = graphs.run(ids[:1], ids[:1] + 1, one)  # the graph of 1: no padding
    assert out.tolist() == [[5, 6]]
    row_ids, slots, lens, tables = seen[-1]
    assert slots.tolist() == [8] and lens.tolist() == [2] and tables.shape == (1, 3)
    assert graphs.slot_mapping.tolist() == [8, 2, 3, 36]  # rows 1-3 left to the next step
    assert graphs.num_replays == 3


def test_staged_steps_pad_like_device_steps() -> None:
    """`run_staged` (host lists, one copy of all four input rows): a smaller step after a larger
    one sees padding in every row past its batch, in the inputs, the block tables and the RoPE
    frequencies, whichever of the two staging buffers it fills."""
    seen: list[tuple[torch.Tensor, ...]] = []

    def forward(ids: torch.Tensor, pos: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if meta.rope_inv_freq is None:  # the plain graphs (captured, never replayed here)
            return torch.stack([ids, pos], dim=1).float()
        seen.append(
            tuple(
                t.clone()
                for t in (
                    ids,
                    pos,
                    meta.slot_mapping,
                    meta.context_lens,
                    meta.block_tables,
                    meta.rope_inv_freq,
                )
            )
        )
        return torch.stack([ids, pos], dim=1).float()

    graphs = _small_graphs(forward, rope_half=2)
    graphs.capture()
    inv = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    tables = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]], dtype=torch.int32)
    rows = ([5, 6, 7, 8], [105, 106, 107, 108], [1, 2, 3, 4], [3, 4, 5, 6])
    out = graphs.run_staged(rows, list(tables), inv)
    assert out.tolist() == [[5, 105], [6, 106], [7, 107], [8, 108]]
    for step, n in enumerate((3, 1, 2)):  # both staging buffers, each after a larger step
        staged = tuple(r[:n] for r in rows)
        ragged = [tables[i, : 1 + i % 2] for i in range(n)]  # tables of different lengths
        out = graphs.run_staged(staged, ragged, inv[:n])  # type: ignore[arg-type]
        assert out.tolist() == [[5 + i, 105 + i] for i in range(n)], step
        ids, pos, slots, lens, seen_tables, seen_inv = seen[-1]
        assert all(torch.equal(seen_tables[i, : t.shape[0]], t) for i, t in enumerate(ragged))
        b = ids.shape[0]
        assert b == {3: 4, 1: 1, 2: 2}[n]
        assert ids.tolist() == rows[0][:n] + [0] * (b - n)
        assert pos.tolist() == rows[1][:n] + [0] * (b - n)
        assert slots.tolist() == rows[2][:n] + [36] * (b - n)
        assert lens.tolist() == rows[3][:n] + [1] * (b - n)
        assert seen_tables[n:].eq(9).all() and seen_inv[n:].eq(0).all()
        assert torch.equal(seen_inv[:n], inv[:n])
    assert graphs.inputs[:, 2:].tolist() == [[0, 0], [0, 0], [36, 36], [1, 1]]
    assert graphs.num_replays == 4 and graphs.num_rope_replays == 4


def test_graphs_take_only_plain_decode_steps() -> None:
    graphs = _small_graphs(lambda ids, pos, meta: ids[:, None].float())
    assert not graphs.can_run(_meta(), 2)  # nothing captured yet
    graphs.capture()
    assert graphs.can_run(_meta(), 2)
    assert not graphs.can_run(_meta(is_decode=False), 2)
    assert not graphs.can_run(_meta(rope_inv_freq=torch.ones(2, 4)), 2)  # no RoPE graphs
    assert not graphs.can_run(_meta(), 5)
    assert not graphs.can_run(_meta(block_tables=torch.zeros(2, 4, dtype=torch.int32)), 2)


def test_decode_graphs_switch(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DIST_RUNTIME_DECODE_GRAPHS=emulate turns the graph path on without CUDA (enforce_eager
    still wins); a bad value is refused with the accepted ones; the worker takes the driver's
    switches (`WORKER_ENV`) over its own environment."""
    from dist_runtime.config import (
        CPU_ATTENTION_ENV,
        DECODE_GRAPHS_ENV,
        WORKER_ENV,
        RuntimeConfig,
        decode_graphs_choice,
    )
    from workers.worker import Worker

    monkeypatch.setenv(DECODE_GRAPHS_ENV, "emulate")
    kw = {**KW, "scheduler": SchedulerConfig(max_num_seqs=2)}
    for eager in (False, True):
        with Runtime(model=str(tiny_llama_dir), enforce_eager=eager, **kw) as rt:
            rt.generate([[5, 6, 7]], SamplingParams(max_new_tokens=4, ignore_eos=True))
            (stats,) = rt.worker_steps()
        assert stats["steps"] == 4
        assert stats["graph_replays"] == (0 if eager else 3)
    monkeypatch.setenv(DECODE_GRAPHS_ENV, "cuda")
    with pytest.raises(ValueError, match="DIST_RUNTIME_DECODE_GRAPHS='cuda' is not valid"):
        decode_graphs_choice()
    # A worker takes the driver's switches: those the driver set, and none of its own.
    for key in WORKER_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv(CPU_ATTENTION_ENV, "torch")
    config = RuntimeConfig(model=str(tiny_llama_dir), **KW)
    Worker(msgpack.packb(config.to_dict()), 0, env={DECODE_GRAPHS_ENV: "emulate"})
    assert decode_graphs_choice() == "emulate"
    assert CPU_ATTENTION_ENV not in os.environ


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_bad_segment_count_is_named(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    from dist_runtime.config import decode_graph_segments

    monkeypatch.setenv("DIST_RUNTIME_DECODE_GRAPH_SEGMENTS", value)
    with pytest.raises(ValueError, match=f"DIST_RUNTIME_DECODE_GRAPH_SEGMENTS='{value}'"):
        decode_graph_segments()
    monkeypatch.setenv("DIST_RUNTIME_DECODE_GRAPH_SEGMENTS", "")
    assert decode_graph_segments() == 1
