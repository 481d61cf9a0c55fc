"""Similar images (``fovea similar``, ``/v1/similar``): are a model's nearest neighbours of the same class, and how
fast is a search, exact or through an index, from a few thousand to a million images? ``fovea.similar``'s
``EXACT_BELOW`` (where a gallery switches from exact search to its index), the index (IVF, not HNSW) and its
``IVF_NPROBE`` were chosen from these tables (docs/similar.md).

The model is the pets ``cnn`` at Fovea's CPU defaults (``--run``, default bench-work/pets-cnn, as
``fovea train shared/data/pets --model cnn --out bench-work/pets-cnn`` writes it; 384-d embeddings).

(a) Precision@10: every pets/val photo (1000) is a query against the pets/train gallery (2000), built with
``fovea.similar.gallery_for`` exactly as ``fovea similar RUN IMAGE --in pets/train`` builds it; precision@10 is
the share of a query's 10 neighbours whose class is the query's. Baselines: raw pixels (the same decoded 64 px
images, flattened, centred and normalised: cosine on pixels) and chance (the share of the query's class in train).

(b) Speed at 2k to 1M vectors: the 2000 train embeddings tiled, every copy after the first moved by Gaussian
noise and normalised again. The noise puts a copy at about half the median distance between a real embedding
and its nearest real neighbour (so copies are new points among the real ones, not duplicates). Queries are the
1000 val embeddings. Per size:

- exact, numpy: ``Gallery`` below its switch (``exact_search``: blocked matrix products and a running top-k);
- exact, faiss flat: ``IndexFlatIP`` (the same answers, FAISS's BLAS and heap);
- ivf nprobe P: ``Gallery`` past its switch (``IndexIVFFlat``, 2 sqrt(N) k-means lists, ``IVF_NPROBE`` by
  default), scanning the P lists nearest to each query;
- hnsw efSearch E: FAISS's ``IndexHNSWFlat`` (M 32, efConstruction 64), for comparison.

Latency is the median per query over single-query searches ("batch 1") and over searches of 64 queries at once
(per query), on one thread (``one_thread``). Build is the time to make the searchable structure from vectors in
memory (on two threads); memory is what it holds: the vectors, plus ids and centroids (ivf) or the graph's links
(hnsw). Recall@10 is the share of the exact top 10 that the search returns.

(c) What feeding the server's "seen" gallery costs /v1/predict (``seen_cost``).

    nice -n 10 .venv/bin/python bench/similar.py            # ~15 min on 2 cores, ~5 GB at most
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "pets"
SIZES = (2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 1_000_000)
NPROBES = (16, 32, 48, 64)
EF_SEARCHES = (128, 256)
K = 10


def embeddings(run: Path, data: Path) -> dict[str, Any]:
    """The train gallery (through ``gallery_for``, in a throwaway FOVEA_HOME), the val queries' embeddings, their
    labels, and the decoded pixels of both for the raw-pixel baseline."""
    import fovea
    from fovea.data import discover, load_images
    from fovea.similar import embed, gallery_for

    model = fovea.load(run, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FOVEA_HOME"] = tmp
        t = time.perf_counter()
        g = gallery_for(model, data / "train", progress=True)
        built = time.perf_counter() - t
        t = time.perf_counter()
        gallery_for(model, data / "train")
        reloaded = time.perf_counter() - t
    val = discover(data).splits["val"]
    classes = discover(data).classes
    q = load_images(val, model.image_size, cache=False, progress=False)
    train = load_images(discover(data / "train").splits["train"] + discover(data / "train").splits["val"],
                        model.image_size, cache=False, progress=False)
    by_path = {p: i for i, p in enumerate(train.paths)}
    order = [by_path[p] for p in g.paths]  # the gallery's rows, as pixels
    one = [val[0].path]
    times = []
    with one_thread():
        for _ in range(30):  # what one query costs before any search: decode and embed it
            t = time.perf_counter()
            x, _, _ = model.load_images(one)
            embed(model, x)
            times.append(time.perf_counter() - t)
    return {"gallery": g, "queries": embed(model, q.images), "query_labels": [classes[i] for i in q.labels.tolist()],
            "query_pixels": q.images, "gallery_pixels": train.images[order], "build_s": built, "reload_s": reloaded,
            "embed_one_ms": 1000 * float(np.median(times)), "dim": g.dim}


def precision_at(hits: list[list[Any]], labels: list[str]) -> float:
    return float(np.mean([np.mean([h.label == lab for h in row]) for row, lab in zip(hits, labels)]))


def precision_table(e: dict[str, Any]) -> dict[str, float]:
    from fovea.similar import Gallery, normalize

    g, labels = e["gallery"], e["query_labels"]
    out = {"embedding, exact": precision_at(g.search(e["queries"], K), labels)}
    indexed = Gallery(g.vectors, g.paths, g.labels, exact_below=0)
    out["embedding, ivf index"] = precision_at(indexed.search(e["queries"], K), labels)

    def pixels(x: Any) -> np.ndarray:
        v = x.reshape(len(x), -1).float().numpy()
        return normalize(v - v.mean(1, keepdims=True))

    raw = Gallery(pixels(e["gallery_pixels"]), g.paths, g.labels)
    out["raw pixels, exact"] = precision_at(raw.search(pixels(e["query_pixels"]), K), labels)
    share = {c: g.labels.count(c) / len(g) for c in set(g.labels)}
    out["chance"] = float(np.mean([share[lab] for lab in labels]))
    return out


def tiled(base: np.ndarray, n: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` vectors: ``base`` once, then copies moved by N(0, sigma^2) noise, all normalised (built in blocks)."""
    from fovea.similar import normalize

    out = np.empty((n, base.shape[1]), np.float32)
    for start in range(0, n, 100_000):
        rows = np.arange(start, min(n, start + 100_000))
        block = base[rows % len(base)].copy()
        moved = rows >= len(base)
        block[moved] += rng.standard_normal((int(moved.sum()), base.shape[1]), dtype=np.float32) * sigma
        out[rows] = normalize(block)
    return out


