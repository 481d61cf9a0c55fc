"""What Fovea knows about a data set beyond its folders: the label check's suspects and people's corrections.

Both live in ``$FOVEA_HOME/data/KEY/`` (KEY: the folder's name and a hash of its absolute path), never in the
user's folders, which Fovea does not edit:

- ``label-issues.json``: the last ``fovea check DATA --labels`` (every image's out-of-fold probabilities, its
  label-quality score and whether confident learning flags it);
- ``corrections.csv``: one row per verdict (``path,action,label,reviewer,decided``; ``action`` is ``relabel``,
  ``drop`` or ``keep``); the last row for a path wins, so a verdict can be revised. ``fovea train DATA``
  applies it (``--corrections``).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fovea._home import home
from fovea.data._layout import Dataset, Sample
from fovea.errors import FoveaError

log = logging.getLogger(__name__)

ISSUES_FILE = "label-issues.json"
CORRECTIONS_FILE = "corrections.csv"
ACTIONS = ("relabel", "drop", "keep")
_FIELDS = ("path", "action", "label", "reviewer", "decided")


def data_key(root: str | Path) -> str:
    """A data set's folder in FOVEA_HOME: readable (its name) and unique (a hash of its absolute path)."""
    resolved = Path(root).resolve()
    return f"{resolved.name or 'data'}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:10]}"


def curation_dir(root: str | Path) -> Path:
    return home() / "data" / data_key(root)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_label_issues(root: str | Path, result: dict[str, Any]) -> Path:
    path = curation_dir(root) / ISSUES_FILE
    _atomic_write(path, json.dumps(result, indent=1))
    return path


def read_label_issues(root: str | Path) -> dict[str, Any] | None:
    """The last label check of ``root`` (see ``fovea.labels``), or None when it has had none."""
    path = curation_dir(root) / ISSUES_FILE
    if not path.exists():
        return None
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:
        raise FoveaError(f"{path} cannot be read ({e}); run `fovea check DATA --labels` again") from e


@dataclass(frozen=True)
class Correction:
    path: str  # the image's absolute path
    action: str  # relabel | drop | keep
    label: str | None = None  # the new label (relabel)
    reviewer: str = ""
    decided: str = ""  # ISO time


def corrections_file(root: str | Path) -> Path:
    return curation_dir(root) / CORRECTIONS_FILE


def add_correction(root: str | Path, path: str | Path, action: str, label: str | None = None,
                   reviewer: str = "") -> Correction:
    """Append one verdict to ``root``'s corrections file (created with its header when missing)."""
    if action not in ACTIONS:
        raise FoveaError(f"a correction's action is one of {', '.join(ACTIONS)}, not {action!r}")
    if action == "relabel" and not label:
        raise FoveaError("a relabel correction needs the new label")
    c = Correction(str(Path(path).resolve()), action, label if action == "relabel" else None, reviewer,
                   datetime.now(timezone.utc).isoformat(timespec="seconds"))
    file = corrections_file(root)
    file.parent.mkdir(parents=True, exist_ok=True)
    new = not file.exists()
    with file.open("a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({k: v if v is not None else "" for k, v in dataclasses.asdict(c).items()})
    return c


def read_corrections(file: str | Path) -> dict[str, Correction]:
    """A corrections file: the last verdict per image (by absolute path)."""
    file = Path(file)
    try:
        with file.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if not {"path", "action"} <= set(reader.fieldnames or []):
                raise FoveaError(f"{file} is not a corrections file: it needs 'path' and 'action' columns")
            rows = list(reader)
    except OSError as e:
        raise FoveaError(f"cannot read the corrections file {file}: {e}") from e
    out: dict[str, Correction] = {}
    for i, r in enumerate(rows, 2):
        action, label = (r.get("action") or "").strip(), (r.get("label") or "").strip() or None
        if action not in ACTIONS or (action == "relabel" and not label):
            raise FoveaError(f"{file}, line {i}: action {action!r} label {label!r} is not relabel LABEL, drop or keep")
        p = str(Path(r["path"]).resolve())
        out[p] = Correction(p, action, label if action == "relabel" else None, r.get("reviewer") or "",
                            r.get("decided") or "")
    return out


def apply_corrections(ds: Dataset, corrections: dict[str, Correction]) -> tuple[Dataset, dict[str, Any]]:
    """``ds`` with the verdicts applied: relabelled images moved to their new class, dropped ones left out.

    A relabel to a class the data set does not have is an error (a new class needs images of its own, in a
    folder); corrections for images not in ``ds`` are counted, not applied. Returns (the data set, a summary:
    relabelled, dropped, kept, not found)."""
    index = {c: i for i, c in enumerate(ds.classes)}
    unknown = sorted({str(c.label) for c in corrections.values() if c.action == "relabel" and c.label not in index})
    if unknown:
        raise FoveaError(f"corrections relabel images to {', '.join(map(repr, unknown))}, which is not a class of "
                         f"{ds.root} ({', '.join(ds.classes)})")
    counts = {"relabelled": 0, "dropped": 0, "kept": 0}
    seen: set[str] = set()
    splits: dict[str, list[Sample]] = {}
    for split, samples in ds.splits.items():
        out = []
        for s in samples:
            c = corrections.get(str(Path(s.path).resolve()))
            if c is None:
                out.append(s)
                continue
            seen.add(c.path)
            if c.action == "drop":
                counts["dropped"] += 1
            elif c.action == "relabel" and index[str(c.label)] != s.label:
                counts["relabelled"] += 1
                out.append(dataclasses.replace(s, label=index[str(c.label)]))
            else:
                counts["kept"] += 1
                out.append(s)
        splits[split] = out
    summary: dict[str, Any] = {**counts, "not_found": len(set(corrections) - seen)}
    return dataclasses.replace(ds, splits=splits), summary


def corrected(ds: Dataset, corrections: str | Path | None = None) -> Dataset:
    """``ds`` with a corrections file applied: ``None`` reads the data set's own (written by the review queue)
    when there is one, ``"none"`` applies nothing, a path reads that file (which must exist)."""
    if corrections == "none":
        return ds
    file = corrections_file(ds.root) if corrections is None else Path(corrections)
    if corrections is None and not file.exists():
        return ds
    if not file.exists():
        raise FoveaError(f"--corrections {file}: no such file")
    out, summary = apply_corrections(ds, read_corrections(file))
    out.corrections = {"file": str(file), **summary}
    log.info("corrections from %s: %d relabelled, %d dropped, %d kept as labelled%s", file, summary["relabelled"],
             summary["dropped"], summary["kept"],
             f"; {summary['not_found']} name images not in this data set" if summary["not_found"] else "")
    return out
