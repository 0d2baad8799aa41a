OUTDIR=$OUT; . .snap/lib.sh
TAIL=30 step fip 520 'FI_TESTS=0 FI_KERNEL_BENCH=0 FI_PREFILL_PROBE=1 FI_PROBE_TIMEOUT=480 OUT=$RES bash bench/gpu_flashinfer.sh'
