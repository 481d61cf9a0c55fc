"""Training from trained weights: choosing the mode, freezing, discriminative learning rates, and the
``features`` mode's cached embeddings.

``auto`` follows the course's table (shared/seeds, "Choosing the appropriate level of Transfer Learning"):

| data  | domain         | approach                                   |
| ----- | -------------- | ------------------------------------------ |
| small | similar        | the backbone as a fixed feature extractor  |
| large | similar        | freeze 70 % (60-80 %), fine-tune the rest  |
| small | very different | freeze 40 % (30-50 %), fine-tune the rest  |
| large | very different | fine-tune everything from the weights      |

Size is counted (small: fewer than ``LARGE_DATA`` training images). Similarity is measured with
:func:`fovea.models.backbone.domain_shift`: the KL divergence between the new images' activation
statistics and the backbone's BatchNorm running statistics, per layer, divided by the same for random
noise images, geometric mean over layers; ``SIMILAR_SHIFT`` separates the two (docs/transfer.md has the values measured on pets, ants/bees and digits).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fovea._home import cache_dir
from fovea.errors import FoveaError
from fovea.models.backbone import NORMS, embed, frozen_count, layer_groups
from fovea.runtime import infer

if TYPE_CHECKING:
    from fovea.training._fit import Fit

from fovea.training._fit import Callback

log = logging.getLogger("fovea.training")

LARGE_DATA = 1000  # training images; the course's "small" data sets are hundreds
# Shift relative to random noise's; below: the same kind of images as the backbone's. Calibrated on
# backbones Fovea pretrained on cats and dogs (docs/transfer.md): other photos (ants/bees) measured
# 0.11-0.18, handwritten digits 0.41-0.51.
SIMILAR_SHIFT = 0.3
FREEZE = {("large", True): 0.7, ("small", False): 0.4, ("large", False): 0.0}
SHIFT_SAMPLE = 256  # images used to measure the shift


def choose_mode(n_train: int, shift: float | None) -> tuple[str, float, dict[str, Any]]:
    """The course's table: (mode, freeze fraction, what was measured and why)."""
    size = "large" if n_train >= LARGE_DATA else "small"
    if shift is None:
        return "finetune", 0.5, {
            "n_train": n_train, "size": size, "shift": None, "similar": None,
            "why": f"{n_train} training images; the backbone has no BatchNorm statistics to compare them with, "
                   "so similarity is unknown: fine-tune with the lower half frozen"}
    similar = shift < SIMILAR_SHIFT
    size_words = f"{n_train} training images ({size}: {'>=' if size == 'large' else '<'} {LARGE_DATA})"
    sim_words = (f"domain shift {shift:.2f} ({'similar' if similar else 'very different'}: "
                 f"{'<' if similar else '>='} {SIMILAR_SHIFT}; the KL divergence of the images' activation statistics from "
                 "the backbone's BatchNorm statistics, relative to random noise's)")
    if size == "small" and similar:
        mode, freeze, approach = "features", 1.0, "use the pretrained network as a fixed feature extractor"
    else:
        mode, freeze = "finetune", FREEZE[(size, similar)]
        approach = (f"freeze {freeze:.0%} of the backbone from the input side and fine-tune the rest"
                    if freeze else "fine-tune the entire network from the pretrained weights")
    return mode, freeze, {"n_train": n_train, "size": size, "shift": shift, "similar": similar,
                          "why": f"{size_words}, {sim_words}: {approach}"}


def measure_shift(model: nn.Module, images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                  device: torch.device, seed: int) -> float | None:
    """The images' domain shift relative to that of random noise: 0 = the backbone's own kind of
    images, 1 = as far as noise. Each BatchNorm layer's KL is divided by the noise's at the same layer
    and the ratios are averaged geometrically, so that every layer counts alike whatever its scale and
    one threshold fits backbones of any depth."""
    from fovea.data import norm_coefficients, normalize
    from fovea.models.backbone import domain_shift

    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(images), generator=g)[:SHIFT_SAMPLE]
    coef = norm_coefficients(mean, std, device)
    shift = domain_shift(model, normalize(images[pick].to(device), mean, std, coef))
    noise = torch.randint(0, 256, (len(pick), *images.shape[1:]), generator=g, dtype=torch.uint8)
    reference = domain_shift(model, normalize(noise.to(device), mean, std, coef))
    if shift is None or reference is None:
        return None
    ratios = [s / r for s, r in zip(shift, reference, strict=True) if math.isfinite(s) and math.isfinite(r) and r > 0]
    if not ratios:
        return None
    return math.exp(sum(math.log(max(x, 1e-6)) for x in ratios) / len(ratios))


# ----------------------------------------------------------------------------------------- fine-tuning


