"""Labelling on the fly: unsure answers go to a review queue, people confirm or correct them, and the agreed
images become training data for the next version.

- ``enqueue``: the server calls it for an answer below ``--review-below`` confidence; the upload is kept in
  ``$FOVEA_HOME/review/NAME/`` (once per image: the same bytes are queued once).
- ``vote``: one reviewer's label (or ``""``: none of the classes). When ``consensus`` reviewers agree, the image
  is copied into ``$FOVEA_HOME/labelled/NAME/LABEL/`` (Fovea's ``DATA/CLASS/*`` layout) and the label is
  recorded as feedback for the request, so concept-drift checks see it too. With ``consensus=1`` the first
  vote decides; a larger value serves domains where experts disagree.
- ``enqueue_suspect``: an image of a training data set whose label ``fovea check --labels`` suspects; it stays
  where it is, and the agreed verdict (keep, relabel, drop) is appended to that data set's corrections file in
  ``$FOVEA_HOME/data/``, which ``fovea train`` applies (the user's folders are never edited).
- ``retrain``: the original training data plus the labelled folder, trained with the production version's
  settings, registered as the next version with the alias ``candidate``: ready for ``fovea deploy``.
"""

from __future__ import annotations

import io
import re
import shutil
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from fovea._home import home
from fovea.errors import FoveaError
from fovea.store import Feedback, Review, Store, Vote
from fovea.store import fingerprint as fingerprint_of  # sha256 hex; `fingerprint` names the value here

NEW_CLASS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._ -]{0,99}")  # a class a reviewer names: a safe folder name


def queue_dir(name: str) -> Path:
    return home() / "review" / name


def labelled_dir(name: str) -> Path:
    return home() / "labelled" / name


def _extension(blob: bytes) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as im:
            return {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif",
                    "GIF": ".gif"}.get(im.format or "", ".img")
    except Exception:  # noqa: BLE001 - it decoded for the model, so this does not happen; keep the bytes anyway
        return ".img"


def enqueue(store: Store, name: str, version: int, request_id: str, blob: bytes, probabilities: dict[str, float],
            *, unknown: bool = False) -> int | None:
    """Queue an upload for review; its id, or None when the same image is already queued for this model.

    ``unknown``: the model answered "unknown" (none of its classes): queued with that as its prediction, so
    reviewers see it for what it is; they may name one of the classes, none, or a new class.
    """
    fingerprint = fingerprint_of(blob)
    folder = queue_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (fingerprint + _extension(blob))
    if not path.exists():
        tmp = path.with_suffix(path.suffix + ".part")
        tmp.write_bytes(blob)
        tmp.replace(path)  # never a half-written image in the queue
    top = max(probabilities, key=lambda c: probabilities[c])
    predicted = "unknown" if unknown else top
    try:
        with store.session() as s:
            row = Review(model_name=name, model_version=version, request_id=request_id, fingerprint=fingerprint,
                         path=str(path), predicted=predicted, confidence=float(probabilities[top]),
                         probabilities=probabilities)
            s.add(row)
            s.flush()
            return int(row.id)
    except IntegrityError:
        return None


def enqueue_suspect(store: Store, name: str, data_root: str | Path, path: str | Path, given: str,
                    probabilities: dict[str, float], *, suggested: str | None = None,
                    quality: float | None = None) -> int | None:
    """Queue an image of a training data set whose label ``given`` is suspected wrong (``fovea check --labels``,
    the data page); its id, or None when it is already queued for ``name``.

    The image stays where it is (the row points at it); a verdict becomes a row of the data set's corrections
    file (``fovea.data.corrections_file``), which the next ``fovea train`` applies: the given label (keep),
    another class (relabel) or none of them (drop). ``quality``: the label-quality score (low: likely wrong).
    """
    src = Path(path).resolve()
    try:
        blob = src.read_bytes()
    except OSError as e:
        raise FoveaError(f"cannot read {src}: {e}") from e
    suggested = suggested or max(probabilities, key=lambda c: probabilities[c])
    try:
        with store.session() as s:
            row = Review(model_name=name, model_version=0, request_id=f"label-check-{fingerprint_of(blob)[:16]}",
                         fingerprint=fingerprint_of(blob), path=str(src), predicted=suggested,
                         confidence=float(probabilities.get(suggested, 0.0)) if quality is None else 1.0 - quality,
                         probabilities=probabilities, kind="label", given=given, data_root=str(Path(data_root).resolve()))
            s.add(row)
            s.flush()
            return int(row.id)
    except IntegrityError:
        return None


