"""The runtime: a model artifact loaded and ready to predict, whatever runs it.

``load(folder)`` reads model.json and builds the predictor its runtime names (``RUNTIMES``): PyTorch weights
(float32, fp16/bf16, int8 weights), an ONNX file in ONNX Runtime, a torch.export program, or an ensemble of
PyTorch members. Every one is a ``Predictor`` with the same interface: ``load_images``, ``predict_proba``,
``predict``, ``logits``; single networks add their ``--preprocess`` steps and test-time augmentation.
Everything that uses a trained model (evaluate, explain, compress, batch, serve, monitor) starts here; nothing
here imports those stages.
"""

from __future__ import annotations

from pathlib import Path

from fovea.artifact import read_meta, runtime_of
from fovea.errors import FoveaError
from fovea.runtime._ensemble import Ensemble
from fovea.runtime._predictor import Network, Prediction, Predictor, pick_device
from fovea.runtime._torch import TorchModel, autocast, infer, save_model
from fovea.runtime.exported import ExportedModel
from fovea.runtime.onnx import OnnxModel

# model.json's runtime -> the class that runs it
RUNTIMES: dict[str, type[Predictor]] = {
    "torch": TorchModel, "onnxruntime": OnnxModel, "torch.export": ExportedModel, "ensemble": Ensemble,
}

__all__ = ["RUNTIMES", "Ensemble", "Network", "OnnxModel", "Prediction", "Predictor", "TorchModel", "autocast",
           "infer", "load", "load_single", "pick_device", "save_model"]


def load(path: str | Path, device: str = "auto") -> Predictor:
    """Load a model artifact (a run folder or any folder with model.json and its network's file)."""
    meta = read_meta(path)
    kind = runtime_of(meta)
    if kind not in RUNTIMES:
        raise FoveaError(f"{path}: runtime {kind!r} is not one this Fovea knows; upgrade fovea")
    return RUNTIMES[kind](path, device, meta)


def load_single(path: str | Path, device: str = "auto") -> Network:
    """``load`` for code that needs one network (an ensemble is refused with a clear error)."""
    model = load(path, device)
    if not isinstance(model, Network):
        raise FoveaError(f"{path} is an ensemble of several models; give one model (its members are in {path}/members)")
    return model
