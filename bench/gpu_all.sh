#!/usr/bin/env bash
# Everything GPU in one device call (< 10 min): engine GPU tests, the engine benchmark (issue 6)
# and the workload suite (issue 7). Results: $OUT/all.tgz (every log, JSON and plot) plus the
# headline files engine.json and summary.md.   Run: PYTHONUNBUFFERED=1 bash bench/gpu_all.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu_all}"
WORK=/tmp/radixrt_gpu_all
rm -rf "$WORK"; mkdir -p "$WORK" "$OUT"
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$WORK/gpu.txt"
timeout 150 python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/engine/test_engine_gpu.py \
  -k "${GPU_TEST_FILTER:-llama}" 2>&1 | tee "$WORK/gpu_tests.log" | tail -4
timeout 170 python3 bench/bench_engine.py --out "$WORK" --sections "${SECTIONS:-ceilings,decode,e2e,agree}" \
  2>&1 | grep -v "generate:" | tee "$WORK/bench_engine.log" | tail -32
OUT="$WORK/suite" SCALE="${SCALE:-0.5}" T_RADIX="${T_RADIX:-120}" T_NOCACHE="${T_NOCACHE:-100}" \
  T_HF="${T_HF:-60}" timeout 300 bash bench/gpu_suite.sh > "$WORK/suite.log" 2>&1
tail -45 "$WORK/suite/summary.md" 2>/dev/null || tail -20 "$WORK/suite.log"
tar czf "$OUT/all.tgz" -C "$WORK" .
cp "$WORK/engine.json" "$WORK/suite/summary.md" "$OUT/" 2>/dev/null
ls -la "$OUT"
