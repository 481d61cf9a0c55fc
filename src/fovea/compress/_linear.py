"""int8 weights by linear quantization, as the course describes it (../shared/seeds, 000 "Quantization").

Per output channel (axis 0 of a conv or linear weight), with the mapping of the course (deeplearning.ai's
"Quantization Fundamentals")::

    q = clamp(round(w / scale) + zero_point, q_min, q_max)        w ~ (q - zero_point) * scale

    symmetric:   scale = max|w| / 127,              zero_point = 0,   q in [-127, 127]
    asymmetric:  scale = (w_max - w_min) / 255,     zero_point = round(-128 - w_min / scale), q in [-128, 127]

The asymmetric range is widened to contain 0 (as PyTorch's observers do), so a zero weight stays exactly zero
and the zero point always fits in int8; for trained conv weights, whose channels hold both signs, this changes
nothing. Symmetric leaves -128 unused so that +-max map to +-127 alike.

Stored as int8 codes + float32 scale (+ int8 zero point) per channel in the format of ``fovea.runtime.int8``,
which dequantizes them to float32 when the artifact loads:
the network then computes in float32 exactly as before. The point is size (4x smaller weights on disk and over
the network), not speed. Only weights with at least 2 dimensions are quantized (convs, linears, embeddings);
biases and BatchNorm's parameters are few and sensitive, and stay float32.

Own code, not ``torch.quantize_per_channel``: the formula is what the report teaches, and PyTorch's quantized
tensors cannot be saved as safetensors. ``tests/test_compress.py`` checks that our codes equal PyTorch's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fovea.runtime.int8 import CODES, SCALE, ZERO, dequantize_per_channel

SCHEMES = ("symmetric", "asymmetric")


@dataclass
class LayerError:
    """How much quantization changed one weight tensor."""

    name: str
    shape: tuple[int, ...]
    sqnr_db: float  # signal-to-quantization-noise ratio: 10 log10(|w|^2 / |w - w_hat|^2); higher is better
    mean_abs_error: float
    max_abs_error: float

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "shape": list(self.shape), "sqnr_db": self.sqnr_db,
                "mean_abs_error": self.mean_abs_error, "max_abs_error": self.max_abs_error}


def quantize_per_channel(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int8 codes shaped like w, float32 scale (C,), int8 zero point (C,)) for a float weight (C, ...)."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, not {scheme!r}")
    flat = w.detach().float().reshape(len(w), -1)  # (C, K)
    eps = torch.finfo(torch.float32).eps
    if scheme == "symmetric":
        scale = (flat.abs().amax(1) / 127).clamp_min(eps)
        zero = torch.zeros(len(w), dtype=torch.int32)
        q_min, q_max = -127, 127
    else:
        lo, hi = flat.amin(1).clamp(max=0), flat.amax(1).clamp(min=0)
        scale = ((hi - lo) / 255).clamp_min(eps)
        zero = (-128 - torch.round(lo / scale)).to(torch.int32).clamp(-128, 127)
        q_min, q_max = -128, 127
    q = torch.round(flat / scale[:, None]) + zero[:, None]
    return q.clamp(q_min, q_max).to(torch.int8).reshape(w.shape), scale, zero.to(torch.int8)


def layer_error(name: str, w: torch.Tensor, w_hat: torch.Tensor) -> LayerError:
    w, err = w.detach().float(), (w.detach().float() - w_hat)
    noise = float(err.pow(2).sum())
    sqnr = math.inf if noise == 0 else 10 * math.log10(max(float(w.pow(2).sum()), 1e-30) / noise)
    return LayerError(name, tuple(w.shape), sqnr, float(err.abs().mean()), float(err.abs().max()))


def quantizable(name: str, t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.ndim >= 2 and t.numel() >= 16


def quantize_state(state: dict[str, torch.Tensor], scheme: str) -> tuple[dict[str, torch.Tensor], list[LayerError]]:
    """A state dict with every weight of >= 2 dimensions as int8 codes + scale + zero point; per-layer errors."""
    out: dict[str, torch.Tensor] = {}
    errors = []
    for name, t in state.items():
        if not quantizable(name, t):
            out[name] = t.detach().cpu().contiguous()
            continue
        q, scale, zero = quantize_per_channel(t.cpu(), scheme)
        out[CODES.format(name)], out[SCALE.format(name)] = q.contiguous(), scale.contiguous()
        if scheme == "asymmetric":
            out[ZERO.format(name)] = zero.contiguous()
        errors.append(layer_error(name, t.cpu(), dequantize_per_channel(q, scale, zero)))
    return out, errors
