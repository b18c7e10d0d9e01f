#!/usr/bin/env bash
# The main job end to end on real images: fetch the real EfficientNet-Lite0
# weights and the elpv solar-cell dataset with pip, register the dataset,
# enqueue feature extraction in chunks of 64, run 2 workers, kill one with
# SIGKILL mid-way and restart it, then verify that every image has exactly
# one feature row, then train the ablation sweeps in configs/ (linear vs MLP,
# class weighting, learning rate, two seeds) for 4-class defect grading and
# for defective-vs-normal in one pass each over the cached features, compare
# multi-layer features in 1, 4 and 8 views (configs/elpv-views.toml), fit the
# anomaly scorers of configs/elpv-anomaly.toml on the normal cells only and
# the patch-level k-NN of configs/elpv-anomaly-patch.toml on their stride-16
# maps, print the ablation tables from experiments/experiments.db and the plots,
# and write the HTML report of every run under demo/report/.
# Everything lands under demo/ (git-ignored); a second run reuses the
# features and the finished runs and finishes in seconds.
# DEMO_IMAGES=N uses only the first N images and DEMO_KILL_AFTER=S kills the
# second worker after S seconds (CI runs such a reduced demo). DEMO_FINETUNE=1
# also extracts the stride-8 maps and runs the fine-tuning sweeps
# configs/elpv-finetune.toml (the best 4-class row of BENCHMARKS.md) and
# configs/elpv-finetune-defective.toml (the best defective-vs-functional
# row): 6 runs of about 11 minutes each on 2 cores, so off by default. The
# binary is the dev-profile build that the tests share (scripts/build.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
root="${DEMO_ROOT:-demo}"
cache="${LAZARUS_CACHE:-$HOME/.cache/lazarus}"
say() { printf '\n== %s\n' "$*"; }

# One build shared with the asset fetch and the tests (scripts/build.sh).
bin=$(bash scripts/build.sh)
export LAZARUS_BIN="$bin"

say "fetching real assets into $cache (pip, no model hub)"
bash scripts/fetch_assets.sh

lazarus() { "$bin" --root "$root" "$@"; }

say "registering the elpv dataset (2,624 EL images of solar cells, 4 defect grades)"
labels="$cache/data/elpv/labels.csv"
if [ -n "${DEMO_IMAGES:-}" ]; then
  # The first N lines of the label file, beside the images it names.
  subset="$cache/data/elpv/.demo-subset-$DEMO_IMAGES.txt"
  head -n "$DEMO_IMAGES" "$labels" > "$subset"
  labels="$subset"
fi
if lazarus dataset show elpv >/dev/null 2>&1; then
  echo "dataset elpv already registered in $root: reusing it"
  lazarus dataset show elpv
else
  lazarus dataset add elpv "$labels" --label-column 2
fi

say "enqueueing feature extraction (efficientnet-lite0, ImageNet weights, chunks of 64)"
lazarus enqueue --dataset elpv --encoder efficientnet-lite0 --chunk-size 64
say "enqueueing multi-layer features too: each of Lite0's 7 stages and its head, pooled (--layers all, its own feature set)"
lazarus enqueue --dataset elpv --encoder efficientnet-lite0 --chunk-size 64 --layers all
say "and views: the same features of each cell's 4 flips and of its 8 rotations and transposes (--views flips|dihedral, their own feature sets)"
lazarus enqueue --dataset elpv --encoder efficientnet-lite0 --chunk-size 64 --layers all --views flips
lazarus enqueue --dataset elpv --encoder efficientnet-lite0 --chunk-size 64 --layers all --views dihedral
say "and the stride-16 feature map of each cell, for patch-level anomaly scores (--spatial --maps 16, its own feature set)"
lazarus enqueue --dataset elpv --encoder efficientnet-lite0 --chunk-size 64 --spatial --maps 16
if [ "${DEMO_FINETUNE:-0}" = 1 ]; then
  say "and the stride-8 map (block 4's output) with the stride-4 and -16 maps, for fine-tuning Lite0's blocks 5..=15 (--cache-at 4, its own feature set)"
  lazarus enqueue --dataset elpv --encoder efficientnet-lite0 --chunk-size 64 --cache-at 4 --maps 4,16
fi

remaining() {
  lazarus status --json --dataset elpv | python3 -c \
    'import json,sys; j=json.load(sys.stdin)["jobs"]; print(j["pending"]+j["running"]+j["failed"])'
}

