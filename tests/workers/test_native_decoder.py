"""CPU decode steps through the native decoder (`kernels/cpu_decoder.py`) give the layer-by-layer
path's hidden states: bit for bit for float32, int8 and int4 caches, with attention biases, a
tied head, both checkpoint layouts, Qwen3's q / k head norms, Gemma 2 / 3's output norms,
GELU, score soft-cap and local RoPE base, and per-request RoPE tables; to
float rounding for a batch over a shared cached prefix (whose two attention partials it merges
in C). Layers with sliding windows (some layers windowed, others not) attend within them as the
layer path does. Stage by stage (the
tp > 1 schedule, here with an identity reduce) equals one call. Steps and models it does not
serve take the layer path.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_runtime.config import (
    CPU_ATTENTION_ENV,
    CPU_DECODE_ENV,
    CacheConfig,
    RuntimeConfig,
    cpu_decode_choice,
)
from dist_runtime.formats.random_checkpoint import write_random_checkpoint
from kernels import cpu_decoder
from kernels.cpu_decoder import CpuDecoder
from kernels.paged_attention import shared_blocks
from tests.conftest import TINY_SHAPES
from workers.distributed import Collectives, MeshCoords
from workers.layers.attention import AttentionMetadata
from workers.layers.rotary import inverse_frequencies
from workers.model_runner import ModelRunner
from workers.models import native_decode

pytestmark = pytest.mark.skipif(
    not cpu_decoder.available(), reason="no C compiler: the native kernels are not built"
)

VOCAB = TINY_SHAPES["vocab_size"]
NUM_BLOCKS = 48
BS = 16
HD16 = dict(TINY_SHAPES, num_heads=4, num_kv_heads=2)
"""hidden 64 over 4 heads: head_dim 16, the smallest the native attention takes."""


GEMMA_WINDOW = 40
"""The sliding window of a Gemma checkpoint's windowed layers here: shorter than the contexts
the tests decode over, so that it hides keys."""


@pytest.fixture(
    scope="module", params=["llama-bias-tied", "internlm2", "qwen3", "gemma2", "gemma3"]
)
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    kinds: dict[str, dict[str, Any]] = {
        "llama-bias-tied": dict(architecture="llama", bias=True, tie_word_embeddings=True),
        "internlm2": dict(architecture="internlm2"),
        "qwen3": dict(architecture="qwen3"),  # (q / k head norms before RoPE)
        # Output norms, GELU, the first layer windowed; Gemma 2's score soft-cap, Gemma 3's
        # head norms and its windowed layer's own RoPE base.
        "gemma2": dict(architecture="gemma2", tie_word_embeddings=True),
        "gemma3": dict(architecture="gemma3", tie_word_embeddings=True),
    }
    extra = kinds[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    write_random_checkpoint(folder, seed=3, **HD16, **extra)
    if request.param.startswith("gemma"):
        config = json.loads((folder / "config.json").read_text())
        config["sliding_window"] = GEMMA_WINDOW
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def make_runner(folder: Path, policy: int = 0) -> ModelRunner:
    config = RuntimeConfig(
        model=str(folder),
        device="cpu",
        dtype="float32",
        cache=CacheConfig(num_blocks=NUM_BLOCKS, block_size=BS, quant_policy=policy),
    )
    runner = ModelRunner(config, Collectives(MeshCoords()))
    runner.allocate_kv_cache(NUM_BLOCKS)
    return runner


class Seqs:
    """Sequences on the worker side of this test: tokens, block tables from a shuffled pool."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.free = list(range(NUM_BLOCKS))
        self.rng.shuffle(self.free)
        self.tokens: list[list[int]] = []
        self.tables: list[list[int]] = []

    def add(self, length: int, share_with: int | None = None, shared_blocks: int = 0) -> int:
        toks = [self.rng.randrange(4, VOCAB) for _ in range(length)]
        table: list[int] = []
        if share_with is not None:
            toks[: shared_blocks * BS] = self.tokens[share_with][: shared_blocks * BS]
            self.cover(share_with, shared_blocks * BS)
            table = self.tables[share_with][:shared_blocks]
        self.tokens.append(toks)
        self.tables.append(table)
        return len(self.tokens) - 1

    def cover(self, i: int, n: int) -> None:
        while len(self.tables[i]) * BS < n:
            self.tables[i].append(self.free.pop())

    def meta(
        self, work: list[tuple[int, int, int]], decode: bool, rope: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(ids, positions, metadata) computing tokens [start, end) of each (seq, start, end)."""
        ids, pos, slots, cu, ctx = [], [], [], [0], []
        for i, start, end in work:
            self.cover(i, end)
            ids += self.tokens[i][start:end]
            pos += list(range(start, end))
            slots += [self.tables[i][p // BS] * BS + p % BS for p in range(start, end)]
            cu.append(cu[-1] + end - start)
            ctx.append(end)
        width = max(len(self.tables[i]) for i, _, _ in work)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            block_tables=torch.tensor(
                [self.tables[i] + [0] * (width - len(self.tables[i])) for i, _, _ in work],
                dtype=torch.int32,
            ),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int64),
            context_lens=torch.tensor(ctx, dtype=torch.int64),
            is_decode=decode,
            rope_inv_freq=rope,
        )
        return torch.tensor(ids), torch.tensor(pos), meta


@pytest.fixture
def fused_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts CpuDecoder.run calls (their batch sizes)."""
    calls: list[int] = []
    real = CpuDecoder.run

    def spy(self: CpuDecoder, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(x.shape[0])
        return real(self, x, *args, **kwargs)

    monkeypatch.setattr(CpuDecoder, "run", spy)
    yield calls


def forward(
    runner: ModelRunner, ids: torch.Tensor, pos: torch.Tensor, meta: AttentionMetadata
) -> torch.Tensor:
    assert runner.kv_cache is not None
    with torch.inference_mode():
        return runner.model(ids, pos, meta, runner.kv_cache.layers).clone()


def both_paths(
    runner: ModelRunner,
    seqs: Seqs,
    work: list[tuple[int, int, int]],
    monkeypatch: pytest.MonkeyPatch,
    rope: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step's hidden states layer by layer, then fused (each writes the same K/V
    of the step's tokens to the same slots)."""
    ids, pos, meta = seqs.meta(work, decode=True, rope=rope)
    monkeypatch.setenv(CPU_DECODE_ENV, "layers")
    layered = forward(runner, ids, pos, meta)
    monkeypatch.delenv(CPU_DECODE_ENV)
    fused = forward(runner, ids, pos, meta)
    return layered, fused


@pytest.mark.parametrize("policy", [0, 8, 4])
def test_decode_steps_equal_the_layer_path_bit_for_bit(
    checkpoint: Path, policy: int, fused_calls: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = make_runner(checkpoint, policy)
    seqs = Seqs(seed=policy)
    lens = [70, 33, 5]
    for n in lens:
        seqs.add(n + 6)
    forward(runner, *seqs.meta([(i, 0, n) for i, n in enumerate(lens)], decode=False))
    assert not fused_calls  # prefill runs layer by layer
    for t in range(6):  # batch 3, then 1 (crossing block boundaries at 80 and 48)
        work = [(i, n + t, n + t + 1) for i, n in enumerate(lens)]
        layered, fused = both_paths(runner, seqs, work if t % 2 == 0 else work[:1], monkeypatch)
        assert torch.equal(layered, fused), f"step {t}: max diff {(layered - fused).abs().max()}"
    assert fused_calls == [3, 1, 3, 1, 3, 1]


def test_per_request_rope_tables(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step whose requests bring their own RoPE base (meta.rope_inv_freq) rotates with their
    frequencies."""
    runner = make_runner(checkpoint)
    seqs = Seqs(seed=7)
    for n in (40, 21):
        seqs.add(n + 1)
    forward(runner, *seqs.meta([(0, 0, 40), (1, 0, 21)], decode=False))
    head_dim = runner.model_config.head_dim
    inv = torch.stack([inverse_frequencies(head_dim, 10000.0), inverse_frequencies(head_dim, 5e5)])
    layered, fused = both_paths(runner, seqs, [(0, 40, 41), (1, 21, 22)], monkeypatch, inv)
    assert torch.equal(layered, fused)
    _, default = both_paths(runner, seqs, [(0, 40, 41), (1, 21, 22)], monkeypatch)
    assert not torch.equal(fused, default)  # the frequencies were used


@pytest.mark.parametrize("policy", [0, 8])
def test_shared_prefix_batch_merges_like_the_layer_path(
    checkpoint: Path, policy: int, fused_calls: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three sequences over one cached 5-block prefix (questions on one document): the prefix
    is attended once for all of them and merged with each tail."""
    runner = make_runner(checkpoint, policy)
    seqs = Seqs(seed=11)
    doc = seqs.add(5 * BS + 9)
    others = [seqs.add(5 * BS + n, share_with=doc, shared_blocks=5) for n in (3, 20)]
    forward(runner, *seqs.meta([(doc, 0, 5 * BS + 8)], decode=False))
    forward(
        runner, *seqs.meta([(i, 5 * BS, 5 * BS + n - 1) for i, n in zip(others, (3, 20))], False)
    )
    work = [(doc, 5 * BS + 8, 5 * BS + 9), (others[0], 5 * BS + 2, 5 * BS + 3)]
    work.append((others[1], 5 * BS + 19, 5 * BS + 20))
    _, _, meta = seqs.meta(work, decode=True)
    assert shared_blocks(meta.block_tables, meta.context_lens, BS) == 5
    layered, fused = both_paths(runner, seqs, work, monkeypatch)
    assert fused_calls == [3]
    torch.testing.assert_close(fused, layered, rtol=1e-5, atol=1e-5)


def set_windows(runner: ModelRunner, windows: list[int]) -> None:
    """Each layer's sliding window (0: none), as a checkpoint's config would set them; the
    native decoder, which takes them when it is built, is built anew."""
    layers: list[Any] = list(runner.model.layers)
    for layer, window in zip(layers, windows, strict=True):
        layer.attn.window = window
    runner.model.drop_native_decoder()


@pytest.mark.parametrize("policy", [0, 4])
def test_sliding_window_layers_equal_the_layer_path_bit_for_bit(
    checkpoint: Path, policy: int, fused_calls: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One layer attends to its last 5 keys, the other to every key (Qwen2's mixed layers),
    over contexts longer than the window but one (5 keys, then 6 ...); then a window of 200,
    which the longest context's splits cut as the layer path's do."""
    runner = make_runner(checkpoint, policy)
    assert TINY_SHAPES["num_layers"] == 2
    seqs = Seqs(seed=21 + policy)
    lens = [300, 33, 5]
    for n in lens:
        seqs.add(n + 5)
    forward(runner, *seqs.meta([(i, 0, n) for i, n in enumerate(lens)], decode=False))
    for t, windows in enumerate(([5, 0], [5, 0], [0, 200], [0, 200])):
        set_windows(runner, windows)
        work = [(i, n + t, n + t + 1) for i, n in enumerate(lens)]
        layered, fused = both_paths(runner, seqs, work if t % 2 == 0 else work[:1], monkeypatch)
        assert torch.equal(layered, fused), f"step {t}: max diff {(layered - fused).abs().max()}"
    assert fused_calls == [3, 1, 3, 1]
    set_windows(runner, [0, 0])  # the windows were used: without them the step differs
    _, unwindowed = both_paths(runner, seqs, work[:1], monkeypatch)
    assert not torch.allclose(unwindowed, fused)


def test_sliding_window_layers_over_a_shared_prefix(
    checkpoint: Path, fused_calls: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three sequences over one cached 5-block prefix: a layer whose window hides keys attends
    each sequence's window on its own while an unwindowed layer reads the prefix once (equal
    to the layer path to float rounding, the prefix merge's); with every layer windowed no
    prefix pass runs and the step equals the layer path bit for bit."""
    runner = make_runner(checkpoint)
    seqs = Seqs(seed=11)
    doc = seqs.add(5 * BS + 9)
    others = [seqs.add(5 * BS + n, share_with=doc, shared_blocks=5) for n in (3, 20)]
    forward(runner, *seqs.meta([(doc, 0, 5 * BS + 8)], decode=False))
    forward(
        runner, *seqs.meta([(i, 5 * BS, 5 * BS + n - 1) for i, n in zip(others, (3, 20))], False)
    )
    work = [(doc, 5 * BS + 8, 5 * BS + 9), (others[0], 5 * BS + 2, 5 * BS + 3)]
    work.append((others[1], 5 * BS + 19, 5 * BS + 20))
    set_windows(runner, [20, 0])
    layered, fused = both_paths(runner, seqs, work, monkeypatch)
    torch.testing.assert_close(fused, layered, rtol=1e-5, atol=1e-5)
    set_windows(runner, [20, 50])
    layered, fused = both_paths(runner, seqs, work, monkeypatch)
    assert torch.equal(layered, fused)
    assert fused_calls == [3, 3]


def local_tables(
    runner: ModelRunner, pos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (cos, sin) of the layers with their own RoPE base (Gemma 3's windowed ones)."""
    local = runner.model.local_rotary
    return None if local is None else local.cos_sin(pos)


def test_stage_by_stage_equals_one_call(checkpoint: Path) -> None:
    """The tp > 1 schedule (a reduce after every stage but the last) with an identity reduce
    gives the one-call result; each stage leaves its output in the buffer it reduces."""
    runner = make_runner(checkpoint)
    assert runner.kv_cache is not None
    seqs = Seqs(seed=5)
    for n in (30, 50):
        seqs.add(n + 1)
    forward(runner, *seqs.meta([(0, 0, 30), (1, 0, 50)], decode=False))
    ids, pos, meta = seqs.meta([(0, 30, 31), (1, 50, 51)], decode=True)
    decoder = runner.model._native_decoder(runner.kv_cache.layers)
    assert decoder is not None
    cos, sin = runner.model.rotary.cos_sin(pos)
    local = local_tables(runner, pos)
    reduced: list[int] = []

    def reduce(x: torch.Tensor) -> torch.Tensor:
        reduced.append(x.data_ptr())
        return x

    with torch.inference_mode():
        args = (cos, sin, meta.slot_mapping, meta.block_tables, meta.context_lens)
        one = decoder.run(runner.model.embed(ids), *args, local=local).clone()
        x = runner.model.embed(ids)
        staged = decoder.run(x, *args, reduce=reduce, local=local)
    assert torch.equal(one, staged)
    layers = runner.model_config.num_layers
    assert reduced == [x.data_ptr()] * (2 * layers)


def test_steps_and_models_it_does_not_serve_run_layer_by_layer(
    checkpoint: Path, tiny_llama_dir: Path, fused_calls: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = make_runner(checkpoint)
    seqs = Seqs(seed=9)
    seqs.add(20)
    forward(runner, *seqs.meta([(0, 0, 18)], decode=False))
    for env, value in ((CPU_DECODE_ENV, "layers"), (CPU_ATTENTION_ENV, "torch")):
        monkeypatch.setenv(env, value)
        forward(runner, *seqs.meta([(0, 18, 19)], decode=True))
        monkeypatch.delenv(env)
    assert not fused_calls
    forward(runner, *seqs.meta([(0, 19, 20)], decode=True))
    assert fused_calls == [1]
    # head_dim 8 (the session checkpoints): the native attention does not take it.
    tiny = make_runner(tiny_llama_dir)
    assert tiny.kv_cache is not None
    reason = native_decode.unfit_reason(tiny.model, tiny.kv_cache.layers)
    assert reason is not None and "head_dim 8" in reason
    assert tiny.model._native_decoder(tiny.kv_cache.layers) is None


def test_a_bad_choice_names_the_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CPU_DECODE_ENV, "graph")
    with pytest.raises(ValueError, match="DIST_RUNTIME_CPU_DECODE='graph'.*'fused', 'layers'"):
        cpu_decode_choice()


def test_a_new_cache_drops_the_decoder_built_on_the_old_one(checkpoint: Path) -> None:
    """Reallocating the KV cache forgets the native decoder (which holds the old cache) before
    the new cache is made; the next decode step builds one over the new cache."""
    runner = make_runner(checkpoint)
    assert runner.kv_cache is not None
    seqs = Seqs(seed=2)
    seqs.add(20)
    forward(runner, *seqs.meta([(0, 0, 18)], decode=False))
    forward(runner, *seqs.meta([(0, 18, 19)], decode=True))
    old = runner.model._native_decoder(runner.kv_cache.layers)
    assert old is not None
    runner.allocate_kv_cache(NUM_BLOCKS)
    assert runner.model._native is None
    seqs = Seqs(seed=2)
    seqs.add(20)
    forward(runner, *seqs.meta([(0, 0, 18)], decode=False))
    forward(runner, *seqs.meta([(0, 18, 19)], decode=True))
    new = runner.model._native_decoder(runner.kv_cache.layers)
    assert new is not None and new is not old
    assert new.layers[0].k_cache == runner.kv_cache.layers[0].k.data_ptr()


def _attach_adapters(runner: ModelRunner, every_linear: bool) -> None:
    """Random adapters in slots 1-3 of the model (slot 0 the base): in reserved stacks of rank
    4 on every linear layer, or (every_linear False) sized to them on layer 0's qkv and the
    last layer's down only, the other layers' stacks left out."""
    from workers.lora import LinearLora, LoraLayers, LoraState

    model, gen = runner.model, torch.Generator().manual_seed(17)
    decoder_layers: list[Any] = list(model.layers)

    def pair(lin: Any, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.randn(r, lin.cpu_packed.in_features, generator=gen) * 0.3
        return a, torch.randn(lin.cpu_packed.out_features, r, generator=gen) * 0.3

    if every_linear:
        layers = LoraLayers(model, runner.model_config, model.shard, 0, 1, room=(4, 4))
        for layer in decoder_layers:
            for lin in (layer.attn.qkv_proj, layer.attn.o_proj):
                lin.lora.put(1, *pair(lin, 4))
                lin.lora.put(3, *pair(lin, 2))
            for lin in (layer.mlp.gate_up_proj, layer.mlp.down_proj):
                lin.lora.put(2, *pair(lin, 3))
        model.lora = layers.state
        return
    state = LoraState()
    for lin in (decoder_layers[0].attn.qkv_proj, decoder_layers[-1].mlp.down_proj):
        lin.lora = LinearLora(state)
        for slot in (1, 2, 3):
            lin.lora.weights[slot] = pair(lin, 5)
        lin.lora.stack(4, torch.device("cpu"), torch.float32)
    model.lora = state


@pytest.mark.parametrize("every_linear", [True, False], ids=["reserved-slots", "some-layers"])
def test_lora_rows_decode_natively_as_the_layer_path_does(
    checkpoint: Path, every_linear: bool, fused_calls: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decode steps mixing a base row with rows of three adapters run on the native decoder and
    give the layer path's hidden states (to float rounding: the adapters' dot products sum in
    another order); the base row's equal a step without adapters bit for bit, the others'
    differ; one call and the tp > 1 stage schedule agree."""
    from workers.lora import LoraBatch

    cpu = torch.device("cpu")
    runner = make_runner(checkpoint)
    assert runner.kv_cache is not None
    _attach_adapters(runner, every_linear)
    seqs = Seqs(seed=13)
    lens, adapters = [40, 17, 66, 5], [0, 1, 2, 3]
    for n in lens:
        seqs.add(n + 4)
    ids, pos, meta = seqs.meta([(i, 0, n) for i, n in enumerate(lens)], decode=False)
    prefill = dataclasses.replace(meta, lora=LoraBatch.build(adapters, lens, cpu))
    forward(runner, ids, pos, prefill)  # the prompts' K/V with their adapters
    assert not fused_calls
    for t in range(3):
        work = [(i, n + t, n + t + 1) for i, n in enumerate(lens)]
        ids, pos, meta = seqs.meta(work, decode=True)
        meta = dataclasses.replace(meta, lora=LoraBatch.build(adapters, [1] * 4, cpu))
        monkeypatch.setenv(CPU_DECODE_ENV, "layers")
        layered = forward(runner, ids, pos, meta)
        monkeypatch.delenv(CPU_DECODE_ENV)
        fused = forward(runner, ids, pos, meta)
        torch.testing.assert_close(fused, layered, rtol=1e-5, atol=1e-5)
    assert fused_calls == [4, 4, 4]
    # The last step again without adapters: the base row is unchanged, the adapted ones move.
    base = forward(runner, ids, pos, dataclasses.replace(meta, lora=None))
    assert torch.equal(base[0], fused[0])
    assert all(not torch.allclose(base[r], fused[r]) for r in (1, 2, 3))
    # One call and stage by stage, on the next token.
    decoder = runner.model._native_decoder(runner.kv_cache.layers)
    assert decoder is not None
    ids, pos, meta = seqs.meta([(i, n + 3, n + 4) for i, n in enumerate(lens)], decode=True)
    batch = LoraBatch.build(adapters, [1] * 4, cpu)
    assert batch is not None
    lora = native_decode.lora_step(runner.model, batch)
    assert lora is not None
    cos, sin = runner.model.rotary.cos_sin(pos)
    local = local_tables(runner, pos)
    args = (cos, sin, meta.slot_mapping, meta.block_tables, meta.context_lens)
    with torch.inference_mode():
        one = decoder.run(runner.model.embed(ids), *args, lora=lora, local=local).clone()
        staged = decoder.run(
            runner.model.embed(ids), *args, reduce=lambda x: x, lora=lora, local=local
        )
    assert torch.equal(one, staged)
