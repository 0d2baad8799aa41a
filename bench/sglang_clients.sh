#!/usr/bin/env bash
# SGLang's own benchmark client (sglang.bench_serving) against `radixrt serve` on the default
# model: --backend sglang, vllm and sglang-oai-chat, datasets random and
# generated-shared-prefix, small sizes, --flush-cache on every run (that is /flush_cache for
# sglang and /reset_prefix_cache for vllm). Checks that the clients run unchanged against
# radixrt, not speed: on a 2-core CPU box the numbers are only a smoke reading.
#
#   bash bench/sglang_clients.sh            # results under bench/results/sglang_clients/
#
# Env: SGL_VENV (throwaway venv, default /tmp/sglvenv: never inside the repo), SGL_VERSION
# (0.5.23), PORT (30111), NUM_PROMPTS (4), OUT (results dir), RADIXRT (the radixrt command),
# SERVER_ARGS (extra `radixrt serve` arguments).
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
SGL_VENV=${SGL_VENV:-/tmp/sglvenv}
SGL_VERSION=${SGL_VERSION:-0.5.23}
PORT=${PORT:-30111}
NUM=${NUM_PROMPTS:-4}
OUT=${OUT:-$REPO/bench/results/sglang_clients}
RADIXRT=${RADIXRT:-$REPO/.venv/bin/radixrt}
PY=$SGL_VENV/bin/python
mkdir -p "$OUT"

case "$SGL_VENV" in "$REPO"/*) echo "SGL_VENV must be outside the repo" >&2; exit 2;; esac

# 1. SGLang without its server dependencies, plus what bench_serving's import chain needs on
#    a CPU box (found by trying: it imports parts of sglang.srt at module level).
if ! "$PY" -m sglang.bench_serving --help >/dev/null 2>&1; then
    [ -x "$PY" ] || python3 -m venv "$SGL_VENV"
    "$PY" -m pip install -q --no-deps "sglang==$SGL_VERSION" || exit 1
    "$PY" -m pip install -q numpy orjson psutil pybase64 requests packaging pillow starlette \
        msgspec pydantic pyzmq tqdm ipython aiohttp transformers datasets torch torchvision \
        apache-tvm-ffi sentencepiece compressed-tensors gguf || exit 1
    if ! "$PY" -m sglang.bench_serving --help >"$OUT/import_error.log" 2>&1; then
        echo "sglang.bench_serving does not import on this machine:" >&2
        grep -E "Error" "$OUT/import_error.log" | tail -3 >&2
        exit 1
    fi
fi

# 2. The server, on the default model.
MODEL_DIR=$("$REPO/.venv/bin/python" -c \
    "from radixrt.models.default import default_model_path; print(default_model_path())")
"$RADIXRT" serve --port "$PORT" ${SERVER_ARGS:-} >"$OUT/server.log" 2>&1 &
SERVER_PID=$!
trap 'kill "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null' EXIT
for _ in $(seq 1 180); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "server exited:" >&2; tail -20 "$OUT/server.log" >&2; exit 1; }
    sleep 1
done

# 3. "random" samples token ids from a ShareGPT-format file: a small local one, so nothing
#    is downloaded.
SHAREGPT="$OUT/sharegpt_local.json"
"$PY" - "$SHAREGPT" <<'EOF'
import json, random, sys
words = ("a radix tree shares common prefixes so cached pages are reused across requests "
         "the scheduler admits requests allocates pages and evicts least recently used leaves "
         "paged attention stores keys and values in fixed size pages").split()
rng = random.Random(0)
convs = [{"conversations": [
    {"from": "human", "value": " ".join(rng.choice(words) for _ in range(400))},
    {"from": "gpt", "value": " ".join(rng.choice(words) for _ in range(60))}]}
    for _ in range(64)]
json.dump(convs, open(sys.argv[1], "w"))
EOF

# 4. The matrix.
declare -A DATASET_ARGS=(
    [random]="--dataset-path $SHAREGPT --random-input-len 64 --random-output-len 8 --random-range-ratio 1.0"
    [generated-shared-prefix]="--gsp-num-groups 2 --gsp-prompts-per-group $((NUM / 2)) --gsp-system-prompt-len 128 --gsp-question-len 16 --gsp-output-len 8"
)
STATUS=0
: >"$OUT/summary.txt"
for backend in sglang vllm sglang-oai-chat; do
    for dataset in random generated-shared-prefix; do
        name="${backend}_${dataset}"
        rm -f "$OUT/$name.jsonl"
        # shellcheck disable=SC2086
        "$PY" -m sglang.bench_serving --backend "$backend" --host 127.0.0.1 --port "$PORT" \
            --model "$MODEL_DIR" --tokenizer "$MODEL_DIR" --dataset-name "$dataset" \
            --num-prompts "$NUM" ${DATASET_ARGS[$dataset]} --request-rate inf \
            --max-concurrency 4 --flush-cache --disable-tqdm --seed 1 \
            --output-file "$OUT/$name.jsonl" >"$OUT/$name.log" 2>&1
        rc=$?
        [ $rc -eq 0 ] || STATUS=1
        "$PY" - "$OUT/$name.jsonl" "$name" "$rc" "$NUM" >>"$OUT/summary.txt" <<'EOF'
import json, os, sys
path, name, rc, num = sys.argv[1:]
if rc != "0" or not os.path.exists(path):
    print(f"{name}: FAILED rc={rc} (see {name}.log)")
    sys.exit()
r = json.loads(open(path).read().splitlines()[-1])
print(f"{name}: completed={r['completed']}/{num} in_tokens={r['total_input_tokens']} "
      f"out_tokens={r['total_output_tokens']} "
      f"req_per_s={r['request_throughput']:.2f} out_tok_per_s={r['output_throughput']:.1f} "
      f"mean_ttft_ms={r['mean_ttft_ms']:.0f} median_e2e_ms={r['median_e2e_latency_ms']:.0f}")
EOF
    done
done
cat "$OUT/summary.txt"
exit $STATUS
