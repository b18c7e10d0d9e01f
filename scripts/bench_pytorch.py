#!/usr/bin/env python3
"""PyTorch CPU throughput of EfficientNet-Lite0 for the comparison in BENCHMARKS.md.

Batch 64 (or $LAZARUS_BENCH_BATCH), 224 px, torch.set_num_threads(2), channels_last,
inference_mode, random weights (speed does not depend on the values), best of
$LAZARUS_BENCH_ITERS (default 3) timed runs after one warm-up. Prints images/s, and
images per CPU second (process CPU time, all threads) like benches/encoder.rs.

Uses the venv of scripts/reference_lite.py ($LAZARUS_CACHE/venv-ref) and installs
torch and efficientnet-lite-pytorch there with pip where they are missing. Not part of CI.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import venv_ref  # noqa: E402
import time

PACKAGES = ["torch", "efficientnet-lite-pytorch==0.1.0"]


def ensure_venv():
    venv_ref.ensure(["torch", "efficientnet_lite_pytorch"], PACKAGES)

def main():
    ensure_venv()
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    batch = int(os.environ.get("LAZARUS_BENCH_BATCH", "64"))
    iterations = int(os.environ.get("LAZARUS_BENCH_ITERS", "3"))
    torch.set_num_threads(2)
    model = EfficientNet.from_name("efficientnet-lite0").eval()
    model = model.to(memory_format=torch.channels_last)
    images = torch.randn(batch, 3, 224, 224).to(memory_format=torch.channels_last)
    best = float("inf")
    with torch.inference_mode():
        model.extract_features(images).mean((2, 3))
        for iteration in range(iterations):
            start, cpu_start = time.perf_counter(), time.process_time()
            model.extract_features(images).mean((2, 3))
            seconds = time.perf_counter() - start
            cpu = time.process_time() - cpu_start
            print(f"iteration {iteration}: {seconds:.3f} s, {batch / seconds:.1f} images/s; "
                  f"{cpu:.2f} CPU s, {batch / cpu:.1f} images per CPU second")
            best = min(best, seconds)
    print(f"pytorch {torch.__version__} efficientnet-lite0 batch {batch} 224px: "
          f"best {batch / best:.1f} images/s")


if __name__ == "__main__":
    main()
