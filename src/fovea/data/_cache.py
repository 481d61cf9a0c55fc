"""Decode each image once into a compact uint8 array, kept in memory and on disk for reuse.

Training then never touches a JPEG again: an epoch is a pass over a (N, 3, S, S) uint8 tensor
(3000 pets images at 64 px = 37 MB; at 224 px = 450 MB, which a GPU holds with ease). The disk
entry is keyed by the files' content hashes and the size, so renaming a folder keeps the cache and
editing one image rebuilds it. Stored as plain ``.npy`` (``allow_pickle=False``) plus a JSON index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fovea._home import cache_dir
from fovea.data._io import MAX_PIXELS, load_square
from fovea.data._layout import Sample
from fovea.errors import ImageError

log = logging.getLogger(__name__)
CACHE_VERSION = 1  # bump when decoding or resizing changes what is stored


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, 3, S, S) uint8
    labels: torch.Tensor  # (N,) int64
    paths: list[str]
    quarantined: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def __len__(self) -> int:
        return len(self.paths)


def _hash_file(path: str) -> tuple[str, bytes | None]:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return f"unreadable:{e}", None
    return hashlib.blake2b(data, digest_size=16).hexdigest(), data


def _decode(data: bytes | None, size: int, max_pixels: int) -> np.ndarray | str:
    if data is None:
        return "unreadable file"
    try:
        return load_square(data, size, max_pixels)
    except ImageError as e:
        return e.reason


def _decoder_pool(workers: int, n: int) -> Executor:
    """Threads on small machines; forked processes where there are many cores and many images.

    Decoding a 180 px JPEG is ~0.5 ms of Python around the GIL-free C decode, so threads stop scaling
    past ~4 cores: 3000 pets images at 224 px took 3.9 s on 16 threads of the H200 machine. The
    children only run PIL and NumPy (never torch or CUDA), which makes fork safe here.
    """
    if workers >= 4 and n >= 512 and "fork" in multiprocessing.get_all_start_methods():
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    return ThreadPoolExecutor(workers)


def _progress(total: int, description: str, enabled: bool):  # noqa: ANN202 - rich types are noisy
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        disable=not enabled, transient=True,
    )


def load_images(
    samples: Sequence[Sample],
    size: int,
    *,
    cache: bool | str | Path = True,
    max_pixels: int = MAX_PIXELS,
    workers: int | None = None,
    progress: bool = True,
    description: str = "decoding",
) -> ImageSet:
    """Decode ``samples`` to a uint8 ImageSet at ``size`` x ``size``; unusable files are quarantined.

    Args:
        cache: True for the default cache folder ($FOVEA_HOME/cache), a folder, or False for none.
        workers: decoding threads (PIL releases the GIL while decoding); default: all cores.
    """
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(workers) as pool:
        hashed = list(pool.map(_hash_file, [s.path for s in samples]))
    key_src = "\n".join(f"{h}:{s.label}" for (h, _), s in zip(hashed, samples))
    key = hashlib.blake2b(f"v{CACHE_VERSION}:{size}:{max_pixels}\n{key_src}".encode(), digest_size=16).hexdigest()
    folder = None if cache is False else (cache_dir() if cache is True else Path(cache))
    if folder is not None:
        hit = _read_cache(folder, key, samples)
        if hit is not None:
            log.info("image cache hit: %d images at %d px (%s)", len(hit), size, key)
            return hit
    images: list[np.ndarray] = []
    kept: list[Sample] = []
    quarantined: list[tuple[str, str]] = []
    with _progress(len(samples), description, progress) as bar, _decoder_pool(workers, len(samples)) as pool:
        task = bar.add_task(description, total=len(samples))
        payloads = [hd[1] for hd in hashed]
        results = pool.map(_decode, payloads, [size] * len(payloads), [max_pixels] * len(payloads),
                           chunksize=16 if isinstance(pool, ProcessPoolExecutor) else 1)
        for s, res in zip(samples, results):
            if isinstance(res, str):
                quarantined.append((s.path, res))
            else:
                images.append(res)
                kept.append(s)
            bar.advance(task)
    arr = np.stack(images).transpose(0, 3, 1, 2).copy() if images else np.zeros((0, 3, size, size), np.uint8)
    out = ImageSet(
        torch.from_numpy(arr),
        torch.tensor([s.label for s in kept], dtype=torch.int64),
        [s.path for s in kept],
        quarantined,
    )
    if folder is not None:
        _write_cache(folder, key, out, samples)
    return out


def _read_cache(folder: Path, key: str, samples: Sequence[Sample]) -> ImageSet | None:
    npy, meta = folder / f"{key}.npy", folder / f"{key}.json"
    if not (npy.exists() and meta.exists()):
        return None
    try:
        index = json.loads(meta.read_text())
        arr = np.load(npy, allow_pickle=False)
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable cache entry %s: %s", npy, e)
        return None
    kept, reasons = index["kept"], index["quarantined"]  # positions in samples
    if arr.shape[0] != len(kept):
        return None
    return ImageSet(
        torch.from_numpy(arr),
        torch.tensor([samples[i].label for i in kept], dtype=torch.int64),
        [samples[i].path for i in kept],
        [(samples[int(i)].path, r) for i, r in reasons.items()],
    )


def _write_cache(folder: Path, key: str, data: ImageSet, samples: Sequence[Sample]) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        pos = {s.path: i for i, s in enumerate(samples)}
        index = {
            "kept": [pos[p] for p in data.paths],
            "quarantined": {str(pos[p]): r for p, r in data.quarantined},
        }
        tmp = folder / f"{key}.tmp.npy"
        np.save(tmp, data.images.numpy(), allow_pickle=False)
        (folder / f"{key}.json").write_text(json.dumps(index))
        os.replace(tmp, folder / f"{key}.npy")  # atomic: a killed run never leaves half an entry
    except OSError as e:
        log.warning("could not write the image cache in %s (%s); continuing without it", folder, e)
