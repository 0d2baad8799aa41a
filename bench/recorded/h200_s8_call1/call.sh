OUTDIR=$OUT; . .snap/lib.sh
TAIL=12 step ptest 150 'python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/engine/test_piecewise_graph.py tests/engine/test_engine_gpu.py -k "piecewise or (llama and cuda_greedy)" 2>&1 | tail -12'
S='SCALE=0.5 ONLY=radix WORKLOADS=chat,random T_RADIX=120'
pick='grep -h "time / floor\|chat/radix\|random/radix\|piecewise graphs\|compiles" $RES/radix.log | grep -v "^|"'
TAIL=8 step pw1 130 "$S OUT=\$RES bash bench/gpu_suite.sh >/dev/null 2>&1; $pick"
TAIL=8 step off1 130 "$S SUITE_ARGS='--piecewise-max-tokens 0' OUT=\$RES bash bench/gpu_suite.sh >/dev/null 2>&1; $pick"
d='python3 bench/bench_engine.py --out $RES --sections ceilings,decode 2>&1 | grep "^decode "'
TAIL=3 step dec1 100 "$d"
