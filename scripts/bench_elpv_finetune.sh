#!/usr/bin/env bash
# Partial fine-tuning on elpv (issue 22, BENCHMARKS.md): registers the
# dataset (its own 80/10/10 stratified split, seed 0, as the demo),
# extracts EfficientNet-Lite0's stride-16 maps (`enqueue --spatial --maps
# 16`, 224 px, each 300 px cell stretched whole), timing it; trains the
# heads alone on the same folder's pooled features for comparison (linear
# and MLP, 40 epochs, AdamW lr 0.001, weight decay 0.01, as the elpv tables
# above); then a head with Lite0's blocks 11..=15 and head convolution from
# the maps (`train --unfreeze-from 10`, once per head in LAZARUS_FINETUNE_HEADS,
# default "linear mlp"; settings from LAZARUS_FINETUNE_EPOCHS (8), _BATCH (32),
# _LR (0.001), _WEIGHT_DECAY (0.01), _BLOCKS_LR (0.0001),
# _BLOCKS_WEIGHT_DECAY (0.01), _WARMUP (steps, 50), _SEED (0)).
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
  lazarus train --dataset elpv --encoder efficientnet-lite0 --fingerprint "$fingerprint" \
    --unfreeze-from 10 --head "$head" --epochs "${LAZARUS_FINETUNE_EPOCHS:-8}" \
    --batch-size "${LAZARUS_FINETUNE_BATCH:-32}" --lr "${LAZARUS_FINETUNE_LR:-0.001}" \
    --weight-decay "${LAZARUS_FINETUNE_WEIGHT_DECAY:-0.01}" \
    --blocks-lr "${LAZARUS_FINETUNE_BLOCKS_LR:-0.0001}" \
    --blocks-weight-decay "${LAZARUS_FINETUNE_BLOCKS_WEIGHT_DECAY:-0.01}" \
    --schedule cosine --warmup-steps "${LAZARUS_FINETUNE_WARMUP:-50}" \
    --seed "${LAZARUS_FINETUNE_SEED:-0}" --experiment finetune --json \
    | python3 -c 'import json, sys
r = json.load(sys.stdin)
for i, e in enumerate(r["epochs"]):
    print("epoch %d: train loss %.4f, val accuracy %.4f, val macro-F1 %.4f" % (i + 1, e["train/loss"], e["val/accuracy"], e["val/macro_f1"]))
t = r["test"]
print("fine-tuned (%s), best epoch %d: test accuracy %.4f, test macro-F1 %.4f" % (sys.argv[1], r["best_epoch"] + 1, t["test/accuracy"], t["test/macro_f1"]))' "$head"
  echo "fine-tuning ($head): $(seconds "$start") s"
done
