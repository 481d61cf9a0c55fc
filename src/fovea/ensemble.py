"""Ensembles: several trained models combined into one model artifact that averages their probabilities.

``make_ensemble([run_a, run_b, ...], out)`` writes a folder that ``fovea.load``, ``fovea predict`` and
``fovea evaluate`` use like any other model::

    OUT/model.json            format "fovea.model", with "ensemble": {"members": [...], "combine": ...},
                              classes, preprocessing (the input size), metrics when --data was given
    OUT/members/00/           a copy of each member's model.safetensors + model.json
    OUT/members/01/ ...

The folder is self-contained: deleting the original runs leaves it working. A member that already sits
inside OUT (``fovea train --seeds N`` writes OUT/seed-0 ... and then the ensemble into OUT) is referenced
where it is rather than copied, so its weights are not stored twice. Members are plain model folders, so
each one can still be loaded, evaluated or served on its own.

Why the mean of probabilities: it needs no extra data to fit, the output stays a distribution that sums
to one, and its log loss and Brier score are never worse than the members' average (both are convex in
the probabilities: Jensen's inequality); accuracy usually improves too but is not guaranteed to.

Members may differ in input size. The ensemble takes images at the largest member's size and each smaller
member gets them resized (bilinear, antialiased) rather than decoded again at its own size, because
everything downstream hands a model images already decoded at ``model.image_size`` (evaluate decodes
through the image cache, serving and batch decode once) and because one path keeps ``fovea predict`` and
``fovea evaluate`` in agreement. Never upscaled: no member sees fewer details than it was trained on.
Measured on pets/val (1000 real photos; cnn members trained 8 epochs on pets at 32, 48 and 64 px; 2-core
CPU), against each member decoding the files at its own size:

- one member fed resized images agrees on 96-98 % of the labels, mean |delta p| 0.011-0.017, accuracy
  within noise (32 px: 72.5 % own decode, 73.1 % resized from 64 px);
- the ensembles 32+64, 48+64, 32+48 and 32+48+64 agree on 97.4-99.2 % of the labels, mean |delta p|
  0.006-0.009, accuracy -0.3 to +1.4 points and log loss 0.001-0.002 lower than with per-member decoding;
- decoding three sizes costs 3.9 ms/image against 1.4 ms for one; the two resizes 0.6 ms.

Members of one size (the usual case, e.g. seeds) are not resized at all: the ensemble is then exactly the
mean of its members.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from fovea.artifact import FORMAT, FORMAT_VERSION, META, WEIGHTS, Model, Prediction, read_meta, versions
from fovea.errors import FoveaError

if TYPE_CHECKING:
    from rich.table import Table

log = logging.getLogger("fovea.ensemble")

COMBINE = "mean of probabilities"
MEMBERS = "members"
# Kept per member in model.json (the table prints all but f1_macro); the ensemble keeps evaluate()'s scalars.
TABLE_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "f1_macro", "log_loss")


def _resize(images: torch.Tensor, size: int, batch_size: int = 256) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> uint8 (N, 3, size, size), bilinear with antialiasing, in batches.

    Bilinear with antialiasing is the filter of the decoder's own resize (PIL bilinear, which widens its
    kernel when shrinking). On pets/val (see the module docstring) bicubic was closer to a member's own
    decode for 48->32 and 64->48 px and further for 64->32; neither won at the ensemble level (label
    agreement 98.4-99.7 % bicubic, 97.4-99.2 % bilinear) but bilinear's log loss was lower in all four
    ensembles (by 0.002-0.004); area (box) was further than both on average. Batches keep the float copy small:
    256 images at 224 px are 150 MB, a 10 000-image evaluation at once would be 6 GB.
    """
    if images.shape[-1] == size:
        return images
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8)
    for i in range(0, len(images), batch_size):
        x = F.interpolate(images[i : i + batch_size].float(), size=(size, size), mode="bilinear",
                          antialias=True, align_corners=False)
        out[i : i + batch_size] = x.round_().clamp_(0, 255).to(torch.uint8)  # (B, 3, size, size)
    return out


