#!/usr/bin/env bash
# Fine-tuning step speed on this machine, in one run, against PyTorch (issue 22):
#   1. lazarus: `cargo bench --profile dev --bench finetune_blocks` (the profile
#      scripts/build.sh builds `lazarus` in) with the blocks' products in f32 and in
#      bf16 (LAZARUS_BENCH_PRECISION);
#   2. PyTorch: scripts/bench_finetune_torch.py, the same step on efficientnet-lite-pytorch's
#      Lite0 (f32 and bf16 autocast, NCHW and channels-last).
# Both train blocks K+1..=15 and the head convolution from a random block-K map, backward
# from d pooled features, AdamW on the blocks; LAZARUS_BENCH_STRIDE (8: K 4, the best elpv
# configuration; 16: K 10), LAZARUS_BENCH_BATCH (32) and LAZARUS_BENCH_ITERS (5) apply to
# both. Prints the machine, its SIMD flags, the load before and after, and the ratios of
# the best rows. The Python peer installs into $LAZARUS_CACHE/venv-ref on first use
# (torch: a few GB). Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
export LAZARUS_BENCH_STRIDE=${LAZARUS_BENCH_STRIDE:-8}
export LAZARUS_BENCH_BATCH=${LAZARUS_BENCH_BATCH:-32}
export LAZARUS_BENCH_ITERS=${LAZARUS_BENCH_ITERS:-5}
unset LAZARUS_SIMD RAYON_NUM_THREADS

flags=$(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2)
simd_flags=$(tr ' ' '\n' <<<"$flags" | grep -E '^(avx2|fma|avx512[a-z_0-9]*|avx_vnni|amx[a-z_0-9]*)$' | sort | tr '\n' ' ')
echo "== machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
echo "== SIMD flags: $simd_flags"
echo "== commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src crates benches || echo ' (with uncommitted changes)')"
echo "== load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
cargo bench --profile dev --quiet --no-run --bench finetune_blocks 2>/dev/null

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
for precision in f32 bf16; do
  echo "== lazarus, blocks' products in $precision"
  LAZARUS_BENCH_PRECISION=$precision cargo bench --profile dev --quiet --bench finetune_blocks \
    | tee "$logs/lazarus-$precision"
done
echo "== PyTorch"
python3 scripts/bench_finetune_torch.py | tee "$logs/torch"
echo "== load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

best_lazarus() { grep '^best:' "$logs/lazarus-$1" | awk '{print $2}'; }
# The faster layout of each PyTorch precision.
best_torch() { grep "^pytorch $1 " "$logs/torch" | sed 's/.*best \([0-9.]*\) ms.*/\1/' | sort -g | head -1; }
for precision in f32 bf16; do
  ours=$(best_lazarus "$precision")
  theirs=$(best_torch "$precision")
  awk -v p="$precision" -v a="$ours" -v b="$theirs" \
    'BEGIN { printf "== %s: lazarus %.2f ms/image, PyTorch %.2f ms/image (faster layout): lazarus %.2fx\n", p, a, b, b / a }'
done
best_f32=$(best_torch f32)
best_bf16=$(best_torch bf16)
strongest=$(printf '%s\n%s\n' "$best_f32" "$best_bf16" | sort -g | head -1)
awk -v a="$(best_lazarus bf16)" -v b="$strongest" \
  'BEGIN { printf "== lazarus bf16 against the fastest PyTorch row: %.2fx\n", b / a }'
