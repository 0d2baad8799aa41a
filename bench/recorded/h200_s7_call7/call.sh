OUTDIR=$OUT; . .snap/lib.sh
TAIL=150 step hostprof 100 'python3 bench/profile_decode.py --out $RES --steps 16 --cprofile >/dev/null 2>&1; grep -o "\"wall_ms_per_step\": [0-9.]*\|\"kernel_ms_per_step\": [0-9.]*" $RES/decode_profile_256x1024.json; head -110 $RES/decode_cprofile.txt | cut -c1-170'