lease=10
if [ "$(remaining)" -gt 0 ]; then
  say "running 2 workers (logs in $root/logs/)"
  mkdir -p "$root/logs"
  worker() { "$bin" --root "$root" run-worker --until-empty --threads 1 --lease-secs $lease --worker-id "$1" >>"$root/logs/$1.log" 2>&1; }
  worker demo-a & a=$!
  worker demo-b & b=$!
  sleep "${DEMO_KILL_AFTER:-6}"
  if kill -0 $b 2>/dev/null; then
    say "killing worker demo-b with SIGKILL mid-chunk, then restarting it: nothing is lost or done twice"
    kill -9 $b || true
    wait $b 2>/dev/null || true
    lazarus status --dataset elpv
    worker demo-b-restarted & b=$!
  else
    echo "worker demo-b finished its jobs before the kill (raise or lower DEMO_KILL_AFTER); nothing to interrupt"
  fi
  wait $a $b
  # The killed worker's chunk comes back once its lease runs out.
  while [ "$(remaining)" -gt 0 ]; do
    sleep $lease
    "$bin" --root "$root" run-worker --until-empty --lease-secs $lease --worker-id demo-final >>"$root/logs/demo-final.log" 2>&1
  done
else
  echo "all features already extracted: nothing to do"
fi

say "status"
lazarus status --dataset elpv

say "verify: every image has exactly one feature row, every shard matches its checksum"
lazarus verify --dataset elpv
ls "$root"/features/*/ | head -n 4
echo "... $(ls "$root"/features/*/*.safetensors | wc -l) shards"

for sweep in elpv-heads elpv-defective; do
  case $sweep in
    elpv-heads) what="4-class defect grading" ;;
    *) what="defective vs normal" ;;
  esac
  say "sweep configs/$sweep.toml: 24 heads ($what) in one pass over the cached features"
  start=$(date +%s.%N)
  lazarus sweep "configs/$sweep.toml" | grep -v '^  run '
  echo "took $(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }') s"
  for axis in head class_weights lr; do
    say "ablation ($what): test accuracy by $axis, mean ± std over seeds and the other settings"
    lazarus experiments ablate --by "$axis" --metric test/accuracy --where "sweep=$sweep"
  done
done

say "sweep configs/elpv-views.toml: every stage's features in 1, 4 and 8 views, one drawn per cell and epoch, probabilities averaged over a cell's views (4-class grading, 3 seeds; the best elpv row of BENCHMARKS.md)"
lazarus sweep configs/elpv-views.toml | grep -v '^  run '
for metric in test/accuracy test/macro_f1; do
  lazarus experiments ablate --by views,head --metric "$metric" --where sweep=elpv-views
done

if [ "${DEMO_FINETUNE:-0}" = 1 ]; then
  for sweep in elpv-finetune elpv-finetune-defective; do
    say "sweep configs/$sweep.toml: Lite0's blocks 5..=15 fine-tuned with an MLP head from the cached stride-8 maps, 8 map views (3 seeds, about 11 minutes each)"
    start=$(date +%s.%N)
    lazarus sweep "configs/$sweep.toml" | grep -v '^  run '
    echo "took $(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }') s"
    for metric in test/accuracy test/macro_f1; do
      lazarus experiments ablate --by unfreeze_from,head --metric "$metric" --where "sweep=$sweep"
    done
  done
fi

say "anomaly sweep configs/elpv-anomaly.toml: k-NN and Mahalanobis scorers fitted on normal cells only (defect probability 0 vs 1)"
lazarus sweep configs/elpv-anomaly.toml | grep -v '^  run '
lazarus experiments ablate --by scorer,k --metric test/roc_auc --where sweep=elpv-anomaly
say "patch-level anomaly sweep configs/elpv-anomaly-patch.toml: every stride-16 patch of the normal training cells in a k-NN memory bank, a cell scored by its farthest patch (the best elpv anomaly row of BENCHMARKS.md)"
lazarus sweep configs/elpv-anomaly-patch.toml | grep -v '^  run '
lazarus experiments ablate --by k --metric test/roc_auc --where sweep=elpv-anomaly-patch

say "macro-F1 by head and class weighting (4-class grading)"
lazarus experiments ablate --by head,class_weights --metric test/macro_f1 --where sweep=elpv-heads

say "best runs by validation macro-F1"
lazarus experiments best --metric val/macro_f1 --top 3

best=$(lazarus experiments best --metric val/macro_f1 --top 1 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["runs"][0]["run"])')
say "plots"
ls "$root"/experiments/sweeps/*/comparison.png "$root/experiments/runs/$best/plots/"*.png
echo "model card: $root/experiments/runs/$best/model_card.json"

say "predict with run $best on a few images (cached features are reused)"
lazarus predict --run "$best" --top-k 2 $(lazarus dataset show elpv --images --csv | python3 -c '
import csv, sys
rows = [r for r in csv.DictReader(sys.stdin) if r["split"] == "test"]
print(" ".join(r["path"] for r in rows[:3]))')
echo "query it yourself: sqlite3 -header -column $root/experiments/experiments.db (README: Query your ablations)"

say "report: every run, sweep and ablation as a static site (README: Look at your experiments)"
lazarus experiments report --out "$root/report"
echo "open $root/report/index.html in a browser (file:// works; no network needed)"
