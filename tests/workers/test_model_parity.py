"""Logits parity of the worker model (tp=1, fp32) with Hugging Face `LlamaForCausalLM`.

The worker model is driven directly: each step builds the packed batch and its
`AttentionMetadata` (the same layout `ModelRunner._prepare` produces) over block tables that
this test hands out, and compares the logits of every computed position with one HF forward
over the whole sequence. Prefill, chunked prefill over cached K/V, one-token decodes and mixed
batches must all agree, for both checkpoint layouts and for the config variants the loader
handles (attention bias, tied embeddings, linear RoPE scaling).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_runtime import Runtime, SamplingParams
from dist_runtime.config import CacheConfig, RuntimeConfig
from dist_runtime.formats.random_checkpoint import write_random_checkpoint
from dist_runtime.protocol import SamplingSpec, SeqStep, StepPlan
from tests.conftest import TINY_SHAPES
from tests.helpers.oracle import load_hf_llama
from workers.checkpoint import CheckpointReader
from workers.distributed import Collectives, MeshCoords
from workers.layers.attention import AttentionMetadata
from workers.model_runner import ModelRunner
from workers.models.decoder import DecoderLayer

VOCAB = TINY_SHAPES["vocab_size"]
NUM_BLOCKS = 64
BLOCK_SIZE = 16
RTOL = 1e-4
"""Both sides run fp32 on the same weights; only summation-order noise (~1e-6) differs. 1e-4
leaves headroom for paged vs dense attention and packed batches without hiding a real bug (a
wrong RoPE position, bias or head mapping moves logits by O(1))."""
LOGPROB_ATOL = 1e-4
"""fp32 log-softmax of logits that agree to ~1e-6: 1e-4 is two orders of magnitude of margin."""


def logits_atol(reference: torch.Tensor) -> float:
    """1e-4 times the logits' scale: near-zero logits have no meaningful relative error."""
    return RTOL * float(reference.abs().max())


def assert_logits_close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=RTOL, atol=logits_atol(want))


def prompt(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (length,), generator=gen).tolist()


def make_runner(folder: Path) -> ModelRunner:
    config = RuntimeConfig(
        model=str(folder),
        device="cpu",
        dtype="float32",
        cache=CacheConfig(num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE),
    )
    runner = ModelRunner(config, Collectives(MeshCoords()))
    runner.allocate_kv_cache(NUM_BLOCKS)
    return runner


@dataclass
class Seq:
    """One sequence on the worker side of this test: its full tokens and its block table."""

    tokens: list[int]
    table: list[int] = field(default_factory=list)
    computed: int = 0


class BlockPool:
    """Hands out block ids in a seeded random order, so tables are neither contiguous nor
    sorted (the attention must follow the table, not assume block i holds positions of i)."""

    def __init__(self, seed: int = 0):
        ids = list(range(NUM_BLOCKS))
        random.Random(seed).shuffle(ids)
        self.free = ids

    def cover(self, seq: Seq, num_tokens: int) -> None:
        while len(seq.table) * BLOCK_SIZE < num_tokens:
            seq.table.append(self.free.pop())


def step(runner: ModelRunner, pool: BlockPool, work: list[tuple[Seq, int]]) -> list[torch.Tensor]:
    """Compute the next `n` tokens of each (seq, n) in one packed forward; logits per seq."""
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    cu = [0]
    ctx: list[int] = []
    for seq, n in work:
        start, end = seq.computed, seq.computed + n
        pool.cover(seq, end)
        ids.extend(seq.tokens[start:end])
        pos.extend(range(start, end))
        slots.extend(
            seq.table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, end)
        )
        cu.append(cu[-1] + n)
        ctx.append(end)
        seq.computed = end
    width = max(len(seq.table) for seq, _ in work)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        block_tables=torch.tensor(
            [seq.table + [0] * (width - len(seq.table)) for seq, _ in work], dtype=torch.int32
        ),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int64),
        context_lens=torch.tensor(ctx, dtype=torch.int64),
    )
    assert runner.kv_cache is not None
    with torch.inference_mode():
        hidden = runner.model(
            torch.tensor(ids, dtype=torch.int64),
            torch.tensor(pos, dtype=torch.int64),
            meta,
            runner.kv_cache.layers,
        )
        logits = runner.model.compute_logits(hidden)
    assert logits.shape == (len(ids), VOCAB) and logits.dtype == torch.float32
    return list(logits.split([n for _, n in work]))


