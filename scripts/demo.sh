#!/usr/bin/env bash
# The main job end to end on real images. Grows with the pipeline; today it
# fetches the real data, builds lazarus and registers the elpv solar-cell
# dataset. Everything lands under demo/ (git-ignored); a second run reuses it.
set -euo pipefail
cd "$(dirname "$0")/.."
root="${DEMO_ROOT:-demo}"
cache="${LAZARUS_CACHE:-$HOME/.cache/lazarus}"
say() { printf '\n== %s\n' "$*"; }

say "fetching real assets into $cache (pip, no model hub)"
bash scripts/fetch_assets.sh

say "building lazarus (release)"
cargo build --release --quiet
lazarus() { ./target/release/lazarus --root "$root" "$@"; }

say "registering the elpv dataset (2,624 EL images of solar cells, 4 defect grades)"
if lazarus dataset show elpv >/dev/null 2>&1; then
  echo "dataset elpv already registered in $root: reusing it"
  lazarus dataset show elpv
else
  lazarus dataset add elpv "$cache/data/elpv/labels.csv" --label-column 2
fi

say "datasets under $root"
lazarus dataset list
