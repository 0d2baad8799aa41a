OUTDIR=$OUT; . .snap/lib.sh
TAIL=30 step gpu_all 400 'timeout -k 5 380 python3 -m pytest -q -rfE -m gpu -p no:cacheprovider tests --deselect tests/kernels/test_extend_attention.py --deselect tests/kernels/test_extend_newkv.py --deselect tests/kernels/test_cascade_decode.py --deselect tests/kernels/test_decode_attention.py --deselect tests/kernels/test_triton_backend.py 2>&1 | tail -30'
