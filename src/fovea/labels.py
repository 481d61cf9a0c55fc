"""``fovea check DATA --labels``: images whose given label is most likely wrong.

A model trained on an image has memorised its label, right or wrong, so its loss says little about it (the top
losses of one model trained on everything). Here every image is predicted by a model that never saw it:
K-fold cross-fitting with Fovea's own trainer (the time budget shared by the folds; ``weights``: a backbone to
start from, e.g. a head on a frozen backbone in features mode, as ``fovea train --weights`` does). Confident
learning (cleanlab, Northcutt et al. 2021) then turns the out-of-fold probabilities into a set of label issues
(``filter.find_label_issues``: per-class thresholds and the estimated joint of given and true labels) and a
ranking (``rank.get_label_quality_scores``, low = likely wrong).

The result (every image's probabilities, score and flag) is written to ``$FOVEA_HOME/data/KEY/`` with an HTML
page of the suspects' thumbnails; the review queue and the web app's data page read it from there.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from fovea.data import Dataset, corrected, curation_dir, discover, kfold, load_images, write_label_issues
from fovea.errors import FoveaError

log = logging.getLogger("fovea.labels")

DEFAULT_FOLDS = 4
DEFAULT_ROUNDS = 1
# The whole check on a CPU when no --time is given: 4 folds of the pets cnn at ~2 min each caught 9 flips in 10
# at 5 % noise (bench/label_errors.py); a GPU gets no budget (each fold trains its default epochs).
DEFAULT_CPU_TIME = 600.0
QUALITY_METHOD = "self_confidence"  # cleanlab's ranking: the out-of-fold probability of the given label
PAGE_SUSPECTS = 120  # thumbnails on the HTML page


def _pooled(ds: Dataset) -> Dataset:
    """Every split's images in one pool: a wrong label in val or test misleads as much as one in train."""
    pool = [s for split in ds.splits.values() for s in split]
    return dataclasses.replace(ds, splits={"train": pool})


def out_of_fold(ds: Dataset, *, folds: int = DEFAULT_FOLDS, time_budget: float | None = None,
                progress: bool = True, exclude: frozenset[str] = frozenset(), weights: Sequence[str | None] = (None,),
                **train_options: Any) -> tuple[np.ndarray, list[str], np.ndarray, list[str]]:
    """Out-of-fold probabilities (N, C) of every readable image of ``ds``, its paths, given labels and which fold
    predicted it ("fold-k"), by K-fold cross-fitting: each fold's models are trained on the other folds only.

    ``weights``: one model per fold for each (a backbone run or file; None: from scratch), their probabilities
    averaged, an ensemble of backbones. ``exclude``: paths no fold trains on (labels already in doubt); they are
    still predicted in their own fold. ``train_options``: TrainConfig fields for every run (model, mode, ...).
    """
    from fovea.runtime import load
    from fovea.training import TrainConfig, train_one  # train_one: one run on a given data set

    parts = kfold(_pooled(ds), folds, int(train_options.get("seed", 0)))
    runs_left = len(parts) * len(weights)
    start = time.time()
    probs: list[np.ndarray] = []
    paths: list[str] = []
    labels: list[np.ndarray] = []
    which: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="fovea-labels-"))
    try:
        for i, part in enumerate(parts, 1):
            if exclude:
                part = dataclasses.replace(part, splits={**part.splits, "train": [
                    s for s in part.splits["train"] if s.path not in exclude]})
            log.info("fold %d of %d: training on %d images, predicting %d", i, len(parts),
                     len(part.splits["train"]), len(part.splits["val"]))
            members = []
            for j, w in enumerate(weights):
                deadline = None if time_budget is None else (
                    time.time() + max(start + time_budget - time.time(), 0.0) / runs_left)
                runs_left -= 1
                # monitor "last": the held-out fold must not pick the epoch (its labels are the ones being judged);
                # no unknown score: the fold's model is only asked for probabilities.
                cfg = TrainConfig(data=ds.root, **{**train_options, "weights": w, "folds": None, "seeds": 1,
                                                   "monitor": "last", "unknown_keep": 0.0,
                                                   "out": str(work / f"fold-{i}-{j}"), "progress": progress,
                                                   "corrections": "none"})
                cfg.validate()
                run = train_one(cfg, part, deadline=deadline)
                model = load(run, cfg.device, unknown=False)
                held = load_images(part.splits["val"], model.image_size, cache=cfg.keeps_cache, progress=False)
                members.append(model.predict_proba(held.images))
                shutil.rmtree(run, ignore_errors=True)
            probs.append(np.mean(members, axis=0))
            paths += held.paths
            labels.append(held.labels.numpy())
            which += [f"fold-{i}"] * len(held)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return np.concatenate(probs).astype(np.float64), paths, np.concatenate(labels), which


