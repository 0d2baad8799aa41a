OUTDIR=$OUT; . .snap/lib.sh
prof='grep -h "profiled\|/radix\] " $RES/radix.log | cut -c1-600'
TAIL=12 step fiprof 280 "FI_TESTS=0 FI_KERNEL_BENCH=0 FI_CMD='SCALE=0.5 ONLY=radix WORKLOADS=chat,fewshot T_RADIX=260 SUITE_ARGS=\"--prefill-attention flashinfer --profile\" OUT=\$RES bash bench/gpu_suite.sh >/dev/null 2>&1; $prof' bash bench/gpu_flashinfer.sh"
TAIL=8 step trprof 150 "SCALE=0.5 ONLY=radix WORKLOADS=chat,fewshot T_RADIX=140 SUITE_ARGS=--profile OUT=\$RES bash bench/gpu_suite.sh >/dev/null 2>&1; $prof"
