#!/usr/bin/env bash
# Head training speed: lazarus (benches/train_head.rs speed) and the same loop
# in PyTorch (scripts/bench_train_pytorch.py) back to back on the same
# generated 60,000 x 1,280 f16 cache, then the ratio of the two best times.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${LAZARUS_BENCH_DIR:-$PWD/target/bench-train}"
ours_log=$(mktemp)
theirs_log=$(mktemp)
trap 'rm -f "$ours_log" "$theirs_log"' EXIT
cargo bench --quiet --bench train_head -- speed | tee "$ours_log"
python3 scripts/bench_train_pytorch.py "$dir/speed" | tee "$theirs_log"
echo "load average after both: $(cut -d' ' -f1-3 /proc/loadavg)"
ours=$(grep -o 'best [0-9.]* s' "$ours_log" | awk '{print $2}')
theirs=$(grep -o 'best [0-9.]* s' "$theirs_log" | awk '{print $2}')
awk -v a="$ours" -v b="$theirs" 'BEGIN { printf "lazarus %.2f s, pytorch %.2f s: lazarus takes %.2fx the time of pytorch (below 1 is faster)\n", a, b, a / b }'