def hf_logits(model: Any, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


@pytest.fixture(params=["llama", "internlm2"])
def layout_dir(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"tiny_{request.param}_dir")


@pytest.fixture
def runner_and_hf(layout_dir: Path) -> Iterator[tuple[ModelRunner, Any]]:
    yield make_runner(layout_dir), load_hf_llama(layout_dir)


def test_packed_prefill_matches_hf(runner_and_hf: tuple[ModelRunner, Any]) -> None:
    """Three prompts of different lengths (one token, one block + a bit, several blocks)
    prefilled in one packed step."""
    runner, hf = runner_and_hf
    seqs = [Seq(prompt(n, seed=n)) for n in (1, 19, 50)]
    got = step(runner, BlockPool(), [(s, len(s.tokens)) for s in seqs])
    for seq, logits in zip(seqs, got):
        want = hf_logits(hf, seq.tokens)
        assert_logits_close(logits, want)


def test_chunked_prefill_then_decode_matches_hf(runner_and_hf: tuple[ModelRunner, Any]) -> None:
    """A 13-token chunk, an 18-token chunk over the cached K/V (crossing a block boundary), then
    nine one-token decodes: the same logits as one HF forward over all 40 tokens."""
    runner, hf = runner_and_hf
    pool = BlockPool(seed=1)
    seq = Seq(prompt(40, seed=7))
    parts = step(runner, pool, [(seq, 13)]) + step(runner, pool, [(seq, 18)])
    parts += [step(runner, pool, [(seq, 1)])[0] for _ in range(9)]
    got = torch.cat(parts)
    want = hf_logits(hf, seq.tokens)
    assert_logits_close(got, want)


def test_mixed_decode_and_prefill_batches_match_hf(
    runner_and_hf: tuple[ModelRunner, Any],
) -> None:
    """Steps that mix one sequence's decodes with other sequences' prefill chunks."""
    runner, hf = runner_and_hf
    pool = BlockPool(seed=2)
    a, b, c = Seq(prompt(24, seed=1)), Seq(prompt(35, seed=2)), Seq(prompt(3, seed=3))
    got: dict[int, list[torch.Tensor]] = {id(s): [] for s in (a, b, c)}
    schedule = [
        [(a, 20), (b, 5)],
        [(a, 1), (b, 17), (c, 3)],
        [(b, 1), (a, 1)],  # order in the batch differs from admission order
        [(a, 1), (b, 12)],
        [(a, 1)],
    ]
    for work in schedule:
        for (s, _), logits in zip(work, step(runner, pool, work)):
            got[id(s)].append(logits)
    for s in (a, b, c):
        assert s.computed == len(s.tokens)
        want = hf_logits(hf, s.tokens)
        assert_logits_close(torch.cat(got[id(s)]), want)


VARIANTS: dict[str, dict[str, Any]] = {
    "internlm2-bias": dict(architecture="internlm2", bias=True),
    "llama-bias": dict(architecture="llama", bias=True),
    "llama-tied": dict(architecture="llama", tie_word_embeddings=True),
    "internlm2-tied": dict(architecture="internlm2", tie_word_embeddings=True),
    "llama-rope-linear": dict(architecture="llama", rope_scaling={"type": "linear", "factor": 4.0}),
    "llama-head-dim-16": dict(architecture="llama", head_dim=16),  # heads * head_dim != hidden
    "internlm2-rope-linear": dict(
        architecture="internlm2", rope_scaling={"rope_type": "linear", "factor": 2.5}
    ),
    "qwen2": dict(architecture="qwen2", tie_word_embeddings=True, rope_theta=1e6),
    "qwen3": dict(architecture="qwen3", head_dim=16, rope_theta=1e6),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_variants_match_hf(variant: str, tmp_path: Path) -> None:
    kwargs: dict[str, Any] = dict(TINY_SHAPES, seed=3, with_tokenizer=False, **VARIANTS[variant])
    folder = write_random_checkpoint(tmp_path / "ckpt", **kwargs)
    runner, hf = make_runner(folder), load_hf_llama(folder)
    pool = BlockPool(seed=3)
    seq = Seq(prompt(37, seed=11))
    parts = step(runner, pool, [(seq, 30)]) + [step(runner, pool, [(seq, 1)])[0] for _ in range(7)]
    got = torch.cat(parts)
    want = hf_logits(hf, seq.tokens)
    assert_logits_close(got, want)

    # The variant must matter at this tolerance, or the parity above proves nothing about it.
    variant_kwargs = VARIANTS[variant]
    if variant == "qwen2":  # (q/k/v biases, none on o: the layer's, and HF's, parameters)
        layer = runner.model.layers[0]
        assert isinstance(layer, DecoderLayer)
        assert layer.attn.qkv_proj.bias is not None and layer.attn.o_proj.bias is None
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
        assert (hf_logits(hf, seq.tokens) - want).abs().max() > 100 * logits_atol(want)
    elif variant == "qwen3":  # (the head norms: HF's model without them answers otherwise)
        layer = runner.model.layers[0]
        assert isinstance(layer, DecoderLayer) and layer.attn.q_norm is not None
        with torch.no_grad():
            for module in hf.modules():
                if type(module).__name__ == "Qwen3Attention":
                    module.q_norm.weight.fill_(1.0)
                    module.k_norm.weight.fill_(1.0)
        assert (hf_logits(hf, seq.tokens) - want).abs().max() > 100 * logits_atol(want)
    elif "tie_word_embeddings" in variant_kwargs:
        # No LM head in the checkpoint: parity means the embedding served as the head.
        names = set(CheckpointReader(folder).names())
        assert not {"lm_head.weight", "output.weight"} & names
        assert runner.model.lm_head.tied is runner.model.embed
    elif "head_dim" in variant_kwargs:
        layer = runner.model.layers[0]
        assert isinstance(layer, DecoderLayer)
        assert layer.attn.q_size == 8 * 16 != TINY_SHAPES["hidden_size"]
    else:
        if "bias" in variant_kwargs:
            with torch.no_grad():
                for name, p in hf.named_parameters():
                    if name.endswith("bias"):
                        p.zero_()
            contrast = hf_logits(hf, seq.tokens)
        else:  # rope_scaling: the same weights without scaling
            plain = {k: v for k, v in kwargs.items() if k != "rope_scaling"}
            unscaled = load_hf_llama(write_random_checkpoint(tmp_path / "plain", **plain))
            contrast = hf_logits(unscaled, seq.tokens)
        assert (contrast - want).abs().max() > 100 * logits_atol(want)


def test_runner_execute_follows_plans(runner_and_hf: tuple[ModelRunner, Any]) -> None:
    """`ModelRunner.execute` on step plans (block-table deltas, a non-sampling chunk, decodes,
    a finished id whose blocks a new sequence reuses): each sampled token is HF's argmax and
    its top-5 logprobs are HF's log_softmax top-5 at that position."""
    runner, hf = runner_and_hf
    greedy = SamplingSpec(
        temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, seed=0, logprobs=5
    )
    tokens = prompt(46, seed=21)
    step_ids = iter(range(100))

    def run(seq_id: int, start: int, stop: int, blocks: list[int], **kw: Any) -> Any:
        plan = StepPlan(
            step_id=next(step_ids),
            seqs=[
                SeqStep(
                    seq_id=seq_id,
                    token_ids=tokens[start:stop],
                    start_pos=start,
                    new_blocks=blocks,
                    is_new=start == 0,
                    sample=kw.pop("sample", True),
                    sampling=greedy if start == 0 else None,
                )
            ],
            finished_seq_ids=kw.pop("finished", []),
        )
        return runner.execute(plan)

    def check(result: Any) -> None:
        (tok,) = result.tokens
        ref = torch.log_softmax(hf_logits(hf, tokens)[-1], dim=-1)
        values, indices = ref.topk(5)
        assert tok.token_id == int(ref.argmax()) == indices[0]
        assert tok.top_ids == indices.tolist()
        torch.testing.assert_close(torch.tensor(tok.top_logprobs), values, rtol=0, atol=1e-4)
        tokens.append(tok.token_id)

    assert run(0, 0, 20, [40, 3], sample=False).tokens == []  # first chunk: nothing sampled
    check(run(0, 20, 46, [17]))  # 46 tokens in 3 blocks
    for _ in range(3):  # decodes at 46, 47, 48 (a 4th block), each feeding back the last token
        n = len(tokens)
        check(run(0, n - 1, n, [5] if n - 1 == 3 * BLOCK_SIZE else []))
    # A new sequence reuses the finished one's blocks in another order.
    del tokens[11:]
    check(run(1, 0, 11, [17], finished=[0]))
    assert 0 not in runner.seqs and runner.seqs[1].block_table == [17]


@pytest.mark.parametrize("layout", ["llama", "internlm2"])
def test_runtime_greedy_and_logprobs_match_hf_generate(
    layout: str, request: pytest.FixtureRequest
) -> None:
    """Public API: batched greedy generation equals HF generate(do_sample=False) per prompt, and
    the top-5 logprobs equal HF's log_softmax top-k of the raw logits at every step."""
    folder = request.getfixturevalue(f"tiny_{layout}_dir")
    prompts = [prompt(n, seed=100 + n) for n in (5, 18, 33)]
    params = SamplingParams(max_new_tokens=12, temperature=0.0, logprobs=5)
    with Runtime(model=str(folder), session_len=256, device="cpu", dtype="float32") as rt:
        outs = rt.generate(prompts, params)
    hf = load_hf_llama(folder)
    for ids, out in zip(prompts, outs):
        with torch.no_grad():
            gen = hf.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=12,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        want = gen.sequences[0, len(ids) :].tolist()
        assert out.token_ids == want  # both stop at an EOS id (and keep it) or run 12 steps
        assert out.prompt_token_ids == ids
        assert out.finish_reason == ("length" if len(want) == 12 else "stop")
        assert out.logprobs is not None and len(out.logprobs) == len(want)
        for lp, token, raw in zip(out.logprobs, want, gen.logits):
            ref = torch.log_softmax(raw[0].float(), dim=-1)
            values, indices = ref.topk(5)
            assert lp.token_id == token
            assert list(lp.top) == indices.tolist()  # most likely first
            torch.testing.assert_close(
                torch.tensor(list(lp.top.values())), values, rtol=0, atol=LOGPROB_ATOL
            )
            assert abs(lp.logprob - float(ref[token])) < LOGPROB_ATOL
