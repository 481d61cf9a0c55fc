"""Cheap statistics of an image that move when the camera, the light or the pipeline changes.

Computed on the square the model sees (brightness, contrast, colourfulness, sharpness) and from the file's
header (width, height, aspect), so they cost a few microseconds per image beside decoding.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

STATS = ("brightness", "contrast", "colourfulness", "red_green", "yellow_blue", "sharpness", "width", "height", "aspect")
SQUARE = 6  # the first six come from the pixels, the last three from the header


def square_stats(images: torch.Tensor) -> np.ndarray:
    """(N, 6) brightness, contrast, colourfulness, red_green, yellow_blue, sharpness of uint8 (N, 3, S, S) images.

    brightness and contrast: mean and standard deviation of the luma, in [0, 1]; colourfulness: Hasler and
    Süsstrunk (2003) on the RGB channels; red_green and yellow_blue: the mean of their opponent channels
    (a colour cast or swapped channels moves them); sharpness: log(1 + variance of the Laplacian) of the
    luma (drops when an image is blurred).
    """
    import cv2

    x = images.float().numpy() / 255.0
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    luma = 0.299 * r + 0.587 * g + 0.114 * b
    rg, yb = r - g, 0.5 * (r + g) - b
    colourfulness = (np.sqrt(rg.std((1, 2)) ** 2 + yb.std((1, 2)) ** 2)
                     + 0.3 * np.sqrt(rg.mean((1, 2)) ** 2 + yb.mean((1, 2)) ** 2))
    sharpness = np.array([np.log1p(cv2.Laplacian(y.astype(np.float32), cv2.CV_32F).var() * 255 ** 2) for y in luma])
    return np.stack([luma.mean((1, 2)), luma.std((1, 2)), colourfulness, rg.mean((1, 2)), yb.mean((1, 2)), sharpness],
                    1).astype(np.float32)


def header_size(source: bytes | str | Path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding; (0, 0) when unreadable."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            return int(im.width), int(im.height)
    except Exception:  # noqa: BLE001 - the decoder already reported the file; stats are best effort
        return 0, 0


def image_stats(images: torch.Tensor, sizes: list[tuple[int, int]]) -> np.ndarray:
    """(N, 9) every statistic in ``STATS`` order."""
    sq = square_stats(images) if len(images) else np.zeros((0, SQUARE), np.float32)
    wh = np.array(sizes, np.float32).reshape(-1, 2)
    aspect = wh[:, 0] / np.maximum(wh[:, 1], 1)
    return np.concatenate([sq, wh, aspect[:, None]], 1).astype(np.float32)
