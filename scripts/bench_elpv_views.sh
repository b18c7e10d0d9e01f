#!/usr/bin/env bash
# The elpv accuracy table of issue 22 for cached views (BENCHMARKS.md):
# extracts the multi-layer pooled features of EfficientNet-Lite0 (`--layers
# all`) for the 2,624 elpv cells in 1 view, 4 flips and 8 dihedral views,
# timing each, then runs configs/elpv-views.toml (4 classes),
# configs/elpv-views-defective.toml (defect probability >= 0.5) and an
# anomaly sweep over the same folders, and prints test accuracy and
# macro-F1 (ROC-AUC for anomaly) by views and head, mean ± std over 3 seeds.
# Split: the dataset's own 80/10/10 stratified split, seed 0 (as the demo).
# Usage: bash scripts/bench_elpv_views.sh [ROOT]   (default bench-elpv-views/)
set -euo pipefail
cd "$(dirname "$0")/.."
root="${1:-bench-elpv-views}"
bin=$(bash scripts/build.sh)
LAZARUS_BIN="$bin" bash scripts/fetch_assets.sh >/dev/null
cache="${LAZARUS_CACHE:-$HOME/.cache/lazarus}"
lazarus() { "$bin" --root "$root" "$@"; }
say() { printf '\n== %s\n' "$*"; }

if ! lazarus dataset show elpv >/dev/null 2>&1; then
  lazarus dataset add elpv "$cache/data/elpv/labels.csv" --label-column 2 >/dev/null
fi
for views in 1 flips dihedral; do
  lazarus enqueue --dataset elpv --encoder efficientnet-lite0 --layers all --views "$views" >/dev/null
  start=$(date +%s.%N)
  lazarus run-worker --until-empty 2>/dev/null
  echo "extraction --layers all --views $views: $(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }') s"
done
lazarus verify --dataset elpv | tail -n 1

for sweep in elpv-views elpv-views-defective; do
  say "lazarus sweep configs/$sweep.toml"
  start=$(date +%s.%N)
  lazarus sweep "configs/$sweep.toml" | grep -v '^  run ' | tail -n 3
  echo "training: $(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }') s"
  for metric in test/accuracy test/macro_f1; do
    lazarus experiments ablate --by views,head --metric "$metric" --where "sweep=$sweep"
  done
done

say "anomaly (normal = probability 0, scored 0 vs 1) by views"
anomaly="$root/elpv-views-anomaly.toml"
cat > "$anomaly" <<'TOML'
name = "elpv-views-anomaly"
dataset = "elpv"
encoder = "efficientnet-lite0"
layers = "all"
task = "anomaly"
normal_label = "0.0"
anomaly_label = "1.0"
scorer = "knn"

[grid]
views = ["1", "flips", "dihedral"]
k = [1, 5]
TOML
lazarus sweep "$anomaly" | grep -v '^  run ' | tail -n 3
lazarus experiments ablate --by views,k --metric test/roc_auc --where sweep=elpv-views-anomaly
