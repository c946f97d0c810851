#!/usr/bin/env bash
# The decode checks of bench/gpu_suite.sh alone, for a short GPU lease: the split-KV decode
# kernel as a decode step runs it (32 calls in one CUDA graph, candidate tile configs),
# end-to-end decode of the 7B shape at 8K-128K (batch 1 and 8) and of the 7B-1M shape at
# 1,048,576 tokens (2 layers), each traced with torch.profiler and timed without it (the host
# breakdown), then the CUDA tests of the decode path.
#   OUT=/tmp/gpu bash bench/gpu_decode.sh
# KERNEL=table times single decode calls against a device copy instead of the in-graph sweep,
# KERNEL=0 skips the kernel step. SEGMENTS="1 4" also times the 7B decode with the graphs cut
# into 4 segments (DIST_RUNTIME_DECODE_GRAPH_SEGMENTS) at 8K and 32K, after the full run.
# ASYNC=0 skips the runs with decode steps launched ahead (DIST_RUNTIME_ASYNC_DECODE=1: 7B at
# 8K / 32K / batch 8, and 1M), which follow the default runs. The fused RoPE + KV-store kernel
# is checked and timed first (FUSED_TIMEOUT), then the 4-bit weight kernel (W4A16_TIMEOUT), so a
# failure there shows before the long runs.
# KVQ=0 skips the split-KV kernel over int8 / int4 caches (kernel_bench_attention.py --decode
# --kv-bits, early) and the 7B decode over them (32K and 131K, batch 8 at 32K; KVQ_TIMEOUT
# each). GEMV=0 skips the last steps: the Triton GEMV against cuBLAS on the 7B shapes, and the
# 7B decode with it and steps launched ahead (DIST_RUNTIME_GEMV=triton). SPEC=0 skips the cost
# of speculative decoding's draft rows (bench/draft_rows.py: 7B at 4K, batch 1 and 8, k = 4).
# WINDOW=0 skips the sliding-window and soft-cap kernel tests and the window's decode GB/s (window 4096).
# GEMMA=0 skips the head_dim 256 decode (window + soft-cap) and prefill timings.
set -u
OUT=${OUT:-/tmp/gpu_decode}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
log="$OUT/log.txt"
step() { echo "=== $* ($(date +%T))" | tee -a "$log"; }

step environment
nvidia-smi --format=csv \
    --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem 2>&1 \
    | tee -a "$log"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    2>&1 | tee -a "$log"

step "fused RoPE + KV store: CUDA tests, then timed against the two kernels it replaces"
timeout "${FUSED_TIMEOUT:-60}" $PY -m pytest -q -x -p no:cacheprovider \
    tests/kernels/test_elementwise_kernels.py -k rotary_store 2>&1 | tail -4 | tee -a "$log"
timeout "${FUSED_TIMEOUT:-60}" $PY bench/kernel_bench_elementwise.py 2>&1 | tee -a "$log"

# The 4-bit GEMM's tile changed untimed (codes into the dot, scale and zero after it): its CUDA
# tests and timing come early, before the long runs.
step CUDA tests of the 4-bit weight kernel
timeout "${W4A16_TIMEOUT:-45}" $PY -m pytest -q -x -p no:cacheprovider -m "not slow" \
    tests/kernels/test_w4a16.py 2>&1 | tail -15 | tee -a "$log"
step "4-bit weights against the float16 matmul (decode rows 1, 8, 64)"
timeout "${W4A16_TIMEOUT:-45}" $PY bench/w4a16.py --m 1,8,64 --report "$OUT/w4a16.md" 2>&1 \
    | tail -8 | tee -a "$log"

if [ "${KVQ:-1}" = 1 ]; then
    step "split-KV decode over int8 / int4 caches beside bf16 (predicted issue-bound)"
    timeout "${KVQ_KERNEL_TIMEOUT:-90}" $PY bench/kernel_bench_attention.py --decode --kv-bits 8 4 \
        2>&1 | tee -a "$log"
