"""Training: one loop, a few callbacks, self-describing checkpoints and run folders."""

from fovea.training._config import OPTIMIZERS, SCHEDULES, TrainConfig
from fovea.training._loop import train
from fovea.training._schedule import lr_at

__all__ = ["OPTIMIZERS", "SCHEDULES", "TrainConfig", "lr_at", "train"]
