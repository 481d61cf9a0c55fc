"""Durations as people write them on a command line: 90, 90s, 10m, 1.5h."""

from __future__ import annotations

import re

from fovea.errors import FoveaError


def parse_duration(text: str | float) -> float:
    """Seconds from ``90``, ``90s``, ``10m``, ``1.5h``."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not m:
        raise FoveaError(f"not a duration: {text!r}; write 30s, 10m or 1h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
