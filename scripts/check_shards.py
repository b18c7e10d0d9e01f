#!/usr/bin/env python3
"""Documented check that lazarus feature shards are plain safetensors.

Loads every published shard of a feature folder with the official
`safetensors.numpy.load_file` and compares the arrays with a second,
independent decoding of the same file (JSON header + numpy.frombuffer), and
the row count with the shard's `.done` marker.

    python3 -m pip install safetensors numpy   # once
    python3 scripts/check_shards.py demo/features/<fingerprint>/
"""
import json
import pathlib
import struct
import sys

import numpy as np
from safetensors.numpy import load_file

DTYPES = {"F16": np.float16, "F32": np.float32, "I64": np.int64, "U8": np.uint8}


def raw_decode(path):
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    body = data[8 + header_len :]
    arrays = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        arrays[name] = np.frombuffer(body[start:end], dtype=DTYPES[info["dtype"]]).reshape(info["shape"])
    return arrays, header.get("__metadata__", {})


def main(folder):
    folder = pathlib.Path(folder)
    shards = sorted(folder.glob("shard-*.safetensors"))
    if not shards:
        sys.exit(f"{folder}: no shards")
    rows = 0
    for shard in shards:
        marker = shard.with_suffix(".done")
        if not marker.exists():
            continue  # unpublished: never read
        official = load_file(str(shard))
        raw, metadata = raw_decode(shard)
        assert official.keys() == raw.keys(), (shard, official.keys(), raw.keys())
        for name in official:
            assert official[name].dtype == raw[name].dtype, (shard, name)
            assert np.array_equal(official[name], raw[name]), (shard, name)
        n = official["pooled"].shape[0]
        # Each row names its image by the sha256 of the file (issue 18).
        assert official["content_sha256"].shape == (n, 32), shard
        assert json.loads(marker.read_text())["rows"] == n, shard
        rows += n
    print(f"{len(shards)} shards, {rows} rows: safetensors.numpy.load_file agrees with the raw bytes; encoder {metadata.get('encoder')}")


if __name__ == "__main__":
    main(sys.argv[1])