def timed(search: Callable[[np.ndarray], Any], queries: np.ndarray, singles: int) -> tuple[float, float]:
    """Median ms per query: one query per search (``singles`` of them), and 64 per search; on one thread."""
    with one_thread():
        return _timed(search, queries, singles)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Searches and embeddings timed on one thread (OpenBLAS, FAISS's and PyTorch's OpenMP): what one request gets
    in a server answering several at once, and on a shared 2-core machine far steadier than two threads, whose
    spin-waits on a busy core showed up as 8 and 16 ms steps in a trial run."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


def _timed(search: Callable[[np.ndarray], Any], queries: np.ndarray, singles: int) -> tuple[float, float]:
    one = []
    for i in range(singles):
        t = time.perf_counter()
        search(queries[i : i + 1])
        one.append(time.perf_counter() - t)
    many = []
    for i in range(0, len(queries) - 63, 64):
        t = time.perf_counter()
        search(queries[i : i + 64])
        many.append((time.perf_counter() - t) / 64)
    return 1000 * float(np.median(one)), 1000 * float(np.median(many))


def recall(rows: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / K for a, b in zip(rows, truth)]))


def hit_rows(hits: list[list[Any]]) -> np.ndarray:
    return np.array([[h.index for h in row] for row in hits])


def measure(method: str, make: Callable[[], Any], size: Callable[[Any], int],
            search: Callable[[Any, np.ndarray], np.ndarray], test: np.ndarray, truth: np.ndarray | None, singles: int,
            settings: dict[str, Callable[[Any], None]] | None = None) -> list[dict[str, Any]]:
    """Rows for one method: build it (timed; ``size``: the bytes it holds), then per setting time it and score its
    recall against ``truth`` (None: it is the truth)."""
    t = time.perf_counter()
    made = make()
    build = time.perf_counter() - t
    memory = size(made) / 2**20
    rows = []
    for name, apply in (settings or {"": lambda _: None}).items():
        apply(made)
        ms1, ms64 = timed(lambda q: search(made, q), test, singles)
        got = search(made, test)
        rows.append({"method": f"{method} {name}".strip(), "build_s": build, "memory_mb": memory, "ms_1": ms1,
                     "ms_64": ms64, "recall": 1.0 if truth is None else recall(got, truth), "rows": got})
    return rows


