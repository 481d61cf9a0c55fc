"""Fitting a classical model (``hog-svm``, ``colorhist-nb``, ...): features of the decoded training images, a
scikit-learn estimator fitted on them, and its arrays copied into the module's frozen parameters.

There are no epochs: one pass computes the features, and the estimator is fitted in closed form or by its own
solver (liblinear, lbfgs). The hyperparameter a user does not give (``--arch c=`` for the SVM and logistic
regression, ``--arch k=`` for k-NN) is chosen by 3-fold cross-validation on the training images alone, so the
validation split stays an honest estimate. The run then ends like every other (``_finish.finish``): metrics,
artifact, unknown score, drift reference and report, and ``history.csv`` gets one row.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fovea.data import ImageSet
from fovea.errors import FoveaError
from fovea.models import create_model
from fovea.runtime import set_blocks
from fovea.training._callbacks import write_history
from fovea.training._config import TrainConfig
from fovea.training._finish import finish

log = logging.getLogger("fovea.training")

C_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # pets: the best C of a linear SVM on HOG was 1e-4 (71.5 %), on combo 1e-4
K_GRID = (1, 5, 15, 31)
NB_SMOOTHING = (1e-9, 1e-3, 1e-2, 1e-1, 1.0)
CV_FOLDS = 3


@dataclass
class Fitted:
    """What ``finish`` reads of a run, for a model fitted without the training loop."""

    cfg: TrainConfig
    run: Path
    model: nn.Module
    device: torch.device
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 1


def standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and spread per feature; a feature constant on the training images keeps a spread of 1."""
    mu, sigma = x.mean(0), x.std(0)
    return mu.astype(np.float32), np.where(sigma > 1e-6, sigma, 1.0).astype(np.float32)


