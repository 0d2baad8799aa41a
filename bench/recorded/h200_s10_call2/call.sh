OUTDIR=$OUT; . .snap/lib.sh
pick='grep -h "time / floor\|/radix\] \|piecewise graphs\|decode graphs\|wall s" $RES/radix.log $RES/summary-radix.md 2>/dev/null | grep -v "^|"'
TAIL=6 step gtest 120 'python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/kernels/test_decode_attention.py tests/kernels/test_triton_backend.py tests/unit/test_decode_splits.py 2>&1 | tail -4'
TAIL=10 step probe 90 'python3 bench/decode_tile_probe.py --out $RES --shapes 4x512,8x512,8x1024,16x512,32x1024,96x512,128x1024,192x1024 --settings 64/4/3,32/2/3,32/2/2,128/4/3 2>&1 | grep "two-stage\|rror"'
TAIL=10 step rnew 120 "SCALE=0.5 ONLY=radix WORKLOADS=chat,random T_RADIX=110 OUT=\$RES bash bench/gpu_suite.sh >/dev/null 2>&1; $pick"
d='python3 bench/bench_engine.py --out $RES --sections ceilings,decode 2>&1 | grep "^decode "'
TAIL=3 step dec 70 "$d"
mv radixrt radixrt.new && cp -r .snap/old/radixrt radixrt && cp radixrt.new/cache/*.so radixrt/cache/ 2>/dev/null
TAIL=10 step rold 100 "SCALE=0.5 ONLY=radix WORKLOADS=chat,random T_RADIX=95 OUT=\$RES bash bench/gpu_suite.sh >/dev/null 2>&1; $pick"
rm -rf radixrt && mv radixrt.new radixrt
