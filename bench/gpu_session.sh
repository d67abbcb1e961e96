#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one run of at most 8 minutes (see bench/gpu_session.py):
#
#   PYTHONPATH=. bash bench/gpu_session.sh              # on a lent GPU machine; results under $OUT
#   bash bench/gpu_session.sh --dry-run                 # the same plumbing rehearsed on CPU (CI runs it)
#   bash bench/gpu_session.sh --list                    # the steps, their order and time caps
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=${PYTHONPATH:-.} PYTHONUNBUFFERED=1
exec python bench/gpu_session.py "$@"
