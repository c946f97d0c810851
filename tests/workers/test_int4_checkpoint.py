"""4-bit weight checkpoints (AWQ GEMM and GPTQ) load and compute what their dequantized weights
compute, at tp 1 and tp 3, for both checkpoint layouts.

The GPTQ files here are packed by a small packer written in this test, word by word from the
format's description (8 input rows per int32, zeros stored minus one, act-order `g_idx`), not
by the runtime's own packing functions, so a shared misreading of the format cannot pass.
Each quantized folder has a float twin whose weights are the dequantized ones: both must give
the same teacher-forced NLL per token (tp 1) and the same greedy tokens and log-probabilities
(tp 1 and tp 3 over Ray).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from dist_runtime import Runtime, SamplingParams
from dist_runtime.config import ConfigError, ModelConfig, ParallelConfig, RuntimeConfig
from dist_runtime.formats.int4 import pack_awq
from dist_runtime.formats.random_checkpoint import write_random_checkpoint
from workers.checkpoint import CheckpointError
from workers.layers.linear import _Linear
from workers.scoring import Scorer

SHAPES: dict[str, Any] = dict(
    vocab_size=384, hidden_size=96, intermediate_size=192, num_layers=2, num_heads=6, num_kv_heads=3
)
"""tp 3 holds whole groups of 32: attention output 96 -> 32 per rank, MLP 192 -> 64."""
GROUP = 32
LINEARS = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "internlm2": ("wqkv", "wo", "w1", "w2", "w3"),
}
LINEARS["llama"] += ("qkv_proj", "gate_up_proj")  # (Phi-3's packed ones, quantized as one)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _is_linear(name: str, arch: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in LINEARS[arch]


def _quantize_grouped(
    w: torch.Tensor, g_idx: torch.Tensor, groups: int, sym: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [out, in] -> codes [in, out], scales and zeros [groups, out], rows grouped by g_idx."""
    wt = w.T.double()
    scales = torch.empty(groups, w.shape[0], dtype=torch.float64)
    zeros = torch.empty_like(scales)
    for j in range(groups):
        rows = wt[g_idx == j]
        if sym:
            scales[j] = (rows.abs().amax(0) * 2 / 15).clamp(min=1e-6)
            zeros[j] = 8
        else:
            lo, hi = rows.amin(0).clamp(max=0), rows.amax(0).clamp(min=0)
            scales[j] = ((hi - lo) / 15).clamp(min=1e-6)
            zeros[j] = torch.round(-lo / scales[j]).clamp(1, 15)  # GPTQ stores zero - 1 >= 0
    scales = scales.half().double()  # the checkpoint keeps float16 scales
    codes = torch.round(wt / scales[g_idx] + zeros[g_idx]).clamp(0, 15).to(torch.int64)
    return codes, scales, zeros


