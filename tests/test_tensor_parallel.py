"""Tensor parallelism over Ray workers gives the tp=1 result, and each rank loads only its shard.

Every tp degree runs the same batch (a prompt longer than one KV block, a one-token prompt, a
text prompt and a short one) greedily with top-5 logprobs of the generated and of the prompt
tokens (every tp rank runs the gathering LM head on the prompt rows); the tokens must equal the
tp=1 run and the logprobs agree to fp32 reduction noise. Each (checkpoint, tp) Runtime is
started once per module and shared by the tests that need it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_runtime import RequestOutput, Runtime, SamplingParams
from dist_runtime.formats.random_checkpoint import write_random_checkpoint
from tests.conftest import TINY_SHAPES

VOCAB = TINY_SHAPES["vocab_size"]
BLOCK_SIZE = 16
LOGPROB_ATOL = 1e-4
"""fp32: tp changes only the order of the all-reduced partial sums (~1e-6 in the logits)."""
PARAMS = SamplingParams(
    max_new_tokens=10, temperature=0.0, logprobs=5, prompt_logprobs=5, ignore_eos=True
)


def _prompt(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (length,), generator=gen).tolist()


PROMPTS: list[str | list[int]] = [
    _prompt(2 * BLOCK_SIZE + 7, seed=1),  # spans three KV blocks
    [42],  # a single token
    "The scheduler reads the document before noon.",
    _prompt(5, seed=2),
]

Run = tuple[list[RequestOutput], list[int]]
GUIDED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"k": {"enum": ["a", "b"]}, "v": {"type": "array", "items": {"type": "integer"},
                   "maxItems": 2}},
    "required": ["k", "v"],
}  # fmt: skip
GUIDED = SamplingParams(max_new_tokens=120, json_schema=GUIDED_SCHEMA)
"""A guided request rides along in every run: its masks travel to the rank-0 worker in the
plan (over Ray's codec at tp > 1)."""
guided_outputs: dict[tuple[str, int], RequestOutput] = {}


@pytest.fixture(scope="module")
def replicated_kv_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 query heads over 2 KV heads: tp=4 replicates every KV head on two ranks, each rank
    holding half of that head's query group (InternLM2's packed wqkv read in pieces). It also
    has attention biases (the packed bias is cut like the weight; the o bias must be added once,
    after the all-reduce) and a tied LM head (the vocab-parallel embedding serves as the head)."""
    shapes = dict(TINY_SHAPES, num_heads=4, num_kv_heads=2)
    return write_random_checkpoint(
        tmp_path_factory.mktemp("tiny-4h-2kv"),
        architecture="internlm2",
        seed=5,
        bias=True,
        tie_word_embeddings=True,
        max_shard_bytes=200_000,
        **shapes,
    )


@pytest.fixture(scope="module")
def head_dim_16_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """head_dim 16 and no biases: on CPU its decode steps run through the native decoder
    (`kernels/cpu_decoder.py`), stage by stage with the all-reduces in between at tp > 1."""
    shapes = dict(TINY_SHAPES, num_heads=4, num_kv_heads=2)
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny-hd16"), seed=6, **shapes)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2: biases on q/k/v (sharded with their rows) and none on o; a sliding window of 9
    on its second layer (`use_sliding_window` from max_window_layers 1), which the longest
    prompt passes, so each rank's heads attend within it."""
    folder = write_random_checkpoint(
        tmp_path_factory.mktemp("tiny-qwen2"), architecture="qwen2", seed=7, **TINY_SHAPES
    )
    path = folder / "config.json"
    windowed = {"use_sliding_window": True, "sliding_window": 9, "max_window_layers": 1}
    path.write_text(json.dumps({**json.loads(path.read_text()), **windowed}))
    return folder


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen3: an RMSNorm on every q and k head (replicated weights, each rank's heads)."""
    return write_random_checkpoint(
        tmp_path_factory.mktemp("tiny-qwen3"),
        architecture="qwen3",
        seed=8,
        **dict(TINY_SHAPES, head_dim=16),
    )


@pytest.fixture(scope="module")
def phi3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Phi-3: q/k/v and gate/up packed (each rank reads its rows of the packed tensors),
    LongRoPE trained to 16 positions (the multi-block prompt takes the long factors) and
    Phi-4-mini's partial RoPE (half of each head turned: its q / k rows reordered and scaled
    per rank)."""
    half = TINY_SHAPES["hidden_size"] // TINY_SHAPES["num_heads"] // 4
    scaling = {
        "rope_type": "longrope",
        "short_factor": [1.0 + 0.5 * i for i in range(half)],
        "long_factor": [1.0 + 2.0 * i for i in range(half)],
        "original_max_position_embeddings": 16,
    }
    return write_random_checkpoint(
        tmp_path_factory.mktemp("tiny-phi3"),
        architecture="phi3",
        seed=9,
        rope_scaling=scaling,
        max_position_embeddings=512,
        partial_rotary_factor=0.5,
        **TINY_SHAPES,
    )


@pytest.fixture(scope="module")
def granite_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Granite: its residual multiplier folded into each rank's o_proj / down_proj columns
    (and the o bias added once, after the all-reduce), a tied head divided by logits_scaling."""
    return write_random_checkpoint(
        tmp_path_factory.mktemp("tiny-granite"),
        architecture="granite",
        seed=10,
        bias=True,
        tie_word_embeddings=True,
        **TINY_SHAPES,
    )


