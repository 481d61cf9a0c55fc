"""``fovea ops gallery``: one picture with every operation applied to one photo, each tile labelled."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fovea.ops._ops import apply, find_contours, find_lines, list_ops, otsu_level, to_rgb

LABEL_PX = 34  # two lines of 13 px text above each tile


@dataclass
class Gallery:
    path: Path
    tiles: int
    width: int
    height: int
    image_size: tuple[int, int]  # (W, H) of the photo the operations ran on


def _disc(shape: tuple[int, ...]) -> np.ndarray:
    """A centred filled disc, the second mask of the and/or/xor tiles."""
    h, w = shape[:2]
    m = np.zeros((h, w), np.uint8)
    cv2.circle(m, (w // 2, h // 2), max(1, min(h, w) // 3), 255, -1)
    return m


def _tiles(rgb: np.ndarray) -> list[tuple[str, str, np.ndarray]]:
    """(title, detail, image) for the photo and every registered operation.

    Mask and morphology operations are shown on the photo's Otsu mask, where their effect is visible;
    the rest on the photo. The parameters that differ from the defaults are written under the name.
    """
    mask = apply("otsu", rgb)
    disc = _disc(rgb.shape)
    out: list[tuple[str, str, np.ndarray]] = [("original", f"{rgb.shape[1]}x{rgb.shape[0]} RGB", rgb)]
    for op in list_ops():
        name = op.name
        if op.inputs == 2:
            out.append((name, "otsu mask, centred disc", apply(name, mask, disc)))
        elif op.kind == "mask":
            out.append((name, "of the otsu mask", apply(name, mask)))
        elif op.kind == "morphology":
            out.append((name, "otsu mask, size=5", apply(name, mask, size=5)))
        elif name == "otsu":
            out.append((name, f"level {otsu_level(rgb)}", apply(name, rgb)))
        elif name == "rgb":
            out.append((name, "of hsv: round trip", apply(name, apply("hsv", rgb))))
        elif name == "conv":
            for kernel in ("horizontal", "vertical", "diagonal", "sharpen"):
                out.append((name, f"kernel={kernel}", apply(name, rgb, kernel=kernel)))
        elif name == "contours":
            c = find_contours(rgb)
            out.append((name, f"{c.count} found, otsu level {c.level}", c.image))
        elif name == "hough":
            lines = find_lines(rgb, thickness=2)  # 1 px red is lost on a busy photo
            out.append((name, f"{len(lines.lines)} segments", lines.image))
        else:
            detail = " ".join(f"{k}={v}" for k, v in op.params.items()) or op.help.split(":")[0]
            out.append((name, detail, apply(name, rgb)))
    return out


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)  # a scalable font where Pillow has FreeType
    except (TypeError, OSError):  # older Pillow, or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def gallery(rgb: np.ndarray, out: str | Path, *, size: int = 320, columns: int = 6) -> Gallery:
    """Write one PNG with every operation on ``rgb`` (H, W, 3) uint8; returns where and how big.

    Args:
        size: the photo is first shrunk (never enlarged) so its longer side is at most this, in px:
            tiles stay legible and a 4000 px photo does not take seconds per operation.
        columns: tiles per row.
    """
    from fovea.errors import FoveaError

    if size < 32:
        raise FoveaError(f"--size must be at least 32 px, got {size}")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise FoveaError(f"the gallery is written as PNG: give --out a .png name, not {out.name!r}")
    h, w = rgb.shape[:2]
    scale = size / max(h, w)
    if scale < 1:
        rgb = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    tiles = _tiles(rgb)
    th, tw = rgb.shape[:2]
    cell_w, cell_h = max(tw, 150) + 8, th + LABEL_PX + 8  # at least 150 px wide, so labels fit
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    bold, small = _font(13), _font(11)
    for i, (title, detail, img) in enumerate(tiles):
        x, y = (i % columns) * cell_w + 4, (i // columns) * cell_h + 4
        draw.text((x, y), title, fill="black", font=bold)
        draw.text((x, y + 16), detail[:40], fill=(90, 90, 90), font=small)
        sheet.paste(Image.fromarray(to_rgb(img)), (x, y + LABEL_PX))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    return Gallery(out, len(tiles), sheet.width, sheet.height, (tw, th))
