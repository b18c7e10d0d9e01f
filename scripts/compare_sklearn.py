#!/usr/bin/env python3
"""Linear head against scikit-learn's LogisticRegression on the same features.

Usage: python3 scripts/compare_sklearn.py ROOT DATASET [LAZARUS_BINARY]

Reads the dataset's rows of the published shards of ROOT/features/<fingerprint>/
(joined by content id, scripts/lazarus_features.py) and the labels and splits
of ROOT/jobs/datasets/DATASET/images.csv, standardises with
training-split statistics (as lazarus does), fits LogisticRegression (lbfgs,
max_iter 5000) on train with C=1 and with C chosen on the validation split,
and reports test accuracy and macro-F1. Then
runs `lazarus train --head linear` (AdamW lr 1e-3, 60 epochs or
$LAZARUS_EPOCHS, the epoch with the best val/accuracy kept) on the same root
and prints both, and the difference in points.

Uses $LAZARUS_CACHE/venv-ref and installs numpy, safetensors and scikit-learn
there with pip where missing. Not part of CI.
"""
import csv
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import venv_ref  # noqa: E402
import lazarus_features  # noqa: E402

PACKAGES = ["numpy", "safetensors", "scikit-learn"]


def ensure_venv():
    venv_ref.ensure(["numpy", "safetensors", "sklearn"], PACKAGES)

def main():
    ensure_venv()
    import numpy as np
    from safetensors.numpy import load_file
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    root, dataset = sys.argv[1], sys.argv[2]
    binary = sys.argv[3] if len(sys.argv) > 3 else os.path.join("target", "release", "lazarus")
    features, image_index = lazarus_features.read_features(root, dataset, np, load_file)
    features = features.astype(np.float64)
    info = json.load(open(os.path.join(root, "jobs", "datasets", dataset, "dataset.json")))
    class_order = info["class_order"]
    labels = {}
    with open(os.path.join(root, "jobs", "datasets", dataset, "images.csv")) as f:
        for record in csv.DictReader(f):
            if record["label"]:
                labels[int(record["index"])] = (class_order.index(record["label"]), record["split"])
    keep = np.array([i in labels for i in image_index])
    features, image_index = features[keep], image_index[keep]
    y = np.array([labels[i][0] for i in image_index])
    split = np.array([labels[i][1] for i in image_index])
    train, test = split == "train", split == "test"
    mean = features[train].mean(0)
    std = features[train].std(0)
    std[std < 1e-6] = 1.0
    x = (features - mean) / std
    val = split == "val"

    def fit(c):
        model = LogisticRegression(solver="lbfgs", C=c, max_iter=5000)
        model.fit(x[train], y[train])
        return model

    # C=1 (scikit-learn's default), and C chosen on the validation split, as
    # lazarus chooses its kept epoch on the validation split.
    default = fit(1.0)
    grid = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0]
    scored = [(accuracy_score(y[val], m.predict(x[val])), -c, m) for c in grid for m in [fit(c)]]
    best_val, neg_c, tuned = max(scored, key=lambda t: (t[0], t[1]))
    results = {}
    for name, model in (("C=1", default), (f"C={-neg_c:g} (best val accuracy {best_val:.4f})", tuned)):
        predicted = model.predict(x[test])
        results[name] = (accuracy_score(y[test], predicted), f1_score(y[test], predicted, average="macro"))

    out = subprocess.run(
        [binary, "--root", root, "train", "--dataset", dataset, "--encoder",
         os.environ.get("LAZARUS_ENCODER", "efficientnet-lite0"), "--head", "linear",
         "--epochs", os.environ.get("LAZARUS_EPOCHS", "60"), "--json"],
        check=True, capture_output=True, text=True,
    )
    report = json.loads(out.stdout)
    ours = report["test"]["test/accuracy"]
    ours_f1 = report["test"]["test/macro_f1"]
    print(f"{dataset}: {features.shape[0]} labelled rows x {features.shape[1]}, "
          f"train {int(train.sum())}, test {int(test.sum())}")
    for name, (accuracy, f1) in results.items():
        print(f"scikit-learn LogisticRegression(lbfgs, {name}): test accuracy {accuracy:.4f}, macro-F1 {f1:.4f}, "
              f"lazarus minus this: {100 * (ours - accuracy):+.1f} accuracy points")
    print(f"lazarus train --head linear --epochs {report['epochs_run']} (run {report['run_id']}, best epoch "
          f"{report['best_epoch'] + 1}): test accuracy {ours:.4f}, macro-F1 {ours_f1:.4f}")


if __name__ == "__main__":
    main()
