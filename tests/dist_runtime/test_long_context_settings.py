"""RoPE past the trained length: dynamic NTK with one base per request, session_len limits.

HF's dynamic NTK recomputes the base from the sequence length of each forward; for a single
forward over a whole prompt that is the base this runtime fixes once per request from the
prompt length, so the first token's logprobs must equal HF's at the prompt's last position.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_runtime import Runtime, SamplingParams
from dist_runtime.config import ConfigError, ModelConfig
from dist_runtime.formats.random_checkpoint import write_random_checkpoint
from tests.conftest import TINY_SHAPES
from tests.helpers.oracle import load_hf_llama
from workers.checkpoint import CheckpointError

MAX_POS = 32
PARAMS = SamplingParams(max_new_tokens=1, temperature=0.0, logprobs=5, ignore_eos=True)


def _prompt(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, TINY_SHAPES["vocab_size"], (length,), generator=gen).tolist()


def _checkpoint(tmp_path: Path, name: str, **kw: Any) -> Path:
    shapes = dict(TINY_SHAPES, max_position_embeddings=MAX_POS, seed=4, with_tokenizer=False)
    return write_random_checkpoint(tmp_path / name, architecture="llama", **shapes, **kw)


def _first_token(rt: Runtime, prompt: list[int]) -> Any:
    (out,) = rt.generate([prompt], PARAMS)
    assert out.logprobs is not None
    return out.logprobs[0]


def _hf_top5(folder: Path, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    hf = load_hf_llama(folder)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0, -1].float()
    values, indices = torch.log_softmax(logits, dim=-1).topk(5)
    return indices.tolist(), values


def _first_token_matches_hf(folder: Path, prompt: list[int], session_len: int) -> Any:
    """The runtime's first-token top-5 log-probabilities are HF's; returns them."""
    with Runtime(model=str(folder), device="cpu", dtype="float32", session_len=session_len) as rt:
        got = _first_token(rt, prompt)
    ids, values = _hf_top5(folder, prompt)
    assert list(got.top) == ids
    torch.testing.assert_close(torch.tensor(list(got.top.values())), values, rtol=0, atol=1e-4)
    return got


def _decodes_match_hf_generate(folder: Path, prompt: list[int], session_len: int = 128) -> None:
    """Six greedy tokens decoded (on CPU through the native decoder: checked) give HF
    generate's tokens and top-5 log-probabilities."""
    params = SamplingParams(max_new_tokens=6, temperature=0.0, logprobs=5, ignore_eos=True)
    with Runtime(model=str(folder), device="cpu", dtype="float32", session_len=session_len) as rt:
        model = rt.engine.executor.worker.runner.model  # type: ignore[union-attr]
        assert model.layers[0].attn.scale == rt.engine.model_config.attention_scale
        (out,) = rt.generate([prompt], params)
        native = model._native
        assert native is not None and native[1] is not None  # (decodes ran natively)
    hf = load_hf_llama(folder)
    with torch.no_grad():
        gen = hf.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True,
            return_dict_in_generate=True,
        )  # fmt: skip
    assert out.token_ids == gen.sequences[0, len(prompt) :].tolist()
    assert out.logprobs is not None
    for lp, raw in zip(out.logprobs, gen.logits, strict=True):
        values, indices = torch.log_softmax(raw[0].float(), dim=-1).topk(5)
        assert list(lp.top) == indices.tolist()
        torch.testing.assert_close(torch.tensor(list(lp.top.values())), values, rtol=0, atol=1e-4)


@pytest.mark.parametrize("length", [20, 50, 90])
def test_dynamic_ntk_matches_hf_past_trained_length(tmp_path: Path, length: int) -> None:
    folder = _checkpoint(tmp_path, "dyn", rope_scaling={"type": "dynamic", "factor": 2.0})
    prompt = _prompt(length, seed=length)
    _first_token_matches_hf(folder, prompt, 128)
    model = ModelConfig.from_pretrained(str(folder))
    assert (model.rope_base(length) > model.rope_theta) == (length > MAX_POS)


