"""An ensemble artifact loaded: several networks whose probabilities are averaged (``fovea ensemble`` writes it).

Members may differ in input size. The ensemble takes images at the largest member's size and each smaller
member gets them resized (bilinear, antialiased) rather than decoded again at its own size, because
everything downstream hands a model images already decoded at ``model.image_size`` (evaluate decodes
through the image cache, serving and batch decode once) and because one path keeps ``fovea predict`` and
``fovea evaluate`` in agreement. Never upscaled: no member sees fewer details than it was trained on.
Measured on pets/val (1000 real photos; cnn members trained 8 epochs on pets at 32, 48 and 64 px; 2-core
CPU), against each member decoding the files at its own size:

- one member fed resized images agrees on 96-98 % of the labels, mean |delta p| 0.011-0.017, accuracy
  within noise (32 px: 72.5 % own decode, 73.1 % resized from 64 px);
- the ensembles 32+64, 48+64, 32+48 and 32+48+64 agree on 97.4-99.2 % of the labels, mean |delta p|
  0.006-0.009, accuracy -0.3 to +1.4 points and log loss 0.001-0.002 lower than with per-member decoding;
- decoding three sizes costs 3.9 ms/image against 1.4 ms for one; the two resizes 0.6 ms.

Members of one size (the usual case, e.g. seeds) are not resized at all: the ensemble is then exactly the
mean of its members.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fovea.artifact import MEMBERS, META
from fovea.errors import FoveaError
from fovea.runtime._predictor import Outputs, Predictor
from fovea.runtime._torch import TorchModel


def resize(images: torch.Tensor, size: int, batch_size: int = 256) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> uint8 (N, 3, size, size), bilinear with antialiasing, in batches.

    Bilinear with antialiasing is the filter of the decoder's own resize (PIL bilinear, which widens its
    kernel when shrinking). On pets/val (see the module docstring) bicubic was closer to a member's own
    decode for 48->32 and 64->48 px and further for 64->32; neither won at the ensemble level (label
    agreement 98.4-99.7 % bicubic, 97.4-99.2 % bilinear) but bilinear's log loss was lower in all four
    ensembles (by 0.002-0.004); area (box) was further than both on average. Batches keep the float copy small:
    256 images at 224 px are 150 MB, a 10 000-image evaluation at once would be 6 GB.
    """
    if images.shape[-1] == size:
        return images
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8)
    for i in range(0, len(images), batch_size):
        x = F.interpolate(images[i : i + batch_size].float(), size=(size, size), mode="bilinear",
                          antialias=True, align_corners=False)
        out[i : i + batch_size] = x.round_().clamp_(0, 255).to(torch.uint8)  # (B, 3, size, size)
    return out


class Ensemble(Predictor):
    """A loaded ensemble artifact: the mean of its members' probabilities. ``members`` are ``TorchModel``s.

    It has no ``net`` (it is several networks) and decodes exactly as its largest member does.
    """

    def __init__(self, path: str | Path, device: str = "auto", meta: dict[str, Any] | None = None,
                 unknown: bool = True) -> None:
        super().__init__(path, device, meta, unknown)
        spec = self.meta.get("ensemble")
        if not isinstance(spec, dict) or not isinstance(spec.get(MEMBERS), list) or not spec[MEMBERS]:
            raise FoveaError(f"{self.path / META}: 'ensemble' must list its members (relative folders)")
        root = self.path.resolve()
        self.members: list[TorchModel] = []
        for rel in spec[MEMBERS]:
            folder = self.path / str(rel)
            # A model folder from a stranger must not make Fovea read files outside it.
            if Path(str(rel)).is_absolute() or not folder.resolve().is_relative_to(root):
                raise FoveaError(f"{self.path / META}: member {rel!r} is outside the ensemble folder")
            self.members.append(TorchModel(folder, device, unknown=unknown))
        for rel, m in zip(spec[MEMBERS], self.members):
            if m.classes != self.classes:
                raise FoveaError(f"{self.path}: member {rel} has classes {m.classes}, the ensemble {self.classes}")
            if m.image_size > self.image_size:
                raise FoveaError(f"{self.path}: member {rel} takes {m.image_size} px images, more than the "
                                 f"ensemble's {self.image_size}; it would see upscaled images")
        self.device = self.members[0].device
        # Unknown images: the mean of the members' scores, each standardised by its mean and spread on the known
        # images the ensemble was calibrated on (their scales differ: a distance, an energy), against a threshold
        # calibrated on that mean (``fovea.ensemble`` writes it when it has held-out images).
        entry = self.meta.get("unknown") if unknown else None
        self._standardise: list[tuple[float, float]] = []
        if entry and all(m.answers_unknown for m in self.members):
            self._standardise = [(float(m["mean"]), float(m["std"])) for m in entry["members"]]
            self.unknown_threshold = float(entry["threshold"])

    def predict_proba(self, images: torch.Tensor) -> np.ndarray:
        """Mean of the members' probabilities (N, classes) for uint8 (N, 3, S, S) images at ``image_size``."""
        if len(images) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"expected uint8 images (N, 3, {self.image_size}, {self.image_size}), "
                             f"got {tuple(images.shape)}; decode with load_images()")
        probs = [m.predict_proba(resize(images, m.image_size)) for m in self.members]  # each (N, classes)
        return np.stack(probs).mean(axis=0, dtype=np.float32)  # (members, N, classes) -> (N, classes)

    def member_scores(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """The mean of the members' probabilities (N, C), and each member's unknown score (M, N) (None unless every
        member has one)."""
        outs = [m.outputs(resize(images, m.image_size)) for m in self.members]
        probs = np.stack([o.probabilities for o in outs]).mean(axis=0, dtype=np.float32)
        if any(o.unknown_scores is None for o in outs):
            return probs, None
        return probs, np.stack([np.asarray(o.unknown_scores, np.float64) for o in outs])

    def outputs(self, images: torch.Tensor, *, embed: bool = False) -> Outputs:
        if not self._standardise or len(images) == 0:
            return Outputs(self.predict_proba(images))
        probs, scores = self.member_scores(images)
        if scores is None:
            return Outputs(probs)
        mean = np.array([m for m, _ in self._standardise])[:, None]
        std = np.array([s for _, s in self._standardise])[:, None]
        return Outputs(probs, None, ((scores - mean) / std).mean(0))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Log of the mean probabilities: ``softmax`` of these gives ``predict_proba`` back, argmax agrees.

        Clamped at float32's smallest normal number so a probability that underflowed to 0 gives a finite
        logit (a loss computed on it stays finite).
        """
        p = torch.from_numpy(self.predict_proba(images))
        return p.clamp_min(torch.finfo(torch.float32).tiny).log()
