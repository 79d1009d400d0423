#!/usr/bin/env bash
# Pipeline mode scaling on one machine: tokens/s, busy share and peak RSS per rank for N = 1, 2, 4
# ranks and S = N, 2N sequences, on SmolLM2-135M and the synthetic TinyLlama-1.1B shape (made here,
# 4.4 GB, if missing). One stats JSON per run in results/pipeline/ (a run already there is kept),
# then the table.   jobs/pipeline-scaling.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=results/pipeline; mkdir -p "$OUT"
[ -f weights/tinyllama-1.1b.h5 ] || .venv/bin/halo-mpi convert --synthetic tinyllama-1.1b -o weights/tinyllama-1.1b.h5
for W in smollm2-135m tinyllama-1.1b; do
  T=32; [ "$W" = tinyllama-1.1b ] && T=16
  for N in 1 2 4; do
    for S in $N $((2 * N)); do
      [ -f "$OUT/$W-n$N-s$S.json" ] && continue
      head -n "$S" jobs/prompts.txt > "$OUT/prompts-$S.txt"
      .venv/bin/mpiexec -n "$N" .venv/bin/halo-mpi generate --parallel pipeline --weights "weights/$W.h5" \
        --prompt-file "$OUT/prompts-$S.txt" --num-sequences "$S" --max-new-tokens "$T" --ignore-eos \
        --temperature 0 --quiet --stats-json "$OUT/$W-n$N-s$S.json"
    done
  done
done
.venv/bin/python - <<'PY'
import json, pathlib
print("| model | N | S | tokens/s | peak RSS per rank (MB) | busy share per rank |\n|---|---|---|---|---|---|")
def key(p):
    model, rest = p.stem.rsplit("-n", 1)
    n, s = rest.split("-s")
    return model, int(n), int(s)
for f in sorted(pathlib.Path("results/pipeline").glob("*-n*-s*.json"), key=key):
    d, (model, n, s) = json.loads(f.read_text()), key(f)
    rss = " / ".join(f"{r['peak_rss_mb']:.0f}" for r in d["ranks"])
    busy = " / ".join(f"{100 * r['busy_share']:.0f}%" for r in d["ranks"])
    print(f"| {model} | {n} | {s} | {d['tokens_per_s']:.1f} | {rss} | {busy} |")
PY
