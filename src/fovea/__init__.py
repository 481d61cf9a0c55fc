"""Fovea: from a folder of labelled images to a model trained well, evaluated honestly and served.

The public API mirrors the CLI::

    import fovea
    run = fovea.train("data/pets", model="cnn")
    print(fovea.evaluate(run, "data/pets")["accuracy"])
    preds, skipped = fovea.load(run).predict(["cat.jpg"])

Nothing heavy is imported until it is used. The stages live in subpackages named by noun
(``fovea.training``, ``fovea.evaluation``, ...) so that they never shadow these verbs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["check", "evaluate", "load", "train"]

if TYPE_CHECKING:
    from fovea.data import check
    from fovea.evaluation import evaluate
    from fovea.runtime import load
    from fovea.training import train


def __getattr__(name: str) -> Any:
    if name == "train":
        from fovea.training import train

        return train
    if name == "evaluate":
        from fovea.evaluation import evaluate

        return evaluate
    if name == "load":
        from fovea.runtime import load

        return load
    if name == "check":
        from fovea.data import check

        return check
    raise AttributeError(f"module 'fovea' has no attribute {name!r}")
