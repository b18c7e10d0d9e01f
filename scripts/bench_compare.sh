#!/usr/bin/env bash
# Encoder forward on CPU: lazarus (benches/encoder.rs) and PyTorch
# (scripts/bench_pytorch.py) back to back in one run, then the ratio.
# Both take LAZARUS_BENCH_BATCH (64) and LAZARUS_BENCH_ITERS (3).
set -euo pipefail
cd "$(dirname "$0")/.."
simd=$(grep -q -w avx512f /proc/cpuinfo && echo AVX-512 || (grep -q -w avx2 /proc/cpuinfo && echo AVX2 || echo "no AVX2"))
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, $simd"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
ours_log=$(mktemp)
theirs_log=$(mktemp)
trap 'rm -f "$ours_log" "$theirs_log"' EXIT
cargo bench --quiet --bench encoder | tee "$ours_log"
python3 scripts/bench_pytorch.py | tee "$theirs_log"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
ours=$(grep -o 'best [0-9.]* images/s' "$ours_log" | awk '{print $2}')
theirs=$(grep -o 'best [0-9.]* images/s' "$theirs_log" | awk '{print $2}')
awk -v a="$ours" -v b="$theirs" 'BEGIN { printf "lazarus %.1f images/s, pytorch %.1f images/s, ratio %.2fx\n", a, b, a / b }'
# Images per CPU second move less with other work on the machine: the best of each side.
best_per_cpu() { grep -o '[0-9.]* images per CPU second' "$1" | awk 'BEGIN { m = 0 } $1 > m { m = $1 } END { print m }'; }
awk -v a="$(best_per_cpu "$ours_log")" -v b="$(best_per_cpu "$theirs_log")" \
    'BEGIN { printf "per CPU second: lazarus %.1f, pytorch %.1f, ratio %.2fx\n", a, b, a / b }'
