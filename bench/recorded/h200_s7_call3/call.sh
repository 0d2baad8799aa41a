OUTDIR=$OUT; . .snap/lib.sh
TAIL=120 step chat 150 'python3 bench/run_bench.py --workload chat --model llama3-8b --load-format dummy --device cuda --dtype bfloat16 --kv-cache-tokens 262144 --max-running-requests 256 --page-size 16 --scale 0.5 --out $RES --no-progress --variants radix --cprofile 2>&1 | grep "chat/radix\|compiles"; head -150 $RES/chat_radix_cprofile.txt | cut -c1-180'
