"""Similar images: the nearest images of a gallery by a model's own embedding (``fovea similar``, ``/v1/similar``).

A ``Gallery`` holds L2-normalised penultimate-layer embeddings (N, D), one row per image, with the image's path
and label. Below ``EXACT_BELOW`` images a search is exact (one matrix product); from there on it goes through a
FAISS inverted-file index (``IndexIVFFlat``: the vectors sorted into k-means lists, the ``nprobe`` lists nearest to
a query scanned exactly), built when the gallery reaches that size, extended as images are added and built again
when it has grown ``IVF_REBUILD_GROWTH`` times. ``gallery_for`` builds the gallery of a data set (by default the
model's training data, every split) and keeps it in ``$FOVEA_HOME/similar/KEY``, KEY naming the artifact's files
and the data's fingerprint, so the next call reloads it instead of decoding and embedding every image again.

Distances are cosine distances, 1 - cos, on the normalised embeddings: 0 is the same direction, 2 the opposite.
bench/similar.py measured what the constants here are set from (docs/similar.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fovea._home import home
from fovea.artifact import META, ONNX_FILE, PT2_FILE, WEIGHTS, runtime_of, training_data
from fovea.errors import FoveaError

log = logging.getLogger(__name__)

# Chosen from bench/similar.py on the pets cnn's 384-d embeddings, tiled with noise up to 1M (2-core AMD EPYC,
# AVX-512, one thread a search; docs/similar.md). One query, exact vs the index at nprobe 48: 0.13 vs 0.10 ms at 5k,
# 0.25 vs 0.14 ms at 10k, 0.95 vs 0.23 ms at 20k, 5.3 vs 0.88 ms at 100k, 49 vs 2.5 ms at 1M; 64 queries at once
# cost both the same per query at 10k (0.12 ms). Below 10k the index saves at most 0.11 ms a query, against the
# 8 ms of decoding and embedding the query image, so a gallery that small keeps exact answers (recall 1) and never
# pays for k-means (0.45 s at 10k, 32 s at 1M); from there on the gap grows with N.
EXACT_BELOW = 10_000
# IVF, not HNSW: on these tiled embeddings FAISS's HNSW (M 32, efSearch 256) found 0.995 of the exact top 10 at 100k
# but 0.59 at 1M, where each real embedding has 500 near copies; IVF scans whole lists and kept 0.996.
IVF_LISTS = 2.0  # k-means lists per sqrt(N): 200 at 10k, 632 at 100k, 2000 at 1M
IVF_NPROBE = 48  # lists scanned per query: recall@10 0.994-1.000 from 2k to 1M (32: 0.974 at 100k; 16: 0.87)
IVF_TRAIN_PER_LIST = 40  # k-means training points per list: FAISS warns under 39, and more only slows the build
IVF_REBUILD_GROWTH = 4  # lists made for N images serve up to 4N; past that they are made again from all images
FORMAT = 1  # bump when what a cached gallery holds changes
CHUNK = 1024  # images decoded and embedded at a time while building: memory stays flat for any data set size
_EXACT_ROWS = 65_536  # gallery rows per matrix product in an exact search: (Q, 65536) float32 scores at most


@dataclass(frozen=True)
class Hit:
    """One neighbour of a query image."""

    path: str  # the image file (for images a server has seen: the key it keeps, "seen:<request_id>")
    label: str | None  # its class in the data set (None when unlabelled)
    distance: float  # cosine distance, 1 - cos of the normalised embeddings (0: same direction)
    index: int  # its row in the gallery

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "label": self.label, "distance": self.distance, "index": self.index}


class NoEmbedding(FoveaError):
    """The model's runtime gives no embedding to compare images by."""

    def __init__(self, predictor: Any) -> None:
        kind = runtime_of(getattr(predictor, "meta", {}))
        hint = ("an ensemble averages its members' answers and has no embedding of its own: give one of its members "
                "(MODEL/members/*)" if kind == "ensemble" else
                "use the PyTorch model it was compressed or exported from")
        super().__init__(f"{getattr(predictor, 'path', 'this model')}: its runtime ({kind}) exposes no embedding, so "
                         f"it cannot find similar images; {hint}")


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, as float32 (an all-zero row stays zero: its distance to anything is 1)."""
    v = np.asarray(vectors, np.float32)
    if v.ndim != 2:
        raise ValueError(f"expected a (N, D) array of embeddings, got shape {v.shape}")
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.maximum(norms, 1e-12)


def embed(predictor: Any, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """The L2-normalised embeddings (N, D) float32 of uint8 (N, 3, S, S) images at the predictor's size.

    Raises ``NoEmbedding`` for a runtime that exposes none (an ensemble, an ONNX or torch.export artifact).
    """
    parts = []
    for i in range(0, len(images), batch_size):
        e = predictor.outputs(images[i : i + batch_size], embed=True).embeddings
        if e is None:
            raise NoEmbedding(predictor)
        parts.append(np.asarray(e, np.float32))
    if not parts:
        return np.zeros((0, 0), np.float32)
    return normalize(np.concatenate(parts))


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest inner products of each query with ``vectors``: (scores (Q, k), rows (Q, k)), best first.

    One matrix product per block of ``_EXACT_ROWS`` gallery rows, keeping a running top-k, so a million-row gallery
    never makes a (Q, 1M) score matrix.
    """
    n, q = len(vectors), len(queries)
    k = min(k, n)
    best_s = np.empty((q, 0), np.float32)
    best_i = np.empty((q, 0), np.int64)
    for start in range(0, n, _EXACT_ROWS):
        s = queries @ vectors[start : start + _EXACT_ROWS].T  # (Q, rows)
        kk = min(k, s.shape[1])
        top = np.argpartition(-s, kk - 1, axis=1)[:, :kk] if kk < s.shape[1] else np.broadcast_to(
            np.arange(s.shape[1]), s.shape)
        best_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], 1)
        best_i = np.concatenate([best_i, top + start], 1)
        if best_s.shape[1] > k:
            keep = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
            best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


