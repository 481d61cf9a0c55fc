"""Decode each image once into a compact uint8 array, kept in memory and on disk for reuse.

Training then never touches a JPEG again: an epoch is a pass over a (N, 3, S, S) uint8 tensor
(3000 pets images at 64 px = 37 MB; at 224 px = 450 MB, which a GPU holds with ease). The disk
entry is keyed by the files' content hashes and the size, so renaming a folder keeps the cache and
editing one image rebuilds it. Stored as plain ``.npy`` (``allow_pickle=False``) plus a JSON index.

``store="disk"`` is for sets that do not fit in memory: the same entry is decoded straight into its file in
chunks (a killed decode resumes at the first chunk not written), and the set comes back memory-mapped, so
``ImageSet.images`` is still a (N, 3, S, S) tensor but its pages live in the file; training reads it in
batches (``fovea.data._disk.DiskBatches``).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import mmap
import multiprocessing
import os
import shutil
import threading
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fovea._home import cache_dir
from fovea.data._io import MAX_PIXELS, load_square, progress_bar
from fovea.data._layout import Sample
from fovea.errors import FoveaError, ImageError

if TYPE_CHECKING:
    from fovea.data._loader import Batches
    from fovea.ops import Step

log = logging.getLogger(__name__)
CACHE_VERSION = 1  # bump when decoding or resizing changes what is stored
STORES = ("memory", "disk")
CHUNK_BYTES = 64 << 20  # store="disk" decodes this much at a time (5 461 images at 64 px, 445 at 224 px)


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, 3, S, S) uint8
    labels: torch.Tensor  # (N,) int64
    paths: list[str]
    quarantined: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    file: Path | None = None  # store="disk": the .npy file ``images`` is mapped from (its rows are read from here)

    @property
    def on_disk(self) -> bool:
        return self.file is not None

    def __len__(self) -> int:
        return len(self.paths)

    def batches(self, batch_size: int, **kw: Any) -> Batches:
        """``Batches`` over the set (``kw``: theirs); a disk-backed set's read from its cache file by ``DiskBatches``
        (not through the map), as training and lr-find read it."""
        from fovea.data._disk import DiskBatches
        from fovea.data._loader import Batches

        if self.file is not None:
            return DiskBatches(self.images, self.labels, batch_size, file=self.file, **kw)
        return Batches(self.images, self.labels, batch_size, **kw)

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        """Images ``lo:hi`` (M, 3, S, S): a view of memory; for a disk-backed set, read from its file with
        ``os.preadv`` into a new tensor, not through the map, whose pages would count in the process's resident
        memory for as long as the kernel keeps them (a pass over the set would look as large as the set)."""
        if self.file is None:
            return self.images[lo:hi]
        from fovea.data._disk import read_rows

        hi = min(hi, len(self.images))
        lo = min(lo, hi)
        out = np.empty((hi - lo, *self.images.shape[1:]), np.uint8)  # (M, 3, S, S)
        flat = out.reshape(hi - lo, int(np.prod(out.shape[1:])))  # (M, 3·S·S): one file row each
        fd = os.open(self.file, os.O_RDONLY)
        try:
            read_rows(fd, _data_offset(self.file), flat.shape[1], np.arange(lo, hi), flat)
        finally:
            os.close(fd)
        return torch.from_numpy(out)


def _hash_file(path: str) -> str | None:
    """Content hash of one file (read in one go; the bytes are not kept, so memory stays flat)."""
    try:
        return hashlib.blake2b(Path(path).read_bytes(), digest_size=16).hexdigest()
    except OSError:
        return None


# The decoded images go straight into one (N, 3, S, S) array: in threads, a plain array; in forked
# children, an anonymous shared mapping they inherit. Only a short status travels back per image, not
# 150 KB of pixels through a pipe (which cost more than the decoding at 224 px).
_out: np.ndarray | None = None
_writers: list[threading.Thread] = []  # cache entries being written behind training


def _attach(out: np.ndarray) -> None:
    global _out
    _out = out


def _decode_into(i: int, path: str, size: int, max_pixels: int, out: np.ndarray | None = None,
                 steps: Sequence[Step] = ()) -> tuple[str | None, str | None]:
    """Decode file ``path`` into row ``i``; returns (content hash, None) or (hash or None, reason)."""
    target = _out if out is None else out
    assert target is not None, "_attach() runs in every decoding process"
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return None, f"unreadable file ({e.strerror or e})"
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    try:
        target[i] = load_square(data, size, max_pixels, steps).transpose(2, 0, 1)
    except ImageError as e:
        return digest, e.reason
    return digest, None


def _decode_all(paths: list[str], size: int, max_pixels: int, workers: int, bar: Any, task: Any,
                steps: Sequence[Step] = ()) -> tuple[np.ndarray, list[tuple[str | None, str | None]]]:
    """Threads on small machines; forked processes where there are many cores and many images.

    Decoding a 180 px JPEG is ~0.5 ms of Python around the GIL-free C decode, so threads stop scaling
    past ~4 cores: 3000 pets images at 224 px took 3.9 s on 16 threads of the H200 machine. The
    children only run PIL and NumPy (never torch or CUDA), which makes fork safe here.
    """
    n = len(paths)
    shape = (n, 3, size, size)
    if workers >= 4 and n >= 512 and "fork" in multiprocessing.get_all_start_methods():
        for t in _writers:  # never fork while a cache write holds locks the children would inherit
            t.join()
        buf = mmap.mmap(-1, max(1, n * 3 * size * size))  # MAP_SHARED | MAP_ANONYMOUS: children write here
        out = np.frombuffer(buf, np.uint8, count=n * 3 * size * size).reshape(shape)
        ctx = multiprocessing.get_context("fork")
        try:
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_attach, initargs=(out,)) as pool:
                results = []
                # Steps run OpenCV in the children; its thread pool survives fork (tests/ops: 512 images, 4 workers).
                decode = functools.partial(_decode_into, steps=steps)
                for r in pool.map(decode, range(n), paths, [size] * n, [max_pixels] * n, chunksize=32):
                    results.append(r)
                    bar.advance(task)
        except BrokenProcessPool as e:
            raise FoveaError("a decoding process died (out of memory, or a file that crashes the image library); "
                             "run `fovea check` on the data to find it") from e
        return out, results
    out = np.empty(shape, np.uint8)
    with ThreadPoolExecutor(workers) as pool:
        results = []
        for r in pool.map(lambda ip: _decode_into(ip[0], ip[1], size, max_pixels, out, steps), enumerate(paths)):
            results.append(r)
            bar.advance(task)
    return out, results


def load_images(
    samples: Sequence[Sample],
    size: int,
    *,
    cache: bool | str | Path = True,
    max_pixels: int = MAX_PIXELS,
    workers: int | None = None,
    progress: bool = True,
    description: str = "decoding",
    write_behind: bool = False,
    preprocess: Sequence[Step] = (),
    store: str = "memory",
) -> ImageSet:
    """Decode ``samples`` to a uint8 ImageSet at ``size`` x ``size``; unusable files are quarantined.

    Args:
        cache: True for the default cache folder ($FOVEA_HOME/cache), a folder, or False for none.
        workers: decoding threads (PIL releases the GIL while decoding); default: all cores.
        write_behind: write the disk cache on a background thread (training starts at once; the entry
            appears atomically when written, and the interpreter waits for it before exiting).
        preprocess: ``fovea.ops`` steps applied to each image after the resize; part of the cache key.
        store: "memory" (the images in RAM) or "disk" (decoded into the cache entry's file in chunks, resumably,
            and memory-mapped from it: memory stays flat however many images there are).
    """
    if store not in STORES:
        raise FoveaError(f"unknown image store {store!r}; choose from {', '.join(STORES)}")
    workers = workers or os.cpu_count() or 1
    paths = [s.path for s in samples]
    with ThreadPoolExecutor(workers) as pool:
        hashes = list(pool.map(_hash_file, paths))
    key = _cache_key(hashes, samples, size, max_pixels, preprocess)
    folder = None if cache is False else (cache_dir() if cache is True else Path(cache))
    if folder is None and store == "disk":
        raise FoveaError("the disk store keeps the decoded images in the cache folder; it cannot run without one "
                         "(drop --cache none, or use --cache memory)")
    if folder is not None:
        hit = _read_cache(folder, key, samples, mapped=store == "disk")
        if hit is not None:
            log.info("image cache hit: %d images at %d px (%s)", len(hit), size, key)
            return hit
    if store == "disk":
        assert folder is not None
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{key}.lock", "w") as lock:  # two runs on one set: one decodes, the other waits for it
            fcntl.flock(lock, fcntl.LOCK_EX)
            hit = _read_cache(folder, key, samples, mapped=True)
            return hit if hit is not None else _decode_to_disk(samples, paths, hashes, size, max_pixels, workers,
                                                               progress, description, preprocess, folder, key)
    with progress_bar(len(samples), description, progress) as bar:
        task = bar.add_task(description, total=len(samples))
        arr, results = _decode_all(paths, size, max_pixels, workers, bar, task, preprocess)
    quarantined = [(p, reason) for p, (_, reason) in zip(paths, results) if reason is not None]
    keep = [i for i, (_, reason) in enumerate(results) if reason is None]
    if len(keep) < len(samples):
        arr = arr[keep]  # a copy without the unusable rows
    kept = [samples[i] for i in keep]
    out = ImageSet(
        torch.from_numpy(arr),
        torch.tensor([s.label for s in kept], dtype=torch.int64),
        [s.path for s in kept],
        quarantined,
    )
    if folder is not None:
        if [h for h, _ in results] == hashes:
            # Positions, not paths: a CSV may list one file twice (even with two labels).
            index = {"kept": keep, "quarantined": {str(i): r for i, (_, r) in enumerate(results) if r is not None}}
            if write_behind:
                writer = threading.Thread(target=_write_cache, args=(folder, key, out.images, index), name="fovea-cache-write")
                writer.start()
                _writers[:] = [t for t in _writers if t.is_alive()] + [writer]
            else:
                _write_cache(folder, key, out.images, index)
        else:
            log.warning("some images changed while they were being read; not caching this set")
    return out


def _cache_key(hashes: Sequence[str | None], samples: Sequence[Sample], size: int, max_pixels: int,
               steps: Sequence[Step] = ()) -> str:
    key_src = "\n".join(f"{h}:{s.label}" for h, s in zip(hashes, samples))
    # Steps with all their parameters; none adds nothing, so entries made before steps existed stay valid.
    pre = ":" + json.dumps([s.to_dict() for s in steps], sort_keys=True) if steps else ""
    return hashlib.blake2b(f"v{CACHE_VERSION}:{size}:{max_pixels}{pre}\n{key_src}".encode(), digest_size=16).hexdigest()


def _read_cache(folder: Path, key: str, samples: Sequence[Sample], mapped: bool = False) -> ImageSet | None:
    """The entry ``key``, read whole into memory, or ``mapped`` from its file (copy-on-write: writable, as torch
    wants, but nothing is ever written back)."""
    npy, meta = folder / f"{key}.npy", folder / f"{key}.json"
    if not (npy.exists() and meta.exists()):
        return None
    try:
        index = json.loads(meta.read_text())
        arr = np.load(npy, allow_pickle=False, mmap_mode="c" if mapped else None)
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
        file=npy if mapped else None,
    )


def _header(path: Path, shape: tuple[int, ...]) -> int:
    """Create ``path`` as a .npy file of uint8 ``shape`` (sparse: no data written yet); returns where the data
    starts."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    offset = int(arr.offset)
    del arr
    return offset