def _public(r: Review, votes: list[Vote]) -> dict[str, Any]:
    return {"id": r.id, "model": r.model_name, "model_version": r.model_version, "request_id": r.request_id,
            "predicted": r.predicted, "confidence": r.confidence, "probabilities": r.probabilities, "state": r.state,
            "label": r.label, "saved_to": r.saved_to, "created": r.created.isoformat(timespec="seconds"),
            "kind": r.kind, "given": r.given,
            "votes": [{"reviewer": v.reviewer, "label": v.label} for v in votes]}


def reviews(store: Store, name: str | None = None, state: str = "pending", limit: int = 100) -> list[dict[str, Any]]:
    """Oldest first: the queue is worked from the front."""
    with store.session() as s:
        q = select(Review).where(Review.state == state).order_by(Review.id).limit(limit)
        rows = s.scalars(q.where(Review.model_name == name) if name else q).all()
        votes = s.scalars(select(Vote).where(Vote.review_id.in_([r.id for r in rows]))).all() if rows else []
    return [_public(r, [v for v in votes if v.review_id == r.id]) for r in rows]


def get(store: Store, review_id: int) -> Review:
    with store.session() as s:
        row = s.get(Review, review_id)
    if row is None:
        raise FoveaError(f"no review #{review_id}")
    return row


def vote(store: Store, review_id: int, label: str, reviewer: str, classes: list[str], consensus: int = 1, *,
         new_class: bool = False) -> dict[str, Any]:
    """Record ``reviewer``'s label; decide the review once ``consensus`` reviewers agree.

    ``label`` is one of ``classes``, "" for none of them, or with ``new_class`` a class the model does not have
    yet: agreed on, the image lands in ``labelled/NAME/LABEL/`` like any other, and the next ``fovea train
    --from-store NAME`` learns the new class.
    """
    if label and label not in classes:
        if new_class and get(store, review_id).kind == "label":
            raise FoveaError("a suspected label error is relabelled to one of the data set's classes, kept, or "
                             "dropped (''); a new class needs a folder of its own images")
        if not new_class:
            raise FoveaError(f"label {label!r} is not one of {classes} (or '' for none of them; to name a class the "
                             "model does not have yet, send new_class: true)")
        if not NEW_CLASS.fullmatch(label) or label == "unknown":
            raise FoveaError(f"{label!r} cannot be a class name (a folder name: letters, digits, '.', '_', '-', up "
                             "to 100, not 'unknown')")
    if not reviewer.strip():
        raise FoveaError("a vote needs a reviewer name")
    with store.session() as s:
        row = s.get(Review, review_id, with_for_update=True)
        if row is None:
            raise FoveaError(f"no review #{review_id}")
        if row.state != "pending":
            raise FoveaError(f"review #{review_id} is already {row.state}" + (f" as {row.label!r}" if row.label else ""))
        mine = s.scalar(select(Vote).where(Vote.review_id == review_id, Vote.reviewer == reviewer))
        if mine is None:
            s.add(Vote(review_id=review_id, reviewer=reviewer, label=label))
        else:
            mine.label = label
        s.flush()
        votes = s.scalars(select(Vote).where(Vote.review_id == review_id)).all()
        winner, count = Counter(v.label for v in votes).most_common(1)[0]
        if count >= consensus:
            row.decided = datetime.now(timezone.utc)
            if row.kind == "label":
                _decide_suspect(row, winner, reviewer)
            elif winner == "":
                row.state = "rejected"
            else:
                row.state, row.label = "labelled", winner
                src = Path(row.path)
                dest = labelled_dir(row.model_name) / winner / src.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest)
                row.saved_to = str(dest)
                s.add(Feedback(request_id=row.request_id, fingerprint=row.fingerprint, label=winner))
        return _public(row, list(votes))


