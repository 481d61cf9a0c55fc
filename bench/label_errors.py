"""Label errors (issue 19): does ``fovea check DATA --labels`` find labels that are wrong?

pets/train (2000 photos) with 5 % of its labels flipped, seeded and in both directions (50 cats filed as dogs, 50
dogs as cats), as a folder of symbolic links under --work. Then, each timed as a whole command in a subprocess:

- ``fovea check FLIPPED --labels --json`` at its defaults (4 folds, the CPU's 10-minute budget);
- what a user can do today: ``fovea train FLIPPED`` (CPU defaults, 5 % held out so the model sees nearly every
  image) and rank every image by its loss, -log p(given label), under that model (top losses).

Printed for each: AUROC of the ranking (flipped = positive), its precision down to where it holds 70 % of the
flips, and the flagged set's recall of the flips and precision (for top losses, its top as many images as the
check flagged); for the check, also cleanlab's other filters on the same out-of-fold probabilities.

    nice -n 10 .venv/bin/python bench/label_errors.py                  # from scratch: ~12 min on a 2-core CPU
    .venv/bin/python bench/label_errors.py --unflipped                  # the check on pets/train as it is

The figures in docs/labels.md add backbones, as a user brings an ImageNet model. No pretrained weights can be
downloaded here, so they are Fovea's own, trained on pets-extra (3000 cat and dog photos, none of them in pets):

    fovea train ../shared/data/pets-extra --model cnn --time 8m --unknown-keep 0 --out bench-work/pets-extra-cnn
    fovea train ../shared/data/pets-extra --model cnn --augment strong --time 12m --unknown-keep 0 \
        --out bench-work/pets-extra-cnn-strong
    fovea train ../shared/data/pets-extra --model cnn --image-size 96 --augment strong --time 12m --unknown-keep 0 \
        --out bench-work/pets-extra-cnn96
    nice -n 10 .venv/bin/python bench/label_errors.py --weights bench-work/pets-extra-cnn \
        --weights bench-work/pets-extra-cnn-strong --weights bench-work/pets-extra-cnn96 --mode features \
        --rounds 2 --folds 10
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def flipped_copy(src: Path, out: Path, rate: float, seed: int) -> set[str]:
    """``src``'s class folders as symbolic links in ``out``, ``rate`` of each class filed under the other;
    returns the flipped images' paths in ``out``."""
    if out.exists():
        shutil.rmtree(out)
    classes = sorted(d.name for d in src.iterdir() if d.is_dir())
    rng = random.Random(seed)
    flipped: set[str] = set()
    k = 0
    for c in classes:
        files = sorted((src / c).iterdir())
        chosen = set(rng.sample(range(len(files)), round(rate * len(files))))
        others = [o for o in classes if o != c]
        for i, f in enumerate(files):
            k += 1  # a neutral name: the classes' folders reuse file names, and a name must not tell the class
            dest = out / (rng.choice(others) if i in chosen else c) / f"img{k:05d}{f.suffix}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(f)
            if i in chosen:
                flipped.add(str(dest.absolute()))
    return flipped


