#!/usr/bin/env bash
# The GPU benchmark suite in one device call (< 10 min on one H100): Llama-3-8B shape, random
# weights, all five workloads, cache on / cache off / HF transformers baseline, hardware floors.
# Everything lands in $OUT (else bench/results/gpu): per-run JSON, summary.md, PNG plots, logs.
#
#   bash bench/gpu_suite.sh                  # from the repo root, on the GPU machine
#
# Needs sortedcontainers (not in the GPU image): on the CPU side run
#   ../shared/device/wheels.sh sortedcontainers
# and carry .whl; this script installs it. Offline mode needs nothing from radixrt.server.
#
# Sizes (documented knob: SCALE multiplies every request count below; LEN_SCALE every length):
#   gsp      8 groups x 16 prompts, system 2048 + question 128, output 256   (scale 0.125)
#   chat     32 conversations x 8 turns, input 256-512, output 4-8           (scale 1)
#   rag      128 questions over 8 documents of 1024 (Zipf 1.1), output 128   (scale 0.25)
#   fewshot  256 questions after a 5 x 160-token header, output 8            (scale 0.25)
#   random   128 sequences, input and output uniform in 50-512               (scale 0.5, len 0.5)
# WORKLOADS (comma list) picks a subset; SUITE_ARGS adds run_bench.py flags (e.g. --profile). MODEL / DEVICE / DTYPE / KV_TOKENS override the model and device (a CPU dry run of this script:
#   MODEL=llama-tiny DEVICE=cpu DTYPE=float32 SCALE=0.1 LEN_SCALE=0.05 bash bench/gpu_suite.sh).
# The floors in the report are computed for exactly these sizes. Each process has a timeout and
# a deadline after which it starts no new run, so a slow engine yields a partial report, not none.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

. bench/carried_wheels.sh && use_carried_wheels
require_modules sortedcontainers

S="${SCALE:-1}"
L="${LEN_SCALE:-1}"
mul() { "$PY" -c "print($1 * $2)"; }
COMMON=(
  --workload "${WORKLOADS:-gsp,chat,rag,fewshot,random}" --model "${MODEL:-llama3-8b}" --load-format dummy
  --device "${DEVICE:-cuda}" --dtype "${DTYPE:-bfloat16}" --kv-cache-tokens "${KV_TOKENS:-262144}" --max-running-requests 256 --page-size 16
  --scale "$(mul 0.25 "$S")" --len-scale "$L"
  --workload-scale "gsp=$(mul 0.125 "$S")" --workload-scale "chat=$(mul 1 "$S")"
  --workload-scale "random=$(mul 0.5 "$S")" --workload-len-scale "random=$(mul 0.5 "$L")"
  --out "$OUT" --no-progress ${SUITE_ARGS:-}
)

{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null ||
    echo "no nvidia-smi"
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/gpu_info.txt"

# One process per variant: each starts with a clean GPU (no leftovers from the previous engine).
# Per-process limits (seconds), overridable when the suite shares a device call with other work.
T_RADIX="${T_RADIX:-190}"; T_NOCACHE="${T_NOCACHE:-190}"; T_HF="${T_HF:-110}"
# ONLY="hf" (or "radix nocache", ...) runs just those processes, adding to the runs in $OUT.
want() { [[ " ${ONLY:-radix nocache hf} " == *" $1 "* ]]; }
want radix && timeout -k 10 "$T_RADIX" "$PY" bench/run_bench.py "${COMMON[@]}" --variants radix --tag radix \
  --deadline-s $((T_RADIX - 40)) 2>&1 | tee "$OUT/radix.log"
want nocache && timeout -k 10 "$T_NOCACHE" "$PY" bench/run_bench.py "${COMMON[@]}" --variants nocache --tag nocache \
  --deadline-s $((T_NOCACHE - 40)) 2>&1 | tee "$OUT/nocache.log"
want hf && timeout -k 10 "$T_HF" "$PY" bench/run_bench.py "${COMMON[@]}" --variants hf --tag hf \
  --hf-batch-size 32 --hf-max-requests 64 --deadline-s $((T_HF - 30)) 2>&1 | tee "$OUT/hf.log"
# ONLY=online: the same workloads through the HTTP server (router + worker processes, token ids
# over /generate), results in $OUT/online. Needs the serve wheels (../shared/device/wheels.sh serve).
if [[ " ${ONLY:-} " == *" online "* ]]; then
  PORT="${PORT:-30123}"
  mkdir -p "$OUT/online"
  "$PY" -m radixrt.serve --model "${MODEL:-llama3-8b}" --load-format dummy --device "${DEVICE:-cuda}" \
    --dtype "${DTYPE:-bfloat16}" --kv-cache-tokens "${KV_TOKENS:-262144}" --max-running-requests 256 \
    --page-size 16 --port "$PORT" > "$OUT/server.log" 2>&1 &
  SERVER=$!
  "$PY" - "$PORT" <<'PYEOF'
import json, sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(300):
    try:
        urllib.request.urlopen(url + "/health", timeout=2)
        break
    except OSError:
        time.sleep(1)
body = json.dumps({"input_ids": list(range(10, 600)), "sampling_params": {"max_new_tokens": 8}})
req = urllib.request.Request(url + "/generate", body.encode(), {"Content-Type": "application/json"})
print("server warm-up:", urllib.request.urlopen(req, timeout=300).status, flush=True)
PYEOF
  timeout -k 10 "${T_ONLINE:-240}" "$PY" bench/run_bench.py "${COMMON[@]}" --out "$OUT/online" --mode online \
    --url "http://127.0.0.1:$PORT" --tag online --deadline-s $((${T_ONLINE:-240} - 40)) 2>&1 | tee "$OUT/online.log"
  kill "$SERVER"; wait "$SERVER" 2>/dev/null
  "$PY" bench/run_bench.py --report-only --out "$OUT/online" 2>&1 | tail -30
fi
"$PY" bench/run_bench.py --report-only --out "$OUT" 2>&1 | tee "$OUT/report.log"
ls -la "$OUT"
