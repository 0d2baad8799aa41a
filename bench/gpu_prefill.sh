#!/usr/bin/env bash
# Issue 18 item 1 in one device call (~4 min on one H200, 6 at most): the extend-attention tile sweep
# (bench_prefill.py sweep: old kernel, each config, torch SDPA, % of a matmul measured in the
# same run, correctness at every shape; the hybrid path (new x new on torch's SDPA); split-KV on
# one long-prefix request; a head_dim 64 mini-sweep), then cold prefill of a 32k and a 120k
# prompt through the engine (llama3.1-8b preset, random weights, 8192-token chunks) with the
# sweep's best config (paged only, hybrid, previous kernel), against the compute-aware floor,
# then the gpu-marked extend-attention tests. Everything lands in $OUT (else bench/results/prefill):
#   prefill_sweep.json / .log    per shape: old, sdpa, every config, hybrid; best_overall; table_line
#   prefill_engine.json / .log   cold prefill time, floor_s (compute-aware), flops_floor_s
#   prefill_tests.log, gpu_info.txt
#
#   bash bench/gpu_prefill.sh            # from the repo root, on the GPU machine
#
# Per-step limits (seconds) fit 6 minutes: T_SWEEP=150 (head_dim 128 configs stop 60 s in, the
# head_dim 64 ones 40 s later), T_ENGINE=130, T_TESTS=80. OLD_LENS (default 32768,120000): the
# prompt lengths also timed with the previous kernel.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/prefill}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
. bench/carried_wheels.sh && use_carried_wheels

{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.sm,power.limit --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/gpu_info.txt"

T_SWEEP="${T_SWEEP:-150}"; T_ENGINE="${T_ENGINE:-130}"; T_TESTS="${T_TESTS:-80}"
timeout -k 10 "$T_SWEEP" "$PY" bench/bench_prefill.py sweep --out "$OUT" \
  --budget-s $((T_SWEEP - 90)) --budget-64-s 40 2>&1 | tee "$OUT/prefill_sweep.log"
sweep_rc=${PIPESTATUS[0]}

timeout -k 10 "$T_ENGINE" "$PY" bench/bench_prefill.py engine --out "$OUT" \
  --sweep-json "$OUT/prefill_sweep.json" --old-lens "${OLD_LENS:-32768,120000}" 2>&1 | tee "$OUT/prefill_engine.log"
engine_rc=${PIPESTATUS[0]}

timeout -k 10 "$T_TESTS" "$PY" -m pytest -q -m gpu tests/kernels/test_extend_attention.py \
  -p no:cacheprovider 2>&1 | tee "$OUT/prefill_tests.log"
tests_rc=${PIPESTATUS[0]}

echo "sweep rc=$sweep_rc, engine rc=$engine_rc, gpu tests rc=$tests_rc"
[ "$sweep_rc" -eq 0 ] && [ "$engine_rc" -eq 0 ] && [ "$tests_rc" -eq 0 ]
