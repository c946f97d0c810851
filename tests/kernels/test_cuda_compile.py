"""Every Triton kernel compiles for the A100 (sm_80), the H100 / H200 (sm_90), the L40S (sm_89)
and the B200 (sm_100) at the 7B's deployment shapes and a Llama shape with 64-wide heads, fits
their shared memory, and spills no more registers than allowed below; checked on a machine
without a GPU (`bench/cuda_compile.py`: Triton's compiler and its bundled ptxas run on the host,
the launches are recorded instead of run)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import hardware
from bench.cuda_compile import (
    ISSUE_HEADROOM,
    STREAMING_KERNELS,
    Launch,
    LoopMix,
    Shard,
    blocks_per_sm,
    issue_limit,
    main_loop,
    max_threads_per_block,
    streamed_bytes,
)

ROOT = Path(__file__).resolve().parents[2]

SPILL_NOISE = 16
"""Bytes of spill stores per thread any kernel may have: a register or two that ptxas parks
around a loop (some versions do it at 40 registers), not a working set that does not fit."""
SPILL_ALLOWED = {
    # (gpu, kernel): bytes per thread. The H100's prefill tile (256 x 64, 16 warps) measured
    # 420-431 TFLOP/s at 16K (kernel_bench_attention.py --sweep), the fastest config, with
    # spills of 48-304 B under Triton 3.9; everything else must not spill.
    ("H100-SXM", "_flash_attn_kernel"): 192,
    ("H100-SXM", "_paged_attention_kernel"): 384,
    ("H100-SXM", "_position_attn_kernel"): 384,
    # sm_100: the spill-free sm_80 prefill tiles park 20 B in one variant, as does the 4-bit
    # kernel's act-order path at one row (Triton 3.9).
    ("B200", "_paged_attention_kernel"): 64,
    ("B200", "_w4a16_kernel"): 64,
}


ISSUE_BOUND = {
    # Streaming loops that cannot issue ISSUE_HEADROOM x the HBM's bandwidth on the modelled
    # cards (docs/benchmarks/issue_limits_2026-12-05.md): each 4-bit weight and each int8 /
    # int4 cached element costs a conversion, a shared-memory access and register moves of its
    # own, which Triton emits element by element (the 4-bit GEMM still does where it gathers
    # scales per row or a tile is small). The floor is about 70% of the least figure measured
    # (A100 / H100: 4-bit weights 0.40x, int8 KV 1.29x, int4 KV 0.67x), so a change that
    # makes them slower fails here.
    ("_w4a16_kernel", 0): 0.28,
    ("_flash_decode_split_kernel", 8): 0.9,
    ("_flash_decode_split_kernel", 4): 0.45,
}


LLAMA_D64 = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
}


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return Path(get_ptxas(90).path).exists()
    except Exception:
        return False


def _jit_kernels() -> set[str]:
    """Names of the launchable Triton kernels in kernels/ (by convention `_..._kernel`)."""
    names = set()
    for path in (ROOT / "kernels").glob("*.py"):
        names |= set(re.findall(r"@_jit\s*\ndef (_\w+_kernel)\(", path.read_text()))
    return names


def test_blocks_per_sm_by_hand() -> None:
    h100 = hardware.lookup_arch("H100")
    assert h100 is not None
    # 4 warps x 128 registers: 4096 registers a warp, 16 warps by registers = 4 blocks; shared
    # memory 38 KB + 1 KB reserved fits 5; threads fit 16.
    assert blocks_per_sm(h100, 4, 128, 38 * 1024) == 4
    # 16 warps x 128 registers: one block fills the register file.
    assert blocks_per_sm(h100, 16, 128, 0) == 1
    # shared memory bound: 100 KB + 1 KB reserved, twice is 202 KB of the 228, three times over.
    assert blocks_per_sm(h100, 4, 32, 100 * 1024) == 2
    # registers round up to 256 a warp: 33 registers x 32 = 1056 -> 1280 -> 51 warps -> 12 blocks
    assert blocks_per_sm(h100, 4, 33, 0) == 12
    assert max_threads_per_block(h100, 255) == 256  # 255 x 32 -> 8192 a warp -> 8 warps
    assert max_threads_per_block(h100, 64) == 1024
    # Ada: 1,536 threads and 24 blocks per SM; 100 KB of shared memory.
    l40s = hardware.ARCHS["L40S"]
    assert blocks_per_sm(l40s, 4, 32, 0) == 12  # 1536 / 128 threads
    assert blocks_per_sm(l40s, 1, 32, 0) == 24
    assert blocks_per_sm(l40s, 4, 32, 48 * 1024) == 2


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                  /* 0x00000a0000017a02 */
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;        /* 0x0000000402047981 */
        /*0020*/              @!P0 LDGSTS.E.BYPASS.128 [R6], desc[UR16][R10.64], !P1 ;
        /*0030*/                   STS.U16 [R3], R4 ;
        /*0040*/                   I2FP.F32.U32 R5, R5 ;
        /*0050*/                   LDS.128 R8, [R3] ;
        /*0060*/               @P1 BRA 0x10 ;
        /*0070*/                   LDG.E.U8 R4, desc[UR4][R2.64] ;
        /*0080*/                   EXIT ;
        /*0090*/                   BRA 0x90;
"""


