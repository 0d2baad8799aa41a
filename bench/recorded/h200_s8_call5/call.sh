OUTDIR=$OUT; . .snap/lib.sh
TAIL=60 step split 200 'python3 bench/decode_split_probe.py --out $RES --batches 16,64,128 --ctxs 256,512 2>&1 | grep "^B="'
