"""How fast a model runs on this machine: latency at batch 1, throughput at 32 (what it can run natively:
``fovea._system``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class Speed:
    p50_ms: float
    p95_ms: float
    throughput: float  # images/s at batch ``batch``
    batch: int

    def to_dict(self) -> dict[str, float]:
        return {"p50_ms": self.p50_ms, "p95_ms": self.p95_ms, "throughput": self.throughput}


def measure(forward: Callable[[torch.Tensor], Any], image_size: int, *, batch: int = 32, seconds: float = 2.0,
            min_runs: int = 20, seed: int = 0, sync: Callable[[], None] | None = None) -> Speed:
    """p50/p95 latency of one image and throughput at ``batch`` images, each measured for about ``seconds``.

    ``forward`` takes uint8 images (N, 3, S, S) and returns logits; it is warmed up first (allocators,
    oneDNN kernel selection, cuDNN autotuning), because a server pays those once, not per request. Random
    pixels: the speed of these networks does not depend on what the image shows.
    """
    sync = sync or (lambda: None)
    g = torch.Generator().manual_seed(seed)
    one = torch.randint(0, 256, (1, 3, image_size, image_size), generator=g, dtype=torch.uint8)
    many = torch.randint(0, 256, (batch, 3, image_size, image_size), generator=g, dtype=torch.uint8)
    for x in (one, one, one, many, many):
        forward(x)
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        forward(one)
        sync()
        times.append(time.perf_counter() - t)
        if len(times) >= 10_000:
            break
    runs, start = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - start < seconds:
        forward(many)
        runs += 1
    sync()
    elapsed = time.perf_counter() - start
    ms = np.array(times) * 1000
    return Speed(float(np.percentile(ms, 50)), float(np.percentile(ms, 95)), runs * batch / elapsed, batch)
