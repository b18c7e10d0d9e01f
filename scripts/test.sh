#!/usr/bin/env bash
# The test command: installs the real assets (weights, sample photos, elpv)
# into the cache if missing, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch_assets.sh
cargo test "$@"