def speed_rows(n: int, x: np.ndarray, test: np.ndarray) -> list[dict[str, Any]]:
    """Every method's rows at one gallery size."""
    import faiss

    from fovea.similar import Gallery

    paths, labels = [""] * n, [None] * n
    singles = 50 if n >= 500_000 else 200

    def gallery_search(g: Any, q: np.ndarray) -> np.ndarray:
        return hit_rows(g.search(q, K))

    def faiss_search(index: Any, q: np.ndarray) -> np.ndarray:
        return index.search(q, K)[1]

    def nbytes(g: Any) -> int:
        return int(g.nbytes)

    rows = measure("exact, numpy", lambda: Gallery(x, paths, labels, exact_below=n + 1), nbytes, gallery_search, test,
                   None, singles)
    truth = rows[0]["rows"]

    def flat() -> Any:
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
        return index

    rows += measure("exact, faiss flat", flat, lambda index: index.ntotal * index.d * 4, faiss_search, test, truth,
                    singles)

    def nprobe(value: int) -> Callable[[Any], None]:
        def apply(g: Any) -> None:
            g.nprobe = value
        return apply

    rows += measure("ivf", lambda: Gallery(x, paths, labels, exact_below=0), nbytes, gallery_search, test, truth,
                    singles, {f"nprobe {v}": nprobe(v) for v in NPROBES})

    def hnsw() -> Any:
        index = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 64
        index.add(x)
        return index

    def hnsw_bytes(index: Any) -> int:  # the vectors, and per vector its links (int32), level (int32), offset (int64)
        h = index.hnsw
        return int(index.ntotal * index.d * 4 + h.neighbors.size() * 4 + h.levels.size() * 4 + h.offsets.size() * 8)

    def ef(value: int) -> Callable[[Any], None]:
        def apply(index: Any) -> None:
            index.hnsw.efSearch = value
        return apply

    rows += measure("hnsw", hnsw, hnsw_bytes, faiss_search, test, truth, singles,
                    {f"efSearch {v}": ef(v) for v in EF_SEARCHES})
    for r in rows:
        r.pop("rows")
    return rows


