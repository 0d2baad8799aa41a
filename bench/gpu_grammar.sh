#!/usr/bin/env bash
# Structured generation on a GPU (issue 14), one device call: the token-bitmask kernel tests
# compiled on CUDA, then bench_grammar.py: 256 JSON-schema-constrained vs unconstrained decode
# steps on the llama3-8b shape (dummy weights; target <= 1.1x), swept over the grammar path and
# fill threads (CONFIGS: fused = advance + fill together on persistent fill threads, unfused = the
# old path: advance on the scheduler thread, xgrammar's pool fills); per config the scheduler
# thread's ms per step by part as wall/cpu (wall >> cpu: it waited) and the fill threads' advance
# + fill ms, with the syncs of the timed constrained steps counted; the same sweep on the CPU
# with a stub forward (host section) and for the bare advance + fill of 256 matchers (masks);
# compile times. A config "@ms" sets the GIL switch interval the fused path uses
# (RADIXRT_GRAMMAR_SWITCH_INTERVAL_MS; default 0.5 ms; fused:default@5 = CPython's 5 ms);
# "fused-ready" starts a step's early grammar advance only if its tokens are on the host at the
# start of the next step (RADIXRT_GRAMMAR_WAIT_TOKENS=0), "fused" has the fill threads wait for
# them; "fused-copies" gives each fill thread's matchers a private copy of the grammar
# (RADIXRT_GRAMMAR_SHARD_COPIES=1); "proc" moves the advance + fill into the grammar process
# (RADIXRT_GRAMMAR_PROCESS=1, radixrt/constrained/proc_masks.py; proc:N = N xgrammar fill threads
# there; "proc-nice10" runs it at nice 10, RADIXRT_GRAMMAR_PROCESS_NICE; "proc-late" starts a step's
# masks only once the tokens ahead are counted, RADIXRT_GRAMMAR_FILL_AHEAD=0). The unconstrained
# baseline runs first and last; ratios use the faster of the two.
# Results under $OUT (grammar.json, bench_grammar.log; probe_accept.log: bench/probe_accept_threads.py,
# PROBE=0 skips it; kernel_tests.log, KERNEL_TESTS=0 skips them). Order: bench, probe, tests. Short run: KERNEL_TESTS=0 SECTIONS=gpu
# BENCH_TIMEOUT=150 STEPS=40 CONFIGS=... (see .coord/final_grammar_cmd).
# GIL_PROBE=1 adds a run of the unfused path with tvm-ffi's GIL release off
# (TVM_FFI_RELEASE_GIL_BY_DEFAULT=0, $OUT/gil_probe/): if its "grammar advance" drops to the bare
# advance time, the old path's wait was GIL hand-offs on xgrammar's per-call GIL release.
#
# Dry run on a CPU box: DEVICE=cpu PRESET=llama-tiny BATCH=8 STEPS=5 PATH=.venv/bin:$PATH bash bench/gpu_grammar.sh
# Before the call, on the CPU side (once):  bash bench/gpu_grammar.sh --prepare
#   puts the cp312 wheels of xgrammar + apache-tvm-ffi into .whl/ and the default model's
#   tokenizer into .whl/tok/ (the dummy 8B model has none; its masks are computed over this
#   49k vocabulary padded to 128k). Then carry .whl and run:  PYTHONUNBUFFERED=1 bash bench/gpu_grammar.sh
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--prepare" ]; then
  mkdir -p .whl/tok
  grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  rm -f .whl/xgrammar-*.whl .whl/apache_tvm_ffi-*.whl
  .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2
  tok="$(.venv/bin/python -c 'from radixrt.models.default import default_model_path as p; print(p())')"
  cp "$tok"/tokenizer.json "$tok"/tokenizer_config.json .whl/tok/
  ls -la .whl/tok .whl/xgrammar-*.whl .whl/apache_tvm_ffi-*.whl
  exit 0
fi
OUT="${OUT:-bench/results/gpu_grammar}"
mkdir -p "$OUT"
unset TRITON_INTERPRET
. bench/carried_wheels.sh && use_carried_wheels
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import xgrammar, msgspec" || { echo "xgrammar/msgspec missing: run bash bench/gpu_grammar.sh --prepare and carry .whl"; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 | tee "$OUT/gpu.txt"
# The host's topology: fill threads on hyperthread siblings slow each other down.
lscpu 2>/dev/null | grep -E '^(CPU\(s\)|Thread|Core|Socket|NUMA node\(s\)|Model name)' | tee -a "$OUT/gpu.txt"
CONFIGS="${CONFIGS:-fused-ready:default,fused:default,fused:2,fused:3,fused:6,fused-copies:default,fused:default@0.2,fused:4}"
nproc | sed 's/^/cores: /' | tee -a "$OUT/gpu.txt"
timeout "${BENCH_TIMEOUT:-450}" python3 bench/bench_grammar.py --sections "${SECTIONS:-gpu,host,masks,compile}" --tokenizer "${TOKENIZER:-.whl/tok}" \
  --batch "${BATCH:-256}" --steps "${STEPS:-50}" --device "${DEVICE:-cuda}" --preset "${PRESET:-llama3-8b}" \
  --grammar-configs "$CONFIGS" --repeats "${REPEATS:-1}" --out "$OUT" 2>&1 | grep -v Warning | tee "$OUT/bench_grammar.log" | tail -80
echo "bench done at ${SECONDS}s"
if [ "${PROBE:-1}" = 1 ]; then
  # Do batch accepts slow down on several threads here (summed CPU growing with threads)?
  timeout "${PROBE_TIMEOUT:-60}" python3 bench/probe_accept_threads.py --tokenizer "${TOKENIZER:-.whl/tok}" \
    --threads 1,2,4,8 2>&1 | grep -v Warning | tee "$OUT/probe_accept.log"
  echo "probe done at ${SECONDS}s"
fi
if [ "${KERNEL_TESTS:-1}" = 1 ]; then
  # The bitmask kernel, and the masks' side-stream copy (device mask == host fill).
  timeout "${TEST_TIMEOUT:-120}" python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_token_bitmask.py \
    tests/unit/test_constrained_cuda.py 2>&1 | tee "$OUT/kernel_tests.log" | tail -3
fi
echo "tests done at ${SECONDS}s"
if [ "${GIL_PROBE:-0}" = 1 ]; then
  mkdir -p "$OUT/gil_probe"
  TVM_FFI_RELEASE_GIL_BY_DEFAULT=0 timeout 240 python3 bench/bench_grammar.py --sections gpu \
    --tokenizer "${TOKENIZER:-.whl/tok}" --batch "${BATCH:-256}" --steps 30 --device "${DEVICE:-cuda}" \
    --preset "${PRESET:-llama3-8b}" --grammar-configs unfused:default,fused:1 --out "$OUT/gil_probe" 2>&1 \
    | grep -v Warning | tee "$OUT/gil_probe/bench_grammar.log" | tail -30
fi
