#!/usr/bin/env bash
# Builds the lazarus binary in the one profile that the demo, the asset fetch
# and the tests share (the dev profile: our crate and the hot dependencies
# optimised, see Cargo.toml), so a fresh machine compiles the dependency tree
# once. Prints the binary's path on stdout; progress notes go to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
bin="$target/debug/lazarus"
if [ -x "$bin" ]; then
  echo "== building lazarus (dev profile; only what changed, usually seconds)" >&2
else
  echo "== building lazarus for the first time (dev profile, about 380 compile units: roughly 10 minutes on 2 cores; later builds take seconds)" >&2
fi
started=$(date +%s)
# A note a minute, so a long first build never looks stuck.
(
  ticks=0
  while sleep 5; do
    ticks=$((ticks + 1))
    [ $((ticks % 12)) -eq 0 ] || continue
    units=$(ls "$target/debug/.fingerprint" 2>/dev/null | wc -l)
    echo "   still building: $units compile units done, $((ticks / 12)) min so far" >&2
  done
) >&2 &
ticker=$!
trap 'kill $ticker 2>/dev/null || true' EXIT
cargo build --quiet --bin lazarus
echo "built lazarus in $(( $(date +%s) - started )) s: $bin" >&2
echo "$bin"
