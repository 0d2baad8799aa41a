OUTDIR=$OUT; . .snap/lib.sh
pick='grep -h "time / floor\|/radix\] \|piecewise graphs\|decode graphs\|wall s" $RES/radix.log $RES/summary-radix.md 2>/dev/null | grep -v "^|"'
d='python3 bench/bench_engine.py --out $RES --sections ceilings,decode 2>&1 | grep "^decode "'
TAIL=3 step dec 70 "$d"
mv radixrt radixrt.new && cp -r .snap/old/radixrt radixrt && cp radixrt.new/cache/*.so radixrt/cache/ 2>/dev/null
TAIL=3 step dec_old 80 "$d"
rm -rf radixrt && mv radixrt.new radixrt
TAIL=3 step dec2 50 "$d"
TAIL=6 step gtest 110 'python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/kernels/test_decode_attention.py tests/kernels/test_triton_backend.py tests/unit/test_decode_splits.py > $RES/pytest.txt 2>&1; tail -4 $RES/pytest.txt'
TAIL=6 step gcascade 110 'python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/kernels/test_cascade_decode.py > $RES/pytest.txt 2>&1; tail -4 $RES/pytest.txt'
TAIL=8 step rc 90 "SCALE=0.5 ONLY=radix WORKLOADS=chat,random T_RADIX=85 OUT=\$RES bash bench/gpu_suite.sh >/dev/null 2>&1; $pick"
