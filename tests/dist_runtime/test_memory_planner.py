"""The memory planner (`dist_runtime.memory_planner`) and `launch/run.py --dry-run`, checked against
byte counts worked out by hand."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from dist_runtime.config import ConfigError, ModelConfig
from dist_runtime.memory_planner import (
    GiB,
    MemoryPlan,
    plan_memory,
    smallest_fitting_cp,
    smallest_fitting_tp,
    smallest_fitting_tp_cp,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_1M = REPO_ROOT / "bench" / "model_configs" / "internlm2_5-7b-chat-1m.json"
MiB = 1 << 20


def tiny() -> ModelConfig:
    return ModelConfig(
        architecture="llama",
        vocab_size=101,
        hidden_size=64,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
    )


def model_1m() -> ModelConfig:
    return ModelConfig.from_dict(json.loads(CONFIG_1M.read_text()), source=str(CONFIG_1M))


def plan_1m(**kw: Any) -> MemoryPlan:
    args: dict[str, Any] = dict(
        tp=4, cp=1, session_len=1 << 20, dtype="bfloat16", device_bytes=80 * GiB
    )
    args.update(kw)
    return plan_memory(model_1m(), **args)


def test_tiny_tp2_by_hand() -> None:
    p = plan_memory(
        tiny(),
        tp=2,
        cp=1,
        session_len=100,
        dtype="bfloat16",
        device_bytes=1 << 20,
        max_num_batched_tokens=8,
        is_cuda=False,
    )
    # per layer: qkv (2 + 2*1)*16 rows x 64 = 4096, o 64 x 32 = 2048, MLP 3 x 32 x 64 = 6144,
    # norms 2 x 64 = 128 -> 12416; x2 layers = 24832; embed + head 51 rows x 64 x 2 = 6528; final
    # norm 64 -> 31424 params
    assert p.weights == 31424 * 2
    # 100 tokens -> 7 blocks of 16 = 112 slots x (2 x 2 layers x 1 head x 16 x 2 bytes = 128)
    assert p.kv_cache == 112 * 128
    # 8 x (4*64 + 4*16 + 3*32) x 2 + 8 x 2 heads x 17 x 4 + 101 x 4
    assert p.activations == 8 * 416 * 2 + 8 * 2 * 17 * 4 + 101 * 4
    assert p.overhead == 0
    assert p.total == p.weights + p.kv_cache + p.activations
    assert p.fits and p.suggestion() == ""


def test_a_window_on_every_layer_bounds_the_kv_a_sequence_holds() -> None:
    """Mistral-style windows on every layer: a sequence holds its window, one step's tokens and
    a block on either side (20 + 8 + 32 = 60 -> 4 blocks of 16); with one layer unwindowed it
    holds its whole session (7 blocks)."""
    args: dict[str, Any] = dict(
        tp=2, cp=1, session_len=100, dtype="bfloat16", device_bytes=1 << 20,
        max_num_batched_tokens=8, is_cuda=False,
    )  # fmt: skip
    windowed = plan_memory(dataclasses.replace(tiny(), sliding_window=20), **args)
    assert windowed.kv_cache == 64 * 128
    assert "a sliding window of 20 on every layer: a sequence holds at most 60 tokens" in (
        windowed.table()
    )
    model = dataclasses.replace(tiny(), sliding_window=20, window_layers=(True, False))
    assert plan_memory(model, **args).kv_cache == 112 * 128


def test_tp_above_kv_heads_replicates_kv() -> None:
    p = plan_memory(
        tiny(), tp=4, cp=1, session_len=16, dtype="float32", device_bytes=1 << 30, is_cuda=False
    )
    # kv_local = 1 (not 2/4 = 0): 16 slots x 2 x 2 layers x 1 x 16 x 4 bytes
    assert p.kv_cache == 16 * 2 * 2 * 1 * 16 * 4
    # qkv (1 + 2)*16 x 64 = 3072, o 64 x 16 = 1024, MLP 3 x 16 x 64 = 3072, norms 128 -> 7296;
    # x2 = 14592; vocab 101 padded to 104: 26 rows x 64 x 2 = 3328; + 64
    assert p.weights == (14592 + 3328 + 64) * 4


def test_bad_tp_is_refused() -> None:
    with pytest.raises(ConfigError, match="choose tp"):
        plan_memory(tiny(), tp=3, cp=1, session_len=16, dtype="bfloat16", device_bytes=1 << 30)


def test_7b_1m_tp4() -> None:
    p = plan_1m()
    assert p.kv_cache == 32 * GiB  # 32 KiB/token/worker x 2^20 tokens
    assert p.kv_cache // (1 << 20) == 2 * 32 * 2 * 128 * 2
    # hand count: embed/head 92544 x 4096 each; per layer wqkv (32+16)x128x4096, wo 4096^2,
    # MLP 3 x 4096 x 14336, 2 norms; final norm
    total_params = 2 * 92544 * 4096 + 32 * (48 * 128 * 4096 + 4096**2 + 3 * 4096 * 14336 + 8192)
    total_params += 4096
    assert abs(total_params - 7.74e9) / 7.74e9 < 0.001
    assert abs(p.weights - total_params / 4 * 2) / p.weights < 0.01
    assert 3.5 * GiB < p.weights < 3.7 * GiB
    assert p.overhead == GiB
    assert p.fits


def test_kv_falls_as_one_over_cp_and_weights_replicate() -> None:
    base = plan_1m(cp=1)
    for cp in (2, 4, 8):
        p = plan_1m(cp=cp)
        assert p.kv_cache == base.kv_cache // cp
        assert p.weights == base.weights
        assert p.activations == base.activations


def test_max_session_len_is_largest_that_fits() -> None:
    for kw in ({}, {"cp": 2}, {"tp": 2, "device_bytes": 24 * GiB}, {"num_seqs": 3}):
        p = plan_1m(**kw)
        m = p.max_session_len
        assert m > 0
        assert plan_1m(**{**kw, "session_len": m}).fits
        assert not plan_1m(**{**kw, "session_len": m + p.block_size * p.cp}).fits
        assert not plan_1m(**{**kw, "session_len": m + 1}).fits


def test_nothing_fits_when_weights_do_not() -> None:
    p = plan_1m(tp=1, device_bytes=10 * GiB)
    assert not p.fits and p.max_session_len == 0
    # 14.4 GiB of weights at tp=1: no cp helps; at tp >= 8 KV heads replicate (16 GiB at 1M),
    # so no tp alone helps either: only tp and cp together
    assert smallest_fitting_cp(p) is None and smallest_fitting_tp(p) is None
    tp, cp = smallest_fitting_tp_cp(p) or (0, 0)
    assert plan_1m(tp=tp, cp=cp, device_bytes=10 * GiB).fits
    assert not plan_1m(tp=tp, cp=cp - 1, device_bytes=10 * GiB).fits
    assert p.suggestion().endswith(f"use --tp {tp} --cp {cp}")
    assert "no tp, cp or session length" in plan_1m(device_bytes=GiB).suggestion()


def test_suggestion_names_a_config_that_fits() -> None:
    p = plan_1m(tp=1, device_bytes=24 * GiB)
    assert not p.fits
    tp, cp = smallest_fitting_tp(p), smallest_fitting_cp(p)
    assert tp is not None and cp is not None
    assert plan_1m(tp=tp, device_bytes=24 * GiB).fits
    assert not plan_1m(tp=tp // 2, device_bytes=24 * GiB).fits
    assert plan_1m(tp=1, cp=cp, device_bytes=24 * GiB).fits
    assert not plan_1m(tp=1, cp=cp - 1, device_bytes=24 * GiB).fits
    text = p.suggestion()
    assert f"raise --tp to {tp}" in text
    assert f"add --cp {cp}" in text
    assert f"shorten --session-len to {p.max_session_len}" in text


def _run_cli() -> ModuleType:
    spec = importlib.util.spec_from_file_location("launch_run", REPO_ROOT / "launch" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_dry_run_fits(capsys: pytest.CaptureFixture[str]) -> None:
    cli = _run_cli()
    argv = ["--dry-run", "--model", str(CONFIG_1M), "--tp", "4", "--session-len", "1048576"]
    assert cli.main([*argv, "--device-memory-gib", "80"]) == 0
    out = capsys.readouterr().out
    assert "kv cache     32.00 GiB" in out
    assert "fits: yes" in out


def test_cli_dry_run_does_not_fit(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cli = _run_cli()
    (tmp_path / "config.json").write_text(CONFIG_1M.read_text())  # a model folder works too
    argv = ["--dry-run", "--model", str(tmp_path), "--tp", "1", "--session-len", "1048576"]
    assert cli.main([*argv, "--device-memory-gib", "24"]) == 1
    out = capsys.readouterr().out
    assert "fits: no" in out
    assert "raise --tp to 8" in out


def test_cli_dry_run_plans_cp(capsys: pytest.CaptureFixture[str]) -> None:
    cli = _run_cli()
    argv = ["--dry-run", "--model", str(CONFIG_1M), "--tp", "2", "--cp", "2"]
    assert cli.main([*argv, "--session-len", "2097152", "--device-memory-gib", "80"]) == 0
    assert "tp=2 cp=2" in capsys.readouterr().out


def test_quantized_kv_bytes_count_codes_and_scales() -> None:
    """Per token and worker at tp 4: 2 (K, V) x 32 layers x 2 KV heads x (head_dim 128 codes
    at bits/8 bytes + a float32 scale and zero)."""
    for policy, per_head in ((0, 128 * 2), (8, 128 + 8), (4, 64 + 8)):
        p = plan_1m(quant_policy=policy)
        assert p.kv_cache == (1 << 20) * 2 * 32 * 2 * per_head, policy
    p0, p8, p4 = (plan_1m(quant_policy=q) for q in (0, 8, 4))
    assert p0.max_session_len < p8.max_session_len < p4.max_session_len
    # The 1M session fits one 80 GB GPU with int4 KV, not with bf16 or int8.
    assert [plan_1m(tp=1, quant_policy=q).fits for q in (0, 8, 4)] == [False, False, True]
    with pytest.raises(ConfigError, match="quant_policy must be one of"):
        plan_1m(quant_policy=2)


def test_cli_dry_run_shows_capacity_per_policy(capsys: pytest.CaptureFixture[str]) -> None:
    cli = _run_cli()
    argv = ["--dry-run", "--model", str(CONFIG_1M), "--tp", "4", "--session-len", "1048576"]
    assert cli.main([*argv, "--device-memory-gib", "80", "--quant-policy", "8"]) == 0
    out = capsys.readouterr().out
    assert "KV int8" in out and "kv cache     17.00 GiB" in out
    line = next(x for x in out.splitlines() if x.startswith("max session_len by --quant-policy"))
    caps = [int(x.replace(",", "")) for x in re.findall(r": ([\d,]+) tokens", line)]
    assert len(caps) == 3 and caps[0] < caps[1] < caps[2]


def test_four_bit_weight_bytes_by_hand() -> None:
    """hidden 256, 4 heads x 64, 2 KV heads, intermediate 512, 2 layers, vocab 1000, AWQ group
    128, bf16, tp 2: every linear's codes are in*out/2 bytes plus float16 scale and zero per
    (group, output); embeddings, head and norms stay bf16."""
    from dist_runtime.config import WeightQuant
    from dist_runtime.memory_planner import weight_bytes_per_worker, weight_params_per_worker

    base = ModelConfig(
        architecture="llama",
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
    )
    quant = dataclasses.replace(base, weight_quant=WeightQuant(method="awq", group_size=128))
    qkv = 256 * (2 + 2) * 64 // 2 + 2 * 2 * 256 * 2  # in 256 (2 groups), out (2 q + 2 kv) * 64
    o = 128 * 256 // 2 + 2 * 1 * 256 * 2  # in 2 heads * 64 = 128 (1 group), out 256
    gate_up = 256 * 512 // 2 + 2 * 2 * 512 * 2  # in 256 (2 groups), out 2 * 256
    down = 256 * 256 // 2 + 2 * 2 * 256 * 2  # in 256 (2 groups), out 256
    norms = 2 * 256 * 2
    rest = 2 * 500 * 256 * 2 + 256 * 2  # embedding + head rows of this rank, final norm
    want = 2 * (qkv + o + gate_up + down + norms) + rest
    assert weight_bytes_per_worker(quant, 2, "bfloat16") == want
    assert weight_bytes_per_worker(base, 2, "bfloat16") == weight_params_per_worker(base, 2) * 2
    # On CPU a bfloat16 model keeps them 4-bit (PyTorch's int4 matmul); float32 dequantizes.
    assert weight_bytes_per_worker(quant, 2, "bfloat16", is_cuda=False) == want
    assert weight_bytes_per_worker(quant, 2, "float32", is_cuda=False) == (
        weight_params_per_worker(base, 2) * 4
    )
    fp = plan_memory(base, tp=2, cp=1, session_len=0, dtype="bfloat16", device_bytes=8 << 30)
    q4 = plan_memory(quant, tp=2, cp=1, session_len=0, dtype="bfloat16", device_bytes=8 << 30)
    assert q4.weights == want and q4.max_session_len > fp.max_session_len


def test_a_tied_head_on_cpu_counts_its_onednn_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU a tied LM head keeps a oneDNN-reordered copy of the embedding rows beside the
    plain rows the embedding looks up (`kernels/cpu_gemm.py`); on CUDA, or with
    DIST_RUNTIME_CPU_GEMM=torch, the head reads the embedding itself."""
    from dist_runtime.memory_planner import weight_bytes_per_worker, weight_params_per_worker

    tied = ModelConfig(
        architecture="llama",
        vocab_size=1001,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
    )
    plain = weight_params_per_worker(tied, 2) * 4
    assert weight_bytes_per_worker(tied, 2, "float32") == plain
    assert weight_bytes_per_worker(tied, 2, "float32", is_cuda=False) == plain + 501 * 64 * 4
    untied = dataclasses.replace(tied, tie_word_embeddings=False)
    assert weight_bytes_per_worker(untied, 2, "float32", is_cuda=False) == (
        weight_params_per_worker(untied, 2) * 4
    )
    monkeypatch.setenv("DIST_RUNTIME_CPU_GEMM", "torch")
    assert weight_bytes_per_worker(tied, 2, "float32", is_cuda=False) == plain


