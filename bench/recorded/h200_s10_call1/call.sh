OUTDIR=$OUT; . .snap/lib.sh
pick='grep -h "time / floor\|/radix\] \|piecewise graphs\|decode graphs\|compiles\|wall s" $RES/radix.log $RES/summary-radix.md 2>/dev/null | grep -v "^|"'
TAIL=12 step probe 170 'python3 bench/decode_tile_probe.py --out $RES 2>&1 | grep -v "^B=.*Error" | grep "two-stage\|rror"'
TAIL=8 step rnew 110 "SCALE=0.5 ONLY=radix WORKLOADS=random T_RADIX=100 OUT=\$RES bash bench/gpu_suite.sh >/dev/null 2>&1; $pick"
d='python3 bench/bench_engine.py --out $RES --sections ceilings,decode 2>&1 | grep "^decode "'
TAIL=3 step dec 90 "$d"
mv radixrt radixrt.new && cp -r .snap/old/radixrt radixrt && cp radixrt.new/cache/*.so radixrt/cache/ 2>/dev/null
TAIL=8 step rold 95 "SCALE=0.5 ONLY=radix WORKLOADS=random T_RADIX=90 OUT=\$RES bash bench/gpu_suite.sh >/dev/null 2>&1; $pick"
rm -rf radixrt && mv radixrt.new radixrt
