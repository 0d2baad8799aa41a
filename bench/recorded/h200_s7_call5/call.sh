OUTDIR=$OUT; . .snap/lib.sh
TAIL=30 step suite3 130 'SCALE=0.5 ONLY=radix WORKLOADS=gsp,rag,fewshot T_RADIX=120 OUT=$RES bash bench/gpu_suite.sh >/dev/null 2>&1; grep -v "^-rw\|^total\|^drw" $RES/radix.log | tail -24'
TAIL=25 step decode 110 'python3 bench/bench_engine.py --out $RES --sections ceilings,decode 2>&1 | tail -25'