def _ivf(vectors: np.ndarray) -> Any:
    """An ``IndexIVFFlat`` (inner product) over ``vectors``: lists trained on a seeded sample, every vector added,
    and a direct map so that the gallery's vectors can live in the index alone."""
    import faiss

    n, d = vectors.shape
    nlist = max(1, min(n // 5, round(IVF_LISTS * math.sqrt(n))))
    index: Any = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)  # owns its quantizer
    index.cp.min_points_per_centroid = 5  # a small gallery (tests) trains without FAISS's warning
    rows = np.random.default_rng(0).choice(n, min(n, IVF_TRAIN_PER_LIST * nlist), replace=False)
    index.train(vectors[np.sort(rows)])
    index.add(vectors)
    index.make_direct_map()  # reconstruct_n; added vectors keep the map up to date
    return index


class Gallery:
    """Images by embedding, searchable: ``search(queries, k)`` and ``add(vectors, paths, labels)``.

    Args:
        vectors: (N, D) float32 embeddings, L2-normalised (``normalize``; ``embed`` returns them so).
        exact_below: from this many images on, search an IVF index (``EXACT_BELOW``; tests lower it).
        capacity: keep at most this many images, the newest (None: no bound); past it the oldest tenth goes.
        root: the folder the images' paths lie under (shown relative to it), if any.
        skipped: (path, reason) of the files that could not be read when it was built.

    Safe to share between threads: ``add`` and ``search`` take a lock.
    """

    def __init__(self, vectors: np.ndarray, paths: Sequence[str], labels: Sequence[str | None], *,
                 exact_below: int = EXACT_BELOW, capacity: int | None = None, root: str | None = None,
                 skipped: Sequence[tuple[str, str]] = ()) -> None:
        vectors = np.ascontiguousarray(vectors, np.float32)
        _check_rows(vectors, paths, labels)
        if capacity is not None and capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.exact_below, self.capacity, self.root = exact_below, capacity, root
        self.nprobe = IVF_NPROBE  # the index's lists scanned per search (more: higher recall, slower)
        self.skipped = list(skipped)
        self.paths: list[str] = list(paths)
        self.labels: list[str | None] = list(labels)
        self.dim = vectors.shape[1]
        self._buffer = vectors  # rows [0, len) are the gallery; grown by doubling so add() is amortised O(rows added)
        self._index: Any = None  # the IVF index from ``exact_below`` images on; it holds the vectors then
        self._trained_at = 0  # how many images the index's lists were made for
        self._lock = threading.Lock()
        self._evict()
        self._maybe_index()

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def indexed(self) -> bool:
        """Whether searches go through the IVF index (else they are exact)."""
        return self._index is not None

    @property
    def nbytes(self) -> int:
        """Memory its vectors and index hold: the vectors, and once there is an index its ids, direct map and
        centroids."""
        with self._lock:
            if self._index is None:
                return int(self._buffer.nbytes)
            ix = self._index  # per vector: the vector, its int64 id in a list, its int64 place in the direct map
            return int(ix.ntotal * (self.dim * 4 + 16) + ix.nlist * self.dim * 4)

    @property
    def vectors(self) -> np.ndarray:
        """The (N, D) embeddings (a copy rebuilt from the index once there is one)."""
        with self._lock:
            return self._rows()

    def _rows(self) -> np.ndarray:
        if self._index is not None:
            return self._index.reconstruct_n(0, len(self)) if len(self) else np.zeros((0, self.dim), np.float32)
        return self._buffer[: len(self)]

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """The ``k`` nearest images of each query (Q, D) (normalised embeddings), nearest first; fewer when the
        gallery holds fewer."""
        queries = np.ascontiguousarray(queries, np.float32)
        if queries.ndim != 2 or (len(queries) and len(self) and queries.shape[1] != self.dim):  # empty: any D
            raise ValueError(f"queries must be (Q, {self.dim}) embeddings, got shape {queries.shape}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        with self._lock:
            n = len(self)
            if n == 0 or len(queries) == 0:
                return [[] for _ in queries]
            if self._index is not None:
                import faiss

                # per call, not index.nprobe: two threads searching with different settings never race
                params = faiss.SearchParametersIVF()
                params.nprobe = min(self.nprobe, self._index.nlist)
                scores, rows = self._index.search(queries, min(k, n), params=params)
            else:
                scores, rows = exact_search(self._buffer[:n], queries, k)
            paths, labels = self.paths, self.labels
        return [[Hit(paths[r], labels[r], float(np.clip(1.0 - s, 0.0, 2.0)), int(r))
                 for s, r in zip(srow, rrow) if r >= 0] for srow, rrow in zip(scores, rows)]

    def add(self, vectors: np.ndarray, paths: Sequence[str], labels: Sequence[str | None]) -> None:
        """Append images (their normalised embeddings (M, D), paths and labels); the index follows."""
        vectors = np.ascontiguousarray(vectors, np.float32)
        _check_rows(vectors, paths, labels)
        if len(vectors) == 0:
            return
        if vectors.shape[1] != self.dim and len(self):
            raise ValueError(f"embeddings of {vectors.shape[1]} dimensions added to a gallery of {self.dim}")
        with self._lock:
            if not len(self):
                self.dim = vectors.shape[1]
                self._buffer = np.zeros((0, self.dim), np.float32)
            n, m = len(self), len(vectors)
            if self._index is not None and n + m >= IVF_REBUILD_GROWTH * self._trained_at:
                self._buffer, self._index = np.concatenate([self._rows(), vectors]), None  # lists made anew below
            elif self._index is not None:
                self._index.add(vectors)
            else:
                if n + m > len(self._buffer):
                    grown = np.empty((max(2 * len(self._buffer), n + m, 64), self.dim), np.float32)
                    grown[:n] = self._buffer[:n]
                    self._buffer = grown
                self._buffer[n : n + m] = vectors
            self.paths += list(paths)
            self.labels += list(labels)
            self._evict()
            self._maybe_index()

    def _evict(self) -> None:
        """Past ``capacity``, drop the oldest images: the excess and a tenth more, so that evicting (which
        rebuilds the index) happens once per ``capacity / 10`` additions, not on every one."""
        if self.capacity is None or len(self) <= self.capacity:
            return
        drop = len(self) - self.capacity + self.capacity // 10
        keep = self._rows()[drop:].copy()
        self.paths, self.labels = self.paths[drop:], self.labels[drop:]
        self._buffer, self._index = keep, None

    def _maybe_index(self) -> None:
        if self._index is None and len(self) >= max(self.exact_below, 1):
            self._index, self._trained_at = _ivf(self._buffer[: len(self)]), len(self)
            self._buffer = np.zeros((0, self.dim), np.float32)  # the index holds the vectors

    def save(self, folder: str | Path) -> Path:
        """Write the gallery to ``folder`` (replaced whole: a reader never sees half of it)."""
        import faiss

        folder = Path(folder)
        tmp = folder.with_name(f"{folder.name}.{os.getpid()}-{threading.get_ident()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with self._lock:
            if self._index is not None:
                faiss.write_index(self._index, str(tmp / "index.faiss"))
            else:
                np.save(tmp / "vectors.npy", self._buffer[: len(self)], allow_pickle=False)
            items = {"format": FORMAT, "dim": self.dim, "trained_at": self._trained_at, "root": self.root,
                     "paths": self.paths, "labels": self.labels, "skipped": self.skipped}
        (tmp / "items.json").write_text(json.dumps(items))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        return folder

    @classmethod
    def load(cls, folder: str | Path, *, exact_below: int = EXACT_BELOW) -> Gallery:
        """A gallery ``save`` wrote; FoveaError when it is not one this Fovea reads."""
        import faiss

        folder = Path(folder)
        try:
            items = json.loads((folder / "items.json").read_text())
            if items.get("format") != FORMAT:
                raise FoveaError(f"{folder}: a gallery of format {items.get('format')}, not {FORMAT}")
            index = None
            if (folder / "index.faiss").exists():
                index = faiss.read_index(str(folder / "index.faiss"))
                vectors = np.zeros((0, int(items["dim"])), np.float32)
            else:
                vectors = np.load(folder / "vectors.npy", allow_pickle=False)
        except (OSError, ValueError, KeyError, RuntimeError) as e:  # RuntimeError: FAISS reading a broken file
            raise FoveaError(f"{folder} is not a readable gallery ({e}); delete it to rebuild it") from e
        g = cls(np.zeros((0, int(items["dim"])), np.float32), [], [], exact_below=exact_below, root=items["root"],
                skipped=[tuple(x) for x in items["skipped"]])
        g.paths, g.labels = list(items["paths"]), list(items["labels"])
        if index is not None:
            g._index, g._trained_at = index, int(items.get("trained_at", index.ntotal))
        else:
            g._buffer = vectors
        if (index.ntotal if index is not None else len(vectors)) != len(g.paths):
            raise FoveaError(f"{folder}: {len(g.paths)} paths but a different number of vectors; delete it to rebuild it")
        return g

    def shown(self, path: str) -> str:
        """``path`` relative to the gallery's root where it lies under it."""
        if self.root:
            p, root = Path(path), Path(self.root)
            if p.is_relative_to(root):
                return p.relative_to(root).as_posix()
        return path


def _check_rows(vectors: np.ndarray, paths: Sequence[str], labels: Sequence[str | None]) -> None:
    if vectors.ndim != 2:
        raise ValueError(f"expected a (N, D) array of embeddings, got shape {vectors.shape}")
    if not len(vectors) == len(paths) == len(labels):
        raise ValueError(f"{len(vectors)} embeddings, {len(paths)} paths and {len(labels)} labels: one each per image")


# --- the gallery of a data set --------------------------------------------------------------------------------


@dataclass
class _Images:
    """What a gallery is built from: every image of a data set, with its label where it has one."""

    root: str
    paths: list[str]
    labels: list[str | None]
    fingerprint: str


def _data_of(predictor: Any, data: str | Path | None) -> Path:
    if data is not None:
        root = Path(data).expanduser()
        if not root.exists():
            raise FoveaError(f"{root} does not exist; --in takes a folder of images, a data set (DATA/CLASS/*, "
                             "DATA/train|val/CLASS/*) or a CSV path,label")
        return root
    return training_data(predictor.meta, "give the images to search with --in DATA")


def _images_of(root: Path) -> _Images:
    """Every image of a data set, all splits, labelled; or, for a folder that is not one (no class folders), every
    file under it, unlabelled."""
    from fovea.data import discover

    try:
        ds = discover(root)
    except FoveaError as e:
        if not root.is_dir():
            raise
        files = sorted(p for p in root.rglob("*") if p.is_file() and not any(x.startswith(".") for x in
                                                                              p.relative_to(root).parts))
        if not files:
            raise FoveaError(f"{root} holds no images to search") from None
        log.info("%s is not a labelled data set (%s): its %d files are searched unlabelled", root, e, len(files))
        h = hashlib.blake2b(digest_size=8)
        for p in files:
            st = p.stat()
            h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return _Images(str(root), [str(p) for p in files], [None] * len(files), h.hexdigest())
    samples = [s for split in sorted(ds.splits) for s in ds.splits[split]]
    root_dir = root.parent if root.is_file() else root  # a CSV's paths lie beside it
    return _Images(str(root_dir), [s.path for s in samples], [ds.classes[s.label] for s in samples], ds.fingerprint())


def model_key(predictor: Any) -> str:
    """A hash of the artifact's model.json and network file: the same for a copy, new for any other weights."""
    h = hashlib.blake2b(digest_size=16)
    folder = Path(predictor.path)
    for name in (META, WEIGHTS, ONNX_FILE, PT2_FILE):
        f = folder / name
        if f.is_file():
            h.update(name.encode() + b"\0")
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def _key(predictor: Any, images: _Images) -> str:
    src = f"v{FORMAT}\0{model_key(predictor)}\0{Path(images.root).resolve()}\0{images.fingerprint}"
    return hashlib.blake2b(src.encode(), digest_size=12).hexdigest()


def gallery_for(predictor: Any, data: str | Path | None = None, *, progress: bool = False,
                embed_with: Callable[[torch.Tensor], np.ndarray] | None = None) -> Gallery:
    """The gallery of ``data`` (default: the model's training data, every split, labelled) by ``predictor``'s
    embedding: built once (unreadable files skipped and counted) and kept in ``$FOVEA_HOME/similar``; the next call
    with the same model files and data reloads it.

    ``embed_with`` runs the model on uint8 images (default ``embed(predictor, images)``); a server passes one that
    runs on its inference thread, because a runtime's forward hooks are not safe to share between threads.

    Raises FoveaError when the data is missing (saying to give --in DATA) and ``NoEmbedding`` for a runtime that
    exposes no embedding (checked on one blank image before any file is decoded).
    """
    root = _data_of(predictor, data)
    s = predictor.image_size
    run = embed_with or (lambda x: embed(predictor, x))
    run(torch.zeros(1, 3, s, s, dtype=torch.uint8))  # NoEmbedding now, not after decoding everything
    images = _images_of(root)
    folder = home() / "similar" / _key(predictor, images)
    if (folder / "items.json").exists():
        try:
            g = Gallery.load(folder)
            log.info("gallery of %d images reloaded from %s", len(g), folder)
            return g
        except FoveaError as e:
            log.warning("%s; building it again", e)
    g = _build(predictor, images, progress, run)
    try:
        g.save(folder)
    except OSError as e:
        log.warning("could not keep the gallery in %s (%s); it will be built again next time", folder, e)
    return g


def _build(predictor: Any, images: _Images, progress: bool, run: Callable[[torch.Tensor], np.ndarray]) -> Gallery:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from fovea.data import Sample, load_images

    names: list[str] = sorted({x for x in images.labels if x is not None})
    code = {c: i for i, c in enumerate(names)}
    samples = [Sample(p, code[lab] if lab is not None else -1) for p, lab in zip(images.paths, images.labels)]
    vectors, paths, labels, skipped = [], [], [], []
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   disable=not progress, transient=True)
    with bar:
        task = bar.add_task(f"embedding {Path(images.root).name or images.root}", total=len(samples))
        for i in range(0, len(samples), CHUNK):
            part = load_images(samples[i : i + CHUNK], predictor.image_size, cache=False, progress=False)
            if len(part):
                vectors.append(run(part.images))
            paths += part.paths
            labels += [names[j] if j >= 0 else None for j in part.labels.tolist()]
            skipped += part.quarantined
            bar.advance(task, len(samples[i : i + CHUNK]))
    if not paths:
        raise FoveaError(f"none of the {len(samples)} files in {images.root} could be read as an image")
    if skipped:
        log.warning("%d of %d files in %s could not be read and are not in the gallery (e.g. %s: %s)", len(skipped),
                    len(samples), images.root, *skipped[0])
    return Gallery(np.concatenate(vectors), paths, labels, root=images.root, skipped=skipped)


# --- fovea similar ----------------------------------------------------------------------------------------------


@dataclass
class Found:
    """``fovea similar``'s answer: each readable query image and its neighbours, and the files that were not."""

    gallery: Gallery
    queries: list[tuple[str, list[Hit]]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def to_dict(self) -> dict[str, Any]:
        g = self.gallery
        return {"gallery": {"root": g.root, "images": len(g), "unreadable": len(g.skipped),
                            "search": "ivf" if g.indexed else "exact"},
                "queries": [{"path": q, "neighbours": [{**h.to_dict(), "rank": r, "path": g.shown(h.path)}
                                                       for r, h in enumerate(hits, 1)]} for q, hits in self.queries],
                "skipped": [{"path": p, "reason": r} for p, r in self.skipped]}


def find_similar(predictor: Any, paths: Sequence[str | Path], *, k: int = 10, data: str | Path | None = None,
                 progress: bool = False) -> Found:
    """The ``k`` nearest images of ``data`` (default: the model's training data) to each image file in ``paths``.

    The queries are decoded first, so a wrong file fails before a gallery is built.
    """
    if k < 1:
        raise FoveaError(f"--k must be at least 1, got {k}")
    x, kept, bad = predictor.load_images(paths)
    skipped = [(str(paths[i]), r) for i, r in bad]
    if not kept:
        raise FoveaError("no readable image among the queries: " + "; ".join(f"{p}: {r}" for p, r in skipped))
    g = gallery_for(predictor, data, progress=progress)
    hits = g.search(embed(predictor, x), k)
    return Found(g, [(str(paths[i]), h) for i, h in zip(kept, hits)], skipped)
