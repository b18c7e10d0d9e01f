#!/usr/bin/env bash
# Screenshots of `lazarus experiments report` in headless Chromium.
#
#   bash scripts/report_screenshots.sh [ROOT] [SHOTS_DIR]
#
# ROOT is a lazarus root with runs (default: demo/; when it has no
# experiments database yet, scripts/demo.sh makes one on the real elpv data,
# DEMO_IMAGES and the other DEMO_* settings apply). The report is written to
# a temp folder and opened from file:// with Debian's `chromium`
# (apt-get install -y chromium) with networking features off and a fresh
# profile. Three screenshots land in SHOTS_DIR (default: the cargo target
# folder's report-screenshots/): index.png (the runs), experiment.png (the
# largest experiment: parallel coordinates and ablations) and run.png (that
# experiment's best run: learning curves, confusion matrix, ROC/PR). Each is
# checked for drawn charts: the experiment page must show the parallel
# coordinates' red best-run line, the run page the curves' blue and orange
# lines; a blank or unstyled page fails the script. readme.png (the top of
# the experiment page, smaller) is README's docs/report.png.
set -euo pipefail
cd "$(dirname "$0")/.."
root="${1:-demo}"
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
shots="${2:-$target/report-screenshots}"
browser=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$browser" ]; then
  echo "chromium not found: apt-get install -y chromium" >&2
  exit 1
fi

bin=$(bash scripts/build.sh)
if [ ! -f "$root/experiments/experiments.db" ]; then
  DEMO_ROOT="$root" bash scripts/demo.sh
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
site="$work/report"
"$bin" --root "$root" experiments report --out "$site"

# The largest experiment page, and its best run (first starred row of its best-runs table).
experiment=$(ls -S "$site"/experiments/*.html | head -n 1)
run=$(python3 - "$experiment" <<'EOF'
import re, sys
page = open(sys.argv[1], encoding="utf-8").read()
best = page.split("Best runs</h2>", 1)[1]
print(re.search(r'href="\.\./runs/([^/]+)/index\.html"', best).group(1))
EOF
)

mkdir -p "$shots"
shoot() {
  local profile
  profile=$(mktemp -d)
  "$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$profile" --hide-scrollbars --force-device-scale-factor="${4:-1}" \
    --window-size="$3" --screenshot="$2" "file://$1" >/dev/null 2>&1
  rm -rf "$profile"
  echo "wrote $2 ($(stat -c %s "$2") bytes) of $1"
}
shoot "$site/index.html" "$shots/index.png" 1400,1100
shoot "$experiment" "$shots/experiment.png" 1400,1800
shoot "$site/runs/$run/index.html" "$shots/run.png" 1400,2600
# README's picture: the top of the same page (best runs, parallel coordinates), at 0.8 scale.
shoot "$experiment" "$shots/readme.png" 1150,1180 0.8

# Decode the PNGs (standard library only) and look for the charts' colours.
python3 - "$shots" <<'EOF'
import sys
sys.dont_write_bytecode = True  # no __pycache__ in scripts/
sys.path.insert(0, "scripts")
from png_pixels import near, pixels

checks = {
    "index.png": [("the page's dark header bar", (17, 24, 39), 5000)],
    "experiment.png": [("the best run's red line", (220, 38, 38), 150)],
    "readme.png": [("the best run's red line", (220, 38, 38), 150)],
    "run.png": [("blue curves", (31, 119, 180), 300), ("orange curves", (255, 127, 14), 150)],
}
for name, wanted in checks.items():
    image = pixels(f"{sys.argv[1]}/{name}")
    white = sum(1 for p in image if p[0] > 245 and p[1] > 245 and p[2] > 245)
    distinct = len(set(image))
    print(f"{name}: {len(image)} pixels, {distinct} colours, {100 * white / len(image):.0f}% white")
    assert distinct > 200, f"{name} looks blank ({distinct} colours)"
    for what, colour, least in wanted:
        found = sum(1 for p in image if near(p, colour))
        print(f"  {what}: {found} pixels")
        assert found >= least, f"{name}: {what} not drawn ({found} pixels)"
print("screenshots show the pages and their charts")
EOF
