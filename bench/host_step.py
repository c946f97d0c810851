"""Host time of building one decode step's inputs, against the context length.

    python bench/host_step.py                      # b1 and b8, 8K .. 1,048,576 tokens
    python bench/host_step.py --report docs/benchmarks/host_step_cpu_<date>.md

A decode step's kernels read the KV in place, but the host still hands them each sequence's
block table: at 1,048,576 tokens and 16-token blocks that is 65,536 block ids. The baseline
rebuilds the padded table from the Python lists and copies it over on every step (what the
model runner did before); ours appends new block ids to a table kept on the device
(`workers/model_runner.py: DeviceBlockTable`) and only pads the per-sequence views together.
Both are timed alone and as part of `ModelRunner._prepare` (all of a step's inputs; the
rebuilt column swaps the table part) on a 1-layer model whose KV cache holds the longest
context; no forward runs: this is the work between kernels. On a GPU the saved time
is host time the device waits through unless it is hidden behind the previous step.

The cp rows (`--cp`) time a cp > 1 decode step's inputs on cp rank 0 both ways: split over the
ranks as a prefill chunk's are, and replicated as decode steps run now (see the note above
that table).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dist_runtime.config import RuntimeConfig  # noqa: E402
from dist_runtime.formats.random_checkpoint import write_random_checkpoint  # noqa: E402
from dist_runtime.protocol import SamplingSpec, SeqStep  # noqa: E402
from workers.distributed import Collectives, MeshCoords  # noqa: E402
from workers.model_runner import ModelRunner, padded_block_tables  # noqa: E402
from workers.scoring import Scorer  # noqa: E402


def rebuilt_tables(runner: ModelRunner, seqs: list[SeqStep]) -> torch.Tensor:
    """The baseline: the padded table rebuilt from the lists and copied, every step."""
    tables = [runner.seqs[s.seq_id].block_table for s in seqs]
    width = max(len(t) for t in tables)
    padded = [t + [0] * (width - len(t)) for t in tables]
    return torch.tensor(padded, dtype=torch.int32, device=runner.device)


def device_tables(runner: ModelRunner, seqs: list[SeqStep]) -> torch.Tensor:
    """Ours, as `_prepare` builds it: the device-resident tables padded together."""
    return padded_block_tables([runner.seqs[s.seq_id].table for s in seqs])


def _median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def run(
    contexts: list[int], batches: list[int], cps: list[int], reps: int, device: str
) -> tuple[list[str], list[str]]:
    block = 16
    longest = max(batches) * (max(contexts) + 2 * block)
    folder = write_random_checkpoint(
        Path(tempfile.mkdtemp()) / "m",
        num_layers=1,
        hidden_size=64,
        num_heads=2,
        num_kv_heads=1,
        max_position_embeddings=max(contexts) + 64,
    )
    config = RuntimeConfig(model=str(folder), session_len=max(contexts) + 16, device=device)
    scorer = Scorer(config, max_tokens=longest + block)
    runner = scorer.runner
    spec = SamplingSpec(
        temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, seed=0, logprobs=-1
    )
    rows, cp_rows = [], []
    try:
        for batch in batches:
            for ctx in contexts:
                blocks = -(-(ctx + 1) // block)
                seqs = _decode_seqs(runner, spec, batch, ctx, block)
                full = _median_ms(lambda s=seqs: runner._prepare(s), reps)
                got = runner._prepare(seqs)[2].block_tables
                assert torch.equal(got.cpu(), rebuilt_tables(runner, seqs).cpu())
                kept = _median_ms(lambda s=seqs: device_tables(runner, s), reps)
                rebuilt = _median_ms(lambda s=seqs: rebuilt_tables(runner, s), reps)
                rows.append(
                    f"| {batch} | {ctx:,} | {batch * blocks:,} | {rebuilt:.3f} | {kept:.3f} "
                    f"| {full - kept + rebuilt:.3f} | {full:.3f} "
                    f"| {(full - kept + rebuilt) / full:.1f}x |"
                )
                print(rows[-1], flush=True)
        single = runner.comm
        for cp in cps:
            # Only the mesh coordinates matter: building inputs calls no collective.
            runner.comm = Collectives(MeshCoords.from_rank(0, 1, cp))
            for batch in batches:
                for ctx in contexts:
                    seqs = _decode_seqs(runner, spec, batch, ctx, block)
                    _check_cp_inputs(runner, seqs)
                    split = _median_ms(lambda s=seqs: runner._prepare_cp(s), reps)
                    ours = _median_ms(lambda s=seqs: runner._prepare(s), reps)
                    cp_rows.append(
                        f"| {cp} | {batch} | {ctx:,} | {split:.3f} | {ours:.3f} "
                        f"| {split / ours:.1f}x |"
                    )
                    print(cp_rows[-1], flush=True)
        runner.comm = single
    finally:
        scorer.close()
    return rows, cp_rows


def _check_cp_inputs(runner: ModelRunner, seqs: list[SeqStep]) -> None:
    """The replicated inputs name the same local blocks and key counts as the split ones."""
    split = runner._prepare_cp(seqs)[2].cp
    meta = runner._prepare(seqs)[2]
    assert split is not None and meta.cp_decode
    for b, keys in enumerate(split.keys):
        n = keys.blocks.numel()
        assert int(meta.context_lens[b]) == keys.positions.numel()
        assert torch.equal(meta.block_tables[b, :n].long().cpu(), keys.blocks.cpu())


def _decode_seqs(
    runner: ModelRunner, spec: SamplingSpec, batch: int, ctx: int, block: int
) -> list[SeqStep]:
    """`batch` sequences of `ctx` cached tokens registered with the runner, and the SeqSteps of
    their next decode step."""
    runner.seqs.clear()
    blocks = -(-(ctx + 1) // block)
    seqs = []
    for b in range(batch):
        new = list(range(b * blocks, (b + 1) * blocks))
        runner._update_state(
            SeqStep(
                seq_id=b,
                token_ids=[1],
                start_pos=ctx,
                new_blocks=new,
                is_new=True,
                sample=True,
                sampling=spec,
            )
        )
        seqs.append(
            SeqStep(
                seq_id=b, token_ids=[1], start_pos=ctx, new_blocks=[], is_new=False, sample=True
            )
        )
    return seqs


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--contexts", default="8192,32768,131072,1048576")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--cp", default="2,4", help="cp sizes of the cp decode rows ('' for none)")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--device", default="cpu")
    p.add_argument("--report", help="markdown report path")
    args = p.parse_args()
    contexts = [int(x) for x in args.contexts.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    cps = [int(x) for x in args.cp.split(",") if x]
    rows, cp_rows = run(contexts, batches, cps, args.reps, args.device)
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    summary = "host-step: decode input building, ours vs rebuilt tables: " + ", ".join(
        f"b{c[0]} {c[1]} {c[7]}" for c in cells
    )
    if cp_rows:
        cp_cells = [[c.strip() for c in r.strip("|").split("|")] for r in cp_rows]
        summary += "; cp decode, ours vs split: " + ", ".join(
            f"cp{c[0]} b{c[1]} {c[2]} {c[5]}" for c in cp_cells
        )
    print(summary)
    if args.report:
        cp_table = ""
        if cp_rows:
            cp_table = (
                "\n\n" + CP_NOTE + "\n\n| cp | batch | context | split inputs (ms) "
                "| replicated inputs, ours (ms) | speed-up |\n|---:|---:|---:|---:|---:|---:|\n"
                + "\n".join(cp_rows)
            )
        Path(args.report).write_text(
            f"# Decode-step host time: block tables kept on the device ({datetime.date.today()})"
            f"\n\n{chr(10).join(__doc__.split(chr(10) + chr(10))[2:]).strip()}\n\n"
            f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"device {args.device}, median of {args.reps} calls.\n\n"
            "| batch | context | block ids | table rebuilt (ms) | table kept on device (ms) "
            "| inputs, rebuilt (ms) | inputs, ours (ms) | speed-up |\n"
            "|---:|---:|---:|---:|---:|---:|---:|---:|\n"
            + "\n".join(rows)
            + cp_table
            + f"\n\n**Summary:** `{summary}`\n\nCommand: `python bench/host_step.py "
            + " ".join(sys.argv[1:])
            + "`\n"
        )


CP_NOTE = """cp > 1 decode steps, the inputs of cp rank 0. *Split*: `ModelRunner._prepare_cp`, the
inputs of a step whose tokens are split over the cp ranks (used for prefill chunks), which
cp decode steps built too before they ran replicated, and then some: every sequence's local
positions up to its length and the key lists for the query exchange, rebuilt on the host each
step. *Ours*: `ModelRunner._prepare`, the replicated decode step's inputs (each rank's share of
the block tables kept on the device, its key count per sequence computed)."""


if __name__ == "__main__":
    main()
