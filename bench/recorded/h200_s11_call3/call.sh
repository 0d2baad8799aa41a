OUTDIR=$OUT; . .snap/lib.sh
pick='grep -h "time / floor\|/radix\] \|piecewise graphs\|decode graphs\|wall s\|compiles" $RES/radix.log $RES/summary-radix.md 2>/dev/null | grep -v "^|"'
TAIL=12 step fitest 200 'FI_TESTS=0 FI_KERNEL_BENCH=0 FI_CMD="python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/kernels/test_triton_backend.py > \$RES/pytest.txt 2>&1; tail -5 \$RES/pytest.txt" bash bench/gpu_flashinfer.sh'
TAIL=14 step fisuite 200 "FI_TESTS=0 FI_KERNEL_BENCH=0 FI_CMD='SCALE=0.5 ONLY=radix WORKLOADS=chat,rag,fewshot T_RADIX=190 SUITE_ARGS=\"--prefill-attention flashinfer\" OUT=\$RES bash bench/gpu_suite.sh >/dev/null 2>&1; $pick' bash bench/gpu_flashinfer.sh"
TAIL=10 step trsuite 130 "SCALE=0.5 ONLY=radix WORKLOADS=chat,rag,fewshot T_RADIX=125 OUT=\$RES bash bench/gpu_suite.sh >/dev/null 2>&1; $pick"
