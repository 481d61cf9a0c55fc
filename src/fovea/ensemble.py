"""Ensembles: several trained models combined into one model artifact that averages their probabilities.

``make_ensemble([run_a, run_b, ...], out)`` writes a folder that ``fovea.load``, ``fovea predict`` and
``fovea evaluate`` use like any other model::

    OUT/model.json            format "fovea.model", with "ensemble": {"members": [...], "combine": ...},
                              classes, preprocessing (the input size), metrics when --data was given
    OUT/members/00/           a copy of each member's model.safetensors + model.json (+ unknown.safetensors)
    OUT/members/01/ ...

The folder is self-contained: deleting the original runs leaves it working. A member that already sits
inside OUT (``fovea train --seeds N`` writes OUT/seed-0 ... and then the ensemble into OUT) is referenced
where it is rather than copied, so its weights are not stored twice. Members are plain model folders, so
each one can still be loaded, evaluated or served on its own.

Why the mean of probabilities: it needs no extra data to fit, the output stays a distribution that sums
to one, and its log loss and Brier score are never worse than the members' average (both are convex in
the probabilities: Jensen's inequality); accuracy usually improves too but is not guaranteed to.

How the members' different input sizes are handled, and what it was measured to cost: ``fovea.runtime``'s
Ensemble.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fovea.artifact import MEMBERS, META, UNKNOWN_FILE, WEIGHTS, read_meta, write_meta
from fovea.errors import FoveaError
from fovea.runtime import TorchModel

log = logging.getLogger("fovea.ensemble")

COMBINE = "mean of probabilities"
# Kept per member in model.json (the table prints all but f1_macro); the ensemble keeps evaluate()'s scalars.
TABLE_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "f1_macro", "log_loss")


def _member_meta(run: Path) -> dict[str, Any]:
    """The model.json of a run that can be a member: a plain Fovea model with its weights."""
    meta = read_meta(run)  # "not a Fovea model" for a folder without a model.json
    if "ensemble" in meta:
        raise FoveaError(f"{run} is itself an ensemble; give its members' run folders instead")
    if not (run / WEIGHTS).is_file():
        if meta.get("runtime") or meta.get("compression"):  # an ONNX Runtime or torch.export artifact
            raise FoveaError(f"{run} is a compressed artifact; an ensemble's members are PyTorch run folders "
                             "with their weights; give the run it was compressed from")
        raise FoveaError(f"{run} is not a Fovea model: no {WEIGHTS} (a model folder holds {WEIGHTS} + {META})")
    return meta


def _check_classes(runs: Sequence[Path], metas: Sequence[dict[str, Any]]) -> list[str]:
    """All members must predict the same classes in the same order: their probabilities are averaged."""
    classes = list(metas[0]["classes"])
    for run, meta in zip(runs[1:], metas[1:]):
        other = list(meta["classes"])
        if other == classes:
            continue
        if sorted(other) == sorted(classes):
            raise FoveaError(f"{run} lists the classes in another order ({', '.join(other)}) than {runs[0]} "
                             f"({', '.join(classes)}); ensemble members must have the same class list")
        missing, extra = sorted(set(classes) - set(other)), sorted(set(other) - set(classes))
        raise FoveaError(
            f"members predict different classes: {runs[0]} has {', '.join(classes)}; {run} has {', '.join(other)}"
            f" (missing {', '.join(missing) or 'none'}, extra {', '.join(extra) or 'none'}). "
            "Ensemble models trained on the same classes")
    return classes


def make_ensemble(runs: Sequence[str | Path], out: str | Path, data: str | Path | None = None,
                  progress: bool = True) -> Path:
    """Combine model folders into one ensemble model in ``out`` (see the module docstring); returns ``out``.

    Args:
        runs: two or more run/model folders with the same class list; models of different architectures
            and input sizes may be mixed.
        out: the folder to write; it may exist (e.g. holding the member runs) but not hold a model yet.
        data: when given, the ensemble and each member are evaluated on its test (else val) split and the
            table goes into model.json "metrics".
        progress: progress bars while evaluating.
    """
    paths, out = [Path(r) for r in runs], Path(out)
    if len(paths) < 2:
        raise FoveaError(f"an ensemble needs at least 2 models, got {len(paths)}"
                         + (f" ({paths[0]})" if paths else "") + "; give two or more run folders")
    for p in paths:
        if not p.is_dir():
            raise FoveaError(f"{p} is not a Fovea model: " + ("no such folder" if not p.exists() else "not a folder"))
    resolved = [p.resolve() for p in paths]
    twice = sorted({str(p) for p, r in zip(paths, resolved) if resolved.count(r) > 1})
    if twice:
        raise FoveaError(f"{', '.join(twice)} given more than once; each member counts once in the mean")
    metas = [_member_meta(p) for p in paths]
    classes = _check_classes(paths, metas)
    root = out.resolve()
    if root in resolved or (out / META).exists() or (out / MEMBERS).exists():
        raise FoveaError(f"{out} already holds a model; choose another --out")
    for p in paths:  # weights that do not load would make a broken ensemble: find out before writing anything
        try:
            TorchModel(p, "cpu")
        except FoveaError as e:
            raise FoveaError(f"member {p}: {e}") from e

    rels = []
    for i, (p, r) in enumerate(zip(paths, resolved)):
        if r.is_relative_to(root):  # already inside OUT (fovea train --seeds): referenced, not copied
            rels.append(r.relative_to(root).as_posix())
            continue
        dst = out / MEMBERS / f"{i:02d}"
        dst.mkdir(parents=True)
        for name in (WEIGHTS, META, UNKNOWN_FILE):  # the member's unknown score goes with it, where it has one
            if name != UNKNOWN_FILE or (p / name).exists():
                shutil.copy2(p / name, dst / name)
        rels.append(dst.relative_to(out).as_posix())
    sizes = [int(m["preprocessing"]["image_size"]) for m in metas]
    largest = metas[sizes.index(max(sizes))]["preprocessing"]
    meta: dict[str, Any] = {
        "ensemble": {
            MEMBERS: rels, "combine": COMBINE, "sources": [str(r) for r in resolved],
            "architectures": [m.get("architecture", {}).get("name") for m in metas], "image_sizes": sizes,
        },
        "classes": classes,
        "preprocessing": {
            **{k: largest[k] for k in ("resize", "interpolation", "alpha", "color") if k in largest},
            "image_size": max(sizes),
            "member_resize": "bilinear, antialiased, from image_size to each smaller member's size",
        },
    }
    fingerprints = {m.get("data", {}).get("fingerprint") for m in metas}
    if len(fingerprints) == 1 and None not in fingerprints:  # one data set: monitoring can compare against it
        meta["data"] = metas[0]["data"]
    write_meta(out, meta)
    log.info("ensemble of %d models (%s px) written to %s", len(paths), ", ".join(map(str, sizes)), out)

    if data is not None:
        try:
            _calibrate_unknown(out, data, paths)
            meta["metrics"] = _evaluate_all(out, rels, paths, sizes, data, progress)
        except FoveaError as e:  # the model is written and usable; say so rather than leave the user guessing
            raise FoveaError(f"the ensemble is written to {out}, but evaluating it on {data} failed: {e}. "
                             f"Fix the data and run: fovea evaluate {out} DATA") from e
        meta = {**read_meta(out), "metrics": meta["metrics"]}  # with the "unknown" entry, if calibrated
        write_meta(out, meta)
    return out


def _calibrate_unknown(out: Path, data: str | Path, members: Sequence[Path]) -> None:
    """The ensemble answers "unknown" when every member can: a threshold on the mean of their standardised scores,
    calibrated on ``data``'s validation split (no member was fitted on it)."""
    from fovea.data import discover, load_images
    from fovea.runtime import calibrate_ensemble, load

    if not all(load(m, "cpu").answers_unknown for m in members):
        log.info("not every member answers 'unknown' (fovea calibrate-unknown fits them): the ensemble is closed-set")
        return
    val = discover(data).splits.get("val", [])
    images = load_images(val, load(out, "cpu", unknown=False).image_size, progress=False)
    if len(images) < 20:
        log.info("fewer than 20 validation images in %s: the ensemble's unknown threshold is not calibrated", data)
        return
    calibrate_ensemble(out, images.images)


def _evaluate_all(out: Path, rels: Sequence[str], paths: Sequence[Path], sizes: Sequence[int],
                  data: str | Path, progress: bool) -> dict[str, Any]:
    """The ensemble's metrics on ``data`` (evaluate()'s scalars) plus one row per member."""
    from fovea.evaluation import evaluate

    m = evaluate(out, data, progress=progress)
    metrics: dict[str, Any] = {k: v for k, v in m.items() if isinstance(v, (int, float, str)) or v is None}
    rows = []
    for rel, src, size in zip(rels, paths, sizes):
        mm = evaluate(out / rel, data, progress=progress)
        rows.append({"member": rel, "run": str(src), "image_size": size, **{k: mm.get(k) for k in TABLE_METRICS}})
        log.info("member %s: accuracy %.4f", src, mm["accuracy"])
    metrics["members"] = rows
    log.info("ensemble: accuracy %.4f on %d images (%s split)", m["accuracy"], m["n_images"], m["split"])
    return metrics
