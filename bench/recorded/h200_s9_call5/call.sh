OUTDIR=$OUT; . .snap/lib.sh
pick='grep -h "time / floor\|/radix\] \|decode graphs\|piecewise graphs" $RES/radix.log | grep -v "^|"'
C='SCALE=0.5 ONLY=radix WORKLOADS=chat T_RADIX=75'
TAIL=5 step c1 105 "SCALE=0.5 ONLY=radix WORKLOADS=chat T_RADIX=100 OUT=\$RES bash bench/gpu_suite.sh >/dev/null 2>&1; $pick"
TAIL=5 step c2 60 "$C OUT=\$RES bash bench/gpu_suite.sh >/dev/null 2>&1; $pick"
TAIL=5 step c3 60 "$C OUT=\$RES bash bench/gpu_suite.sh >/dev/null 2>&1; $pick"
