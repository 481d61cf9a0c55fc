"""The int8-weights format of an artifact (``fovea compress --methods int8-sym|int8-asym``), and reading it back.

Each weight of >= 2 dimensions is stored as int8 codes + a float32 scale (+ an int8 zero point for the asymmetric
scheme) per output channel, under the keys below; it is dequantized to float32 when the artifact loads,
``w = (q - zero_point) * scale`` (the course's linear quantization; ``fovea.compress`` writes it).
"""

from __future__ import annotations

import torch

# Keys in the safetensors file of an int8-weights artifact: NAME is the fp32 weight it replaces.
CODES, SCALE, ZERO = "{}.__int8__", "{}.__scale__", "{}.__zero_point__"


def dequantize_per_channel(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """float32 weights (q - zero_point) * scale, per channel on axis 0."""
    shape = (-1,) + (1,) * (q.ndim - 1)
    return (q.float() - zero.float().view(shape)) * scale.float().view(shape)


def dequantize_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float32 weights for every int8 tensor of a stored state, the rest unchanged."""
    suffix = CODES.format("")
    out = {}
    for key, t in state.items():
        if key.endswith(suffix):
            name = key[: -len(suffix)]
            zero = state.get(ZERO.format(name), torch.zeros(len(t), dtype=torch.int8))
            out[name] = dequantize_per_channel(t, state[SCALE.format(name)], zero)
        elif not (key.endswith(SCALE.format("")) or key.endswith(ZERO.format(""))):
            out[key] = t
    return out
