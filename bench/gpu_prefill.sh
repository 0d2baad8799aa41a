#!/usr/bin/env bash
# Issue 18 item 1 in one device call (~5 min on one H200): the gpu-marked extend-attention tests
# (paged kernel and the dense new-token kernel, extend_newkv), then the tile sweep
# (bench_prefill.py sweep: old kernel, torch SDPA, every (config, mode) at 8x1024, 8x1024 + 1k
# prefix and 1x32k, head_dim 128 then head_dim 64; modes tma / ptr = new tokens' K/V read densely
# by TMA descriptors / pointer loads, paged = every key through the page table; % of a matmul
# measured in the same run; every config checked against an fp32 reference first), then cold
# prefill of a 32k and a 120k prompt through the engine (llama3.1-8b preset, random weights,
# 8192-token chunks) with the sweep's winner, against the compute-aware floor; the same tiles
# all-paged and the previous kernel at 32k. Everything lands in $OUT (else bench/results/prefill):
#   prefill_winner.json          per head_dim: winning config + mode, TABLE line, use_new_kv,
#                                per-shape bests and SDPA rates (what to commit)
#   prefill_sweep.json / .log    every row
#   prefill_engine.json / .log   cold prefill ttft_s, floor_s, vs_floor per kernel
#   prefill_tests.log, gpu_info.txt
#
#   bash bench/gpu_prefill.sh            # from the repo root, on the GPU machine
#
# Limits (seconds): T_TESTS=60, T_SWEEP=140 (SWEEP_128_S=95 of head_dim 128 configs, then
# SWEEP_64_S=20 of head_dim 64 ones; a config starts only inside its budget), T_ENGINE=100.
# OLD_LENS / PAGED_LENS (default 32768, empty: none): prompt lengths also timed with the previous
# kernel / with the winner's tiles all-paged. ENGINE=0 skips the engine part. TESTS: the test
# files (default: extend_newkv, extend_attention, triton_backend). SWEEP_64_S=0 skips head_dim 64.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/prefill}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
. bench/carried_wheels.sh && use_carried_wheels
start=$(date +%s)

{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.sm,power.limit --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/gpu_info.txt"

T_TESTS="${T_TESTS:-60}"; T_SWEEP="${T_SWEEP:-140}"; T_ENGINE="${T_ENGINE:-100}"
TESTS="${TESTS:-tests/kernels/test_extend_newkv.py tests/kernels/test_extend_attention.py tests/kernels/test_triton_backend.py}"
# shellcheck disable=SC2086  # TESTS is a list of paths
timeout -k 5 "$T_TESTS" "$PY" -m pytest -v -x -m gpu $TESTS -p no:cacheprovider 2>&1 \
  | grep -E "PASSED|FAILED|ERROR|Error|assert|passed|failed" | tail -40 | tee "$OUT/prefill_tests.log"
tests_rc=${PIPESTATUS[0]}
echo "tests done at $(( $(date +%s) - start )) s"

timeout -k 10 "$T_SWEEP" "$PY" bench/bench_prefill.py sweep --out "$OUT" --no-hybrid \
  --budget-s "${SWEEP_128_S:-95}" --budget-64-s "${SWEEP_64_S:-20}" 2>&1 | tee "$OUT/prefill_sweep.log"
sweep_rc=${PIPESTATUS[0]}
echo "sweep done at $(( $(date +%s) - start )) s"

engine_rc=0
if [ "${ENGINE:-1}" != 0 ]; then
  timeout -k 10 "$T_ENGINE" "$PY" bench/bench_prefill.py engine --out "$OUT" \
    --sweep-json "$OUT/prefill_sweep.json" --old-lens "${OLD_LENS-32768}" \
    --paged-lens "${PAGED_LENS-32768}" 2>&1 | grep -v "^ *File \|^ *\^" | tail -40 | tee "$OUT/prefill_engine.log"
  engine_rc=${PIPESTATUS[0]}
fi

echo "== winner"; cat "$OUT/prefill_winner.json" 2>/dev/null | head -60
echo "tests rc=$tests_rc, sweep rc=$sweep_rc, engine rc=$engine_rc, $(( $(date +%s) - start )) s"
[ "$sweep_rc" -eq 0 ] && [ "$engine_rc" -eq 0 ] && [ "$tests_rc" -eq 0 ]