def test_main_loop_from_sass() -> None:
    # The loop 0x10-0x60: 6 instructions a thread, 16 + 16 bytes of global loads, one 2-byte
    # shared store, one conversion; the trap loop at 0x90 loads nothing and is not the main one.
    assert main_loop(SASS) == LoopMix(
        instructions=6, global_bytes=32, narrow_shared=1, conversions=1
    )
    assert main_loop(SASS.replace("@P1 BRA 0x10", "@P1 BRA 0x80")) is None  # forward: no loop


def test_issue_limit_by_hand() -> None:
    h100 = hardware.lookup_arch("H100")
    assert h100 is not None and h100.max_clock_hz == 1.98e9 and h100.hbm_bytes_per_s == 3.35e12
    launch = Launch(
        gpu=h100.key,
        kernel="_gemv_kernel",
        where="",
        grid=(1, 1, 1),
        num_warps=4,
        num_stages=4,
        shared=0,
        registers=96,
        spill_bytes=0,
        constexprs={"BLOCK_N": 16, "BLOCK_K": 512, "BLOCK_M": 1},
        binary="",
        loop=LoopMix(instructions=348, global_bytes=136, narrow_shared=0, conversions=0),
        pointers={"w_ptr": "bf16"},
    )
    # A 16 x 512 bf16 weight tile a iteration: 16 KB for 4 warps x 348 instructions; 4 warp
    # instructions a clock: 16384 x 4 / (348 x 4) = 47.08 B a clock per SM, x 132 SMs x 1.98 GHz.
    assert streamed_bytes(launch) == 16 * 512 * 2
    rate = issue_limit(h100, launch)
    assert rate == pytest.approx(16384 * 4 / (348 * 4) * 132 * 1.98e9)
    assert rate == pytest.approx(12.3e12, rel=1e-2)
    # int8 KV decode tile: 64 keys x 128 codes, K and V, plus a float32 scale and zero a key.
    quant = dataclasses.replace(
        launch,
        kernel="_flash_decode_split_kernel",
        constexprs={"BLOCK_N": 64, "TILE_D": 128, "BITS": 8},
        pointers={"k_cache_ptr": "u8", "k_param_ptr": "fp32"},
    )
    assert streamed_bytes(quant) == 2 * 64 * 128 + 2 * 64 * 2 * 4
    # read as int32 words: the same bytes
    words = dataclasses.replace(quant, pointers={"k_cache_ptr": "i32", "k_param_ptr": "fp32"})
    assert streamed_bytes(words) == streamed_bytes(quant)
    w4 = dataclasses.replace(
        launch,
        kernel="_w4a16_kernel",
        constexprs={"BLOCK_N": 64, "BLOCK_K": 128, "BLOCK_M": 16},
        pointers={"qw_ptr": "i32"},
    )
    assert streamed_bytes(w4) == 128 // 8 * 64 * 4  # packed words: half a byte a weight
    assert streamed_bytes(dataclasses.replace(launch, kernel="_rms_norm_kernel")) is None
    assert issue_limit(hardware.ARCHS["L40S"], launch) is None  # no modelled clock


