OUTDIR=$OUT; . .snap/lib.sh
TAIL=8 step cold 300 'python3 bench/bench_prefill.py engine --out $RES --lens 32768,32768,120000,120000 --old-lens "" --paged-lens "" 2>&1 | grep -v Warning | grep "cold prefill\|rror"'
