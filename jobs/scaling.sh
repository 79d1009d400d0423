#!/usr/bin/env bash
# Tensor-parallel scaling on one many-core machine (the 16-core device machine: four 4-core edge
# devices, or 16 one-core ones): the synthetic TinyLlama-1.1B shape in q4 (made here if missing),
# one rank per core. Runs, TOKENS greedy tokens each (end-of-sequence ignored):
#   single process with 1 and 4 threads;
#   strict and halo at each of RANKS ranks x 1 thread, and at 4 ranks x 4 threads;
#   halo with 5% emulated loss on rank 3 of 4 (4 threads each);
#   pipeline, 4 ranks x 4 threads, 4 sequences in flight;
# then one table: median, mean, p99 and max ms/token, tokens/s, the largest rank's weights.
#   bash jobs/scaling.sh                      # 128 tokens, RANKS="2 4 8 16"
#   STORE=weights/smollm2-135m-q4.h5 RANKS="2" TOKENS=16 bash jobs/scaling.sh
# Environment: STORE, TOKENS, RANKS, OUT (default results/scaling; a run already there is kept),
# PYTHON and MPIEXEC (default the venv's; elsewhere `python3` and `mpiexec` on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
MPIEXEC=${MPIEXEC:-$( [ -x .venv/bin/mpiexec ] && echo .venv/bin/mpiexec || echo mpiexec )}
STORE=${STORE:-weights/tinyllama-1.1b-synthetic-q4.h5}
TOKENS=${TOKENS:-128}
RANKS=${RANKS:-2 4 8 16}
OUT=${OUT:-results/scaling}
HALO=("$PYTHON" -m halo_mpi.cli)
mkdir -p "$OUT"
if [ ! -e "$STORE" ]; then
  f32=weights/tinyllama-1.1b-synthetic.h5
  [ -e "$f32" ] || "${HALO[@]}" convert --synthetic tinyllama-1.1b -o "$f32" --quiet
  "${HALO[@]}" convert "$f32" -o "$STORE" --store-dtype q4 --quiet
fi
head -n 4 jobs/prompts.txt > "$OUT/prompts-4.txt"
common=(--weights "$STORE" --max-new-tokens "$TOKENS" --temperature 0 --ignore-eos --quiet)

run() {   # NAME RANKS THREADS ARGS...: one generate, its statistics in $OUT/NAME.json
  local name=$1 n=$2 threads=$3; shift 3
  [ -f "$OUT/$name.json" ] && return
  echo "scaling: $name ($n ranks x $threads threads)" >&2
  if ! "$MPIEXEC" -n "$n" "${HALO[@]}" generate "${common[@]}" --threads "$threads" "$@" \
      --stats-json "$OUT/$name.json" > /dev/null 2> "$OUT/$name.log"; then
    echo "scaling: $name failed (its log: $OUT/$name.log):" >&2
    tail -n 3 "$OUT/$name.log" >&2
    exit 1
  fi
}

run single-1x1 1 1 --prompt "Once upon a time"
run single-1x4 1 4 --prompt "Once upon a time"
for n in $RANKS; do
  for sync in strict halo; do
    run "$sync-${n}x1" "$n" 1 --parallel tensor --sync "$sync" --prompt "Once upon a time"
  done
done
for sync in strict halo; do
  run "$sync-4x4" 4 4 --parallel tensor --sync "$sync" --prompt "Once upon a time"
done
run halo-4x4-loss5 4 4 --parallel tensor --sync halo --link-loss 3:0.05 --prompt "Once upon a time"
run pipeline-4x4-s4 4 4 --parallel pipeline --num-sequences 4 --prompt-file "$OUT/prompts-4.txt"

"$PYTHON" - "$OUT" "$STORE" "$TOKENS" <<'PY'
import json, pathlib, sys
out, store, tokens = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
order = ["single-1x1", "single-1x4"] + sorted(
    (p.stem for p in out.glob("*.json") if not p.stem.startswith("single")),
    key=lambda s: (s.split("-")[0] != "strict", s.split("-")[0] == "pipeline", int(s.split("-")[1].split("x")[0]),
                   s))
print(f"{store}, {tokens} tokens per sequence, one rank per core\n")
print("| run | ranks x threads | median ms/token | mean | p99 | max | tokens/s | x single 1 thread "
      "| max rank weights MB |")
print("|---|---|---|---|---|---|---|---|---|")
base = None
for name in order:
    f = out / f"{name}.json"
    if not f.exists():
        continue
    d = json.loads(f.read_text())
    ms = d["decode_ms"]
    mean = sum(ms) / len(ms)
    base = base or d["ms_per_token_median"]
    shape = name.split("-")[1]
    weights = max(r["weight_bytes"] for r in d["ranks"]) / 1e6
    print(f"| {name} | {shape} | {d['ms_per_token_median']:.1f} | {mean:.1f} | {d['ms_per_token_p99']:.1f} "
          f"| {d['ms_per_token_max']:.1f} | {d['tokens_per_s']:.1f} | {d['ms_per_token_median'] / base:.2f} "
          f"| {weights:.0f} |")
PY
