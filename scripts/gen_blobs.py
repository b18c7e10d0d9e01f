#!/usr/bin/env python3
"""Small-blob segmentation images for scripts/bench_blobs.sh (issue 22).

COUNT 224x224 RGB images/NNN.png on a textured background (two gratings of
random frequency plus per-pixel noise, a random tint) with 3 to 10 blobs of
radius 3 to 6 px, brighter than the background; masks/NNN.png is 255 inside
a blob, 0 elsewhere. Standard library only (PNG through zlib), deterministic
from --seed.

    python3 scripts/gen_blobs.py OUT_DIR [--count 300] [--seed 0]
"""

import argparse
import math
import os
import random
import struct
import zlib

SIZE = 224


def write_png(path, width, height, channels, rows):
    """rows: list of bytes, each width*channels long (8-bit gray or RGB)."""
    raw = b"".join(b"\x00" + row for row in rows)

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    color = 2 if channels == 3 else 0
    header = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def image(rng):
    blobs = []
    for _ in range(rng.randint(3, 10)):
        r = rng.uniform(3.0, 6.0)
        blobs.append((rng.uniform(r, SIZE - r), rng.uniform(r, SIZE - r), r))
    fx, fy = rng.uniform(0.05, 0.35), rng.uniform(0.05, 0.35)
    tint = [0.85 + 0.3 * rng.random() for _ in range(3)]
    rgb_rows, mask_rows = [], []
    for y in range(SIZE):
        rgb = bytearray(SIZE * 3)
        mask = bytearray(SIZE)
        near = [b for b in blobs if abs(y + 0.5 - b[1]) <= b[2]]
        for x in range(SIZE):
            inside = any((x + 0.5 - cx) ** 2 + (y + 0.5 - cy) ** 2 <= r * r for cx, cy, r in near)
            noise = rng.random() - 0.5
            if inside:
                value = 185.0 + 40.0 * noise
                mask[x] = 255
            else:
                value = 100.0 + 35.0 * math.sin(x * fx) * math.cos(y * fy) + 50.0 * noise
            for c in range(3):
                rgb[3 * x + c] = max(0, min(255, int(value * tint[c])))
        rgb_rows.append(bytes(rgb))
        mask_rows.append(bytes(mask))
    return rgb_rows, mask_rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    os.makedirs(os.path.join(args.out, "masks"), exist_ok=True)
    for i in range(args.count):
        rng = random.Random(args.seed * 1_000_003 + i)
        rgb, mask = image(rng)
        write_png(os.path.join(args.out, "images", f"{i:03}.png"), SIZE, SIZE, 3, rgb)
        write_png(os.path.join(args.out, "masks", f"{i:03}.png"), SIZE, SIZE, 1, mask)


if __name__ == "__main__":
    main()
