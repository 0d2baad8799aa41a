#!/usr/bin/env bash
# On a CUDA machine: the gpu-marked kernel tests, then the kernel benchmark. Logs go to $OUT
# (else bench/results). Usage: bash bench/gpu_kernels.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
# Compiled kernels, not the CPU interpreter the CPU test run uses.
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.sm,power.limit --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/gpu_info.txt"

timeout "${TEST_TIMEOUT:-330}" "$PY" -m pytest -q -m gpu tests/kernels -p no:cacheprovider \
  2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

timeout "${BENCH_TIMEOUT:-200}" "$PY" bench/bench_kernels.py --out "$OUT" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}

echo "gpu tests rc=$tests_rc, bench rc=$bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
