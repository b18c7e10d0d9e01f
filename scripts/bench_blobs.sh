#!/usr/bin/env bash
# Segmentation of small blobs with finer maps (issue 22, BENCHMARKS.md):
# generates COUNT 224 px images of 3-10 blobs of radius 3-6 px on a textured
# background with their masks (scripts/gen_blobs.py), extracts the spatial
# features of EfficientNet-Lite0 with its real weights (scripts/fetch_assets.sh)
# once per map set of MAPS (`--maps 16,32`, the default, the fine maps
# `--maps 4,8` alone, and all four), timing each, then trains a segmentation head on each folder
# (`train --task segment --maps ...`, 3 seeds) and prints test Dice per
# maps, mean ± std. Split: the dataset's own 80/10/10, seed 0. With the
# `4,8` maps and the default head, the best row again as the sweep
# configs/blobs-segment.toml (which reuses those runs).
# Usage: bash scripts/bench_blobs.sh [ROOT]   (default bench-blobs/)
#   COUNT (300), EPOCHS (12), HEAD (mlp), HIDDEN (32), SEEDS ("1 2 3"),
#   MAPS ("16,32 4,8 4,8,16,32")
set -euo pipefail
cd "$(dirname "$0")/.."
root="${1:-bench-blobs}"
count="${COUNT:-300}"
epochs="${EPOCHS:-12}"
head="${HEAD:-mlp}"
hidden="${HIDDEN:-32}"
seeds="${SEEDS:-1 2 3}"
map_sets="${MAPS:-16,32 4,8 4,8,16,32}"
bin=$(bash scripts/build.sh)
LAZARUS_BIN="$bin" bash scripts/fetch_assets.sh >/dev/null
lazarus() { "$bin" --root "$root" "$@"; }
elapsed() { awk -v s="$1" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }'; }

mkdir -p "$root"
if ! lazarus dataset show blobs >/dev/null 2>&1; then
  python3 scripts/gen_blobs.py "$root/source" --count "$count"
  lazarus dataset add blobs "$root/source" >/dev/null
fi
for maps in $map_sets; do
  lazarus enqueue --dataset blobs --encoder efficientnet-lite0 --spatial --maps "$maps" >/dev/null
  start=$(date +%s.%N)
  lazarus run-worker --until-empty 2>/dev/null
  echo "extraction --maps $maps: $(elapsed "$start") s"
done
lazarus verify --dataset blobs | tail -n 1

for maps in $map_sets; do
  dice=()
  start=$(date +%s.%N)
  for seed in $seeds; do
    value=$(lazarus train --task segment --dataset blobs --encoder efficientnet-lite0 --maps "$maps" \
      --head "$head" --hidden "$hidden" --epochs "$epochs" --batch-size 16 --lr 0.003 --seed "$seed" --json \
      | python3 -c 'import json,sys; print(json.load(sys.stdin)["test"]["test/dice"])')
    dice+=("$value")
  done
  printf 'maps %-9s test Dice %s  (seeds %s: %s; training %s s)\n' "$maps" \
    "$(printf '%s\n' "${dice[@]}" | python3 -c 'import statistics,sys; v=[float(x) for x in sys.stdin]; print(f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0:.3f}")')" \
    "$seeds" "${dice[*]}" "$(elapsed "$start")"
done

if [[ " $map_sets " == *" 4,8 "* && "$head $hidden $epochs" == "mlp 32 12" ]]; then
  # The best row as a sweep file (configs/blobs-segment.toml, seeds 1-3):
  # the runs above used the same settings, so the sweep reuses them.
  lazarus sweep configs/blobs-segment.toml | grep -v '^  run '
  lazarus experiments ablate --by maps --metric test/dice --where sweep=blobs-segment
fi
