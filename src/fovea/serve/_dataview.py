"""The data page's table: every image of the served version's training data, with what the model says of it.

Per image: its split and label (as training sees it: the data set's corrections applied), the model's answer and
confidence, whether it answered "unknown", whether it is wrong (validation and test images), whether it is under
``LOW_CONFIDENCE``, the near-duplicates ``fovea check`` finds (perceptual hashes), and the label check's verdict
(``fovea check DATA --labels``).

The expensive part (decoding and predicting every image, hashing every file) is done once per model version and
data set, on a worker thread with the model on the inference thread ``INFERENCE_BATCH`` images at a time (so
predictions keep flowing meanwhile), and kept in ``$FOVEA_HOME/dataview/KEY/table.json``: KEY names the version
(its registry digest, or a hash of its files) and the data's fingerprint, so a changed data set or model is
predicted again and a restarted server reloads it in a second. What people change afterwards (the label check's
file, the corrections that review verdicts append) is read again whenever those files change, without predicting
anything again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from starlette.concurrency import run_in_threadpool

from fovea._home import home
from fovea.artifact import training_data
from fovea.errors import FoveaError, ImageError
from fovea.serve._fleet import Served

log = logging.getLogger("fovea.serve")

FILTERS = ("suspect", "unknown", "duplicate", "low_confidence", "wrong")
# An answer whose top probability is under 60 % is "low confidence": for two classes the model leans at most 3:2,
# for more it is still more likely wrong about the top class than a coin that favours it. The same for every class
# count so that the badge means one thing; the answer of /v1/data states it.
LOW_CONFIDENCE = 0.6
INFERENCE_BATCH = 64  # images per turn on the inference thread: a request waits one such batch at most
DECODE_CHUNK = 512  # images decoded at a time (a (512, 3, 224, 224) uint8 chunk is 77 MB)
# Decoding threads: half the cores, the rest left to the requests being answered meanwhile; and under the 4 from
# which ``load_images`` forks processes, which a server full of threads had better not do.
DECODE_WORKERS = max(1, min(3, (os.cpu_count() or 2) // 2))
FORMAT = 1  # bump when what table.json holds changes
FIRST_WAIT_S = 1.0  # the first request waits this long for the table: a small data set is answered at once
RETRY_S = 30.0  # a table that could not be built (its data missing) is tried again by a request after this
VERSIONS_KEPT = 3  # tables of this many versions (production, a candidate, the previous one)
SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


@dataclass
class Progress:
    """How far a table's build is: ``done`` of ``total`` images in ``stage``."""

    stage: str = "starting"
    done: int = 0
    total: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "done": self.done, "total": self.total}


@dataclass
class Predicted:
    """What is computed once per version and data set (and cached): the model's answers and the duplicates."""

    root: str
    classes: list[str]
    paths: list[str]  # as the data set names them (absolute for folder layouts)
    splits: list[str]
    labels: list[str]  # as the data set's folders (or CSV) give them, before corrections
    predicted: list[str | None]  # the top class; None: the file could not be read
    confidence: list[float | None]
    unknown: list[bool]
    probabilities: list[dict[str, float] | None]
    errors: dict[int, str]  # unreadable files: why
    duplicates: list[list[int]]  # groups of near (or exact) duplicates, by index

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **{k: getattr(self, k) for k in (
            "root", "classes", "paths", "splits", "labels", "predicted", "confidence", "unknown", "probabilities",
            "duplicates")}, "errors": {str(k): v for k, v in self.errors.items()}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Predicted:
        if d.get("format") != FORMAT:
            raise ValueError(f"format {d.get('format')}, not {FORMAT}")
        return cls(d["root"], d["classes"], d["paths"], d["splits"], d["labels"], d["predicted"], d["confidence"],
                   d["unknown"], d["probabilities"], {int(k): v for k, v in d["errors"].items()}, d["duplicates"])


def _training_split(meta: dict[str, Any]) -> dict[str, Any]:
    """The split options the version was trained with: the same images land in the same splits here."""
    t = meta.get("training") or {}
    return {"val_fraction": float(t.get("val_fraction", 0.2)), "seed": int(t.get("seed", 0)),
            "group_regex": t.get("group_regex")}


def data_root(meta: dict[str, Any]) -> Path:
    """The training data a model.json names; FoveaError saying why when it is not here."""
    return training_data(meta, "put it back there to browse it here")


def _identity(s: Served) -> str:
    if s.digest:
        return s.digest
    from fovea.similar import model_key  # a model folder outside the registry: a hash of its files

    return model_key(s.model)


