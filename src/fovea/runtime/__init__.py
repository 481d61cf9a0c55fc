"""The runtime: a model artifact loaded and ready to predict, whatever runs it.

``load(folder)`` reads model.json and builds the predictor its runtime names (``RUNTIMES``): PyTorch weights
(float32, fp16/bf16, int8 weights), an ONNX file in ONNX Runtime, a torch.export program, or an ensemble of
PyTorch members. Every one is a ``Predictor`` with the same interface: ``load_images``, ``predict_proba``,
``outputs``, ``predict``, ``logits``; single networks add their ``--preprocess`` steps and test-time
augmentation. A model whose artifact carries a fitted unknown score (``unknown``) answers "unknown" for images
of none of its classes; ``fit_unknown`` fits one.
Everything that uses a trained model (evaluate, explain, compress, batch, serve, monitor) starts here; nothing
here imports those stages.
"""

from __future__ import annotations

from fovea.runtime._ensemble import Ensemble
from fovea.runtime._load import RUNTIMES, load, load_single
from fovea.runtime._openset import calibrate_ensemble, fit_unknown, recalibrate_unknown
from fovea.runtime._predictor import UNKNOWN, Network, Outputs, Prediction, Predictor, pick_device, set_blocks
from fovea.runtime._torch import TorchModel, autocast, infer, save_model
from fovea.runtime.exported import ExportedModel
from fovea.runtime.onnx import OnnxModel

__all__ = ["RUNTIMES", "UNKNOWN", "Ensemble", "ExportedModel", "Network", "OnnxModel", "Outputs", "Prediction",
           "Predictor", "TorchModel", "autocast", "calibrate_ensemble", "fit_unknown", "infer", "load", "load_single",
           "pick_device", "recalibrate_unknown", "save_model", "set_blocks"]
