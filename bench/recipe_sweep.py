"""Sweep training recipes and print validation accuracy and wall time per recipe (JSON lines).

Used to choose Fovea's CPU defaults for ``cnn`` (run on a GPU for speed: accuracy does not depend on
the device, only the time does) and the GPU from-scratch recipe. Usage:

    python bench/recipe_sweep.py DATA GROUP [--out FILE]     # GROUP: cpu | gpu | all
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import fovea

CPU = [
    dict(name="c64-s2-24-e40", image_size=64, epochs=40, extra={"widths": [24, 48, 96, 192], "stem_stride": 2}),
    dict(name="c64-s2-24-e40-light", image_size=64, epochs=40, augment="light", extra={"widths": [24, 48, 96, 192], "stem_stride": 2}),
    dict(name="c64-s2-24-e80", image_size=64, epochs=80, extra={"widths": [24, 48, 96, 192], "stem_stride": 2}),
    dict(name="c96-s2-24-e30", image_size=96, epochs=30, extra={"widths": [24, 48, 96, 192], "stem_stride": 2}),
    dict(name="c96-s2-24-e60", image_size=96, epochs=60, extra={"widths": [24, 48, 96, 192], "stem_stride": 2}),
    dict(name="c64-s2-32-e40", image_size=64, epochs=40, extra={"widths": [32, 64, 128, 256], "stem_stride": 2}),
    dict(name="c64-s1-16-e40", image_size=64, epochs=40, extra={"widths": [16, 32, 64, 128], "stem_stride": 1}),
    dict(name="c64-s2-24-e40-adamw", image_size=64, epochs=40, optimizer="adamw", lr=3e-3, weight_decay=0.05, extra={"widths": [24, 48, 96, 192], "stem_stride": 2}),
    dict(name="c64-s2-24-e40-lr.2", image_size=64, epochs=40, lr=0.2, extra={"widths": [24, 48, 96, 192], "stem_stride": 2}),
    dict(name="c64-s2-24-e40-lr.05", image_size=64, epochs=40, lr=0.05, extra={"widths": [24, 48, 96, 192], "stem_stride": 2}),
    dict(name="c64-s2-24-e40-bs64", image_size=64, epochs=40, batch_size=64, extra={"widths": [24, 48, 96, 192], "stem_stride": 2}),
]
GPU = [
    dict(name="g-cnn128-32-e100", image_size=128, epochs=100, extra={"widths": [32, 64, 128, 256], "stem_stride": 2}),
    dict(name="g-cnn128-64-e150", image_size=128, epochs=150, extra={"widths": [64, 128, 256, 512], "stem_stride": 2}),
    dict(name="g-cnn160-48-e200", image_size=160, epochs=200, extra={"widths": [48, 96, 192, 384, 512], "stem_stride": 2}),
    dict(name="g-resnet18-128-e150", model="resnet18", image_size=128, epochs=150),
    dict(name="g-resnet26d-160-e200", model="resnet26d", image_size=160, epochs=200),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("group", choices=["cpu", "gpu", "all"])
    ap.add_argument("--out")
    ap.add_argument("--only", help="comma-separated recipe names")
    a = ap.parse_args()
    recipes = {"cpu": CPU, "gpu": GPU, "all": CPU + GPU}[a.group]
    if a.only:
        recipes = [r for r in recipes if r["name"] in a.only.split(",")]
    for r in recipes:
        r = dict(r)
        name = r.pop("name")
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            run = fovea.train(a.data, out=f"{d}/run", progress=False, **{"model": "cnn", **r})
            metrics = json.loads((run / "metrics.json").read_text())
        line = json.dumps({"recipe": name, **r, "val_acc": metrics["accuracy"], "best_epoch": metrics["best_epoch"],
                           "train_seconds": metrics["train_seconds"], "wall_seconds": round(time.perf_counter() - t, 1)})
        print(line, flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
