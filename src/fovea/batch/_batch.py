"""``fovea batch MODEL DIR_OR_CSV --db URL``: every image's prediction stored in the database, exactly once.

Each input gets a key (its path relative to the folder, or the CSV's ``path`` value) and the run a job name;
``(job, input_key)`` is unique in the predictions table. A chunk of images is decoded on worker threads
(or, with ``--engine ray``, decoded and predicted by Ray Data actors), predicted as one batch and written in one transaction with ON CONFLICT DO NOTHING, so a run killed at any
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
from fovea.store import PredictionRecord, Store
from fovea.store import fingerprint as fingerprint_of  # sha256 hex; `fingerprint` names the values here

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
    from fovea.data import IMAGE_EXTENSIONS

    if not source.exists():
        raise FoveaError(f"{source} does not exist")
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise FoveaError(f"{source} is a file; give a folder of images or a CSV with a 'path' column")
        try:
            with source.open(newline="", encoding="utf-8-sig") as f:
                rows = list(csv.DictReader(f))
        except UnicodeDecodeError as e:
            raise FoveaError(f"{source} is not UTF-8 text (byte {e.start}: {e.reason}); save the CSV as UTF-8") from None
        if not rows or "path" not in rows[0]:
            raise FoveaError(f"{source} needs a 'path' column (one image file per row)")
        keys = [(r.get("path") or "").strip() for r in rows]
        unique = list(dict.fromkeys(k for k in keys if k))  # a path is one input, however often it is listed
        if len(unique) < len(keys):
            empty, twice = keys.count(""), len(keys) - keys.count("") - len(unique)
            log.warning("%s: %d row(s) with no path and %d repeated path(s) left out; %d inputs", source, empty,
                        twice, len(unique))
        return [(k, (source.parent / k).resolve()) for k in unique]
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
    fingerprint = fingerprint_of(blob)
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
        s.execute(insert(PredictionRecord).on_conflict_do_nothing(index_elements=["job", "input_key"]), rows)


# (input key, label ("unknown" over the model's threshold), probabilities, fingerprint, milliseconds per image,
# unknown score: None for a closed-set model)
Predicted = tuple[str, str, dict[str, float], str, float, float | None]
# (inputs handled, predicted, (key, reason) unreadable)
Chunk = tuple[int, list[Predicted], list[tuple[str, str]]]


def _row(job: str, name: str, version: int, key: str, label: str, probabilities: dict[str, float],
         fingerprint: str, ms: float, unknown_score: float | None) -> dict[str, Any]:
    return {"request_id": hashlib.sha256(f"{job}\0{key}".encode()).hexdigest()[:32], "model_name": name,
            "model_version": version, "label": label, "confidence": max(probabilities.values()), "latency_ms": ms,
            "fingerprint": fingerprint, "probabilities": probabilities, "source": "batch", "job": job,
            "input_key": key, "role": "served", "unknown_score": unknown_score}


def _predict(model: Any, decoded: list[tuple[str, np.ndarray | None, str, str]]) -> Chunk:
    """Predict the decoded images of one chunk as one batch."""
    ok = [(k, a, f) for k, a, f, _ in decoded if a is not None]
    unreadable = [(k, r) for k, a, _, r in decoded if a is None]
    out: list[Predicted] = []
    if ok:
        x = torch.from_numpy(np.stack([a for _, a, _ in ok]).transpose(0, 3, 1, 2).copy())
        t0 = time.perf_counter()
        preds = model.predictions([k for k, _, _ in ok], model.outputs(x))
        ms = (time.perf_counter() - t0) * 1000 / len(ok)
        for (key, _, fingerprint), p in zip(ok, preds):
            out.append((key, p.label, p.probabilities, fingerprint, ms, p.unknown_score))
    return len(decoded), out, unreadable


def _local_chunks(model: Any, todo: list[tuple[str, Path]], *, batch_size: int, workers: int) -> Iterator[Chunk]:
    """Decode on ``workers`` threads, predict in this process."""
    with ThreadPoolExecutor(workers) as pool:
        for chunk in _chunks(todo, batch_size):
            yield _predict(model, list(pool.map(lambda it: _read(it, model.image_size), chunk)))


class RayPredictor:
    """A Ray Data actor: loads the model once, then decodes and predicts one batch of paths per call."""

    def __init__(self, folder: str, device: str, unknown: bool = True) -> None:
        from fovea.runtime import load

        self.model = load(folder, device, unknown=unknown)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import json

        decoded = [_read((str(k), Path(str(p))), self.model.image_size) for k, p in zip(batch["key"], batch["path"])]
        _, ok, unreadable = _predict(self.model, decoded)
        keys = [k for k, *_ in ok] + [k for k, _ in unreadable]
        return {"key": np.array(keys, dtype=object),
                "label": np.array([label for _, label, *_ in ok] + [""] * len(unreadable), dtype=object),
                "probabilities": np.array([json.dumps(p) for _, _, p, *_ in ok] + [""] * len(unreadable), dtype=object),
                "fingerprint": np.array([f for _, _, _, f, _, _ in ok] + [""] * len(unreadable), dtype=object),
                "ms": np.array([ms for *_, ms, _ in ok] + [0.0] * len(unreadable), dtype=np.float64),
                "unknown": np.array([np.nan if u is None else u for *_, u in ok] + [np.nan] * len(unreadable),
                                    dtype=np.float64),
                "error": np.array([""] * len(ok) + [r for _, r in unreadable], dtype=object)}


def _ray_chunks(folder: Path, todo: list[tuple[str, Path]], *, device: str, batch_size: int, actors: int,
                address: str | None, unknown: bool = True) -> Iterator[Chunk]:
    """The same predictor as Ray Data actors (``map_batches``); rows come back here and are written as usual,
    so idempotence and resuming do not depend on the cluster."""
    import json
    import logging
    import os

    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # the C++ core logs notices to the driver's stderr
    try:
        import ray
        import ray.data
    except ImportError:
        raise FoveaError("--engine ray needs Ray: pip install 'fovea[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    for noisy in ("ray", "ray.data"):  # Ray Data logs every execution plan, and notices, to the console
        logging.getLogger(noisy).setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # Fovea draws its own
    ds = ray.data.from_items([{"key": k, "path": str(p)} for k, p in todo],
                             override_num_blocks=max(1, min(len(todo) // batch_size, 200)))
    predicted = ds.map_batches(RayPredictor, fn_constructor_kwargs={"folder": str(folder), "device": device,
                                                                    "unknown": unknown},
                               batch_size=batch_size, batch_format="numpy",
                               compute=ray.data.ActorPoolStrategy(size=actors))
    for b in predicted.iter_batches(batch_size=batch_size, batch_format="numpy"):
        ok: list[Predicted] = []
        unreadable: list[tuple[str, str]] = []
        for key, label, probs, fingerprint, ms, u, error in zip(b["key"], b["label"], b["probabilities"],
                                                                b["fingerprint"], b["ms"], b["unknown"], b["error"]):
            if error:
                unreadable.append((str(key), str(error)))
            else:
                ok.append((str(key), str(label), json.loads(probs), str(fingerprint), float(ms),
                           None if np.isnan(u) else float(u)))
        yield len(b["key"]), ok, unreadable


def run_batch(model: str, source: str | Path, *, db: str | None = None, job: str | None = None,
              batch_size: int = 64, workers: int = 4, device: str = "auto", output: str | Path | None = None,
              progress: bool = True, engine: str = "local", actors: int = 2,
              ray_address: str | None = None, unknown: bool = True) -> BatchResult:
    """Predict every image in ``source`` with ``model`` (a folder or a registry reference) into the store.

    ``engine="ray"`` runs decoding and prediction as ``actors`` Ray Data actors on the cluster at
    ``ray_address`` (None: a local Ray instance), each loading the model folder itself. Images of none of the
    model's classes are stored as "unknown" with their score (``unknown=False``: closed-set).
    """
    from fovea import model_registry

    if engine not in ("local", "ray"):
        raise FoveaError(f"unknown engine {engine!r}: local or ray")
    source = Path(source)
    store = Store(db)
    name, version, loaded, _ = model_registry.open_model(model, device, store, unknown=unknown)
    folder = model_registry.locate(model, store=store).path
    items = list_inputs(source)
    if not items:
        raise FoveaError(f"no image files in {source}")
    job = job or default_job(name, version, source)
    with store.session() as s:
        done = set(s.scalars(select(PredictionRecord.input_key).where(PredictionRecord.job == job)).all())
    todo = [it for it in items if it[0] not in done]
    result = BatchResult(job, name, version, len(items), len(items) - len(todo), 0)
    start = time.perf_counter()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   disable=not progress)
    with bar:
        task = bar.add_task(f"batch {name}:{version}" + (" on Ray" if engine == "ray" else ""), total=len(todo))
        if engine == "ray":
            chunks = _ray_chunks(folder, todo, device=device, batch_size=batch_size, actors=actors,
                                 address=ray_address, unknown=unknown)
        else:
            chunks = _local_chunks(loaded, todo, batch_size=batch_size, workers=workers)
        for done_keys, ok, unreadable in chunks:
            result.unreadable += unreadable
            if ok:
                rows = [_row(job, name, version, *p) for p in ok]
                _insert(store, rows)
                result.predicted += len(rows)
            bar.advance(task, done_keys)
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
        rows = s.scalars(select(PredictionRecord).where(PredictionRecord.job == job).order_by(PredictionRecord.input_key)).all()
        table = pa.table({
            "input_key": [r.input_key for r in rows], "label": [r.label for r in rows],
            "confidence": [r.confidence for r in rows], "unknown_score": [r.unknown_score for r in rows],
            "probabilities": [json.dumps(r.probabilities) for r in rows],
            "fingerprint": [r.fingerprint for r in rows], "model_name": [r.model_name for r in rows],
            "model_version": [r.model_version for r in rows], "created": [r.created for r in rows],
        })
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path
