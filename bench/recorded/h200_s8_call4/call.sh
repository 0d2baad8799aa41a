OUTDIR=$OUT; . .snap/lib.sh
TAIL=40 step split 150 'python3 bench/decode_split_probe.py --out $RES --batches 16,64 --ctxs 256,512 2>&1 | grep "^B="'
TAIL=10 step gtest 200 'python3 -m pytest -q -m gpu -p no:cacheprovider tests/engine/test_cascade_engine.py tests/kernels/test_triton_backend.py tests/kernels/test_decode_attention.py 2>&1 | tail -8'
