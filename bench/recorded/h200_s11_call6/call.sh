OUTDIR=$OUT; . .snap/lib.sh
TAIL=40 step prof32 200 'python3 bench/profile_prefill.py --out $RES --len 32768 2>&1 | grep -v Warning'
