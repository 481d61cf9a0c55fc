"""Operations as preprocessing steps: parsed from ``gray,clahe:clip=3``, applied in order, recorded in the artifact.

A step is an operation that maps one image to one image of the same size (not and/or/xor, which need
a second mask, nor contours/hough, which draw annotations). The chain's result is always turned back
into (H, W, 3) RGB uint8 (a gray result gets 3 equal channels), so every model takes it unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fovea.errors import FoveaError
from fovea.ops._ops import check_image, get_op, list_ops, to_rgb


@dataclass(frozen=True)
class Step:
    """One operation with all its parameters (defaults filled in, so a recorded step replays exactly)."""

    op: str
    params: dict[str, Any] = field(default_factory=dict)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return get_op(self.op).fn(image, **self.params)

    def __str__(self) -> str:
        defaults = get_op(self.op).params
        changed = [f"{k}={v}" for k, v in self.params.items() if defaults.get(k) != v]
        return ":".join([self.op, *changed])

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "params": dict(self.params)}


def _one(item: str | Mapping[str, Any] | Step) -> Step:
    if isinstance(item, Step):
        return item
    if isinstance(item, Mapping):  # as model.json records it
        name, given = str(item.get("op", "")), dict(item.get("params") or {})
    else:
        name, *pairs = [p.strip() for p in str(item).split(":")]
        given = {}
        for pair in pairs:
            if "=" not in pair:
                raise FoveaError(f"step {item!r}: parameters go as NAME:KEY=VALUE[:KEY=VALUE], e.g. clahe:clip=3:tile=4")
            k, v = pair.split("=", 1)
            given[k.strip()] = v
    steps = ", ".join(o.name for o in list_ops() if o.preprocess)
    try:
        op = get_op(name)
    except FoveaError as e:  # the same message, listing the operations that can be steps
        raise FoveaError(str(e).split("; choose from")[0] + f"; steps: {steps}") from None
    if not op.preprocess:
        why = "needs a second mask" if op.inputs == 2 else "draws annotations, not an image to learn from"
        raise FoveaError(f"{op.name} cannot be a preprocessing step ({why}); steps: {steps}")
    return Step(op.name, op.check_params(given))


def parse_steps(spec: str | Iterable[str | Mapping[str, Any] | Step] | None) -> list[Step]:
    """Steps from ``"gray,clahe:clip=3"``, a list of such strings, or model.json's list of {op, params}.

    Every parameter is checked by running the chain once on a small image, so a bad value fails here
    (when the config is read) and not halfway through decoding a data set.
    """
    if spec is None:
        return []
    items: list[str | Mapping[str, Any] | Step] = []
    for item in [spec] if isinstance(spec, str) else spec:
        if isinstance(item, str):
            items += [p for p in (s.strip() for s in item.split(",")) if p]
        else:
            items.append(item)
    steps = [_one(i) for i in items]
    if steps:
        probe = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
        run_steps(probe, steps)
    return steps


def run_steps(image: np.ndarray, steps: Iterable[Step]) -> np.ndarray:
    """The chain's raw result: (H, W) or (H, W, 3) uint8."""
    out = check_image(image)
    for step in steps:
        out = step(out)
    return out


def preprocess(image: np.ndarray, steps: str | Iterable[str | Mapping[str, Any] | Step]) -> np.ndarray:
    """Apply preprocessing steps to an image; returns (H, W, 3) RGB uint8, what a model takes."""
    chain = parse_steps(steps) if not isinstance(steps, list) or not all(isinstance(s, Step) for s in steps) else steps
    return np.ascontiguousarray(to_rgb(run_steps(image, chain)))