def finetune_param_groups(model: nn.Module, freeze: float, weight_decay: float,
                          lowest_lr_scale: float = 0.1) -> tuple[list[dict[str, Any]], list[nn.Parameter], list[nn.Module]]:
    """Optimizer groups with discriminative learning rates, the backbone parameters the head phase
    freezes, and the BatchNorm modules that stay frozen throughout.

    The frozen share (from the input side) is left out of the optimizer. The trainable backbone groups
    get learning-rate scales rising geometrically from ``lowest_lr_scale`` (the earliest) to 1 (the
    latest); the head gets 1 (as fastai's ``slice(lr/10, lr)``).
    """
    groups = layer_groups(model)
    k = frozen_count(groups, freeze)
    frozen = [p for g in groups[:k] for _, p in g]
    for p in frozen:
        p.requires_grad_(False)
    frozen_names = {n for g in groups[:k] for n, _ in g}
    frozen_norms: list[nn.Module] = [m for n, m in model.named_modules()
                                     if isinstance(m, NORMS) and f"{n}.weight" in frozen_names]
    trainable = groups[k:]
    backbone_ids = {id(p) for g in groups for _, p in g}
    head = [p for p in model.parameters() if id(p) not in backbone_ids]
    out: list[dict[str, Any]] = []

    def add(params: list[nn.Parameter], scale: float) -> None:
        decay = [p for p in params if p.ndim > 1]
        rest = [p for p in params if p.ndim <= 1]
        if decay:
            out.append({"params": decay, "weight_decay": weight_decay, "lr_scale": scale})
        if rest:
            out.append({"params": rest, "weight_decay": 0.0, "lr_scale": scale})

    n = len(trainable)
    for i, g in enumerate(trainable):
        add([p for _, p in g], lowest_lr_scale ** ((n - 1 - i) / max(n - 1, 1)) if n > 1 else 1.0)
    add(head, 1.0)
    body = [p for g in trainable for _, p in g]
    return out, body, frozen_norms


class Freezer(Callback):
    """Fine-tuning in two phases, like fastai's ``fine_tune``: the head alone for ``head_epochs`` (the
    whole backbone frozen), then the unfrozen share of the backbone too.

    Frozen BatchNorm layers run in eval mode: they normalise with the statistics they were trained with
    and do not update them, so a frozen block computes exactly what it computed before.
    """

    def __init__(self, model: nn.Module, body: list[nn.Parameter], frozen_norms: list[nn.Module],
                 head_epochs: int) -> None:
        self.body, self.frozen_norms, self.head_epochs = body, frozen_norms, head_epochs
        self.body_norms = [m for m in model.modules() if isinstance(m, NORMS)
                           and any(p is q for p in m.parameters() for q in body)]

    def before_epoch(self, fit: Fit) -> None:
        head_only = fit.epoch < self.head_epochs
        for p in self.body:
            p.requires_grad_(not head_only)
        for m in self.frozen_norms + (self.body_norms if head_only else []):
            m.eval()
        if fit.epoch == self.head_epochs and self.head_epochs > 0:
            log.info("unfreezing: %d backbone tensors train from epoch %d", len(self.body), fit.epoch + 1)


def two_phase_lr(head_steps: int, peak: float, schedule: str):  # noqa: ANN201
    """One schedule per phase (as fastai's fine_tune): the head at ``peak``, then everything at peak/2.

    A function of (step, total steps): a time budget may change the total once the run has measured its speed.
    """
    from fovea.training._schedule import lr_at

    def lr(step: int, total_steps: int) -> float:
        if step < head_steps:
            return lr_at(step, head_steps, peak, schedule)
        return lr_at(step - head_steps, max(total_steps - head_steps, 1), peak / 2, schedule)

    return lr


# ------------------------------------------------------------------------------------ features mode


class _Embedder(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return embed(self.model, x)


def _weights_digest(model: nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def features(model: nn.Module, images: torch.Tensor, *, mean: tuple[float, ...], std: tuple[float, ...],
             device: torch.device, amp: bool, channels_last: bool, cache: bool) -> torch.Tensor:
    """Pooled embeddings (N, D) of uint8 images, computed once and cached by content (weights + pixels)."""
    if not hasattr(model, "forward_head"):
        raise FoveaError(f"--mode features needs a model with a separate head (Fovea's or timm's), "
                         f"not {type(model).__name__}; use --mode finetune")
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{_weights_digest(model)}:{mean}:{std}:{images.shape}".encode())
    for i in range(0, len(images), 4096):  # in slices: a disk-backed set is never read whole into memory
        h.update(images[i : i + 4096].contiguous().numpy().tobytes())
    path = cache_dir() / "features" / f"{h.hexdigest()}.npy"
    if cache and path.exists():
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except (OSError, ValueError):
            pass
    # Embeddings in fp32 even under bf16 autocast: the head then trains on exact features.
    out = infer(_Embedder(model), images, mean=mean, std=std, device=device, amp=amp, channels_last=channels_last)
    if cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, out.numpy(), allow_pickle=False)
            tmp.replace(path)
        except OSError as e:
            log.warning("could not cache embeddings in %s: %s", path.parent, e)
    return out


class FeatureBatches:
    """Batches of cached embeddings: the ``features`` mode's stand-in for ``Batches``."""

    def __init__(self, feats: torch.Tensor, labels: torch.Tensor, batch_size: int, *, device: torch.device,
                 generator: torch.Generator, mean: tuple[float, ...], std: tuple[float, ...],
                 sample_weights: torch.Tensor | None = None) -> None:
        self.feats, self.labels = feats.to(device), labels.to(device)
        self.sample_weights = sample_weights
        self.batch_size, self.generator = batch_size, generator
        self.mean, self.std = mean, std  # of the images behind the features: the final evaluation needs them

    def __len__(self) -> int:
        return max(1, -(-len(self.labels) // self.batch_size))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        if self.sample_weights is not None:  # --sampler balanced
            order = torch.multinomial(self.sample_weights.to(self.generator.device), n, replacement=True,
                                      generator=self.generator)
        else:
            order = torch.randperm(n, generator=self.generator, device=self.generator.device)
        order = order.to(self.feats.device)
        for i in range(0, len(order), self.batch_size):
            idx = order[i : i + self.batch_size]
            yield self.feats[idx], self.labels[idx]
