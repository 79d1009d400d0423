#!/usr/bin/env bash
# The server under 1 and then 4 concurrent streaming clients (32 tokens each), one process, for
# each store given: total tokens/s and time to first token (jobs/serve_load.py).
#   bash jobs/serve-batch.sh [--max-batch 8] [other serve flags]   (STORES="float32 q4" by default)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PORT=${PORT:-8765}
mkdir -p results
for d in ${STORES:-float32 q4}; do
  store=weights/smollm2-135m.h5
  [ "$d" = float32 ] || store=weights/smollm2-135m-$d.h5
  $PY -m halo_mpi.cli serve --weights "$store" --port "$PORT" "$@" 2> "results/serve-$d.log" &
  server=$!
  trap 'kill $server 2>/dev/null || true' EXIT
  for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 0.5; done
  echo "$d: $(head -1 "results/serve-$d.log")"
  $PY jobs/serve_load.py --url "http://127.0.0.1:$PORT" --clients 1 --requests 1 --max-tokens 8 > /dev/null  # warm-up
  for c in 1 4; do
    $PY jobs/serve_load.py --url "http://127.0.0.1:$PORT" --clients $c --requests $((8 / c)) \
        --max-tokens 32 --json "results/serve-$d-$c.json"
  done
  kill -TERM $server; wait $server || true
  trap - EXIT
done