def test_cli_dry_run_shows_the_host_tier(capsys: pytest.CaptureFixture[str]) -> None:
    """7B-1M at tp 4 cp 2: a worker holds 2 of the 8 KV heads, 2 x 32 layers x 2 heads x 128
    x 2 bytes = 32 KiB a token, so 64 GiB of host memory hold 2M tokens per worker, 4M over
    the two cp ranks."""
    cli = _run_cli()
    argv = ["--dry-run", "--model", str(CONFIG_1M), "--tp", "4", "--cp", "2"]
    argv += ["--session-len", "1048576", "--device-memory-gib", "80"]
    assert cli.main([*argv, "--host-kv-cache-gb", "64"]) == 0
    out = capsys.readouterr().out
    assert "host tier of the prefix cache: 64 GiB of host memory per worker" in out
    assert "4,194,304 tokens of evicted prefixes over cp=2" in out


def test_cli_dry_run_on_cpu_plans_the_kv_reservation(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On --device cpu the plan is the runtime's: fp32, and the KV cache either the
    --cpu-kv-cache-gb reservation (7B-1M at tp 4: 2 x 32 layers x 2 heads x 128 x 4 bytes =
    64 KiB a token, so 16 GiB hold 262,144 tokens) or 90% of the memory available."""
    import dist_runtime.memory_planner as planner_module

    cli = _run_cli()
    argv = ["--dry-run", "--model", str(CONFIG_1M), "--device", "cpu", "--tp", "4"]
    assert cli.main([*argv, "--session-len", "262144", "--cpu-kv-cache-gb", "16"]) == 0
    out = capsys.readouterr().out
    assert "float32" in out and "kv cache     16.00 GiB" in out
    assert "max session_len at tp=4 cp=1: 262,144" in out
    assert cli.main([*argv, "--session-len", "524288", "--cpu-kv-cache-gb", "16"]) == 1
    out = capsys.readouterr().out
    assert "fits: no" in out and "or raise --cpu-kv-cache-gb to 32" in out
    monkeypatch.setattr(planner_module, "available_host_bytes", lambda: 400 * GiB)
    assert cli.main([*argv, "--session-len", "262144"]) == 0
    out = capsys.readouterr().out
    assert "device       90.00 GiB" in out  # a quarter of 90% of 400 GiB: 4 workers share it
    assert "90% of what it has available now, split over the 4 worker(s) on it" in out
