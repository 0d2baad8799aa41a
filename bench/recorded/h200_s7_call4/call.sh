OUTDIR=$OUT; . .snap/lib.sh
mkdir -p /tmp/old && tar xf .snap/old.tar -C /tmp/old
TAIL=8 step ktests 110 'python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/kernels/test_extend_newkv.py tests/kernels/test_extend_attention.py -k "real or 8b or reuse or page_runs" 2>&1 | tail -6'
TAIL=5 step etests 90 'python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/engine/test_engine_gpu.py -k "llama and cuda_greedy" 2>&1 | tail -3'
S='SCALE=0.5 ONLY=radix WORKLOADS=chat,random T_RADIX=110'
pick='grep -h "time / floor\|chat/radix\|random/radix" $RES/radix.log | grep -v "^|"'
TAIL=8 step new1 120 "$S OUT=\$RES bash bench/gpu_suite.sh >/dev/null 2>&1; $pick"
TAIL=8 step old1 120 "cd /tmp/old && $S OUT=\$RES bash bench/gpu_suite.sh >/dev/null 2>&1; $pick"
TAIL=8 step new2 120 "$S OUT=\$RES bash bench/gpu_suite.sh >/dev/null 2>&1; $pick"
