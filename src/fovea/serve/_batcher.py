"""Dynamic micro-batching: concurrent requests gathered into one forward pass.

Requests wait in a queue. The worker takes the first, then keeps taking until it holds ``max_batch_size``
images or ``max_wait_ms`` have passed since it took the first, and runs them as one batch on a single
inference thread. Under load the model is busy while requests pile up, so batches form without waiting;
alone, a request waits at most ``max_wait_ms`` (default 0: measured on 2 cores, waiting 2-10 ms added
that much to a lone request's latency and no throughput under 32 clients). Decoding happens before the queue, on other threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class _Item:
    images: torch.Tensor  # uint8 (k, 3, S, S)
    future: asyncio.Future[np.ndarray]


@dataclass
class MicroBatcher:
    """``await batcher.submit(images)`` -> probabilities (k, classes), computed together with other requests."""

    fn: Callable[[torch.Tensor], np.ndarray]  # uint8 (N, 3, S, S) -> probabilities (N, C)
    max_batch_size: int = 32
    max_wait_ms: float = 0.0  # 0: take what is already queued, never wait (batches form while the model runs)
    on_batch: Callable[[int], None] | None = None  # told each batch's size (a metrics histogram)
    _queue: asyncio.Queue[_Item] | None = field(default=None, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)
    # One thread runs every torch operation (the server loads and warms the model on it too): PyTorch's
    # OpenMP pool per calling thread oversubscribed 2 cores, doubling batch-1 latency (4-6 -> 8-11 ms).
    executor: concurrent.futures.ThreadPoolExecutor = field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fovea-infer"))

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="fovea-batcher")

    async def stop(self, close_executor: bool = True) -> None:
        """Stop taking requests (those still queued get an error); ``close_executor=False`` when it is shared."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._queue is not None:
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if not item.future.done():
                    item.future.set_exception(RuntimeError("the model was unloaded"))
        if close_executor:
            self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, images: torch.Tensor) -> np.ndarray:
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Item(images, future))
        return await future

    async def _gather(self) -> list[_Item]:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        items = [await self._queue.get()]
        size = len(items[0].images)
        deadline = loop.time() + self.max_wait_ms / 1000
        while size < self.max_batch_size:
            try:  # whatever is already waiting joins at once; then wait for more until the deadline
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), left)
                except asyncio.TimeoutError:
                    break
            items.append(item)
            size += len(item.images)
        return items

    def _call(self, parts: list[torch.Tensor]) -> np.ndarray:
        return self.fn(parts[0] if len(parts) == 1 else torch.cat(parts))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [i for i in await self._gather() if not i.future.done()]  # a timed-out caller is gone
            if not items:
                continue
            parts = [i.images for i in items]
            if self.on_batch:
                self.on_batch(sum(len(p) for p in parts))
            try:
                probs = await loop.run_in_executor(self.executor, self._call, parts)
            except Exception as e:  # noqa: BLE001 - every waiting request gets the error, the worker survives
                for i in items:
                    if not i.future.done():
                        i.future.set_exception(e)
                continue
            start = 0
            for i in items:
                k = len(i.images)
                if not i.future.done():
                    i.future.set_result(probs[start : start + k])
                start += k
