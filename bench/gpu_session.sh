#!/usr/bin/env bash
# Everything that needs a CUDA GPU, for a lent GPU machine with little time on it: GPU tests, the kernel
# suites on CUDA tensors, kernel microbenchmarks, the end-to-end benchmark. Results go under $OUT
# (default ./gpu-results): session.log plus JSON files.
#
#   PYTHONPATH=. bash bench/gpu_session.sh STAGE     STAGE: tests, kernels, e2e or all (default all)
#
# A device call may run at most 10 minutes, so each stage is sized to finish inside one (its steps'
# limits add up to 9.5 minutes; the first e2e step, on a cold machine, also pays for compiling and
# autotuning every kernel): run the three stages as three calls, back to back so the machine
# stays warm, most important first (e2e, kernels, tests). Each step has its own time limit, so one slow
# step cannot eat the stage; the benchmarks write their JSON row by row, so a step cut short keeps
# what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu-results}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-.} PYTHONUNBUFFERED=1
# Each autotune pick (shape key, best config, time) goes to the log.
export TRITON_PRINT_AUTOTUNING=1
stage=${1:-all}
case $stage in tests|kernels|e2e|all) ;; *) echo "usage: $0 [tests|kernels|e2e|all]" >&2; exit 2 ;; esac
log="$OUT/session-$stage.log"

run() {  # run LIMIT_SECONDS COMMAND...: one step, logged, never fatal
    local limit=$1; shift
    echo "=== $(date -u +%H:%M:%S) $*" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    echo "=== exit ${PIPESTATUS[0]}" | tee -a "$log"
}

run 20 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv
run 40 python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"

if [[ $stage == e2e || $stage == all ]]; then
    run 330 python -m altclip_fast.apps.benchmark --dtype bf16 --json "$OUT/e2e.json"
    # The default measures, per GEMM shape, the Triton kernel against cuBLAS + torch epilogue and keeps
    # the faster (altclip_fast.ops.gemm_choice; the picks are in e2e.json). This run forces the Triton GEMMs
    # everywhere, to show what the measured choice buys.
    ALTCLIP_FAST_GEMM=triton run 180 python -m altclip_fast.apps.benchmark --dtype bf16 --no-check --no-cuda-graphs \
        --json "$OUT/e2e-triton-gemm.json"
fi
if [[ $stage == kernels || $stage == all ]]; then
    run 180 python bench/bench_attention.py --dtype bf16 --json "$OUT/attention.json"
    run 100 python bench/bench_layer_norm.py --dtype bf16
    run 200 python bench/bench_linear.py --dtype bf16
fi
if [[ $stage == tests || $stage == all ]]; then
    run 240 python -m pytest -q -m gpu tests -p no:cacheprovider
    # The whole-model and op-backend tests that run the Triton backend: on CUDA they use the compiled kernels.
    run 60 python -m pytest -q tests/altclip_fast/test_model_triton.py tests/altclip_fast/test_dispatch.py \
        tests/altclip_fast/test_gemm_choice.py -p no:cacheprovider
    run 200 python -m pytest -q -x tests/kernels -m "not gpu" -p no:cacheprovider
fi
