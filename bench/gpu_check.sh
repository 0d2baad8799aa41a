#!/usr/bin/env bash
# One device call: GPU tests (kernels, models, engine) then the engine benchmark, logs under $OUT.
#   run from the repo root on the GPU machine: PYTHONUNBUFFERED=1 bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
SECTIONS=${SECTIONS:-ceilings,decode,prefill,e2e,agree,hf}
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 300 python3 -m pytest -q -x -m gpu -p no:cacheprovider ${GPU_TESTS:-tests/engine/test_engine_gpu.py tests/kernels} 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
timeout 420 python3 bench/bench_engine.py --out "$OUT" --sections "$SECTIONS" 2>&1 | tee "$OUT/bench_engine.log" | tail -40
