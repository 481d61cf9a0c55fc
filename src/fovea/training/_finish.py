"""The end of a run: final metrics (with TTA), the artifact, the drift reference, metrics.json and the report;
and reading a run folder's results back (``run_result``)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from fovea.data import ImageSet
from fovea.runtime import infer, save_model, set_blocks
from fovea.training._config import TrainConfig, preprocess_steps

log = logging.getLogger("fovea.training")


class Trained(Protocol):
    """What the end of a run reads: the loop's ``Fit``, or a classical model's ``Fitted`` (no loop)."""

    cfg: TrainConfig
    run: Path
    model: nn.Module
    device: torch.device
    history: list[dict[str, Any]]
    best_epoch: int


def finish(fit: Trained, ds: Any, train_set: ImageSet, val_set: ImageSet, quarantined: list[dict[str, str]],
            arch_kwargs: dict[str, Any], mean: tuple[float, ...], std: tuple[float, ...], native: dict[str, Any],
            timings: dict[str, float], transfer: dict[str, Any]) -> Path:
    """Final validation metrics, the artifact, metrics.json and report.html."""
    from fovea.evaluation import classification_metrics, diagnose, write_report
    from fovea.explain import looks_at

    cfg, run = fit.cfg, fit.run
    clock = time.perf_counter()

    def evaluated(images: torch.Tensor) -> torch.Tensor:  # the final weights, no augmentation, TTA as configured
        return infer(fit.model, images, mean=mean, std=std, device=fit.device, amp=bool(cfg.amp), tta=cfg.tta,
                     channels_last=bool(cfg.channels_last))

    logits = evaluated(val_set.images)
    metrics = classification_metrics(val_set.labels.numpy(), logits.softmax(1).numpy(), ds.classes) if len(val_set) else {}
    metrics.update({"best_epoch": fit.best_epoch, "epochs_run": len(fit.history), "train_seconds": round(timings["train"], 2),
                    "n_train": len(train_set), "n_val": len(val_set), "skipped": len(quarantined)})
    last = fit.history[-1] if fit.history else {}
    metrics["final_train_acc"] = last.get("train_acc")
    if len(val_set):
        # Training error for the bias/variance diagnosis: the final weights on the training images, no
        # augmentation, evaluated exactly like validation.
        # A block at a time (a disk-backed set's read from its file: through the map, its pages would count in the
        # process's resident memory as the pass reaches them)
        train_logits = torch.cat([evaluated(b) for b in set_blocks(train_set)])
        metrics["train_accuracy"] = float((train_logits.argmax(1) == train_set.labels).float().mean())
        metrics["diagnosis"] = diagnose(1 - metrics["train_accuracy"], 1 - metrics["accuracy"], cfg.human_error,
                                        classical=transfer.get("classical"))  # its own knobs, not a network's
    meta = {
        "architecture": {"name": cfg.model, "kwargs": arch_kwargs},
        "classes": ds.classes,
        "preprocessing": {"image_size": int(cfg.image_size or 64), "resize": "shorter side, then centre crop",
                          "mean": list(mean), "std": list(std), "interpolation": "bilinear",
                          "alpha": "composited on white", "tta": cfg.tta, "color": "RGB",
                          "steps": [s.to_dict() for s in preprocess_steps(cfg)]},  # fovea.ops, after the resize
        "training": cfg.to_dict(),
        "transfer": transfer,
        "metrics": {k: v for k, v in metrics.items() if k not in ("confusion_matrix", "roc_curves", "per_class")},
        "data": {"root": ds.root, "layout": ds.layout, "fingerprint": ds.fingerprint(),
                 "counts": ds.counts(), "quarantined": len(quarantined),
                 **({"corrections": ds.corrections} if ds.corrections else {})},
    }
    save_model(run, fit.model, meta)
    if len(val_set) and cfg.unknown_keep > 0:
        metrics["unknown"] = _fit_unknown(run, cfg, train_set, val_set, fit.device)
    if len(val_set):
        _save_reference(run, val_set, fit.device)
    looks = looks_at(fit.model, val_set.images, val_set.labels.numpy(), logits.softmax(1).numpy(), ds.classes,
                     val_set.paths, mean=mean, std=std) if len(val_set) else None
    write_report(run / "report.html", title=f"{cfg.model} on {Path(cfg.data).name}", meta=meta, metrics=metrics,
                 history=fit.history, quarantined=quarantined, explanations=looks)
    timings["finish"] = time.perf_counter() - clock
    metrics["timings"] = {k: round(v, 2) for k, v in timings.items()}
    log.info("seconds: %s", ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    (run / "metrics.json").write_text(json.dumps({**metrics, "quarantined": quarantined}, indent=2, default=float))
    log.info("run folder: %s", run)
    return run


def _fit_unknown(run: Path, cfg: Any, train_set: ImageSet, val_set: ImageSet, device: torch.device) -> dict[str, Any]:
    """The unknown-image score, fitted on the training images (no augmentation) through the saved artifact and
    calibrated on the validation images; its entry (also in model.json), or why there is none."""
    from fovea.errors import FoveaError
    from fovea.runtime import UNKNOWN, fit_unknown, load_single

    if UNKNOWN in load_single(run, str(device), unknown=False).classes:
        log.warning("a class is named %r, so the model cannot also answer it for images of none of its classes: "
                    "no unknown score", UNKNOWN)
        return {"skipped": f"a class is named {UNKNOWN!r}"}
    clock = time.perf_counter()
    try:
        entry = fit_unknown(run, load_single(run, str(device), unknown=False), fit_images=train_set,  # block by block
                            fit_labels=train_set.labels.numpy(), calibration=val_set, score=cfg.unknown_score,
                            keep=cfg.unknown_keep)
    except FoveaError as e:  # too few validation images, say: the model is still a good closed-set model
        log.warning("no unknown score: %s", e)
        return {"skipped": str(e)}
    log.info("unknown score fitted and calibrated in %.1f s", time.perf_counter() - clock)
    return {k: entry[k] for k in ("score", "threshold", "keep", "kept", "calibrated_on")}


def _save_reference(run: Path, val_set: ImageSet, device: torch.device) -> None:
    """reference.npz beside the weights: what the validation images looked like to the saved artifact (through
    ``fovea.load``, as serving will see them), for ``fovea drift``."""
    from fovea.monitor import build_reference, header_size, save_reference
    from fovea.runtime import load

    clock = time.perf_counter()
    model = load(run, str(device))
    sizes = [header_size(p) for p in val_set.paths]
    save_reference(run, build_reference(model, val_set.images, sizes, val_set.labels.numpy()))
    log.info("drift reference: %d validation images in %.1f s", min(len(val_set), 2000), time.perf_counter() - clock)


def run_result(run: str | Path) -> dict[str, Any]:
    """What ``fovea train`` prints about a run folder it wrote: "kind" is "cv" (K folds: their table and the mean),
    "ensemble" (--seeds: each member and the ensemble) or "run" (one model: its metrics and, for --mode auto,
    the choice and why)."""
    run = Path(run)
    if (run / "cv.json").exists():
        return {"kind": "cv", "run": str(run), **json.loads((run / "cv.json").read_text()),
                "table": (run / "cv.md").read_text().rstrip()}
    metrics = json.loads((run / "metrics.json").read_text())
    if "members" in metrics:
        return {"kind": "ensemble", "run": str(run), "metrics": metrics}
    meta = json.loads((run / "model.json").read_text())
    return {"kind": "run", "run": str(run), "metrics": metrics, "auto": (meta.get("transfer") or {}).get("auto"),
            "mode": (meta.get("transfer") or {}).get("mode"), "report": str(run / "report.html")}
