#!/usr/bin/env bash
# Tensor parallelism (issue 16) on a multi-GPU machine, in one call. Run from the repo root:
#   PYTHONUNBUFFERED=1 bash bench/gpu_tp.sh
#   0. the gpu-marked TP tests (NCCL + CUDA graphs + overlap: TP=2 tokens equal TP=1)
#   1. per (preset, TP) in $RUNS, with TP <= the GPU count: measured all-reduce / all-gather,
#      decode step at batch 64 x 1k context, end to end 128 x 512 in / 128 out, floors
#      (bench/bench_tp.py, dummy weights, bf16)
#   2. $OUT/tp.md: the table and the issue's targets (8B TP=2 decode <= 0.6x TP=1; 70B TP=4
#      decode at batch 64 <= 1.3x its floor)
# Default RUNS: llama3-8b at TP 1, 2, 4 and llama3-70b at TP 2, 4 (70B does not fit one H200).
# A 10-minute call fits one group; split with RUNS, same $OUT, then re-run the report:
#   RUNS="llama3-8b:1 llama3-8b:2 llama3-8b:4" bash bench/gpu_tp.sh
#   SKIP_TESTS=1 RUNS="llama3-70b:2 llama3-70b:4" bash bench/gpu_tp.sh
# Per-run limit T_RUN (default 240 s), tests T_TESTS (120 s). Results: $OUT (default
# bench/results/gpu_tp): <preset>_tp<N>.json, <preset>_tp<N>.log, tests.log, tp.md.
# CPU dry run (tiny model, gloo, ~1 minute):
#   DEVICE=cpu SKIP_TESTS=1 RUNS="llama-tiny:1 llama-tiny:2" \
#     BENCH_ARGS="--batch 4 --ctx 64 --steps 4 --e2e 4,32,8" bash bench/gpu_tp.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu_tp}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
unset TRITON_INTERPRET
# NVLink multicast stays off on shared machines (followers inherit this environment).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
. bench/carried_wheels.sh && use_carried_wheels
DEVICE="${DEVICE:-cuda}"
RUNS="${RUNS:-llama3-8b:1 llama3-8b:2 llama3-8b:4 llama3-70b:2 llama3-70b:4}"
T_RUN="${T_RUN:-240}"; T_TESTS="${T_TESTS:-120}"
BENCH_ARGS="${BENCH_ARGS:-}"
if [ "$DEVICE" = cpu ]; then NGPU=64; else
  NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
fi
echo "device=$DEVICE gpus=$NGPU runs=[$RUNS] out=$OUT"
status=0
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout "$T_TESTS" "$PY" -m pytest -q -m gpu tests/engine/test_tp.py 2>&1 | tee "$OUT/tests.log" | tail -5
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
for run in $RUNS; do
  preset="${run%%:*}"; tp="${run##*:}"
  if [ "$tp" -gt "$NGPU" ]; then echo "skip $preset TP=$tp: only $NGPU GPUs"; continue; fi
  echo "=== $preset TP=$tp"
  # shellcheck disable=SC2086 (BENCH_ARGS is a list of flags)
  timeout "$T_RUN" "$PY" bench/bench_tp.py --device "$DEVICE" --preset "$preset" --tp "$tp" \
    --out "$OUT" $BENCH_ARGS >"$OUT/${preset}_tp${tp}.log" 2>&1
  rc=$?
  tail -1 "$OUT/${preset}_tp${tp}.log"
  [ "$rc" = 0 ] || { echo "$preset TP=$tp failed (rc $rc): see $OUT/${preset}_tp${tp}.log"; status=1; }
done
"$PY" bench/bench_tp.py --report "$OUT"
exit $status
