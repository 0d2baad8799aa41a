#!/usr/bin/env bash
# Everything GPU in one device call (carry .whl from ../shared/device/wheels.sh) (< 10 min with the defaults): GPU tests, the engine benchmark
# (issue 6) and the workload suite (issue 7). Results: $OUT/all.tgz (every log, JSON and plot)
# plus the headline files engine.json and summary.md.   Run: PYTHONUNBUFFERED=1 bash bench/gpu_all.sh
# Knobs (env):
#   GPU_TESTS          pytest paths for the gpu-marked tests   (default: the engine GPU tests)
#   GPU_TEST_FILTER    pytest -k expression                     (default: llama)
#   SECTIONS           bench_engine.py sections (ceilings,decode,prefill,e2e,agree,hf)
#                                                               (default: ceilings,decode,e2e,agree)
#   KERNEL_BENCH=1     also run bench/bench_kernels.py
#   INVARIANT_BENCH=1  also run bench/bench_invariant.py (deterministic-inference kernels)
#   T_ENGINE           timeout of bench_engine.py in seconds    (default: 240)
#   SUITE=0            skip the workload suite; SCALE / T_RADIX / T_NOCACHE / T_HF size it
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu_all}"
WORK=/tmp/radixrt_gpu_all
rm -rf "$WORK"; mkdir -p "$WORK" "$OUT"
unset TRITON_INTERPRET
# Wheels the image lacks (msgspec, pyzmq, ...), carried as .whl.
. bench/carried_wheels.sh && use_carried_wheels
python3 -c "import msgspec, zmq" || echo "WARNING: msgspec/pyzmq missing: carry .whl (../shared/device/wheels.sh)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$WORK/gpu.txt"
# shellcheck disable=SC2086
timeout 330 python3 -m pytest -q --maxfail=5 -m gpu -p no:cacheprovider ${GPU_TESTS:-tests/engine/test_engine_gpu.py} \
  -k "${GPU_TEST_FILTER:-llama}" 2>&1 | tee "$WORK/gpu_tests.log" | tail -4
if [ "${KERNEL_BENCH:-0}" = 1 ]; then
  timeout 200 python3 bench/bench_kernels.py --out "$WORK" 2>&1 | tee "$WORK/bench_kernels.log" | tail -20
fi
if [ "${INVARIANT_BENCH:-0}" = 1 ]; then
  timeout 200 python3 bench/bench_invariant.py --out "$WORK" 2>&1 | tee "$WORK/bench_invariant.log" | tail -40
fi
timeout "${T_ENGINE:-240}" python3 bench/bench_engine.py --out "$WORK" --sections "${SECTIONS:-ceilings,decode,e2e,agree}" \
  2>&1 | grep -v "generate:" | tee "$WORK/bench_engine.log" | tail -60
if [ "${SUITE:-1}" = 1 ]; then
  OUT="$WORK/suite" SCALE="${SCALE:-0.5}" T_RADIX="${T_RADIX:-120}" T_NOCACHE="${T_NOCACHE:-100}" \
    T_HF="${T_HF:-60}" timeout 300 bash bench/gpu_suite.sh > "$WORK/suite.log" 2>&1
  tail -45 "$WORK/suite/summary.md" 2>/dev/null || tail -20 "$WORK/suite.log"
fi
tar czf "$OUT/all.tgz" -C "$WORK" .
cp "$WORK/engine.json" "$OUT/" 2>/dev/null
cp "$WORK/suite/summary.md" "$OUT/" 2>/dev/null
ls -la "$OUT"
