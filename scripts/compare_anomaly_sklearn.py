#!/usr/bin/env python3
"""Anomaly scores against scikit-learn on the same features and split.

Usage: python3 scripts/compare_anomaly_sklearn.py ROOT DATASET [--binary LAZARUS]
           [--normal-label 0.0] [--anomaly-label 1.0] [--k 5]

Reads the published shards of ROOT/features/DATASET/<fingerprint>/ and the
labels and splits of ROOT/jobs/datasets/DATASET/images.csv, keeps the
training images with a normal label as the memory bank, standardises every
row with the bank's mean and std (as lazarus does), and scores the val and
test images of the normal and anomaly labels (every other label when
--anomaly-label is not given) with
- scikit-learn's NearestNeighbors(n_neighbors=k): the mean distance to the k
  nearest bank rows;
- scikit-learn's LedoitWolf: the Mahalanobis distance.
Then runs `lazarus train --task anomaly` with --scorer knn (same k) and
--scorer mahalanobis on the same root and prints both ROC-AUCs, PR-AUCs
(average precision) and the differences.

Uses $LAZARUS_CACHE/venv-ref and installs numpy, safetensors and scikit-learn
there with pip where missing. Not part of CI.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import venv_ref  # noqa: E402
import lazarus_features  # noqa: E402

PACKAGES = ["numpy", "safetensors", "scikit-learn"]


def read_features(root, dataset, np, load_file):
    features, image_index = lazarus_features.read_features(root, dataset, np, load_file)
    return features.astype(np.float64), image_index


def main():
    venv_ref.ensure(["numpy", "safetensors", "sklearn"], PACKAGES)
    import numpy as np
    from safetensors.numpy import load_file
    from sklearn.covariance import LedoitWolf
    from sklearn.metrics import average_precision_score, roc_auc_score
    from sklearn.neighbors import NearestNeighbors

    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("dataset")
    parser.add_argument("--binary", default=os.path.join("target", "release", "lazarus"))
    parser.add_argument("--encoder", default="efficientnet-lite0")
    parser.add_argument("--normal-label", action="append", required=True)
    parser.add_argument("--anomaly-label", action="append", default=[])
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args()

    features, image_index = read_features(args.root, args.dataset, np, load_file)
    labels = {}
    with open(os.path.join(args.root, "jobs", "datasets", args.dataset, "images.csv")) as f:
        for record in csv.DictReader(f):
            if record["label"]:
                labels[int(record["index"])] = (record["label"], record["split"])
    keep = np.array([i in labels for i in image_index])
    features, image_index = features[keep], image_index[keep]
    label = np.array([labels[i][0] for i in image_index])
    split = np.array([labels[i][1] for i in image_index])
    normal = np.isin(label, args.normal_label)
    anomalous = np.isin(label, args.anomaly_label) if args.anomaly_label else ~normal
    bank = (split == "train") & normal
    mean = features[bank].mean(0)
    std = features[bank].std(0)
    std[std < 1e-6] = 1.0
    x = (features - mean) / std

    started = time.perf_counter()
    neighbours = NearestNeighbors(n_neighbors=args.k).fit(x[bank])
    gaussian = LedoitWolf().fit(x[bank])
    print(f"{args.dataset}: {features.shape[0]} labelled rows x {features.shape[1]}; memory bank "
          f"{int(bank.sum())} normal training rows ({', '.join(args.normal_label)}); "
          f"Ledoit-Wolf shrinkage {gaussian.shrinkage_:.4f}")
    sklearn_results = {}
    for name in ("val", "test"):
        evaluated = (split == name) & (normal | anomalous)
        y = anomalous[evaluated]
        distances, _ = neighbours.kneighbors(x[evaluated])
        knn = distances.mean(1)
        mahalanobis = np.sqrt(gaussian.mahalanobis(x[evaluated]))
        sklearn_results[name] = {
            "knn": (roc_auc_score(y, knn), average_precision_score(y, knn)),
            "mahalanobis": (roc_auc_score(y, mahalanobis), average_precision_score(y, mahalanobis)),
        }
        print(f"  {name}: {int((~y).sum())} normal, {int(y.sum())} anomalous")
    print(f"scikit-learn fit and score: {time.perf_counter() - started:.2f} s")

    extra = []
    for value in args.normal_label:
        extra += ["--normal-label", value]
    for value in args.anomaly_label:
        extra += ["--anomaly-label", value]
    for scorer, flags in (("knn", ["--k", str(args.k)]), ("mahalanobis", [])):
        started = time.perf_counter()
        out = subprocess.run(
            [args.binary, "--root", args.root, "train", "--dataset", args.dataset, "--encoder",
             args.encoder, "--task", "anomaly", "--scorer", scorer, *flags, *extra, "--json"],
            check=True, capture_output=True, text=True,
        )
        elapsed = time.perf_counter() - started
        report = json.loads(out.stdout)
        m = report["metrics"]
        reference = "NearestNeighbors" if scorer == "knn" else "LedoitWolf"
        what = f"knn k={args.k}" if scorer == "knn" else "mahalanobis"
        for name in ("val", "test"):
            auc, ap = sklearn_results[name][scorer]
            print(f"{what:>15} {name:>4}: scikit-learn {reference} ROC-AUC {auc:.4f} PR-AUC {ap:.4f} | "
                  f"lazarus ROC-AUC {m[name + '/roc_auc']:.4f} PR-AUC {m[name + '/pr_auc']:.4f} | "
                  f"difference {m[name + '/roc_auc'] - auc:+.4f}")
        print(f"{'':>15} lazarus run {report['run_id']} ({elapsed:.2f} s for the whole process)")


if __name__ == "__main__":
    main()
