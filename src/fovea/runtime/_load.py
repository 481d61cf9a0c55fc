"""``load(folder)``: the predictor model.json's runtime names, from one explicit table."""

from __future__ import annotations

from pathlib import Path

from fovea.artifact import read_meta, runtime_of
from fovea.errors import FoveaError
from fovea.runtime._ensemble import Ensemble
from fovea.runtime._predictor import Network, Predictor
from fovea.runtime._torch import TorchModel
from fovea.runtime.exported import ExportedModel
from fovea.runtime.onnx import OnnxModel

# model.json's runtime -> the class that runs it
RUNTIMES: dict[str, type[Predictor]] = {
    "torch": TorchModel, "onnxruntime": OnnxModel, "torch.export": ExportedModel, "ensemble": Ensemble,
}



def load(path: str | Path, device: str = "auto", *, unknown: bool = True) -> Predictor:
    """Load a model artifact (a run folder or any folder with model.json and its network's file).

    ``unknown=False``: closed-set, even when the artifact carries an unknown-image score (``--no-unknown``).
    """
    meta = read_meta(path)
    kind = runtime_of(meta)
    if kind not in RUNTIMES:
        raise FoveaError(f"{path}: runtime {kind!r} is not one this Fovea knows; upgrade fovea")
    return RUNTIMES[kind](path, device, meta, unknown)


def load_single(path: str | Path, device: str = "auto", *, unknown: bool = True) -> Network:
    """``load`` for code that needs one network (an ensemble is refused with a clear error)."""
    model = load(path, device, unknown=unknown)
    if not isinstance(model, Network):
        raise FoveaError(f"{path} is an ensemble of several models; give one model (its members are in {path}/members)")
    return model
