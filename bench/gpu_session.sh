#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one command, for a lent GPU machine with little time on it:
# GPU tests, the kernel suites on CUDA tensors, kernel microbenchmarks, the end-to-end benchmark.
# Results go under $OUT (default ./gpu-results): session.log plus JSON files.
#
#   PYTHONPATH=. bash bench/gpu_session.sh [tests|bench|all]     (default all)
#
# Each stage has its own time limit so one slow stage cannot eat the whole lease.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu-results}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-.} PYTHONUNBUFFERED=1
stage=${1:-all}
log="$OUT/session.log"

run() {  # run LIMIT_SECONDS COMMAND...: one stage, logged, never fatal
    local limit=$1; shift
    echo "=== $(date -u +%H:%M:%S) $*" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    echo "=== exit ${PIPESTATUS[0]}" | tee -a "$log"
}

run 30 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv
run 60 python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"

if [[ $stage == tests || $stage == all ]]; then
    run 300 python -m pytest -q -m gpu tests
    run 300 python -m pytest -q -x tests/kernels -m "not gpu" -p no:cacheprovider
fi
if [[ $stage == bench || $stage == all ]]; then
    run 180 python bench/bench_attention.py --dtype bf16 --json "$OUT/attention.json"
    run 120 python bench/bench_layer_norm.py --dtype bf16
    run 180 python bench/bench_linear.py --dtype bf16
    run 400 python -m altclip_fast.benchmark --dtype bf16 --json "$OUT/e2e.json"
    # The same with cuBLAS GEMMs (epilogues in torch) under the Triton attention and LayerNorm:
    # which GEMM path to keep per shape is decided from these two runs and bench_linear.py.
    ALTCLIP_FAST_GEMM=torch run 400 python -m altclip_fast.benchmark --dtype bf16 --no-check --json "$OUT/e2e-torch-gemm.json"
fi
