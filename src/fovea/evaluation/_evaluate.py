"""``fovea evaluate RUN DATA``: every metric on a held-out set, from the artifact alone."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fovea.data import choose_store, eval_samples, load_images
from fovea.errors import FoveaError
from fovea.evaluation._diagnosis import diagnose
from fovea.evaluation._metrics import classification_metrics
from fovea.evaluation._openset import openset_metrics
from fovea.evaluation._report import write_report
from fovea.runtime import load

log = logging.getLogger("fovea.evaluation")


def evaluate(run: str | Path, data: str | Path, *, device: str = "auto", report: str | Path | None = None,
             progress: bool = True, cache: bool | str = True, human_error: float | None = None,
             unknown: Sequence[str | Path] = (), open_set: bool = True) -> dict[str, Any]:
    """Evaluate a model artifact on ``data`` (a class tree, or the test/val split of a split layout).

    The classification figures count every image of ``data`` by its top class. The bias/variance diagnosis
    compares this data's error with the training error the run recorded. A model that answers "unknown" also
    gets "unknown": the share of these known images it keeps and their accuracy, and for each folder of images
    of none of its classes in ``unknown``, the score's ROC-AUC and the share of them it accepts
    (``open_set=False``: closed-set, as ``--no-unknown``).

    ``cache`` is where the decoded images live, as ``fovea train --cache``: "auto" (True) holds them in memory
    when they fit the memory budget (``FOVEA_MEMORY_BUDGET``, else half the free RAM) and otherwise decodes them
    into their cache file and reads it a block at a time; "memory", "disk", or "none" (False: in memory, no cache
    entry kept). The numbers are the same either way.
    """
    model = load(run, device, unknown=open_set)
    if unknown and not model.answers_unknown:
        raise FoveaError(f"{run} has no unknown-image score" + ("" if open_set else " (--no-unknown)") +
                         f"; give it one: fovea calibrate-unknown {run} TRAINING_DATA")
    samples, missing, split = eval_samples(data, model.classes)
    # The set stays on the CPU whatever the device (a block at a time goes to it): the RAM is the budget.
    store, why = choose_store(cache, len(samples), model.image_size, torch.device("cpu"))
    log.info("images: %s", why)
    images = load_images(samples, model.image_size, cache=cache not in (False, "none"), progress=progress,
                         description="decoding", store=store)
    if len(images) == 0:
        raise FoveaError(f"none of the {len(samples)} files in {data} could be read")
    out = model.outputs_over(images)
    probs = out.probabilities
    m = classification_metrics(images.labels.numpy(), probs, model.classes)
    if model.answers_unknown and out.unknown_scores is not None:
        m["unknown"] = _open_set(model, out.unknown_scores, probs.argmax(1) == images.labels.numpy(), unknown)
    skipped = [{"path": p, "reason": r, "split": split} for p, r in images.quarantined + missing]
    m.update({"skipped": len(skipped), "quarantined": skipped, "split": split, "model": str(run), "data": str(data)})
    train_acc = model.meta.get("metrics", {}).get("train_accuracy")
    if train_acc is not None:
        m["diagnosis"] = diagnose(1 - float(train_acc), 1 - m["accuracy"], human_error,
                                  classical=(model.meta.get("transfer") or {}).get("classical"))
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
    if "unknown" in m:
        m["unknown"].pop("scores", None)  # the plot's raw material, not for JSON
    return m


def _open_set(model: Any, known_scores: np.ndarray, known_correct: np.ndarray,
              folders: Sequence[str | Path]) -> dict[str, Any]:
    """The open-set figures (``openset_metrics``) for ``folders`` of images of none of the classes (every image
    file under each, read as the model reads them), with the scores kept for the report's plot."""
    from fovea.data import IMAGE_EXTENSIONS

    sets: dict[str, np.ndarray] = {}
    skipped: dict[str, int] = {}
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise FoveaError(f"--unknown {folder}: not a folder of images")
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise FoveaError(f"--unknown {folder}: no image files")
        scores = []
        for i in range(0, len(files), 256):
            x, _, bad = model.load_images(files[i : i + 256])
            skipped[str(folder)] = skipped.get(str(folder), 0) + len(bad)
            scores.append(np.asarray(model.outputs(x).unknown_scores))
        sets[str(folder)] = np.concatenate(scores)
    entry = model.meta.get("unknown") or {}
    result = openset_metrics(known_scores, known_correct, sets, threshold=float(model.unknown_threshold),
                             keep=float(entry.get("keep", 0.95)))
    result["score"] = entry.get("score")
    for name, n in skipped.items():
        result["unknown"][name]["unreadable"] = n
    result["scores"] = {"known": known_scores, **sets}
    return result
