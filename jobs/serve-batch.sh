#!/usr/bin/env bash
# The server under 1 and then 4 concurrent streaming clients (32 tokens each), for each store
# given: total tokens/s and time to first token (jobs/serve_load.py).
#   bash jobs/serve-batch.sh [--max-batch 8] [other serve flags]   (STORES="float32 q4" by default)
#   PARALLEL=pipeline RANKS=2 bash jobs/serve-batch.sh --max-batch 8   # mpiexec -n 2, pipeline mode
#   PARALLEL=tensor RANKS=2 bash jobs/serve-batch.sh                  # tensor mode (HALO sync)
# RANKS > 1 launches the server under mpiexec (MPIEXEC, default: beside PY); OUT: the results
# folder (default results), where each run writes serve-<name>-<clients>.json and the log.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PORT=${PORT:-8765}
PARALLEL=${PARALLEL:-none}
RANKS=${RANKS:-1}
MPIEXEC=${MPIEXEC:-$(dirname "$PY")/mpiexec}
OUT=${OUT:-results}
launch=()
stop=TERM
if [ "$RANKS" -gt 1 ]; then
  launch=("$MPIEXEC" -n "$RANKS")
  stop=INT                  # hydra hands Ctrl-C on to every rank
fi
mkdir -p "$OUT"
for d in ${STORES:-float32 q4}; do
  store=weights/smollm2-135m.h5
  [ "$d" = float32 ] || store=weights/smollm2-135m-$d.h5
  name=$d
  [ "$PARALLEL" = none ] || name=$PARALLEL$RANKS-$d
  ${launch[@]+"${launch[@]}"} $PY -m halo_mpi.cli serve --parallel "$PARALLEL" --weights "$store" \
      --port "$PORT" "$@" 2> "$OUT/serve-$name.log" &
  server=$!
  trap 'kill -$stop $server 2>/dev/null || true' EXIT
  for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 0.5; done
  echo "$name: $(grep -m1 -i 'serving\|listen' "$OUT/serve-$name.log" || head -1 "$OUT/serve-$name.log")"
  echo "load: $(uptime)"
  $PY jobs/serve_load.py --url "http://127.0.0.1:$PORT" --clients 1 --requests 1 --max-tokens 8 > /dev/null  # warm-up
  for c in 1 4; do
    $PY jobs/serve_load.py --url "http://127.0.0.1:$PORT" --clients $c --requests $((8 / c)) \
        --max-tokens 32 --json "$OUT/serve-$name-$c.json"
  done
  curl -s "http://127.0.0.1:$PORT/health" > "$OUT/serve-$name-health.json" || true
  kill -$stop $server; wait $server || true
  trap - EXIT
done
