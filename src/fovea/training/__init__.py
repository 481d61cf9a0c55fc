"""Training: one loop, a few callbacks, self-describing checkpoints and run folders.

The configuration (``TrainConfig``, its command-line ``OPTIONS``) and the schedules import without PyTorch;
``train``, ``lr_find`` and ``run_result`` load it when first used, so commands that only need the options
(``fovea check``, ``fovea ops``, ``--help``) start fast.
"""

from typing import TYPE_CHECKING, Any

from fovea.training._config import OPTIONS, TrainConfig, config_fields
from fovea.training._schedule import lr_at

if TYPE_CHECKING:
    from fovea.training._finish import run_result
    from fovea.training._loop import train_one
    from fovea.training._lr_find import lr_find
    from fovea.training._train import train
    from fovea.training._unknown import calibrate_unknown

_LAZY = {"train": "_train", "lr_find": "_lr_find", "run_result": "_finish", "calibrate_unknown": "_unknown",
         "train_one": "_loop"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"fovea.training.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'fovea.training' has no attribute {name!r}")


__all__ = ["OPTIONS", "TrainConfig", "calibrate_unknown", "config_fields", "lr_at", "lr_find", "run_result", "train", "train_one"]
