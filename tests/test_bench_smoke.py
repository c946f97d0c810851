"""The benches run here on tiny shapes or short answers, so they cannot rot between the
sessions that use them: the GPU suite's end-to-end script (`bench/generate_gpu.py --device cpu`,
with its batched decode and profiler trace) and `bench/gpu_decode_summary.py` on its report; the
host-step, protocol-codec and tp shared-memory benches (which assert their own invariants); the
CPU kernel benches and the GEMV bench's per-shape work under Triton's interpreter; and on the
demo model or a tiny random one the guided JSON, long-prompt host-work, disk-tier, draft-row and
KV-allocation benches.

A few take about 10 s or more each and run on demand (`-m slow`): `bench/cpu_attention.py`
(with its earlier-run column and a commit's kernel built beside today's),
`bench/speculative.py`, `bench/batch_api.py`, `bench/worker_raise.py` (three Ray workers,
replaced twice), `bench/sampler_options.py` (the demo model with six sampling options),
`bench/recovery.py`, `bench/host_kv_cache.py`, `bench/disk_kv_cache.py`, and the guided
grammar, priority, fair-share and LoRA benches."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels.cpu_attention import _library

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


def _run(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_generate_gpu_script_runs_with_a_decode_profile(tmp_path: Path) -> None:
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    report, traces = tmp_path / "generate_tiny.md", tmp_path / "traces"
    _run(
        "bench/generate_gpu.py",
        "--device=cpu",
        f"--model-config={config}",
        "--prompt-lens=96",
        "--decode-tokens=6",
        "--batch=2",
        "--batch-lens=64",
        "--chunk=64",
        f"--profile={traces}",
        "--profile-steps=3",
        f"--out={report}",
    )
    text = report.read_text()
    assert "prefill      96 tokens (2 steps)" in text
    assert "decode batch 2 at      64 context" in text
    assert "profile of 3 decode steps at 96 context" in text
    assert "_linear" in text or "aten::" in text  # the top operators are listed
    trace = json.loads((traces / "decode_trace_96.json").read_text())
    assert trace["traceEvents"]

    # The decode summary lines the report up against a second run's (here the same numbers).
    (tmp_path / "generate_tiny_async.md").write_text(text)
    out = _run("bench/gpu_decode_summary.py", str(tmp_path))
    lines = out.splitlines()
    assert lines[0].startswith("| batch | context | floor ms | target | default ms | default % |")
    assert "async ms | async % |" in lines[0]
    assert [line.split("|")[1:3] for line in lines[2:4]] == [[" 2 ", " 64 "], [" 1 ", " 96 "]]
    assert lines[-1].startswith("decode vs floor, best run: b2 64 ") and "(default)" in lines[-1]
    assert (tmp_path / "summary.md").read_text().splitlines()[-1] == lines[-1]


def test_generate_gpu_script_with_an_int8_kv_cache(tmp_path: Path) -> None:
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    report = tmp_path / "generate_tiny_kv8.md"
    _run(
        "bench/generate_gpu.py",
        "--device=cpu",
        f"--model-config={config}",
        "--prompt-lens=64",
        "--decode-tokens=4",
        "--chunk=64",
        "--kv-quant=8",
        f"--out={report}",
    )
    text = report.read_text()
    assert "KV cache int8" in text and "decode at      64 context" in text


def test_kv_bytes_per_token_by_hand() -> None:
    """The floor's KV bytes (the memory planner's count) for each cache format."""
    from dist_runtime.config import ModelConfig
    from dist_runtime.memory_planner import kv_bytes_per_token

    model = ModelConfig.from_dict({**TINY, "hidden_size": 256})  # 4 heads of 64, 2 KV heads
    # 2 (K, V) x 2 layers x 2 KV heads x (64 x 2 B | 64 x 1 B + scale, zero | 32 B + both)
    assert kv_bytes_per_token(model, 1, "bfloat16", 0) == 2 * 2 * 2 * 128 == 1024
    assert kv_bytes_per_token(model, 1, "bfloat16", 8) == 2 * 2 * 2 * (64 + 8) == 576
    assert kv_bytes_per_token(model, 1, "bfloat16", 4) == 2 * 2 * 2 * (32 + 8) == 320


def test_decode_summary_takes_each_runs_own_floor(tmp_path: Path) -> None:
    (tmp_path / "generate_7b.md").write_text(
        "- decode at     100 context:   2.00 ms/token, floor  1.00 ms (weights ...)\n"
    )
    (tmp_path / "generate_7b_kv8.md").write_text(
        "- decode at     100 context:   1.00 ms/token, floor  0.80 ms (weights ...)\n"
    )
    lines = _run("bench/gpu_decode_summary.py", str(tmp_path)).splitlines()
    assert lines[2] == "| 1 | 100 | 1.00 | 85% | 2.00 | 50% | 1.00 | 80% |"
    assert lines[-1] == "decode vs floor, best run: b1 100 80% (kv8) (below target)"


def test_host_step_bench_runs() -> None:
    out = _run("bench/host_step.py", "--contexts=1024,4096", "--batches=1,3", "--reps=3")
    assert "host-step: decode input building" in out
    assert out.count("| 3 | 4,096 | 771 |") == 1
    # cp decode rows, their inputs checked against the split path's (cp 2 and 4 by default)
    assert "cp decode, ours vs split: cp2 b1 1,024" in out and "cp4 b3 4,096" in out


def test_protocol_codec_bench_runs(tmp_path: Path) -> None:
    report = tmp_path / "codec.md"
    out = _run(
        "bench/protocol_codec.py",
        "--batches=1,3",
        "--prefill-tokens=256",
        "--repeats=1",
        f"--report={report}",
    )
    assert "protocol-codec: ours vs reflective: decode b1" in out and "prefill 256 tokens" in out
    assert "| decode plan b3 |" in report.read_text()


def test_tp_shm_bench_runs() -> None:
    from kernels import cpu_shm

    if not cpu_shm.available():
        pytest.skip("no shared-memory collectives here")
    out = _run("bench/tp_shm.py", "--tp=2", "--skip-model", "--calls=5")
    assert "| decode b1 | 576 |" in out and "tp-shm: shm vs gloo at tp 2: decode b1 call" in out


@pytest.mark.slow  # (three runs, one building a commit's kernel: ~15 s; run with -m slow)
def test_cpu_attention_bench_runs(tmp_path: Path) -> None:
    if _library() is None:
        pytest.skip("the native CPU kernels are not built here (no C compiler)")
    data, report = tmp_path / "run.json", tmp_path / "report.md"
    common = ["--heads=demo", "--kv=0,4", "--max-context=1024", "--cache-mb=1", "--repeats=1"]
    _run("bench/cpu_attention.py", *common, f"--json={data}")
    out = _run("bench/cpu_attention.py", *common, f"--before={data}", f"--report={report}")
    # every case is checked against the torch reference by the script before it is timed
    assert "cpu-attention: float32 native/torch" in out and "x the earlier native" in out
    text = report.read_text()
    assert text.count("| demo | 8 | 1,024 | int4 |") == 1
    assert len(json.loads(data.read_text())["rows"]) == 4
    # a commit's kernel built and timed beside today's (HEAD: the same sources, checked too)
    out = _run("bench/cpu_attention.py", *common, "--before-ref=HEAD", f"--report={report}")
    assert "x the earlier native" in out and "before " in out
    assert "built from `HEAD`" in report.read_text()


def test_cpu_elementwise_bench_runs(tmp_path: Path) -> None:
    if _library() is None:
        pytest.skip("the native CPU kernels are not built here (no C compiler)")
    report = tmp_path / "report.md"
    out = _run("bench/cpu_elementwise.py", "--rows=1,64", "--repeats=1", f"--report={report}")
    # each kernel is checked against its reference by the script before it is timed
    assert "cpu-elementwise: residual + RMSNorm native/torch" in out
    assert "saves" in out and "a pass at 1 rows" in out
    text = report.read_text()
    assert text.count("| SiLU-and-mul | 64 |") == 1


def test_gemv_bench_shape_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every config of the sweep is checked against F.linear and timed (the CUDA graph timer
    replaced by a plain call here)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import bench.kernel_bench_gemv as B

    monkeypatch.setattr(B, "SHAPES", {"tiny": (40, 96, 2)})
    monkeypatch.setattr(B, "MIN_BYTES", 3 * 40 * 96 * 4)
    timed: list[int] = []

    def fake_graph_ms(call, reps: int) -> float:
        for _ in range(reps):
            call()
        timed.append(reps)
        return 1.0 + len(timed)

    monkeypatch.setattr(B, "_graph_ms", fake_graph_ms)
    for m in (1, 3):
        row = B.bench_shape("tiny", m, device="cpu", dtype=torch.float32)
        assert float(row["cublas_ms"]) < float(row["default_ms"]) and row["best"] == row["default"]
    assert timed == [3] * 2 * (2 + len(B.SWEEP))


def test_decode_graph_sweep_summary_names_the_fastest() -> None:
    """The in-graph decode sweep's closing line: each shape's fastest candidate against the
    default, and the candidate with the lowest mean time over the shapes."""
    from bench.kernel_bench_attention import GRAPH_SWEEP, graph_sweep_summary

    times = {(8192, 1): [0.020, 0.015, 0.030], (131072, 1): [0.150, 0.160, 0.140]}
    rows = [
        dict(candidate=c, ctx=ctx, batch=b, ms=ms)
        for (ctx, b), per in times.items()
        for c, ms in enumerate(per)
    ]
    line = graph_sweep_summary(rows)
    assert "ctx 8192 b1: #1 0.75; ctx 131072 b1: #2 0.93;" in line
    # Means: #1 (0.75 + 1.07) / 2 = 0.91, #2 (1.5 + 0.93) / 2 = 1.22, #0 1.0.
    assert line.endswith(f"best overall #1 {GRAPH_SWEEP[1]} at 0.91 on average")


@pytest.mark.parametrize("bits", [8, 4])
def test_decode_quant_cache_is_a_valid_cache(bits: int) -> None:
    """`kernel_bench_attention.py --decode --kv-bits`: its random caches are caches the decode
    kernel accepts (codes, positive scales, shuffled blocks) and its byte count is codes plus a
    float32 scale and zero per token and KV head."""
    import kernels.flash_decode as FD
    from bench.kernel_bench_attention import HEAD_DIM, KV_HEADS, Q_HEADS, _quant_cache, kv_bytes

    gen = torch.Generator().manual_seed(0)
    k, v, kp, vp, table = _quant_cache(48, 16, bits, torch.device("cpu"), gen)
    assert k.dtype == torch.uint8 and k.shape == (3, 16, KV_HEADS, HEAD_DIM * bits // 8)
    assert kp.shape == (3, 16, KV_HEADS, 2) and bool((kp[..., 0] > 0).all())
    assert sorted(table[0].tolist()) == [0, 1, 2]
    q = torch.randn(1, Q_HEADS, HEAD_DIM, dtype=torch.bfloat16)
    lens = torch.tensor([48], dtype=torch.int32)
    out, _ = FD.flash_decode(
        q, k, v, table, lens, HEAD_DIM**-0.5, k_params=kp, v_params=vp, bits=bits
    )
    assert out.shape == q.shape and bool(out.isfinite().all())
    assert kv_bytes(2, 100, bits) == 2 * 2 * 100 * KV_HEADS * (HEAD_DIM * bits // 8 + 8)
    assert kv_bytes(1, 100, 0) == 2 * 100 * KV_HEADS * HEAD_DIM * 2


def test_guided_json_bench_runs(tmp_path: Path) -> None:
    report = tmp_path / "guided.md"
    out = _run(
        "bench/guided_json.py",
        "--batches=1,2",
        "--max-new-tokens=24",
        "--repeats=1",
        "--sections=6",
        "--example-tokens=24",
        f"--report={report}",
    )
    assert "guided-json: vocab 49152 tokens" in out and "decode step guided/plain b1" in out
    text = report.read_text()
    assert "| 2 |" in text and "```json" in text


@pytest.mark.slow  # (~8-16 s; the guided JSON bench covers the same script; -m slow)
def test_guided_grammar_bench_runs(tmp_path: Path) -> None:
    report = tmp_path / "grammar.md"
    out = _run(
        "bench/guided_json.py",
        "--grammar",
        "--batches=2",
        "--max-new-tokens=24",
        "--repeats=1",
        "--sections=6",
        "--example-tokens=24",
        f"--report={report}",
    )
    assert "guided-grammar: vocab 49152 tokens" in out and "decode step guided/plain b2" in out
    text = report.read_text()
    assert "# Guided GBNF output" in text and "| 2 |" in text and "Answer: " in text


@pytest.mark.slow  # (~5-11 s; run with -m slow)
def test_priority_bench_runs(tmp_path: Path) -> None:
    report = tmp_path / "priority.md"
    out = _run(
        "bench/priority.py",
        "--batch=3",
        "--doc-tokens=96",
        "--doc-new-tokens=6",
        "--max-num-seqs=2",
        "--tries=1",
        f"--report={report}",
    )
    assert "priority: interactive first token during a batch p50" in out
    text = report.read_text()
    assert "| equal |" in text and "| priority |" in text


@pytest.mark.slow  # (~6-10 s; run with -m slow)
def test_fair_share_bench_runs(tmp_path: Path) -> None:
    report = tmp_path / "fair_share.md"
    out = _run(
        "bench/fair_share.py",
        "--flood=4",
        "--others=1",
        "--prompt-tokens=32",
        "--new-tokens=3",
        "--max-num-seqs=2",
        "--tries=1",
        f"--report={report}",
    )
    assert "fair-share: the second key's 1 requests done in p50" in out
    text = report.read_text()
    assert "| fair share |" in text and "| first come, first served |" in text


def test_long_prompt_host_bench_runs(tmp_path: Path) -> None:
    report = tmp_path / "long_prompt_host.md"
    out = _run("bench/long_prompt_host.py", "--tokens=20000", "--repeats=1", f"--report={report}")
    assert "long-prompt-host: a question after a cached" in out
    assert "| tokenize the prompt |" in report.read_text()


@pytest.mark.slow  # (~11 s; run with -m slow)
def test_batch_api_bench_runs(tmp_path: Path) -> None:
    report = tmp_path / "batch_api.md"
    out = _run(
        "bench/batch_api.py",
        "--requests=2",
        "--new-tokens=4",
        "--interactive=1",
        f"--report={report}",
    )
    assert "batch_api: 2 requests x 4 tokens: batch" in out
    text = report.read_text()
    assert "| one batch (upload to `completed`) |" in text and "| 1 (default) |" in text


@pytest.mark.slow  # (~15 s; run with -m slow)
def test_speculative_bench_runs(tmp_path: Path) -> None:
    report = tmp_path / "speculative.md"
    argv = ["--tries=1", "--max-new-tokens=12", "--sections=6", "--rewrite-tokens=24"]
    argv += ["--questions=3"]
    out = _run("bench/speculative.py", *argv, f"--report={report}")
    assert "speculative (prompt lookup, k=4): b1" in out and "answers identical: True" in out
    assert "predicted outputs (k=0 runtime, 3 paragraph rewrites)" in out
    assert "| all | on |" in report.read_text() and "| rewrite | predicted |" in report.read_text()


@pytest.mark.slow  # (~10 s; run with -m slow)
def test_host_kv_cache_bench_runs(tmp_path: Path) -> None:
    report = tmp_path / "host.md"
    argv = ["--tries=1", "--max-new-tokens=4", "--sections=6", "--device-blocks=50"]
    out = _run("bench/host_kv_cache.py", *argv, f"--report={report}")
    assert "host-kv-cache: a 611-token document asked again" in out
    assert "(0 copied back)" not in out  # the second document pushed the first to the host
    assert "answers identical: True" in out
    assert "| host tier |" in report.read_text()


@pytest.mark.slow  # (~9 s; run with -m slow)
def test_disk_kv_cache_bench_runs(tmp_path: Path) -> None:
    report = tmp_path / "disk.md"
    argv = ["--tries=1", "--max-new-tokens=4", "--sections=6"]
    out = _run("bench/disk_kv_cache.py", *argv, f"--report={report}")
    assert "disk-kv-cache: a 716-token document in a new runtime" in out
    assert "answers identical: True" in out
    assert "a runtime already running when they were written" in out
    assert "(0 tokens read)" not in out  # it read the blocks written after it started
    assert "| warm directory |" in report.read_text()
    assert "| running replica |" in report.read_text()


@pytest.mark.slow  # (Ray workers replaced; ~14 s; run with -m slow)
def test_recovery_bench_runs(tmp_path: Path) -> None:
    report = tmp_path / "recovery.md"
    argv = ["--tries=1", "--max-new-tokens=4", "--decode-at=2", "--sections=2", "--chunk=64"]
    argv += ["--batch=2", "--batch-sections=1"]
    out = _run("bench/recovery.py", *argv, f"--report={report}")
    assert "whose worker fails at 3/4 of its prefill" in out
    assert "answers identical: True" in out
    assert "(0 tokens read back)" not in out  # the blocks written before the failure
    assert "(2 replacements)" in out
    assert "only the poison failed: True, batch answers identical: True" in out
    text = report.read_text()
    assert "| the same with a disk tier |" in text
    assert "| beside a poison whose steps raise |" in text


@pytest.mark.slow  # (three Ray workers started, and replaced twice: about a minute)
def test_worker_raise_bench_runs(tmp_path: Path) -> None:
    report = tmp_path / "worker_raise.md"
    argv = ["--tries=1", "--batch=1", "--max-new-tokens=4", "--sections=1"]
    out = _run("bench/worker_raise.py", *argv, f"--report={report}")
    assert "retried in place (0 replacements)" in out
    assert "replacing the group (2 replacements)" in out
    assert "only the poison failed: True, batch answers identical: True" in out
    assert "| replacing the group |" in report.read_text()


@pytest.mark.slow  # (~7-17 s; run with -m slow)
def test_lora_bench_runs(tmp_path: Path) -> None:
    report = tmp_path / "lora.md"
    argv = ["--batch=2", "--rank=4", "--max-new-tokens=4", "--repeats=1", f"--report={report}"]
    out = _run("bench/lora.py", *argv)
    assert "lora: batch 2, rank 4, 4 new tokens: base model" in out and "four adapters" in out
    assert "| one adapter |" in report.read_text()


def test_disk_kv_tier_bench_runs() -> None:
    out = _run(
        "bench/disk_kv_tier.py",
        "--device=cpu",
        "--blocks=8",
        "--layers=2",
        "--kv-heads=2",
        "--head-dim=8",
        "--bits=8",
    )
    assert "disk-kv-tier (cpu, 8 blocks of" in out and "read back identical: True" in out


def test_draft_rows_bench_runs(tmp_path: Path) -> None:
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    out = _run(
        "bench/draft_rows.py",
        "--device=cpu",
        f"--model-config={config}",
        "--contexts=64",
        "--batches=1,2",
        "--drafts=0,2",
        "--decode-tokens=8",
    )
    assert "draft-rows (cpu, tiny): 0K b1: k=2 step" in out and "0K b2: k=2 step" in out
    assert "| 64 | 2 |" in out


def test_kv_alloc_bench_runs(tmp_path: Path) -> None:
    report = tmp_path / "kv_alloc.md"
    out = _run("bench/kv_alloc.py", "--repeats=1", "--cache-gb=0.25", f"--report={report}")
    assert "kv-alloc: start + 3 tokens + stop, fresh pages vs torch.zeros: 0.25 GiB" in out
    assert "| 0.25 GiB | torch.zeros |" in report.read_text()


@pytest.mark.slow  # (the demo model, six options; ~10 s; run with -m slow)
def test_sampler_options_bench_runs(tmp_path: Path) -> None:
    report = tmp_path / "sampler_options.md"
    out = _run(
        "bench/sampler_options.py",
        "--batch=1",
        "--new-tokens=20",
        "--repeats=1",
        f"--report={report}",
    )
    assert "sampler-options: b1 x 20 tokens, time against plain greedy" in out
    assert "thinking_budget" in out
    assert report.read_text().count("| min_tokens |") == 1


def test_sliding_window_bench_runs(tmp_path: Path) -> None:
    report = tmp_path / "sliding_window.md"
    argv = ["--context=96", "--window=24", "--new-tokens=3", "--layers=1", "--hidden=64"]
    out = _run("bench/sliding_window.py", *argv, "--repeats=1", f"--report={report}")
    assert "sliding-window: context 96, window 24, 1 layers of 64: prefill" in out
    assert "| window 24 |" in report.read_text()
