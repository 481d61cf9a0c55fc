"""``fovea.train``: one run, K folds (``folds``) or N seeds and their ensemble (``seeds``)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from fovea.data import Dataset, corrected, discover, kfold, load_images
from fovea.errors import FoveaError
from fovea.training._config import TrainConfig
from fovea.training._loop import default_out, train_one

log = logging.getLogger("fovea.training")


def train(data: str | Path, *, started: float | None = None, **kwargs: Any) -> Path:
    """Train a model on ``data`` and write a run folder; returns its path. kwargs: TrainConfig fields.

    With ``folds=K`` the folder holds K runs (fold-1 ...) and cv.json; with ``seeds=N`` it holds N runs
    (seed-0 ...) and is itself the ensemble of them (a model artifact averaging their probabilities).
    ``time`` (seconds) is a budget for the whole call, shared evenly by the folds' or seeds' runs; ``started``
    (a ``time.time()``) is when it began, if before this call (the CLI counts its own start-up).
    """
    cfg = TrainConfig(data=str(data), **kwargs)
    cfg.validate()
    start = time.time() if started is None else started
    if (cfg.folds or cfg.seeds > 1) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise FoveaError("--folds and --seeds train one model after another; under torchrun, train each run with its "
                         "own --seed and --out (one distributed run at a time)")
    if cfg.folds or cfg.seeds > 1:
        out = Path(cfg.out) if cfg.out else default_out(cfg)
        if out.exists() and any(out.iterdir()):
            raise FoveaError(f"{out} already exists and is not empty; choose another --out")
        ds = corrected(discover(cfg.data, cfg.val_fraction, cfg.seed, group_regex=cfg.group_regex), cfg.corrections)
        return _cross_validate(cfg, ds, out, start) if cfg.folds else _train_seeds(cfg, ds, out, start)
    return train_one(cfg, deadline=None if cfg.time is None else start + cfg.time)


def _share(cfg: TrainConfig, start: float, runs_left: int) -> float | None:
    """A run's deadline when ``runs_left`` runs share what is left of ``cfg.time`` (None: no budget given)."""
    if cfg.time is None:
        return None
    return time.time() + max(start + cfg.time - time.time(), 0.0) / runs_left


def _summary(values: list[float | None]) -> dict[str, float | None]:
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if not len(v):
        return {"mean": None, "std": None, "min": None, "max": None}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max())}


CV_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "f1_macro", "train_accuracy")


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _cross_validate(cfg: TrainConfig, ds: Dataset, out: Path, start: float) -> Path:
    """K runs, one per fold (train + val pooled, stratified and group-aware); cv.json holds mean +- spread."""
    folds = kfold(ds, int(cfg.folds or 2), cfg.seed)
    rows = []
    for i, fold_ds in enumerate(folds, 1):
        log.info("fold %d of %d: %d train, %d val images", i, len(folds), len(fold_ds.splits["train"]),
                 len(fold_ds.splits["val"]))
        run = train_one(dataclasses.replace(cfg, folds=None, out=str(out / f"fold-{i}")), fold_ds,
                     deadline=_share(cfg, start, len(folds) - i + 1))
        m = json.loads((run / "metrics.json").read_text())
        rows.append({"fold": i, "run": str(run), "n_train": m["n_train"], "n_val": m["n_val"],
                     **{k: m.get(k) for k in CV_METRICS}})
    summary = {k: _summary([r[k] for r in rows]) for k in CV_METRICS}
    cv = {"folds": rows, "k": len(folds), "summary": summary, "std": "sample standard deviation over folds (ddof=1)",
          "config": cfg.to_dict()}
    (out / "cv.json").write_text(json.dumps(cv, indent=2))
    lines = ["| fold | train | val | accuracy | balanced accuracy | ROC-AUC |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['fold']} | {r['n_train']} | {r['n_val']} | {_fmt(r['accuracy'])} | {_fmt(r['balanced_accuracy'])} | "
              f"{_fmt(r['roc_auc'])} |" for r in rows]
    pm = {k: f"{_fmt(summary[k]['mean'])} ± {_fmt(summary[k]['std'])}" for k in CV_METRICS}
    lines.append(f"| mean ± std | | | {pm['accuracy']} | {pm['balanced_accuracy']} | {pm['roc_auc']} |")
    (out / "cv.md").write_text("\n".join(lines) + "\n")
    return out


def _train_seeds(cfg: TrainConfig, ds: Dataset, out: Path, start: float) -> Path:
    """N runs on one split with seeds seed..seed+N-1, then their ensemble written into ``out``."""
    from fovea.ensemble import make_ensemble
    from fovea.evaluation import classification_metrics
    from fovea.runtime import load

    runs = []
    for i in range(cfg.seeds):
        seed = cfg.seed + i
        log.info("seed %d (%d of %d)", seed, i + 1, cfg.seeds)
        runs.append(train_one(dataclasses.replace(cfg, seeds=1, seed=seed, out=str(out / f"seed-{seed}")), ds,
                           deadline=_share(cfg, start, cfg.seeds - i)))
    make_ensemble(runs, out, progress=cfg.progress)
    # The ensemble on the members' own validation split (one split for all: only the seeds differ).
    val = load_images(ds.splits["val"], load(out, cfg.device, unknown=False).image_size, cache=cfg.keeps_cache,
                      progress=False)
    if cfg.unknown_keep > 0 and len(val) >= 20 and all(load(r, "cpu").answers_unknown for r in runs):
        from fovea.runtime import calibrate_ensemble

        calibrate_ensemble(out, val.images, keep=cfg.unknown_keep, device=cfg.device)
    ens = load(out, cfg.device)
    members = [json.loads((r / "metrics.json").read_text()) for r in runs]
    metrics: dict[str, Any] = {}
    if len(val):
        metrics = classification_metrics(val.labels.numpy(), ens.predict_proba(val.images), ds.classes)
    metrics.pop("roc_curves", None)
    metrics.update({"members": [{"run": str(r), **{k: m.get(k) for k in CV_METRICS}} for r, m in zip(runs, members)],
                    "members_summary": {k: _summary([m.get(k) for m in members]) for k in CV_METRICS},
                    "n_val": len(val), "n_train": members[0]["n_train"], "skipped": members[0]["skipped"]})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    return out
