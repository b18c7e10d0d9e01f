#!/usr/bin/env bash
# Fetches the real elpv-dataset (2,624 solar-cell EL images, non-commercial
# licence: never commit it) with pip into the lazarus cache, outside git.
# Idempotent: a second run finds the data and does nothing.
#   result: $LAZARUS_CACHE/data/elpv/labels.csv and images/
set -euo pipefail
cache="${LAZARUS_CACHE:-$HOME/.cache/lazarus}"
target="$cache/data/elpv"
if [ -f "$target/labels.csv" ] && [ -d "$target/images" ]; then
  echo "elpv-dataset: present in $target"
  exit 0
fi
mkdir -p "$cache/downloads" "$cache/data"
python3 -m pip download --quiet --no-deps --disable-pip-version-check \
  "elpv-dataset==1.0.0.post1" -d "$cache/downloads"
wheel=$(ls "$cache"/downloads/elpv_dataset-1.0.0.post1-*.whl | head -n 1)
staging=$(mktemp -d "$cache/data/.tmp-elpv-XXXXXX")
trap 'rm -rf "$staging"' EXIT
python3 - "$wheel" "$staging" <<'PY'
import sys, zipfile, pathlib
wheel, out = sys.argv[1], pathlib.Path(sys.argv[2])
prefix = "elpv_dataset/data/"
with zipfile.ZipFile(wheel) as archive:
    for member in archive.namelist():
        if member.startswith(prefix) and not member.endswith("/"):
            destination = out / member[len(prefix):]
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(archive.read(member))
PY
rm -rf "$target"
mv "$staging" "$target"
trap - EXIT
echo "elpv-dataset: $(ls "$target/images" | wc -l) images in $target"
