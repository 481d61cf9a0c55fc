"""``fovea drift`` as a function: a model named by folder or registry reference, its window of traffic, the
check, the alerts and the report; and building a reference for a model that has none."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np

from fovea.errors import FoveaError
from fovea.monitor._watch import DriftCheck, alert, check_drift, load_reference, window_from_files, window_from_store


def reference_from_folder(model: str, images: Path, *, db: str | None = None) -> tuple[Path, int, int]:
    """Build the drift reference of a model folder that has none from validation images in CLASS/* folders
    (``fovea drift --build-reference``); returns (the file written, images used, files unreadable).

    Nothing is written unless the images describe a distribution of this model's classes: at least 20 readable
    images, every folder one of its classes. A registered version's files are sealed by their digest.
    """
    from fovea import model_registry
    from fovea.data import IMAGE_EXTENSIONS
    from fovea.monitor._reference import build_reference, save_reference
    from fovea.monitor._stats import header_size
    from fovea.runtime import load

    where = model_registry.locate(model, db=db)
    if where.version:
        raise FoveaError("a registered version's files are sealed by their digest; build the reference in the run "
                         "folder, then register it again")
    if not images.is_dir():
        raise FoveaError(f"--build-reference {images}: not a folder of validation images (CLASS/*)")
    loaded = load(where.path, "cpu")
    files = sorted(p for p in images.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    x, kept, bad = loaded.load_images(files)
    if len(kept) < 20:  # the old reference, if any, stays: a handful of images describes no distribution
        raise FoveaError(f"--build-reference {images}: {len(kept)} usable images; a reference needs at "
                         f"least 20 (a few hundred is better){f', {len(bad)} unreadable' if bad else ''}")
    index = {c: i for i, c in enumerate(loaded.classes)}
    strangers = sorted({files[i].parent.name for i in kept} - set(index))
    if strangers:
        raise FoveaError(f"--build-reference {images}: folder(s) {', '.join(strangers)} are not classes of "
                         f"this model ({', '.join(loaded.classes)}); give CLASS/* folders of validation images")
    labels = np.array([index[files[i].parent.name] for i in kept])
    out = save_reference(where.path, build_reference(loaded, x, [header_size(files[i]) for i in kept], labels))
    return out, len(kept), len(bad)


def run_drift(model: str, *, db: str | None = None, data: Path | None = None, window: int = 500,
                since: timedelta | None = None, alpha: float = 0.05, permutations: int = 1000,
                webhook: str | None = None, report: Path | None = None) -> DriftCheck:
    """``fovea drift``: a window of ``model``'s traffic (the newest ``window`` answers in the store, those of the
    last ``since``, or the image files under ``data``) tested against its reference; alerts sent, the report
    written when asked."""
    from fovea import model_registry
    from fovea.data import IMAGE_EXTENSIONS
    from fovea.monitor._report import write_drift_report
    from fovea.runtime import load

    if not 0 < alpha < 1:
        raise FoveaError(f"--alpha is a significance level in (0, 1), got {alpha}")
    where = model_registry.locate(model, db=db)
    loaded = load(where.path, "cpu")
    unreadable: list[tuple[str, str]] = []
    if data is not None:
        files = sorted(p for p in data.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise FoveaError(f"no image files in {data}")
        w, unreadable = window_from_files(loaded, files)
    else:
        from fovea.store import Store

        w = window_from_store(Store(db), where.name, where.version, list(loaded.classes),
                              last=None if since else window, since=since)
    reference = load_reference(where.path)
    result = check_drift(loaded, where.path, where.name, where.version, w, alpha=alpha, permutations=permutations,
                   reference=reference)
    result.unreadable = unreadable
    alert(result, webhook)
    if report is not None:
        write_drift_report(report, result, reference)
    return result