def contact_sheet(rows: list[dict], out: Path, size: int = 120, columns: int = 6) -> Path:
    """The suspects as one JPEG: each thumbnail captioned with its rank, given label and score (for the docs)."""
    from PIL import Image, ImageDraw

    sheet = Image.new("RGB", (columns * size, -(-len(rows) // columns) * (size + 16)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, r in enumerate(rows):
        x, y = (i % columns) * size, (i // columns) * (size + 16)
        with Image.open(r["path"]) as im:
            im = im.convert("RGB")
            im.thumbnail((size - 4, size - 4))
            sheet.paste(im, (x + 2, y + 2))
        draw.text((x + 4, y + size - 2), f"#{r['rank']} {r['given']} {r['quality']:.2f}", fill="black")
    sheet.save(out, quality=80)
    return out


def fovea(*args: str, env: dict[str, str]) -> tuple[float, str]:
    t = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).parent / "fovea"), *args], env=env, capture_output=True,
                          text=True)
    if done.returncode:
        sys.exit(f"fovea {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - t, done.stdout


def judge(name: str, score: dict[str, float], flipped: set[str], flagged: set[str], seconds: float) -> str:
    """One row: the ranking's AUROC and precision where it reaches 70 % of the flips; the flagged set's recall
    and precision."""
    from sklearn.metrics import roc_auc_score

    paths = sorted(score)
    y = np.array([p in flipped for p in paths])
    ranked = y[np.argsort(-np.array([score[p] for p in paths]), kind="stable")]
    reach = int(np.searchsorted(np.cumsum(ranked), int(np.ceil(0.7 * y.sum())))) + 1  # images down to 70 % of flips
    caught = len(flagged & flipped)
    return (f"| {name} | {roc_auc_score(y, [score[p] for p in paths]):.3f} | {100 * ranked[:reach].mean():.1f} % | "
            f"{len(flagged)} | {100 * caught / len(flipped):.1f} % | {100 * caught / max(len(flagged), 1):.1f} % | "
            f"{seconds / 60:.1f} min |")


def other_filters(result: dict, flipped: set[str]) -> list[str]:
    """The same out-of-fold probabilities through cleanlab's other filters (no training: what --json gives)."""
    from cleanlab.filter import find_label_issues

    rows = result["images"]
    labels = np.array([result["classes"].index(r["given"]) for r in rows])
    probs = np.array([[r["probabilities"][c] for c in result["classes"]] for r in rows])
    probs = probs / probs.sum(1, keepdims=True)
    score = {r["path"]: 1.0 - r["quality"] for r in rows}
    out = []
    for f in ("confident_learning", "both"):
        flags = find_label_issues(labels, probs, filter_by=f)
        out.append(judge(f"  the same, flagged by filter_by='{f}'", score, flipped,
                         {r["path"] for r, x in zip(rows, flags) if x}, 0.0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=SHARED / "pets" / "train")
    ap.add_argument("--rate", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=ROOT / "bench-work" / "label-errors")
    ap.add_argument("--unflipped", action="store_true", help="only the check, on --data as it is")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--weights", action="append", help="a backbone for the folds (fovea check --labels --weights RUN); "
                    "repeat it for several")
    ap.add_argument("--mode", help="with --weights: features | finetune | auto")
    ap.add_argument("--rounds", help="fovea check --labels --rounds N")
    ap.add_argument("--folds", help="fovea check --labels --folds K")
    args = ap.parse_args()

    from fovea._system import machine

    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f} at the start")
    args.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FOVEA_HOME": str(args.work / "home")}
    given = [*[a for w in args.weights or [] for a in ("--weights", w)], *(["--mode", args.mode] if args.mode else []),
             *(["--rounds", args.rounds] if args.rounds else []), *(["--folds", args.folds] if args.folds else [])]
    if args.unflipped:
        seconds, out = fovea("check", str(args.data), "--labels", "--json", *given, env=env)
        result = json.loads(out)
        print(f"fovea check {args.data} --labels {' '.join(given)}: {result['n_issues']} of {result['n_images']} "
              f"flagged, out-of-fold accuracy {result['out_of_fold_accuracy']:.3f}, {seconds / 60:.1f} min; page "
              f"{result['html']}")
        top = [x for x in result["images"] if x["issue"]][:24]
        for r in top:
            print(f"{r['rank']:3d} {Path(r['path']).relative_to(args.data.absolute())}  given {r['given']}, "
                  f"suggested {r['suggested']}, score {r['quality']:.3f}")
        sheet = contact_sheet(top, args.work / "suspects.jpg")
        print(f"contact sheet of these {len(top)}: {sheet}")
        return

    data = args.work / "flipped"
    flipped = flipped_copy(args.data, data, args.rate, args.seed)
    print(f"{data}: {len(flipped)} of {sum(1 for _ in data.rglob('*.jpg'))} labels flipped (seed {args.seed})")
    rows = ["| ranking | AUROC | precision at 70 % of flips | flagged | flips caught | precision | whole command |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    seconds, out = fovea("check", str(data), "--labels", "--json", *given, env=env)
    result = json.loads(out)
    check_score = {r["path"]: 1.0 - r["quality"] for r in result["images"]}
    check_flagged = {r["path"] for r in result["images"] if r["issue"]}
    rows.append(judge(f"fovea check --labels {' '.join(given)} ({result['folds']} folds, out-of-fold accuracy "
                      f"{100 * result['out_of_fold_accuracy']:.1f} %)", check_score, flipped, check_flagged, seconds))
    rows += other_filters(result, flipped)
    print("\n".join(rows[2:]), flush=True)
    if not args.skip_baseline:
        run = args.work / "one-model"
        shutil.rmtree(run, ignore_errors=True)
        seconds, _ = fovea("train", str(data), "--model", "cnn", "--val-fraction", "0.05", "--out", str(run),
                           "--unknown-keep", "0", env=env)
        t = time.perf_counter()
        import fovea as api
        from fovea.data import discover, load_images

        model = api.load(run, "cpu", unknown=False)
        ds = discover(data, 0.05, 0)
        samples = [s for split in ds.splits.values() for s in split]
        images = load_images(samples, model.image_size, cache=False, progress=False)
        p = model.predict_proba(images.images)
        loss = -np.log(np.clip(p[np.arange(len(p)), images.labels.numpy()], 1e-12, 1))
        score = {str(Path(q).absolute()): float(v) for q, v in zip(images.paths, loss)}
        top = sorted(score, key=lambda q: -score[q])[: len(check_flagged)]
        rows.append(judge("top losses of one model trained on 95 % (fovea train, CPU defaults)", score, flipped,
                          set(top), seconds + time.perf_counter() - t))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
