"""``fovea batch MODEL DIR_OR_CSV --db URL``: every image's prediction stored in the database, exactly once.

Each input gets a key (its path relative to the folder, or the CSV's ``path`` value) and the run a job name;
``(job, input_key)`` is unique in the predictions table. A chunk of images is decoded on worker threads,
predicted as one batch and written in one transaction with ON CONFLICT DO NOTHING, so a run killed at any
moment (even ``kill -9``) loses at most the chunk in flight, and running the same command again predicts
only the keys not yet stored: no lost rows, no duplicated rows.

Scheduling is left to cron or a systemd timer (docs/serving.md); there is no scheduler here.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy import select

from fovea.errors import FoveaError, ImageError
from fovea.store import Prediction, Store

log = logging.getLogger("fovea.batch")


@dataclass
class BatchResult:
    job: str
    model: str
    version: int
    inputs: int
    already_done: int
    predicted: int
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    output: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def list_inputs(source: Path) -> list[tuple[str, Path]]:
    """(input key, file) for a folder (every image file below it) or a CSV with a ``path`` column."""
    from fovea.data._io import IMAGE_EXTENSIONS

    if not source.exists():
        raise FoveaError(f"{source} does not exist")
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise FoveaError(f"{source} is a file; give a folder of images or a CSV with a 'path' column")
        with source.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
        if not rows or "path" not in rows[0]:
            raise FoveaError(f"{source} needs a 'path' column (one image file per row)")
        return [(r["path"], (source.parent / r["path"]).resolve()) for r in rows if r.get("path")]
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    return [(p.relative_to(source).as_posix(), p) for p in files]


def default_job(name: str, version: int, source: Path) -> str:
    """The same model version over the same source is the same job: re-running it resumes it."""
    return f"{name}:{version}:" + hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:12]


def _read(item: tuple[str, Path], size: int) -> tuple[str, np.ndarray | None, str, str]:
    """(key, image or None, fingerprint, reason) — run on a worker thread."""
    from fovea.data import load_square

    key, path = item
    try:
        blob = path.read_bytes()
    except OSError as e:
        return key, None, "", f"cannot read: {e.strerror or e}"
    fingerprint = hashlib.sha256(blob).hexdigest()
    try:
        return key, load_square(blob, size), fingerprint, ""
    except ImageError as e:
        return key, None, fingerprint, e.reason


def _chunks(items: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _insert(store: Store, rows: list[dict[str, Any]]) -> None:
    """One transaction; rows whose (job, input_key) is already stored are skipped by the database."""
    if store.engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    with store.session() as s:
        s.execute(insert(Prediction).on_conflict_do_nothing(index_elements=["job", "input_key"]), rows)


def run_batch(model: str, source: str | Path, *, db: str | None = None, job: str | None = None,
              batch_size: int = 64, workers: int = 4, device: str = "auto", output: str | Path | None = None,
              progress: bool = True) -> BatchResult:
    """Predict every image in ``source`` with ``model`` (a folder or a registry reference) into the store."""
    from fovea import registry

    source = Path(source)
    store = Store(db)
    name, version, loaded, _ = registry.open_model(model, device, store)
    items = list_inputs(source)
    if not items:
        raise FoveaError(f"no image files in {source}")
    job = job or default_job(name, version, source)
    with store.session() as s:
        done = set(s.scalars(select(Prediction.input_key).where(Prediction.job == job)).all())
    todo = [it for it in items if it[0] not in done]
    result = BatchResult(job, name, version, len(items), len(items) - len(todo), 0)
    start = time.perf_counter()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   disable=not progress)
    with bar, ThreadPoolExecutor(workers) as pool:
        task = bar.add_task(f"batch {name}:{version}", total=len(todo))
        for chunk in _chunks(todo, batch_size):
            decoded = list(pool.map(lambda it: _read(it, loaded.image_size), chunk))
            ok = [(k, a, f) for k, a, f, _ in decoded if a is not None]
            result.unreadable += [(k, r) for k, a, _, r in decoded if a is None]
            if ok:
                x = torch.from_numpy(np.stack([a for _, a, _ in ok]).transpose(0, 3, 1, 2).copy())
                t0 = time.perf_counter()
                probs = loaded.predict_proba(x)
                ms = (time.perf_counter() - t0) * 1000 / len(ok)
                rows = []
                for (key, _, fingerprint), p in zip(ok, probs):
                    j = int(p.argmax())
                    rows.append({"request_id": hashlib.sha256(f"{job}\0{key}".encode()).hexdigest()[:32],
                                 "model_name": name, "model_version": version, "label": loaded.classes[j],
                                 "confidence": float(p[j]), "latency_ms": ms, "fingerprint": fingerprint,
                                 "probabilities": {c: float(v) for c, v in zip(loaded.classes, p)},
                                 "source": "batch", "job": job, "input_key": key, "role": "served"})
                _insert(store, rows)
                result.predicted += len(rows)
            bar.advance(task, len(chunk))
    result.seconds = round(time.perf_counter() - start, 2)
    if output is not None:
        result.output = str(export_parquet(store, job, Path(output)))
    return result


def export_parquet(store: Store, job: str, path: Path) -> Path:
    """Every stored row of ``job`` as a Parquet file (one column per field, probabilities as JSON text)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    with store.session() as s:
        rows = s.scalars(select(Prediction).where(Prediction.job == job).order_by(Prediction.input_key)).all()
        table = pa.table({
            "input_key": [r.input_key for r in rows], "label": [r.label for r in rows],
            "confidence": [r.confidence for r in rows],
            "probabilities": [json.dumps(r.probabilities) for r in rows],
            "fingerprint": [r.fingerprint for r in rows], "model_name": [r.model_name for r in rows],
            "model_version": [r.model_version for r in rows], "created": [r.created for r in rows],
        })
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path
