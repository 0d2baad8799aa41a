OUTDIR=$OUT; . .snap/lib.sh
mkdir -p /tmp/old && tar xf .snap/old0.tar -C /tmp/old
d='python3 bench/bench_engine.py --out $RES --sections ceilings,decode 2>&1 | grep "^decode "'
TAIL=3 step new1 90 "$d"
TAIL=3 step old1 90 "cd /tmp/old && PYTHONPATH=/tmp/old:/tmp/site $d"
TAIL=3 step new2 60 "$d"
TAIL=3 step old2 60 "cd /tmp/old && PYTHONPATH=/tmp/old:/tmp/site $d"
