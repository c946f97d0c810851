"""The CUDA path end to end (Triton kernels, paged KV cache, chunked prefill over a cached
prefix, prefix caching, batched decode) against Hugging Face transformers on the same weights.

Marked `gpu` (deselected by default): run `pytest -m gpu tests/test_gpu_oracle.py` on a CUDA
machine. fp32 on both sides with head_dim 128 so every Triton kernel runs (fp32 tiles use
full-precision dots), and TF32 is off, so greedy tokens must match and the chosen tokens'
logprobs agree closely.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dist_runtime import CacheConfig, Runtime, SamplingParams, SchedulerConfig
from dist_runtime.formats.random_checkpoint import write_random_checkpoint
from tests.helpers.oracle import load_hf_llama
from tests.helpers.outputs import assert_same_outputs

DEVICE = os.environ.get("GPU_ORACLE_DEVICE", "cuda")
"""cpu runs the same comparison through the torch references (a check of the test itself)."""
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU"
    ),
]

NEW_TOKENS = 24
LOGPROB_ATOL = 2e-3


@pytest.fixture(scope="module", params=["llama", "internlm2"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(
        tmp_path_factory.mktemp(f"gpu-{request.param}"),
        architecture=request.param,
        vocab_size=512,
        hidden_size=1024,
        intermediate_size=2048,
        num_layers=2,
        num_heads=8,
        num_kv_heads=2,
        seed=3,
    )


def _hf_logprobs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """(len(ids), vocab) log-probabilities of the token after each prefix, one forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=DEVICE)).logits[0].double()
    return torch.log_softmax(logits, dim=-1)


def test_cuda_runtime_matches_hf(checkpoint: Path) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False  # the default; a plugin may have changed it
    gen = torch.Generator().manual_seed(0)
    shared = torch.randint(3, 512, (700,), generator=gen).tolist()
    prompts = [
        shared + torch.randint(3, 512, (n,), generator=gen).tolist() for n in (37, 5, 130)
    ] + [torch.randint(3, 512, (300,), generator=gen).tolist()]
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=1)
    with Runtime(
        model=str(checkpoint),
        device=DEVICE,
        dtype="float32",
        session_len=1024,
        cache=CacheConfig(block_size=16, num_blocks=512),
        # 256-token chunks: the long prompts prefill in several steps over their cached part.
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256),
    ) as rt:
        (first,) = rt.generate([prompts[0]], params)  # caches the shared prefix
        rest = rt.generate(prompts[1:], params)  # hit it, and decode as one batch
        assert rt.prefix_cache_stats()["hit_tokens"] >= 2 * 688
    hf = load_hf_llama(checkpoint)
    torch.nn.Module.to(hf, DEVICE)  # in place (HF's own `to` signature confuses mypy)
    for prompt, out in zip(prompts, [first, *rest]):
        ref = _hf_logprobs(hf, prompt + out.token_ids)[len(prompt) - 1 : -1]
        assert out.logprobs is not None
        for step, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
            best = ref[step].topk(2)
            margin = float(best.values[0] - best.values[1])
            if margin > 10 * LOGPROB_ATOL:  # a near-tie may break either way
                assert tok == int(best.indices[0]), f"step {step}: {tok} vs HF {best.indices[0]}"
            # HF is teacher-forced on our tokens, so every step stays comparable.
            assert abs(lp.logprob - float(ref[step, tok])) < LOGPROB_ATOL, f"step {step}"


def test_decode_graphs_equal_eager(checkpoint: Path) -> None:
    """Decode steps replayed from CUDA graphs give the eager steps' tokens and logprobs."""
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (40, 300, 7)]
    params = [
        SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True, logprobs=2)
        for n in (30, 12, 21)
    ]
    runs = {}
    for eager in (True, False):
        with Runtime(
            model=str(checkpoint),
            device=DEVICE,
            dtype="float32",
            session_len=1024,
            enforce_eager=eager,
            cache=CacheConfig(block_size=16, num_blocks=256),
            scheduler=SchedulerConfig(max_num_seqs=8),
        ) as rt:
            runs[eager] = rt.generate(prompts, params)
            graphs = rt.engine.executor.worker.runner.graphs  # type: ignore[union-attr]
            if DEVICE == "cuda":
                assert (graphs is None) == eager
                assert eager or graphs.num_replays == 29
    assert_same_outputs(runs[True], runs[False], atol=1e-4)


def test_async_decode_equals_step_by_step(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decode steps launched one ahead (DIST_RUNTIME_ASYNC_DECODE=1: the ids taken from the
    step before's picks on the device, the graph's argmax or a seeded draw from its logits, read
    back through pinned buffers) give the step-by-step run's tokens and logprobs (stops and
    arrivals: tests/dist_runtime/test_async_decode.py)."""
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (40, 300, 7)]
    params = [
        SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True, logprobs=0)
        for n in (30, 12, 21)
    ]
    params[1] = SamplingParams(
        max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True, logprobs=0
    )
    runs, ahead = {}, {}
    for flag in ("0", "1"):
        monkeypatch.setenv("DIST_RUNTIME_ASYNC_DECODE", flag)
        with Runtime(
            model=str(checkpoint),
            device=DEVICE,
            dtype="float32",
            session_len=1024,
            cache=CacheConfig(block_size=16, num_blocks=256),
            scheduler=SchedulerConfig(max_num_seqs=8),
        ) as rt:
            runs[flag] = rt.generate(prompts, params)
            ahead[flag] = rt.engine.num_steps_ahead
    assert ahead["0"] == 0 and (DEVICE != "cuda" or ahead["1"] > 10)
    assert_same_outputs(runs["0"], runs["1"], atol=1e-4)


def test_decode_graphs_with_per_request_rope_equal_eager(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Dynamic NTK past max_position_embeddings (256): the request's own RoPE base reaches the
    graphs through their per-token cos/sin buffers."""
    folder = write_random_checkpoint(
        tmp_path_factory.mktemp("gpu-dyn"),
        architecture="internlm2",
        vocab_size=512,
        hidden_size=1024,
        intermediate_size=2048,
        num_layers=2,
        num_heads=8,
        num_kv_heads=2,
        max_position_embeddings=256,
        rope_scaling={"type": "dynamic", "factor": 2.0},
        seed=4,
    )
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (400, 30)]
    params = [
        SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True, logprobs=1)
        for n in (10, 20)
    ]
    runs = {}
    for eager in (True, False):
        with Runtime(
            model=str(folder),
            device=DEVICE,
            dtype="float32",
            session_len=1024,
            enforce_eager=eager,
            cache=CacheConfig(block_size=16, num_blocks=256),
        ) as rt:
            runs[eager] = rt.generate(prompts, params)
            graphs = rt.engine.executor.worker.runner.graphs  # type: ignore[union-attr]
            if DEVICE == "cuda" and not eager:
                assert graphs.num_rope_replays == 9 and graphs.num_replays == 19
    assert_same_outputs(runs[True], runs[False], atol=1e-4)
