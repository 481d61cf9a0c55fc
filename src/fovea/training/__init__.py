"""Training: one loop, a few callbacks, self-describing checkpoints and run folders."""

from fovea.training._config import OPTIMIZERS, SCHEDULES, TrainConfig
from fovea.training._loop import config_fields, train
from fovea.training._lr_find import lr_find as lr_find  # re-exported (fovea.training.lr_find)
from fovea.training._schedule import lr_at

__all__ = ["OPTIMIZERS", "SCHEDULES", "TrainConfig", "config_fields", "lr_at", "train"]
