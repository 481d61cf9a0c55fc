"""What this machine can run natively, and how fast a model runs on it: latency at batch 1, throughput at 32."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# CPU flags that make low precision fast (Linux /proc/cpuinfo names). Without VNNI (or AMX), int8 matrix
# products take several instructions each and int8 is often no faster than float32.
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
FP16_FLAGS = ("avx512_fp16", "amx_fp16")


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass
class Hardware:
    cpu: str
    cores: int
    threads: int  # PyTorch's intra-op threads: what the CPU figures ran with
    int8: list[str]  # the flags found that make int8 fast (empty: int8 will not be faster)
    bf16: list[str]
    fp16: list[str]
    gpu: str | None

    @property
    def native_int8(self) -> bool:
        return bool(self.int8)

    def native(self, dtype: str, device: str = "cpu") -> bool:
        """Whether ``dtype`` ("float16"/"bfloat16") runs natively on ``device`` here."""
        if device == "cuda":
            return self.gpu is not None and (dtype == "float16" or torch.cuda.is_bf16_supported())
        return bool(self.bf16 if dtype == "bfloat16" else self.fp16)

    def to_dict(self) -> dict[str, Any]:
        return {"cpu": self.cpu, "cores": self.cores, "threads": self.threads, "int8_instructions": self.int8,
                "bf16_instructions": self.bf16, "fp16_instructions": self.fp16, "gpu": self.gpu,
                "native_int8": self.native_int8}

    def summary(self) -> str:
        def has(flags: list[str]) -> str:
            return ", ".join(flags) if flags else "none"

        gpu = f"; GPU {self.gpu}" if self.gpu else "; no GPU"
        return (f"{self.cpu}, {self.cores} cores ({self.threads} threads used); int8 instructions: {has(self.int8)}; "
                f"bf16: {has(self.bf16)}; fp16: {has(self.fp16)}{gpu}")


def hardware() -> Hardware:
    import os

    flags = _cpu_flags()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return Hardware(
        cpu=_cpu_name(), cores=os.cpu_count() or 1, threads=torch.get_num_threads(),
        int8=[f for f in INT8_FLAGS if f in flags], bf16=[f for f in BF16_FLAGS if f in flags],
        fp16=[f for f in FP16_FLAGS if f in flags], gpu=gpu,
    )


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
