"""The rest of the course in one comparison (issue 21): classical pipelines, an MLP, an LSTM and the cnn, on cats
vs dogs and on scikit-learn's handwritten digits written as images; seed 003's digit reader; every classical model
on pets against Golle's 82.7 % (2008, SVMs on colour and texture features of 13 000 Asirra images).

    flock /tmp/fovea-bench.lock python bench/course.py ../shared/data --out runs/course
    python bench/course.py ../shared/data --out runs/course --stages digits,reader   # a part of it

Stages (all by default):
- ``digits``: ``fovea compare`` on the digits (1797 images of 8 x 8, 16 levels, written as 28 px PNGs; a seeded
  stratified quarter is val), the networks each given ``--digits-time`` (default 2 min), no flips (a mirrored
  digit is another glyph): ``--augment none --no-tta``.
- ``reader``: seed 003's digit reader: an MLP 784-256-64-10 (ReLU, ReLU, sigmoid, softmax) on the 28 px gray
  digits, RMSprop, batch 20, 30 epochs; at the article's learning rate 2e-5 and at 1e-3.
- ``pets``: ``fovea compare`` on pets with Fovea's defaults (a 5-minute budget per network on a CPU).
- ``classical``: every classical model (4 features x 4 classifiers) on pets.

Each stage writes its table under --out (compare.md / .csv / .json / .png, reader.json, classical.md) and the
machine it ran on; docs/course.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

COMPARED = "colorhist-nb,hog-svm,combo-svm,mlp,lstm,cnn"


def write_digits(root: Path, size: int = 28, seed: int = 0) -> Path:
    """scikit-learn's digits as PNGs in ROOT/train|val/DIGIT/ (bilinear upscaling of the 8 x 8 images to
    ``size``; a quarter of every class, seeded, in val). Written once; reused when present."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    if (root / "val").is_dir():
        return root
    d = load_digits()
    rng = np.random.default_rng(seed)
    for c in range(10):
        idx = np.flatnonzero(d.target == c)
        rng.shuffle(idx)
        for j, i in enumerate(idx):
            out = root / ("val" if j % 4 == 0 else "train") / str(c)
            out.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray((d.images[i] / 16 * 255).round().astype(np.uint8))
            img.resize((size, size), Image.BILINEAR).save(out / f"{c}_{i:04d}.png")
    return root


def compare_stage(data: Path, out: Path, **kw: object) -> list[dict]:
    from fovea.compare import compare

    return compare(data, COMPARED.split(","), out=out, progress=False, **kw)


def reader_stage(digits: Path, out: Path) -> list[dict]:
    """Seed 003's network and optimiser on the digits: the article's lr and Fovea's RMSprop default."""
    import fovea
    from fovea.models import summarize

    rows = []
    arch = {"hidden": [784, 256, 64], "activations": ["relu", "relu", "sigmoid"], "gray": True,
            "batch_norm": False}
    for lr in (2e-5, 1e-3):
        t0 = time.perf_counter()
        run = fovea.train(digits, model="mlp", image_size=28, extra=arch, dropout=0.0, optimizer="rmsprop", lr=lr,
                          weight_decay=0.0, batch_size=20, epochs=30, schedule="constant", augment="none",
                          label_smoothing=0.0, tta=False, out=str(out / f"reader-lr{lr:g}"), progress=False)
        m = json.loads((run / "metrics.json").read_text())
        rows.append({"lr": lr, "accuracy": m["accuracy"], "accuracy_95ci": m.get("accuracy_95ci"),
                     "train_seconds": m["train_seconds"], "wall_seconds": round(time.perf_counter() - t0, 1),
                     "parameters": summarize(run).parameters, "n_train": m["n_train"], "n_val": m["n_val"]})
    return rows


def classical_stage(pets: Path, out: Path) -> list[dict]:
    import fovea
    from fovea.models._classical import CLASSIFIERS, FEATURES

    rows = []
    for f in FEATURES:
        for c in CLASSIFIERS:
            t0 = time.perf_counter()
            run = fovea.train(pets, model=f"{f}-{c}", out=str(out / "classical" / f"{f}-{c}"), progress=False)
            m = json.loads((run / "metrics.json").read_text())
            meta = json.loads((run / "model.json").read_text())
            rows.append({"model": f"{f}-{c}", "accuracy": m["accuracy"], "roc_auc": m["roc_auc"],
                         "train_accuracy": m.get("train_accuracy"), "train_seconds": m["train_seconds"],
                         "wall_seconds": round(time.perf_counter() - t0, 1),
                         "chosen": {k: v for k, v in meta["transfer"]["classical"].items()
                                    if k not in ("feature", "classifier")}})
    return rows


def main() -> None:
    from fovea._system import machine

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path, help="the folder holding pets (../shared/data)")
    ap.add_argument("--out", type=Path, default=Path("runs/course"))
    ap.add_argument("--stages", default="digits,reader,pets,classical")
    ap.add_argument("--digits-time", type=float, default=120.0, help="seconds per network on the digits")
    args = ap.parse_args()
    stages = args.stages.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    digits = write_digits(args.out / "digits-data")
    started = time.perf_counter()
    if "digits" in stages:
        # Digits are not mirror-symmetric: no flip augmentation and no mirror TTA (Fovea's photo defaults)
        compare_stage(digits, args.out / "digits", time=args.digits_time, augment="none", tta=False)
        print((args.out / "digits" / "compare.md").read_text())
    if "reader" in stages:
        rows = reader_stage(digits, args.out / "reader")
        (args.out / "reader.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
        for r in rows:
            print(f"003 reader, RMSprop lr {r['lr']:g}: {r['accuracy']:.4f} val accuracy ({r['n_val']} digits), "
                  f"{r['parameters']:,} parameters, {r['train_seconds']:.1f} s training")
    if "pets" in stages:
        compare_stage(args.data / "pets", args.out / "pets")
        print((args.out / "pets" / "compare.md").read_text())
    if "classical" in stages:
        rows = classical_stage(args.data / "pets", args.out)
        lines = ["| model | val acc | ROC-AUC | train acc | fit s | chosen |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['model']} | {r['accuracy']:.3f} | {r['roc_auc']:.3f} | {r['train_accuracy']:.3f} | "
                  f"{r['train_seconds']:.1f} | {', '.join(f'{k} {v:.3g}' for k, v in r['chosen'].items())} |"
                  for r in rows]
        text = "\n".join(lines) + f"\n\n{machine()}\n"
        (args.out / "classical.md").write_text(text)
        (args.out / "classical.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
        print(text)
    print(f"bench/course.py: {time.perf_counter() - started:.0f} s on {machine()}")


if __name__ == "__main__":
    main()