def test_requests_keep_their_own_base_and_cache_keys(tmp_path: Path) -> None:
    """Two prompts sharing a prefix but with different lengths past max_pos get different
    bases: the second must not reuse the first's cached blocks, and each equals its run
    alone; a batch mixing bases equals the requests run one by one."""
    folder = _checkpoint(tmp_path, "dyn", rope_scaling={"type": "dynamic", "factor": 2.0})
    shared = _prompt(60, seed=1)
    a, b, c = shared + [5, 6, 7], shared + [8] * 30, _prompt(10, seed=2)
    params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    kw: dict[str, Any] = dict(device="cpu", dtype="float32", session_len=128)
    alone = []
    for p in (a, b, c):
        with Runtime(model=str(folder), **kw) as rt:
            alone.append(rt.generate([p], params)[0].token_ids)
    with Runtime(model=str(folder), **kw) as rt:
        rt.generate([a], params)
        before = rt.engine.scheduler.num_prompt_tokens_computed
        assert rt.generate([b], params)[0].token_ids == alone[1]
        assert rt.engine.scheduler.num_prompt_tokens_computed - before == len(b)  # no reuse
        assert [o.token_ids for o in rt.generate([a, b, c], params)] == alone


def test_session_len_over_rope_limit_is_refused(tmp_path: Path) -> None:
    plain = _checkpoint(tmp_path, "plain")
    with pytest.raises(
        ConfigError, match=r"session_len 100 is over the 32 tokens .*rope_scaling_factor"
    ):
        Runtime(model=str(plain), device="cpu", session_len=100)
    linear = _checkpoint(tmp_path, "linear", rope_scaling={"type": "linear", "factor": 2.0})
    with pytest.raises(ConfigError, match=r"session_len 100 is over the 64 tokens"):
        Runtime(model=str(linear), device="cpu", session_len=100)
    with pytest.raises(ConfigError, match=r"rope_scaling_factor must be a number >= 1, got 0.5"):
        Runtime(model=str(plain), device="cpu", session_len=100, rope_scaling_factor=0.5)


def test_rope_scaling_factor_override_enables_dynamic_ntk(tmp_path: Path) -> None:
    """The override turns a plain checkpoint into the same model with dynamic NTK."""
    plain = _checkpoint(tmp_path, "plain")
    dynamic = _checkpoint(tmp_path, "dyn", rope_scaling={"type": "dynamic", "factor": 3.0})
    prompt = _prompt(70, seed=9)
    kw: dict[str, Any] = dict(device="cpu", dtype="float32", session_len=128)
    with Runtime(model=str(plain), rope_scaling_factor=3.0, **kw) as rt:
        got = _first_token(rt, prompt)
    with Runtime(model=str(dynamic), **kw) as rt:
        want = _first_token(rt, prompt)
    assert got.top == want.top


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}  # fmt: skip
"""Llama 3.1's scaling at a small scale: with head_dim 8 and theta 5e5 the wavelengths (6, 166,
4 400 and 116 000 positions) fall in each of its three bands (kept under 16, blended up to 64,
stretched past it)."""


def _llama3_checkpoint(tmp_path: Path, name: str, transformers5: bool) -> Path:
    """A random Llama 3.1-style checkpoint, its RoPE written as transformers 4 does
    (`rope_theta`, `rope_scaling`) or as transformers 5 does (both in `rope_parameters`)."""
    shapes = dict(TINY_SHAPES, max_position_embeddings=256, seed=5, with_tokenizer=False)
    folder = write_random_checkpoint(
        tmp_path / name, architecture="llama", rope_theta=5e5, rope_scaling=LLAMA3, **shapes
    )
    if transformers5:
        path = folder / "config.json"
        config = json.loads(path.read_text())
        params = {"rope_theta": config.pop("rope_theta"), **config.pop("rope_scaling")}
        path.write_text(json.dumps({**config, "rope_parameters": params}))
    return folder


