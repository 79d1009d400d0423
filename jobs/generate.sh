#!/bin/bash
# Generate text with halo-mpi on the nodes of a hostfile, without a batch system.
#   jobs/generate.sh [HOSTFILE] [RANKS]
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTFILE=${1:-hostfile}
RANKS=${2:-1}
jobs/check-hostfile.sh "$HOSTFILE"
mkdir -p jobs/out
log="jobs/out/generate-$(date +%Y%m%d-%H%M%S).log"
.venv/bin/mpiexec -hostfile "$HOSTFILE" -n "$RANKS" .venv/bin/halo-mpi generate \
    --weights "${WEIGHTS:-weights/smollm2-135m.h5}" --prompt "${PROMPT:-The capital of France is}" \
    --max-new-tokens "${NEW_TOKENS:-32}" --temperature 0 2>&1 | tee "$log"