@pytest.fixture(scope="module")
def glm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GLM-4: interleaved partial RoPE (each rank's q / k heads reordered), q/k/v biases and
    none on o, gate/up packed."""
    return write_random_checkpoint(
        tmp_path_factory.mktemp("tiny-glm"), architecture="glm", seed=11, **TINY_SHAPES
    )


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma 3: head norms and sublayer output norms replicated on every rank, GELU on each
    rank's MLP columns, and layer 0 windowed to 9 keys (which the longest prompt passes) with
    its own RoPE base."""
    folder = write_random_checkpoint(
        tmp_path_factory.mktemp("tiny-gemma3"), architecture="gemma3", seed=12, **TINY_SHAPES
    )
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "sliding_window": 9}))
    return folder


@pytest.fixture(scope="module")
def run(
    ray_cluster: Any,
    tiny_llama_dir: Path,
    tiny_internlm2_dir: Path,
    replicated_kv_dir: Path,
    head_dim_16_dir: Path,
    qwen2_dir: Path,
    qwen3_dir: Path,
    phi3_dir: Path,
    granite_dir: Path,
    glm_dir: Path,
    gemma3_dir: Path,
) -> Callable[[str, int], Run]:
    """run(checkpoint, tp) -> (outputs, weight bytes read per rank), computed once per module."""
    folders = {
        "llama": tiny_llama_dir,
        "internlm2": tiny_internlm2_dir,
        "internlm2-4h-2kv": replicated_kv_dir,
        "llama-hd16": head_dim_16_dir,
        "qwen2": qwen2_dir,
        "qwen3": qwen3_dir,
        "phi3": phi3_dir,
        "granite": granite_dir,
        "glm": glm_dir,
        "gemma3": gemma3_dir,
    }
    cache: dict[tuple[str, int], Run] = {}

    def get(name: str, tp: int) -> Run:
        if (name, tp) not in cache:
            with Runtime(
                model=str(folders[name]), tp=tp, session_len=256, device="cpu", dtype="float32"
            ) as rt:
                assert rt.engine.executor is not None
                *outs, guided = rt.generate([*PROMPTS, "JSON:"], [PARAMS] * len(PROMPTS) + [GUIDED])
                guided_outputs[name, tp] = guided
                cache[name, tp] = (outs, list(rt.engine.executor.weight_bytes_read))
        return cache[name, tp]

    return get


