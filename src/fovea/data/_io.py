"""Decode any image a user might have into an RGB uint8 array, or say exactly why not.

Rules (documented in the README, applied identically in training, evaluation and prediction):
- EXIF orientation is applied, so a phone photo is seen the way its owner sees it.
- Transparency (RGBA, LA, palette with a transparent colour) is composited on white: a transparent
  background is most often "paper", and black would invent dark edges the model could latch onto.
- 16-bit and 32-bit integer images are scaled to 8 bits by their type's full range (x / 257 for
  16-bit, x / (2**31 - 1) * 255 for signed 32-bit), not by their own min/max, so brightness means the
  same thing across images. The depth comes from the file (TIFF BitsPerSample); Pillow's 32-bit mode
  "I" without one (a 16-bit PNG, say) counts as 16-bit. Negative values become 0.
- Images above ``max_pixels`` (default 64 MP) are refused before decoding: a decompression bomb
  must never reach memory.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from fovea.errors import ImageError

if TYPE_CHECKING:
    from fovea.ops import Step

MAX_PIXELS = 64_000_000
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}

# Refuse truncated files instead of silently padding them with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def _bits(img: Image.Image) -> int:
    """Declared bits per sample of an integer image (TIFF tag 258); 16 when the file does not say."""
    tags = getattr(img, "tag_v2", None)
    declared = tags.get(258) if tags is not None else None
    if isinstance(declared, tuple):
        declared = declared[0] if declared else None
    return int(declared) if declared else 16


def _to_rgb(img: Image.Image, bits: int = 16) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img)
        if mode == "I" and bits > 16:
            scaled = arr.astype(np.float64) * (255.0 / (2**31 - 1))  # signed 32-bit: its full positive range
        else:
            scaled = arr.astype(np.float64) / 257.0  # 65535 / 255
        gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if arr.max(initial=0.0) <= 1.0 else 255.0
        gray = np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return np.asarray(img.convert("RGB"))


def open_image(source: str | Path | bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open an image lazily and check it is safe to decode; raises :class:`ImageError`."""
    if isinstance(source, bytes):
        if not source:
            raise ImageError("empty file (0 bytes)")
        fp: io.BytesIO | Path = io.BytesIO(source)
    else:
        fp = Path(source)
        try:
            if fp.stat().st_size == 0:
                raise ImageError("empty file (0 bytes)")
        except FileNotFoundError as e:
            raise ImageError("broken link: its target is missing" if fp.is_symlink() else "file not found") from e
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)
    except UnidentifiedImageError as e:
        raise ImageError("not an image (unrecognised format)") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # Pillow's guard, in our words
        size = str(e).split(" exceeds")[0].replace("Image size (", "").rstrip(")")
        raise ImageError(f"too large: {size} exceeds the {max_pixels:,}-pixel limit (decompression-bomb guard)") from e
    except OSError as e:
        raise ImageError(f"unreadable: {e}") from e
    w, h = img.size
    if w * h > max_pixels or w == 0 or h == 0:
        img.close()
        if w * h > max_pixels:
            raise ImageError(f"too large: {w}x{h} pixels exceeds the {max_pixels:,}-pixel limit (decompression-bomb guard)")
        raise ImageError(f"degenerate size {w}x{h}")
    return img


def read_image(
    source: str | Path | bytes,
    max_pixels: int = MAX_PIXELS,
    draft_size: int | None = None,
) -> np.ndarray:
    """Decode an image to an (H, W, 3) uint8 RGB array.

    Args:
        source: a path or the file's bytes.
        max_pixels: refuse larger images before decoding them.
        draft_size: when set, let the JPEG decoder downscale by a power of two while keeping the
            shorter side >= this; 2-4x faster for large photos, and exact for what follows (a resize).
    """
    img = opened = open_image(source, max_pixels)
    try:
        if draft_size and img.format == "JPEG":
            w, h = img.size
            scale = min(w, h) / draft_size
            if scale >= 2:
                img.draft("RGB", (max(1, round(w / scale)), max(1, round(h / scale))))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Palette images with Transparency" chatter
            img.load()
            bits = _bits(img)  # before the transpose, which returns an image without the file's tags
            img = ImageOps.exif_transpose(img) or img
            return _to_rgb(img, bits)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, TypeError) as e:
        msg = str(e) or type(e).__name__
        if "truncated" in msg:
            raise ImageError("truncated or corrupt file") from e
        raise ImageError(f"corrupt or unsupported image: {msg}") from e
    except Exception as e:  # noqa: BLE001 - PIL plugins raise anything; never crash a whole run
        raise ImageError(f"could not decode: {type(e).__name__}: {e}") from e
    finally:
        opened.close()  # the file handle; the pixels returned are a separate array


def resize_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to ``size`` (bilinear, antialiased) and centre-crop to size x size.

    The one resize used everywhere (cache, evaluation, prediction, serving), so a model sees the
    same pixels at training and at inference. Returns (size, size, 3) uint8.
    """
    h, w = rgb.shape[:2]
    scale = size / min(h, w)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = Image.fromarray(rgb)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)))


def load_square(source: str | Path | bytes, size: int, max_pixels: int = MAX_PIXELS,
                steps: Sequence[Step] = ()) -> np.ndarray:
    """read_image + resize_square, decoding JPEGs at reduced size when that is exact enough.

    ``steps`` (classical operations from ``fovea.ops``, e.g. gray then CLAHE) run after the resize, on
    the size x size image: a model artifact is applied to images already decoded at its size (evaluate,
    ensembles, serving), so only this order gives the same pixels in training and after it; and the cost
    stays bounded (gray + CLAHE: 0.05 ms at 64 px, 55 ms on a 12 MP photo).
    """
    square = resize_square(read_image(source, max_pixels, draft_size=size * 2), size)
    if not steps:
        return square
    from fovea.ops import preprocess

    return preprocess(square, list(steps))


def progress_bar(total: int, description: str, enabled: bool):  # noqa: ANN202 - rich types are noisy
    """A transient rich bar (done of total, time left); nothing when disabled (logs, pipes, tests)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        disable=not enabled, transient=True,
    )
