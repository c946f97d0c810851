"""LoRA adapters (`lora_modules`, `SamplingParams.adapter`) against independent oracles.

* Hugging Face transformers + PEFT on the same Llama checkpoint and adapter folders: prompt
  log-probabilities and greedy tokens (all seven targets; and rsLoRA with a rank_pattern, a
  subset of the targets and one layer only).
* The adapter merged into the checkpoint (`merge_adapter`, W + s * B @ A) served as a plain
  model: a batch mixing the base model and two adapters (Llama layout with fused q/k/v and
  gate/up, InternLM2's packed wqkv) through chunked prefill, decode steps, preemption,
  speculative decoding (prompt lookup and predictions) and guided output, answers what each
  request's own reference answers; tp=2 over Ray too (and KV heads replicated across ranks),
  and cp=2.
* Decode steps replayed from graphs (emulated on CPU) take each row's adapter from the graphs'
  slot buffer, step by step and launched ahead.
* Adapters loaded and unloaded while running (`max_loras`): into reserved slots, read in place
  by the decode graphs, refused while in use or with no slot free, carried over a worker
  restart over Ray.
* Prefix caching never lets a base request and an adapter request share K/V, while the same
  adapter twice does hit the cache.
* Every refusal: folders `AdapterSpec.load` rejects (with the reason), bad names and
  `--lora-modules` items, and requests naming an adapter that is not loaded.

The Llama checkpoint has head_dim 16, so its decode steps, adapter rows included, run on the
native CPU decoder (tp=2: stage by stage, the adapters added to the partial sums before each
all-reduce); InternLM2's (head_dim 8) run layer by layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from dist_runtime import RequestOutput, Runtime, SamplingParams
from dist_runtime.config import (
    CacheConfig,
    ConfigError,
    ModelConfig,
    RuntimeConfig,
    SchedulerConfig,
)
from dist_runtime.engine.engine import Engine
from dist_runtime.engine.scheduler import Scheduler
from dist_runtime.formats.lora_adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    merge_adapter,
    write_random_adapter,
)
from dist_runtime.formats.random_checkpoint import write_random_checkpoint
from dist_runtime.lora import (
    AdapterConflictError,
    AdapterNotFoundError,
    AdapterSpec,
    lora_bytes_per_worker,
    parse_lora_modules,
)
from tests.conftest import TINY_SHAPES

CPU32: dict[str, Any] = dict(device="cpu", dtype="float32")
BLOCK_SIZE = 16
BUDGET = 32
"""Tokens per step of the adapter runtimes: a 70-token prompt prefills in three chunks."""
LOGPROB_ATOL = 1e-4
"""fp32 everywhere: `W x + B (A x)` and `(W + B A) x` differ only in rounding (~1e-6)."""
ADAPTER_GAP = 1e-2
"""Least largest change of a prompt log-probability an adapter must make: it visibly acts."""
VOCAB = TINY_SHAPES["vocab_size"]
CACHE = CacheConfig(block_size=BLOCK_SIZE, num_blocks=128)
Adapter = str | None


def _prompt(n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (n,), generator=gen).tolist()


LONG = _prompt(70, seed=1)
"""Longer than the step budget (BUDGET): chunked prefill with adapter rows."""
SHORT = _prompt(20, seed=2)


def _params(adapter: Adapter, max_new_tokens: int = 8, **kw: Any) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=max_new_tokens, ignore_eos=True, logprobs=0, adapter=adapter, **kw
    )


# -- checkpoints, adapters and their merged references -------------------------------------------


@dataclasses.dataclass(frozen=True)
class Family:
    """A checkpoint, its adapters by name, and each adapter merged into it (None: the base)."""

    ckpt: Path
    adapters: dict[str, Path]
    merged: dict[Adapter, Path]

    @property
    def lora_modules(self) -> dict[str, str]:
        return {name: str(path) for name, path in self.adapters.items()}


def _family(root: Path, ckpt: Path, adapters: dict[str, dict[str, Any]]) -> Family:
    written = {name: write_random_adapter(root / name, ckpt, **kw) for name, kw in adapters.items()}
    merged: dict[Adapter, Path] = {None: ckpt}
    for name, folder in written.items():
        merged[name] = merge_adapter(ckpt, folder, root / f"merged-{name}")
    return Family(ckpt, written, merged)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """Llama layout, head_dim 16 (the native CPU decoder takes its decode steps). a1:
    every projection, rank 8. a2: rsLoRA, q/v/o/up/down of layer 1 only, down rank 4 and v
    rank 2 (rank_pattern), so the fused q/k/v and gate/up layers have parts without an
    adapter and parts of different ranks."""
    root = tmp_path_factory.mktemp("lora-llama")
    ckpt = write_random_checkpoint(
        root / "base",
        architecture="llama",
        seed=3,
        max_shard_bytes=200_000,
        **dict(TINY_SHAPES, num_heads=4, num_kv_heads=2),
    )
    return _family(
        root,
        ckpt,
        {
            "a1": dict(rank=8, alpha=16.0, seed=11),
            "a2": dict(
                targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"),
                rank=8,
                alpha=8.0,
                use_rslora=True,
                rank_pattern={"down_proj": 4, "v_proj": 2},
                layers=(1,),
                std=0.1,
                seed=12,
            ),
        },
    )


@pytest.fixture(scope="module")
def internlm2(tmp_path_factory: pytest.TempPathFactory, tiny_internlm2_dir: Path) -> Family:
    """InternLM2 layout (packed wqkv). a1: every projection; a2: wqkv, wo and w3 (up: the
    fused gate/up layer's gate part has none) of layer 0, rank 4."""
    root = tmp_path_factory.mktemp("lora-internlm2")
    return _family(
        root,
        tiny_internlm2_dir,
        {
            "a1": dict(rank=8, alpha=16.0, seed=21),
            "a2": dict(
                targets=("wqkv", "wo", "w3"), rank=4, alpha=4.0, layers=(0,), std=0.1, seed=22
            ),
        },
    )


@pytest.fixture(scope="module")
def one_kv_head(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """InternLM2 with 4 query heads over one KV head and attention biases: at tp=2 both ranks
    hold the KV head (wqkv's adapter rows for it are cut on both) and the o bias is added once
    after the all-reduce that also sums the ranks' adapter terms."""
    root = tmp_path_factory.mktemp("lora-1kv")
    ckpt = write_random_checkpoint(
        root / "base",
        architecture="internlm2",
        seed=7,
        bias=True,
        **dict(TINY_SHAPES, num_heads=4, num_kv_heads=1),
    )
    return _family(
        root,
        ckpt,
        {
            "a1": dict(rank=8, alpha=16.0, seed=31),
            "a2": dict(
                targets=("wqkv", "w2"),
                rank=8,
                alpha=8.0,
                use_rslora=True,
                rank_pattern={"w2": 4},
                std=0.1,
                seed=32,
            ),
        },
    )


def _lora_runtime(family: Family, **kw: Any) -> Runtime:
    kw.setdefault("cache", CACHE)
    kw.setdefault("scheduler", SchedulerConfig(max_num_batched_tokens=BUDGET, max_num_seqs=8))
    return Runtime(
        model=str(family.ckpt), lora_modules=family.lora_modules, session_len=256, **CPU32, **kw
    )


@pytest.fixture(scope="module")
def llama_rt(llama: Family) -> Iterator[Runtime]:
    with _lora_runtime(llama) as rt:
        yield rt


@pytest.fixture(scope="module")
def internlm2_rt(internlm2: Family) -> Iterator[Runtime]:
    with _lora_runtime(internlm2) as rt:
        yield rt


Reference = Callable[[Family, list[list[int]], list[SamplingParams]], list[RequestOutput]]


@pytest.fixture(scope="module")
def reference() -> Iterator[Reference]:
    """reference(family, prompts, params) -> what each request gets from a plain tp=1 runtime
    on its own adapter's merged checkpoint (the base checkpoint for adapter None), one prompt
    per step (no chunking). The runtimes start on first use and live for the module."""
    runtimes: dict[Path, Runtime] = {}

    def run(family: Family, prompts: list[list[int]], params: list[SamplingParams]) -> list[Any]:
        outs: list[RequestOutput | None] = [None] * len(prompts)
        for adapter in dict.fromkeys(p.adapter for p in params):
            folder = family.merged[adapter]
            if folder not in runtimes:
                runtimes[folder] = Runtime(model=str(folder), session_len=256, cache=CACHE, **CPU32)
            picks = [i for i, p in enumerate(params) if p.adapter == adapter]
            got = runtimes[folder].generate(
                [prompts[i] for i in picks],
                [dataclasses.replace(params[i], adapter=None) for i in picks],
            )
            for i, out in zip(picks, got, strict=True):
                outs[i] = out
        return outs

    yield run
    for rt in runtimes.values():
        rt.shutdown()


def _assert_same(got: RequestOutput, want: RequestOutput, what: str = "") -> None:
    """Same tokens; prompt and sampled log-probabilities equal to fp32 rounding."""
    assert got.token_ids == want.token_ids, what
    assert got.finish_reason == want.finish_reason, what
    for name in ("prompt_logprobs", "logprobs"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), (what, name)
        if a is None:
            continue
        assert len(a) == len(b), (what, name)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if y is None:
                assert x is None, (what, name, i)
                continue
            assert x is not None and x.token_id == y.token_id, (what, name, i)
            assert abs(x.logprob - y.logprob) <= LOGPROB_ATOL, (what, name, i, x, y)


def _prompt_gap(a: RequestOutput, b: RequestOutput) -> float:
    """Largest difference of two runs' prompt log-probabilities on the same prompt."""
    assert a.prompt_logprobs is not None and b.prompt_logprobs is not None
    gaps = []
    for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], strict=True):
        assert x is not None and y is not None
        gaps.append(abs(x.logprob - y.logprob))
    return max(gaps)


