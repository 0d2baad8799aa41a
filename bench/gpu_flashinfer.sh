#!/usr/bin/env bash
# On the GPU machine, from the repo root: install the FlashInfer wheels carried in .whl_fi/
# (flashinfer-python 0.6.18.post1, JIT-only, + apache-tvm-ffi) into /tmp/fi_site, import
# flashinfer, run the gpu-marked FlashInfer backend tests (prefill vs the torch reference; decode
# eager and CUDA-graph replay, and cascade, vs our Triton decode), then the kernel bench
# bench/bench_flashinfer_cascade.py (Triton per-request / Triton cascade / FlashInfer decode /
# FlashInfer cascade at batch 256, 16x16 and 64x4 groups) -> $OUT/fi/fi_cascade.json.
# Usage (carry .whl_fi and .whl):
#   bash bench/gpu_flashinfer.sh        # log also goes to $OUT/flashinfer.log when OUT is set
# The wheels hold no kernels: the first plan() JIT-compiles them with the machine's nvcc into
# /tmp/fi_ws. Expect ~1-3 min on 16 cores for the modules the tests need (FA3 sm90a prefill,
# FA2 tensor-core decode, which the cascade's shared pass reuses, and the merge kernel); a
# rerun on the same warm machine reuses the cache (seconds).
# Make .whl_fi on the CPU side, from the repo root (21 MB; later releases exceed what a call
# may carry):
#   echo /.whl_fi/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 -d .whl_fi \
#     flashinfer-python==0.6.18.post1 apache-tvm-ffi==0.1.13.post3
# FI_TESTS=0 skips the tests, FI_KERNEL_BENCH=0 the kernel bench; FI_PREFILL_PROBE=1 runs
# bench/fi_prefill_probe.py (paged prefill: FA3 / FA2 vs Triton); FI_CMD runs a command in this
# environment (e.g. the suite with --prefill-attention flashinfer); FI_BENCH=1 also times the engine on FlashInfer
# (bench_engine.py; needs the engine's wheels). FI_TIMEOUT / FI_KBENCH_TIMEOUT: timeouts, s.
# Each step reports its own failure; the script always exits 0.
cd "$(dirname "$0")/.." || exit 0
LOG=/dev/null
[ -n "${OUT:-}" ] && mkdir -p "$OUT" && LOG="$OUT/flashinfer.log"
exec > >(tee -a "$LOG") 2>&1
say() { echo "== gpu_flashinfer: $*"; }

say "install .whl_fi/*.whl -> /tmp/fi_site"
if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/fi_site .whl_fi/*.whl; then
  say "FAILED: wheel install (is .whl_fi in carry?)"; exit 0
fi
export PYTHONPATH="/tmp/fi_site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The engine itself needs msgspec / pyzmq (.whl, carried too).
. bench/carried_wheels.sh && use_carried_wheels
# .whl may carry a newer apache-tvm-ffi (xgrammar's): flashinfer gets the one pinned beside it.
export PYTHONPATH="/tmp/fi_site:$PYTHONPATH"
export FLASHINFER_CUDA_ARCH_LIST="9.0" MAX_JOBS="${MAX_JOBS:-$(nproc)}"   # 9.0 -> sm_90a
export FLASHINFER_WORKSPACE_BASE=/tmp/fi_ws TVM_FFI_CACHE_DIR=/tmp/fi_ws/tvm-ffi
unset TRITON_INTERPRET
export PATH="$PATH:/sbin:/usr/sbin"   # ldconfig
if [ -z "${CUDA_HOME:-}" ]; then   # FlashInfer's own guess (dirname of `which nvcc`) breaks on symlinks
  if [ -x /usr/local/cuda/bin/nvcc ]; then CUDA_HOME=/usr/local/cuda
  else CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"; fi
fi
export CUDA_HOME; NVCC="$CUDA_HOME/bin/nvcc"
say "CUDA_HOME=$CUDA_HOME MAX_JOBS=$MAX_JOBS; $("$NVCC" --version 2>&1 | grep release || echo 'nvcc NOT FOUND')"

# FA3 (sm90) sources include <curand_kernel.h>; take it from pip's nvidia-curand if the CTK lacks it.
if [ ! -f "$CUDA_HOME/include/curand_kernel.h" ]; then
  h="$(python3 -c 'import glob,site,sys; print(next((h for p in site.getsitepackages()+sys.path for h in glob.glob(p+"/nvidia/*/include/curand_kernel.h")), ""))' 2>/dev/null)"
  if [ -n "$h" ]; then
    mkdir -p /tmp/fi_inc && ln -sf "$(dirname "$h")"/curand*.h /tmp/fi_inc/
    export FLASHINFER_EXTRA_CUDAFLAGS="-isystem /tmp/fi_inc"; say "curand headers from $(dirname "$h")"
  else say "WARNING: curand_kernel.h not found; the FA3 prefill build will fail"; fi
