OUTDIR=$OUT; . .snap/lib.sh
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
step tests 100 'python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/engine/test_engine_gpu.py -k "llama and cuda_greedy" 2>&1 | tail -5'
TAIL=40 step suite 130 'SCALE=0.5 ONLY=radix WORKLOADS=chat,random T_RADIX=120 OUT=$RES bash bench/gpu_suite.sh 2>&1 | grep -v "^|" ; grep -h "engine warm-up\|kernel compiles" $RES/radix.log; python3 -c "
import json,glob
for f in sorted(glob.glob(\"$RES/*_radix.json\")):
    d=json.load(open(f)); print(f, d[\"metrics\"][\"duration_s\"], d.get(\"kernel_compiles\"), d[\"engine\"].get(\"step_ms\"), d.get(\"ttft_by_turn\"))
"'
TAIL=45 step profile64 90 'python3 bench/profile_decode.py --out $RES --batch 64 --ctx 512 --steps 8'
TAIL=80 step gemm 150 'python3 bench/gemm_probe.py --out $RES --budget-s 100'
