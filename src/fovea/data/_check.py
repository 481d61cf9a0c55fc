"""``fovea check``: what is in a data set, what is wrong with it, and what to do about each problem."""

from __future__ import annotations

import functools
import hashlib
import logging
import multiprocessing
import os
import threading
from collections import Counter, defaultdict
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np

from fovea.data._io import MAX_PIXELS, open_image, progress_bar, read_image
from fovea.data._layout import discover
from fovea.errors import FoveaError, ImageError

log = logging.getLogger(__name__)

_CHUNK = 64  # files per task of the inspection pool
# Files; below, threads: 50 files took 30 ms in threads, 40 in processes; 200 took 85 and 65 ms (2 cores).
_PROCESSES_FROM = 256


def _inspect(path: str, max_pixels: int) -> dict[str, Any]:
    """Hash, header facts, and a 64-bit perceptual hash of one file; ``reason`` set when unusable."""
    import imagehash
    from PIL import Image

    rec: dict[str, Any] = {"path": path}
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        broken = Path(path).is_symlink() and not Path(path).exists()
        rec["reason"] = "broken link: its target is missing" if broken else f"unreadable: {e.strerror or e}"
        return rec
    rec["sha"] = hashlib.blake2b(data, digest_size=16).hexdigest()
    rec["bytes"] = len(data)
    try:
        img = open_image(data, max_pixels)
        rec.update(width=img.size[0], height=img.size[1], mode=img.mode, format=img.format)
        rgb = read_image(data, max_pixels, draft_size=64)
    except ImageError as e:
        rec["reason"] = e.reason
        return rec
    small = Image.fromarray(rgb)
    small.thumbnail((128, 128))
    rec["phash"] = int(str(imagehash.phash(small)), 16)
    return rec


def _inspect_many(paths: list[str], max_pixels: int) -> list[dict[str, Any]]:
    return [_inspect(p, max_pixels) for p in paths]


