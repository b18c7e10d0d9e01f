#!/usr/bin/env python3
"""Does a filtered copy of an elpv cell as an input channel help? (issue 22)

Usage: python3 scripts/elpv_input_filters.py OUT [VARIANT ...]

EL cells are gray, so the encoder's three input channels carry one image
three times; one could carry the faint cracks enhanced instead. For each
variant (default: all of VARIANTS below) this writes filtered copies of the
2,624 cells (scripts/fetch_assets.sh puts them in $LAZARUS_CACHE/data/elpv)
to OUT/VARIANT/images, registers them in their own root OUT/VARIANT/root,
extracts pooled Lite0 features of every stage (`enqueue --layers all`) and
scores them with scikit-learn's logistic regression in 5-fold stratified
cross-validation over all cells (standardised per fold, C from a grid by
the folds' mean accuracy): accuracy ± std over the folds, macro-F1 over the
4 grades, and defective (probability >= 0.5) vs functional from the
4-class probabilities. Cross-validation rather than the demo's 264-cell
test split, which moved by 4-5 points on a filter this calls neutral
(BENCHMARKS.md "A high-pass copy of the cell as an input channel").
LAZARUS_BIN names the binary (default: scripts/build.sh's). Uses
$LAZARUS_CACHE/venv-ref. Not part of CI.
"""
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import venv_ref  # noqa: E402
import lazarus_features  # noqa: E402

CACHE = os.environ.get("LAZARUS_CACHE", os.path.expanduser("~/.cache/lazarus"))
C_GRID = (0.003, 0.01, 0.03)
# Lite0's stage widths, then its head convolution: `--layers all` rows.
LAST_LAYER = slice(16 + 24 + 40 + 80 + 112 + 192 + 320, None)


def filters(np, ndimage):
    """Variant name -> function of a gray cell in [0, 1] -> 3 channels."""

    def high_pass(cell, sigma):
        return np.clip(0.5 + 3.0 * (cell - ndimage.gaussian_filter(cell, sigma)), 0, 1)

    def black_hat(cell, size):
        closed = ndimage.grey_closing(cell, size=(size, size))
        return np.clip(4.0 * (closed - cell), 0, 1)

    def local_contrast(cell, sigma):
        centred = cell - ndimage.gaussian_filter(cell, sigma)
        spread = np.sqrt(ndimage.gaussian_filter(centred * centred, sigma)) + 0.02
        return np.clip(0.5 + 0.15 * centred / spread, 0, 1)

    return {
        "cell": lambda c: (c, c, c),
        "hp1": lambda c: (c, c, high_pass(c, 1.0)),
        "hp2": lambda c: (c, c, high_pass(c, 2.0)),
        "hp4": lambda c: (c, c, high_pass(c, 4.0)),
        "hp2x3": lambda c: (high_pass(c, 2.0),) * 3,
        "ihp14": lambda c: (c, high_pass(c, 1.0), high_pass(c, 4.0)),
        "bh5": lambda c: (c, c, black_hat(c, 5)),
        "hpbh": lambda c: (c, high_pass(c, 2.0), black_hat(c, 5)),
        "lcn": lambda c: (local_contrast(c, 15.0),) * 3,
    }


def write_copies(variant, make, out, np, Image):
    source = os.path.join(CACHE, "data", "elpv")
    images = os.path.join(out, "images")
    os.makedirs(images, exist_ok=True)
    with open(os.path.join(source, "labels.csv")) as f:
        labels = f.read()
    with open(os.path.join(out, "labels.csv"), "w") as f:
        f.write(labels)
    for name in sorted(os.listdir(os.path.join(source, "images"))):
        target = os.path.join(images, name)
        if os.path.exists(target):
            continue
        gray = Image.open(os.path.join(source, "images", name)).convert("L")
        cell = np.asarray(gray, dtype=np.float32) / 255
        rgb = np.stack(make(cell), axis=-1)
        Image.fromarray((rgb * 255 + 0.5).astype(np.uint8)).save(target + ".tmp.png")
        os.replace(target + ".tmp.png", target)
    print(f"{variant}: copies in {images}", flush=True)


def extract(binary, root, labels):
    def lazarus(*args):
        done = subprocess.run([binary, "--root", root, *args], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"lazarus {' '.join(args)} failed:\n{done.stderr}")

    shown = subprocess.run([binary, "--root", root, "dataset", "show", "elpv"], capture_output=True)
    if shown.returncode != 0:
        lazarus("dataset", "add", "elpv", labels, "--label-column", "2")
    lazarus("enqueue", "--dataset", "elpv", "--encoder", "efficientnet-lite0", "--layers", "all")
    lazarus("run-worker", "--until-empty")


def cross_validate(features, probability, np):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    grade = np.round(probability * 3).astype(int)
    folds = list(StratifiedKFold(5, shuffle=True, random_state=0).split(features, grade))
    best = None
    for c in C_GRID:
        accuracy, macro_f1, defective = [], [], []
        for train, test in folds:
            model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
            model.fit(features[train], grade[train])
            predicted = model.predict(features[test])
            said_defective = model.predict_proba(features[test])[:, 2:].sum(axis=1) >= 0.5
            accuracy.append(accuracy_score(grade[test], predicted))
            macro_f1.append(f1_score(grade[test], predicted, average="macro"))
            defective.append(accuracy_score(probability[test] >= 0.5, said_defective))
        row = (np.mean(accuracy), np.std(accuracy), np.mean(macro_f1), np.mean(defective), c)
        if best is None or row[0] > best[0]:
            best = row
    return best


def main():
    venv_ref.ensure(
        ["numpy", "scipy", "PIL", "sklearn", "safetensors"],
        ["numpy", "scipy", "pillow", "scikit-learn", "safetensors"],
    )
    import numpy as np
    from PIL import Image
    from safetensors.numpy import load_file
    from scipy import ndimage

    if len(sys.argv) < 2:
        sys.exit(__doc__)
    out = os.path.abspath(sys.argv[1])
    known = filters(np, ndimage)
    variants = sys.argv[2:] or list(known)
    unknown = [v for v in variants if v not in known]
    if unknown:
        sys.exit(f"unknown variants {unknown}: use {', '.join(known)}")
    here = os.path.dirname(os.path.abspath(__file__))
    binary = os.environ.get("LAZARUS_BIN") or subprocess.run(
        ["bash", os.path.join(here, "build.sh")], check=True, capture_output=True, text=True
    ).stdout.strip().splitlines()[-1]
    rows = []
    for variant in variants:
        folder = os.path.join(out, variant)
        write_copies(variant, known[variant], folder, np, Image)
        root = os.path.join(folder, "root")
        extract(binary, root, os.path.join(folder, "labels.csv"))
        features, indices = lazarus_features.read_features(root, "elpv", np, load_file)
        _, images = lazarus_features.dataset_images(root, "elpv")
        probability = np.array([float(images[i]["label"]) for i in indices])
        features = features.astype(np.float32)
        every = cross_validate(features, probability, np)
        last = cross_validate(features[:, LAST_LAYER], probability, np)
        rows.append((variant, every, last))
        print(f"{variant}: every stage {every[0]:.3f} ± {every[1]:.3f}", flush=True)
    print("| input (5-fold CV) | every stage: accuracy | macro-F1 | defective | last layer: accuracy |")
    print("|---|---|---|---|---|")
    for variant, every, last in rows:
        print(
            f"| {variant} | {every[0]:.3f} ± {every[1]:.3f} | {every[2]:.3f} | {every[3]:.3f} "
            f"| {last[0]:.3f} ± {last[1]:.3f} |"
        )


if __name__ == "__main__":
    main()
