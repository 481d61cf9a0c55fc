"""``fovea evaluate RUN DATA``: every metric on a held-out set, from the artifact alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fovea.data import eval_samples, load_images
from fovea.errors import FoveaError
from fovea.evaluation._diagnosis import diagnose
from fovea.evaluation._metrics import classification_metrics
from fovea.evaluation._report import write_report
from fovea.runtime import load


def evaluate(run: str | Path, data: str | Path, *, device: str = "auto", report: str | Path | None = None,
             progress: bool = True, cache: bool = True, human_error: float | None = None) -> dict[str, Any]:
    """Evaluate a model artifact on ``data`` (a class tree, or the test/val split of a split layout).

    The bias/variance diagnosis compares this data's error with the training error the run recorded.
    """
    model = load(run, device)
    samples, missing, split = eval_samples(data, model.classes)
    images = load_images(samples, model.image_size, cache=cache, progress=progress, description="decoding")
    if len(images) == 0:
        raise FoveaError(f"none of the {len(samples)} files in {data} could be read")
    probs = model.predict_proba(images.images)
    m = classification_metrics(images.labels.numpy(), probs, model.classes)
    skipped = [{"path": p, "reason": r, "split": split} for p, r in images.quarantined + missing]
    m.update({"skipped": len(skipped), "quarantined": skipped, "split": split, "model": str(run), "data": str(data)})
    train_acc = model.meta.get("metrics", {}).get("train_accuracy")
    if train_acc is not None:
        m["diagnosis"] = diagnose(1 - float(train_acc), 1 - m["accuracy"], human_error)
    elif human_error is not None:
        raise FoveaError(f"{run} has no recorded training error (trained by an older Fovea, or an ensemble); "
                         "the diagnosis needs it")
    if report is not None:
        from fovea.explain import looks_at
        from fovea.runtime import Network, TorchModel

        prepared = model.prepare(images.images) if isinstance(model, Network) else images.images  # --preprocess
        net = model.net if isinstance(model, TorchModel) else None  # Grad-CAM needs gradients: PyTorch only
        looks = looks_at(net, prepared, images.labels.numpy(), probs, model.classes, images.paths,
                         mean=getattr(model, "mean", ()), std=getattr(model, "std", ()))
        write_report(report, title=f"Evaluation of {Path(run).name} on {Path(data).name}", meta=model.meta,
                     metrics=m, quarantined=skipped, explanations=looks)
    return m
