"""Fitting a model's unknown-image score and calibrating its threshold, into the artifact.

The score is fitted on known images (the training split) and its threshold calibrated on others (the
validation split), at the share of known images to keep (``keep``, 0.95 by default): a threshold set on the
images the score was fitted on would keep more of them than of new images. ``fovea train`` calls
``fit_unknown`` at the end of a run, ``fovea calibrate-unknown`` on an existing model, ``fovea compress`` for
each artifact it writes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fovea.artifact import read_meta, write_meta
from fovea.errors import FoveaError
from fovea.runtime._predictor import UNKNOWN, Network, set_blocks

if TYPE_CHECKING:
    from fovea.data import ImageSet

log = logging.getLogger("fovea.runtime")


def fit_unknown(folder: str | Path, model: Network, *, fit_images: torch.Tensor | ImageSet, fit_labels: np.ndarray,
                calibration: torch.Tensor | ImageSet, score: str | None = None, keep: float = 0.95,
                tta: bool | None = None, note: str | None = None) -> dict[str, Any]:
    """Fit ``score`` (default ``unknown.DEFAULT_SCORE``) on ``fit_images`` (N, 3, S, S) with their class indexes,
    set the threshold that keeps ``keep`` of the ``calibration`` images, and record both in the artifact in
    ``folder`` (``unknown.safetensors`` and model.json's "unknown"); returns that entry.

    ``tta``: read features averaged with the mirror image's (default: as the model predicts). A score that
    needs an embedding falls back to ``energy`` (logits only) where the runtime exposes none, and says so.
    Either set may be a disk-backed ``ImageSet``: it is read a block at a time.
    """
    from fovea.runtime import unknown as u

    if not 0 < keep < 1:
        raise FoveaError(f"--unknown-keep is the share of known images to keep, in (0, 1), got {keep}")
    if UNKNOWN in model.classes:
        raise FoveaError(f"the model has a class named {UNKNOWN!r}: it cannot also answer {UNKNOWN!r} for images of "
                         "none of its classes (--unknown-keep 0 trains without the score)")
    if len(calibration) < 20:
        raise FoveaError(f"{len(calibration)} images to calibrate the unknown threshold on; it needs at least 20 "
                         "known images the score was not fitted on (a few hundred is better)")
    name = score or u.DEFAULT_SCORE
    chosen = u.create_score(name)
    tta = model.tta if tta is None else tta
    fit_inputs = model.score_inputs_over(fit_images, tta=tta, score=chosen)
    missing = (chosen.uses_embedding and fit_inputs["embeddings"] is None) or (
        chosen.uses_stages and fit_inputs.get("stages") is None)
    if missing:
        log.warning("%s: the %s score needs features this runtime does not expose; using energy (logits only) "
                    "instead", folder, name)
        chosen, note = u.create_score("energy"), note or f"{name} needs features this runtime does not expose"
        fit_inputs = {"logits": fit_inputs["logits"], "embeddings": None}
    chosen.fit(**fit_inputs, labels=np.asarray(fit_labels))
    known = np.asarray(chosen(**model.score_inputs_over(calibration, tta=tta, score=chosen)), np.float64)
    threshold = float(u.threshold_at(known, keep))
    entry = u.save_unknown(folder, chosen, threshold=threshold, keep=keep, calibrated_on=len(known),
                           kept=float((known <= threshold).mean()))
    entry.update(tta=bool(tta), known_mean=float(known.mean()), known_std=float(known.std() or 1.0))
    if note:
        entry["note"] = note
    _record(folder, entry)
    log.info("unknown images: %s score, threshold %.4g keeps %.1f %% of %d held-out known images", chosen.name,
             threshold, 100 * entry["kept"], len(known))
    return entry


def calibrate_ensemble(run: str | Path, calibration: torch.Tensor | ImageSet, *, keep: float = 0.95,
                       device: str = "auto") -> dict[str, Any]:
    """The ensemble in ``run`` answers "unknown" by the mean of its members' scores, each standardised by its
    mean and spread on ``calibration`` (known images none was fitted on), over a threshold that keeps ``keep`` of
    them; every member must have its score."""
    from fovea.runtime._ensemble import Ensemble
    from fovea.runtime._load import load
    from fovea.runtime.unknown import threshold_at

    model = load(run, device)
    assert isinstance(model, Ensemble)
    missing = [str(m.path) for m in model.members if not m.answers_unknown]
    if missing:
        raise FoveaError(f"ensemble members without an unknown score: {', '.join(missing)}; "
                         f"fovea calibrate-unknown {run} DATA fits them")
    parts = [model.member_scores(b)[1] for b in set_blocks(calibration)]  # each (members, block): a block at a time
    scores = np.concatenate([p for p in parts if p is not None], axis=1)  # (members, N); every member has a score
    mean, std = scores.mean(1), np.maximum(scores.std(1), 1e-12)
    combined = ((scores - mean[:, None]) / std[:, None]).mean(0)
    threshold = float(threshold_at(combined, keep))
    kept = float((combined <= threshold).mean())
    entry: dict[str, Any] = {"score": "ensemble", "combine": "mean of the members' standardised scores", "threshold": threshold,
             "keep": keep, "calibrated_on": int(len(combined)), "kept": kept,
             "members": [{"mean": float(m), "std": float(s)} for m, s in zip(mean, std)]}
    _record(run, entry)
    log.info("unknown images: the ensemble's threshold %.4g keeps %.1f %% of %d known images", threshold,
             100 * kept, len(combined))
    return entry


def recalibrate_unknown(folder: str | Path, calibration: torch.Tensor | ImageSet, *,
                        device: str = "auto") -> dict[str, Any]:
    """A new threshold for the unknown score the artifact in ``folder`` already has (fitted state unchanged), set on
    ``calibration`` known images with this artifact's own numerics (a compressed copy's scores move a little);
    returns the updated entry."""
    from fovea.runtime._load import load
    from fovea.runtime.unknown import threshold_at

    model = load(folder, device)
    entry = dict(model.meta.get("unknown") or {})
    if not model.answers_unknown or not entry:
        raise FoveaError(f"{folder} has no unknown score to recalibrate")
    scores = np.asarray(model.outputs_over(calibration).unknown_scores, np.float64)
    keep = float(entry.get("keep", 0.95))
    threshold = float(threshold_at(scores, keep))
    entry.update(threshold=threshold, calibrated_on=int(len(scores)), kept=float((scores <= threshold).mean()),
                 known_mean=float(scores.mean()), known_std=float(scores.std() or 1.0))
    _record(folder, entry)
    return entry


def _record(folder: str | Path, entry: dict[str, Any]) -> None:
    """``entry`` as model.json's "unknown"."""
    meta = read_meta(folder)
    meta["unknown"] = entry
    write_meta(folder, meta)
