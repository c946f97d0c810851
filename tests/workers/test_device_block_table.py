"""Block tables kept on the device (`workers/model_runner.py: DeviceBlockTable`): appends that
cross the growth points keep every id, and a step's padded table equals the one rebuilt from
the sequences' lists, at batch 1 and for sequences of different lengths."""

from __future__ import annotations

from pathlib import Path

import torch

from dist_runtime.config import RuntimeConfig
from dist_runtime.formats.random_checkpoint import write_random_checkpoint
from dist_runtime.protocol import SamplingSpec, SeqStep
from workers.model_runner import DeviceBlockTable
from workers.scoring import Scorer


def test_appends_across_growth_keep_every_id() -> None:
    table = DeviceBlockTable(torch.device("cpu"))
    want: list[int] = []
    for n in (1, 0, 63, 1, 1, 200, 7):  # crosses the 64 and 128 capacities and a big jump
        blocks = list(range(len(want) * 3, len(want) * 3 + n))
        table.extend(blocks)
        want += blocks
        assert table.view().tolist() == want
    assert table.view().dtype == torch.int32 and table.buf.numel() >= len(want)


def test_step_tables_equal_the_rebuilt_ones(tmp_path: Path) -> None:
    folder = write_random_checkpoint(tmp_path / "m", num_layers=1)
    config = RuntimeConfig(model=str(folder), session_len=512, device="cpu")
    scorer = Scorer(config, max_tokens=4096)
    runner = scorer.runner
    spec = SamplingSpec(
        temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, seed=0, logprobs=-1
    )
    try:
        lengths = {0: 37, 1: 300, 2: 16}  # tokens already cached per sequence
        next_block = 0
        for seq_id, n in lengths.items():
            blocks = list(range(next_block, next_block + n // 16 + 1))
            next_block += len(blocks) + 5
            first = SeqStep(
                seq_id=seq_id,
                token_ids=[1],
                start_pos=n,
                new_blocks=blocks,
                is_new=True,
                sample=True,
                sampling=spec,
            )
            runner._update_state(first)
        steps = [
            SeqStep(seq_id=i, token_ids=[1], start_pos=n, new_blocks=[], is_new=False, sample=True)
            for i, n in lengths.items()
        ]
        for seqs in (steps[:1], steps):
            got = runner._prepare(seqs)[2].block_tables
            lists = [runner.seqs[s.seq_id].block_table for s in seqs]
            width = max(map(len, lists))
            want = torch.tensor([t + [0] * (width - len(t)) for t in lists], dtype=torch.int32)
            assert torch.equal(got, want)
    finally:
        scorer.close()
