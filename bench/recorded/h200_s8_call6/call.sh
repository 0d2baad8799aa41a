OUTDIR=$OUT; . .snap/lib.sh
TAIL=40 step split 150 'python3 bench/decode_split_probe.py --out $RES --batches 256,32 --ctxs 1024,384 --min-lens 256,512 2>&1 | grep "^B="'