fi

step generate, 7B shape
timeout "${GEN_TIMEOUT:-180}" $PY bench/generate_gpu.py --prompt-lens 8192,32768,131072 \
    --decode-tokens 32 --batch 8 --batch-lens 8192,32768 --profile "$OUT/trace_7b" \
    --out "$OUT/generate_7b.md" 2>&1 | grep -v "it/s" | tee -a "$log"

for n in ${SEGMENTS:-}; do
    [ "$n" = 1 ] && continue
    step "generate, 7B shape, decode graphs in $n segments"
    DIST_RUNTIME_DECODE_GRAPH_SEGMENTS=$n timeout "${GEN_TIMEOUT:-180}" $PY bench/generate_gpu.py \
        --prompt-lens 8192,32768 --decode-tokens 32 --batch 8 --batch-lens 8192 \
        --out "$OUT/generate_7b_segments$n.md" 2>&1 | grep -v "it/s" | tee -a "$log"
done

if [ "${ASYNC:-1}" = 1 ]; then
    step "generate, 7B shape, decode steps launched ahead (DIST_RUNTIME_ASYNC_DECODE=1)"
    DIST_RUNTIME_ASYNC_DECODE=1 timeout "${GEN_TIMEOUT:-180}" $PY bench/generate_gpu.py \
        --prompt-lens 8192,32768 --decode-tokens 32 --batch 8 --batch-lens 8192 \
        --out "$OUT/generate_7b_async.md" 2>&1 | grep -v "it/s" | tee -a "$log"
fi

if [ "${KVQ:-1}" = 1 ]; then
    for bits in 8 4; do
        step "generate, 7B shape, int$bits KV cache"
        timeout "${KVQ_TIMEOUT:-150}" $PY bench/generate_gpu.py --kv-quant $bits \
            --prompt-lens 32768,131072 --decode-tokens 32 --batch 8 --batch-lens 32768 \
            --out "$OUT/generate_7b_kv$bits.md" 2>&1 | grep -v "it/s" | tee -a "$log"
    done
fi

step generate, 1M tokens
timeout "${LONG_TIMEOUT:-130}" $PY bench/generate_gpu.py \
    --model-config bench/model_configs/internlm2_5-7b-chat-1m.json --layers 2 \
    --prompt-lens 1048576 --decode-tokens 16 --profile "$OUT/trace_1m" \
    --out "$OUT/generate_1m.md" 2>&1 | grep -v "it/s" | tee -a "$log"

case "${KERNEL:-graph}" in
    table)
        step split-KV decode kernel, one call at a time
        timeout "${KERNEL_TIMEOUT:-60}" $PY bench/kernel_bench_attention.py --decode 2>&1 \
            | tee -a "$log" ;;
    graph)
        step split-KV decode kernel, 32 calls per CUDA graph, candidate configs
        timeout "${KERNEL_TIMEOUT:-120}" $PY bench/kernel_bench_attention.py --decode-graph 2>&1 \
            | tee -a "$log" ;;
esac

if [ "${ASYNC:-1}" = 1 ]; then
    step "generate, 1M tokens, decode steps launched ahead"
    DIST_RUNTIME_ASYNC_DECODE=1 timeout "${LONG_TIMEOUT:-130}" $PY bench/generate_gpu.py \
        --model-config bench/model_configs/internlm2_5-7b-chat-1m.json --layers 2 \
        --prompt-lens 1048576 --decode-tokens 16 --out "$OUT/generate_1m_async.md" 2>&1 \
        | grep -v "it/s" | tee -a "$log"
fi

step CUDA tests of the decode path
timeout "${TEST_TIMEOUT:-90}" $PY -m pytest -q -x -p no:cacheprovider -m "not slow" \
    tests/test_gpu_oracle.py tests/kernels/test_elementwise_kernels.py \
    tests/kernels/test_attention_kernels.py tests/kernels/test_kv_quant.py -k \
    "gpu or rotary or flash_decode or graph" 2>&1 | tail -15 | tee -a "$log"
