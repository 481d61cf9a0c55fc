"""The server's galleries for /v1/similar: per loaded version, the gallery of its training data (built on first use,
off the event loop) and the gallery of the images it has answered ("seen").

Feeding "seen" costs /v1/predict almost nothing: the forward pass already returns the embedding (it is logged for
drift monitoring), so ``saw`` only normalises it and appends it to a list; the next "seen" search folds that list
into the gallery on a worker thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from starlette.concurrency import run_in_threadpool

from fovea.serve._fleet import Served
from fovea.similar import Gallery, embed, gallery_for, normalize

SEEN_CAPACITY = 100_000  # the newest answered images kept per version: 150 MB of 384-d embeddings at most
VERSIONS_KEPT = 3  # seen galleries of this many versions (production, a candidate, the previous one)
INFERENCE_BATCH = 64  # images per turn on the inference thread while a training gallery is built


class Building(Exception):
    """A training gallery is still being built: the request may try again shortly."""


class Galleries:
    """Each version's training gallery and seen gallery, by (model name, version)."""

    def __init__(self) -> None:
        self.training: dict[tuple[str, int], Gallery] = {}
        self._building: dict[tuple[str, int], asyncio.Task[Gallery]] = {}
        self._seen: OrderedDict[tuple[str, int], Gallery] = OrderedDict()
        self._pending: dict[tuple[str, int], list[tuple[np.ndarray, list[str], list[str | None]]]] = {}
        self._lock = threading.Lock()  # _pending: appended on the event loop, folded in on a worker thread

    async def training_gallery(self, s: Served, executor: Any, wait_s: float) -> Gallery:
        """The gallery of ``s``'s training data; the first call starts building it (decoding on a worker thread, the
        model on the inference thread ``executor``, ``INFERENCE_BATCH`` images at a time so that predictions keep
        flowing) and waits up to ``wait_s``; past that ``Building`` (the build goes on). FoveaError: no training
        data here, or no embedding in this runtime."""
        key = (s.name, s.version)
        if key in self.training:
            return self.training[key]
        task = self._building.get(key)
        if task is None:
            def on_inference_thread(x: torch.Tensor) -> np.ndarray:
                parts = [executor.submit(embed, s.model, x[i : i + INFERENCE_BATCH]).result()
                         for i in range(0, len(x), INFERENCE_BATCH)]
                return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)

            task = asyncio.get_running_loop().create_task(
                run_in_threadpool(gallery_for, s.model, embed_with=on_inference_thread))
            self._building[key] = task

            def done(t: asyncio.Task[Gallery]) -> None:
                self._building.pop(key, None)  # a failed build is tried again by the next request
                if not t.cancelled() and t.exception() is None:
                    self.training[key] = t.result()

            task.add_done_callback(done)
        try:
            return await asyncio.wait_for(asyncio.shield(task), wait_s)
        except asyncio.TimeoutError:
            raise Building() from None

    def saw(self, s: Served, request_id: str, embeddings: np.ndarray | None, labels: list[str]) -> None:
        """Images ``s`` has just answered (their embeddings, as the forward pass gave them, and the labels it
        answered) for the seen gallery; nothing when the runtime gives no embedding. Cheap: called on every
        /v1/predict."""
        if embeddings is None or len(embeddings) == 0:
            return
        key = (s.name, s.version)
        paths = [f"seen:{request_id}"] if len(embeddings) == 1 else [f"seen:{request_id}#{k}"
                                                                     for k in range(len(embeddings))]
        with self._lock:
            pending = self._pending.setdefault(key, [])
            pending.append((normalize(embeddings), paths, list(labels)))
            if len(pending) > SEEN_CAPACITY:  # nobody searched for a long time: the oldest would be evicted anyway
                del pending[: len(pending) - SEEN_CAPACITY]

    async def seen_gallery(self, s: Served) -> Gallery:
        """What ``s`` has answered, the newest ``SEEN_CAPACITY`` images (empty before its first answer)."""
        return await run_in_threadpool(self._fold, (s.name, s.version))

    def _fold(self, key: tuple[str, int]) -> Gallery:
        with self._lock:
            pending = self._pending.pop(key, [])
            g = self._seen.get(key)
            if g is None:
                dim = pending[0][0].shape[1] if pending else 0
                g = self._seen[key] = Gallery(np.zeros((0, dim), np.float32), [], [], capacity=SEEN_CAPACITY)
                while len(self._seen) > VERSIONS_KEPT:
                    old, _ = self._seen.popitem(last=False)
                    self._pending.pop(old, None)
            self._seen.move_to_end(key)
        if pending:
            g.add(np.concatenate([v for v, _, _ in pending]), [p for _, ps, _ in pending for p in ps],
                  [lab for _, _, ls in pending for lab in ls])
        return g