def _data_offset(path: Path) -> int:
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    offset = int(arr.offset)
    del arr
    return offset


def _pwrite(fd: int, data: np.ndarray, at: int) -> None:
    view = np.ascontiguousarray(data).data.cast("B")
    while len(view):
        n = os.pwrite(fd, view, at)
        view, at = view[n:], at + n


def _decode_to_disk(samples: Sequence[Sample], paths: list[str], hashes: list[str | None], size: int,
                    max_pixels: int, workers: int, progress: bool, description: str, steps: Sequence[Step],
                    folder: Path, key: str) -> ImageSet:
    """Decode into the entry's file chunk by chunk; each chunk's results are recorded once its rows are written,
    so a killed decode resumes at the first chunk not recorded. Memory holds one chunk (CHUNK_BYTES) at a time."""
    n, row = len(paths), 3 * size * size
    folder.mkdir(parents=True, exist_ok=True)
    partial, done_dir = folder / f"{key}.partial.npy", folder / f"{key}.partial"
    chunk = max(1, CHUNK_BYTES // row)
    done: dict[int, list[list[str | None]]] = {}
    if partial.exists() and done_dir.is_dir():
        try:
            offset = _data_offset(partial)
            if partial.stat().st_size != offset + n * row:
                raise ValueError("its size does not match")
            for f in done_dir.glob("*.json"):
                entry = json.loads(f.read_text())
                if entry["chunk"] == chunk:
                    done[int(f.stem)] = entry["results"]
        except (OSError, ValueError, KeyError) as e:
            log.warning("starting the decode of %s again: its partial file is unusable (%s)", key, e)
            done = {}
    if not done:
        shutil.rmtree(done_dir, ignore_errors=True)
        done_dir.mkdir()
        offset = _header(partial, (n, 3, size, size))
    else:
        log.info("resuming the decode of %d images: %d of %d chunks already on disk", n, len(done),
                 -(-n // chunk))
    results: list[tuple[str | None, str | None]] = []
    fd = os.open(partial, os.O_WRONLY)
    try:
        with progress_bar(n, description, progress) as bar:
            task = bar.add_task(description, total=n)
            for c, lo in enumerate(range(0, n, chunk)):
                hi = min(n, lo + chunk)
                if c in done:
                    results += [(h, r) for h, r in done[c]]
                    bar.advance(task, hi - lo)
                    continue
                arr, res = _decode_all(paths[lo:hi], size, max_pixels, workers, bar, task, steps)
                _pwrite(fd, arr, offset + lo * row)
                os.fsync(fd)  # the rows are on disk before the chunk is recorded as done
                tmp = done_dir / f"{c}.tmp"
                tmp.write_text(json.dumps({"chunk": chunk, "results": res}))
                os.replace(tmp, done_dir / f"{c}.json")
                results += res
                del arr
    finally:
        os.close(fd)
    if [h for h, _ in results] != hashes:
        partial.unlink(missing_ok=True)
        shutil.rmtree(done_dir, ignore_errors=True)
        raise FoveaError("some images changed while they were being decoded; run the command again")
    keep = [i for i, (_, reason) in enumerate(results) if reason is None]
    index = {"kept": keep, "quarantined": {str(i): r for i, (_, r) in enumerate(results) if r is not None}}
    final = partial
    if len(keep) < n:  # copy the usable rows into a file of their own, a chunk at a time
        final = folder / f"{key}.{os.getpid()}.tmp.npy"
        to = _header(final, (len(keep), 3, size, size))
        src, dst = os.open(partial, os.O_RDONLY), os.open(final, os.O_WRONLY)
        try:
            for lo in range(0, len(keep), chunk):
                rows = keep[lo : lo + chunk]
                block = np.stack([np.frombuffer(os.pread(src, row, offset + i * row), np.uint8) for i in rows])
                _pwrite(dst, block, to + lo * row)
        finally:
            os.close(src)
            os.close(dst)
        partial.unlink()
    (folder / f"{key}.json").write_text(json.dumps(index))
    os.replace(final, folder / f"{key}.npy")
    shutil.rmtree(done_dir, ignore_errors=True)
    hit = _read_cache(folder, key, samples, mapped=True)
    if hit is None:
        raise FoveaError(f"the image cache entry {folder / key}.npy could not be read back")
    return hit


def _write_cache(folder: Path, key: str, images: torch.Tensor, index: dict[str, Any]) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{key}.{os.getpid()}-{threading.get_ident()}.tmp.npy"  # unique per writer
        np.save(tmp, images.numpy(), allow_pickle=False)
        (folder / f"{key}.json").write_text(json.dumps(index))
        os.replace(tmp, folder / f"{key}.npy")  # atomic: a killed run never leaves half an entry
    except OSError as e:
        log.warning("could not write the image cache in %s (%s); continuing without it", folder, e)