timeout "${TEST_TIMEOUT:-90}" $PY -m pytest -q -x -p no:cacheprovider \
    tests/dist_runtime/test_disk_kv_cache.py tests/dist_runtime/test_lora.py -k "cuda" 2>&1 \
    | tail -4 | tee -a "$log"
step "LoRA kernels (Triton shrink / expand) against float64"
timeout "${TEST_TIMEOUT:-90}" $PY -m pytest -q -x -p no:cacheprovider \
    tests/kernels/test_lora_kernels.py 2>&1 | tail -4 | tee -a "$log"
if [ "${WINDOW:-1}" = 1 ]; then
    step "sliding-window and soft-capped attention kernels (prefill, split-KV decode, int8 / int4) against float64"
    timeout "${TEST_TIMEOUT:-90}" $PY -m pytest -q -x -p no:cacheprovider \
        tests/kernels/test_sliding_window.py tests/kernels/test_softcap.py 2>&1 | tail -4 \
        | tee -a "$log"
    step "sliding-window decode (window 4096): GB/s of the window's keys against a copy"
    timeout "${WINDOW_TIMEOUT:-60}" $PY bench/kernel_bench_attention.py --decode --window 4096 \
        2>&1 | tee -a "$log"
fi
if [ "${GEMMA:-1}" = 1 ]; then
    step "head_dim 256 (Gemma 2 9B's heads): decode GB/s (window 4096, soft-cap 50), prefill TFLOP/s"
    timeout "${GEMMA_TIMEOUT:-90}" $PY bench/kernel_bench_attention.py --decode --shape gemma2-9b \
        --window 4096 --softcap 50 2>&1 | tee -a "$log"
    timeout "${GEMMA_TIMEOUT:-90}" $PY bench/kernel_bench_attention.py --shape gemma2-9b \
        2>&1 | tee -a "$log"
fi
step "disk tier of the prefix cache: 7B blocks from the GPU to files and back"
timeout "${DISK_TIMEOUT:-60}" $PY bench/disk_kv_tier.py --device cuda --blocks 512 2>&1 \
    | tee -a "$log"
if [ "${GEMV:-1}" = 1 ]; then
    step "decode-sized linear layers: Triton GEMV, CUDA tests, then against cuBLAS"
    timeout "${GEMV_TIMEOUT:-120}" $PY -m pytest -q -x -p no:cacheprovider \
        tests/kernels/test_gemv.py 2>&1 | tail -4 | tee -a "$log"
    timeout "${GEMV_TIMEOUT:-120}" $PY bench/kernel_bench_gemv.py 2>&1 | tee -a "$log"
    step "generate, 7B shape, GEMV kernel and steps launched ahead"
    DIST_RUNTIME_GEMV=triton DIST_RUNTIME_ASYNC_DECODE=1 timeout "${GEN_TIMEOUT:-180}" \
        $PY bench/generate_gpu.py --prompt-lens 8192,32768 --decode-tokens 32 --batch 8 \
        --batch-lens 8192 --out "$OUT/generate_7b_async_gemv.md" 2>&1 | grep -v "it/s" \
        | tee -a "$log"
fi

if [ "${SPEC:-1}" = 1 ]; then
    step "speculative decoding: what a draft row costs in a 7B decode step (4K, batch 1 and 8)"
    timeout "${SPEC_TIMEOUT:-150}" $PY bench/draft_rows.py --contexts 4096 --batches 1,8 \
        --drafts 0,4 --out "$OUT/draft_rows.md" 2>&1 | tee -a "$log"
fi

step "decode against its floor, every run (OUT/summary.md)"
$PY bench/gpu_decode_summary.py "$OUT" 2>&1 | tee -a "$log"
tar czf "$OUT/traces.tgz" -C "$OUT" $(cd "$OUT" && ls -d trace_* 2>/dev/null) 2>/dev/null \
    && rm -rf "$OUT"/trace_*
step done
