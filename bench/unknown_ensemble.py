"""The unknown-image score of an ensemble against its members, through the served path (issue 17, docs/unknown.md
"Ensembles and seeds"): ``fovea.load(run).outputs(x).unknown_scores`` for the ensemble that ``fovea train DATA
--seeds N`` wrote and for each of its members, on the selection set (the 875 ImageNet unknowns of
bench/unknown.py, known = pets/val) and the test sets (ants/bees, digits, photo crops, faces; known = pets-extra),
with the share of pets-extra under each model's own threshold.

    fovea train ../shared/data/pets --model cnn --epochs 60 --seeds 3 --out bench-work/u6/pets-ens3
    nice -n 10 .venv/bin/python bench/unknown_ensemble.py bench-work/u6/pets-ens3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import unknown as u  # noqa: E402  (bench/unknown.py: the same sets, metrics and files)


def scores(model: Any, paths: list[Path]) -> np.ndarray:
    out = []
    for i in range(0, len(paths), 256):
        x, _, bad = model.load_images(paths[i : i + 256])
        if bad:
            raise SystemExit(f"unreadable images: {bad[:3]}")
        out.append(np.asarray(model.outputs(x).unknown_scores, np.float64))
    return np.concatenate(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="an ensemble run folder (fovea train ... --seeds N)")
    p.add_argument("--work", type=Path, default=u.REPO / "bench-work")
    p.add_argument("--imagenet", type=Path, default=u.DATA / "imagenet-sample")
    args = p.parse_args()
    import torch

    import fovea
    from fovea._system import machine

    torch.set_num_threads(2)
    members = sorted(d for d in args.run.iterdir() if (d / "model.json").exists())
    if not (args.run / "model.json").exists() or not members:
        raise SystemExit(f"{args.run}: not an ensemble run (train one with fovea train DATA --seeds 3 --out ...)")
    imagenet, _ = u.imagenet_sample(args.imagenet)
    w = args.work / "unknown-sets"
    sets = {"ants/bees": u.class_files(u.DATA / "hymenoptera" / "train") + u.class_files(u.DATA / "hymenoptera" / "val"),
            "digits": u.digit_images(w / "digits"), "photos": u.photo_crops(w / "photos", 0),
            "faces": u.face_images(w / "faces")}
    print(f"machine: {machine()}")
    print("AUROC / FPR95 %; selection: imagenet against pets/val; test: the others against pets-extra; kept: "
          "pets-extra under the model's threshold")
    print("| model | imagenet (selection) | " + " | ".join(sets) + " | kept % |")
    print("| --- | --- | " + " | ".join("---" for _ in sets) + " | --- |")
    for run in [args.run, *members]:
        model = fovea.load(run, "cpu")
        if model.unknown_threshold is None:
            raise SystemExit(f"{run} has no unknown score: fovea calibrate-unknown {run} DATA")
        val, extra = scores(model, u.class_files(u.DATA / "pets" / "val")), scores(model, u.class_files(u.DATA / "pets-extra"))
        unknown = scores(model, imagenet)
        cells = [(u.auroc(val, unknown), u.fpr_at(val, unknown))]
        cells += [(u.auroc(extra, s), u.fpr_at(extra, s)) for s in (scores(model, v) for v in sets.values())]
        name = "ensemble" if run == args.run else f"member {run.name}"
        print(f"| {name} | " + " | ".join(f"{a:.3f} / {100 * b:.1f}" for a, b in cells)
              + f" | {100 * (extra <= model.unknown_threshold).mean():.1f} |")


if __name__ == "__main__":
    main()