def test_shard_shapes_at_tp4() -> None:
    config = json.loads((ROOT / "bench/model_configs/internlm2_5-7b-chat-1m.json").read_text())
    s = Shard.of(config, "7b", 4)
    assert (s.q_heads, s.kv_heads, s.head_dim, s.intermediate) == (8, 2, 128, 3584)
    assert s.linears()["qkv"] == ((8 + 2 * 2) * 128, 4096)
    assert s.linears()["lm_head"] == (92544 // 4, 4096)
    with pytest.raises(ValueError, match="tp=5"):
        Shard.of(config, "7b", 5)


@pytest.mark.skipif(not _ptxas_available(), reason="triton's bundled ptxas is not installed")
def test_what_cuobjdump_said_of_a_cubin_is_read_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench import cuda_compile

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    calls: list[bytes] = []
    loop = LoopMix(instructions=6, global_bytes=32, narrow_shared=1, conversions=1)

    def run_cuobjdump(cubin: bytes, tool: str) -> cuda_compile.Sass:
        calls.append(cubin)
        return cuda_compile.Sass(len(cubin), 8, loop if cubin == b"ab" else None)

    monkeypatch.setattr(cuda_compile, "_read_sass", run_cuobjdump)
    for _ in range(2):
        assert cuda_compile.read_sass(b"ab") == cuda_compile.Sass(2, 8, loop)
        assert cuda_compile.read_sass(b"abc") == cuda_compile.Sass(3, 8, None)
    assert calls == [b"ab", b"abc"]
    (entry, _) = sorted((tmp_path / "dist_runtime-sass").glob("*.json"))
    entry.write_text("{")  # a cut entry is read again
    cuda_compile.read_sass(b"ab")
    cuda_compile.read_sass(b"abc")
    assert len(calls) == 3
    # the same kernel compiled in a checkout elsewhere: its line table names another path
    monkeypatch.setattr(cuda_compile, "_ROOT", Path("/src/one"))
    assert cuda_compile.read_sass(b"line /src/one/kernels/k.py") == cuda_compile.Sass(26, 8, None)
    monkeypatch.setattr(cuda_compile, "_ROOT", Path("/elsewhere/two"))
    assert cuda_compile.read_sass(b"line /elsewhere/two/kernels/k.py").registers == 26
    assert len(calls) == 4
    # ... and with Triton (its cuobjdump, its language files) installed in another
    # environment: the same tool's bytes, the same cubin but for that path
    for env in ("venv-a", "venv-b"):
        tool = tmp_path / env / "site-packages/triton/backends/nvidia/bin/cuobjdump"
        tool.parent.mkdir(parents=True)
        tool.write_bytes(b"the same cuobjdump")
        monkeypatch.setattr(cuda_compile, "_cuda_tool", lambda name, t=tool: str(t))
        language = tmp_path / env / "site-packages/triton/language/standard.py"
        assert cuda_compile.read_sass(b"line " + str(language).encode()).registers > 0
    assert len(calls) == 5


@pytest.mark.skipif(not _ptxas_available(), reason="triton's bundled ptxas is not installed")
def test_every_kernel_compiles_and_fits_each_card(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = str(ROOT)
    # A Llama-family shape with 64-wide heads beside the 7B's 128 (Llama 3.2 1B's).
    d64 = tmp_path / "llama_d64.json"
    d64.write_text(json.dumps(LLAMA_D64))
    internlm = ROOT / "bench/model_configs/internlm2_5-7b-chat-1m.json"
    # The modelled cards at tp 1 and 4; Ada (99 KB of shared memory per block) and Blackwell at
    # tp 1.
    tps = {"A100-80GB": ["1", "4"], "H100-SXM": ["1", "4"], "L40S": ["1"], "B200": ["1"]}
    runs = {}
    for gpu_key, tp in tps.items():  # one process per GPU, side by side
        out = tmp_path / f"{gpu_key}.json"
        cmd = [sys.executable, str(ROOT / "bench/cuda_compile.py"), "--gpus", gpu_key]
        cmd += ["--model", str(internlm), str(d64), "--tp", *tp]
        cmd += ["--batches", "1", "8", "--contexts", "8192", "1048576"]
        proc = subprocess.Popen(
            [*cmd, "--json", str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        runs[gpu_key] = (proc, out)
    for gpu_key, (proc, out) in runs.items():
        log, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, log[-4000:]
        result = json.loads(out.read_text())
        assert result["failures"] == []
        gpu = hardware.ARCHS[gpu_key]
        mine = result["launches"]
        streaming = {x["kernel"] for x in mine if x["issue_limit"] is not None}
        if gpu.max_clock_hz:  # decode's streaming kernels all had their loops read
            assert streaming == set(STREAMING_KERNELS)
        missing = _jit_kernels() - {x["kernel"] for x in mine}
        assert not missing, f"{gpu_key}: never launched {sorted(missing)}; add them to scenarios()"
        for x in mine:
            where = f"{gpu_key} {x['where']} ({x['kernel']})"
            assert x["gpu"] == gpu_key
            assert x["shared"] <= gpu.max_shared_per_block, where
            assert blocks_per_sm(gpu, x["num_warps"], x["registers"], x["shared"]) >= 1, where
            if x["issue_limit"] is not None and gpu.hbm_bytes_per_s:
                # Decode must stream its bytes at the HBM's rate: the main loop has to issue
                # its instructions fast enough for that, with room to spare.
                bits = x["constexprs"].get("BITS", 0)
                need = ISSUE_BOUND.get((x["kernel"], bits), ISSUE_HEADROOM)
                got = x["issue_limit"] / gpu.hbm_bytes_per_s
                assert got >= need, (
                    f"{where}: its main loop ({x['loop']}) could stream {got:.2f}x the HBM's "
                    f"bandwidth if issue were the only limit; needs {need}x"
                )
            allowed = SPILL_ALLOWED.get((gpu_key, x["kernel"]), SPILL_NOISE)
            assert x["spill_bytes"] <= allowed, (
                f"{where} spills {x['spill_bytes']} B/thread (allowed {allowed}) with "
                f"{x['registers']} registers, {x['num_warps']} warps, constexprs "
                f"{x['constexprs']}; {result['summary']}"
            )
