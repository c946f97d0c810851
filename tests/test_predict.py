"""bench/predict.py: FLOP and byte counts against hand arithmetic, the collective and decode
terms at tp 2 / cp 2, the validation table parsed from the stored GPU reports, and the CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench import hardware
from bench import predict as P
from dist_runtime.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]
HEADLINE = [
    "--gpus",
    "4xA100-80GB",
    "--model",
    str(REPO / "bench/model_configs/internlm2_5-7b-chat-1m.json"),
    "--session-len",
    "1048576",
]

SMALL = ModelConfig.from_dict(
    {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 1000,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
    }
)
"""head_dim 64 / 8 = 8; GQA with 2 query heads per KV head; untied LM head; no biases."""


def test_small_config_is_what_the_hand_arithmetic_assumes() -> None:
    assert (SMALL.head_dim, SMALL.num_layers, SMALL.tie_word_embeddings) == (8, 2, False)


def test_flop_counts() -> None:
    # One layer's matmul weights: wqkv (8 + 2*4 heads) x 8 x 64, wo 64 x 64,
    # gate/up/down 3 x 160 x 64.
    assert P.layer_linear_params(SMALL) == 8192 + 4096 + 30720 == 43008
    # Non-embedding linears incl. the LM head (1000 x 64).
    assert P.matmul_params(SMALL) == 2 * 43008 + 64000 == 150016
    # Prefill of 100 tokens: every layer on every token, the LM head on the last token.
    assert P.matmul_flops(SMALL, 100) == 2 * (2 * 43008 * 100 + 64000) == 17_331_200
    # Causal attention, per layer: 2 (QK^T, PV) x 2 (multiply-add) x 100^2/2 pairs x 8 heads x 8.
    per_layer = 2 * 2 * (100 * 100 // 2) * 8 * 8
    assert per_layer == 1_280_000
    assert P.attention_flops(SMALL, 100) == 2 * per_layer == 2_560_000
    # The floor's count puts the LM head on every token.
    assert P.floor_flops(SMALL, 100) == 2 * 150016 * 100 + 2_560_000 == 32_563_200


def test_byte_counts_at_tp2() -> None:
    # tp 2: 4 query heads, 2 KV heads, intermediate 80 per rank; bf16 (2 bytes).
    assert P.elementwise_bytes_per_token(SMALL, 2, 2) == {
        "rms_norm": 2 * 4 * 64 * 2,  # two norms a layer, x and residual in, out and sum out
        "rotary": 2 * (4 + 2) * 8 * 2 + 8,  # q and k read and written, + the int64 position
        "silu_and_mul": 3 * 80 * 2,  # gate and up in, product out
        "store_kv": 4 * 2 * 8 * 2 + 8,  # k and v read, two cache rows written, + the slot
    }
    # Decode reads every weight a rank holds but the embedding table:
    # per layer wqkv (4 + 2*2) x 8 rows of 64, wo 64 x 32, 3 x 80 x 64, two norms of 64;
    # + the LM head's 500 rows of 64 + the final norm.
    per_layer = (4 + 2 * 2) * 8 * 64 + 64 * 32 + 3 * 80 * 64 + 2 * 64
    assert P.decode_weight_bytes(SMALL, 2, 2) == (2 * per_layer + 500 * 64 + 64) * 2 == 150656


def test_collective_and_kv_terms_at_tp2_cp2() -> None:
    # 100 tokens over cp 2: 50 per rank; one all-reduce moves 50 x 64 x 2 bytes.
    assert P.all_reduce_payload(50, SMALL, 2) == 6400
    assert P.ring_all_reduce_sent(6400, 2) == 2 * (2 - 1) / 2 * 6400 == 6400
    assert P.ring_all_reduce_sent(6400, 4) == 2 * 3 / 4 * 6400 == 9600
    # Ring step: 50 tokens x 2 KV heads per rank x 8 x (K and V) x 2 bytes.
    assert P.ring_step_bytes(SMALL, 2, 50, 2) == 50 * 2 * 8 * 2 * 2 == 3200
    # A chunk of 100 after a cached prefix: the other rank's 50 queries (4 heads x 8 x 2 B)
    # gathered, then 50 rows of 4 heads x (8 x 2 B output + 4 B LSE) sent back.
    assert P.query_exchange_bytes(SMALL, 2, 2, 100, 2) == 50 * 4 * 8 * 2 + 50 * 4 * (16 + 4)
    assert P.query_exchange_bytes(SMALL, 2, 2, 100, 2) == 7200
    # KV read per decode step at 100 context: 2 (K, V) x 2 layers x 2 KV heads x 8 x 2 B per
    # token, 50 tokens on each cp rank.
    assert P.decode_kv_bytes(SMALL, 2, 2, 100, "bfloat16") == 2 * 2 * 2 * 8 * 2 * 50 == 6400


FAKE_GPU = hardware.GPU(
    key="T",
    name="test card",
    aliases=(),
    device_names=(),
    bf16_dense_flops=1e12,
    hbm_bytes_per_s=1e9,
    memory_bytes=1 << 30,
    nvlink_bidir_bytes_per_s=2e6,
    pcie_bidir_bytes_per_s=2e5,
    sources=(),
    compute_capability=80,
    sms=4,
    max_shared_per_block=1 << 16,
    shared_per_sm=1 << 16,
    max_clock_hz=1e9,
)


def _rates() -> P.Rates:
    def pts(eff: float, at: int = 0) -> list[P.Point]:
        return [P.Point(0.0, eff, "test", at)]

    return P.Rates(
        matmul=pts(0.5),
        copy=pts(0.8),
        paged_attention=pts(0.25, 1),
        position_attention=pts(0.4),
        elementwise={k: pts(0.5) for k in P.ELEMENTWISE_KERNELS},
        decode_kv=pts(0.5, 1),
    )


def test_prefill_terms_at_tp2_cp2() -> None:
    pre = P.predict_prefill(SMALL, FAKE_GPU, _rates(), tp=2, cp=2, tokens=100, chunk=40)
    link = 1e6  # 2e6 bidirectional, one direction
    # Layers' matmuls on 100 tokens over 4 GPUs + the LM head (on 1 token, over tp 2), at
    # 0.5 x 1e12.
    assert pre.matmul_s == pytest.approx((2 * 2 * 43008 * 100 / 4 + 2 * 64000 / 2) / 0.5e12)
    # Position-kernel rate at cp > 1: 0.4 x 1e12.
    assert pre.attention_s == pytest.approx(2_560_000 / 4 / 0.4e12)
    # 50 tokens x 2 layers x (1024 + 200 + 480 + 136) bytes at 0.5 x 1e9.
    assert pre.elementwise_s == pytest.approx(50 * 2 * 1840 / 0.5e9)
    # 2 per layer + 1 after the embedding, each sending 6400 B.
    assert pre.all_reduces == 5
    assert pre.tp_all_reduce_s == pytest.approx(5 * 6400 / link)
    # Fresh first chunk of 40 tokens: 20 per rank, 20 x 2 x 8 x 2 x 2 = 1280 B per ring step,
    # against attention of 40 tokens per layer over 4 GPUs, one of 2 steps.
    assert pre.ring_step_bytes == 1280
    assert pre.ring_step_transfer_s == pytest.approx(1280 / link)
    assert pre.ring_step_compute_s == pytest.approx(2 * 2 * (40 * 40 / 2) * 8 * 8 / 4 / 2 / 0.4e12)
    assert not pre.ring_hidden  # this link is slow enough to expose the transfer
    # 3 chunks; the 2 later ones exchange queries: 20 x 4 x 8 x 2 + 20 x 4 x 20 = 2880 B per
    # layer; the ring adds its excess over compute, per layer and step.
    assert pre.chunks == 3
    assert pre.query_exchange_bytes == 2880
    exposed = 2 * 1 * (1280 / link - pre.ring_step_compute_s)
    assert pre.cp_exchange_s == pytest.approx(2 * 2 * 2880 / link + exposed)
    assert pre.total_s == pytest.approx(
        pre.matmul_s + pre.attention_s + pre.elementwise_s + 5 * 6400 / link + pre.cp_exchange_s
    )


def test_decode_terms_at_tp2_cp2() -> None:
    dec = P.predict_decode(SMALL, FAKE_GPU, _rates(), tp=2, cp=2, context=100)
    assert dec.weights_s == pytest.approx(150656 / (0.8 * 1e9))
    assert dec.kv_s == pytest.approx(6400 / (0.5 * 1e9))
    # 5 all-reduces of one token (64 x 2 B, ring share 1x at tp 2) + per layer the all-gather
    # of the partial output and its LSE: 4 q heads x (8 x 2 B + 4 B) to the one other cp rank.
    assert P.decode_merge_bytes(SMALL, 2, 2, 2) == 4 * (8 * 2 + 4) == 80
    assert dec.comm_bytes == 5 * 128 + 2 * 80 == 800
    assert dec.comm_s == pytest.approx(800 / 1e6)
    assert dec.collectives == (2 * 2 + 2) + 2
    # One token's matmuls on one tp-2 rank: 2 x 150016 / 2 FLOP at 0.5 x 1e12; the weight read
    # (150656 B at 0.8 x 1e9) hides 627 of them.
    assert dec.token_matmul_s == pytest.approx(150016 / 0.5e12)
    assert dec.weight_bound_batch == int((150656 / 0.8e9) / (150016 / 0.5e12)) == 627


def test_hardware_table() -> None:
    a100, h100, h200 = (hardware.GPUS[k] for k in ("A100-80GB", "H100-SXM", "H200-SXM"))
    assert (a100.bf16_dense_flops, a100.hbm_bytes_per_s) == (312e12, 2039e9)
    assert (h100.bf16_dense_flops, h100.hbm_bytes_per_s) == (989e12, 3350e9)
    assert (h200.bf16_dense_flops, h200.hbm_bytes_per_s) == (989e12, 4800e9)
    assert a100.nvlink_bytes_per_s_per_direction == 300e9
    assert h100.link_bytes_per_s("nvlink") == h200.link_bytes_per_s("nvlink") == 450e9
    assert a100.link_bytes_per_s("pcie") == 32e9
    assert all(g.sources and all(s.startswith("https://") for s in g.sources) for g in (a100, h100))
    assert hardware.lookup("a100") is a100 and hardware.lookup("H100") is h100
    assert hardware.match_device_name("NVIDIA H100 80GB HBM3") is h100
    assert hardware.match_device_name("a CPU report") is None


KNOWN_RUNS: set[tuple] = {
    # (report, kind, tokens, layers, mode, measured seconds)
    ("generate_gpu_h100_2026-11-26.md", "prefill", 8192, 32, "eager", 0.23),
    ("generate_gpu_h100_2026-11-26.md", "prefill", 32768, 32, "eager", 1.41),
    ("generate_gpu_h100_2026-11-26.md", "prefill", 65536, 32, "eager", 4.16),
    ("generate_gpu_h100_2026-11-26.md", "decode", 8192, 32, "eager", 0.02741),
    ("generate_gpu_h100_2026-11-26.md", "decode", 32768, 32, "eager", 0.01617),
    ("generate_gpu_h100_2026-11-26.md", "decode", 65536, 32, "eager", 0.01641),
    ("generate_gpu_h100_2026-11-26.md", "prefill", 8192, 32, "eager", 0.25),
    ("generate_gpu_h100_2026-11-26.md", "prefill", 32768, 32, "eager", 1.43),
    ("generate_gpu_h100_2026-11-26.md", "decode", 8192, 32, "eager", 0.04466),
    ("generate_gpu_h100_2026-11-26.md", "decode", 32768, 32, "eager", 0.01975),
    ("generate_gpu_h100_2026-11-26.md", "decode", 65536, 32, "eager", 0.02922),
    ("gpu_h100_2026-11-27.md", "prefill", 32768, 32, "eager", 1.39),
    ("gpu_h100_2026-11-27.md", "prefill", 131072, 32, "eager", 14.07),
    ("gpu_h100_2026-11-27.md", "decode", 32768, 32, "eager", 0.03637),
    ("gpu_h100_2026-11-27.md", "decode", 131072, 32, "eager", 0.02157),
    ("gpu_h100_2026-11-27.md", "prefill", 1048576, 2, "eager", 45.13),
    ("gpu_h100_2026-11-27.md", "decode", 1048576, 2, "eager", 0.01385),
    ("gpu_h100_2026-11-27.md", "decode", 8192, 32, "CUDA graphs", 0.00842),
    ("gpu_h100_2026-11-27.md", "decode", 8192, 32, "eager", 0.01748),
    ("gpu_h100_2026-11-27.md", "decode", 32768, 32, "CUDA graphs", 0.0086),
    ("gpu_h100_2026-11-27.md", "decode", 32768, 32, "eager", 0.0191),
    ("gpu_h100_2026-11-27.md", "prefill", 8192, 32, "CUDA graphs", 0.24),
    ("gpu_h100_2026-11-27.md", "prefill", 8192, 32, "eager", 0.23),
    ("gpu_h100_2026-11-27.md", "prefill", 32768, 32, "CUDA graphs", 1.41),
    ("gpu_h100_2026-11-27.md", "prefill", 32768, 32, "eager", 1.40),
    ("gpu_h100_2026-11-27.md", "prefill", 1048576, 2, "CUDA graphs", 45.24),
    ("gpu_h100_2026-11-27.md", "decode", 1048576, 2, "CUDA graphs", 0.00964),
}
"""Every end-to-end single-GPU run the two stored H100 reports give, read by eye: the second
run's 65,536-token prefill repeats the first's 4.16 s and is its own run; the 2026-11-27
report's 'first run today (eager)' column repeats the first 1M run and is not; the prose
'0.24 / 0.23 s at 8K and 1.41 / 1.40 s at 32K' is two runs of each."""


def _key(row: P.ValidationRow) -> tuple:
    r = row.run
    return (r.source, r.kind, r.tokens, r.shape.layers, r.mode, round(r.measured_s, 6))


def test_validation_table_has_one_row_per_stored_run() -> None:
    rows, rates = P.validation_table()
    stored = [r for r in rows if r.run.source in {k[0] for k in KNOWN_RUNS}]
    keys = [_key(r) for r in stored]
    # The two 4.16 s prefills at 65,536 tokens are one entry of the set and two rows.
    assert len(keys) == len(KNOWN_RUNS) + 1
    assert set(keys) == KNOWN_RUNS
    twice = ("generate_gpu_h100_2026-11-26.md", "prefill", 65536, 32, "eager", 4.16)
    assert keys.count(twice) == 2
    assert all(r.run.gpu == "H100-SXM" for r in stored)
    # The rates come from the same files.
    files = {k[0] for k in KNOWN_RUNS} | {"attention_kernels_h100_2026-11-26.md"}
    assert [p.value for p in rates.matmul if p.source in files] == [793, 789, 799, 790, 789, 774]
    assert [(p.at, p.value) for p in rates.paged_attention if p.source in files] == [
        (4096, 344),
        (8192, 398),
        (16384, 418),
        (32768, 422),
        (65536, 430),
    ]
    assert {p.at for p in rates.decode_kv if p.source in files} == {131072, 524288, 1048576}


def test_validation_bounds() -> None:
    """Stated bounds: prefill within 20% of every measured run (the aim, 15%, holds for all but
    flagged rows); decode is a bandwidth floor, never above a measured step. Every row outside
    15% carries a flag saying why."""
    rows, _ = P.validation_table()
    for row in rows:
        assert row.within_aim or row.flag, row
        if row.run.kind == "prefill":
            assert abs(row.error) <= 0.20, row
        else:
            assert row.predicted_s <= row.run.measured_s, row
    prefill = [r for r in rows if r.run.kind == "prefill"]
    assert sum(r.within_aim for r in prefill) >= len(prefill) - 1


def test_validation_reads_the_files(tmp_path: Path) -> None:
    """Change a stored figure and the table follows; a CPU report and a prediction report
    (whose title names a GPU) are ignored."""
    for name in ("gpu_h100_2026-11-27.md", "attention_kernels_h100_2026-11-26.md"):
        shutil.copy(REPO / "docs/benchmarks" / name, tmp_path / name)
    shutil.copy(REPO / "docs/benchmarks/generate_cpu_2026-11-26.md", tmp_path / "generate_cpu.md")
    (tmp_path / "predict.md").write_text(
        "# Prediction: a prompt on 4 x NVIDIA A100 80GB SXM4\n\nCeilings 999 TFLOP/s, 1 GB/s.\n"
    )
    report = tmp_path / "gpu_h100_2026-11-27.md"
    report.write_text(report.read_text().replace("| 14.07 s |", "| 28.14 s |"))
    rows, rates = P.validation_table(tmp_path)
    assert {r.run.source for r in rows} == {"gpu_h100_2026-11-27.md"}
    assert rates.cards == {"H100-SXM"} and 999 not in {p.value for p in rates.matmul}
    at_131k = [r for r in rows if r.run.kind == "prefill" and r.run.tokens == 131072]
    assert [r.run.measured_s for r in at_131k] == [28.14]
    assert at_131k[0].flag == "prefill outside the aim"


def _run(argv: list[str]) -> list[str]:
    out: list[str] = []
    assert P.main(argv, print_fn=out.append) == 0
    return "\n".join(out).splitlines()


def test_cli_headline(tmp_path: Path) -> None:
    report = tmp_path / "r.md"
    lines = _run([*HEADLINE, "--report", str(report)])
    rows = [ln for ln in lines if ln.startswith("| tp")]
    assert [r.split("|")[1].strip() for r in rows] == ["tp4", "tp2xcp2", "tp1xcp4"]
    assert all("| yes |" in r for r in rows)
    for r in rows:
        prefill = float(r.split("|")[4].strip(" *").replace(",", ""))
        assert 221 < prefill < 2000  # above the 4 x A100 compute floor
    assert any("221.8 s" in ln for ln in lines)  # the floor at 10^6 tokens, computed
    assert any("364 s" in ln for ln in lines)
    assert lines[-1].startswith("predict: 4xA100-80GB, 1,048,576-token prompt: tp4 ")
    assert sum(ln.startswith("predict:") for ln in lines) == 1
    text = report.read_text()
    for section in ("## Meshes", "## Against LMDeploy", "## Validation", "## Not measured"):
        assert section in text


def test_cli_reports_a_mesh_that_does_not_fit() -> None:
    lines = _run(["--gpus", "2xA100-80GB", *HEADLINE[2:]])
    rows = {ln.split("|")[1].strip(): ln for ln in lines if ln.startswith("| tp")}
    assert set(rows) == {"tp2", "tp1xcp2"}
    assert "| yes |" in rows["tp2"]
    assert "| **no** |" in rows["tp1xcp2"]
    assert any(ln.startswith("- memory planner: does not fit:") for ln in lines)
    assert "tp1xcp2 does not fit" in lines[-1]


@pytest.mark.parametrize("bad", ["4xB200", "A100-80GB", "0xA100-80GB", "four x A100"])
def test_cli_bad_gpus(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        P.main(["--gpus", bad, *HEADLINE[2:]])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "COUNTxGPU" in err and "4xA100-80GB" in err
    for key in hardware.GPUS:
        assert key in err
