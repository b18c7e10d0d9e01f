"""Reads a lazarus dataset's cached features the way lazarus does (issue 18).

Rows live in ROOT/features/<fingerprint>/shard-*.safetensors (published when
the `.done` marker exists), shared by every dataset; each row names its image
by the sha256 of the image file (`content_sha256`, U8 [rows, 32]). A
dataset's images are the rows of ROOT/jobs/datasets/DATASET/images.csv that
its current version lists (`added` <= version, `removed` empty or later); an
image's `id` is its sha256 in hex (64 digits, or the first 16 in manifests
written before issue 18). Used by the comparison scripts; not part of CI.
"""
import csv
import glob
import json
import os
import sys


def dataset_images(root, dataset):
    """{index: record} of the images the dataset's current version lists."""
    folder = os.path.join(root, "jobs", "datasets", dataset)
    info = json.load(open(os.path.join(folder, "dataset.json")))
    version = info.get("version", 1)
    images = {}
    with open(os.path.join(folder, "images.csv")) as f:
        for record in csv.DictReader(f):
            added = int(record.get("added") or 1)
            removed = record.get("removed") or ""
            if added <= version and (not removed or int(removed) > version):
                images[int(record["index"])] = record
    return info, images


def read_features(root, dataset, np, load_file, fingerprint=None):
    """(features [n, dim], manifest index [n]) of the dataset's images, from
    the fingerprint folder holding them (the given one, or the only one)."""
    _, images = dataset_images(root, dataset)
    by_id = {}
    for index, record in images.items():
        by_id[record["id"][:16]] = (record["id"], index)
    pattern = os.path.join(root, "features", fingerprint or "*", "shard-*.safetensors")
    found = {}
    for path in sorted(glob.glob(pattern)):
        if not os.path.exists(path[: -len(".safetensors")] + ".done"):
            continue
        tensors = load_file(path)
        if "content_sha256" not in tensors:
            continue
        folder = os.path.dirname(path)
        rows, indices = found.setdefault(folder, ([], []))
        for row, digest in enumerate(tensors["content_sha256"]):
            full = bytes(digest).hex()
            match = by_id.get(full[:16])
            if match and full.startswith(match[0]):
                rows.append(tensors["pooled"][row])
                indices.append(match[1])
    found = {k: v for k, v in found.items() if v[0]}
    if not found:
        sys.exit(f"no published rows of dataset {dataset} under {root}/features")
    if len(found) > 1:
        sys.exit(f"several feature folders hold dataset {dataset}: {sorted(found)}; pass one")
    rows, indices = next(iter(found.values()))
    return np.stack(rows), np.array(indices, dtype=np.int64)