fi
# The JIT links with -lcuda; give ld a libcuda.so if neither the CTK stubs nor ldconfig have one.
if ! ls "$CUDA_HOME"/lib64/stubs/libcuda.so "$CUDA_HOME"/lib64/libcuda.so >/dev/null 2>&1 \
   && ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so '; then
  lib="$(ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 /{print $NF; exit}')"
  [ -z "$lib" ] && lib="$(ls /usr/local/nvidia/lib64/libcuda.so.1 /usr/lib/x86_64-linux-gnu/libcuda.so.1 \
    /usr/lib64/libcuda.so.1 "$CUDA_HOME"/targets/*/lib/stubs/libcuda.so 2>/dev/null | head -1)"
  if [ -n "$lib" ]; then
    mkdir -p /tmp/fi_lib && ln -sf "$lib" /tmp/fi_lib/libcuda.so
    export FLASHINFER_EXTRA_LDFLAGS="-L/tmp/fi_lib"; say "linking -lcuda against $lib"
  else say "WARNING: no libcuda.so found for the JIT link step"; fi
fi

say "import flashinfer"
if ! python3 -c 'import torch, flashinfer, tvm_ffi; print("flashinfer", flashinfer.__version__, "tvm_ffi", tvm_ffi.__version__, "torch", torch.__version__, torch.version.cuda)'; then
  say "FAILED: import flashinfer"; exit 0
fi

rc=0
if [ "${FI_TESTS:-1}" = 1 ]; then
  say "pytest (first run JIT-compiles; timeout ${FI_TIMEOUT:-240}s)"
  start=$SECONDS
  timeout "${FI_TIMEOUT:-240}" python3 -m pytest -q -rs -m gpu -p no:cacheprovider tests/unit/test_flashinfer_backend.py
  rc=$?
  say "pytest rc=$rc in $((SECONDS - start))s$([ $rc -eq 124 ] && echo ' (TIMED OUT: rerun on the warm machine resumes the JIT from /tmp/fi_ws)')"
fi
if [ "${FI_KERNEL_BENCH:-1}" = 1 ]; then
  # FI_KBENCH_ARGS: extra arguments (e.g. --shared-backends fa2 to skip compiling FA3).
  say "bench_flashinfer_cascade.py ${FI_KBENCH_ARGS:-} (timeout ${FI_KBENCH_TIMEOUT:-150}s; JIT-compiles on a fresh machine)"
  start=$SECONDS
  # shellcheck disable=SC2086
  timeout "${FI_KBENCH_TIMEOUT:-150}" python3 bench/bench_flashinfer_cascade.py --out "${OUT:-/tmp}/fi" ${FI_KBENCH_ARGS:-}
  say "kernel bench rc=$? in $((SECONDS - start))s"
fi
# FI_BUDGET_S: the engine bench starts only if this many seconds of the call remain after it
# (it gets what is left, minus 10 s).
if [ "${FI_PREFILL_PROBE:-0}" = 1 ]; then
  say "fi_prefill_probe.py (FA3 / FA2 paged prefill vs the Triton extend kernel; timeout ${FI_PROBE_TIMEOUT:-300}s)"
  start=$SECONDS
  timeout "${FI_PROBE_TIMEOUT:-300}" python3 bench/fi_prefill_probe.py --out "${OUT:-/tmp}/fi"
  say "prefill probe rc=$? in $((SECONDS - start))s"
fi
if [ -n "${FI_CMD:-}" ]; then   # any command, in this script's FlashInfer environment
  say "FI_CMD: $FI_CMD"
  bash -c "$FI_CMD"
  say "FI_CMD rc=$?"
fi
left=$(( ${FI_BUDGET_S:-290} - SECONDS ))
if [ "${FI_BENCH:-0}" = 1 ] && [ $rc -eq 0 ] && [ $left -gt 60 ] \
   && python3 -c 'import sortedcontainers' 2>/dev/null; then
  say "bench_engine.py --attention-backend flashinfer --sections ${FI_BENCH_SECTIONS:-ceilings,decode} (CUDA graphs; ${left}s left)"
  timeout $(( left - 10 )) python3 bench/bench_engine.py --attention-backend flashinfer \
    --sections "${FI_BENCH_SECTIONS:-ceilings,decode}" --out "${OUT:-/tmp}/fi" 2>&1 | grep -v "generate:" | tail -25
elif [ "${FI_BENCH:-0}" = 1 ]; then
  say "engine bench skipped (tests rc=$rc, ${left}s left, or sortedcontainers missing)"
fi
jl="$(ls /tmp/fi_ws/.cache/flashinfer/flashinfer_jit.log 2>/dev/null)"
[ -n "$jl" ] && [ -n "${OUT:-}" ] && cp "$jl" "$OUT/flashinfer_jit.log"
exit 0