def _decide_suspect(row: Review, winner: str, reviewer: str) -> None:
    """An agreed verdict on a suspected label error: a row of its data set's corrections file."""
    from fovea.data import add_correction, corrections_file

    root = str(row.data_root)
    if winner == "":
        row.state = "rejected"
        add_correction(root, row.path, "drop", reviewer=reviewer)
    else:
        row.state, row.label = "labelled", winner
        add_correction(root, row.path, "keep" if winner == row.given else "relabel", winner, reviewer=reviewer)
    row.saved_to = str(corrections_file(root))


def _original_data(meta: dict[str, Any], data: str | Path | None) -> Path:
    root = Path(data) if data else Path(str((meta.get("data") or {}).get("root", "")))
    if not (root.is_dir() or (root.is_file() and root.suffix.lower() == ".csv")):
        raise FoveaError(f"the original training data is not at {root or '(unknown)'}; give it with --data")
    return root


def _link(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        dest.symlink_to(src.resolve())


def _labelled(name: str) -> list[Path]:
    folder = labelled_dir(name)
    return sorted(f for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else []


def merged_data(name: str, original: Path, out: Path) -> tuple[Path, dict[str, int]]:
    """The original data plus every labelled image of ``name``: (what to train on, images gained per class).

    A folder is mirrored in ``out`` with symbolic links, its layout kept, the labelled images joining the
    training split; a CSV (path,label[,group]) becomes ``out/data.csv`` with absolute paths and the labelled
    images as extra rows (each its own group).
    """
    import csv

    from fovea.data import IMAGE_EXTENSIONS

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    gained: dict[str, int] = {}
    for f in _labelled(name):
        gained[f.parent.name] = gained.get(f.parent.name, 0) + 1
    if original.is_file():
        with original.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = list(reader.fieldnames or [])
            rows = list(reader)
        if "path" not in fields or "label" not in fields:
            raise FoveaError(f"{original} needs 'path' and 'label' columns")
        for r in rows:
            r["path"] = str((original.parent / r["path"]).resolve())
        rows += [{"path": str(f.resolve()), "label": f.parent.name,
                  **({"group": f"labelled-{f.stem}"} if "group" in fields else {})} for f in _labelled(name)]
        target = out / "data.csv"
        with target.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        return target, gained
    split = (original / "train").is_dir()
    for f in sorted(original.rglob("*")):
        if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
            _link(f, out / f.relative_to(original))
    for f in _labelled(name):
        _link(f, (out / "train" if split else out) / f.parent.name / f"labelled-{f.name}")
    return out, gained


def retrain(name: str, *, data: str | Path | None = None, store: Store | None = None, progress: bool = True,
            **overrides: Any) -> tuple[Any, dict[str, int]]:
    """Train the next version of ``name`` on its original data plus the labelled images; register it as
    ``candidate``. Returns (the registered version, images gained per class)."""
    from fovea import model_registry
    from fovea.artifact import read_meta
    from fovea.training import config_fields, train

    store = store or Store()
    current = model_registry.resolve(name, store=store)  # its production version
    meta = read_meta(current.path)
    if "training" not in meta:
        raise FoveaError(f"{current.ref} records no training settings (a compressed or foreign artifact); "
                         "retrain its source run instead")
    original = _original_data(meta, data)
    version_dir = home() / "retrain" / name / f"from-{current.version}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}"
    merged, gained = merged_data(name, original, version_dir / "data")
    if not gained:
        raise FoveaError(f"no labelled images for {name} yet: confirm some in the review queue first")
    settings = {k: v for k, v in meta["training"].items() if k in config_fields() and k not in ("data", "out", "resume")}
    from fovea.data import corrections_file

    if corrections_file(original).exists():  # the merged copy is another folder: name the original's verdicts
        settings["corrections"] = str(corrections_file(original))
    settings.update(overrides)
    settings.update(out=str(version_dir / "run"), progress=progress)
    run = train(merged, **settings)
    return model_registry.add(run, name, alias="candidate", store=store), gained

