"""``fovea calibrate-unknown RUN DATA``: give an existing model (or an ensemble) its unknown-image score, or a new
threshold, from a data set's training and validation splits.

The score is fitted on DATA's training split and its threshold calibrated on its validation split (a split
layout's ``val/``, or a seeded stratified share of a class-folder tree, as ``fovea train`` splits it). An
ensemble's members each get their own score, and the ensemble a threshold on the mean of their standardised
scores. Writes into the model folder: a registered version's files are sealed by their digest, so calibrate the
run folder and register it again.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from fovea.artifact import read_meta, runtime_of
from fovea.data import Dataset, choose_store, discover, load_images
from fovea.errors import FoveaError

log = logging.getLogger("fovea.training")


def calibrate_unknown(run: str | Path, data: str | Path | None = None, *, dataset: Dataset | None = None,
                      keep: float = 0.95, score: str | None = None, val_fraction: float = 0.2, seed: int = 0,
                      device: str = "auto", progress: bool = True, cache: bool | str = True) -> dict[str, Any]:
    """Fit and calibrate the unknown score of the model in ``run`` on ``data`` (or an already split ``dataset``);
    returns model.json's new "unknown" entry.

    ``cache``: where the decoded images live, as ``fovea train --cache`` (True: "auto", False: "none"); a set over
    the memory budget is decoded into its cache file and read a block at a time.
    """
    from fovea.runtime import Ensemble, Network, calibrate_ensemble, fit_unknown, load

    run = Path(run)
    meta = read_meta(run)
    if dataset is None:
        if data is None:
            raise FoveaError("give the data to fit and calibrate on (its train and val splits)")
        dataset = discover(data, val_fraction, seed)
    if list(dataset.classes) != list(meta["classes"]):
        raise FoveaError(f"{data or dataset.root} has classes {', '.join(dataset.classes)}; the model "
                         f"{', '.join(meta['classes'])}: calibrate on the data it was trained on (or the same classes)")
    train, val = dataset.splits.get("train", []), dataset.splits.get("val", [])
    if not train or not val:
        raise FoveaError(f"{data or dataset.root} needs training images (to fit the score) and validation images "
                         "(to set its threshold)")
    model = load(run, device, unknown=False)
    size = model.image_size
    # Both splits are held at once, on the CPU whatever the device (a block at a time goes to it).
    store, why = choose_store(cache, len(train) + len(val), size, torch.device("cpu"))
    log.info("images: %s", why)
    decode: dict[str, Any] = {"cache": cache not in (False, "none"), "store": store}
    fit_set = load_images(train, size, progress=progress, description="decoding train", **decode)
    cal_set = load_images(val, size, progress=progress, description="decoding val", **decode)
    if runtime_of(meta) != "ensemble":
        assert isinstance(model, Network)
        entry = fit_unknown(run, model, fit_images=fit_set, fit_labels=fit_set.labels.numpy(),
                            calibration=cal_set, score=score, keep=keep)
        from fovea.monitor import forget_unknown_scores

        if forget_unknown_scores(run):
            log.info("the drift reference's unknown scores were the old score's: rebuild it to test the unknown "
                     "rate (fovea drift --model %s --build-reference VALIDATION_DIR)", run)
        return entry
    assert isinstance(model, Ensemble)
    for member in model.members:  # each member its own score, fitted on the same split at its own size
        if not member.meta.get("unknown") or score is not None:
            fit_m = load_images(train, member.image_size, progress=False, **decode)
            cal_m = load_images(val, member.image_size, progress=False, **decode)
            fit_unknown(member.path, member, fit_images=fit_m, fit_labels=fit_m.labels.numpy(),
                        calibration=cal_m, score=score, keep=keep)
    return calibrate_ensemble(run, cal_set, keep=keep, device=device)
