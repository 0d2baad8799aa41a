OUTDIR=$OUT; . .snap/lib.sh
TAIL=30 step suite 200 'SCALE=0.5 ONLY=radix WORKLOADS=chat,random T_RADIX=190 SUITE_ARGS=--profile OUT=$RES bash bench/gpu_suite.sh 2>&1 | grep -v "^|" | grep -v "^-rw\|^total\|^drw"; python3 -c "
import json,glob
for f in sorted(glob.glob(\"$RES/*_profile.json\")):
    d=json.load(open(f)); print(f); print(json.dumps(d, indent=0)[:2500])
"'
TAIL=30 step gsp 200 'ENGINE_TESTS=0 TESTS_K=8b_shape T_TESTS=40 SWEEP=0 E2E=on AGREE_TOKENS=0 GSP_SCALE=1 T_E2E=180 OUT=$RES bash bench/gpu_cascade.sh 2>&1 | tail -30'
