#!/usr/bin/env bash
# Every GPU check in one pass, for a one-GPU machine without Ray (in-process executor): the
# decode checks of bench/gpu_decode.sh (end-to-end prefill/decode of the 7B shape at 8K-131K and
# of the 7B-1M shape at 1,048,576 tokens with profiles and host breakdowns, the in-graph decode
# kernel sweep, the CUDA tests of the decode path), then the position-attention kernel against
# the paged kernel, the 4-bit weight kernel against the bf16 matmul and end to end, and the
# remaining CUDA tests.
#   OUT=/tmp/gpu bash bench/gpu_suite.sh
set -u
OUT=${OUT:-/tmp/gpu_suite}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
log="$OUT/log.txt"
step() { echo "=== $* ($(date +%T))" | tee -a "$log"; }

OUT="$OUT" bash "$(dirname "$0")/gpu_decode.sh"

step position_attention kernel
timeout 180 $PY bench/kernel_bench_position.py --out "$OUT/position.md" 2>&1 | tee -a "$log"

step W4A16 kernel against the bf16 matmul
timeout 240 $PY bench/w4a16.py --report "$OUT/w4a16.md" 2>&1 | tee -a "$log"

step generate, 7B shape, 4-bit weights vs bf16 at 8K
timeout 180 $PY bench/generate_gpu.py --prompt-lens 8192 --decode-tokens 32 --weights int4 \
    --out "$OUT/generate_7b_int4.md" 2>&1 | grep -v "it/s" | tee -a "$log"
timeout 180 $PY bench/generate_gpu.py --prompt-lens 8192 --decode-tokens 32 \
    --out "$OUT/generate_7b_bf16_8k.md" 2>&1 | grep -v "it/s" | tee -a "$log"

step remaining CUDA tests
timeout "${SUITE_TEST_TIMEOUT:-240}" $PY -m pytest -q -x -p no:cacheprovider -m "not slow" \
    tests/kernels/test_position_attention.py tests/kernels/test_decode_shared_prefix.py \
    tests/workers/test_int4_checkpoint.py tests/workers/test_cp_decode.py \
    2>&1 | tail -30 | tee -a "$log"
step done