def _answers_differ(a: RequestOutput, b: RequestOutput) -> bool:
    """Two runs of one prompt answer differently: other tokens, or other log-probabilities."""
    if a.token_ids != b.token_ids:
        return True
    assert a.logprobs is not None and b.logprobs is not None
    return max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs)) > ADAPTER_GAP


# -- oracle 1: Hugging Face transformers + PEFT ---------------------------------------------------


@pytest.mark.parametrize("adapter", ["a1", "a2"])
def test_matches_hf_peft(llama: Family, llama_rt: Runtime, adapter: str) -> None:
    """PEFT applies the adapter folder to HF's Llama: the prompt log-probabilities, the greedy
    tokens and their log-probabilities are PEFT's."""
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(str(llama.ckpt), dtype=torch.float32).eval()
    with warnings.catch_warnings():
        # a2 leaves layer 0 out: PEFT warns its modules there have no weights (B stays 0)
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(base, str(llama.adapters[adapter])).eval()
    prompt, n = _prompt(37, seed=5), 6
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=torch.tensor([prompt])).logits[0], dim=-1)
        with model.disable_adapter():
            plain = torch.log_softmax(model(input_ids=torch.tensor([prompt])).logits[0], dim=-1)
        ids, picked = list(prompt), []
        for _ in range(n):
            row = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], dim=-1)
            token = int(row.argmax())
            ids.append(token)
            picked.append(row[token].item())
    want_prompt = ref[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    plain_prompt = plain[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    # the adapter visibly changes the model
    assert (want_prompt - plain_prompt).abs().max().item() > ADAPTER_GAP

    (out,) = llama_rt.generate([prompt], _params(adapter, n, prompt_logprobs=0))
    assert out.token_ids == ids[len(prompt) :]
    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
    got_prompt = torch.tensor([e.logprob for e in out.prompt_logprobs[1:] if e is not None])
    assert len(got_prompt) == len(prompt) - 1
    torch.testing.assert_close(got_prompt, want_prompt, rtol=0, atol=LOGPROB_ATOL)
    assert out.logprobs is not None
    torch.testing.assert_close(
        torch.tensor([e.logprob for e in out.logprobs]),
        torch.tensor(picked),
        rtol=0,
        atol=LOGPROB_ATOL,
    )


LONGROPE_4 = {
    "rope_type": "longrope",
    "short_factor": [1.0, 1.5, 2.0, 2.5],
    "long_factor": [1.0, 3.0, 5.0, 7.0],
    "original_max_position_embeddings": 16,
}
"""LongRoPE over the 4 turned pairs of a head_dim-16 head at partial_rotary_factor 0.5, trained
to 16 positions (max 256): an attention factor of 1.29 on the turned q / k rows."""
PEFT_CASES: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    # Phi-3: adapters on its packed qkv_proj / gate_up_proj, read as their parts sharing A
    "phi3": (("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), {"architecture": "phi3"}),
    # Granite: o / down deltas scaled by the residual multiplier folded into those layers
    "granite": (("q_proj", "v_proj", "o_proj", "down_proj"), {"architecture": "granite"}),
    # Phi-4-mini: partial RoPE, q / k rows of B reordered and scaled as the base weights' are
    "phi4-mini": (
        ("qkv_proj", "gate_up_proj"),
        {
            "architecture": "phi3",
            "partial_rotary_factor": 0.5,
            "rope_scaling": LONGROPE_4,
            "max_position_embeddings": 256,
        },
    ),
    # GLM-4: interleaved partial RoPE, q / k adapters on their own modules
    "glm": (("q_proj", "k_proj", "gate_up_proj"), {"architecture": "glm"}),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_adapters_of_other_layouts_match_hf_peft(tmp_path: Path, case: str) -> None:
    """PEFT trains and saves an adapter on HF's own model class (Phi-3, Granite, Phi-4-mini,
    GLM-4): the runtime's prompt log-probabilities and greedy tokens with it are PEFT's
    (decodes on the native CPU decoder, head_dim 16)."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    targets, extra = PEFT_CASES[case]
    ckpt = write_random_checkpoint(
        tmp_path / case, seed=4, **{**dict(TINY_SHAPES, num_heads=4), **extra}
    )
    base = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False)
    model = get_peft_model(base, config).eval()
    model.save_pretrained(str(tmp_path / "adapter"))
    spec = AdapterSpec.load("p", str(tmp_path / "adapter"), ModelConfig.from_pretrained(ckpt))
    if case == "phi3":
        qkv = [m for m in spec.modules if m.name.startswith("model.layers.0.self_attn.")]
        assert [(m.name.rsplit(".", 1)[1], m.b_rows) for m in qkv] == [
            ("k_proj", (64, 128)), ("o_proj", None), ("q_proj", (0, 64)), ("v_proj", (128, 192))
        ]  # fmt: skip
    prompt, n = _prompt(37, seed=6), 6
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=torch.tensor([prompt])).logits[0], dim=-1)
        mask = torch.ones(1, len(prompt), dtype=torch.long)
        ids = model.generate(
            input_ids=torch.tensor([prompt]), attention_mask=mask, max_new_tokens=n,
            min_new_tokens=n, do_sample=False,
        )[0].tolist()  # fmt: skip
    want_prompt = ref[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    lora = {"p": str(tmp_path / "adapter")}
    with Runtime(model=str(ckpt), session_len=128, lora_modules=lora, **CPU32) as rt:
        (out,) = rt.generate([prompt], _params("p", n, prompt_logprobs=0))
        (plain,) = rt.generate([prompt], _params(None, n, prompt_logprobs=0))
        native = rt.engine.executor.worker.runner.model._native  # type: ignore[union-attr]
        assert native is not None and native[1] is not None  # (decodes ran natively)
    assert out.token_ids == ids[len(prompt) :]
    assert out.prompt_logprobs is not None
    got_prompt = torch.tensor([e.logprob for e in out.prompt_logprobs[1:] if e is not None])
    torch.testing.assert_close(got_prompt, want_prompt, rtol=0, atol=LOGPROB_ATOL)
    assert _prompt_gap(out, plain) > ADAPTER_GAP  # (the adapter visibly acts)


# -- oracle 2: the merged checkpoint --------------------------------------------------------------

MIXED_PROMPTS = [LONG, LONG, LONG, SHORT, SHORT]
MIXED_ADAPTERS: list[Adapter] = [None, "a1", "a2", "a1", None]


def _mixed_params() -> list[SamplingParams]:
    return [_params(a, prompt_logprobs=0) for a in MIXED_ADAPTERS]


def _assert_mixed(outs: list[RequestOutput], refs: list[RequestOutput]) -> None:
    for i, (got, want) in enumerate(zip(outs, refs, strict=True)):
        _assert_same(got, want, f"request {i} (adapter {MIXED_ADAPTERS[i]})")
    # the same prompt through the base model and each adapter: three different answers
    assert len({tuple(o.token_ids) for o in outs[:3]}) == 3
    assert _prompt_gap(outs[0], outs[1]) > ADAPTER_GAP
    assert _prompt_gap(outs[0], outs[2]) > ADAPTER_GAP
    assert _prompt_gap(outs[1], outs[2]) > ADAPTER_GAP
    assert _prompt_gap(outs[3], outs[4]) > ADAPTER_GAP


@pytest.mark.parametrize("layout", ["llama", "internlm2"])
def test_mixed_batch_matches_merged_checkpoints(
    request: pytest.FixtureRequest, reference: Reference, layout: str
) -> None:
    """Base, a1, a2 on one long prompt and a1 and base on a short one, in one batch: chunked
    prefill (70 tokens in steps of 32, beside the short prompts' decode steps), then decode
    steps mixing every adapter; each request gets its own merged checkpoint's answer."""
    family: Family = request.getfixturevalue(layout)
    rt: Runtime = request.getfixturevalue(f"{layout}_rt")
    params = _mixed_params()
    steps_before = rt.engine.stats()["num_steps"]
    outs = rt.generate(MIXED_PROMPTS, params)
    # the long prompt needed several steps: it was chunked
    assert rt.engine.stats()["num_steps"] - steps_before >= math.ceil(len(LONG) / BUDGET) + 7
    _assert_mixed(outs, reference(family, MIXED_PROMPTS, params))


@pytest.mark.parametrize("ahead", [False, True], ids=["step-by-step", "launched-ahead"])
def test_decode_graphs_take_each_rows_adapter(
    llama: Family, reference: Reference, monkeypatch: pytest.MonkeyPatch, ahead: bool
) -> None:
    """Decode steps replayed from the graphs (emulated on CPU: the graphs' fixed buffers, the
    LoRA kernels' torch twin) read each row's adapter slot from the graphs' slot buffer: base
    and adapter rows in one replay answer as their merged checkpoints. Launched ahead
    (DIST_RUNTIME_ASYNC_DECODE=1, greedy picks taken on the device) the slots go along."""
    from workers.model_runner import ModelRunner

    monkeypatch.setattr(ModelRunner, "_decode_graph_mode", lambda self: "emulate")
    monkeypatch.setenv("DIST_RUNTIME_ASYNC_DECODE", "1" if ahead else "0")
    params = [
        dataclasses.replace(p, logprobs=None) if ahead else p
        for p in (_params(a) for a in MIXED_ADAPTERS)
    ]
    with _lora_runtime(llama) as rt:
        outs = rt.generate(MIXED_PROMPTS, params)
        executor: Any = rt.engine.executor
        graphs = executor.worker.runner.graphs
        assert graphs is not None and graphs.lora_slots is not None
        assert graphs.num_lora_replays >= 5  # decode steps with adapter rows replayed
        assert (rt.engine.num_steps_ahead > 0) == ahead
    refs = reference(llama, MIXED_PROMPTS, params)
    for i, (got, want) in enumerate(zip(outs, refs, strict=True)):
        assert got.token_ids == want.token_ids, f"request {i} (adapter {MIXED_ADAPTERS[i]})"
        if not ahead:
            _assert_same(got, want, f"request {i}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_decode_graphs_with_adapters(llama: Family, reference: Reference) -> None:
    """On a GPU: the decode graphs captured with the LoRA kernels (Triton shrink / expand)
    replay mixed batches; fp32 weights, so each request's tokens equal its merged checkpoint's
    on the CPU."""
    params = [_params(a) for a in MIXED_ADAPTERS]
    with Runtime(
        model=str(llama.ckpt),
        lora_modules=llama.lora_modules,
        session_len=256,
        device="cuda",
        dtype="float32",
        cache=CACHE,
        scheduler=SchedulerConfig(max_num_batched_tokens=BUDGET, max_num_seqs=8),
    ) as rt:
        outs = rt.generate(MIXED_PROMPTS, params)
        graphs = rt.engine.executor.worker.runner.graphs  # type: ignore[union-attr]
        assert graphs is not None and graphs.num_lora_replays >= 5
    refs = reference(llama, MIXED_PROMPTS, params)
    for i, (got, want) in enumerate(zip(outs, refs, strict=True)):
        assert got.token_ids == want.token_ids, f"request {i} (adapter {MIXED_ADAPTERS[i]})"


def test_adapter_alone_and_base_alone_after_mixing(
    llama: Family, llama_rt: Runtime, reference: Reference
) -> None:
    """Steps with only base rows (the native decoder) and only one adapter's rows (every row
    adapted) between mixed ones still give the references' answers."""
    prompt = _prompt(25, seed=9)
    for adapter in (None, "a2", None, "a1"):
        params = [_params(adapter)]
        (got,) = llama_rt.generate([prompt], params)
        (want,) = reference(llama, [prompt], params)
        _assert_same(got, want, str(adapter))


def test_preempted_adapter_requests_recompute_with_their_adapter(
    llama: Family, reference: Reference, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KV cache too small for the batch preempts the adapter requests (the least important);
    recomputed, each keeps its adapter (the worker learns it again with the reset sequence)."""
    preempted: list[Adapter] = []
    preempt = Scheduler._preempt

    def spy(self: Scheduler, seq: Any) -> None:
        preempted.append(seq.params.adapter)
        preempt(self, seq)

    monkeypatch.setattr(Scheduler, "_preempt", spy)
    prompts = [_prompt(40, seed=s) for s in (11, 12, 13)]
    params = [_params(a, 24, priority=p) for a, p in ((None, 0), ("a1", 1), ("a2", 1))]
    cache = CacheConfig(block_size=BLOCK_SIZE, num_blocks=9, enable_prefix_caching=False)
    with _lora_runtime(llama, cache=cache) as rt:
        outs = rt.generate(prompts, params)
    assert preempted and set(preempted) <= {"a1", "a2"}
    for i, (got, want) in enumerate(zip(outs, reference(llama, prompts, params), strict=True)):
        _assert_same(got, want, f"request {i}")


# -- prefix cache ---------------------------------------------------------------------------------


def test_prefix_cache_never_shares_base_and_adapter_kv(
    llama: Family, llama_rt: Runtime, reference: Reference
) -> None:
    """A 40-token prompt (two full blocks) run with the base model, then an adapter, then the
    other adapter, then the first adapter again; and another prompt the other way round. Each
    run answers as its reference; only a repeat of the same model hits the cache."""
    full = (40 - 1) // BLOCK_SIZE * BLOCK_SIZE  # the last token is always computed
    for seed, order in ((21, [None, "a1", "a2", "a1", None]), (22, ["a2", None, "a1", "a2"])):
        prompt = _prompt(40, seed=seed)
        wants = {a: reference(llama, [prompt], [_params(a)])[0] for a in set(order)}
        seen: dict[Adapter, RequestOutput] = {}
        for adapter in order:
            (got,) = llama_rt.generate([prompt], [_params(adapter)])
            _assert_same(got, wants[adapter], f"seed {seed} adapter {adapter}")
            assert got.num_cached_tokens == (full if adapter in seen else 0), (seed, adapter)
            if adapter in seen:
                assert got.token_ids == seen[adapter].token_ids
            seen[adapter] = got
        runs = list(seen.values())
        for i, a in enumerate(runs):
            assert all(_answers_differ(a, b) for b in runs[i + 1 :]), seed


def test_disk_tier_keeps_adapter_blocks_apart_across_restarts(
    llama: Family, reference: Reference, tmp_path: Path
) -> None:
    """The disk tier's keys are salted with the adapter's content hash too: a new runtime reads
    an adapter request's prompt back from disk for the same adapter only (the base model and
    another adapter compute it), and every answer is its merged checkpoint's."""
    cache = CacheConfig(block_size=BLOCK_SIZE, num_blocks=128, kv_cache_dir=str(tmp_path / "kv"))

    def run(adapter: Adapter) -> tuple[RequestOutput, float]:
        with _lora_runtime(llama, cache=cache) as rt:
            (out,) = rt.generate([LONG], [_params(adapter)])
            return out, rt.engine.stats()["prefix_cache_disk_hit_tokens"]

    first, hits = run("a1")
    assert hits == 0
    again, hits = run("a1")
    assert hits == len(LONG) // BLOCK_SIZE * BLOCK_SIZE and again.token_ids == first.token_ids
    for other in (None, "a2"):
        out, hits = run(other)
        assert hits == 0, other
        (want,) = reference(llama, [LONG], [_params(other)])
        assert out.token_ids == want.token_ids
    (want,) = reference(llama, [LONG], [_params("a1")])
    assert first.token_ids == want.token_ids


def test_shared_prefix_pass_runs_with_the_adapter(
    llama: Family, llama_rt: Runtime, reference: Reference
) -> None:
    """share_prefix computes the prompts' common prefix once first: with an adapter, through
    the adapter (the prompts then hit those blocks and answer as the merged checkpoint)."""
    head = _prompt(36, seed=31)
    prompts = [head + _prompt(5, seed=32), head + _prompt(7, seed=33)]
    for adapter in ("a2", None):
        params = [_params(adapter)] * 2
        handles = llama_rt.add_requests(prompts, params, share_prefix=True)
        outs = [h.result() for h in handles]
        for got, want in zip(outs, reference(llama, prompts, params), strict=True):
            _assert_same(got, want, str(adapter))
            assert got.num_cached_tokens == 2 * BLOCK_SIZE


# -- speculative decoding and guided output -------------------------------------------------------


@pytest.fixture(scope="module")
def spec_rt(llama: Family) -> Iterator[Runtime]:
    """Speculative decoding with drafts of a fixed length: as long as the prompt lookup (or a
    prediction) finds, up to 3 tokens."""
    sched = SchedulerConfig(
        num_speculative_tokens=3,
        draft_policy="fixed",
        max_num_batched_tokens=BUDGET,
        max_num_seqs=8,
    )
    with _lora_runtime(llama, scheduler=sched) as rt:
        yield rt


def test_prompt_lookup_speculation_with_adapters(
    llama: Family, spec_rt: Runtime, reference: Reference
) -> None:
    """num_speculative_tokens=3 (prompt lookup): these answers repeat themselves (the prompts
    were picked for it), so drafts are proposed, checked with each request's adapter in steps
    that also hold other adapters' rows, and partly kept; every answer is its reference's."""
    prompts = [_prompt(20, seed=s) for s in (101, 103, 100, 104)]
    params = [_params(a, 24) for a in ("a1", "a2", None, "a2")]
    outs = spec_rt.generate(prompts, params)
    for i, (got, want) in enumerate(zip(outs, reference(llama, prompts, params), strict=True)):
        _assert_same(got, want, f"request {i}")
    for i in (0, 1, 3):  # every adapter request checked drafts; some were kept
        assert outs[i].num_draft_tokens > 0, i
    assert sum(outs[i].num_accepted_draft_tokens for i in (0, 1, 3)) >= 3


def test_predictions_checked_with_the_adapter(
    llama: Family, spec_rt: Runtime, reference: Reference
) -> None:
    """A prediction drafts tokens that one step checks through the adapter: the adapter's own
    answer as the prediction is all kept; the base model's answer (which starts the same) is
    cut where the two part."""
    prompt = _prompt(30, seed=41)
    n = 13
    want, base = reference(llama, [prompt, prompt], [_params(a, n) for a in ("a1", None)])
    assert want.token_ids[0] == base.token_ids[0] and want.token_ids != base.token_ids
    own, other = spec_rt.generate(
        [prompt, prompt],
        [_params("a1", n, prediction=tuple(o.token_ids)) for o in (want, base)],
    )
    _assert_same(own, want, "own prediction")
    # the first token comes from the prompt's step, then 3 steps each keep 3 drafted tokens
    # and add the one sampled after them
    assert own.num_draft_tokens == own.num_accepted_draft_tokens == 9
    _assert_same(other, want, "base prediction")
    assert other.num_draft_tokens > 0 and other.num_accepted_draft_tokens < 9
    assert other.num_accepted_draft_tokens < other.num_draft_tokens


def test_guided_choice_with_an_adapter(
    llama: Family, llama_rt: Runtime, reference: Reference
) -> None:
    """Guided output masks the adapter's logits: one of the choices, the merged model's."""
    choices = ("yes", "no", "maybe so")
    prompts = ["Answer: ", "Is it? ", "Well "]
    ids = [llama_rt.encode(p) for p in prompts]
    params = [
        SamplingParams(max_new_tokens=8, adapter=a, guided_choice=choices, logprobs=0)
        for a in ("a1", "a2", None)
    ]
    outs = llama_rt.generate(ids, params)
    for i, (got, want) in enumerate(zip(outs, reference(llama, ids, params), strict=True)):
        assert got.text in choices and got.finish_reason == "stop"
        _assert_same(got, want, f"request {i}")
        assert got.text == want.text


# -- tensor parallelism ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["llama", "internlm2", "one_kv_head"])
def test_tp2_matches_the_references(
    request: pytest.FixtureRequest, ray_cluster: Any, reference: Reference, layout: str
) -> None:
    """tp=2 over Ray: each rank holds its shard of A and B (column layers: all of A, its rows
    of B; row layers: its columns of A, all of B, summed by the all-reduce); the mixed batch
    answers as the tp=1 merged references."""
    family: Family = request.getfixturevalue(layout)
    params = _mixed_params()
    with _lora_runtime(family, tp=2) as rt:
        assert rt.engine.executor is not None
        assert len(rt.engine.executor.weight_bytes_read) == 2
        outs = rt.generate(MIXED_PROMPTS, params)
    _assert_mixed(outs, reference(family, MIXED_PROMPTS, params))


def test_cp2_matches_the_references(llama: Family, ray_cluster: Any, reference: Reference) -> None:
    """cp=2 over Ray: each cp rank runs the adapters on its share of a prefill chunk's tokens
    (blocks of 4, 8 tokens per step), and on every row of the cp decode steps."""
    params = [_params(a, 12) for a in MIXED_ADAPTERS]  # no prompt_logprobs at cp > 1
    with _lora_runtime(
        llama,
        cp=2,
        cache=CacheConfig(block_size=4, num_blocks=128),
        scheduler=SchedulerConfig(max_num_batched_tokens=8, max_num_seqs=8),
    ) as rt:
        outs = rt.generate(MIXED_PROMPTS, params)
    refs = reference(llama, MIXED_PROMPTS, params)
    for i, (got, want) in enumerate(zip(outs, refs, strict=True)):
        _assert_same(got, want, f"request {i} (adapter {MIXED_ADAPTERS[i]})")
    for i, j in ((0, 1), (0, 2), (1, 2), (3, 4)):
        assert _answers_differ(outs[i], outs[j]), (i, j)


# -- adapters loaded and unloaded while running ---------------------------------------------------


def _room_runtime(family: Family, start: dict[str, str], max_loras: int = 2, **kw: Any) -> Runtime:
    kw.setdefault("cache", CACHE)
    kw.setdefault("scheduler", SchedulerConfig(max_num_batched_tokens=BUDGET, max_num_seqs=8))
    return Runtime(
        model=str(family.ckpt),
        lora_modules=start,
        max_loras=max_loras,
        max_lora_rank=8,
        session_len=256,
        **CPU32,
        **kw,
    )


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_adapters_loaded_and_unloaded_while_running(
    llama: Family, reference: Reference, monkeypatch: pytest.MonkeyPatch, graphs: bool
) -> None:
    """Two reserved slots: a2 loaded after start (after the decode graphs were captured, with
    `graphs`: they read the slots in place) answers as its merged checkpoint beside a1; a name
    loaded already is refused; a1 cannot go while a request of it runs, then goes; its folder
    loaded again under another name answers as a1 did and finds a1's blocks in the prefix
    cache (the same content hash)."""
    from workers.model_runner import ModelRunner

    if graphs:
        monkeypatch.setattr(ModelRunner, "_decode_graph_mode", lambda self: "emulate")
    a1, a2 = (str(llama.adapters[n]) for n in ("a1", "a2"))
    with _room_runtime(llama, {"a1": a1}) as rt:
        assert rt.adapters == ["a1"]
        with pytest.raises(ValueError, match="'a2' is not loaded .* load it"):
            rt.generate([SHORT], [_params("a2")])
        rt.load_adapter("a2", a2)
        assert rt.adapters == ["a1", "a2"]
        outs = rt.generate(MIXED_PROMPTS, _mixed_params())
        assert rt.engine.num_adapter_loads == 1  # a2 went into the free slot at once
        with pytest.raises(AdapterConflictError, match="loaded already"):
            rt.load_adapter("a2", a2)
        handle = rt.engine.add_request(LONG, _params("a1", 40))
        while not handle.num_computed_prompt_tokens:
            time.sleep(0.01)
        with pytest.raises(AdapterConflictError, match="answers 1 request"):
            rt.unload_adapter("a1")
        assert rt.engine.adapter_stats() in ({"a1": (1, 0), "a2": (0, 0)}, {"a2": (0, 0)})
        first = handle.result()
        assert rt.engine.adapter_stats() == {"a1": (0, 0), "a2": (0, 0)}
        rt.unload_adapter("a1")
        with pytest.raises(AdapterNotFoundError):
            rt.unload_adapter("a1")
        with pytest.raises(ValueError, match="'a1' is not loaded"):
            rt.generate([SHORT], [_params("a1")])
        rt.load_adapter("again", a1)
        (again,) = rt.generate([LONG], [_params("again", 40)])
        if graphs:
            executor: Any = rt.engine.executor
            assert executor.worker.runner.graphs.num_lora_replays >= 10
    _assert_mixed(outs, reference(llama, MIXED_PROMPTS, _mixed_params()))
    assert again.token_ids == first.token_ids
    assert again.num_cached_tokens >= BLOCK_SIZE  # a1's prompt blocks, found by content hash
    (want,) = reference(llama, [LONG], [_params("a1", 40)])
    assert first.token_ids == want.token_ids


def test_more_adapters_than_slots_take_turns(llama: Family, reference: Reference) -> None:
    """One slot, four adapters registered (a1, a2, and their folders again as b1, b2): a batch
    naming all of them runs each adapter's requests while it holds the slot and loads the next
    when none of them runs (the least recently used gives way), from the workers' host cache
    after the first read of each folder; every answer is its merged checkpoint's."""
    a1, a2 = (str(llama.adapters[n]) for n in ("a1", "a2"))
    start = {"a1": a1, "a2": a2, "b1": a1, "b2": a2}
    names: list[Adapter] = ["a1", "a2", None, "b1", "a1", "b2", None]
    prompts = [_prompt(12 + i, seed=40 + i) for i in range(len(names))]
    with _room_runtime(llama, start, max_loras=1) as rt:
        assert rt.adapters == ["a1", "a2", "b1", "b2"]
        outs = rt.generate(prompts, [_params(n) for n in names])
        loads = rt.engine.num_adapter_loads
        executor: Any = rt.engine.executor
        runner = executor.worker.runner
        assert runner.num_adapter_slots == 1
        # two folders' contents: each read once, then copied from the host cache
        assert runner.lora.num_file_reads == 2
        assert runner.lora.num_host_hits == loads + 1 - 2
    assert loads >= 3  # a2, b1, b2 each took the slot after a1 (a1's two requests ran together)
    refs = reference(
        llama, prompts, [_params({"b1": "a1", "b2": "a2"}.get(n or "", n)) for n in names]
    )
    for i, (got, want) in enumerate(zip(outs, refs, strict=True)):
        _assert_same(got, want, f"request {i} (adapter {names[i]})")


def test_an_adapter_whose_file_went_fails_only_its_request(
    llama: Family, reference: Reference, tmp_path: Path
) -> None:
    """An adapter registered while its folder was fine, then cut short before a request loads
    it into the slot: that request fails naming it, the base and the resident adapter's
    requests in the same batch answer, and the slot serves again."""
    import shutil

    broken = Path(shutil.copytree(llama.adapters["a2"], tmp_path / "a2"))
    with _room_runtime(llama, {"a1": str(llama.adapters["a1"])}, max_loras=1) as rt:
        rt.load_adapter("broken", str(broken))  # registered: the one slot holds a1
        weights = broken / ADAPTER_WEIGHTS
        weights.write_bytes(weights.read_bytes()[:200])
        handles = [rt.engine.add_request(SHORT, _params(name)) for name in ("a1", "broken", None)]
        with pytest.raises(ValueError, match="loading LoRA adapter 'broken' failed"):
            handles[1].result(timeout=60)
        ok = [handles[0].result(timeout=60), handles[2].result(timeout=60)]
        (again,) = rt.generate([SHORT], [_params("a1")])
    refs = reference(llama, [SHORT, SHORT], [_params("a1"), _params(None)])
    for got, want in zip(ok, refs, strict=True):
        _assert_same(got, want)
    assert again.token_ids == refs[0].token_ids


def test_adapters_fixed_at_start_cannot_change(llama: Family) -> None:
    with _lora_runtime(llama) as rt:
        with pytest.raises(ValueError, match="fixed at start; start it with max_loras"):
            rt.load_adapter("a3", str(llama.adapters["a1"]))
        with pytest.raises(ValueError, match="fixed at start"):
            rt.unload_adapter("a1")
        assert rt.adapters == ["a1", "a2"]


def test_reserved_slots_are_checked(llama: Family, tmp_path: Path) -> None:
    big = write_random_adapter(tmp_path / "r16", llama.ckpt, rank=16, seed=5)
    with pytest.raises(ConfigError, match="rank 16, over the 8 the reserved slots hold"):
        _room_runtime(llama, {"big": str(big)})
    with pytest.raises(ConfigError, match="set max_loras too"):
        Runtime(model=str(llama.ckpt), max_lora_rank=8, session_len=256, **CPU32)
    with pytest.raises(ConfigError, match="max_cpu_loras keeps adapters for the slots"):
        Runtime(model=str(llama.ckpt), max_cpu_loras=4, session_len=256, **CPU32)
    with _room_runtime(llama, {}) as rt:
        with pytest.raises(ConfigError, match="rank 16, over the 8"):
            rt.load_adapter("big", str(big))
        with pytest.raises(ConfigError, match="no such directory"):
            rt.load_adapter("gone", str(tmp_path / "gone"))
        assert rt.adapters == []
        rt.load_adapter("a1", str(llama.adapters["a1"]))  # the slots are still free
        assert rt.adapters == ["a1"]


def test_adapters_loaded_over_ray_survive_a_worker_restart(
    llama: Family, ray_cluster: Any, reference: Reference
) -> None:
    """tp=2: every worker loads the adapter into its slot; after a worker dies the new group
    loads the adapters loaded then (a2, added at run time; not a1, unloaded), and a2 answers
    as its merged checkpoint again."""
    params = [_params("a2"), _params(None)]
    prompts = [SHORT, SHORT]
    with _room_runtime(llama, {"a1": str(llama.adapters["a1"])}, tp=2) as rt:
        rt.load_adapter("a2", str(llama.adapters["a2"]))
        rt.unload_adapter("a1")
        before = rt.generate(prompts, params)
        executor: Any = rt.engine.executor
        ray_cluster.kill(executor.actors[1], no_restart=True)
        deadline = time.monotonic() + 60
        while rt.num_worker_restarts == 0:
            with contextlib.suppress(Exception):  # the dead worker's step fails: a new group
                rt.generate([SHORT], [_params(None, 2)])
            assert time.monotonic() < deadline, "the worker group was not replaced"
        assert rt.adapters == ["a2"]
        after = rt.generate(prompts, params)
    refs = reference(llama, prompts, params)
    for got in (before, after):
        for i, (g, want) in enumerate(zip(got, refs, strict=True)):
            _assert_same(g, want, f"request {i}")


@pytest.mark.parametrize("layout", ["llama", "internlm2"])
def test_bytes_per_worker_is_what_the_worker_holds(
    request: pytest.FixtureRequest, layout: str
) -> None:
    """The in-process worker's stacked A and B tensors, summed, are the estimate at tp=1
    (`lora_bytes_per_worker`, the --dry-run figure)."""
    from workers.layers.linear import _Linear

    rt: Runtime = request.getfixturevalue(f"{layout}_rt")
    executor: Any = rt.engine.executor
    model = executor.worker.runner.model
    held = sum(
        t.numel() * t.element_size()
        for m in model.modules()
        if isinstance(m, _Linear) and m.lora is not None
        for t in (m.lora.a, m.lora.b)
    )
    specs = list(rt.engine.adapters.values())
    assert held > 0 and held == lora_bytes_per_worker(specs, rt.model_config, 1, 4)
    # reserved slots (max_loras 2 of rank 8): every projection, each part 8 wide, 3 slots
    family: Family = request.getfixturevalue(layout)
    with _room_runtime(family, {}) as room_rt:
        room_model = room_rt.engine.executor.worker.runner.model  # type: ignore[union-attr]
        held = sum(
            t.numel() * t.element_size()
            for m in room_model.modules()
            if isinstance(m, _Linear) and m.lora is not None
            for t in (m.lora.a, m.lora.b)
        )
    assert held == lora_bytes_per_worker([], rt.model_config, 1, 4, room=(3, 8))


# -- requests naming adapters ---------------------------------------------------------------------


def test_unknown_adapter_is_refused_and_nothing_else_is_lost(
    llama: Family, llama_rt: Runtime, reference: Reference
) -> None:
    prompt = _prompt(30, seed=51)
    running = llama_rt.add_requests([prompt], [_params("a1", 16)])
    with pytest.raises(ValueError, match="is not loaded") as info:
        llama_rt.generate([prompt, prompt], [_params("a2"), _params("nope")])
    message = str(info.value)
    assert "'nope'" in message and "'a1'" in message and "'a2'" in message
    assert "prompt 1" in message
    (want,) = reference(llama, [prompt], [_params("a1", 16)])
    _assert_same(running[0].result(), want, "queued before")
    (after,) = llama_rt.generate([prompt], [_params("a2")])
    _assert_same(after, reference(llama, [prompt], [_params("a2")])[0], "after")
    # the refused batch queued nothing: every request that was added has finished
    assert llama_rt.engine.wait_idle(timeout=30)
    stats = llama_rt.engine.stats()
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0


def test_adapter_without_lora_modules_is_refused(llama: Family) -> None:
    with Runtime(model=str(llama.ckpt), session_len=128, cache=CACHE, **CPU32) as rt:
        with pytest.raises(ValueError, match=r"adapter 'a1' is not loaded \(loaded: none\)"):
            rt.generate([[5, 6, 7]], _params("a1"))
        assert len(rt.generate([[5, 6, 7]], _params(None))[0].token_ids) == 8


@pytest.mark.parametrize("bad", ["", 3, b"a1"])
def test_sampling_params_adapter_must_be_a_name(bad: Any) -> None:
    with pytest.raises(ValueError, match="adapter must be a LoRA adapter's name or None"):
        SamplingParams(adapter=bad)


# -- configuration errors -------------------------------------------------------------------------


def test_missing_folder_fails_before_workers_start(
    llama: Family, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    started: list[bool] = []
    monkeypatch.setattr(Engine, "_start_workers", lambda self: started.append(True))
    for tp in (1, 2):
        with pytest.raises(ConfigError, match="no such directory"):
            Runtime(
                model=str(llama.ckpt),
                tp=tp,
                lora_modules={"a1": str(llama.adapters["a1"]), "x": str(tmp_path / "gone")},
                **CPU32,
            )
    assert not started


@pytest.mark.parametrize(
    ("value", "phrase"),
    [
        (["a=/x"], "must be a mapping"),
        ({"": "/x"}, "adapter name ''"),
        ({"-a": "/x"}, "adapter name '-a'"),
        ({"a b": "/x"}, "adapter name 'a b'"),
        ({"a" * 129: "/x"}, "must be 1-128 letters"),
        ({1: "/x"}, "adapter name 1"),
        ({"a": ""}, "adapter 'a' needs a folder path"),
        ({"a": None}, "adapter 'a' needs a folder path"),
    ],
)
def test_bad_lora_modules_are_refused(llama: Family, value: Any, phrase: str) -> None:
    with pytest.raises(ConfigError, match="lora_modules") as info:
        RuntimeConfig(model=str(llama.ckpt), lora_modules=value)
    assert phrase in str(info.value)


def test_good_adapter_names(llama: Family) -> None:
    names = {"sql-lora": "/x", "org/model@v1.2+x:y_z": "/y", "a" * 128: "/z", "7": "/w"}
    assert RuntimeConfig(model=str(llama.ckpt), lora_modules=names).lora_modules == names


def test_parse_lora_modules() -> None:
    assert parse_lora_modules(["a=/x", '{"name": "b", "path": "/y"}', "c=/p=q"]) == {
        "a": "/x",
        "b": "/y",
        "c": "/p=q",
    }
    assert parse_lora_modules([]) == {}
    for items, phrase in [
        (["a=/x", "a=/y"], "names 'a' twice"),
        (["a=/x", '{"name": "a", "path": "/y"}'], "names 'a' twice"),
        (["/adapters/sql"], "must be NAME=DIR"),
        (["=/x"], "needs a name and a directory"),
        (["a="], "needs a name and a directory"),
        (['{"name": "b"}'], "needs a name and a directory"),
        (['{"name": "b", "path": 3}'], "needs a name and a directory"),
        (['{"name": "b",'], "is not valid JSON"),
    ]:
        with pytest.raises(ConfigError) as info:
            parse_lora_modules(items)
        assert phrase in str(info.value), items


@pytest.fixture(scope="module")
def llama_config(llama: Family) -> ModelConfig:
    return RuntimeConfig(model=str(llama.ckpt)).load_model_config()


def test_adapter_spec_reads_ranks_and_scales(llama: Family, llama_config: ModelConfig) -> None:
    a1 = AdapterSpec.load("a1", str(llama.adapters["a1"]), llama_config)
    assert len(a1.modules) == 2 * 7 and a1.max_rank == 8
    assert {m.scale for m in a1.modules} == {16.0 / 8}
    a2 = AdapterSpec.load("a2", str(llama.adapters["a2"]), llama_config)
    by_name = {m.name: m for m in a2.modules}
    assert sorted(by_name) == sorted(
        f"model.layers.1.{m}"
        for m in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj")
        + ("mlp.down_proj",)
    )
    assert by_name["model.layers.1.mlp.down_proj"].rank == 4
    assert by_name["model.layers.1.self_attn.v_proj"].rank == 2
    assert by_name["model.layers.1.self_attn.q_proj"].rank == 8
    for m in a2.modules:  # rsLoRA: alpha / sqrt(r)
        assert m.scale == pytest.approx(8.0 / math.sqrt(m.rank))
    assert a1.digest != a2.digest
    assert AdapterSpec.load("other", str(llama.adapters["a1"]), llama_config).digest == a1.digest
    # Memory by hand (hidden 64, inter 160, 4 heads and 2 KV heads of 16, 2 layers, fp32): per
    # layer and slot, rank x (in + out) of q/k/v (ranks added: 24), o, gate/up (16) and down.
    per_slot = 24 * (64 + 128) + 8 * (64 + 64) + 16 * (64 + 320) + 8 * (160 + 64)
    assert lora_bytes_per_worker([a1], llama_config, 1, 4) == 2 * 2 * per_slot * 4
    # tp=2: q/k/v out 2 + 2 heads, o in 32, gate/up out 160, down in 80
    per_slot = 24 * (64 + 64) + 8 * (32 + 64) + 16 * (64 + 160) + 8 * (80 + 64)
    assert lora_bytes_per_worker([a1], llama_config, 2, 4) == 2 * 2 * per_slot * 4
    # a2 (layer 1 only, smaller ranks) takes a third slot of a1's ranks everywhere
    per_slot = 24 * (64 + 128) + 8 * (64 + 64) + 16 * (64 + 320) + 8 * (160 + 64)
    assert lora_bytes_per_worker([a1, a2], llama_config, 1, 4) == 2 * 3 * per_slot * 4
    # reserved: 2 slots of rank 8 (+ the base model's): each part 8 wide, as a1 everywhere
    assert lora_bytes_per_worker([], llama_config, 1, 4, room=(3, 8)) == 2 * 3 * per_slot * 4


def test_rank_pattern_regex_key_as_peft_reads_it(
    tmp_path: Path, llama: Family, llama_config: ModelConfig
) -> None:
    """PEFT reads rank_pattern keys as regular expressions over a module name's dotted suffix:
    {"q_proj|v_proj": 4} gives both q_proj and v_proj rank 4 (PEFT loads this folder)."""

    def rank4(t: dict[str, torch.Tensor]) -> None:
        for k, v in t.items():
            t[k] = (v[:4] if ".lora_A." in k else v[:, :4]).contiguous()

    folder = write_random_adapter(
        tmp_path / "ad", llama.ckpt, targets=("q_proj", "v_proj"), rank=8, layers=(0,)
    )
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    rank4(tensors)
    save_file(tensors, str(folder / ADAPTER_WEIGHTS))
    cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
    cfg["rank_pattern"] = {"q_proj|v_proj": 4}
    (folder / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    spec = AdapterSpec.load("re", str(folder), llama_config)
    assert [m.rank for m in spec.modules] == [4, 4]


def _craft(
    root: Path,
    ckpt: Path,
    config: dict[str, Any] | None = None,
    edit: Callable[[dict[str, torch.Tensor]], None] | None = None,
) -> Path:
    """A valid adapter (q_proj and down_proj of layer 0, rank 4), its config updated with
    `config` and its tensors changed by `edit`."""
    folder = write_random_adapter(
        root, ckpt, targets=("q_proj", "down_proj"), rank=4, alpha=8.0, layers=(0,)
    )
    if config:
        cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
        cfg.update(config)
        (folder / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    if edit:
        tensors = load_file(str(folder / ADAPTER_WEIGHTS))
        edit(tensors)
        save_file(tensors, str(folder / ADAPTER_WEIGHTS))
    return folder


Q = "base_model.model.model.layers.0.self_attn.q_proj"
DOWN = "base_model.model.model.layers.0.mlp.down_proj"


def _drop(key: str) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda t: t.__delitem__(key)


def _set(key: str, shape: tuple[int, ...]) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda t: t.__setitem__(key, torch.zeros(shape))


BAD_FOLDERS: dict[str, tuple[dict[str, Any] | None, Any, list[str]]] = {
    "dora": ({"use_dora": True}, None, ["DoRA", "use_dora", "merge_and_unload"]),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, None, ["modules_to_save"]),
    "bias": ({"bias": "lora_only"}, None, ["bias 'lora_only'", "biases"]),
    "fan_in_fan_out": ({"fan_in_fan_out": True}, None, ["fan_in_fan_out", "Conv1D"]),
    "ia3": ({"peft_type": "IA3"}, None, ["peft_type 'IA3'", "not a LoRA adapter"]),
    "r0": ({"r": 0}, None, ["needs r > 0, got 0"]),
    "r_text": ({"r": "4"}, None, ["needs r > 0, got '4'"]),
    "r_bool": ({"r": True}, None, ["needs r > 0, got True"]),
    "alpha": ({"lora_alpha": -1}, None, ["needs lora_alpha > 0, got -1"]),
    "alpha_missing": ({"lora_alpha": None}, None, ["needs lora_alpha > 0, got None"]),
    "bias_tensor": (None, _set(f"{Q}.bias", (64,)), [f"{Q}.bias", "is a bias"]),
    "magnitude": (
        None,
        _set(f"{Q}.lora_magnitude_vector", (64,)),
        ["lora_magnitude_vector", "not a lora_A / lora_B weight"],
    ),
    "embedding": (
        None,
        _set("base_model.model.model.embed_tokens.lora_A.weight", (4, 512)),
        ["model.embed_tokens", "an embedding or the LM head"],
    ),
    "lm_head": (
        None,
        _set("base_model.model.lm_head.lora_B.weight", (512, 4)),
        ["'lm_head'", "an embedding or the LM head"],
    ),
    "norm": (
        None,
        _set("base_model.model.model.layers.0.input_layernorm.lora_A.weight", (4, 64)),
        ["input_layernorm", "not one of the model's attention or MLP projections"],
    ),
    "a_without_b": (None, _drop(f"{Q}.lora_B.weight"), ["has lora_A but not both A and B"]),
    "b_without_a": (None, _drop(f"{DOWN}.lora_A.weight"), ["has lora_B but not both A and B"]),
    "other_model": (
        None,
        _set(f"{Q}.lora_A.weight", (4, 32)),
        ["lora_A [4, 32]", "[r, 64]", "trained on another model?"],
    ),
    "b_rows": (None, _set(f"{DOWN}.lora_B.weight", (32, 4)), ["[64, r]", "another model?"]),
    "ranks_differ": (None, _set(f"{Q}.lora_B.weight", (64, 3)), ["another model?"]),
    "rank_vs_r": ({"r": 8}, None, ["has rank 4 but adapter_config.json says 8"]),
    "rank_pattern": (
        {"rank_pattern": {"down_proj": 2}},
        None,
        ["mlp.down_proj' has rank 4 but adapter_config.json says 2"],
    ),
    "no_tensors": (None, lambda t: t.clear(), ["holds no lora_A / lora_B tensors"]),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_adapter_folder(
    case: str, tmp_path: Path, llama: Family, llama_config: ModelConfig
) -> None:
    config, edit, phrases = BAD_FOLDERS[case]
    folder = _craft(tmp_path / "ad", llama.ckpt, config, edit)
    with pytest.raises(ConfigError) as info:
        AdapterSpec.load("bad", str(folder), llama_config)
    message = str(info.value)
    assert message.startswith(f"LoRA adapter 'bad' ({folder}): ")
    for phrase in phrases:
        assert phrase in message, (case, message)


def test_crafted_folder_is_valid_before_edits(
    tmp_path: Path, llama: Family, llama_config: ModelConfig
) -> None:
    """The cases above fail for their edit only."""
    spec = AdapterSpec.load("ok", str(_craft(tmp_path / "ad", llama.ckpt)), llama_config)
    assert [m.rank for m in spec.modules] == [4, 4] and spec.max_rank == 4


def test_missing_files(tmp_path: Path, llama: Family, llama_config: ModelConfig) -> None:
    def refused(folder: Path) -> str:
        with pytest.raises(ConfigError) as info:
            AdapterSpec.load("x", str(folder), llama_config)
        return str(info.value)

    assert "no such directory" in refused(tmp_path / "gone")
    folder = _craft(tmp_path / "ad", llama.ckpt)
    (folder / ADAPTER_WEIGHTS).rename(tmp_path / "weights")
    message = refused(folder)
    assert f"{ADAPTER_WEIGHTS} is missing" in message and "adapter_model.bin" not in message
    (folder / "adapter_model.bin").write_bytes(b"pickle")
    message = refused(folder)
    assert f"{ADAPTER_WEIGHTS} is missing" in message
    assert "adapter_model.bin" in message and "safe_serialization=True" in message
    (tmp_path / "weights").rename(folder / ADAPTER_WEIGHTS)
    (folder / ADAPTER_CONFIG).unlink()
    assert f"{ADAPTER_CONFIG} is missing; is it a PEFT LoRA folder?" in refused(folder)
    (folder / ADAPTER_CONFIG).write_text("{r: 4")
    assert "is not valid JSON" in refused(folder)
    (folder / ADAPTER_CONFIG).write_text("[4]")
    assert "must hold a JSON object" in refused(folder)
    folder = _craft(tmp_path / "ad2", llama.ckpt)
    (folder / ADAPTER_WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    assert f"{ADAPTER_WEIGHTS} cannot be read" in refused(folder)


def test_adapter_of_the_other_layout_is_refused(
    internlm2: Family, llama: Family, llama_config: ModelConfig
) -> None:
    with pytest.raises(ConfigError, match="model.layers.0.attention.w") as info:
        AdapterSpec.load("a1", str(internlm2.adapters["a1"]), llama_config)
    assert "not one of the model's attention or MLP projections" in str(info.value)
    assert "(llama names)" in str(info.value)
    with pytest.raises(ConfigError, match="can carry an adapter"):
        Runtime(model=str(internlm2.ckpt), lora_modules={"x": str(llama.adapters["a2"])}, **CPU32)
