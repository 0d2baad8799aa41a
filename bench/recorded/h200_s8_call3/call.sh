OUTDIR=$OUT; . .snap/lib.sh
pick='grep -h "time / floor\|/radix\] \|piecewise graphs\|compiles" $RES/radix.log | grep -v "^|"'
TAIL=16 step all1 230 "SCALE=0.5 ONLY=radix T_RADIX=220 OUT=\$RES bash bench/gpu_suite.sh >/dev/null 2>&1; $pick"
S='SCALE=0.5 ONLY=radix WORKLOADS=chat,random T_RADIX=110'
TAIL=8 step pw3 120 "$S OUT=\$RES bash bench/gpu_suite.sh >/dev/null 2>&1; $pick"
TAIL=8 step off3 120 "$S SUITE_ARGS='--piecewise-max-tokens 0' OUT=\$RES bash bench/gpu_suite.sh >/dev/null 2>&1; $pick"
d='python3 bench/bench_engine.py --out $RES --sections ceilings,decode 2>&1 | grep "^decode "'
TAIL=3 step dec3 60 "$d"
