OUTDIR=$OUT; . .snap/lib.sh
pick='grep -h "time / floor\|/radix\] \|piecewise graphs\|decode graphs\|compiles\|wall s" $RES/radix.log $RES/summary-radix.md 2>/dev/null | grep -v "^|"'
TAIL=20 step all1 240 "SCALE=0.5 ONLY=radix T_RADIX=230 OUT=\$RES bash bench/gpu_suite.sh >/dev/null 2>&1; $pick"
TAIL=10 step ptest 150 'python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/engine/test_piecewise_graph.py tests/engine/test_engine_gpu.py -k "piecewise or (llama and cuda_greedy)" 2>&1 | tail -6'
d='python3 bench/bench_engine.py --out $RES --sections ceilings,decode 2>&1 | grep "^decode "'
TAIL=3 step dec 90 "$d"
C='SCALE=0.5 ONLY=radix WORKLOADS=chat,random T_RADIX=90'
TAIL=8 step cr2 95 "$C OUT=\$RES bash bench/gpu_suite.sh >/dev/null 2>&1; $pick"
