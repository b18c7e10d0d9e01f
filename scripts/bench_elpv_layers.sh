#!/usr/bin/env bash
# The elpv accuracy table of issue 22 for multi-layer features (BENCHMARKS.md):
# extracts the pooled features of EfficientNet-Lite0's last layer and of
# every stage (`enqueue --layers all`) for the 2,624 elpv cells, timing each,
# then runs configs/elpv-layers.toml (4 classes) and
# configs/elpv-layers-defective.toml (defect probability >= 0.5) and prints
# test accuracy and macro-F1 by layers and head, mean ± std over 3 seeds,
# next to scikit-learn's logistic regression on the same cached features
# (C chosen on the validation split). Split: the dataset's own 80/10/10
# stratified split, seed 0 (as the demo).
# Usage: bash scripts/bench_elpv_layers.sh [ROOT]   (default bench-elpv-layers/)
set -euo pipefail
cd "$(dirname "$0")/.."
root="${1:-bench-elpv-layers}"
bin=$(bash scripts/build.sh)
LAZARUS_BIN="$bin" bash scripts/fetch_assets.sh >/dev/null
cache="${LAZARUS_CACHE:-$HOME/.cache/lazarus}"
lazarus() { "$bin" --root "$root" "$@"; }
say() { printf '\n== %s\n' "$*"; }

if ! lazarus dataset show elpv >/dev/null 2>&1; then
  lazarus dataset add elpv "$cache/data/elpv/labels.csv" --label-column 2 >/dev/null
fi
declare -A fingerprint
for layers in last all; do
  fingerprint[$layers]=$(lazarus enqueue --dataset elpv --encoder efficientnet-lite0 --layers "$layers" --json \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["fingerprint"])')
  start=$(date +%s.%N)
  lazarus run-worker --until-empty 2>/dev/null
  echo "extraction --layers $layers: $(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }') s"
done
lazarus verify --dataset elpv | tail -n 1

for sweep in elpv-layers elpv-layers-defective; do
  say "lazarus sweep configs/$sweep.toml"
  start=$(date +%s.%N)
  lazarus sweep "configs/$sweep.toml" | grep -v '^  run ' | tail -n 3
  echo "training: $(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }') s"
  for metric in test/accuracy test/macro_f1; do
    lazarus experiments ablate --by layers,head --metric "$metric" --where "sweep=$sweep"
  done
done

say "scikit-learn LogisticRegression on the same cached features (C chosen on val)"
for layers in last all; do
  python3 scripts/sklearn_levers.py "$root" elpv "${fingerprint[$layers]}" "layers $layers"
done
