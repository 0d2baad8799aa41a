OUTDIR=$OUT; . .snap/lib.sh
TAIL=12 step ktest 200 'python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_skinny_gemm.py tests/engine/test_piecewise_graph.py tests/engine/test_engine_gpu.py tests/kernels/test_rope.py tests/kernels/test_store_kv.py 2>&1 | tail -12'
TAIL=40 step gemm 170 'python3 bench/gemm_probe.py --out $RES --no-triton --m 16,32,64,128,256 --budget-s 140 2>&1 | grep -v "^  "'
S='SCALE=0.5 ONLY=radix WORKLOADS=chat T_RADIX=100'
pick='grep -h "time / floor\|chat/radix\|random/radix\|piecewise graphs\|compiles\|busy" $RES/radix.log | grep -v "^|"'
TAIL=10 step pw2 110 "$S SUITE_ARGS='--profile' OUT=\$RES bash bench/gpu_suite.sh >/dev/null 2>&1; $pick"
