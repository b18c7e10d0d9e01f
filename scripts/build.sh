#!/usr/bin/env bash
# Builds the lazarus binary in the one profile that the demo, the asset fetch
# and the tests share (the dev profile: our kernels crate and the hot
# dependencies optimised, see Cargo.toml), so a fresh machine compiles the dependency tree
# once. Prints the binary's path on stdout; progress notes go to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
# Where cargo puts it (CARGO_TARGET_DIR and cargo's config included).
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
bin="$target/debug/lazarus"
if [ -x "$bin" ]; then
  echo "== building lazarus (dev profile; only what changed: usually seconds, minutes after a Rust or dependency update)" >&2
else
  echo "== building lazarus for the first time (dev profile, about 380 crates: about 7 minutes on 2 cores, downloads included; later builds take seconds)" >&2
fi
started=$(date +%s)
# A note a minute, so a long first build never looks stuck.
(
  ticks=0
  while sleep 5; do
    ticks=$((ticks + 1))
    [ $((ticks % 12)) -eq 0 ] || continue
    echo "   still building lazarus: $((ticks / 12)) min so far" >&2
  done
) >&2 &
ticker=$!
trap 'kill $ticker 2>/dev/null || true' EXIT
cargo build --quiet --bin lazarus
echo "built lazarus in $(( $(date +%s) - started )) s: $bin" >&2
echo "$bin"