def seen_cost(run: Path, image: Path, rounds: int = 8, per_round: int = 50) -> dict[str, float]:
    """What feeding /v1/similar?in=seen costs /v1/predict: ``Galleries.saw`` alone (normalise one embedding, append
    it), and /v1/predict's median latency with it and without it (``saw`` replaced by a no-op), in interleaved
    rounds so that a noisy minute does not land on one side. Also the deferred part: folding 1000 waiting images
    into the gallery, which the next "seen" search does on a worker thread."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from fovea.serve import ServeConfig, create_app
    from fovea.serve._similar import Galleries

    served = SimpleNamespace(name="pets", version=1)
    one = np.random.default_rng(0).standard_normal((1, 384)).astype(np.float32)
    g = Galleries()
    times = []
    for i in range(20_000):
        t = time.perf_counter()
        g.saw(served, f"r{i}", one, ["cat"])  # type: ignore[arg-type]
        times.append(time.perf_counter() - t)
    saw_us = 1e6 * float(np.median(times))
    g = Galleries()
    for i in range(1000):
        g.saw(served, f"r{i}", one, ["cat"])  # type: ignore[arg-type]
    t = time.perf_counter()
    g._fold(("pets", 1))
    fold_ms = 1000 * (time.perf_counter() - t)

    real = Galleries.saw
    latency: dict[bool, list[float]] = {True: [], False: []}
    body = image.read_bytes()
    with TestClient(create_app(ServeConfig(model=str(run), log_predictions=False, drift_every_s=0))) as c:
        for _ in range(20):  # warm-up
            c.post("/v1/predict", content=body, headers={"content-type": "image/jpeg"})
        for _ in range(rounds):
            for feed in (True, False):
                Galleries.saw = real if feed else (lambda *args, **kw: None)  # type: ignore[method-assign]
                for _ in range(per_round):
                    r = c.post("/v1/predict", content=body, headers={"content-type": "image/jpeg"})
                    latency[feed].append(r.json()["latency_ms"])
        Galleries.saw = real  # type: ignore[method-assign]
    return {"saw_us": saw_us, "fold_1000_ms": fold_ms, "predict_ms_with": float(np.median(latency[True])),
            "predict_ms_without": float(np.median(latency[False])), "requests_each": rounds * per_round}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=REPO / "bench-work" / "pets-cnn", help="a pets cnn run folder")
    p.add_argument("--data", type=Path, default=DATA, help="pets: train/ and val/, each cat/ and dog/")
    p.add_argument("--sizes", default=",".join(str(s) for s in SIZES), help="gallery sizes, comma-separated")
    p.add_argument("--out", type=Path, default=REPO / "bench-work" / "similar.json")
    args = p.parse_args()
    if not (args.run / "model.json").exists():
        raise SystemExit(f"{args.run} is not a run folder; make one with: fovea train {args.data} --model cnn "
                         f"--out {args.run}")
    import torch

    from fovea._system import machine
    from fovea.similar import EXACT_BELOW, IVF_NPROBE

    torch.set_num_threads(2)
    clock = time.perf_counter()
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f} (other jobs share the machine)")
    e = embeddings(args.run, args.data)
    print(f"\ngallery: pets/train, {len(e['gallery'])} images, {e['dim']}-d; built in {e['build_s']:.1f} s, "
          f"reloaded from FOVEA_HOME in {e['reload_s']:.2f} s; decoding and embedding one query image: "
          f"{e['embed_one_ms']:.2f} ms")
    prec = precision_table(e)
    print(f"\n(a) precision@{K}, {len(e['queries'])} pets/val queries against pets/train\n")
    print("| neighbours by | precision@10 |\n| --- | --- |")
    for name, v in prec.items():
        print(f"| {name} | {v:.3f} |")

    cost = seen_cost(args.run, next((args.data / "val" / "cat").glob("*.jpg")))
    print(f"\n(c) feeding the seen gallery: Galleries.saw {cost['saw_us']:.1f} us per /v1/predict; /v1/predict median "
          f"{cost['predict_ms_with']:.2f} ms with it, {cost['predict_ms_without']:.2f} ms without "
          f"({cost['requests_each']} requests each, interleaved; server-side latency_ms); folding 1000 waiting "
          f"images into the gallery at the next seen search: {cost['fold_1000_ms']:.1f} ms")

    base = e["gallery"].vectors
    nn = 1 - np.sort(base @ base.T, 1)[:, -2]  # each embedding's cosine distance to its nearest other one
    median_nn = float(np.median(nn))
    sigma = math.sqrt(2 * 0.5 * median_nn / base.shape[1])  # a copy at ~half that distance: |d|^2 / 2 = D s^2 / 2
    rng = np.random.default_rng(0)
    test = e["queries"]
    print(f"\n(b) speed: train embeddings tiled with noise sigma {sigma:.4f} (median nearest-neighbour distance "
          f"{median_nn:.4f}); {len(test)} val queries, k {K}; the library switches to ivf at {EXACT_BELOW:,} "
          f"(nprobe {IVF_NPROBE})\n")
    print("| vectors | search | build s | memory MB | ms/query, batch 1 | ms/query, batch 64 | recall@10 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    table = {}
    for n in (int(s) for s in args.sizes.split(",")):
        x = tiled(base, n, sigma, rng)
        table[n] = speed_rows(n, x, test)
        del x
        for r in table[n]:
            print(f"| {n:,} | {r['method']} | {r['build_s']:.2f} | {r['memory_mb']:.0f} | {r['ms_1']:.3f} | "
                  f"{r['ms_64']:.4f} | {r['recall']:.3f} |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "precision": prec, "sigma": sigma, "median_nn": median_nn,
                                    "embed_one_ms": e["embed_one_ms"], "seen_cost": cost, "speed": table}, indent=2))
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    print(f"{args.out}; total {time.perf_counter() - clock:.0f} s")


if __name__ == "__main__":
    main()