def rank_issues(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(label-quality score per image (low: likely wrong), confident learning's flag per image)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    p = np.clip(probs, 1e-7, 1.0)
    p = p / p.sum(1, keepdims=True)  # cleanlab checks that rows sum to 1
    quality = get_label_quality_scores(labels, p, method=QUALITY_METHOD)
    flagged = find_label_issues(labels, p, filter_by="prune_by_noise_rate")
    return np.asarray(quality, np.float64), np.asarray(flagged, bool)


def check_labels(data: str | Path, *, folds: int = DEFAULT_FOLDS, rounds: int = DEFAULT_ROUNDS,
                 time: float | None = None, weights: str | Sequence[str] | None = None,
                 val_fraction: float = 0.2, seed: int = 0, group_regex: str | None = None,
                 corrections: str | None = None, progress: bool = True, **train_options: Any) -> dict[str, Any]:
    """The label check of ``data`` (see the module): written to FOVEA_HOME and returned as a dict.

    ``time``: seconds for the whole check (default on a CPU: ``DEFAULT_CPU_TIME``); ``weights``: a backbone, or
    several (an ensemble: one head each per fold, probabilities averaged); ``corrections``: as ``fovea train``'s
    (the data set's own verdicts by default, so a reviewed image is judged with its corrected label).
    """
    import torch

    t0 = _now()
    ds = corrected(discover(data, val_fraction, seed, group_regex=group_regex), corrections)
    n = sum(len(v) for v in ds.splits.values())
    if n < 2 * folds:
        raise FoveaError(f"{data}: {n} images is too few to check labels with {folds} folds")
    if time is None and train_options.get("epochs") is None and not torch.cuda.is_available():
        time = DEFAULT_CPU_TIME
    backbones: list[str | None] = [weights] if isinstance(weights, str) else list(weights or []) or [None]
    options = {"seed": seed, "group_regex": group_regex, "val_fraction": val_fraction, "weights": backbones,
               **train_options}
    share = None if time is None else time / rounds
    probs, paths, labels, which = out_of_fold(ds, folds=folds, time_budget=share, progress=progress, **options)
    quality, flagged = rank_issues(labels, probs)
    for r in range(2, rounds + 1):
        # Another round on cleaner training folds: what the last round doubts is left out of training (cleanlab's
        # CleanLearning does the same with one model), so no fold model learns those labels.
        log.info("round %d of %d: %d doubted labels left out of training", r, rounds, int(flagged.sum()))
        doubted = frozenset(paths[i] for i in np.flatnonzero(flagged))
        probs, paths, labels, which = out_of_fold(ds, folds=folds, time_budget=share, progress=progress,
                                                  exclude=doubted, **options)
        quality, flagged = rank_issues(labels, probs)
    order = np.argsort(quality, kind="stable")
    rank = np.empty(len(order), int)
    rank[order] = np.arange(1, len(order) + 1)
    split_of = {str(Path(s.path).absolute()): split for split, samples in ds.splits.items() for s in samples}
    images = []
    for i in order:
        p = {c: round(float(probs[i, j]), 5) for j, c in enumerate(ds.classes)}
        path = str(Path(paths[i]).absolute())
        images.append({"path": path, "split": split_of.get(path, "train"), "given": ds.classes[labels[i]],
                       "suggested": ds.classes[int(probs[i].argmax())], "quality": round(float(quality[i]), 6),
                       "issue": bool(flagged[i]), "rank": int(rank[i]), "fold": which[i], "probabilities": p})
    accuracy = float((probs.argmax(1) == labels).mean())
    result = {
        "data": str(Path(ds.root).absolute()), "classes": ds.classes, "folds": folds, "rounds": rounds,
        "method": f"cleanlab {_cleanlab_version()}: find_label_issues(filter_by='prune_by_noise_rate'); ranked by "
                  f"get_label_quality_scores(method='{QUALITY_METHOD}') on out-of-fold probabilities",
        "training": {k: v for k, v in {**train_options, "weights": weights}.items() if v is not None},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seconds": round(_now() - t0, 1),
        "n_images": len(images), "n_issues": int(flagged.sum()), "out_of_fold_accuracy": round(accuracy, 4),
        "quarantined": n - len(images), "corrections": ds.corrections, "images": images,
    }
    result["file"] = str(write_label_issues(ds.root, result))
    result["html"] = str(write_page(result, curation_dir(ds.root) / "label-issues.html"))
    return result


def _now() -> float:
    return time.time()


def _cleanlab_version() -> str:
    import cleanlab

    return str(cleanlab.__version__)


def suspects(result: dict[str, Any], top: int | None = None) -> list[dict[str, Any]]:
    """The flagged images, most likely wrong first (at most ``top``)."""
    rows = [r for r in result["images"] if r["issue"]]
    return rows[:top] if top else rows


def _thumbnail(path: str, size: int = 128) -> str:
    from PIL import Image

    try:
        with Image.open(path) as opened:
            im = opened.convert("RGB")
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=80)
    except (OSError, ValueError):  # it decoded for training; a file changed or gone since is shown as missing
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def write_page(result: dict[str, Any], path: Path) -> Path:
    """An HTML page of the suspects' thumbnails: given label, suggested label, score."""
    from html import escape

    rows = suspects(result, PAGE_SUSPECTS)
    tiles = "".join(
        f'<figure><img src="{_thumbnail(r["path"])}" alt="{escape(Path(r["path"]).name)}">'
        f'<figcaption>#{r["rank"]} <b>{escape(r["given"])}</b> &rarr; {escape(r["suggested"])}<br>'
        f'score {r["quality"]:.3f} · {escape(r["split"])}<br><small>{escape(Path(r["path"]).name)}</small>'
        f'</figcaption></figure>' for r in rows)
    html = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>Label check: {escape(result['data'])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}} .grid{{display:grid;
grid-template-columns:repeat(auto-fill,minmax(140px,1fr));gap:.8rem}} figure{{margin:0}} img{{width:128px;height:128px;
object-fit:cover;border-radius:4px;background:#eee}} figcaption{{font-size:.8rem}} small{{color:#777;word-break:break-all}}
</style></head><body>
<h1>Suspected label errors</h1>
<p>{escape(result['data'])}: {result['n_issues']} of {result['n_images']} images flagged ({escape(result['method'])};
{result['folds']} folds, out-of-fold accuracy {100 * result['out_of_fold_accuracy']:.1f} %, {result['seconds']:.0f} s).
Shown: the {len(rows)} most likely wrong, as <b>given</b> &rarr; suggested; a low score means the models that never saw
the image doubt its label.</p>
<div class="grid">{tiles}</div></body></html>"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path
