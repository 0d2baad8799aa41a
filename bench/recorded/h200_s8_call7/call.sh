OUTDIR=$OUT; . .snap/lib.sh
TAIL=6 step mixed 60 'python3 bench/mixed_split_probe.py --out $RES 2>&1 | grep " dec "'
TAIL=6 step gtest 120 'python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/kernels/test_triton_backend.py tests/engine/test_piecewise_graph.py tests/engine/test_engine_gpu.py -k "not deterministic" 2>&1 | tail -4'
pick='grep -h "time / floor\|/radix\] \|compiles" $RES/radix.log | grep -v "^|"'
TAIL=14 step all2 100 "SCALE=0.5 ONLY=radix T_RADIX=95 OUT=\$RES bash bench/gpu_suite.sh >/dev/null 2>&1; $pick"
