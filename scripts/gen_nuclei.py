#!/usr/bin/env python3
"""Real fluorescence nuclei for segmentation (issue 22), from the stardist wheel.

The stardist package (BSD-3-Clause) ships one 512x512 fluorescence image of
the 2018 Data Science Bowl (BBBC038, CC0: Caicedo et al., Nature Methods 2019)
with its instance mask: 125 nuclei, 14 to 27 px across (median 24). This cuts
both into a 4x4 grid of 128 px tiles (no overlap, so no pixel is in two
splits) and writes OUT_DIR/images/rRcC.png (8-bit gray, the 16-bit values
scaled by 255 / the image's maximum), OUT_DIR/masks/rRcC.png (255 on a
nucleus, 0 elsewhere) and OUT_DIR/manifest.csv (path,label,split,mask). The
split is fixed by grid position: one test tile in every row and every column
(4), two val tiles, ten train tiles: 16 tiles are too few for a random split.

    python3 scripts/gen_nuclei.py WHEEL OUT_DIR
    python3 scripts/gen_nuclei.py WHEEL --otsu   # the threshold baseline's Dice per split

Standard library only; the TIFFs are read as what they are (little-endian,
uncompressed, 16-bit gray in strips) and anything else is refused by name.
"""

import argparse
import csv
import os
import struct
import sys
import zipfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_blobs import write_png  # noqa: E402

IMAGE = "stardist/data/images/img2d.tif"
MASK = "stardist/data/images/mask2d.tif"
TILE = 128
TEST = {(0, 1), (1, 3), (2, 0), (3, 2)}
VAL = {(1, 1), (2, 2)}


def read_tiff_u16(data, name):
    """(width, height, values) of an uncompressed 16-bit gray TIFF."""
    if data[:4] != b"II*\x00":
        sys.exit(f"{name}: not a little-endian TIFF (starts {data[:4]!r})")
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    sizes = {3: 2, 4: 4}
    tags = {}
    for i in range(count):
        tag, kind, n, value = struct.unpack_from("<HHII", data, ifd + 2 + 12 * i)
        if kind not in sizes:
            continue
        size = sizes[kind]
        if n * size <= 4:
            values = struct.unpack_from("<" + ("H" if size == 2 else "I") * n, data, ifd + 2 + 12 * i + 8)
        else:
            values = struct.unpack_from("<" + ("H" if size == 2 else "I") * n, data, value)
        tags[tag] = list(values)
    width, height = tags[256][0], tags[257][0]
    expected = {258: 16, 259: 1, 277: 1}
    for tag, want in expected.items():
        have = tags.get(tag, [1])[0]
        if have != want:
            sys.exit(f"{name}: TIFF tag {tag} is {have}, this reader takes {want} (16-bit, uncompressed, one sample)")
    pixels = b"".join(data[offset : offset + length] for offset, length in zip(tags[273], tags[279]))
    if len(pixels) != width * height * 2:
        sys.exit(f"{name}: {len(pixels)} bytes of pixels for {width}x{height} at 16 bits")
    return width, height, struct.unpack(f"<{width * height}H", pixels)


def load(wheel):
    with zipfile.ZipFile(wheel) as archive:
        image = read_tiff_u16(archive.read(IMAGE), IMAGE)
        mask = read_tiff_u16(archive.read(MASK), MASK)
    if image[:2] != mask[:2] or image[:2] != (512, 512):
        sys.exit(f"{wheel}: image {image[:2]} and mask {mask[:2]}, expected 512x512 both")
    return image[2], mask[2]


def split_of(row, column):
    if (row, column) in TEST:
        return "test"
    if (row, column) in VAL:
        return "val"
    return "train"


def tiles(values):
    """(row, column, list of 128 rows of 128 values) over the 4x4 grid."""
    for row in range(4):
        for column in range(4):
            rows = []
            for y in range(row * TILE, (row + 1) * TILE):
                start = y * 512 + column * TILE
                rows.append(values[start : start + TILE])
            yield row, column, rows


def write(wheel, out):
    image, mask = load(wheel)
    scale = 255.0 / max(image)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    os.makedirs(os.path.join(out, "masks"), exist_ok=True)
    listed = []
    for (row, column, image_rows), (_, _, mask_rows) in zip(tiles(image), tiles(mask)):
        stem = f"r{row}c{column}"
        write_png(
            os.path.join(out, "images", stem + ".png"),
            TILE,
            TILE,
            1,
            [bytes(min(255, round(v * scale)) for v in r) for r in image_rows],
        )
        write_png(os.path.join(out, "masks", stem + ".png"), TILE, TILE, 1, [bytes(255 if v else 0 for v in r) for r in mask_rows])
        listed.append((f"images/{stem}.png", "nuclei", split_of(row, column), f"masks/{stem}.png"))
    with open(os.path.join(out, "manifest.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split", "mask"])
        writer.writerows(listed)


def otsu(values):
    """Otsu's threshold over the training tiles' 16-bit values."""
    histogram = [0] * (max(values) + 1)
    for v in values:
        histogram[v] += 1
    total, weighted = len(values), sum(i * h for i, h in enumerate(histogram))
    below = below_weighted = 0
    best, threshold = -1.0, 0
    for level, h in enumerate(histogram):
        below += h
        below_weighted += level * h
        above = total - below
        if below == 0 or above == 0:
            continue
        mean_below, mean_above = below_weighted / below, (weighted - below_weighted) / above
        between = below * above * (mean_below - mean_above) ** 2
        if between > best:
            best, threshold = between, level
    return threshold


def baseline(wheel):
    """Dice of `value > Otsu threshold` (fitted on the train tiles) per split, pooled over its pixels."""
    image, mask = load(wheel)
    by_split = {}
    for (row, column, image_rows), (_, _, mask_rows) in zip(tiles(image), tiles(mask)):
        entry = by_split.setdefault(split_of(row, column), ([], []))
        entry[0].extend(v for r in image_rows for v in r)
        entry[1].extend(v > 0 for r in mask_rows for v in r)
    threshold = otsu(by_split["train"][0])
    print(f"otsu threshold {threshold} (of the 16-bit values, fitted on the train tiles)")
    for split in ("train", "val", "test"):
        values, truth = by_split[split]
        both = sum(1 for v, t in zip(values, truth) if v > threshold and t)
        predicted = sum(1 for v in values if v > threshold)
        print(f"otsu {split} Dice {2 * both / (predicted + sum(truth)):.4f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("wheel")
    parser.add_argument("out", nargs="?")
    parser.add_argument("--otsu", action="store_true", help="print the threshold baseline instead of writing tiles")
    args = parser.parse_args()
    if args.otsu:
        baseline(args.wheel)
    elif args.out:
        write(args.wheel, args.out)
    else:
        parser.error("OUT_DIR is needed unless --otsu")


if __name__ == "__main__":
    main()