def two_class(w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A binary linear model (1, D), (1,) scoring class 1 against 0 as the two logits (-s/2, s/2), whose softmax is
    sigmoid(s): the same probabilities, in the shape every Fovea model has."""
    return np.concatenate([-w / 2, w / 2]), np.concatenate([-b / 2, b / 2])


def fit_arrays(classifier: str, z: np.ndarray, y: np.ndarray, num_classes: int, *, c: float | None, k: int | None,
               balanced: bool, seed: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Fit ``classifier`` on standardised features ``z`` (N, D) with labels ``y``; returns the head's arrays by
    parameter name, and the hyperparameters used (chosen by cross-validation where not given)."""
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    if len(np.unique(y)) < num_classes:
        raise FoveaError("every class needs training images to fit a classical model")
    n_folds = min(CV_FOLDS, int(np.bincount(y).min()))  # a class with one image: nothing to cross-validate on
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed) if n_folds > 1 else None
    weight = "balanced" if balanced else None
    chosen: dict[str, Any] = {}

    def pick(estimator: Any, grid: dict[str, Any]) -> Any:
        if folds is None:
            return estimator.set_params(**{k: v[len(v) // 2] for k, v in grid.items()}).fit(z, y)
        search = GridSearchCV(estimator, grid, cv=folds, scoring="accuracy").fit(z, y)
        log.info("classical: %s chosen by %d-fold cross-validation on the training images (accuracy %.3f)",
                 ", ".join(f"{k}={v}" for k, v in search.best_params_.items()), folds.n_splits, search.best_score_)
        chosen["cv_accuracy"] = float(search.best_score_)
        return search.best_estimator_

    if classifier in ("svm", "logreg"):
        from sklearn.linear_model import LogisticRegression
        from sklearn.svm import LinearSVC

        base: Any = (LinearSVC(class_weight=weight, max_iter=5000, random_state=seed) if classifier == "svm"
                     else LogisticRegression(class_weight=weight, max_iter=2000))
        est = base.set_params(C=c).fit(z, y) if c is not None else pick(base, {"C": list(C_GRID)})
        chosen["c"] = float(est.C)
        w, b = est.coef_.astype(np.float64), est.intercept_.astype(np.float64)  # (1 or C, D), (1 or C,)
        if classifier == "svm":
            # Platt scaling (Platt 1999): an SVM's margins are not probabilities, so a logistic regression on
            # margins it did not train on (cross-validated) maps them to ones; it folds into the same linear layer.
            from sklearn.base import clone
            from sklearn.model_selection import cross_val_predict

            margins = cross_val_predict(clone(est), z, y, cv=folds, method="decision_function") if folds is not None \
                else est.decision_function(z)
            margins = margins.reshape(len(z), -1)
            platt = LogisticRegression(C=1e4, max_iter=2000).fit(margins, y)
            a, a0 = platt.coef_.astype(np.float64), platt.intercept_.astype(np.float64)  # (1 or C, 1 or C)
            w, b = a @ w, a @ b + a0
        if w.shape[0] == 1:
            w, b = two_class(w, b)
        return {"weight": w.astype(np.float32), "bias": b.astype(np.float32)}, chosen
    if classifier == "nb":
        from sklearn.naive_bayes import GaussianNB

        # var_smoothing adds a share of the largest variance to every variance: on standardised features with
        # near-empty histogram bins, sklearn's 1e-9 let a single bin decide (pets' colour histograms: 54 %)
        base_nb = GaussianNB(priors=np.full(num_classes, 1 / num_classes) if balanced else None)
        nb = pick(base_nb, {"var_smoothing": list(NB_SMOOTHING)})
        chosen["var_smoothing"] = float(nb.var_smoothing)
        return {"theta": nb.theta_.astype(np.float32), "var": nb.var_.astype(np.float32),
                "log_prior": np.log(nb.class_prior_).astype(np.float32)}, chosen
    if classifier == "knn":
        from sklearn.neighbors import KNeighborsClassifier

        if c is not None:
            raise FoveaError("k-NN takes k (--arch k=15), not c")
        if k is None:
            k = int(pick(KNeighborsClassifier(), {"n_neighbors": [v for v in K_GRID if v < len(z)]}).n_neighbors)
        chosen["k"] = int(k)
        return {"stored": z.astype(np.float32), "votes": np.eye(num_classes, dtype=np.float32)[y]}, chosen
    raise FoveaError(f"unknown classifier {classifier!r}")


def train_classical(cfg: TrainConfig, run: Path, ds: Any, train_set: ImageSet, val_set: ImageSet,
                    quarantined: list[dict[str, str]], arch_kwargs: dict[str, Any], native: dict[str, Any],
                    timings: dict[str, float], device: torch.device) -> Path:
    """Fit the classical model ``cfg.model`` on ``train_set`` and end the run as any other: the run folder."""
    if cfg.weights or cfg.pretrained or cfg.mode not in (None, "scratch"):
        raise FoveaError(f"{cfg.model} is fitted from the images themselves: --weights, --pretrained and --mode do "
                         "not apply to classical models")
    if cfg.resume:
        raise FoveaError(f"{cfg.model} is fitted in one pass, with no checkpoint to resume; train it again")
    ignored = [f"--{n}" for n, v in (("clip-grad", cfg.clip_grad), ("mixup", cfg.mixup), ("cutmix", cfg.cutmix),
                                     ("l1", cfg.l1), ("sampler balanced", cfg.sampler == "balanced")) if v]
    if ignored:
        log.warning("%s: %s do(es) not apply to a classical model; ignored", cfg.model, ", ".join(ignored))
    # One pass, no epochs, no gradient: the loop's settings are recorded as what happened, not what was planned.
    cfg = dataclasses.replace(cfg, epochs=1, time=None, amp=False, channels_last=False, compile=False)
    if cfg.unknown_score is None and cfg.unknown_keep > 0:
        # The default score, Mahalanobis, inverts a D x D covariance estimated from fewer images than HOG's 1764
        # features (combo: 2436); k-NN needs no inversion and scales with N x D. (Under the earlier combined
        # default, six inversions took 22 s of a 24 s fit on 2 cores.)
        cfg.unknown_score = "knn"
        log.info("unknown score: knn (Mahalanobis would invert a covariance of thousands of handcrafted features)")
    size = int(cfg.image_size or 64)
    mean, std = tuple(native["mean"]), tuple(native["std"])
    name = str(cfg.model)
    feature, classifier = name.rsplit("-", 1)
    run.mkdir(parents=True, exist_ok=True)
    (run / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    clock = time.perf_counter()
    probe = create_model(name, len(ds.classes), image_size=size, **arch_kwargs)
    # a block at a time (a disk-backed set's read from its file, not through the map)
    raw = np.concatenate([probe.extract(b) for b in set_blocks(train_set)])  # type: ignore[operator]  # (N, D)
    extract_seconds = time.perf_counter() - clock
    log.info("classical: %s features of %d training images (%d values each) in %.1f s", feature, len(raw),
             raw.shape[1], extract_seconds)
    mu, sigma = standardise(raw)
    z = (raw - mu) / sigma
    y = train_set.labels.numpy()
    arrays, chosen = fit_arrays(classifier, z, y, len(ds.classes), c=arch_kwargs.get("c"),
                                k=arch_kwargs.get("k"),
                                balanced=cfg.class_weights == "auto", seed=cfg.seed)
    kwargs = {**arch_kwargs, **{k: v for k, v in chosen.items() if k in ("c", "k")}}
    if classifier == "knn":
        kwargs["n_train"] = len(z)
    model = create_model(name, len(ds.classes), image_size=size, **kwargs)
    state = {"mu": mu, "sigma": sigma, **{f"head.{k}": v for k, v in arrays.items()}}
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})
    model.to(device).eval()
    timings["train"] = time.perf_counter() - clock
    log.info("classical: %s fitted in %.1f s (features %.1f s)", name, timings["train"], extract_seconds)

    with torch.no_grad():  # the history row: training images from the features already computed
        train_logits = model.forward_head(torch.from_numpy(z).to(device)).float().cpu()  # type: ignore[operator]
    from fovea.runtime import infer

    val_logits = infer(model, val_set.images, mean=mean, std=std, device=device)
    row = {"epoch": 1, "lr": 0.0, "train_loss": F.cross_entropy(train_logits, train_set.labels).item(),
           "train_acc": (train_logits.argmax(1) == train_set.labels).float().mean().item(),
           "val_loss": F.cross_entropy(val_logits, val_set.labels).item() if len(val_set) else float("nan"),
           "val_acc": (val_logits.argmax(1) == val_set.labels).float().mean().item() if len(val_set) else float("nan"),
           "images_per_s": len(raw) / max(extract_seconds, 1e-9), "seconds": timings["train"]}
    write_history(run / "history.csv", [row])
    fitted = Fitted(cfg, run, model, device, [row])
    transfer = {"mode": "scratch", "classical": {"feature": feature, "classifier": classifier, **chosen,
                                                 "features_per_image": int(raw.shape[1])}}
    return finish(fitted, ds, train_set, val_set, quarantined, kwargs, mean, std, native, timings, transfer)
