OUTDIR=$OUT; . .snap/lib.sh
TAIL=70 step lt 300 'python3 bench/lt_gemm_probe.py --out $RES'
TAIL=45 step profile32 90 'python3 bench/profile_decode.py --out $RES --batch 32 --ctx 512 --steps 8'
