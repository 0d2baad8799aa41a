#!/usr/bin/env bash
# Add the transformers baseline to the recorded H100 suite run (bench/recorded/h100_run3/suite):
# the same workloads and sizes as gpu_all.sh's suite (SCALE 0.5), HF only, then one merged report.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu_hf}"
WORK=/tmp/radixrt_gpu_hf
rm -rf "$WORK"; mkdir -p "$OUT"; cp -r bench/recorded/h100_run3/suite "$WORK"
OUT="$WORK" SCALE="${SCALE:-0.5}" ONLY=hf T_HF="${T_HF:-230}" bash bench/gpu_suite.sh > "$WORK/hf_only.log" 2>&1
tail -40 "$WORK/summary.md"
tar czf "$OUT/suite_with_hf.tgz" -C "$WORK" .
