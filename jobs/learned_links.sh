#!/usr/bin/env bash
# Issue 24's link targets on the testbed (root): no flag names the lossy rank; halo-mpi measures.
#   sudo jobs/learned_links.sh [WEIGHTS]       (default weights/smollm2-135m-q4.h5)
# For each lossy rank (2, then 1: an attention holder in a 3-rank plan), 30% loss on its link:
# the wall time of a 32-token generation (the whole command: start-up, link probe, end), and the
# perplexity of 128 held-out tokens against the same without loss.
set -euo pipefail
cd "$(dirname "$0")/.."
HALO=${HALO:-.venv/bin/halo-mpi}
W=${1:-weights/smollm2-135m-q4.h5}
run() {  # $1: loss spec ("" = none); the rest: the halo-mpi command
  local loss=$1; shift
  $HALO testbed run --ranks 3 ${loss:+--loss $loss} -- "$@" --weights "$W" --parallel tensor --sync halo
}
ppl() { python3 -c "import json,sys; print(round(json.load(open(sys.argv[1]))['perplexity'], 3))" "$1"; }
tmp=$(mktemp -d)
run "" evaluate --tokens 128 --json "$tmp/clean.json" >/dev/null 2>&1
echo "loss-free perplexity (128 tokens): $(ppl "$tmp/clean.json")"
for rank in 2 1; do
  start=$(date +%s.%N)
  run "$rank:0.3" generate --prompt "The capital of France is" --max-new-tokens 32 --ignore-eos \
      --temperature 0 > "$tmp/gen$rank.log" 2>&1
  took=$(echo "$(date +%s.%N) - $start" | bc)
  run "$rank:0.3" evaluate --tokens 128 --json "$tmp/lossy$rank.json" > "$tmp/eval$rank.log" 2>&1
  echo "30% loss on rank $rank: 32 tokens in $(printf %.1f "$took") s (whole command);" \
       "perplexity $(ppl "$tmp/lossy$rank.json"); $(grep -m1 'links measured' "$tmp/gen$rank.log")"
done
rm -rf "$tmp"
