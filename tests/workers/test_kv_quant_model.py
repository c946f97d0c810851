"""KV cache quantization (cache.quant_policy 8 / 4) through the whole model.

Teacher-forced NLL of a held-out text read through the quantized cache, per policy, on the
demo model (SmolLM2-135M-Instruct) and a micro checkpoint; the decode path reads the same cache
as prefill; greedy tokens agree across meshes; the bundled document questions still get their
answers with int8. The numbers are in docs/benchmarks/kv_quant_cpu_2026-12-03.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import workers.layers.attention as attention_module
from dist_runtime import Runtime, RuntimeConfig, SamplingParams
from dist_runtime.config import CPU_ATTENTION_ENV, CacheConfig
from dist_runtime.formats.demo_model import demo_model_path
from dist_runtime.text.documents import harbor_report
from dist_runtime.text.tokenizer import Tokenizer
from kernels.cpu_attention import _library
from workers.scoring import Scorer

CPU32: dict[str, Any] = dict(device="cpu", dtype="float32")
HELD_OUT_TOKENS = 1024


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _nll(model: str, ids: list[int], policy: int, decode_last: int = 0) -> list[float]:
    config = RuntimeConfig(
        model=model, session_len=4096, cache=CacheConfig(quant_policy=policy), **CPU32
    )
    scorer = Scorer(config, max_tokens=len(ids))
    try:
        return scorer.score(ids, chunk=512, decode_last=decode_last).nll
    finally:
        scorer.close()


def _held_out(tokenizer: Tokenizer) -> list[int]:
    """A report the bundled questions never use (another seed), cut to HELD_OUT_TOKENS."""
    ids = tokenizer.encode(harbor_report(seed=3, num_sections=12).text)
    assert len(ids) >= HELD_OUT_TOKENS
    return ids[:HELD_OUT_TOKENS]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def test_nll_per_policy_on_the_demo_model_and_a_micro_checkpoint(tiny_llama_dir: Path) -> None:
    demo = str(demo_model_path())
    tokenizer = Tokenizer.from_folder(demo)
    assert tokenizer is not None
    ids = _held_out(tokenizer)
    demo_nll = {p: _mean(_nll(demo, ids, p)) for p in (0, 8, 4)}
    micro_ids = [t % 512 for t in ids[:512]]
    micro_nll = {p: _mean(_nll(str(tiny_llama_dir), micro_ids, p)) for p in (0, 8, 4)}
    for nll in (demo_nll, micro_nll):
        assert abs(nll[8] / nll[0] - 1) < 0.01, nll  # int8: within 1% of the model's dtype
    # int4: the micro checkpoint is within the 5% aim; the 135M demo model (head_dim 64, keys
    # with outlier channels) measures about +10%, recorded in the benchmark report.
    assert abs(micro_nll[4] / micro_nll[0] - 1) < 0.05, micro_nll
    assert demo_nll[0] < demo_nll[4] < 1.15 * demo_nll[0], demo_nll


@pytest.mark.parametrize("policy", [0, 8, 4])
def test_decode_steps_read_the_cache_as_prefill_does(tiny_llama_dir: Path, policy: int) -> None:
    """The last tokens scored by one-token decode steps (flash_decode over the quantized cache)
    equal the same tokens scored inside a prefill chunk (paged attention over it)."""
    ids = [(7 * i + 3) % 512 for i in range(200)]
    prefill = _nll(str(tiny_llama_dir), ids, policy)
    decode = _nll(str(tiny_llama_dir), ids, policy, decode_last=40)
    assert decode == pytest.approx(prefill, abs=1e-4)


@pytest.mark.skipif(_library() is None, reason="no C compiler: the native kernels are not built")
@pytest.mark.parametrize("policy", [8, 4])
def test_native_rope_and_quantizing_store_score_as_the_references(
    tiny_llama_dir: Path, policy: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CPU the layers rotate, quantize and store K/V in one native call (checked to run) and
    decode through the native kernel; the NLL equals the torch references' (RoPE and
    store_kv_ref, the gather + SDPA decode) for prefill and decode steps alike."""
    ids = [(5 * i + 1) % 512 for i in range(120)]
    calls: list[int] = []
    real = attention_module.rope_store

    def spy(*args: Any, **kwargs: Any) -> None:
        calls.append(kwargs.get("bits", 0))
        real(*args, **kwargs)

    monkeypatch.setattr(attention_module, "rope_store", spy)
    native = _nll(str(tiny_llama_dir), ids, policy, decode_last=30)
    assert calls and set(calls) == {policy}
    monkeypatch.setenv(CPU_ATTENTION_ENV, "torch")
    calls.clear()
    reference = _nll(str(tiny_llama_dir), ids, policy, decode_last=30)
    assert not calls
    assert native == pytest.approx(reference, abs=1e-4)


PARITY_PROMPTS: list[Any] = [[(11 * i + 5) % 500 + 4 for i in range(150)], list(range(40, 110))]


@pytest.mark.parametrize(
    "policy",
    [
        # int8 shards and stripes through the same per-head code as int4 (which also packs
        # nibbles): on demand (-m slow)
        pytest.param(8, marks=pytest.mark.slow),
        4,
    ],
)
def test_greedy_tokens_agree_across_meshes(
    ray_cluster: Any, tiny_llama_dir: Path, policy: int
) -> None:
    """tp and cp shard or stripe the quantized cache; each head vector is quantized alike
    everywhere, so every mesh decodes the same greedy tokens."""
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    tokens = {}
    for tp, cp in ((1, 1), (2, 1), (1, 2)):
        with Runtime(
            model=str(tiny_llama_dir),
            tp=tp,
            cp=cp,
            session_len=512,
            cache={"quant_policy": policy, "block_size": 16},
            **CPU32,
        ) as rt:
            tokens[(tp, cp)] = [o.token_ids for o in rt.generate(PARITY_PROMPTS, params)]
    assert tokens[(2, 1)] == tokens[(1, 1)]
    assert tokens[(1, 2)] == tokens[(1, 1)]


# On demand (-m slow, ~11 s at tp 1): the NLL test above holds int8 within 1% of the model's
# dtype on the demo model by default.
@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 3])
def test_int8_answers_the_bundled_questions(ray_cluster: Any, tp: int) -> None:
    doc = harbor_report()
    with Runtime(tp=tp, session_len=4096, cache={"quant_policy": 8}, **CPU32) as rt:
        answers = rt.ask(doc.text, doc.questions, SamplingParams(max_new_tokens=64))
    for question, fact, answer in zip(doc.questions, doc.answers, answers):
        assert fact in answer, (tp, question, answer)


def test_quant_policy_changes_the_prefix_cache_key_and_the_capacity(tiny_llama_dir: Path) -> None:
    blocks: dict[int, int] = {}
    hashes: dict[int, int] = {}
    for policy in (0, 8, 4):
        with Runtime(
            model=str(tiny_llama_dir),
            session_len=128,
            cache={"quant_policy": policy, "cpu_kv_cache_gb": 1 / 1024},
            **CPU32,
        ) as rt:
            blocks[policy] = rt.engine.blocks.num_blocks
            hashes[policy] = rt.engine.blocks.block_hash(
                rt.engine.blocks.root_hash, list(range(16))
            )
    # head_dim 8, fp32: 32 bytes per head vector; int8 8 + 8; int4 4 + 8 (codes + scale, zero)
    assert blocks[8] == blocks[0] * 32 // 16 and blocks[4] == blocks[0] * 32 // 12
    assert len(set(hashes.values())) == 3
