#!/usr/bin/env bash
# Every GPU check in one pass, for a one-GPU machine without Ray (in-process executor):
# kernel benchmarks against their baselines, end-to-end prefill/decode at 32K-131K (7B shape)
# and at 1,048,576 tokens (7B-1M shape, 2 layers), each with a torch.profiler trace of a few
# decode steps (device-busy fraction, top kernels), then the CUDA tests (HF oracle, kernels).
#   OUT=/tmp/gpu bash bench/gpu_suite.sh
set -u
OUT=${OUT:-/tmp/gpu_suite}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
log="$OUT/log.txt"
step() { echo "=== $* ($(date +%T))" | tee -a "$log"; }

step environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$log"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    2>&1 | tee -a "$log"

step position_attention kernel
timeout 180 $PY bench/kernel_bench_position.py --out "$OUT/position.md" 2>&1 | tee -a "$log"

step generate, 7B shape
timeout 300 $PY bench/generate_gpu.py --prompt-lens 8192,32768,131072 --decode-tokens 32 \
    --batch 8 --batch-lens 8192,32768 --profile "$OUT/trace_7b" --out "$OUT/generate_7b.md" \
    2>&1 | grep -v "it/s" \
    | tee -a "$log"

step generate, 1M tokens
timeout 300 $PY bench/generate_gpu.py \
    --model-config bench/model_configs/internlm2_5-7b-chat-1m.json --layers 2 \
    --prompt-lens 1048576 --decode-tokens 16 --profile "$OUT/trace_1m" \
    --out "$OUT/generate_1m.md" 2>&1 \
    | grep -v "it/s" | tee -a "$log"

step W4A16 kernel against the bf16 matmul
timeout 240 $PY bench/w4a16.py --report "$OUT/w4a16.md" 2>&1 | tee -a "$log"

step generate, 7B shape, 4-bit weights vs bf16 at 8K
timeout 180 $PY bench/generate_gpu.py --prompt-lens 8192 --decode-tokens 32 --weights int4 \
    --out "$OUT/generate_7b_int4.md" 2>&1 | grep -v "it/s" | tee -a "$log"
timeout 180 $PY bench/generate_gpu.py --prompt-lens 8192 --decode-tokens 32 \
    --out "$OUT/generate_7b_bf16_8k.md" 2>&1 | grep -v "it/s" | tee -a "$log"

step CUDA tests
timeout "${TEST_TIMEOUT:-240}" $PY -m pytest -q -x -p no:cacheprovider -m "not slow" \
    tests/test_gpu_oracle.py tests/kernels/test_position_attention.py \
    tests/kernels/test_decode_shared_prefix.py tests/kernels/test_attention_kernels.py \
    tests/kernels/test_w4a16.py tests/workers/test_int4_checkpoint.py tests/workers/test_cp_decode.py \
    2>&1 | tail -30 | tee -a "$log"
step done
