#!/usr/bin/env bash
# Shared-prefix (cascade) decode on one GPU, in one device call (~4 min on an H200):
#   1. the gpu-marked cascade kernel tests (and the decode kernel's, which cascade extends)
#   2. kernel: per-request decode vs cascade at batch 256 = 16 groups x 16 requests, 2048 shared
#      + 128..384 own tokens, Llama-3-8B attention (32 q / 8 kv heads, head_dim 128), bf16,
#      page 16; max abs diffs; a pass-1 launch sweep; host cost of preparing a step's groups;
#      again at 64 groups x 4 (full-size gsp's running mix), a shorter sweep (kernel_64x4.json)
#   3. e2e: gsp (llama3-8b preset, dummy weights) with cascade off, then on, one process each;
#      time, decode ITL, decode step at batch 256; then a 128-request gsp batch with top-2
#      logprobs per variant: greedy agreement classified by margin -> summary.md, agreement.json
# Everything lands in $OUT (else bench/results/cascade): gpu_info.txt, tests.log, run.log,
# kernel.json, kernel_64x4.json, host.json (RUN_HOST=1), e2e_off.json, e2e_on.json, agreement.json, summary.md.
#
#   bash bench/gpu_cascade.sh          # from the repo root, on the GPU machine
#
# Knobs: GSP_SCALE (gsp request-count scale, default 1 = the issue's full size, 64 groups x 16;
# 0.5 saves ~20 s), SWEEP_S (pass-1 sweep budget, s), RUN_HOST=1 (also the host grouping bench,
# ~10 s), T_TESTS / T_KERNEL / T_E2E (timeouts, s).
# Needs sortedcontainers (carry .whl from ../shared/device/wheels.sh sortedcontainers).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/cascade}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

. bench/carried_wheels.sh && use_carried_wheels
require_modules sortedcontainers

{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null ||
    echo "no nvidia-smi"
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/gpu_info.txt"

timeout -k 10 "${T_TESTS:-150}" "$PY" -m pytest -q -x -m gpu -p no:cacheprovider \
  tests/kernels/test_cascade_decode.py tests/kernels/test_decode_attention.py \
  tests/engine/test_cascade_engine.py 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}

run() { echo "+ $*" | tee -a "$OUT/run.log"; "$@" 2>&1 | tee -a "$OUT/run.log"; return "${PIPESTATUS[0]}"; }
run timeout -k 10 "${T_KERNEL:-100}" "$PY" bench/bench_cascade.py kernel --sweep-s "${SWEEP_S:-12}" --out "$OUT"
kernel_rc=$?
# Full-size gsp's steady state: 256 running requests drawn from 64 groups, ~4 per group.
run timeout -k 10 "${T_KERNEL:-100}" "$PY" bench/bench_cascade.py kernel --groups 64 --per-group 4 \
  --tag 64x4 --sweep-s "${SWEEP2_S:-5}" --out "$OUT"
if [ "${RUN_HOST:-0}" = 1 ]; then  # grouping + packing on the host CPU (no GPU needed)
  run timeout -k 10 30 "$PY" bench/bench_cascade.py host --out "$OUT"
fi
GSP=(--scale "${GSP_SCALE:-1}" --out "$OUT")
run timeout -k 10 "${T_E2E:-110}" "$PY" bench/bench_cascade.py e2e --cascade off "${GSP[@]}"
off_rc=$?
run timeout -k 10 "${T_E2E:-110}" "$PY" bench/bench_cascade.py e2e --cascade on "${GSP[@]}"
on_rc=$?
run "$PY" bench/bench_cascade.py compare --out "$OUT"
echo "tests rc=$tests_rc kernel rc=$kernel_rc e2e off rc=$off_rc on rc=$on_rc" | tee -a "$OUT/run.log"
ls -la "$OUT"
[ "$tests_rc" -eq 0 ] && [ "$kernel_rc" -eq 0 ] && [ "$off_rc" -eq 0 ] && [ "$on_rc" -eq 0 ]
