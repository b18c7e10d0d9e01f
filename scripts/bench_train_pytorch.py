#!/usr/bin/env python3
"""The PyTorch side of the head-training speed comparison in BENCHMARKS.md.

Reads the same generated cache that `cargo bench --bench train_head -- speed`
trains on (the rows of ROOT/features/<fingerprint>/shard-*.safetensors with a
.done marker joined to ROOT/jobs/datasets/speed/images.csv by content id, see
scripts/lazarus_features.py; labels and splits from images.csv) and runs the same
work as `lazarus train`: standardise with training-split statistics, linear
head, AdamW (lr 1e-3, weight decay 1e-4), batch 256 shuffled, 10 epochs, loss
and accuracy on train and val after every epoch, test accuracy of the best
epoch's head at the end. torch.set_num_threads(2). Timed from reading the
shards to the end (interpreter and import time excluded), best of 3.

Uses the venv of scripts/reference_lite.py ($LAZARUS_CACHE/venv-ref) and
installs torch, numpy and safetensors there with pip where missing. Not part of CI.
"""
import csv
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import venv_ref  # noqa: E402
import lazarus_features  # noqa: E402
import time

PACKAGES = ["torch", "numpy", "safetensors"]


def ensure_venv():
    venv_ref.ensure(["numpy", "safetensors", "torch"], PACKAGES)

def run(root, dataset, epochs, torch, np, load_file):
    started = time.perf_counter()
    features, image_index = lazarus_features.read_features(root, dataset, np, load_file)
    labels = {}
    with open(os.path.join(root, "jobs", "datasets", dataset, "images.csv")) as f:
        for record in csv.DictReader(f):
            labels[int(record["index"])] = (record["label"], record["split"])
    classes = sorted({label for label, _ in labels.values()})
    class_index = {c: i for i, c in enumerate(classes)}
    y = np.array([class_index[labels[i][0]] for i in image_index], dtype=np.int64)
    split = np.array([labels[i][1] for i in image_index])
    parts = {name: np.nonzero(split == name)[0] for name in ("train", "val", "test")}
    train_rows = features[parts["train"]].astype(np.float64)
    mean = train_rows.mean(0)
    std = train_rows.std(0)
    std[std < 1e-6] = 1.0
    mean = torch.from_numpy(mean.astype(np.float32))
    std = torch.from_numpy(std.astype(np.float32))
    data = {
        name: (torch.from_numpy(features[rows_of]), torch.from_numpy(y[rows_of]))
        for name, rows_of in parts.items()
    }

    torch.manual_seed(0)
    head = torch.nn.Linear(features.shape[1], len(classes))
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def evaluate(name):
        x, target = data[name]
        with torch.inference_mode():
            total_loss, correct = 0.0, 0
            for start in range(0, len(target), 1024):
                xb = (x[start : start + 1024].float() - mean) / std
                logits = head(xb)
                total_loss += torch.nn.functional.cross_entropy(
                    logits, target[start : start + 1024], reduction="sum"
                ).item()
                correct += (logits.argmax(1) == target[start : start + 1024]).sum().item()
        return total_loss / len(target), correct / len(target)

    x_train, y_train = data["train"]
    best, best_state = -1.0, None
    for _ in range(epochs):
        order = torch.randperm(len(y_train))
        for start in range(0, len(order), 256):
            batch = order[start : start + 256]
            xb = (x_train[batch].float() - mean) / std
            loss = loss_fn(head(xb), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        evaluate("train")
        _, val_accuracy = evaluate("val")
        if val_accuracy > best:
            best = val_accuracy
            best_state = {k: v.clone() for k, v in head.state_dict().items()}
    head.load_state_dict(best_state)
    _, test_accuracy = evaluate("test")
    return time.perf_counter() - started, len(y_train), test_accuracy


def main():
    ensure_venv()
    import numpy as np
    import torch
    from safetensors.numpy import load_file

    torch.set_num_threads(2)
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.join("target", "bench-train", "speed")
    epochs = 10
    best = None
    for _ in range(3):
        seconds, train_rows, accuracy = run(root, "speed", epochs, torch, np, load_file)
        best = seconds if best is None else min(best, seconds)
    print(
        f"pytorch {torch.__version__} train: 60000 x 1280 f16, 10 classes, linear, {epochs} epochs, "
        f"batch 256 (load shards, per-epoch train+val metrics, test): best {best:.2f} s, "
        f"{train_rows * epochs / best:.0f} training samples/s, test accuracy {accuracy:.4f}"
    )


if __name__ == "__main__":
    main()
