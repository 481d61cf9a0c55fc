"""``fovea check``: what is in a data set, what is wrong with it, and what to do about each problem."""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from fovea.data._io import MAX_PIXELS, open_image, progress_bar, read_image
from fovea.data._layout import discover
from fovea.errors import ImageError

log = logging.getLogger(__name__)


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


def _near_pairs(hashes: np.ndarray, threshold: int, chunk: int = 2048) -> list[tuple[int, int, int]]:
    """All (i, j, distance) with i < j and Hamming distance <= threshold, in chunks to bound memory."""
    out: list[tuple[int, int, int]] = []
    for start in range(0, len(hashes), chunk):
        block = hashes[start : start + chunk, None] ^ hashes[None, :]  # (chunk, N) uint64
        dist = np.bitwise_count(block)
        ii, jj = np.nonzero(dist <= threshold)
        for i, j in zip(ii + start, jj):
            if i < j:
                out.append((int(i), int(j), int(dist[i - start, j])))
    return out


def _group_pairs(pairs: list[tuple[int, int, int]], n: int) -> list[list[int]]:
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for i, j, _ in pairs:
        parent[find(i)] = find(j)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in {k for p in pairs for k in p[:2]}:
        groups[find(i)].append(i)
    return [sorted(g) for g in groups.values() if len(g) > 1]


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
    with progress_bar(len(entries), "checking", progress) as bar, ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        task = bar.add_task("checking", total=len(entries))
        recs = []
        for rec in pool.map(lambda e: _inspect(e[1].path, max_pixels), entries):
            recs.append(rec)
            bar.advance(task)
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
    pairs = [(i, j, d) for i, j, d in _near_pairs(hashes, near_threshold) if good[i]["sha"] != good[j]["sha"]]
    near = [_dup_entry([good[i] for i in g]) for g in _group_pairs(pairs, len(good))]
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