@pytest.mark.parametrize("transformers5", [False, True], ids=["rope_scaling", "rope_parameters"])
def test_llama3_rope_scaling_matches_hf(tmp_path: Path, transformers5: bool) -> None:
    """Llama 3.1's `rope_type: llama3` (the frequencies rescaled by wavelength), read from
    either config layout: the first token's log-probabilities equal HF's, and differ from the
    unscaled model's (so the scaling is in them)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from workers.layers.rotary import model_frequencies

    folder = _llama3_checkpoint(tmp_path, "llama3", transformers5)
    model = ModelConfig.from_pretrained(str(folder))
    assert model.rope_theta == 5e5 and model.rope_scaling is not None
    assert model.rope_scaling.original_max_position_embeddings == 64
    hf_config = LlamaConfig.from_pretrained(folder)
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, torch.device("cpu"))
    assert torch.equal(model_frequencies(model), want)
    prompt = _prompt(120, seed=9)
    got = _first_token_matches_hf(folder, prompt, 200)
    plain = tmp_path / "plain"
    shutil.copytree(folder, plain)
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_scaling", None)
    config.pop("rope_parameters", None)
    (plain / "config.json").write_text(json.dumps({**config, "rope_theta": 5e5}))
    with Runtime(model=str(plain), device="cpu", dtype="float32", session_len=200) as rt:
        unscaled = _first_token(rt, prompt)
    assert list(unscaled.top.values()) != list(got.top.values())


def test_llama3_rope_scaling_errors(tmp_path: Path) -> None:
    folder = _llama3_checkpoint(tmp_path, "llama3", transformers5=False)
    path = folder / "config.json"
    with pytest.raises(ConfigError, match="rope_scaling_factor .* llama3"):
        Runtime(model=str(folder), device="cpu", session_len=64, rope_scaling_factor=2.0)
    config = json.loads(path.read_text())
    del config["rope_scaling"]["low_freq_factor"]
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"llama3 rope_scaling lacks \['low_freq_factor'\]"):
        ModelConfig.from_pretrained(str(folder))


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}


@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
def test_yarn_rope_scaling_matches_hf(tmp_path: Path, architecture: str) -> None:
    """YaRN (Qwen2.5's long-context setting): a checkpoint trained to 32 positions run to 4x
    that. Its frequencies are HF's, its attention factor (0.1 ln 4 + 1, HF's scale of the
    rotated q and k) is folded into the softmax scale, and the first token's
    log-probabilities of a 100-token prompt equal HF's."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from workers.layers.rotary import model_frequencies

    shapes = dict(TINY_SHAPES, max_position_embeddings=32, seed=6, with_tokenizer=False)
    folder = write_random_checkpoint(
        tmp_path / "yarn", architecture=architecture, rope_theta=1e4, rope_scaling=YARN, **shapes
    )
    model = ModelConfig.from_pretrained(str(folder))
    assert model.max_rope_len() == 128
    want, factor = ROPE_INIT_FUNCTIONS["yarn"](AutoConfig.from_pretrained(folder), None)
    assert torch.equal(model_frequencies(model), want) and factor > 1.1
    assert model.attention_scale == pytest.approx(model.head_dim**-0.5 * factor**2)
    prompt = _prompt(100, seed=13)
    _first_token_matches_hf(folder, prompt, 128)
    with pytest.raises(ConfigError, match="session_len 200 is over the 128 tokens"):
        Runtime(model=str(folder), device="cpu", session_len=200)


