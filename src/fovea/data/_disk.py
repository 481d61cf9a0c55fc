"""Training from a set that does not fit in memory: where the decoded images live, and batches read from disk.

``choose_store`` decides, before anything is decoded, whether the set is held in memory (and on the GPU, on a
GPU) or read from its cache file: the decoded bytes against a share of the memory that is free now.
``DiskBatches`` are ``Batches`` whose images stay in the cache file (``load_images(..., store="disk")``): the
epoch's order is shuffled by blocks of consecutive rows, so the reads stay sequential; each batch is gathered
from a window of random blocks, shuffled within the window, so a batch is not a run of one class; a background
thread reads the next batches with ``os.preadv`` (into pinned memory and onto the device, on a GPU) while the
device trains on this one; the augmentation is the same batched one as in memory.

Why ``preadv`` and not the memory map: pages read through a mapping count in the process's resident memory until
the kernel takes them back, so an epoch over a mapped 10 GB file looks like a 10 GB process; read into a small
ring of buffers, memory stays flat and the data stays in the page cache for the next epoch. PyTorch's
``DataLoader`` with workers would pickle every batch through a pipe (and fork a process per worker); one thread
that releases the GIL in the read is enough to keep a training step busy (bench/scale.py).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fovea.data._loader import Batches
from fovea.errors import FoveaError

log = logging.getLogger(__name__)
STORE_CHOICES = ("auto", "memory", "disk", "none")  # --cache; none: in memory, no cache entry kept
MEMORY_SHARE = 0.5  # auto: the decoded set may take this share of the free memory (RAM; and the GPU's, on a GPU)
BLOCK_BYTES = 256 << 10  # a block of consecutive rows read in one call
WINDOW_BATCHES = 8  # rows are shuffled within this many batches' worth of random blocks
PREFETCH = 3  # batches read ahead


def _parse_bytes(text: str) -> int:
    units = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "G": 1 << 30, "GB": 1 << 30}
    t = text.strip().upper()
    num = t.rstrip("KMGB")
    try:
        return int(float(num) * units[t[len(num):]])
    except (ValueError, KeyError):
        raise FoveaError(f"FOVEA_MEMORY_BUDGET={text!r}: give bytes, e.g. 2GB or 500MB") from None


def available_memory() -> int:
    """Bytes of RAM free for new work now (MemAvailable: free plus reclaimable cache)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_budget(device: torch.device) -> tuple[int, str]:
    """How many bytes of decoded images may be held in memory, and what that is: FOVEA_MEMORY_BUDGET if set,
    else MEMORY_SHARE of the free RAM (and of the free GPU memory, on a GPU, where the set is moved whole)."""
    if os.environ.get("FOVEA_MEMORY_BUDGET"):
        return _parse_bytes(os.environ["FOVEA_MEMORY_BUDGET"]), "FOVEA_MEMORY_BUDGET"
    free_ram = available_memory()
    budget = int(free_ram * MEMORY_SHARE)
    what = f"{MEMORY_SHARE:.0%} of the {_gb(free_ram)} of RAM free"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if free * MEMORY_SHARE < budget:
            budget, what = int(free * MEMORY_SHARE), f"{MEMORY_SHARE:.0%} of the {_gb(free)} free on the GPU"
    return budget, what


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def choose_store(cache: str | bool, n_images: int, size: int, device: torch.device, copies: int = 1) -> tuple[str, str]:
    """("memory" | "disk", why) for ``--cache`` ``cache`` and a set of ``n_images`` at ``size`` px, held ``copies``
    times on this machine (a distributed run's processes each hold their own). The Python API's ``cache=True`` is
    "auto", ``False`` "none"."""
    if isinstance(cache, bool):
        cache = "auto" if cache else "none"
    if cache not in STORE_CHOICES:
        raise FoveaError(f"--cache {cache!r}: choose from {', '.join(STORE_CHOICES)}")
    need = n_images * 3 * size * size * copies
    if cache in ("memory", "none"):
        budget, what = memory_budget(device)
        if need > budget:
            log.warning("--cache %s: %d images at %d px take %s, more than %s; if memory runs out, use --cache disk",
                        cache, n_images, size, _gb(need), what)
        return "memory", f"--cache {cache}: {_gb(need)} in memory"
    if cache == "disk":
        return "disk", f"--cache disk: {_gb(need)} read from the cache file in batches"
    budget, what = memory_budget(device)
    held = f"{n_images} images at {size} px take {_gb(need)}" + (f" ({copies} processes)" if copies > 1 else "")
    if need <= budget:
        return "memory", f"{held}, within {what}"
    return "disk", f"{held}, more than {what}: read from the cache file in batches (--cache memory holds them anyway)"


