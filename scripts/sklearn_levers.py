#!/usr/bin/env python3
"""scikit-learn's logistic regression on one feature folder of a dataset.

Usage: python3 scripts/sklearn_levers.py ROOT DATASET FINGERPRINT LABEL

Standardises with training-split statistics (as lazarus does), fits
LogisticRegression (lbfgs, max_iter 5000) on train for each C of a grid,
with and without balanced class weights, keeps the pair with the best
validation accuracy, and
prints test accuracy and macro-F1 for the 4 defect grades and for defective
(probability >= 0.5) vs functional. On a folder of views (`enqueue --views`:
several rows per image) every view of a training image is a training row,
and validation and test average the class probabilities over an image's
views, as lazarus evaluates; C_GRID (comma list) narrows the C grid. The peer row of BENCHMARKS.md's elpv
table (scripts/bench_elpv_layers.sh). Uses $LAZARUS_CACHE/venv-ref.
"""
import csv
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import venv_ref  # noqa: E402
import lazarus_features  # noqa: E402


def main():
    venv_ref.ensure(["numpy", "safetensors", "sklearn"], ["numpy", "safetensors", "scikit-learn"])
    import numpy as np
    from safetensors.numpy import load_file
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    root, dataset, fingerprint, label = sys.argv[1:5]
    features, image_index = lazarus_features.read_features(root, dataset, np, load_file, fingerprint)
    features = features.astype(np.float64)
    labels = {}
    with open(os.path.join(root, "jobs", "datasets", dataset, "images.csv")) as f:
        for record in csv.DictReader(f):
            if record["label"]:
                labels[int(record["index"])] = (float(record["label"]), record["split"])
    keep = np.array([i in labels for i in image_index])
    features, image_index = features[keep], image_index[keep]
    probability = np.array([labels[i][0] for i in image_index])
    split = np.array([labels[i][1] for i in image_index])
    train, val, test = split == "train", split == "val", split == "test"
    mean, std = features[train].mean(0), features[train].std(0)
    std[std < 1e-6] = 1.0
    x = (features - mean) / std
    # An image's rows (one per view) are consecutive in a shard.
    images, first = np.unique(image_index, return_index=True)
    views = len(image_index) // len(images)

    def per_image(model, mask):
        """Predicted class per image of `mask`: probabilities averaged over its views."""
        p = model.predict_proba(x[mask])
        p = p.reshape(-1, views, p.shape[1]).mean(1)
        return model.classes_[p.argmax(1)]

    grid = [float(c) for c in os.environ.get("C_GRID", "").split(",") if c] or \
        [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
    order = np.argsort(image_index, kind="stable")
    x, image_index, probability, split = x[order], image_index[order], probability[order], split[order]
    train, val, test = split == "train", split == "val", split == "test"
    for task, y in (("4 classes", np.round(probability * 3).astype(int)),
                    ("defective >= 0.5", (probability >= 0.5).astype(int))):
        best = None
        y_val, y_test = y[val][::views], y[test][::views]
        for weights in (None, "balanced"):
            for c in grid:
                model = LogisticRegression(solver="lbfgs", C=c, max_iter=5000, class_weight=weights)
                model.fit(x[train], y[train])
                score = accuracy_score(y_val, per_image(model, val))
                if best is None or score > best[0]:
                    best = (score, f"C={c:g}, class_weight={weights}", model)
        predicted = per_image(best[2], test)
        print(f"scikit-learn {label} ({features.shape[1]} features, {views} view(s)), {task}, {best[1]}: "
              f"test accuracy {accuracy_score(y_test, predicted):.4f}, "
              f"macro-F1 {f1_score(y_test, predicted, average='macro'):.4f}")


if __name__ == "__main__":
    main()
