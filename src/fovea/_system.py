"""What this machine is: its CPU (name, the instructions that make low precision fast), cores and GPU.

One probe for every stage that adapts to the hardware (bf16 autocast in training, fp16/bf16 artifacts at load,
compression verdicts) and for the machine line every benchmark prints. Linux reads ``/proc/cpuinfo``;
elsewhere the flags are empty, which only means "assume nothing is native".
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# CPU flags that make low precision fast (Linux /proc/cpuinfo names). Without VNNI (or AMX), int8 matrix
# products take several instructions each and int8 is often no faster than float32.
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
FP16_FLAGS = ("avx512_fp16", "amx_fp16")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (read once per process)."""
    out: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor's block is enough: they share a model and flags
            key, _, value = line.partition(":")
            out[key.strip()] = value.strip()
    except OSError:
        pass
    return out


def cpu_flags() -> set[str]:
    return set(_cpuinfo().get("flags", "").split())


def cpu_name() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: where oneDNN runs bf16 convolutions natively (2x fp32, measured on Zen 4)."""
    return bool(cpu_flags() & set(BF16_FLAGS))


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
            import torch

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
    import torch

    flags = cpu_flags()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return Hardware(
        cpu=cpu_name(), cores=os.cpu_count() or 1, threads=torch.get_num_threads(),
        int8=[f for f in INT8_FLAGS if f in flags], bf16=[f for f in BF16_FLAGS if f in flags],
        fp16=[f for f in FP16_FLAGS if f in flags], gpu=gpu,
    )


def machine() -> str:
    """The hardware figures were measured on, in words, with the CPU flags that change speed (every benchmark
    prints it: a figure without them cannot be compared with another machine's)."""
    import torch

    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    speed = [f for f in ("avx2", "avx512f", *BF16_FLAGS, *INT8_FLAGS, *FP16_FLAGS) if f in cpu_flags()]
    return (f"{cpu_name()} ({os.cpu_count()} cores){gpu}, torch {torch.__version__}; "
            f"CPU flags: {', '.join(speed) or 'none of avx2/avx512/bf16/vnni/amx'}")
