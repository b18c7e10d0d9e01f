#!/usr/bin/env bash
# Segmentation of real fluorescence nuclei (issue 22, BENCHMARKS.md): the 16
# tiles scripts/fetch_data.sh cuts from the 2018 Data Science Bowl image in the
# stardist wheel (scripts/gen_nuclei.py; 10 train, 2 val, 4 test tiles), the
# spatial features of EfficientNet-Lite0 with its real weights for the fine
# maps (`--maps 4,8`) and the default ones (`16,32`), timing each extraction,
# then the sweep configs/nuclei-segment.toml (both map sets, MLP head, seeds
# 1-3) and its ablation by maps, beside the Otsu threshold's Dice on the same
# tiles.
# Usage: bash scripts/bench_nuclei.sh [ROOT]   (default bench-nuclei/)
set -euo pipefail
cd "$(dirname "$0")/.."
root="${1:-bench-nuclei}"
bin=$(bash scripts/build.sh)
LAZARUS_BIN="$bin" bash scripts/fetch_assets.sh >/dev/null
cache="${LAZARUS_CACHE:-$HOME/.cache/lazarus}"
lazarus() { "$bin" --root "$root" "$@"; }
elapsed() { awk -v s="$1" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }'; }

mkdir -p "$root"
if ! lazarus dataset show nuclei >/dev/null 2>&1; then
  lazarus dataset add nuclei "$cache/data/nuclei/manifest.csv" >/dev/null
fi
for maps in 4,8 16,32; do
  lazarus enqueue --dataset nuclei --encoder efficientnet-lite0 --spatial --maps "$maps" >/dev/null
  start=$(date +%s.%N)
  lazarus run-worker --until-empty 2>/dev/null
  echo "extraction --maps $maps: $(elapsed "$start") s"
done
lazarus verify --dataset nuclei | tail -n 1

python3 scripts/gen_nuclei.py "$(ls "$cache"/downloads/stardist-0.9.2-*.whl | head -n 1)" --otsu
start=$(date +%s.%N)
lazarus sweep configs/nuclei-segment.toml 2>/dev/null | grep -v '^  run '
echo "sweep: $(elapsed "$start") s"
lazarus experiments ablate --by maps --metric test/dice --where sweep=nuclei-segment
