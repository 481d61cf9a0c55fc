"""The state one training run shares between the loop and its callbacks, and the events callbacks hear.

One vocabulary of events (fastai's): before_fit, before_epoch, after_batch, after_epoch, after_fit. Each callback
sees the ``Fit`` and may set ``fit.stop``; the callbacks themselves are in ``_callbacks.py``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from fovea.data import Batches, ImageSet
    from fovea.training._config import TrainConfig


@dataclass
class Fit:
    """Everything the loop and its callbacks share."""

    cfg: TrainConfig
    run: Path
    model: nn.Module
    opt: torch.optim.Optimizer
    batches: Batches
    val: ImageSet
    device: torch.device
    generator: torch.Generator
    callbacks: list[Callback]
    epoch: int = 0
    step: int = 0
    steps_per_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    running: dict[str, float] = field(default_factory=dict)
    epoch_start: float = 0.0
    best_score: float | None = None
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    stop: bool = False
    val_images: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # val set, kept on the device
    val_features: torch.Tensor | None = None  # features mode: the val set's embeddings
    lr_fn: Any = None  # (step, total steps) -> learning rate; None: the configured schedule over the whole run
    val_seconds: float = 0.0  # the last per-epoch validation pass (a time budget plans with it)
    main: bool = True  # rank 0 of a distributed run (or the only process): it evaluates and writes
    world: int = 1  # processes training together; each sees 1 / world of every batch

    def fire(self, event: str) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(self)

    def val_logits(self, tta: bool = False) -> torch.Tensor:
        """Validation logits. Per-epoch checks skip test-time augmentation (half the cost); the final one uses it."""
        if self.val_features is not None:
            self.model.eval()
            with torch.no_grad():
                out = self.model(self.val_features).float().cpu()
            self.model.train()
            return out
        from fovea.runtime import infer

        return infer(self.model, self.val_images, mean=self.batches.mean, std=self.batches.std, device=self.device,
                     amp=bool(self.cfg.amp), tta=tta, channels_last=bool(self.cfg.channels_last))

    def total_steps(self) -> int:
        """The schedule's length; read at every step, because a time budget sets the epochs after measuring."""
        return self.steps_per_epoch * int(self.cfg.epochs or 1)


class Callback:
    def before_fit(self, fit: Fit) -> None: ...
    def before_epoch(self, fit: Fit) -> None: ...
    def after_batch(self, fit: Fit) -> None: ...
    def after_epoch(self, fit: Fit) -> None: ...
    def after_fit(self, fit: Fit) -> None: ...
