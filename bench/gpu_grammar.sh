#!/usr/bin/env bash
# Structured generation on a GPU (issue 14), one device call: the token-bitmask kernel tests
# compiled on CUDA, then bench_grammar.py: 256 JSON-schema-constrained vs unconstrained decode
# steps on the llama3-8b shape (dummy weights; target <= 1.1x), the CPU mask fill per step on
# that box, and compile times; the host ms per step by part (plan, build, launch, complete, grammar
# advance, mask rows/start/wait, draw) for both modes on the GPU, with the syncs of the timed
# constrained steps counted (torch.cuda.set_sync_debug_mode("warn")), and the same breakdown on
# the CPU with a stub forward (host section). Results under $OUT (grammar.json, *.log).
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
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_token_bitmask.py 2>&1 \
  | tee "$OUT/kernel_tests.log" | tail -3
timeout 420 python3 bench/bench_grammar.py --sections gpu,host,masks,compile --tokenizer "${TOKENIZER:-.whl/tok}" \
  --batch "${BATCH:-256}" --steps "${STEPS:-50}" --device "${DEVICE:-cuda}" --preset "${PRESET:-llama3-8b}" --out "$OUT" 2>&1 | grep -v Warning | tee "$OUT/bench_grammar.log" | tail -45
