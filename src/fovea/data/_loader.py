"""Batches straight from a uint8 tensor on the training device, augmented with batched tensor ops.

No worker processes, no per-sample Python: a batch is an index, a gather, a float conversion and one
``grid_sample`` that does crop, scale, translation and flip for the whole batch at once (the airbench
approach). On a GPU all of it runs on the GPU; on a CPU it costs ~1 ms per 256 images at 64 px.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("none", "flip", "light", "standard", "strong")
# strong = standard + rotation + per-image colour jitter + random erasing (+ mixup/cutmix, in the training step).


def norm_coefficients(mean: tuple[float, ...], std: tuple[float, ...],
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) such that ``x * scale - shift`` is (x / 255 - mean) / std, on ``device``."""
    m, s = torch.tensor(mean), torch.tensor(std)
    scale = (1.0 / (255.0 * s)).view(1, -1, 1, 1)
    shift = (m / s).view(1, -1, 1, 1)
    return scale.to(device), shift.to(device)


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
              coef: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float32 (x / 255 - mean) / std, as one multiply and one subtract.

    ``coef`` (from ``norm_coefficients``) lets a caller keep the constants on the device: building them per
    batch is a host-to-device copy, which stalls the GPU queue every step.
    """
    scale, shift = coef if coef is not None else norm_coefficients(mean, std, x.device)
    return x.float().mul_(scale).sub_(shift)


def _affine(
    b: int, policy: str, device: torch.device, g: torch.Generator, size: int
) -> torch.Tensor:
    """Per-sample affine matrices (B, 2, 3) in grid_sample's normalised coordinates."""
    u = torch.rand(b, 5, device=device, generator=g)
    flip = torch.where(u[:, 0] < 0.5, -1.0, 1.0)
    if policy in ("standard", "strong"):
        # Random resized crop (Szegedy et al. 2015): area in [0.35, 1], aspect in [3/4, 4/3].
        # The lower bound is higher than ImageNet's 0.08: small images have few pixels to spare.
        area = 0.35 + 0.65 * u[:, 1]
        logr = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, 2]
        sx = torch.sqrt(area * torch.exp(logr)).clamp(max=1.0)
        sy = torch.sqrt(area / torch.exp(logr)).clamp(max=1.0)
        tx = (1 - sx) * (2 * u[:, 3] - 1)
        ty = (1 - sy) * (2 * u[:, 4] - 1)
    elif policy == "light":
        # Translate by up to 1/8 of the side, reflecting at the border, in whole pixels (no blur).
        sx = sy = torch.ones(b, device=device)
        pad = max(1, size // 8)
        tx = torch.round((2 * u[:, 3] - 1) * pad) * 2 / size
        ty = torch.round((2 * u[:, 4] - 1) * pad) * 2 / size
    else:  # flip
        sx = sy = torch.ones(b, device=device)
        tx = ty = torch.zeros(b, device=device)
    theta = torch.zeros(b, 2, 3, device=device)
    if policy == "strong":  # rotation by up to 15 degrees, composed with the crop
        a = (torch.rand(b, device=device, generator=g) * 2 - 1) * math.radians(15)
        cos, sin = torch.cos(a), torch.sin(a)
        theta[:, 0, 0], theta[:, 0, 1] = cos * sx * flip, -sin * sy
        theta[:, 1, 0], theta[:, 1, 1] = sin * sx * flip, cos * sy
    else:
        theta[:, 0, 0] = sx * flip
        theta[:, 1, 1] = sy
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    return theta


def color_jitter(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, g: torch.Generator,
                 strength: float = 0.3) -> torch.Tensor:
    """Per-image brightness, contrast and saturation factors in [1 - strength, 1 + strength].

    Works on normalised batches (un-normalise, jitter, re-normalise: a few element-wise ops).
    torchvision's ColorJitter draws one factor per call, i.e. per batch here; we want one per image.
    """
    b = x.shape[0]
    f = 1 + (torch.rand(b, 3, 1, 1, 1, device=x.device, generator=g) * 2 - 1) * strength
    rgb = x * std + mean  # back to [0, 1]
    rgb = rgb * f[:, 0]  # brightness
    gray = (0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3])
    rgb = (rgb - gray.mean((2, 3), keepdim=True)) * f[:, 1] + gray.mean((2, 3), keepdim=True)  # contrast
    gray = 0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]
    rgb = (gray + (rgb - gray) * f[:, 2]).clamp_(0, 1)  # saturation
    return (rgb - mean) / std