def test_yarn_decode_steps_match_hf_generate(tmp_path: Path) -> None:
    """The decode steps too (head_dim 16: on CPU they run through the native decoder, which
    takes the YaRN softmax scale): greedy tokens and top-5 log-probabilities equal HF's."""
    shapes = dict(TINY_SHAPES, head_dim=16, max_position_embeddings=32, seed=8)
    folder = write_random_checkpoint(
        tmp_path / "yarn16", architecture="qwen2", rope_scaling=YARN, with_tokenizer=False,
        **shapes,
    )  # fmt: skip
    _decodes_match_hf_generate(folder, _prompt(70, seed=14))


def test_yarn_without_its_trained_length_takes_max_positions_as_hf_does(tmp_path: Path) -> None:
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from workers.layers.rotary import model_frequencies

    shapes = dict(TINY_SHAPES, max_position_embeddings=64, seed=6, with_tokenizer=False)
    folder = write_random_checkpoint(
        tmp_path / "yarn", rope_scaling={"rope_type": "yarn", "factor": 2.0}, **shapes
    )
    model = ModelConfig.from_pretrained(str(folder))
    assert model.rope_scaling is not None
    assert model.rope_scaling.original_max_position_embeddings == 64
    want, _ = ROPE_INIT_FUNCTIONS["yarn"](AutoConfig.from_pretrained(folder), None)
    assert torch.equal(model_frequencies(model), want)


TRAINED = 32
"""The Phi-3 checkpoints' trained length: prompts past it take LongRoPE's long factors."""


def _phi3_checkpoint(tmp_path: Path, transformers5: bool, **kw: Any) -> Path:
    """A random Phi-3 (q/k/v and gate/up packed) with LongRoPE, short and long factors far
    apart, its RoPE written as Phi-3.5's config.json has it (`rope_scaling` with `type`, the
    trained length at the top level) or as transformers 5 does (`rope_parameters`)."""
    head_dim = kw.get("head_dim", TINY_SHAPES["hidden_size"] // TINY_SHAPES["num_heads"])
    half = int(head_dim * kw.get("partial_rotary_factor", 1.0)) // 2
    scaling = {
        "rope_type": "longrope",
        "short_factor": [1.0 + 0.25 * i for i in range(half)],
        "long_factor": [1.0 + 3.0 * i for i in range(half)],
        "original_max_position_embeddings": TRAINED,
    }
    shapes = dict(TINY_SHAPES, max_position_embeddings=256, seed=12, with_tokenizer=False)
    folder = write_random_checkpoint(
        tmp_path / "phi3", architecture="phi3", rope_scaling=scaling, **{**shapes, **kw}
    )
    path = folder / "config.json"
    config = json.loads(path.read_text())
    scaling = config.pop("rope_scaling")
    if transformers5:
        params = {"rope_theta": config.pop("rope_theta"), **scaling}
        config["rope_parameters"] = {**params, "rope_type": "longrope"}
    else:
        config["rope_scaling"] = {
            "type": "longrope",
            **{k: v for k, v in scaling.items() if k != "rope_type"},
        }
    path.write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("transformers5", [False, True], ids=["rope_scaling", "rope_parameters"])
def test_phi3_longrope_matches_hf(tmp_path: Path, transformers5: bool) -> None:
    """Phi-3's checkpoint (q/k/v and gate/up packed) read through row views, its LongRoPE read
    from either config layout: a prompt within the trained length uses the short factors and
    one past it the long ones (HF's choice for a whole prompt), both with HF's attention
    factor; the first token's log-probabilities equal HF's Phi3ForCausalLM's."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from workers.layers.rotary import model_frequencies

    folder = _phi3_checkpoint(tmp_path, transformers5)
    model = ModelConfig.from_pretrained(str(folder))
    assert model.fused_projections and model.max_rope_len() == 256
    hf_config = AutoConfig.from_pretrained(folder)
    for length in (20, 90):
        want, factor = ROPE_INIT_FUNCTIONS["longrope"](hf_config, None, seq_len=length)
        base = model.rope_base(length)
        assert (base < 0) == (length > TRAINED)
        assert torch.equal(model_frequencies(model, base), want)
        assert model.attention_scale == pytest.approx(model.head_dim**-0.5 * factor**2)
        assert factor == pytest.approx((1 + math.log(256 / TRAINED) / math.log(TRAINED)) ** 0.5)
        _first_token_matches_hf(folder, _prompt(length, seed=length), 200)


def test_phi3_decode_steps_match_hf_generate(tmp_path: Path) -> None:
    """Greedy decoding of a Phi-3 (head_dim 16: on CPU its decodes run through the native
    decoder) past the trained length, long factors throughout: HF's tokens and top-5
    log-probabilities."""
    folder = _phi3_checkpoint(tmp_path, transformers5=False, head_dim=16, num_heads=4)
    _decodes_match_hf_generate(folder, _prompt(70, seed=15))


@pytest.mark.parametrize("length", [20, 60])
def test_partial_rotary_matches_hf(tmp_path: Path, length: int) -> None:
    """Phi-4-mini's partial RoPE (partial_rotary_factor 0.5: 8 of head_dim 16 turned, the
    rest passed through) with LongRoPE on the turned dimensions: greedy decoding (natively on
    CPU) gives HF's tokens and top-5 log-probabilities, within and past the trained length."""
    from workers.models.layouts import rotary_row_order

    folder = _phi3_checkpoint(
        tmp_path, transformers5=False, head_dim=16, num_heads=4, partial_rotary_factor=0.5
    )
    model = ModelConfig.from_pretrained(str(folder))
    assert model.rotary_dim == 8 and model.rope_dim == 8
    order = rotary_row_order(model)
    assert order is not None and sorted(order.tolist()) == list(range(16))
    assert order[:4].tolist() == [0, 1, 2, 3] and order[8:12].tolist() == [4, 5, 6, 7]
    _decodes_match_hf_generate(folder, _prompt(length, seed=16))


