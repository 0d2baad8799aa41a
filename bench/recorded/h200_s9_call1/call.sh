OUTDIR=$OUT; . .snap/lib.sh
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee $RAW/gpu.txt
TAIL=20 step probe 330 "python3 bench/chat_extend_probe.py --out \$RES --budget-s 250"
pick='grep -h "time / floor\|/radix\] \|piecewise graphs\|compiles" $RES/radix.log | grep -v "^|"'
S='SCALE=0.5 ONLY=radix WORKLOADS=chat T_RADIX=80'
swap_old() { mv radixrt radixrt.new && cp -r .snap/old/radixrt radixrt; }
swap_new() { rm -rf radixrt && mv radixrt.new radixrt; }
TAIL=6 step new1 85 "$S OUT=\$RES bash bench/gpu_suite.sh >/dev/null 2>&1; $pick"
swap_old
TAIL=6 step old1 85 "$S OUT=\$RES bash bench/gpu_suite.sh >/dev/null 2>&1; $pick"
swap_new
TAIL=6 step new2 85 "$S OUT=\$RES bash bench/gpu_suite.sh >/dev/null 2>&1; $pick"
TAIL=12 step prof 85 "$S SUITE_ARGS=--profile OUT=\$RES bash bench/gpu_suite.sh >/dev/null 2>&1; $pick; ls \$RES"
