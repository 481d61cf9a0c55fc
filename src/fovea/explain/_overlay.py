"""Heatmaps laid over images, and the report's "what the model looks at" examples."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fovea.errors import FoveaError

log = logging.getLogger("fovea.explain")


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB uint8 (H, W, 3): ``image`` (H, W, 3) uint8 blended with the jet-coloured ``heatmap`` (h, w) in [0, 1].

    The map is resized bilinearly to the image, so a map at the model's input size lies over a larger
    decode of the same square. ``alpha`` is the heatmap's weight (pytorch-grad-cam's show_cam_on_image).
    """
    import cv2
    from pytorch_grad_cam.utils.image import show_cam_on_image

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"overlay needs an (H, W, 3) image, got shape {image.shape}")
    h, w = image.shape[:2]
    m = np.clip(np.asarray(heatmap, np.float32), 0, 1)
    if m.shape != (h, w):
        m = np.asarray(cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR), np.float32)
    return show_cam_on_image(image.astype(np.float32) / 255, m, use_rgb=True, image_weight=1 - alpha)


def display_image(path: str | Path | None, fallback: torch.Tensor, size: int) -> np.ndarray:
    """The square the model saw (shorter side resized, centre crop: its own preprocessing), decoded again at
    ``size`` px so an overlay is readable; the model's (3, S, S) uint8 copy, resized, if the file is gone."""
    from fovea.data import load_square
    from fovea.errors import ImageError

    if path is not None and size > fallback.shape[-1]:
        try:
            return load_square(path, size)
        except ImageError:
            pass
    img = fallback.permute(1, 2, 0).numpy()
    if img.shape[0] == size:
        return img
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR))


def _sample_correct(labels: np.ndarray, pred: np.ndarray, n: int, seed: int = 0) -> list[int]:
    """n correctly classified images, taking the classes in turn, in a seeded random order within each."""
    rng = np.random.default_rng(seed)
    per_class = [list(rng.permutation(np.flatnonzero((labels == c) & (pred == c)))) for c in np.unique(labels)]
    out: list[int] = []
    while len(out) < n and any(per_class):
        for idx in per_class:
            if idx and len(out) < n:
                out.append(int(idx.pop(0)))
    return out


def looks_at(net: nn.Module | None, images: torch.Tensor, labels: np.ndarray, probs: np.ndarray,
             classes: Sequence[str], paths: Sequence[str] | None = None, *, mean: Sequence[float],
             std: Sequence[float], n: int = 4, size: int = 160, method: str = "gradcam") -> dict[str, Any]:
    """Overlays for the report: ``n`` correct validation images and the ``n`` most confidently wrong.

    "Most confidently wrong" are the misclassified images with the highest loss (lowest probability of the
    true class, fastai's top losses). Every map explains the predicted class: what the decision rested on.
    Returns ``{"method", "layer", "seconds", "correct": [...], "wrong": [...]}``, or ``{"absent": why}`` when
    the model has no map to show; an explanation never costs a run its report.
    """
    from fovea.explain._cam import _net_maps, resolve_layer

    if net is None:
        return {"absent": "an ensemble averages several networks; explain one member with `fovea explain`"}
    start = time.perf_counter()
    labels = np.asarray(labels)
    pred = probs.argmax(1)
    true_p = probs[np.arange(len(labels)), labels]
    wrong = [int(i) for i in np.flatnonzero(pred != labels)[np.argsort(true_p[pred != labels], kind="stable")][:n]]
    chosen = {"correct": _sample_correct(labels, pred, n), "wrong": wrong}
    idx = chosen["correct"] + chosen["wrong"]
    if not idx:
        return {"absent": "no validation images"}
    try:
        name, module = resolve_layer(net, images.shape[-1], None)
        maps = _net_maps(net, images[idx], [int(pred[i]) for i in idx], method=method, layer=module, mean=mean,
                         std=std, batch_size=len(idx))
    except FoveaError as e:
        return {"absent": str(e)}
    except Exception as e:  # noqa: BLE001 - the run's metrics and report matter more than its heatmaps
        log.warning("no heatmaps in the report: %s: %s", type(e).__name__, e)
        return {"absent": f"computing them failed ({type(e).__name__}: {e})"}
    size = max(size, images.shape[-1])
    by_index = dict(zip(idx, maps))
    out: dict[str, Any] = {"method": method, "layer": name}
    for kind, which in chosen.items():
        out[kind] = [{
            "overlay": overlay(display_image(paths[i] if paths else None, images[i], size), by_index[i]),
            "path": paths[i] if paths else None, "true": classes[labels[i]], "predicted": classes[pred[i]],
            "probability": float(probs[i, pred[i]]), "true_probability": float(true_p[i]),
        } for i in which]
    out["seconds"] = time.perf_counter() - start
    return out


@dataclass
class Overlays:
    """``explain_files``' result: one row per image explained, the files it skipped, and what it computed."""

    rows: list[dict[str, Any]]  # path, predicted, probability, explained, file (the overlay PNG)
    skipped: list[tuple[str, str]]  # (path, reason)
    layer: str
    images: torch.Tensor  # the decoded images (N, 3, S, S), for a sanity check on the same ones


def explain_files(model: Any, files: Sequence[Path], out: Path, *, method: str = "gradcam", target: str | None = None,
                  layer: str | None = None, batch_size: int = 32) -> Overlays:
    """Explain image files with ``model`` (one network) and write an overlay PNG per image into ``out``.

    Overlays lie on the square the model saw, decoded again at 224 px or more so that they are readable; two files
    of one name get -1, -2, ... rather than overwrite each other.
    """
    from PIL import Image

    from fovea.explain._cam import METHODS, explain, single_model

    if method not in METHODS:
        raise FoveaError(f"unknown --method {method!r}; choose one of: {', '.join(METHODS)}")
    model = single_model(model)
    x, kept, bad = model.load_images(files)
    if not kept:
        why = "; ".join(f"{files[i]}: {r}" for i, r in bad[:3]) + ("; ..." if len(bad) > 3 else "")
        raise FoveaError(f"none of the {len(files)} files could be read as an image ({why})")
    e = explain(model, x, method=method, target=target, layer=layer, batch_size=batch_size)
    out.mkdir(parents=True, exist_ok=True)
    size = max(model.image_size, 224)
    rows: list[dict[str, Any]] = []
    names: set[str] = set()
    for j, i in enumerate(kept):
        name = f"{files[i].stem}.{method}.png"
        for k in range(1, len(kept) + 1):
            if name not in names:
                break
            name = f"{files[i].stem}-{k}.{method}.png"
        names.add(name)
        Image.fromarray(overlay(display_image(files[i], x[j], size), e.maps[j])).save(out / name)
        c = int(e.predicted[j])
        rows.append({"path": str(files[i]), "predicted": model.classes[c], "probability": float(e.probabilities[j, c]),
                     "explained": model.classes[e.targets[j]], "file": str(out / name)})
    return Overlays(rows, [(str(files[i]), r) for i, r in bad], e.layer, x)
