"""Learning-rate schedules as pure functions of (step, total): resuming or extending a run needs no state."""

from __future__ import annotations

import math


def lr_at(step: int, total: int, peak: float, kind: str = "onecycle", warmup: float = 0.25) -> float:
    """Learning rate at ``step`` of ``total``.

    onecycle (Smith & Topin 2018): linear warm-up from peak/25 over ``warmup`` of the run, then cosine
    down to peak/1e4. cosine: 5 % linear warm-up, then cosine to 0. constant: peak.
    """
    if kind == "constant" or total <= 1:
        return peak
    t = min(max(step / (total - 1), 0.0), 1.0)
    if kind == "onecycle":
        start, end = peak / 25, peak / 1e4
        if t < warmup:
            return start + (peak - start) * t / warmup
        p = (t - warmup) / (1 - warmup)
        return end + (peak - end) * (1 + math.cos(math.pi * p)) / 2
    if kind == "cosine":
        w = 0.05
        if t < w:
            return peak * t / w
        return peak * (1 + math.cos(math.pi * (t - w) / (1 - w))) / 2
    raise ValueError(f"unknown schedule {kind!r}")
