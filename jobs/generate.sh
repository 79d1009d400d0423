#!/bin/bash
# Generate text with halo-mpi on the nodes of a hostfile, without a batch system.
#   jobs/generate.sh [HOSTFILE] [RANKS]                # tensor mode for RANKS > 1; MODE=pipeline
#   FAULT_TOLERANT=1 jobs/generate.sh hostfile 4      # a dead rank does not end the job (below)
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTFILE=${1:-hostfile}
RANKS=${2:-1}
MODE=${MODE:-$([ "$RANKS" -gt 1 ] && echo tensor || echo none)}   # none, tensor or pipeline
jobs/check-hostfile.sh "$HOSTFILE"
# FAULT_TOLERANT=1: launch with `mpiexec -disable-auto-cleanup`, so that a rank that dies (killed,
# out of memory, a crash) does not end the job: HALO sync goes on without an unstable rank, strict
# sync and pipeline mode name it and exit 3 (README "A dead worker"). One rank per node: hydra
# ends every rank of a node when one of them dies, and the job when a whole node is lost.
LAUNCH=()
[ "${FAULT_TOLERANT:-0}" = 1 ] && LAUNCH+=(-disable-auto-cleanup)
mkdir -p jobs/out
log="jobs/out/generate-$(date +%Y%m%d-%H%M%S).log"
.venv/bin/mpiexec ${LAUNCH[@]+"${LAUNCH[@]}"} -hostfile "$HOSTFILE" -n "$RANKS" .venv/bin/halo-mpi generate --parallel "$MODE" \
    --weights "${WEIGHTS:-weights/smollm2-135m.h5}" --prompt "${PROMPT:-The capital of France is}" \
    --max-new-tokens "${NEW_TOKENS:-32}" --temperature 0 2>&1 | tee "$log"