def _assert_same_generation(got: list[RequestOutput], ref: list[RequestOutput]) -> None:
    assert len(got) == len(ref) == len(PROMPTS)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g.token_ids == r.token_ids, f"prompt {i}"
        assert len(g.token_ids) == PARAMS.max_new_tokens
        assert g.text == r.text and g.finish_reason == r.finish_reason == "length"
        assert g.logprobs is not None and r.logprobs is not None
        assert g.prompt_logprobs is not None and r.prompt_logprobs is not None
        assert len(g.prompt_logprobs) == len(g.prompt_token_ids) and g.prompt_logprobs[0] is None
        for step, (a, b) in enumerate(
            zip(
                [*g.prompt_logprobs[1:], *g.logprobs],
                [*r.prompt_logprobs[1:], *r.logprobs],
                strict=True,
            )
        ):
            assert a is not None and b is not None and a.token_id == b.token_id
            assert list(a.top) == list(b.top), f"prompt {i} step {step}: top-5 ids differ"
            torch.testing.assert_close(
                torch.tensor([a.logprob, *a.top.values()]),
                torch.tensor([b.logprob, *b.top.values()]),
                rtol=0,
                atol=LOGPROB_ATOL,
            )


@pytest.mark.parametrize(
    ("name", "tp"),
    [
        ("internlm2", 2),
        # on demand (-m slow): internlm2 at tp 2 and the replicated-KV case at tp 4 cover it
        pytest.param("internlm2", 4, marks=pytest.mark.slow),
        ("llama", 2),
        ("internlm2-4h-2kv", 4),
        ("llama-hd16", 2),
        ("qwen2", 2),
        ("qwen3", 2),
        ("phi3", 2),
        # on demand (-m slow): the folded multiplier is linear in each rank's partial sums
        pytest.param("granite", 2, marks=pytest.mark.slow),
        # on demand: the row reordering per rank is phi3-tp2's, in another order
        pytest.param("glm", 2, marks=pytest.mark.slow),
        ("gemma3", 2),
    ],
    ids=[
        "internlm2-tp2",
        "internlm2-tp4",
        "llama-tp2",
        "replicated-kv-tp4",
        "native-decoder-tp2",
        "qwen2-tp2",
        "qwen3-tp2",
        "phi3-tp2",
        "granite-tp2",
        "glm-tp2",
        "gemma3-tp2",
    ],
)
def test_tp_matches_tp1(run: Callable[[str, int], Run], name: str, tp: int) -> None:
    outs, bytes_read = run(name, tp)
    assert len(bytes_read) == tp
    _assert_same_generation(outs, run(name, 1)[0])


def test_guided_output_over_ray_matches_tp1(run: Callable[[str, int], Run]) -> None:
    run("llama", 2)
    run("llama", 1)
    got, want = guided_outputs["llama", 2], guided_outputs["llama", 1]
    assert got.token_ids == want.token_ids and got.finish_reason == "stop"
    value = json.loads(got.text)
    assert value["k"] in ("a", "b") and len(value["v"]) <= 2


def test_prompts_cover_the_cases() -> None:
    """The batch above must keep a multi-block prompt and a one-token prompt."""
    lengths = [len(p) for p in PROMPTS if isinstance(p, list)]
    assert max(lengths) > BLOCK_SIZE and min(lengths) == 1


def test_each_rank_reads_only_its_shard(
    run: Callable[[str, int], Run], tiny_internlm2_dir: Path
) -> None:
    total = json.loads((tiny_internlm2_dir / "model.safetensors.index.json").read_text())[
        "metadata"
    ]["total_size"]
    (tp1,) = run("internlm2", 1)[1]
    # tp=1 reads every tensor once: the checkpoint's tensor bytes (index total_size).
    assert abs(tp1 - total) <= 0.01 * total
    tp2 = run("internlm2", 2)[1]
    # Sharded matrices are halved; only norms (and o/MLP biases, none here) are replicated.
    assert all(b < 0.6 * tp1 for b in tp2), (tp2, tp1)
    assert sum(tp2) >= tp1  # together the ranks still read every weight