class Ensemble:
    """A loaded ensemble artifact, with the same interface as ``artifact.Model``.

    ``fovea.load(OUT)`` returns one when OUT/model.json has an "ensemble" entry. It has no ``net``: it
    is several networks; ``members`` holds them as ``Model`` objects.
    """

    def __init__(self, path: str | Path, device: str = "auto") -> None:
        self.path = Path(path)
        self.meta = read_meta(self.path)
        spec = self.meta.get("ensemble")
        if not isinstance(spec, dict) or not isinstance(spec.get(MEMBERS), list) or not spec[MEMBERS]:
            raise FoveaError(f"{self.path / META}: 'ensemble' must list its members (relative folders)")
        root = self.path.resolve()
        self.members: list[Model] = []
        for rel in spec[MEMBERS]:
            folder = self.path / str(rel)
            # A model folder from a stranger must not make Fovea read files outside it.
            if Path(str(rel)).is_absolute() or not folder.resolve().is_relative_to(root):
                raise FoveaError(f"{self.path / META}: member {rel!r} is outside the ensemble folder")
            self.members.append(Model(folder, device))
        self.classes: list[str] = list(self.meta["classes"])
        self.image_size = int(self.meta["preprocessing"]["image_size"])
        for rel, m in zip(spec[MEMBERS], self.members):
            if m.classes != self.classes:
                raise FoveaError(f"{self.path}: member {rel} has classes {m.classes}, the ensemble {self.classes}")
            if m.image_size > self.image_size:
                raise FoveaError(f"{self.path}: member {rel} takes {m.image_size} px images, more than the "
                                 f"ensemble's {self.image_size}; it would see upscaled images")
        self.device = self.members[0].device
        # The ensemble decodes exactly as its largest member does; smaller members get those pixels resized.
        self._decoder = max(self.members, key=lambda m: m.image_size)

    def load_images(self, sources: Iterable[str | Path | bytes]) -> tuple[torch.Tensor, list[int], list[tuple[int, str]]]:
        """Decode and resize at the ensemble's (largest member's) size; returns (images, kept, (index, reason))."""
        return self._decoder.load_images(sources)

    def predict_proba(self, images: torch.Tensor) -> np.ndarray:
        """Mean of the members' probabilities (N, classes) for uint8 (N, 3, S, S) images at ``image_size``."""
        if len(images) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"expected uint8 images (N, 3, {self.image_size}, {self.image_size}), "
                             f"got {tuple(images.shape)}; decode with load_images()")
        probs = [m.predict_proba(_resize(images, m.image_size)) for m in self.members]  # each (N, classes)
        return np.stack(probs).mean(axis=0, dtype=np.float32)  # (members, N, classes) -> (N, classes)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Log of the mean probabilities: ``softmax`` of these gives ``predict_proba`` back, argmax agrees.

        Clamped at float32's smallest normal number so a probability that underflowed to 0 gives a finite
        logit (a loss computed on it stays finite).
        """
        p = torch.from_numpy(self.predict_proba(images))
        return p.clamp_min(torch.finfo(torch.float32).tiny).log()

    def predict(self, paths: Sequence[str | Path]) -> tuple[list[Prediction], list[tuple[str, str]]]:
        """Predict files; returns (predictions, [(path, reason)] for files that could not be read)."""
        x, kept, bad = self.load_images(paths)
        probs = self.predict_proba(x)
        preds = []
        for i, p in zip(kept, probs):
            j = int(p.argmax())
            preds.append(Prediction(str(paths[i]), self.classes[j], float(p[j]),
                                    {c: float(v) for c, v in zip(self.classes, p)}))
        return preds, [(str(paths[i]), r) for i, r in bad]


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


def _write_meta(out: Path, meta: dict[str, Any]) -> None:
    full = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": versions(), **meta}
    (out / META).write_text(json.dumps(full, indent=2, default=str))


def make_ensemble(runs: Sequence[str | Path], out: str | Path, data: str | Path | None = None,
                  progress: bool = True) -> Path:
    """Combine model folders into one ensemble model in ``out`` (see the module docstring); returns ``out``.

    Args:
        runs: two or more run/model folders with the same class list; models of different architectures
            and input sizes may be mixed.
        out: the folder to write; it may exist (e.g. holding the member runs) but not hold a model yet.
        data: when given, the ensemble and each member are evaluated on its test (else val) split and the
            table goes into model.json "metrics" (``metrics_table`` formats it).
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
            Model(p, "cpu")
        except FoveaError as e:
            raise FoveaError(f"member {p}: {e}") from e

    rels = []
    for i, (p, r) in enumerate(zip(paths, resolved)):
        if r.is_relative_to(root):  # already inside OUT (fovea train --seeds): referenced, not copied
            rels.append(r.relative_to(root).as_posix())
            continue
        dst = out / MEMBERS / f"{i:02d}"
        dst.mkdir(parents=True)
        for name in (WEIGHTS, META):
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
    _write_meta(out, meta)
    log.info("ensemble of %d models (%s px) written to %s", len(paths), ", ".join(map(str, sizes)), out)

    if data is not None:
        try:
            meta["metrics"] = _evaluate_all(out, rels, paths, sizes, data, progress)
        except FoveaError as e:  # the model is written and usable; say so rather than leave the user guessing
            raise FoveaError(f"the ensemble is written to {out}, but evaluating it on {data} failed: {e}. "
                             f"Fix the data and run: fovea evaluate {out} DATA") from e
        _write_meta(out, meta)
    return out


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


def metrics_table(metrics: dict[str, Any]) -> Table:
    """A rich table of make_ensemble's metrics: one row per member, then the ensemble."""
    from rich.table import Table

    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    t = Table("model", "size", "accuracy", "balanced accuracy", "ROC-AUC", "log loss",
              title=f"{metrics.get('n_images', '?')} images ({metrics.get('split', '?')} split)")
    for r in metrics.get("members", []):
        t.add_row(Path(r["run"]).name, str(r["image_size"]), fmt(r["accuracy"]), fmt(r["balanced_accuracy"]),
                  fmt(r["roc_auc"]), fmt(r.get("log_loss")))
    t.add_row("ensemble", "", fmt(metrics.get("accuracy")), fmt(metrics.get("balanced_accuracy")),
              fmt(metrics.get("roc_auc")), fmt(metrics.get("log_loss")), style="bold")
    return t
