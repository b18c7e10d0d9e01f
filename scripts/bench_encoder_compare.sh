#!/usr/bin/env bash
# Encoder speed on this machine, in one run, against the peers of issue 23:
#   1. lazarus encoder compute only: `cargo bench --bench encoder` (EfficientNet-Lite0,
#      installed weights, batch 64, 224 px, pooled features, best of N forwards), at the
#      widest SIMD level the CPU has and, on AVX-512 machines, again with LAZARUS_SIMD=avx2
#      (the AVX2+FMA kernels forced; not the same as an AVX2-only CPU, see BENCHMARKS.md);
#   2. ONNX Runtime compute only (scripts/bench_onnxruntime.py compute: the graph exported
#      from efficientnet-lite-pytorch with the same weights, intra_op_num_threads = cores);
#   3. PyTorch eager (scripts/bench_pytorch.py: channels_last, inference_mode);
#   4. lazarus end to end: `cargo bench --bench worker` (`lazarus run-worker --until-empty`
#      over 512 elpv PNGs, release build, best of LAZARUS_BENCH_RUNS runs), both levels;
#   5. a plain Python script end to end: PIL decode + resize + crop, ONNX Runtime, f16 .npy
#      per batch (scripts/bench_onnxruntime.py end-to-end, same 512 PNGs).
# Then the CPU, its flags, the load average before and after, and the ratios.
# LAZARUS_BENCH_ITERS (default 5) and LAZARUS_BENCH_RUNS (default 3) set the repeats.
# Needs scripts/fetch_assets.sh's assets; the Python peers install into
# $LAZARUS_CACHE/venv-ref on first use (torch, onnxruntime: a few GB). Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
export LAZARUS_BENCH_ITERS=${LAZARUS_BENCH_ITERS:-5}
export LAZARUS_BENCH_RUNS=${LAZARUS_BENCH_RUNS:-3}
export LAZARUS_BENCH_BATCH=64
# The benches must measure the machine's own default, whatever the caller's shell says.
unset LAZARUS_SIMD RAYON_NUM_THREADS

flags=$(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2)
has() { grep -qw "$1" <<<"$flags"; }
if has avx512f; then kind="AVX-512"; elif has avx2 && has fma; then kind="AVX2"; else kind="no AVX2"; fi
simd_flags=$(tr ' ' '\n' <<<"$flags" | grep -E '^(avx|avx2|fma|f16c|avx512[a-z_0-9]*|avx_vnni|amx[a-z_0-9]*)$' | sort | tr '\n' ' ')
echo "== machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, kind $kind"
echo "== SIMD flags: $simd_flags"
echo "== commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src benches Cargo.toml || echo ' (with uncommitted changes)')"
echo "== load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== building (release)"
cargo build --release --quiet --bin lazarus
cargo bench --quiet --no-run --bench encoder --bench worker 2>/dev/null

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
run() { # name, command...
    local name=$1
    shift
    echo "== $name"
    "$@" 2>&1 | tee "$logs/$name"
}
run lazarus-compute cargo bench --quiet --bench encoder
if [ "$kind" = "AVX-512" ]; then
    run lazarus-compute-avx2 env LAZARUS_SIMD=avx2 cargo bench --quiet --bench encoder
fi
run onnxruntime-compute python3 scripts/bench_onnxruntime.py compute
run pytorch-compute python3 scripts/bench_pytorch.py
run lazarus-worker cargo bench --quiet --bench worker
if [ "$kind" = "AVX-512" ]; then
    run lazarus-worker-avx2 env LAZARUS_SIMD=avx2 cargo bench --quiet --bench worker
fi
run onnxruntime-end-to-end python3 scripts/bench_onnxruntime.py end-to-end
echo "== load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

best() { # the "best X images/s" figure of a log (0 when absent)
    [ -f "$logs/$1" ] || { echo 0; return; }
    grep -o 'best [0-9.]* images/s' "$logs/$1" | tail -1 | awk '{print $2}' | grep . || echo 0
}
per_cpu() { # the best "X images per CPU second" of a log
    [ -f "$logs/$1" ] || { echo 0; return; }
    grep -o '[0-9.]* images per CPU second' "$logs/$1" | awk 'BEGIN { m = 0 } $1 > m { m = $1 } END { print m }'
}
onnx=$(best onnxruntime-compute)
echo
echo "== summary ($kind, $(nproc) cores; images/s, higher is better; ratio against ONNX Runtime compute only)"
printf '%-58s %10s %10s\n' "" "images/s" "vs ORT"
line() { awk -v name="$1" -v a="$2" -v b="$onnx" 'BEGIN { printf "%-58s %10.1f %9.2fx\n", name, a, (b > 0 ? a / b : 0) }'; }
line "lazarus encoder compute only" "$(best lazarus-compute)"
[ -f "$logs/lazarus-compute-avx2" ] && line "lazarus encoder compute only, LAZARUS_SIMD=avx2" "$(best lazarus-compute-avx2)"
line "ONNX Runtime compute only" "$onnx"
line "PyTorch eager compute only" "$(best pytorch-compute)"
line "lazarus run-worker end to end, elpv PNGs" "$(best lazarus-worker)"
[ -f "$logs/lazarus-worker-avx2" ] && line "lazarus run-worker end to end, LAZARUS_SIMD=avx2" "$(best lazarus-worker-avx2)"
line "Python + ONNX Runtime end to end, elpv PNGs" "$(best onnxruntime-end-to-end)"
echo "images per CPU second (process CPU time, all threads; ONNX Runtime's and PyTorch's include" \
    "their threads' spinning): lazarus compute $(per_cpu lazarus-compute)" \
    "$( [ -f "$logs/lazarus-compute-avx2" ] && echo "(avx2 $(per_cpu lazarus-compute-avx2))")," \
    "lazarus run-worker $(per_cpu lazarus-worker), ONNX Runtime $(per_cpu onnxruntime-compute)," \
    "PyTorch $(per_cpu pytorch-compute)"
echo "acceptance (issue 23): compute >= 1.2x ORT, run-worker >= 1.0x ORT, at load below 2.5"
