#!/usr/bin/env bash
# Shared-prefix (cascade) decode on one GPU, in one device call (~4 min on an H200):
#   1. the gpu-marked cascade kernel tests (and the decode kernel's, which cascade extends)
#   2. kernel (bench/cascade_sweep.py, CUDA-graph timed): per-request decode vs cascade at batch
#      256 = 16 groups x 16 and 64 groups x 4 (full-size gsp's running mix), 2048 shared +
#      128..384 own tokens, Llama-3-8B attention (32 q / 8 kv heads, head_dim 128), bf16, page
#      16: run 2's settings, each pass alone, a launch sweep, a profiler breakdown (sweep.json);
#      OLD_KERNEL=1 adds the eager bench of runs 1-2 (kernel.json, kernel_64x4.json)
#   3. e2e: gsp (llama3-8b preset, dummy weights) with cascade off, then on, one process each;
#      time, decode ITL, decode step at batch 256; then a 128-request gsp batch with top-2
#      logprobs per variant: greedy agreement classified by margin -> summary.md, agreement.json
# Everything lands in $OUT (else bench/results/cascade): gpu_info.txt, tests.log, run.log,
# sweep.json, kernel*.json (OLD_KERNEL=1), host.json (RUN_HOST=1), e2e_off.json, e2e_on.json, agreement.json, summary.md.
#
#   bash bench/gpu_cascade.sh          # from the repo root, on the GPU machine
#
# Knobs: GSP_SCALE (gsp request-count scale, default 1 = the issue's full size, 64 groups x 16;
# 0.5 saves ~20 s), E2E=both|on|none, AGREE_TOKENS (0: no agreement batch after gsp), SWEEP=0 (skip bench/cascade_sweep.py, the graph-timed
# kernel sweep -> sweep.json), SWEEP_S (its budget, s), OLD_KERNEL=1 (also the eager kernel bench
# of runs 1-2), ENGINE_TESTS=0, TESTS_K (a pytest -k subset), RUN_HOST=1 (also the host grouping bench, ~10 s),
# T_TESTS / T_SWEEP / T_KERNEL / T_E2E (timeouts, s).
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

TEST_FILES=(tests/kernels/test_cascade_decode.py tests/kernels/test_decode_attention.py)
[ "${ENGINE_TESTS:-1}" = 1 ] && TEST_FILES+=(tests/engine/test_cascade_engine.py)
timeout -k 10 "${T_TESTS:-150}" "$PY" -m pytest -q -x -m gpu -p no:cacheprovider \
  ${TESTS_K:+-k "$TESTS_K"} "${TEST_FILES[@]}" 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}

run() { echo "+ $*" | tee -a "$OUT/run.log"; "$@" 2>&1 | tee -a "$OUT/run.log"; return "${PIPESTATUS[0]}"; }
kernel_rc=0
if [ "${SWEEP:-1}" = 1 ]; then  # graph-timed: run 2's settings, each pass alone, a launch sweep
  run timeout -k 10 "${T_SWEEP:-170}" "$PY" bench/cascade_sweep.py sweep --sweep-s "${SWEEP_S:-100}" \
    --out "$OUT"
  kernel_rc=$?
fi
if [ "${OLD_KERNEL:-0}" = 1 ]; then  # the eager (do_bench) kernel bench of runs 1 and 2
  run timeout -k 10 "${T_KERNEL:-100}" "$PY" bench/bench_cascade.py kernel --sweep-s "${SWEEP1_S:-12}" --out "$OUT"
  kernel_rc=$?
  # Full-size gsp's steady state: 256 running requests drawn from 64 groups, ~4 per group.
  run timeout -k 10 "${T_KERNEL:-100}" "$PY" bench/bench_cascade.py kernel --groups 64 --per-group 4 \
    --tag 64x4 --sweep-s "${SWEEP2_S:-5}" --out "$OUT"
fi
if [ "${RUN_HOST:-0}" = 1 ]; then  # grouping + packing on the host CPU (no GPU needed)
  run timeout -k 10 30 "$PY" bench/bench_cascade.py host --out "$OUT"
fi
GSP=(--scale "${GSP_SCALE:-1}" --agree-tokens "${AGREE_TOKENS:-64}" --out "$OUT")
off_rc=0
on_rc=0
case "${E2E:-both}" in  # both | on (the off baseline from an earlier run) | none
  both)
    run timeout -k 10 "${T_E2E:-110}" "$PY" bench/bench_cascade.py e2e --cascade off "${GSP[@]}"
    off_rc=$? ;;
esac
case "${E2E:-both}" in
  both|on)
    run timeout -k 10 "${T_E2E:-110}" "$PY" bench/bench_cascade.py e2e --cascade on "${GSP[@]}"
    on_rc=$? ;;
esac
run "$PY" bench/bench_cascade.py compare --out "$OUT"
echo "tests rc=$tests_rc kernel rc=$kernel_rc e2e off rc=$off_rc on rc=$on_rc" | tee -a "$OUT/run.log"
ls -la "$OUT"
[ "$tests_rc" -eq 0 ] && [ "$kernel_rc" -eq 0 ] && [ "$off_rc" -eq 0 ] && [ "$on_rc" -eq 0 ]