def _gptq_words(codes: torch.Tensor) -> torch.Tensor:
    """[in, out] codes -> [in/8, out] int32: word r holds rows 8r..8r+7, row 8r+j in bits 4j."""
    rows, cols = codes.shape
    out = torch.zeros(rows // 8, cols, dtype=torch.int64)
    for r in range(rows // 8):
        for j in range(8):
            out[r] |= codes[8 * r + j] << (4 * j)
    return _as_int32(out)


def _gptq_zero_words(zeros: torch.Tensor) -> torch.Tensor:
    """[groups, out] zeros -> [groups, out/8] int32 of zero - 1, column 8c+j in bits 4j."""
    stored = zeros.to(torch.int64) - 1
    groups, cols = stored.shape
    out = torch.zeros(groups, cols // 8, dtype=torch.int64)
    for c in range(cols // 8):
        for j in range(8):
            out[:, c] |= stored[:, 8 * c + j] << (4 * j)
    return _as_int32(out)


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit words -> the same bits as int32."""
    return (words - (words >= 2**31).long() * 2**32).to(torch.int32)


def write_quantized(
    src: Path, dst: Path, method: str, *, desc_act: bool = False, sym: bool = False, seed: int = 0
) -> tuple[Path, Path]:
    """Quantize every decoder linear of `src`; returns (4-bit folder, float twin folder)."""
    config = json.loads((src / "config.json").read_text())
    arch = ModelConfig.from_dict(config).architecture
    tensors = _weights(src)
    gen = torch.Generator().manual_seed(seed)
    perms: dict[int, torch.Tensor] = {}  # one act-order permutation per input width
    quant: dict[str, torch.Tensor] = {}
    twin: dict[str, torch.Tensor] = {}
    for name, w in tensors.items():
        if not _is_linear(name, arch):
            quant[name] = twin[name] = w
            continue
        base, in_f = name.removesuffix(".weight"), w.shape[1]
        groups = in_f // GROUP
        if desc_act:
            if in_f not in perms:
                perms[in_f] = torch.randperm(in_f, generator=gen)
            g_idx = torch.argsort(perms[in_f]) // GROUP
        else:
            g_idx = torch.arange(in_f) // GROUP
        codes, scales, zeros = _quantize_grouped(w, g_idx, groups, sym)
        twin[name] = ((codes.double() - zeros[g_idx]) * scales[g_idx]).T.float().contiguous()
        if method == "gptq":
            quant[f"{base}.qweight"] = _gptq_words(codes)
            quant[f"{base}.qzeros"] = _gptq_zero_words(zeros)
            quant[f"{base}.g_idx"] = g_idx.to(torch.int32)
        else:
            qweight, qzeros = pack_awq(codes, zeros)
            quant[f"{base}.qweight"], quant[f"{base}.qzeros"] = qweight, qzeros
        quant[f"{base}.scales"] = scales.half()
    if method == "gptq":
        qc = {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": desc_act}
        qc |= {"sym": sym, "checkpoint_format": "gptq"}
    else:
        qc = {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True}
        qc |= {"version": "gemm"}
    out = {}
    for kind, state, extra in (("q", quant, {"quantization_config": qc}), ("f", twin, {})):
        folder = dst / kind
        folder.mkdir(parents=True)
        for f in src.iterdir():
            if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
                (folder / f.name).write_bytes(f.read_bytes())
        (folder / "config.json").write_text(json.dumps({**config, **extra}))
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
        out[kind] = folder
    return out["q"], out["f"]


def write_awq_with_quantizer(src: Path, dst: Path) -> tuple[Path, Path]:
    """`launch/quantize.py --method awq` (the library call), and the float twin of what it wrote
    (its AWQ tensors unpacked and dequantized by the quantizer's own reader)."""
    from dist_runtime.quantize import load_dequantized, quantize_checkpoint

    quant = dst / "q"
    quantize_checkpoint(src, quant, method="awq", group_size=GROUP, progress=False)
    twin = dst / "f"
    twin.mkdir(parents=True)
    for f in quant.iterdir():
        if f.suffix != ".safetensors" and f.name not in ("quant_config.json", "config.json"):
            (twin / f.name).write_bytes(f.read_bytes())
    config = json.loads((quant / "config.json").read_text())
    config.pop("quantization_config")
    (twin / "config.json").write_text(json.dumps(config))
    save_file(load_dequantized(quant), str(twin / "model.safetensors"))
    return quant, twin


CASES = {
    "awq-llama": ("llama", "awq", False, False),
    "awq-internlm2": ("internlm2", "awq", False, False),
    "gptq-llama-actorder-sym": ("llama", "gptq", True, True),
    "gptq-internlm2-actorder": ("internlm2", "gptq", True, False),
    "gptq-llama-asym": ("llama", "gptq", False, False),
    # Phi-3: qkv_proj and gate_up_proj quantized as one linear each, read part by part
    "awq-phi3": ("phi3", "awq", False, False),
    "gptq-phi3-actorder": ("phi3", "gptq", True, False),
    # Granite: the residual multiplier folded into o_proj's and down_proj's 4-bit scales
    "awq-granite": ("granite", "awq", False, False),
    "quantize.py-awq-internlm2": ("internlm2", "quantize.py", False, False),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Path]]:
    made: dict[str, tuple[Path, Path]] = {}

    def get(case: str) -> tuple[Path, Path]:
        if case not in made:
            arch, method, desc_act, sym = CASES[case]
            root = tmp_path_factory.mktemp(case)
            src = write_random_checkpoint(root / "src", architecture=arch, seed=3, **SHAPES)
            if method == "quantize.py":
                made[case] = write_awq_with_quantizer(src, root)
            else:
                made[case] = write_quantized(src, root, method, desc_act=desc_act, sym=sym)
        return made[case]

    return get


def _nll(folder: Path, ids: list[int]) -> list[float]:
    config = RuntimeConfig(model=str(folder), session_len=512, device="cpu", dtype="float32")
    scorer = Scorer(config, max_tokens=len(ids))
    try:
        return scorer.score(ids, chunk=48, decode_last=4).nll
    finally:
        scorer.close()


@pytest.mark.parametrize("case", sorted(CASES))
def test_tp1_scores_equal_the_dequantized_float_model(
    folders: Callable[[str], tuple[Path, Path]], case: str
) -> None:
    quant, twin = folders(case)
    ids = [(11 * i + 5) % SHAPES["vocab_size"] for i in range(120)]
    got, want = _nll(quant, ids), _nll(twin, ids)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-5)


PROMPTS = ["the quick brown fox", "a b c d e f g h i j k"]
PARAMS = SamplingParams(max_new_tokens=8, logprobs=3)


def _generate(folder: Path, tp: int) -> list[Any]:
    with Runtime(model=str(folder), tp=tp, session_len=256, device="cpu", dtype="float32") as rt:
        return rt.generate(PROMPTS, PARAMS)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param("awq-internlm2", marks=pytest.mark.slow),  # quantize.py's case covers it
        # (tp = 1 scores each case against its dequantized twin; at tp = 3 one runs by default)
        pytest.param("gptq-llama-actorder-sym", marks=pytest.mark.slow),
        "quantize.py-awq-internlm2",
        # (each rank's columns of the packed layers' parts)
        pytest.param("awq-phi3", marks=pytest.mark.slow),
    ],
)
def test_tp3_generates_what_the_float_twin_does(
    ray_cluster: Any, folders: Callable[[str], tuple[Path, Path]], case: str
) -> None:
    quant, twin = folders(case)
    got, want = _generate(quant, 3), _generate(twin, 3)
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        assert g.logprobs is not None and w.logprobs is not None
        for a, b in zip(g.logprobs, w.logprobs, strict=True):
            assert list(a.top) == list(b.top)
            assert abs(a.logprob - b.logprob) < 1e-4


def test_tp_that_splits_a_group_is_refused_with_the_working_values(
    folders: Callable[[str], tuple[Path, Path]],
) -> None:
    quant, _ = folders("awq-llama")
    model = ModelConfig.from_pretrained(quant)
    assert model.weight_quant is not None and model.weight_quant.group_size == GROUP
    float_model = ModelConfig.from_pretrained(quant.parent / "f")
    ParallelConfig(tp=6).check_model(float_model)  # 6 heads, 3 KV heads, 192: tp 6 shards it
    with pytest.raises(ConfigError, match=r"16 per rank, not whole AWQ groups of 32.*\[1, 3\]"):
        ParallelConfig(tp=6).check_model(model)


def test_bad_quantization_configs_name_the_value(tmp_path: Path) -> None:
    base = json.loads(
        (write_random_checkpoint(tmp_path / "m", seed=1, **SHAPES) / "config.json").read_text()
    )
    bad = [
        ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes' is not supported"),
        ({"quant_method": "awq", "bits": 8, "version": "gemm"}, "bits=8 is not supported"),
        ({"quant_method": "awq", "version": "gemv"}, "AWQ version 'gemv' is not supported"),
        ({"quant_method": "gptq", "group_size": 12}, "group_size must be a positive multiple"),
    ]
    for qc, message in bad:
        with pytest.raises(ConfigError, match=message):
            ModelConfig.from_dict({**base, "quantization_config": qc})


def test_missing_or_misshaped_packed_tensors_are_reported(
    folders: Callable[[str], tuple[Path, Path]], tmp_path: Path
) -> None:
    quant, _ = folders("gptq-llama-asym")
    tensors = load_file(str(quant / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.qweight"
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in quant.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    save_file({**tensors, name: tensors[name][:-1].contiguous()}, str(broken / "model.safetensors"))
    config = RuntimeConfig(model=str(broken), session_len=64, device="cpu", dtype="float32")
    with pytest.raises(CheckpointError, match="down_proj.qweight.*has shape"):
        Scorer(config, max_tokens=16)


def test_the_triton_kernel_serves_the_model(
    folders: Callable[[str], tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With Triton forced (the interpreter on CPU, compiled on CUDA) the layers keep their codes
    and run the W4A16 kernel inside the model: the scores still equal the float twin's."""
    monkeypatch.setenv("DIST_RUNTIME_KERNELS", "triton")
    quant, twin = folders("gptq-internlm2-actorder")
    ids = [(7 * i + 2) % SHAPES["vocab_size"] for i in range(24)]
    config = RuntimeConfig(model=str(quant), session_len=64, device="cpu", dtype="float32")
    scorer = Scorer(config, max_tokens=len(ids))
    try:
        linears = [m for m in scorer.runner.model.modules() if isinstance(m, _Linear)]
        assert linears and all(m.qweight is not None and m.weight is None for m in linears)
        got = scorer.score(ids, chunk=16, decode_last=2).nll
    finally:
        scorer.close()
    monkeypatch.setenv("DIST_RUNTIME_KERNELS", "torch")
    torch.testing.assert_close(
        torch.tensor(got), torch.tensor(_nll(twin, ids)), rtol=1e-4, atol=1e-4
    )


def test_bfloat16_on_cpu_keeps_the_codes_for_the_int4_matmul(
    folders: Callable[[str], tuple[Path, Path]],
) -> None:
    """A bfloat16 model on CPU repacks its 4-bit layers for PyTorch's CPU int4 matmul (no float
    copy of the weights) and scores as its float twin in bfloat16 does, within bf16 noise."""
    quant, twin = folders("awq-llama")
    ids = [(13 * i + 1) % SHAPES["vocab_size"] for i in range(64)]
    nll = {}
    for name, folder in (("int4", quant), ("twin", twin)):
        config = RuntimeConfig(model=str(folder), session_len=128, device="cpu", dtype="bfloat16")
        scorer = Scorer(config, max_tokens=len(ids))
        try:
            linears = [m for m in scorer.runner.model.modules() if isinstance(m, _Linear)]
            held = {m.cpu_int4 is not None and m.weight is None for m in linears}
            assert held == ({True} if name == "int4" else {False})
            nll[name] = scorer.score(ids, chunk=32, decode_last=2).nll
        finally:
            scorer.close()
    got, want = torch.tensor(nll["int4"]), torch.tensor(nll["twin"])
    assert (got - want).abs().mean() < 0.02 * want.abs().mean(), (got - want).abs().max()
