OUTDIR=$OUT; . .snap/lib.sh
pick='grep -h "time / floor\|/radix\] \|piecewise graphs\|decode graphs\|compiles\|wall s" $RES/radix.log $RES/summary-radix.md 2>/dev/null | grep -v "^|"'
TAIL=6 step gtest 110 'python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/kernels/test_decode_attention.py tests/kernels/test_triton_backend.py tests/unit/test_decode_splits.py tests/kernels/test_cascade_decode.py 2>&1 | tail -4'
TAIL=14 step probe 80 'python3 bench/decode_tile_probe.py --out $RES --shapes 4x512,8x512,16x512,32x512,64x512,64x1024,96x512,128x1024,192x1024,256x1024 --settings 32/2/3 2>&1 | grep "two-stage\|rror"'
TAIL=20 step all 240 "SCALE=0.5 ONLY=radix T_RADIX=230 OUT=\$RES bash bench/gpu_suite.sh >/dev/null 2>&1; $pick"
d='python3 bench/bench_engine.py --out $RES --sections ceilings,decode 2>&1 | grep "^decode "'
TAIL=3 step dec 60 "$d"
TAIL=10 step cascade_t 80 'python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/engine/test_cascade_engine.py tests/engine/test_engine_gpu.py -k "cascade or (llama and cuda_greedy)" 2>&1 | tail -4'
