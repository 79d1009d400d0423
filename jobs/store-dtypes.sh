#!/usr/bin/env bash
# Each store dtype of SmolLM2-135M in one process: decode ms/token, held-out perplexity (512
# tokens), store size, resident weights, then the peak RSS of a 64-token `generate` on each.
#   bash jobs/store-dtypes.sh          (writes results/quant.json and results/rss-*.json)
set -euo pipefail
cd "$(dirname "$0")/.."
HALO=.venv/bin/halo-mpi
make weights weights/smollm2-135m-bfloat16.h5
mkdir -p results
$HALO bench --decode --store-dtypes float32,bfloat16,q8_0,q4 --dtypes float32,bfloat16 \
    --eval-tokens 512 --tokens 64 --json results/quant.json
for d in float32 bfloat16 q8_0 q4; do
  store=weights/smollm2-135m.h5
  [ "$d" = float32 ] || store=weights/smollm2-135m-$d.h5
  $HALO generate --weights "$store" --prompt "The capital of France is" --max-new-tokens 64 \
      --temperature 0 --ignore-eos --quiet --stats-json "results/rss-$d.json" > /dev/null
  .venv/bin/python -c "import json, sys; r = json.load(open(sys.argv[1]))['ranks'][0]
print(f\"{sys.argv[2]:8s} generate: peak RSS {r['peak_rss_mb']:.0f} MB, weights {r['weight_bytes'] / 1e6:.0f} MB resident\")" \
      "results/rss-$d.json" "$d"
done
.venv/bin/python -c "import resource, torch, h5py, halo_mpi.cli.generate
print(f'python + torch + h5py + halo_mpi imported: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:.0f} MB')"