def table_dir(s: Served, fingerprint: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", s.name)[:60] or "model"
    key = hashlib.blake2b(f"{FORMAT}\0{_identity(s)}\0{fingerprint}".encode(), digest_size=8).hexdigest()
    return home() / "dataview" / f"{name}-{s.version}-{key}"


def predict_data(s: Served, root: Path, executor: Any, progress: Progress, stop: threading.Event) -> Predicted:
    """Every image of ``root`` through ``s``'s model (on ``executor``, the inference thread), and its duplicate
    groups; loaded from the cache when this version has seen this data before. Runs on a worker thread."""
    from fovea.data import check, discover, load_images

    split_opts = _training_split(s.model.meta)
    ds = discover(root, split_opts["val_fraction"], split_opts["seed"], group_regex=split_opts["group_regex"])
    folder = table_dir(s, ds.fingerprint())
    cached = folder / "table.json"
    if cached.exists():
        try:
            return Predicted.from_json(json.loads(cached.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("%s cannot be read (%s); predicting the data set again", cached, e)
    samples = [(split, smp) for split in sorted(ds.splits, key=lambda x: SPLIT_ORDER.get(x, 9))
               for smp in ds.splits[split]]
    n, model = len(samples), s.model
    progress.stage, progress.done, progress.total = "predicting", 0, n
    index = {smp.path: i for i, (_, smp) in enumerate(samples)}
    predicted: list[str | None] = [None] * n
    confidence: list[float | None] = [None] * n
    unknown = [False] * n
    probabilities: list[dict[str, float] | None] = [None] * n
    errors: dict[int, str] = {}
    for start in range(0, n, DECODE_CHUNK):
        chunk = [smp for _, smp in samples[start : start + DECODE_CHUNK]]
        images = load_images(chunk, model.image_size, cache=False, progress=False, workers=DECODE_WORKERS)
        for path, reason in images.quarantined:
            errors[index[path]] = reason
        for b in range(0, len(images), INFERENCE_BATCH):
            if stop.is_set():
                raise FoveaError("the server is shutting down")
            x = images.images[b : b + INFERENCE_BATCH]
            out = executor.submit(model.outputs, x).result()  # the one inference thread, between requests
            for k, (_, top, top_class, is_unknown) in enumerate(out.answers(model.classes, model.unknown_threshold)):
                i = index[images.paths[b + k]]
                predicted[i], confidence[i], unknown[i] = top_class, round(top, 5), is_unknown
                probabilities[i] = {c: round(float(p), 5) for c, p in zip(model.classes, out.probabilities[k])}
            progress.done = min(n, start + b + len(x))
        progress.done = min(n, start + len(chunk))
    progress.stage = "finding near-duplicates"
    report = check(root, progress=False, **split_opts)
    duplicates = [sorted(index[f["path"]] for f in d["files"] if f["path"] in index)
                  for d in report["exact_duplicates"] + report["near_duplicates"]]
    table = Predicted(str(root), list(ds.classes), [smp.path for _, smp in samples], [sp for sp, _ in samples],
                      [ds.classes[smp.label] for _, smp in samples], predicted, confidence, unknown, probabilities,
                      errors, [g for g in duplicates if len(g) > 1])
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".table.{os.getpid()}.part"
        tmp.write_text(json.dumps(table.to_json()))
        tmp.replace(cached)
    except OSError as e:
        log.warning("could not keep the data table in %s (%s); it will be computed again next time", folder, e)
    return table


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


@dataclass
class Table:
    """The rows the data page shows: ``Predicted`` with the labels as training sees them now (corrections applied)
    and the label check's suspects; both files are read again when they change."""

    base: Predicted
    rows: list[dict[str, Any]] = field(default_factory=list)
    label_check: dict[str, Any] | None = None
    by_path: dict[str, int] = field(default_factory=dict)  # resolved path -> id
    # the label check's out-of-fold probabilities of its suspects (made by models that never saw the image)
    out_of_fold: dict[int, dict[str, float]] = field(default_factory=dict)
    _seen: tuple[float | None, float | None] = (-1.0, -1.0)

    def __post_init__(self) -> None:
        self.by_path = {str(Path(p).resolve()): i for i, p in enumerate(self.base.paths)}

    def refresh(self) -> None:
        """Rebuild the rows when the label check or the corrections file changed since the last call."""
        from fovea.data import corrections_file, curation_dir

        root = self.base.root
        issues_file, corrections = curation_dir(root) / "label-issues.json", corrections_file(root)
        seen = (_mtime(issues_file), _mtime(corrections))
        if seen == self._seen:
            return
        self.rows, self.label_check, self.out_of_fold = self._derive(seen[0] is not None, seen[1] is not None)
        self._seen = seen

    def _derive(self, has_issues: bool, has_corrections: bool) -> tuple[
            list[dict[str, Any]], dict[str, Any] | None, dict[int, dict[str, float]]]:
        from fovea.data import corrections_file, read_corrections, read_label_issues

        b = self.base
        verdicts: dict[str, Any] = {}
        if has_corrections:
            try:
                verdicts = read_corrections(corrections_file(b.root))
            except FoveaError as e:
                log.warning("the data page ignores the corrections: %s", e)
        check: dict[str, Any] | None = None
        suspects: dict[int, dict[str, Any]] = {}
        if has_issues:
            try:
                result = read_label_issues(b.root)
            except FoveaError as e:
                result, check = None, {"error": str(e)}
            if result is not None:
                check = {k: result.get(k) for k in ("created", "folds", "n_images", "n_issues")}
                for r in result.get("images", []):
                    i = self.by_path.get(str(Path(r["path"]).resolve()))
                    if i is not None:
                        suspects[i] = r
        rows, out_of_fold = [], {}
        base = Path(b.root) if Path(b.root).is_dir() else Path(b.root).parent  # a CSV's paths lie beside it
        for i, path in enumerate(b.paths):
            folder_label = b.labels[i]
            fixed = verdicts.get(str(Path(path).resolve()))
            label = fixed.label if fixed is not None and fixed.action == "relabel" and fixed.label else folder_label
            r = suspects.get(i)
            # A check made before a verdict judged another label: that suspicion is settled.
            suspect = None if r is None or r.get("given") != label else {
                "suggested": r.get("suggested"), "quality": r.get("quality"), "issue": bool(r.get("issue")),
                "rank": r.get("rank")}
            if suspect is not None and r is not None and r.get("probabilities"):
                out_of_fold[i] = dict(r["probabilities"])
            p, confidence = Path(path), b.confidence[i]
            rows.append({
                "id": i, "path": p.relative_to(base).as_posix() if p.is_relative_to(base) else path,
                "split": b.splits[i], "label": label, "predicted": b.predicted[i], "confidence": confidence,
                "unknown": b.unknown[i], "wrong": b.splits[i] != "train" and b.predicted[i] not in (None, label),
                "low_confidence": confidence is not None and confidence < LOW_CONFIDENCE,
                "duplicate_of": None, "suspect": suspect, "error": b.errors.get(i),
                "corrected": None if fixed is None else {"action": fixed.action, "label": fixed.label,
                                                         "reviewer": fixed.reviewer, "from": folder_label}})
        for group in b.duplicates:
            for i in group:
                rows[i]["duplicate_of"] = group[1] if i == group[0] else group[0]
        return rows, check, out_of_fold

    def select(self, cls: str | None, which: str | None, offset: int, limit: int) -> dict[str, Any]:
        """One page of the rows of class ``cls`` (None: all) that ``which`` filter keeps (None: all), with the
        count behind every filter button. Suspects come by rank, low-confidence ones least sure first, wrong ones
        most sure first, duplicates group by group."""
        rows = [r for r in self.rows if cls is None or r["label"] == cls]
        counts = {"all": len(rows), **{f: sum(_keeps(f, r) for r in rows) for f in FILTERS}}
        if which is not None:
            rows = [r for r in rows if _keeps(which, r)]
            order = {"suspect": lambda r: r["suspect"]["rank"] or 0, "low_confidence": lambda r: r["confidence"],
                     "wrong": lambda r: -r["confidence"],
                     "duplicate": lambda r: (min(r["id"], r["duplicate_of"]), r["id"])}.get(which)
            if order is not None:
                rows = sorted(rows, key=order)
        classes = {c: 0 for c in self.base.classes}
        for r in self.rows:
            classes[r["label"]] = classes.get(r["label"], 0) + 1
        return {"data": self.base.root, "classes": self.base.classes, "class_counts": classes,
                "low_confidence_below": LOW_CONFIDENCE, "label_check": self.label_check, "counts": counts,
                "total": len(rows), "offset": offset, "limit": limit, "rows": rows[offset : offset + limit]}

    def row(self, image_id: int) -> dict[str, Any]:
        if not 0 <= image_id < len(self.rows):
            raise FoveaError(f"no image #{image_id}: the data set has {len(self.rows)} (ids 0 to {len(self.rows) - 1})")
        return self.rows[image_id]

    def path(self, image_id: int) -> Path:
        self.row(image_id)
        return Path(self.base.paths[image_id])


def _keeps(which: str, r: dict[str, Any]) -> bool:
    if which == "suspect":
        return bool(r["suspect"] and r["suspect"]["issue"])
    if which == "duplicate":
        return r["duplicate_of"] is not None
    return bool(r[which])  # unknown, low_confidence, wrong


class DataView:
    """One version's table, built once in the background; the routes ask ``ready``."""

    def __init__(self, s: Served) -> None:
        self.served = s
        self.progress = Progress()
        self.table: Table | None = None
        self.reason: str | None = None  # why there is no table (set when a build ended without one)
        self.failed = False  # the reason is a bug (logged with its traceback), not the data missing
        self._ended = 0.0
        self._task: asyncio.Task[None] | None = None
        self._stop = threading.Event()

    async def ready(self, state: Any, wait_s: float = 0.0) -> Table | None:
        """The table; None while it is being built (``progress``) or when it cannot be (``reason``). Starts a
        build when none is under way (again ``RETRY_S`` after one that failed) and waits up to ``wait_s`` for it."""
        if self.table is not None:
            return self.table
        if self._task is None and (self.reason is None or time.monotonic() - self._ended > RETRY_S):
            self.reason, self.failed, self.progress = None, False, Progress()
            self._task = asyncio.get_running_loop().create_task(self._build(state))
            state.tasks.add(self._task)  # cancelled when the server shuts down
            self._task.add_done_callback(state.tasks.discard)
        if self._task is not None and wait_s > 0:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), wait_s)
            except asyncio.TimeoutError:
                pass
        return self.table

    async def _build(self, state: Any) -> None:
        s = self.served
        try:
            root = data_root(s.model.meta)
            base = await run_in_threadpool(predict_data, s, root, state.fleet.executor, self.progress, self._stop)
            table = Table(base)
            await run_in_threadpool(table.refresh)
            self.table = table
            log.info("data page of %s:%s: %d images of %s", s.name, s.version, len(base.paths), root)
            state.spawn(self._warm_similar(state))
        except asyncio.CancelledError:
            self._stop.set()  # the worker thread stops at its next batch
            raise
        except FoveaError as e:
            self.reason = str(e)
        except Exception as e:  # noqa: BLE001 - a bug: the page says so rather than polling forever
            log.error("the data table of %s:%s could not be built", s.name, s.version, exc_info=e)
            self.reason, self.failed = f"the data table could not be built ({type(e).__name__}: {e}); see the " \
                                       "server's log", True
        finally:
            self._ended = time.monotonic()
            self._task = None

    async def _warm_similar(self, state: Any) -> None:
        """Build the training gallery behind "similar images" now, so that the page's first click finds it ready."""
        from fovea.serve._similar import Building

        try:
            await state.similar.training_gallery(self.served, state.fleet.executor, 24 * 3600.0)
        except (FoveaError, Building) as e:  # asked for, the similar route says why
            log.info("no similar images for the data page of %s:%s: %s", self.served.name, self.served.version, e)


class DataViews:
    """The data tables of the versions a server holds, by (model name, version); the newest ``VERSIONS_KEPT``."""

    def __init__(self) -> None:
        self._views: OrderedDict[tuple[str, int], DataView] = OrderedDict()

    def of(self, s: Served) -> DataView:
        key = (s.name, s.version)
        view = self._views.get(key)
        if view is None or view.served is not s:  # a version loaded again is another object: its table is its own
            view = self._views[key] = DataView(s)
        self._views.move_to_end(key)
        while len(self._views) > VERSIONS_KEPT:
            self._views.popitem(last=False)
        return view


def thumbnail(path: Path, size: int, max_pixels: int) -> bytes:
    """``path`` as a JPEG whose longer side is at most ``size`` px (decoded safely: bombs refused, EXIF turned)."""
    import io

    from PIL import Image

    from fovea.data import read_image

    img = Image.fromarray(read_image(path, max_pixels, draft_size=size))
    img.thumbnail((size, size), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=82)
    return buf.getvalue()


def gradcam_png(model: Any, x: torch.Tensor, path: Path, size: int = 256) -> bytes:
    """Grad-CAM of the predicted class over image ``x`` (1, 3, S, S), laid over a ``size`` px decode of ``path``;
    PNG bytes. Runs on the inference thread (the model's hooks are not shared between threads)."""
    import io

    from PIL import Image

    from fovea.data import load_square
    from fovea.explain import explain, overlay

    e = explain(model, x, method="gradcam")
    try:  # the square the model saw, decoded again larger so that the overlay is readable
        img = load_square(path, max(size, x.shape[-1]))
    except ImageError:  # changed since: the model's own small copy
        img = x[0].permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(np.asarray(overlay(img, e.maps[0]))).save(buf, format="PNG")
    return buf.getvalue()