def random_erase(x: torch.Tensor, g: torch.Generator, p: float = 0.25) -> torch.Tensor:
    """Random erasing (Zhong et al. 2017): with probability p, one rectangle per image of 2-25 % of the
    area (aspect 0.3-3.3) is replaced by noise. One masked op for the batch; timm's RandomErasing loops
    over the images in Python and draws from the unseeded ``random`` module.
    """
    b, c, h, w = x.shape
    u = torch.rand(b, 5, device=x.device, generator=g)
    area = (0.02 + 0.23 * u[:, 0]) * h * w
    aspect = torch.exp(math.log(0.3) + (math.log(3.3) - math.log(0.3)) * u[:, 1])
    eh = torch.sqrt(area * aspect).clamp(max=h)
    ew = torch.sqrt(area / aspect).clamp(max=w)
    y0 = (h - eh) * u[:, 2]
    x0 = (w - ew) * u[:, 3]
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    box = ((ys >= y0.view(-1, 1, 1)) & (ys < (y0 + eh).view(-1, 1, 1))
           & (xs >= x0.view(-1, 1, 1)) & (xs < (x0 + ew).view(-1, 1, 1)) & (u[:, 4] < p).view(-1, 1, 1))
    noise = torch.randn(x.shape, device=x.device, generator=g, dtype=x.dtype)
    return torch.where(box.unsqueeze(1), noise, x)


def augment(x: torch.Tensor, policy: str, g: torch.Generator,
            norm: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Augment a normalised float batch (B, C, H, W): one batched grid_sample for the geometry; ``strong``
    adds colour jitter (needs ``norm`` = per-channel (mean, std) tensors) and random erasing."""
    if policy == "none":
        return x
    if policy not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {policy!r}; choose from {', '.join(AUGMENTATIONS)}")
    b, c, h, w = x.shape
    theta = _affine(b, policy, x.device, g, w)
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if policy == "strong":
        if norm is not None:
            x = color_jitter(x, norm[0], norm[1], g)
        x = random_erase(x, g)
    return x


class Batches:
    """Iterate (x, y) batches from uint8 images held on ``device``.

    Args:
        images: (N, 3, S, S) uint8 - moved to ``device`` once.
        labels: (N,) int64.
        augment: one of AUGMENTATIONS; "none" for evaluation.
        generator: drives order and augmentation, so a seeded run is repeatable and resumable.
        shard: (rank, world) of a distributed run: every process draws the same order (the same ``generator``
            state) and takes its share of each global batch of ``batch_size`` images.
        augment_generator: draws the augmentation instead of ``generator`` (a distributed run's own per process).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        device: torch.device,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: str = "none",
        shuffle: bool = False,
        drop_last: bool = False,
        generator: torch.Generator | None = None,
        sample_weights: torch.Tensor | None = None,
        channels_last: bool = False,
        shard: tuple[int, int] = (0, 1),
        augment_generator: torch.Generator | None = None,
    ) -> None:
        self.images = self._place(images, device)
        self.labels = labels.to(device)
        self.batch_size = batch_size
        self.shard = shard
        if batch_size % shard[1]:
            raise ValueError(f"a global batch of {batch_size} does not split over {shard[1]} processes")
        self.device = device
        self.mean, self.std = mean, std
        self._coef = norm_coefficients(mean, std, device)
        self._norm = (torch.tensor(mean, device=device).view(1, -1, 1, 1), torch.tensor(std, device=device).view(1, -1, 1, 1))
        self.policy = augment
        self.shuffle, self.drop_last = shuffle, drop_last
        self.generator = generator or torch.Generator(device=device)
        self.sample_weights = sample_weights
        self.channels_last = channels_last
        self.augment_generator = augment_generator or self.generator

    def _place(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        return images.to(device, non_blocking=True)  # the whole set on the training device, once

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last and n >= self.batch_size else math.ceil(n / self.batch_size)

    def _order(self) -> torch.Tensor:
        n = len(self.labels)
        if self.sample_weights is not None:
            return torch.multinomial(self.sample_weights.to(self.device), n, replacement=True, generator=self.generator)
        if self.shuffle:
            return torch.randperm(n, device=self.device, generator=self.generator)
        return torch.arange(n, device=self.device)

    def indices(self) -> Iterator[torch.Tensor]:
        """This process's rows of each batch: the epoch's order cut into global batches, then its shard."""
        order = self._order()
        rank, world = self.shard
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield idx.tensor_split(world)[rank] if world > 1 else idx

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """A uint8 batch on the device -> normalised and augmented."""
        x = augment(normalize(x, self.mean, self.std, self._coef), self.policy, self.augment_generator, self._norm)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx in self.indices():
            yield self.prepare(self.images[idx]), self.labels[idx]
