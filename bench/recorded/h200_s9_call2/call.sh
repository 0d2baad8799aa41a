OUTDIR=$OUT; . .snap/lib.sh
swap_old() { mv radixrt radixrt.new && cp -r .snap/old/radixrt radixrt; }
swap_new() { rm -rf radixrt && mv radixrt.new radixrt; }
TAIL=4 step utest 60 'python3 -m pytest -q -p no:cacheprovider tests/unit/test_decode_splits.py 2>&1 | tail -3'
TAIL=10 step gtest 200 'python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_triton_backend.py tests/kernels/test_decode_attention.py tests/engine/test_piecewise_graph.py tests/engine/test_cascade_engine.py 2>&1 | tail -8; python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/engine/test_engine_gpu.py -k "llama and cuda_greedy" 2>&1 | tail -4'
d='python3 bench/bench_engine.py --out $RES --sections ceilings,decode 2>&1 | grep "^decode "'
TAIL=3 step dec_new 90 "$d"
swap_old
TAIL=3 step dec_old 90 "$d"
swap_new
TAIL=3 step dec_new2 90 "$d"
pick='grep -h "time / floor\|/radix\] \|piecewise graphs\|compiles" $RES/radix.log | grep -v "^|"'
R='SCALE=0.5 ONLY=radix WORKLOADS=random,chat T_RADIX=90'
TAIL=6 step rc_new 95 "$R OUT=\$RES bash bench/gpu_suite.sh >/dev/null 2>&1; $pick"
swap_old
TAIL=6 step rc_old 95 "$R OUT=\$RES bash bench/gpu_suite.sh >/dev/null 2>&1; $pick"
swap_new
sed -i 's|size += max(32, (1 << (size.bit_length() - 1)) // 8)|size += 16|' radixrt/engine/piecewise_graph.py
grep -n "size += " radixrt/engine/piecewise_graph.py
C='SCALE=0.5 ONLY=radix WORKLOADS=chat T_RADIX=80'
TAIL=6 step chat_fine 85 "$C OUT=\$RES bash bench/gpu_suite.sh >/dev/null 2>&1; $pick"
TAIL=6 step chat_fine2 85 "$C OUT=\$RES bash bench/gpu_suite.sh >/dev/null 2>&1; $pick"