def _inspect_all(paths: list[str], max_pixels: int, progress: bool) -> list[dict[str, Any]]:
    """``_inspect`` every file, in order: in forked processes from ``_PROCESSES_FROM`` files on when this process
    has a single thread (a CLI run; not a server, where a fork could copy a lock another thread holds), else in
    threads.

    A file costs ~1 ms of Python (phash's DCT on 32 x 32 pixels, PIL's wrappers) around little GIL-free decoding,
    so threads do not scale: on 2 cores, ``check`` over 30 000 128 px crops (bench/_scale_data.py) took 12.6 s
    with 2 threads and 6.8 s with 2 processes (the files alone took 11.9 s in one thread). Tasks of ``_CHUNK`` files: Executor.map submits every task at once
    and a future holds ~2 KB until its result is read (at 100 000 files one per file made the peak 335 MB, not
    244 MB). The children only run PIL, NumPy and hashlib; the pool forks before the progress bar's thread
    starts, and ``imagehash`` is imported here once rather than in every child. (``data._cache`` decodes in forked
    processes too, from 4 cores on.)
    """
    import imagehash  # noqa: F401 - see above

    workers = os.cpu_count() or 1
    chunks = [paths[i : i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    fork = "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1
    pool: Executor
    if workers > 1 and len(paths) >= _PROCESSES_FROM and fork:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
        pool.submit(int).result()  # forks every worker now, before any thread of ours starts
    else:
        pool = ThreadPoolExecutor(workers)
    recs: list[dict[str, Any]] = []
    try:
        with pool, progress_bar(len(paths), "checking", progress) as bar:
            task = bar.add_task("checking", total=len(paths))
            for part in pool.map(functools.partial(_inspect_many, max_pixels=max_pixels), chunks):
                recs += part
                bar.advance(task, len(part))
    except BrokenProcessPool as e:
        raise FoveaError("a checking process died (out of memory, or a file that crashes the image library)") from e
    return recs


def _near_pairs(hashes: np.ndarray, threshold: int) -> np.ndarray:
    """Every pair of 64-bit hashes within ``threshold`` bits: an (K, 3) int64 array of (i, j, distance), i < j,
    sorted by (i, j).

    Multi-index hashing (Norouzi, Punjani and Fleet, CVPR 2012): the 64 bits are cut into threshold + 1 disjoint
    chunks, and two hashes within threshold bits agree exactly on at least one chunk (pigeonhole), so only hashes
    that share a chunk's value (a bucket) are compared. Where that would compare more pairs than there are (large
    thresholds, or hashes that share most of their bits), one bucket holds every hash. On the phashes of the
    100 000 photos of bench/_scale_data.py, threshold 4 compares 6 million pairs instead of 5 billion.

    Our own numpy rather than FAISS's ``IndexBinaryMultiHash``: the same idea (its chunks are disjoint runs of
    floor(64 / chunks) bits, so the pigeonhole holds there too, and it gives the same pairs), but on those 100 000
    hashes and 2 cores it took 0.5 s at threshold 4 and 21 s at 8, this 0.06 s and 1.0 s (comparing every pair:
    52 s). FAISS searches every pair from both sides, gathers each query's candidates in a C++ hash set one at a
    time, and leaves 64 mod chunks bits unused (4 at threshold 4: larger buckets). Here a bucket's members sit
    next to each other once the hashes are sorted by the chunk, and each step compares every position with the
    one d places later in its bucket, for all positions at once.
    """
    n = len(hashes)
    if n < 2 or threshold < 0:
        return np.zeros((0, 3), np.int64)
    h = np.asarray(hashes, dtype=np.uint64)
    one_bucket = [(np.arange(n), np.array([n]))]  # every pair compared
    chunks = one_bucket
    if threshold < 64:
        m = threshold + 1
        widths = [64 // m + (c < 64 % m) for c in range(m)]  # as even as possible, every bit used
        offsets = np.cumsum([0, *widths[:-1]])
        chunks = []
        for offset, width in zip(offsets, widths):
            key = (h >> np.uint64(offset)) & np.uint64((1 << width) - 1)
            order = np.argsort(key, kind="stable")  # stable: ascending indices inside a bucket, so i < j below
            chunks.append((order, _run_lengths(key[order]).astype(np.int64)))
        if sum(int((s * (s - 1) // 2).sum()) for _, s in chunks) >= n * (n - 1) // 2:
            chunks = one_bucket
    found = [np.zeros((0, 3), np.int64)]
    for order, sizes in chunks:
        later = np.repeat(np.cumsum(sizes), sizes) - np.arange(n) - 1  # bucket-mates after each sorted position
        first = np.argsort(-later, kind="stable")  # positions, the most bucket-mates after them first
        reach = np.bincount(later)[::-1].cumsum()[::-1]  # reach[d]: positions with at least d bucket-mates after
        hs = h[order]
        for d in range(1, len(reach)):
            p = first[: reach[d]]
            dist = np.bitwise_count(hs[p] ^ hs[p + d])
            hit = np.flatnonzero(dist <= threshold)
            found.append(np.stack([order[p[hit]], order[p[hit] + d], dist[hit].astype(np.int64)], 1))
    pairs = np.concatenate(found)
    # A pair that agrees on several chunks was found at each: keep one, in (i, j) order.
    _, once = np.unique(pairs[:, 0] * n + pairs[:, 1], return_index=True)
    return pairs[once]


def _run_lengths(sorted_keys: np.ndarray) -> np.ndarray:
    """Lengths of the runs of equal values in a sorted array."""
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    return np.diff(np.r_[starts, len(sorted_keys)])


def _groups(pairs: np.ndarray, n: int) -> list[list[int]]:
    """The connected groups of more than one of ``n`` items linked by ``pairs`` (rows i, j, ...): sorted indices,
    in order of each group's first item."""
    if len(pairs) == 0:
        return []
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    linked = np.unique(pairs[:, :2])  # ascending, so each group's members come out ascending
    linked = linked[np.argsort(label[linked], kind="stable")]
    cuts = np.flatnonzero(np.diff(label[linked])) + 1
    return sorted((g.tolist() for g in np.split(linked, cuts)), key=lambda g: g[0])


def check(
    data: str | Path,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    near_threshold: int = 4,
    max_pixels: int = MAX_PIXELS,
    progress: bool = True,
    group_regex: str | None = None,
) -> dict[str, Any]:
    """Inspect every file of a data set; returns a JSON-ready report (see ``fovea check --help``)."""

    ds = discover(data, val_fraction, seed, group_regex=group_regex)
    entries = [(split, s) for split, ss in ds.splits.items() for s in ss]
    recs = _inspect_all([s.path for _, s in entries], max_pixels, progress)
    for (split, s), rec in zip(entries, recs):
        rec.update(split=split, label=ds.classes[s.label], group=s.group)

    quarantined = [{"path": r["path"], "split": r["split"], "reason": r["reason"]} for r in recs if "reason" in r]
    quarantined += [{"path": p, "split": "csv", "reason": why} for p, why in ds.missing]
    good = [r for r in recs if "reason" not in r]
    counts = ds.counts()
    usable: dict[str, dict[str, int]] = {sp: dict.fromkeys(ds.classes, 0) for sp in ds.splits}
    for r in good:
        usable[r["split"]][r["label"]] += 1
    # Among the classes a split has usable images of (a class with none is reported on its own).
    imbalance = {sp: max(c.values()) / min(n for n in c.values() if n) for sp, c in usable.items() if any(c.values())}

    # Exact duplicates: identical bytes.
    by_sha: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in good:
        by_sha[r["sha"]].append(r)
    exact = []
    for files in by_sha.values():
        if len(files) > 1:
            exact.append(_dup_entry(files))
    # Near duplicates: perceptual hashes within near_threshold bits, excluding byte-identical pairs.
    hashes = np.array([r["phash"] for r in good], dtype=np.uint64)
    pairs = _near_pairs(hashes, near_threshold)
    if len(pairs):
        _, content = np.unique([r["sha"] for r in good], return_inverse=True)
        pairs = pairs[content[pairs[:, 0]] != content[pairs[:, 1]]]
    near = [_dup_entry([good[i] for i in g]) for g in _groups(pairs, len(good))]
    leak_exact = [d for d in exact if d["cross_split"]]
    leak_near = [d for d in near if d["cross_split"]]
    groups_leak = _group_leakage(good)

    sizes = np.array([[r["width"], r["height"]] for r in good]) if good else np.zeros((0, 2), int)
    report: dict[str, Any] = {
        "data": str(data), "layout": ds.layout, "classes": ds.classes,
        "files": len(recs) + len(ds.missing), "usable": len(good),
        "counts": counts, "usable_counts": usable,
        "imbalance": {k: round(v, 2) for k, v in imbalance.items()},
        "sizes": _size_summary(sizes),
        "modes": dict(Counter(r["mode"] for r in good)),
        "formats": dict(Counter(str(r["format"]) for r in good)),
        "quarantined": quarantined,
        "exact_duplicates": exact,
        "near_duplicates": near,
        "leakage": {"exact": len(leak_exact), "near": len(leak_near), "groups": groups_leak},
    }
    report["advice"] = _advice(report)
    return report


def _dup_entry(files: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "files": [{"path": f["path"], "split": f["split"], "label": f["label"]} for f in files],
        "cross_split": len({f["split"] for f in files}) > 1,
        "conflicting_labels": len({f["label"] for f in files}) > 1,
    }


def _group_leakage(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    splits: dict[str, set[str]] = defaultdict(set)
    for r in recs:
        if r.get("group"):
            splits[str(r["group"])].add(r["split"])
    return [{"group": g, "splits": sorted(s)} for g, s in sorted(splits.items()) if len(s) > 1]


def _size_summary(sizes: np.ndarray) -> dict[str, Any]:
    if len(sizes) == 0:
        return {}
    short = sizes.min(1)
    return {
        "min": sizes.min(0).tolist(), "max": sizes.max(0).tolist(), "median": np.median(sizes, 0).astype(int).tolist(),
        "distinct": len({tuple(s) for s in sizes.tolist()}),
        "smaller_than_64px": int((short < 64).sum()),
        "aspect_min": round(float((sizes[:, 0] / sizes[:, 1]).min()), 3),
        "aspect_max": round(float((sizes[:, 0] / sizes[:, 1]).max()), 3),
    }


def _advice(r: dict[str, Any]) -> list[str]:
    tips = []
    for split, counts in r["usable_counts"].items():
        none = [c for c, n in counts.items() if n == 0 and r["counts"].get(split, {}).get(c)]
        if none and split == "train":
            tips.append(f"train: class(es) with no usable image ({', '.join(none)}): training will refuse; replace "
                        "the unusable files (listed with their reasons).")
        elif none:
            tips.append(f"{split}: class(es) with no usable image ({', '.join(none)}): no figure for them there.")
    if r["quarantined"]:
        reasons = Counter(q["reason"].split(":")[0] for q in r["quarantined"])
        tips.append(f"{len(r['quarantined'])} file(s) cannot be used ({', '.join(f'{k}: {v}' for k, v in reasons.items())}). "
                    "Training skips and lists them; fix or delete them to use them.")
    worst = max(r["imbalance"].items(), key=lambda kv: kv[1], default=None)
    if worst and worst[1] >= 3:
        tips.append(f"classes are imbalanced ({worst[1]:.1f}:1 in {worst[0]}): collect more of the rare classes, and judge "
                    "the model by balanced accuracy, not accuracy; a weighted loss or oversampling helps.")
    if r["leakage"]["exact"] or r["leakage"]["near"]:
        tips.append(f"{r['leakage']['exact']} exact and {r['leakage']['near']} near-duplicate group(s) sit in more than one "
                    "split: validation accuracy is inflated. Remove the copies from val/test (listed under duplicates).")
    if r["leakage"]["groups"]:
        tips.append(f"{len(r['leakage']['groups'])} group(s) appear in more than one split: split by group so one "
                    "patient/source never sits on both sides.")
    conflicting = [d for d in r["exact_duplicates"] + r["near_duplicates"] if d["conflicting_labels"]]
    if conflicting:
        tips.append(f"{len(conflicting)} duplicate group(s) carry different labels: at least one label is wrong.")
    same = [d for d in r["exact_duplicates"] if not d["cross_split"]]
    if same:
        tips.append(f"{len(same)} exact duplicate group(s) inside one split: harmless but they weigh double; delete the copies.")
    if r["sizes"].get("smaller_than_64px"):
        tips.append(f"{r['sizes']['smaller_than_64px']} image(s) have a side under 64 px and will be upscaled.")
    for split, counts in r["usable_counts"].items():
        small = [c for c, n in counts.items() if 0 < n < 10]
        if small:
            tips.append(f"{split}: class(es) with fewer than 10 usable images ({', '.join(small)}): metrics on them are noise.")
    if not tips:
        tips.append("no problems found.")
    return tips
