#!/usr/bin/env bash
# A model that does not fit: the synthetic TinyLlama-1.1B shape on 4 ranks (strict tensor mode),
# each rank keeping 25% of its weights resident. For each store given (default: the float32 and
# the q4 one), a one-process reference run and the budgeted run, 16 greedy tokens each; prints
# the tokens' agreement and, per rank, the budget, the resident weights, what the process held
# before loading weights, and the peak RSS.
#   bash jobs/budget-1.1b.sh [STORE ...]       (writes results/budget-1.1b-*.json)
set -euo pipefail
cd "$(dirname "$0")/.."
HALO=.venv/bin/halo-mpi
MPIEXEC=.venv/bin/mpiexec
stores=("$@")
[ ${#stores[@]} -gt 0 ] || stores=(weights/tinyllama-1.1b-synthetic.h5 weights/tinyllama-1.1b-synthetic-q4.h5)
[ -e weights/tinyllama-1.1b-synthetic.h5 ] || $HALO convert --synthetic tinyllama-1.1b -o weights/tinyllama-1.1b-synthetic.h5
[ -e weights/tinyllama-1.1b-synthetic-q4.h5 ] || $HALO convert weights/tinyllama-1.1b-synthetic.h5 \
    -o weights/tinyllama-1.1b-synthetic-q4.h5 --store-dtype q4
mkdir -p results
run=(generate --prompt "Once upon a time" --max-new-tokens 16 --temperature 0 --ignore-eos --quiet)
for store in "${stores[@]}"; do
  name=$(basename "$store" .h5)
  $HALO "${run[@]}" --weights "$store" --stats-json "results/budget-1.1b-$name-reference.json" > /dev/null
  $MPIEXEC -n 4 $HALO "${run[@]}" --weights "$store" --parallel tensor --sync strict --mem-budget 25% \
      --stats-json "results/budget-1.1b-$name-25.json" > /dev/null
  .venv/bin/python - "$name" "results/budget-1.1b-$name-reference.json" "results/budget-1.1b-$name-25.json" <<'PY'
import json, sys
name, ref, got = sys.argv[1], *(json.load(open(p)) for p in sys.argv[2:])
a, b = ref["sequences"][0]["tokens"], got["sequences"][0]["tokens"]
same = sum(x == y for x, y in zip(a, b))
print(f"{name}: one process {ref['ms_per_token_median']:.1f} ms/token, peak RSS {ref['ranks'][0]['peak_rss_mb']:.0f} MB; "
      f"4 ranks at 25%: {got['ms_per_token_median']:.1f} ms/token; greedy tokens equal {same}/{len(a)}")
for r in got["ranks"]:
    s = r["loading"]
    over = r["peak_rss_mb"] - s["rss_before_weights_mb"] - s["resident_bytes"] / 1e6
    print(f"  rank {r['rank']}: budget {s['budget_bytes'] / 1e6:.1f} MB of {s['share_bytes'] / 1e6:.1f} MB, "
          f"resident weights {s['resident_bytes'] / 1e6:.1f} MB, before weights {s['rss_before_weights_mb']:.0f} MB, "
          f"peak RSS {r['peak_rss_mb']:.0f} MB (= before + weights + {over:.0f} MB), reader process "
          f"{s['reader_rss_mb']:.0f} MB, read {s['bytes_read'] / 1e6 / len(b):.0f} MB per token")
PY
done
