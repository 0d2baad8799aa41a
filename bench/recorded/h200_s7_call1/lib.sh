# Sourced by .snap/call*.sh on the GPU machine (OUTDIR set): wheels, paths, and `step NAME SECS CMD`
# (output under $RAW/NAME, all of $RAW tarred to $OUTDIR/raw.tgz after each step).
set -uo pipefail
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
. bench/carried_wheels.sh && use_carried_wheels
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RAW=/tmp/raw; mkdir -p "$RAW"
step() {
  local name=$1 secs=$2; shift 2
  mkdir -p "$RAW/$name"
  echo "=== $name (limit ${secs}s, $(date +%T))"
  local t0=$SECONDS
  RES="$RAW/$name" timeout -k 5 "$secs" bash -c "$*" > "$RAW/$name/log.txt" 2>&1
  echo "rc=$? $name $((SECONDS - t0))s"
  tail -n "${TAIL:-20}" "$RAW/$name/log.txt" | cut -c1-300
  tar czf "$OUTDIR/raw.tgz" -C "$RAW" .
}
