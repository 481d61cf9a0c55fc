"""``fovea ops OP IMAGE``: one operation, a chain of steps, contours or lines on an image, as the command runs it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fovea.errors import FoveaError
from fovea.ops._ops import apply, find_contours, find_lines, get_op, kmeans_clusters
from fovea.ops._steps import parse_steps, preprocess


@dataclass
class OpResult:
    image: np.ndarray  # uint8 (H, W) or (H, W, 3): what to save
    lines: list[str] = field(default_factory=list)  # what to print: counts, areas, segments


def is_chain(op: str) -> bool:
    """``gray,clahe:clip=3``: --preprocess steps rather than one operation's name."""
    return "," in op or ":" in op


def run(op: str, rgb: np.ndarray, params: dict[str, str], mask2: np.ndarray | None = None) -> OpResult:
    """Apply ``op`` (a name or a chain of steps) with ``params`` to an RGB image (and a second mask for and/or/xor).

    A gray file (a mask, say) stays gray: mask in, mask out. Contours report their count and every area, Hough
    lines their segments, longest first.
    """
    if is_chain(op):  # a chain of steps, as --preprocess would apply them
        if params or mask2 is not None:
            raise FoveaError("a chain takes its parameters inline (gray,clahe:clip=3:tile=4), not --param or --mask2")
        return OpResult(preprocess(rgb, parse_steps(op)))
    spec = get_op(op)
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        rgb = rgb[..., 0]
    if spec.name == "contours":
        found = find_contours(rgb, **spec.check_params(params))
        shown = ", ".join(f"{a:g}" for a in found.areas[:20]) + (f" ... and {found.count - 20} more" if found.count > 20 else "")
        return OpResult(found.image, [f"{found.count} contours (threshold {found.level}); areas in px^2, largest first: "
                                      f"{shown or 'none'}"])
    if spec.name == "kmeans":
        seg = kmeans_clusters(rgb, **spec.check_params(params))
        text = [f"{len(seg.shares)} clusters, largest first:"]
        text += [f"  {i}: {'RGB ' + str(tuple(int(v) for v in c)) if len(c) == 3 else 'gray ' + str(int(c[0]))}  "
                 f"{100 * share:.1f} % of the pixels" for i, (c, share) in enumerate(zip(seg.centres, seg.shares))]
        return OpResult(seg.image, text)
    if spec.name == "hough":
        lines = find_lines(rgb, **spec.check_params(params))
        text = [f"{len(lines.lines)} line segments, longest first:"]
        text += [f"  ({x1}, {y1}) - ({x2}, {y2})  {((x2 - x1) ** 2 + (y2 - y1) ** 2) ** 0.5:.1f} px"
                 for x1, y1, x2, y2 in lines.lines[:20]]
        if len(lines.lines) > 20:
            text.append(f"  ... and {len(lines.lines) - 20} more")
        return OpResult(lines.image, text)
    return OpResult(apply(spec.name, rgb, mask2, **params))
