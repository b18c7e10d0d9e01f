#!/usr/bin/env bash
# Reads `lazarus experiments export --format mlflow` back with MLflow itself.
#
#   bash scripts/mlflow_check.sh [ROOT]
#
# Installs the `mlflow` package with pip into a throwaway virtual environment
# (kept under the cache as venv-mlflow, so a second run skips the install;
# MLFLOW_VERSION picks the version), makes runs unless a lazarus ROOT is
# given (a 2-class PNG dataset written here, features from efficientnet-lite0
# with seeded random weights, so no download, a 12-head sweep, one anomaly
# run and one run left FAILED), exports them twice into a fresh store, and
# checks with mlflow.search_runs and MlflowClient.get_metric_history that
# MLflow finds the same runs (once each), status, times, params, tags, every
# per-step metric value with its step and timestamp, every summary metric
# and the artifacts; and that the second export wrote nothing.
# Not part of CI: installing MLflow (about 100 MB of wheels) takes minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${LAZARUS_CACHE:-$HOME/.cache/lazarus}"
venv="${MLFLOW_VENV:-$cache/venv-mlflow}"
version="${MLFLOW_VERSION:-3.17.2}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
say() { printf '\n== %s\n' "$*"; }

if ! "$venv/bin/python" -c "import mlflow" 2>/dev/null; then
  say "installing mlflow==$version into $venv (pip)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "mlflow==$version"
fi

bin=$(bash scripts/build.sh)

root="${1:-}"
if [ -z "$root" ]; then
  root="$work/root"
  lazarus() { "$bin" --root "$root" "$@"; }
  say "making runs in $root"
  python3 scripts/mlflow_check.py make-images "$work/shapes"
  lazarus dataset add shapes "$work/shapes" >/dev/null
  lazarus enqueue --dataset shapes --encoder efficientnet-lite0 --weights random:0 >/dev/null
  lazarus run-worker --until-empty >/dev/null
  cat > "$work/sweep.toml" <<'EOF'
name = "shapes-heads"
dataset = "shapes"
encoder = "efficientnet-lite0"
epochs = 5
batch_size = 16
[grid]
head = ["linear", "mlp"]
lr = [0.001, 0.01, 0.05]
seed = [0, 1]
EOF
  lazarus sweep "$work/sweep.toml" >/dev/null
  lazarus train --dataset shapes --encoder efficientnet-lite0 --task anomaly --normal-label disc \
    --experiment shapes-anomaly >/dev/null
  # A run that fails: a memory budget too small for one batch.
  lazarus train --dataset shapes --encoder efficientnet-lite0 --experiment shapes-broken \
    --memory-budget 1KiB >/dev/null 2>&1 || true
fi
lazarus() { "$bin" --root "$root" "$@"; }

say "exporting twice into $work/mlruns"
lazarus experiments export --format mlflow --out "$work/mlruns" --json > "$work/export.json"
lazarus experiments export --format mlflow --out "$work/mlruns" --json > "$work/again.json"
python3 - "$work/export.json" "$work/again.json" <<'EOF'
import json, sys
first, again = (json.load(open(p)) for p in sys.argv[1:])
assert again["files_written"] == 0 and again["artifacts_copied"] == 0, again
assert again["run_ids"] == first["run_ids"], "the second export named other runs"
print(f"first export: {first['runs']} runs, {first['files_written']} files, {first['artifacts_copied']} artifacts; "
      f"second: {again['files_unchanged']} files and {again['artifacts_unchanged']} artifacts unchanged, nothing written")
EOF

say "reading the store back with MLflow"
MLFLOW_ALLOW_FILE_STORE=true "$venv/bin/python" scripts/mlflow_check.py check \
  "$root/experiments/experiments.db" "$work/mlruns" "$work/export.json"