def test_partial_rope_checkpoints_are_not_quantized(tmp_path: Path) -> None:
    from dist_runtime.quantize import QuantizeError, quantize_checkpoint

    partial = _phi3_checkpoint(tmp_path / "b", transformers5=False, partial_rotary_factor=0.5)
    with pytest.raises(QuantizeError, match="turns part of each head with RoPE"):
        quantize_checkpoint(partial, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_phi3_errors(tmp_path: Path) -> None:
    folder = _phi3_checkpoint(tmp_path, transformers5=False)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    longrope = ModelConfig.from_pretrained(str(folder))
    path.write_text(
        json.dumps({**config, "rope_scaling": {**config["rope_scaling"], "type": "su"}})
    )
    assert ModelConfig.from_pretrained(str(folder)) == longrope  # (Phi-3's first name for it)
    with pytest.raises(ConfigError, match="replace this checkpoint's longrope rope_scaling"):
        Runtime(model=str(folder), device="cpu", session_len=64, rope_scaling_factor=2.0)
    bad = {**config, "rope_scaling": {**config["rope_scaling"], "long_factor": [1.0, 2.0]}}
    path.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="long_factor as a list of 4 positive numbers"):
        ModelConfig.from_pretrained(str(folder))
    path.write_text(json.dumps({**config, "partial_rotary_factor": 0.375}))
    with pytest.raises(ConfigError, match="partial_rotary_factor 0.375 turns 3 of head_dim 8"):
        ModelConfig.from_pretrained(str(folder))
    path.write_text(json.dumps({**config, "partial_rotary_factor": 1.5}))
    with pytest.raises(ConfigError, match=r"partial_rotary_factor must be in \(0, 1\], got 1.5"):
        ModelConfig.from_pretrained(str(folder))
    path.write_text(json.dumps(config))
    weights = folder / "model.safetensors"
    from safetensors.torch import load_file, save_file

    sd = load_file(weights)
    sd["model.layers.1.self_attn.qkv_proj.weight"] = sd["model.layers.1.self_attn.qkv_proj.weight"][
        :-8
    ]
    save_file(sd, weights)
    with pytest.raises(CheckpointError, match="fewer than the 128 its parts need"):
        Runtime(model=str(folder), device="cpu", session_len=64)


