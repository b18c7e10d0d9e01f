#!/usr/bin/env bash
# Partial fine-tuning on elpv (issue 22, BENCHMARKS.md): registers the
# dataset (its own 80/10/10 stratified split, seed 0, as the demo),
# extracts EfficientNet-Lite0's stride-16 maps (`enqueue --spatial --maps
# 16`, 224 px, each 300 px cell stretched whole), timing it; trains the
# heads alone on the same folder's pooled features for comparison (linear
# and MLP, 40 epochs, AdamW lr 0.001, weight decay 0.01, as the elpv tables
# above); then a head with Lite0's blocks 11..=15 and head convolution from
# the maps (benches/finetune_elpv.rs, once per head in LAZARUS_FINETUNE_HEADS,
# default "linear mlp"; the other LAZARUS_FINETUNE_* settings pass through).
# Usage: bash scripts/bench_elpv_finetune.sh [ROOT]   (default bench-elpv-finetune/)
set -euo pipefail
cd "$(dirname "$0")/.."
root="${1:-bench-elpv-finetune}"
bin=$(bash scripts/build.sh)
LAZARUS_BIN="$bin" bash scripts/fetch_assets.sh >/dev/null
cache="${LAZARUS_CACHE:-$HOME/.cache/lazarus}"
lazarus() { "$bin" --root "$root" "$@"; }
seconds() { awk -v s="$1" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }'; }

if ! lazarus dataset show elpv >/dev/null 2>&1; then
  lazarus dataset add elpv "$cache/data/elpv/labels.csv" --label-column 2 >/dev/null
fi
fingerprint=$(lazarus enqueue --dataset elpv --encoder efficientnet-lite0 --spatial --maps 16 --json \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["fingerprint"])')
start=$(date +%s.%N)
lazarus run-worker --until-empty 2>/dev/null
echo "extraction --spatial --maps 16: $(seconds "$start") s"

for head in linear mlp; do
  start=$(date +%s.%N)
  lazarus train --dataset elpv --encoder efficientnet-lite0 --fingerprint "$fingerprint" \
    --head "$head" --epochs 40 --lr 0.001 --weight-decay 0.01 --seed 0 --json \
    | python3 -c 'import json, sys; t = json.load(sys.stdin)["test"]; print("head alone (%s): test accuracy %.4f, test macro-F1 %.4f" % (sys.argv[1], t["test/accuracy"], t["test/macro_f1"]))' "$head"
  echo "head alone ($head): $(seconds "$start") s"
done

for head in ${LAZARUS_FINETUNE_HEADS:-linear mlp}; do
  start=$(date +%s.%N)
  LAZARUS_ROOT="$root" LAZARUS_FINETUNE_HEAD="$head" cargo bench --quiet --profile dev --bench finetune_elpv
  echo "fine-tuning ($head): $(seconds "$start") s"
done
