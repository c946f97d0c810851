"""4-bit AWQ / RTN quantization (`dist_runtime.quantize`, `launch/quantize.py`) on micro random
checkpoints of both layouts.

The micro models get a few outlier channels (large RMSNorm weights, large up_proj rows), as
trained models have: that is what AWQ's scales exist for. On random weights the NLL of real text
is near uniform and moves by noise under quantization, so the end-to-end check compares each
quantized model's next-token distribution with the float model's (KL divergence) instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from dist_runtime.config import ModelConfig
from dist_runtime.formats.int4 import dequantize, quantize_rtn, unpack_awq
from dist_runtime.formats.random_checkpoint import write_from_state_dict, write_random_checkpoint
from dist_runtime.quantize import (
    GROUPS,
    LayerResult,
    awq_layers,
    calibration_ids,
    checkpoint_linears,
    default_calibration_text,
    fake_quantize,
    forward_logits,
    layer_forward,
    layer_to_checkpoint,
    load_dequantized,
    quantize_checkpoint,
    read_layer,
    rope_tables,
    split_packed,
    state_dict_getter,
)
from dist_runtime.text.documents import harbor_report
from dist_runtime.text.tokenizer import Tokenizer
from launch import quantize as quantize_cli
from tests.conftest import REPO_ROOT
from workers.checkpoint import CheckpointReader
from workers.models.layouts import LAYOUTS

GROUP = 32
MODELS: dict[str, dict[str, Any]] = {
    # GQA: o is not scaled.
    "llama-gqa": dict(architecture="llama", num_heads=4, num_kv_heads=2),
    # heads == kv_heads: o's scale folds into v's rows (and v's bias); packed wqkv.
    "internlm2-mha-bias": dict(architecture="internlm2", num_heads=4, num_kv_heads=4, bias=True),
    # Tied embeddings, a sharded source.
    "llama-mha-tied": dict(
        architecture="llama",
        num_heads=4,
        num_kv_heads=4,
        tie_word_embeddings=True,
        max_shard_bytes=200_000,
    ),
    # Qwen3: q / k head norms between the qkv group and RoPE; o folds into v.
    "qwen3-mha": dict(architecture="qwen3", num_heads=4, num_kv_heads=4),
    # Phi-3: q/k/v and gate/up packed (read as parts, written packed again).
    "phi3-gqa": dict(architecture="phi3", num_heads=4, num_kv_heads=2),
    # Granite: embedding / residual / attention / logit multipliers in the forward.
    "granite-mha": dict(architecture="granite", num_heads=4, num_kv_heads=4),
    # Gemma 2: norms scaling by 1 + w (folded as such), output norms, GELU, soft-caps, a
    # windowed first layer (GEMMA_WINDOW); Gemma 3: head norms, the windowed layer's own RoPE
    # base, o folded into v.
    "gemma2-gqa": dict(architecture="gemma2", num_heads=4, num_kv_heads=2),
    "gemma3-mha": dict(architecture="gemma3", num_heads=4, num_kv_heads=4),
    # Gemma 1: Llama's layers with 1 + w norms and GELU; one KV head (gemma-2b's MQA).
    "gemma-mqa": dict(architecture="gemma", num_heads=4, num_kv_heads=1),
}
GEMMA_WINDOW = 24
"""The micro Gemmas' sliding window: shorter than the held-out and calibration texts."""


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Micro-model tensors are tiny: one thread is as fast, and is not slowed down many times
    over when another process holds one of the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _state_dict(folder: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(folder)
    try:
        return {name: reader.read(name) for name in reader.names()}
    finally:
        reader.close()


def _write_micro(folder: Path, architecture: str, **shape: Any) -> Path:
    shard = shape.pop("max_shard_bytes", None)
    write_random_checkpoint(
        folder,
        architecture=architecture,
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_layers=2,
        seed=3,
        **shape,
    )
    if architecture.startswith("gemma"):
        path = folder / "config.json"
        path.write_text(
            json.dumps({**json.loads(path.read_text()), "sliding_window": GEMMA_WINDOW})
        )
    weights = _state_dict(folder)
    model = ModelConfig.from_pretrained(folder)
    lay = LAYOUTS[model.architecture]  # (qwen3: llama's layout)
    off = model.norm_weight_offset  # (Gemma stores w and scales by 1 + w: ten times that)
    gen = torch.Generator().manual_seed(0)
    hidden_outliers = torch.randperm(128, generator=gen)[:4]
    inter_outliers = torch.randperm(256, generator=gen)[:8]
    for i in range(2):
        p = lay.layer.format(i)
        for norm in (lay.input_norm, lay.post_norm):
            w = weights[f"{p}{norm}.weight"]
            w[hidden_outliers] = (w[hidden_outliers] + off) * 10 - off
        up = f"{p}{lay.up}.weight"
        if up in weights:
            weights[up][inter_outliers] *= 10
        else:  # (Phi-3: up is the second half of gate_up_proj)
            weights[f"{p}mlp.gate_up_proj.weight"][256 + inter_outliers] *= 10
    for f in folder.glob("model*.safetensors*"):
        f.unlink()
    config = json.loads((folder / "config.json").read_text())
    return write_from_state_dict(folder, config, weights, max_shard_bytes=shard)


@pytest.fixture(scope="module", params=list(MODELS))
def micro(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    name = request.param
    return _write_micro(tmp_path_factory.mktemp(name), **dict(MODELS[name]))


@pytest.fixture(scope="module")
def quantized(micro: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The micro model quantized both ways: {"awq": folder, "rtn": folder}."""
    out = {}
    for method in ("awq", "rtn"):
        folder = tmp_path_factory.mktemp(f"{micro.name}-{method}")
        quantize_checkpoint(micro, folder, method, group_size=GROUP, progress=False)
        out[method] = folder
    return out


@pytest.fixture(scope="module")
def awq_results(micro: Path) -> list[LayerResult]:
    ids = calibration_ids(micro)
    return list(awq_layers(micro, ids, GROUP))


def _with_layers(
    config: ModelConfig, base: dict[str, torch.Tensor], layers: list[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    out = dict(base)
    for i, canon in enumerate(layers):
        out.update(layer_to_checkpoint(config, i, canon))
    return out


def _kl(ref: torch.Tensor, other: torch.Tensor) -> float:
    p, q = torch.log_softmax(ref, dim=-1), torch.log_softmax(other, dim=-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _held_out(folder: Path, n: int = 512) -> torch.Tensor:
    tok = Tokenizer(folder)
    return torch.tensor(tok.encode(harbor_report(seed=3).text)[:n])[None]


# --------------------------------------------------------------------------------------------
# The written folder


def test_folder_has_awq_gemm_tensors_config_and_float_rest(
    micro: Path, quantized: dict[str, Path]
) -> None:
    config = ModelConfig.from_pretrained(micro)
    source = split_packed(config, _state_dict(micro))  # (Phi-3: its parts, as written)
    out = quantized["awq"]
    hf = json.loads((out / "config.json").read_text())
    assert hf["quantization_config"] == {
        "quant_method": "awq",
        "bits": 4,
        "group_size": GROUP,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": None,
    }
    assert hf["architectures"] == json.loads((micro / "config.json").read_text())["architectures"]
    assert json.loads((out / "quant_config.json").read_text()) == {
        "w_bit": 4,
        "q_group_size": GROUP,
        "zero_point": True,
        "version": "GEMM",
    }
    assert (out / "tokenizer.json").read_bytes() == (micro / "tokenizer.json").read_bytes()
    assert (out / "tokenizer_config.json").is_file()
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        written = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    if config.fused_projections:  # (written packed, as AWQ tools write a Phi-3)
        for module in ("self_attn.qkv_proj", "mlp.gate_up_proj"):
            assert f"model.layers.1.{module}.qweight" in written
        assert not any(".q_proj." in name or ".up_proj." in name for name in written)
    written = split_packed(config, written)
    linears = []
    for i in range(config.num_layers):
        for lin in checkpoint_linears(config):
            module = f"{LAYOUTS[config.architecture].layer.format(i)}{lin}"
            out_f, in_f = source[f"{module}.weight"].shape
            assert written[f"{module}.qweight"].dtype == torch.int32
            assert written[f"{module}.qweight"].shape == (in_f, out_f // 8)
            assert written[f"{module}.qzeros"].dtype == torch.int32
            assert written[f"{module}.qzeros"].shape == (in_f // GROUP, out_f // 8)
            assert written[f"{module}.scales"].dtype == torch.float16
            assert written[f"{module}.scales"].shape == (in_f // GROUP, out_f)
            linears.append(f"{module}.weight")
    assert len(linears) == config.num_layers * (5 if config.architecture == "internlm2" else 7)
    floats = set(source) - set(linears)
    assert set(written) == floats | {
        f"{m.removesuffix('.weight')}.{k}" for m in linears for k in ("qweight", "qzeros", "scales")
    }
    for name in floats:  # embeddings, norms, head, biases: float, source dtype and shape
        assert written[name].dtype == source[name].dtype == torch.float32
        assert written[name].shape == source[name].shape
    head = f"{LAYOUTS[config.architecture].head}.weight"
    assert (head in written) == (not config.tie_word_embeddings)


def test_rtn_writes_quantize_rtn_of_the_source_exactly(
    micro: Path, quantized: dict[str, Path]
) -> None:
    config = ModelConfig.from_pretrained(micro)
    source = split_packed(config, _state_dict(micro))
    written = split_packed(config, _state_dict(quantized["rtn"]))
    for i in range(config.num_layers):
        for lin in checkpoint_linears(config):
            module = f"{LAYOUTS[config.architecture].layer.format(i)}{lin}"
            codes, scales, zeros = quantize_rtn(source[f"{module}.weight"], GROUP)
            got_codes, got_zeros = unpack_awq(
                written[f"{module}.qweight"], written[f"{module}.qzeros"]
            )
            assert torch.equal(got_codes, codes)
            assert torch.equal(got_zeros, zeros.to(torch.int32))
            assert torch.equal(written[f"{module}.scales"], scales.to(torch.float16))
            del source[f"{module}.weight"]
    for name, t in source.items():  # everything else is copied unchanged
        assert torch.equal(written[name], t), name


def test_symmetric_rtn_stores_zero_point_8(tiny_llama_dir: Path, tmp_path: Path) -> None:
    quantize_checkpoint(
        tiny_llama_dir, tmp_path, "rtn", group_size=32, zero_point=False, progress=False
    )
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["quantization_config"]["zero_point"] is False
    assert json.loads((tmp_path / "quant_config.json").read_text())["zero_point"] is False
    source, written = _state_dict(tiny_llama_dir), _state_dict(tmp_path)
    name = "model.layers.1.mlp.down_proj"
    codes, scales, _ = quantize_rtn(source[f"{name}.weight"], 32, zero_point=False)
    got_codes, got_zeros = unpack_awq(written[f"{name}.qweight"], written[f"{name}.qzeros"])
    assert torch.equal(got_codes, codes) and bool((got_zeros == 8).all())
    assert torch.equal(written[f"{name}.scales"], scales.half())


def test_awq_written_weights_dequantize_to_the_folded_clipped_weights(
    micro: Path, quantized: dict[str, Path], awq_results: list[LayerResult]
) -> None:
    """Within one quantization step of the weights that were rounded (and the norms written
    are the folded norms)."""
    config = ModelConfig.from_pretrained(micro)
    written = split_packed(config, _state_dict(quantized["awq"]))
    deq = split_packed(config, load_dequantized(quantized["awq"]))
    for result in awq_results:
        expected = layer_to_checkpoint(config, result.index, result.clipped)
        p = LAYOUTS[config.architecture].layer.format(result.index)
        for lin in checkpoint_linears(config):
            w = expected[f"{p}{lin}.weight"]
            step = written[f"{p}{lin}.scales"].float().repeat_interleave(GROUP, dim=0).T
            err = (deq[f"{p}{lin}.weight"] - w).abs()
            # Half a step from rounding, up to a whole one where the rounded zero point
            # pushes a group's extreme code past 15.
            assert bool((err <= step * 1.001 + 1e-6).all()), lin
            assert float((err <= step * 0.501).float().mean()) > 0.99
            # Rounding the clipped weights is what the report's errors measured.
            fake = fake_quantize(w, GROUP)
            torch.testing.assert_close(deq[f"{p}{lin}.weight"], fake, atol=2e-3, rtol=2e-3)
        for name, t in expected.items():
            if not name.endswith(tuple(f"{lin}.weight" for lin in checkpoint_linears(config))):
                torch.testing.assert_close(written[name], t, atol=0, rtol=0)


def test_fake_quantize_is_quantize_rtn_then_dequantize() -> None:
    w = torch.randn(48, 256) * torch.linspace(0.1, 3, 256)
    for zero_point in (True, False):
        codes, scales, zeros = quantize_rtn(w, 64, zero_point)
        groups = torch.arange(256) // 64
        ref = dequantize(codes, scales, zeros, groups).T
        assert torch.equal(fake_quantize(w, 64, zero_point), ref)


# --------------------------------------------------------------------------------------------
# AWQ's algorithm


def test_awq_folding_keeps_the_function(micro: Path, awq_results: list[LayerResult]) -> None:
    """The float model with the scales folded in (norms, up rows, v rows), before rounding,
    gives the source model's logits."""
    config = ModelConfig.from_pretrained(micro)
    source = _state_dict(micro)
    folded = _with_layers(config, source, [r.folded for r in awq_results])
    ids = _held_out(micro, 256)
    ref = forward_logits(config, source, ids)
    scale = float(ref.abs().max())  # about 5 (57 with the tied unit-scale embedding as head)
    torch.testing.assert_close(forward_logits(config, folded, ids), ref, atol=2e-5 * scale, rtol=0)
    # ... and the scales are not all ones: the check above tests the folding.
    lay = LAYOUTS[config.architecture]
    for r in awq_results:
        p = lay.layer.format(r.index)
        for group, s in r.scales.items():
            alpha = next(g.alpha for g in r.stats if g.group == group)
            assert (alpha is None) == (group == "o" and config.num_heads != config.num_kv_heads)
            assert torch.equal(s, torch.ones_like(s)) == (not alpha)
        for norm in (lay.input_norm, lay.post_norm):
            assert not torch.equal(folded[f"{p}{norm}.weight"], source[f"{p}{norm}.weight"])
        o_alpha = next(g.alpha for g in r.stats if g.group == "o")
        if config.num_heads == config.num_kv_heads:
            assert o_alpha  # o's scale is folded into v's rows (and bias)
            assert not torch.equal(r.folded["v.weight"], r.source["v.weight"])
            if config.attention_bias:
                assert not torch.equal(r.folded["v.bias"], r.source["v.bias"])


def test_awq_output_error_is_at_most_rtns_for_every_layer_group(
    micro: Path, quantized: dict[str, Path], awq_results: list[LayerResult]
) -> None:
    """Recomputed from the written tensors: each group's output error on the calibration
    activations (captured from the float model) with the AWQ checkpoint, mapped back to the
    source's coordinates (undo s on the inputs, the folded row scales on v / up), is at most
    RTN's. The search's own numbers agree (alpha = 0 is RTN)."""
    config = ModelConfig.from_pretrained(micro)
    source = _state_dict(micro)
    ids = calibration_ids(micro)
    awq, rtn = load_dequantized(quantized["awq"]), load_dequantized(quantized["rtn"])
    lay = LAYOUTS[config.architecture]
    h = source[f"{lay.embed}.weight"][ids] * config.embedding_multiplier  # (Granite: 6)
    rope = rope_tables(config, ids.shape[1])
    for r in awq_results:
        captured: dict[str, torch.Tensor] = {}
        h = layer_forward(config, r.source, h, rope, captured, r.index)
        awq_layer = read_layer(config, state_dict_getter(config, awq), r.index)
        rtn_layer = read_layer(config, state_dict_getter(config, rtn), r.index)
        rows = {"up": r.scales["down"]}
        if config.num_heads == config.num_kv_heads:
            rows["v"] = r.scales["o"]
        for stats in r.stats:
            x, s = captured[stats.group], r.scales[stats.group]
            lins = GROUPS[stats.group]
            exact = torch.cat([r.source[f"{n}.weight"] for n in lins])
            awq_w = torch.cat(
                [awq_layer[f"{n}.weight"] * rows.get(n, torch.ones(1))[:, None] / s for n in lins]
            )
            rtn_w = torch.cat([rtn_layer[f"{n}.weight"] for n in lins])
            ref = (x @ exact.T).pow(2).sum()
            awq_err = float((x @ (awq_w - exact).T).pow(2).sum() / ref)
            rtn_err = float((x @ (rtn_w - exact).T).pow(2).sum() / ref)
            assert awq_err <= rtn_err, (r.index, stats)
            assert stats.scaled_error <= stats.rtn_error
            assert stats.rtn_error == pytest.approx(rtn_err, rel=0.02)
            assert stats.final_error == pytest.approx(awq_err, rel=0.02)
            if stats.group != "o":  # the outlier channels feed these groups
                assert stats.scaled_error < 0.9 * stats.rtn_error, stats


def test_awq_model_is_closer_to_the_float_model_than_rtn(
    micro: Path, quantized: dict[str, Path]
) -> None:
    """KL(float || quantized) of next-token distributions on held-out text (not the
    calibration text), through the plain forward with the dequantized checkpoints."""
    config = ModelConfig.from_pretrained(micro)
    ids = _held_out(micro)
    ref = forward_logits(config, _state_dict(micro), ids)
    kl = {
        m: _kl(ref, forward_logits(config, load_dequantized(f), ids)) for m, f in quantized.items()
    }
    assert 0 < kl["awq"] < 0.8 * kl["rtn"], kl


def _runtime_nll(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from dist_runtime import RuntimeConfig
    from workers.scoring import Scorer

    config = RuntimeConfig(model=str(folder), device="cpu", dtype="float32", session_len=256)
    scorer = Scorer(config, max_tokens=ids.shape[1])
    try:
        return torch.tensor(scorer.score(ids[0].tolist()).nll)
    finally:
        scorer.close()


def _plain_nll(
    config: ModelConfig, weights: dict[str, torch.Tensor], ids: torch.Tensor
) -> torch.Tensor:
    logits = forward_logits(config, weights, ids)[0]
    return -torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[0, 1:, None])[:, 0]


def test_plain_forward_matches_the_runtime(tiny_internlm2_dir: Path) -> None:
    """The calibration forward computes what the runtime's model computes (NLL per token)."""
    ids = _held_out(tiny_internlm2_dir, 96)
    config = ModelConfig.from_pretrained(tiny_internlm2_dir)
    ours = _plain_nll(config, _state_dict(tiny_internlm2_dir), ids)
    torch.testing.assert_close(ours, _runtime_nll(tiny_internlm2_dir, ids), atol=1e-4, rtol=1e-4)


def test_runtime_loads_the_awq_folder_as_written(micro: Path, quantized: dict[str, Path]) -> None:
    """The runtime's own AWQ loader reads the folder into the weights `load_dequantized`
    gives (NLL per token through the paged-cache model vs the plain forward)."""
    ids = _held_out(micro, 96)
    config = ModelConfig.from_pretrained(quantized["awq"])
    ours = _plain_nll(config, load_dequantized(quantized["awq"]), ids)
    torch.testing.assert_close(ours, _runtime_nll(quantized["awq"], ids), atol=1e-4, rtol=1e-4)


def test_calibration_windows_spread_over_the_bundled_text(micro: Path) -> None:
    text = default_calibration_text()
    assert len(text.split()) > 2000
    ids = calibration_ids(micro, tokens=512, seq_len=128)
    assert ids.shape == (4, 128)
    all_ids = Tokenizer(micro).encode(text, add_special_tokens=False)
    assert ids[0].tolist() == all_ids[:128] and ids[-1].tolist() == all_ids[-128:]
    assert calibration_ids(micro, "one two three " * 100, tokens=64, seq_len=64).shape == (1, 64)


# --------------------------------------------------------------------------------------------
# The command line


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        rc = quantize_cli.main([*argv, "--quiet", "--log-level", "ERROR"])
    except SystemExit as e:  # argparse
        rc = int(e.code or 0)
    return rc, capsys.readouterr().err


def test_cli_bad_input_exits_2_naming_the_flag(
    tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(tiny_llama_dir)  # hidden 64, intermediate 160
    out = str(tmp_path / "out")
    calib = tmp_path / "calib.txt"
    calib.write_text("short text", encoding="utf-8")
    cases: list[tuple[list[str], list[str]]] = [
        ([str(tmp_path / "nope"), out], ["MODEL_DIR", "nope", "does not exist"]),
        ([model, out, "--group-size", "64"], ["--group-size", "64", "intermediate_size 160"]),
        ([model, out, "--group-size", "0"], ["--group-size", "0"]),
        ([model, out, "--group-size", "4"], ["--group-size", "multiple of 8", "got 4"]),
        ([model, out, "--w-bit", "3"], ["--w-bit", "3", "only 4-bit"]),
        ([model, out, "--method", "gptq"], ["--method", "gptq"]),
        ([model, out, "--group-size", "32", "--calib-tokens", "0"], ["--calib-tokens", "0"]),
        (
            [model, out, "--group-size", "32", "--calib", str(calib)],
            ["--calib-tokens", "fewer than the 512"],
        ),
        ([model, out, "--calib", str(tmp_path / "missing.txt")], ["--calib", "missing.txt"]),
        ([model, model, "--group-size", "32"], ["OUT_DIR", "is the model folder"]),
        ([model, out, "--device", "tpu"], ["--device", "tpu"]),
        ([model, out, "--log-level", "LOUD"], ["--log-level", "LOUD"]),
    ]
    for argv, words in cases:
        rc, err = _cli(argv, capsys)
        assert rc == 2, (argv, err)
        assert err.startswith("error:") or "usage:" in err, err
        for word in words:
            assert word in err, (argv, word, err)
        assert "Traceback" not in err
    assert not (tmp_path / "out").exists()

    # A non-empty output folder needs --force; an AWQ folder is not a float checkpoint.
    assert _cli([model, out, "--method", "rtn", "--group-size", "32"], capsys)[0] == 0
    rc, err = _cli([model, out, "--method", "rtn", "--group-size", "32"], capsys)
    assert rc == 2 and "OUT_DIR" in err and "--force" in err, err
    assert _cli([model, out, "--group-size", "32", "--force"], capsys)[0] == 0
    rc, err = _cli([out, str(tmp_path / "again"), "--group-size", "32"], capsys)
    assert rc == 2 and "MODEL_DIR" in err and "already quantized" in err, err


def test_cli_runs_as_a_script(tiny_internlm2_dir: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    out = tmp_path / "awq"
    cmd = [sys.executable, str(REPO_ROOT / "launch" / "quantize.py"), str(tiny_internlm2_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*cmd, str(out), "--group-size", "32", "--report", str(report), "--float-dtype", "float16"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(report.read_text())
    assert data["method"] == "awq" and data["calib_tokens"] == 512
    assert [layer["index"] for layer in data["layers"]] == [0, 1]
    assert {g["group"] for g in data["layers"][0]["groups"]} == set(GROUPS)
    assert "mean relative output error" in done.stderr  # the summary is logged
    assert (out / "quant_config.json").is_file()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    written = _state_dict(out)
    assert written["model.tok_embeddings.weight"].dtype == torch.float16
    assert written["model.layers.0.attention_norm.weight"].dtype == torch.float16
    assert written["model.layers.0.attention.wqkv.qweight"].dtype == torch.int32
    bad = subprocess.run(
        [*cmd, str(tmp_path / "x")], capture_output=True, text=True, timeout=120, env=env
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: --group-size: group size 128 does not divide")