def test_the_scorer_takes_a_texts_own_rope(tmp_path: Path) -> None:
    """Teacher-forced scoring (`workers.scoring`, the benches' perplexity) of a text past the
    trained length uses the frequencies a request with that prompt gets (here LongRoPE's long
    factors): its NLL per token is the runtime's prompt log-probabilities."""
    from dist_runtime import RuntimeConfig
    from workers.scoring import Scorer

    folder = _phi3_checkpoint(tmp_path, transformers5=False)
    ids = _prompt(60, seed=21)
    config = RuntimeConfig(model=str(folder), device="cpu", dtype="float32", session_len=128)
    scorer = Scorer(config, max_tokens=len(ids))
    try:
        nll = scorer.score(ids, chunk=16).nll
    finally:
        scorer.close()
    params = SamplingParams(max_new_tokens=1, temperature=0.0, prompt_logprobs=0)
    with Runtime(model=str(folder), device="cpu", dtype="float32", session_len=128) as rt:
        (out,) = rt.generate([ids], params)
    assert out.prompt_logprobs is not None
    want = [-lp.logprob for lp in out.prompt_logprobs[1:] if lp is not None]
    torch.testing.assert_close(torch.tensor(nll), torch.tensor(want), rtol=0, atol=1e-4)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_granite_matches_hf(tmp_path: Path, tie: bool) -> None:
    """IBM Granite (Llama's layout with an embedding multiplier, a residual multiplier the
    loader folds into o_proj and down_proj, an attention multiplier as the softmax scale and a
    logits divisor): HF GraniteForCausalLM's first-token log-probabilities, greedy tokens and
    their top-5 log-probabilities (decodes natively on CPU, head_dim 16)."""
    shapes = dict(TINY_SHAPES, head_dim=16, num_heads=4, seed=17, with_tokenizer=False)
    folder = write_random_checkpoint(
        tmp_path / "granite", architecture="granite", tie_word_embeddings=tie, bias=True, **shapes
    )
    model = ModelConfig.from_pretrained(str(folder))
    assert model.attention_scale == 0.07 and model.logits_scaling == 4.0
    prompt = _prompt(40, seed=18)
    _first_token_matches_hf(folder, prompt, 128)
    _decodes_match_hf_generate(folder, prompt)


@pytest.mark.parametrize("partial", [0.5, 1.0], ids=["glm-4-partial", "full"])
def test_glm_interleaved_rope_matches_hf(tmp_path: Path, partial: float) -> None:
    """GLM-4's `-hf` checkpoints (GlmForCausalLM: q/k/v biases and none on o, gate/up packed,
    RoPE turning adjacent pairs (2i, 2i + 1) of the first half of each head): q / k rows
    reordered into the runtime's pairs at load give HF's first-token log-probabilities, greedy
    tokens and their top-5 log-probabilities (decodes natively on CPU)."""
    from workers.models.layouts import rotary_row_order

    shapes = dict(TINY_SHAPES, head_dim=16, num_heads=4, seed=19, with_tokenizer=False)
    folder = write_random_checkpoint(
        tmp_path / "glm", architecture="glm", partial_rotary_factor=partial, **shapes
    )
    model = ModelConfig.from_pretrained(str(folder))
    assert model.rope_interleaved and not model.has_o_bias and model.attention_bias
    order = rotary_row_order(model)
    assert order is not None and order[:2].tolist() == [0, 2] and order[8:10].tolist() == [1, 3]
    prompt = _prompt(40, seed=20)
    _first_token_matches_hf(folder, prompt, 128)
    _decodes_match_hf_generate(folder, prompt)
