#!/usr/bin/env bash
# The whole path of the best fine-tuned elpv configuration (issue 22's
# 10-minute goal), timed step by step on a fresh root: register elpv (its
# own 80/10/10 stratified split, seed 0, as the demo), extract the stride-8
# map that `--unfreeze-from 4` trains from (`enqueue --cache-at 4 --maps
# 4,16`, the same folder as `--spatial --maps 4,8,16`) with one worker,
# then train the settings of configs/elpv-finetune.toml (blocks 5..=15 +
# head convolution with an MLP head, dihedral map views in training,
# averaged at evaluation) for one seed. EPOCHS (default 16, the config's),
# SEED (default 0) and BLOCKS_PRECISION (default auto, the config's: the
# faster of f32 and bf16 by a timing at the start; f32 or bf16 to fix it)
# pick the run.
# Usage: bash scripts/bench_elpv_finetune_path.sh [ROOT]   (default bench-elpv-path/, emptied first)
set -euo pipefail
cd "$(dirname "$0")/.."
root="${1:-bench-elpv-path}"
epochs="${EPOCHS:-16}"
seed="${SEED:-0}"
precision="${BLOCKS_PRECISION:-auto}"
bin=$(bash scripts/build.sh)
LAZARUS_BIN="$bin" bash scripts/fetch_assets.sh >/dev/null
cache="${LAZARUS_CACHE:-$HOME/.cache/lazarus}"
lazarus() { "$bin" --root "$root" "$@"; }
now() { date +%s.%N; }
seconds() { awk -v s="$1" -v e="$2" 'BEGIN { printf "%.1f", e - s }'; }

rm -rf "$root"
started=$(now)
lazarus dataset add elpv "$cache/data/elpv/labels.csv" --label-column 2 >/dev/null
lazarus enqueue --dataset elpv --encoder efficientnet-lite0 --cache-at 4 --maps 4,16 >/dev/null
lazarus run-worker --until-empty 2>/dev/null
extracted=$(now)
echo "register + extract (--cache-at 4 --maps 4,16, 2,624 cells): $(seconds "$started" "$extracted") s"
lazarus train --dataset elpv --encoder efficientnet-lite0 --maps 4,8,16 --unfreeze-from 4 \
  --head mlp --epochs "$epochs" --batch-size 32 --lr 0.001 --weight-decay 0.01 \
  --blocks-lr 0.0001 --blocks-weight-decay 0.05 --schedule cosine --warmup-steps 50 \
  --augment-maps dihedral --blocks-precision "$precision" --seed "$seed" --json \
  | python3 -c 'import json, sys
r = json.load(sys.stdin)
t = r["test"]
precision = sys.argv[3]
# What `auto` took, and its timings, are in the run config.json.
config = "%s/experiments/runs/%s/config.json" % (sys.argv[4], r["run_id"])
chosen = json.load(open(config)).get("blocks_precision")
if chosen:
    precision += " -> %s (a micro-batch of %d: f32 %.3f s, bf16 %.3f s)" % (chosen["precision"], chosen["n_images"], chosen["f32_seconds"], chosen["bf16_seconds"])
print("K 4, %s epochs, seed %s, blocks in %s: epoch kept %d, test accuracy %.4f, test macro-F1 %.4f, peak RSS %d MB"
      % (sys.argv[1], sys.argv[2], precision, r["best_epoch"] + 1, t["test/accuracy"], t["test/macro_f1"], r["peak_rss_bytes"] // 1000000))' "$epochs" "$seed" "$precision" "$root"
trained=$(now)
echo "training: $(seconds "$extracted" "$trained") s"
echo "whole path: $(seconds "$started" "$trained") s"