def block_order(n: int, rows_per_block: int, window: int, generator: torch.Generator) -> torch.Tensor:
    """A permutation of range(n) shuffled by blocks: blocks of ``rows_per_block`` consecutive rows in random order,
    then the rows shuffled within each ``window`` of that order. Two draws from ``generator`` an epoch."""
    blocks = torch.randperm(-(-n // rows_per_block), generator=generator, device=generator.device).cpu()
    rows = (blocks[:, None] * rows_per_block + torch.arange(rows_per_block)).flatten()
    rows = rows[rows < n]
    keys = torch.rand(n, generator=generator, device=generator.device).cpu()
    within = torch.argsort(torch.arange(n) // window * 2.0 + keys)  # sort by (window, random key)
    return rows[within]


def read_rows(fd: int, offset: int, row_bytes: int, rows: np.ndarray, out: np.ndarray) -> None:
    """Read the sorted ``rows`` of a file of fixed-size rows into ``out`` (len(rows), row_bytes), one call per run
    of consecutive rows."""
    if len(rows) == 0:
        return
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
        view = out[lo:hi].data.cast("B")
        at = offset + int(rows[lo]) * row_bytes
        while len(view):
            got = os.preadv(fd, [view], at)
            if got <= 0:
                raise FoveaError(f"the image cache file ended early at byte {at}; delete it and run again")
            view, at = view[got:], at + got


class DiskBatches(Batches):
    """``Batches`` over a disk-backed ``ImageSet`` (``load_images(..., store="disk")``): same order semantics
    (a ``shard`` of every global batch, sample weights), the rows read by a background thread."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, file: Path,
                 **kw: Any) -> None:
        self.file = Path(file)
        super().__init__(images, labels, batch_size, **kw)
        arr = np.load(self.file, mmap_mode="r", allow_pickle=False)
        self.offset, self.shape = int(arr.offset), tuple(arr.shape[1:])
        del arr
        self.row_bytes = int(np.prod(self.shape))
        self.rows_per_block = max(1, BLOCK_BYTES // self.row_bytes)
        self.labels_cpu = labels.cpu()

    def _place(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        return images  # stays in its file

    def _order(self) -> torch.Tensor:
        if self.shuffle and self.sample_weights is None:
            return block_order(len(self.labels), self.rows_per_block, WINDOW_BATCHES * self.batch_size, self.generator)
        return super()._order().cpu()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plan = [np.sort(idx.cpu().numpy()) for idx in self.indices()]  # the generator is drawn here, in order
        cuda = self.device.type == "cuda"
        most = max((len(p) for p in plan), default=0)
        ring = [torch.empty((most, *self.shape), dtype=torch.uint8, pin_memory=cuda) for _ in range(PREFETCH + 2)]
        events: list[Any] = [None] * len(ring)
        out: queue.Queue[Any] = queue.Queue(maxsize=PREFETCH)
        stop = threading.Event()
        stream = torch.cuda.Stream(self.device) if cuda else None

        def produce() -> None:
            fd = os.open(self.file, os.O_RDONLY)
            try:
                for i, rows in enumerate(plan):
                    if stop.is_set():
                        return
                    slot = i % len(ring)
                    if events[slot] is not None:
                        events[slot].synchronize()  # its last copy to the device is done: the buffer is free
                    buf = ring[slot][: len(rows)]
                    read_rows(fd, self.offset, self.row_bytes, rows, buf.numpy().reshape(len(rows), -1))
                    y = self.labels_cpu[torch.from_numpy(rows)]
                    if stream is not None:
                        with torch.cuda.stream(stream):
                            x, y = buf.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                            events[slot] = torch.cuda.Event()
                            events[slot].record(stream)
                        out.put((x, y, events[slot]))
                    else:
                        out.put((buf, y, None))
            except BaseException as e:  # handed to the training thread, which raises it
                out.put(e)
            finally:
                os.close(fd)
                out.put(None)

        reader = threading.Thread(target=produce, name="fovea-disk-batches", daemon=True)
        reader.start()
        try:
            while (item := out.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                x, y, ready = item
                if ready is not None:
                    torch.cuda.current_stream(self.device).wait_event(ready)
                    x.record_stream(torch.cuda.current_stream(self.device))
                    y.record_stream(torch.cuda.current_stream(self.device))
                yield self.prepare(x), y
        finally:
            stop.set()
            while reader.is_alive():  # let a reader blocked on a full queue finish
                try:
                    out.get(timeout=0.1)
                except queue.Empty:
                    pass
            reader.join()
