#!/usr/bin/env bash
# Times the README's two set-up commands as a newcomer meets them: a clean
# clone in a throwaway folder with an empty cargo home (no registry, no
# compiled crates), an empty target folder (the clone's ./target), an empty lazarus cache (no
# weights, no data) and an empty pip cache. Runs `bash scripts/demo.sh`, then
# `bash scripts/test.sh` right after it, and prints the wall time of each.
#
#   bash scripts/fresh_machine.sh [REV]     # REV: what to clone (default HEAD)
#
# Needs what a fresh machine has: Rust (rustup), gcc, Python 3 with pip, and
# the package registries. Takes 20-30 minutes on 2 cores and about 8 GB of
# disk under $FRESH_DIR (default: a new folder under /tmp), removed at the end
# unless FRESH_KEEP=1. The toolchain itself is not re-installed (rustup's
# toolchains stay where they are): everything the project compiles or fetches
# is.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
rev="${1:-HEAD}"
work="${FRESH_DIR:-$(mktemp -d /tmp/lazarus-fresh-XXXXXX)}"
mkdir -p "$work"
cleanup() { [ "${FRESH_KEEP:-0}" = 1 ] || rm -rf "$work"; }
trap cleanup EXIT

# The toolchain's cargo and rustc, found before CARGO_HOME moves away.
cargo_bin=$(dirname "$(command -v cargo)")
export PATH="$cargo_bin:$PATH"
export RUSTUP_HOME="${RUSTUP_HOME:-$HOME/.rustup}"
export CARGO_HOME="$work/cargo-home"
# The clone's own ./target: empty, as on a fresh machine.
unset CARGO_TARGET_DIR
export LAZARUS_CACHE="$work/lazarus-cache"
export PIP_CACHE_DIR="$work/pip-cache"
unset LAZARUS_QUEUE LAZARUS_FEATURE_STORE
mkdir -p "$CARGO_HOME"

git clone --quiet "$repo" "$work/lazarus"
git -C "$work/lazarus" checkout --quiet "$rev"
cd "$work/lazarus"
echo "fresh machine in $work: $(git log -1 --format='%h %s')"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "cpu flags: $(grep -m1 -o -w -E 'avx512f|avx2' /proc/cpuinfo | sort -u | xargs)"

seconds() { awk -v s="$1" -v e="$2" 'BEGIN { printf "%.0f", e - s }'; }
start=$(date +%s.%N)
bash scripts/demo.sh > "$work/demo.log" 2>&1 || { tail -n 40 "$work/demo.log"; echo "demo failed"; exit 1; }
demo_done=$(date +%s.%N)
bash scripts/test.sh > "$work/test.log" 2>&1 || { tail -n 40 "$work/test.log"; echo "tests failed"; exit 1; }
tests_done=$(date +%s.%N)

demo_secs=$(seconds "$start" "$demo_done")
test_secs=$(seconds "$demo_done" "$tests_done")
echo "demo.sh:  ${demo_secs} s ($((demo_secs / 60)) min $((demo_secs % 60)) s), build included"
grep -E '^(== building|built lazarus)' "$work/demo.log" || true
echo "test.sh:  ${test_secs} s ($((test_secs / 60)) min $((test_secs % 60)) s) right after the demo"
grep -E '^test result' "$work/test.log" | awk '{ passed += $4; failed += $6 } END { print "tests: " passed " passed, " failed " failed" }'
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
